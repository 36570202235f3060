//! The jailed VMM process of a VM run, as its own small binary: `rvmm run` starts it (see
//! `rvmm::vm::jail`) so that the process holding the guest maps only the VMM's code, not the
//! image store, registry client, TLS and CLI of `rvmm` (docs/benchmarks/lean.md).

use std::process::ExitCode;

fn main() -> ExitCode {
    rvmm::init_logging();
    ExitCode::from(rvmm::vm::jail::vmm_exe_main())
}

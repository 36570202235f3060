//! rvmm's long-lived small process (the `rvmm-shim` crate): what keeps a container run once its
//! workload runs, and a detached VM run's supervisor. A binary of the rvmm package so that every
//! build of rvmm builds it beside rvmm; it links nothing of rvmm's library.

use std::process::ExitCode;

fn main() -> ExitCode {
    ExitCode::from(rvmm_shim::main())
}

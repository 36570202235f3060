//! What keeps a container run once its workload runs, and the supervisor of a detached run, as
//! its own small binary: `rvmm` execs or starts it (see `rvmm::run::shim`) so that the processes
//! alive for a run's whole life map only this code (docs/benchmarks/lean.md).

use std::process::ExitCode;

fn main() -> ExitCode {
    rvmm::init_logging();
    ExitCode::from(rvmm::run::shim::shim_exe_main())
}

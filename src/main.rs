//! rvmm command line. A thin layer over the `rvmm` library: parse flags, call in, print errors once.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    rvmm::run::timings::mark_process_start();
    // Die quietly on a closed pipe (`rvmm images | head`), as command-line tools do.
    // SAFETY: setting a signal disposition to its default before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    rvmm::init_logging();
    let cli = cli::Cli::parse();
    let code = match cli::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            // One clear line: the error and its causes, each once.
            eprintln!("rvmm: {e:#}");
            cli::EXIT_RVMM_FAILED
        }
    };
    // A detached run that wrote its own log: all of it (this line included) is in the log now.
    rvmm::run::supervise::close_own_log();
    ExitCode::from(code)
}

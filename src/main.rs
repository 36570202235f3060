//! rvmm command line. A thin layer over the `rvmm` library: parse flags, call in, print errors once.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`rvmm images | head`), as command-line tools do.
    // SAFETY: setting a signal disposition to its default before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    rvmm::init_logging();
    let cli = cli::Cli::parse();
    match cli::dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // One clear line: the error and its causes, each once.
            eprintln!("rvmm: {e:#}");
            ExitCode::from(cli::EXIT_RVMM_FAILED)
        }
    }
}

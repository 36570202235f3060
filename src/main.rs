//! rvmm command line. A thin layer over the `rvmm` library: parse flags, call in, print errors once.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`rvmm images | head`), as command-line tools do.
    // SAFETY: setting a signal disposition to its default before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // virtio-queue logs errors a guest provokes at will (a bad avail index): not for the user.
    let default_log = "warn,virtio_queue=off";
    env_logger::Builder::from_env(env_logger::Env::default().filter_or("RVMM_LOG", default_log))
        .format_timestamp_millis()
        .init();
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

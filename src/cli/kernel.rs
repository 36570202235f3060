//! `rvmm kernel build|path`.

use super::Global;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Build the guest kernel from Debian's linux-source-6.12 (cached by the hash of its inputs).
    Build,
    /// Print the path of the cached vmlinux, or say how to build it.
    Path,
}

pub fn exec(cmd: Command, _global: &Global) -> anyhow::Result<u8> {
    match cmd {
        Command::Build => {
            let p = rvmm::kernel::build()?;
            println!("{}", p.display());
            Ok(0)
        }
        Command::Path => match rvmm::kernel::cached_vmlinux() {
            Ok(p) => {
                println!("{}", p.display());
                Ok(0)
            }
            Err(e) => {
                eprintln!("rvmm: {e}");
                Ok(1)
            }
        },
    }
}

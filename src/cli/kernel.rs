//! `rvmm kernel build|path`.

use super::Global;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Build the guest kernel (cached by the hash of its inputs).
    Build,
    /// Print the path of the cached vmlinux, or say how to build it.
    Path,
}

pub fn exec(_cmd: Command, _global: &Global) -> anyhow::Result<u8> {
    anyhow::bail!("`rvmm kernel` is not implemented yet")
}

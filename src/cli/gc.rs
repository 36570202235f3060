//! `rvmm gc`.

use super::Global;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn exec(_args: Args, _global: &Global) -> anyhow::Result<u8> {
    anyhow::bail!("`rvmm gc` is not implemented yet")
}

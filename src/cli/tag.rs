//! `rvmm tag SOURCE TARGET` (also `rvmm image tag`).

use rvmm::image::{Reference, Store};

use super::Global;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The image: name, name@digest, or ID (or a unique prefix of it).
    pub source: String,
    /// The new name: NAME[:TAG] (`:latest` when no tag is given).
    pub target: String,
}

pub fn exec(args: Args, global: &Global) -> anyhow::Result<u8> {
    let target = Reference::parse(&args.target)?;
    let store = Store::open(&global.root)?;
    store.tag(&args.source, &target)?;
    Ok(0)
}

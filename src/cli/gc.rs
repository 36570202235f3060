//! `rvmm gc`.

use rvmm::image::Store;
use rvmm::run::state;

use super::Global;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn exec(_args: Args, global: &Global) -> anyhow::Result<u8> {
    let runs = state::gc(&global.root);
    println!("cleaned up after {runs} dead run(s)");
    let snaps = rvmm::vm::snapshots::Snapshots::new(&global.root).gc();
    if !snaps.is_empty() {
        println!(
            "removed {} unusable snapshot(s) or leftovers of interrupted saves",
            snaps.len()
        );
    }
    if global.root.join("index.json").exists() || global.root.join("blobs").exists() {
        let store = Store::open(&global.root)?;
        if !store.gc()? {
            eprintln!("rvmm: layers in use by running workloads were kept");
        }
    }
    Ok(0)
}

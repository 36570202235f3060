//! `rvmm gc [--check | --repair]`.

use rvmm::image::Store;
use rvmm::run::state;

use super::Global;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only verify the image store (index, blob digests, unpacked layers); change nothing.
    /// Exits 1 and prints one line per problem when the store is inconsistent.
    #[arg(long, conflicts_with = "repair")]
    check: bool,
    /// Also repair the image store: rebuild a corrupt index.json, drop damaged images.
    #[arg(long)]
    repair: bool,
}

pub fn exec(args: Args, global: &Global) -> anyhow::Result<u8> {
    let has_store = global.root.join("index.json").exists()
        || global.root.join("index.json.prev").exists()
        || global.root.join("blobs").exists();
    if args.check {
        if !has_store {
            println!("image store: ok (empty)");
            return Ok(0);
        }
        let problems = Store::open(&global.root)?.check()?;
        for p in &problems {
            println!("{p}");
        }
        if problems.is_empty() {
            println!("image store: ok");
            return Ok(0);
        }
        eprintln!(
            "rvmm: image store: {} problem(s); `rvmm gc --repair` drops the damaged images",
            problems.len()
        );
        return Ok(1);
    }
    let runs = state::gc(&global.root);
    println!("cleaned up after {runs} dead run(s)");
    let leases = rvmm::net::gc_leases();
    if !leases.is_empty() {
        println!(
            "released {} address lease(s) of dead runs: {}",
            leases.len(),
            leases.join(" ")
        );
    }
    if has_store {
        let store = Store::open(&global.root)?;
        if args.repair {
            for line in store.repair()? {
                println!("{line}");
            }
        }
        if !store.gc()? {
            eprintln!("rvmm: layers in use by running workloads were kept");
        }
        let live: Vec<String> = store
            .images()?
            .iter()
            .map(|i| i.id.trim_start_matches("sha256:").to_string())
            .collect();
        let disks = rvmm::image::disk::gc(&global.root, &live);
        if !disks.is_empty() {
            println!(
                "removed {} VM disk(s) of removed images or of interrupted builds",
                disks.len()
            );
        }
    }
    // After the disks: an image snapshot of a removed image's disk goes with it.
    let snaps = rvmm::vm::snapshots::Snapshots::new(&global.root).gc();
    if !snaps.is_empty() {
        println!(
            "removed {} unusable snapshot(s) or leftovers of interrupted saves",
            snaps.len()
        );
    }
    Ok(0)
}

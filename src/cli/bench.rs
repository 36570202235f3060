//! `rvmm bench`: vm vs container vs the peers on this machine, written as a report with charts.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use rvmm::bench::{self, contenders_from_path, Options, Scenario};

use super::Global;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Scenarios to run, comma-separated: startup, warm, cold, memory, density, io, boot. Default: all.
    #[arg(long, value_delimiter = ',')]
    pub scenario: Vec<String>,
    /// A short run for a quick look: fewer repetitions, one cold VM boot, no VM density.
    #[arg(long)]
    pub quick: bool,
    /// Image every rvmm contender runs (crun and runc get a bundle of its rootfs).
    #[arg(long, default_value = rvmm::bench::DEFAULT_IMAGE)]
    pub image: String,
    /// Measured repetitions per container contender.
    #[arg(long)]
    pub runs: Option<usize>,
    /// Measured repetitions per contender that boots a kernel.
    #[arg(long)]
    pub vm_runs: Option<usize>,
    /// Unrecorded warm-up runs per contender.
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Instances for the density scenario.
    #[arg(long)]
    pub density: Option<usize>,
    /// Guest RAM of VM contenders, MiB.
    #[arg(long, default_value_t = 128)]
    pub vm_memory: u32,
    /// Where results.jsonl, report.md and the charts go.
    #[arg(long, short, default_value = "bench-results")]
    pub out: PathBuf,
    /// Per-run time limit for containers, seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Per-run time limit for VMs, seconds.
    #[arg(long, default_value_t = 300)]
    pub vm_timeout: u64,
}

pub fn exec(args: Args, global: &Global) -> anyhow::Result<u8> {
    let scenarios = if args.scenario.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        args.scenario
            .iter()
            .map(|s| Scenario::parse(s.trim()))
            .collect::<Result<Vec<_>, _>>()?
    };
    // Never pull implicitly: a bench measures what is already here.
    let store = rvmm::image::Store::open(&global.root)?;
    if store.find(&args.image)?.is_none() {
        anyhow::bail!(
            "{} is not in the image store at {}: scripts/setup.sh builds and imports the sample image, or `rvmm pull` yours first",
            args.image,
            global.root.display()
        );
    }
    let q = args.quick;
    // The measured rvmm runs from its own copy of the binary: if it ran from this process's file,
    // the pages of the binary this bench process maps would be shared with it, and its PSS would
    // count only part of them (a user's rvmm shares its binary with no bench). The copy keeps its
    // place and mtime between benches, so its warm-start snapshot is reused.
    let rvmm = private_copy(&global.root.join("bench-bin"))?;
    let opts = Options {
        scenarios,
        runs: args.runs.unwrap_or(if q { 10 } else { 30 }),
        vm_runs: args.vm_runs.unwrap_or(if q { 1 } else { 5 }),
        warmup: args.warmup.unwrap_or(if q { 1 } else { 3 }),
        density: args.density.unwrap_or(if q { 4 } else { 10 }),
        image: args.image,
        rvmm,
        root: global.root.clone(),
        out_dir: args.out,
        timeout: Duration::from_secs(args.timeout),
        vm_timeout: Duration::from_secs(args.vm_timeout),
        quick: q,
        vm_memory_mib: args.vm_memory,
        peers: contenders_from_path(),
    };
    let report = bench::run(&opts)?;
    println!("report: {}", report.display());
    Ok(0)
}

/// Copies this rvmm binary (and the rvmm-vmm, rvmm-shim and rvmm-init it would use) into `dir`,
/// unless the copy there is already of the same size and modification time; returns the copy's
/// path.
fn private_copy(dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe().context("cannot find the rvmm binary")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = vec![(exe, dir.join("rvmm"))];
    if let Some(vmm) = rvmm::vm::jail::vmm_binary_path() {
        files.push((vmm, dir.join("rvmm-vmm")));
    }
    if let Some(shim) = rvmm::run::shim::binary_path() {
        files.push((shim, dir.join(rvmm::run::shim::SHIM_BINARY)));
    }
    if let Ok(init) = rvmm::vm::guest_init_path() {
        files.push((init, dir.join("rvmm-init")));
    }
    for (from, to) in &files {
        let m = std::fs::metadata(from).with_context(|| format!("reading {}", from.display()))?;
        let same = std::fs::metadata(to)
            .is_ok_and(|t| t.len() == m.len() && t.modified().ok() == m.modified().ok());
        if same {
            continue;
        }
        let tmp = to.with_extension("tmp");
        let copy = || -> std::io::Result<()> {
            std::fs::copy(from, &tmp)?;
            std::fs::File::options()
                .write(true)
                .open(&tmp)?
                .set_modified(m.modified()?)?;
            std::fs::rename(&tmp, to)
        };
        copy().with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(files.swap_remove(0).1)
}

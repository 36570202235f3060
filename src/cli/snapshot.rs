//! `rvmm snapshot`: the warm-start snapshots of VM isolation.

use rvmm::vm::snapshots::Snapshots;

use super::Global;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// List snapshots: key, machine, image (an image snapshot starts that image's runs with its
    /// root built), size on disk, age, and whether this rvmm can restore it.
    Ls,
    /// Delete snapshots by key (or all of them).
    Rm(RmArgs),
    /// Delete snapshots that can no longer be restored (damaged, another format, or their
    /// kernel, rvmm-init or rvmm binary changed since) and leftovers of interrupted saves.
    Gc,
    /// Boot a guest once and save the snapshot `rvmm run --isolation=vm` with the same flags
    /// restores (a run without one takes it on its first boot anyway).
    Prewarm(PrewarmArgs),
}

#[derive(clap::Args, Debug)]
pub struct RmArgs {
    /// Snapshot keys (from `rvmm snapshot ls`).
    pub keys: Vec<String>,
    /// Remove every snapshot.
    #[arg(long, conflicts_with = "keys")]
    pub all: bool,
}

#[derive(clap::Args, Debug)]
pub struct PrewarmArgs {
    /// As `rvmm run --cpus`: the vCPU count (rounded up).
    #[arg(long, value_name = "N")]
    pub cpus: Option<f64>,
    /// As `rvmm run --memory`: the guest's RAM (default 256m).
    #[arg(short, long, value_name = "BYTES")]
    pub memory: Option<String>,
    /// As `rvmm run --network`: bridge (a network device) or none.
    #[arg(long, value_enum, default_value = "bridge")]
    pub network: super::run::Net,
}

pub fn exec(cmd: Command, global: &Global) -> anyhow::Result<u8> {
    let snaps = Snapshots::new(&global.root);
    match cmd {
        Command::Ls => {
            let current = rvmm::vm::current_tag();
            println!(
                "{:<16}  {:<28}  {:<12}  {:>9}  {:>8}  STATUS",
                "KEY", "MACHINE", "IMAGE", "SIZE", "CREATED"
            );
            for s in snaps.list() {
                let machine = s
                    .layout
                    .as_ref()
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "?".into());
                let status = if s.layout.is_none() {
                    "damaged"
                } else if s.rvmm.as_deref() != Some(rvmm::vmm::snapshot::rvmm_version().as_str()) {
                    "other rvmm"
                } else if !s.inputs_unchanged {
                    "stale (its kernel, init, rvmm or image changed)"
                } else if current.is_some() && s.machine_tag != current {
                    "another build's"
                } else {
                    "usable"
                };
                println!(
                    "{:<16}  {:<28}  {:<12}  {:>9}  {:>8}  {status}",
                    s.key,
                    truncate(&machine, 28),
                    s.image.as_deref().unwrap_or("-"),
                    super::pull::human_size(s.disk_bytes),
                    age(s.created),
                );
            }
            Ok(0)
        }
        Command::Rm(a) => {
            let keys: Vec<String> = if a.all {
                snaps.list().into_iter().map(|s| s.key).collect()
            } else {
                a.keys
            };
            if keys.is_empty() {
                anyhow::bail!("name snapshots to remove (see `rvmm snapshot ls`), or --all");
            }
            let mut code = 0;
            for k in keys {
                if k.contains('/') || k.starts_with('.') || !snaps.remove(&k) {
                    eprintln!("rvmm: no snapshot {k}");
                    code = 1;
                } else {
                    println!("{k}");
                }
            }
            Ok(code)
        }
        Command::Gc => {
            let removed = snaps.gc();
            for k in &removed {
                println!("{k}");
            }
            eprintln!("removed {} snapshot(s) or leftovers", removed.len());
            Ok(0)
        }
        Command::Prewarm(a) => {
            let memory = a
                .memory
                .as_deref()
                .map(rvmm::runspec::parse_bytes)
                .transpose()?;
            if !a.cpus.is_none_or(|c| c > 0.0 && c <= 1024.0) {
                anyhow::bail!("--cpus must be a positive number");
            }
            eprintln!("rvmm: booting a guest to snapshot (about 12 s on kvm_pvm hosts)");
            let p = rvmm::vm::prewarm(
                &global.root,
                a.cpus,
                memory,
                matches!(a.network, super::run::Net::Bridge),
            )?;
            if p.existed {
                println!("{} (already there)", p.key);
            } else {
                println!("{}", p.key);
                eprintln!(
                    "rvmm: saved in {:.1} s, {} of guest memory",
                    p.took.as_secs_f64(),
                    super::pull::human_size(p.memory_bytes)
                );
            }
            Ok(0)
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

fn age(t: std::time::SystemTime) -> String {
    let secs = t.elapsed().map(|d| d.as_secs()).unwrap_or(0);
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

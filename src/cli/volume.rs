//! `rvmm volume create|ls|inspect|rm|prune`, as Docker's `docker volume` behaves.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};

use rvmm::volume;

use super::Global;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Create a volume (a random name when none is given) and print its name.
    Create {
        /// Set metadata on the volume: KEY[=VALUE].
        #[arg(short, long = "label", value_name = "KEY[=VALUE]")]
        labels: Vec<String>,
        /// The volume's name.
        name: Option<String>,
    },
    /// List volumes.
    #[command(alias = "list")]
    Ls {
        /// Only print names.
        #[arg(short, long)]
        quiet: bool,
        /// dangling=true|false (used by no run), name=SUBSTRING, label=KEY[=VALUE].
        #[arg(short, long = "filter", value_name = "KEY=VALUE")]
        filter: Vec<String>,
    },
    /// Show volumes as JSON.
    Inspect {
        #[arg(required = true)]
        volumes: Vec<String>,
    },
    /// Remove volumes (not while a run, running or exited, uses them).
    #[command(alias = "remove")]
    Rm {
        /// Do not fail when a volume does not exist.
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        volumes: Vec<String>,
    },
    /// Remove the anonymous volumes no run uses (-a: every unused volume).
    Prune {
        /// Named volumes too.
        #[arg(short, long)]
        all: bool,
        /// Do not ask for confirmation.
        #[arg(short, long)]
        force: bool,
    },
}

pub fn exec(cmd: Command, global: &Global) -> anyhow::Result<u8> {
    let root = &global.root;
    // Runs whose rvmm died still hold their volumes until gc records them as ended.
    rvmm::run::state::gc(root);
    match cmd {
        Command::Create { labels, name } => {
            let labels: BTreeMap<String, String> = labels
                .iter()
                .map(|l| {
                    let (k, v) = l.split_once('=').unwrap_or((l, ""));
                    (k.to_string(), v.to_string())
                })
                .collect();
            let lock = volume::lock(root)?;
            let (v, _) = volume::create(root, name.as_deref(), labels, &lock)?;
            println!("{}", v.name);
            Ok(0)
        }
        Command::Ls { quiet, filter } => {
            let mut want: Vec<Filter> = Vec::new();
            for f in &filter {
                let (k, v) = f.split_once('=').unwrap_or((f, ""));
                let v = v.to_string();
                want.push(match k {
                    "dangling" if matches!(v.as_str(), "true" | "1") => Box::new(|_, used| !used),
                    "dangling" if matches!(v.as_str(), "false" | "0") => Box::new(|_, used| used),
                    "name" => Box::new(move |vol, _| vol.name.contains(&v)),
                    "label" => {
                        let (lk, lv) = match v.split_once('=') {
                            Some((a, b)) => (a.to_string(), Some(b.to_string())),
                            None => (v.clone(), None),
                        };
                        Box::new(move |vol, _| {
                            vol.labels
                                .get(&lk)
                                .is_some_and(|x| lv.as_ref().is_none_or(|lv| lv == x))
                        })
                    }
                    _ => anyhow::bail!("invalid filter {f:?}: dangling=, name= or label="),
                });
            }
            let used = used_volumes(root);
            let vols: Vec<volume::Volume> = volume::list(root)
                .into_iter()
                .filter(|v| want.iter().all(|w| w(v, used.contains(&v.name))))
                .collect();
            if quiet {
                for v in &vols {
                    println!("{}", v.name);
                }
                return Ok(0);
            }
            let mut rows = vec![["DRIVER".to_string(), "VOLUME NAME".into()]];
            rows.extend(vols.iter().map(|v| ["local".to_string(), v.name.clone()]));
            super::images::print_table(&rows);
            Ok(0)
        }
        Command::Inspect { volumes } => {
            let mut out = Vec::new();
            let mut failed = false;
            for n in &volumes {
                match volume::get(root, n) {
                    Some(v) => out.push(inspect(root, &v)),
                    None => {
                        eprintln!("rvmm: no such volume: {n}");
                        failed = true;
                    }
                }
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(u8::from(failed))
        }
        Command::Rm { force, volumes } => {
            let lock = volume::lock(root)?;
            let mut failed = false;
            for n in &volumes {
                match volume::remove(root, n, &lock) {
                    Ok(()) => println!("{n}"),
                    Err(volume::Error::NotFound(_)) if force => {}
                    Err(e) => {
                        eprintln!("rvmm: {e}");
                        failed = true;
                    }
                }
            }
            Ok(u8::from(failed))
        }
        Command::Prune { all, force } => {
            if !force && std::io::stdin().is_terminal() {
                eprint!(
                    "WARNING! This will remove {} volumes not used by at least one run.\nAre you sure you want to continue? [y/N] ",
                    if all { "all local" } else { "anonymous local" }
                );
                let _ = std::io::stderr().flush();
                let mut answer = String::new();
                let _ = std::io::stdin().lock().read_line(&mut answer);
                if !matches!(answer.trim(), "y" | "Y" | "yes") {
                    return Ok(0);
                }
            }
            let (removed, bytes) = volume::prune(root, all)?;
            if !removed.is_empty() {
                println!("Deleted Volumes:");
                for n in &removed {
                    println!("{n}");
                }
                println!();
            }
            println!("Total reclaimed space: {}", super::pull::human_size(bytes));
            Ok(0)
        }
    }
}

/// A `volume ls --filter`: does (volume, used by a run) pass?
type Filter = Box<dyn Fn(&volume::Volume, bool) -> bool>;

/// The names of the volumes some run under `root` uses.
fn used_volumes(root: &std::path::Path) -> std::collections::BTreeSet<String> {
    rvmm::run::state::list(root)
        .unwrap_or_default()
        .into_iter()
        .flat_map(|r| r.volumes)
        .collect()
}

/// `docker volume inspect`'s fields.
fn inspect(root: &std::path::Path, v: &volume::Volume) -> serde_json::Value {
    serde_json::json!({
        "Name": v.name,
        "Driver": "local",
        "Mountpoint": volume::data_dir(root, &v.name),
        "CreatedAt": rvmm::run::logs::rfc3339(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(v.created)
        ),
        "Labels": v.labels,
        "Scope": "local",
        "Options": {},
        "Anonymous": v.anonymous,
        "UsedBy": volume::users(root, &v.name),
    })
}

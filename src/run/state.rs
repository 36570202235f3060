//! Run state files (ROOT/runs/ID/state.json): what `rvmm ps` lists and what `rvmm gc` uses to
//! remove what a dead run left behind. The same for both isolations.
//!
//! Stores written before the run core kept runs in ROOT/containers/ID: they are still listed,
//! removed and collected from there, and new runs go to ROOT/runs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::RunOptions;
use crate::cgroups::Cgroup;
use crate::error::IoContext;
use crate::runspec::RunSpec;

/// Which isolation runs the workload.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    Container,
    Vm,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Container => "container",
            Isolation::Vm => "vm",
        }
    }
}

/// Where a run is in its life.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Running,
    Exited,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RunState {
    pub id: String,
    pub name: String,
    pub image: String,
    pub command: String,
    pub isolation: Isolation,
    /// The rvmm process that owns the run, and its start time (to survive PID reuse).
    pub rvmm_pid: i32,
    pub rvmm_start: u64,
    /// The workload's first process (host PID), 0 before it exists.
    pub pid: i32,
    pub created: u64,
    pub status: Status,
    pub exit_code: Option<i32>,
    pub cgroup: Option<Cgroup>,
    pub veth: Option<String>,
    /// Host network devices (taps) a VM run owns.
    #[serde(default)]
    pub taps: Vec<String>,
    pub dir: PathBuf,
    /// `--rm`.
    pub remove: bool,
    /// When the workload started (exec'd), and when it ended: seconds since the epoch.
    #[serde(default)]
    pub started_at: Option<u64>,
    #[serde(default)]
    pub finished_at: Option<u64>,
    /// `run -d`: a supervisor keeps the run and writes its output to the log.
    #[serde(default)]
    pub detached: bool,
    /// The signal `rvmm stop` sends first (the image's StopSignal or `--stop-signal`).
    #[serde(default = "default_stop_signal")]
    pub stop_signal: i32,
    /// The workload's address on the bridge, and its published ports (`-p` as given).
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    /// The workload's MAC on the bridge (`net::mac_for`), once its device exists.
    #[serde(default)]
    pub mac: Option<String>,
    /// The image's labels and `--label`.
    #[serde(default)]
    pub labels: Vec<(String, String)>,
    /// How long `stop` waits before SIGKILL (None: 10 s; -1: for ever).
    #[serde(default)]
    pub stop_timeout: Option<i32>,
    /// The volumes the run mounts (by name): in use while the run is recorded.
    #[serde(default)]
    pub volumes: Vec<String>,
}

fn default_stop_signal() -> i32 {
    libc::SIGTERM
}

/// Where runs live: ROOT/runs.
pub fn runs_dir(root: &Path) -> PathBuf {
    root.join("runs")
}

/// Where runs of stores written before the run core live (read, never written).
fn legacy_runs_dir(root: &Path) -> PathBuf {
    root.join("containers")
}

/// The directory of run `id`.
pub fn run_dir(root: &Path, id: &str) -> PathBuf {
    runs_dir(root).join(id)
}

/// Every run directory under `root`, new and legacy.
fn run_dirs(root: &Path) -> Vec<PathBuf> {
    [runs_dir(root), legacy_runs_dir(root)]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|rd| rd.flatten().map(|e| e.path()))
        .collect()
}

/// Start time of a live (not zombie) process in clock ticks since boot (field 22 of /proc/PID/stat).
pub fn start_time(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let mut f = rest.split(' ');
    if matches!(f.next(), Some("Z" | "X" | "x")) {
        return None;
    }
    f.nth(18)?.parse().ok()
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl RunState {
    pub fn new(opts: &RunOptions, spec: &RunSpec, isolation: Isolation, dir: &Path) -> RunState {
        let me = std::process::id() as i32;
        RunState {
            id: opts.id.clone(),
            name: opts.name.clone(),
            image: opts.image.clone(),
            command: spec.argv.join(" "),
            isolation,
            rvmm_pid: me,
            rvmm_start: start_time(me).unwrap_or(0),
            pid: 0,
            created: now(),
            status: Status::Running,
            exit_code: None,
            cgroup: None,
            veth: None,
            taps: Vec::new(),
            dir: dir.to_path_buf(),
            remove: opts.remove,
            started_at: None,
            finished_at: None,
            detached: opts.detached,
            stop_signal: spec.stop_signal,
            address: None,
            mac: None,
            ports: spec
                .network
                .ports
                .iter()
                .map(|p| {
                    let proto = match p.protocol {
                        crate::runspec::Protocol::Tcp => "tcp",
                        crate::runspec::Protocol::Udp => "udp",
                    };
                    format!("0.0.0.0:{}->{}/{proto}", p.host_port, p.container_port)
                })
                .collect(),
            labels: spec.labels.clone(),
            stop_timeout: spec.stop_timeout,
            volumes: Vec::new(),
        }
    }

    /// The state recorded in run directory `dir`, if it is there and readable.
    pub fn load(dir: &Path) -> Option<RunState> {
        let b = std::fs::read(dir.join("state.json")).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// Writes state.json and, while the run is running, its host-wide registration (so the host
    /// resources of a run are found even when its `--root` is gone).
    pub fn save(&self) -> super::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(super::Error::StateJson)?;
        if self.status == Status::Running {
            let reg = registry_dir();
            let _ = std::fs::create_dir_all(&reg);
            let tmp = reg.join(format!("{}.tmp", self.id));
            if std::fs::write(&tmp, &json).is_ok() {
                let _ = std::fs::rename(&tmp, reg.join(&self.id));
            }
        }
        let tmp = self.dir.join("state.json.tmp");
        std::fs::write(&tmp, &json).at(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, self.dir.join("state.json"))
            .at(|| format!("writing {}", self.dir.join("state.json").display()))?;
        Ok(())
    }

    /// Is the owning rvmm still alive?
    pub fn alive(&self) -> bool {
        self.status == Status::Running
            && start_time(self.rvmm_pid).is_some_and(|t| t == self.rvmm_start)
    }

    /// The store root the run belongs to (its directory is ROOT/runs/ID).
    pub fn root(&self) -> Option<PathBuf> {
        Some(self.dir.parent()?.parent()?.to_path_buf())
    }

    /// Cgroup, network devices, address lease (idempotent).
    pub fn release_host_resources(&mut self) {
        if let Some(cg) = self.cgroup.take() {
            cg.remove();
        }
        if let Some(v) = self.veth.take() {
            crate::net::delete_link(&v);
        }
        for t in std::mem::take(&mut self.taps) {
            crate::net::delete_link(&t);
        }
        crate::net::release_owned_by(&self.id);
        if self.status == Status::Running {
            let _ = self.save();
        }
    }

    /// The workload ended: release everything, then remove the container (`--rm`) or keep its
    /// writable layer and record the exit.
    pub fn finish(&mut self, code: i32, remove: bool) {
        self.release_host_resources();
        let _ = std::fs::remove_file(registry_dir().join(&self.id));
        self.status = Status::Exited;
        self.exit_code = Some(code);
        self.finished_at = Some(now());
        if remove {
            let _ = remove_dir(&self.dir);
            // Its anonymous volumes go with it (`--rm`), as with Docker.
            if let Some(root) = self.root() {
                crate::volume::remove_anonymous(&root, &self.volumes);
            }
        } else {
            let _ = std::fs::remove_dir_all(self.dir.join("work"));
            let _ = std::fs::remove_dir(self.dir.join("rootfs"));
            let _ = self.save();
        }
    }
}

/// Removes a run directory: renamed to `.gone-ID` first (atomic), so a removal killed half way
/// leaves a directory that `gc` knows it may delete at once, not one that looks like a run being
/// created.
fn remove_dir(d: &Path) -> std::io::Result<()> {
    let gone = match (d.parent(), d.file_name()) {
        (Some(parent), Some(name)) if !name.to_string_lossy().starts_with(GONE) => {
            let g = parent.join(format!("{GONE}{}", name.to_string_lossy()));
            match std::fs::rename(d, &g) {
                Ok(()) => g,
                Err(_) => d.to_path_buf(),
            }
        }
        _ => d.to_path_buf(),
    };
    crate::image::store::remove_tree(&gone)
}

/// The prefix of a run directory being removed.
const GONE: &str = ".gone-";

/// Host-wide registrations of running runs, whatever their `--root` (tmpfs: gone at reboot, like
/// the resources they describe).
fn registry_dir() -> PathBuf {
    crate::paths::run_dir().join("runs")
}

/// Releases the host resources (cgroups, veths, taps, leases) of every run on this host whose rvmm
/// died, including runs whose `--root` no longer exists. Returns how many of those orphans there were
/// (a dead run whose directory still exists is counted by [`gc`] of its root).
pub fn gc_host() -> usize {
    let mut n = 0;
    let Ok(rd) = std::fs::read_dir(registry_dir()) else {
        return 0;
    };
    for e in rd.flatten() {
        let path = e.path();
        if path.extension().is_some() {
            continue; // a registration being written
        }
        let Some(mut s) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<RunState>(&b).ok())
        else {
            let _ = std::fs::remove_file(&path);
            continue;
        };
        if s.alive() {
            continue;
        }
        // Only what is outside the run's directory: its root's own gc marks the run exited.
        let orphan = !s.dir.join("state.json").exists();
        s.status = Status::Exited;
        s.release_host_resources();
        let _ = std::fs::remove_file(&path);
        n += usize::from(orphan);
    }
    n
}

/// Is run `id` registered on this host with a live rvmm?
pub fn run_is_live(id: &str) -> bool {
    if id.is_empty() || id.contains('/') {
        return false;
    }
    std::fs::read(registry_dir().join(id))
        .ok()
        .and_then(|b| serde_json::from_slice::<RunState>(&b).ok())
        .is_some_and(|s| s.alive())
}

/// An exclusive flock on ROOT/names.lock (released on drop): held from a new run's name
/// check until its state.json is written, so no two runs get one name.
pub fn lock_names(root: &Path) -> super::Result<std::fs::File> {
    Ok(lock_file(root, "names.lock")?)
}

/// An exclusive flock on `dir`/`name` (both made if missing), released when the file is dropped.
pub fn lock_file(dir: &Path, name: &str) -> Result<std::fs::File, crate::error::IoError> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(dir).at(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .at(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(crate::error::last_os_error(format!(
            "locking {}",
            path.display()
        )));
    }
    Ok(f)
}

/// Every run recorded under `root`.
pub fn list(root: &Path) -> super::Result<Vec<RunState>> {
    let mut out: Vec<RunState> = run_dirs(root)
        .iter()
        .filter_map(|d| RunState::load(d))
        .collect();
    out.sort_by_key(|s| std::cmp::Reverse(s.created));
    Ok(out)
}

/// Cleans up after runs whose rvmm died (killed, crashed): cgroups, veths, taps, leases, and
/// their container dirs (kept, marked exited, when they were not `--rm`). Returns how many.
pub fn gc(root: &Path) -> usize {
    let mut n = gc_host();
    for dir in run_dirs(root) {
        if dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(GONE))
        {
            // A removal that was killed half way.
            let _ = remove_dir(&dir);
            continue;
        }
        match RunState::load(&dir) {
            Some(mut s) if s.status == Status::Running && !s.alive() => {
                s.finish(137, s.remove);
                n += 1;
            }
            Some(_) => {}
            None => {
                // A run killed before its first state write, or a half-removed one.
                let age = std::fs::metadata(&dir)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                if age > 60 {
                    let _ = remove_dir(&dir);
                    n += 1;
                }
            }
        }
    }
    n
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// A second `lock_names` on the same root waits until the first is dropped (flock is per open
    /// file, so this holds within one process too).
    #[test]
    fn lock_names_is_exclusive() {
        let root = tempfile::tempdir().unwrap();
        let first = super::lock_names(root.path()).unwrap();
        let got = Arc::new(AtomicBool::new(false));
        let second = {
            let (root, got) = (root.path().to_path_buf(), Arc::clone(&got));
            std::thread::spawn(move || {
                let l = super::lock_names(&root).unwrap();
                got.store(true, Ordering::SeqCst);
                drop(l);
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !got.load(Ordering::SeqCst),
            "a second holder while the first holds it"
        );
        drop(first);
        second.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
    }
}

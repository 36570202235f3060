//! cgroups for `--memory`, `--cpus`, `--pids-limit`, `--cpuset-cpus` on v1, v2 and hybrid hosts.
//!
//! Hybrid (v1 controllers plus a cgroup2 mount, e.g. /sys/fs/cgroup/unified holding only hugetlb)
//! is treated as v1: limits go where the controllers are. On v1 the devices controller also gets
//! runc's allow-list, so CAP_MKNOD cannot be used to reach host disks; on v2 (where device
//! control is an eBPF program) MKNOD is dropped from the capability set instead.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, IoError};
use crate::runspec::Limits;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("no cgroup2 mount")]
    NoUnified,
    #[error("the {0} cgroup controller is not mounted")]
    NoController(&'static str),
    #[error("--cpuset-cpus: the cpuset cgroup controller is not available")]
    NoCpuset,
    #[error("--memory-swap needs swap accounting (swapaccount=1)")]
    NoSwapAccounting(#[source] IoError),
    #[error("the freezer cgroup controller is not available")]
    NoFreezer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Version {
    V1,
    V2,
}

/// The cgroup(s) of one run: one directory per v1 hierarchy used, or one v2 directory.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Cgroup {
    pub version: Version,
    /// (controller, directory); for v2 a single ("unified", dir).
    pub dirs: Vec<(String, PathBuf)>,
}

/// A cgroup filesystem as the container sees it under /sys/fs/cgroup (read-only, rooted at its own
/// cgroup through the cgroup namespace), mirroring the host's layout: v1, v2 or hybrid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerMount {
    /// "cgroup" (v1) or "cgroup2".
    pub fstype: String,
    /// Mount data: the v1 hierarchy's options ("memory", "cpu,cpuacct", "name=systemd"), empty for v2.
    pub data: String,
    /// Absolute mount point inside the container.
    pub target: String,
}

/// Where each controller is mounted, read from /proc/self/mountinfo.
#[derive(Debug, Default, PartialEq)]
pub struct Layout {
    /// A pure v2 host: the unified hierarchy holds the controllers.
    pub unified: Option<PathBuf>,
    /// v1 controller → mount point.
    pub v1: Vec<(String, PathBuf)>,
    /// Every cgroup filesystem mounted under /sys/fs/cgroup, for a container to mount the same way.
    pub mounts: Vec<ContainerMount>,
}

impl Layout {
    pub fn detect() -> Result<Layout, Error> {
        let mi =
            fs::read_to_string("/proc/self/mountinfo").at(|| "reading /proc/self/mountinfo")?;
        Ok(Layout::parse(&mi, |p| {
            fs::read_to_string(p.join("cgroup.controllers")).ok()
        }))
    }

    /// `controllers_of` reads a cgroup2 mount's cgroup.controllers (injectable for tests).
    pub fn parse(mountinfo: &str, controllers_of: impl Fn(&Path) -> Option<String>) -> Layout {
        let mut l = Layout::default();
        for line in mountinfo.lines() {
            let Some((pre, post)) = line.split_once(" - ") else {
                continue;
            };
            let mount_point = pre.split(' ').nth(4).unwrap_or_default();
            let mut post = post.split(' ');
            let fstype = post.next().unwrap_or_default();
            let _source = post.next();
            let opts = post.next().unwrap_or_default();
            if mount_point == "/sys/fs/cgroup" || mount_point.starts_with("/sys/fs/cgroup/") {
                let data = match fstype {
                    "cgroup" => Some(
                        opts.split(',')
                            .filter(|o| !matches!(*o, "rw" | "ro"))
                            .collect::<Vec<_>>()
                            .join(","),
                    ),
                    "cgroup2" => Some(String::new()),
                    _ => None,
                };
                if let Some(data) = data {
                    l.mounts.push(ContainerMount {
                        fstype: fstype.to_string(),
                        data,
                        target: mount_point.to_string(),
                    });
                }
            }
            match fstype {
                "cgroup2" => {
                    let mp = PathBuf::from(mount_point);
                    let ctrls = controllers_of(&mp).unwrap_or_default();
                    let useful = ctrls
                        .split_whitespace()
                        .any(|c| c == "memory" || c == "pids" || c == "cpu");
                    if useful {
                        l.unified = Some(mp);
                    }
                }
                "cgroup" => {
                    for c in opts.split(',') {
                        if matches!(
                            c,
                            "memory" | "pids" | "cpu" | "cpuset" | "devices" | "freezer"
                        ) {
                            l.v1.push((c.to_string(), PathBuf::from(mount_point)));
                        }
                    }
                }
                _ => {}
            }
        }
        l
    }

    pub fn version(&self) -> Version {
        if self.v1.iter().any(|(c, _)| c == "memory" || c == "pids") || self.unified.is_none() {
            Version::V1
        } else {
            Version::V2
        }
    }
}

/// The CPUs a run's cpuset may hold: the cpuset root's effective CPUs (v1 `cpuset.effective_cpus`,
/// v2 `cpuset.cpus.effective`), where rvmm's cgroups live. None when there is no cpuset controller.
pub fn available_cpus(layout: &Layout) -> Option<Vec<u32>> {
    let file = match layout.version() {
        Version::V1 => layout
            .v1
            .iter()
            .find(|(c, _)| c == "cpuset")?
            .1
            .join("cpuset.effective_cpus"),
        Version::V2 => layout.unified.as_ref()?.join("cpuset.cpus.effective"),
    };
    parse_cpu_list(fs::read_to_string(file).ok()?.trim())
}

/// The kernel's CPU list format (`0-2,4`); None for anything else.
pub fn parse_cpu_list(s: &str) -> Option<Vec<u32>> {
    let mut v = Vec::new();
    if s.is_empty() {
        return Some(v);
    }
    for part in s.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b) = (a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?);
        if a > b || b >= 1 << 16 {
            return None;
        }
        v.extend(a..=b);
    }
    v.sort_unstable();
    v.dedup();
    Some(v)
}

/// A v1 cpuset cgroup starts with empty `cpuset.cpus` and `cpuset.mems`, and no task can join it
/// until both are set: each empty one gets its parent's (as Docker does), from the top down.
fn inherit_cpuset(mount: &Path, dir: &Path) -> Result<(), IoError> {
    let rel = dir.strip_prefix(mount).unwrap_or(dir);
    let mut cur = mount.to_path_buf();
    for part in rel.components() {
        let parent = cur.clone();
        cur.push(part);
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let mine = fs::read_to_string(cur.join(file)).unwrap_or_default();
            if mine.trim().is_empty() {
                let theirs = fs::read_to_string(parent.join(file))
                    .at(|| format!("reading {}", parent.join(file).display()))?;
                write(&cur, file, theirs.trim())?;
            }
        }
    }
    Ok(())
}

/// Creates the run's cgroup(s) under `rvmm/<id>` in `layout` and applies the limits.
/// `all_devices` (`--privileged`): the devices controller allows every device; else Docker's
/// default list and `devices` (`--device`). `cpus` (`--cpuset-cpus`): the cpuset's CPUs (empty:
/// the parent's).
pub fn create(
    layout: &Layout,
    id: &str,
    limits: &Limits,
    cpus: &[u32],
    all_devices: bool,
    devices: &[rvmm_proto::DeviceNode],
) -> Result<Cgroup, Error> {
    create_at(
        layout,
        &Path::new("rvmm").join(id),
        limits,
        cpus,
        all_devices,
        devices,
    )
}

/// `create` at `rel` below each hierarchy's root (an OCI bundle's `cgroupsPath`): missing
/// parents are made (and, in v2, given the controllers); only the leaf is removed later.
pub fn create_at(
    layout: &Layout,
    rel: &Path,
    limits: &Limits,
    cpus: &[u32],
    all_devices: bool,
    devices: &[rvmm_proto::DeviceNode],
) -> Result<Cgroup, Error> {
    let cg = match layout.version() {
        Version::V1 => {
            let mut cg = Cgroup {
                version: Version::V1,
                dirs: Vec::new(),
            };
            for (ctrl, mp) in &layout.v1 {
                let d = mp.join(rel);
                if let Err(e) = fs::create_dir_all(&d) {
                    cg.remove();
                    return Err(e)
                        .at(|| format!("creating cgroup {}", d.display()))
                        .map_err(Error::from);
                }
                cg.dirs.push((ctrl.clone(), d.clone()));
                if ctrl == "cpuset" {
                    if let Err(e) = inherit_cpuset(mp, &d) {
                        cg.remove();
                        return Err(e.into());
                    }
                }
            }
            cg
        }
        Version::V2 => {
            let root = layout.unified.clone().ok_or(Error::NoUnified)?;
            let d = root.join(rel);
            let parent = d.parent().unwrap_or(&root).to_path_buf();
            fs::create_dir_all(&parent).at(|| format!("creating cgroup {}", parent.display()))?;
            let avail = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            let want: Vec<String> = ["memory", "pids", "cpu", "cpuset"]
                .iter()
                .filter(|c| avail.split_whitespace().any(|a| a == **c))
                .map(|c| format!("+{c}"))
                .collect();
            // Every cgroup from the root down to the parent hands the controllers on.
            let mut cur = root.clone();
            let _ = fs::write(cur.join("cgroup.subtree_control"), want.join(" "));
            for part in parent
                .strip_prefix(&root)
                .unwrap_or(Path::new(""))
                .components()
            {
                cur.push(part);
                let _ = fs::write(cur.join("cgroup.subtree_control"), want.join(" "));
            }
            fs::create_dir_all(&d).at(|| format!("creating cgroup {}", d.display()))?;
            Cgroup {
                version: Version::V2,
                dirs: vec![("unified".into(), d)],
            }
        }
    };
    if let Err(e) = cg.apply(limits, cpus, all_devices, devices) {
        cg.remove();
        return Err(e);
    }
    Ok(cg)
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), IoError> {
    fs::write(dir.join(file), value)
        .at(|| format!("writing {value:?} to {}", dir.join(file).display()))
}

impl Cgroup {
    fn dir(&self, ctrl: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(c, _)| c == ctrl || c == "unified")
            .map(|(_, d)| d.as_path())
    }

    fn apply(
        &self,
        l: &Limits,
        cpus: &[u32],
        all_devices: bool,
        devices: &[rvmm_proto::DeviceNode],
    ) -> Result<(), Error> {
        if !cpus.is_empty() {
            let d = self.dir("cpuset").ok_or(Error::NoCpuset)?;
            let list: Vec<String> = cpus.iter().map(u32::to_string).collect();
            write(d, "cpuset.cpus", &list.join(","))?;
        }
        match self.version {
            Version::V1 => {
                if let (true, Some(d)) = (all_devices, self.dir("devices")) {
                    write(d, "devices.allow", "a")?;
                } else if let Some(d) = self.dir("devices") {
                    write(d, "devices.deny", "a")?;
                    for dev in devices {
                        write(
                            d,
                            "devices.allow",
                            &format!("{} {}:{} {}", dev.kind, dev.major, dev.minor, dev.access),
                        )?;
                    }
                    for rule in [
                        "c *:* m",
                        "b *:* m",
                        "c 1:3 rwm",
                        "c 1:5 rwm",
                        "c 1:7 rwm",
                        "c 1:8 rwm",
                        "c 1:9 rwm",
                        "c 5:0 rwm",
                        "c 5:1 rwm",
                        "c 5:2 rwm",
                        "c 136:* rwm",
                        "c 10:200 rwm",
                    ] {
                        write(d, "devices.allow", rule)?;
                    }
                }
                if let Some(m) = l.memory_bytes {
                    let d = self.dir("memory").ok_or(Error::NoController("memory"))?;
                    write(d, "memory.limit_in_bytes", &m.to_string())?;
                    // No swap beyond the limit unless --memory-swap says otherwise.
                    match l.memory_swap {
                        Some(u64::MAX) => {}
                        Some(s) => write(d, "memory.memsw.limit_in_bytes", &s.to_string())
                            .map_err(Error::NoSwapAccounting)?,
                        None => {
                            let _ = fs::write(d.join("memory.memsw.limit_in_bytes"), m.to_string());
                        }
                    }
                }
                if let Some(sh) = l.cpu_shares {
                    let d = self.dir("cpu").ok_or(Error::NoController("cpu"))?;
                    write(d, "cpu.shares", &sh.to_string())?;
                }
                if let Some(p) = l.pids {
                    let d = self.dir("pids").ok_or(Error::NoController("pids"))?;
                    write(d, "pids.max", &p.to_string())?;
                }
                if let Some(c) = l.cpus {
                    let d = self.dir("cpu").ok_or(Error::NoController("cpu"))?;
                    write(d, "cpu.cfs_period_us", "100000")?;
                    write(
                        d,
                        "cpu.cfs_quota_us",
                        &((c * 100_000.0) as u64).max(1000).to_string(),
                    )?;
                }
            }
            Version::V2 => {
                let d = self.dirs[0].1.as_path();
                if let Some(m) = l.memory_bytes {
                    write(d, "memory.max", &m.to_string())?;
                    let swap = match l.memory_swap {
                        Some(u64::MAX) => "max".to_string(),
                        Some(s) => s.saturating_sub(m).to_string(),
                        None => "0".to_string(),
                    };
                    let _ = fs::write(d.join("memory.swap.max"), swap);
                }
                if let Some(sh) = l.cpu_shares {
                    // Docker's (runc's) conversion of shares to a weight.
                    let w = 1 + (sh.clamp(2, 262_144) - 2) * 9999 / 262_142;
                    write(d, "cpu.weight", &w.to_string())?;
                }
                if let Some(p) = l.pids {
                    write(d, "pids.max", &p.to_string())?;
                }
                if let Some(c) = l.cpus {
                    write(
                        d,
                        "cpu.max",
                        &format!("{} 100000", ((c * 100_000.0) as u64).max(1000)),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Moves the calling process in, from inside it (a container's first process before it
    /// execs, an exec's before it joins): on v1 the thread writes 0 to each hierarchy's `tasks`,
    /// which moves just itself and so skips the kernel's global threadgroup lock, whose write
    /// side waits for an RCU grace period: ~0.05 ms instead of 5–20 ms per run on the
    /// development host (docs/benchmarks/lean.md). The caller must be single-threaded, so that is
    /// the whole process. On v2, 0 to `cgroup.procs`.
    pub fn join_self(&self) -> Result<(), Error> {
        let file = match self.version {
            Version::V1 => "tasks",
            Version::V2 => "cgroup.procs",
        };
        for (_, d) in &self.dirs {
            write(d, file, "0")?;
        }
        Ok(())
    }

    /// The processes in the cgroup (its first directory holds them all), sorted.
    pub fn pids(&self) -> Vec<i32> {
        let Some((_, d)) = self.dirs.first() else {
            return Vec::new();
        };
        let mut v: Vec<i32> = fs::read_to_string(d.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        v.sort_unstable();
        v
    }

    /// Freezes (`true`) or thaws every process of the cgroup: v2's cgroup.freeze, or v1's
    /// freezer, waiting until the kernel says it is done.
    pub fn freeze(&self, frozen: bool) -> Result<(), Error> {
        let (file, value) = match self.version {
            Version::V2 => ("cgroup.freeze", if frozen { "1" } else { "0" }),
            Version::V1 => ("freezer.state", if frozen { "FROZEN" } else { "THAWED" }),
        };
        // v1: the freezer hierarchy's directory; v2: the one directory.
        let d = self.dir("freezer").ok_or(Error::NoFreezer)?;
        write(d, file, value)?;
        if self.version == Version::V1 {
            for _ in 0..1000 {
                if fs::read_to_string(d.join(file)).unwrap_or_default().trim() == value {
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        Ok(())
    }

    /// Is the cgroup frozen?
    pub fn frozen(&self) -> bool {
        let (file, value) = match self.version {
            Version::V2 => ("cgroup.freeze", "1"),
            Version::V1 => ("freezer.state", "FROZEN"),
        };
        self.dir("freezer")
            .is_some_and(|d| fs::read_to_string(d.join(file)).is_ok_and(|s| s.trim() == value))
    }

    /// Moves `pid` into every directory of the run.
    pub fn add(&self, pid: i32) -> Result<(), Error> {
        for (_, d) in &self.dirs {
            write(d, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// Did the kernel's OOM killer kill something in this cgroup?
    pub fn oom_killed(&self) -> bool {
        let (file, key) = match self.version {
            Version::V1 => ("memory.oom_control", "oom_kill "),
            Version::V2 => ("memory.events", "oom_kill "),
        };
        let Some(d) = self.dir("memory") else {
            return false;
        };
        fs::read_to_string(d.join(file))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix(key)
                        .and_then(|n| n.trim().parse::<u64>().ok())
                })
            })
            .is_some_and(|n| n > 0)
    }

    /// Kills whatever is left and removes the directories (retrying while the kernel lets go).
    pub fn remove(&self) {
        for (_, d) in &self.dirs {
            for _ in 0..200 {
                if let Ok(procs) = fs::read_to_string(d.join("cgroup.procs")) {
                    for p in procs
                        .split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok())
                    {
                        // SAFETY: kill has no memory preconditions.
                        unsafe { libc::kill(p, libc::SIGKILL) };
                    }
                }
                match fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        }
    }
}

#[cfg(test)]
mod container_mount_tests {
    use super::*;

    #[test]
    fn hybrid_host_layout_is_mirrored() {
        let mi = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:40 / /mnt/other rw - cgroup2 cgroup2 rw";
        let l = Layout::parse(mi, |_| Some("hugetlb".into()));
        let got: Vec<(&str, &str, &str)> = l
            .mounts
            .iter()
            .map(|c| (c.fstype.as_str(), c.data.as_str(), c.target.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("cgroup", "cpu,cpuacct", "/sys/fs/cgroup/cpu,cpuacct"),
                ("cgroup", "memory", "/sys/fs/cgroup/memory"),
                ("cgroup", "xattr,name=systemd", "/sys/fs/cgroup/systemd"),
                ("cgroup2", "", "/sys/fs/cgroup/unified"),
            ]
        );
    }

    #[test]
    fn pure_v2_is_one_mount() {
        let mi = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(
            Layout::parse(mi, |_| Some("memory pids".into())).mounts,
            vec![ContainerMount {
                fstype: "cgroup2".into(),
                data: String::new(),
                target: "/sys/fs/cgroup".into()
            }]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
33 30 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
35 30 0:31 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
36 30 0:32 / /sys/fs/cgroup/devices rw - cgroup cgroup rw,devices
";

    #[test]
    fn hybrid_is_v1() {
        let l = Layout::parse(HYBRID, |_| Some("hugetlb".into()));
        assert_eq!(l.version(), Version::V1);
        assert_eq!(l.unified, None);
        assert!(l
            .v1
            .contains(&("cpu".into(), PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"))));
        assert_eq!(l.v1.len(), 4);
    }

    #[test]
    fn pure_v2() {
        let mi = "31 25 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let l = Layout::parse(mi, |_| {
            Some("cpuset cpu io memory hugetlb pids rdma".into())
        });
        assert_eq!(l.version(), Version::V2);
        assert_eq!(l.unified, Some(PathBuf::from("/sys/fs/cgroup")));
    }
}

//! Running rvmm as a user would, and checking what a run leaves on the host (both isolations).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};

/// A store holding the named test-image layouts, held by one test at a time (runs compare
/// host-wide state), that checks on drop that the test left nothing behind.
pub struct RunEnv {
    _lock: MutexGuard<'static, ()>,
    pub store: tempfile::TempDir,
    pub before: HostState,
}

impl RunEnv {
    pub fn new(serial: &'static Mutex<()>, layouts: &[&str]) -> RunEnv {
        let lock = serial.lock().unwrap_or_else(|e| e.into_inner());
        let s = super::images::store();
        let imgs = super::images::test_images();
        for l in layouts {
            let out = rvmm(
                s.path(),
                &["pull", "-q", &format!("oci:{}", imgs.join(l).display())],
                None,
            );
            assert_eq!(out.code, 0, "{}", out.stderr);
        }
        RunEnv {
            _lock: lock,
            before: HostState::now(s.path()),
            store: s,
        }
    }
}

impl Drop for RunEnv {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let after = HostState::now(self.store.path());
        assert_eq!(self.before, after, "the run left something behind");
    }
}

/// What a run may leave on the host.
#[derive(Debug, PartialEq)]
pub struct HostState {
    pub mounts: usize,
    pub cgroups: Vec<String>,
    /// Host ends of container veths (rvh*) and VM taps (rvt*).
    pub links: Vec<String>,
    pub leases: Vec<String>,
    pub runs: Vec<String>,
}

pub fn ls(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

impl HostState {
    pub fn now(root: &Path) -> HostState {
        let mut cgroups = Vec::new();
        for c in ["memory", "pids", "cpu", "cpuset", "devices"] {
            for d in ls(&Path::new("/sys/fs/cgroup").join(c).join("rvmm")) {
                if d.len() == 64 {
                    cgroups.push(format!("{c}/{d}"));
                }
            }
        }
        HostState {
            mounts: std::fs::read_to_string("/proc/self/mountinfo")
                .map(|s| s.lines().count())
                .unwrap_or(0),
            cgroups,
            links: ls(Path::new("/sys/class/net"))
                .into_iter()
                .filter(|l| l.starts_with("rvh") || l.starts_with("rvt"))
                .collect(),
            leases: ls(Path::new("/run/rvmm/ipam")),
            runs: ls(&root.join("runs")),
        }
    }
}

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn rvmm(root: &Path, args: &[&str], stdin: Option<&str>) -> Out {
    let mut c = Command::new(super::rvmm_bin());
    c.arg("--root").arg(root).args(args);
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn rvmm");
    if let Some(input) = stdin {
        use std::io::Write;
        let mut si = child.stdin.take().expect("stdin");
        si.write_all(input.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("rvmm");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Removes the named runs with `rvmm rm -f` when dropped, so a failing test of detached runs
/// leaves no workload behind.
pub struct RemoveRuns<'a> {
    pub root: &'a Path,
    pub names: &'a [&'a str],
}

impl Drop for RemoveRuns<'_> {
    fn drop(&mut self) {
        for n in self.names {
            let _ = Command::new(super::rvmm_bin())
                .arg("--root")
                .arg(self.root)
                .args(["rm", "-f", n])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

//! Running rvmm as a user would, and checking what a run leaves on the host (both isolations).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

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
        // rvmm may end without reading its stdin (a refused flag): a closed pipe is not an error.
        match si.write_all(input.as_bytes()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            r => r.expect("write stdin"),
        }
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

/// What `rvmm gc` must have removed after the runs `ids` of the store `root` ended (killed or
/// not): no process, mount, cgroup, link, lease, host-wide registration, run directory, store
/// temp file, VM disk build leftover or snapshot save leftover of theirs, no store lock held, and
/// a consistent store. Only what those runs created is looked at (`before`: the host before
/// them), so other engineers' runs may come and go meanwhile.
pub fn assert_clean(store: &Path, snapshots: &Path, ids: &[String], before: &HostState, ctx: &str) {
    let root = store.display().to_string();
    // Processes: none with the store in its command line, root or cwd (workloads, VMMs);
    // they may take a moment to exit after their cgroup was killed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = procs_using(&root);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{ctx}: processes left: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&root))
        .map(str::to_string)
        .collect();
    assert!(mounts.is_empty(), "{ctx}: mounts left: {mounts:?}");
    let now = HostState::now(store);
    let new = |a: &[String], b: &[String]| -> Vec<String> {
        a.iter().filter(|x| !b.contains(x)).cloned().collect()
    };
    // Only what this harness created (other engineers' runs come and go meanwhile): cgroups
    // and leases of our run IDs, links named after them.
    let ours = |x: &String| {
        ids.iter()
            .any(|id| x.contains(id.as_str()) || x.contains(&id[..8.min(id.len())]))
    };
    let cg = new(&now.cgroups, &before.cgroups);
    assert!(!cg.iter().any(ours), "{ctx}: cgroups left: {cg:?}");
    let links = new(&now.links, &before.links);
    let link_names: Vec<String> = ids.iter().map(|id| rvmm::net::veth_name(id)).collect();
    assert!(
        !links.iter().any(|l| link_names.contains(l) || ours(l)),
        "{ctx}: links left: {links:?}"
    );
    for l in new(&now.leases, &before.leases) {
        let owner =
            std::fs::read_to_string(Path::new("/run/rvmm/ipam").join(&l)).unwrap_or_default();
        assert!(
            !ids.iter().any(|id| owner.starts_with(id.as_str())),
            "{ctx}: lease {l} of our run left"
        );
    }
    for id in ids {
        assert!(
            !Path::new("/run/rvmm/runs").join(id).exists(),
            "{ctx}: registration of run {id} left"
        );
        let tmp = ls(Path::new("/run/rvmm/ipam.tmp"));
        assert!(
            !tmp.iter().any(|t| t.starts_with(id.as_str())),
            "{ctx}: lease temp file left: {tmp:?}"
        );
    }
    assert_eq!(
        now.runs,
        Vec::<String>::new(),
        "{ctx}: run directories left"
    );
    assert_eq!(
        ls(&store.join("tmp")),
        Vec::<String>::new(),
        "{ctx}: store temp files left"
    );
    let disk_tmp: Vec<String> = ls(&store.join("disks"))
        .into_iter()
        .filter(|n| n.ends_with(".tmp") || n.ends_with(".lock"))
        .collect();
    assert!(
        disk_tmp.is_empty(),
        "{ctx}: VM disk leftovers: {disk_tmp:?}"
    );
    let snap_tmp: Vec<String> = ls(snapshots)
        .into_iter()
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(
        snap_tmp.is_empty(),
        "{ctx}: snapshot save leftovers: {snap_tmp:?}"
    );
    // No lock held.
    let st = Command::new("flock")
        .args(["-n", "-x"])
        .arg(store.join("lock"))
        .arg("true")
        .status()
        .expect("flock");
    assert!(st.success(), "{ctx}: the store lock is still held");
    let (code, out, err) = super::images::rvmm(store, &["gc", "--check"]);
    assert_eq!(code, 0, "{ctx}: store inconsistent: {out}{err}");
}

/// Processes whose command line, root or cwd mention `root`.
pub fn procs_using(root: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for pid in ls(Path::new("/proc")) {
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let p = Path::new("/proc").join(&pid);
        let cmd = std::fs::read(p.join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let links = ["root", "cwd"].map(|l| {
            std::fs::read_link(p.join(l))
                .map(|t| t.display().to_string())
                .unwrap_or_default()
        });
        if cmd.contains(root) || links.iter().any(|l| l.starts_with(root)) {
            out.push(format!("{pid}: {cmd}"));
        }
    }
    out
}

/// With `--init --cpuset-cpus 0`, in a container (tests/container.rs) and a VM
/// (tests/vm_run.rs): the program's PID is not 1, an orphan left by a shell that exits is reaped
/// (waited for while its /proc entry, a zombie's too, is there: up to 10 s, as a slow guest may
/// take most of a second to start and end it), and only CPU 0 is allowed.
pub const INIT_SCRIPT: &str = "test $$ != 1 && echo not-pid-1; sh -c 'sleep 0.1 & echo $! > /tmp/orphan'; \
     i=0; while test -d /proc/$(cat /tmp/orphan) && test $i -lt 100; do sleep 0.1; i=$((i+1)); done; \
     cat /proc/[0-9]*/stat | awk '$3 == \"Z\"' | wc -l; grep Cpus_allowed_list /proc/self/status";
pub const INIT_WANT: &str = "not-pid-1\n0\nCpus_allowed_list:\t0\n";

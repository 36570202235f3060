//! Failure cases (issue 21): a full disk, corrupt state files, and rvmm killed with SIGKILL at any
//! point of its work. What each test checks is in docs/reliability.md.
//!
//! `RVMM_FAULT_KILLS=N` runs the kill harness with N kills (CI runs a sample of 6, on pulls and
//! container runs); `RVMM_FAULT_VM=1` adds VM runs (root disk build, cold boot with snapshot
//! save, warm restore, run exit) to it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::images::{rvmm, rvmm_ok, test_images, tree};

/// The tests here compare host-wide state (cgroups, links, leases): one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn tools() -> bool {
    common::have_root()
        && common::have_tools(&[
            "umoci",
            "skopeo",
            "fallocate",
            "mkfs.erofs",
            "unshare",
            "ip",
        ])
}

/// A size-limited tmpfs in a temp dir, unmounted (lazily, whatever is left in it) on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u64) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("rvmm-faults-")
            .tempdir()
            .expect("tempdir");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount");
        assert!(st.success(), "mount tmpfs");
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Grows the filesystem (a tmpfs remount keeps its files).
    fn resize(&self, mib: u64) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(self.path())
            .status()
            .expect("remount");
        assert!(st.success(), "remount tmpfs");
    }

    fn avail(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(self.path()).expect("statvfs");
        s.blocks_available() * s.fragment_size()
    }

    /// Fills the filesystem until `leave` bytes are free; returns the filler file.
    fn fill_leaving(&self, leave: u64) -> PathBuf {
        let filler = self.path().join("filler");
        let _ = std::fs::remove_file(&filler);
        let len = self.avail().saturating_sub(leave).max(4096);
        let st = Command::new("fallocate")
            .args(["-l", &len.to_string()])
            .arg(&filler)
            .status()
            .expect("fallocate");
        assert!(st.success(), "fallocate");
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// `rvmm images` and the store consistency check.
fn store_view(root: &Path) -> String {
    let (code, out, err) = rvmm(root, &["gc", "--check"]);
    assert_eq!(code, 0, "store inconsistent: {out}{err}");
    // Without the CREATED column: "47 seconds ago" moves on between two listings of the same store.
    rvmm_ok(root, &["images", "--no-trunc"])
        .lines()
        .map(|line| {
            let cols: Vec<&str> = line
                .split("   ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect();
            cols.iter()
                .enumerate()
                .filter(|(i, _)| *i != 4)
                .map(|(_, c)| *c)
                .collect::<Vec<_>>()
                .join(" | ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A failure reported the way the issue asks: one line naming a path and ENOSPC.
fn assert_enospc(what: &str, code: i32, err: &str, root: &Path) {
    assert_ne!(code, 0, "{what} succeeded on a full disk");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    let msg = lines.iter().find(|l| l.starts_with("rvmm: "));
    let Some(msg) = msg else {
        panic!("{what}: no error line in: {err}")
    };
    assert!(
        msg.contains("No space left on device") && msg.contains(&root.display().to_string()),
        "{what}: the error names neither the path nor ENOSPC: {msg}"
    );
    eprintln!("{what}: {msg}");
}

/// Store tree without the store's persistent lock files and the index backup.
fn store_tree(root: &Path) -> Vec<(String, u64)> {
    tree(root)
        .into_iter()
        .filter(|(p, _)| !p.starts_with("index.json.prev"))
        .collect()
}

#[test]
fn full_disk_pull_unpack_and_vm_disk_fail_cleanly_and_work_after_space_is_freed() {
    if !tools() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let imgs = test_images();
    let debian = common::images::debian_image();
    let busybox = format!("oci:{}", imgs.join("busybox").display());
    let debian_ref = format!("oci:{}", debian.display());
    let fs = Tmpfs::mount(48);
    let root = fs.path().join("root");
    rvmm_ok(&root, &["pull", "-q", &busybox]);
    let before = store_view(&root);
    let before_tree = store_tree(&root);

    // 1. A pull that runs out of space while a layer blob streams in.
    let filler = fs.fill_leaving(4 << 20);
    let (code, _, err) = rvmm(&root, &["pull", "-q", &debian_ref]);
    assert_enospc("pull (blob)", code, &err, &root);
    assert_eq!(
        store_view(&root),
        before,
        "the failed pull changed the store"
    );
    assert_eq!(
        store_tree(&root),
        before_tree,
        "the failed pull left files behind"
    );

    // 2. A pull whose blobs fit but whose layer unpack runs out of space.
    std::fs::remove_file(&filler).expect("rm filler");
    let blobs: u64 = std::fs::read_dir(debian.join("blobs/sha256"))
        .expect("blobs")
        .flatten()
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    fs.resize(48 + blobs / (1 << 20) + 16);
    fs.fill_leaving(blobs + (8 << 20));
    let (code, _, err) = rvmm(&root, &["pull", "-q", &debian_ref]);
    assert_enospc("pull (unpack)", code, &err, &root);
    assert!(err.contains("unpacking layer"), "{err}");
    assert_eq!(
        store_view(&root),
        before,
        "the failed unpack changed the store"
    );
    assert_eq!(
        store_tree(&root),
        before_tree,
        "the failed unpack left files behind"
    );

    // 3. The VM root disk (erofs) of busybox, with 100 KB left (needs no KVM: it is built first).
    std::fs::remove_file(&filler).expect("rm filler");
    fs.fill_leaving(100 << 10);
    let (code, _, err) = rvmm(
        &root,
        &[
            "run",
            "--rm",
            "--isolation=vm",
            "--network=none",
            "localhost/busybox",
            "true",
        ],
    );
    assert_enospc("VM root disk", code, &err, &root);
    assert!(err.contains("building the VM disk"), "{err}");
    assert_eq!(
        common::run::ls(&root.join("disks")),
        Vec::<String>::new(),
        "the failed disk build left files behind"
    );
    assert_eq!(store_view(&root), before);

    // 4. Space freed: the same pull works, and the store is consistent.
    std::fs::remove_file(&filler).expect("rm filler");
    fs.resize(512);
    rvmm_ok(&root, &["pull", "-q", &debian_ref]);
    let after = store_view(&root);
    assert!(after.contains("localhost/debian"), "{after}");
    assert_eq!(
        rvmm_ok(&root, &["images", "-q"]).lines().count(),
        2,
        "busybox and debian"
    );
}

#[test]
fn full_disk_snapshot_save_is_skipped_and_the_run_still_works() {
    if !tools() || !common::have_kvm() {
        return;
    }
    if common::guest::kernel().is_none() {
        return;
    }
    if let Err(e) = rvmm::vm::guest_init_path() {
        common::require(common::Cap::Kernel, false, &format!("{e:#}"));
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let imgs = test_images();
    let fs = Tmpfs::mount(64);
    let root = fs.path().join("root");
    rvmm_ok(
        &root,
        &[
            "pull",
            "-q",
            &format!("oci:{}", imgs.join("busybox").display()),
        ],
    );
    let run = |root: &Path| {
        let out = Command::new(common::rvmm_bin())
            .arg("--root")
            .arg(root)
            .args([
                "run",
                "--rm",
                "--isolation=vm",
                "--network=none",
                "localhost/busybox",
                "echo",
                "hello",
            ])
            .env_remove("RVMM_SNAPSHOTS")
            .env("RUST_LOG", "warn")
            .env("RVMM_TIMINGS", "1")
            .stdin(Stdio::null())
            .output()
            .expect("run rvmm");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The root disk gets built with room to spare; then the snapshot (tens of MB) cannot fit.
    let disk_room = 8 << 20;
    let filler = fs.fill_leaving(disk_room);
    let (code, out, err) = run(&root);
    eprintln!("cold boot with a full disk: {err}");
    assert_eq!((code, out.as_str()), (0, "hello\n"), "{err}");
    assert!(
        err.contains("cannot save the machine's snapshot")
            && err.contains("No space left on device"),
        "the failed save is not reported: {err}"
    );
    let snaps = common::run::ls(&root.join("snapshots"));
    assert!(snaps.is_empty(), "a failed save left {snaps:?}");
    // Space freed: the next run boots and saves its snapshots (the machine's and the image's),
    // the one after starts warm from the image's.
    std::fs::remove_file(&filler).expect("rm filler");
    fs.resize(512);
    let (code, out, err) = run(&root);
    assert_eq!((code, out.as_str()), (0, "hello\n"), "{err}");
    let listed = rvmm_ok(&root, &["snapshot", "ls"]);
    assert_eq!(
        common::run::ls(&root.join("snapshots")).len(),
        2,
        "{listed}"
    );
    let (code, out, err) = run(&root);
    assert_eq!((code, out.as_str()), (0, "hello\n"), "{err}");
    assert!(err.contains("restored=image"), "{err}");
}

#[test]
fn corrupt_index_is_reported_in_one_line_and_repaired_by_gc() {
    if !tools() {
        return;
    }
    let imgs = test_images();
    let s = common::images::store();
    let root = s.path();
    for l in ["busybox", "multi"] {
        rvmm_ok(
            root,
            &["pull", "-q", &format!("oci:{}", imgs.join(l).display())],
        );
    }
    let good = std::fs::read(root.join("index.json")).expect("index");
    assert_eq!(rvmm_ok(root, &["images", "-q"]).lines().count(), 2);
    for (what, bytes) in [
        ("truncated", good[..good.len() / 2].to_vec()),
        ("garbage", b"\x00\x01garbage\xff".to_vec()),
        ("empty", Vec::new()),
    ] {
        std::fs::write(root.join("index.json"), &bytes).expect("corrupt");
        for args in [&["images"][..], &["gc", "--check"], &["gc"]] {
            let (code, _, err) = rvmm(root, args);
            assert_ne!(code, 0, "{what} index: rvmm {args:?} succeeded");
            assert_eq!(err.trim().lines().count(), 1, "{what}: {err}");
            assert!(
                err.contains("index.json is corrupt") && err.contains("gc --repair"),
                "{what}: {err}"
            );
        }
        // Plain gc refused: no blob or layer was swept as unreferenced.
        let out = rvmm_ok(root, &["gc", "--repair"]);
        assert!(out.contains("rebuilt index.json"), "{out}");
        assert!(root.join("index.json.corrupt").exists());
        // Both images are back (names from index.json.prev or, for the newest, without a name),
        // their content intact.
        assert_eq!(
            rvmm_ok(root, &["images", "-q"]).lines().count(),
            2,
            "{what}: images lost"
        );
        store_view(root);
        std::fs::write(root.join("index.json"), &good).expect("restore");
    }

    // A damaged blob of a layer only multi has: check names the image, repair drops that image
    // and only that one.
    let idx: serde_json::Value = serde_json::from_slice(&good).expect("json");
    let multi = idx["images"]
        .as_array()
        .expect("images")
        .iter()
        .find(|i| i["names"][0].as_str().is_some_and(|n| n.contains("multi")))
        .expect("multi");
    let layer = multi["layers"][3]["digest"]
        .as_str()
        .expect("digest")
        .trim_start_matches("sha256:")
        .to_string();
    let first = multi["names"][0].as_str().expect("name").to_string();
    std::fs::write(root.join("blobs/sha256").join(&layer), b"damaged").expect("damage");
    let (code, out, err) = rvmm(root, &["gc", "--check"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(&first) && out.contains("wrong digest"),
        "{out}"
    );
    let out = rvmm_ok(root, &["gc", "--repair"]);
    assert!(out.contains(&format!("dropped {first}")), "{out}");
    assert_eq!(rvmm_ok(root, &["images", "-q"]).lines().count(), 1);
    store_view(root);
    // And it can be pulled again.
    let src = if first.contains("multi") {
        "multi"
    } else {
        "busybox"
    };
    rvmm_ok(
        root,
        &["pull", "-q", &format!("oci:{}", imgs.join(src).display())],
    );
    assert_eq!(rvmm_ok(root, &["images", "-q"]).lines().count(), 2);
    store_view(root);
}

#[test]
fn corrupt_run_state_and_leases_are_cleaned_by_gc() {
    if !tools() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = common::images::store();
    let root = s.path();
    // A run directory with a truncated state.json, from an rvmm killed long ago.
    let run = root.join("runs").join("f".repeat(64));
    std::fs::create_dir_all(&run).expect("run dir");
    std::fs::write(run.join("state.json"), b"{\"id\": \"ffff").expect("state");
    age(&run, 3600);
    // A garbage lease and an empty lease (an allocation killed between create and write, as the
    // older allocator could leave), an hour old, on addresses at the top of the pool.
    let ipam = Path::new("/run/rvmm/ipam");
    std::fs::create_dir_all(ipam).expect("ipam");
    let garbage = ipam.join("172.31.255.250");
    let empty = ipam.join("172.31.255.251");
    std::fs::write(&garbage, b"\xff\x00not a lease").expect("lease");
    std::fs::write(&empty, b"").expect("lease");
    age(&garbage, 3600);
    age(&empty, 3600);
    let (code, out, err) = rvmm(root, &["ps", "-a"]);
    assert_eq!(code, 0, "ps with a corrupt state: {err}");
    let out2 = rvmm_ok(root, &["gc"]);
    let left: Vec<PathBuf> = [&garbage, &empty]
        .into_iter()
        .filter(|p| p.exists())
        .cloned()
        .collect();
    let _ = std::fs::remove_file(&garbage);
    let _ = std::fs::remove_file(&empty);
    assert!(left.is_empty(), "gc kept {left:?}: {out2}");
    assert!(!run.exists(), "gc kept the unreadable run: {out}{out2}");
}

fn age(p: &Path, secs: u64) {
    let t = std::time::SystemTime::now() - Duration::from_secs(secs);
    let f = std::fs::File::open(p).expect("open");
    f.set_modified(t).expect("set mtime");
}

// ---------------------------------------------------------------------------------------------
// Crash at any point.

/// One operation of the kill harness.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    /// `rvmm pull` of an OCI layout (blob copy, layer unpack, index update).
    Pull(&'static str),
    /// `rvmm run --rm --isolation=container` with bridge networking (cgroups, veth, lease, mounts).
    Container,
    /// `rvmm run --rm --isolation=vm` (root disk build when missing, restore or cold boot with a
    /// snapshot save, tap, lease, run exit).
    Vm { cold: bool, rebuild_disk: bool },
}

struct Harness {
    root: PathBuf,
    snapshots: PathBuf,
    imgs: PathBuf,
    debian: Option<PathBuf>,
    before: common::run::HostState,
}

impl Harness {
    fn source(&self, layout: &str) -> String {
        match layout {
            "debian" => format!(
                "oci:{}",
                self.debian.as_ref().expect("debian image").display()
            ),
            l => format!("oci:{}", self.imgs.join(l).display()),
        }
    }

    fn command(&self, op: Op) -> Command {
        let mut c = Command::new(common::rvmm_bin());
        c.arg("--root").arg(&self.root);
        c.env("RVMM_SNAPSHOTS", &self.snapshots);
        match op {
            Op::Pull(l) => {
                c.args(["pull", "-q", &self.source(l)]);
            }
            Op::Container => {
                c.args([
                    "run",
                    "--rm",
                    "--isolation=container",
                    "localhost/busybox",
                    "sh",
                    "-c",
                    "echo hi; sleep 1",
                ]);
            }
            Op::Vm { .. } => {
                c.args([
                    "run",
                    "--rm",
                    "--isolation=vm",
                    "localhost/busybox",
                    "sh",
                    "-c",
                    "echo hi; sleep 1",
                ]);
            }
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Puts the store in the state the operation starts from.
    fn prepare(&self, op: Op) {
        match op {
            Op::Pull(l) => {
                let name = if l == "debian" {
                    "localhost/debian"
                } else {
                    "localhost/multi"
                };
                let _ = rvmm(&self.root, &["rmi", name]);
                rvmm_ok(&self.root, &["gc"]);
            }
            Op::Container => {}
            Op::Vm { cold, rebuild_disk } => {
                if cold {
                    let _ = std::fs::remove_dir_all(&self.snapshots);
                }
                if rebuild_disk {
                    let _ = std::fs::remove_dir_all(self.root.join("disks"));
                }
            }
        }
    }

    fn run_ok(&self, op: Op) -> Duration {
        let t = Instant::now();
        let out = self.command(op).output().expect("run rvmm");
        assert!(
            out.status.success(),
            "{op:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        t.elapsed()
    }

    /// Runs `op`, SIGKILLs rvmm after `delay` (if it is still running), then checks what is left.
    /// Returns whether the kill landed (rvmm was still running).
    fn kill_at(&self, op: Op, delay: Duration) -> bool {
        self.prepare(op);
        let mut child = self.command(op).spawn().expect("spawn rvmm");
        std::thread::sleep(delay);
        let landed = matches!(child.try_wait(), Ok(None));
        let _ = child.kill();
        let _ = child.wait();
        let ids = common::run::ls(&self.root.join("runs"));
        let (code, out, err) = rvmm(&self.root, &["gc"]);
        assert_eq!(code, 0, "gc after killing {op:?} at {delay:?}: {out}{err}");
        self.assert_clean(op, delay, &ids);
        // The same operation again succeeds.
        self.prepare(op);
        self.run_ok(op);
        landed
    }

    fn assert_clean(&self, op: Op, delay: Duration, ids: &[String]) {
        let ctx = format!("after killing {op:?} at {delay:?} and rvmm gc");
        common::run::assert_clean(&self.root, &self.snapshots, ids, &self.before, &ctx);
    }
}

/// A delay spread over (0, 1.1 × the operation's duration): the golden-ratio sequence covers the
/// phases evenly for any number of kills.
fn spread(k: usize, duration: Duration) -> Duration {
    let frac = ((k as f64 + 1.0) * 0.618_033_988_7).fract() * 1.1;
    duration.mul_f64(frac)
}

#[test]
fn sigkill_at_any_point_leaves_a_clean_host_and_a_consistent_store() {
    if !tools() || !common::have_tools(&["flock", "iptables"]) {
        return;
    }
    // VM runs take seconds each on kvm_pvm (tens under load): only with RVMM_FAULT_VM=1.
    let vm = std::env::var("RVMM_FAULT_VM").is_ok_and(|v| v == "1")
        && common::have_kvm()
        && common::guest::kernel().is_some()
        && rvmm::vm::guest_init_path().is_ok();
    let kills: usize = std::env::var("RVMM_FAULT_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let full = kills > 8;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = common::images::store();
    let snaps = tempfile::tempdir().expect("tempdir");
    let h = Harness {
        root: s.path().to_path_buf(),
        snapshots: snaps.path().to_path_buf(),
        imgs: test_images(),
        debian: std::env::var("RVMM_FAULT_DEBIAN")
            .is_ok_and(|v| v == "1")
            .then(common::images::debian_image),
        before: common::run::HostState::now(s.path()),
    };
    rvmm_ok(&h.root, &["pull", "-q", &h.source("busybox")]);

    // The operations, with how often each gets a kill; durations measured once, unkilled.
    let mut ops = vec![Op::Pull("multi"), Op::Container];
    // A 50 MB layer: a long unpack to kill in, but a minute per pull on a loaded 2-core host.
    let debian = std::env::var("RVMM_FAULT_DEBIAN").is_ok_and(|v| v == "1");
    if debian {
        ops.push(Op::Pull("debian"));
    }
    if vm {
        ops.push(Op::Vm {
            cold: true,
            rebuild_disk: true,
        });
        ops.push(Op::Vm {
            cold: false,
            rebuild_disk: false,
        });
        ops.push(Op::Vm {
            cold: false,
            rebuild_disk: true,
        });
    }
    let mut durations = Vec::new();
    for &op in &ops {
        h.prepare(op);
        let d = h.run_ok(op);
        eprintln!("{op:?}: {d:?} unkilled");
        durations.push(d);
    }
    // Cold boots are expensive: a tenth of the VM kills in the full run, one at most in CI.
    let plan: Vec<usize> = (0..kills)
        .map(|k| {
            let i = k % ops.len();
            match ops[i] {
                Op::Vm { cold: true, .. } if !(full && k % (ops.len() * 3) == i) => {
                    (i + 1) % ops.len()
                }
                _ => i,
            }
        })
        .collect();
    let mut landed = 0;
    let t = Instant::now();
    for (k, &i) in plan.iter().enumerate() {
        let delay = spread(k, durations[i]);
        if h.kill_at(ops[i], delay) {
            landed += 1;
        }
        eprintln!("kill {k}: {:?} at {delay:?}", ops[i]);
    }
    eprintln!(
        "{} kills ({landed} while rvmm ran) over {} operations in {:?}, host clean and store consistent after each",
        plan.len(),
        ops.len(),
        t.elapsed()
    );
    assert!(landed > 0, "no kill landed while rvmm ran");
}

//! The contenders and the scenarios that drive them.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::measure::{self, Timed};
use super::{Error, Options, Recorder, Scenario};

/// Where the peers are; None = not found (reported as missing, never faked).
#[derive(Debug, Clone, Default)]
pub struct PeerPaths {
    pub crun: Option<PathBuf>,
    pub runc: Option<PathBuf>,
    pub qemu: Option<PathBuf>,
    pub firecracker: Option<PathBuf>,
    pub cloud_hypervisor: Option<PathBuf>,
}

impl PeerPaths {
    /// Looks each peer up on PATH.
    pub fn from_path() -> PeerPaths {
        PeerPaths {
            crun: which("crun"),
            runc: which("runc"),
            qemu: which("qemu-system-x86_64"),
            firecracker: which("firecracker"),
            cloud_hypervisor: which("cloud-hypervisor"),
        }
    }
}

pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// What the instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    True,
    Echo,
    /// Prints "ready" and sleeps, for memory and density.
    Ready,
    /// Sequential write then read of 32 MiB on the root filesystem.
    Io,
    /// The same on a shared host directory (`-v DIR:/shared`: a bind mount in a container,
    /// virtio-fs in a VM).
    IoShared,
    /// Metadata: untar [`TREE_FILES`] small files from /shared/tree.tar into /shared/t, then
    /// `find` them, on the shared directory.
    Tree,
    /// The same on the root filesystem (the tarball copied there first, untimed).
    TreeRoot,
}

/// Files in the metadata workload's tarball.
pub const TREE_FILES: usize = 5000;

const READY: &[u8] = b"ready";
const BOOT_MARKER: &[u8] = b"RVMM-BENCH-READY";

impl Workload {
    fn argv(self) -> Vec<String> {
        let v: &[&str] = match self {
            Workload::True => &["true"],
            Workload::Echo => &["echo", "hello"],
            Workload::Ready => &["sh", "-c", "echo ready; exec sleep 3600"],
            Workload::Io => return sequential_io("/bench.io"),
            Workload::IoShared => return sequential_io("/shared/bench.io"),
            Workload::Tree => return tree("/shared/tree.tar", "/shared"),
            Workload::TreeRoot => return tree("/shared/tree.tar", ""),
        };
        v.iter().map(|s| s.to_string()).collect()
    }
}

/// `sh -c` of the metadata workload: `tar` (a copy of it in `dir` first, untimed) unpacked into
/// `dir`/t, then `find`; prints `io T0 T1 T2`.
fn tree(tar: &str, dir: &str) -> Vec<String> {
    let here = format!("{dir}/tree.tar");
    let copy = if here == tar {
        String::new()
    } else {
        format!("cp {tar} {here}; ")
    };
    let script = format!(
        "rm -rf {dir}/t; mkdir {dir}/t; {copy}\
         read t0 x < /proc/uptime; tar -xf {here} -C {dir}/t; read t1 x < /proc/uptime; \
         find {dir}/t > {dir}/found; read t2 x < /proc/uptime; \
         rm -rf {dir}/t {dir}/found; echo \"io $t0 $t1 $t2\""
    );
    vec!["sh".into(), "-c".into(), script]
}

/// `sh -c` of the sequential workload on `file`: 32 MiB written (fsync'd), then read, each
/// repeated until at least a second has passed, timed with the workload's own /proc/uptime (10 ms
/// ticks: one pass in a container is shorter than that; in a VM here one pass takes seconds);
/// prints `io T0 T1 T2 WRITES READS`. No pipelines and no command substitutions (each would be a
/// fork: docs/guest-kernel.md, known kvm_pvm problem).
fn sequential_io(file: &str) -> Vec<String> {
    // Centiseconds of an uptime `u` (always two decimals; `1` keeps `05` from being octal).
    let cs = |u: &str| format!("$(( ${{{u}%.*}} * 100 + 1${{{u}#*.}} - 100 ))");
    let until_a_second = |n: &str, pass: &str| {
        format!(
            "s={}; {n}=0; while [ ${n} -eq 0 ] || [ $(( {} - s )) -lt 100 ]; do \
             {pass}; {n}=$(({n} + 1)); read u x < /proc/uptime; done",
            cs("u"),
            cs("u")
        )
    };
    let script = format!(
        "read u x < /proc/uptime; t0=$u; {}; t1=$u; {}; rm -f {file}; echo \"io $t0 $t1 $u $n1 $n2\"",
        until_a_second(
            "n1",
            &format!("dd if=/dev/zero of={file} bs=1M count=32 conv=fsync 2>/dev/null")
        ),
        until_a_second("n2", &format!("dd if={file} of=/dev/null bs=1M 2>/dev/null")),
    );
    vec!["sh".into(), "-c".into(), script]
}

/// Someone whose numbers go in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contender {
    RvmmContainer,
    /// `rvmm run --isolation=vm`: restored from the warm-start snapshot.
    RvmmVm,
    /// `rvmm run --isolation=vm --cold`: a kernel boot.
    RvmmVmCold,
    Crun,
    Runc,
    /// `rvmm vm`: our VMM booting the bench kernel + disk directly.
    RvmmVmDirect,
    QemuMicrovm,
    Firecracker,
    CloudHypervisor,
}

impl Contender {
    pub fn name(self) -> &'static str {
        match self {
            Contender::RvmmContainer => "rvmm container",
            Contender::RvmmVm => "rvmm vm",
            Contender::RvmmVmCold => "rvmm vm --cold",
            Contender::Crun => "crun",
            Contender::Runc => "runc",
            Contender::RvmmVmDirect => "rvmm vm (direct boot)",
            Contender::QemuMicrovm => "qemu microvm",
            Contender::Firecracker => "firecracker",
            Contender::CloudHypervisor => "cloud-hypervisor",
        }
    }

    fn boots_a_kernel(self) -> bool {
        !matches!(
            self,
            Contender::RvmmContainer | Contender::Crun | Contender::Runc
        )
    }
}

/// Shared preparation: bundles for crun/runc, the boot disk for VM peers.
pub struct Env {
    work: tempfile::TempDir,
    bundle: Option<PathBuf>,
    boot: Option<BootFiles>,
    counter: std::cell::Cell<u64>,
    /// crun/runc containers started (binary, id): deleted by [`Env::reap_peers`].
    peers_started: std::cell::RefCell<Vec<(PathBuf, String)>>,
}

struct BootFiles {
    kernel: PathBuf,
    disk: PathBuf,
    cmdline: String,
}

impl Env {
    pub fn prepare(opts: &Options, rec: &mut Recorder) -> Result<Env, Error> {
        let work = tempfile::Builder::new()
            .prefix("rvmm-bench-")
            .tempdir()
            .map_err(|e| Error::Setup(format!("cannot create a work dir: {e}")))?;
        let mut env = Env {
            work,
            bundle: None,
            boot: None,
            counter: std::cell::Cell::new(0),
            peers_started: std::cell::RefCell::new(Vec::new()),
        };
        // The rootfs every peer shares with rvmm: the image itself, flattened.
        let needs_bundle = opts
            .scenarios
            .iter()
            .any(|s| matches!(s, Scenario::Startup | Scenario::Memory));
        if needs_bundle && (opts.peers.crun.is_some() || opts.peers.runc.is_some()) {
            rec.progress("preparing the crun/runc bundle");
            match make_bundle(opts, env.work.path()) {
                Ok(b) => env.bundle = Some(b),
                Err(e) => {
                    for c in ["crun", "runc"] {
                        rec.failure(Scenario::Startup, c, "setup", format!("bundle: {e}"));
                    }
                }
            }
        }
        // Warm VM runs restore the snapshot a boot saves: take it up front, so no recorded
        // run pays for it.
        let vm_scenarios = [
            Scenario::Startup,
            Scenario::Memory,
            Scenario::Density,
            Scenario::Io,
            Scenario::Warm,
        ];
        if opts.scenarios.iter().any(|s| vm_scenarios.contains(s)) {
            rec.progress("preparing the warm-start snapshot (one boot)");
            let t = Instant::now();
            match prewarm(opts) {
                Ok(()) => rec.value(
                    Scenario::Warm,
                    "rvmm vm",
                    "prewarm: boot and save the snapshot (once)",
                    "ms",
                    t.elapsed().as_secs_f64() * 1e3,
                ),
                Err(e) => rec.failure(Scenario::Warm, "rvmm vm", "prewarm", e),
            }
        }
        // The direct-boot VMMs run in the boot scenario, and idle in the memory one.
        if opts.scenarios.contains(&Scenario::Boot) || opts.scenarios.contains(&Scenario::Memory) {
            rec.progress("preparing the boot disk");
            match make_boot_files(opts, env.work.path()) {
                Ok(b) => env.boot = Some(b),
                Err(e) => rec.failure(Scenario::Boot, "all", "setup", e.to_string()),
            }
        }
        Ok(env)
    }

    /// The host directory the shared-directory workloads mount as /shared.
    fn shared_dir(&self) -> PathBuf {
        self.work.path().join("shared")
    }

    /// The shared directory with the metadata workload's tarball ([`TREE_FILES`] files of 100
    /// bytes in 50 directories), made once.
    fn prepare_shared(&self) -> Result<(), String> {
        let dir = self.shared_dir();
        let tarball = dir.join("tree.tar");
        if tarball.exists() {
            return Ok(());
        }
        let made = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            // Every run's user may write it (a VM's workload reaches it through virtio-fs).
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
            let mut tar = tar::Builder::new(std::fs::File::create(&tarball)?);
            for i in 0..TREE_FILES {
                let mut h = tar::Header::new_gnu();
                h.set_size(100);
                h.set_mode(0o644);
                h.set_mtime(1_700_000_000);
                h.set_cksum();
                tar.append_data(&mut h, format!("d{:02}/f{i:05}", i % 50), &[b'x'; 100][..])?;
            }
            tar.finish()
        })();
        made.map_err(|e| format!("making {}: {e}", tarball.display()))
    }

    fn next_id(&self) -> u64 {
        let n = self.counter.get() + 1;
        self.counter.set(n);
        n
    }

    /// The command line that starts `c` with workload `w`, or why it cannot run here.
    fn command(&self, opts: &Options, c: Contender, w: Workload) -> Result<Command, String> {
        // VMM peers boot /init (marker, then reset) or, for the Ready workload, /idle (marker, then sleep).
        let boot_cmdline = |b: &BootFiles| {
            if w == Workload::Ready {
                b.cmdline.replace("init=/init", "init=/idle")
            } else {
                b.cmdline.clone()
            }
        };
        let rvmm_run = |iso: &str, cold: bool| {
            let mut cmd = Command::new(&opts.rvmm);
            cmd.arg("--root").arg(&opts.root).args([
                "run",
                "--rm",
                "--network",
                "none",
                &format!("--isolation={iso}"),
            ]);
            if iso == "vm" {
                cmd.arg("--memory").arg(format!("{}m", opts.vm_memory_mib));
            }
            if cold {
                cmd.arg("--cold");
            }
            if matches!(w, Workload::IoShared | Workload::Tree | Workload::TreeRoot) {
                cmd.arg("-v")
                    .arg(format!("{}:/shared", self.shared_dir().display()));
            }
            cmd.arg(&opts.image).args(w.argv());
            cmd
        };
        match c {
            Contender::RvmmContainer => Ok(rvmm_run("container", false)),
            Contender::RvmmVm => Ok(rvmm_run("vm", false)),
            Contender::RvmmVmCold => Ok(rvmm_run("vm", true)),
            Contender::Crun | Contender::Runc => {
                let bin = if c == Contender::Crun {
                    opts.peers.crun.as_ref()
                } else {
                    opts.peers.runc.as_ref()
                }
                .ok_or("not found on PATH")?;
                let bundle = self
                    .bundle
                    .as_ref()
                    .ok_or("no bundle (see setup failure)")?;
                let id = format!("rvmm-bench-{}-{}", std::process::id(), self.next_id());
                self.peers_started
                    .borrow_mut()
                    .push((bin.clone(), id.clone()));
                let argv = serde_json::to_string(&w.argv()).map_err(|e| e.to_string())?;
                set_bundle_args(bundle, &argv).map_err(|e| e.to_string())?;
                // crun 1.8 refuses a hybrid cgroup host; hide the cgroup2 mount in a private mount ns.
                let script = format!(
                    "umount /sys/fs/cgroup/unified 2>/dev/null; exec {} run --bundle {} {id}",
                    bin.display(),
                    bundle.display()
                );
                let mut cmd = Command::new("unshare");
                cmd.args(["-m", "--propagation", "private", "sh", "-c", &script]);
                Ok(cmd)
            }
            Contender::RvmmVmDirect => {
                let b = self
                    .boot
                    .as_ref()
                    .ok_or("no boot disk (see setup failure)")?;
                let mut cmd = Command::new(&opts.rvmm);
                cmd.arg("vm")
                    .arg("--kernel")
                    .arg(&b.kernel)
                    .arg("--disk")
                    .arg(&b.disk)
                    .arg("--memory")
                    .arg(opts.vm_memory_mib.to_string())
                    .arg("--cmdline")
                    .arg(boot_cmdline(b));
                Ok(cmd)
            }
            Contender::QemuMicrovm => {
                let qemu = opts.peers.qemu.as_ref().ok_or("not found on PATH")?;
                let b = self
                    .boot
                    .as_ref()
                    .ok_or("no boot disk (see setup failure)")?;
                let cmdline = format!("{} {}", boot_cmdline(b), super::peer_cmdline_additions());
                let cmd =
                    qemu_microvm_command(qemu, &b.kernel, &b.disk, &cmdline, opts.vm_memory_mib);
                Ok(cmd)
            }
            Contender::Firecracker => {
                let fc = opts.peers.firecracker.as_ref().ok_or("not found on PATH")?;
                let b = self
                    .boot
                    .as_ref()
                    .ok_or("no boot disk (see setup failure)")?;
                let cfg = serde_json::json!({
                    "boot-source": {
                        "kernel_image_path": b.kernel,
                        "boot_args": format!("{} {}", boot_cmdline(b), super::peer_cmdline_additions()),
                    },
                    "drives": [{"drive_id": "root", "path_on_host": b.disk,
                                "is_root_device": true, "is_read_only": false}],
                    "machine-config": {"vcpu_count": 1, "mem_size_mib": opts.vm_memory_mib},
                });
                let path = self.work.path().join(format!("fc-{}.json", self.next_id()));
                std::fs::write(&path, cfg.to_string()).map_err(|e| e.to_string())?;
                let mut cmd = Command::new(fc);
                cmd.arg("--no-api").arg("--config-file").arg(path);
                Ok(cmd)
            }
            Contender::CloudHypervisor => {
                opts.peers
                    .cloud_hypervisor
                    .as_ref()
                    .ok_or("not found on PATH")?;
                // Measured once: it waits for a disk it cannot give this kernel, then times out.
                Err(
                    "not comparable: Cloud Hypervisor attaches virtio-blk over PCI only, and the \
                     guest kernel is built without PCI (it also reboots the guest on a reset \
                     where the others stop)"
                        .into(),
                )
            }
        }
    }

    /// Deletes (killing first) every crun/runc container this bench started that is still there:
    /// `crun run` in the foreground deletes its container when the workload exits, but not when
    /// `crun` itself is killed.
    pub fn reap_peers(&self) {
        for (bin, id) in self.peers_started.borrow_mut().drain(..) {
            // With the cgroup2 mount hidden, crun makes its "cgroup" there as a plain directory
            // of the host's /sys/fs/cgroup tmpfs: it goes too.
            let script = format!(
                "umount /sys/fs/cgroup/unified 2>/dev/null; {} delete -f {id}; \
                 mountpoint -q /sys/fs/cgroup/unified || rm -rf /sys/fs/cgroup/unified/{id}",
                bin.display()
            );
            let _ = Command::new("unshare")
                .args(["-m", "--propagation", "private", "sh", "-c", &script])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    pub fn cleanup(&mut self) {
        self.reap_peers();
        // The temp dir removes itself; containers were run in the foreground and are gone.
        self.bundle = None;
    }
}

/// QEMU's microvm machine booting `kernel` with `disk` as a virtio-blk root, console on stdout, and an
/// i8042 so that `reboot=k` ends it (`-no-reboot`). ACPI off so QEMU passes the virtio-mmio devices on the
/// command line, and no ARCH_CAPABILITIES MSR, which kvm_pvm refuses.
pub fn qemu_microvm_command(
    qemu: &Path,
    kernel: &Path,
    disk: &Path,
    cmdline: &str,
    mem_mib: u32,
) -> Command {
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        &mem_mib.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-device",
        "i8042",
    ])
    .arg("-kernel")
    .arg(kernel)
    .arg("-append")
    .arg(cmdline)
    .arg("-drive")
    .arg(format!(
        "id=root,file={},format=raw,if=none",
        disk.display()
    ))
    .args(["-device", "virtio-blk-device,drive=root"]);
    cmd
}

/// A bundle (rootfs + config.json) of the image's own rootfs for crun and runc.
fn make_bundle(opts: &Options, work: &Path) -> Result<PathBuf, Error> {
    let bundle = work.join("bundle");
    let rootfs = bundle.join("rootfs");
    super::image_rootfs(&opts.root, &opts.image, &rootfs)
        .map_err(|e| Error::Setup(format!("cannot flatten {}: {e}", opts.image)))?;
    let spec_tool = opts
        .peers
        .crun
        .as_ref()
        .or(opts.peers.runc.as_ref())
        .ok_or_else(|| Error::Setup("neither crun nor runc found".into()))?;
    let st = Command::new(spec_tool)
        .arg("spec")
        .current_dir(&bundle)
        .stdout(Stdio::null())
        .status()
        .map_err(|source| Error::Spawn {
            program: spec_tool.display().to_string(),
            source,
        })?;
    if !st.success() {
        return Err(Error::Setup(format!(
            "`{} spec` failed",
            spec_tool.display()
        )));
    }
    Ok(bundle)
}

fn set_bundle_args(bundle: &Path, argv_json: &str) -> Result<(), Error> {
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Setup(e.to_string()))?;
    let mut v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Setup(e.to_string()))?;
    let args: serde_json::Value =
        serde_json::from_str(argv_json).map_err(|e| Error::Setup(e.to_string()))?;
    v["process"]["args"] = args;
    v["process"]["terminal"] = serde_json::Value::Bool(false);
    v["root"]["readonly"] = serde_json::Value::Bool(false);
    std::fs::write(&path, v.to_string()).map_err(|source| Error::Write { path, source })
}

/// Kernel + an ext4 disk whose /init prints a marker and resets the VM: what every VMM boots.
fn make_boot_files(opts: &Options, work: &Path) -> Result<BootFiles, Error> {
    let kernel = Command::new(&opts.rvmm)
        .args(["kernel", "path"])
        .output()
        .map_err(|source| Error::Spawn {
            program: opts.rvmm.display().to_string(),
            source,
        })?;
    if !kernel.status.success() {
        return Err(Error::Setup(format!(
            "no guest kernel: {}",
            String::from_utf8_lossy(&kernel.stderr).trim()
        )));
    }
    let kernel = PathBuf::from(String::from_utf8_lossy(&kernel.stdout).trim());
    // The same busybox-static the sample image is built from, so every VMM boots identical bytes.
    let root = work.join("bootroot");
    busybox_rootfs(&root)?;
    for (name, script) in [
        ("init", "#!/bin/sh\necho RVMM-BENCH-READY\nreboot -f\n"),
        (
            "idle",
            "#!/bin/sh\necho RVMM-BENCH-READY\nexec sleep 3600\n",
        ),
    ] {
        let path = root.join(name);
        std::fs::write(&path, script).map_err(|source| Error::Write {
            path: path.clone(),
            source,
        })?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(|source| Error::Write { path, source })?;
    }
    let disk = work.join("boot.ext4");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&disk)
        .arg("64M")
        .output()
        .map_err(|source| Error::Spawn {
            program: "mkfs.ext4".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Setup(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(BootFiles {
        kernel,
        disk,
        cmdline: "console=ttyS0 quiet reboot=k panic=-1 root=/dev/vda rw init=/init".into(),
    })
}

/// A minimal root: /bin/busybox from Debian's busybox-static with every applet linked.
fn busybox_rootfs(root: &Path) -> Result<(), Error> {
    let bin = root.join("bin");
    for d in ["bin", "sbin", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(d)).map_err(|source| Error::Write {
            path: root.join(d),
            source,
        })?;
    }
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .map_err(|e| Error::Setup(format!("/bin/busybox (apt install busybox-static): {e}")))?;
    let list = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .map_err(|source| Error::Spawn {
            program: "busybox".into(),
            source,
        })?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
    }
    Ok(())
}

fn workload_name(w: Workload) -> &'static str {
    match w {
        Workload::True => "true",
        Workload::Echo => "echo",
        Workload::Ready => "ready",
        Workload::Io => "io",
        Workload::IoShared => "io-shared",
        Workload::Tree => "tree",
        Workload::TreeRoot => "tree-root",
    }
}

/// Runs every contender `runs` times after `warmup`, interleaved, recording first byte and exit.
fn timed_rounds(
    opts: &Options,
    env: &Env,
    rec: &mut Recorder,
    scenario: Scenario,
    contenders: &[Contender],
    w: Workload,
    marker: Option<&[u8]>,
) {
    let label = workload_name(w);
    let mut dead: Vec<Contender> = Vec::new();
    let rounds = opts.warmup + opts.runs.max(opts.vm_runs);
    for round in 0..rounds {
        for &c in contenders {
            if dead.contains(&c) {
                continue;
            }
            let (warm, runs, timeout) = if c.boots_a_kernel() {
                (opts.warmup.min(1), opts.vm_runs, opts.vm_timeout)
            } else {
                (opts.warmup, opts.runs, opts.timeout)
            };
            // A VM gets at most one warm-up; rounds beyond its count are skipped.
            let skip_before = opts.warmup - warm;
            if round < skip_before || round >= skip_before + warm + runs {
                continue;
            }
            let recorded = round >= skip_before + warm;
            rec.progress(&format!(
                "{} {label}: {} round {}/{}",
                scenario.name(),
                c.name(),
                round + 1 - skip_before,
                warm + runs
            ));
            let mut cmd = match env.command(opts, c, w) {
                Ok(cmd) => cmd,
                Err(why) => {
                    rec.failure(scenario, c.name(), label, why);
                    dead.push(c);
                    continue;
                }
            };
            match measure::run_timed(&mut cmd, timeout, marker) {
                Ok(t) if t.code == 0 || (marker.is_some() && t.first_byte.is_some()) => {
                    if recorded {
                        record_timed(rec, scenario, c, label, &t);
                    }
                }
                Ok(t) => {
                    rec.failure(scenario, c.name(), label, describe_failure(&t));
                    dead.push(c);
                }
                Err(e) => {
                    rec.failure(scenario, c.name(), label, e.to_string());
                    dead.push(c);
                }
            }
        }
    }
}

fn describe_failure(t: &Timed) -> String {
    let err = String::from_utf8_lossy(&t.stderr);
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    format!("exit status {}: {}", t.code, last.trim())
}

fn record_timed(rec: &mut Recorder, s: Scenario, c: Contender, label: &str, t: &Timed) {
    // A direct boot waits for the marker its init prints, not for the kernel's first line.
    let (label, first) = if s == Scenario::Boot {
        ("boot", "launch to marker")
    } else {
        (label, "launch to first output")
    };
    if let Some(fb) = t.first_byte {
        rec.value(
            s,
            c.name(),
            &format!("{label}: {first}"),
            "ms",
            fb.as_secs_f64() * 1e3,
        );
    }
    rec.value(
        s,
        c.name(),
        &format!("{label}: launch to exit"),
        "ms",
        t.exit.as_secs_f64() * 1e3,
    );
}

pub fn startup(opts: &Options, env: &Env, rec: &mut Recorder) {
    let all = [
        Contender::RvmmContainer,
        Contender::Crun,
        Contender::Runc,
        Contender::RvmmVm,
        Contender::RvmmVmCold,
    ];
    timed_rounds(
        opts,
        env,
        rec,
        Scenario::Startup,
        &all,
        Workload::True,
        None,
    );
    timed_rounds(
        opts,
        env,
        rec,
        Scenario::Startup,
        &all,
        Workload::Echo,
        None,
    );
}

pub fn cold(opts: &Options, env: &Env, rec: &mut Recorder) {
    let runs = if opts.quick { 1 } else { opts.vm_runs.max(1) };
    // The image as an OCI layout (hard links into the warm store): every cold run imports it
    // into an empty store, unpacking its layers (and, for VMs, building the root disk).
    let layout = env.work.path().join("cold-layout");
    let exported = (|| -> Result<(), Box<dyn std::error::Error>> {
        let store = crate::image::Store::open(&opts.root)?;
        let image = store
            .find(&opts.image)?
            .ok_or_else(|| format!("{} is not in the store", opts.image))?;
        Ok(store.export_layout(&image, &layout, "latest")?)
    })()
    .map_err(|e| crate::error::chain(&*e));
    if let Err(e) = exported {
        for name in ["rvmm container", "rvmm vm"] {
            rec.failure(
                Scenario::Cold,
                name,
                "true",
                format!("exporting the image: {e}"),
            );
        }
        return;
    }
    let source = format!("oci:{}:latest", layout.display());
    for i in 0..runs {
        for (iso, name) in [("container", "rvmm container"), ("vm", "rvmm vm")] {
            rec.progress(&format!("cold: {name} {}/{runs}", i + 1));
            let root = match tempfile::Builder::new()
                .prefix("rvmm-bench-root-")
                .tempdir()
            {
                Ok(d) => d,
                Err(e) => {
                    rec.failure(Scenario::Cold, name, "true", e.to_string());
                    continue;
                }
            };
            let mut cmd = Command::new(&opts.rvmm);
            cmd.arg("--root")
                .arg(root.path())
                .args(["run", "--rm", "-q", "--network", "none"])
                .arg(format!("--isolation={iso}"))
                .arg(&source)
                .arg("true");
            let timeout = if iso == "vm" {
                opts.vm_timeout
            } else {
                opts.timeout
            };
            match measure::run_timed(&mut cmd, timeout, None) {
                Ok(t) if t.code == 0 => rec.value(
                    Scenario::Cold,
                    name,
                    "true: launch to exit, empty store",
                    "ms",
                    t.exit.as_secs_f64() * 1e3,
                ),
                Ok(t) => rec.failure(Scenario::Cold, name, "true", describe_failure(&t)),
                Err(e) => rec.failure(Scenario::Cold, name, "true", e.to_string()),
            }
        }
    }
}

/// A started instance of the Ready workload, killed (whole process group) when dropped.
struct Instance {
    child: std::process::Child,
    ready: mpsc::Receiver<Instant>,
}

impl Instance {
    fn start(env: &Env, opts: &Options, c: Contender) -> Result<Instance, String> {
        let mut cmd = env.command(opts, c, Workload::Ready)?;
        // A booting kernel prints plenty; VMM peers wait for the bench's own marker.
        let marker: &'static [u8] =
            if c.boots_a_kernel() && !matches!(c, Contender::RvmmVm | Contender::RvmmVmCold) {
                BOOT_MARKER
            } else {
                READY
            };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = measure::spawn_group(&mut cmd).map_err(|e| e.to_string())?;
        let mut out = child.stdout.take().ok_or("no stdout pipe")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 512];
            while let Ok(n) = out.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                if buf.windows(marker.len()).any(|w| w == marker) {
                    let _ = tx.send(Instant::now());
                    // Keep draining so the workload never blocks on a full pipe.
                    while matches!(out.read(&mut chunk), Ok(n) if n > 0) {}
                    break;
                }
            }
        });
        Ok(Instance { child, ready: rx })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn tree_pss_kib(&self) -> u64 {
        measure::process_tree(self.pid())
            .into_iter()
            .filter_map(measure::pss_kib)
            .sum()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SIGTERM to the runtime so it stops the workload and cleans up; a second one, as from a
        // user pressing Ctrl-C twice, for a workload that ignores it (a PID 1 `sleep` does); then
        // SIGKILL for anything still there.
        for grace in [Duration::from_secs(3), Duration::from_secs(10)] {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
        }
        measure::kill_group(self.child.id());
        let _ = self.child.wait();
    }
}

pub fn memory(opts: &Options, env: &Env, rec: &mut Recorder) {
    let s = Scenario::Memory;
    for c in [
        Contender::RvmmContainer,
        Contender::Crun,
        Contender::Runc,
        Contender::RvmmVm,
    ] {
        env.reap_peers();
        rec.progress(&format!("memory: {}", c.name()));
        let timeout = if c.boots_a_kernel() {
            opts.vm_timeout
        } else {
            opts.timeout
        };
        let inst = match Instance::start(env, opts, c) {
            Ok(i) => i,
            Err(why) => {
                rec.failure(s, c.name(), "idle", why);
                continue;
            }
        };
        if inst.ready.recv_timeout(timeout).is_err() {
            rec.failure(s, c.name(), "idle", format!("not ready within {timeout:?}"));
            continue;
        }
        // Let lazily-started threads settle.
        std::thread::sleep(Duration::from_millis(300));
        let tree = measure::process_tree(inst.pid());
        let total: u64 = tree.iter().filter_map(|&p| measure::pss_kib(p)).sum();
        let own = measure::pss_kib(inst.pid()).unwrap_or(0);
        record_rss_uss(rec, c, &tree);
        if c == Contender::RvmmVm {
            record_vm_split(rec, c, opts, &tree, total);
        } else {
            let workload = tree.last().copied().unwrap_or(inst.pid());
            if let Some(cg) = measure::cgroup_memory_kib(workload) {
                rec.value(
                    s,
                    c.name(),
                    "cgroup memory usage",
                    "MiB",
                    cg as f64 / 1024.0,
                );
            }
            rec.value(
                s,
                c.name(),
                "runtime overhead (PSS of all processes)",
                "MiB",
                total as f64 / 1024.0,
            );
        }
        rec.value(
            s,
            c.name(),
            "launcher process PSS",
            "MiB",
            own as f64 / 1024.0,
        );
        rec.value(s, c.name(), "total PSS", "MiB", total as f64 / 1024.0);
    }
    // The VMMs side by side, each booted directly with the same kernel and disk, guest idle.
    for c in DIRECT_BOOT {
        env.reap_peers();
        vm_memory(opts, env, rec, c);
    }
}

pub fn density(opts: &Options, env: &Env, rec: &mut Recorder) {
    let s = Scenario::Density;
    let mut contenders = vec![(Contender::RvmmContainer, opts.density)];
    if opts.quick {
        rec.failure(s, "rvmm vm", "instances", "skipped with --quick".into());
    } else {
        contenders.push((Contender::RvmmVm, opts.density.clamp(1, 4)));
    }
    for (c, n) in contenders {
        rec.progress(&format!("density: {} x{n}", c.name()));
        let timeout = if c.boots_a_kernel() {
            opts.vm_timeout * 2
        } else {
            opts.timeout
        };
        let start = Instant::now();
        let mut insts = Vec::new();
        let mut failed = None;
        for _ in 0..n {
            match Instance::start(env, opts, c) {
                Ok(i) => insts.push(i),
                Err(why) => {
                    failed = Some(why);
                    break;
                }
            }
        }
        if let Some(why) = failed {
            rec.failure(s, c.name(), "instances", why);
            continue;
        }
        let mut ready = 0usize;
        let deadline = start + timeout;
        let mut waiting: Vec<bool> = vec![true; insts.len()];
        while ready < insts.len() && Instant::now() < deadline {
            for (i, inst) in insts.iter().enumerate() {
                if waiting[i] && inst.ready.try_recv().is_ok() {
                    waiting[i] = false;
                    ready += 1;
                    let mem: u64 = insts.iter().map(Instance::tree_pss_kib).sum();
                    let t = start.elapsed().as_secs_f64() * 1e3;
                    rec.point(s, c.name(), "time to ready", "ms", ready as f64, t);
                    rec.point(
                        s,
                        c.name(),
                        "host memory (PSS)",
                        "MiB",
                        ready as f64,
                        mem as f64 / 1024.0,
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if ready < insts.len() {
            rec.failure(
                s,
                c.name(),
                "instances",
                format!("{ready} of {} ready within {timeout:?}", insts.len()),
            );
        } else {
            rec.value(
                s,
                c.name(),
                &format!("all {n} ready"),
                "ms",
                start.elapsed().as_secs_f64() * 1e3,
            );
        }
        drop(insts);
    }
}

/// Sequential write and read on each contender's root filesystem and on a shared host
/// directory, and a metadata workload (untar, find) on the shared directory.
pub fn io(opts: &Options, env: &Env, rec: &mut Recorder) {
    let s = Scenario::Io;
    let runs = if opts.quick { 1 } else { 3 };
    if let Err(e) = env.prepare_shared() {
        rec.failure(s, "setup", "shared directory", e);
    }
    let work = [
        (
            Workload::Io,
            "sequential write (32 MiB, fsync)",
            "sequential read (32 MiB)",
        ),
        (
            Workload::IoShared,
            "shared dir: sequential write (32 MiB, fsync)",
            "shared dir: sequential read (32 MiB)",
        ),
        (
            Workload::Tree,
            "shared dir: untar 5,000 files",
            "shared dir: find 5,000 files",
        ),
        (Workload::TreeRoot, "untar 5,000 files", "find 5,000 files"),
    ];
    for _ in 0..runs {
        for c in [Contender::RvmmContainer, Contender::RvmmVm] {
            for &(w, first, second) in &work {
                io_one(opts, env, rec, c, w, (first, second));
            }
        }
    }
}

/// One I/O workload on one contender: two rates (MB/s) or two durations (s, the metadata one).
fn io_one(
    opts: &Options,
    env: &Env,
    rec: &mut Recorder,
    c: Contender,
    w: Workload,
    (first, second): (&str, &str),
) {
    let s = Scenario::Io;
    let what = workload_name(w);
    rec.progress(&format!("io: {} {what}", c.name()));
    let timeout = match (c.boots_a_kernel(), w) {
        // 5,000 files through an emulated guest kernel: minutes on kvm_pvm
        // (docs/benchmarks/volumes.md).
        (true, Workload::Tree | Workload::TreeRoot) => opts.vm_timeout * 6,
        (true, _) => opts.vm_timeout,
        (false, _) => opts.timeout,
    };
    let mut cmd = match env.command(opts, c, w) {
        Ok(c) => c,
        Err(why) => return rec.failure(s, c.name(), what, why),
    };
    match measure::run_timed(&mut cmd, timeout, None) {
        Ok(t) if t.code == 0 => {
            let text = String::from_utf8_lossy(&t.stdout);
            match text.lines().find_map(io_spans) {
                Some(((a, _), (b, _))) if matches!(w, Workload::Tree | Workload::TreeRoot) => {
                    rec.value(s, c.name(), first, "s", a);
                    rec.value(s, c.name(), second, "s", b);
                }
                Some(((a, n), (b, m))) => {
                    let mb = (32u64 << 20) as f64 / 1e6;
                    rec.value(s, c.name(), first, "MB/s", mb * n / a);
                    rec.value(s, c.name(), second, "MB/s", mb * m / b);
                }
                None => rec.failure(
                    s,
                    c.name(),
                    what,
                    format!("no usable timing in the output (too fast for /proc/uptime's 10 ms?): {text:?}"),
                ),
            }
        }
        Ok(t) => rec.failure(s, c.name(), what, describe_failure(&t)),
        Err(e) => rec.failure(s, c.name(), what, e.to_string()),
    }
}

/// The two spans (seconds) of an I/O workload's line `io T0 T1 T2 [N1 N2]` (guest uptimes, and
/// how many passes each span holds: 1 when not given), each with its passes.
fn io_spans(line: &str) -> Option<((f64, f64), (f64, f64))> {
    let mut f = line.strip_prefix("io ")?.split_whitespace();
    let mut t = || f.next()?.parse::<f64>().ok();
    let (t0, t1, t2) = (t()?, t()?, t()?);
    let (n1, n2) = (t().unwrap_or(1.0), t().unwrap_or(1.0));
    if t1 <= t0 || t2 <= t1 || n1 < 1.0 || n2 < 1.0 {
        return None;
    }
    Some(((t1 - t0, n1), (t2 - t1, n2)))
}

pub fn boot(opts: &Options, env: &mut Env, rec: &mut Recorder) {
    let all = DIRECT_BOOT;
    let local = Options {
        runs: opts.vm_runs,
        warmup: 0,
        ..opts.clone()
    };
    timed_rounds(
        &local,
        env,
        rec,
        Scenario::Boot,
        &all,
        Workload::True,
        Some(BOOT_MARKER),
    );
}

/// The VMMs of the boot scenario, each booting the same kernel and disk.
const DIRECT_BOOT: [Contender; 4] = [
    Contender::RvmmVmDirect,
    Contender::QemuMicrovm,
    Contender::Firecracker,
    Contender::CloudHypervisor,
];

/// Records the RSS and USS (private pages only) of all the instance's processes beside their PSS:
/// PSS splits a page among the processes that map it, USS counts only what is theirs alone, RSS
/// counts shared pages in full.
fn record_rss_uss(rec: &mut Recorder, c: Contender, tree: &[u32]) {
    let s = Scenario::Memory;
    let (rss, uss) = tree
        .iter()
        .filter_map(|&p| measure::rss_uss_kib(p))
        .fold((0, 0), |(r, u), (r1, u1)| (r + r1, u + u1));
    rec.value(s, c.name(), "total RSS", "MiB", rss as f64 / 1024.0);
    rec.value(s, c.name(), "total USS", "MiB", uss as f64 / 1024.0);
}

/// Records a VM's host memory split: guest RAM resident (the VMM's big mapping) and everything else.
fn record_vm_split(rec: &mut Recorder, c: Contender, opts: &Options, tree: &[u32], total_kib: u64) {
    let s = Scenario::Memory;
    let min = u64::from(opts.vm_memory_mib) * 1024 / 2;
    let guest: u64 = tree
        .iter()
        .filter_map(|&p| measure::guest_ram_rss_kib(p, min))
        .sum();
    rec.value(
        s,
        c.name(),
        "guest RAM resident",
        "MiB",
        guest as f64 / 1024.0,
    );
    rec.value(
        s,
        c.name(),
        "runtime overhead (PSS minus guest RAM)",
        "MiB",
        total_kib.saturating_sub(guest) as f64 / 1024.0,
    );
}

/// Host memory of a VMM whose guest sits idle: guest RAM resident in the host, and everything else (the
/// VMM's own overhead), from PSS.
fn vm_memory(opts: &Options, env: &Env, rec: &mut Recorder, c: Contender) {
    let s = Scenario::Memory;
    rec.progress(&format!("memory: {} (idle guest)", c.name()));
    let inst = match Instance::start(env, opts, c) {
        Ok(i) => i,
        Err(why) => {
            rec.failure(s, c.name(), "idle guest", why);
            return;
        }
    };
    if inst.ready.recv_timeout(opts.vm_timeout).is_err() {
        rec.failure(
            s,
            c.name(),
            "idle guest",
            format!("not ready within {:?}", opts.vm_timeout),
        );
        return;
    }
    std::thread::sleep(Duration::from_millis(500));
    let tree = measure::process_tree(inst.pid());
    let total: u64 = tree.iter().filter_map(|&p| measure::pss_kib(p)).sum();
    record_vm_split(rec, c, opts, &tree, total);
    record_rss_uss(rec, c, &tree);
    rec.value(s, c.name(), "total PSS", "MiB", total as f64 / 1024.0);
}

/// `rvmm snapshot prewarm` for the machine the bench's VM runs use.
fn prewarm(opts: &Options) -> Result<(), String> {
    let out = Command::new(&opts.rvmm)
        .arg("--root")
        .arg(&opts.root)
        .args(["snapshot", "prewarm", "--network", "none", "--memory"])
        .arg(format!("{}m", opts.vm_memory_mib))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// One `rvmm run --isolation=vm IMAGE true` with `RVMM_TIMINGS=1`: its `key=value` timings.
fn vm_timings(opts: &Options, cold: bool) -> Result<Vec<(String, f64)>, String> {
    let mut cmd = Command::new(&opts.rvmm);
    cmd.arg("--root")
        .arg(&opts.root)
        .env("RVMM_TIMINGS", "1")
        .args([
            "run",
            "--rm",
            "--network",
            "none",
            "--isolation=vm",
            "--memory",
        ])
        .arg(format!("{}m", opts.vm_memory_mib));
    if cold {
        cmd.arg("--cold");
    }
    let out = cmd
        .arg(&opts.image)
        .arg("true")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(err.trim().to_string());
    }
    let line = err
        .lines()
        .find(|l| l.starts_with("rvmm-timings "))
        .ok_or("no timings line")?;
    Ok(line
        .split_whitespace()
        .skip(1)
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            if k == "restored" {
                // image, machine or none
                return Some(("restored_image".into(), f64::from(u8::from(v == "image"))));
            }
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect())
}

/// Warm starts: where a restored start goes, and the host memory of VMs restored from one
/// snapshot (their clean pages are the snapshot file's page cache, shared).
pub fn warm(opts: &Options, env: &Env, rec: &mut Recorder) {
    let s = Scenario::Warm;
    let runs = opts.vm_runs.max(3);
    // The image's first run restores the machine's snapshot and saves the image's on the way
    // (docs/snapshots.md); the recorded runs restore the image's. A store that has it already
    // records every run.
    let mut first = true;
    let mut i = 0;
    while i < runs {
        rec.progress(&format!("warm: rvmm vm true {}/{runs}", i + 1));
        match vm_timings(opts, false) {
            Ok(t) => {
                let get = |k: &str| t.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
                if get("warm") != Some(1.0) {
                    rec.failure(s, "rvmm vm", "restore", "the run did not start warm".into());
                    break;
                }
                let from_image = get("restored_image") == Some(1.0);
                if std::mem::take(&mut first) && !from_image {
                    for (k, metric) in [
                        (
                            "exit_ms",
                            "the image's first run (saves its snapshot): launch to exit",
                        ),
                        ("image_snapshot_ms", "saving the image snapshot"),
                    ] {
                        if let Some(v) = get(k).filter(|v| *v >= 0.0) {
                            rec.value(s, "rvmm vm", metric, "ms", v);
                        }
                    }
                    continue;
                }
                if !from_image {
                    rec.failure(
                        s,
                        "rvmm vm",
                        "restore",
                        "the run did not start from the image snapshot".into(),
                    );
                    break;
                }
                i += 1;
                for (k, metric) in [
                    ("setup_ms", "restore: launch to VM ready to run"),
                    ("started_ms", "launch to workload started"),
                    ("exit_ms", "true: launch to exit"),
                ] {
                    if let Some(v) = get(k) {
                        rec.value(s, "rvmm vm", metric, "ms", v);
                    }
                }
                if let (Some(spec), Some(exec)) =
                    (get("guest_spec_uptime_ms"), get("guest_exec_uptime_ms"))
                {
                    rec.value(
                        s,
                        "rvmm vm",
                        "in the guest: spec to exec",
                        "ms",
                        exec - spec,
                    );
                }
            }
            Err(e) => {
                rec.failure(s, "rvmm vm", "restore", e);
                break;
            }
        }
    }
    match opts.peers.firecracker.as_ref() {
        None => rec.failure(s, "firecracker", "restore", "not found on PATH".into()),
        Some(_) => rec.failure(
            s,
            "firecracker",
            "restore",
            "found, but the bench does not script Firecracker snapshots yet".into(),
        ),
    }

    // Memory: one restored idle VM, then N.
    let n = opts.density.clamp(2, 4);
    let min = u64::from(opts.vm_memory_mib) * 1024 / 2;
    let snapshot_of = |insts: &[Instance]| -> (u64, u64) {
        let mut pss = 0;
        let mut dirty = 0;
        for i in insts {
            for p in measure::process_tree(i.pid()) {
                pss += measure::pss_kib(p).unwrap_or(0);
                dirty += measure::guest_ram_private_dirty_kib(p, min).unwrap_or(0);
            }
        }
        (pss, dirty)
    };
    let mut insts: Vec<Instance> = Vec::new();
    let mut one = None;
    for k in 0..n {
        rec.progress(&format!("warm: idle restored VM {}/{n}", k + 1));
        let inst = match Instance::start(env, opts, Contender::RvmmVm) {
            Ok(i) => i,
            Err(e) => {
                rec.failure(s, "rvmm vm", "restored idle VMs", e);
                return;
            }
        };
        if inst.ready.recv_timeout(opts.vm_timeout).is_err() {
            rec.failure(s, "rvmm vm", "restored idle VMs", "not ready".into());
            return;
        }
        insts.push(inst);
        std::thread::sleep(Duration::from_millis(500));
        if k == 0 {
            one = Some(snapshot_of(&insts));
        }
    }
    let (pss1, dirty1) = one.unwrap_or_default();
    let (pssn, dirtyn) = snapshot_of(&insts);
    let mib = |k: u64| k as f64 / 1024.0;
    rec.value(
        s,
        "rvmm vm",
        "one restored idle VM: host memory (PSS)",
        "MiB",
        mib(pss1),
    );
    rec.value(
        s,
        "rvmm vm",
        "one restored idle VM: guest pages dirtied",
        "MiB",
        mib(dirty1),
    );
    let extra = (pssn.saturating_sub(pss1)) as f64 / (n - 1) as f64 / 1024.0;
    rec.value(
        s,
        "rvmm vm",
        &format!("each additional VM of {n} (PSS)"),
        "MiB",
        extra,
    );
    rec.value(
        s,
        "rvmm vm",
        &format!("its budget: pages dirtied + 3 MiB (mean of {n})"),
        "MiB",
        mib(dirtyn) / n as f64 + 3.0,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sequential workload's script, run by the host's sh: a line the parser takes, with
    /// at least a second per span.
    #[test]
    fn sequential_io_script_runs() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("io").display().to_string();
        let argv = sequential_io(&f);
        let out = std::process::Command::new("sh")
            .args(&argv[1..])
            .output()
            .expect("sh");
        let text = String::from_utf8_lossy(&out.stdout);
        let ((a, n), (b, m)) = text.lines().find_map(io_spans).expect("an io line");
        assert!(a >= 1.0 && b >= 1.0 && n >= 1.0 && m >= 1.0, "{text}");
        assert!(!std::path::Path::new(&f).exists());
    }

    #[test]
    fn io_lines() {
        let ((a, n), (b, m)) = io_spans("io 10.00 10.50 10.75").expect("spans");
        assert!((a - 0.5).abs() < 1e-9 && (b - 0.25).abs() < 1e-9);
        assert_eq!((n, m), (1.0, 1.0));
        let (_, (b, m)) = io_spans("io 1.00 2.05 3.10 1 170").expect("spans");
        assert!((b - 1.05).abs() < 1e-9 && m == 170.0);
        assert_eq!(io_spans("io 1.00 2.05 3.10 0 1"), None);
        assert_eq!(io_spans("io 10.00 10.00 10.25"), None);
        assert_eq!(io_spans("64+0 records in"), None);
    }
}

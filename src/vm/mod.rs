//! VM isolation: the image's root disk, guest-init delivery (initramfs), the host-guest channel,
//! running a RunSpec in a microVM with the same flags, output and exit status as a container.
//!
//! The guest gets: the kernel from guest-kernel/, an initramfs holding rvmm-init as /init, the
//! image's erofs disk read-only as /dev/vda, COM1 for kernel messages (to the run dir's
//! console.log, never mixed with output), a multiport virtio-console as the channel
//! (docs/vm-channel.md), and with
//! `--network bridge` a virtio-net device on a TAP in `rvmm0`.
//!
//! Warm starts (docs/snapshots.md): rvmm-init says READY before anything run-specific exists, and
//! the first cold boot of a machine kind saves a snapshot there. Later runs restore it instead of
//! booting; every run, cold or warm, then attaches its image disk to the empty disk slot and
//! sends the `Start` (spec, entropy, clock, MAC) over the channel.

//!
//! The run, step by step: `run` (below) prepares it (the run core's prologue, the image disk,
//! a tap), `machine` sizes the machine and restores its snapshot or boots it, `session` runs the
//! loop until the workload's EXIT, and `exit_status` (below) turns what happened into the status.

mod cpio;
pub mod exec;
pub mod handover;
pub mod jail;
mod machine;
mod session;
pub mod snapshots;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rvmm_proto::frame;

use crate::error::{IoContext, IoError};
use crate::image::ResolvedImage;
use crate::run::{Isolation, RunOptions};
use crate::runspec::RunSpec;
use crate::vmm::VmExit;
use machine::{HostEnds, Machine};
pub(crate) use session::GuestReport;

/// What can go wrong in VM isolation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Run(#[from] crate::run::Error),
    #[error(transparent)]
    Disk(#[from] crate::image::disk::Error),
    #[error(transparent)]
    Net(#[from] crate::net::Error),
    #[error(transparent)]
    Kernel(#[from] crate::kernel::Error),
    #[error("rvmm-init (the guest's PID 1) is not built: run scripts/setup.sh, or RUSTFLAGS='-C target-feature=+crt-static' cargo build --release -p rvmm-guest-init --target x86_64-unknown-linux-gnu")]
    NoGuestInit,
    #[error(
        "VM isolation needs /dev/kvm (read-write); use --isolation=container to run without it"
    )]
    NoKvm(#[source] std::io::Error),
    #[error("creating the microVM: {0}")]
    Create(String),
    #[error("attaching the image disk: {0}")]
    AttachDisk(String),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroups::Error),
    #[error("saving the snapshot")]
    Snapshot(#[source] crate::vmm::Error),
    #[error("encoding the guest's start message")]
    Json(#[source] serde_json::Error),
    #[error("the guest did not get ready ({why}; kernel log: {})", log.display())]
    NotReady { why: String, log: PathBuf },
    #[error("the guest's channel is corrupt: {reason}{}", log.as_deref().map(|l| format!(" ({l})")).unwrap_or_default())]
    Corrupt { reason: String, log: Option<String> },
    #[error("the microVM did not start the workload within {timeout:?} ({how}; {log})")]
    StartTimeout {
        timeout: Duration,
        how: String,
        log: String,
    },
    #[error("starting the workload in the VM: {0}")]
    StartFailed(String),
    #[error("the microVM stopped without reporting an exit status: {why} ({log})")]
    NoExitStatus { why: String, log: String },
    #[error("{0} is not running (or does not accept exec)")]
    NotRunning(String),
    #[error("{0}")]
    Exec(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Guest RAM when `--memory` is not given.
pub const DEFAULT_MEM_MIB: u32 = 256;

/// Where rvmm-init is: `RVMM_GUEST_INIT`, next to the rvmm binary, or the static build of this
/// workspace (`target/x86_64-unknown-linux-gnu/release/rvmm-init`).
pub fn guest_init_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("RVMM_GUEST_INIT").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().at(|| "locating rvmm")?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let candidates = [
        dir.join("rvmm-init"),
        dir.join("../x86_64-unknown-linux-gnu/release/rvmm-init"),
        dir.join("../../x86_64-unknown-linux-gnu/release/rvmm-init"),
    ];
    // A plain `cargo build` of the workspace leaves a dynamically linked rvmm-init next to rvmm:
    // it cannot run in the guest (no loader there), so only static builds count.
    candidates
        .iter()
        .find(|p| p.is_file() && is_static_elf(p))
        .cloned()
        .ok_or(Error::NoGuestInit)
}

/// An ELF64 executable without a program interpreter (PT_INTERP).
fn is_static_elf(p: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let Ok(f) = std::fs::File::open(p) else {
        return false;
    };
    let mut h = [0u8; 64];
    if f.read_exact_at(&mut h, 0).is_err() || &h[..4] != b"\x7fELF" || h[4] != 2 {
        return false;
    }
    let phoff = u64::from_le_bytes(h[0x20..0x28].try_into().unwrap_or_default());
    let phentsize = u64::from(u16::from_le_bytes([h[0x36], h[0x37]]));
    let phnum = u64::from(u16::from_le_bytes([h[0x38], h[0x39]]));
    if phentsize < 4 || phnum > 256 {
        return false;
    }
    (0..phnum).all(|i| {
        let mut t = [0u8; 4];
        f.read_exact_at(&mut t, phoff + i * phentsize).is_ok() && u32::from_le_bytes(t) != 3
    })
}

/// The guest kernel's command line: quiet console, reset on reboot and panic, no PCI or modules,
/// rvmm-init as PID 1. `RVMM_GUEST_CMDLINE_APPEND` adds to it (for debugging, e.g. `loglevel=7`).
fn guest_cmdline() -> String {
    let mut c = String::from(
        "console=ttyS0 quiet loglevel=1 reboot=k panic=-1 pci=off nomodule rdinit=/init",
    );
    if let Some(extra) = std::env::var_os("RVMM_GUEST_CMDLINE_APPEND") {
        c.push(' ');
        c.push_str(&extra.to_string_lossy());
    }
    c
}

/// The guest kernel and rvmm-init, and a usable /dev/kvm: what any VM of ours needs.
fn vm_prerequisites() -> Result<(PathBuf, PathBuf)> {
    let kernel = crate::kernel::cached_vmlinux()?;
    let init = guest_init_path()?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(Error::NoKvm)?;
    Ok((kernel, init))
}

/// vCPUs and guest MiB for `--cpus` and `--memory`: runs and `prewarm` size machines (and so
/// snapshot keys) the same way.
fn machine_size(cpus: Option<f64>, memory_bytes: Option<u64>) -> (u8, u32) {
    (
        cpus.map(|c| c.ceil().clamp(1.0, 32.0) as u8).unwrap_or(1),
        memory_bytes
            .map(|b| (b >> 20).max(64) as u32)
            .unwrap_or(DEFAULT_MEM_MIB),
    )
}

/// What `prewarm` made.
pub struct Prewarmed {
    pub key: String,
    /// Bytes of guest memory written (zero pages are holes).
    pub memory_bytes: u64,
    /// Launch to saved.
    pub took: Duration,
    /// The snapshot existed already; nothing was booted.
    pub existed: bool,
}

/// How long a prewarm boot may take to reach READY.
const PREWARM_TIMEOUT: Duration = Duration::from_secs(300);

/// How long `rvmm run` waits, once the VM runs, for the guest to start the workload: a booting
/// guest (about 11 s on kvm_pvm, well under a second on hardware KVM, longer when many boot at
/// once) and a restored one (about a second on kvm_pvm). A guest that has not started it by then
/// is stopped with one line rather than waited for forever. Time the VMM spends waiting for a CPU
/// on a loaded host is not counted, up to ten times the timeout. `RVMM_START_TIMEOUT` (seconds)
/// overrides both.
const START_TIMEOUT_COLD: Duration = Duration::from_secs(300);
const START_TIMEOUT_WARM: Duration = Duration::from_secs(60);

fn start_timeout(warm: bool) -> Duration {
    std::env::var("RVMM_START_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(if warm {
            START_TIMEOUT_WARM
        } else {
            START_TIMEOUT_COLD
        })
}

/// Boots a guest to READY and saves the warm-start snapshot that `rvmm run --isolation=vm` with
/// the same `--cpus`, `--memory` and network mode will restore (`rvmm snapshot prewarm`). With
/// `network`, the VM gets a private tap (not on the bridge, gone when rvmm exits).
pub fn prewarm(
    root: &Path,
    cpus: Option<f64>,
    memory_bytes: Option<u64>,
    network: bool,
) -> Result<Prewarmed> {
    let t0 = Instant::now();
    let (kernel, init) = vm_prerequisites()?;
    let (vcpus, mem_mib) = machine_size(cpus, memory_bytes);
    let id = crate::run::new_id();
    let snaps = snapshots::Snapshots::new(root);
    std::fs::create_dir_all(snaps.dir()).at(|| format!("creating {}", snaps.dir().display()))?;
    // Boot files under a name `rvmm snapshot gc` removes if this process dies.
    let work = tempfile::Builder::new()
        .prefix(&format!(".tmp-{}-vmm", snapshots::owner_key()))
        .rand_bytes(0)
        .tempdir_in(snaps.dir())
        .at(|| format!("creating a directory in {}", snaps.dir().display()))?;
    let machine = Machine {
        kernel,
        init,
        security: serde_json::to_vec(&crate::security::docker_default(true))
            .map_err(Error::Json)?,
        vcpus,
        mem_mib,
        taps: if network {
            vec![machine::Tap::Name(format!("rvp{}", &id[..11]))]
        } else {
            Vec::new()
        },
        mac: [0x02, 0, 0, 0, 0, 1],
        console: work.path().join("console.log"),
        shares: Vec::new(),
    };
    let ((identity, tag, key), _) = machine.identity(None)?;
    if snaps.find(&key).is_some() {
        return Ok(Prewarmed {
            key,
            memory_bytes: 0,
            took: t0.elapsed(),
            existed: true,
        });
    }
    let (cfg, ends) = machine.config(Some(machine.initrd(work.path())?))?;
    let jail_dir = work.path().join("vmm-root");
    let staging = work.path().join("snapshot-out");
    for d in [&jail_dir, &staging] {
        std::fs::create_dir_all(d).at(|| format!("creating {}", d.display()))?;
    }
    let cg_id = format!("prewarm-{id}");
    let cg = vmm_cgroup(&cg_id, vcpus, mem_mib)?;
    let vmm = jail::spawn(jail::Request {
        cfg,
        restore: None,
        snapshot_out: Some(&staging),
        jail_dir: &jail_dir,
        id: &id,
        cgroup: Some(&cg),
    });
    let vmm = match vmm {
        Ok(v) => v,
        Err(e) => {
            cg.remove();
            return Err(Error::Create(e.to_string()));
        }
    };
    let ctl = vmm.controller();
    let HostEnds {
        from_guest,
        to_guest: _to_guest,
        stdin: _stdin,
        stdout: _stdout,
        stderr: _stderr,
    } = ends;
    let rx = session::frame_reader(from_guest);
    let not_ready = |why: &str| Error::NotReady {
        why: why.into(),
        log: machine.console.clone(),
    };
    let ready = loop {
        if vmm.is_finished() {
            break Err(not_ready("the VM stopped"));
        }
        if t0.elapsed() >= PREWARM_TIMEOUT {
            break Err(not_ready(&format!("waited {PREWARM_TIMEOUT:?}")));
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok((frame::READY, _))) => break Ok(()),
            Ok(Ok(_)) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Ok(Err(e)) => {
                break Err(Error::Corrupt {
                    reason: e,
                    log: None,
                })
            }
            // The channel closes when the VM stops.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break Err(not_ready("the VM stopped"))
            }
        }
    };
    let saved = ready.and_then(|()| {
        snaps.save(&key, &id, &identity, |d| {
            ctl.snapshot(d, &tag).map_err(crate::vmm::Error::Snapshot)
        })
    });
    if saved.is_ok() {
        snaps.gc();
    }
    ctl.stop();
    let _ = vmm.wait();
    cg.remove();
    if saved.is_err() {
        // Keep the kernel log the error points at (`rvmm snapshot gc` removes it).
        let _ = work.keep();
    }
    let memory_bytes = saved?;
    Ok(Prewarmed {
        key,
        memory_bytes,
        took: t0.elapsed(),
        existed: false,
    })
}

/// `rvmm vm`: boots `cfg` in a jailed VMM process (a cgroup and a root of its own) until the
/// guest resets or powers off, or SIGINT/SIGTERM stops it (`VmExit::Stopped`).
pub fn run_direct(cfg: crate::vmm::VmConfig) -> Result<VmExit> {
    use nix::sys::signal::{SigSet, Signal};
    // Blocked here, before any thread exists, so that one waiter receives them.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    sigs.thread_block().map_err(|e| IoError {
        what: "blocking SIGINT and SIGTERM".into(),
        source: e.into(),
    })?;
    let id = crate::run::new_id();
    let work = tempfile::Builder::new()
        .prefix("rvmm-vm-")
        .tempdir()
        .at(|| "creating a temporary directory")?;
    let jail_dir = work.path().join("root");
    std::fs::create_dir(&jail_dir).at(|| format!("creating {}", jail_dir.display()))?;
    let cg = vmm_cgroup(&format!("vm-{}", &id[..16]), cfg.vcpus, cfg.mem_mib)?;
    let vmm = jail::spawn(jail::Request {
        cfg,
        restore: None,
        snapshot_out: None,
        jail_dir: &jail_dir,
        id: &id,
        cgroup: Some(&cg),
    });
    let end = match vmm {
        Ok(vmm) => {
            let ctl = vmm.controller();
            let _ = std::thread::Builder::new()
                .name("rvmm-signals".into())
                .spawn(move || {
                    if sigs.wait().is_ok() {
                        ctl.stop();
                    }
                });
            vmm.wait().map_err(Error::Create)
        }
        Err(e) => Err(Error::Create(e.to_string())),
    };
    cg.remove();
    end
}

/// The guest identity `rvmm run --isolation=vm` would use now (None when the kernel or
/// rvmm-init is missing): snapshots with another one can never be restored.
pub fn current_tag() -> Option<String> {
    let kernel = crate::kernel::cached_vmlinux().ok()?;
    let init = guest_init_path().ok()?;
    let security = serde_json::to_vec(&crate::security::docker_default(true)).ok()?;
    Some(snapshots::tag(&kernel, &init, &guest_cmdline(), &security))
}

/// The host directories a run shares with its guest (binds and volumes, in the spec's order:
/// rvmm-init finds share N as the N-th of them).
fn shares(spec: &RunSpec) -> Vec<crate::vmm::Share> {
    spec.mounts
        .iter()
        .filter(|m| m.kind != crate::runspec::MountKind::Tmpfs)
        .map(|m| crate::vmm::Share {
            source: m.source.clone().into(),
            read_only: m.read_only,
        })
        .collect()
}

/// Runs the spec in a microVM; returns the workload's exit status.
pub fn run(spec: &RunSpec, image: &ResolvedImage, opts: &RunOptions) -> Result<u8> {
    let t0 = Instant::now();
    let (kernel, init) = vm_prerequisites()?;
    let mut run = crate::run::prepare(spec, opts, Isolation::Vm)?;
    let dir = run.dir.clone();
    let disk = crate::image::disk::image_disk(&opts.root, image)?;
    let t_disk = t0.elapsed();

    let mut taps = Vec::new();
    let mut mac = None;
    if run.address().is_some() {
        let tap = crate::net::create_tap(&opts.id)?;
        run.cleanup.state.taps.push(tap.clone());
        let m = crate::net::mac_for(&opts.id);
        run.cleanup.state.mac = Some(crate::net::mac_string(&m));
        run.cleanup.state.save()?;
        taps.push(machine::Tap::Name(tap));
        mac = Some(m);
    }
    let mut spec = run.spec.clone();
    spec.exec_hint = crate::runspec::exec_hint(&image.layers, &spec);
    let publisher = run.publisher.take();
    let address = run.address();

    let (machine, use_boot) = run_machine(
        &spec,
        (kernel, init),
        taps,
        mac.unwrap_or_default(),
        dir.join("console.log"),
        shares(&spec),
    )?;
    let (vcpus, mem_mib) = (machine.vcpus, machine.mem_mib);
    let snaps = snapshots::Snapshots::new(&opts.root);
    // With the image's snapshot: this machine with this image's root built (docs/snapshots.md).
    let ((identity, tag, key), image) =
        machine.identity((!opts.cold && image_snapshots()).then_some(disk.as_path()))?;
    // The VMM process: its cgroup, the mount point of its root, and (unless --cold) where a
    // boot writes the warm-start snapshot before rvmm moves it into place.
    let cg = vmm_cgroup(&opts.id, vcpus, mem_mib)?;
    run.cleanup.state.cgroup = Some(cg.clone());
    run.cleanup.state.save()?;
    let jail_dir = dir.join("vmm-root");
    std::fs::create_dir_all(&jail_dir).at(|| format!("creating {}", jail_dir.display()))?;
    let staging = if opts.cold {
        None
    } else {
        Some(snapshot_staging(&snaps, &opts.id)?)
    };
    let place = machine::Place {
        jail_dir: &jail_dir,
        id: &opts.id,
        cgroup: Some(&cg),
        snapshot_out: staging.as_ref().map(|t| t.path()),
    };
    // The image's snapshot first, else the machine's (whose VMM is then asked for the image's).
    let mut candidates = Vec::new();
    if let Some((_, itag, ikey)) = &image {
        candidates.push(machine::Candidate {
            key: ikey,
            tag: itag,
            snapshot_out: None,
        });
    }
    candidates.push(machine::Candidate {
        key: &key,
        tag: &tag,
        snapshot_out: image.as_ref().and(place.snapshot_out),
    });
    let started = machine::restore_or_boot(&machine, &snaps, &candidates, opts.cold, &dir, &place)?;
    let warm = started.warm;
    let from_image = image.is_some() && started.restored == Some(0);
    let plan = |whose: &str, (identity, tag, key): machine::Ident| session::SnapshotPlan {
        whose: whose.into(),
        dir: snaps.dir().to_owned(),
        key,
        tag,
        identity,
        run_id: opts.id.clone(),
    };
    // Take the machine's snapshot at READY: a cold boot of a kind that has none yet, unless
    // --cold; and the image's at ROOTED, unless this run restored it.
    let at_ready = (!opts.cold && !warm && snaps.find(&key).is_none())
        .then(|| plan("the machine's", (identity, tag, key.clone())));
    let restored_key = match (&image, from_image) {
        (Some((_, _, k)), true) => k.clone(),
        _ => key,
    };
    let at_root = image
        .filter(|(_, _, k)| !from_image && snaps.find(k).is_none())
        .map(|i| plan("the image's", i));
    let tail = Tail {
        spec,
        dir,
        disk: Some(disk),
        use_boot,
        mac,
        remove: opts.remove,
        logs_itself: opts.logs_itself,
        address,
        key: restored_key,
        from_image,
        at_ready,
        at_root,
        t0,
        t_disk,
        t_setup: t0.elapsed(),
    };
    if warm {
        // A restored guest needs nothing more of rvmm's big binary: the small rvmm-vmm binary
        // takes over this process for the rest of the run (handover.rs). Not after a cold boot:
        // that run still saves the machine's snapshot.
        if let Some(exe) = handover::target() {
            let e = handover::exec(
                &exe,
                &tail,
                &started,
                publisher.as_ref(),
                staging.as_ref().map(|t| t.path()),
                &[run.layers_fd()],
            );
            log::warn!("starting {}: {e}; rvmm keeps the run itself", exe.display());
        }
    }
    let code = run_tail(tail, started, publisher, run);
    drop(staging);
    code
}

/// Whether runs save and restore image snapshots (`RVMM_IMAGE_SNAPSHOTS=0` turns them off).
fn image_snapshots() -> bool {
    std::env::var_os("RVMM_IMAGE_SNAPSHOTS").is_none_or(|v| v != "0")
}

/// A VM run once its VMM is up, as `rvmm run` hands it to [`run_tail`] (in this process, or in
/// rvmm-vmm after a handover).
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Tail {
    /// The workload, with everything the run decided (and the PATH hint).
    spec: RunSpec,
    dir: PathBuf,
    /// The image disk, attached right before the `Start`.
    disk: Option<PathBuf>,
    /// The run has the privileges the snapshot's initramfs carries (the zygote starts it).
    use_boot: bool,
    mac: Option<[u8; 6]>,
    remove: bool,
    /// A detached run without a supervisor: the workload's output goes to the run's log.
    logs_itself: bool,
    /// Where the published ports go.
    address: Option<std::net::Ipv4Addr>,
    /// The restored snapshot's key (for the error of a restored guest that does not start).
    key: String,
    /// The restored snapshot is the image's: the guest has its root built.
    #[serde(default)]
    from_image: bool,
    /// The snapshots this run saves: the machine's at READY, the image's at ROOTED.
    #[serde(default)]
    at_ready: Option<session::SnapshotPlan>,
    #[serde(default)]
    at_root: Option<session::SnapshotPlan>,
    /// When the run started (handed over as CLOCK_MONOTONIC).
    #[serde(skip, default = "Instant::now")]
    t0: Instant,
    t_disk: Duration,
    t_setup: Duration,
}

/// The run's records as the tail sees them: `rvmm run`'s [`crate::run::Prepared`], or after a
/// handover the run's state file.
pub(crate) trait RunBook {
    fn started(&mut self);
    fn finish(self, code: i32, remove: bool) -> u8;
    fn fail(self, remove: bool);
}

impl RunBook for crate::run::Prepared {
    fn started(&mut self) {
        crate::run::Prepared::started(self)
    }
    fn finish(self, code: i32, remove: bool) -> u8 {
        crate::run::Prepared::finish(self, code, remove)
    }
    fn fail(self, remove: bool) {
        crate::run::Prepared::fail(self, remove)
    }
}

/// After a handover: the run's state file, and its drop frees the host resources (a run that
/// ends unfinished is recorded as a setup failure, as in `rvmm run`).
impl RunBook for crate::run::Cleanup {
    fn started(&mut self) {
        crate::run::Cleanup::started(self)
    }
    fn finish(mut self, code: i32, remove: bool) -> u8 {
        crate::run::Cleanup::finish(&mut self, code, remove)
    }
    fn fail(mut self, remove: bool) {
        crate::run::Cleanup::finish(&mut self, 125, remove);
    }
}

/// The rest of a VM run: the session until the workload's EXIT, then its status and the run's
/// epilogue.
fn run_tail(
    t: Tail,
    started: machine::Started,
    publisher: Option<crate::net::Publisher>,
    mut book: impl RunBook,
) -> Result<u8> {
    let warm = started.warm;
    let start = StartMaker::new(&t.spec, t.use_boot, t.mac);
    // A detached run without a supervisor writes the workload's output to its log itself.
    let own_log = t
        .logs_itself
        .then(|| crate::run::supervise::OwnLog::open(&t.dir))
        .transpose()?;
    let session = session::Session {
        spec: &t.spec,
        dir: t.dir.clone(),
        vmm: started.vmm.controller(),
        disk: t.disk.clone(),
        start: &start,
        warm,
        at_ready: t.at_ready.clone(),
        at_root: t.at_root.clone(),
        t0: t.t0,
        output: own_log.as_ref().map(|l| l.fds()),
    };
    let out = session.run(started.vmm, started.ends, publisher, t.address, || {
        // Into the log before the start is reported: `rvmm run -d` stops reading this
        // process's stderr then, and a write to a pipe without a reader would end the run.
        if let Some(l) = &own_log {
            l.take_over_stdio();
        }
        book.started();
    })?;
    drop(own_log);

    let total = t.t0.elapsed();
    log::info!(
        "vm run: disk ready {:?}, vmm set up {:?}, workload started {:?}, exit {total:?}",
        t.t_disk,
        t.t_setup,
        out.started_at,
    );
    let restored = match (warm, t.from_image) {
        (false, _) => "none",
        (true, true) => "image",
        (true, false) => "machine",
    };
    timings(&out, warm, restored, t.t_disk, t.t_setup, total);
    match exit_status(out, t.remove, &t.dir, warm, &t.key) {
        Ok(code) => Ok(book.finish(code, t.remove)),
        Err(e) => {
            book.fail(t.remove);
            Err(e)
        }
    }
}

/// `RVMM_TIMINGS`: one line of a run's phases on stderr (scripts/vm-phases.sh reads it).
fn timings(
    out: &session::Outcome,
    warm: bool,
    restored: &str,
    t_disk: Duration,
    t_setup: Duration,
    total: Duration,
) {
    if std::env::var_os("RVMM_TIMINGS").is_none() {
        return;
    }
    let (init, exec, spec_at) = out.report.guest_times.unwrap_or((0, 0, 0));
    let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as i64).unwrap_or(-1);
    eprintln!(
        "rvmm-timings warm={} start_bytes={} disk_ms={} setup_ms={} snapshot_ms={} guest_init_uptime_ms={init} guest_spec_uptime_ms={spec_at} guest_exec_uptime_ms={exec} started_ms={} exit_frame_ms={} exit_ms={} restored={restored} image_snapshot_ms={}",
        u8::from(warm),
        out.start_bytes,
        t_disk.as_millis(),
        t_setup.as_millis(),
        ms(out.snapshot_took),
        ms(out.started_at),
        ms(out.exit_frame_at),
        total.as_millis(),
        ms(out.image_snapshot_took),
    );
}

/// The machine a run of `spec` gets, sized by its limits. Its initramfs (and so its snapshot)
/// carries Docker's default privileges, the same for every run; the bool says whether this run
/// has them (then it uses the zygote; a run with other privileges sends its own).
fn run_machine(
    spec: &RunSpec,
    (kernel, init): (PathBuf, PathBuf),
    taps: Vec<machine::Tap>,
    mac: [u8; 6],
    console: PathBuf,
    shares: Vec<crate::vmm::Share>,
) -> Result<(Machine, bool)> {
    let (vcpus, mem_mib) = machine_size(spec.limits.cpus, spec.limits.memory_bytes);
    let boot = crate::security::docker_default(true);
    let use_boot = spec.security == boot;
    let machine = Machine {
        kernel,
        init,
        security: serde_json::to_vec(&boot).map_err(Error::Json)?,
        vcpus,
        mem_mib,
        taps,
        mac,
        console,
        shares,
    };
    Ok((machine, use_boot))
}

/// A VM whose root is a host directory, for rvmm-oci: an OCI bundle's rootfs and mounts,
/// prepared by the engine, shared with the guest (virtio-fs) and written in place.
pub struct SharedRoot<'a> {
    /// The workload; its mounts' sources are host paths (binds) or tmpfs.
    pub spec: RunSpec,
    pub rootfs: PathBuf,
    /// The container's state directory: the kernel log, `exec.sock`, the VMM's jail mount point.
    pub dir: &'a Path,
    pub id: &'a str,
    /// Where the VMM process goes (see [`vmm_limits`]).
    pub cgroup: &'a crate::cgroups::Cgroup,
    /// The NIC: an open tap and the guest's MAC.
    pub nic: Option<(OwnedFd, [u8; 6])>,
}

/// Runs a [`SharedRoot`]: restores the machine's warm-start snapshot (or boots it), calls
/// `ready` (rvmm-oci's `create` answers there and waits for `start`; false: give up), then runs
/// the workload; returns its status (Docker's numbering: 128+n for a signal).
pub fn run_shared_root(r: SharedRoot, ready: impl FnOnce() -> bool) -> Result<i32> {
    let t0 = Instant::now();
    let (kernel, init) = vm_prerequisites()?;
    let mut spec = r.spec;
    spec.root_shared = true;
    spec.exec_hint = crate::runspec::exec_hint(std::slice::from_ref(&r.rootfs), &spec);
    // Writable even for `root.readonly`: rvmm-init makes the mount points it needs, then
    // remounts / read-only for the workload (as runc does on the host). The rootfs is the
    // container's own.
    let mut shares = vec![crate::vmm::Share {
        source: r.rootfs.clone(),
        read_only: false,
    }];
    shares.extend(self::shares(&spec));
    let mac = r.nic.as_ref().map(|(_, m)| *m);
    let taps = r
        .nic
        .map(|(fd, _)| machine::Tap::Fd(std::sync::Arc::new(fd)))
        .into_iter()
        .collect();
    let (machine, use_boot) = run_machine(
        &spec,
        (kernel, init),
        taps,
        mac.unwrap_or_default(),
        r.dir.join("console.log"),
        shares,
    )?;
    let root = crate::paths::default_root();
    let snaps = snapshots::Snapshots::new(&root);
    let ((identity, tag, key), _) = machine.identity(None)?;
    let jail_dir = r.dir.join("vmm-root");
    std::fs::create_dir_all(&jail_dir).at(|| format!("creating {}", jail_dir.display()))?;
    // Not a run of the registry: its snapshot files go under a name `snapshot gc` can tell is
    // alive.
    let owner = snapshots::owner_key();
    let staging = snapshot_staging(&snaps, &owner)?;
    let place = machine::Place {
        jail_dir: &jail_dir,
        id: r.id,
        cgroup: Some(r.cgroup),
        snapshot_out: Some(staging.path()),
    };
    let candidates = [machine::Candidate {
        key: &key,
        tag: &tag,
        snapshot_out: None,
    }];
    let started = machine::restore_or_boot(&machine, &snaps, &candidates, false, r.dir, &place)?;
    let warm = started.warm;
    let t_setup = t0.elapsed();
    if !ready() {
        started.vmm.controller().stop();
        let _ = started.vmm.wait();
        return Ok(128 + libc::SIGKILL);
    }
    let at_ready = (!warm && snaps.find(&key).is_none()).then(|| session::SnapshotPlan {
        whose: "the machine's".into(),
        dir: snaps.dir().to_owned(),
        key: key.clone(),
        tag,
        identity,
        run_id: owner,
    });
    // The time waiting for `start` is the engine's, not the run's.
    let t0 = Instant::now();
    let start = StartMaker::new(&spec, use_boot, mac);
    let session = session::Session {
        spec: &spec,
        dir: r.dir.to_path_buf(),
        vmm: started.vmm.controller(),
        disk: None,
        start: &start,
        warm,
        at_ready,
        at_root: None,
        t0,
        output: None,
    };
    let out = session.run(started.vmm, started.ends, None, None, || {})?;
    drop(staging);
    let restored = if warm { "machine" } else { "none" };
    timings(&out, warm, restored, Duration::ZERO, t_setup, t0.elapsed());
    exit_status(out, false, r.dir, warm, &key)
}

/// The cgroup limits and device a VMM process needs: guest RAM plus the VMM's allowance, a task
/// for each vCPU plus its few other threads (and `extra_tasks` for processes beside it), and
/// /dev/kvm.
pub fn vmm_limits(
    spec: &RunSpec,
    extra_tasks: u64,
) -> (rvmm_proto::Limits, rvmm_proto::DeviceNode) {
    let (vcpus, mem_mib) = machine_size(spec.limits.cpus, spec.limits.memory_bytes);
    let limits = rvmm_proto::Limits {
        memory_bytes: Some((u64::from(mem_mib) << 20) + jail::VMM_MEMORY_ALLOWANCE),
        pids: Some(u64::from(vcpus) + 8 + extra_tasks),
        ..Default::default()
    };
    let kvm = rvmm_proto::DeviceNode {
        path: "/dev/kvm".into(),
        kind: 'c',
        major: 10,
        minor: 232,
        mode: 0o600,
        uid: 0,
        gid: 0,
        access: "rwm".into(),
    };
    (limits, kvm)
}

/// The cgroup of a VMM process (`rvmm/ID`): guest RAM plus the VMM's allowance, and a task
/// for each vCPU plus its few other threads.
fn vmm_cgroup(id: &str, vcpus: u8, mem_mib: u32) -> Result<crate::cgroups::Cgroup> {
    let layout = crate::cgroups::Layout::detect()?;
    let mut spec = RunSpec::default();
    spec.limits.cpus = Some(f64::from(vcpus));
    spec.limits.memory_bytes = Some(u64::from(mem_mib) << 20);
    let (limits, kvm) = vmm_limits(&spec, 0);
    Ok(crate::cgroups::create(
        &layout,
        id,
        &limits,
        &[],
        false,
        &[kvm],
    )?)
}

/// The directory a booted VMM writes its snapshot into (`.tmp-ID-vmm` among the snapshots,
/// removed when dropped; `rvmm snapshot gc` removes one a dead run left).
fn snapshot_staging(snaps: &snapshots::Snapshots, id: &str) -> Result<tempfile::TempDir> {
    std::fs::create_dir_all(snaps.dir()).at(|| format!("creating {}", snaps.dir().display()))?;
    Ok(tempfile::Builder::new()
        .prefix(&format!(".tmp-{id}-vmm"))
        .rand_bytes(0)
        .tempdir_in(snaps.dir())
        .at(|| format!("creating a directory in {}", snaps.dir().display()))?)
}

/// What makes a run's `Start` (what makes this run this run). Docker's default privileges
/// travel in the initramfs (and so in the snapshot), not over the channel.
pub(super) struct StartMaker {
    spec: RunSpec,
    use_boot: bool,
    mac: Option<[u8; 6]>,
}

impl StartMaker {
    fn new(spec: &RunSpec, use_boot: bool, mac: Option<[u8; 6]>) -> Self {
        let mut spec = spec.clone();
        if use_boot {
            spec.security = Default::default();
        }
        Self {
            spec,
            use_boot,
            mac,
        }
    }

    /// The run's `Start` as channel frames, with fresh entropy and the host's clock now.
    pub(super) fn frames(&self) -> Result<Vec<u8>> {
        encode_start(&rvmm_proto::Start {
            spec: self.spec.clone(),
            boot_security: self.use_boot,
            entropy: machine::random_bytes::<64>()?.to_vec(),
            realtime: realtime_now(),
            mac: self.mac,
            pause_at_root: false,
            prefetch: Vec::new(),
        })
    }

    /// A root-only `Start`: nothing of the run in it but the path of the program it execs, to
    /// read ahead (an image snapshot is saved after it, and every later run of the image
    /// restores what the guest holds then).
    pub(super) fn root_only(&self) -> Result<Vec<u8>> {
        let argv0 = self.spec.argv.first().filter(|a| a.starts_with('/'));
        encode_start(&rvmm_proto::Start {
            entropy: machine::random_bytes::<64>()?.to_vec(),
            realtime: realtime_now(),
            pause_at_root: true,
            prefetch: argv0
                .or(self.spec.exec_hint.as_ref())
                .cloned()
                .into_iter()
                .collect(),
            ..Default::default()
        })
    }
}

fn realtime_now() -> (i64, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos())
}

fn encode_start(start: &rvmm_proto::Start) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(start).map_err(Error::Json)?;
    let mut frames = frame::encode_chunked(frame::SPEC, &json);
    frames.extend(frame::encode(frame::SPEC_END, &[]));
    Ok(frames)
}

/// The run's status from how its loop ended: the workload's own (or 126/127 when it could not
/// be executed, with its line on stderr), 128+n when our signal stopped the VM, or the one-line
/// error of a VM that did not start the workload, lost its channel or stopped unannounced.
fn exit_status(
    out: session::Outcome,
    remove: bool,
    dir: &Path,
    warm: bool,
    key: &str,
) -> Result<i32> {
    // With --rm the run directory, console.log included, goes with the run.
    let log = if remove {
        "without --rm the run keeps its kernel log".to_string()
    } else {
        format!("kernel log: {}", dir.join("console.log").display())
    };
    let report = out.report;
    if out.start_timed_out && report.exit.is_none() {
        let mut how = if warm {
            format!("restored from snapshot {key}; `--cold` boots instead")
        } else {
            "booting".to_string()
        };
        if out.start_cpu_wait >= Duration::from_secs(1) {
            how += &format!(
                "; its VMM also waited {:.1} s for a CPU",
                out.start_cpu_wait.as_secs_f64()
            );
        }
        return Err(Error::StartTimeout {
            timeout: out.start_deadline,
            how,
            log,
        });
    }
    match (report.failure, report.exit, out.killed) {
        (Some(f), _, _) if f.status == 125 => Err(Error::StartFailed(f.message)),
        (Some(f), _, _) => {
            eprintln!("rvmm: {}", f.message);
            Ok(i32::from(f.status))
        }
        (None, Some(c), _) => Ok(c),
        (None, None, Some(sig)) => Ok(128 + sig),
        (None, None, None) => {
            if let Some(reason) = out.corrupt {
                return Err(Error::Corrupt {
                    reason,
                    log: Some(log),
                });
            }
            let why = match out.vm_result {
                Ok(VmExit::Stopped) => "it was stopped".to_string(),
                Ok(e) => format!("it ended ({e:?})"),
                Err(e) => e,
            };
            Err(Error::NoExitStatus { why, log })
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_static_elves_count_as_rvmm_init() {
        let d = tempfile::tempdir().unwrap();
        // A minimal ELF64 header with one PT_LOAD program header: static.
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&1u32.to_le_bytes());
        let p = d.path().join("static");
        std::fs::write(&p, &elf).unwrap();
        assert!(is_static_elf(&p));
        // The same with a PT_INTERP: dynamic.
        elf[64..68].copy_from_slice(&3u32.to_le_bytes());
        std::fs::write(&p, &elf).unwrap();
        assert!(!is_static_elf(&p));
        // Not an ELF, or cut short.
        std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        assert!(!is_static_elf(&p));
        elf[64..68].copy_from_slice(&1u32.to_le_bytes());
        std::fs::write(&p, &elf[..66]).unwrap();
        assert!(!is_static_elf(&p));
        // This test binary is dynamically linked.
        assert!(!is_static_elf(&std::env::current_exe().unwrap()));
    }
}

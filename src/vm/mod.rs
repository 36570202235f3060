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

mod cpio;

use std::io::{Read, Write};

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rvmm_proto::frame;

use crate::image::ResolvedImage;
use crate::run::stdio::{pipe, winsize, RawMode};
use crate::run::{Isolation, RunOptions};
use crate::runspec::RunSpec;
use crate::vmm::{Console, DiskConfig, NetConfig, PortBackend, TapSource, Vm, VmConfig, VmExit};

pub mod exec;
pub mod snapshots;

/// Guest RAM when `--memory` is not given.
pub const DEFAULT_MEM_MIB: u32 = 256;

/// Where rvmm-init is: `RVMM_GUEST_INIT`, next to the rvmm binary, or the static build of this
/// workspace (`target/x86_64-unknown-linux-gnu/release/rvmm-init`).
pub fn guest_init_path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("RVMM_GUEST_INIT").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating rvmm")?;
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
        .context("rvmm-init (the guest's PID 1) is not built: run scripts/setup.sh, or RUSTFLAGS='-C target-feature=+crt-static' cargo build --release -p rvmm-guest-init --target x86_64-unknown-linux-gnu")
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
fn vm_prerequisites() -> anyhow::Result<(PathBuf, PathBuf)> {
    let kernel = crate::kernel::cached_vmlinux().map_err(|e| anyhow::anyhow!("{e}"))?;
    let init = guest_init_path()?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .context(
            "VM isolation needs /dev/kvm (read-write); use --isolation=container to run without it",
        )?;
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
/// is stopped with one line rather than waited for forever. `RVMM_START_TIMEOUT` (seconds)
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
) -> anyhow::Result<Prewarmed> {
    let t0 = Instant::now();
    let (kernel, init) = vm_prerequisites()?;
    let (vcpus, mem_mib) = machine_size(cpus, memory_bytes);
    let id = crate::run::new_id();
    let snaps = snapshots::Snapshots::new(root);
    std::fs::create_dir_all(snaps.dir())
        .with_context(|| format!("creating {}", snaps.dir().display()))?;
    // Boot files under a name `rvmm snapshot gc` removes if this process dies.
    let work = tempfile::Builder::new()
        .prefix(".tmp-prewarm-")
        .tempdir_in(snaps.dir())?;
    let machine = Machine {
        kernel,
        init,
        security: serde_json::to_vec(&crate::security::docker_default(true))?,
        vcpus,
        mem_mib,
        taps: if network {
            vec![format!("rvp{}", &id[..11])]
        } else {
            Vec::new()
        },
        mac: [0x02, 0, 0, 0, 0, 1],
        console: work.path().join("console.log"),
    };
    let (identity, tag, key) = machine.identity()?;
    if snaps.find(&key).is_some() {
        return Ok(Prewarmed {
            key,
            memory_bytes: 0,
            took: t0.elapsed(),
            existed: true,
        });
    }
    let (cfg, ends) = machine.config(Some(machine.initrd(work.path())?))?;
    let vm = Vm::new(cfg).context("creating the microVM")?;
    let ctl = vm.controller();
    let vm_thread = std::thread::spawn(move || vm.run());
    let HostEnds {
        from_guest,
        to_guest: _to_guest,
        stdin: _stdin,
        stdout: _stdout,
        stderr: _stderr,
    } = ends;
    let rx = frame_reader(from_guest);
    let not_ready = |why: &str| {
        anyhow::anyhow!(
            "the guest did not get ready ({why}; kernel log: {})",
            machine.console.display()
        )
    };
    let ready = loop {
        if vm_thread.is_finished() {
            break Err(not_ready("the VM stopped"));
        }
        if t0.elapsed() >= PREWARM_TIMEOUT {
            break Err(not_ready(&format!("waited {PREWARM_TIMEOUT:?}")));
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok((frame::READY, _))) => break Ok(()),
            Ok(Ok(_)) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Ok(Err(e)) => break Err(anyhow::anyhow!("the guest's channel is corrupt: {e}")),
            // The channel closes when the VM stops.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break Err(not_ready("the VM stopped"))
            }
        }
    };
    let saved = ready.and_then(|()| snaps.save(&key, &id, &identity, |d| ctl.snapshot(d, &tag)));
    if saved.is_ok() {
        snaps.gc();
    }
    ctl.stop();
    let _ = vm_thread.join();
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

/// The guest identity `rvmm run --isolation=vm` would use now (None when the kernel or
/// rvmm-init is missing): snapshots with another one can never be restored.
pub fn current_tag() -> Option<String> {
    let kernel = crate::kernel::cached_vmlinux().ok()?;
    let init = guest_init_path().ok()?;
    let security = serde_json::to_vec(&crate::security::docker_default(true)).ok()?;
    Some(snapshots::tag(&kernel, &init, &guest_cmdline(), &security))
}

/// The machine a VM run gets, cold or warm.
struct Machine {
    kernel: PathBuf,
    init: PathBuf,
    /// The workload privileges every run of this host gets (JSON), carried by the initramfs.
    security: Vec<u8>,
    vcpus: u8,
    mem_mib: u32,
    taps: Vec<String>,
    mac: [u8; 6],
    console: PathBuf,
}

/// rvmm's ends of the channel's ports (docs/vm-channel.md): frames to and from rvmm-init, and
/// the workload's stdin, stdout and stderr.
struct HostEnds {
    to_guest: OwnedFd,
    from_guest: OwnedFd,
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

/// A pipe with room for 1 MiB (as much as the host allows): fewer rounds through the event
/// thread when a VM streams output.
fn big_pipe() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    use std::os::fd::AsRawFd;
    let (r, w) = pipe()?;
    // SAFETY: fcntl on a pipe we own; failing leaves the default size.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    Ok((r, w))
}

impl Machine {
    /// The VM configuration, with fresh channel pipes each time (a failed restore consumed the
    /// last ones), and rvmm's ends of them. The disk slot starts empty: the run's disk is
    /// attached right before the `Start`.
    fn config(&self, initrd: Option<PathBuf>) -> anyhow::Result<(VmConfig, HostEnds)> {
        let (to_guest_r, to_guest_w) = pipe()?;
        let (from_guest_r, from_guest_w) = pipe()?;
        let (stdin_r, stdin_w) = big_pipe()?;
        let (stdout_r, stdout_w) = big_pipe()?;
        let (stderr_r, stderr_w) = big_pipe()?;
        let port = |name: &str, input, output, barrier| PortBackend {
            name: name.into(),
            input,
            output,
            barrier,
        };
        use rvmm_proto::port;
        let ports = vec![
            port(port::CONTROL, Some(to_guest_r), Some(from_guest_w), true),
            port(port::STDIN, Some(stdin_r), None, false),
            port(port::STDOUT, None, Some(stdout_w), false),
            port(port::STDERR, None, Some(stderr_w), false),
        ];
        let cfg = VmConfig {
            kernel: self.kernel.clone(),
            initrd,
            cmdline: guest_cmdline(),
            vcpus: self.vcpus,
            mem_mib: self.mem_mib,
            disks: vec![DiskConfig {
                path: None,
                read_only: true,
            }],
            console: Console::File(self.console.clone()),
            channel: None,
            ports,
            net: self
                .taps
                .iter()
                .map(|t| NetConfig {
                    tap: TapSource::Name(t.clone()),
                    mac: self.mac,
                })
                .collect(),
        };
        let ends = HostEnds {
            to_guest: to_guest_w,
            from_guest: from_guest_r,
            stdin: stdin_w,
            stdout: stdout_r,
            stderr: stderr_r,
        };
        Ok((cfg, ends))
    }

    /// The snapshot identity (text), tag and key of this machine.
    fn identity(&self) -> anyhow::Result<(String, String, String)> {
        let (cfg, _) = self.config(None)?;
        let identity = snapshots::identity(&self.kernel, &self.init, &cfg.cmdline, &self.security);
        let tag = snapshots::hash(&identity);
        let key = snapshots::key(&tag, &cfg.layout());
        Ok((identity, tag, key))
    }

    /// Writes the initramfs (rvmm-init as /init, nothing run-specific) into `dir`.
    fn initrd(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let initrd = dir.join("initrd.cpio");
        let init_bytes = std::fs::read(&self.init)
            .with_context(|| format!("reading {}", self.init.display()))?;
        let mut w = cpio::Writer::new(std::io::BufWriter::new(std::fs::File::create(&initrd)?));
        for d in ["dev", "proc", "sys"] {
            w.dir(d)?;
        }
        w.file("init", 0o755, &init_bytes)?;
        w.dir("rvmm")?;
        w.file("rvmm/security.json", 0o600, &self.security)?;
        w.finish()?;
        Ok(initrd)
    }
}

/// Reads the guest's channel on a thread of its own: every frame, in order, then an `Err` if
/// the stream turns out corrupt. The receiver disconnects when the channel closes.
fn frame_reader(from_guest: OwnedFd) -> std::sync::mpsc::Receiver<Result<(u8, Vec<u8>), String>> {
    // Bounded: when the main thread is slow (e.g. our stdout blocks), this thread stops reading,
    // the VMM's channel pipe fills and the guest's UART stalls; the host never queues without end.
    let (tx, rx) = std::sync::mpsc::sync_channel(16);
    let mut from_guest = std::fs::File::from(from_guest);
    std::thread::spawn(move || {
        let mut dec = frame::Decoder::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from_guest.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    dec.feed(&buf[..n]);
                    loop {
                        match dec.next_frame() {
                            Ok(Some(f)) => {
                                if tx.send(Ok(f)).is_err() {
                                    return;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                        }
                    }
                }
            }
        }
    });
    rx
}

/// Copies a port's pipe to `to` (our stdout or stderr) on a thread of its own, until the pipe
/// ends, or is empty once `done` is set.
fn relay_output(
    from: OwnedFd,
    to: std::os::fd::RawFd,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: fcntl on a pipe end we own.
    unsafe {
        let fl = libc::fcntl(from.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(from.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    let t = std::thread::Builder::new()
        .name("rvmm-output".into())
        .spawn(move || {
            // SAFETY: `to` is our stdout or stderr, open for the whole process; ManuallyDrop
            // never closes it.
            let mut out = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(to) });
            let mut from = std::fs::File::from(from);
            let mut buf = vec![0u8; 256 * 1024];
            let mut broken = false;
            loop {
                match from.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        // A closed stdout drops the rest, as a container's would fail to write.
                        if !broken && out.write_all(&buf[..n]).is_err() {
                            broken = true;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if done.load(Ordering::SeqCst) {
                            return;
                        }
                        let mut p = libc::pollfd {
                            fd: from.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        };
                        // SAFETY: polling one valid pollfd.
                        unsafe { libc::poll(&mut p, 1, 20) };
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        })?;
    Ok(t)
}

/// N bytes from the kernel's CSPRNG.
fn random_bytes<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut b = [0u8; N];
    let mut f = std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?;
    f.read_exact(&mut b).context("reading /dev/urandom")?;
    Ok(b)
}

static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);
static STOPS: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    STOP_SIGNAL.store(sig, Ordering::SeqCst);
    if sig == libc::SIGINT || sig == libc::SIGTERM {
        STOPS.fetch_add(1, Ordering::SeqCst);
    }
}

/// What the guest reported over the channel.
#[derive(Default)]
pub(crate) struct GuestReport {
    exit: Option<i32>,
    /// Guest uptime (ms) when PID 1 started, when the workload started, and when the `Start`
    /// arrived.
    guest_times: Option<(u32, u32, u32)>,
    /// The workload could not start: status (125/126/127) and message.
    failure: Option<(u8, String)>,
}

impl GuestReport {
    /// Applies one guest frame: output goes to our stdout/stderr, status is recorded.
    /// Returns true for STARTED.
    pub(crate) fn apply(&mut self, kind: u8, payload: &[u8]) -> bool {
        match kind {
            frame::STDOUT => {
                let mut out = std::io::stdout();
                let _ = out.write_all(payload);
                let _ = out.flush();
            }
            frame::STDERR => {
                let _ = std::io::stderr().write_all(payload);
            }
            frame::STARTED => {
                let at = |i| frame::le32_at(payload, i).map(u32::from_le_bytes);
                if let (Some(init), Some(exec)) = (at(0), at(4)) {
                    self.guest_times = Some((init, exec, at(8).unwrap_or(0)));
                }
                return true;
            }
            frame::FAILED if !payload.is_empty() => {
                self.failure = Some((
                    payload[0],
                    String::from_utf8_lossy(&payload[1..]).into_owned(),
                ));
            }
            frame::EXIT if payload.len() == 4 => {
                self.exit = frame::le32_at(payload, 0).map(i32::from_le_bytes);
            }
            _ => {}
        }
        false
    }
}

/// Runs the spec in a microVM; returns the workload's exit status.
pub fn run(spec: &RunSpec, image: &ResolvedImage, opts: &RunOptions) -> anyhow::Result<u8> {
    if !spec.mounts.is_empty() {
        bail!("-v is not supported with --isolation=vm yet");
    }
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
        run.cleanup.state.save()?;
        // A locally administered MAC from the run ID.
        let id = hex::decode(opts.id.get(..10).unwrap_or_default()).unwrap_or_default();
        let mut m = [0x02, 0, 0, 0, 0, 0];
        for (m, b) in m[1..].iter_mut().zip(&id) {
            *m = *b;
        }
        taps.push(tap);
        mac = Some(m);
    }
    let spec = run.spec.clone();
    let mut publisher = run.publisher.take();

    let (vcpus, mem_mib) = machine_size(spec.limits.cpus, spec.limits.memory_bytes);
    // The initramfs (and so the snapshot) carries Docker's defaults, the same for every run; a
    // run with other privileges sends its own and does not use the zygote.
    let boot = crate::security::docker_default(true);
    let use_boot = spec.security == boot;
    let boot_security = serde_json::to_vec(&boot)?;
    let machine = Machine {
        kernel,
        init,
        security: boot_security,
        vcpus,
        mem_mib,
        taps,
        mac: mac.unwrap_or_default(),
        console: dir.join("console.log"),
    };
    let snaps = snapshots::Snapshots::new(&opts.root);
    let (identity, tag, key) = machine.identity()?;
    let mut warm = None;
    if !opts.cold {
        if let Some(sdir) = snaps.find(&key) {
            let (cfg, ends) = machine.config(None)?;
            match Vm::restore(cfg, &sdir, &tag) {
                Ok(vm) => warm = Some((vm, ends)),
                Err(e) => {
                    eprintln!("rvmm: not using snapshot {key} ({e}); booting the kernel instead");
                    snaps.remove(&key);
                }
            }
        }
    }
    let is_warm = warm.is_some();
    let (vm, ends) = match warm {
        Some(w) => w,
        None => {
            let (cfg, ends) = machine.config(Some(machine.initrd(&dir)?))?;
            (Vm::new(cfg).context("creating the microVM")?, ends)
        }
    };
    let HostEnds {
        to_guest: to_guest_w,
        from_guest: from_guest_r,
        stdin: stdin_w,
        stdout: stdout_r,
        stderr: stderr_r,
    } = ends;
    // Take a snapshot at READY: a cold boot of a kind that has none yet, unless --cold.
    let mut snapshot_at_ready = !opts.cold && !is_warm && snaps.find(&key).is_none();
    let ctl = vm.controller();
    let stop = vm.stop_handle();
    let t_setup = t0.elapsed();
    // The `Start`: what makes this run this run. Sent once the guest is READY (a restored guest
    // is past READY already).
    // Docker's default privileges travel in the initramfs (and so in the snapshot), not over
    // the channel.
    let mut start_spec = spec.clone();
    if use_boot {
        start_spec.security = Default::default();
    }
    let start = rvmm_proto::Start {
        spec: start_spec,
        boot_security: use_boot,
        entropy: random_bytes::<64>()?.to_vec(),
        realtime: {
            let d = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            (d.as_secs() as i64, d.subsec_nanos())
        },
        mac,
    };
    let mut start_frames = frame::encode_chunked(frame::SPEC, &serde_json::to_vec(&start)?);
    start_frames.extend(frame::encode(frame::SPEC_END, &[]));
    let start_bytes = start_frames.len();
    let mut start_frames = Some(start_frames);
    let mut t_snapshot = None;
    let mut t_exit_frame = None;
    let vm_thread = std::thread::spawn(move || vm.run());
    // The start watchdog counts from here: building the image disk is not the guest's time.
    let vm_started = Instant::now();
    crate::run::install_handler(on_signal, crate::run::RELAYED_SIGNALS);
    let _raw = if spec.tty {
        crate::run::install_handler(on_signal, &[libc::SIGWINCH]);
        spec.stdin.then(RawMode::stdin)
    } else {
        None
    };
    let send_winsize = |to_guest: &exec::GuestWriter| {
        if let Some(ws) = winsize() {
            let mut p = ws.ws_row.to_le_bytes().to_vec();
            p.extend_from_slice(&ws.ws_col.to_le_bytes());
            to_guest.try_send(frame::encode(frame::WINSIZE, &p));
        }
    };

    // Frames to the guest go through one writer thread: a guest that stops reading must not
    // block this one.
    let to_guest = exec::GuestWriter::new(to_guest_w);
    let mut exec_server = None;
    // Attaches the disk and sends the `Start`.
    let send_start = |frames: Vec<u8>, to_guest: &exec::GuestWriter| -> anyhow::Result<()> {
        ctl.replace_disk(0, &disk)
            .context("attaching the image disk")?;
        to_guest.try_send(frames);
        Ok(())
    };
    if is_warm {
        if let Some(f) = start_frames.take() {
            send_start(f, &to_guest)?;
        }
    }
    // stdin → the stdin port, once the workload runs: nothing of this run may reach the guest
    // before a cold boot's snapshot at READY. Closing the pipe is the workload's EOF. Without
    // `-i` the pipe stays open and unused (the workload's stdin is /dev/null).
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let _stdin_unused = if spec.stdin {
        let mut tg = std::fs::File::from(stdin_w);
        std::thread::spawn(move || {
            if started_rx.recv().is_err() {
                return;
            }
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match std::io::stdin().read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tg.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        None
    } else {
        Some(stdin_w)
    };
    // The stdout and stderr ports → our stdout and stderr.
    let output_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let relays = [
        relay_output(stdout_r, libc::STDOUT_FILENO, output_done.clone())?,
        relay_output(stderr_r, libc::STDERR_FILENO, output_done.clone())?,
    ];

    // guest → host, on its own thread so the main one can watch signals.
    let rx = frame_reader(from_guest_r);

    let mut report = GuestReport::default();
    let mut started_at = None;
    let mut killed: Option<i32> = None;
    let start_deadline = start_timeout(is_warm);
    let mut start_timed_out = false;
    let mut corrupt = None;
    loop {
        let sig = STOP_SIGNAL.swap(0, Ordering::SeqCst);
        if sig != 0 {
            if STOPS.load(Ordering::SeqCst) >= 2 {
                // Second Ctrl-C/TERM: the VM goes, as `docker kill` would.
                stop.stop();
                killed = Some(libc::SIGKILL);
            } else if sig == libc::SIGWINCH {
                if started_at.is_some() {
                    send_winsize(&to_guest);
                }
            } else if started_at.is_none() {
                // Nothing to forward to yet: Ctrl-C or TERM during the boot stops the VM.
                if sig == libc::SIGINT || sig == libc::SIGTERM {
                    stop.stop();
                    killed = Some(sig);
                }
            } else {
                to_guest.try_send(frame::encode(frame::SIGNAL, &sig.to_le_bytes()));
            }
        }
        // Checked every round, not only when the channel is quiet: a guest that keeps sending
        // frames without ever starting the workload is stopped too.
        if started_at.is_none()
            && report.failure.is_none()
            && killed.is_none()
            && !start_timed_out
            && vm_started.elapsed() > start_deadline
        {
            start_timed_out = true;
            stop.stop();
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Ok((frame::READY, _))) => {
                if snapshot_at_ready {
                    snapshot_at_ready = false;
                    let t = Instant::now();
                    match snaps.save(&key, &opts.id, &identity, |d| ctl.snapshot(d, &tag)) {
                        Ok(bytes) => {
                            log::info!("snapshot {key} saved: {bytes} bytes of memory");
                            t_snapshot = Some(t.elapsed());
                            // Snapshots of a kernel, init or rvmm that has since been replaced.
                            for k in snaps.gc() {
                                log::info!("removed unusable snapshot {k}");
                            }
                        }
                        Err(e) => log::warn!("cannot save a snapshot for warm starts: {e:#}"),
                    }
                }
                if let Some(f) = start_frames.take() {
                    if let Err(e) = send_start(f, &to_guest) {
                        eprintln!("rvmm: {e:#}");
                        stop.stop();
                    }
                }
            }
            Ok(Ok((kind, payload))) if exec::is_exec_frame(kind) => {
                if let Some(s) = &exec_server {
                    exec::ExecServer::deliver(s, kind, &payload);
                }
            }
            Ok(Ok((kind, payload))) => {
                if report.apply(kind, &payload) {
                    started_at = Some(t0.elapsed());
                    run.started();
                    let _ = started_tx.send(());
                    if spec.tty {
                        send_winsize(&to_guest);
                    }
                    // `rvmm exec` from now on.
                    match exec::serve(&dir, to_guest.clone()) {
                        Ok(s) => exec_server = Some(s),
                        Err(e) => log::warn!("rvmm exec will not reach this run: {e}"),
                    }
                    if let (Some(p), Some(addr)) = (publisher.take(), run.address()) {
                        p.start(addr);
                    }
                }
            }
            Ok(Err(e)) => {
                // Reported as the run's one line if the guest sent no status before it.
                corrupt = Some(e);
                stop.stop();
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if vm_thread.is_finished() {
                    // Drain what is left, then stop.
                    while let Ok(Ok((kind, payload))) = rx.recv_timeout(Duration::from_millis(20)) {
                        report.apply(kind, &payload);
                    }
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                if vm_thread.is_finished() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if report.exit.is_some() {
            // EXIT is the guest's last frame: all output came before it, and nothing in the
            // guest outlives the run (the image disk is read-only, the writable layer is guest
            // RAM). Stop the VM now rather than wait for the guest's own sync and power-off.
            t_exit_frame = Some(t0.elapsed());
            stop.stop();
            break;
        }
    }
    drop(exec_server);
    let vm_result = vm_thread.join();
    // Everything the workload wrote before its EXIT is in the pipes now (the VMM writes the
    // control port's frames only after the output queued before them): copy it out and stop.
    output_done.store(true, Ordering::SeqCst);
    for r in relays {
        let _ = r.join();
    }
    let _ = std::io::stdout().flush();
    let total = t0.elapsed();
    log::info!(
        "vm run: disk ready {:?}, vmm set up {:?}, workload started {:?}, exit {:?}",
        t_disk,
        t_setup,
        started_at,
        total
    );
    if std::env::var_os("RVMM_TIMINGS").is_some() {
        let (init, exec, spec_at) = report.guest_times.unwrap_or((0, 0, 0));
        eprintln!(
            "rvmm-timings warm={} start_bytes={start_bytes} disk_ms={} setup_ms={} snapshot_ms={} guest_init_uptime_ms={init} guest_spec_uptime_ms={spec_at} guest_exec_uptime_ms={exec} started_ms={} exit_frame_ms={} exit_ms={}",
            u8::from(is_warm),
            t_disk.as_millis(),
            t_setup.as_millis(),
            t_snapshot.map(|d| d.as_millis() as i64).unwrap_or(-1),
            started_at.map(|d| d.as_millis() as i64).unwrap_or(-1),
            t_exit_frame.map(|d| d.as_millis() as i64).unwrap_or(-1),
            total.as_millis()
        );
    }
    // With --rm the run directory, console.log included, goes with the run.
    let log = if opts.remove {
        "without --rm the run keeps its kernel log".to_string()
    } else {
        format!("kernel log: {}", dir.join("console.log").display())
    };
    if start_timed_out && report.exit.is_none() {
        run.fail(opts.remove);
        let how = if is_warm {
            format!("restored from snapshot {key}; `--cold` boots instead")
        } else {
            "booting".to_string()
        };
        bail!(
            "the microVM did not start the workload within {:?} ({how}; {log})",
            start_deadline
        );
    }
    let code = match (report.failure, report.exit, killed) {
        (Some((125, msg)), _, _) => {
            run.fail(opts.remove);
            bail!("starting the workload in the VM: {msg}");
        }
        (Some((code, msg)), _, _) => {
            eprintln!("rvmm: {msg}");
            code as i32
        }
        (None, Some(c), _) => c,
        (None, None, Some(sig)) => 128 + sig,
        (None, None, None) => {
            if let Some(e) = corrupt {
                run.fail(opts.remove);
                bail!("the guest's channel is corrupt: {e} ({log})");
            }
            let why = match vm_result {
                Ok(Ok(VmExit::Stopped)) => "it was stopped".to_string(),
                Ok(Ok(e)) => format!("it ended ({e:?})"),
                Ok(Err(e)) => format!("{:#}", anyhow::Error::from(e)),
                Err(_) => "the VMM thread panicked".into(),
            };
            run.fail(opts.remove);
            bail!("the microVM stopped without reporting an exit status: {why} ({log})");
        }
    };
    Ok(run.finish(code, opts.remove))
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

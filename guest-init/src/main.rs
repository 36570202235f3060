//! rvmm-init: PID 1 inside an rvmm microVM. Built static (`-C target-feature=+crt-static`) and
//! delivered as /init of an initramfs that also holds the host's workload privileges
//! (/rvmm/security.json: the same for every run of a host).
//!
//! 1. mounts /dev, /proc, /sys of the initramfs; opens the channel's ports (a multiport
//!    virtio-console: control, stdin, stdout, stderr; docs/vm-channel.md);
//! 2. prepares what every run needs alike: the workload's /proc, /sys (ro) and minimal /dev
//!    (nodes, pts, shm, mqueue) under /stage, and a *zygote*: the workload-to-be, forked with its
//!    bounding set dropped and its seccomp filter installed; loopback up; the tmpfs of the run's
//!    writable layer (/rw); /dev/urandom and the image disk's size opened. Both processes then
//!    map the pages they will touch (`sys::warm`, `sys::prefault`), so a warm start does not take
//!    those page faults;
//! 3. sends READY and waits for the host's `Start` (SPEC frames): the `RunSpec`, fresh entropy,
//!    the host's clock and the MAC. A warm start restores a snapshot taken right here, so
//!    nothing before this point may be specific to one run; the image disk's slot is empty until
//!    the host attaches the run's disk;
//! 4. mixes in the entropy, steps the clock, waits for the disk, then builds the image's root
//!    (`image_root`): the image disk (/dev/vda, erofs or ext4, read-only) under a tmpfs overlay,
//!    the per-run writable layer, so the cached image disk is never written (the mount points
//!    the image lacks are made in the upper layer first, so none costs a copy-up); the staged
//!    /proc, /sys and /dev moved in; /etc/hosts, /etc/hostname and /etc/resolv.conf bound from
//!    empty files. A root-only `Start` (`pause_at_root`) stops here: ROOTED, the host saves the
//!    image's snapshot, and the run's own `Start` follows (entropy and clock again);
//! 5. writes the run's /etc files; eth0; hostname; mounts the host's shared directories
//!    (virtio-fs); then moves it to / (switch_root), attaches the workload's mounts (shared
//!    directories, a new volume filled from the image first; tmpfs) and makes / read-only with
//!    `--read-only`;
//! 6. hands the workload to the zygote (or forks it) with the spec's user, env and cwd, and the
//!    stdin, stdout and stderr ports as its fds 0-2 (its writes go straight to the host, no copy
//!    through rvmm-init); with -t a pty whose master rvmm-init relays to and from those ports;
//!    signals and window sizes arrive as control frames;
//! 7. reaps every orphan; when the workload exits, sends its status and waits for the host to stop
//!    the VM (it powers off itself only if the host has not after `EXIT_GRACE`).
//!
//! Failures before the workload starts are reported as a FAILED frame (125, or 126/127 for
//! exec) so the host prints one clear line.

use rvmm_proto::frame;
use rvmm_proto::Start;

mod sys;

use rvmm_workload::{c, check, mkdir_p, mount, Failure};

/// How long the channel's ports may take to appear after the kernel started PID 1.
const PORTS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
const NEWROOT: &str = "/newroot";
/// Where the host's shared directories are mounted (virtio-fs), outside the new root.
const SHARES: &str = "/rvmm-shares";

/// Guest uptime when PID 1 started, for the STARTED frame (the kernel's share of a cold start).
pub static INIT_UPTIME_MS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
/// Guest uptime when the `Start` arrived.
pub static SPEC_UPTIME_MS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// At most this many bytes of the image are read ahead for an image snapshot.
const PREFETCH_MAX: u64 = 64 << 20;

/// How long the image disk may take to appear after the `Start`.
const DISK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn main() {
    INIT_UPTIME_MS.store(sys::uptime_ms(), std::sync::atomic::Ordering::Relaxed);
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        eprintln!("rvmm-init: must run as PID 1 inside an rvmm microVM");
        std::process::exit(2);
    }
    let (chan, stdio) = match early() {
        Ok(fds) => fds,
        Err(e) => {
            eprintln!("rvmm-init: {e}");
            sys::power_off();
        }
    };
    sys::trace_init();
    sys::trace("pid1 up");
    // The privileges every run of this host gets, read before READY (so a snapshot has them).
    let boot_security: Option<rvmm_proto::Security> = std::fs::read("/rvmm/security.json")
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    // /proc, /sys and /dev for the workload, made now so a snapshot has them made.
    let staged = match rvmm_workload::system_mounts(STAGE) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("rvmm-init: preparing /proc, /sys and /dev early: {e}");
            false
        }
    };
    sys::trace("system mounts staged");
    // The workload-to-be, with its seccomp filter installed before READY.
    let zygote = boot_security.as_ref().and_then(workload::zygote);
    sys::trace("zygote forked");
    // What every run has alike, done once: loopback up, and the tmpfs for the run's writable
    // layer and /etc files.
    rvmm_workload::loopback_up();
    let rw_staged = stage_rw().is_ok();
    sys::preopen();
    // Last before READY, so a snapshot holds this process's pages mapped (the zygote did its own).
    sys::warm(512 << 10, 128 << 10);
    sys::prefault();
    let mut ch = Channel { fd: chan };
    let status = match run(&mut ch, boot_security, zygote, staged, rw_staged, &stdio) {
        Ok(code) => code,
        Err(f) => {
            let mut p = vec![f.status];
            p.extend_from_slice(f.message.as_bytes());
            ch.send(frame::FAILED, &p);
            i32::from(f.status)
        }
    };
    sys::trace("workload done");
    ch.send(frame::EXIT, &status.to_le_bytes());
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    // The host stops the VM once it has the EXIT frame. Powering off now could lose the frame:
    // the kernel resets every virtio device on its way down (virtio_dev_shutdown), the channel's
    // too, and the VMM may not have taken the frame off the queue yet (on a loaded host its
    // event thread runs late). So wait to be stopped; power off only if the host never does.
    std::thread::sleep(EXIT_GRACE);
    sys::power_off();
}

/// How long rvmm-init waits, after its EXIT frame, for the host to stop the VM.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

struct Channel {
    fd: libc::c_int,
}

impl Channel {
    fn send(&mut self, kind: u8, payload: &[u8]) {
        for chunk in payload
            .chunks(frame::MAX_PAYLOAD)
            .chain(payload.is_empty().then_some(&[][..]))
        {
            let f = frame::encode(kind, chunk);
            sys::write_all(self.fd, &f);
        }
    }
}

/// /dev, /proc, /sys of the initramfs, and the channel's ports: (control, the workload's stdio).
fn early() -> Result<(libc::c_int, workload::Stdio), String> {
    mkdir_p("/dev");
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755").map_err(|e| e.message)?;
    mkdir_p("/proc");
    mount("proc", "/proc", "proc", 0, "").map_err(|e| e.message)?;
    mkdir_p("/sys");
    mount("sysfs", "/sys", "sysfs", 0, "").map_err(|e| e.message)?;
    use rvmm_proto::port;
    let fds = sys::open_ports(
        &[
            (port::CONTROL, libc::O_RDWR),
            (port::STDIN, libc::O_RDONLY),
            (port::STDOUT, libc::O_WRONLY),
            (port::STDERR, libc::O_WRONLY),
        ],
        PORTS_TIMEOUT,
    )?;
    Ok((
        fds[0],
        workload::Stdio {
            stdin: fds[1],
            stdout: fds[2],
            stderr: fds[3],
        },
    ))
}

use rvmm_guest_init::Fail;

/// Where rvmm-init prepares /proc, /sys and /dev before READY, to move them into the workload's
/// root at the run.
const STAGE: &str = "/stage";

/// Sends READY, then reads the `Start`.
fn wait_start(ch: &mut Channel) -> Result<Start, Fail> {
    ch.send(frame::READY, &[]);
    read_start(ch)
}

/// Reads SPEC frames up to SPEC_END.
fn read_start(ch: &mut Channel) -> Result<Start, Fail> {
    let mut reader = rvmm_guest_init::StartReader::default();
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: reading into a stack buffer we own.
        let n = unsafe { libc::read(ch.fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            if let Some(start) = reader.feed(&buf[..n as usize])? {
                SPEC_UPTIME_MS.store(sys::uptime_ms(), std::sync::atomic::Ordering::Relaxed);
                return Ok(start);
            }
        } else if n == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // 0: the host closed the control port.
            return Err(Failure::setup(
                "the channel closed before the run spec arrived",
            ));
        }
    }
}

/// This guest's own randomness and time, first thing after every `Start`: a guest restored
/// from a snapshot has the snapshot's.
fn seed(start: &Start) -> Result<(), Fail> {
    sys::add_entropy(&start.entropy)
        .map_err(|e| Failure::setup(format!("seeding the RNG: {e}")))?;
    sys::set_realtime(start.realtime.0, start.realtime.1)
        .map_err(|e| Failure::setup(format!("setting the clock: {e}")))?;
    sys::trace("entropy and clock");
    Ok(())
}

/// The run's writable tmpfs: /rw/etc for its /etc files, /rw/upper and /rw/work for the root
/// overlay.
fn stage_rw() -> Result<(), Fail> {
    mkdir_p("/rw");
    mount("tmpfs", "/rw", "tmpfs", 0, "mode=0755")?;
    for d in ["/rw/etc", "/rw/upper", "/rw/work"] {
        mkdir_p(d);
    }
    Ok(())
}

/// The mount points a run needs in its root that the image lacks (/proc, /sys, /dev, and the
/// run's /etc files), made in the overlay's upper layer before the overlay is mounted: made
/// through the overlay, each would cost a copy-up of its directory (/etc takes the image's mode
/// and owner, as a copy-up gives it). Best effort: what is missing here is made later, through
/// the overlay, as before.
fn upper_mount_points(etc: &[&str]) {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let missing = |p: &str| {
        std::fs::symlink_metadata(format!("/image{p}"))
            .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    };
    for d in ["/proc", "/sys", "/dev"] {
        if missing(d) {
            mkdir_p(&format!("/rw/upper{d}"));
        }
    }
    let names: Vec<&str> = etc
        .iter()
        .copied()
        .filter(|n| missing(&format!("/etc/{n}")))
        .collect();
    if names.is_empty() {
        return;
    }
    let (mode, uid, gid) = match std::fs::symlink_metadata("/image/etc") {
        Ok(m) if m.is_dir() => (m.mode() & 0o7777, m.uid(), m.gid()),
        Ok(_) => return, // not a directory in the image: the overlay decides
        Err(_) => (0o755, 0, 0),
    };
    if std::fs::DirBuilder::new()
        .mode(0o700)
        .create("/rw/upper/etc")
        .is_err()
        || std::os::unix::fs::lchown("/rw/upper/etc", Some(uid), Some(gid)).is_err()
        || std::fs::set_permissions("/rw/upper/etc", std::fs::Permissions::from_mode(mode)).is_err()
    {
        return;
    }
    for n in names {
        rvmm_workload::touch(&format!("/rw/upper/etc/{n}"));
    }
}

/// The names of the run's /etc files (their bodies come with each run's spec).
const ETC_NAMES: [&str; 3] = ["hostname", "hosts", "resolv.conf"];

/// The image's root at NEWROOT, as every run of the image has it: the image disk (erofs, or
/// ext4) under the run's tmpfs overlay, /proc, /sys and /dev moved in, and `etc` bound from
/// /rw/etc (empty until the run writes them). Nothing here depends on the run, so an image
/// snapshot may hold it built.
fn image_root(staged: bool, rw_staged: bool) -> Result<(), Fail> {
    sys::wait_for_disk("vda", DISK_TIMEOUT).map_err(Failure::setup)?;
    sys::trace("disk attached");
    mkdir_p("/image");
    mount("/dev/vda", "/image", "erofs", libc::MS_RDONLY, "")
        .or_else(|_| mount("/dev/vda", "/image", "ext4", libc::MS_RDONLY, "noload"))
        .map_err(|e| Failure::setup(format!("mounting the image disk: {e}")))?;
    sys::trace("image mounted");
    if !rw_staged {
        stage_rw()?;
    }
    upper_mount_points(&ETC_NAMES);
    mount(
        "overlay",
        NEWROOT,
        "overlay",
        0,
        "lowerdir=/image,upperdir=/rw/upper,workdir=/rw/work",
    )
    .map_err(|e| Failure::setup(format!("mounting the root overlay: {e}")))?;
    sys::trace("overlay");
    system_in_root(staged)?;
    bind_etc(&ETC_NAMES)?;
    sys::trace("/proc /sys /dev, /etc mount points");
    Ok(())
}

/// /proc, /sys and /dev in NEWROOT: the staged ones moved in (one move each; /dev moves with
/// its submounts), else mounted there.
fn system_in_root(staged: bool) -> Result<(), Fail> {
    if !staged {
        return rvmm_workload::system_mounts(NEWROOT);
    }
    for d in ["/proc", "/sys", "/dev"] {
        let to = format!("{NEWROOT}{d}");
        mkdir_p(&to);
        mount(&format!("{STAGE}{d}"), &to, "", libc::MS_MOVE, "")?;
    }
    Ok(())
}

/// Binds /rw/etc/NAME over NEWROOT/etc/NAME for each name (both made when missing).
fn bind_etc(names: &[&str]) -> Result<(), Fail> {
    for name in names {
        let (src, t) = (format!("/rw/etc/{name}"), format!("{NEWROOT}/etc/{name}"));
        rvmm_workload::touch(&src);
        rvmm_workload::touch(&t);
        mount(&src, &t, "", libc::MS_BIND, "")?;
    }
    Ok(())
}

fn run(
    ch: &mut Channel,
    boot_security: Option<rvmm_proto::Security>,
    zygote: Option<workload::Zygote>,
    staged: bool,
    rw_staged: bool,
    stdio: &workload::Stdio,
) -> Result<i32, Fail> {
    let mut start = wait_start(ch)?;
    sys::trace("start received");
    // Before anything else: this guest's own randomness and time.
    seed(&start)?;
    mkdir_p(NEWROOT);
    let mut rooted = false;
    if start.pause_at_root {
        // A root-only start: the image's root, then the host snapshots this guest and sends the
        // run's own start (a guest restored from that snapshot carries on from here).
        image_root(staged, rw_staged)?;
        sys::prefetch(NEWROOT, &start.prefetch, PREFETCH_MAX);
        sys::trace("prefetched");
        ch.send(frame::ROOTED, &[]);
        start = read_start(ch)?;
        sys::trace("start received at the root");
        if start.pause_at_root {
            return Err(Failure::setup("a second root-only start"));
        }
        seed(&start)?;
        rooted = true;
    }
    let mut spec = start.spec;
    if start.boot_security {
        spec.security = boot_security
            .ok_or_else(|| Failure::setup("the initramfs carries no /rvmm/security.json"))?;
    }
    // The run's /etc files, as the host wrote them into the spec. A bundle's /etc files are the
    // engine's binds (mounts); none is made up here.
    let etc: Vec<_> = spec
        .etc
        .entries()
        .into_iter()
        .filter(|(_, body)| !spec.root_shared || !body.is_empty())
        .collect();
    if spec.root_shared {
        if rooted {
            return Err(Failure::setup(
                "a shared root for a guest with an image root",
            ));
        }
        // An OCI bundle's rootfs (share 0), written in place as runc would.
        mount_shares()?;
        mount(&format!("{SHARES}/0"), NEWROOT, "", libc::MS_BIND, "")
            .map_err(|e| Failure::setup(format!("binding the shared root: {e}")))?;
        sys::trace("shared root");
        if !rw_staged {
            stage_rw()?;
        }
        system_in_root(staged)?;
        bind_etc(&etc.iter().map(|(n, _)| *n).collect::<Vec<_>>())?;
    } else if !rooted {
        image_root(staged, rw_staged)?;
    }
    for (name, body) in &etc {
        std::fs::write(format!("/rw/etc/{name}"), body)
            .map_err(|e| Failure::setup(format!("writing /etc/{name}: {e}")))?;
    }
    if let Some(b) = spec.shm_size {
        rvmm_workload::shm_size(NEWROOT, b)?;
    }
    if spec.privileged {
        // The guest's devices (the initramfs's devtmpfs), not the host's.
        rvmm_workload::unconfine(NEWROOT, "/dev")?;
    }
    sys::trace("/etc files");

    sys::set_hostname(&spec.hostname).map_err(Failure::setup)?;
    if let Some(mac) = start.mac {
        sys::set_mac(mac).map_err(Failure::setup)?;
    }
    if let (Some(a), Some(gw)) = (&spec.network.address, &spec.network.gateway) {
        sys::configure_eth0(a, gw).map_err(|e| Failure::setup(format!("configuring eth0: {e}")))?;
    }

    // The guest's own /proc: the workload runs on this kernel.
    rvmm_workload::sysctls("/proc", &spec.sysctls)?;
    sys::trace("hostname and network");
    // Shared directories (binds and volumes; the host's virtio-fs device serves them as
    // rvmm:/0, rvmm:/1, ... in the spec's order), taken before the switch and attached after it,
    // in the new root, with the tmpfs mounts.
    let shared = spec
        .mounts
        .iter()
        .any(|m| m.kind != rvmm_proto::MountKind::Tmpfs);
    if shared && !spec.root_shared {
        mount_shares()?;
    }
    let mut n = usize::from(spec.root_shared);
    let mounts = spec
        .mounts
        .iter()
        .map(|m| {
            let source = if m.kind == rvmm_proto::MountKind::Tmpfs {
                String::new()
            } else {
                n += 1;
                format!("{SHARES}/{}", n - 1)
            };
            rvmm_workload::mounts::Prepared::new(m, &source)
        })
        .collect::<Result<Vec<_>, _>>()?;
    // switch_root: the overlay becomes /.
    // SAFETY: chdir/mount/chroot with NUL-terminated paths.
    unsafe {
        check(libc::chdir(c(NEWROOT).as_ptr()), || {
            "chdir to the new root".into()
        })?;
        check(
            libc::mount(
                c(".").as_ptr(),
                c("/").as_ptr(),
                std::ptr::null(),
                libc::MS_MOVE,
                std::ptr::null(),
            ),
            || "moving the new root to /".into(),
        )?;
        check(libc::chroot(c(".").as_ptr()), || "chroot".into())?;
        check(libc::chdir(c("/").as_ptr()), || "chdir /".into())?;
    }
    // The workload's mounts (parents first), in the new root, where the image's symlinks
    // resolve; then `--read-only`.
    for m in mounts {
        m.attach()?;
    }
    if spec.read_only {
        mount(
            "",
            "/",
            "",
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
            "",
        )?;
    }

    sys::trace("switched root");
    // The zygote's filter is the boot-time one: only a run with those privileges may use it.
    let zygote = if start.boot_security { zygote } else { None };
    workload::run(&spec, ch, zygote, stdio)
}

/// Mounts the host's virtio-fs device (every shared directory, `SHARES/N`) at `SHARES`.
fn mount_shares() -> Result<(), Fail> {
    mkdir_p(SHARES);
    mount(
        "rvmm",
        SHARES,
        "virtiofs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "",
    )
    .map_err(|e| Failure::setup(format!("{e} (the host's shared directories)")))
}

mod exec;
mod workload;

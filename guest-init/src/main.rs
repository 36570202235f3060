//! rvmm-init: PID 1 inside an rvmm microVM. Built static (`-C target-feature=+crt-static`) and
//! delivered as /init of an initramfs that also holds the host's workload privileges
//! (/rvmm/security.json: the same for every run of a host).
//!
//! 1. mounts /dev, /proc, /sys of the initramfs; opens the channel's ports (a multiport
//!    virtio-console: control, stdin, stdout, stderr; docs/vm-channel.md);
//! 2. prepares what every run needs alike: the workload's /proc, /sys (ro) and minimal /dev
//!    (nodes, pts, shm, mqueue) under /stage, and a *zygote*: the workload-to-be, forked with its
//!    bounding set dropped and its seccomp filter installed;
//! 3. sends READY and waits for the host's `Start` (SPEC frames): the `RunSpec`, fresh entropy,
//!    the host's clock and the MAC. A warm start restores a snapshot taken right here, so
//!    nothing before this point may be specific to one run; the image disk's slot is empty until
//!    the host attaches the run's disk;
//! 4. mixes in the entropy, steps the clock, waits for the disk, then mounts the image disk
//!    (/dev/vda, erofs or ext4, read-only) under a tmpfs overlay: the per-run writable layer, so
//!    the cached image disk is never written;
//! 5. moves the staged /proc, /sys and /dev into it, binds /etc/hosts, /etc/hostname and
//!    /etc/resolv.conf; loopback and eth0; hostname; then moves it to / (switch_root);
//! 6. hands the workload to the zygote (or forks it) with the spec's user, env and cwd, and the
//!    stdin, stdout and stderr ports as its fds 0-2 (its writes go straight to the host, no copy
//!    through rvmm-init); with -t a pty whose master rvmm-init relays to and from those ports;
//!    signals and window sizes arrive as control frames;
//! 7. reaps every orphan; when the workload exits, sends its status and powers off.
//!
//! Failures before the workload starts are reported as a FAILED frame (125, or 126/127 for
//! exec) so the host prints one clear line.

use rvmm_proto::frame;
use rvmm_proto::Start;

mod sys;

use sys::{c, check, mkdir_p, mount};

/// How long the channel's ports may take to appear after the kernel started PID 1.
const PORTS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
const NEWROOT: &str = "/newroot";

/// Guest uptime when PID 1 started, for the STARTED frame (the kernel's share of a cold start).
pub static INIT_UPTIME_MS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
/// Guest uptime when the `Start` arrived.
pub static SPEC_UPTIME_MS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The largest `Start` accepted.
const MAX_START: usize = 16 << 20;
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
    let staged = match system_mounts(STAGE) {
        Ok(()) => true,
        Err((_, e)) => {
            eprintln!("rvmm-init: preparing /proc, /sys and /dev early: {e}");
            false
        }
    };
    sys::trace("system mounts staged");
    // The workload-to-be, with its seccomp filter installed before READY.
    let zygote = boot_security.as_ref().and_then(workload::zygote);
    sys::trace("zygote forked");
    let mut ch = Channel { fd: chan };
    let status = match run(&mut ch, boot_security, zygote, staged, &stdio) {
        Ok(code) => code,
        Err((code, msg)) => {
            let mut p = vec![code];
            p.extend_from_slice(msg.as_bytes());
            ch.send(frame::FAILED, &p);
            code as i32
        }
    };
    sys::trace("workload done");
    ch.send(frame::EXIT, &status.to_le_bytes());
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    sys::power_off();
}

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
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755").map_err(|e| e.1)?;
    mkdir_p("/proc");
    mount("proc", "/proc", "proc", 0, "").map_err(|e| e.1)?;
    mkdir_p("/sys");
    mount("sysfs", "/sys", "sysfs", 0, "").map_err(|e| e.1)?;
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

type Fail = (u8, String);

/// Where rvmm-init prepares /proc, /sys and /dev before READY, to move them into the workload's
/// root at the run.
const STAGE: &str = "/stage";

/// /proc, /sys (read-only) and a minimal /dev (nodes, pts, shm, mqueue, the usual links) under
/// `base`: the workload's root, or the staging directory before READY.
fn system_mounts(base: &str) -> Result<(), Fail> {
    let r = |p: &str| format!("{base}{p}");
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mkdir_p(&r("/proc"));
    mount("proc", &r("/proc"), "proc", nodev, "")?;
    mkdir_p(&r("/sys"));
    mount("sysfs", &r("/sys"), "sysfs", nodev | libc::MS_RDONLY, "")?;
    mkdir_p(&r("/dev"));
    mount(
        "tmpfs",
        &r("/dev"),
        "tmpfs",
        libc::MS_NOSUID,
        "mode=755,size=65536k",
    )?;
    for (name, major, minor, mode) in [
        ("null", 1, 3, 0o666),
        ("zero", 1, 5, 0o666),
        ("full", 1, 7, 0o666),
        ("random", 1, 8, 0o666),
        ("urandom", 1, 9, 0o666),
        ("tty", 5, 0, 0o666),
    ] {
        sys::mknod(
            &r(&format!("/dev/{name}")),
            libc::S_IFCHR | mode,
            major,
            minor,
        )?;
    }
    mkdir_p(&r("/dev/pts"));
    mount(
        "devpts",
        &r("/dev/pts"),
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    )?;
    mkdir_p(&r("/dev/shm"));
    mount(
        "shm",
        &r("/dev/shm"),
        "tmpfs",
        nodev,
        "mode=1777,size=65536k",
    )?;
    mkdir_p(&r("/dev/mqueue"));
    mount("mqueue", &r("/dev/mqueue"), "mqueue", nodev, "")?;
    for (target, link) in [
        ("pts/ptmx", "/dev/ptmx"),
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ] {
        // SAFETY: NUL-terminated strings.
        unsafe { libc::symlink(c(target).as_ptr(), c(&r(link)).as_ptr()) };
    }
    Ok(())
}

/// Sends READY, then reads SPEC frames up to SPEC_END.
fn wait_start(ch: &mut Channel) -> Result<Start, Fail> {
    ch.send(frame::READY, &[]);
    let mut dec = frame::Decoder::default();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        while let Some((kind, payload)) = dec.next_frame().map_err(|e| (125, e))? {
            match kind {
                frame::SPEC if raw.len() + payload.len() <= MAX_START => raw.extend(payload),
                frame::SPEC => return Err((125, "the run spec is too large".into())),
                frame::SPEC_END => {
                    SPEC_UPTIME_MS.store(sys::uptime_ms(), std::sync::atomic::Ordering::Relaxed);
                    return serde_json::from_slice(&raw)
                        .map_err(|e| (125, format!("parsing the run spec: {e}")));
                }
                _ => {}
            }
        }
        // SAFETY: reading into a stack buffer we own.
        let n = unsafe { libc::read(ch.fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            dec.feed(&buf[..n as usize]);
        } else if n == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // 0: the host closed the control port.
            return Err((125, "the channel closed before the run spec arrived".into()));
        }
    }
}

fn run(
    ch: &mut Channel,
    boot_security: Option<rvmm_proto::Security>,
    zygote: Option<workload::Zygote>,
    staged: bool,
    stdio: &workload::Stdio,
) -> Result<i32, Fail> {
    let start = wait_start(ch)?;
    sys::trace("start received");
    // Before anything else: this guest's own randomness and time.
    sys::add_entropy(&start.entropy).map_err(|e| (125, format!("seeding the RNG: {e}")))?;
    sys::set_realtime(start.realtime.0, start.realtime.1)
        .map_err(|e| (125, format!("setting the clock: {e}")))?;
    sys::trace("entropy and clock");
    let mut spec = start.spec;
    if start.boot_security {
        spec.security = boot_security.ok_or((
            125,
            "the initramfs carries no /rvmm/security.json".to_string(),
        ))?;
    }
    sys::wait_for_disk("vda", DISK_TIMEOUT).map_err(|e| (125, e))?;
    sys::trace("disk attached");

    // The image disk under a tmpfs overlay.
    mkdir_p("/image");
    mount("/dev/vda", "/image", "erofs", libc::MS_RDONLY, "")
        .or_else(|_| mount("/dev/vda", "/image", "ext4", libc::MS_RDONLY, "noload"))
        .map_err(|e| (125, format!("mounting the image disk: {}", e.1)))?;
    sys::trace("image mounted");
    mkdir_p("/rw");
    mount("tmpfs", "/rw", "tmpfs", 0, "mode=0755").map_err(|e| (125, e.1))?;
    mkdir_p("/rw/upper");
    mkdir_p("/rw/work");
    mkdir_p("/rw/etc");
    mkdir_p(NEWROOT);
    mount(
        "overlay",
        NEWROOT,
        "overlay",
        0,
        "lowerdir=/image,upperdir=/rw/upper,workdir=/rw/work",
    )
    .map_err(|e| (125, format!("mounting the root overlay: {}", e.1)))?;

    // /etc files.
    let addr = spec
        .network
        .address
        .as_deref()
        .and_then(|a| a.split('/').next())
        .unwrap_or("127.0.1.1");
    let files = [
        ("hostname", format!("{}\n", spec.hostname)),
        (
            "hosts",
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{addr}\t{}\n",
                spec.hostname
            ),
        ),
        (
            "resolv.conf",
            spec.network
                .dns
                .iter()
                .map(|d| format!("nameserver {d}\n"))
                .collect::<String>(),
        ),
    ];
    for (name, body) in &files {
        std::fs::write(format!("/rw/etc/{name}"), body)
            .map_err(|e| (125, format!("writing /etc/{name}: {e}")))?;
    }

    let r = |p: &str| format!("{NEWROOT}{p}");
    let setup = || -> Result<(), Fail> {
        if staged {
            // Prepared before READY: one move each (the /dev tree moves with its submounts).
            for d in ["/proc", "/sys", "/dev"] {
                mkdir_p(&r(d));
                mount(&format!("{STAGE}{d}"), &r(d), "", libc::MS_MOVE, "")?;
            }
        } else {
            system_mounts(NEWROOT)?;
        }
        for (name, _) in &files {
            let t = r(&format!("/etc/{name}"));
            sys::touch(&t);
            mount(&format!("/rw/etc/{name}"), &t, "", libc::MS_BIND, "")?;
        }
        if spec.read_only {
            mount(
                "",
                NEWROOT,
                "",
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                "",
            )?;
        }
        Ok(())
    };
    sys::trace("overlay and /etc");
    setup().map_err(|(_, m)| (125u8, m))?;
    sys::trace("/proc /sys /dev");

    sys::set_hostname(&spec.hostname).map_err(|e| (125, e))?;
    sys::loopback_up();
    if let Some(mac) = start.mac {
        sys::set_mac(mac).map_err(|e| (125, e))?;
    }
    if let (Some(a), Some(gw)) = (&spec.network.address, &spec.network.gateway) {
        sys::configure_eth0(a, gw).map_err(|e| (125, format!("configuring eth0: {e}")))?;
    }

    sys::trace("hostname and network");
    // switch_root: the overlay becomes /.
    // SAFETY: chdir/mount/chroot with NUL-terminated paths.
    unsafe {
        check(libc::chdir(c(NEWROOT).as_ptr()), "chdir to the new root")?;
        check(
            libc::mount(
                c(".").as_ptr(),
                c("/").as_ptr(),
                std::ptr::null(),
                libc::MS_MOVE,
                std::ptr::null(),
            ),
            "moving the new root to /",
        )?;
        check(libc::chroot(c(".").as_ptr()), "chroot")?;
        check(libc::chdir(c("/").as_ptr()), "chdir /")?;
    }

    sys::trace("switched root");
    // The zygote's filter is the boot-time one: only a run with those privileges may use it.
    let zygote = if start.boot_security { zygote } else { None };
    workload::run(&spec, ch, zygote, stdio)
}

mod workload;

//! rvmm-init: PID 1 inside an rvmm microVM. Built static (`-C target-feature=+crt-static`) and
//! delivered in an initramfs with the run's `RunSpec` at /rvmm/spec.json.
//!
//! 1. mounts /dev, /proc, /sys of the initramfs; opens the channel (/dev/ttyS1, raw);
//! 2. mounts the image disk (/dev/vda, erofs or ext4, read-only) under a tmpfs overlay: the
//!    per-run writable layer, so the cached image disk is never written;
//! 3. inside it: /proc, /sys (ro), a minimal /dev, /dev/pts, /dev/shm, /dev/mqueue, /etc/hosts,
//!    /etc/hostname, /etc/resolv.conf; loopback and eth0; hostname; then moves it to / (switch_root);
//! 4. runs the workload as its child with the spec's user, env and cwd, stdout/stderr on pipes
//!    (or a pty with -t), relays them as channel frames, stdin and signals the other way;
//! 5. reaps every orphan; when the workload exits, sends its status and powers off.
//!
//! Failures before the workload starts are reported as a FAILED frame (125, or 126/127 for
//! exec) so the host prints one clear line.

use rvmm_proto::frame;
use rvmm_proto::RunSpec;

mod sys;

use sys::{c, check, mkdir_p, mount};

const CHANNEL: &str = "/dev/ttyS1";
const NEWROOT: &str = "/newroot";

/// Guest uptime when PID 1 started, for the STARTED frame (the kernel's share of a cold start).
pub static INIT_UPTIME_MS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn main() {
    INIT_UPTIME_MS.store(sys::uptime_ms(), std::sync::atomic::Ordering::Relaxed);
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        eprintln!("rvmm-init: must run as PID 1 inside an rvmm microVM");
        std::process::exit(2);
    }
    let chan = match early() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("rvmm-init: {e}");
            sys::power_off();
        }
    };
    let mut ch = Channel { fd: chan };
    let status = match run(&mut ch) {
        Ok(code) => code,
        Err((code, msg)) => {
            let mut p = vec![code];
            p.extend_from_slice(msg.as_bytes());
            ch.send(frame::FAILED, &p);
            code as i32
        }
    };
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

/// /dev, /proc, /sys of the initramfs, and the channel.
fn early() -> Result<libc::c_int, String> {
    mkdir_p("/dev");
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755").map_err(|e| e.1)?;
    mkdir_p("/proc");
    mount("proc", "/proc", "proc", 0, "").map_err(|e| e.1)?;
    mkdir_p("/sys");
    mount("sysfs", "/sys", "sysfs", 0, "").map_err(|e| e.1)?;
    sys::open_raw_tty(CHANNEL)
}

type Fail = (u8, String);

fn run(ch: &mut Channel) -> Result<i32, Fail> {
    let raw = std::fs::read("/rvmm/spec.json")
        .map_err(|e| (125, format!("reading the run spec: {e}")))?;
    let spec: RunSpec =
        serde_json::from_slice(&raw).map_err(|e| (125, format!("parsing the run spec: {e}")))?;

    // The image disk under a tmpfs overlay.
    mkdir_p("/image");
    mount("/dev/vda", "/image", "erofs", libc::MS_RDONLY, "")
        .or_else(|_| mount("/dev/vda", "/image", "ext4", libc::MS_RDONLY, "noload"))
        .map_err(|e| (125, format!("mounting the image disk: {}", e.1)))?;
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
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let setup = || -> Result<(), Fail> {
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
    setup().map_err(|(_, m)| (125u8, m))?;

    sys::set_hostname(&spec.hostname).map_err(|e| (125, e))?;
    sys::loopback_up();
    if let (Some(a), Some(gw)) = (&spec.network.address, &spec.network.gateway) {
        sys::configure_eth0(a, gw).map_err(|e| (125, format!("configuring eth0: {e}")))?;
    }

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

    workload::run(&spec, ch)
}

mod workload;

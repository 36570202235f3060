//! The container's first process, from clone(2) to execve(2) of the workload.
//!
//! It starts in fresh mount, PID, UTS, IPC, network and cgroup namespaces, waits for the parent
//! to finish the host side (cgroup membership, veth), then builds the root filesystem and drops
//! privileges. Everything that can fail reports `CODE\tmessage` on the error pipe (which closes
//! on a successful exec) and exits with CODE: 125 setup, 126 cannot execute, 127 not found.
//!
//! Mounts are made *after* pivot_root, so every target resolves inside the container's root (a
//! symlink in the image cannot point a mount at the host); host-side sources (devices, /etc
//! files, volumes) are opened as O_PATH descriptors before the pivot and mounted from
//! /proc/self/fd.

use std::ffi::{CStr, CString};
use std::os::fd::RawFd;

use caps::CapsHashSet;
use seccompiler::BpfProgram;

/// Everything the child needs, prepared by the parent before cloning.
pub struct Plan {
    pub rootfs: CString,
    pub overlay_opts: CString,
    pub hostname: CString,
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
    pub path_dirs: Vec<Vec<u8>>,
    pub cwd: CString,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
    pub read_only: bool,
    /// (host file, path in the container)
    pub etc_files: Vec<(CString, CString)>,
    /// (host path, container path, read-only)
    pub volumes: Vec<(CString, CString, bool)>,
    pub caps: CapsHashSet,
    pub seccomp: BpfProgram,
    pub tty_slave: Option<RawFd>,
    /// The slave's path on the host's devpts (reopened in our mount namespace for /dev/console).
    pub tty_path: Option<CString>,
    pub attach_stdin: bool,
    /// The host's cgroup filesystems, mounted read-only under /sys/fs/cgroup.
    pub cgroup_mounts: Vec<super::cgroups::ContainerMount>,
    pub sync_fd: RawFd,
    pub err_fd: RawFd,
}

const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];
const MASKED: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const READONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

struct Fail(u8, String);

const OLD_ROOT_REL: &str = ".rvmm-old";
const OLD_ROOT: &str = "/.rvmm-old";

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

fn check(r: libc::c_int, what: impl FnOnce() -> String) -> Result<(), Fail> {
    if r < 0 {
        return Err(Fail(125, format!("{}: {}", what(), errno())));
    }
    Ok(())
}

fn mount(
    src: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> Result<(), Fail> {
    // SAFETY: all pointers are NUL-terminated strings or null, valid for the call.
    let r = unsafe {
        libc::mount(
            src.map_or(std::ptr::null(), |s| s.as_ptr()),
            target.as_ptr(),
            fstype.map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    };
    check(r, || format!("mounting {}", target.to_string_lossy()))
}

/// mkdir -p (mode 0755), inside the current root.
fn mkdir_p(path: &[u8]) {
    let mut cur = Vec::with_capacity(path.len() + 1);
    for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
        cur.push(b'/');
        cur.extend_from_slice(comp);
        if let Ok(p) = CString::new(cur.clone()) {
            // SAFETY: p is NUL-terminated.
            unsafe { libc::mkdir(p.as_ptr(), 0o755) };
        }
    }
}

/// Creates an empty file to bind a file onto (parents included).
fn touch(path: &CStr) {
    let b = path.to_bytes();
    if let Some(i) = b.iter().rposition(|&x| x == b'/') {
        mkdir_p(&b[..i]);
    }
    // SAFETY: path is NUL-terminated; the fd is closed right away.
    unsafe {
        let fd = libc::open(
            path.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            0o644,
        );
        if fd >= 0 {
            libc::close(fd);
        }
    }
}

fn open_path(p: &CStr) -> Result<RawFd, Fail> {
    // SAFETY: p is NUL-terminated.
    let fd = unsafe { libc::open(p.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    check(fd, || format!("opening {}", p.to_string_lossy()))?;
    Ok(fd)
}

fn fd_path(fd: RawFd) -> CString {
    c(&format!("/proc/self/fd/{fd}"))
}

fn is_dir_fd(fd: RawFd) -> bool {
    // SAFETY: st is plain data filled by fstat.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFDIR
    }
}

fn bind(fd: RawFd, target: &CStr, ro: bool) -> Result<(), Fail> {
    mount(
        Some(&fd_path(fd)),
        target,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )?;
    if ro {
        mount(
            None,
            target,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
            None,
        )?;
    }
    Ok(())
}

/// Runs in the cloned child. Never returns on success (the workload replaces it).
pub fn main(plan: &Plan) -> isize {
    let Err(Fail(code, msg)) = setup_and_exec(plan);
    let line = format!("{code}\t{msg}");
    // SAFETY: writing a buffer we own to our error pipe, then exiting without running destructors.
    unsafe {
        libc::write(plan.err_fd, line.as_ptr().cast(), line.len());
        libc::_exit(code as i32)
    }
}

enum Never {}

/// /sys/fs/cgroup as the host lays it out (a tmpfs of v1 hierarchies plus the unified one, or a
/// single cgroup2), read-only, each rooted at the run's cgroup (so limits are where programs such
/// as the JVM look for them).
fn mount_cgroups(mounts: &[super::cgroups::ContainerMount]) -> Result<(), Fail> {
    if mounts.is_empty() {
        return Ok(());
    }
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let root = c("/sys/fs/cgroup");
    let single = mounts.len() == 1 && mounts[0].target == "/sys/fs/cgroup";
    if !single {
        mount(
            Some(&c("tmpfs")),
            &root,
            Some(&c("tmpfs")),
            flags,
            Some(&c("mode=755,size=64k")),
        )?;
    }
    for m in mounts {
        let target = c(&m.target);
        mkdir_p(m.target.as_bytes());
        let data = (!m.data.is_empty()).then(|| c(&m.data));
        mount(
            Some(&c(&m.fstype)),
            &target,
            Some(&c(&m.fstype)),
            flags | libc::MS_RDONLY,
            data.as_deref(),
        )?;
    }
    if !single {
        mount(
            None,
            &root,
            None,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | flags,
            None,
        )?;
    }
    Ok(())
}

fn setup_and_exec(p: &Plan) -> Result<Never, Fail> {
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let mut b = [0u8; 1];
    // SAFETY: reading one byte into a local buffer.
    if unsafe { libc::read(p.sync_fd, b.as_mut_ptr().cast(), 1) } != 1 {
        return Err(Fail(
            125,
            "rvmm went away before the container started".into(),
        ));
    }
    // SAFETY: closing our copy of the sync pipe.
    unsafe { libc::close(p.sync_fd) };
    // Our own cgroup namespace, now that the parent has put us in the run's cgroup: the workload
    // sees that cgroup as "/".
    // SAFETY: unshare with a flag constant.
    check(unsafe { libc::unshare(libc::CLONE_NEWCGROUP) }, || {
        "creating the cgroup namespace".into()
    })?;

    // SAFETY: hostname is NUL-terminated; length excludes the NUL.
    let r = unsafe { libc::sethostname(p.hostname.as_ptr(), p.hostname.as_bytes().len()) };
    check(r, || "sethostname".into())?;
    mount(None, &c("/"), None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    mount(
        Some(&c("overlay")),
        &p.rootfs,
        Some(&c("overlay")),
        0,
        Some(&p.overlay_opts),
    )
    .map_err(|Fail(_, m)| Fail(125, format!("{m} (overlayfs of the image layers)")))?;

    // Host-side sources, before the host disappears.
    let dev_fds: Vec<(RawFd, &str)> = DEVICES
        .iter()
        .map(|d| open_path(&c(&format!("/dev/{d}"))).map(|fd| (fd, *d)))
        .collect::<Result<_, _>>()?;
    let etc_fds: Vec<(RawFd, &CStr)> = p
        .etc_files
        .iter()
        .map(|(src, dst)| open_path(src).map(|fd| (fd, dst.as_c_str())))
        .collect::<Result<_, _>>()?;
    let console_fd = p.tty_path.as_deref().map(open_path).transpose()?;
    let vol_fds: Vec<(RawFd, &CStr, bool)> = p
        .volumes
        .iter()
        .map(|(src, dst, ro)| open_path(src).map(|fd| (fd, dst.as_c_str(), *ro)))
        .collect::<Result<_, _>>()?;

    // The old root stays attached under /.rvmm-old until the binds from it are made (a bind
    // source must be in our mount namespace), then goes.
    // SAFETY: chdir/mkdir/pivot_root with NUL-terminated paths.
    unsafe {
        check(libc::chdir(p.rootfs.as_ptr()), || {
            "chdir to the rootfs".into()
        })?;
        libc::mkdir(c(OLD_ROOT_REL).as_ptr(), 0o700);
        check(
            libc::syscall(
                libc::SYS_pivot_root,
                c(".").as_ptr(),
                c(OLD_ROOT_REL).as_ptr(),
            ) as libc::c_int,
            || "pivot_root".into(),
        )?;
        check(libc::chdir(c("/").as_ptr()), || "chdir /".into())?;
    }

    // /proc and /sys.
    mkdir_p(b"/proc");
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(Some(&c("proc")), &c("/proc"), Some(&c("proc")), nodev, None)?;
    mkdir_p(b"/sys");
    mount(
        Some(&c("sysfs")),
        &c("/sys"),
        Some(&c("sysfs")),
        nodev | libc::MS_RDONLY,
        None,
    )?;
    mount_cgroups(&p.cgroup_mounts)?;

    // A minimal /dev.
    mkdir_p(b"/dev");
    mount(
        Some(&c("tmpfs")),
        &c("/dev"),
        Some(&c("tmpfs")),
        libc::MS_NOSUID | libc::MS_STRICTATIME,
        Some(&c("mode=755,size=65536k")),
    )?;
    for (fd, name) in &dev_fds {
        let t = c(&format!("/dev/{name}"));
        touch(&t);
        bind(*fd, &t, false)?;
    }
    mkdir_p(b"/dev/pts");
    mount(
        Some(&c("devpts")),
        &c("/dev/pts"),
        Some(&c("devpts")),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some(&c("newinstance,ptmxmode=0666,mode=0620,gid=5")),
    )?;
    mkdir_p(b"/dev/shm");
    mount(
        Some(&c("shm")),
        &c("/dev/shm"),
        Some(&c("tmpfs")),
        nodev,
        Some(&c("mode=1777,size=65536k")),
    )?;
    mkdir_p(b"/dev/mqueue");
    mount(
        Some(&c("mqueue")),
        &c("/dev/mqueue"),
        Some(&c("mqueue")),
        nodev,
        None,
    )?;
    for (target, link) in [
        ("pts/ptmx", "/dev/ptmx"),
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
        ("/proc/kcore", "/dev/core"),
    ] {
        // SAFETY: NUL-terminated strings.
        unsafe { libc::symlink(c(target).as_ptr(), c(link).as_ptr()) };
    }
    if let Some(fd) = console_fd {
        let t = c("/dev/console");
        touch(&t);
        bind(fd, &t, false)?;
        // SAFETY: closing the O_PATH descriptor we opened.
        unsafe { libc::close(fd) };
    }

    // /etc/hosts, /etc/hostname, /etc/resolv.conf.
    for (fd, dst) in &etc_fds {
        touch(dst);
        bind(*fd, dst, false)?;
    }
    // Volumes.
    for (fd, dst, ro) in &vol_fds {
        if is_dir_fd(*fd) {
            mkdir_p(dst.to_bytes());
        } else {
            touch(dst);
        }
        bind(*fd, dst, *ro)?;
    }

    // SAFETY: detaching and removing the old root's mount point.
    unsafe {
        let old = c(OLD_ROOT);
        check(libc::umount2(old.as_ptr(), libc::MNT_DETACH), || {
            "detaching the old root".into()
        })?;
        libc::rmdir(old.as_ptr());
    }

    // Masked and read-only paths, as runc does.
    for m in MASKED {
        let t = c(m);
        // SAFETY: st is plain data filled by lstat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: t is NUL-terminated, st is valid.
        if unsafe { libc::lstat(t.as_ptr(), &mut st) } != 0 {
            continue;
        }
        if (st.st_mode & libc::S_IFMT) == libc::S_IFDIR {
            mount(
                Some(&c("tmpfs")),
                &t,
                Some(&c("tmpfs")),
                libc::MS_RDONLY,
                None,
            )?;
        } else {
            mount(Some(&c("/dev/null")), &t, None, libc::MS_BIND, None)?;
        }
    }
    for r in READONLY {
        let t = c(r);
        // SAFETY: t is NUL-terminated.
        if unsafe { libc::access(t.as_ptr(), libc::F_OK) } != 0 {
            continue;
        }
        mount(Some(&t), &t, None, libc::MS_BIND | libc::MS_REC, None)?;
        mount(
            None,
            &t,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
            None,
        )?;
    }
    if p.read_only {
        mount(
            None,
            &c("/"),
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            None,
        )?;
    }
    for fd in dev_fds
        .iter()
        .map(|x| x.0)
        .chain(etc_fds.iter().map(|x| x.0))
        .chain(vol_fds.iter().map(|x| x.0))
    {
        // SAFETY: closing descriptors we opened.
        unsafe { libc::close(fd) };
    }

    loopback_up();
    // rlimits: the soft open-files limit up to the hard one (raising the hard limit needs
    // CAP_SYS_RESOURCE, which hosts like this one lack).
    // SAFETY: plain data in and out.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 {
            rl.rlim_cur = rl.rlim_max.min(1 << 20);
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }

    // stdio.
    // SAFETY: fd juggling on descriptors we own.
    unsafe {
        if let Some(slave) = p.tty_slave {
            libc::setsid();
            libc::ioctl(slave, libc::TIOCSCTTY, 0);
            if p.attach_stdin {
                libc::dup2(slave, 0);
            } else {
                null_stdin();
            }
            libc::dup2(slave, 1);
            libc::dup2(slave, 2);
            if slave > 2 {
                libc::close(slave);
            }
        } else if !p.attach_stdin {
            null_stdin();
        }
    }

    // Working directory (created when missing, as Docker does).
    mkdir_p(p.cwd.as_bytes());

    // Identity and privileges.
    crate::container::security::drop_bounding(&p.caps)
        .map_err(|e| Fail(125, format!("dropping capabilities: {e}")))?;
    // SAFETY: plain syscalls with valid pointers.
    unsafe {
        check(libc::setgroups(p.groups.len(), p.groups.as_ptr()), || {
            "setgroups".into()
        })?;
        check(libc::setresgid(p.gid, p.gid, p.gid), || {
            format!("setgid {}", p.gid)
        })?;
        check(libc::setresuid(p.uid, p.uid, p.uid), || {
            format!("setuid {}", p.uid)
        })?;
    }
    if p.uid == 0 {
        crate::container::security::set_caps(&p.caps)
            .map_err(|e| Fail(125, format!("setting capabilities: {e}")))?;
    } else {
        let _ = caps::clear(None, caps::CapSet::Inheritable);
    }
    // SAFETY: chdir with a NUL-terminated path; umask cannot fail.
    unsafe {
        check(libc::chdir(p.cwd.as_ptr()), || {
            format!("cannot enter working directory {}", p.cwd.to_string_lossy())
        })?;
        libc::umask(0o022);
    }

    let prog = resolve(p)?;
    crate::container::security::apply_seccomp(&p.seccomp)
        .map_err(|e| Fail(125, format!("installing the seccomp profile: {e}")))?;

    let mut argv: Vec<*const libc::c_char> = p.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = p.env.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    // SAFETY: argv and envp are NULL-terminated arrays of NUL-terminated strings that outlive the call.
    unsafe { libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    let e = errno();
    let code = if e.raw_os_error() == Some(libc::ENOENT) {
        127
    } else {
        126
    };
    Err(Fail(code, format!("{}: {e}", p.argv[0].to_string_lossy())))
}

/// Docker's PATH lookup: argv[0] with a '/' is used as is; otherwise the first executable file
/// in PATH. Not found anywhere → 127; found but not executable → 126.
fn resolve(p: &Plan) -> Result<CString, Fail> {
    let a0 = p.argv[0].as_bytes();
    if a0.contains(&b'/') {
        return Ok(p.argv[0].clone());
    }
    let mut denied = None;
    for d in &p.path_dirs {
        let mut cand = d.clone();
        if !cand.ends_with(b"/") {
            cand.push(b'/');
        }
        cand.extend_from_slice(a0);
        let Ok(cp) = CString::new(cand) else { continue };
        // SAFETY: st is plain data; cp is NUL-terminated.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::stat(cp.as_ptr(), &mut st) } != 0
            || (st.st_mode & libc::S_IFMT) == libc::S_IFDIR
        {
            continue;
        }
        // SAFETY: cp is NUL-terminated.
        if unsafe { libc::access(cp.as_ptr(), libc::X_OK) } == 0 {
            return Ok(cp);
        }
        denied.get_or_insert(cp);
    }
    match denied {
        Some(cp) => Err(Fail(
            126,
            format!("{}: permission denied", cp.to_string_lossy()),
        )),
        None => Err(Fail(
            127,
            format!(
                "{}: executable file not found in $PATH",
                p.argv[0].to_string_lossy()
            ),
        )),
    }
}

/// # Safety
/// Only replaces fd 0.
unsafe fn null_stdin() {
    // SAFETY: opening /dev/null (inside the new root) and moving it to fd 0.
    unsafe {
        let fd = libc::open(c("/dev/null").as_ptr(), libc::O_RDONLY);
        if fd >= 0 {
            libc::dup2(fd, 0);
            libc::close(fd);
        }
    }
}

/// `ip link set lo up` without ip.
fn loopback_up() {
    // SAFETY: an ifreq filled with the interface name, used with the flag ioctls on a socket we close.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return;
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr) == 0 {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr);
        }
        libc::close(s);
    }
}

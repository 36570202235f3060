//! What a workload needs inside its root before exec, written once for both isolations: the
//! container child (`rvmm`'s `container::child`, after pivot_root) and rvmm-init in the guest
//! (after switch_root) call the same functions, so the workload sees the same /proc, /sys, /dev,
//! masked paths, identity, privileges and PATH lookup wherever it runs.
//!
//! The data (which devices, which masked paths, the /etc file contents) is in
//! [`rvmm_proto::rootfs`]; this crate applies it with plain system calls. It runs in a freshly
//! cloned child and in a static PID 1, so it keeps to libc and never panics on input.

pub mod fs;
pub mod mounts;
pub mod privileges;

use std::ffi::CString;
use std::fmt;

pub use fs::{bind, c, mkdir_p, mount, mount_point, touch};
use rvmm_proto::rootfs;

/// Why the workload could not be started, with Docker's status for it: 125 (the runtime failed),
/// 126 (the program cannot be executed) or 127 (the program was not found).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: u8,
    pub message: String,
}

impl Failure {
    /// A runtime failure (status 125).
    pub fn setup(message: impl Into<String>) -> Failure {
        Failure {
            status: 125,
            message: message.into(),
        }
    }

    /// `what: the last OS error`, status 125.
    pub fn os(what: impl fmt::Display) -> Failure {
        Failure::setup(format!("{what}: {}", std::io::Error::last_os_error()))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// `r < 0` becomes a setup failure naming `what` and the OS error.
pub fn check(r: libc::c_int, what: impl FnOnce() -> String) -> Result<(), Failure> {
    if r < 0 {
        return Err(Failure::os(what()));
    }
    Ok(())
}

/// /proc, /sys (read-only), a minimal /dev (device nodes, pts, shm, mqueue, the usual links), and
/// the masked and read-only paths, under `base` ("" for the current root). The container child
/// calls it in its new root; rvmm-init calls it on a staging directory before READY and moves the
/// three trees into the workload's root at the run (the masks move with them).
pub fn system_mounts(base: &str) -> Result<(), Failure> {
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
        libc::MS_NOSUID | libc::MS_STRICTATIME,
        "mode=755,size=65536k",
    )?;
    default_devices(base)?;
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
    dev_links(base);
    mask_paths(base)
}

/// The devices every container has (null, zero, full, random, urandom, tty) in `base`/dev.
pub fn default_devices(base: &str) -> Result<(), Failure> {
    for d in rootfs::DEVICES {
        fs::mknod(
            &format!("{base}/dev/{}", d.name),
            libc::S_IFCHR | d.mode,
            d.major,
            d.minor,
        )?;
    }
    Ok(())
}

/// The symlinks of a container's /dev (ptmx, fd, stdin, stdout, stderr, core) in `base`/dev,
/// where nothing is there yet.
pub fn dev_links(base: &str) {
    for (target, link) in rootfs::DEV_LINKS {
        // SAFETY: NUL-terminated strings.
        unsafe { libc::symlink(c(target).as_ptr(), c(&format!("{base}{link}")).as_ptr()) };
    }
}

/// Docker's masked paths (an empty read-only tmpfs over a directory, /dev/null over a file) and
/// read-only paths (a read-only bind of themselves), where they exist under `base`.
fn mask_paths(base: &str) -> Result<(), Failure> {
    mask(base, rootfs::MASKED, rootfs::READONLY)
}

/// `masked` paths (an empty read-only tmpfs over a directory, /dev/null over a file) and
/// `readonly` paths (a read-only bind of themselves), where they exist under `base`.
pub fn mask<S: AsRef<str>>(base: &str, masked: &[S], readonly: &[S]) -> Result<(), Failure> {
    let null = format!("{base}/dev/null");
    for m in masked.iter().map(AsRef::as_ref) {
        let t = format!("{base}{m}");
        let Some(dir) = fs::is_dir_nofollow(&t) else {
            continue;
        };
        if dir {
            mount("tmpfs", &t, "tmpfs", libc::MS_RDONLY, "")?;
        } else {
            mount(&null, &t, "", libc::MS_BIND, "")?;
        }
    }
    for p in readonly.iter().map(AsRef::as_ref) {
        let t = format!("{base}{p}");
        if fs::is_dir_nofollow(&t).is_none() {
            continue;
        }
        mount(&t, &t, "", libc::MS_BIND | libc::MS_REC, "")?;
        mount(
            "",
            &t,
            "",
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
            "",
        )?;
    }
    Ok(())
}

/// `--shm-size`: /dev/shm under `base` remounted with `bytes` (after [`system_mounts`]).
pub fn shm_size(base: &str, bytes: u64) -> Result<(), Failure> {
    mount(
        "shm",
        &format!("{base}/dev/shm"),
        "tmpfs",
        libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        &format!("mode=1777,size={bytes}"),
    )
}

/// `--sysctl`: writes each value under `proc`/sys (the /proc of the kernel and namespaces the
/// workload will run in). Keys were checked on the host (no `/`, no `..`).
pub fn sysctls(proc: &str, list: &[(String, String)]) -> Result<(), Failure> {
    for (k, v) in list {
        if k.contains('/') || k.split('.').any(|c| c.is_empty() || c == "..") {
            return Err(Failure::setup(format!("invalid sysctl {k:?}")));
        }
        let path = format!("{proc}/sys/{}", k.replace('.', "/"));
        std::fs::write(&path, v.as_bytes())
            .map_err(|e| Failure::setup(format!("setting sysctl {k}: {e}")))?;
    }
    Ok(())
}

/// `--privileged`, after [`system_mounts`] under `base`: the masked and read-only paths are
/// uncovered, /sys is remounted writable, and every device node under `dev_src` (the kernel's
/// /dev: the host's in a container, the guest's devtmpfs in a VM) is recreated in `base`/dev,
/// with its mode and owner, where nothing of that name is yet.
pub fn unconfine(base: &str, dev_src: &str) -> Result<(), Failure> {
    for p in rootfs::MASKED.iter().chain(rootfs::READONLY) {
        let t = c(&format!("{base}{p}"));
        // Not every path is a mount point (a path the kernel lacks was skipped): EINVAL, ENOENT.
        // SAFETY: NUL-terminated path.
        unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
    }
    mount(
        "",
        &format!("{base}/sys"),
        "",
        libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )?;
    copy_devices(dev_src, &format!("{base}/dev"), 0);
    Ok(())
}

/// Recreates the character and block devices under `src` in `dst` (subdirectories too, but not
/// the per-workload ones: pts, shm, mqueue), except the console. Best effort: a node that cannot be made is left out.
fn copy_devices(src: &str, dst: &str, depth: u32) {
    let Ok(rd) = std::fs::read_dir(src) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let (from, to) = (format!("{src}/{name}"), format!("{dst}/{name}"));
        // SAFETY: st is plain data filled by lstat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: NUL-terminated path, valid stat buffer.
        if unsafe { libc::lstat(c(&from).as_ptr(), &mut st) } != 0 {
            continue;
        }
        let kind = st.st_mode & libc::S_IFMT;
        if kind == libc::S_IFDIR {
            if depth < 4 && !matches!(name.as_str(), "pts" | "shm" | "mqueue") {
                mkdir_p(&to);
                copy_devices(&from, &to, depth + 1);
            }
            continue;
        }
        // The console is the workload's terminal (or nothing), as without --privileged.
        if (kind != libc::S_IFCHR && kind != libc::S_IFBLK)
            || name == "console"
            || fs::is_dir_nofollow(&to).is_some()
        {
            continue;
        }
        let (major, minor) = (libc::major(st.st_rdev), libc::minor(st.st_rdev));
        if fs::mknod(&to, st.st_mode, major, minor).is_ok() {
            // SAFETY: NUL-terminated path.
            unsafe { libc::lchown(c(&to).as_ptr(), st.st_uid, st.st_gid) };
        }
    }
}

/// With `-t`: the workload's terminal also as /dev/console (as runc does). `tty` is a path that
/// opens the pty's slave in this mount namespace.
pub fn bind_console(base: &str, tty: &str) -> Result<(), Failure> {
    let t = format!("{base}/dev/console");
    touch(&t);
    bind(tty, &t, false)
}

/// `ip link set lo up`, without ip.
pub fn loopback_up() {
    // SAFETY: an ifreq filled with the interface name, used with the flag ioctls on a socket we
    // close.
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

/// `path` is there, not a directory, and executable by this process (what PATH lookup takes).
pub fn executable(path: &str) -> bool {
    let cp = c(path);
    // SAFETY: NUL-terminated path.
    std::fs::metadata(path).is_ok_and(|m| !m.is_dir())
        && unsafe { libc::access(cp.as_ptr(), libc::X_OK) } == 0
}

/// Docker's PATH lookup: argv[0] with a '/' is used as is; otherwise the first executable
/// regular file in the workload's PATH (or the default PATH). Not found anywhere → 127; found but
/// not executable → 126.
pub fn resolve(argv0: &str, env: &[String]) -> Result<CString, Failure> {
    if argv0.contains('/') {
        return Ok(c(argv0));
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(rootfs::DEFAULT_PATH);
    let mut denied = None;
    for d in path.split(':').filter(|d| !d.is_empty()) {
        let cand = format!("{}/{argv0}", d.trim_end_matches('/'));
        match std::fs::metadata(&cand) {
            Ok(m) if !m.is_dir() => {}
            _ => continue,
        }
        if executable(&cand) {
            return Ok(c(&cand));
        }
        denied.get_or_insert(cand);
    }
    Err(match denied {
        Some(p) => Failure {
            status: 126,
            message: format!("{p}: permission denied"),
        },
        None => Failure {
            status: 127,
            message: format!("{argv0}: executable file not found in $PATH"),
        },
    })
}

/// Replaces this process with `prog`; returns only on failure (126, or 127 for ENOENT).
pub fn exec(prog: &CString, argv: &[String], env: &[String]) -> Failure {
    default_signals();
    let argv_c: Vec<CString> = argv.iter().map(|a| c(a)).collect();
    let env_c: Vec<CString> = env.iter().map(|a| c(a)).collect();
    let mut a: Vec<*const libc::c_char> = argv_c.iter().map(|x| x.as_ptr()).collect();
    a.push(std::ptr::null());
    let mut e: Vec<*const libc::c_char> = env_c.iter().map(|x| x.as_ptr()).collect();
    e.push(std::ptr::null());
    // SAFETY: NULL-terminated arrays of NUL-terminated strings that outlive the call.
    unsafe { libc::execve(prog.as_ptr(), a.as_ptr(), e.as_ptr()) };
    let er = std::io::Error::last_os_error();
    Failure {
        status: if er.raw_os_error() == Some(libc::ENOENT) {
            127
        } else {
            126
        },
        message: format!(
            "{}: {er}",
            argv.first().map(String::as_str).unwrap_or_default()
        ),
    }
}

/// Every signal the runtime ignores (rvmm ignores SIGPIPE; a shell starts background jobs with
/// SIGINT and SIGQUIT ignored; glibc's spawn leaves its own 32 and 33 ignored) back to its
/// default action, as a container or VM workload starts under Docker: an exec keeps ignored
/// signals ignored, and a workload that inherited SIGPIPE ignored gets EPIPE errors where it
/// expects to be stopped. Handlers need nothing: an exec resets them. The raw syscall, because
/// glibc refuses to touch the signals it reserves.
fn default_signals() {
    /// The kernel's `struct sigaction` on x86-64: handler, flags, restorer, mask.
    #[repr(C)]
    #[derive(Default)]
    struct KernelSigaction([u64; 4]);
    const SIG_IGN: u64 = 1;
    for sig in 1..=64 {
        let mut old = KernelSigaction::default();
        let dfl = KernelSigaction::default();
        // SAFETY: rt_sigaction reads and writes kernel sigaction structs we own (8-byte masks),
        // in the process about to exec; SIGKILL and SIGSTOP are refused by the kernel, harmlessly.
        unsafe {
            if libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                std::ptr::null::<u8>(),
                &mut old,
                8,
            ) == 0
                && old.0[0] == SIG_IGN
            {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &dfl,
                    std::ptr::null_mut::<u8>(),
                    8,
                );
            }
        }
    }
}

/// `--init`: forks the workload (which execs `prog`) and stays as its PID 1: forwards every
/// catchable signal to it, reaps every child, and exits with the workload's status (128+n for a
/// signal) once it ends. Returns only when the workload could not be exec'd (its failure).
/// `started` runs in this process once the exec succeeded (to close the runtime's error pipe).
/// `terminal` (`-t`: this process leads the session of the terminal on its stdio): the workload
/// gets its own process group and becomes the terminal's foreground group, as tini and
/// docker-init do, so that Ctrl-C, Ctrl-Z and job control reach it (and not the init); the init
/// ignores SIGTTOU and SIGTTIN.
pub fn exec_with_init(
    prog: &CString,
    argv: &[String],
    env: &[String],
    terminal: bool,
    started: impl FnOnce(),
) -> Failure {
    let mut p = [0; 2];
    // SAFETY: p is a valid array of two ints.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Failure::os("init: pipe");
    }
    // Signals are taken synchronously (sigtimedwait) in the init; the workload gets the
    // default mask back before exec.
    // SAFETY: a sigset filled by the libc helpers.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; blocking every signal in this single-threaded process.
    unsafe {
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: fork in a single-threaded process.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Failure::os("init: fork");
    }
    if pid == 0 {
        if terminal {
            // SAFETY: plain syscalls on our own process and stdio. Every signal is still blocked,
            // so tcsetpgrp from what is now a background group does not stop us with SIGTTOU.
            unsafe {
                libc::setpgid(0, 0);
                for fd in 0..3 {
                    if libc::tcsetpgrp(fd, libc::getpid()) == 0 {
                        break;
                    }
                }
            }
        }
        // SAFETY: restoring the mask and closing our read end in the child.
        unsafe {
            libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            libc::close(p[0]);
        }
        let f = exec(prog, argv, env);
        let mut b = vec![f.status];
        b.extend_from_slice(f.message.as_bytes());
        write_all(p[1], &b);
        // SAFETY: leaving the child without running destructors.
        unsafe { libc::_exit(i32::from(f.status)) }
    }
    // SAFETY: closing the child's write end.
    unsafe { libc::close(p[1]) };
    if terminal {
        // SAFETY: plain syscalls on our own child and signal dispositions. setpgid as well as the
        // child (whichever runs first; EACCES once it has exec'd). The init is now in a background
        // group of the terminal: SIGTTOU and SIGTTIN are ignored (and not forwarded), as in tini.
        unsafe {
            libc::setpgid(pid, pid);
            let mut ttys: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut ttys);
            for sig in [libc::SIGTTOU, libc::SIGTTIN] {
                libc::signal(sig, libc::SIG_IGN);
                libc::sigaddset(&mut ttys, sig);
                libc::sigdelset(&mut all, sig);
            }
            libc::sigprocmask(libc::SIG_UNBLOCK, &ttys, std::ptr::null_mut());
        }
    }
    let mut msg = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        // SAFETY: reading into a local buffer.
        let n = unsafe { libc::read(p[0], buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            msg.extend_from_slice(&buf[..n as usize]);
        } else if n == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
    // SAFETY: closing our read end.
    unsafe { libc::close(p[0]) };
    if let Some((&status, text)) = msg.split_first() {
        // SAFETY: reaping the failed child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        return Failure {
            status,
            message: String::from_utf8_lossy(text).into_owned(),
        };
    }
    started();
    loop {
        // SAFETY: waiting for any blocked signal with a valid set; info is plain data.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let sig = unsafe { libc::sigwaitinfo(&all, &mut info) };
        if sig < 0 {
            continue;
        }
        if sig != libc::SIGCHLD {
            // SAFETY: forwarding to our own child.
            unsafe { libc::kill(pid, sig) };
            continue;
        }
        loop {
            let mut st = 0;
            // SAFETY: reaping any child without blocking.
            let r = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
            if r <= 0 {
                break;
            }
            if r == pid {
                let code = if libc::WIFEXITED(st) {
                    libc::WEXITSTATUS(st)
                } else {
                    128 + libc::WTERMSIG(st)
                };
                // SAFETY: leaving PID 1 (the namespace's other processes are killed with it).
                unsafe { libc::_exit(code) }
            }
        }
    }
}

/// `--cpuset-cpus`: the calling process may run only on `cpus` (nothing for an empty list).
pub fn set_affinity(cpus: &[u32]) -> Result<(), Failure> {
    if cpus.is_empty() {
        return Ok(());
    }
    // SAFETY: cpu_set_t is plain data; CPU_SET indexes within it (checked below).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c as usize >= libc::CPU_SETSIZE as usize {
            return Err(Failure::setup(format!("--cpuset-cpus: no CPU {c}")));
        }
        // SAFETY: c is below CPU_SETSIZE, the set's size.
        unsafe { libc::CPU_SET(c as usize, &mut set) };
    }
    // SAFETY: a filled set of the size passed.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    check(r, || "--cpuset-cpus: setting the CPU affinity".into())
}

/// `--device`: the nodes in `base`/dev (parents made), with their mode and owner.
pub fn make_devices(base: &str, devices: &[rvmm_proto::DeviceNode]) -> Result<(), Failure> {
    for d in devices {
        let t = format!("{base}{}", d.path);
        if let Some(i) = t.rfind('/') {
            mkdir_p(&t[..i]);
        }
        let kind = if d.kind == 'b' {
            libc::S_IFBLK
        } else {
            libc::S_IFCHR
        };
        // SAFETY: NUL-terminated path; a node already there is replaced.
        unsafe { libc::unlink(c(&t).as_ptr()) };
        fs::mknod(&t, kind | (d.mode & 0o777), d.major, d.minor)?;
        // SAFETY: NUL-terminated path.
        unsafe { libc::lchown(c(&t).as_ptr(), d.uid, d.gid) };
    }
    Ok(())
}

/// Writes `buf` to `fd` whole (retrying on EINTR and short writes); gives up on other errors.
pub fn write_all(fd: libc::c_int, mut buf: &[u8]) {
    while !buf.is_empty() {
        // SAFETY: writing from a valid slice.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return;
        }
        buf = &buf[n as usize..];
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn path_lookup_follows_docker() {
        let d = std::env::temp_dir().join(format!("rvmm-workload-{}", std::process::id()));
        let (a, b) = (d.join("a"), d.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("prog"), b"").unwrap();
        std::fs::set_permissions(a.join("prog"), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(b.join("prog"), b"").unwrap();
        std::fs::set_permissions(b.join("prog"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(a.join("dir")).unwrap();
        let env = vec![format!("PATH={}:{}", a.display(), b.display())];
        // The first executable one wins over a non-executable one earlier in PATH.
        let p = resolve("prog", &env).unwrap();
        assert_eq!(p.to_str().unwrap(), b.join("prog").to_str().unwrap());
        // Only a non-executable one: 126 (root passes access(X_OK) only with an x bit).
        let env_a = vec![format!("PATH={}", a.display())];
        assert_eq!(resolve("prog", &env_a).unwrap_err().status, 126);
        // Directories do not count; nothing found: 127.
        assert_eq!(resolve("dir", &env_a).unwrap_err().status, 127);
        assert_eq!(resolve("nope", &env).unwrap_err().status, 127);
        // A name with a slash is taken as is.
        assert_eq!(resolve("./x", &env).unwrap().to_str().unwrap(), "./x");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn exec_failures_map_to_docker_statuses() {
        let f = exec(&c("/nonexistent/prog"), &["prog".into()], &[]);
        assert_eq!(f.status, 127);
        let f = exec(&c("/"), &["slash".into()], &[]);
        assert_eq!(f.status, 126);
        assert!(f.message.starts_with("slash: "));
    }
}

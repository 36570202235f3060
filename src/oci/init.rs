//! The container's init process of `rvmm-oci create`: from clone(2) to waiting for `start`, then
//! to execve(2) of `process.args`.
//!
//! It joins the namespaces config.json names by path (the engine's network namespace), its
//! cgroup, builds the root from the bundle's rootfs and config.json's mounts, then waits: it
//! closes the error pipe (so `create` knows it is ready) and opens exec.fifo for writing, which
//! blocks until `start` opens it for reading. Before that, every failure goes to the error pipe as
//! `CODE\tmessage`; after it, to the workload's stderr, with CODE as the exit status.
//!
//! Mount targets resolve inside the new root: binds are taken as detached trees (open_tree)
//! before pivot_root, every mount is made after it, with `mount_point` (symlinks followed inside
//! the root, as runc's securejoin).

use std::ffi::CString;
use std::os::fd::RawFd;

use rvmm_proto::RunSpec;
use rvmm_workload::{c, check, mount, mount_point, Failure};

use super::config::{Config, Hook, Mount};

/// Everything the init needs, decided by `create` before the clone.
pub struct Plan {
    pub config: Config,
    pub rootfs: CString,
    /// The workload (argv, env, cwd, user, limits, privileges) as rvmm-workload takes it.
    pub spec: RunSpec,
    /// config.json's namespaces to join: (CLONE_NEW* flag, path).
    pub join: Vec<(libc::c_int, CString)>,
    /// A new cgroup namespace (made once the init is in its cgroup).
    pub new_cgroupns: bool,
    /// A new network namespace (its loopback is brought up).
    pub new_net: bool,
    /// Descriptors 3 .. 3+N are the workload's (`--preserve-fds`).
    pub preserve_fds: u32,
    pub cgroup: crate::cgroups::Cgroup,
    /// The host's cgroup mounts, for a `cgroup` mount in config.json.
    pub cgroup_mounts: Vec<crate::cgroups::ContainerMount>,
    /// Reads the state document `create` sends once its createRuntime hooks ran (EOF: go on).
    pub sync_fd: RawFd,
    pub err_fd: RawFd,
    /// `create`'s ends of those pipes and its lock: the child's copies are closed first, or
    /// neither pipe would ever read EOF and the lock would be held for as long as the init lives.
    pub parent_fds: Vec<RawFd>,
    /// exec.fifo, opened O_PATH before the clone.
    pub fifo_fd: RawFd,
    /// `--console-socket`, connected.
    pub console_fd: Option<RawFd>,
}

/// Runs in the cloned child: never returns.
pub fn main(plan: &Plan) -> isize {
    let f = match prepare(plan) {
        Ok(()) => {
            let Err(f) = wait_and_exec(plan);
            // After the error pipe closed: the workload's stderr is where it goes.
            let line = format!("rvmm-oci: {}\n", f.message);
            rvmm_workload::write_all(2, line.as_bytes());
            f
        }
        Err(f) => {
            let line = format!("{}\t{}", f.status, f.message);
            rvmm_workload::write_all(plan.err_fd, line.as_bytes());
            f
        }
    };
    // SAFETY: exiting without running destructors (the parent's memory is a copy).
    unsafe { libc::_exit(i32::from(f.status)) }
}

enum Never {}

/// Everything up to the wait for `start`.
fn prepare(p: &Plan) -> Result<(), Failure> {
    for &fd in &p.parent_fds {
        // SAFETY: closing our copy of a descriptor the parent keeps.
        unsafe { libc::close(fd) };
    }
    for (flag, path) in &p.join {
        // SAFETY: opening a NUL-terminated path; the descriptor is closed right after setns.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            check(fd, || {
                format!("opening namespace {}", path.to_string_lossy())
            })?;
            let r = libc::setns(fd, *flag);
            libc::close(fd);
            check(r, || {
                format!("joining namespace {}", path.to_string_lossy())
            })?;
        }
    }
    p.cgroup
        .join_self()
        .map_err(|e| Failure::setup(format!("joining the container's cgroup: {e}")))?;
    if p.new_cgroupns {
        // SAFETY: unshare with a flag constant.
        check(unsafe { libc::unshare(libc::CLONE_NEWCGROUP) }, || {
            "creating the cgroup namespace".into()
        })?;
    }
    // The state document, once `create` ran its createRuntime hooks.
    let mut state = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: reading into a local buffer.
        let n = unsafe { libc::read(p.sync_fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        state.extend_from_slice(&buf[..n as usize]);
    }
    if state.is_empty() {
        return Err(Failure::setup("rvmm-oci create went away"));
    }
    // SAFETY: closing our end of the sync pipe.
    unsafe { libc::close(p.sync_fd) };

    let cfg = &p.config;
    if let (Some(h), true) = (&cfg.hostname, cfg.namespace("uts").is_some()) {
        // SAFETY: pointer and length of a valid buffer.
        let r = unsafe { libc::sethostname(h.as_ptr().cast(), h.len()) };
        check(r, || "sethostname".into())?;
    }
    if p.new_net {
        rvmm_workload::loopback_up();
    }
    // Through the host's /proc, whose /proc/sys shows the namespaces of the reader: ours.
    rvmm_workload::sysctls("/proc", &p.spec.sysctls)?;

    let propagation = match cfg.linux.rootfs_propagation.as_deref() {
        None | Some("" | "private" | "rprivate") => libc::MS_PRIVATE,
        Some("slave" | "rslave") => libc::MS_SLAVE,
        Some("shared" | "rshared") => libc::MS_SHARED,
        Some("unbindable" | "runbindable") => libc::MS_UNBINDABLE,
        Some(o) => {
            return Err(Failure::setup(format!(
                "rootfsPropagation {o:?} is not known"
            )))
        }
    };
    mount("", "/", "", libc::MS_REC | propagation, "")?;
    let rootfs = p.rootfs.to_string_lossy().into_owned();
    // The rootfs becomes a mount point of its own (pivot_root needs one).
    mount(&rootfs, &rootfs, "", libc::MS_BIND | libc::MS_REC, "")?;

    // Bind sources, taken while the host's root is still there.
    let trees: Vec<Option<(RawFd, bool)>> = cfg
        .mounts
        .iter()
        .map(|m| {
            let o = MountOptions::parse(m)?;
            if !o.bind {
                return Ok(None);
            }
            let src = m.source.as_deref().unwrap_or_default();
            let dir = std::fs::metadata(src)
                .map_err(|e| Failure::setup(format!("bind source {src}: {e}")))?
                .is_dir();
            // Submounts come along (rbind) whether or not asked: a subset would need
            // one open_tree per submount.
            let fd = rvmm_workload::mounts::clone_tree(src, false)?;
            Ok(Some((fd, dir)))
        })
        .collect::<Result<_, Failure>>()?;
    for h in &cfg.hooks.create_container {
        run_hook(h, &state)?;
    }

    // pivot_root(".", "."): the old root ends up on top of the new one and is detached at once;
    // nothing is made in the rootfs for it (a read-only rootfs works).
    // SAFETY: chdir/pivot_root/umount2 with NUL-terminated paths.
    unsafe {
        check(libc::chdir(p.rootfs.as_ptr()), || {
            "chdir to the rootfs".into()
        })?;
        check(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
            || "pivot_root".into(),
        )?;
        check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH), || {
            "detaching the old root".into()
        })?;
        check(libc::chdir(c"/".as_ptr()), || "chdir /".into())?;
    }

    let mut dev_tmpfs = false;
    for (m, tree) in cfg.mounts.iter().zip(trees) {
        let o = MountOptions::parse(m)?;
        match tree {
            Some((fd, dir)) => {
                let target = mount_point(&m.destination, dir)?;
                rvmm_workload::mounts::attach(fd, &target)?;
                if o.flags & !libc::MS_REC != 0 {
                    mount(
                        "",
                        &target,
                        "",
                        libc::MS_BIND | libc::MS_REMOUNT | o.flags,
                        "",
                    )?;
                }
                if o.propagation != 0 {
                    mount("", &target, "", o.propagation, "")?;
                }
            }
            None => {
                let kind = m.kind.as_deref().unwrap_or_default();
                let target = mount_point(&m.destination, true)?;
                if kind == "cgroup" || kind == "cgroup2" {
                    crate::container::child::mount_cgroups_at(
                        &target,
                        &p.cgroup_mounts,
                        o.flags & libc::MS_RDONLY != 0,
                    )?;
                    continue;
                }
                let src = m.source.as_deref().unwrap_or(kind);
                mount(src, &target, kind, o.flags, &o.data)
                    .map_err(|f| Failure::setup(format!("{f} ({kind})")))?;
                if o.propagation != 0 {
                    mount("", &target, "", o.propagation, "")?;
                }
                if target == "/dev" && kind == "tmpfs" {
                    dev_tmpfs = true;
                }
            }
        }
    }
    if dev_tmpfs {
        // The spec's default devices and /dev links, in a /dev the runtime made.
        rvmm_workload::default_devices("")?;
        rvmm_workload::dev_links("");
    }
    rvmm_workload::make_devices("", &p.spec.devices)?;

    let console = match p.console_fd {
        Some(sock) => Some(console(sock, cfg.process().console_size, true)?),
        None => None,
    };
    rvmm_workload::mask("", &cfg.linux.masked_paths, &cfg.linux.readonly_paths)?;
    if p.spec.read_only {
        mount(
            "",
            "/",
            "",
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            "",
        )?;
    }
    if let Some(slave) = console {
        take_terminal(slave);
    }
    // A program that is not there or cannot run is `create`'s error (as with runc), not the
    // workload's.
    let argv0 = p.spec.argv.first().map(String::as_str).unwrap_or_default();
    rvmm_workload::resolve(argv0, &p.spec.env)?;
    if argv0.starts_with('/') && std::fs::metadata(argv0).is_err() {
        return Err(Failure::setup(format!(
            "{argv0}: no such file or directory"
        )));
    }
    Ok(())
}

/// After `prepare`: tells `create` the container is created (the error pipe closes), waits for
/// `start` (exec.fifo), runs the startContainer hooks, then becomes the workload.
fn wait_and_exec(p: &Plan) -> Result<Never, Failure> {
    // SAFETY: closing the error pipe: `create` reads EOF and reports the container created.
    unsafe { libc::close(p.err_fd) };
    let fifo = format!("/proc/self/fd/{}", p.fifo_fd);
    // SAFETY: opening our own descriptor's magic link; blocks until `start` opens it to read.
    let fd = unsafe { libc::open(c(&fifo).as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    check(fd, || "opening exec.fifo".into())?;
    rvmm_workload::write_all(fd, b"0");
    // SAFETY: closing descriptors we own.
    unsafe {
        libc::close(fd);
        libc::close(p.fifo_fd);
    }
    for h in &p.config.hooks.start_container {
        run_hook(h, b"")?;
    }
    Err(exec_workload(
        &p.spec,
        p.preserve_fds,
        p.config.process().user.umask,
    ))
}

/// The last steps of the init and of an exec: every descriptor above 3 + `preserve_fds` closes
/// at exec (an engine's leak stays out), the workload's privileges, `umask`, exec. Returns only
/// on failure.
pub(super) fn exec_workload(spec: &RunSpec, preserve_fds: u32, umask: Option<u32>) -> Failure {
    // SAFETY: close_range(2) with integer arguments.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 + preserve_fds,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    match rvmm_workload::privileges::become_workload(spec, false) {
        Ok(prog) => {
            if let Some(u) = umask {
                // SAFETY: umask cannot fail.
                unsafe { libc::umask(u) };
            }
            rvmm_workload::exec(&prog, &spec.argv, &spec.env)
        }
        Err(f) => f,
    }
}

/// The mount options that are mount(2) flags: (name, flags set, flags cleared).
const FLAG_OPTIONS: &[(&str, libc::c_ulong, libc::c_ulong)] = &[
    ("ro", libc::MS_RDONLY, 0),
    ("rw", 0, libc::MS_RDONLY),
    ("nosuid", libc::MS_NOSUID, 0),
    ("suid", 0, libc::MS_NOSUID),
    ("nodev", libc::MS_NODEV, 0),
    ("dev", 0, libc::MS_NODEV),
    ("noexec", libc::MS_NOEXEC, 0),
    ("exec", 0, libc::MS_NOEXEC),
    ("sync", libc::MS_SYNCHRONOUS, 0),
    ("async", 0, libc::MS_SYNCHRONOUS),
    ("dirsync", libc::MS_DIRSYNC, 0),
    ("remount", libc::MS_REMOUNT, 0),
    ("mand", libc::MS_MANDLOCK, 0),
    ("nomand", 0, libc::MS_MANDLOCK),
    ("atime", 0, libc::MS_NOATIME),
    ("noatime", libc::MS_NOATIME, 0),
    ("diratime", 0, libc::MS_NODIRATIME),
    ("nodiratime", libc::MS_NODIRATIME, 0),
    ("relatime", libc::MS_RELATIME, 0),
    ("norelatime", 0, libc::MS_RELATIME),
    ("strictatime", libc::MS_STRICTATIME, 0),
    ("nostrictatime", 0, libc::MS_STRICTATIME),
];

/// The bind options (both rbind: submounts always come along).
const BIND_OPTIONS: &[&str] = &["bind", "rbind"];

/// The propagation options: (name, propagation flags).
const PROPAGATION_OPTIONS: &[(&str, libc::c_ulong)] = &[
    ("private", libc::MS_PRIVATE),
    ("rprivate", libc::MS_PRIVATE | libc::MS_REC),
    ("shared", libc::MS_SHARED),
    ("rshared", libc::MS_SHARED | libc::MS_REC),
    ("slave", libc::MS_SLAVE),
    ("rslave", libc::MS_SLAVE | libc::MS_REC),
    ("unbindable", libc::MS_UNBINDABLE),
    ("runbindable", libc::MS_UNBINDABLE | libc::MS_REC),
];

/// Engines' own markers and podman's: accepted, nothing for the kernel.
const MARKER_OPTIONS: &[&str] = &["tmpcopyup", "notmpcopyup", "z", "Z", "U", "copy", "nocopy"];

/// The mount options `MountOptions::parse` knows, as `features` lists them (anything else is
/// passed on as data).
pub fn mount_options() -> Vec<&'static str> {
    FLAG_OPTIONS
        .iter()
        .map(|(n, ..)| *n)
        .chain(BIND_OPTIONS.iter().copied())
        .chain(PROPAGATION_OPTIONS.iter().map(|(n, _)| *n))
        .chain(["tmpcopyup"])
        .collect()
}

/// A mount's options split the way mount(2) takes them.
struct MountOptions {
    flags: libc::c_ulong,
    propagation: libc::c_ulong,
    data: String,
    bind: bool,
}

impl MountOptions {
    fn parse(m: &Mount) -> Result<MountOptions, Failure> {
        let mut o = MountOptions {
            flags: 0,
            propagation: 0,
            data: String::new(),
            bind: m.kind.as_deref() == Some("bind"),
        };
        let mut data = Vec::new();
        for opt in m.options.iter().map(String::as_str) {
            if let Some(&(_, set, clear)) = FLAG_OPTIONS.iter().find(|(n, ..)| *n == opt) {
                o.flags = (o.flags | set) & !clear;
            } else if let Some(&(_, p)) = PROPAGATION_OPTIONS.iter().find(|(n, _)| *n == opt) {
                o.propagation = p;
            } else if BIND_OPTIONS.contains(&opt) {
                o.bind = true;
            } else if opt == "idmap" || opt == "ridmap" {
                return Err(Failure::setup(format!(
                    "mount {}: idmapped mounts are not supported",
                    m.destination
                )));
            } else if !MARKER_OPTIONS.contains(&opt) {
                data.push(opt);
            }
        }
        o.data = data.join(",");
        Ok(o)
    }
}

/// Makes `slave` this process's controlling terminal (a new session) and its stdio.
pub(super) fn take_terminal(slave: RawFd) {
    // SAFETY: fd juggling on descriptors we own.
    unsafe {
        libc::setsid();
        libc::ioctl(slave, libc::TIOCSCTTY, 0);
        for fd in 0..3 {
            libc::dup2(slave, fd);
        }
        if slave > 2 {
            libc::close(slave);
        }
    }
}

/// A terminal for the workload: a pty from the container's devpts, its master sent to the
/// engine's console socket (SCM_RIGHTS, as runc does), its slave also bound on /dev/console
/// for the init (`bind`; an exec's terminal is its own). Returns the slave.
pub(super) fn console(
    sock: RawFd,
    size: Option<super::config::ConsoleSize>,
    bind: bool,
) -> Result<RawFd, Failure> {
    // SAFETY: opening the container's ptmx, then unlocking and naming its slave.
    let master = unsafe {
        libc::open(
            c"/dev/ptmx".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    check(master, || "opening /dev/ptmx for the terminal".into())?;
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCSPTLCK and TIOCGPTN with pointers to locals.
    unsafe {
        let unlock: libc::c_int = 0;
        check(libc::ioctl(master, libc::TIOCSPTLCK, &unlock), || {
            "unlocking the terminal".into()
        })?;
        check(libc::ioctl(master, libc::TIOCGPTN, &mut n), || {
            "naming the terminal".into()
        })?;
    }
    let name = format!("/dev/pts/{n}");
    // SAFETY: opening the slave by its path.
    let slave = unsafe { libc::open(c(&name).as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    check(slave, || format!("opening {name}"))?;
    if let Some(s) = size {
        let ws = libc::winsize {
            ws_row: s.height,
            ws_col: s.width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ with a pointer to a local.
        unsafe { libc::ioctl(slave, libc::TIOCSWINSZ, &ws) };
    }
    if bind {
        rvmm_workload::bind_console("", &name)?;
    }
    super::send_fd(sock, name.as_bytes(), master)
        .map_err(|e| Failure::setup(format!("sending the terminal to the console socket: {e}")))?;
    // SAFETY: closing descriptors we own (the engine has its copy of the master).
    unsafe {
        libc::close(master);
        libc::close(sock);
    }
    Ok(slave)
}

/// Runs one hook with `state` on its stdin, waiting for it (at most its timeout).
pub fn run_hook(h: &Hook, state: &[u8]) -> Result<(), Failure> {
    super::hooks::run(h, state).map_err(Failure::setup)
}

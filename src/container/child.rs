//! The container's first process, from clone(2) to execve(2) of the workload.
//!
//! It starts in fresh mount, PID, UTS, IPC, network and cgroup namespaces, waits for the parent
//! to finish the host side (cgroup membership, veth), then builds the root filesystem and drops
//! privileges. Everything that can fail reports `CODE\tmessage` on the error pipe (which closes
//! on a successful exec) and exits with CODE: 125 setup, 126 cannot execute, 127 not found.
//!
//! Mounts are made *after* pivot_root, so every target resolves inside the container's root (a
//! symlink in the image cannot point a mount at the host). Host-side sources are taken before the
//! pivot: the terminal as an O_PATH descriptor (bound while the old root is still attached), the
//! /etc files and the workload's binds and volumes as detached mount trees (open_tree), attached
//! only once the old root is gone, so that neither a mount point made for them nor a volume's
//! copy-up can reach the host through a symlink in the image.

use std::ffi::CString;
use std::os::fd::RawFd;

use rvmm_proto::RunSpec;
use rvmm_workload::{c, check, mkdir_p, mount, touch, Failure};

/// Everything the child needs, prepared by the parent before cloning.
pub struct Plan {
    pub rootfs: CString,
    pub overlay_opts: CString,
    /// The workload: argv, env, user, cwd, privileges, limits, /etc contents (see `etc_files`).
    pub spec: RunSpec,
    /// (host file holding the spec's content, path in the container)
    pub etc_files: Vec<(CString, String)>,
    /// The host source of each of `spec.mounts` (empty for a tmpfs), in the same order.
    pub sources: Vec<CString>,
    pub tty_slave: Option<RawFd>,
    /// The slave's path on the host's devpts (reopened in our mount namespace for /dev/console).
    pub tty_path: Option<CString>,
    /// The host's cgroup filesystems, mounted read-only under /sys/fs/cgroup.
    pub cgroup_mounts: Vec<crate::cgroups::ContainerMount>,
    pub sync_fd: RawFd,
    pub err_fd: RawFd,
    /// The run's cgroup, which the child joins itself (`Cgroup::join_self`).
    pub cgroup: crate::cgroups::Cgroup,
    /// The workload's stdout and stderr when they go to the run's log (a detached run without a
    /// supervisor), else it keeps rvmm's.
    pub output: Option<(RawFd, RawFd)>,
}

const OLD_ROOT_REL: &str = ".rvmm-old";
const OLD_ROOT: &str = "/.rvmm-old";

fn open_path(p: &CString) -> Result<RawFd, Failure> {
    // SAFETY: p is NUL-terminated.
    let fd = unsafe { libc::open(p.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    check(fd, || format!("opening {}", p.to_string_lossy()))?;
    Ok(fd)
}

fn fd_path(fd: RawFd) -> String {
    format!("/proc/self/fd/{fd}")
}

/// Runs in the cloned child. Never returns on success (the workload replaces it).
pub fn main(plan: &Plan) -> isize {
    let Err(f) = setup_and_exec(plan);
    let line = format!("{}\t{}", f.status, f.message);
    // SAFETY: writing a buffer we own to our error pipe, then exiting without running destructors.
    unsafe {
        libc::write(plan.err_fd, line.as_ptr().cast(), line.len());
        libc::_exit(i32::from(f.status))
    }
}

enum Never {}

/// /sys/fs/cgroup as the host lays it out (a tmpfs of v1 hierarchies plus the unified one, or a
/// single cgroup2), read-only, each rooted at the run's cgroup (so limits are where programs such
/// as the JVM look for them).
fn mount_cgroups(mounts: &[crate::cgroups::ContainerMount]) -> Result<(), Failure> {
    mount_cgroups_at("/sys/fs/cgroup", mounts, true)
}

/// The host's cgroup layout (`mounts`, whose targets are under /sys/fs/cgroup) mounted at
/// `root` instead, read-only or not (an OCI bundle's `cgroup` mount says which).
pub(crate) fn mount_cgroups_at(
    root: &str,
    mounts: &[crate::cgroups::ContainerMount],
    ro: bool,
) -> Result<(), Failure> {
    if mounts.is_empty() {
        return Ok(());
    }
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let ro_flag = if ro { libc::MS_RDONLY } else { 0 };
    let single = mounts.len() == 1 && mounts[0].target == "/sys/fs/cgroup";
    if !single {
        mount("tmpfs", root, "tmpfs", flags, "mode=755,size=64k")?;
    }
    for m in mounts {
        let rel = m.target.strip_prefix("/sys/fs/cgroup").unwrap_or(&m.target);
        let target = format!("{root}{rel}");
        mkdir_p(&target);
        mount(&m.fstype, &target, &m.fstype, flags | ro_flag, &m.data)?;
    }
    if !single && ro {
        mount(
            "",
            root,
            "",
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | flags,
            "",
        )?;
    }
    Ok(())
}

fn setup_and_exec(p: &Plan) -> Result<Never, Failure> {
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // Into the run's cgroup first, while the parent attaches the network: from inside, a v1
    // join costs no RCU grace period (this process has one thread).
    p.cgroup
        .join_self()
        .map_err(|e| Failure::setup(format!("joining the run's cgroup: {e}")))?;
    let mut b = [0u8; 1];
    // SAFETY: reading one byte into a local buffer.
    if unsafe { libc::read(p.sync_fd, b.as_mut_ptr().cast(), 1) } != 1 {
        return Err(Failure::setup(
            "rvmm went away before the container started",
        ));
    }
    // SAFETY: closing our copy of the sync pipe.
    unsafe { libc::close(p.sync_fd) };
    // Our own cgroup namespace, now that we are in the run's cgroup: the workload
    // sees that cgroup as "/".
    // SAFETY: unshare with a flag constant.
    check(unsafe { libc::unshare(libc::CLONE_NEWCGROUP) }, || {
        "creating the cgroup namespace".into()
    })?;

    let hostname = &p.spec.hostname;
    // SAFETY: pointer and length of a valid buffer.
    let r = unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) };
    check(r, || "sethostname".into())?;
    // Through the host's /proc, whose /proc/sys shows the namespaces of the reader: ours.
    rvmm_workload::sysctls("/proc", &p.spec.sysctls)?;
    mount("", "/", "", libc::MS_REC | libc::MS_PRIVATE, "")?;
    let rootfs = p.rootfs.to_string_lossy();
    mount(
        "overlay",
        &rootfs,
        "overlay",
        0,
        &p.overlay_opts.to_string_lossy(),
    )
    .map_err(|f| Failure::setup(format!("{f} (overlayfs of the image layers)")))?;

    // Host-side sources, before the host disappears: each bind as a detached mount tree, attached
    // once the host's root is gone (then no path in the image, a symlink included, can lead a
    // mount point or a copy out of the container's root).
    let binds: Vec<rvmm_workload::mounts::Prepared> = p
        .spec
        .mounts
        .iter()
        .zip(&p.sources)
        .map(|(m, src)| rvmm_workload::mounts::Prepared::new(m, &src.to_string_lossy()))
        .collect::<Result<_, _>>()?;
    let etc_trees: Vec<(RawFd, &str)> = p
        .etc_files
        .iter()
        // The workload's own mount on one of these paths wins, as with Docker.
        .filter(|(_, dst)| !p.spec.mounts.iter().any(|m| &m.destination == dst))
        .map(|(src, dst)| {
            rvmm_workload::mounts::clone_tree(&src.to_string_lossy(), false)
                .map(|fd| (fd, dst.as_str()))
        })
        .collect::<Result<_, _>>()?;
    let console_fd = p.tty_path.as_ref().map(open_path).transpose()?;

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

    // Mounts are made inside the new root, so every target resolves there: /proc, /sys, /dev and
    // the masked paths exactly as rvmm-init makes them in a VM.
    rvmm_workload::system_mounts("")?;
    rvmm_workload::make_devices("", &p.spec.devices)?;
    if let Some(b) = p.spec.shm_size {
        rvmm_workload::shm_size("", b)?;
    }
    if p.spec.privileged {
        // The host's devices, read through the old root before it goes.
        rvmm_workload::unconfine("", &format!("{OLD_ROOT}/dev"))?;
    }
    mount_cgroups(&p.cgroup_mounts)?;
    if let Some(fd) = console_fd {
        rvmm_workload::bind_console("", &fd_path(fd))?;
        // SAFETY: closing the O_PATH descriptor we opened.
        unsafe { libc::close(fd) };
    }
    // SAFETY: detaching and removing the old root's mount point.
    unsafe {
        let old = c(OLD_ROOT);
        check(libc::umount2(old.as_ptr(), libc::MNT_DETACH), || {
            "detaching the old root".into()
        })?;
        libc::rmdir(old.as_ptr());
    }
    // The workload's mounts (-v, --mount, --tmpfs; parents first), then /etc/hosts,
    // /etc/hostname, /etc/resolv.conf: every path now resolves inside the container's root.
    for b in binds {
        b.attach()?;
    }
    for (tree, dst) in etc_trees {
        touch(dst);
        rvmm_workload::mounts::attach(tree, dst)?;
    }
    if p.spec.read_only {
        mount(
            "",
            "/",
            "",
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            "",
        )?;
    }
    rvmm_workload::loopback_up();

    // stdio.
    // SAFETY: fd juggling on descriptors we own.
    unsafe {
        if let Some(slave) = p.tty_slave {
            libc::setsid();
            libc::ioctl(slave, libc::TIOCSCTTY, 0);
            if p.spec.stdin {
                libc::dup2(slave, 0);
            } else {
                null_stdin();
            }
            libc::dup2(slave, 1);
            libc::dup2(slave, 2);
            if slave > 2 {
                libc::close(slave);
            }
        } else {
            if !p.spec.stdin {
                null_stdin();
            }
            if let Some((out, err)) = p.output {
                libc::dup2(out, 1);
                libc::dup2(err, 2);
            }
        }
    }

    // The same steps as in a VM (rvmm-workload): limits, bounding set, user, caps, cwd, PATH
    // lookup, seccomp.
    let prog = rvmm_workload::privileges::become_workload(&p.spec, false)?;
    if p.spec.init {
        let err_fd = p.err_fd;
        // SAFETY: closing the error pipe once the workload runs (the parent then sees EOF).
        let started = move || unsafe {
            libc::close(err_fd);
        };
        return Err(rvmm_workload::exec_with_init(
            &prog,
            &p.spec.argv,
            &p.spec.env,
            p.tty_slave.is_some(),
            started,
        ));
    }
    Err(rvmm_workload::exec(&prog, &p.spec.argv, &p.spec.env))
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

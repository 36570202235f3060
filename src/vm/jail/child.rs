//! The VMM process (`rvmm-vmm`, or `rvmm __vmm`; started by [`super::spawn`]): it reads its setup
//! from fd 3, jails itself (mounts, root, credentials, limits), builds or restores the VM from what
//! it was handed, then runs it with a seccomp filter on every thread and answers `rvmm run`'s
//! requests until the VM ends.

use std::fs::File;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use super::filters::{self, Thread};
use super::proto::{self, FromVmm, Jail, Setup, ToVmm};
use crate::vmm::{
    Console, Controller, DiskConfig, FsConfig, NetConfig, PortBackend, TapSource, ThreadFilters,
    Vm, VmConfig, VmExit,
};

/// The descriptor the setup and the requests arrive on.
const CONTROL_FD: i32 = 3;

/// The VMM process's main: its exit status (0 once the VM has run and ended).
pub fn main() -> u8 {
    // SAFETY: fd 3 is the socket `spawn` left us; nothing else in this process owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };
    let (setup, fds): (Setup, Vec<OwnedFd>) = match proto::recv(sock.as_fd()) {
        Ok(Some(m)) => m,
        _ => return 1,
    };
    let reply = |m: &FromVmm| proto::send(sock.as_fd(), m, &[]);
    let vm = match build(&setup, fds) {
        Ok(vm) => vm,
        Err(e) => {
            let _ = reply(&e);
            return 1;
        }
    };
    let seccomp = setup.jail.as_ref().is_some_and(|j| j.seccomp);
    match run(vm, &setup, &sock, seccomp) {
        Ok(()) => 0,
        Err(e) => {
            let _ = reply(&FromVmm::Exit(Err(e)));
            1
        }
    }
}

fn sys(what: &str) -> impl FnOnce(nix::errno::Errno) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Jails the process (if asked), then creates or restores the VM; or the message that says why
/// not.
fn build(setup: &Setup, fds: Vec<OwnedFd>) -> Result<Vm, FromVmm> {
    build_inner(setup, fds).map_err(|(restoring, e)| {
        if restoring {
            FromVmm::RestoreFailed(e)
        } else {
            FromVmm::Built(Err(e))
        }
    })
}

fn build_inner(setup: &Setup, fds: Vec<OwnedFd>) -> Result<Vm, (bool, String)> {
    let fail = |e: String| (false, e);
    let mut fds = fds.into_iter();
    let mut next = |what: &str| {
        fds.next()
            .ok_or_else(|| format!("no descriptor for {what}"))
    };
    let console = File::from(next("the console").map_err(fail)?);
    let mut ports = Vec::new();
    for p in &setup.ports {
        ports.push(PortBackend {
            name: p.name.clone(),
            input: if p.input {
                Some(next(&p.name).map_err(fail)?)
            } else {
                None
            },
            output: if p.output {
                Some(next(&p.name).map_err(fail)?)
            } else {
                None
            },
            barrier: p.barrier,
        });
    }
    let mut net = Vec::new();
    for mac in &setup.macs {
        net.push(NetConfig {
            tap: TapSource::Fd(next("a tap").map_err(fail)?),
            mac: *mac,
        });
    }
    let mut disk_files = Vec::new();
    for &i in &setup.disk_files {
        disk_files.push((i, File::from(next("a disk").map_err(fail)?)));
    }
    let sharing = setup.fs.as_ref().is_some_and(|s| !s.is_empty());
    // The jail has no /proc: the virtio-fs server reopens nodes through this descriptor.
    let proc_self_fd = if sharing {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open("/proc/self/fd")
            .map_err(|e| fail(format!("opening /proc/self/fd: {e}")))?;
        Some(Arc::new(OwnedFd::from(f)))
    } else {
        None
    };
    if let Some(j) = &setup.jail {
        enter(j, sharing).map_err(|e| fail(format!("jailing the VMM: {e}")))?;
    }
    let cfg = VmConfig {
        kernel: setup.kernel.clone(),
        initrd: setup.initrd.clone(),
        cmdline: setup.cmdline.clone(),
        vcpus: setup.vcpus,
        mem_mib: setup.mem_mib,
        disks: setup
            .disks
            .iter()
            .map(|&read_only| DiskConfig {
                path: None,
                read_only,
            })
            .collect(),
        console: if setup.console_stdio {
            Console::Stdio
        } else {
            Console::Fd(Arc::new(console))
        },
        channel: None,
        net,
        ports,
        fs: setup.fs.as_ref().map(|_| FsConfig {
            shares: Vec::new(),
            root: sharing.then(|| Path::new("/").join(proto::SHARES)),
            proc_self_fd,
        }),
    };
    let vm = match &setup.restore {
        Some((dir, tag)) => {
            Vm::restore(cfg, dir, tag).map_err(|e| (true, crate::error::chain(&e)))?
        }
        None => Vm::new(cfg).map_err(|e| fail(crate::error::chain(&e)))?,
    };
    // Disks that came as files go in before the guest runs.
    let ctl = vm.controller();
    for (i, f) in disk_files {
        ctl.replace_disk_file(i, f)
            .map_err(|e| fail(crate::error::chain(&e)))?;
    }
    Ok(vm)
}

/// Mounts the jail's root and moves into it, then gives up every privilege: an unprivileged
/// uid and gid, no capability (bounding set included; with shared directories the process
/// keeps [`FS_CAPS`] permitted for the virtio-fs thread alone), no_new_privs, limits.
fn enter(j: &Jail, sharing: bool) -> Result<(), String> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    let none: Option<&str> = None;
    // Nothing we mount reaches the host's namespace.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(sys("making mounts private"))?;
    mount(
        Some("tmpfs"),
        &j.root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("size=64k,mode=0755"),
    )
    .map_err(sys("mounting the jail's root"))?;
    for b in &j.binds {
        let target = j.root.join(&b.target);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        if b.source.is_dir() {
            std::fs::create_dir(&target)
        } else {
            File::create(&target).map(drop)
        }
        .map_err(|e| format!("creating {}: {e}", target.display()))?;
        mount(
            Some(&b.source),
            &target,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        )
        .map_err(|e| format!("binding {} into the jail: {e}", b.source.display()))?;
        let mut flags = MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC;
        if !b.writable {
            flags |= MsFlags::MS_RDONLY;
        }
        mount(none, &target, none, flags, none)
            .map_err(|e| format!("restricting {} in the jail: {e}", b.source.display()))?;
    }
    // /dev/kvm, owned by the jail's uid: the only device node.
    let dev = j.root.join("dev");
    std::fs::create_dir(&dev).map_err(|e| format!("creating the jail's /dev: {e}"))?;
    let kvm = dev.join("kvm");
    nix::sys::stat::mknod(
        &kvm,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(10, 232),
    )
    .map_err(sys("creating the jail's /dev/kvm"))?;
    nix::unistd::chown(
        &kvm,
        Some(nix::unistd::Uid::from_raw(j.uid)),
        Some(nix::unistd::Gid::from_raw(j.gid)),
    )
    .map_err(sys("handing /dev/kvm to the jail's uid"))?;
    // pivot_root(".", "."): the old root ends up on top of the new one; detach it.
    nix::unistd::chdir(&j.root).map_err(sys("entering the jail"))?;
    nix::unistd::pivot_root(".", ".").map_err(sys("pivot_root into the jail"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the host's root"))?;
    nix::unistd::chdir("/").map_err(sys("entering the jail"))?;
    mount(
        none,
        "/",
        none,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        none,
    )
    .map_err(sys("making the jail's root read-only"))?;
    let _ = nix::unistd::sethostname("rvmm-vmm");
    drop_privileges(j, sharing)
}

/// What the virtio-fs thread may do beyond an unprivileged uid, on the files of the shared
/// directories (the only writable ones in the jail): give a new file the guest caller's owner,
/// read and write files whatever their owner and mode (the guest kernel checked the caller's
/// permissions), set times and modes of files it does not own, keep set-id bits.
const FS_CAPS: [caps::Capability; 4] = [
    caps::Capability::CAP_CHOWN,
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_FOWNER,
    caps::Capability::CAP_FSETID,
];

/// First thing on every thread but the virtio-fs one: no capability at all, permitted included.
fn drop_fs_caps() -> Result<(), String> {
    caps::clear(None, caps::CapSet::Effective)
        .and_then(|()| caps::clear(None, caps::CapSet::Permitted))
        .map_err(|e| format!("dropping capabilities: {e}"))
}

/// First thing on the virtio-fs thread: [`FS_CAPS`] effective (they are all it has).
fn raise_fs_caps() -> Result<(), String> {
    let set: caps::CapsHashSet = FS_CAPS.into_iter().collect();
    caps::set(None, caps::CapSet::Effective, &set)
        .map_err(|e| format!("raising the virtio-fs thread's capabilities: {e}"))
}

fn drop_privileges(j: &Jail, sharing: bool) -> Result<(), String> {
    use nix::sys::resource::{setrlimit, Resource};
    // SAFETY: plain prctl/setres*id/setgroups calls on this process; failures are checked.
    unsafe {
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
            {
                return Err(format!(
                    "dropping capability {cap} from the bounding set: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        // With shared directories the permitted capabilities survive the uid change (for the
        // virtio-fs thread; every other thread drops them as it starts).
        if sharing && libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
            return Err("keeping capabilities for the virtio-fs thread".into());
        }
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(j.gid, j.gid, j.gid) != 0
            || libc::setresuid(j.uid, j.uid, j.uid) != 0
        {
            return Err(format!(
                "becoming uid {} gid {}: {}",
                j.uid,
                j.gid,
                std::io::Error::last_os_error()
            ));
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err("setting no_new_privs".into());
        }
        // Changing credentials cleared the parent-death signal: set it again.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    }
    caps::clear(None, caps::CapSet::Inheritable).map_err(|e| e.to_string())?;
    let keep: caps::CapsHashSet = if sharing {
        FS_CAPS.into_iter().collect()
    } else {
        caps::CapsHashSet::new()
    };
    caps::clear(None, caps::CapSet::Effective).map_err(|e| e.to_string())?;
    caps::set(None, caps::CapSet::Permitted, &keep).map_err(|e| e.to_string())?;
    if caps::read(None, caps::CapSet::Effective).map_or(true, |c| !c.is_empty())
        || caps::read(None, caps::CapSet::Permitted).map_or(true, |c| c != keep)
    {
        return Err("capabilities are left after becoming unprivileged".into());
    }
    for (r, v) in [
        (Resource::RLIMIT_NOFILE, j.nofile),
        (Resource::RLIMIT_FSIZE, j.fsize),
        (Resource::RLIMIT_CORE, 0),
        (Resource::RLIMIT_NPROC, j.nproc),
    ] {
        setrlimit(r, v, v).map_err(sys("setting a limit"))?;
    }
    Ok(())
}

/// Runs the VM: the control thread serves requests, this thread becomes the event thread.
fn run(mut vm: Vm, setup: &Setup, sock: &OwnedFd, seccomp: bool) -> Result<(), String> {
    let filter = |t| -> Result<Option<seccompiler::BpfProgram>, String> {
        if seccomp {
            filters::program(t).map(Some)
        } else {
            Ok(None)
        }
    };
    let control = filter(Thread::Control)?;
    let violation = test_violation(setup);
    let hook = |t| (violation == Some(t)).then_some(forbidden_call as fn());
    let sharing = setup.fs.as_ref().is_some_and(|s| !s.is_empty()) && setup.jail.is_some();
    vm.set_thread_filters(ThreadFilters {
        vcpu: filter(Thread::Vcpu)?,
        event: filter(Thread::Event)?,
        after_vcpu: hook(Thread::Vcpu),
        after_event: hook(Thread::Event),
        fs: filter(Thread::Fs)?,
        on_start: sharing.then_some(drop_fs_caps as fn() -> Result<(), String>),
        on_fs_start: sharing.then_some(raise_fs_caps as fn() -> Result<(), String>),
    });
    let ctl = vm.controller();
    let out = setup.snapshot_out.clone();
    let csock = sock
        .try_clone()
        .map_err(|e| format!("duplicating the control socket: {e}"))?;
    std::thread::Builder::new()
        .name("rvmm-control".into())
        .spawn(move || {
            if sharing {
                if let Err(e) = drop_fs_caps() {
                    log::error!("{e}");
                    ctl.stop();
                    return;
                }
            }
            if let Some(f) = control {
                if let Err(e) = seccompiler::apply_filter(&f) {
                    log::error!("cannot install the control thread's seccomp filter: {e}");
                    ctl.stop();
                    return;
                }
            }
            if violation == Some(Thread::Control) {
                forbidden_call();
            }
            serve(&csock, &ctl, out.as_deref());
        })
        .map_err(|e| format!("starting the control thread: {e}"))?;
    proto::send(sock.as_fd(), &FromVmm::Built(Ok(())), &[])
        .map_err(|e| format!("answering rvmm: {e}"))?;
    // This thread becomes the event thread: name it so (a seccomp kill names the thread).
    // SAFETY: PR_SET_NAME with a NUL-terminated string.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"rvmm-event".as_ptr(), 0, 0, 0) };
    let end = match vm.run() {
        Ok(VmExit::Reset) => Ok("reset".to_string()),
        Ok(VmExit::Shutdown) => Ok("shutdown".to_string()),
        Ok(VmExit::Stopped) => Ok("stopped".to_string()),
        Err(e) => Err(crate::error::chain(&e)),
    };
    let _ = proto::send(sock.as_fd(), &FromVmm::Exit(end), &[]);
    Ok(())
}

/// Requests from `rvmm run`, until it says stop or goes away (then the VM stops).
fn serve(sock: &OwnedFd, ctl: &Controller, out: Option<&Path>) {
    loop {
        let (msg, mut fds) = match proto::recv::<ToVmm>(sock.as_fd()) {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => {
                ctl.stop();
                return;
            }
        };
        let reply = match msg {
            ToVmm::Stop => {
                ctl.stop();
                return;
            }
            ToVmm::Snapshot { tag } => FromVmm::Snapshot(match out {
                Some(dir) => ctl.snapshot(dir, &tag).map_err(|e| crate::error::chain(&e)),
                None => Err("this VMM was given nowhere to write a snapshot".into()),
            }),
            ToVmm::ReplaceDisk { index } => FromVmm::Disk(match fds.pop() {
                Some(fd) => ctl
                    .replace_disk_file(index, File::from(fd))
                    .map_err(|e| crate::error::chain(&e)),
                None => Err("no disk came with the request".into()),
            }),
        };
        if proto::send(sock.as_fd(), &reply, &[]).is_err() {
            ctl.stop();
            return;
        }
    }
}

/// The thread the test hook names (debug builds only; release builds never break their
/// filters on request).
fn test_violation(setup: &Setup) -> Option<Thread> {
    if !cfg!(debug_assertions) {
        return None;
    }
    match setup.test_violation.as_deref() {
        Some("vcpu") => Some(Thread::Vcpu),
        Some("event") => Some(Thread::Event),
        Some("control") => Some(Thread::Control),
        _ => None,
    }
}

/// A call no filter allows: creating a socket (a way out to the network).
fn forbidden_call() {
    // SAFETY: socket(2) has no memory arguments; the filter kills the process before it returns.
    unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) };
}

//! The VMM as a process of its own, jailed (docs/security.md): `rvmm run --isolation=vm` does the
//! privileged preparation (image disk, tap, cgroup, snapshot choice), then [`spawn`] starts the VMM
//! process (`rvmm-vmm`, see [`vmm_command`]) in new mount, PID, IPC, UTS and network namespaces and
//! hands it, over a socket, everything it may use: descriptors for the console, the channel's pipes
//! and the taps, and read-only binds of the kernel, the initramfs and the snapshot. The process
//! mounts its own root of those, becomes an unprivileged uid with no capability, installs a seccomp
//! filter per thread, and only then creates the VM. rvmm keeps a [`VmmControl`] to attach the image
//! disk (a descriptor), take a snapshot and stop it.
//!
//! `RVMM_NO_JAIL=1` runs the VMM process unjailed and unfiltered, `RVMM_NO_SECCOMP=1` jailed but
//! unfiltered: for debugging only.

mod child;
mod filters;
mod proto;

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub use child::main as vmm_main;
use proto::{Bind, FromVmm, Jail, Port, Setup, ToVmm};

use crate::devices::lock;
use crate::sibling;
use crate::vmm::{Console, TapSource, VmConfig, VmExit};

/// The VMM binary's file name, next to `rvmm`.
pub(crate) const VMM_BINARY: &str = "rvmm-vmm";

/// A fingerprint of the messages between rvmm and its VMM process (FNV-1a of proto.rs and the
/// version): an `rvmm-vmm` built from other sources refuses to start rather than misread its
/// setup.
const PROTOCOL: u64 = sibling::fnv1a(include_bytes!("proto.rs"), sibling::VERSION_FINGERPRINT);

/// [`PROTOCOL`] as `rvmm-vmm`'s argument.
fn protocol_arg() -> String {
    format!("{PROTOCOL:016x}")
}

/// The main of the `rvmm-vmm` binary: `rvmm-vmm PROTOCOL`, then [`vmm_main`]; or
/// `rvmm-vmm PROTOCOL session FD`, the rest of a warm VM run that `rvmm run` handed over
/// (`vm::handover`).
pub fn vmm_exe_main() -> u8 {
    // Not `env::args`: an argument that is not UTF-8 is refused below, not a panic.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let arg = |i: usize| args.get(i).and_then(|a| a.to_str());
    let theirs = arg(1);
    if arg(2) == Some(super::handover::MODE) {
        if !sibling::check_protocol(VMM_BINARY, super::handover::PROTOCOL, theirs) {
            return 2;
        }
        return super::handover::session_main(arg(3));
    }
    if sibling::check_protocol(VMM_BINARY, PROTOCOL, theirs) {
        vmm_main()
    } else {
        2
    }
}

/// The `rvmm-vmm` binary next to this rvmm, if there is one (what VM runs start; the bench
/// copies it with rvmm).
pub fn vmm_binary_path() -> Option<PathBuf> {
    sibling::binary_path(VMM_BINARY)
}

/// The program and arguments of a VMM process: `rvmm-vmm PROTOCOL` when that binary is next to
/// this rvmm (it maps only the VMM's code: less memory per VM), else `rvmm __vmm` from this
/// very binary.
fn vmm_command() -> Result<(CString, Vec<CString>), String> {
    let (exe, argv) = match vmm_binary_path() {
        Some(p) => (
            p.into_os_string().into_encoded_bytes(),
            [VMM_BINARY.to_string(), protocol_arg()],
        ),
        None => (
            b"/proc/self/exe".to_vec(),
            ["rvmm".to_string(), "__vmm".to_string()],
        ),
    };
    let c = |b: Vec<u8>| CString::new(b).map_err(|e| e.to_string());
    Ok((
        c(exe)?,
        argv.map(String::into_bytes)
            .into_iter()
            .map(c)
            .collect::<Result<_, _>>()?,
    ))
}

/// The first uid (and gid) of the range VMM processes run as: one per run, picked from the run
/// ID, owning nothing on the host. `RVMM_JAIL_ID_BASE` moves the range.
pub const JAIL_ID_BASE: u32 = 0x7a00_0000;
/// How many ids the range has.
pub const JAIL_ID_COUNT: u32 = 1 << 16;
/// What the VMM process may use beyond guest RAM (its binary, page tables, queues, buffers).
pub const VMM_MEMORY_ALLOWANCE: u64 = 96 << 20;
/// How long a request (a snapshot of a large guest, a disk) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a VMM process told to stop may take before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The uid and gid the VMM process of run `id` gets.
pub fn jail_id(id: &str) -> u32 {
    let base = std::env::var("RVMM_JAIL_ID_BASE")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|b| *b >= 1000 && b.checked_add(JAIL_ID_COUNT).is_some())
        .unwrap_or(JAIL_ID_BASE);
    base + jail_id_offset(id)
}

/// FNV-1a of the run ID: spreads runs over the range.
fn jail_id_offset(id: &str) -> u32 {
    let h = id.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    h % JAIL_ID_COUNT
}

fn jail_enabled() -> bool {
    std::env::var_os("RVMM_NO_JAIL").is_none_or(|v| v.is_empty() || v == "0")
}

fn seccomp_enabled() -> bool {
    std::env::var_os("RVMM_NO_SECCOMP").is_none_or(|v| v.is_empty() || v == "0")
}

/// What to start.
pub(crate) struct Request<'a> {
    /// As for an in-process VM; the disks must be empty slots (the image disk is attached
    /// later), the console a file or nothing, the taps names or descriptors.
    pub cfg: VmConfig,
    /// Restore this snapshot directory with this tag instead of booting.
    pub restore: Option<(&'a Path, &'a str)>,
    /// A directory the VMM process may write a snapshot into (it is handed to its uid).
    pub snapshot_out: Option<&'a Path>,
    /// An empty directory of the host, the mount point of the jail's root (in the VMM's mount
    /// namespace only).
    pub jail_dir: &'a Path,
    /// The run ID (picks the uid).
    pub id: &'a str,
    /// The cgroup the process is put in before it allocates anything.
    pub cgroup: Option<&'a crate::cgroups::Cgroup>,
}

/// A running VMM process.
pub(crate) struct Vmm {
    ctl: VmmControl,
}

/// Talks to a VMM process; clones share it.
#[derive(Clone)]
pub(crate) struct VmmControl(Arc<Inner>);

struct Inner {
    pid: i32,
    sock: OwnedFd,
    replies: Mutex<Receiver<FromVmm>>,
    done: Arc<Done>,
    stop_asked: Mutex<Option<Instant>>,
    snapshot_out: Option<PathBuf>,
}

#[derive(Default)]
struct Done {
    end: Mutex<Option<Result<VmExit, String>>>,
    cv: Condvar,
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Why [`spawn`] failed.
#[derive(Debug)]
pub(crate) enum SpawnError {
    /// The snapshot could not be restored.
    Restore(String),
    Other(String),
}

impl From<String> for SpawnError {
    fn from(s: String) -> Self {
        SpawnError::Other(s)
    }
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpawnError::Restore(s) | SpawnError::Other(s) => f.write_str(s),
        }
    }
}

/// RLIMIT_NOFILE of a VMM that shares directories (each node the guest has looked up is a
/// descriptor), at most the hard limit rvmm has.
const SHARING_NOFILE: u64 = 1 << 16;

fn hard_nofile() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, hard)| hard)
        .unwrap_or(1024)
}

/// Starts the VMM process and waits until it has built (or restored) the VM; the VM then runs.
pub(crate) fn spawn(req: Request) -> Result<Vmm, SpawnError> {
    let jailed = jail_enabled();
    let id = jail_id(req.id);
    let cfg = req.cfg;
    // What can be checked here is, so that a bad kernel, initramfs or size is reported as it
    // is rather than as a bind into the jail that failed.
    crate::vmm::validate(&cfg, req.restore.is_none())
        .map_err(|e| SpawnError::Other(crate::error::chain(&e)))?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    let console = match &cfg.console {
        Console::File(p) => File::create(p).map_err(io(&format!("creating {}", p.display())))?,
        Console::Fd(f) => f.try_clone().map_err(io("the console"))?,
        Console::Null | Console::Stdio => {
            File::create("/dev/null").map_err(io("opening /dev/null"))?
        }
    };
    fds.push(console.into());
    let mut ports = Vec::new();
    for p in cfg.ports {
        ports.push(Port {
            name: p.name,
            input: p.input.is_some(),
            output: p.output.is_some(),
            barrier: p.barrier,
        });
        fds.extend(p.input);
        fds.extend(p.output);
    }
    let mut macs = Vec::new();
    for n in cfg.net {
        macs.push(n.mac);
        fds.push(match n.tap {
            TapSource::Name(name) => crate::devices::tap::Tap::open(&name)
                .map_err(|e| crate::error::chain(&e))?
                .into_fd(),
            TapSource::Fd(fd) => fd,
        });
    }
    let mut disk_files = Vec::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        if let Some(p) = &d.path {
            let (f, _) = crate::devices::virtio::block::open_backing(p, d.read_only)
                .map_err(|e| crate::error::chain(&e))?;
            fds.push(f.into());
            disk_files.push(i);
        }
    }
    if cfg.channel.is_some() {
        return Err(SpawnError::Other(
            "a jailed VMM has no COM2 channel (the virtio-console replaces it)".into(),
        ));
    }
    let console_stdio = matches!(cfg.console, Console::Stdio);
    if let Some(out) = req.snapshot_out {
        if jailed {
            nix::unistd::chown(
                out,
                Some(nix::unistd::Uid::from_raw(id)),
                Some(nix::unistd::Gid::from_raw(id)),
            )
            .map_err(|e| format!("handing {} to the VMM: {e}", out.display()))?;
        }
    }
    let mut binds = Vec::new();
    let mut place = |host: &Path, name: &str, writable: bool| -> PathBuf {
        if !jailed {
            return host.to_owned();
        }
        binds.push(Bind {
            source: host.to_owned(),
            target: name.into(),
            writable,
        });
        Path::new("/").join(name)
    };
    // A restore reads the snapshot only: the kernel and initramfs stay out of its root.
    let (kernel, initrd) = if req.restore.is_none() {
        (
            place(&cfg.kernel, "kernel", false),
            cfg.initrd.as_deref().map(|p| place(p, "initrd", false)),
        )
    } else {
        (cfg.kernel.clone(), cfg.initrd.clone())
    };
    let restore = req
        .restore
        .map(|(dir, tag)| (place(dir, "snapshot", false), tag.to_string()));
    let snapshot_out = req.snapshot_out.map(|d| place(d, "snapshot-out", true));
    let shares = cfg.fs.as_ref().map(|f| f.shares.clone());
    let sharing = shares.as_ref().is_some_and(|s| !s.is_empty());
    if sharing && !jailed {
        return Err(SpawnError::Other(
            "shared directories need the VMM's jail (RVMM_NO_JAIL is set)".into(),
        ));
    }
    for (i, sh) in shares.iter().flatten().enumerate() {
        place(&sh.source, &format!("{}/{i}", proto::SHARES), !sh.read_only);
    }
    let vcpus = cfg.vcpus;
    let setup = Setup {
        kernel,
        initrd,
        cmdline: cfg.cmdline,
        vcpus,
        mem_mib: cfg.mem_mib,
        disks: cfg.disks.iter().map(|d| d.read_only).collect(),
        disk_files,
        console_stdio,
        ports,
        macs,
        restore,
        snapshot_out,
        fs: shares,
        jail: jailed.then(|| Jail {
            root: req.jail_dir.to_owned(),
            binds,
            uid: id,
            gid: id,
            // A server of shared directories holds a descriptor per node the guest knows.
            nofile: if sharing {
                SHARING_NOFILE.min(hard_nofile())
            } else {
                256
            },
            // A snapshot's memory file is guest RAM; files in a shared directory are the
            // guest's own to size.
            fsize: if sharing {
                libc::RLIM_INFINITY
            } else {
                (u64::from(cfg.mem_mib) << 20) + (16 << 20)
            },
            nproc: u64::from(vcpus) + 9,
            seccomp: seccomp_enabled(),
        }),
        test_violation: std::env::var("RVMM_TEST_SECCOMP_VIOLATION").ok(),
    };
    if !jailed {
        eprintln!("rvmm: RVMM_NO_JAIL is set: the VMM runs as root, unjailed and unfiltered");
    }

    let (ours, theirs) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| format!("creating the VMM's socket: {e}"))?;
    let pid = clone_vmm(theirs.as_raw_fd(), jailed, console_stdio)?;
    drop(theirs);
    let kill = || {
        // SAFETY: signalling and reaping our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    };
    if let Some(cg) = req.cgroup {
        if let Err(e) = cg.add(pid) {
            kill();
            return Err(
                format!("putting the VMM in its cgroup: {}", crate::error::chain(&e)).into(),
            );
        }
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    if let Err(e) = proto::send(ours.as_fd(), &setup, &raw) {
        kill();
        return Err(format!("setting up the VMM: {e}").into());
    }
    drop(fds);
    let ctl = control(pid, ours, req.snapshot_out.map(Path::to_owned)).inspect_err(|_| kill())?;
    match ctl.reply(REQUEST_TIMEOUT)? {
        FromVmm::Built(Ok(())) => Ok(Vmm { ctl }),
        FromVmm::Built(Err(e)) => {
            let _ = Vmm { ctl }.wait();
            Err(SpawnError::Other(e))
        }
        FromVmm::RestoreFailed(e) => {
            let _ = Vmm { ctl }.wait();
            Err(SpawnError::Restore(e))
        }
        other => Err(format!("the VMM answered {other:?} to its setup").into()),
    }
}

/// A [`VmmControl`] of VMM process `pid` (a child of this process) over its control socket,
/// with the thread that reads its replies and reaps it.
fn control(pid: i32, sock: OwnedFd, snapshot_out: Option<PathBuf>) -> Result<VmmControl, String> {
    let reader = sock.try_clone().map_err(io("the VMM's socket"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let done = Arc::new(Done::default());
    let d = done.clone();
    std::thread::Builder::new()
        .name("rvmm-vmm-reader".into())
        .spawn(move || read_replies(reader, pid, tx, &d))
        .map_err(|e| format!("starting the VMM's reader: {e}"))?;
    Ok(VmmControl(Arc::new(Inner {
        pid,
        sock,
        replies: Mutex::new(rx),
        done,
        stop_asked: Mutex::new(None),
        snapshot_out,
    })))
}

/// Clones the VMM process ([`vmm_command`]) with the control socket as fd 3, in new namespaces
/// when `jailed`; its stdin is /dev/null unless `keep_stdin`.
fn clone_vmm(sock: RawFd, jailed: bool, keep_stdin: bool) -> Result<i32, String> {
    use nix::sched::CloneFlags;
    // Everything the child needs is made before the clone: it only dups and execs.
    let (exe, argv_owned) = vmm_command()?;
    let mut env_owned = Vec::new();
    for key in ["RUST_LOG", "RVMM_KVM_KIND"] {
        if let Ok(v) = std::env::var(key) {
            env_owned.push(CString::new(format!("{key}={v}")).map_err(|e| e.to_string())?);
        }
    }
    if std::env::var_os("RVMM_KVM_KIND").is_none() {
        // The jail has no /sys: tell it what this host is.
        let kind = match crate::vmm::kvm::host_kind() {
            crate::vmm::HostKind::Pvm => "pvm",
            crate::vmm::HostKind::Hardware => "hardware",
        };
        env_owned.push(CString::new(format!("RVMM_KVM_KIND={kind}")).map_err(|e| e.to_string())?);
    }
    let argv: Vec<*const libc::c_char> = argv_owned
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = env_owned
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let devnull = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(io("opening /dev/null"))?;
    let null = devnull.as_raw_fd();
    let flags = if jailed {
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET
    } else {
        CloneFlags::empty()
    };
    let mut stack = vec![0u8; 64 * 1024];
    // SAFETY: the child runs on its own copy of our memory (no CLONE_VM) and calls only
    // async-signal-safe functions (prctl, dup2, fcntl, close_range, execve, _exit) on data made
    // before the clone, so no lock another thread held can be waited for.
    let pid = unsafe {
        nix::sched::clone(
            Box::new(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                if !keep_stdin {
                    libc::dup2(null, 0);
                }
                if sock == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0);
                } else {
                    libc::dup2(sock, 3);
                }
                libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
                libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
                libc::_exit(127)
            }),
            &mut stack,
            flags,
            Some(libc::SIGCHLD),
        )
    }
    .map_err(|e| format!("starting the VMM process: {e}"))?;
    Ok(pid.as_raw())
}

/// Whether this host can jail a VMM process (for `rvmm doctor`): a child is cloned into the
/// jail's namespaces, becomes the jail's uid with no capability and installs the event thread's
/// seccomp filter, as a VMM process does. Says what is missing when it cannot.
pub fn host_check() -> Result<String, String> {
    use nix::sched::CloneFlags;
    if !nix::unistd::geteuid().is_root() {
        return Err("rvmm is not running as root: it cannot create the VMM's namespaces".into());
    }
    let prog = filters::program(filters::Thread::Event)?;
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).map_err(|_| "the seccomp filter is too long".to_string())?,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    let id = jail_id("doctor");
    let mut stack = vec![0u8; 64 * 1024];
    // SAFETY: the child runs on a copy of our memory and makes raw system calls only, on data
    // made before the clone.
    let pid = unsafe {
        nix::sched::clone(
            Box::new(|| {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(id, id, id) != 0
                    || libc::setresuid(id, id, id) != 0
                {
                    libc::_exit(10);
                }
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || libc::syscall(libc::SYS_seccomp, 1u32, 0u32, &fprog) != 0
                {
                    libc::_exit(11);
                }
                libc::_exit(0)
            }),
            &mut stack,
            CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWPID
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWUTS
                | CloneFlags::CLONE_NEWNET,
            Some(libc::SIGCHLD),
        )
    }
    .map_err(|e| format!("cannot create mount, PID, IPC, UTS and network namespaces: {e}"))?;
    match nix::sys::wait::waitpid(pid, None) {
        Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => {
            let base = id - jail_id_offset("doctor");
            Ok(format!(
                "usable: namespaces, uid/gid {base}-{}, no capabilities, seccomp filters",
                base + (JAIL_ID_COUNT - 1)
            ))
        }
        Ok(nix::sys::wait::WaitStatus::Exited(_, 10)) => {
            Err(format!("cannot switch to the jail's uid {id}"))
        }
        Ok(nix::sys::wait::WaitStatus::Exited(_, 11)) => {
            Err("cannot install a seccomp filter (a kernel without CONFIG_SECCOMP_FILTER?)".into())
        }
        other => Err(format!("the jail probe ended as {other:?}")),
    }
}

/// The reader thread: replies to the requester, the exit to [`Done`]; when the socket closes,
/// reaps the process and explains an end without an exit message.
fn read_replies(sock: OwnedFd, pid: i32, tx: std::sync::mpsc::Sender<FromVmm>, done: &Done) {
    let mut end = None;
    loop {
        match proto::recv::<FromVmm>(sock.as_fd()) {
            Ok(Some((FromVmm::Exit(r), _))) => {
                end = Some(r.and_then(|s| match s.as_str() {
                    "reset" => Ok(VmExit::Reset),
                    "shutdown" => Ok(VmExit::Shutdown),
                    "stopped" => Ok(VmExit::Stopped),
                    other => Err(format!("the VMM reported {other:?}")),
                }));
            }
            Ok(Some((m, _))) => {
                let _ = tx.send(m);
            }
            Ok(None) => break,
            Err(e) => {
                end.get_or_insert(Err(format!("the VMM's messages are corrupt: {e}")));
                // SAFETY: killing our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                break;
            }
        }
    }
    drop(tx);
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let end = match end {
        Some(e) => e,
        None => Err(ended_how(pid, status)),
    };
    *lock(&done.end) = Some(end);
    done.cv.notify_all();
}

/// Why a VMM process ended without saying how its VM ended.
fn ended_how(pid: i32, status: i32) -> String {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        if sig == libc::SIGSYS {
            return match seccomp_audit(pid) {
                Some((thread, call)) => format!(
                    "the VMM's {thread} thread made a system call its seccomp filter forbids ({call}); the VMM process was killed"
                ),
                None => "the VMM process was killed by its seccomp filter (a forbidden system call)".into(),
            };
        }
        return format!("the VMM process was killed by signal {sig}");
    }
    format!(
        "the VMM process exited with status {} before its VM ended",
        libc::WEXITSTATUS(status)
    )
}

/// The kernel's audit record of a seccomp kill of `pid` (type 1326 in the kernel log): the
/// thread's name and the system call.
fn seccomp_audit(pid: i32) -> Option<(String, String)> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let needle = format!(" pid={pid} ");
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        let mut f = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .ok()?;
        let mut found = None;
        let mut buf = vec![0u8; 8192];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    if rec.contains("type=1326") && rec.contains(&needle) {
                        found = Some(rec.into_owned());
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => break,
            }
        }
        if let Some(rec) = found {
            let comm = rec
                .split("comm=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .unwrap_or("?")
                .trim_start_matches("rvmm-")
                .to_string();
            let nr = rec
                .split(" syscall=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse::<u32>().ok());
            let call = nr
                .map(|n| {
                    crate::security::syscalls::SYSCALLS
                        .iter()
                        .find(|(_, x)| *x == n)
                        .map(|(name, _)| format!("{name}, {n}"))
                        .unwrap_or_else(|| format!("system call {n}"))
                })
                .unwrap_or_else(|| "?".into());
            return Some((comm, call));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

impl VmmControl {
    /// How long the VMM's most delayed thread has waited for a CPU while runnable (the run queue
    /// delay of `/proc/PID/task/*/schedstat`): time the guest could have run and did not get.
    /// Zero when the kernel keeps no scheduler statistics.
    pub fn cpu_wait(&self) -> Duration {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.0.pid)) else {
            return Duration::ZERO;
        };
        let ns = tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        Duration::from_nanos(ns)
    }

    fn reply(&self, timeout: Duration) -> Result<FromVmm, String> {
        let rx = lock(&self.0.replies);
        match rx.recv_timeout(timeout) {
            Ok(m) => Ok(m),
            Err(RecvTimeoutError::Timeout) => {
                Err(format!("the VMM did not answer within {timeout:?}"))
            }
            Err(RecvTimeoutError::Disconnected) => Err(self.0.done.explain()),
        }
    }

    fn request(&self, msg: &ToVmm, fds: &[RawFd]) -> Result<FromVmm, String> {
        let rx = lock(&self.0.replies);
        proto::send(self.0.sock.as_fd(), msg, fds).map_err(|_| self.0.done.explain())?;
        match rx.recv_timeout(REQUEST_TIMEOUT) {
            Ok(m) => Ok(m),
            Err(RecvTimeoutError::Timeout) => {
                Err(format!("the VMM did not answer within {REQUEST_TIMEOUT:?}"))
            }
            Err(RecvTimeoutError::Disconnected) => Err(self.0.done.explain()),
        }
    }

    /// Whether the VMM process has ended (its reason is the run's one line then).
    pub fn has_ended(&self) -> bool {
        lock(&self.0.done.end).is_some()
    }

    /// Ends the VM (the process goes with it; killed if it does not within a grace time).
    pub fn stop(&self) {
        let mut asked = lock(&self.0.stop_asked);
        if asked.is_none() {
            *asked = Some(Instant::now());
        }
        let _ = proto::send(self.0.sock.as_fd(), &ToVmm::Stop, &[]);
    }

    /// Points disk `index` at the file `path` (opened here, read-only).
    pub fn replace_disk(&self, index: usize, path: &Path) -> Result<(), String> {
        let f = File::open(path).map_err(io(&format!("opening {}", path.display())))?;
        match self.request(&ToVmm::ReplaceDisk { index }, &[f.as_raw_fd()])? {
            FromVmm::Disk(r) => r,
            other => Err(format!("the VMM answered {other:?} to a disk")),
        }
    }

    /// Has the VMM write a snapshot (into the directory it was given), then moves its files
    /// into `dir`, owned by root.
    pub fn snapshot(&self, dir: &Path, tag: &str) -> Result<u64, String> {
        let out = self
            .0
            .snapshot_out
            .as_deref()
            .ok_or("this VMM has nowhere to write a snapshot")?;
        let bytes = match self.request(&ToVmm::Snapshot { tag: tag.into() }, &[])? {
            FromVmm::Snapshot(r) => r?,
            other => return Err(format!("the VMM answered {other:?} to a snapshot")),
        };
        std::fs::create_dir_all(dir).map_err(io(&format!("creating {}", dir.display())))?;
        for e in std::fs::read_dir(out).map_err(io(&format!("reading {}", out.display())))? {
            let e = e.map_err(io(&format!("reading {}", out.display())))?;
            let to = dir.join(e.file_name());
            std::fs::rename(e.path(), &to)
                .map_err(io(&format!("moving the snapshot to {}", to.display())))?;
            nix::unistd::chown(
                &to,
                Some(nix::unistd::Uid::from_raw(0)),
                Some(nix::unistd::Gid::from_raw(0)),
            )
            .map_err(|e| format!("handing {} back to root: {e}", to.display()))?;
        }
        Ok(bytes)
    }
}

impl Done {
    /// Why the VMM stopped answering (waiting a moment for the reader to reap it).
    fn explain(&self) -> String {
        let mut g = lock(&self.end);
        let t0 = Instant::now();
        while g.is_none() && t0.elapsed() < Duration::from_secs(2) {
            g = match self.cv.wait_timeout(g, Duration::from_millis(20)) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        match &*g {
            Some(Err(e)) => e.clone(),
            _ => "the VMM process has ended".into(),
        }
    }
}

impl Vmm {
    pub fn controller(&self) -> VmmControl {
        self.ctl.clone()
    }

    /// The VMM process and its control socket, for a process this one is about to exec
    /// (`vm::handover`); the socket stays open in this process until then.
    pub fn raw_parts(&self) -> (i32, RawFd) {
        (self.ctl.0.pid, self.ctl.0.sock.as_raw_fd())
    }

    /// Takes over the VMM process `pid` (a child of this process, started before this process
    /// exec'd) and its control socket `sock`, as [`Vmm::raw_parts`] gave them. The VMM must be
    /// idle: a reply in flight at the exec was lost with the old reader.
    /// `snapshot_out`: the directory the VMM was given to write a snapshot into, if any.
    pub fn adopt(pid: i32, sock: OwnedFd, snapshot_out: Option<PathBuf>) -> Result<Vmm, String> {
        Ok(Vmm {
            ctl: control(pid, sock, snapshot_out)?,
        })
    }

    pub fn is_finished(&self) -> bool {
        lock(&self.ctl.0.done.end).is_some()
    }

    /// Waits for the VM to end; a VMM told to stop that does not is killed after a grace time.
    pub fn wait(self) -> Result<VmExit, String> {
        let inner = &self.ctl.0;
        let mut g = lock(&inner.done.end);
        loop {
            if let Some(end) = g.take() {
                return end;
            }
            let stop_asked = *lock(&inner.stop_asked);
            if stop_asked.is_some_and(|t| t.elapsed() > STOP_GRACE) {
                // SAFETY: killing our own child (the reader thread reaps it).
                unsafe { libc::kill(inner.pid, libc::SIGKILL) };
            }
            g = match inner.done.cv.wait_timeout(g, Duration::from_millis(100)) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if lock(&self.done.end).is_none() {
            // SAFETY: killing our own child; the reader thread reaps it.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }
}

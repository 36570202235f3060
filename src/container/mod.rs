//! Container isolation: namespaces, overlayfs rootfs, pivot_root, cgroups, capabilities, seccomp.
//!
//! The parent (this module) prepares everything that can be prepared outside (directories,
//! cgroup, address, published ports, the seccomp program), clones the child into new
//! namespaces, finishes the host side (cgroup membership, veth), lets the child go, relays
//! signals and the terminal, and cleans up on every path. A `kill -9` of rvmm takes the workload
//! with it (PR_SET_PDEATHSIG); what is left on the host (cgroup dirs, veth, lease, run dir) is
//! found by the next `rvmm run` or `rvmm gc` through the run's state file.

pub mod cgroups;
mod child;
pub mod security;
pub mod state;

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{bail, Context};

use crate::image::ResolvedImage;
use crate::runspec::{NetworkMode, RunSpec};
use state::RunState;

/// How a run is kept and named (not part of the workload's RunSpec).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The store root (`--root`): container dirs live in ROOT/containers/ID.
    pub root: PathBuf,
    pub id: String,
    pub name: String,
    /// `--rm`: remove the container's writable layer when it exits (else `rvmm rm` does).
    pub remove: bool,
    pub image: String,
    /// VM isolation: boot the kernel instead of restoring a snapshot, and take none (`--cold`).
    pub cold: bool,
}

/// A new run ID: 64 hex digits from the kernel's random pool.
pub fn new_id() -> String {
    let mut b = [0u8; 32];
    let mut f = std::fs::File::open("/dev/urandom").ok();
    if let Some(f) = f.as_mut() {
        let _ = f.read_exact(&mut b);
    }
    hex::encode(b)
}

static CHILD: AtomicI32 = AtomicI32::new(0);
static STOPS: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        if sig == libc::SIGINT || sig == libc::SIGTERM {
            // A second Ctrl-C / TERM kills: PID 1 ignores signals it has no handler for.
            if STOPS.fetch_add(1, Ordering::SeqCst) >= 1 {
                // SAFETY: kill is async-signal-safe.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return;
            }
        }
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Signals rvmm relays to the workload (both isolations).
pub(crate) const RELAYED_SIGNALS: &[libc::c_int] = &[
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Installs `handler` for `sigs`. The handler must only use async-signal-safe calls.
pub(crate) fn install_handler(handler: extern "C" fn(libc::c_int), sigs: &[libc::c_int]) {
    for &sig in sigs {
        // SAFETY: installing a handler that only calls async-signal-safe functions (the caller's contract).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn install_forwarding() {
    install_handler(forward, RELAYED_SIGNALS);
    install_handler(forward, &[libc::SIGWINCH]);
}

/// A close-on-exec pipe: (read end, write end).
pub(crate) fn pipe() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: both fds were just returned by pipe2 and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// What a run (either isolation) left on the host, removed on drop (every exit path, panics included).
pub(crate) struct Cleanup {
    pub(crate) state: RunState,
    pub(crate) lease: Option<crate::net::Lease>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.state.release_host_resources();
        if let Some(l) = &self.lease {
            l.release();
        }
    }
}

/// Runs the spec in a container; returns the workload's exit status (Docker's numbering).
pub fn run(spec: &RunSpec, image: &ResolvedImage, opts: &RunOptions) -> anyhow::Result<u8> {
    if !nix::unistd::geteuid().is_root() {
        bail!("container isolation needs root (rootless containers are not supported yet)");
    }
    state::gc(&opts.root);
    if state::list(&opts.root)?.iter().any(|s| s.name == opts.name) {
        bail!(
            "the name {:?} is already in use by another container",
            opts.name
        );
    }
    let dir = state::container_dir(&opts.root, &opts.id);
    for d in ["upper", "work", "rootfs"] {
        std::fs::create_dir_all(dir.join(d))
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut cleanup = Cleanup {
        state: RunState::new(opts, spec, "container", &dir),
        lease: None,
    };
    cleanup.state.save()?;
    let store = crate::image::Store::open(&opts.root)?;
    let _layers_in_use = store.use_layers()?;

    // Host side: cgroup, network, published ports.
    // The host's cgroup mounts, read once: where the run's cgroup goes, and what the container
    // mounts under /sys/fs/cgroup.
    let layout = cgroups::Layout::detect()?;
    let cg = cgroups::create(&layout, &opts.id, &spec.limits)?;
    cleanup.state.cgroup = Some(cg.clone());
    cleanup.state.save()?;
    let mut spec = spec.clone();
    let mut publisher = None;
    if spec.network.mode == NetworkMode::Bridge {
        let (lease, p) = crate::net::attach_run(&mut spec.network, &opts.id)?;
        cleanup.lease = Some(lease);
        publisher = Some(p);
    } else if !spec.network.ports.is_empty() {
        bail!("-p needs --network bridge");
    }

    // /etc files.
    let addr = spec
        .network
        .address
        .as_deref()
        .and_then(|a| a.split('/').next())
        .unwrap_or("127.0.1.1")
        .to_string();
    std::fs::write(dir.join("hostname"), format!("{}\n", spec.hostname))?;
    std::fs::write(
        dir.join("hosts"),
        format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{addr}\t{}\n",
            spec.hostname
        ),
    )?;
    std::fs::write(dir.join("resolv.conf"), crate::net::host_resolv_conf())?;

    // The terminal.
    let pty = if spec.tty {
        let p =
            nix::pty::openpty(winsize().as_ref(), None).context("allocating a pseudo-terminal")?;
        Some(p)
    } else {
        None
    };

    let (sync_r, sync_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let plan = make_plan(
        &spec,
        image,
        &dir,
        layout,
        pty.as_ref().map(|p| p.slave.as_raw_fd()),
        sync_r.as_raw_fd(),
        err_w.as_raw_fd(),
    )?;

    let flags = nix::sched::CloneFlags::CLONE_NEWNS
        | nix::sched::CloneFlags::CLONE_NEWPID
        | nix::sched::CloneFlags::CLONE_NEWUTS
        | nix::sched::CloneFlags::CLONE_NEWIPC
        | nix::sched::CloneFlags::CLONE_NEWNET;
    // The cgroup namespace comes later, from the child, once it is in its cgroup.
    let mut stack = vec![0u8; 1 << 20];
    // SAFETY: the child runs `child::main` on its own copy of our memory (no CLONE_VM) and either
    // execs or _exits; rvmm is single-threaded here, so no lock can be held across the clone.
    let pid = unsafe {
        nix::sched::clone(
            Box::new(|| child::main(&plan)),
            &mut stack,
            flags,
            Some(libc::SIGCHLD),
        )
    }
    .context("clone: creating the container's namespaces")?;
    let pid = pid.as_raw();
    drop(sync_r);
    drop(err_w);
    let pty_master = pty.map(|p| {
        drop(p.slave);
        p.master
    });
    cleanup.state.pid = pid;
    let _ = cleanup.state.save();

    let started = (|| -> anyhow::Result<()> {
        cg.add(pid)?;
        if let Some(l) = &cleanup.lease {
            let veth = crate::net::attach_container(&opts.id, pid, l.addr)?;
            cleanup.state.veth = Some(veth);
            cleanup.state.save()?;
        }
        let mut w = std::fs::File::from(sync_w);
        w.write_all(b"g").context("starting the container")?;
        Ok(())
    })();
    if let Err(e) = started {
        // SAFETY: kill/waitpid on our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        return Err(e);
    }
    let mut msg = String::new();
    let _ = std::fs::File::from(err_r).read_to_string(&mut msg);
    if !msg.is_empty() {
        let status = wait(pid);
        let (code, text) = msg.split_once('\t').unwrap_or(("125", msg.as_str()));
        let code: u8 = code.parse().unwrap_or(125);
        if code == 125 {
            bail!("starting the container: {text}");
        }
        eprintln!("rvmm: {text}");
        let _ = status;
        cleanup.state.finish(code as i32, opts.remove);
        return Ok(code);
    }

    CHILD.store(pid, Ordering::SeqCst);
    install_forwarding();
    if let (Some(p), Some(l)) = (publisher, &cleanup.lease) {
        p.start(l.addr);
    }
    let relay = pty_master.map(|m| tty_relay(m, spec.stdin));

    let status = wait(pid);
    CHILD.store(0, Ordering::SeqCst);
    if let Some((out, _raw)) = relay {
        let _ = out.join();
    }
    let code = match status {
        Status::Exited(c) => c,
        Status::Signaled(s) => 128 + s,
    };
    if matches!(status, Status::Signaled(libc::SIGKILL)) && cg.oom_killed() {
        eprintln!(
            "rvmm: the container was killed by the kernel's OOM killer: it ran out of memory (--memory {})",
            spec.limits.memory_bytes.map(human).unwrap_or_else(|| "unlimited".into())
        );
    }
    cleanup.state.finish(code, opts.remove);
    Ok(code.clamp(0, 255) as u8)
}

fn human(b: u64) -> String {
    if b >= 1 << 30 && b % (1 << 30) == 0 {
        format!("{}g", b >> 30)
    } else if b >= 1 << 20 && b % (1 << 20) == 0 {
        format!("{}m", b >> 20)
    } else {
        format!("{b}")
    }
}

#[derive(Debug, Clone, Copy)]
enum Status {
    Exited(i32),
    Signaled(i32),
}

fn wait(pid: i32) -> Status {
    loop {
        let mut st = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut st, 0) };
        if r == pid {
            if libc::WIFEXITED(st) {
                return Status::Exited(libc::WEXITSTATUS(st));
            }
            if libc::WIFSIGNALED(st) {
                return Status::Signaled(libc::WTERMSIG(st));
            }
            continue;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Status::Exited(125);
        }
    }
}

/// The size of the terminal on our stdout, if it is one.
pub(crate) fn winsize() -> Option<nix::pty::Winsize> {
    // SAFETY: TIOCGWINSZ fills a winsize struct.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) == 0).then_some(nix::pty::Winsize {
            ws_row: ws.ws_row,
            ws_col: ws.ws_col,
            ws_xpixel: ws.ws_xpixel,
            ws_ypixel: ws.ws_ypixel,
        })
    }
}

/// Terminal restored on drop.
pub(crate) struct RawMode(Option<libc::termios>);

impl RawMode {
    /// Puts our stdin in raw mode when it is a terminal (a no-op otherwise).
    pub(crate) fn stdin() -> RawMode {
        // SAFETY: termios calls on fd 0 with a valid struct.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) == 0 {
                let saved = t;
                libc::cfmakeraw(&mut t);
                libc::tcsetattr(0, libc::TCSANOW, &t);
                RawMode(Some(saved))
            } else {
                RawMode(None)
            }
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restoring the saved attributes of our stdin.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

/// Copies the pty to stdout (until the workload closes it) and, with -i, stdin to the pty.
fn tty_relay(master: OwnedFd, stdin: bool) -> (std::thread::JoinHandle<()>, RawMode) {
    let raw = if stdin {
        RawMode::stdin()
    } else {
        RawMode(None)
    };
    let mut out = std::fs::File::from(master);
    if stdin {
        if let Ok(mut to) = out.try_clone() {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut std::io::stdin(), &mut to);
            });
        }
    }
    let h = std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        let mut stdout = std::io::stdout();
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break, // EIO once the last slave fd closes
                Ok(n) => {
                    let _ = stdout.write_all(&buf[..n]);
                    let _ = stdout.flush();
                }
            }
        }
    });
    (h, raw)
}

fn cstr(s: &str) -> anyhow::Result<CString> {
    CString::new(s).with_context(|| format!("{s:?} contains a NUL byte"))
}

fn make_plan(
    spec: &RunSpec,
    image: &ResolvedImage,
    dir: &Path,
    layout: cgroups::Layout,
    tty_slave: Option<RawFd>,
    sync_fd: RawFd,
    err_fd: RawFd,
) -> anyhow::Result<child::Plan> {
    let lower: Vec<String> = image
        .layers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    if lower.iter().any(|l| l.contains(',') || l.contains(':')) {
        bail!("the store path must not contain ',' or ':' (overlayfs options)");
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        dir.join("upper").display(),
        dir.join("work").display()
    );
    if opts.len() > 4000 {
        bail!(
            "too many layers for one overlayfs mount ({})",
            image.layers.len()
        );
    }
    let path = spec
        .env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(crate::runspec::DEFAULT_PATH);
    let mut groups: Vec<libc::gid_t> = vec![spec.user.gid];
    groups.extend(spec.user.additional_gids.iter().copied());
    groups.dedup();
    Ok(child::Plan {
        rootfs: cstr(&dir.join("rootfs").display().to_string())?,
        overlay_opts: cstr(&opts)?,
        hostname: cstr(&spec.hostname)?,
        argv: spec
            .argv
            .iter()
            .map(|a| cstr(a))
            .collect::<anyhow::Result<_>>()?,
        env: spec
            .env
            .iter()
            .map(|a| cstr(a))
            .collect::<anyhow::Result<_>>()?,
        path_dirs: path
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| d.as_bytes().to_vec())
            .collect(),
        cwd: cstr(&spec.cwd)?,
        uid: spec.user.uid,
        gid: spec.user.gid,
        groups,
        read_only: spec.read_only,
        etc_files: ["hosts", "hostname", "resolv.conf"]
            .iter()
            .map(|f| {
                Ok((
                    cstr(&dir.join(f).display().to_string())?,
                    cstr(&format!("/etc/{f}"))?,
                ))
            })
            .collect::<anyhow::Result<_>>()?,
        volumes: spec
            .mounts
            .iter()
            .map(|m| Ok((cstr(&m.source)?, cstr(&m.destination)?, m.read_only)))
            .collect::<anyhow::Result<_>>()?,
        // v1 hosts give the run a devices cgroup, which keeps MKNOD safe to grant.
        caps: security::default_caps(layout.version() == cgroups::Version::V1),
        seccomp: security::seccomp_program(),
        tty_slave,
        tty_path: tty_slave
            .and_then(|fd| std::fs::read_link(format!("/proc/self/fd/{fd}")).ok())
            .map(|p| cstr(&p.display().to_string()))
            .transpose()?,
        attach_stdin: spec.stdin,
        cgroup_mounts: layout.mounts,
        sync_fd,
        err_fd,
    })
}

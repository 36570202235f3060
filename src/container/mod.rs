//! Container isolation: namespaces, overlayfs rootfs, pivot_root, cgroups, capabilities, seccomp.
//!
//! The parent (this module) prepares everything that can be prepared outside (directories,
//! cgroup, address, published ports, the seccomp program), clones the child into new
//! namespaces, finishes the host side (cgroup membership, veth), lets the child go, relays
//! signals and the terminal, and cleans up on every path. A `kill -9` of rvmm takes the workload
//! with it (PR_SET_PDEATHSIG); what is left on the host (cgroup dirs, veth, lease, run dir) is
//! found by the next `rvmm run` or `rvmm gc` through the run's state file.

pub(crate) mod child;
pub mod exec;

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use rvmm_shim::signals;

use crate::error::{IoContext, IoError};

/// What can go wrong in container isolation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Run(#[from] crate::run::Error),
    #[error(transparent)]
    Cgroups(#[from] crate::cgroups::Error),
    #[error(transparent)]
    Net(#[from] crate::net::Error),
    #[error("container isolation needs root (rootless containers are not supported yet)")]
    NotRoot,
    #[error("{what}")]
    Sys {
        what: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    #[error("the store path must not contain ',' or ':' (overlayfs options)")]
    StorePath,
    #[error("too many layers for one overlayfs mount ({0})")]
    TooManyLayers(usize),
    #[error("starting the container: {0}")]
    Start(String),
    #[error("{0} is not running")]
    NotRunning(String),
    #[error("exec in {run}: {text}")]
    Exec { run: String, text: String },
}

pub type Result<T> = std::result::Result<T, Error>;

fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> Error {
    move |source| Error::Sys { what, source }
}

use crate::cgroups;
use crate::image::ResolvedImage;
use crate::run::stdio::{pipe, winsize, RawMode};
use crate::run::{Isolation, Prepared, RunOptions};
use crate::runspec::RunSpec;

/// How long an attached run's workload may live before rvmm hands the rest of the run to
/// `rvmm-shim`: a run that ends sooner ends here, without the two execs (~3 ms) the handover
/// and the shim's `rvmm __finish` cost.
const SHIM_AFTER: std::time::Duration = std::time::Duration::from_millis(100);

/// Runs the spec in a container; returns the workload's exit status (Docker's numbering).
pub fn run(spec: &RunSpec, image: &ResolvedImage, opts: &RunOptions) -> Result<u8> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::NotRoot);
    }
    let mut times = crate::run::timings::Timings::start();
    times.mark("resolved");
    let mut run = crate::run::prepare(spec, opts, Isolation::Container)?;
    times.mark("prepared");
    let dir = run.dir.clone();
    for d in ["upper", "work", "rootfs"] {
        std::fs::create_dir_all(dir.join(d)).at(|| format!("creating {}", dir.display()))?;
    }
    // The host's cgroup mounts, read once: where the run's cgroup goes, and what the container
    // mounts under /sys/fs/cgroup.
    let layout = cgroups::Layout::detect()?;
    let cg = cgroups::create(
        &layout,
        &opts.id,
        &run.spec.limits,
        &run.spec.cpus_allowed,
        run.spec.privileged,
        &run.spec.devices,
    )?;
    run.cleanup.state.cgroup = Some(cg.clone());
    run.cleanup.state.save()?;
    times.mark("cgroup");

    // The /etc files the spec describes, bound into the container from the run directory.
    for (name, body) in run.spec.etc.entries() {
        std::fs::write(dir.join(name), body)
            .at(|| format!("writing {}", dir.join(name).display()))?;
    }

    // The terminal.
    let pty = if run.spec.tty {
        let p = nix::pty::openpty(winsize().as_ref(), None)
            .map_err(sys("allocating a pseudo-terminal"))?;
        Some(p)
    } else {
        None
    };

    // A detached run with no supervisor reading its output: the workload writes into pipes
    // whose other ends go to the run's log (`run::logs::relay`).
    let log_pipes = match (&pty, opts.logs_itself) {
        (None, true) => Some((pipe()?, pipe()?)),
        _ => None,
    };
    let (sync_r, sync_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let mut plan = make_plan(
        &run.spec,
        image,
        &dir,
        (layout, &cg),
        pty.as_ref().map(|p| p.slave.as_raw_fd()),
        (sync_r.as_raw_fd(), err_w.as_raw_fd()),
    )?;
    plan.output = log_pipes
        .as_ref()
        .map(|((_, o), (_, e))| (o.as_raw_fd(), e.as_raw_fd()));

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
    .map_err(sys("clone: creating the container's namespaces"))?;
    let pid = pid.as_raw();
    times.mark("cloned");
    drop(sync_r);
    drop(err_w);
    let log_pipes = log_pipes.map(|((out, _), (err, _))| (out, err));
    let pty_master = pty.map(|p| {
        drop(p.slave);
        p.master
    });
    run.cleanup.state.pid = pid;
    let _ = run.cleanup.state.save();
    // Signals go to the child from now on: one that arrives while the workload starts (its
    // output may already be out) must not kill rvmm before it cleans up.
    signals::forward_to(pid, 0);

    let started = (|| -> Result<()> {
        // The child joins the cgroup itself (container::child).
        if let Some(addr) = run.address() {
            let veth = crate::net::attach_container(&opts.id, pid, addr)?;
            run.cleanup.state.veth = Some(veth);
            run.cleanup.state.mac = Some(crate::net::mac_string(&crate::net::mac_for(&opts.id)));
            run.cleanup.state.save()?;
        }
        // A child that failed before it read this (joining its cgroup) has said why on the error
        // pipe, which is read next.
        let _ = std::fs::File::from(sync_w).write_all(b"g");
        Ok(())
    })();
    if let Err(e) = started {
        signals::stop_forwarding();
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
        let _ = wait(pid);
        signals::stop_forwarding();
        let (code, text) = msg.split_once('\t').unwrap_or(("125", msg.as_str()));
        let code: u8 = code.parse().unwrap_or(125);
        return not_started(run, code, text, opts.remove);
    }
    if opts.logs_itself {
        // `rvmm run -d` stops reading this process's stdout and stderr once the start is
        // reported: what rvmm still has to say goes to the run's log (`say`), and nothing it
        // writes may meet a pipe without a reader (a broken pipe ended runs under load).
        rvmm_shim::null_stdio();
    }
    run.started();
    times.mark("exec");

    let publisher = run.publisher.take();
    let mut ended = None;
    if let (None, Some(shim), Ok(rvmm)) = (
        &pty_master,
        crate::run::shim::binary_path(),
        std::env::current_exe(),
    ) {
        // The rest of the run (waiting, relaying signals, ports and output, the epilogue) needs
        // none of rvmm's code: the small shim takes over this process. A run with nothing to
        // relay meanwhile gets SHIM_AFTER to end here first, as a short run did before the shim.
        if log_pipes.is_none() && publisher.as_ref().is_none_or(|p| p.is_empty()) {
            ended = signals::wait_child_for(pid, SHIM_AFTER);
        }
        if ended.is_none() {
            let (tcp, udp) = publisher.as_ref().map(|p| p.raw_fds()).unwrap_or_default();
            let handover = crate::run::shim::Handover {
                rvmm,
                dir: dir.clone(),
                pid,
                stops: signals::stops(),
                remove: opts.remove,
                memory: run.spec.limits.memory_bytes,
                target: run.address(),
                tcp,
                udp,
                log: log_pipes
                    .as_ref()
                    .map(|(o, e)| (o.as_raw_fd(), e.as_raw_fd())),
            };
            times.mark("handover");
            say(&dir, opts.logs_itself, times.line("container"));
            let e = crate::run::shim::exec_wait(&shim, &handover, &[run.layers_fd()]);
            let line = format!(
                "rvmm: warning: starting {}: {e}; rvmm keeps the run itself\n",
                shim.display()
            );
            say(&dir, opts.logs_itself, Some(line));
        }
    }
    if let (Some(p), Some(addr)) = (publisher, run.address()) {
        p.start(addr);
    }
    let relay = pty_master.map(|m| tty_relay(m, run.spec.stdin));
    let log = log_pipes.map(|(out, err)| crate::run::logs::relay(dir.clone(), out, err));

    let status = ended.unwrap_or_else(|| wait(pid));
    signals::stop_forwarding();
    if let Some((out, _raw)) = relay {
        let _ = out.join();
    }
    if let Some(log) = log {
        log.finish();
    }
    let (code, line) = exit_code(status, Some(&cg), run.spec.limits.memory_bytes);
    say(&dir, opts.logs_itself, line);
    times.mark("exited");
    let code = run.finish(code, opts.remove);
    times.mark("finished");
    say(&dir, opts.logs_itself, times.line("container"));
    Ok(code)
}

/// `rvmm __finish`: the epilogue of a run kept by `rvmm-shim` once its workload ended with
/// `status`: the out-of-memory line if that is how it ended (to the log of a detached run,
/// else to stderr), then the state, host resources and `--rm`, as an attached run ends.
/// Returns the run's status.
pub fn finish_kept(
    dir: &Path,
    status: signals::Status,
    remove: bool,
    memory: Option<u64>,
    log: bool,
) -> u8 {
    let Some(mut state) = crate::run::RunState::load(dir) else {
        // Nothing to finish from: `rvmm gc` frees what the run held, as after a kill.
        let line = format!(
            "rvmm: the run's state ({}) is unreadable; `rvmm gc` will clean up after it\n",
            dir.join("state.json").display()
        );
        say(dir, log, Some(line));
        return status.code().clamp(0, 255) as u8;
    };
    let (code, line) = exit_code(status, state.cgroup.as_ref(), memory);
    say(dir, log, line);
    state.finish(code, remove);
    code.clamp(0, 255) as u8
}

/// rvmm's own last line about a run, if any: to its log (a detached run), else to stderr.
fn say(dir: &Path, log: bool, line: Option<String>) {
    if let Some(line) = line {
        crate::run::logs::say(dir, log, &line);
    }
}

/// The run's status (Docker numbering) from the workload's, and the line (with its newline) that
/// says the kernel's OOM killer ended it.
fn exit_code(
    status: signals::Status,
    cg: Option<&cgroups::Cgroup>,
    memory: Option<u64>,
) -> (i32, Option<String>) {
    let oom =
        status == signals::Status::Signaled(libc::SIGKILL) && cg.is_some_and(|c| c.oom_killed());
    let line = oom.then(|| {
        format!(
            "rvmm: the container was killed by the kernel's OOM killer: it ran out of memory (--memory {})\n",
            memory
                .map(crate::run::human_bytes)
                .unwrap_or_else(|| "unlimited".into())
        )
    });
    (status.code(), line)
}

/// The workload could not be started (status 125 setup, 126 cannot execute, 127 not found): a
/// setup failure is an error; 126 and 127 are the workload's status, with the reason on stderr.
pub(crate) fn not_started(run: Prepared, code: u8, text: &str, remove: bool) -> Result<u8> {
    if code == 125 {
        run.fail(remove);
        return Err(Error::Start(text.to_string()));
    }
    eprintln!("rvmm: {text}");
    Ok(run.finish(i32::from(code), remove))
}

fn wait(pid: i32) -> signals::Status {
    signals::wait_child(pid).unwrap_or(signals::Status::Exited(125))
}

/// Copies the pty to stdout (until the workload closes it) and, with -i, stdin to the pty.
pub(crate) fn tty_relay(master: OwnedFd, stdin: bool) -> (std::thread::JoinHandle<()>, RawMode) {
    let raw = if stdin {
        RawMode::stdin()
    } else {
        RawMode::none()
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

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Nul(s.to_string()))
}

fn make_plan(
    spec: &RunSpec,
    image: &ResolvedImage,
    dir: &Path,
    (layout, cgroup): (cgroups::Layout, &cgroups::Cgroup),
    tty_slave: Option<RawFd>,
    (sync_fd, err_fd): (RawFd, RawFd),
) -> Result<child::Plan> {
    let lower: Vec<String> = image
        .layers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    if lower.iter().any(|l| l.contains(',') || l.contains(':')) {
        return Err(Error::StorePath);
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        dir.join("upper").display(),
        dir.join("work").display()
    );
    if opts.len() > 4000 {
        return Err(Error::TooManyLayers(image.layers.len()));
    }
    // Strings the child passes to system calls must hold no NUL: refused here, in the parent.
    for s in spec
        .argv
        .iter()
        .chain(&spec.env)
        .chain([&spec.cwd, &spec.hostname])
    {
        cstr(s)?;
    }
    Ok(child::Plan {
        rootfs: cstr(&dir.join("rootfs").display().to_string())?,
        overlay_opts: cstr(&opts)?,
        spec: spec.clone(),
        etc_files: spec
            .etc
            .entries()
            .iter()
            .map(|(f, _)| {
                Ok((
                    cstr(&dir.join(f).display().to_string())?,
                    format!("/etc/{f}"),
                ))
            })
            .collect::<Result<_>>()?,
        sources: spec
            .mounts
            .iter()
            .map(|m| cstr(&m.source))
            .collect::<Result<_>>()?,
        tty_slave,
        tty_path: tty_slave
            .and_then(|fd| std::fs::read_link(format!("/proc/self/fd/{fd}")).ok())
            .map(|p| cstr(&p.display().to_string()))
            .transpose()?,
        cgroup_mounts: layout.mounts,
        sync_fd,
        err_fd,
        cgroup: cgroup.clone(),
        output: None,
    })
}

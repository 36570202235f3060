//! `rvmm exec` into a running container: a new process in the workload's namespaces and cgroup,
//! with the workload's privileges (the same `rvmm-workload` steps as the first process: limits,
//! bounding set, user, capabilities, cwd, PATH lookup, seccomp).

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use super::{sys, Error, Result};
use crate::error::{last_os_error, IoContext};

use crate::run::state::RunState;
use crate::run::stdio::pipe;
use crate::runspec::RunSpec;

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// The namespaces an exec joins, in this order (the mount namespace last: after it the host's
/// /proc is out of reach).
pub(crate) const NAMESPACES: &[(&str, libc::c_int)] = &[
    ("cgroup", libc::CLONE_NEWCGROUP),
    ("ipc", libc::CLONE_NEWIPC),
    ("uts", libc::CLONE_NEWUTS),
    ("net", libc::CLONE_NEWNET),
    ("mnt", libc::CLONE_NEWNS),
];

/// Runs `spec` (the run's own spec with the exec's argv, env, user and cwd) in the container of
/// `run`; returns its exit status (Docker's numbering: 126/127 when it cannot be executed).
pub fn exec(run: &RunState, spec: &RunSpec) -> Result<u8> {
    if !run.alive() || run.pid <= 0 {
        return Err(Error::NotRunning(run.name.clone()));
    }
    let pid = run.pid;
    // Every namespace file first: a workload that exits now fails here, not half way in.
    let open = |ns: &str| {
        std::fs::File::open(format!("/proc/{pid}/ns/{ns}"))
            .at(|| format!("opening the {ns} namespace of {}", run.name))
    };
    let pidns = open("pid")?;
    // Ours, to go back to after the fork: a process whose children go to another pid namespace
    // cannot create threads (clone fails with EINVAL), and `-t` relays the pty on threads.
    let own_pidns =
        std::fs::File::open("/proc/self/ns/pid").at(|| "opening rvmm's own pid namespace")?;
    let others = NAMESPACES
        .iter()
        .map(|(n, f)| open(n).map(|file| (file, *f)))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    // SAFETY: setns on a namespace fd we opened; a pid namespace only applies to children.
    if unsafe { libc::setns(pidns.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
        return Err(last_os_error("joining the pid namespace").into());
    }
    let pty = if spec.tty {
        Some(
            nix::pty::openpty(crate::run::stdio::winsize().as_ref(), None)
                .map_err(sys("allocating a pseudo-terminal"))?,
        )
    } else {
        None
    };
    let (err_r, err_w) = pipe()?;
    // SAFETY: rvmm exec is single-threaded here; the child only makes system calls, allocates
    // (no lock can be held: no other thread exists) and execs or _exits.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(last_os_error("fork").into());
    }
    if child == 0 {
        drop(err_r);
        if let Some(p) = &pty {
            let slave = p.slave.as_raw_fd();
            // SAFETY: making the pty our controlling terminal and stdio, in the child.
            unsafe {
                libc::setsid();
                libc::ioctl(slave, libc::TIOCSCTTY, 0);
                if spec.stdin {
                    libc::dup2(slave, 0);
                }
                libc::dup2(slave, 1);
                libc::dup2(slave, 2);
            }
        }
        let f = in_child(run, spec, &others);
        let line = format!("{}\t{}", f.status, f.message);
        // SAFETY: writing our own buffer to the error pipe, then leaving without destructors.
        unsafe {
            libc::write(err_w.as_raw_fd(), line.as_ptr().cast(), line.len());
            libc::_exit(i32::from(f.status))
        }
    }
    drop(err_w);
    // SAFETY: setns back to the pid namespace this process is in.
    if unsafe { libc::setns(own_pidns.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
        let e = last_os_error("returning to rvmm's own pid namespace");
        // SAFETY: killing and reaping the child we just forked; nothing will use its output.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
        return Err(e.into());
    }
    CHILD.store(child, Ordering::SeqCst);
    crate::run::install_handler(forward, crate::run::RELAYED_SIGNALS);
    let relay = pty.map(|p| {
        drop(p.slave);
        super::tty_relay(p.master, spec.stdin)
    });
    let mut msg = String::new();
    let _ = std::fs::File::from(err_r).read_to_string(&mut msg);
    let mut st = 0;
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(child, &mut st, 0) };
        if r == child || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
    CHILD.store(0, Ordering::SeqCst);
    if let Some((out, _raw)) = relay {
        let _ = out.join();
    }
    if !msg.is_empty() {
        let (code, text) = msg.split_once('\t').unwrap_or(("125", msg.as_str()));
        let code: u8 = code.parse().unwrap_or(125);
        if code == 125 {
            return Err(Error::Exec {
                run: run.name.clone(),
                text: text.to_string(),
            });
        }
        eprintln!("rvmm: {text}");
        return Ok(code);
    }
    Ok(if libc::WIFEXITED(st) {
        libc::WEXITSTATUS(st) as u8
    } else {
        (128 + libc::WTERMSIG(st)).clamp(0, 255) as u8
    })
}

/// In the forked child: the run's cgroup, its namespaces, then the workload's privileges and
/// exec. Returns only on failure.
fn in_child(
    run: &RunState,
    spec: &RunSpec,
    namespaces: &[(std::fs::File, libc::c_int)],
) -> rvmm_workload::Failure {
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if let Err(f) = enter(run.cgroup.as_ref(), namespaces) {
        return f;
    }
    match rvmm_workload::privileges::become_workload(spec, false) {
        Ok(prog) => rvmm_workload::exec(&prog, &spec.argv, &spec.env),
        Err(f) => f,
    }
}

/// In a process that is to run in a container: its cgroup, then its namespaces (the mount
/// namespace last), then `/` of the container's root. rvmm exec and rvmm-oci exec.
pub(crate) fn enter(
    cgroup: Option<&crate::cgroups::Cgroup>,
    namespaces: &[(std::fs::File, libc::c_int)],
) -> std::result::Result<(), rvmm_workload::Failure> {
    use rvmm_workload::Failure;
    if let Some(cg) = cgroup {
        cg.join_self()
            .map_err(|e| Failure::setup(format!("joining the container's cgroup: {e:#}")))?;
    }
    for (f, kind) in namespaces {
        // SAFETY: setns on a namespace fd we opened.
        if unsafe { libc::setns(f.as_raw_fd(), *kind) } != 0 {
            return Err(Failure::os("joining the container's namespaces"));
        }
    }
    // The mount namespace's root is the container's (it pivoted); start from it.
    // SAFETY: chdir with a NUL-terminated path.
    unsafe { libc::chdir(c"/".as_ptr()) };
    Ok(())
}

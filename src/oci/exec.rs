//! `exec ID`: a new process in a running container, as runc does it: the process is the
//! container's own (config.json) with the command line's changes, or a whole process document
//! (`--process F`, what conmon and containerd's shim pass). It joins the container's cgroup and
//! namespaces and takes the same `rvmm-workload` steps as the init (limits, bounding set, user,
//! capabilities, no_new_privs, seccomp, cwd, PATH lookup). With `--detach` rvmm-oci exits once
//! the process runs (the engine's subreaper adopts it); otherwise it waits and exits with its
//! status.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use super::config::{Config, Process};
use super::state::{Status, Store};
use super::{Error, Result};
use crate::error::IoContext;

/// `exec`'s options (runc's flags).
#[derive(Debug, Default)]
pub struct ExecOptions {
    /// A process document (JSON, the spec's `process`); replaces everything below but the
    /// descriptors and the pid file.
    pub process: Option<PathBuf>,
    pub args: Vec<String>,
    pub cwd: Option<String>,
    /// Added to (or replacing, by name) the container's environment.
    pub env: Vec<String>,
    /// `UID[:GID]`.
    pub user: Option<String>,
    pub additional_gids: Vec<u32>,
    pub tty: bool,
    pub no_new_privs: bool,
    /// Capabilities added to the process's sets.
    pub caps: Vec<String>,
    pub detach: bool,
    pub pid_file: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
    pub preserve_fds: u32,
}

/// Runs the process; returns its exit status (0 at once with `detach`).
pub fn exec(store: &Store, id: &str, o: &ExecOptions) -> Result<u8> {
    let c = store.load(id)?;
    let status = store.status(&c);
    if !matches!(status, Status::Running | Status::Created) {
        return Err(Error::State {
            id: id.into(),
            status,
            what: "a process can only be executed in a running container",
        });
    }
    let mut cfg = Config::load(&c.bundle)?;
    let process = process(&cfg, o)?;
    if process.args.is_empty() {
        return Err(Error::Invalid("exec: no command (args is empty)".into()));
    }
    if process.terminal && o.console_socket.is_none() {
        return Err(Error::Invalid(
            "exec: a terminal is asked for: --console-socket is needed".into(),
        ));
    }
    if c.vm {
        return super::vm::exec(store, &c, &process, o);
    }
    let size = process.console_size;
    cfg.process = Some(process);
    let spec = super::workload(&cfg)?;

    // Every namespace file first: a container that exits now fails here, not half way in.
    let pid = c.pid;
    let open = |ns: &str| {
        std::fs::File::open(format!("/proc/{pid}/ns/{ns}"))
            .at(|| format!("opening the {ns} namespace of container {id}"))
    };
    let same = |ns: &str, f: &std::fs::File| {
        let ours = std::fs::metadata(format!("/proc/self/ns/{ns}")).map(|m| m.ino());
        let theirs = f.metadata().map(|m| m.ino());
        matches!((ours, theirs), (Ok(a), Ok(b)) if a == b)
    };
    let mut joins = Vec::new();
    for (ns, flag) in crate::container::exec::NAMESPACES {
        let f = open(ns)?;
        if !same(ns, &f) {
            joins.push((f, *flag));
        }
    }
    let pidns = open("pid")?;
    let own_pidns =
        std::fs::File::open("/proc/self/ns/pid").at(|| "opening rvmm-oci's own pid namespace")?;
    let console_fd = super::console_socket(o.console_socket.as_deref(), cfg.process().terminal)?;
    let (err_r, err_w) = crate::run::stdio::pipe()?;
    let inherit_pidns = !same("pid", &pidns);
    // SAFETY: setns on a namespace fd we opened; a pid namespace only applies to children.
    if inherit_pidns && unsafe { libc::setns(pidns.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
        return Err(Error::Create(format!(
            "joining the pid namespace of container {id}: {}",
            std::io::Error::last_os_error()
        )));
    }
    let parent_fds = [err_r.as_raw_fd()];
    // SAFETY: rvmm-oci is single-threaded; the child only makes system calls and allocates, then
    // execs or _exits.
    let child = unsafe { libc::fork() };
    if child == 0 {
        let f = in_child(
            &c,
            &spec,
            &joins,
            &Child {
                parent_fds: &parent_fds,
                console: console_fd.as_ref().map(AsRawFd::as_raw_fd),
                size,
                detach: o.detach,
                preserve_fds: o.preserve_fds,
                umask: cfg.process().user.umask,
            },
        );
        let line = format!("{}\t{}", f.status, f.message);
        rvmm_workload::write_all(err_w.as_raw_fd(), line.as_bytes());
        // SAFETY: leaving the child without running destructors.
        unsafe { libc::_exit(i32::from(f.status)) }
    }
    let fork_err = std::io::Error::last_os_error();
    // Back to the pid namespace this process is in (hooks and anything else we spawn must not
    // land in the container's).
    if inherit_pidns {
        // SAFETY: setns on a namespace fd we opened.
        unsafe { libc::setns(own_pidns.as_raw_fd(), libc::CLONE_NEWPID) };
    }
    if child < 0 {
        return Err(Error::Create(format!("fork: {fork_err}")));
    }
    drop(err_w);
    drop(console_fd);
    super::exec_started(child, err_r, o)
}

/// The process to run: `--process F` as it is, or the container's with the flags' changes.
fn process(cfg: &Config, o: &ExecOptions) -> Result<Process> {
    if let Some(f) = &o.process {
        let text = std::fs::read(f).at(|| format!("reading {}", f.display()))?;
        return serde_json::from_slice(&text)
            .map_err(|e| Error::Invalid(format!("{}: not a process document: {e}", f.display())));
    }
    let mut p = cfg.process().clone();
    p.args = o.args.clone();
    p.terminal = o.tty;
    if let Some(cwd) = &o.cwd {
        p.cwd = cwd.clone();
    }
    for e in &o.env {
        let name = e.split_once('=').map_or(e.as_str(), |(n, _)| n);
        p.env
            .retain(|x| x.split_once('=').map_or(x.as_str(), |(n, _)| n) != name);
        p.env.push(e.clone());
    }
    if let Some(u) = &o.user {
        let (uid, gid) = u.split_once(':').unwrap_or((u, "0"));
        let num = |s: &str| {
            s.parse::<u32>()
                .map_err(|_| Error::Invalid(format!("--user {u:?}: UID[:GID], numbers")))
        };
        p.user.uid = num(uid)?;
        p.user.gid = num(gid)?;
        p.user.additional_gids = Vec::new();
    }
    p.user.additional_gids.extend(&o.additional_gids);
    p.no_new_privileges |= o.no_new_privs;
    if !o.caps.is_empty() {
        let caps = p.capabilities.get_or_insert_with(Default::default);
        for cap in &o.caps {
            let name = cap.to_ascii_uppercase();
            let name = if name.starts_with("CAP_") {
                name
            } else {
                format!("CAP_{name}")
            };
            for set in [
                &mut caps.bounding,
                &mut caps.effective,
                &mut caps.permitted,
                &mut caps.inheritable,
            ] {
                if !set.contains(&name) {
                    set.push(name.clone());
                }
            }
        }
    }
    Ok(p)
}

struct Child<'a> {
    parent_fds: &'a [RawFd],
    console: Option<RawFd>,
    size: Option<super::config::ConsoleSize>,
    detach: bool,
    preserve_fds: u32,
    umask: Option<u32>,
}

/// In the forked child: the container's cgroup and namespaces, the terminal, then the
/// workload's privileges and exec. Returns only on failure.
fn in_child(
    c: &super::state::Container,
    spec: &rvmm_proto::RunSpec,
    joins: &[(std::fs::File, libc::c_int)],
    k: &Child,
) -> rvmm_workload::Failure {
    for &fd in k.parent_fds {
        // SAFETY: closing our copy of a descriptor the parent keeps.
        unsafe { libc::close(fd) };
    }
    if !k.detach {
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    }
    if let Err(f) = crate::container::exec::enter(c.cgroup.as_ref(), joins) {
        return f;
    }
    if let Some(sock) = k.console {
        match super::init::console(sock, k.size, false) {
            Ok(slave) => super::init::take_terminal(slave),
            Err(f) => return f,
        }
    }
    super::init::exec_workload(spec, k.preserve_fds, k.umask)
}

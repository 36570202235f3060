//! rvmm as an OCI runtime (`rvmm-oci`, the runtime command line of the OCI runtime spec and
//! runc): what podman's conmon and containerd's shim call to create, start, signal and delete a
//! container from a bundle (a rootfs and its config.json).
//!
//! The process model is runc's, because the engines depend on it: `create` builds the
//! container and leaves its init process waiting on `exec.fifo` in the container's state
//! directory, then exits (the init is adopted by the engine's subreaper, which waits for it);
//! `start` opens the fifo, which lets the init exec the workload. State lives under `--root`
//! (default /run/rvmm-oci), one directory per container. docs/engines.md has the details.

pub mod config;
mod exec;
mod hooks;
mod init;
pub mod state;
mod vm;

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rvmm_proto::{DeviceNode, Limits, Rlimit, RunSpec, Security, User};

use crate::error::{IoContext, IoError};
use config::Config;
pub use exec::{exec, ExecOptions};
use state::{Container, Status, Store};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("container id {0:?} is not valid: 1 to 1024 letters, digits, '_', '-' or '.'")]
    BadId(String),
    #[error("container {0} does not exist")]
    NotFound(String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("{0}: corrupt container state")]
    Corrupt(PathBuf, #[source] serde_json::Error),
    #[error("container {id} is {status}: {what}")]
    State {
        id: String,
        status: Status,
        what: &'static str,
    },
    #[error("{0}")]
    Io(#[from] IoError),
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroups::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::security::profile::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Create(String),
    #[error("rvmm-oci needs root")]
    NotRoot,
}

pub type Result<T> = std::result::Result<T, Error>;

/// `create`'s options (runc's flags).
#[derive(Debug, Default)]
pub struct CreateOptions {
    pub bundle: PathBuf,
    pub console_socket: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    /// Descriptors 3 .. 3+N stay open for the workload.
    pub preserve_fds: u32,
    /// `--isolation` (for engines that cannot set the annotation).
    pub isolation: Option<String>,
    /// VM isolation unless the flag or the annotation says otherwise (the binary is called
    /// `rvmm-oci-vm`: what a Kubernetes RuntimeClass's handler names).
    pub default_vm: bool,
}

/// The annotation that picks a container's isolation.
pub const ISOLATION_ANNOTATION: &str = "io.rvmm.isolation";

/// The isolation asked for, by the flag or the bundle's annotation: true for a VM. A CRI pod's
/// sandbox (its pause container, which only holds the pod's namespaces) is always a container:
/// the pod's workloads are the VMs.
fn wants_vm(cfg: &Config, flag: Option<&str>, default_vm: bool) -> Result<bool> {
    let annotation = cfg
        .annotations
        .get(ISOLATION_ANNOTATION)
        .map(String::as_str);
    let asked = flag.or(annotation);
    let sandbox = cfg
        .annotations
        .get("io.kubernetes.cri.container-type")
        .is_some_and(|t| t == "sandbox");
    match asked {
        None => Ok(default_vm && !sandbox),
        Some("container") => Ok(false),
        Some("vm") => Ok(!sandbox),
        Some(other) => Err(Error::Invalid(format!(
            "isolation {other:?}: container or vm"
        ))),
    }
}

/// A running `create`'s resources, released unless it succeeds.
struct Undo {
    /// The lock file (`create` made it; nobody else can hold it while `create` does).
    lock: Option<PathBuf>,
    dir: Option<PathBuf>,
    cgroup: Option<crate::cgroups::Cgroup>,
    pid: i32,
}

impl Drop for Undo {
    fn drop(&mut self) {
        if self.pid > 0 {
            // SAFETY: kill/waitpid of our own child.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
        }
        if let Some(cg) = self.cgroup.take() {
            cg.remove();
        }
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
        if let Some(l) = self.lock.take() {
            let _ = std::fs::remove_file(l);
        }
    }
}

impl Undo {
    fn keep(mut self) {
        self.lock = None;
        self.dir = None;
        self.cgroup = None;
        self.pid = 0;
    }
}

/// `create ID`: the container's init, waiting for `start`. Returns its pid (the caller's child
/// until the caller exits).
pub fn create(store: &Store, id: &str, o: &CreateOptions) -> Result<i32> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::NotRoot);
    }
    if !state::valid_id(id) {
        return Err(Error::BadId(id.to_string()));
    }
    let bundle =
        std::fs::canonicalize(&o.bundle).at(|| format!("bundle {}", o.bundle.display()))?;
    let cfg = Config::load(&bundle)?;
    let rootfs = cfg.rootfs(&bundle);
    let rootfs = std::fs::canonicalize(&rootfs).at(|| format!("root.path {}", rootfs.display()))?;
    if !rootfs.is_dir() {
        return Err(Error::Invalid(format!(
            "root.path {} is not a directory",
            rootfs.display()
        )));
    }
    let mut spec = workload(&cfg)?;
    let terminal = cfg.process().terminal;
    let is_vm = wants_vm(&cfg, o.isolation.as_deref(), o.default_vm)?;
    if is_vm {
        spec = vm::spec(&cfg, spec)?;
    }
    if terminal && o.console_socket.is_none() {
        return Err(Error::Invalid(
            "process.terminal is set: --console-socket is needed".into(),
        ));
    }

    let lock = store.lock(id)?;
    let dir = store.dir(id);
    if dir.join("state.json").exists() {
        return Err(Error::Exists(id.to_string()));
    }
    let mut undo = Undo {
        lock: Some(store.lock_path(id)),
        dir: None,
        cgroup: None,
        pid: 0,
    };
    // Leftovers of a create that was killed: nothing runs from them.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).at(|| format!("creating {}", dir.display()))?;
    undo.dir = Some(dir.clone());
    let fifo = store.fifo(id);
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o622))
        .map_err(|e| Error::Create(format!("creating {}: {e}", fifo.display())))?;

    let layout = crate::cgroups::Layout::detect()?;
    if is_vm {
        return create_vm(store, id, o, &cfg, spec, (bundle, rootfs), lock, undo);
    }
    let all_devices = cfg.linux.resources.as_ref().is_some_and(|r| {
        r.devices.iter().any(|d| {
            d.allow
                && d.kind.as_deref().is_none_or(|k| k == "a")
                && d.major.is_none()
                && d.minor.is_none()
        })
    });
    let cg = crate::cgroups::create_at(
        &layout,
        &cgroup_path(cfg.linux.cgroups_path.as_deref(), id)?,
        &spec.limits,
        &spec.cpus_allowed,
        all_devices,
        &spec.devices,
    )?;
    undo.cgroup = Some(cg.clone());
    // On disk from here: a create killed half way leaves a stopped container (pid 0) that
    // `delete` cleans up, its cgroup included, as runc's does.
    let mut c = Container {
        id: id.to_string(),
        pid: 0,
        pid_start: 0,
        bundle: bundle.clone(),
        rootfs: rootfs.clone(),
        created: state::rfc3339_now(),
        annotations: cfg.annotations.clone(),
        cgroup: Some(cg.clone()),
        poststart: cfg.hooks.poststart.clone(),
        poststop: cfg.hooks.poststop.clone(),
        vm: false,
    };
    store.save(&c)?;

    let console_fd = console_socket(o.console_socket.as_deref(), terminal)?;
    let fifo_fd = nix::fcntl::open(
        &fifo,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| Error::Create(format!("opening {}: {e}", fifo.display())))?;
    let (sync_r, sync_w) = crate::run::stdio::pipe()?;
    let (err_r, err_w) = crate::run::stdio::pipe()?;

    let mut join = Vec::new();
    let mut flags = nix::sched::CloneFlags::empty();
    let mut new_cgroupns = false;
    let mut new_net = false;
    for ns in &cfg.linux.namespaces {
        let flag = match ns.kind.as_str() {
            "pid" => libc::CLONE_NEWPID,
            "network" => libc::CLONE_NEWNET,
            "mount" => libc::CLONE_NEWNS,
            "ipc" => libc::CLONE_NEWIPC,
            "uts" => libc::CLONE_NEWUTS,
            "cgroup" => libc::CLONE_NEWCGROUP,
            other => return Err(Error::Invalid(format!("namespace {other}"))),
        };
        match &ns.path {
            Some(p) => join.push((
                flag,
                CString::new(p.as_bytes())
                    .map_err(|_| Error::Invalid(format!("namespace path {p:?}")))?,
            )),
            None if flag == libc::CLONE_NEWCGROUP => new_cgroupns = true,
            None => {
                new_net |= flag == libc::CLONE_NEWNET;
                flags |= nix::sched::CloneFlags::from_bits_truncate(flag);
            }
        }
    }
    if !flags.contains(nix::sched::CloneFlags::CLONE_NEWNS) {
        return Err(Error::Invalid(
            "config.json: a container needs its own mount namespace".into(),
        ));
    }
    let plan = init::Plan {
        rootfs: CString::new(rootfs.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::Invalid("root.path has a NUL byte".into()))?,
        spec,
        join,
        new_cgroupns,
        new_net,
        cgroup: cg.clone(),
        cgroup_mounts: layout.mounts.clone(),
        sync_fd: sync_r.as_raw_fd(),
        err_fd: err_w.as_raw_fd(),
        parent_fds: vec![sync_w.as_raw_fd(), err_r.as_raw_fd(), lock.as_raw_fd()],
        fifo_fd: fifo_fd.as_raw_fd(),
        console_fd: console_fd.as_ref().map(AsRawFd::as_raw_fd),
        preserve_fds: o.preserve_fds,
        config: cfg.clone(),
    };
    let mut stack = vec![0u8; 1 << 20];
    // SAFETY: the child runs `init::main` on its own copy of our memory (no CLONE_VM) and either
    // execs or _exits; this process is single-threaded, so no lock is held across the clone.
    let pid = unsafe {
        nix::sched::clone(
            Box::new(|| init::main(&plan)),
            &mut stack,
            flags,
            Some(libc::SIGCHLD),
        )
    }
    .map_err(|e| Error::Create(format!("clone: creating the container's namespaces: {e}")))?
    .as_raw();
    undo.pid = pid;
    drop(sync_r);
    drop(err_w);
    drop(console_fd);

    c.pid = pid;
    c.pid_start = crate::run::state::start_time(pid).unwrap_or_default();
    let doc = hook_state(&c, Status::Creating);
    for h in cfg.hooks.prestart.iter().chain(&cfg.hooks.create_runtime) {
        hooks::run(h, &doc).map_err(Error::Create)?;
    }
    let _ = std::fs::File::from(sync_w).write_all(&doc);
    if let Some(text) = child_failure(err_r) {
        return Err(Error::Create(text));
    }
    store.save(&c)?;
    if let Some(p) = &o.pid_file {
        write_pid_file(p, pid)?;
    }
    undo.keep();
    Ok(pid)
}

/// `create` of a VM container (src/oci/vm.rs): its cgroup, then its supervisor, ready for
/// `start`.
#[allow(clippy::too_many_arguments)]
fn create_vm(
    store: &Store,
    id: &str,
    o: &CreateOptions,
    cfg: &Config,
    spec: RunSpec,
    (bundle, rootfs): (PathBuf, PathBuf),
    lock: std::fs::File,
    mut undo: Undo,
) -> Result<i32> {
    // The guest's namespaces are not the host's: createContainer and startContainer hooks,
    // which run inside the container's, have nowhere to run.
    if !cfg.hooks.create_container.is_empty() || !cfg.hooks.start_container.is_empty() {
        return Err(Error::Invalid(
            "config.json: createContainer and startContainer hooks cannot run in VM isolation"
                .into(),
        ));
    }
    let cg = vm::cgroup(cfg, id, &spec)?;
    undo.cgroup = Some(cg.clone());
    let mut c = Container {
        id: id.to_string(),
        pid: 0,
        pid_start: 0,
        bundle,
        rootfs,
        created: state::rfc3339_now(),
        annotations: cfg.annotations.clone(),
        cgroup: Some(cg),
        poststart: cfg.hooks.poststart.clone(),
        poststop: cfg.hooks.poststop.clone(),
        vm: true,
    };
    store.save(&c)?;
    let console = console_socket(o.console_socket.as_deref(), cfg.process().terminal)?;
    let pid = vm::spawn(vm::Supervisor {
        spec,
        cfg,
        container: &c,
        dir: store.dir(id),
        fifo: store.fifo(id),
        console,
        close: vec![lock.as_raw_fd()],
    })?;
    undo.pid = pid;
    c.pid = pid;
    c.pid_start = crate::run::state::start_time(pid).unwrap_or_default();
    let doc = hook_state(&c, Status::Creating);
    for h in cfg.hooks.prestart.iter().chain(&cfg.hooks.create_runtime) {
        hooks::run(h, &doc).map_err(Error::Create)?;
    }
    store.save(&c)?;
    if let Some(p) = &o.pid_file {
        write_pid_file(p, pid)?;
    }
    undo.keep();
    Ok(pid)
}

/// Where the container's cgroup goes below each hierarchy's root: config.json's `cgroupsPath`
/// (absolute or not, both from the root; systemd's `slice:prefix:name` as the scope systemd
/// would make, `slice/prefix-name.scope`), or `rvmm/oci-ID`.
fn cgroup_path(p: Option<&str>, id: &str) -> Result<PathBuf> {
    let p = match p.map(str::trim) {
        None | Some("") => return Ok(PathBuf::from(format!("rvmm/oci-{id}"))),
        Some(p) => p,
    };
    let rel = match p.split(':').collect::<Vec<_>>()[..] {
        [slice, prefix, name] => {
            let slice = if slice.is_empty() {
                "system.slice"
            } else {
                slice
            };
            let scope = if prefix.is_empty() {
                format!("{name}.scope")
            } else {
                format!("{prefix}-{name}.scope")
            };
            PathBuf::from(slice).join(scope)
        }
        _ => PathBuf::from(p.trim_start_matches('/')),
    };
    let text = rel.to_string_lossy();
    let normal = text
        .split('/')
        .all(|c| !c.is_empty() && c != "." && c != "..");
    if !normal {
        return Err(Error::Invalid(format!(
            "linux.cgroupsPath {p:?}: a path below the cgroup root, without . or .."
        )));
    }
    Ok(rel)
}

/// The pid file, written whole or not at all (engines read it as soon as `create` exits).
/// The engine's console socket, connected when the process has a terminal (the terminal's
/// master goes there).
fn console_socket(socket: Option<&Path>, terminal: bool) -> Result<Option<OwnedFd>> {
    match socket {
        Some(p) if terminal => Ok(Some(OwnedFd::from(
            std::os::unix::net::UnixStream::connect(p)
                .at(|| format!("connecting to the console socket {}", p.display()))?,
        ))),
        _ => Ok(None),
    }
}

/// The end of `exec` once its process is forked (`child`): the failure it reported on `err_r`
/// (the exec's one line), else the pid file, then with `--detach` 0 at once, or its status with
/// our signals forwarded to it.
fn exec_started(child: i32, err_r: OwnedFd, o: &ExecOptions) -> Result<u8> {
    if let Some(text) = child_failure(err_r) {
        wait_exit(child);
        return Err(Error::Create(format!("exec: {text}")));
    }
    if let Some(p) = &o.pid_file {
        write_pid_file(p, child)?;
    }
    if o.detach {
        return Ok(0);
    }
    rvmm_shim::signals::forward_to(child, 0);
    let code = wait_exit(child);
    rvmm_shim::signals::stop_forwarding();
    Ok(code)
}

fn write_pid_file(p: &Path, pid: i32) -> Result<()> {
    let tmp = p.with_extension("rvmm-tmp");
    std::fs::write(&tmp, pid.to_string()).at(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, p).at(|| format!("writing {}", p.display()))?;
    Ok(())
}

/// The state document hooks read on their stdin.
fn hook_state(c: &Container, status: Status) -> Vec<u8> {
    serde_json::to_vec(&Store::report_of(c, status)).unwrap_or_default()
}

/// What a child (the init, an exec) wrote on its error pipe before it gave up, as
/// `STATUS\tmessage`: the message; None when the pipe closed empty (the child went on).
fn child_failure(err_r: OwnedFd) -> Option<String> {
    let mut msg = String::new();
    let _ = std::fs::File::from(err_r).read_to_string(&mut msg);
    if msg.is_empty() {
        return None;
    }
    Some(
        msg.split_once('\t')
            .map_or(msg.as_str(), |(_, t)| t)
            .to_string(),
    )
}

/// config.json's process and limits as the RunSpec rvmm-workload applies.
fn workload(cfg: &Config) -> Result<RunSpec> {
    let p = cfg.process();
    let mut rlimits = Vec::new();
    for r in &p.rlimits {
        let name = r
            .kind
            .strip_prefix("RLIMIT_")
            .unwrap_or(&r.kind)
            .to_ascii_lowercase();
        let resource = rvmm_proto::RLIMIT_NAMES
            .iter()
            .position(|n| *n == name)
            .ok_or_else(|| Error::Invalid(format!("config.json: unknown rlimit {:?}", r.kind)))?;
        rlimits.push(Rlimit {
            resource: resource as u32,
            soft: r.soft,
            hard: r.hard,
        });
    }
    let mask = |names: &[String]| {
        let mut m = 0u64;
        for name in names {
            match crate::security::cap_index(name) {
                Some(i) => m |= 1 << i,
                None => log::warn!("capability {name} is not known; left out"),
            }
        }
        m
    };
    let (caps, ambient) = match &p.capabilities {
        Some(c) => {
            let caps = mask(&c.bounding);
            (caps, mask(&c.ambient) & caps)
        }
        None => (0, 0),
    };
    let seccomp = match &cfg.linux.seccomp {
        Some(v) => {
            let json = serde_json::to_vec(v).unwrap_or_default();
            crate::security::profile::Profile::parse(&json)?.compile(caps)?
        }
        None => Vec::new(),
    };
    let mut limits = Limits::default();
    let mut cpus_allowed = Vec::new();
    if let Some(r) = &cfg.linux.resources {
        if let Some(m) = &r.memory {
            limits.memory_bytes = m.limit.filter(|l| *l > 0).map(|l| l as u64);
            limits.memory_swap = m.swap.map(|s| if s < 0 { u64::MAX } else { s as u64 });
        }
        if let Some(c) = &r.cpu {
            limits.cpu_shares = c.shares.filter(|s| *s > 0);
            if let (Some(q), Some(per)) = (c.quota.filter(|q| *q > 0), c.period.filter(|p| *p > 0))
            {
                limits.cpus = Some(q as f64 / per as f64);
            }
            if let Some(list) = c.cpus.as_deref().filter(|l| !l.is_empty()) {
                cpus_allowed = crate::cgroups::parse_cpu_list(list)
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| {
                        Error::Invalid(format!("config.json: cpus {list:?} is not a CPU list"))
                    })?;
            }
        }
        if let Some(pids) = &r.pids {
            limits.pids = (pids.limit > 0).then_some(pids.limit as u64);
        }
    }
    let mut devices = Vec::new();
    for d in &cfg.linux.devices {
        let kind = match d.kind.as_str() {
            "c" | "u" => 'c',
            "b" => 'b',
            other => {
                return Err(Error::Invalid(format!(
                    "config.json: device {} of type {other:?} (c, u or b)",
                    d.path
                )))
            }
        };
        devices.push(DeviceNode {
            path: d.path.clone(),
            kind,
            major: d.major as u32,
            minor: d.minor as u32,
            mode: d.file_mode.unwrap_or(0o666),
            uid: d.uid.unwrap_or(0),
            gid: d.gid.unwrap_or(0),
            access: "rwm".into(),
        });
    }
    Ok(RunSpec {
        argv: p.args.clone(),
        env: p.env.clone(),
        cwd: p.cwd.clone(),
        user: User {
            uid: p.user.uid,
            gid: p.user.gid,
            additional_gids: p.user.additional_gids.clone(),
        },
        hostname: cfg.hostname.clone().unwrap_or_default(),
        tty: p.terminal,
        read_only: cfg.root.as_ref().is_some_and(|r| r.readonly),
        limits,
        security: Security {
            enforce: true,
            caps,
            seccomp,
            no_new_privs: p.no_new_privileges,
            ambient,
        },
        rlimits,
        sysctls: cfg
            .linux
            .sysctl
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        cpus_allowed,
        devices,
        ..RunSpec::default()
    })
}

/// `start ID`: lets the created container's init exec the workload.
pub fn start(store: &Store, id: &str) -> Result<()> {
    let _lock = store.lock_existing(id)?;
    let c = store.load(id)?;
    let status = store.status(&c);
    if status != Status::Created {
        return Err(Error::State {
            id: id.into(),
            status,
            what: "only a created container can be started",
        });
    }
    let fifo = store.fifo(id);
    // Non-blocking: the init may have died (then nobody ever writes).
    let fd = nix::fcntl::open(
        &fifo,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| Error::Create(format!("opening {}: {e}", fifo.display())))?;
    let mut f = std::fs::File::from(fd);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut b = [0u8; 1];
        match f.read(&mut b) {
            Ok(1) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(Error::Create(format!("reading {}: {e}", fifo.display()))),
        }
        if store.status(&c) == Status::Stopped {
            return Err(Error::Create(format!(
                "container {id}'s init exited before start"
            )));
        }
        if Instant::now() > deadline {
            return Err(Error::Create(format!(
                "container {id}'s init did not answer start within 30 s"
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = std::fs::remove_file(&fifo);
    let doc = hook_state(&c, Status::Running);
    for h in &c.poststart {
        // As runc: a failing poststart hook is reported, the container keeps running.
        if let Err(e) = hooks::run(h, &doc) {
            log::warn!("{e}");
        }
    }
    Ok(())
}

/// `state ID`: the state document of the runtime spec.
pub fn state_json(store: &Store, id: &str) -> Result<String> {
    let c = store.load(id)?;
    Ok(serde_json::to_string_pretty(&store.report(&c)).unwrap_or_default())
}

/// A signal by number or name (`9`, `KILL`, `SIGKILL`).
pub fn parse_signal(s: &str) -> Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
    }
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|s| s as i32)
        .map_err(|_| Error::Invalid(format!("unknown signal {s:?}")))
}

/// `kill ID SIGNAL`: to the init, or with `all` to every process of the container.
pub fn kill(store: &Store, id: &str, signal: i32, all: bool) -> Result<()> {
    let c = store.load(id)?;
    let status = store.status(&c);
    if status == Status::Stopped && !all {
        return Err(Error::State {
            id: id.into(),
            status,
            what: "there is nothing to signal",
        });
    }
    let mut pids = vec![c.pid];
    // A VM container's other process is its VMM: signals are for the workload, through the
    // supervisor.
    if all && !c.vm {
        if let Some(cg) = &c.cgroup {
            pids = cg.pids();
        }
    }
    for pid in pids {
        // SAFETY: kill(2) of a process of the container (the init checked by its start time).
        unsafe { libc::kill(pid, signal) };
    }
    if all && status == Status::Paused && signal == libc::SIGKILL {
        if let Some(cg) = &c.cgroup {
            let _ = cg.freeze(false);
        }
    }
    Ok(())
}

/// `delete ID`: the container's state and cgroup, its poststop hooks. A running one only with
/// `force` (killed first).
pub fn delete(store: &Store, id: &str, force: bool) -> Result<()> {
    let _lock = match store.lock_existing(id) {
        Err(Error::NotFound(_)) if force => return Ok(()),
        l => l?,
    };
    let c = match store.load(id) {
        Ok(c) => c,
        // Leftovers (a directory without a readable state): gone, lock file included.
        Err(Error::NotFound(_) | Error::Corrupt(..)) if force => {
            let _ = std::fs::remove_dir_all(store.dir(id));
            let _ = std::fs::remove_file(store.lock_path(id));
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let status = store.status(&c);
    match status {
        Status::Running | Status::Paused if !force => {
            return Err(Error::State {
                id: id.into(),
                status,
                what: "stop it first or delete with --force",
            })
        }
        Status::Stopped => {}
        _ => {
            // Created (its init waits on the fifo), or forced.
            if let Some(cg) = &c.cgroup {
                for pid in cg.pids() {
                    // SAFETY: kill(2) of the container's processes.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                let _ = cg.freeze(false);
            }
            // SAFETY: kill(2) of the init (checked by its start time in `status`).
            unsafe { libc::kill(c.pid, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while store.status(&c) != Status::Stopped && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    if let Some(cg) = &c.cgroup {
        // The cgroup goes once its last process has (the engine reaps the init).
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cg.pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        cg.remove();
    }
    let doc = hook_state(&c, Status::Stopped);
    for h in &c.poststop {
        if let Err(e) = hooks::run(h, &doc) {
            log::warn!("{e}");
        }
    }
    let _ = std::fs::remove_dir_all(store.dir(id));
    let _ = std::fs::remove_file(store.lock_path(id));
    Ok(())
}

/// `pause`/`resume ID`: freezes or thaws the container's cgroup.
pub fn pause(store: &Store, id: &str, frozen: bool) -> Result<()> {
    let _lock = store.lock_existing(id)?;
    let c = store.load(id)?;
    let status = store.status(&c);
    let ok = if frozen {
        status == Status::Running
    } else {
        status == Status::Paused
    };
    if !ok {
        return Err(Error::State {
            id: id.into(),
            status,
            what: if frozen {
                "only a running container can be paused"
            } else {
                "only a paused container can be resumed"
            },
        });
    }
    let cg = c
        .cgroup
        .as_ref()
        .ok_or_else(|| Error::Invalid(format!("container {id} has no cgroup")))?;
    cg.freeze(frozen)?;
    Ok(())
}

/// `ps ID`: the container's processes.
pub fn pids(store: &Store, id: &str) -> Result<Vec<i32>> {
    let c = store.load(id)?;
    Ok(c.cgroup.as_ref().map(|cg| cg.pids()).unwrap_or_default())
}

/// `features`: what this runtime implements (the runtime spec's features document).
pub fn features() -> serde_json::Value {
    let mut caps: Vec<(u8, String)> = caps::all()
        .into_iter()
        .map(|c| (c.index(), c.to_string()))
        .collect();
    caps.sort();
    let caps: Vec<String> = caps.into_iter().map(|(_, n)| n).collect();
    serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": state::OCI_VERSION,
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"],
        "mountOptions": init::mount_options(),
        "linux": {
            "namespaces": config::NAMESPACES,
            "capabilities": caps,
            "cgroup": {"v1": true, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {
                "enabled": true,
                "actions": ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_TRAP", "SCMP_ACT_LOG"],
                "operators": ["SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_MASKED_EQ"],
                "archs": ["SCMP_ARCH_X86_64"]
            },
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {ISOLATION_ANNOTATION: "container"}
    })
}

/// Sends `fd` over the connected unix socket `sock` (SCM_RIGHTS) with `name` as the payload, as
/// runc sends a terminal's master to `--console-socket`.
pub(crate) fn send_fd(sock: RawFd, name: &[u8], fd: RawFd) -> nix::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [std::io::IoSlice::new(name)];
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(sock, &iov, &cmsg, MsgFlags::empty(), None).map(|_| ())
}

/// Waits for `pid` (a child of this process) and returns its status as a shell would (255 if it
/// is not our child).
pub fn wait_exit(pid: i32) -> u8 {
    rvmm_shim::signals::wait_child(pid).map_or(255, |s| s.code().clamp(0, 255) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroups_path_forms() {
        let p = |s: Option<&str>| cgroup_path(s, "c1").map(|p| p.display().to_string());
        assert_eq!(p(None).ok().as_deref(), Some("rvmm/oci-c1"));
        assert_eq!(
            p(Some("/libpod_parent/libpod-c1")).ok().as_deref(),
            Some("libpod_parent/libpod-c1")
        );
        assert_eq!(p(Some("k8s/pod1/c1")).ok().as_deref(), Some("k8s/pod1/c1"));
        assert_eq!(
            p(Some("machine.slice:libpod:c1")).ok().as_deref(),
            Some("machine.slice/libpod-c1.scope")
        );
        assert_eq!(
            p(Some(":crio:c1")).ok().as_deref(),
            Some("system.slice/crio-c1.scope")
        );
        for bad in ["/a/../../b", "/", "a/./b", "..:y:z"] {
            assert!(p(Some(bad)).is_err(), "{bad}");
        }
    }
}

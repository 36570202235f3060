//! VM isolation through rvmm-oci (`io.rvmm.isolation=vm`, `--isolation vm`, or the binary named
//! `rvmm-oci-vm`): the container is a microVM whose root is the bundle's rootfs, shared with the
//! guest (virtio-fs) and written in place, as the engine expects of a runtime.
//!
//! runc's process model carries over: `create` forks the container's *supervisor* (its pid is
//! the one `state` reports and the engine waits for), which restores the warm-start snapshot (or
//! boots), tells `create` it is ready, and waits on exec.fifo; `start` releases it to send the
//! `Start`. The supervisor relays its stdio and signals to the workload (as `rvmm run` does)
//! and exits with the workload's status, 128+n when a signal ended it. `exec` asks the
//! supervisor (its `exec.sock`) to start a process next to the workload in the guest.
//!
//! Networking: when config.json names a network namespace the engine has set up (podman's CNI
//! or netavark, containerd's CNI), the VM's NIC is a tap in that namespace, joined to the
//! namespace's interface by two tc redirects (every frame one way goes out the other: the
//! engine's interface becomes the guest's wire), and the guest takes the interface's MAC,
//! address and default route. The engine's networking (port forwarding included) works unchanged.

use std::io::Read;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use rvmm_proto::{Mount, MountKind, RunSpec};

use super::config::Config;
use super::state::Container;
use super::{Error, Result};

/// Mounts the guest makes itself (its own /proc, /sys, /dev and their submounts): the bundle's
/// are for a container sharing the host's kernel.
const GUEST_MADE: &[&str] = &[
    "/proc",
    "/sys",
    "/sys/fs/cgroup",
    "/dev",
    "/dev/pts",
    "/dev/shm",
    "/dev/mqueue",
];

/// tmpfs options the guest applies (rvmm_workload::mounts), and those without a meaning there:
/// propagation (a guest mount has no peers on the host), podman's `tmpcopyup` (the guest's tmpfs
/// starts empty), `ro`/`rw` (read_only).
const TMPFS_OPTIONS: &[&str] = &[
    "noexec",
    "exec",
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "noatime",
    "atime",
    "nodiratime",
    "relatime",
    "strictatime",
    "sync",
    "async",
    "size",
    "nr_blocks",
    "nr_inodes",
    "mode",
    "uid",
    "gid",
];
const TMPFS_IGNORED: &[&str] = &[
    "ro",
    "rw",
    "private",
    "rprivate",
    "shared",
    "rshared",
    "slave",
    "rslave",
    "unbindable",
    "runbindable",
    "tmpcopyup",
    "notmpcopyup",
];

/// How long `exec` waits for a started VM to run its workload (a cold boot on kvm_pvm takes
/// tens of seconds).
const EXEC_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// The tap's name in the engine's network namespace.
const TAP: &str = "rvmm0";

/// config.json's mounts as the guest's: binds (files or directories) are shared with the guest,
/// tmpfs made there; the kernel filesystems are the guest's own.
pub(super) fn mounts(cfg: &Config) -> Result<Vec<Mount>> {
    let mut out = Vec::new();
    for m in &cfg.mounts {
        let kind = m.kind.as_deref().unwrap_or("");
        let bind = kind == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind");
        if GUEST_MADE.contains(&m.destination.trim_end_matches('/'))
            || matches!(
                kind,
                "proc" | "sysfs" | "devpts" | "mqueue" | "cgroup" | "cgroup2"
            )
        {
            continue;
        }
        let read_only = m.options.iter().any(|o| o == "ro");
        if bind {
            let source = m.source.clone().unwrap_or_default();
            if !Path::new(&source).exists() {
                return Err(Error::Invalid(format!(
                    "config.json: the source of the mount at {}, {source:?}, does not exist",
                    m.destination
                )));
            }
            out.push(Mount {
                source,
                destination: m.destination.clone(),
                read_only,
                kind: MountKind::Bind,
                options: String::new(),
                copy_up: false,
            });
        } else if kind == "tmpfs" {
            let mut options = Vec::new();
            for o in &m.options {
                let name = o.split_once('=').map_or(o.as_str(), |(k, _)| k);
                if TMPFS_OPTIONS.contains(&name) {
                    options.push(o.as_str());
                } else if !TMPFS_IGNORED.contains(&name) {
                    return Err(Error::Invalid(format!(
                        "config.json: tmpfs option {o:?} at {} is not available in VM isolation",
                        m.destination
                    )));
                }
            }
            out.push(Mount {
                source: String::new(),
                destination: m.destination.clone(),
                read_only,
                kind: MountKind::Tmpfs,
                options: options.join(","),
                copy_up: false,
            });
        } else {
            return Err(Error::Invalid(format!(
                "config.json: a mount of type {kind:?} at {} is not available in VM isolation \
                 (bind and tmpfs are)",
                m.destination
            )));
        }
    }
    Ok(out)
}

/// The container's workload as the guest runs it: the host-only parts (device nodes, host CPU
/// numbers) left out, the mounts the guest's, stdin always relayed (the engine's /dev/null ends
/// at once).
pub(super) fn spec(cfg: &Config, mut spec: RunSpec) -> Result<RunSpec> {
    spec.mounts = mounts(cfg)?;
    spec.devices.clear();
    spec.cpus_allowed.clear();
    spec.stdin = true;
    spec.root_shared = true;
    Ok(spec)
}

/// The cgroup of a VM container: the VMM process and the supervisor, sized for the guest.
pub(super) fn cgroup(cfg: &Config, id: &str, spec: &RunSpec) -> Result<crate::cgroups::Cgroup> {
    let layout = crate::cgroups::Layout::detect()?;
    // The supervisor's threads (relays, the channel's reader and writer, exec) beside the VMM's.
    let (limits, kvm) = crate::vm::vmm_limits(spec, 24);
    let node = |path: &str, major: u32, minor: u32| rvmm_proto::DeviceNode {
        path: path.into(),
        kind: 'c',
        major,
        minor,
        mode: 0o666,
        uid: 0,
        gid: 0,
        access: "rwm".into(),
    };
    // What the supervisor opens: the null device, randomness for the guest, a terminal.
    let devices = [
        kvm,
        node("/dev/null", 1, 3),
        node("/dev/urandom", 1, 9),
        node("/dev/tty", 5, 0),
    ];
    Ok(crate::cgroups::create_at(
        &layout,
        &super::cgroup_path(cfg.linux.cgroups_path.as_deref(), id)?,
        &limits,
        &[],
        false,
        &devices,
    )?)
}

/// What the supervisor is handed by `create`.
pub(super) struct Supervisor<'a> {
    pub spec: RunSpec,
    pub cfg: &'a Config,
    pub container: &'a Container,
    pub dir: PathBuf,
    pub fifo: PathBuf,
    pub console: Option<OwnedFd>,
    /// Descriptors of `create` the supervisor must not keep (the state lock).
    pub close: Vec<RawFd>,
}

/// Forks the supervisor and waits until its VM is ready for `start` (or failed: its one line).
/// Returns its pid.
pub(super) fn spawn(s: Supervisor) -> Result<i32> {
    let (ready_r, ready_w) = crate::run::stdio::pipe()?;
    // SAFETY: rvmm-oci is single-threaded here; the child runs the supervisor and _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::Create(format!(
            "fork: {}",
            std::io::Error::last_os_error()
        )));
    }
    if pid == 0 {
        drop(ready_r);
        for fd in &s.close {
            // SAFETY: closing our copy of a descriptor `create` keeps.
            unsafe { libc::close(*fd) };
        }
        let code = supervise(s, ready_w);
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(code) }
    }
    drop(ready_w);
    let mut answer = Vec::new();
    let _ = std::fs::File::from(ready_r).read_to_end(&mut answer);
    if answer.first() == Some(&b'R') {
        return Ok(pid);
    }
    super::wait_exit(pid);
    let text = String::from_utf8_lossy(answer.get(1..).unwrap_or_default()).into_owned();
    Err(Error::Create(if text.is_empty() {
        "the VM's supervisor exited before its VM was ready".into()
    } else {
        text
    }))
}

/// The supervisor: the VM, then the workload's status as its exit code.
fn supervise(s: Supervisor, ready_w: OwnedFd) -> i32 {
    let ready_fd = ready_w.as_raw_fd();
    let fail = |msg: String| {
        let mut line = b"E".to_vec();
        line.extend_from_slice(msg.as_bytes());
        rvmm_workload::write_all(ready_fd, &line);
        125
    };
    if let Some(sock) = s.console {
        // `console` closes the socket once the master is sent.
        match super::init::console(sock.into_raw_fd(), s.cfg.process().console_size, false) {
            Ok(slave) => super::init::take_terminal(slave),
            Err(f) => return fail(f.message),
        }
    }
    let mut spec = s.spec;
    let netns = s.cfg.namespace("network").and_then(|n| n.path.clone());
    let nic = match netns.as_deref() {
        Some(path) => match engine_nic(path) {
            Ok(n) => n,
            Err(e) => return fail(e),
        },
        None => None,
    };
    let taken = nic.as_ref().map(|n| n.dev.clone());
    let nic = nic.map(|n| {
        spec.network.address = Some(n.address);
        spec.network.gateway = Some(n.gateway);
        (n.tap, n.mac)
    });
    let code = run_vm(s.container, &s.dir, s.fifo, spec, nic, ready_w, fail);
    if let (Some(path), Some(dev)) = (netns.as_deref(), taken) {
        release_engine_nic(path, dev);
    }
    code
}

/// The supervisor's VM, once its NIC is there: its status (the workload's), or 125 with the
/// reason (to `create` while it waits, else on stderr).
fn run_vm(
    container: &Container,
    dir: &Path,
    fifo: PathBuf,
    spec: RunSpec,
    nic: Option<(OwnedFd, [u8; 6])>,
    ready_w: OwnedFd,
    fail: impl Fn(String) -> i32,
) -> i32 {
    let Some(cg) = container.cgroup.as_ref() else {
        return fail("the container has no cgroup".into());
    };
    // SAFETY: getpid has no preconditions.
    if let Err(e) = cg.add(unsafe { libc::getpid() }) {
        return fail(e.to_string());
    }
    let mut ready_w = Some(ready_w);
    let run = crate::vm::run_shared_root(
        crate::vm::SharedRoot {
            spec,
            rootfs: container.rootfs.clone(),
            dir,
            id: &container.id,
            cgroup: cg,
            nic,
        },
        || {
            if let Some(w) = ready_w.take() {
                rvmm_workload::write_all(w.as_raw_fd(), b"R");
            }
            // Blocks until `start` opens the fifo to read (or `delete` kills us).
            match std::fs::OpenOptions::new().write(true).open(&fifo) {
                Ok(f) => {
                    rvmm_workload::write_all(f.as_raw_fd(), b"0");
                    true
                }
                Err(_) => false,
            }
        },
    );
    match run {
        Ok(code) => code,
        Err(e) => {
            let msg = crate::error::chain(&e);
            if ready_w.is_some() {
                fail(msg)
            } else {
                eprintln!("rvmm-oci: {msg}");
                125
            }
        }
    }
}

/// The engine's interface in a network namespace, taken over for the guest.
struct EngineNic {
    /// The engine's interface the VM took over.
    dev: String,
    tap: OwnedFd,
    mac: [u8; 6],
    address: String,
    gateway: String,
}

/// In the namespace at `path`: the interface with an IPv4 address and the default route (none:
/// the VM gets no NIC, as a container there would have only loopback), a tap beside it, and
/// the two redirects between them.
fn engine_nic(path: &str) -> std::result::Result<Option<EngineNic>, String> {
    in_netns(path, nic_here)
}

/// Runs `f` on a thread of its own in the network namespace at `path`: setns changes only the
/// calling thread, and what it spawns (ip, tc) inherits the namespace.
fn in_netns<T: Send + 'static>(
    path: &str,
    f: impl FnOnce() -> std::result::Result<T, String> + Send + 'static,
) -> std::result::Result<T, String> {
    let ns = std::fs::File::open(path)
        .map_err(|e| format!("opening the network namespace {path}: {e}"))?;
    let path = path.to_string();
    std::thread::spawn(move || {
        // SAFETY: setns with a namespace descriptor the thread holds open.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "joining the network namespace {path}: {}",
                std::io::Error::last_os_error()
            ));
        }
        f()
    })
    .join()
    .map_err(|_| "setting up the VM's network failed".to_string())?
}

/// Gives the engine's interface back once the VM is gone (its tap went with the VMM): the
/// redirect off, so the namespace is as the engine made it (a pod's namespace outlives its
/// containers). A VM killed before this leaves the redirect; the next VM in the namespace
/// replaces it.
fn release_engine_nic(path: &str, dev: String) {
    let _ = in_netns(path, move || {
        run_tool("tc", &["qdisc", "del", "dev", &dev, "ingress"])
    });
}

fn ip_json(args: &[&str]) -> std::result::Result<serde_json::Value, String> {
    let out = std::process::Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("ip {}: {e}", args.join(" ")))
}

fn run_tool(program: &str, args: &[&str]) -> std::result::Result<(), String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("running {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// [`engine_nic`] in the namespace (this thread's).
fn nic_here() -> std::result::Result<Option<EngineNic>, String> {
    let routes = ip_json(&["-4", "route", "show", "default"])?;
    let Some((dev, gateway)) = routes.as_array().and_then(|r| {
        r.iter().find_map(|r| {
            Some((
                r.get("dev")?.as_str()?.to_string(),
                r.get("gateway")?.as_str()?.to_string(),
            ))
        })
    }) else {
        return Ok(None);
    };
    let links = ip_json(&["-4", "addr", "show", "dev", &dev])?;
    let link = links.get(0).ok_or(format!("no interface {dev}"))?;
    if link.get("master").is_some() || dev == TAP {
        return Err(format!("{dev} is not an interface a VM can take over"));
    }
    let addr = link
        .get("addr_info")
        .and_then(|a| a.as_array())
        .and_then(|a| {
            a.iter().find_map(|i| {
                Some(format!(
                    "{}/{}",
                    i.get("local")?.as_str()?,
                    i.get("prefixlen")?.as_u64()?
                ))
            })
        })
        .ok_or(format!("{dev} has no IPv4 address"))?;
    let mac = ip_json(&["link", "show", "dev", &dev])?
        .get(0)
        .and_then(|l| l.get("address")?.as_str().map(str::to_string))
        .and_then(|m| parse_mac(&m))
        .ok_or(format!("{dev} has no MAC address"))?;
    if ip_json(&["link", "show", "dev", TAP]).is_ok() {
        return Err(format!(
            "another VM already has this network namespace ({TAP} exists): one VM per \
             namespace"
        ));
    }
    // Not persistent: the tap goes with the last descriptor (the VMM's).
    let tap = crate::devices::tap::Tap::open(TAP)
        .map_err(|e| crate::error::chain(&e))?
        .into_fd();
    run_tool("ip", &["link", "set", TAP, "up"])?;
    for (from, to) in [(dev.as_str(), TAP), (TAP, dev.as_str())] {
        // A fresh ingress qdisc: one a killed VM left behind redirects to a tap that is gone.
        let _ = run_tool("tc", &["qdisc", "del", "dev", from, "ingress"]);
        run_tool("tc", &["qdisc", "add", "dev", from, "ingress"])?;
        run_tool(
            "tc",
            &[
                "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match",
                "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
            ],
        )?;
    }
    Ok(Some(EngineNic {
        dev,
        tap,
        mac,
        address: addr,
        gateway,
    }))
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

/// `exec` in a VM container: the process starts next to the workload in the guest, through the
/// supervisor's `exec.sock`. With `detach` a child of ours is the exec's client (its pid is the
/// one the engine gets, and its status the process's).
pub(super) fn exec(
    store: &super::state::Store,
    c: &Container,
    process: &super::config::Process,
    o: &super::ExecOptions,
) -> Result<u8> {
    let (dir, id) = (store.dir(&c.id), c.id.as_str());
    // The supervisor serves exec once the workload runs: a container just started (a VM still
    // restoring or booting) is waited for while its supervisor lives.
    let sock = dir.join("exec.sock");
    let deadline = std::time::Instant::now() + EXEC_WAIT;
    while !sock.exists() {
        if store.status(c) == super::state::Status::Stopped {
            return Err(Error::State {
                id: id.into(),
                status: super::state::Status::Stopped,
                what: "a process can only be executed in a running container",
            });
        }
        if std::time::Instant::now() > deadline {
            return Err(Error::Create(format!(
                "exec: the VM of container {id} did not start its workload within {EXEC_WAIT:?}"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let dir = dir.as_path();
    let req = rvmm_proto::ExecRequest {
        argv: process.args.clone(),
        env: process.env.clone(),
        user: Some(rvmm_proto::User {
            uid: process.user.uid,
            gid: process.user.gid,
            additional_gids: process.user.additional_gids.clone(),
        }),
        cwd: (!process.cwd.is_empty()).then(|| process.cwd.clone()),
        tty: process.terminal,
        stdin: true,
        winsize: None,
    };
    let console = super::console_socket(o.console_socket.as_deref(), process.terminal)?;
    if console.is_none() && !o.detach {
        return crate::vm::exec::exec(dir, id, req)
            .map_err(|e| Error::Create(crate::error::chain(&e)));
    }
    let (err_r, err_w) = crate::run::stdio::pipe()?;
    // SAFETY: rvmm-oci is single-threaded; the child is the exec's client and _exits.
    let child = unsafe { libc::fork() };
    if child == 0 {
        drop(err_r);
        if let Some(sock) = console {
            // `console` closes the socket once the master is sent.
            match super::init::console(sock.into_raw_fd(), process.console_size, false) {
                Ok(slave) => super::init::take_terminal(slave),
                Err(f) => {
                    // As `child_failure` reads it: status, tab, message.
                    let line = format!("{}\t{}", f.status, f.message);
                    rvmm_workload::write_all(err_w.as_raw_fd(), line.as_bytes());
                    // SAFETY: leaving the child.
                    unsafe { libc::_exit(125) }
                }
            }
        }
        drop(err_w);
        let code = match crate::vm::exec::exec(dir, id, req) {
            Ok(c) => i32::from(c),
            Err(e) => {
                eprintln!("rvmm-oci: {}", crate::error::chain(&e));
                125
            }
        };
        // SAFETY: leaving the child without the parent's destructors.
        unsafe { libc::_exit(code) }
    }
    if child < 0 {
        return Err(Error::Create(format!(
            "fork: {}",
            std::io::Error::last_os_error()
        )));
    }
    drop(err_w);
    drop(console);
    super::exec_started(child, err_r, o)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("0a:58:0a:58:00:05"),
            Some([0x0a, 0x58, 0x0a, 0x58, 0, 5])
        );
        assert_eq!(parse_mac("0a:58:0a:58:00"), None);
        assert_eq!(parse_mac("0a:58:0a:58:00:05:01"), None);
        assert_eq!(parse_mac("zz:58:0a:58:00:05"), None);
    }

    #[test]
    fn bundle_mounts_in_a_guest() {
        let cfg: Config = serde_json::from_str(
            r#"{"mounts":[
              {"destination":"/proc","type":"proc","source":"proc"},
              {"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","mode=755"]},
              {"destination":"/dev/shm","type":"bind","source":"/tmp","options":["rbind"]},
              {"destination":"/etc/hosts","type":"bind","source":"/etc/hosts","options":["rbind","ro"]},
              {"destination":"/scratch","type":"tmpfs","source":"tmpfs","options":["rw","rprivate","nosuid","size=64k","tmpcopyup"]}
            ]}"#,
        )
        .unwrap();
        let m = mounts(&cfg).unwrap();
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(
            (m[0].destination.as_str(), m[0].kind, m[0].read_only),
            ("/etc/hosts", MountKind::Bind, true)
        );
        assert_eq!(
            (m[1].kind, m[1].options.as_str()),
            (MountKind::Tmpfs, "nosuid,size=64k")
        );
        let bad: Config = serde_json::from_str(
            r#"{"mounts":[{"destination":"/x","type":"nfs","source":"h:/x"}]}"#,
        )
        .unwrap();
        assert!(mounts(&bad).unwrap_err().to_string().contains("nfs"));
        let odd: Config = serde_json::from_str(
            r#"{"mounts":[{"destination":"/t","type":"tmpfs","options":["huge=always"]}]}"#,
        )
        .unwrap();
        assert!(mounts(&odd)
            .unwrap_err()
            .to_string()
            .contains("huge=always"));
        let missing: Config = serde_json::from_str(
            r#"{"mounts":[{"destination":"/x","type":"bind","source":"/nonexistent/x"}]}"#,
        )
        .unwrap();
        assert!(mounts(&missing).is_err());
    }
}

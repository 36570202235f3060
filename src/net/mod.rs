//! Host-side networking shared by both isolations: the `rvmm0` bridge with NAT, a file-lease IPAM,
//! veth pairs for containers, and published ports (a userspace TCP/UDP proxy on the host, as
//! docker-proxy does, so 127.0.0.1:PORT works without route_localnet tricks).

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::runspec::{PortMapping, Protocol};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("running {program:?}")]
    Spawn {
        program: OsString,
        #[source]
        source: io::Error,
    },
    #[error("{program:?} {args:?} failed: {stderr}")]
    CommandFailed {
        program: OsString,
        args: Vec<OsString>,
        stderr: String,
    },
    #[error("running ip (iproute2)")]
    IpSpawn(#[source] io::Error),
    #[error("ip: {0}")]
    IpFailed(String),
    #[error("creating {}", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("opening {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating the rvmm0 bridge")]
    Bridge(#[source] Box<Error>),
    #[error("adding the NAT rules")]
    Nat(#[source] Box<Error>),
    #[error("leasing an address")]
    Lease(#[source] io::Error),
    #[error("no free address left in {SUBNET}")]
    NoFreeAddress,
    #[error("creating the veth pair")]
    Veth(#[source] Box<Error>),
    #[error("configuring the container's eth0")]
    ContainerEth0(#[source] Box<Error>),
    #[error("creating the VM's tap")]
    Tap(#[source] Box<Error>),
    #[error("publishing port {port}/{protocol}: it is already in use")]
    PortInUse {
        port: u16,
        protocol: &'static str,
        #[source]
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

pub const BRIDGE: &str = "rvmm0";
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const PREFIX: u8 = 16;
pub const SUBNET: &str = "10.77.0.0/16";

fn ipam_dir() -> PathBuf {
    crate::paths::run_dir().join("ipam")
}

/// Runs a command, turning failure into one line with its stderr.
pub fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            program: cmd.get_program().to_owned(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::CommandFailed {
            program: cmd.get_program().to_owned(),
            args: cmd.get_args().map(|a| a.to_owned()).collect(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn ip_batch(netns_pid: Option<i32>, batch: &str) -> Result<()> {
    let mut cmd = match netns_pid {
        Some(pid) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/proc/{pid}/ns/net")).arg("ip");
            c
        }
        None => Command::new("ip"),
    };
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(Error::IpSpawn)?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| Error::IpSpawn(io::Error::other("ip has no stdin pipe")))?;
    stdin.write_all(batch.as_bytes()).map_err(Error::IpSpawn)?;
    drop(stdin);
    let out = child.wait_with_output().map_err(Error::IpSpawn)?;
    if !out.status.success() {
        return Err(Error::IpFailed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// Creates the bridge with its address and the NAT rule, once (idempotent, under a lock).
pub fn ensure_bridge() -> Result<()> {
    if std::path::Path::new(&format!("/sys/class/net/{BRIDGE}")).exists() {
        return Ok(());
    }
    let dir = crate::paths::run_dir();
    fs::create_dir_all(&dir).map_err(|source| Error::StateDir {
        path: dir.clone(),
        source,
    })?;
    let lock_path = dir.join("net.lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| Error::Lock {
            path: lock_path,
            source,
        })?;
    // SAFETY: flock on an open fd.
    unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    if !std::path::Path::new(&format!("/sys/class/net/{BRIDGE}")).exists() {
        ip_batch(
            None,
            &format!("link add {BRIDGE} type bridge\naddr add {GATEWAY}/{PREFIX} dev {BRIDGE}\nlink set {BRIDGE} up\n"),
        )
        .map_err(|e| Error::Bridge(Box::new(e)))?;
    }
    let _ = fs::write("/proc/sys/net/ipv4/ip_forward", "1");
    let rules: [&[&str]; 3] = [
        &[
            "-t",
            "nat",
            "POSTROUTING",
            "-s",
            SUBNET,
            "!",
            "-o",
            BRIDGE,
            "-j",
            "MASQUERADE",
        ],
        &["-t", "filter", "FORWARD", "-i", BRIDGE, "-j", "ACCEPT"],
        &["-t", "filter", "FORWARD", "-o", BRIDGE, "-j", "ACCEPT"],
    ];
    for r in rules {
        let (table, rest) = (&r[..2], &r[2..]);
        let exists = Command::new("iptables")
            .args(table)
            .arg("-C")
            .args(rest)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !exists {
            run(Command::new("iptables").args(table).arg("-A").args(rest))
                .map_err(|e| Error::Nat(Box::new(e)))?;
        }
    }
    Ok(())
}

/// An address leased to one run: a file in /run/rvmm/ipam named after the address.
#[derive(Debug)]
pub struct Lease {
    pub addr: Ipv4Addr,
    path: PathBuf,
}

impl Lease {
    pub fn allocate(owner: &str) -> Result<Lease> {
        let dir = ipam_dir();
        fs::create_dir_all(&dir).map_err(|source| Error::StateDir {
            path: dir.clone(),
            source,
        })?;
        // The lease file appears complete or not at all: its content (owner, then the holder's pid
        // and start time, so `rvmm gc` can tell a dead holder) is written to a temporary file that
        // is hard-linked in under the address (which fails if someone else holds it).
        let tmp_dir = crate::paths::run_dir().join("ipam.tmp");
        fs::create_dir_all(&tmp_dir).map_err(|source| Error::StateDir {
            path: tmp_dir.clone(),
            source,
        })?;
        let me = std::process::id();
        let tmp = tmp_dir.join(format!("{owner}.{me}"));
        let content = format!(
            "{owner}\n{me} {}\n",
            crate::run::state::start_time(me as i32).unwrap_or(0)
        );
        fs::write(&tmp, content).map_err(Error::Lease)?;
        let res = (|| {
            for n in 2u32..65534 {
                let addr = Ipv4Addr::from(u32::from(GATEWAY) - 1 + n);
                let path = dir.join(addr.to_string());
                match fs::hard_link(&tmp, &path) {
                    Ok(()) => return Ok(Lease { addr, path }),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(Error::Lease(e)),
                }
            }
            Err(Error::NoFreeAddress)
        })();
        let _ = fs::remove_file(&tmp);
        res
    }

    pub fn release(&self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Bridge networking for run `id`: the bridge exists, an address is leased and written into
/// `net` (address, gateway), and the `-p` ports are bound (forwarding starts later, with
/// [`Publisher::start`]). On error nothing stays leased.
pub fn attach_run(net: &mut rvmm_proto::Network, id: &str) -> Result<(Lease, Publisher)> {
    ensure_bridge()?;
    let lease = Lease::allocate(id)?;
    net.address = Some(format!("{}/{}", lease.addr, PREFIX));
    net.gateway = Some(GATEWAY.to_string());
    match Publisher::bind(&net.ports) {
        Ok(p) => Ok((lease, p)),
        Err(e) => {
            lease.release();
            Err(e)
        }
    }
}

/// Releases every lease owned by `owner` (for gc).
pub fn release_owned_by(owner: &str) {
    if let Ok(rd) = fs::read_dir(ipam_dir()) {
        for e in rd.flatten() {
            if fs::read_to_string(e.path()).is_ok_and(|o| o.lines().next() == Some(owner)) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// `rvmm gc` for leases whose holder is gone: a lease file names its owner run and the pid and
/// start time of the rvmm that holds it; a lease whose holder is dead is released. Unreadable
/// lease files (truncated, garbage) and leases in the older owner-only format whose run is not
/// live are released once they are a minute old (an allocation in progress is never touched).
/// Also removes temporary files of allocations that were killed. Returns the addresses released.
pub fn gc_leases() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(crate::paths::run_dir().join("ipam.tmp")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.rsplit('.').next().and_then(|p| p.parse::<u32>().ok());
            if pid.is_none_or(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let Ok(rd) = fs::read_dir(ipam_dir()) else {
        return out;
    };
    for e in rd.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.parse::<Ipv4Addr>().is_err() {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap_or_default();
        let mut lines = text.lines();
        let owner = lines.next().unwrap_or_default().trim();
        let holder = lines.next().and_then(|l| {
            let (pid, start) = l.split_once(' ')?;
            Some((
                pid.parse::<i32>().ok()?,
                start.trim().parse::<u64>().ok().filter(|s| *s != 0)?,
            ))
        });
        let dead = match holder {
            Some((pid, start)) => {
                crate::run::state::start_time(pid) != Some(start)
                    && !crate::run::state::run_is_live(owner)
            }
            None => {
                let old = fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|d| d.as_secs() > 60);
                old && (owner.is_empty() || !crate::run::state::run_is_live(owner))
            }
        };
        if dead && fs::remove_file(&path).is_ok() {
            out.push(name);
        }
    }
    out
}

/// The workload's MAC on the bridge, the same derivation for both isolations: locally
/// administered (02:…) followed by the first five bytes of the run ID, so two live runs never
/// share one (the IDs are random) and the address is known before the device exists.
pub fn mac_for(id: &str) -> [u8; 6] {
    let id = hex::decode(id.get(..10).unwrap_or_default()).unwrap_or_default();
    let mut m = [0x02, 0, 0, 0, 0, 0];
    for (m, b) in m[1..].iter_mut().zip(&id) {
        *m = *b;
    }
    m
}

/// A MAC as text (`02:ab:cd:ef:01:23`).
pub fn mac_string(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Host-side veth name for a run.
pub fn veth_name(id: &str) -> String {
    format!("rvh{}", &id[..id.len().min(11)])
}

/// Creates the veth pair, puts its peer as eth0 into the netns of `pid` with `addr` and the
/// run's MAC ([`mac_for`]), and attaches the host side to the bridge.
pub fn attach_container(id: &str, pid: i32, addr: Ipv4Addr) -> Result<String> {
    let host = veth_name(id);
    let peer = format!("rvc{}", &id[..id.len().min(11)]);
    let mac = mac_string(&mac_for(id));
    ip_batch(
        None,
        &format!("link add {host} type veth peer name {peer} address {mac} netns {pid}\nlink set {host} master {BRIDGE} up\n"),
    )
    .map_err(|e| Error::Veth(Box::new(e)))?;
    ip_batch(
        Some(pid),
        &format!(
            "link set {peer} name eth0\naddr add {addr}/{PREFIX} dev eth0\nlink set eth0 up\nroute add default via {GATEWAY}\n"
        ),
    )
    .map_err(|e| Error::ContainerEth0(Box::new(e)))?;
    Ok(host)
}

pub fn delete_link(name: &str) {
    if std::path::Path::new(&format!("/sys/class/net/{name}")).exists() {
        let _ = run(Command::new("ip").args(["link", "del", name]));
    }
}

/// The host's nameservers that a container can reach (not loopback), for resolv.conf.
pub fn host_resolv_conf() -> String {
    let host = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    host.lines()
        .filter(|l| {
            !l.trim_start().starts_with("nameserver")
                || !l
                    .split_whitespace()
                    .nth(1)
                    .is_some_and(|a| a.starts_with("127.") || a == "::1")
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// A published port's listening socket and the container port it forwards to.
pub type Forward = (RawFd, u16);

/// Published ports: listening sockets bound before the workload starts (a taken port fails the
/// run early), proxying to `target` once started.
pub struct Publisher {
    tcp: Vec<(TcpListener, u16)>,
    udp: Vec<(UdpSocket, u16)>,
}

impl Publisher {
    pub fn bind(ports: &[PortMapping]) -> Result<Publisher> {
        let mut p = Publisher {
            tcp: vec![],
            udp: vec![],
        };
        for m in ports {
            let addr = SocketAddr::from(([0, 0, 0, 0], m.host_port));
            let in_use = |protocol| {
                move |source| Error::PortInUse {
                    port: m.host_port,
                    protocol,
                    source,
                }
            };
            match m.protocol {
                Protocol::Tcp => p.tcp.push((
                    TcpListener::bind(addr).map_err(in_use("tcp"))?,
                    m.container_port,
                )),
                Protocol::Udp => p.udp.push((
                    UdpSocket::bind(addr).map_err(in_use("udp"))?,
                    m.container_port,
                )),
            }
        }
        Ok(p)
    }

    /// No port is published.
    pub fn is_empty(&self) -> bool {
        self.tcp.is_empty() && self.udp.is_empty()
    }

    /// The listening sockets, TCP and UDP, each with its container port (for `rvmm-shim`, which
    /// takes them over across an exec).
    pub fn raw_fds(&self) -> (Vec<Forward>, Vec<Forward>) {
        (
            self.tcp.iter().map(|(l, p)| (l.as_raw_fd(), *p)).collect(),
            self.udp.iter().map(|(s, p)| (s.as_raw_fd(), *p)).collect(),
        )
    }

    /// The sockets [`Publisher::raw_fds`] gave, taken over after an exec.
    pub fn from_parts(tcp: Vec<(TcpListener, u16)>, udp: Vec<(UdpSocket, u16)>) -> Publisher {
        Publisher { tcp, udp }
    }

    /// Starts the proxy threads (they live until the process exits).
    pub fn start(self, target: Ipv4Addr) {
        rvmm_shim::forward::start(self.tcp, self.udp, target);
    }
}

/// Creates a persistent TAP for a VM run, attached to the bridge and up.
pub fn create_tap(id: &str) -> Result<String> {
    let name = format!("rvt{}", &id[..id.len().min(11)]);
    ip_batch(
        None,
        &format!("tuntap add dev {name} mode tap\nlink set {name} master {BRIDGE} up\n"),
    )
    .map_err(|e| Error::Tap(Box::new(e)))?;
    Ok(name)
}

//! The contract between rvmm and a workload, shared by the host binary and the guest's PID 1.
//!
//! [`RunSpec`] is what both isolations consume: a behaviour difference between them is a bug.

use serde::{Deserialize, Serialize};

/// Everything needed to start the workload, fully resolved (no image lookups left to do).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct RunSpec {
    /// argv[0] is the program (resolved against PATH from `env` inside the rootfs when it has no '/').
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries, image env first, flags override.
    pub env: Vec<String>,
    /// Working directory inside the rootfs (absolute).
    pub cwd: String,
    /// Numeric identity, already resolved from the image's /etc/passwd and /etc/group.
    pub user: User,
    pub hostname: String,
    /// Allocate a pty for the workload (`-t`).
    pub tty: bool,
    /// Attach stdin (`-i`).
    pub stdin: bool,
    /// Root filesystem read-only (`--read-only`).
    pub read_only: bool,
    pub limits: Limits,
    pub network: Network,
    /// Bind mounts (`-v`).
    pub mounts: Vec<Mount>,
    /// Signal to stop the workload with (image StopSignal), as a number.
    pub stop_signal: i32,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Limits {
    /// `--memory`, bytes.
    pub memory_bytes: Option<u64>,
    /// `--cpus`, fractional CPUs.
    pub cpus: Option<f64>,
    /// `--pids-limit`.
    pub pids: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Network {
    pub mode: NetworkMode,
    /// `-p` publications.
    pub ports: Vec<PortMapping>,
    /// Filled in at run time from the IPAM (bridge mode): address/prefix, gateway, DNS servers.
    pub address: Option<String>,
    pub gateway: Option<String>,
    pub dns: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    None,
    #[default]
    Bridge,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub source: String,
    pub destination: String,
    pub read_only: bool,
}

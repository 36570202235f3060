//! A bundle's config.json (OCI runtime spec 1.0–1.2): the fields rvmm reads, and their checks.
//!
//! Fields rvmm does not act on are accepted when they cannot change what the workload may do
//! (annotations, `process.oomScoreAdj`, ...); fields that would widen or change the workload's
//! confinement and that rvmm cannot honour (a user namespace, `process.selinuxLabel` with no
//! SELinux, an unknown namespace) are refused with one line, before anything is created.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0}: invalid config.json: {1}")]
    Json(PathBuf, #[source] serde_json::Error),
    #[error("config.json: {0}")]
    Invalid(String),
    #[error("config.json: {0} is not supported by rvmm")]
    Unsupported(String),
}

type Result<T> = std::result::Result<T, Error>;

#[derive(Deserialize, Debug, Clone, Default)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    #[serde(default)]
    pub oci_version: String,
    pub process: Option<Process>,
    pub root: Option<Root>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    #[serde(default)]
    pub hooks: Hooks,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub linux: Linux,
}

#[derive(Deserialize, Debug, Clone, Default)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    #[serde(default)]
    pub terminal: bool,
    #[serde(default)]
    pub console_size: Option<ConsoleSize>,
    #[serde(default)]
    pub user: User,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cwd: String,
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
    #[serde(default)]
    pub rlimits: Vec<Rlimit>,
    #[serde(default)]
    pub no_new_privileges: bool,
    #[serde(default)]
    pub apparmor_profile: Option<String>,
    #[serde(default)]
    pub selinux_label: Option<String>,
    #[serde(default)]
    pub oom_score_adj: Option<i32>,
}

#[derive(Deserialize, Debug, Clone, Copy, Default)]
pub struct ConsoleSize {
    pub height: u16,
    pub width: u16,
}

#[derive(Deserialize, Debug, Clone, Default)]
#[serde(rename_all = "camelCase")]
pub struct User {
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    #[serde(default)]
    pub umask: Option<u32>,
    #[serde(default)]
    pub additional_gids: Vec<u32>,
}

#[derive(Deserialize, Debug, Clone, Default)]
pub struct Capabilities {
    #[serde(default)]
    pub bounding: Vec<String>,
    #[serde(default)]
    pub effective: Vec<String>,
    #[serde(default)]
    pub inheritable: Vec<String>,
    #[serde(default)]
    pub permitted: Vec<String>,
    #[serde(default)]
    pub ambient: Vec<String>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct Rlimit {
    #[serde(rename = "type")]
    pub kind: String,
    pub soft: u64,
    pub hard: u64,
}

#[derive(Deserialize, Debug, Clone, Default)]
#[serde(rename_all = "camelCase")]
pub struct Root {
    pub path: String,
    #[serde(default)]
    pub readonly: bool,
}

#[derive(Deserialize, Debug, Clone, Default)]
pub struct Mount {
    pub destination: String,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

#[derive(Deserialize, Debug, Clone, Default)]
#[serde(rename_all = "camelCase")]
pub struct Hooks {
    #[serde(default)]
    pub prestart: Vec<Hook>,
    #[serde(default)]
    pub create_runtime: Vec<Hook>,
    #[serde(default)]
    pub create_container: Vec<Hook>,
    #[serde(default)]
    pub start_container: Vec<Hook>,
    #[serde(default)]
    pub poststart: Vec<Hook>,
    #[serde(default)]
    pub poststop: Vec<Hook>,
}

#[derive(Deserialize, serde::Serialize, Debug, Clone, Default)]
pub struct Hook {
    pub path: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub timeout: Option<u64>,
}

#[derive(Deserialize, Debug, Clone, Default)]
#[serde(rename_all = "camelCase")]
pub struct Linux {
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub uid_mappings: Vec<serde_json::Value>,
    #[serde(default)]
    pub gid_mappings: Vec<serde_json::Value>,
    #[serde(default)]
    pub sysctl: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: Option<Resources>,
    #[serde(default)]
    pub cgroups_path: Option<String>,
    #[serde(default)]
    pub seccomp: Option<serde_json::Value>,
    #[serde(default)]
    pub rootfs_propagation: Option<String>,
    #[serde(default)]
    pub masked_paths: Vec<String>,
    #[serde(default)]
    pub readonly_paths: Vec<String>,
    #[serde(default)]
    pub devices: Vec<Device>,
    #[serde(default)]
    pub mount_label: Option<String>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct Namespace {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub path: Option<String>,
}

#[derive(Deserialize, Debug, Clone, Default)]
pub struct Resources {
    #[serde(default)]
    pub memory: Option<Memory>,
    #[serde(default)]
    pub cpu: Option<Cpu>,
    #[serde(default)]
    pub pids: Option<Pids>,
    #[serde(default)]
    pub devices: Vec<DeviceRule>,
}

#[derive(Deserialize, Debug, Clone, Default)]
pub struct Memory {
    #[serde(default)]
    pub limit: Option<i64>,
    #[serde(default)]
    pub swap: Option<i64>,
}

#[derive(Deserialize, Debug, Clone, Default)]
pub struct Cpu {
    #[serde(default)]
    pub shares: Option<u64>,
    #[serde(default)]
    pub quota: Option<i64>,
    #[serde(default)]
    pub period: Option<u64>,
    #[serde(default)]
    pub cpus: Option<String>,
}

#[derive(Deserialize, Debug, Clone, Default)]
pub struct Pids {
    pub limit: i64,
}

#[derive(Deserialize, Debug, Clone, Default)]
pub struct DeviceRule {
    #[serde(default)]
    pub allow: bool,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub major: Option<i64>,
    #[serde(default)]
    pub minor: Option<i64>,
    #[serde(default)]
    pub access: Option<String>,
}

#[derive(Deserialize, Debug, Clone, Default)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub path: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub major: i64,
    #[serde(default)]
    pub minor: i64,
    #[serde(default)]
    pub file_mode: Option<u32>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
}

/// The namespaces rvmm makes for a container, and those an engine may name by path.
pub const NAMESPACES: &[&str] = &["pid", "network", "mount", "ipc", "uts", "cgroup"];

impl Config {
    /// Reads and checks `bundle`/config.json.
    pub fn load(bundle: &Path) -> Result<Config> {
        let p = bundle.join("config.json");
        let text = std::fs::read(&p).map_err(|e| Error::Read(p.clone(), e))?;
        let c: Config = serde_json::from_slice(&text).map_err(|e| Error::Json(p.clone(), e))?;
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<()> {
        if !self.oci_version.starts_with("1.") {
            return Err(Error::Invalid(format!(
                "ociVersion {:?}: rvmm implements runtime spec 1.x",
                self.oci_version
            )));
        }
        let p = self
            .process
            .as_ref()
            .ok_or_else(|| Error::Invalid("no process".into()))?;
        if p.args.is_empty() {
            return Err(Error::Invalid("process.args is empty".into()));
        }
        if !p.cwd.starts_with('/') {
            return Err(Error::Invalid(format!(
                "process.cwd {:?} must be an absolute path",
                p.cwd
            )));
        }
        if self.root.as_ref().is_none_or(|r| r.path.is_empty()) {
            return Err(Error::Invalid("no root.path".into()));
        }
        if p.selinux_label.as_deref().is_some_and(|l| !l.is_empty()) {
            return Err(Error::Unsupported("process.selinuxLabel".into()));
        }
        let mut seen = Vec::new();
        for ns in &self.linux.namespaces {
            if ns.kind == "user" {
                return Err(Error::Unsupported(
                    "a user namespace (rootless containers)".into(),
                ));
            }
            if !NAMESPACES.contains(&ns.kind.as_str()) {
                return Err(Error::Unsupported(format!("namespace {:?}", ns.kind)));
            }
            if seen.contains(&ns.kind) {
                return Err(Error::Invalid(format!("namespace {} twice", ns.kind)));
            }
            if ns.path.is_some() && (ns.kind == "pid" || ns.kind == "mount") {
                return Err(Error::Unsupported(format!(
                    "joining an existing {} namespace",
                    ns.kind
                )));
            }
            seen.push(ns.kind.clone());
        }
        if !self.linux.uid_mappings.is_empty() || !self.linux.gid_mappings.is_empty() {
            return Err(Error::Unsupported("uid/gid mappings".into()));
        }
        for m in &self.mounts {
            if !m.destination.starts_with('/') {
                return Err(Error::Invalid(format!(
                    "mount destination {:?} must be absolute",
                    m.destination
                )));
            }
        }
        for h in self.all_hooks() {
            if !h.path.starts_with('/') {
                return Err(Error::Invalid(format!(
                    "hook path {:?} must be absolute",
                    h.path
                )));
            }
        }
        Ok(())
    }

    fn all_hooks(&self) -> impl Iterator<Item = &Hook> {
        let h = &self.hooks;
        h.prestart
            .iter()
            .chain(&h.create_runtime)
            .chain(&h.create_container)
            .chain(&h.start_container)
            .chain(&h.poststart)
            .chain(&h.poststop)
    }

    pub fn process(&self) -> &Process {
        self.process.as_ref().expect("checked in load")
    }

    /// The root filesystem's directory, `root.path` relative to the bundle.
    pub fn rootfs(&self, bundle: &Path) -> PathBuf {
        bundle.join(&self.root.as_ref().expect("checked in load").path)
    }

    /// Whether the config asks for a new namespace of `kind` (no path) or names one (a path).
    pub fn namespace(&self, kind: &str) -> Option<&Namespace> {
        self.linux.namespaces.iter().find(|n| n.kind == kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Config> {
        let c: Config = serde_json::from_str(json).map_err(|e| Error::Json("t".into(), e))?;
        c.check()?;
        Ok(c)
    }

    const MIN: &str =
        r#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/"},"root":{"path":"rootfs"}}"#;

    #[test]
    fn minimal_config_loads() {
        let c = parse(MIN).expect("config");
        assert_eq!(c.process().args, ["sh"]);
        assert_eq!(c.rootfs(Path::new("/b")), Path::new("/b/rootfs"));
    }

    #[test]
    fn refusals() {
        for (json, want) in [
            (MIN.replace("1.0.2", "0.9"), "ociVersion"),
            (MIN.replace(r#"["sh"]"#, "[]"), "args"),
            (MIN.replace(r#""cwd":"/""#, r#""cwd":"x""#), "cwd"),
            (
                MIN.replace(
                    r#""root""#,
                    r#""linux":{"namespaces":[{"type":"user"}]},"root""#,
                ),
                "user namespace",
            ),
            (
                MIN.replace(
                    r#""root""#,
                    r#""linux":{"namespaces":[{"type":"time"}]},"root""#,
                ),
                "time",
            ),
            (
                MIN.replace(
                    r#""root""#,
                    r#""mounts":[{"destination":"rel","type":"tmpfs"}],"root""#,
                ),
                "absolute",
            ),
        ] {
            let e = parse(&json).expect_err(&json).to_string();
            assert!(e.contains(want), "{json}: {e}");
        }
    }
}

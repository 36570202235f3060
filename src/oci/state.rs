//! The state of OCI containers: one directory per container under the runtime's `--root`, with
//! `state.json` (what `create` decided), `exec.fifo` (there until `start`), and a lock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Error, Result};
use crate::error::IoContext;

/// The state directory's default, as runc's is /run/runc.
pub const DEFAULT_ROOT: &str = "/run/rvmm-oci";

/// What the runtime keeps about one container.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Container {
    pub id: String,
    /// The container's init process as the host sees it (0: never started).
    pub pid: i32,
    /// Its start time (/proc/PID/stat), so a recycled pid is not taken for it.
    pub pid_start: u64,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// RFC 3339.
    pub created: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    pub cgroup: Option<crate::cgroups::Cgroup>,
    /// The hooks still to run after `create` (poststart, poststop), from config.json.
    #[serde(default)]
    pub poststart: Vec<super::config::Hook>,
    #[serde(default)]
    pub poststop: Vec<super::config::Hook>,
    /// VM isolation: `pid` is the VM's supervisor.
    #[serde(default)]
    pub vm: bool,
}

/// The spec's statuses, and `paused`.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self).ok();
        write!(f, "{}", s.as_ref().and_then(|v| v.as_str()).unwrap_or("?"))
    }
}

/// The spec's state document (`rvmm-oci state`, and hooks' stdin).
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Report<'a> {
    pub oci_version: &'static str,
    pub id: &'a str,
    pub status: Status,
    pub pid: i32,
    pub bundle: &'a Path,
    pub rootfs: &'a Path,
    pub created: &'a str,
    pub owner: &'static str,
    pub annotations: &'a BTreeMap<String, String>,
}

pub const OCI_VERSION: &str = "1.2.0";

/// A container id the spec and the engines accept: letters, digits, `_`, `-`, `.`, not starting
/// with a dot, at most 1024 bytes (it names a directory).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 1024
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// The name of container `id`'s lock file in the root (beside, not in, its directory).
fn lock_name(id: &str) -> String {
    format!(".{id}.lock")
}

pub struct Store {
    pub root: PathBuf,
}

impl Store {
    pub fn new(root: &Path) -> Store {
        Store {
            root: root.to_path_buf(),
        }
    }

    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    pub fn fifo(&self, id: &str) -> PathBuf {
        self.dir(id).join("exec.fifo")
    }

    /// The lock file of container `id`.
    pub fn lock_path(&self, id: &str) -> PathBuf {
        self.root.join(lock_name(id))
    }

    /// `lock` for a container that exists (NotFound, and no lock file made, otherwise).
    pub fn lock_existing(&self, id: &str) -> Result<std::fs::File> {
        if valid_id(id) && !self.dir(id).exists() {
            return Err(Error::NotFound(id.to_string()));
        }
        self.lock(id)
    }

    /// An exclusive lock on one container's commands (create, start, delete, pause).
    pub fn lock(&self, id: &str) -> Result<std::fs::File> {
        std::fs::create_dir_all(&self.root).at(|| format!("creating {}", self.root.display()))?;
        Ok(crate::run::state::lock_file(&self.root, &lock_name(id))?)
    }

    pub fn load(&self, id: &str) -> Result<Container> {
        if !valid_id(id) {
            return Err(Error::BadId(id.to_string()));
        }
        let p = self.dir(id).join("state.json");
        let text = match std::fs::read(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(id.to_string()))
            }
            Err(e) => return Err(e).at(|| format!("reading {}", p.display()))?,
        };
        serde_json::from_slice(&text).map_err(|e| Error::Corrupt(p, e))
    }

    pub fn save(&self, c: &Container) -> Result<()> {
        let p = self.dir(&c.id).join("state.json");
        let tmp = p.with_extension("tmp");
        let body = serde_json::to_vec(c).map_err(|e| Error::Corrupt(p.clone(), e))?;
        std::fs::write(&tmp, body).at(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &p).at(|| format!("writing {}", p.display()))?;
        Ok(())
    }

    /// Every container with a state (ids, sorted).
    pub fn ids(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.root)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().join("state.json").exists())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    pub fn status(&self, c: &Container) -> Status {
        // Gone, another process on a recycled pid, or a zombie (exited, not reaped yet by its
        // parent, the engine): start_time says None for a zombie.
        if c.pid <= 0 || crate::run::state::start_time(c.pid) != Some(c.pid_start) {
            return Status::Stopped;
        }
        if self.fifo(&c.id).exists() {
            return Status::Created;
        }
        if c.cgroup.as_ref().is_some_and(|cg| cg.frozen()) {
            return Status::Paused;
        }
        Status::Running
    }

    pub fn report<'a>(&self, c: &'a Container) -> Report<'a> {
        Store::report_of(c, self.status(c))
    }

    /// The state document of `c` as it is when `status`.
    pub fn report_of(c: &Container, status: Status) -> Report<'_> {
        Report {
            oci_version: OCI_VERSION,
            id: &c.id,
            status,
            pid: if status == Status::Stopped { 0 } else { c.pid },
            bundle: &c.bundle,
            rootfs: &c.rootfs,
            created: &c.created,
            owner: "",
            annotations: &c.annotations,
        }
    }
}

/// Now, RFC 3339 in UTC with nanoseconds (as runc writes `created`).
pub fn rfc3339_now() -> String {
    rvmm_shim::log::rfc3339(std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["a", "abc-DEF_1.2", &"x".repeat(1024)] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in ["", ".", "..", ".x", "a/b", "a b", "é", &"x".repeat(1025)] {
            assert!(!valid_id(bad), "{bad}");
        }
    }
}

//! Volumes: directories rvmm keeps for workloads under ROOT/volumes/NAME/_data (Docker's local
//! driver layout), with ROOT/volumes/NAME/volume.json describing each. A named volume is made on
//! first use or by `rvmm volume create`; an anonymous one (`-v /path`) gets a random name and
//! goes with its run when the run is removed with `--rm` or `rm -v`.
//!
//! A volume is in use while any run recorded under the root (running or exited, until removed)
//! lists it in its state; the flock on ROOT/volumes/.lock orders runs recording their volumes
//! against removals, so a volume is never removed under a run that is starting with it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{IoContext, IoError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("no such volume: {0}")]
    NotFound(String),
    #[error("volume {0} is in use by run(s) {1}")]
    InUse(String, String),
    #[error(
        "invalid volume name {0:?}: use letters, digits, '_', '.' and '-', starting with a letter or digit (2 characters at least)"
    )]
    InvalidName(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// What volume.json records.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Volume {
    pub name: String,
    /// Unix seconds.
    pub created: u64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Made for one run by `-v PATH` (or `--mount type=volume` without a source).
    #[serde(default)]
    pub anonymous: bool,
}

/// ROOT/volumes.
pub fn dir(root: &Path) -> PathBuf {
    root.join("volumes")
}

/// Where volume `name`'s files are.
pub fn data_dir(root: &Path, name: &str) -> PathBuf {
    dir(root).join(name).join("_data")
}

/// Docker's rule for volume names: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() >= 2
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// The exclusive lock of the volume store (released on drop).
pub struct Lock(#[allow(dead_code)] std::fs::File);

pub fn lock(root: &Path) -> Result<Lock> {
    Ok(Lock(crate::run::state::lock_file(&dir(root), ".lock")?))
}

/// Volume `name`, if it exists.
pub fn get(root: &Path, name: &str) -> Option<Volume> {
    if !valid_name(name) {
        return None;
    }
    let b = std::fs::read(dir(root).join(name).join("volume.json")).ok()?;
    serde_json::from_slice(&b).ok()
}

/// Every volume, by name.
pub fn list(root: &Path) -> Vec<Volume> {
    let Ok(rd) = std::fs::read_dir(dir(root)) else {
        return Vec::new();
    };
    let mut out: Vec<Volume> = rd
        .flatten()
        .filter_map(|e| get(root, &e.file_name().to_string_lossy()))
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Volume `name` (a random one when None: an anonymous volume), made if it does not exist.
/// Returns it and whether it was made now. The caller holds [`lock`].
pub fn create(
    root: &Path,
    name: Option<&str>,
    labels: BTreeMap<String, String>,
    _lock: &Lock,
) -> Result<(Volume, bool)> {
    let anonymous = name.is_none();
    let name = match name {
        Some(n) if !valid_name(n) => return Err(Error::InvalidName(n.to_string())),
        Some(n) => n.to_string(),
        None => crate::run::new_id(),
    };
    if let Some(v) = get(root, &name) {
        return Ok((v, false));
    }
    let v = Volume {
        name: name.clone(),
        created: crate::run::state::now(),
        labels,
        anonymous,
    };
    // Made aside and renamed into place: a half-made volume is never seen.
    let tmp = dir(root).join(format!(".new-{name}"));
    let _ = crate::image::store::remove_tree(&tmp);
    std::fs::create_dir_all(tmp.join("_data")).at(|| format!("creating {}", tmp.display()))?;
    let json = serde_json::to_vec_pretty(&v).unwrap_or_default();
    std::fs::write(tmp.join("volume.json"), json)
        .at(|| format!("writing {}", tmp.join("volume.json").display()))?;
    let to = dir(root).join(&name);
    std::fs::rename(&tmp, &to).at(|| format!("creating {}", to.display()))?;
    Ok((v, true))
}

/// The runs under `root` (any state) that use volume `name`, by ID.
pub fn users(root: &Path, name: &str) -> Vec<String> {
    crate::run::state::list(root)
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.volumes.iter().any(|v| v == name))
        .map(|r| r.id)
        .collect()
}

/// Removes volume `name` unless a run uses it. The caller holds [`lock`].
pub fn remove(root: &Path, name: &str, _lock: &Lock) -> Result<()> {
    if get(root, name).is_none() {
        return Err(Error::NotFound(name.to_string()));
    }
    let users = users(root, name);
    if !users.is_empty() {
        let ids: Vec<&str> = users.iter().map(|i| i.get(..12).unwrap_or(i)).collect();
        return Err(Error::InUse(name.to_string(), ids.join(", ")));
    }
    let d = dir(root).join(name);
    // Renamed out of the way first (atomic): a removal killed half way leaves no volume that
    // looks whole.
    let gone = dir(root).join(format!(".gone-{name}"));
    let _ = crate::image::store::remove_tree(&gone);
    std::fs::rename(&d, &gone).at(|| format!("removing {}", d.display()))?;
    crate::image::store::remove_tree(&gone).at(|| format!("removing {}", gone.display()))?;
    Ok(())
}

/// Removes the anonymous volumes among `names` that no run uses any more (a run removed with
/// `--rm` or `rm -v`), and what a killed removal left. Errors are not the caller's concern: a
/// leftover volume shows in `rvmm volume ls` and goes with `volume prune`.
pub fn remove_anonymous(root: &Path, names: &[String]) {
    if names.is_empty() {
        return;
    }
    let Ok(l) = lock(root) else { return };
    for n in names {
        if get(root, n).is_some_and(|v| v.anonymous) {
            let _ = remove(root, n, &l);
        }
    }
}

/// `volume prune`: removes the volumes no run uses (only anonymous ones unless `all`). Returns
/// the names and the bytes freed.
pub fn prune(root: &Path, all: bool) -> Result<(Vec<String>, u64)> {
    let l = lock(root)?;
    let used: std::collections::BTreeSet<String> = crate::run::state::list(root)
        .unwrap_or_default()
        .into_iter()
        .flat_map(|r| r.volumes)
        .collect();
    let mut removed = Vec::new();
    let mut bytes = 0;
    for v in list(root) {
        if used.contains(&v.name) || !(all || v.anonymous) {
            continue;
        }
        let size = disk_usage(&dir(root).join(&v.name));
        if remove(root, &v.name, &l).is_ok() {
            bytes += size;
            removed.push(v.name);
        }
    }
    // What killed removals and creations left.
    if let Ok(rd) = std::fs::read_dir(dir(root)) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(".gone-") || n.starts_with(".new-") {
                let _ = crate::image::store::remove_tree(&e.path());
            }
        }
    }
    Ok((removed, bytes))
}

/// Bytes in the files below `p` (not following symlinks).
pub fn disk_usage(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if !m.is_dir() {
        return m.blocks() * 512;
    }
    let mut n = m.blocks() * 512;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            n += disk_usage(&e.path());
        }
    }
    n
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_docker() {
        for ok in ["db", "my-data.v2", "a_b", "0x"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "a", "-x", ".x", "a/b", "a:b", "a b", "..", "é1"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn create_get_remove_prune() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let l = lock(r).unwrap();
        let (v, made) = create(r, Some("data"), BTreeMap::new(), &l).unwrap();
        assert!(made && !v.anonymous);
        assert!(data_dir(r, "data").is_dir());
        let (again, made) = create(r, Some("data"), BTreeMap::new(), &l).unwrap();
        assert!(!made);
        assert_eq!(again, v);
        let (anon, _) = create(r, None, BTreeMap::new(), &l).unwrap();
        assert!(anon.anonymous && anon.name.len() == 64);
        assert!(matches!(
            create(r, Some("../x"), BTreeMap::new(), &l),
            Err(Error::InvalidName(_))
        ));
        assert_eq!(
            list(r)
                .iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>()
                .len(),
            2
        );
        assert!(matches!(remove(r, "nope", &l), Err(Error::NotFound(_))));
        drop(l);
        std::fs::write(data_dir(r, &anon.name).join("f"), [0u8; 10000]).unwrap();
        let (gone, bytes) = prune(r, false).unwrap();
        assert_eq!(gone, vec![anon.name.clone()]);
        assert!(bytes >= 10000, "{bytes}");
        assert!(get(r, "data").is_some());
        let (gone, _) = prune(r, true).unwrap();
        assert_eq!(gone, vec!["data".to_string()]);
        assert!(list(r).is_empty());
    }
}

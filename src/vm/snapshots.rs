//! The warm-start snapshots of `rvmm run --isolation=vm`: where they live, how they are named, and
//! what `rvmm snapshot ls|rm|gc` sees.
//!
//! `ROOT/snapshots/KEY/` holds one snapshot (`snapshot.json` and `memory`, see
//! `crate::vmm::snapshot`). KEY is a hash of the guest's identity (the *tag*: kernel, rvmm-init,
//! kernel command line, rvmm binary) and the machine layout (vCPUs, memory, devices), so a run only
//! ever finds a snapshot it can use; `Vm::restore` checks both again. A snapshot is written under
//! `.tmp-RUNID` and renamed into place, so a reader never sees half of one and two runs racing
//! to save the same KEY keep the first. Next to it, `identity.txt` keeps what the tag was made
//! of: a snapshot whose kernel, rvmm-init or rvmm binary has since changed on disk can never be
//! restored again, and `gc` (run after every save) removes it. Snapshots of other builds that
//! still exist (say, a debug and a release rvmm) are left alone.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::Error;
use crate::error::IoContext;
use sha2::{Digest, Sha256};

use crate::vmm::snapshot::{self, Layout};

/// The snapshots directory of a store root.
pub struct Snapshots {
    dir: PathBuf,
}

/// One snapshot, as `rvmm snapshot ls` shows it.
#[derive(Debug, Clone)]
pub struct Info {
    pub key: String,
    pub path: PathBuf,
    /// None when `snapshot.json` cannot be read: the snapshot is damaged.
    pub layout: Option<Layout>,
    pub rvmm: Option<String>,
    pub tag: Option<String>,
    /// Bytes allocated on disk (the memory file is sparse).
    pub disk_bytes: u64,
    /// The kernel, rvmm-init and rvmm binary it was made with (and an image snapshot's image
    /// disk) are still there, unchanged.
    pub inputs_unchanged: bool,
    /// An image snapshot's image ID (its disk's name); None for a machine snapshot.
    pub image: Option<String>,
    /// The tag of the machine it was made on (for an image snapshot, not its own tag).
    pub machine_tag: Option<String>,
    pub created: std::time::SystemTime,
}

impl Snapshots {
    /// `ROOT/snapshots`, or `RVMM_SNAPSHOTS` when set (e.g. to share snapshots between stores,
    /// or to keep them on a fast disk).
    pub fn new(root: &Path) -> Self {
        let dir = std::env::var_os("RVMM_SNAPSHOTS")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("snapshots"));
        Self { dir }
    }

    /// The snapshots in `dir`.
    pub fn at(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory of snapshot `key`, if it is complete.
    pub fn find(&self, key: &str) -> Option<PathBuf> {
        let d = self.dir.join(key);
        (d.join(snapshot::STATE_FILE).is_file() && d.join(snapshot::MEMORY_FILE).is_file())
            .then_some(d)
    }

    /// Deletes snapshot `key`; true if there was one.
    pub fn remove(&self, key: &str) -> bool {
        let d = self.dir.join(key);
        d.exists() && std::fs::remove_dir_all(&d).is_ok()
    }

    /// Saves snapshot `key` by calling `take` with a private directory, then moving it into
    /// place (unless another run got there first). Returns what `take` returned.
    pub fn save(
        &self,
        key: &str,
        run_id: &str,
        identity: &str,
        take: impl FnOnce(&Path) -> Result<u64, crate::vmm::Error>,
    ) -> Result<u64, Error> {
        std::fs::create_dir_all(&self.dir).at(|| format!("creating {}", self.dir.display()))?;
        let tmp = self.dir.join(format!(".tmp-{run_id}"));
        let _ = std::fs::remove_dir_all(&tmp);
        let bytes = match take(&tmp).map_err(Error::Snapshot).and_then(|b| {
            let p = tmp.join(IDENTITY_FILE);
            std::fs::write(&p, identity).at(|| format!("writing {}", p.display()))?;
            Ok(b)
        }) {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        if std::fs::rename(&tmp, self.dir.join(key)).is_err() {
            // Another run saved this key meanwhile: keep theirs.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Ok(bytes)
    }

    /// Every snapshot, damaged ones included (not the temporary directories of saves in
    /// progress).
    pub fn list(&self) -> Vec<Info> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut v: Vec<Info> = rd
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter(|e| e.path().is_dir())
            .map(|e| info(&e.path()))
            .collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// Removes snapshots no rvmm can restore any more (damaged, another format, or made by a
    /// kernel, rvmm-init or rvmm binary that has changed on disk since), and leftovers of saves
    /// whose run is gone. Returns the keys removed.
    pub fn gc(&self) -> Vec<String> {
        let mut removed = Vec::new();
        for s in self.list() {
            let stale = s.layout.is_none()
                || s.rvmm.as_deref() != Some(snapshot::rvmm_version().as_str())
                || !s.inputs_unchanged;
            if stale && std::fs::remove_dir_all(&s.path).is_ok() {
                removed.push(s.key);
            }
        }
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(run) = name.strip_prefix(".tmp-") else {
                    continue;
                };
                // A run's VMM writes its snapshot into `.tmp-ID-vmm` first.
                let run = run.strip_suffix("-vmm").unwrap_or(run);
                // A save in progress belongs to a live run of the host-wide registry, or to a
                // live process that is not a run (`owner_key`: rvmm-oci's VM supervisors).
                if !crate::run::state::run_is_live(run)
                    && !owner_is_live(run)
                    && std::fs::remove_dir_all(e.path()).is_ok()
                {
                    removed.push(name);
                }
            }
        }
        removed
    }
}

/// The name a process that is not a run of the registry saves snapshots under (`pid-PID-START`,
/// START its start time), so that `gc` can tell whether it still lives.
pub fn owner_key() -> String {
    let pid = std::process::id() as i32;
    format!(
        "pid-{pid}-{}",
        crate::run::state::start_time(pid).unwrap_or_default()
    )
}

/// `run` is an [`owner_key`] of a live process.
fn owner_is_live(run: &str) -> bool {
    let Some((pid, start)) = run
        .strip_prefix("pid-")
        .and_then(|r| r.split_once('-'))
        .and_then(|(p, s)| Some((p.parse::<i32>().ok()?, s.parse::<u64>().ok()?)))
    else {
        return false;
    };
    pid > 0 && crate::run::state::start_time(pid) == Some(start)
}

fn info(path: &Path) -> Info {
    #[derive(serde::Deserialize)]
    struct Head {
        rvmm: String,
        tag: String,
        layout: Layout,
    }
    let head: Option<Head> = std::fs::read(path.join(snapshot::STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let disk_bytes = [snapshot::STATE_FILE, snapshot::MEMORY_FILE]
        .iter()
        .filter_map(|f| std::fs::metadata(path.join(f)).ok())
        .map(|m| m.blocks() * 512)
        .sum();
    let created = std::fs::metadata(path.join(snapshot::STATE_FILE))
        .and_then(|m| m.modified())
        .unwrap_or(std::time::UNIX_EPOCH);
    let key = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let memory_ok = path.join(snapshot::MEMORY_FILE).is_file();
    let (layout, rvmm, tag) = match head {
        Some(h) if memory_ok => (Some(h.layout), Some(h.rvmm), Some(h.tag)),
        _ => (None, None, None),
    };
    let identity = std::fs::read_to_string(path.join(IDENTITY_FILE)).ok();
    let inputs_unchanged = identity
        .as_deref()
        .is_some_and(|id| inputs_unchanged(id) && tag.as_deref() == Some(&*hash(id)));
    let image = identity.as_deref().and_then(image_of);
    let machine_tag = identity.as_deref().map(|id| hash(&machine_identity(id)));
    Info {
        key,
        path: path.to_owned(),
        layout,
        rvmm,
        tag,
        disk_bytes,
        created,
        inputs_unchanged,
        image,
        machine_tag,
    }
}

/// The identity of an image snapshot: the machine's `identity` and the image disk's. It goes
/// stale (and `gc` removes it) when the disk is removed or rebuilt.
pub fn image_identity(identity: &str, disk: &Path) -> String {
    format!("{identity}image {}\n", file_id(disk))
}

/// An identity without its image line: the machine's.
fn machine_identity(identity: &str) -> String {
    identity
        .lines()
        .filter(|l| !l.starts_with("image "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The image ID of an image snapshot's identity: its disk's name (`ID.erofs`), 12 characters.
fn image_of(identity: &str) -> Option<String> {
    let l = identity.lines().find_map(|l| l.strip_prefix("image "))?;
    let path = l.rsplitn(4, ' ').nth(3).unwrap_or(l);
    let name = Path::new(path).file_stem()?.to_string_lossy().into_owned();
    Some(name.chars().take(12).collect())
}

/// A file's identity without reading it: path, size, change time and inode. A rebuilt kernel or
/// rvmm-init gets a new one.
fn file_id(p: &Path) -> String {
    let canon = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    match std::fs::metadata(&canon) {
        Ok(m) => format!(
            "{} {} {}.{} {}",
            canon.display(),
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.ino()
        ),
        Err(_) => format!("{} missing", canon.display()),
    }
}

/// What a snapshot's `identity.txt` is called.
pub const IDENTITY_FILE: &str = "identity.txt";

/// The guest's identity, as text: a snapshot is only restored into the same kernel, rvmm-init,
/// kernel command line, boot-time workload privileges and rvmm binary that took it.
pub fn identity(kernel: &Path, init: &Path, cmdline: &str, security: &[u8]) -> String {
    let exe = std::env::current_exe().unwrap_or_default();
    format!(
        "kernel {}\ninit {}\ncmdline {}\nsecurity {}\nformat {}\nrvmm {}\n",
        file_id(kernel),
        file_id(init),
        cmdline,
        hex::encode(Sha256::digest(security)),
        snapshot::rvmm_version(),
        file_id(&exe)
    )
}

/// The tag of an identity.
pub fn hash(identity: &str) -> String {
    hex::encode(Sha256::digest(identity.as_bytes()))
}

/// [`identity`], hashed.
pub fn tag(kernel: &Path, init: &Path, cmdline: &str, security: &[u8]) -> String {
    hash(&identity(kernel, init, cmdline, security))
}

/// Are the files an identity names still the same files?
fn inputs_unchanged(identity: &str) -> bool {
    identity.lines().all(|l| {
        let Some((what, id)) = l.split_once(' ') else {
            return true;
        };
        if !matches!(what, "kernel" | "init" | "rvmm" | "image") {
            return true;
        }
        // "PATH SIZE MTIME INODE" (the path may hold spaces).
        let mut parts = id.rsplitn(4, ' ');
        let (_, _, _, path) = (parts.next(), parts.next(), parts.next(), parts.next());
        path.is_some_and(|p| file_id(Path::new(p)) == id)
    })
}

/// The snapshot key for a guest identity and a machine layout.
pub fn key(tag: &str, layout: &Layout) -> String {
    let s = format!(
        "{tag}\n{}",
        serde_json::to_string(layout).unwrap_or_default()
    );
    hex::encode(&Sha256::digest(s.as_bytes())[..8])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::vmm::snapshot::Slot;

    fn layout(mem: u32) -> Layout {
        Layout {
            vcpus: 1,
            mem_mib: mem,
            devices: vec![Slot::Block { read_only: true }, Slot::Net],
            channel: true,
            host: "h".into(),
        }
    }

    #[test]
    fn keys_differ_by_identity_and_layout() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("vmlinux");
        let i = d.path().join("init");
        std::fs::write(&k, b"k").unwrap();
        std::fs::write(&i, b"i").unwrap();
        let t1 = tag(&k, &i, "console=ttyS0", b"{}");
        assert_eq!(t1, tag(&k, &i, "console=ttyS0", b"{}"));
        assert_ne!(t1, tag(&k, &i, "console=ttyS1", b"{}"));
        assert_ne!(t1, tag(&k, &i, "console=ttyS0", b"{\"enforce\":true}"));
        std::fs::write(&i, b"i2").unwrap();
        assert_ne!(t1, tag(&k, &i, "console=ttyS0", b"{}"));
        assert_ne!(key(&t1, &layout(256)), key(&t1, &layout(512)));
        assert_eq!(key(&t1, &layout(256)).len(), 16);
    }

    #[test]
    fn an_identity_goes_stale_when_its_files_change() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("a kernel with spaces");
        let i = d.path().join("init");
        std::fs::write(&k, b"k").unwrap();
        std::fs::write(&i, b"i").unwrap();
        let id = identity(&k, &i, "console=ttyS0", b"{}");
        assert!(inputs_unchanged(&id));
        std::fs::write(&i, b"a rebuilt init").unwrap();
        assert!(!inputs_unchanged(&id));
        std::fs::remove_file(&i).unwrap();
        assert!(!inputs_unchanged(&id));
    }

    #[test]
    fn an_image_snapshot_is_its_machines_and_goes_stale_with_its_disk() {
        let d = tempfile::tempdir().unwrap();
        let (k, i) = (d.path().join("vmlinux"), d.path().join("init"));
        let disk = d.path().join("0123456789abcdef0123.erofs");
        for (p, b) in [(&k, &b"k"[..]), (&i, b"i"), (&disk, b"disk")] {
            std::fs::write(p, b).unwrap();
        }
        let machine = identity(&k, &i, "console=ttyS0", b"{}");
        let image = image_identity(&machine, &disk);
        assert_ne!(hash(&image), hash(&machine));
        assert_eq!(hash(&machine_identity(&image)), hash(&machine));
        assert_eq!(image_of(&image).as_deref(), Some("0123456789ab"));
        assert_eq!(image_of(&machine), None);
        assert!(inputs_unchanged(&image));
        // A rebuilt (or removed) image disk: the snapshot is stale, its machine's is not.
        std::fs::write(&disk, b"another disk").unwrap();
        assert!(!inputs_unchanged(&image) && inputs_unchanged(&machine));
        // As `ls` and `gc` read it from the snapshot's directory.
        let s = Snapshots::at(d.path().join("snaps"));
        let image = image_identity(&machine, &disk);
        s.save("ik", "run1", &image, |p| {
            std::fs::create_dir_all(p).unwrap();
            let head = serde_json::json!({"rvmm": snapshot::rvmm_version(),
                "tag": hash(&image), "layout": layout(256)});
            std::fs::write(p.join(snapshot::STATE_FILE), head.to_string()).unwrap();
            std::fs::write(p.join(snapshot::MEMORY_FILE), b"").unwrap();
            Ok(0)
        })
        .unwrap();
        let l = s.list();
        assert_eq!(l[0].image.as_deref(), Some("0123456789ab"));
        assert_eq!(l[0].machine_tag.as_deref(), Some(&*hash(&machine)));
        assert!(l[0].inputs_unchanged);
        std::fs::remove_file(&disk).unwrap();
        assert_eq!(s.gc(), vec!["ik".to_string()]);
    }

    #[test]
    fn save_find_list_gc() {
        let d = tempfile::tempdir().unwrap();
        let s = Snapshots::new(d.path());
        assert!(s.find("k1").is_none());
        // A failing save leaves nothing.
        assert!(s
            .save("k1", "run1", "id", |_| Err(crate::vmm::Error::Snapshot(
                "no".into()
            )))
            .is_err());
        assert!(s.list().is_empty());
        // A damaged one is listed and collected.
        let n = s
            .save("k1", "run1", "id", |p| {
                std::fs::create_dir_all(p).unwrap();
                std::fs::write(p.join(snapshot::STATE_FILE), b"{").unwrap();
                std::fs::write(p.join(snapshot::MEMORY_FILE), b"").unwrap();
                Ok(7)
            })
            .unwrap();
        assert_eq!(n, 7);
        assert!(s.find("k1").is_some());
        let l = s.list();
        assert_eq!(l.len(), 1);
        assert!(l[0].layout.is_none());
        // Leftovers of a dead run's save are collected too, and of a dead process's; a live
        // process's save in progress is not (rvmm-oci's supervisors are not runs).
        std::fs::create_dir_all(s.dir().join(".tmp-deadbeef")).unwrap();
        let live = format!(".tmp-{}-vmm", owner_key());
        std::fs::create_dir_all(s.dir().join(&live)).unwrap();
        let dead = format!(".tmp-pid-{}-1-vmm", std::process::id());
        std::fs::create_dir_all(s.dir().join(&dead)).unwrap();
        let mut gone = s.gc();
        gone.sort();
        assert_eq!(
            gone,
            vec![".tmp-deadbeef".to_string(), dead, "k1".to_string()]
        );
        assert!(s.dir().join(&live).is_dir());
        assert!(s.list().is_empty() && s.find("k1").is_none());
    }
}

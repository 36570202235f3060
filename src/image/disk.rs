//! Root disks for VM isolation: the image's layers merged (whiteouts applied by overlayfs itself)
//! into a read-only erofs image, built once per image ID and shared by every VM of that image.
//!
//! erofs over ext4 (`mkfs.ext4 -d`): no size to guess, smaller, faster to build, and read-only by
//! construction, which is all the guest needs (its writable layer is a tmpfs overlay).

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::ResolvedImage;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("moving the VM disk into place at {}", path.display())]
    Install {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mkfs.erofs is missing (apt install erofs-utils, or run scripts/setup.sh)")]
    NoMkfsErofs,
    #[error("building the VM disk for {reference}")]
    Build {
        reference: String,
        #[source]
        source: Box<Error>,
    },
    #[error("exporting the root filesystem of {reference}")]
    Export {
        reference: String,
        #[source]
        source: Box<Error>,
    },
    #[error("running unshare (util-linux)")]
    Unshare(#[source] std::io::Error),
    /// The merged-view script failed; its stderr.
    #[error("{0}")]
    Script(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The cached disk of an image, building it when missing. Safe against concurrent callers.
pub fn image_disk(root: &Path, image: &ResolvedImage) -> Result<PathBuf> {
    let dir = root.join("disks");
    fs::create_dir_all(&dir).map_err(|source| Error::CreateDir {
        path: dir.clone(),
        source,
    })?;
    let id = image.config_digest.trim_start_matches("sha256:");
    let path = dir.join(format!("{id}.erofs"));
    if path.exists() {
        return Ok(path);
    }
    let lock_path = dir.join(format!("{id}.lock"));
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| Error::Lock {
            path: lock_path.clone(),
            source,
        })?;
    // SAFETY: flock on an fd we own.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    if path.exists() {
        return Ok(path);
    }
    let tmp = dir.join(format!(".{id}.{}.tmp", std::process::id()));
    let r = build(image, &tmp);
    if let Err(e) = r {
        let _ = fs::remove_file(&tmp);
        let _ = fs::remove_file(&lock_path);
        return Err(e);
    }
    fs::rename(&tmp, &path).map_err(|source| Error::Install {
        path: path.clone(),
        source,
    })?;
    let _ = fs::remove_file(&lock_path);
    Ok(path)
}

fn build(image: &ResolvedImage, out: &Path) -> Result<()> {
    if which("mkfs.erofs").is_none() {
        return Err(Error::NoMkfsErofs);
    }
    with_merged_view(
        image,
        &format!("mkfs.erofs --quiet '{}' \"$m\"", out.display()),
    )
    .map_err(|e| Error::Build {
        reference: image.reference.clone(),
        source: Box::new(e),
    })
}

/// Copies the image's merged root filesystem into `dest` (created; ownership, modes and xattrs
/// kept): the rootfs of a crun/runc bundle, for example.
pub fn export_rootfs(image: &ResolvedImage, dest: &Path) -> Result<()> {
    fs::create_dir_all(dest).map_err(|source| Error::CreateDir {
        path: dest.to_path_buf(),
        source,
    })?;
    with_merged_view(image, &format!("cp -a \"$m/.\" '{}'", dest.display())).map_err(|e| {
        Error::Export {
            reference: image.reference.clone(),
            source: Box::new(e),
        }
    })
}

/// Runs the shell command `cmd` with `$m` naming the image's merged view: the single layer
/// itself, or a read-only overlayfs of all layers (whiteouts applied by overlayfs) mounted in a
/// private mount namespace that disappears with the command.
fn with_merged_view(image: &ResolvedImage, cmd: &str) -> Result<()> {
    let lowers: Vec<String> = image
        .layers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    let script = if lowers.len() == 1 {
        format!("set -e; m='{}'; {cmd}", lowers[0])
    } else {
        format!(
            "set -e; m=$(mktemp -d); mount -t overlay rvmm-view -o 'ro,lowerdir={}' \"$m\"; {cmd}; umount \"$m\"; rmdir \"$m\"",
            lowers.join(":"),
        )
    };
    let o = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .map_err(Error::Unshare)?;
    if !o.status.success() {
        return Err(Error::Script(one_line(&String::from_utf8_lossy(&o.stderr))));
    }
    Ok(())
}

fn which(p: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(p))
        .find(|p| p.is_file())
}

/// A tool's stderr as one message line: its lines joined with "; ", tool log prefixes and tabs
/// dropped ("<E> erofs: ..."), runs of blanks made one space.
fn one_line(stderr: &str) -> String {
    stderr
        .lines()
        .map(|l| {
            let l = l.trim();
            l.strip_prefix("<E> ")
                .unwrap_or(l)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// `rvmm gc` for VM disks: removes leftovers of interrupted builds (temporary images whose
/// builder is gone, lock files of no build) and the disks of images that are no longer in the
/// store (`live`: image IDs without `sha256:`). Returns the paths removed.
pub fn gc(root: &Path, live: &[String]) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(rd) = fs::read_dir(root.join("disks")) else {
        return removed;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let p = e.path();
        let stale = if let Some(rest) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp"))
        {
            // .ID.PID.tmp
            let pid = rest.rsplit('.').next().and_then(|p| p.parse::<i32>().ok());
            pid.is_none_or(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        } else if let Some(id) = name.strip_suffix(".erofs") {
            !live.iter().any(|l| l == id)
        } else if name.ends_with(".lock") {
            // A lock nobody holds (a build holds it exclusively for as long as it runs).
            fs::File::open(&p).is_ok_and(|f| {
                // SAFETY: flock on an fd we own; released when `f` drops.
                unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
            })
        } else {
            false
        };
        if stale && fs::remove_file(&p).is_ok() {
            removed.push(p);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn tool_errors_become_one_line() {
        let stderr = "<E> erofs_io: Failed to write - /x/.id.1.tmp:[0, 4096].\n<E> erofs: \tCould not format the device : [Error 28] No space left on device\n\n";
        assert_eq!(
            one_line(stderr),
            "erofs_io: Failed to write - /x/.id.1.tmp:[0, 4096].; erofs: Could not format the device : [Error 28] No space left on device"
        );
    }
}

//! Root disks for VM isolation: the image's layers merged (whiteouts applied by overlayfs itself)
//! into a read-only erofs image, built once per image ID and shared by every VM of that image.
//!
//! erofs over ext4 (`mkfs.ext4 -d`): no size to guess, smaller, faster to build, and read-only by
//! construction, which is all the guest needs (its writable layer is a tmpfs overlay).

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use super::ResolvedImage;

/// The cached disk of an image, building it when missing. Safe against concurrent callers.
pub fn image_disk(root: &Path, image: &ResolvedImage) -> anyhow::Result<PathBuf> {
    let dir = root.join("disks");
    fs::create_dir_all(&dir)?;
    let id = image.config_digest.trim_start_matches("sha256:");
    let path = dir.join(format!("{id}.erofs"));
    if path.exists() {
        return Ok(path);
    }
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{id}.lock")))?;
    // SAFETY: flock on an fd we own.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    if path.exists() {
        return Ok(path);
    }
    let tmp = dir.join(format!(".{id}.{}.tmp", std::process::id()));
    let r = build(image, &tmp);
    if let Err(e) = r {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, &path)?;
    let _ = fs::remove_file(dir.join(format!("{id}.lock")));
    Ok(path)
}

fn build(image: &ResolvedImage, out: &Path) -> anyhow::Result<()> {
    if which("mkfs.erofs").is_none() {
        bail!("mkfs.erofs is missing (apt install erofs-utils, or run scripts/setup.sh)");
    }
    let lowers: Vec<String> = image
        .layers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    // One layer is its own merged view; several are merged by a private overlayfs mount.
    let script = if lowers.len() == 1 {
        format!(
            "exec mkfs.erofs --quiet '{}' '{}'",
            out.display(),
            lowers[0]
        )
    } else {
        format!(
            "set -e; m=$(mktemp -d); mount -t overlay rvmm-disk -o 'lowerdir={}' \"$m\"; mkfs.erofs --quiet '{}' \"$m\"; umount \"$m\"; rmdir \"$m\"",
            lowers.join(":"),
            out.display()
        )
    };
    let o = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .context("running unshare (util-linux)")?;
    if !o.status.success() {
        bail!(
            "building the VM disk for {} failed: {}",
            image.reference,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

fn which(p: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(p))
        .find(|p| p.is_file())
}

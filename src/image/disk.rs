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
    with_merged_view(
        image,
        &format!("mkfs.erofs --quiet '{}' \"$m\"", out.display()),
    )
    .with_context(|| format!("building the VM disk for {}", image.reference))
}

/// Copies the image's merged root filesystem into `dest` (created; ownership, modes and xattrs
/// kept): the rootfs of a crun/runc bundle, for example.
pub fn export_rootfs(image: &ResolvedImage, dest: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dest)?;
    with_merged_view(image, &format!("cp -a \"$m/.\" '{}'", dest.display()))
        .with_context(|| format!("exporting the root filesystem of {}", image.reference))
}

/// Runs the shell command `cmd` with `$m` naming the image's merged view: the single layer
/// itself, or a read-only overlayfs of all layers (whiteouts applied by overlayfs) mounted in a
/// private mount namespace that disappears with the command.
fn with_merged_view(image: &ResolvedImage, cmd: &str) -> anyhow::Result<()> {
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
        .context("running unshare (util-linux)")?;
    if !o.status.success() {
        bail!("{}", String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(())
}

fn which(p: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(p))
        .find(|p| p.is_file())
}

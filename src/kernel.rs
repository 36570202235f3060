//! The guest kernel: where the cached vmlinux lives and how it is built (see guest-kernel/ and
//! docs/guest-kernel.md).
//!
//! The build inputs are embedded in the binary, so `rvmm kernel build` works without a source checkout and
//! the binary always knows which cache entry belongs to it: the cache key is a hash of exactly these files.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// The files the cache key covers, in key order (guest-kernel/build.sh lists them the same way).
const INPUTS: &[(&str, &[u8])] = &[
    ("build.sh", include_bytes!("../guest-kernel/build.sh")),
    (
        "config.fragment",
        include_bytes!("../guest-kernel/config.fragment"),
    ),
    (
        "patches/0001-rvmm-pvm-switch-skip-int3-selftest.patch",
        include_bytes!("../guest-kernel/patches/0001-rvmm-pvm-switch-skip-int3-selftest.patch"),
    ),
    (
        "patches/0002-rvmm-pvm-skip-fwait-in-fpu-drop.patch",
        include_bytes!("../guest-kernel/patches/0002-rvmm-pvm-skip-fwait-in-fpu-drop.patch"),
    ),
    (
        "patches/0003-rvmm-pvm-syscall-via-page-fault.patch",
        include_bytes!("../guest-kernel/patches/0003-rvmm-pvm-syscall-via-page-fault.patch"),
    ),
    (
        "patches/0004-rvmm-halt-and-poweroff-end-the-microvm.patch",
        include_bytes!("../guest-kernel/patches/0004-rvmm-halt-and-poweroff-end-the-microvm.patch"),
    ),
    (
        "patches/0005-rvmm-builtin-params-sysfs-group-once.patch",
        include_bytes!("../guest-kernel/patches/0005-rvmm-builtin-params-sysfs-group-once.patch"),
    ),
    (
        "patches/0006-rvmm-virtio-console-ports-open-more-than-once.patch",
        include_bytes!(
            "../guest-kernel/patches/0006-rvmm-virtio-console-ports-open-more-than-once.patch"
        ),
    ),
    (
        "patches/0007-rvmm-hz-25.patch",
        include_bytes!("../guest-kernel/patches/0007-rvmm-hz-25.patch"),
    ),
    (
        "patches/0008-rvmm-mmap-read-around-in-one-folio.patch",
        include_bytes!("../guest-kernel/patches/0008-rvmm-mmap-read-around-in-one-folio.patch"),
    ),
];

/// What the VMM appends to the guest command line on kvm_pvm hosts (one line, shared with the tests and
/// with peer VMMs in the bench).
const PVM_CMDLINE: &str = include_str!("../guest-kernel/cmdline-kvm_pvm.txt");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no cached guest kernel at {0}; run `rvmm kernel build` (about 4 minutes on 2 cores)")]
    NotBuilt(PathBuf),
    #[error("cannot prepare the kernel build in {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run the kernel build script")]
    Spawn(#[source] std::io::Error),
    #[error("the kernel build failed (exit status {0})")]
    BuildFailed(i32),
}

/// The kernel command-line additions kvm_pvm needs (CPU features its emulator lacks, our patches' switch).
pub fn pvm_cmdline_additions() -> &'static str {
    PVM_CMDLINE.trim()
}

/// The cache key of this binary's kernel: sha256 over each input's name and sha256, first 16 hex digits.
pub fn inputs_hash() -> String {
    let mut outer = Sha256::new();
    for (name, content) in INPUTS {
        outer.update(name.as_bytes());
        outer.update(b"\n");
        outer.update(hex::encode(Sha256::digest(content)).as_bytes());
        outer.update(b"\n");
    }
    hex::encode(outer.finalize())[..16].to_string()
}

/// Where this binary's vmlinux lives in the cache, built or not.
pub fn vmlinux_path() -> PathBuf {
    cache_root()
        .join("kernel")
        .join(inputs_hash())
        .join("vmlinux")
}

/// The cached vmlinux, or an error that says how to build it.
pub fn cached_vmlinux() -> Result<PathBuf, Error> {
    let p = vmlinux_path();
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::NotBuilt(p))
    }
}

/// `RVMM_CACHE_DIR`, else `$XDG_CACHE_HOME/rvmm`, else `~/.cache/rvmm` (as build.sh resolves it).
fn cache_root() -> PathBuf {
    match std::env::var_os("RVMM_CACHE_DIR").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => crate::paths::cache_dir(),
    }
}

/// Builds the kernel (a no-op on a cache hit) by running the embedded build script; its progress lines go
/// to our stdout. Returns the vmlinux path.
pub fn build() -> Result<PathBuf, Error> {
    let dir = tempfile::Builder::new()
        .prefix("rvmm-kernel-inputs-")
        .tempdir()
        .map_err(|source| Error::Prepare {
            path: std::env::temp_dir(),
            source,
        })?;
    write_inputs(dir.path())?;
    let status = Command::new("bash")
        .arg(dir.path().join("build.sh"))
        .env("RVMM_CACHE_DIR", cache_root())
        .status()
        .map_err(Error::Spawn)?;
    if !status.success() {
        return Err(Error::BuildFailed(status.code().unwrap_or(-1)));
    }
    cached_vmlinux()
}

fn write_inputs(dir: &Path) -> Result<(), Error> {
    for (name, content) in INPUTS {
        let path = dir.join(name);
        let err = |source| Error::Prepare {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        std::fs::write(&path, content).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file build.sh hashes must be embedded, or the binary would look in the wrong cache entry.
    #[test]
    fn embedded_inputs_match_the_source_tree() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-kernel");
        let mut on_disk: Vec<String> = std::fs::read_dir(root.join("patches"))
            .expect("patches dir")
            .filter_map(|e| e.ok())
            .map(|e| format!("patches/{}", e.file_name().to_string_lossy()))
            .filter(|n| n.ends_with(".patch"))
            .collect();
        on_disk.sort();
        let embedded: Vec<&str> = INPUTS
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| n.starts_with("patches/"))
            .collect();
        assert_eq!(embedded, on_disk);
        for (name, content) in INPUTS {
            let disk = std::fs::read(root.join(name)).expect("input readable");
            assert_eq!(&disk[..], *content, "{name} differs from the embedded copy");
        }
    }

    /// The Rust cache key and build.sh's must agree.
    #[test]
    fn hash_matches_build_script() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-kernel/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("--print-path")
            .env("RVMM_CACHE_DIR", "/nonexistent-cache")
            .output()
            .expect("bash runs");
        assert!(out.status.success());
        let printed = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            printed.trim(),
            format!("/nonexistent-cache/kernel/{}/vmlinux", inputs_hash())
        );
    }

    #[test]
    fn pvm_additions_are_one_line_with_the_switch() {
        let a = pvm_cmdline_additions();
        assert!(!a.contains('\n'));
        assert!(a.contains("rvmm.pvm=1"));
        assert!(a.contains("noxsave"));
    }
}

//! Where rvmm keeps its state: the store root, run directories, caches.

use std::path::PathBuf;

/// The default store root: `/var/lib/rvmm` for root, `$XDG_DATA_HOME/rvmm` (or `~/.local/share/rvmm`) otherwise.
pub fn default_root() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/rvmm");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("rvmm");
    }
    home_dir().join(".local/share/rvmm")
}

/// The cache directory: `$XDG_CACHE_HOME/rvmm` or `~/.cache/rvmm`.
pub fn cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("rvmm");
    }
    home_dir().join(".cache/rvmm")
}

/// Runtime state of live runs (pid files, sockets, per-run dirs): `/run/rvmm` for root.
pub fn run_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/run/rvmm");
    }
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("rvmm");
    }
    std::env::temp_dir().join(format!("rvmm-{}", nix::unistd::geteuid()))
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

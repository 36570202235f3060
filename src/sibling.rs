//! rvmm's helper binaries, installed next to `rvmm`: `rvmm-vmm` (the jailed VMM process of a VM
//! run) and `rvmm-shim` (what keeps a container run, and the supervisor of a detached run). Each
//! maps only its own code, so the processes that stay alive for a run's whole life are small
//! (docs/benchmarks/lean.md). A helper checks a fingerprint of the protocol it speaks with
//! `rvmm` (its first argument): one from another build refuses in one line instead of misreading
//! what it was given.

use std::path::PathBuf;

/// The path of helper `name` next to this executable, if it is there.
pub fn binary_path(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.with_file_name(name)).filter(|p| p.is_file())
}

pub use rvmm_shim::{check_protocol, fnv1a, VERSION_FINGERPRINT};

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

/// FNV-1a of `bytes`, continuing from `h`: the protocol fingerprints, computed at compile time.
pub const fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        h = (h ^ bytes[i] as u64).wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

/// The fingerprint of this build's version: where every protocol fingerprint starts.
pub const VERSION_FINGERPRINT: u64 =
    fnv1a(env!("CARGO_PKG_VERSION").as_bytes(), 0xcbf2_9ce4_8422_2325);

/// A helper's first argument: checks it is `ours` (else says so in one line and returns false).
pub fn check_protocol(helper: &str, ours: u64, theirs: Option<&str>) -> bool {
    let ours = format!("{ours:016x}");
    if theirs == Some(ours.as_str()) {
        return true;
    }
    eprintln!(
        "{helper}: this binary is from another build than the rvmm that started it \
         (protocol {ours}, asked for {}): rebuild both (cargo build), or remove {helper} to \
         let rvmm do its work itself",
        theirs.unwrap_or("none")
    );
    false
}

//! The `rvmm-shim` binary (the `rvmm-shim` crate): what keeps a container run once its workload
//! runs, and a detached VM run's supervisor. Finding it next to rvmm; the rest is the crate's.

use std::path::PathBuf;

pub use rvmm_shim::{exec_wait, Handover, BINARY as SHIM_BINARY};

/// The `rvmm-shim` binary next to this rvmm, if there is one.
pub fn binary_path() -> Option<PathBuf> {
    crate::sibling::binary_path(SHIM_BINARY)
}

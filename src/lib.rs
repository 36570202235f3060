//! rvmm: run the same OCI image in a KVM microVM or a namespaced container, and measure the difference.
//!
//! The library holds everything; `src/main.rs` is a thin CLI over it. See docs/ARCHITECTURE.md.

pub mod bench;
pub mod cgroups;
pub mod container;
pub mod devices;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod image;
pub mod kernel;
pub mod net;
pub mod oci;
pub mod paths;
pub mod run;
pub mod runspec;
pub mod security;
pub mod sibling;
pub mod vm;
pub mod vmm;
pub mod volume;

/// The log filter of rvmm's binaries when `RVMM_LOG` is unset: virtio-queue logs errors a guest
/// provokes at will (a bad avail index), which are not for the user.
const DEFAULT_LOG: &str = "warn,virtio_queue=off";

/// Starts logging to stderr, filtered by `RVMM_LOG` (default [`DEFAULT_LOG`]).
pub fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().filter_or("RVMM_LOG", DEFAULT_LOG))
        .format_timestamp_millis()
        .init();
}

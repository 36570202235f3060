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
pub mod paths;
pub mod run;
pub mod runspec;
pub mod security;
pub mod vm;
pub mod vmm;

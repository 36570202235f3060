//! virtio-fs: a shared host directory served to the guest over FUSE (issue 19). [`server`] is
//! the passthrough filesystem, confined to its directory; [`abi`] the FUSE wire format it
//! decodes. The virtio device that carries the requests comes next.

pub mod abi;
pub mod server;
#[cfg(test)]
mod tests;

pub use server::{Limits, Server};

/// The virtio device type of a filesystem device.
pub const TYPE_FS: u32 = 26;

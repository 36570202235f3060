//! VM isolation: image root disk, guest-init delivery (initramfs), the host-guest channel, running a RunSpec in a microVM.

use crate::container::RunOptions;
use crate::image::ResolvedImage;
use crate::runspec::RunSpec;

/// Runs the spec in a microVM; returns the workload's exit status.
pub fn run(_spec: &RunSpec, _image: &ResolvedImage, _opts: &RunOptions) -> anyhow::Result<u8> {
    anyhow::bail!("--isolation=vm is not implemented yet; use --isolation=container")
}

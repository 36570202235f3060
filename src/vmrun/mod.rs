//! VM isolation: image root disk, guest-init delivery (initramfs), the host-guest channel, running a RunSpec in a microVM.

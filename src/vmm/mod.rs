//! The VMM: KVM setup, guest memory, vCPUs, boot, event loop.

//! The guest kernel: where the cached vmlinux lives and how it is built (see guest-kernel/).

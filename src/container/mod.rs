//! Container isolation: namespaces, overlayfs rootfs, pivot_root, cgroups, capabilities, seccomp.

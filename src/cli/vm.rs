//! `rvmm vm`: boot a kernel and disks directly with rvmm's VMM.

use std::path::PathBuf;

use rvmm::vmm::{Console, DiskConfig, NetConfig, TapSource, VmConfig, VmExit, DEFAULT_CMDLINE};

use super::Global;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Uncompressed ELF vmlinux (default: the cached guest kernel, see `rvmm kernel path`).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// A raw disk image as virtio-blk (/dev/vda, /dev/vdb, ...); append `:ro` for read-only.
    #[arg(long = "disk", value_name = "PATH[:ro]")]
    pub disks: Vec<String>,
    /// An initrd/initramfs.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (default: serial console, reboot=k, and root=/dev/vda when a disk is
    /// given). The VMM always appends its devices and, on kvm_pvm, the CPU-feature additions.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128, value_name = "MIB")]
    pub memory: u32,
    /// A virtio-net device on this TAP (created if missing); MAC 52:54:00:12:34:NN.
    #[arg(long = "net", value_name = "TAP")]
    pub nets: Vec<String>,
    /// Write the guest console to a file instead of stdout.
    #[arg(long, value_name = "PATH")]
    pub console: Option<PathBuf>,
}

/// Parses `PATH[:ro]`.
pub fn parse_disk(s: &str) -> DiskConfig {
    match s.strip_suffix(":ro") {
        Some(p) => DiskConfig {
            path: Some(PathBuf::from(p)),
            read_only: true,
        },
        None => DiskConfig {
            path: Some(PathBuf::from(s.strip_suffix(":rw").unwrap_or(s))),
            read_only: false,
        },
    }
}

pub fn exec(args: Args, _global: &Global) -> anyhow::Result<u8> {
    let kernel = match args.kernel {
        Some(k) => k,
        None => rvmm::kernel::cached_vmlinux()?,
    };
    let disks: Vec<DiskConfig> = args.disks.iter().map(|d| parse_disk(d)).collect();
    let cmdline = args.cmdline.unwrap_or_else(|| match disks.first() {
        Some(d) => format!(
            "{DEFAULT_CMDLINE} root=/dev/vda {}",
            if d.read_only { "ro" } else { "rw" }
        ),
        None => DEFAULT_CMDLINE.to_owned(),
    });
    let cfg = VmConfig {
        kernel,
        initrd: args.initrd,
        cmdline,
        vcpus: args.cpus,
        mem_mib: args.memory,
        disks,
        console: match args.console {
            Some(p) => Console::File(p),
            None => Console::Stdio,
        },
        channel: None,
        net: args
            .nets
            .iter()
            .enumerate()
            .map(|(i, t)| NetConfig {
                tap: TapSource::Name(t.clone()),
                mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56u8.wrapping_add(i as u8)],
            })
            .collect(),
        ports: Vec::new(),
        fs: None,
    };

    // The VMM runs jailed in a process of its own (docs/security.md); SIGINT/SIGTERM stop it.
    match rvmm::vm::run_direct(cfg)? {
        VmExit::Reset | VmExit::Shutdown => Ok(0),
        VmExit::Stopped => Ok(130),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn disk_flags() {
        let d = parse_disk("/a/b.img:ro");
        assert!(d.read_only);
        assert_eq!(d.path, Some(PathBuf::from("/a/b.img")));
        let d = parse_disk("x.img");
        assert!(!d.read_only);
        assert_eq!(parse_disk("x.img:rw").path, Some(PathBuf::from("x.img")));
    }
}

//! `rvmm doctor`: what this host offers, each finding with a hint.

use std::path::Path;

use rvmm::vmm::kvm;

use super::Global;

#[derive(clap::Args, Debug)]
pub struct Args {}

enum Level {
    Ok,
    Warn,
    Missing,
}

fn line(level: Level, what: &str, detail: &str, hint: &str) {
    let tag = match level {
        Level::Ok => "ok  ",
        Level::Warn => "warn",
        Level::Missing => "MISS",
    };
    if hint.is_empty() {
        println!("{tag} {what:<14} {detail}");
    } else {
        println!("{tag} {what:<14} {detail}\n     {:<14} hint: {hint}", "");
    }
}

/// The cgroup layout: "v2", "hybrid" or "v1".
pub fn cgroup_layout() -> &'static str {
    use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
    let is_cg2 = |p: &str| {
        statfs(p)
            .map(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC)
            .unwrap_or(false)
    };
    if is_cg2("/sys/fs/cgroup") {
        "v2"
    } else if is_cg2("/sys/fs/cgroup/unified") {
        "hybrid"
    } else {
        "v1"
    }
}

fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

pub fn exec(_args: Args, global: &Global) -> anyhow::Result<u8> {
    let mut missing = 0;
    match kvm::open() {
        Ok(k) => {
            let kind = kvm::host_kind();
            let hint = match kind {
                kvm::HostKind::Pvm => "guests boot slowly here (~12 s; warm starts from a snapshot ~1.5 s); rvmm adds the kvm_pvm kernel command-line additions itself",
                kvm::HostKind::Hardware => "",
            };
            line(
                if hint.is_empty() {
                    Level::Ok
                } else {
                    Level::Warn
                },
                "kvm",
                &format!("{}, API version {}", kind.name(), k.get_api_version()),
                hint,
            );
        }
        Err(e) => {
            missing += 1;
            line(
                Level::Missing,
                "kvm",
                &e.to_string(),
                "load kvm_intel/kvm_amd (or kvm_pvm), and run as root or in the kvm group",
            );
        }
    }
    match rvmm::vm::jail::host_check() {
        Ok(what) => line(Level::Ok, "VMM jail", &what, ""),
        Err(e) => {
            missing += 1;
            line(
                Level::Missing,
                "VMM jail",
                &e,
                "VM isolation runs its VMM jailed (docs/security.md); RVMM_NO_JAIL=1 is for debugging only",
            )
        }
    }
    let cg = cgroup_layout();
    line(
        if cg == "v2" { Level::Ok } else { Level::Warn },
        "cgroups",
        cg,
        match cg {
            "hybrid" => "v1 controllers plus a cgroup2 mount at /sys/fs/cgroup/unified; rvmm handles it (crun 1.8 does not)",
            "v1" => "legacy cgroups: limits use the v1 controllers",
            _ => "",
        },
    );
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun");
    match tun {
        Ok(_) => line(Level::Ok, "/dev/net/tun", "usable", ""),
        Err(e) => {
            missing += 1;
            line(
                Level::Missing,
                "/dev/net/tun",
                &e.to_string(),
                "modprobe tun (VM networking needs TAP devices)",
            )
        }
    }
    match rvmm::kernel::cached_vmlinux() {
        Ok(p) => line(Level::Ok, "guest kernel", &p.display().to_string(), ""),
        Err(_) => line(
            Level::Warn,
            "guest kernel",
            &format!("not built ({})", rvmm::kernel::vmlinux_path().display()),
            "run `rvmm kernel build` (about 4 minutes on 2 cores)",
        ),
    }
    for (tool, required, hint) in [
        (
            "mkfs.ext4",
            true,
            "apt-get install e2fsprogs (VM root disks)",
        ),
        (
            "ip",
            true,
            "apt-get install iproute2 (bridges, veths, taps)",
        ),
        (
            "iptables",
            true,
            "apt-get install iptables (NAT, published ports)",
        ),
        ("crun", false, "apt-get install crun (peer for benchmarks)"),
        ("runc", false, "apt-get install runc (peer for benchmarks)"),
        (
            "qemu-system-x86_64",
            false,
            "apt-get install qemu-system-x86 (peer VMM for benchmarks)",
        ),
    ] {
        if on_path(tool) {
            line(Level::Ok, tool, "found", "");
        } else if required {
            missing += 1;
            line(Level::Missing, tool, "not on PATH", hint);
        } else {
            line(Level::Warn, tool, "not on PATH (optional)", hint);
        }
    }
    let root = &global.root;
    line(
        Level::Ok,
        "store",
        &format!(
            "{}{}",
            root.display(),
            if Path::new(root).exists() {
                ""
            } else {
                " (not created yet)"
            }
        ),
        "",
    );
    Ok(if missing == 0 { 0 } else { 1 })
}

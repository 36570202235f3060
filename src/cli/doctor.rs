//! `rvmm doctor`: what this host offers rvmm, each finding with a hint.

use std::path::Path;

use rvmm::vmm::HostKind;

use super::Global;

#[derive(clap::Args, Debug)]
pub struct Args {}

struct Report {
    problems: usize,
}

impl Report {
    fn ok(&self, what: &str, detail: &str) {
        println!("ok    {what:<14} {detail}");
    }
    fn warn(&mut self, what: &str, detail: &str, hint: &str) {
        println!("warn  {what:<14} {detail}\n      {:<14} hint: {hint}", "");
    }
    fn bad(&mut self, what: &str, detail: &str, hint: &str) {
        self.problems += 1;
        println!("FAIL  {what:<14} {detail}\n      {:<14} hint: {hint}", "");
    }
}

pub fn exec(_args: Args, global: &Global) -> anyhow::Result<u8> {
    let mut r = Report { problems: 0 };

    // KVM.
    match kvm_ioctls::Kvm::new() {
        Ok(kvm) => {
            let kind = HostKind::detect();
            r.ok(
                "kvm",
                &format!("/dev/kvm, API version {}, {}", kvm.get_api_version(), kind.describe()),
            );
            if kind == HostKind::Pvm {
                println!(
                    "      {:<14} guests boot slowly here (~30 s); rvmm adds `{}` to their command line",
                    "",
                    rvmm::kernel::pvm_cmdline_additions()
                );
            }
        }
        Err(e) => r.bad(
            "kvm",
            &format!("cannot open /dev/kvm: {e}"),
            "load kvm_intel or kvm_amd (or run where KVM exists) and make /dev/kvm read-writable for this user; --isolation=container still works",
        ),
    }

    // cgroups.
    let layout = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "v2 (unified)"
    } else if Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists() {
        "hybrid (v1 controllers, cgroup2 at /sys/fs/cgroup/unified)"
    } else if Path::new("/sys/fs/cgroup/memory").exists() {
        "v1 (legacy)"
    } else {
        ""
    };
    if layout.is_empty() {
        r.bad(
            "cgroups",
            "no cgroup filesystem found",
            "mount cgroup2 at /sys/fs/cgroup",
        );
    } else {
        r.ok("cgroups", layout);
    }

    // Networking.
    if Path::new("/dev/net/tun").exists() {
        r.ok("tun", "/dev/net/tun");
    } else {
        r.warn(
            "tun",
            "/dev/net/tun missing",
            "modprobe tun (VM networking needs taps)",
        );
    }

    // Kernel.
    match rvmm::kernel::cached_vmlinux() {
        Ok(p) => r.ok("guest kernel", &p.display().to_string()),
        Err(_) => r.warn(
            "guest kernel",
            &format!("not built ({})", rvmm::kernel::vmlinux_path().display()),
            "run `rvmm kernel build` (about 10 minutes on 2 cores)",
        ),
    }

    // Store.
    r.ok("store", &global.root.display().to_string());

    // Tools.
    let tools = [
        ("mkfs.ext4", "e2fsprogs", true),
        ("iptables", "iptables", true),
        ("ip", "iproute2", true),
        ("crun", "crun (bench peer)", false),
        ("runc", "runc (bench peer)", false),
        ("qemu-system-x86_64", "qemu-system-x86 (bench peer)", false),
        (
            "firecracker",
            "firecracker (bench peer, not in Debian)",
            false,
        ),
        (
            "cloud-hypervisor",
            "cloud-hypervisor (bench peer, not in Debian)",
            false,
        ),
    ];
    for (tool, pkg, needed) in tools {
        match which(tool) {
            Some(p) => r.ok(tool, &p),
            None if needed => r.bad(tool, "not found", &format!("apt-get install {pkg}")),
            None => println!("-     {tool:<14} not found (optional: {pkg})"),
        }
    }
    if r.problems > 0 {
        println!("{} problem(s) found", r.problems);
        return Ok(1);
    }
    Ok(0)
}

fn which(prog: &str) -> Option<String> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
}

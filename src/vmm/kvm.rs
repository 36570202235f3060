//! Opening /dev/kvm, the capabilities we rely on, and what kind of KVM this host has.

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// Errors opening or checking KVM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("/dev/kvm does not exist (is the kvm module loaded? on a cloud VM, nested virtualisation must be on)")]
    Missing,
    #[error("no permission to open /dev/kvm (run as root or join the `kvm` group)")]
    Permission,
    #[error("cannot open /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    #[error("unsupported KVM API version {0} (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a capability rvmm needs: {0}")]
    MissingCap(&'static str),
}

/// Which kind of KVM the host offers. It changes what the guest command line needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// KVM on VMX or SVM: the fast path, nothing special.
    Hardware,
    /// kvm_pvm: KVM in software with shadow paging; the guest runs CPUID natively and needs
    /// kernel command-line additions (see `guest-kernel/cmdline-kvm_pvm.txt`).
    Pvm,
}

impl HostKind {
    pub fn name(self) -> &'static str {
        match self {
            HostKind::Hardware => "hardware KVM (VMX/SVM)",
            HostKind::Pvm => "kvm_pvm (software KVM, shadow paging)",
        }
    }
}

/// Detects the host kind. `RVMM_KVM_KIND=pvm|hardware` overrides the detection.
///
/// Order: the vendor module that is loaded (`kvm_pvm` beats `kvm_intel`/`kvm_amd`, since PVM can be
/// loaded beside them and then owns /dev/kvm only when they are absent), then the CPU flags.
pub fn host_kind() -> HostKind {
    match std::env::var("RVMM_KVM_KIND").as_deref() {
        Ok("pvm") | Ok("kvm_pvm") => return HostKind::Pvm,
        Ok("hardware") | Ok("hw") => return HostKind::Hardware,
        _ => {}
    }
    let has = |m: &str| Path::new("/sys/module").join(m).exists();
    let hw_module = has("kvm_intel") || has("kvm_amd");
    if has("kvm_pvm") && !hw_module {
        return HostKind::Pvm;
    }
    if hw_module {
        return HostKind::Hardware;
    }
    // No module information (built-in KVM): look at the CPU flags.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if virt {
        HostKind::Hardware
    } else {
        HostKind::Pvm
    }
}

/// The capabilities the VMM relies on.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// Opens /dev/kvm and checks the API version and the capabilities we need.
pub fn open() -> Result<Kvm, Error> {
    let path = Path::new("/dev/kvm");
    if !path.exists() {
        return Err(Error::Missing);
    }
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::EACCES | libc::EPERM => Error::Permission,
        libc::ENOENT | libc::ENXIO | libc::ENODEV => Error::Missing,
        _ => Error::Open(e),
    })?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(Error::ApiVersion(v));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(Error::MissingCap(name));
        }
    }
    Ok(kvm)
}

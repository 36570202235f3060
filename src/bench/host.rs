//! A description of the host, so a reader can judge the noise in the numbers.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Host {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub kvm: String,
    pub load_before: String,
    pub load_after: String,
}

impl Host {
    pub fn describe() -> Host {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Host {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel,
            kvm: kvm_kind(),
            load_before: loadavg(),
            load_after: String::new(),
        }
    }

    pub fn finish(&mut self) {
        self.load_after = loadavg();
    }
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Which KVM this host has, by the module that provides it.
pub fn kvm_kind() -> String {
    if !std::path::Path::new("/dev/kvm").exists() {
        return "none".into();
    }
    for (module, kind) in [
        ("kvm_pvm", "kvm_pvm (software KVM)"),
        ("kvm_intel", "hardware KVM (VMX)"),
        ("kvm_amd", "hardware KVM (SVM)"),
    ] {
        if std::path::Path::new("/sys/module").join(module).exists() {
            return kind.into();
        }
    }
    "kvm (kind unknown)".into()
}

//! Shared fixtures for integration tests.
//!
//! A test that needs something this machine lacks calls [`require`]: it prints "skipping: why" and the
//! test returns early. CI sets `RVMM_REQUIRE=kvm,root,net,...`, which turns such a skip into a failure.
#![allow(dead_code)]

pub mod guest;
pub mod images;
pub mod lifecycle;
pub mod run;

use std::path::PathBuf;

/// Capabilities a test can need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    Kvm,
    Root,
    Net,
    Kernel,
    Tools,
}

impl Cap {
    fn name(self) -> &'static str {
        match self {
            Cap::Kvm => "kvm",
            Cap::Root => "root",
            Cap::Net => "net",
            Cap::Kernel => "kernel",
            Cap::Tools => "tools",
        }
    }
}

/// Returns true when the capability is present. When it is absent: panics if `RVMM_REQUIRE` names it
/// (CI), otherwise prints "skipping: why" and returns false.
pub fn require(cap: Cap, present: bool, why: &str) -> bool {
    if present {
        return true;
    }
    let required = std::env::var("RVMM_REQUIRE").unwrap_or_default();
    if required
        .split(',')
        .any(|c| c.trim() == cap.name() || c.trim() == "all")
    {
        panic!("required capability `{}` is missing: {why}", cap.name());
    }
    eprintln!("skipping: {why}");
    false
}

pub fn have_kvm() -> bool {
    require(
        Cap::Kvm,
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok(),
        "/dev/kvm cannot be opened read-write",
    )
}

pub fn have_root() -> bool {
    require(
        Cap::Root,
        nix::unistd::geteuid().is_root(),
        "not running as root",
    )
}

/// True when every named program is on PATH.
pub fn have_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    require(
        Cap::Tools,
        missing.is_empty(),
        &format!(
            "missing tools: {} (run scripts/setup.sh)",
            missing.join(", ")
        ),
    )
}

pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// The rvmm binary built for this test run.
pub fn rvmm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rvmm"))
}

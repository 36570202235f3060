//! Real engines drive rvmm-oci, each from Debian's packages on private state: podman 4.3 inside
//! private mount and network namespaces, so its bridge, iptables rules and IPAM state go with the
//! test (tests/fixtures/podman-engine.sh has the checks), and containerd 1.6 through its runc v2
//! shim on its own socket, root and state (tests/fixtures/containerd-engine.sh), each in both
//! isolations: the same checks with every container a microVM. The VM runs share one snapshot
//! directory, so only the first of each machine kind (with and without a NIC) boots.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use common::{have_root, have_tools};

/// One engine at a time: each script checks that no rvmm-oci cgroup is left on the host.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs tests/fixtures/SCRIPT under `unshare UNSHARE...` with a private state directory,
/// rvmm-oci and `image`; the script prints "all checks passed" or "FAIL: ..." (shown).
fn engine_script(script: &str, unshare: &[&str], image: &Path, isolation: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    static SNAPSHOTS: OnceLock<tempfile::TempDir> = OnceLock::new();
    let snaps = SNAPSHOTS.get_or_init(|| tempfile::tempdir().unwrap());
    let state = tempfile::Builder::new()
        .prefix("rvmm-engine-")
        .tempdir()
        .unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(script);
    let o = Command::new("timeout")
        .args(["-s", "KILL", "900", "unshare"])
        .args(unshare)
        .args(["--propagation", "private", "bash"])
        .arg(path)
        .arg(state.path())
        .arg(env!("CARGO_BIN_EXE_rvmm-oci"))
        .arg(image)
        .arg(isolation)
        .env("RVMM_SNAPSHOTS", snaps.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    // The engine's mounts were in the script's mount namespace; its files are ours to remove.
    let _ = Command::new("rm").arg("-rf").arg(state.path()).status();
    assert!(
        o.status.success() && out.contains("all checks passed"),
        "{script}: {}\n{out}\n{err}",
        o.status
    );
}

fn podman_ready() -> bool {
    have_root() && have_tools(&["podman", "conmon", "unshare", "ip", "iptables"])
}

fn containerd_ready() -> bool {
    have_root() && have_tools(&["containerd", "ctr", "containerd-shim-runc-v2", "unshare"])
}

/// What a VM needs beyond the engine: /dev/kvm, the guest kernel and rvmm-init, tc.
fn vm_ready() -> bool {
    if !(common::have_kvm() && have_tools(&["tc"]) && common::guest::kernel().is_some()) {
        return false;
    }
    match rvmm::vm::guest_init_path() {
        Ok(_) => true,
        Err(e) => common::require(common::Cap::Kernel, false, &format!("{e:#}")),
    }
}

#[test]
fn podman_runs_containers_through_rvmm_oci() {
    if !podman_ready() {
        return;
    }
    let layout = common::images::test_images().join("busybox");
    engine_script("podman-engine.sh", &["-m", "-n"], &layout, "container");
}

#[test]
fn podman_runs_vms_through_rvmm_oci() {
    if !(podman_ready() && vm_ready()) {
        return;
    }
    let layout = common::images::test_images().join("busybox");
    engine_script("podman-engine.sh", &["-m", "-n"], &layout, "vm");
}

#[test]
fn containerd_runs_tasks_through_rvmm_oci() {
    if !containerd_ready() {
        return;
    }
    let archive = common::images::test_images().join("busybox.oci.tar");
    engine_script("containerd-engine.sh", &["-m"], &archive, "container");
}

#[test]
fn containerd_runs_vms_through_rvmm_oci() {
    if !(containerd_ready() && vm_ready()) {
        return;
    }
    let archive = common::images::test_images().join("busybox.oci.tar");
    engine_script("containerd-engine.sh", &["-m"], &archive, "vm");
}

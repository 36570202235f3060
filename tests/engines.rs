//! Real engines drive rvmm-oci, each from Debian's packages on private state: podman 4.3 inside
//! private mount and network namespaces, so its bridge, iptables rules and IPAM state go with the
//! test (tests/fixtures/podman-engine.sh has the checks), and containerd 1.6 through its runc v2
//! shim on its own socket, root and state (tests/fixtures/containerd-engine.sh).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use common::{have_root, have_tools};

/// One engine at a time: each script checks that no rvmm-oci cgroup is left on the host.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs tests/fixtures/SCRIPT under `unshare UNSHARE...` with a private state directory,
/// rvmm-oci and `image`; the script prints "all checks passed" or "FAIL: ..." (shown).
fn engine_script(script: &str, unshare: &[&str], image: &Path) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let state = tempfile::Builder::new()
        .prefix("rvmm-engine-")
        .tempdir()
        .unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(script);
    let o = Command::new("timeout")
        .args(["-s", "KILL", "300", "unshare"])
        .args(unshare)
        .args(["--propagation", "private", "bash"])
        .arg(path)
        .arg(state.path())
        .arg(env!("CARGO_BIN_EXE_rvmm-oci"))
        .arg(image)
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

#[test]
fn podman_runs_containers_through_rvmm_oci() {
    if !(have_root() && have_tools(&["podman", "conmon", "unshare", "ip", "iptables"])) {
        return;
    }
    let layout = common::images::test_images().join("busybox");
    engine_script("podman-engine.sh", &["-m", "-n"], &layout);
}

#[test]
fn containerd_runs_tasks_through_rvmm_oci() {
    if !(have_root() && have_tools(&["containerd", "ctr", "containerd-shim-runc-v2", "unshare"])) {
        return;
    }
    let archive = common::images::test_images().join("busybox.oci.tar");
    engine_script("containerd-engine.sh", &["-m"], &archive);
}

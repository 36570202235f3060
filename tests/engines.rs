//! Real engines drive rvmm-oci, each from Debian's packages on private state: podman 4.3 inside
//! private mount and network namespaces, so its bridge, iptables rules and IPAM state go with the
//! test (tests/fixtures/podman-engine.sh has the checks), and containerd 1.6 through its runc v2
//! shim on its own socket, root and state (tests/fixtures/containerd-engine.sh).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::sync::Mutex;

use common::{have_root, have_tools};

/// One engine at a time: each script checks that no rvmm-oci cgroup is left on the host.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn podman_runs_containers_through_rvmm_oci() {
    if !(have_root() && have_tools(&["podman", "conmon", "unshare", "ip", "iptables"])) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let layout = common::images::test_images().join("busybox");
    let state = tempfile::Builder::new()
        .prefix("rvmm-podman-")
        .tempdir()
        .unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/podman-engine.sh"
    );
    let o = Command::new("timeout")
        .args([
            "-s",
            "KILL",
            "300",
            "unshare",
            "-m",
            "-n",
            "--propagation",
            "private",
            "bash",
        ])
        .arg(script)
        .arg(state.path())
        .arg(env!("CARGO_BIN_EXE_rvmm-oci"))
        .arg(&layout)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && out.contains("all checks passed"),
        "podman-engine.sh: {}\n{out}\n{err}",
        o.status
    );
    // podman's overlay mounts were in the script's mount namespace; its files are ours to remove.
    let _ = Command::new("rm").arg("-rf").arg(state.path()).status();
}

#[test]
fn containerd_runs_tasks_through_rvmm_oci() {
    if !(have_root() && have_tools(&["containerd", "ctr", "containerd-shim-runc-v2", "unshare"])) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let archive = common::images::test_images().join("busybox.oci.tar");
    let state = tempfile::Builder::new()
        .prefix("rvmm-containerd-")
        .tempdir()
        .unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/containerd-engine.sh"
    );
    let o = Command::new("timeout")
        .args([
            "-s",
            "KILL",
            "300",
            "unshare",
            "-m",
            "--propagation",
            "private",
            "bash",
        ])
        .arg(script)
        .arg(state.path())
        .arg(env!("CARGO_BIN_EXE_rvmm-oci"))
        .arg(&archive)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && out.contains("all checks passed"),
        "containerd-engine.sh: {}\n{out}\n{err}",
        o.status
    );
    let _ = Command::new("rm").arg("-rf").arg(state.path()).status();
}

//! Real engines drive rvmm-oci: podman 4.3 (Debian's), on private storage and run directories,
//! inside private mount and network namespaces so its bridge, iptables rules and IPAM state go
//! with the test (tests/fixtures/podman-engine.sh has the checks).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{have_root, have_tools};

#[test]
fn podman_runs_containers_through_rvmm_oci() {
    if !(have_root() && have_tools(&["podman", "conmon", "unshare", "ip", "iptables"])) {
        return;
    }
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

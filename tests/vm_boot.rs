//! `rvmm vm` boots the real guest kernel on two vCPUs with an ext4 root on virtio-blk whose init (a
//! static C program, tests/fixtures/boot-init.c) prints a marker, writes to the disk, and reboots; the
//! VMM exits cleanly on the i8042 reset. The bytes written by the guest are checked on the host file.

mod common;

use std::process::Command;
use std::time::Duration;

use common::guest;

#[test]
fn rvmm_vm_boots_the_guest_kernel_to_user_space_and_exits_cleanly() {
    if !common::have_kvm() || !common::have_tools(&["mkfs.ext4", "debugfs", "gcc"]) {
        return;
    }
    let Some(kernel) = guest::kernel() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("root.ext4");
    guest::c_init_disk(dir.path(), &disk, "boot-init.c");
    let mut cmd = Command::new(common::rvmm_bin());
    cmd.arg("vm")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--disk")
        .arg(&disk)
        .args(["--memory", "128", "--cpus", "2"]);
    let boot = guest::boot(cmd, Duration::from_secs(400));
    let c = &boot.console;
    assert!(c.contains("Run /sbin/init as init process"), "{c}");
    // One virtio device on the command line, two vCPUs found through the MP table.
    assert!(
        c.contains("RVMM-BOOT-MARKER 1 2"),
        "no marker from user space:\n{c}"
    );
    let status = boot
        .status
        .unwrap_or_else(|| panic!("VM did not exit within {:?}:\n{c}", boot.elapsed));
    assert!(status.success(), "rvmm vm exited with {status}:\n{c}");
    // What the guest wrote through virtio-blk is in the host file.
    let out = Command::new("debugfs")
        .args(["-R", "cat /from-guest"])
        .arg(&disk)
        .output()
        .expect("debugfs runs");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "guest-wrote-this\n");
}

#[test]
fn bad_input_gives_one_line_and_nonzero_exit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let not_elf = dir.path().join("not-elf");
    std::fs::write(&not_elf, b"hello").expect("write");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--kernel".into(), "/nonexistent/vmlinux".into()],
            "cannot open kernel /nonexistent/vmlinux",
        ),
        (
            vec!["--kernel".into(), not_elf.display().to_string()],
            "is not an ELF vmlinux",
        ),
        (
            vec![
                "--kernel".into(),
                "/bin/busybox".into(),
                "--disk".into(),
                "/nonexistent.img".into(),
            ],
            "cannot open disk image /nonexistent.img",
        ),
        (
            vec![
                "--kernel".into(),
                not_elf.display().to_string(),
                "--memory".into(),
                "4".into(),
            ],
            "guest memory of 4 MiB is too small",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(common::rvmm_bin())
            .arg("vm")
            .args(&args)
            .output()
            .expect("rvmm runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: expected `{want}` in: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: not one line: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

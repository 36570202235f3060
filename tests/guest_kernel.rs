//! The guest kernel runs ordinary 64-bit user space: a torture run of busybox and a static probe, booted
//! under QEMU microvm (independently of our own VMM), asserted step by step on the serial console.

mod common;

use std::process::Command;
use std::time::Duration;

use common::guest;

const INIT: &str = r#"#!/bin/busybox sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs tmp /tmp
mount -t devtmpfs dev /dev
echo "T1 pipeline: $(echo c b a | tr ' ' '\n' | sort | tr '\n' ' ')"
echo "T2 proc: $(ls /proc | grep -c '^[0-9]') pids, $(grep -c ^processor /proc/cpuinfo) cpu, $(cat /sys/class/tty/ttyS0/type)"
i=0; while [ $i -lt 20 ]; do /bin/true; i=$((i+1)); done; echo "T3 fork+exec: $i"
echo "T4 $(/bin/probe threads)"
trap 'echo "T5 signal: USR1 handled"' USR1
kill -USR1 $$
sleep 0 && echo "T6 after signal"
echo tmpfs-data > /tmp/f && echo "T7 tmpfs: $(cat /tmp/f)"
echo ext4-data > /root/f && sync && echo "T8 ext4: $(cat /root/f)"
echo "T9 $(/bin/probe)"
echo "T-END"
reboot -f
"#;

#[test]
fn busybox_torture_under_qemu_microvm() {
    if !common::have_kvm() || !common::have_tools(&["qemu-system-x86_64", "mkfs.ext4", "gcc"]) {
        return;
    }
    let Some(kernel) = guest::kernel() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("root.ext4");
    guest::busybox_disk(dir.path(), &disk, INIT, true);
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw {}",
        rvmm::kernel::pvm_cmdline_additions()
    );
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        "128",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-device",
        "i8042",
        "-kernel",
    ])
    .arg(&kernel)
    .arg("-append")
    .arg(&cmdline)
    .arg("-drive")
    .arg(format!(
        "id=root,file={},format=raw,if=none",
        disk.display()
    ))
    .args(["-device", "virtio-blk-device,drive=root"]);
    let boot = guest::boot(cmd, Duration::from_secs(420));
    let c = &boot.console;
    for want in [
        "Run /sbin/init as init process",
        "T1 pipeline: a b c",
        "T3 fork+exec: 20",
        "T4 threads sum=20",
        "T5 signal: USR1 handled",
        "T6 after signal",
        "T7 tmpfs: tmpfs-data",
        "T8 ext4: ext4-data",
        "T9 getppid ns=",
        "T-END",
    ] {
        assert!(c.contains(want), "missing `{want}` in the console:\n{c}");
    }
    assert!(
        c.contains(" cpu, 4"),
        "T2 (/proc and /sys) went wrong:\n{c}"
    );
    assert!(
        boot.status.is_some(),
        "the guest did not end by itself (reboot -f through the i8042) within {:?}",
        boot.elapsed
    );
}

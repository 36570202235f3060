//! Fixtures for tests that boot the real guest kernel: a busybox-static ext4 root disk whose init runs a
//! script, and a runner that boots a VMM and collects its serial console with an honest deadline.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{require, Cap};

/// The cached guest kernel, or None (a skip; a failure when CI requires the kernel).
pub fn kernel() -> Option<PathBuf> {
    match rvmm::kernel::cached_vmlinux() {
        Ok(p) => Some(p),
        Err(e) => {
            require(Cap::Kernel, false, &e.to_string());
            None
        }
    }
}

/// Builds an ext4 disk image at `disk` holding busybox-static (all applets linked in /bin), the static
/// probe program at /bin/probe when `probe` is set, and `/sbin/init` = `init_script`.
pub fn busybox_disk(dir: &Path, disk: &Path, init_script: &str, probe: bool) {
    let root = dir.join("rootfs");
    for d in ["bin", "sbin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir rootfs");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy busybox");
    let out = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    if probe {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/guest-probe.c");
        let st = Command::new("gcc")
            .args(["-O2", "-static", "-pthread", "-o"])
            .arg(root.join("bin/probe"))
            .arg(src)
            .status()
            .expect("gcc runs");
        assert!(st.success(), "building the static probe failed");
    }
    let init = root.join("sbin/init");
    std::fs::write(&init, init_script).expect("write init");
    let st = Command::new("chmod")
        .arg("755")
        .arg(&init)
        .status()
        .expect("chmod");
    assert!(st.success());
    mkfs_ext4(&root, disk, "64M");
}

/// `mkfs.ext4 -d ROOT DISK SIZE`, asserting success.
pub fn mkfs_ext4(root: &Path, disk: &Path, size: &str) {
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(root)
        .arg(disk)
        .arg(size)
        .output()
        .expect("mkfs.ext4 runs");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a boot printed and how it ended.
pub struct Boot {
    pub console: String,
    /// None when the deadline killed it.
    pub status: Option<std::process::ExitStatus>,
    pub elapsed: Duration,
}

/// Runs `cmd` (a VMM with its serial console on stdout) until it exits or `deadline` passes, then kills it.
/// The console is echoed to our stderr as it arrives so a CI log shows how far a boot got.
pub fn boot(mut cmd: Command, deadline: Duration) -> Boot {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("VMM starts");
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            eprint!("{}", String::from_utf8_lossy(&buf[..n]));
            all.extend_from_slice(&buf[..n]);
        }
        all
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = start.elapsed();
    let mut console = String::from_utf8_lossy(&reader.join().unwrap_or_default()).into_owned();
    let stderr = err_reader.join().unwrap_or_default();
    if !stderr.is_empty() {
        console.push_str("\n--- stderr ---\n");
        console.push_str(&stderr);
    }
    Boot {
        console,
        status,
        elapsed,
    }
}

/// Builds an ext4 disk whose /sbin/init is the static C program `tests/fixtures/<source>`.
pub fn c_init_disk(dir: &Path, disk: &Path, source: &str) {
    let root = dir.join("rootfs");
    for d in ["sbin", "proc", "dev"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir rootfs");
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(source);
    let st = Command::new("gcc")
        .args(["-O2", "-static", "-o"])
        .arg(root.join("sbin/init"))
        .arg(src)
        .status()
        .expect("gcc runs");
    assert!(st.success(), "building {source} failed");
    mkfs_ext4(&root, disk, "16M");
}

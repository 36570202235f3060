//! VM isolation, for real: `rvmm run --isolation=vm` boots the guest kernel with rvmm-init and runs the
//! busybox test image. Boots are slow on kvm_pvm (tens of seconds): the tests share one snapshot
//! directory, so only the first run of each machine kind (with and without a network device), the
//! `--cold` parity run and the damaged-snapshot test boot; every other VM starts warm. Each test packs
//! many checks into its runs:
//!
//! 1. parity: one script (identity, cwd, env, hostname, a missing file, stdout and stderr, stdin,
//!    `exit 42`) under the same flags gives the same stdout, stderr and status in both isolations,
//!    warm and `--cold`;
//! 2. a command that does not exist: 127 and the same message in both isolations;
//! 3. `-t` and privileges: a terminal, the capability sets, no_new_privs, the seccomp filter;
//! 4. lifecycle: `rvmm ps` lists the VM, SIGTERM reaches the workload's trap and its status comes back;
//! 5. a workload ignoring SIGTERM: the second SIGTERM stops the VM, 137;
//! 6. a file that cannot be executed: 126 and the same message in both isolations;
//! 7. `kill -9` of rvmm with a tap attached: `rvmm gc` removes the tap, lease and run;
//! 8. network and a hostile workload: httpd in the VM answers on a `-p` port from the host while the
//!    workload floods its stdout and a TCP connection to the host; the VMM keeps serving, the run ends
//!    with the workload's status and leaves no tap, lease or run directory behind;
//! 9. two VMs restored at once from one snapshot differ in MAC, IP and random bytes, have the host's
//!    time, and another image runs from the same snapshot;
//! 10. a snapshot of another rvmm is refused with one line, the run boots, and saves a good one.
//! 11. the channel (a multiport virtio-console): 64 MiB through the workload's stdin and back out of
//!     its stdout arrive complete and in order (warm); stdout and stderr written alternately stay
//!     apart, /dev/stdout and /dev/stderr can be opened again (`--cold`); a workload that never
//!     reads a large stdin does not block rvmm.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::run::{rvmm, Out, RunEnv, INIT_SCRIPT, INIT_WANT};

/// The runs compare host-wide state before and after, and boots are CPU-bound: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const BB: &str = "localhost/busybox";

fn setup() -> Option<RunEnv> {
    if !common::have_kvm()
        || !common::have_root()
        || !common::have_tools(&["umoci", "skopeo", "ip", "iptables", "mkfs.erofs", "unshare"])
    {
        return None;
    }
    common::guest::kernel()?;
    // Found the way rvmm finds it (RVMM_GUEST_INIT, or the workspace's static build).
    if let Err(e) = rvmm::vm::guest_init_path() {
        common::require(common::Cap::Kernel, false, &format!("{e:#}"));
        return None;
    }
    // One snapshot directory for every store of this test binary: the first boot of each machine
    // kind saves a snapshot, and the other runs start warm from it.
    static SNAPSHOTS: OnceLock<tempfile::TempDir> = OnceLock::new();
    let snaps = SNAPSHOTS.get_or_init(|| tempfile::tempdir().expect("tempdir"));
    std::env::set_var("RVMM_SNAPSHOTS", snaps.path());
    Some(RunEnv::new(&SERIAL, &["busybox", "multi", "links"]))
}

fn run(env: &RunEnv, isolation: &str, flags: &[&str], args: &[&str], stdin: Option<&str>) -> Out {
    let iso = format!("--isolation={isolation}");
    let mut a = vec!["run", "--rm", iso.as_str()];
    a.extend_from_slice(flags);
    a.push(BB);
    a.extend_from_slice(args);
    let t = Instant::now();
    let o = rvmm(env.store.path(), &a, stdin);
    eprintln!("{isolation} run took {:?}", t.elapsed());
    o
}

/// Identity, environment, output streams, stdin and the exit status, in one script.
const PARITY: &str = r#"id; pwd; env > /tmp/env; sort /tmp/env; hostname; cat /etc/os-release; echo out; echo err >&2; read line; echo "stdin: $line"; exit 42"#;

#[test]
fn parity_with_container_isolation() {
    let Some(env) = setup() else { return };
    let flags = [
        "-i",
        "--network=none",
        "-e",
        "GREETING=hello world",
        "-w",
        "/tmp",
        "-u",
        "app",
        "--hostname",
        "parity",
    ];
    let args = ["sh", "-c", PARITY];
    let c = run(&env, "container", &flags, &args, Some("from the host\n"));
    assert_eq!(c.code, 42, "container: {}", c.stderr);
    assert!(c.stdout.contains("uid=1000(app)"), "{}", c.stdout);
    assert!(c.stdout.contains("GREETING=hello world"), "{}", c.stdout);
    assert!(c.stdout.contains("stdin: from the host"), "{}", c.stdout);
    // Warm (restored from the snapshot; the first VM run of the binary saves it) and cold.
    let v = run(&env, "vm", &flags, &args, Some("from the host\n"));
    assert_eq!(
        (v.code, v.stdout.as_str(), v.stderr.as_str()),
        (c.code, c.stdout.as_str(), c.stderr.as_str()),
        "vm (left) and container (right) differ"
    );
    let mut cold = flags.to_vec();
    cold.push("--cold");
    let v = run(&env, "vm", &cold, &args, Some("from the host\n"));
    assert_eq!(
        (v.code, v.stdout.as_str(), v.stderr.as_str()),
        (c.code, c.stdout.as_str(), c.stderr.as_str()),
        "vm --cold (left) and container (right) differ"
    );
}

/// What the workload sees, section by section: identity, cwd, environment, privileges, /dev,
/// the masked paths, its mount points, /etc files and resource limits. Written for any POSIX sh
/// (busybox, dash), with few processes: a fork and exec is slow in a guest on kvm_pvm.
const PROBE: &str = r###"
sec() { echo "## $1"; }
sec id; id
sec pwd; pwd
sec env; env | sort
sec status; grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp|SigBlk|SigIgn):' /proc/self/status
sec dev; stat -c '%A %U %G %t:%T %N' /dev/* /dev/pts /dev/shm /dev/mqueue
sec masked
files=
for p in /proc/asound /proc/acpi /proc/interrupts /proc/kcore /proc/keys /proc/latency_stats \
         /proc/timer_list /proc/timer_stats /proc/sched_debug /proc/scsi /sys/firmware \
         /sys/devices/virtual/powercap; do
  if [ ! -e "$p" ]; then echo "$p absent"
  elif [ -d "$p" ]; then set -- "$p"/*; if [ "$1" = "$p/*" ]; then echo "$p masked"; else echo "$p visible"; fi
  else files="$files $p"; fi
done
[ -z "$files" ] || stat -c '%n %t:%T' $files | awk '{ print $1, ($2 == "1:3" ? "masked" : "visible") }'
sec mounts; awk '{ i = 7; while ($i != "-") i++; print $5, $6, $(i+1) }' /proc/self/mountinfo | sort
sec hosts; cat /etc/hosts
sec resolv; cat /etc/resolv.conf
sec hostname; cat /etc/hostname; hostname
sec ulimit; ulimit -a
"###;

/// The probe's output as (section, lines), with what legitimately differs between the two
/// isolations taken out: the host's cgroup filesystems, which only a container mounts under
/// /sys/fs/cgroup, the filesystem type under the /etc files (a host file in a container, the
/// guest's tmpfs in a VM), and masked paths that the other kernel does not have at all (the guest
/// kernel has no ACPI or keyrings, for one).
fn probe_sections(out: &str) -> Vec<(String, Vec<String>)> {
    let mut v: Vec<(String, Vec<String>)> = Vec::new();
    for l in out.lines() {
        if let Some(name) = l.strip_prefix("## ") {
            v.push((name.to_string(), Vec::new()));
        } else if let Some((name, lines)) = v.last_mut() {
            let l = match name.as_str() {
                "mounts" if l.starts_with("/sys/fs/cgroup") => continue,
                // Compared in their own section, where a path one kernel lacks is allowed.
                "mounts"
                    if rvmm_proto::rootfs::MASKED.contains(&l.split(' ').next().unwrap_or("")) =>
                {
                    continue
                }
                "mounts" if l.starts_with("/etc/") => {
                    let mut f = l.split(' ');
                    let (m, o) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
                    let rw = o.split(',').next().unwrap_or("");
                    format!("{m} {rw}")
                }
                _ => l.to_string(),
            };
            lines.push(l);
        }
    }
    v
}

/// Compares the probe in both isolations for one image and user.
fn assert_probe_parity(env: &RunEnv, image: &str, user: &str) {
    let flags = ["--rm", "--network=none", "--hostname", "probe", "-u", user];
    let mut args = vec!["run", "--isolation=container"];
    args.extend_from_slice(&flags);
    args.extend_from_slice(&[image, "sh", "-c", PROBE]);
    let c = rvmm(env.store.path(), &args, None);
    assert_eq!(
        c.code, 0,
        "container probe of {image} as {user}: {}",
        c.stderr
    );
    args[1] = "--isolation=vm";
    let v = rvmm(env.store.path(), &args, None);
    assert_eq!(v.code, 0, "vm probe of {image} as {user}: {}", v.stderr);
    assert_eq!(v.stderr, c.stderr, "{image} as {user}: stderr");
    let (cs, vs) = (probe_sections(&c.stdout), probe_sections(&v.stdout));
    assert_eq!(
        cs.iter().map(|s| &s.0).collect::<Vec<_>>(),
        vs.iter().map(|s| &s.0).collect::<Vec<_>>(),
        "{image} as {user}: sections\n{}\n{}",
        c.stdout,
        v.stdout
    );
    for ((name, cl), (_, vl)) in cs.iter().zip(&vs) {
        if name == "masked" {
            let state = |l: &[String]| -> std::collections::BTreeMap<String, String> {
                l.iter()
                    .filter_map(|x| x.split_once(' '))
                    .map(|(p, st)| (p.to_string(), st.to_string()))
                    .collect()
            };
            let (cm, vm) = (state(cl), state(vl));
            assert_eq!(cm.len(), 12, "{image} as {user}: {cl:?}");
            assert_eq!(vm.len(), 12, "{image} as {user}: {vl:?}");
            for (p, a) in &cm {
                let b = &vm[p];
                assert!(
                    a != "visible" && b != "visible",
                    "{image} as {user}: {p} is visible: container {a}, vm {b}"
                );
                if a != "absent" && b != "absent" {
                    assert_eq!(a, b, "{image} as {user}: {p}");
                }
            }
            continue;
        }
        assert_eq!(
            vl, cl,
            "{image} as {user}: section {name} differs: vm (left), container (right)"
        );
    }
    // The probe saw what it should, not just the same thing twice.
    let c = &c.stdout;
    assert!(c.contains("/proc/interrupts masked"), "{c}");
    assert!(c.contains("/proc/sys ro,"), "{c}");
    assert!(c.contains("'/dev/core' -> '/proc/kcore'"), "{c}");
    assert!(c.contains("\tprobe\n"), "{c}");
    assert!(c.contains("NoNewPrivs:\t0"), "{c}");
}

/// The parity probe: the busybox image and a Debian userland, as root and as a non-root user.
#[test]
fn the_workload_sees_the_same_in_both_isolations() {
    let Some(env) = setup() else { return };
    if !common::have_tools(&["debootstrap"]) {
        return;
    }
    let debian = common::images::debian_image();
    let o = rvmm(
        env.store.path(),
        &["pull", "-q", &format!("oci:{}", debian.display())],
        None,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    for (image, user) in [
        (BB, "app"),
        (BB, "root"),
        ("localhost/debian", "app"),
        ("localhost/debian", "0"),
    ] {
        assert_probe_parity(&env, image, user);
    }
}

/// A terminal and the privileges: the workload sees a tty on stdout, the same capability sets,
/// no_new_privs and seccomp filter, and a syscall outside Docker's profile fails with EPERM.
#[test]
fn tty_and_privileges_match_container_isolation() {
    let Some(env) = setup() else { return };
    let script = "test -t 1 && echo tty; grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status; \
                  unshare -m true 2>/dev/null && echo unshare-allowed || echo unshare-denied; \
                  su app -c 'grep -E \"^(CapEff|CapBnd):\" /proc/self/status'";
    let args = ["sh", "-c", script];
    let flags = ["-t", "--network=none"];
    let c = run(&env, "container", &flags, &args, None);
    assert_eq!(c.code, 0, "container: {} {}", c.stdout, c.stderr);
    assert!(c.stdout.starts_with("tty\r\n"), "{:?}", c.stdout);
    assert!(
        c.stdout.contains("CapEff:\t00000000a80425fb"),
        "{:?}",
        c.stdout
    );
    assert!(c.stdout.contains("unshare-denied"), "{:?}", c.stdout);
    let v = run(&env, "vm", &flags, &args, None);
    assert_eq!(
        (v.code, v.stdout.as_str(), v.stderr.as_str()),
        (c.code, c.stdout.as_str(), c.stderr.as_str()),
        "vm (left) and container (right) differ"
    );
}

/// Docker's privilege defaults in the guest: a setuid-root program raises a non-root user's
/// effective uid (no no_new_privs; the zygote's filter went in without it), and does not with
/// `--security-opt no-new-privileges` (a run with its own privileges: no zygote). The same
/// output as in a container.
#[test]
fn setuid_and_no_new_privileges_match_container_isolation() {
    let Some(env) = setup() else { return };
    let script = "showeuid; grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status";
    let args = ["sh", "-c", script];
    for (flags, euid, nnp) in [
        (&["-u", "app", "--network=none"][..], 0, 0),
        (
            &[
                "-u",
                "app",
                "--network=none",
                "--security-opt",
                "no-new-privileges",
            ][..],
            1000,
            1,
        ),
    ] {
        let c = run(&env, "container", flags, &args, None);
        assert_eq!(c.code, 0, "container: {}", c.stderr);
        assert!(
            c.stdout.starts_with(&format!("uid=1000 euid={euid}\n")),
            "{}",
            c.stdout
        );
        assert!(
            c.stdout.contains(&format!("NoNewPrivs:\t{nnp}\n")),
            "{}",
            c.stdout
        );
        let v = run(&env, "vm", flags, &args, None);
        assert_eq!(
            (v.code, v.stdout.as_str(), v.stderr.as_str()),
            (c.code, c.stdout.as_str(), c.stderr.as_str()),
            "{flags:?}: vm (left) and container (right) differ"
        );
    }
}

/// `--cap-add`/`--cap-drop`, a seccomp profile in Docker's format and `--privileged` in the guest:
/// each run has its own privileges (no zygote), with the same capability and seccomp lines and
/// effects as in a container. `--privileged` gets every capability of the guest kernel (Docker's
/// 000001ffffffffff), a writable /sys, no masks and the guest's devices (/dev/vda: the image disk).
#[test]
fn privilege_flags_match_container_isolation() {
    let Some(env) = setup() else { return };
    let status = "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status";
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("profile.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":13}]}"#,
    )
    .unwrap();
    let seccomp = format!("seccomp={}", profile.display());
    let mount = "mkdir -p /tmp/m && mount -t tmpfs x /tmp/m && echo mounted";
    let caps_script = format!("{status}; {mount}");
    let profile_script = format!("{status}; mkdir /tmp/d");
    for (flags, script) in [
        (
            &["--cap-add", "SYS_ADMIN", "--cap-drop", "net_raw"][..],
            caps_script.as_str(),
        ),
        (
            &["--security-opt", seccomp.as_str()][..],
            profile_script.as_str(),
        ),
    ] {
        let mut f = vec!["--network=none"];
        f.extend_from_slice(flags);
        let args = ["sh", "-c", script];
        let c = run(&env, "container", &f, &args, None);
        assert!(c.stdout.starts_with("CapEff:"), "{}", c.stderr);
        let v = run(&env, "vm", &f, &args, None);
        assert_eq!(
            (v.code, v.stdout.as_str(), v.stderr.as_str()),
            (c.code, c.stdout.as_str(), c.stderr.as_str()),
            "{flags:?}: vm (left) and container (right) differ"
        );
    }
    let script = format!(
        "{status}; grep -q '^sysfs /sys sysfs rw,' /proc/mounts && echo sys-rw; \
         grep -q ' /proc/keys ' /proc/mounts || echo unmasked; test -b /dev/vda && echo vda; {mount}"
    );
    let v = run(
        &env,
        "vm",
        &["--network=none", "--privileged"],
        &["sh", "-c", &script],
        None,
    );
    assert_eq!(
        v.stdout,
        "CapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\nNoNewPrivs:\t0\nSeccomp:\t0\n\
         sys-rw\nunmasked\nvda\nmounted\n",
        "{}",
        v.stderr
    );
}

/// `--ulimit`, `--shm-size`, `--group-add`, `--add-host`, `--dns`, `--dns-search` and `--sysctl`
/// (applied in the guest, where a key that is not namespaced is the guest's own) give the same
/// output in a VM as in a container.
#[test]
fn resource_and_name_flags_match_container_isolation() {
    let Some(env) = setup() else { return };
    let mut f = vec!["--network=none"];
    f.extend_from_slice(RESOURCE_FLAGS);
    let c = run(&env, "container", &f, &["sh", "-c", RESOURCE_SCRIPT], None);
    assert_eq!(
        (c.code, c.stdout.as_str()),
        (0, RESOURCE_WANT),
        "{}",
        c.stderr
    );
    f.extend_from_slice(&["--sysctl", "kernel.pid_max=4321"]);
    let script = format!("{RESOURCE_SCRIPT}; cat /proc/sys/kernel/pid_max");
    let v = run(&env, "vm", &f, &["sh", "-c", &script], None);
    assert_eq!(
        (v.code, v.stdout.as_str(), v.stderr.as_str()),
        (
            0,
            format!("{RESOURCE_WANT}4321\n").as_str(),
            c.stderr.as_str()
        ),
        "vm (left) and container (right) differ"
    );
}

/// `--tmpfs` and `--mount type=tmpfs` (size limit, mode, Docker's default flags) under
/// `--read-only`: the same in a VM (rvmm-init mounts them in the guest) as in a container.
#[test]
fn tmpfs_mounts_match_container_isolation() {
    let Some(env) = setup() else { return };
    let flags = [
        "--network=none",
        "--read-only",
        "--tmpfs",
        "/t:size=1m,mode=1770",
        "--mount",
        "type=tmpfs,target=/data/t2,tmpfs-size=512k",
    ];
    let script = "grep -E ' /(t|data/t2) ' /proc/mounts | cut -d' ' -f2,4; stat -c %a /t; \
                  echo x > /t/f && cat /t/f; \
                  dd if=/dev/zero of=/t/big bs=1k count=2048 2>/dev/null || echo full; \
                  touch /not-here 2>/dev/null || echo read-only-root";
    let want = "/t rw,nosuid,nodev,noexec,relatime,size=1024k,mode=1770\n\
                /data/t2 rw,nosuid,nodev,noexec,relatime,size=512k\n\
                1770\nx\nfull\nread-only-root\n";
    for iso in ["container", "vm"] {
        let o = run(&env, iso, &flags, &["sh", "-c", script], None);
        assert_eq!(
            (o.code, o.stdout.as_str()),
            (0, want),
            "{iso}: {}",
            o.stderr
        );
    }
}

/// The image's `VOLUME /var/lib/seeded` is an anonymous volume filled from the image in a VM as
/// in a container (gone with `--rm`), and a volume mounted on a dangling symlink lands on its
/// target, made inside the root.
#[test]
fn image_volumes_and_dangling_symlinks_match_container_isolation() {
    let Some(env) = setup() else { return };
    let root = env.store.path();
    let script = "cat /var/lib/seeded/seed; grep -c ' /var/lib/seeded ' /proc/mounts; \
                  echo hi > /srv/dangling/f-$0 && cat /srv/real/data/f-$0";
    for iso in ["container", "vm"] {
        let a = [
            "run",
            "--rm",
            "--network=none",
            &format!("--isolation={iso}"),
            "-v",
            "dv:/srv/dangling",
            "localhost/links",
            "sh",
            "-c",
            script,
            iso,
        ];
        let o = rvmm(root, &a, None);
        assert_eq!(
            (o.code, o.stdout.as_str()),
            (0, "seeded\n1\nhi\n"),
            "{iso}: {}",
            o.stderr
        );
        let f = root.join(format!("volumes/dv/_data/f-{iso}"));
        assert_eq!(
            std::fs::read_to_string(&f).expect("written"),
            "hi\n",
            "{iso}"
        );
    }
    let o = rvmm(root, &["volume", "ls", "-q"], None);
    assert_eq!(
        o.stdout, "dv\n",
        "the image's anonymous volumes outlived --rm"
    );
    assert_eq!(rvmm(root, &["volume", "rm", "dv"], None).code, 0);
}

/// Shared directories in a VM (virtio-fs): a host directory read and written as uid 1000 (owner,
/// mode and mtime as the guest set them, seen on the host), 10,000 files listed (a glob: names
/// only; `ls`, which stats each, takes ~1 minute of emulated guest kernel on kvm_pvm), a symlink
/// in the share resolved in the guest's view only; `:ro` refused with EROFS even after the guest
/// remounted it writable; a named volume filled from the image, then shared with a container
/// run and back; an anonymous volume gone with `--rm`.
#[test]
fn shared_directories_and_volumes_in_a_vm() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Some(env) = setup() else { return };
    let root = env.store.path();
    let host = tempfile::tempdir().expect("tmp");
    let h = host.path();
    std::fs::set_permissions(h, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    std::fs::write(h.join("in"), "from host\n").expect("write");
    let secret = tempfile::tempdir().expect("tmp");
    std::fs::write(secret.path().join("secret"), "HOST ONLY\n").expect("write");
    std::os::unix::fs::symlink(secret.path().join("secret"), h.join("link")).expect("symlink");
    std::fs::create_dir(h.join("many")).expect("mkdir");
    for i in 0..10_000 {
        std::fs::write(h.join("many").join(format!("f{i:05}")), "").expect("write");
    }
    let rw = format!("{}:/h", h.display());
    let o = run(
        &env,
        "vm",
        &["--network=none", "-u", "1000", "-v", &rw],
        &[
            "sh",
            "-c",
            "cat /h/in; cat /h/link 2>/dev/null || echo link-does-not-resolve; \
             echo written > /h/new; chmod 640 /h/new; touch -d '2020-01-02 03:04:05' /h/new; \
             set -- /h/many/*; echo $#",
        ],
        None,
    );
    assert_eq!(
        (o.code, o.stdout.split_whitespace().collect::<Vec<_>>()),
        (0, vec!["from", "host", "link-does-not-resolve", "10000"]),
        "{}",
        o.stderr
    );
    let m = std::fs::metadata(h.join("new")).expect("written by the guest");
    assert_eq!(
        std::fs::read_to_string(h.join("new")).expect("new"),
        "written\n"
    );
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1000, 1000, 0o640));
    assert_eq!(m.mtime(), 1_577_934_245);

    // Read-only: the guest's root remounts it writable (it may, --privileged), the host still
    // refuses the write.
    let ro = format!("{}:/r:ro", h.display());
    let o = run(
        &env,
        "vm",
        &["--network=none", "--privileged", "-v", &ro],
        &[
            "sh",
            "-c",
            "mount -o remount,rw /r; echo x > /r/ro-write; cat /r/in",
        ],
        None,
    );
    assert!(o.stderr.contains("Read-only file system"), "{}", o.stderr);
    assert_eq!(o.stdout, "from host\n", "{}", o.stderr);
    assert!(!h.join("ro-write").exists(), "written through :ro");

    // A named volume, filled from the image, then used by a container and by the VM again.
    let multi = |iso: &str, script: &str| {
        rvmm(
            root,
            &[
                "run",
                "--rm",
                &format!("--isolation={iso}"),
                "--network=none",
                "-u",
                "0",
                "-v",
                "shared-data:/data",
                "localhost/multi",
                "sh",
                "-c",
                script,
            ],
            None,
        )
    };
    let o = multi(
        "vm",
        "stat -c '%U %a' /data/owned; cat /data/dir/z; echo from-vm > /data/vm",
    );
    assert_eq!(
        (o.code, o.stdout.as_str()),
        (0, "app 600\nz\n"),
        "{}",
        o.stderr
    );
    let o = multi("container", "cat /data/vm; echo from-container > /data/c");
    assert_eq!(
        (o.code, o.stdout.as_str()),
        (0, "from-vm\n"),
        "{}",
        o.stderr
    );
    let o = multi("vm", "cat /data/c");
    assert_eq!(
        (o.code, o.stdout.as_str()),
        (0, "from-container\n"),
        "{}",
        o.stderr
    );
    let data = root.join("volumes/shared-data/_data");
    assert_eq!(
        std::fs::metadata(data.join("owned")).expect("owned").uid(),
        1000
    );

    // An anonymous volume goes with its --rm run.
    let before = rvmm(root, &["volume", "ls", "-q"], None).stdout;
    let o = run(
        &env,
        "vm",
        &["--network=none", "-v", "/scratch"],
        &["sh", "-c", "echo x > /scratch/x"],
        None,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(rvmm(root, &["volume", "ls", "-q"], None).stdout, before);
    assert_eq!(rvmm(root, &["volume", "rm", "shared-data"], None).code, 0);
}

/// The Debian userland with a volume and a bind (`--mount`) in both isolations: the same
/// output, a file of the image's user `nobody` seeded into the volume, coreutils' `stat` of what
/// each wrote, seen from the other.
#[test]
fn debian_volumes_match_container_isolation() {
    let Some(env) = setup() else { return };
    if !common::have_tools(&["debootstrap"]) {
        return;
    }
    let root = env.store.path();
    let debian = common::images::debian_image();
    let o = rvmm(
        root,
        &["pull", "-q", &format!("oci:{}", debian.display())],
        None,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let host = tempfile::tempdir().expect("tmp");
    let bind = format!(
        "type=bind,source={},target=/srv/host",
        host.path().display()
    );
    let script = "stat -c '%U %G %a' /var/mail; touch /srv/host/from-$ISO; \
                  ls /srv/host | sort | tr '\\n' ' '; echo; \
                  echo \"$ISO\" >> /var/mail/log; cat /var/mail/log | sort | tr '\\n' ' '";
    let mut outs = Vec::new();
    for iso in ["container", "vm"] {
        let o = rvmm(
            root,
            &[
                "run",
                "--rm",
                &format!("--isolation={iso}"),
                "--network=none",
                "-e",
                &format!("ISO={iso}"),
                "-v",
                "deb-mail:/var/mail",
                "--mount",
                &bind,
                common::lifecycle::DEBIAN,
                "bash",
                "-c",
                script,
            ],
            None,
        );
        assert_eq!(o.code, 0, "{iso}: {}", o.stderr);
        outs.push(o.stdout);
    }
    assert_eq!(
        outs,
        [
            "root mail 2775\nfrom-container \ncontainer ",
            "root mail 2775\nfrom-container from-vm \ncontainer vm "
        ]
    );
    assert_eq!(rvmm(root, &["volume", "rm", "deb-mail"], None).code, 0);
}

/// Two VMs sharing one volume see each other's writes while both run. Every file appears by
/// rename, whole: a file the other side polls for must never be seen created but not yet written.
#[test]
fn two_vms_share_one_volume() {
    let Some(env) = setup() else { return };
    let root = env.store.path();
    let wait_for = |f: &str| {
        format!("i=0; while [ ! -f /v/{f} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done")
    };
    let a = start_ready(
        &env,
        &["--network=none", "-v", "pair:/v"],
        &format!(
            "echo from-a > /v/.a; mv /v/.a /v/a; echo ready; {}; cat /v/b > /v/.s; mv /v/.s /v/a-saw; sleep 100",
            wait_for("b")
        ),
    );
    let o = run(
        &env,
        "vm",
        &["--network=none", "-v", "pair:/v"],
        &[
            "sh",
            "-c",
            &format!(
                "cat /v/a; echo from-b > /v/.b; mv /v/.b /v/b; {}; cat /v/a-saw",
                wait_for("a-saw")
            ),
        ],
        None,
    );
    // SIGTERM ends A's workload; its run ends clean (--rm).
    let mut a = a;
    // SAFETY: kill(2) on a child of ours.
    unsafe { libc::kill(a.0.id() as i32, libc::SIGTERM) };
    let _ = a.0.wait();
    assert_eq!(
        (o.code, o.stdout.as_str()),
        (0, "from-a\nfrom-b\n"),
        "{}",
        o.stderr
    );
    let o = rvmm(root, &["volume", "rm", "pair"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
}

/// What RESOURCE_SCRIPT prints under RESOURCE_FLAGS: the limits, /dev/shm's size, root's groups
/// with staff (50) and the numbers, the extra hosts line, the resolv.conf made of the flags (the
/// host's options line aside), the two sysctls.
const RESOURCE_WANT: &str = "1024\n2048\n0\nsize=32768k\n0 10 50 4242\n10.1.2.3\tdb.test\n\
     search a.test b.test\nnameserver 10.9.9.9\n12345\n1\n";

/// Flags and a script; the same as tests/container.rs's.
const RESOURCE_FLAGS: &[&str] = &[
    "--ulimit",
    "nofile=1024:2048",
    "--ulimit",
    "core=0",
    "--shm-size",
    "32m",
    "--group-add",
    "staff",
    "--group-add",
    "4242",
    "--group-add",
    "10",
    "--add-host",
    "db.test:10.1.2.3",
    "--dns",
    "10.9.9.9",
    "--dns-search",
    "a.test",
    "--dns-search",
    "b.test",
    "--sysctl",
    "kernel.shmmax=12345",
    "--sysctl",
    "net.ipv4.ip_forward=1",
];
const RESOURCE_SCRIPT: &str = "ulimit -n; ulimit -Hn; ulimit -c; \
     grep ' /dev/shm ' /proc/mounts | grep -o 'size=[0-9]*k'; \
     id -G; grep db.test /etc/hosts; grep -v '^options' /etc/resolv.conf; \
     cat /proc/sys/kernel/shmmax /proc/sys/net/ipv4/ip_forward";

/// `--label`, `--stop-signal`, `--stop-timeout`, `--cidfile`, `--platform` and `--pull never` on
/// a VM run: the run core records them as for a container (`ps --filter`, `inspect`).
#[test]
fn run_metadata_flags_on_a_vm() {
    let Some(env) = setup() else { return };
    let root = env.store.path();
    let dir = tempfile::tempdir().unwrap();
    let cid = dir.path().join("cid");
    let cid_s = cid.display().to_string();
    let o = rvmm(
        root,
        &[
            "run",
            "--isolation=vm",
            "--network=none",
            "--name",
            "vmeta",
            "--label",
            "k=v",
            "--stop-signal",
            "HUP",
            "--stop-timeout",
            "3",
            "--cidfile",
            &cid_s,
            "--platform",
            "linux/amd64",
            "--pull",
            "never",
            BB,
            "true",
        ],
        None,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let id = std::fs::read_to_string(&cid).unwrap();
    let ps = rvmm(root, &["ps", "-a", "-q", "--filter", "label=k=v"], None);
    assert_eq!(ps.stdout, format!("{}\n", &id[..12]));
    let v: serde_json::Value =
        serde_json::from_str(&rvmm(root, &["inspect", "vmeta"], None).stdout).unwrap();
    assert_eq!(v[0]["Isolation"], "vm");
    assert_eq!(v[0]["Config"]["Labels"]["k"], "v");
    assert_eq!(v[0]["Config"]["StopSignal"], "SIGHUP");
    assert_eq!(v[0]["Config"]["StopTimeout"], 3);
    assert_eq!(rvmm(root, &["rm", "vmeta"], None).code, 0);
    let o = run(&env, "vm", &["--platform", "linux/arm64"], &["true"], None);
    assert_eq!(o.code, 125, "{}", o.stderr);
}

/// `--init` (rvmm-init plays the init: the program is not PID 1 and orphans are reaped) and
/// `--cpuset-cpus` (vCPU numbers, as affinity) give what a container shows; `--device`,
/// `--cpu-shares` and `--memory-swap` are refused with one line in a VM.
#[test]
fn init_and_cpu_flags_on_a_vm() {
    let Some(env) = setup() else { return };
    let f = ["--network=none", "--init", "--cpuset-cpus", "0"];
    let v = run(&env, "vm", &f, &["sh", "-c", INIT_SCRIPT], None);
    assert_eq!((v.code, v.stdout.as_str()), (0, INIT_WANT), "{}", v.stderr);
    for bad in [
        &["--device", "/dev/zero"][..],
        &["--cpu-shares", "512"],
        &["--memory", "64m", "--memory-swap", "128m"],
        &["--cpuset-cpus", "1"],
    ] {
        let o = run(&env, "vm", bad, &["true"], None);
        assert_eq!(o.code, 125, "{bad:?}: {}", o.stderr);
        assert_eq!(o.stderr.lines().count(), 1, "{bad:?}: {}", o.stderr);
    }
}

/// Every flag of issue 24 with a bad value is refused on a VM run as on a container: one line,
/// 125, before anything is created (no guest starts; RunEnv checks nothing is left).
#[test]
fn bad_flag_values_are_refused_before_a_vm_starts() {
    let Some(env) = setup() else { return };
    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("cid");
    std::fs::write(&existing, "x").unwrap();
    let cid = existing.display().to_string();
    for bad in [
        &["--cap-add", "NOT_A_CAP"][..],
        &["--cap-drop", "CAP_"],
        &["--security-opt", "bogus"],
        &["--security-opt", "seccomp=/nonexistent.json"],
        &["--ulimit", "nofile=10:5"],
        &["--shm-size", "lots"],
        &["--group-add", "nosuchgroup"],
        &["--add-host", "db.test:300.1.1.1"],
        &["--dns", "resolver"],
        &["--dns-search", "bad domain"],
        &["--sysctl", "noequals"],
        &["--sysctl", "kernel.hostname=x"],
        &["--label", "=x"],
        &["--stop-signal", "SIGNOPE"],
        &["--stop-timeout", "-5"],
        &["--cidfile", &cid],
        &["--pull", "sometimes"],
        &["--cpuset-cpus", "a-b"],
    ] {
        let mut f = vec!["--network=none"];
        f.extend_from_slice(bad);
        let o = run(&env, "vm", &f, &["true"], None);
        assert_eq!(o.code, 125, "{bad:?}: {}", o.stderr);
        assert_eq!(o.stderr.lines().count(), 1, "{bad:?}: {}", o.stderr);
    }
}

#[test]
fn missing_command_is_127_in_both() {
    let Some(env) = setup() else { return };
    let args = ["no-such-command", "arg"];
    let c = run(&env, "container", &["--network=none"], &args, None);
    assert_eq!(c.code, 127, "{}", c.stderr);
    let v = run(&env, "vm", &["--network=none"], &args, None);
    assert_eq!(
        (v.code, v.stdout.as_str(), v.stderr.as_str()),
        (c.code, c.stdout.as_str(), c.stderr.as_str()),
        "vm (left) and container (right) differ"
    );
}

/// Starts `rvmm run --isolation=vm` in the background and waits for `ready` on its stdout.
fn start_ready(env: &RunEnv, flags: &[&str], script: &str) -> Reaped {
    let mut child = Reaped(
        Command::new(common::rvmm_bin())
            .arg("--root")
            .arg(env.store.path())
            .args(["run", "--rm", "--isolation=vm"])
            .args(flags)
            .args([BB, "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("rvmm"),
    );
    let mut out = child.0.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("ready") {
        match out.read(&mut buf) {
            Ok(0) | Err(_) => {
                let mut err = String::new();
                let _ = child
                    .0
                    .stderr
                    .take()
                    .map(|mut e| e.read_to_string(&mut err));
                panic!("the VM ended before it was ready: {err}");
            }
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    child.0.stdout = Some(out);
    child
}

/// A warm run is handed over from rvmm to the small rvmm-vmm binary (the same process, which no
/// longer maps rvmm): `ps` still lists it, a signal still reaches the workload, and its status
/// and `--rm` still end the run.
#[test]
fn ps_and_sigterm_reach_the_vm() {
    let Some(env) = setup() else { return };
    prewarm(&env, &["--network=none"]);
    let mut child = start_ready(
        &env,
        &["--network=none", "--name", "vm-life"],
        "trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 1; done",
    );
    let pid = child.0.id();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    assert!(
        exe.to_string_lossy().ends_with("/rvmm-vmm") && !maps.lines().any(|l| l.ends_with("/rvmm")),
        "the warm run is still kept by {}",
        exe.display()
    );
    let ps = rvmm(env.store.path(), &["ps"], None);
    let line = ps
        .stdout
        .lines()
        .find(|l| l.contains("vm-life"))
        .unwrap_or_else(|| panic!("the VM is not in rvmm ps:\n{}", ps.stdout));
    assert!(line.contains("vm"), "{line}");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    // The rest of the output is a few bytes: it fits the pipes while we wait.
    let status = child.0.wait().expect("wait");
    let (mut stdout, mut stderr) = (String::new(), String::new());
    let _ = child
        .0
        .stdout
        .take()
        .map(|mut o| o.read_to_string(&mut stdout));
    let _ = child
        .0
        .stderr
        .take()
        .map(|mut e| e.read_to_string(&mut stderr));
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(stdout.contains("got-term"), "{stdout}");
    let ps = rvmm(env.store.path(), &["ps", "-a"], None);
    assert!(!ps.stdout.contains("vm-life"), "--rm left {}", ps.stdout);
}

/// A workload that ignores SIGTERM: the first one is forwarded, the second stops the VM (137).
#[test]
fn a_second_sigterm_stops_the_vm_with_137() {
    let Some(env) = setup() else { return };
    let mut child = start_ready(
        &env,
        &["--network=none"],
        "trap '' TERM; echo ready; while :; do sleep 1; done",
    );
    for _ in 0..2 {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
        std::thread::sleep(Duration::from_millis(500));
    }
    let status = child.0.wait().expect("wait");
    assert_eq!(status.code(), Some(137));
}

#[test]
fn a_file_that_cannot_be_executed_is_126_in_both() {
    let Some(env) = setup() else { return };
    let args = ["/etc/passwd"];
    let c = run(&env, "container", &["--network=none"], &args, None);
    assert_eq!(c.code, 126, "{}", c.stderr);
    let v = run(&env, "vm", &["--network=none"], &args, None);
    assert_eq!(
        (v.code, v.stdout.as_str(), v.stderr.as_str()),
        (c.code, c.stdout.as_str(), c.stderr.as_str()),
        "vm (left) and container (right) differ"
    );
}

#[test]
fn kill_9_of_a_vm_run_is_cleaned_up_by_gc() {
    let Some(env) = setup() else { return };
    let mut child = start_ready(&env, &[], "echo ready; while :; do sleep 1; done");
    let taps = || {
        common::run::ls(Path::new("/sys/class/net"))
            .into_iter()
            .filter(|l| l.starts_with("rvt"))
            .count()
    };
    assert!(
        taps()
            > env
                .before
                .links
                .iter()
                .filter(|l| l.starts_with("rvt"))
                .count()
    );
    child.0.kill().expect("kill -9");
    child.0.wait().expect("wait");
    let o = rvmm(env.store.path(), &["gc"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("1 dead run"), "{}", o.stdout);
    // RunEnv's drop compares links, leases, mounts and runs with the state before.
}

/// A child that is killed and reaped when the test ends, on every path.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Bytes of zeros the workload writes to its stdout.
const FLOOD_BYTES: u64 = 256 * 1024;

#[test]
fn published_port_and_hostile_workload() {
    let Some(env) = setup() else { return };
    // The workload's TCP flood lands here (the host's side of the rvmm0 bridge): read and dropped.
    let sink = std::net::TcpListener::bind("0.0.0.0:0").expect("bind sink");
    let sink_port = sink.local_addr().expect("addr").port();
    let flooded = Arc::new(AtomicU64::new(0));
    {
        let flooded = flooded.clone();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = sink.accept() {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    flooded.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        });
    }
    let port = common::images::free_port();
    let script = format!(
        "httpd -p 8080 -h /var/www; nc 10.77.0.1 {sink_port} < /dev/zero & \
         dd if=/dev/zero bs=4096 count={} 2>/dev/null; read x; echo \"done-$x\"; exit 7",
        FLOOD_BYTES / 4096
    );
    let mut child = Reaped(
        Command::new(common::rvmm_bin())
            .arg("--root")
            .arg(env.store.path())
            .args(["run", "--rm", "--isolation=vm", "-i", "-p"])
            .arg(format!("{port}:8080"))
            .args([BB, "sh", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("rvmm"),
    );
    let child = &mut child.0;
    let mut stdout = child.stdout.take().expect("stdout");
    let got = Arc::new(AtomicU64::new(0));
    let tail = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let (got, tail) = (got.clone(), tail.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.fetch_add(n as u64, Ordering::Relaxed);
                tail.lock()
                    .expect("lock")
                    .extend(buf[..n].iter().filter(|b| **b != 0));
            }
        })
    };

    // httpd answers through the published port while the floods run.
    let deadline = Instant::now() + Duration::from_secs(400);
    let mut body = String::new();
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            panic!("rvmm ended early ({st}): {err}");
        }
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
            let _ = s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n");
            body.clear();
            let _ = s.read_to_string(&mut body);
            if body.contains("hello from rvmm") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        body.contains("hello from rvmm"),
        "the published port never reached httpd in the VM: {body:?}"
    );
    // Let the floods run until the stdout one is through and the TCP one has reached the host,
    // then release the workload.
    while (got.load(Ordering::Relaxed) < FLOOD_BYTES || flooded.load(Ordering::Relaxed) == 0)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"ok\n").expect("write stdin");
    drop(stdin);
    let mut status = None;
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait().expect("wait") {
            status = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let Some(status) = status else {
        let _ = child.kill();
        panic!("the VM did not end after the workload was released");
    };
    reader.join().expect("reader");
    let mut err = String::new();
    let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
    assert_eq!(status.code(), Some(7), "stderr: {err}");
    let tail = String::from_utf8_lossy(&tail.lock().expect("lock")).into_owned();
    assert_eq!(tail, "done-ok\n");
    assert_eq!(
        got.load(Ordering::Relaxed),
        FLOOD_BYTES + "done-ok\n".len() as u64
    );
    assert!(
        flooded.load(Ordering::Relaxed) > 0,
        "the guest's TCP flood never reached the host"
    );
    eprintln!(
        "guest flooded {} bytes of TCP while serving",
        flooded.load(Ordering::Relaxed)
    );
}

/// `rvmm snapshot prewarm` with these flags, checked.
fn prewarm(env: &RunEnv, flags: &[&str]) -> String {
    let mut a = vec!["snapshot", "prewarm"];
    a.extend_from_slice(flags);
    let o = rvmm(env.store.path(), &a, None);
    assert_eq!(o.code, 0, "prewarm: {}", o.stderr);
    o.stdout
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn timings_warm(stderr: &str) -> bool {
    stderr.contains("rvmm-timings warm=1")
}

/// Two VMs restored at once from one snapshot are two different machines: their own MAC, IP,
/// random bytes, and the host's time; and the snapshot, taken before any image disk existed,
/// serves another image just as well.
#[test]
fn warm_guests_are_unique_and_one_snapshot_serves_every_image() {
    let Some(env) = setup() else { return };
    prewarm(&env, &[]);
    let script = "cat /sys/class/net/eth0/address; ip -4 -o addr show eth0; \
                  od -An -tx1 -N16 /dev/urandom; date +%s";
    let spawn = || {
        Command::new(common::rvmm_bin())
            .arg("--root")
            .arg(env.store.path())
            .env("RVMM_TIMINGS", "1")
            .args(["run", "--rm", "--isolation=vm", BB, "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("rvmm")
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (
        a.wait_with_output().expect("rvmm"),
        b.wait_with_output().expect("rvmm"),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut seen = Vec::new();
    for o in [&a, &b] {
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(0), "{out} {err}");
        assert!(timings_warm(&err), "not a warm start: {err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        let ip = lines[1]
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        assert!(ip.starts_with("10.77."), "{out}");
        let t: i64 = lines[3].trim().parse().unwrap();
        assert!((now - t).abs() < 120, "guest clock {t}, host {now}");
        seen.push((lines[0].to_string(), ip, lines[2].to_string()));
    }
    assert_ne!(seen[0].0, seen[1].0, "same MAC");
    assert_ne!(seen[0].1, seen[1].1, "same IP");
    assert_ne!(seen[0].2, seen[1].2, "same random bytes");

    // Another image from the same snapshot: its own files, not the first image's.
    let o = rvmm(
        env.store.path(),
        &[
            "run",
            "--rm",
            "--isolation=vm",
            "localhost/multi",
            "sh",
            "-c",
            "echo image=$RVMM_IMAGE; cat /data/dir/z",
        ],
        None,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout, "image=multi\nz\n");
}

/// An image's first VM run saves the image's snapshot on the way (the guest with the image's
/// root built, before anything of the run reached it); the next runs of the image restore it and
/// are still their own runs: their hostname, /etc files, environment, flags, and a fresh
/// writable layer.
#[test]
fn an_image_snapshot_holds_the_root_and_nothing_of_the_run_that_saved_it() {
    let Some(env) = setup() else { return };
    prewarm(&env, &[]);
    // An earlier test may have saved busybox's: this test's first run saves it again.
    let image_rows = || -> Vec<(String, String)> {
        let ls = rvmm(env.store.path(), &["snapshot", "ls"], None);
        // KEY (16 wide), MACHINE (28), IMAGE (12), ...
        ls.stdout
            .lines()
            .skip(1)
            .map(|l| {
                let col = |at, n| l.chars().skip(at).take(n).collect::<String>();
                (col(0, 16), col(48, 12).trim().to_string())
            })
            .filter(|(_, image)| image != "-")
            .collect()
    };
    for (key, _) in image_rows() {
        assert_eq!(
            rvmm(env.store.path(), &["snapshot", "rm", &key], None).code,
            0
        );
    }
    let secret = format!("no-such-secret-{:x}", rand_u64());
    let timed = |flags: &[&str], script: &str| {
        let o = Command::new(common::rvmm_bin())
            .arg("--root")
            .arg(env.store.path())
            .env("RVMM_TIMINGS", "1")
            .args(["run", "--rm", "--isolation=vm"])
            .args(flags)
            .args([BB, "sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .expect("rvmm");
        let (out, err) = (
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        );
        assert_eq!(o.status.code(), Some(0), "{out} {err}");
        (out, err)
    };
    let script = "hostname; cat /etc/hostname; grep -c \"$(hostname)\" /etc/hosts; \
                  echo \"${SECRET:-unset}\"; cat /tmp/left 2>/dev/null || echo none; \
                  echo \"$SECRET\" > /tmp/left; \
                  if touch /x 2>/dev/null; then echo rw; else echo ro; fi";
    let env_flag = format!("SECRET={secret}");
    let (out, err) = timed(&["--hostname", "first", "-e", &env_flag], script);
    assert_eq!(out, format!("first\nfirst\n1\n{secret}\nnone\nrw\n"));
    assert!(err.contains("restored=machine"), "{err}");
    assert!(
        !err.contains("image_snapshot_ms=-1"),
        "no image snapshot saved: {err}"
    );
    let rows = image_rows();
    assert_eq!(rows.len(), 1, "{rows:?}");
    // Nothing of the run that saved it: its environment never reached the guest before.
    let snaps = std::env::var_os("RVMM_SNAPSHOTS").unwrap();
    let memory = Path::new(&snaps).join(&rows[0].0).join("memory");
    // (The search works: rvmm-init's overlay options are in guest memory.)
    assert!(file_contains(&memory, b"lowerdir=/image,upperdir="));
    assert!(
        !file_contains(&memory, secret.as_bytes()),
        "the image snapshot holds the run's environment"
    );
    // The next runs start from it, with their own everything.
    for (host, flags) in [("second", vec!["--read-only"]), ("third", vec![])] {
        let mut f = vec!["--hostname", host];
        f.extend(flags.iter().copied());
        let (out, err) = timed(&f, script);
        let rw = if flags.is_empty() { "rw" } else { "ro" };
        assert_eq!(
            out,
            format!("{host}\n{host}\n1\nunset\nnone\n{rw}\n"),
            "{err}"
        );
        assert!(err.contains("restored=image"), "{err}");
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .unwrap();
    u64::from_le_bytes(b)
}

/// Whether `needle` occurs in the file (read in pieces that overlap by its length).
fn file_contains(path: &Path, needle: &[u8]) -> bool {
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut keep = 0;
    loop {
        let n = f.read(&mut buf[keep..]).unwrap();
        if n == 0 {
            return false;
        }
        let have = keep + n;
        if buf[..have].windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        keep = needle.len().min(have);
        buf.copy_within(have - keep..have, 0);
    }
}

/// A guest that does not start the workload in time is stopped with one line and status 125, and
/// leaves nothing behind (RunEnv's drop checks links, leases, mounts and runs). No kernel boots to a
/// workload in 50 ms, on any host.
#[test]
fn a_guest_that_does_not_start_in_time_is_stopped_with_one_line() {
    let Some(env) = setup() else { return };
    let t = Instant::now();
    let o = Command::new(common::rvmm_bin())
        .arg("--root")
        .arg(env.store.path())
        .env("RVMM_START_TIMEOUT", "0.05")
        .args([
            "run",
            "--rm",
            "--cold",
            "--network=none",
            BB,
            "echo",
            "never",
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(125), "{stderr}");
    assert_eq!(stdout, "");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("rvmm: the microVM did not start the workload within 50ms (booting;"),
        "{}",
        lines[0]
    );
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
}

/// A snapshot this rvmm cannot use is refused with one line, the run boots instead and
/// succeeds, and its boot saves a good snapshot for the next run. Two vCPUs: SMP guests
/// snapshot and restore too.
#[test]
fn a_damaged_snapshot_is_replaced_by_a_boot() {
    let Some(env) = setup() else { return };
    let key = prewarm(&env, &["--network=none", "--cpus", "2"]);
    let dir = Path::new(&std::env::var_os("RVMM_SNAPSHOTS").unwrap()).join(&key);
    let state = dir.join("snapshot.json");
    let json = std::fs::read_to_string(&state).unwrap();
    let from = json.find("\"rvmm\":\"").unwrap() + 8;
    std::fs::write(
        &state,
        format!("{}0.0.0-other{}", &json[..from], &json[from..]),
    )
    .unwrap();
    let o = run(
        &env,
        "vm",
        &["--network=none", "--cpus", "2"],
        &["echo", "booted"],
        None,
    );
    assert_eq!((o.code, o.stdout.as_str()), (0, "booted\n"), "{}", o.stderr);
    let lines: Vec<&str> = o.stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "{}", o.stderr);
    assert!(
        lines[0].starts_with(&format!(
            "rvmm: not using snapshot {key} (snapshot taken by rvmm 0.0.0-other"
        )) && lines[0].ends_with("booting the kernel instead"),
        "{}",
        lines[0]
    );
    // The boot saved a snapshot again, and the next run starts from it.
    let ls = rvmm(env.store.path(), &["snapshot", "ls"], None);
    assert!(
        ls.stdout
            .lines()
            .any(|l| l.starts_with(&key) && l.ends_with("usable")),
        "{}",
        ls.stdout
    );
    let mut c = Command::new(common::rvmm_bin());
    let o = c
        .arg("--root")
        .arg(env.store.path())
        .env("RVMM_TIMINGS", "1")
        .args(["run", "--rm", "--network=none", "--cpus", "2", BB])
        .args(["cat", "/sys/devices/system/cpu/online"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "0-1\n");
    assert!(timings_warm(&String::from_utf8_lossy(&o.stderr)));

    // `rvmm snapshot rm`: the key goes; an unknown key is one line and status 1.
    let o = rvmm(env.store.path(), &["snapshot", "rm", &key], None);
    assert_eq!((o.code, o.stdout.trim()), (0, key.as_str()), "{}", o.stderr);
    let ls = rvmm(env.store.path(), &["snapshot", "ls"], None);
    assert!(!ls.stdout.contains(&key), "{}", ls.stdout);
    let o = rvmm(env.store.path(), &["snapshot", "rm", &key], None);
    assert_eq!(o.code, 1);
    assert_eq!(o.stderr.trim(), format!("rvmm: no snapshot {key}"));
}

/// A detached VM: `run -d` returns once the workload runs in the guest, `logs` has its stdout and
/// stderr apart, `stop` reaches the workload's trap through the channel, `wait` (in another
/// process, while `stop` runs) prints its status, and nothing is left behind.
#[test]
fn a_detached_vm_logs_stops_and_waits() {
    let Some(env) = setup() else { return };
    let root = env.store.path();
    let _cleanup = common::run::RemoveRuns {
        root,
        names: &["bgvm"],
    };
    let script = "echo out; echo err >&2; trap 'echo term; exit 3' TERM; while :; do sleep 1; done";
    let o = rvmm(
        root,
        &[
            "run",
            "-d",
            "--isolation=vm",
            "--network=none",
            "--name",
            "bgvm",
            BB,
            "sh",
            "-c",
            script,
        ],
        None,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout.trim().len(), 64, "{}", o.stdout);
    let mut logs = rvmm(root, &["logs", "bgvm"], None);
    for _ in 0..200 {
        if logs.stdout.contains("out") && logs.stderr.contains("err") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        logs = rvmm(root, &["logs", "bgvm"], None);
    }
    assert_eq!(
        (logs.stdout.as_str(), logs.stderr.as_str()),
        ("out\n", "err\n")
    );
    let i = rvmm(root, &["inspect", "bgvm"], None);
    let v: serde_json::Value = serde_json::from_str(&i.stdout).unwrap();
    assert_eq!(v[0]["Isolation"], "vm");
    assert_eq!(v[0]["State"]["Running"], true);

    // exec: a process next to the workload in the guest, with its privileges and the given
    // user, environment and directory; its status comes back.
    let e = rvmm(
        root,
        &[
            "exec", "-u", "app", "-e", "X=1", "-w", "/tmp", "bgvm", "sh", "-c",
            "id -u; echo $X; pwd; grep -E '^(CapEff|NoNewPrivs):' /proc/self/status; echo oops >&2; exit 3",
        ],
        None,
    );
    assert_eq!(
        (e.code, e.stdout.as_str(), e.stderr.as_str()),
        (
            3,
            "1000\n1\n/tmp\nCapEff:\t0000000000000000\nNoNewPrivs:\t0\n",
            "oops\n"
        )
    );
    let e = rvmm(root, &["exec", "bgvm", "nonexistent"], None);
    assert_eq!(e.code, 127, "{}", e.stderr);
    assert!(
        e.stderr.contains("executable file not found"),
        "{}",
        e.stderr
    );
    let e = rvmm(root, &["exec", "-i", "bgvm", "cat"], Some("through exec\n"));
    assert_eq!(
        (e.code, e.stdout.as_str()),
        (0, "through exec\n"),
        "{}",
        e.stderr
    );
    // With -t the process has a terminal in the guest (whatever ours is).
    let e = rvmm(
        root,
        &["exec", "-t", "bgvm", "sh", "-c", "test -t 1 && echo tty"],
        None,
    );
    assert_eq!((e.code, e.stdout.as_str()), (0, "tty\r\n"), "{}", e.stderr);
    // Two at once, each with its own output and status.
    let spawn = |n: &str| {
        Command::new(common::rvmm_bin())
            .arg("--root")
            .arg(root)
            .args([
                "exec",
                "bgvm",
                "sh",
                "-c",
                &format!("sleep 1; echo {n}; exit {n}"),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("4"), spawn("5"));
    for (child, n) in [(a, 4), (b, 5)] {
        let o = child.wait_with_output().unwrap();
        assert_eq!(
            (
                o.status.code(),
                String::from_utf8_lossy(&o.stdout).to_string()
            ),
            (Some(n), format!("{n}\n"))
        );
    }
    // `wait` from another process while `stop` runs.
    let waiter = Command::new(common::rvmm_bin())
        .arg("--root")
        .arg(root)
        .args(["wait", "bgvm"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let s = rvmm(root, &["stop", "-t", "30", "bgvm"], None);
    assert_eq!(s.code, 0, "{}", s.stderr);
    let w = waiter.wait_with_output().unwrap();
    let w = String::from_utf8_lossy(&w.stdout).to_string();
    assert_eq!(w, "3\n");
    let logs = rvmm(root, &["logs", "bgvm"], None);
    assert_eq!(logs.stdout, "out\nterm\n");
    assert_eq!(rvmm(root, &["rm", "bgvm"], None).code, 0);
    assert!(rvmm(root, &["ps", "-aq"], None).stdout.trim().is_empty());
}

/// Runs `rvmm run --rm --isolation=vm FLAGS busybox ARGS` with `input` fed to its stdin from a
/// thread of its own (a workload that never reads it must not block the test either): (status,
/// stdout bytes, stderr).
fn run_feeding(
    env: &RunEnv,
    flags: &[&str],
    args: &[&str],
    input: Vec<u8>,
) -> (i32, Vec<u8>, String) {
    let mut child = Command::new(common::rvmm_bin())
        .arg("--root")
        .arg(env.store.path())
        .args(["run", "--rm", "--isolation=vm"])
        .args(flags)
        .arg(BB)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rvmm");
    let mut stdin = child.stdin.take().expect("stdin");
    let feeder = std::thread::spawn(move || {
        // rvmm may exit before taking it all: that is the point of one of the tests.
        let _ = stdin.write_all(&input);
    });
    let mut err = child.stderr.take().expect("stderr");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut out = Vec::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_end(&mut out)
        .expect("read stdout");
    let status = child.wait().expect("rvmm");
    feeder.join().unwrap();
    (status.code().unwrap_or(-1), out, err_reader.join().unwrap())
}

/// `n` bytes no two runs of a broken channel would get right by accident (xorshift64).
fn pattern(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// 64 MiB (RVMM_TEST_CHANNEL_MIB overrides, for a quick local run) into the workload's stdin and
/// back out of its stdout, through a warm VM: complete and in order.
#[test]
fn channel_round_trip_of_64_mib() {
    let Some(env) = setup() else { return };
    let mib = std::env::var("RVMM_TEST_CHANNEL_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(64);
    let data = pattern(mib << 20);
    let t = Instant::now();
    let (code, out, err) = run_feeding(
        &env,
        &["-i", "--network=none"],
        &["sh", "-c", "cat; echo done >&2"],
        data.clone(),
    );
    let took = t.elapsed();
    eprintln!(
        "{mib} MiB each way in {took:?} ({:.2} MB/s each way)",
        (mib << 20) as f64 / took.as_secs_f64() / 1e6
    );
    assert_eq!((code, err.as_str()), (0, "done\n"));
    assert_eq!(out.len(), data.len(), "stdout is cut short");
    assert_eq!(sha256(&out), sha256(&data), "stdout differs from stdin");
}

/// stdout and stderr written alternately arrive apart and in order, the workload can open
/// /dev/stdout and /dev/stderr again (as with pipes), in a VM that boots (`--cold`) just as in a
/// container; and a workload that never reads its (large) stdin ends the run all the same.
#[test]
fn channel_streams_stay_apart_and_unread_stdin_does_not_block() {
    let Some(env) = setup() else { return };
    let script = "i=0; while [ $i -lt 300 ]; do i=$((i+1)); echo out$i; echo err$i >&2; done; \
                  echo again > /dev/stdout; echo again > /dev/stderr; exit 5";
    let args = ["sh", "-c", script];
    let c = run(&env, "container", &["--network=none"], &args, None);
    assert_eq!(c.code, 5, "container: {}", c.stderr);
    let expect = |p: &str| {
        let mut s: String = (1..=300).map(|i| format!("{p}{i}\n")).collect();
        s.push_str("again\n");
        s
    };
    assert_eq!(
        (c.stdout.clone(), c.stderr.clone()),
        (expect("out"), expect("err"))
    );
    let v = run(&env, "vm", &["--network=none", "--cold"], &args, None);
    assert_eq!(
        (v.code, v.stdout.as_str(), v.stderr.as_str()),
        (c.code, c.stdout.as_str(), c.stderr.as_str()),
        "vm --cold (left) and container (right) differ"
    );
    // 16 MiB on stdin that nobody reads: more than every buffer on the way holds.
    let (code, out, err) = run_feeding(
        &env,
        &["-i", "--network=none"],
        &["sh", "-c", "echo not reading; exit 7"],
        vec![b'x'; 16 << 20],
    );
    assert_eq!(
        (code, String::from_utf8_lossy(&out).as_ref(), err.as_str()),
        (7, "not reading\n", "")
    );
}

/// An `rvmm-vmm` from another build (or started by hand) refuses to start, in one line.
#[test]
fn a_vmm_binary_from_another_build_refuses_in_one_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_rvmm-vmm"))
        .arg("0123456789abcdef")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("rvmm-vmm: this binary is from another build")
            && err.contains("asked for 0123456789abcdef"),
        "{err}"
    );
}

/// `rvmm-vmm PROTOCOL session FD` from another build, or by hand, refuses in one line too.
#[test]
fn a_handover_to_another_build_or_by_hand_is_refused_in_one_line() {
    for (protocol, why) in [
        (
            "0123456789abcdef".to_string(),
            "rvmm-vmm: this binary is from another build",
        ),
        (
            rvmm::vm::handover::protocol_arg(),
            "rvmm: rvmm-vmm session: it is started by rvmm",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_rvmm-vmm"))
            .args([protocol.as_str(), "session", "999"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(if why.starts_with("rvmm:") { 125 } else { 2 }),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with(why), "{err}");
    }
    // An argument that is not UTF-8 is refused the same way, not a panic.
    let out = Command::new(env!("CARGO_BIN_EXE_rvmm-vmm"))
        .arg(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"\xff"))
        .args(["session", "999"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("rvmm-vmm: this binary is from another build"),
        "{err}"
    );
}

/// The pid of the VMM process (`rvmm-vmm`, or `rvmm __vmm` without it) whose parent is `parent`.
fn vmm_process_of(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let ppid: u32 = stat
            .rsplit(')')
            .next()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let vmm = cmdline.starts_with(b"rvmm-vmm\0") || cmdline.windows(5).any(|w| w == b"__vmm");
        (ppid == parent && vmm).then_some(pid)
    })
}

fn status_field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} in\n{status}"))
}

/// A VMM that shares directories: the shares (and only they) are in its root, writable or
/// read-only as asked; its `rvmm-fs` thread alone holds the four file capabilities, filtered
/// like every other thread, which hold none.
#[test]
fn a_sharing_vmm_keeps_file_capabilities_on_one_thread() {
    let Some(env) = setup() else { return };
    let (rw, ro) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let flags = [
        "-v".to_string(),
        format!("{}:/rw", rw.path().display()),
        "-v".to_string(),
        format!("{}:/ro:ro", ro.path().display()),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let child = start_ready(
        &env,
        &flags,
        "trap 'exit 0' TERM; echo ready; while :; do sleep 1; done",
    );
    let pid = vmm_process_of(child.0.id()).expect("a VMM process under rvmm run");
    let proc_dir = Path::new("/proc").join(pid.to_string());
    // CHOWN, DAC_OVERRIDE, FOWNER, FSETID.
    let fs_caps = format!("{:016x}", (1u64 << 0) | (1 << 1) | (1 << 3) | (1 << 4));
    let mut seen = Vec::new();
    for t in std::fs::read_dir(proc_dir.join("task")).unwrap().flatten() {
        let Ok(st) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let name = status_field(&st, "Name").to_string();
        if name == "kvm-nx-lpage-re" {
            continue;
        }
        let want = if name == "rvmm-fs" {
            fs_caps.as_str()
        } else {
            "0000000000000000"
        };
        for key in ["CapEff", "CapPrm"] {
            assert_eq!(status_field(&st, key), want, "{name} {key}");
        }
        for key in ["CapInh", "CapBnd", "CapAmb"] {
            assert_eq!(status_field(&st, key), "0000000000000000", "{name} {key}");
        }
        assert_eq!(status_field(&st, "Seccomp"), "2", "{name}");
        seen.push(name);
    }
    seen.sort();
    assert_eq!(
        seen,
        ["rvmm-control", "rvmm-event", "rvmm-fs", "rvmm-vcpu0"]
    );
    let root = proc_dir.join("root");
    assert_eq!(common::run::ls(&root.join("shares")).len(), 2);
    assert!(std::fs::write(root.join("shares/0/x"), b"x").is_ok());
    assert!(rw.path().join("x").exists());
    assert!(
        std::fs::write(root.join("shares/1/x"), b"x").is_err(),
        "a read-only share"
    );
    // SAFETY: kill(2) on a child of ours.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let mut child = child;
    let _ = child.0.wait();
}

/// Issue 18: seen from the host, a running VM's VMM is a process of its own with an
/// unprivileged uid and gid, no capability at all, no_new_privs, a seccomp filter on every
/// thread, a root holding only /dev/kvm and what it was given, a network namespace with nothing
/// but lo (its tap came as a descriptor), and a cgroup capping its memory and tasks.
#[test]
fn the_vmm_runs_jailed_unprivileged_and_filtered() {
    let Some(env) = setup() else { return };
    let mut child = start_ready(
        &env,
        &[],
        "trap 'exit 0' TERM; echo ready; while :; do sleep 1; done",
    );
    let pid = vmm_process_of(child.0.id()).expect("a VMM process under rvmm run");
    let proc_dir = Path::new("/proc").join(pid.to_string());
    // The small VMM binary built beside rvmm, not rvmm itself.
    let cmdline = std::fs::read(proc_dir.join("cmdline")).unwrap();
    assert!(
        cmdline.starts_with(b"rvmm-vmm\0"),
        "{:?}",
        String::from_utf8_lossy(&cmdline)
    );
    let status = std::fs::read_to_string(proc_dir.join("status")).unwrap();
    for key in ["Uid", "Gid"] {
        let ids: Vec<u32> = status_field(&status, key)
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        assert_eq!(ids.len(), 4, "{key}");
        assert!(
            ids.iter().all(|&i| i == ids[0] && i >= 1000),
            "{key}: {ids:?}"
        );
    }
    assert_eq!(status_field(&status, "Groups"), "");
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(&status, key), "0000000000000000", "{key}");
    }
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    let mut names = Vec::new();
    for t in std::fs::read_dir(proc_dir.join("task")).unwrap().flatten() {
        let Ok(st) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        names.push(status_field(&st, "Name").to_string());
        assert_eq!(
            status_field(&st, "Seccomp"),
            "2",
            "thread {}",
            status_field(&st, "Name")
        );
    }
    names.sort();
    // KVM adds a kernel worker to the process that made the VM ("kvm-nx-lpage-recovery", cut to
    // 15 characters, on hosts that mitigate the iTLB multihit erratum); it runs no user code and
    // inherits the filter, as the check above saw. Every user thread is ours.
    names.retain(|n| n != "kvm-nx-lpage-re");
    assert_eq!(names, ["rvmm-control", "rvmm-event", "rvmm-vcpu0"]);
    // Its root: /dev with kvm alone, and what this start reads, read-only: the snapshot for a
    // warm start; the kernel and initramfs for a boot. A boot, or a warm start from the
    // machine's snapshot (the image's is saved on the way), also gets the one writable
    // directory its snapshot is saved into (which run does what depends on the tests' order).
    let root = proc_dir.join("root");
    let mut top = common::run::ls(&root);
    top.sort();
    let warm = top == ["dev", "snapshot"] || top == ["dev", "snapshot", "snapshot-out"];
    assert!(
        warm || top == ["dev", "initrd", "kernel", "snapshot-out"],
        "the VMM's root: {top:?}"
    );
    assert_eq!(common::run::ls(&root.join("dev")), ["kvm"]);
    if warm {
        assert!(std::fs::write(root.join("snapshot/x"), b"x").is_err());
    } else {
        for f in ["kernel", "initrd"] {
            assert!(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(root.join(f))
                    .is_err(),
                "{f}"
            );
        }
    }
    assert!(
        std::fs::write(root.join("x"), b"x").is_err(),
        "the root is read-only"
    );
    // Its network namespace: lo only.
    let net = std::fs::read_to_string(proc_dir.join("net/dev")).unwrap();
    let links: Vec<&str> = net
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(links, ["lo"]);
    // Its own PID namespace, mount namespace and cgroup.
    let ns = |p: &Path, n: &str| std::fs::read_link(p.join("ns").join(n)).unwrap();
    let me = Path::new("/proc/self");
    for n in ["pid", "mnt", "net", "ipc", "uts"] {
        assert_ne!(ns(&proc_dir, n), ns(me, n), "{n} namespace");
    }
    let cgroups = std::fs::read_to_string(proc_dir.join("cgroup")).unwrap();
    let (memory_file, memory_path) = cgroups
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
            if ctrl.split(',').any(|c| c == "memory") {
                Some((
                    "memory.limit_in_bytes",
                    format!("/sys/fs/cgroup/memory{path}"),
                ))
            } else if ctrl.is_empty() && path.contains("/rvmm/") {
                Some(("memory.max", format!("/sys/fs/cgroup{path}")))
            } else {
                None
            }
        })
        .expect("a memory cgroup");
    assert!(memory_path.contains("/rvmm/"), "{memory_path}");
    let limit: u64 = std::fs::read_to_string(Path::new(&memory_path).join(memory_file))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(limit, (256 << 20) + rvmm::vm::jail::VMM_MEMORY_ALLOWANCE);
    // The run ends as usual (RunEnv then checks it left nothing).
    let rvmm_pid = nix::unistd::Pid::from_raw(i32::try_from(child.0.id()).unwrap());
    nix::sys::signal::kill(rvmm_pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
}

/// Issue 18: a VMM thread that makes a call its filter forbids (a hook of debug builds) takes
/// the VMM process down; the run says which thread and which call in one line, status 125, and
/// leaves nothing behind (RunEnv's checks).
#[test]
fn a_forbidden_system_call_kills_the_vmm_with_one_line() {
    let Some(env) = setup() else { return };
    for (thread, name) in [
        ("vcpu", "vcpu0"),
        ("event", "event"),
        ("control", "control"),
    ] {
        let o = Command::new(common::rvmm_bin())
            .arg("--root")
            .arg(env.store.path())
            .args([
                "run",
                "--rm",
                "--isolation=vm",
                "--network=none",
                BB,
                "true",
            ])
            .env("RVMM_TEST_SECCOMP_VIOLATION", thread)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(125), "{thread}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{thread}: {stderr}");
        assert!(
            stderr.contains(&format!("VMM's {name} thread"))
                && stderr.contains("(socket, 41)")
                && stderr.contains("seccomp"),
            "{thread}: {stderr}"
        );
    }
}

/// As tests/container.rs's test of the same checks (tests/common/lifecycle.rs), in a VM restored
/// from the shared snapshot of a machine with a network device: a detached busybox httpd on
/// `-p 127.0.0.1:PORT:80`, `logs -f` while a request is made, `exec` reading and writing the
/// server's files (exit 3), `exec -t`, two execs at once, `kill -s USR1` to a trap through the
/// channel, `inspect`, and `stop -t 2` of a workload that ignores SIGTERM (`wait`: 137).
#[test]
fn a_detached_vm_serves_httpd_follows_logs_and_is_killed_after_grace() {
    let Some(env) = setup() else { return };
    common::lifecycle::detached_httpd(env.store.path(), "vm");
}

/// `setsid sh -c 'rvmm run -d --isolation=vm ...'`: the VM outlives the shell and its session;
/// SIGKILL to its supervisor takes the VMM with it, and `rvmm gc` frees the tap, lease and run
/// directory (RunEnv's drop checks them).
#[test]
fn a_detached_vm_survives_its_shell_and_gc_cleans_after_a_killed_supervisor() {
    let Some(env) = setup() else { return };
    // Warm: a restored run is kept by rvmm-vmm (the test checks it).
    prewarm(&env, &["--network=bridge"]);
    common::lifecycle::survives_its_shell_then_gc_after_a_killed_supervisor(env.store.path(), "vm");
}

/// The Debian minbase userland in a detached VM: `logs -f`, `exec -u` (exit 3), `exec -t`,
/// `exec -i`, `kill -s SIGUSR1`, and `rm -f` of the running VM.
#[test]
fn a_detached_debian_vm_execs_logs_and_is_removed_running() {
    let Some(env) = setup() else { return };
    if !common::have_tools(&["debootstrap"]) {
        return;
    }
    common::lifecycle::debian_exec_logs_and_rm_f(env.store.path(), "vm");
}

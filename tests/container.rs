//! Container isolation, for real: root, this host's cgroups, the busybox test image.
//! Every test checks that nothing is left behind (mounts, cgroups, links, leases, run dirs).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use common::run::{ls, rvmm, Out, RunEnv, INIT_SCRIPT, INIT_WANT};

/// Container tests compare host-wide state before and after: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn setup() -> Option<RunEnv> {
    if !common::have_root()
        || !common::have_tools(&["umoci", "skopeo", "ip", "iptables", "nsenter"])
    {
        return None;
    }
    Some(RunEnv::new(&SERIAL, &["busybox", "multi"]))
}

/// `rvmm run --rm --network none IMAGE args…` (plus `extra` flags before the image).
fn run(env: &RunEnv, extra: &[&str], image: &str, args: &[&str]) -> Out {
    let mut a = vec!["run", "--rm", "--isolation=container"];
    if !extra.iter().any(|e| e.starts_with("--network")) {
        a.push("--network=none");
    }
    a.extend_from_slice(extra);
    a.push(image);
    a.extend_from_slice(args);
    rvmm(env.store.path(), &a, None)
}

const BB: &str = "localhost/busybox";

#[test]
fn namespaces_and_identity() {
    let Some(env) = setup() else { return };
    let o = run(
        &env,
        &["--hostname", "boxy"],
        BB,
        &[
            "sh",
            "-c",
            "echo $$; hostname; cat /etc/hostname; ls /proc | grep -c '^[0-9]'",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines[0], "1", "the workload is PID 1");
    assert_eq!(lines[1], "boxy");
    assert_eq!(lines[2], "boxy");
    let procs: usize = lines[3].parse().expect("count");
    assert!(procs <= 3, "host processes are visible: {procs} pids");
    // Separate IPC and network namespaces: no host interfaces.
    let o = run(
        &env,
        &[],
        BB,
        &["sh", "-c", "ls /sys/class/net; readlink /proc/1/ns/ipc"],
    );
    assert_eq!(o.stdout.lines().next(), Some("lo"));
    let host_ipc = std::fs::read_link("/proc/self/ns/ipc").expect("ns");
    assert_ne!(
        o.stdout.lines().nth(1).unwrap_or(""),
        host_ipc.to_string_lossy()
    );
    // stdout and stderr are kept apart.
    let o = run(&env, &[], BB, &["sh", "-c", "echo out; echo err >&2"]);
    assert_eq!((o.stdout.as_str(), o.stderr.as_str()), ("out\n", "err\n"));
}

#[test]
fn exit_codes() {
    let Some(env) = setup() else { return };
    assert_eq!(run(&env, &[], BB, &["true"]).code, 0);
    assert_eq!(run(&env, &[], BB, &["sh", "-c", "exit 42"]).code, 42);
    let o = run(&env, &[], BB, &["/etc/passwd"]);
    assert_eq!(o.code, 126, "{}", o.stderr);
    let o = run(&env, &[], BB, &["no-such-command"]);
    assert_eq!(o.code, 127);
    assert!(o.stderr.contains("not found"), "{}", o.stderr);
    assert_eq!(
        run(
            &env,
            &[],
            BB,
            &["sh", "-c", "sleep 5 & kill -9 $!; wait $!"]
        )
        .code,
        137
    );
    // rvmm's own failure: 125, one line.
    let o = run(&env, &[], "localhost/no-such-image-here", &["true"]);
    assert_eq!(o.code, 125);
    assert_eq!(o.stderr.trim().lines().count(), 1, "{}", o.stderr);
    let o = run(&env, &["-u", "ghost"], BB, &["true"]);
    assert_eq!(o.code, 125);
    assert!(
        o.stderr.contains("unable to find user ghost"),
        "{}",
        o.stderr
    );
}

#[test]
fn filesystem() {
    let Some(env) = setup() else { return };
    let o = run(&env, &["--read-only"], BB, &["touch", "/x"]);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("Read-only"), "{}", o.stderr);
    // Writes go to the run's upper dir, never the store.
    let o = run(
        &env,
        &[],
        BB,
        &["sh", "-c", "echo changed > /etc/motd && cat /etc/motd"],
    );
    assert_eq!(o.stdout, "changed\n");
    assert_eq!(
        run(&env, &[], BB, &["cat", "/etc/motd"]).stdout,
        "welcome to the rvmm test image\n"
    );
    // Whiteouts and the opaque dir from the image layers.
    let o = run(
        &env,
        &[],
        "localhost/multi",
        &[
            "sh",
            "-c",
            "ls /data/dir; test -e /etc/motd || echo gone; cat /data/soft; /data/hard",
        ],
    );
    assert_eq!(o.stdout, "z\ngone\nz\nscript-ran\n", "{}", o.stderr);
    // /dev, /proc masking, /sys read-only.
    let o = run(&env, &[], BB, &["sh", "-c", "ls /dev | tr '\\n' ' '; echo; cat /proc/kcore | wc -c; touch /sys/x 2>&1 | grep -c Read-only"]);
    for d in [
        "full", "mqueue", "null", "ptmx", "pts", "random", "shm", "tty", "urandom", "zero",
    ] {
        assert!(o.stdout.contains(d), "/dev lacks {d}: {}", o.stdout);
    }
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines[1].trim(), "0", "/proc/kcore is masked");
    assert_eq!(lines[2].trim(), "1", "/sys is read-only");
    // Volumes.
    let host = tempfile::tempdir().expect("tmp");
    std::fs::write(host.path().join("in"), "from host\n").expect("write");
    let v = format!("{}:/mnt/vol", host.path().display());
    let o = run(
        &env,
        &["-v", &v],
        BB,
        &["sh", "-c", "cat /mnt/vol/in; echo back > /mnt/vol/out"],
    );
    assert_eq!(o.stdout, "from host\n", "{}", o.stderr);
    assert_eq!(
        std::fs::read_to_string(host.path().join("out")).expect("out"),
        "back\n"
    );
    let v = format!("{}:/mnt/vol:ro", host.path().display());
    assert_ne!(run(&env, &["-v", &v], BB, &["touch", "/mnt/vol/x"]).code, 0);
}

#[test]
fn env_workdir_user() {
    let Some(env) = setup() else { return };
    // From the image config (multi: User app, WorkingDir /data, Env RVMM_IMAGE=multi).
    let o = run(
        &env,
        &[],
        "localhost/multi",
        &["sh", "-c", "id -u; pwd; echo $RVMM_IMAGE; echo $HOME"],
    );
    assert_eq!(o.stdout, "1000\n/data\nmulti\n/home/app\n", "{}", o.stderr);
    // From flags.
    let ef = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(ef.path(), "# comment\nFROM_FILE=yes\nRVMM_IMAGE=file\n").expect("write");
    let o = run(
        &env,
        &[
            "-e",
            "A=1",
            "--env-file",
            ef.path().to_str().expect("utf8"),
            "-e",
            "RVMM_IMAGE=flag",
            "-w",
            "/tmp/new",
            "-u",
            "65534:50",
        ],
        BB,
        &[
            "sh",
            "-c",
            "echo $A $FROM_FILE $RVMM_IMAGE; pwd; id -u; id -g",
        ],
    );
    assert_eq!(
        o.stdout, "1 yes flag\n/tmp/new\n65534\n50\n",
        "{}",
        o.stderr
    );
    let o = run(&env, &["--entrypoint", "echo"], BB, &["hello", "world"]);
    assert_eq!(o.stdout, "hello world\n");
    // stdin only with -i.
    let o = rvmm(
        env.store.path(),
        &[
            "run",
            "--rm",
            "--isolation=container",
            "--network=none",
            "-i",
            BB,
            "cat",
        ],
        Some("piped in\n"),
    );
    assert_eq!(o.stdout, "piped in\n");
    let o = rvmm(
        env.store.path(),
        &[
            "run",
            "--rm",
            "--isolation=container",
            "--network=none",
            BB,
            "cat",
        ],
        Some("ignored\n"),
    );
    assert_eq!(o.stdout, "");
    // -t gives the workload a terminal.
    let o = run(&env, &["-t"], BB, &["sh", "-c", "test -t 1 && echo tty"]);
    assert_eq!(o.stdout.trim(), "tty");
}

#[test]
fn privileges() {
    let Some(env) = setup() else { return };
    let caps = |o: &Out, k: &str| {
        o.stdout
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let o = run(&env, &[], BB, &["cat", "/proc/self/status"]);
    // Docker's default set: CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP
    // NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP.
    assert_eq!(caps(&o, "CapEff:"), "00000000a80425fb");
    assert_eq!(caps(&o, "CapBnd:"), "00000000a80425fb");
    // Docker leaves no_new_privs off unless asked.
    assert_eq!(caps(&o, "NoNewPrivs:"), "0");
    assert_eq!(caps(&o, "Seccomp:"), "2");
    // No signal ignored or blocked: not the SIGPIPE rvmm ignores itself, nor what a shell ignores
    // in the jobs it starts in the background (below).
    assert_eq!(caps(&o, "SigIgn:"), "0000000000000000");
    assert_eq!(caps(&o, "SigBlk:"), "0000000000000000");
    let mut cmd = Command::new(common::rvmm_bin());
    cmd.arg("--root")
        .arg(env.store.path())
        .args(["run", "--rm", "--isolation=container", "--network=none", BB])
        .args(["cat", "/proc/self/status"]);
    // SAFETY: only signal(2) between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGQUIT, libc::SIG_IGN);
            Ok(())
        });
    }
    let out = cmd.output().expect("rvmm");
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains("SigIgn:\t0000000000000000\n"),
        "rvmm run with SIGINT and SIGQUIT ignored: {status}"
    );
    let o = run(&env, &["-u", "app"], BB, &["cat", "/proc/self/status"]);
    assert_eq!(caps(&o, "CapEff:"), "0000000000000000");
    assert_eq!(caps(&o, "CapBnd:"), "00000000a80425fb");

    // Seccomp: add_key works on the host but not in the container.
    let dir = tempfile::tempdir().expect("tmp");
    let probe = dir.path().join("sysprobe");
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sysprobe.c");
    let st = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&probe)
        .arg(&src)
        .status()
        .expect("gcc");
    assert!(st.success());
    let host = Command::new(&probe).arg("add_key").output().expect("probe");
    assert_eq!(
        String::from_utf8_lossy(&host.stdout).trim(),
        "OK",
        "add_key must work outside seccomp"
    );
    let v = format!("{}:/probe:ro", probe.display());
    let o = run(
        &env,
        &["-v", &v],
        BB,
        &["sh", "-c", "/probe add_key; /probe getpid"],
    );
    assert_eq!(o.stdout, "EPERM\nOK\n", "{}", o.stderr);
    // Mounting fails even for root in the container.
    let o = run(&env, &[], BB, &["mount", "-t", "tmpfs", "x", "/mnt"]);
    assert_ne!(o.code, 0);
}

/// A setuid-root program raises a non-root user's effective uid (Docker's default: no
/// no_new_privs, the filter installed before the user changes), and does not with
/// `--security-opt no-new-privileges`.
#[test]
fn setuid_and_no_new_privileges() {
    let Some(env) = setup() else { return };
    let script = "showeuid; grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status";
    let o = run(&env, &["-u", "app"], BB, &["sh", "-c", script]);
    assert_eq!(
        o.stdout, "uid=1000 euid=0\nNoNewPrivs:\t0\nSeccomp:\t2\n",
        "{}",
        o.stderr
    );
    for opt in [
        "no-new-privileges",
        "no-new-privileges=true",
        "no-new-privileges:true",
    ] {
        let o = run(
            &env,
            &["-u", "app", "--security-opt", opt],
            BB,
            &["sh", "-c", script],
        );
        assert_eq!(
            o.stdout, "uid=1000 euid=1000\nNoNewPrivs:\t1\nSeccomp:\t2\n",
            "{opt}: {}",
            o.stderr
        );
    }
    let o = run(
        &env,
        &["-u", "app", "--security-opt", "no-new-privileges=false"],
        BB,
        &["showeuid"],
    );
    assert_eq!(o.stdout, "uid=1000 euid=0\n", "{}", o.stderr);
}

/// This process's bounding set (what a privileged workload can get at most).
fn host_bounding_set() -> u64 {
    let st = std::fs::read_to_string("/proc/self/status").expect("status");
    st.lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .expect("CapBnd")
}

/// `--cap-add`, `--cap-drop`, `--privileged` and `--security-opt seccomp=...`: the workload's
/// capability and seccomp lines as Docker's documentation gives them, and what they allow.
#[test]
fn privilege_flags() {
    let Some(env) = setup() else { return };
    let status = "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status";
    let lines = |eff: &str, seccomp: u8| {
        format!("CapEff:\t{eff}\nCapBnd:\t{eff}\nNoNewPrivs:\t0\nSeccomp:\t{seccomp}\n")
    };
    // Docker's default set plus SYS_ADMIN, less NET_RAW; SYS_ADMIN also opens mount(2) in the
    // default seccomp profile, as in Docker's.
    let o = run(
        &env,
        &["--cap-add", "SYS_ADMIN", "--cap-drop", "net_raw"],
        BB,
        &[
            "sh",
            "-c",
            &format!("{status}; mkdir -p /tmp/m && mount -t tmpfs x /tmp/m && echo mounted"),
        ],
    );
    assert_eq!(
        o.stdout,
        lines("00000000a82405fb", 2) + "mounted\n",
        "{}",
        o.stderr
    );
    let o = run(
        &env,
        &["--cap-drop", "ALL", "--cap-add", "cap_chown"],
        BB,
        &["sh", "-c", status],
    );
    assert_eq!(o.stdout, lines("0000000000000001", 2), "{}", o.stderr);
    // --privileged: every capability (Docker: 000001ffffffffff on a kernel with 41, less what
    // rvmm itself lacks: root here has no CAP_SYS_RESOURCE), no filter, writable /sys, nothing
    // masked, the host's devices.
    let all = format!("{:016x}", 0x1ff_ffff_ffffu64 & host_bounding_set());
    let o = run(
        &env,
        &["--privileged"],
        BB,
        &[
            "sh",
            "-c",
            &format!(
                "{status}; grep -q '^sysfs /sys sysfs rw,' /proc/mounts && echo sys-rw; \
                 grep -q ' /proc/keys ' /proc/mounts || echo unmasked; test -c /dev/kmsg && echo kmsg; \
                 mkdir -p /tmp/m && mount -t tmpfs x /tmp/m && echo mounted"
            ),
        ],
    );
    assert_eq!(
        o.stdout,
        lines(&all, 0) + "sys-rw\nunmasked\nkmsg\nmounted\n",
        "{}",
        o.stderr
    );
    // A profile in Docker's format, and unconfined.
    let dir = tempfile::tempdir().expect("tmp");
    let profile = dir.path().join("profile.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":13}]}"#,
    )
    .expect("profile");
    let opt = format!("seccomp={}", profile.display());
    let o = run(
        &env,
        &["--security-opt", &opt],
        BB,
        &["sh", "-c", &format!("{status}; mkdir /tmp/d")],
    );
    assert_eq!(o.stdout, lines("00000000a80425fb", 2), "{}", o.stderr);
    assert!(o.stderr.contains("Permission denied"), "{}", o.stderr);
    let o = run(
        &env,
        &["--security-opt", "seccomp=unconfined"],
        BB,
        &["sh", "-c", status],
    );
    assert_eq!(o.stdout, lines("00000000a80425fb", 0), "{}", o.stderr);
    // Bad values: one line, 125, nothing created (RunEnv checks on drop).
    std::fs::write(dir.path().join("bad.json"), "{\"syscalls\": 3}").expect("bad");
    let bad_profile = format!("seccomp={}", dir.path().join("bad.json").display());
    for bad in [
        &["--cap-add", "NOT_A_CAP"][..],
        &["--cap-drop", "CAP_"],
        &["--security-opt", "bogus"],
        &["--security-opt", "apparmor=docker-default"],
        &["--security-opt", "seccomp=/nonexistent.json"],
        &["--security-opt", &bad_profile],
    ] {
        let o = run(&env, bad, BB, &["true"]);
        assert_eq!(o.code, 125, "{bad:?}: {}", o.stderr);
        assert_eq!(o.stderr.lines().count(), 1, "{bad:?}: {}", o.stderr);
        assert!(o.stderr.starts_with("rvmm: "), "{}", o.stderr);
    }
}

/// `--ulimit`, `--shm-size`, `--group-add`, `--add-host`, `--dns`, `--dns-search`, `--sysctl`,
/// seen from inside; and bad values refused with one line and 125.
#[test]
fn resource_and_name_flags() {
    let Some(env) = setup() else { return };
    let o = run(&env, RESOURCE_FLAGS, BB, &["sh", "-c", RESOURCE_SCRIPT]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout, RESOURCE_WANT, "{}", o.stderr);
    for bad in [
        &["--ulimit", "nosuch=1"][..],
        &["--ulimit", "nofile=10:5"],
        &["--shm-size", "lots"],
        &["--group-add", "nosuchgroup"],
        &["--add-host", "db.test"],
        &["--add-host", "db.test:300.1.1.1"],
        &["--add-host", "gw:host-gateway"],
        &["--dns", "resolver"],
        &["--dns-search", "bad domain"],
        &["--sysctl", "kernel.pid_max=100"],
        &["--sysctl", "noequals"],
    ] {
        let o = run(&env, bad, BB, &["true"]);
        assert_eq!(o.code, 125, "{bad:?}: {}", o.stderr);
        assert_eq!(o.stderr.lines().count(), 1, "{bad:?}: {}", o.stderr);
    }
    // A limit the kernel refuses (above fs.nr_open): one line naming it, 125.
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .expect("fs.nr_open")
        .trim()
        .parse()
        .expect("a number");
    let over = format!("nofile={0}:{0}", nr_open + 1);
    let o = run(&env, &["--ulimit", &over], BB, &["true"]);
    assert_eq!(o.code, 125, "{}", o.stderr);
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
    assert!(
        o.stderr.contains(&format!("--ulimit {over}")),
        "{}",
        o.stderr
    );
}

/// What RESOURCE_SCRIPT prints under RESOURCE_FLAGS: the limits, /dev/shm's size, root's groups
/// with staff (50) and the numbers, the extra hosts line, the resolv.conf made of the flags (the
/// host's options line aside), the two sysctls.
const RESOURCE_WANT: &str = "1024\n2048\n0\nsize=32768k\n0 10 50 4242\n10.1.2.3\tdb.test\n\
     search a.test b.test\nnameserver 10.9.9.9\n12345\n1\n";

/// Flags and a script; tests/vm_run.rs runs the same and compares with a container.
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

/// `--label`, `--stop-signal`, `--stop-timeout`, `--cidfile`, `--platform` and `--pull`: what
/// `ps --filter`, `inspect` and the cidfile show, the pull policy against a real registry, and
/// bad values refused with 125 before anything is created.
#[test]
fn run_metadata_flags() {
    let Some(env) = setup() else { return };
    let root = env.store.path();
    let dir = tempfile::tempdir().expect("tmp");
    let cid = dir.path().join("cid");
    let cid_s = cid.display().to_string();
    let o = rvmm(
        root,
        &[
            "run",
            "--isolation=container",
            "--network=none",
            "--name",
            "meta",
            "--label",
            "a=1",
            "-l",
            "b",
            "--stop-signal",
            "SIGUSR1",
            "--stop-timeout",
            "30",
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
    let id = std::fs::read_to_string(&cid).expect("cidfile");
    assert!(
        id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "{id:?}"
    );
    let ps = |f: &str| rvmm(root, &["ps", "-a", "-q", "--filter", f], None).stdout;
    assert_eq!(ps("label=a=1"), format!("{}\n", &id[..12]));
    assert_eq!(ps("label=b"), format!("{}\n", &id[..12]));
    // The image's own label is there too.
    assert_eq!(
        ps("label=org.rvmm.test=busybox"),
        format!("{}\n", &id[..12])
    );
    assert_eq!(ps("label=a=2"), "");
    let o = rvmm(root, &["inspect", "meta"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("inspect json");
    let c = &v[0]["Config"];
    assert_eq!(v[0]["Id"], id.as_str());
    assert_eq!(c["Labels"]["a"], "1");
    assert_eq!(c["Labels"]["b"], "");
    assert_eq!(c["Labels"]["org.rvmm.test"], "busybox");
    assert_eq!(c["StopSignal"], "SIGUSR1");
    assert_eq!(c["StopTimeout"], 30);
    assert_eq!(rvmm(root, &["rm", "meta"], None).code, 0);

    // Bad values: 125, one line, no run and no cidfile left.
    let cid2 = dir.path().join("cid2");
    let cid2_s = cid2.display().to_string();
    for bad in [
        &["--platform", "linux/arm64", "--cidfile", &cid2_s][..],
        &["--cidfile", &cid_s],
        &["--stop-signal", "SIGNOPE", "--cidfile", &cid2_s],
        &["--stop-timeout", "-5"],
        &["--label", "=x"],
        &["--pull", "sometimes"],
    ] {
        let o = run(&env, bad, BB, &["true"]);
        assert_eq!(o.code, 125, "{bad:?}: {}", o.stderr);
        assert!(o.stderr.lines().count() <= 3, "{bad:?}: {}", o.stderr);
        assert!(!cid2.exists(), "{bad:?}");
    }
    let o = run(&env, &["--pull", "never"], "localhost/nosuch", &["true"]);
    assert_eq!(o.code, 125, "{}", o.stderr);
    assert!(o.stderr.contains("--pull never"), "{}", o.stderr);

    // --pull against a real registry: missing pulls once, always goes back to it (and fails
    // once it is gone), never and missing then use the store.
    if !common::have_tools(&["docker-registry"]) {
        return;
    }
    let reg = common::images::Registry::start(None);
    let imgs = common::images::test_images();
    reg.push(
        &format!("oci:{}:latest", imgs.join("busybox").display()),
        "t/pulled:latest",
        &[],
        None,
    );
    let r = format!("{}/t/pulled:latest", reg.host());
    assert_eq!(run(&env, &["-q"], &r, &["true"]).code, 0);
    assert_eq!(
        run(&env, &["-q", "--pull", "always"], &r, &["true"]).code,
        0
    );
    drop(reg);
    let o = run(&env, &["-q", "--pull", "always"], &r, &["true"]);
    assert_eq!(
        o.code, 125,
        "--pull always must go to the registry: {}",
        o.stderr
    );
    assert_eq!(run(&env, &["-q", "--pull", "never"], &r, &["true"]).code, 0);
    assert_eq!(run(&env, &["-q"], &r, &["true"]).code, 0);
}

/// `--init`, `--cpuset-cpus`, `--cpu-shares`, `--memory-swap` and `--device`, seen from inside;
/// bad values refused with 125.
#[test]
fn init_cpu_and_device_flags() {
    let Some(env) = setup() else { return };
    // --init: the program is not PID 1; an orphan is reaped by the init; the affinity.
    let o = run(
        &env,
        &["--init", "--cpuset-cpus", "0"],
        BB,
        &["sh", "-c", INIT_SCRIPT],
    );
    assert_eq!(o.stdout, INIT_WANT, "{}", o.stderr);
    // --cpuset-cpus is the cgroup's cpuset (cpuset.mems inherited), as in Docker: the workload
    // reads it in its cgroup, and widening its own affinity (taskset) stays within it.
    let o = run(
        &env,
        &["--cpuset-cpus", "0"],
        BB,
        &[
            "sh",
            "-c",
            "cat /sys/fs/cgroup/cpuset/cpuset.cpus /sys/fs/cgroup/cpuset/cpuset.mems 2>/dev/null \
             || cat /sys/fs/cgroup/cpuset.cpus.effective /sys/fs/cgroup/cpuset.mems.effective; \
             taskset -p ffff $$ >/dev/null; grep Cpus_allowed_list /proc/self/status",
        ],
    );
    let mems = std::fs::read_to_string("/sys/fs/cgroup/cpuset/cpuset.effective_mems")
        .or_else(|_| std::fs::read_to_string("/sys/fs/cgroup/cpuset.mems.effective"))
        .expect("the host's cpuset.mems");
    assert_eq!(
        (o.code, o.stdout.as_str()),
        (0, format!("0\n{mems}Cpus_allowed_list:\t0\n").as_str()),
        "{}",
        o.stderr
    );
    // --init forwards a signal to the program, whose status comes back.
    let mut child = Command::new(common::rvmm_bin())
        .arg("--root")
        .arg(env.store.path())
        .args([
            "run",
            "--rm",
            "--isolation=container",
            "--network=none",
            "--init",
            BB,
        ])
        .args([
            "sh",
            "-c",
            "trap 'exit 7' TERM; echo ready; while :; do sleep 0.1; done",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rvmm");
    let mut out = child.stdout.take().expect("stdout");
    let mut seen = [0u8; 6];
    std::io::Read::read_exact(&mut out, &mut seen).expect("ready");
    assert_eq!(&seen, b"ready\n");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().expect("wait").code(), Some(7));
    // The cgroup files Docker writes for --cpu-shares and --memory-swap.
    let o = run(
        &env,
        &["--cpu-shares", "512", "--memory", "48m", "--memory-swap", "96m"],
        BB,
        &[
            "sh",
            "-c",
            "cat /sys/fs/cgroup/cpu/cpu.shares /sys/fs/cgroup/memory/memory.memsw.limit_in_bytes 2>/dev/null \
             || cat /sys/fs/cgroup/cpu.weight /sys/fs/cgroup/memory.swap.max",
        ],
    );
    assert!(
        o.stdout == "512\n100663296\n" || o.stdout == "20\n50331648\n",
        "{}{}",
        o.stdout,
        o.stderr
    );
    // --device: the node (not in Docker's default list); the devices cgroup lets it be opened
    // for reading and refuses writing without "w".
    let o = run(
        &env,
        &["--device", "/dev/loop-control:/dev/myloop:rm"],
        BB,
        &[
            "sh",
            "-c",
            "test -c /dev/myloop && : < /dev/myloop && echo can-read; (echo > /dev/myloop) 2>/dev/null || echo no-write",
        ],
    );
    assert_eq!(o.stdout, "can-read\nno-write\n", "{}", o.stderr);
    for bad in [
        &["--cpuset-cpus", "4096"][..],
        &["--cpuset-cpus", "a-b"],
        &["--cpuset-cpus", "0,"],
        &["--cpuset-cpus", ""],
        &["--cpu-shares", "1"],
        &["--memory-swap", "10m"],
        &["--memory", "20m", "--memory-swap", "10m"],
        &["--device", "/nonexistent"],
        &["--device", "/etc/passwd"],
        &["--device", "/dev/zero:relative"],
    ] {
        let o = run(&env, bad, BB, &["true"]);
        assert_eq!(o.code, 125, "{bad:?}: {}", o.stderr);
        assert_eq!(o.stderr.lines().count(), 1, "{bad:?}: {}", o.stderr);
    }
}

/// `-t --init`: the program leads its own process group, which is the terminal's foreground
/// group (tini's setpgid + tcsetpgrp), so Ctrl-C typed on the terminal reaches it (130 through
/// the init) and the init itself is out of the way.
#[test]
fn init_with_a_terminal() {
    let Some(env) = setup() else { return };
    let mut child = Command::new(common::rvmm_bin())
        .arg("--root")
        .arg(env.store.path())
        .args([
            "run",
            "--rm",
            "--isolation=container",
            "--network=none",
            "-i",
            "-t",
            "--init",
            BB,
        ])
        .args(["sh", "-c", TTY_INIT_SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rvmm");
    let mut out = child.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("ready") {
        let n = std::io::Read::read(&mut out, &mut buf).expect("read");
        assert!(n > 0, "{}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    // Ctrl-C, as a terminal sends it.
    let mut stdin = child.stdin.take().expect("stdin");
    std::io::Write::write_all(&mut stdin, b"\x03").expect("write ^C");
    std::io::Read::read_to_end(&mut out, &mut seen).expect("read");
    let status = child.wait().expect("wait");
    let seen = String::from_utf8_lossy(&seen);
    assert_eq!(status.code(), Some(130), "{seen}");
    assert!(seen.starts_with(TTY_INIT_WANT), "{seen:?}");
    assert!(!seen.contains("not-interrupted"), "{seen:?}");
}

/// The program's PID, process group and the terminal's foreground group (/proc/PID/stat fields
/// 1, 5 and 8) are one, and the init (PID 1) is not in it.
const TTY_INIT_SCRIPT: &str =
    "set -- $(cat /proc/$$/stat); test $1 = $5 && test $5 = $8 && echo foreground; \
     set -- $(cat /proc/1/stat); test $5 != $8 && echo init-in-background; \
     echo ready; sleep 10; echo not-interrupted";
const TTY_INIT_WANT: &str = "foreground\r\ninit-in-background\r\nready\r\n";

#[test]
fn cgroup_limits() {
    let Some(env) = setup() else { return };
    let o = run(
        &env,
        &["--memory", "32m"],
        BB,
        &["sh", "-c", "x=a; while true; do x=\"$x$x\"; done"],
    );
    assert_eq!(o.code, 137);
    assert!(o.stderr.contains("out of memory"), "{}", o.stderr);
    let o = run(
        &env,
        &["--pids-limit", "20"],
        BB,
        &["sh", "-c", "for i in $(seq 1 40); do sleep 3 & done; wait"],
    );
    assert!(
        o.stderr.contains("can't fork"),
        "the fork bomb was not stopped: {}",
        o.stderr
    );
    let o = run(&env, &["--cpus", "0.5"], BB, &["true"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    // The workload sees its own cgroup as the root of /sys/fs/cgroup (v1 or v2 alike), read-only,
    // with its limits where programs look for them.
    let o = run(
        &env,
        &["--memory", "48m"],
        BB,
        &[
            "sh",
            "-c",
            "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max; \
             grep -v ':/$' /proc/self/cgroup; mkdir /sys/fs/cgroup/x 2>/dev/null && echo writable; echo end",
        ],
    );
    assert_eq!(o.stdout, "50331648\nend\n", "{}", o.stderr);
}

#[test]
fn bridge_network_and_published_port() {
    let Some(env) = setup() else { return };
    let o = run(&env, &["--network=bridge"], BB, &["sh", "-c", "ip -4 addr show eth0 | grep -o 'inet [0-9.]*'; ping -c1 -W2 10.77.0.1 >/dev/null && echo gw-ok"]);
    assert!(
        o.stdout.contains("inet 10.77."),
        "{} {}",
        o.stdout,
        o.stderr
    );
    assert!(o.stdout.contains("gw-ok"), "{}", o.stdout);

    let port = common::images::free_port();
    let mut child = Command::new(common::rvmm_bin())
        .arg("--root")
        .arg(env.store.path())
        .args([
            "run",
            "--isolation=container",
            "--rm",
            "-p",
            &format!("{port}:8080"),
            BB,
            "httpd",
            "-f",
            "-p",
            "8080",
            "-h",
            "/var/www",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("rvmm");
    let mut body = String::new();
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            let _ = s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n");
            let _ = s.read_to_string(&mut body);
            if body.contains("hello from rvmm") {
                break;
            }
        }
    }
    assert!(
        body.contains("hello from rvmm"),
        "published port did not reach httpd: {body:?}"
    );
    // Ctrl-C equivalent: SIGINT forwarded, a second one kills (httpd as PID 1 may ignore it).
    for _ in 0..2 {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let st = child.wait().expect("wait");
    assert!(!st.success() || st.code() == Some(0));
}

#[test]
fn kill_9_of_rvmm_is_cleaned_up() {
    let Some(env) = setup() else { return };
    let mut child = Command::new(common::rvmm_bin())
        .arg("--root")
        .arg(env.store.path())
        .args(["run", "--rm", "--isolation=container", BB, "sleep", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("rvmm");
    // Wait for the workload to be up.
    let mut up = false;
    for _ in 0..100 {
        let o = rvmm(env.store.path(), &["ps", "-q"], None);
        if !o.stdout.trim().is_empty() {
            up = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(up, "the run never showed up in rvmm ps");
    // This run's cgroup: the new one (other runs on the host may have theirs). `ps` lists the
    // run as soon as its state is written, which is before its cgroup is made: wait for it.
    let mut workload_cg = None;
    for _ in 0..100 {
        workload_cg = ls(Path::new("/sys/fs/cgroup/pids/rvmm"))
            .into_iter()
            .find(|d| d.len() == 64 && !env.before.cgroups.contains(&format!("pids/{d}")));
        if workload_cg.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let workload_cg = workload_cg.expect("cgroup");
    child.kill().expect("kill -9");
    child.wait().expect("wait");
    // The workload dies with rvmm (PDEATHSIG); gc removes the rest.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let procs = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/pids/rvmm/{workload_cg}/cgroup.procs"
    ))
    .unwrap_or_default();
    assert!(
        procs.trim().is_empty(),
        "the workload survived rvmm: {procs}"
    );
    let o = rvmm(env.store.path(), &["gc"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("1 dead run"), "{}", o.stdout);
}

#[test]
fn without_rm_the_run_is_kept_until_rvmm_rm() {
    let Some(env) = setup() else { return };
    let o = rvmm(
        env.store.path(),
        &[
            "run",
            "--isolation=container",
            "--network=none",
            "--name",
            "keeper",
            BB,
            "sh",
            "-c",
            "echo kept > /file; exit 3",
        ],
        None,
    );
    assert_eq!(o.code, 3);
    let ps = rvmm(env.store.path(), &["ps", "-a"], None);
    assert!(
        ps.stdout.contains("keeper") && ps.stdout.contains("Exited (3)"),
        "{}",
        ps.stdout
    );
    assert!(!rvmm(env.store.path(), &["ps"], None)
        .stdout
        .contains("keeper"));
    let o = rvmm(env.store.path(), &["rm", "keeper"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(!rvmm(env.store.path(), &["ps", "-a"], None)
        .stdout
        .contains("keeper"));
}

/// A workload that outlives the command: `run -d` prints the ID once it runs, `ps` and `inspect`
/// show it, `logs` splits stdout and stderr, `stop` sends the stop signal (the workload's trap
/// runs), `wait` prints the status; `kill` ends another with 137; `rm -f` removes a running one;
/// a detached run that cannot start fails like an attached one (127, the same line, no ID).
#[test]
fn detached_runs_logs_stop_kill_wait_inspect() {
    let Some(env) = setup() else { return };
    let root = env.store.path();
    let _cleanup = common::run::RemoveRuns {
        root,
        names: &["bg", "k", "f"],
    };
    let script = "echo out; echo err >&2; trap 'echo term; exit 3' TERM; while :; do sleep 1; done";
    let o = rvmm(
        root,
        &[
            "run",
            "-d",
            "--isolation=container",
            "--network=none",
            "--name",
            "bg",
            BB,
            "sh",
            "-c",
            script,
        ],
        None,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let id = o.stdout.trim().to_string();
    assert!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id:?}"
    );
    let ps = rvmm(root, &["ps"], None);
    assert!(
        ps.stdout.contains("bg") && ps.stdout.contains("Up "),
        "{}",
        ps.stdout
    );
    // The workload wrote its lines right away; the log has them, stream by stream.
    let mut logs = rvmm(root, &["logs", "bg"], None);
    for _ in 0..100 {
        if logs.stdout.contains("out") && logs.stderr.contains("err") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        logs = rvmm(root, &["logs", "bg"], None);
    }
    assert_eq!(
        (logs.stdout.as_str(), logs.stderr.as_str()),
        ("out\n", "err\n")
    );
    let t = rvmm(root, &["logs", "-t", "--tail", "2", &id[..12]], None);
    assert!(
        t.stdout.ends_with("Z out\n") && t.stderr.ends_with("Z err\n"),
        "{:?}",
        t.stderr
    );
    let i = rvmm(root, &["inspect", "bg"], None);
    assert_eq!(i.code, 0, "{}", i.stderr);
    let v: serde_json::Value = serde_json::from_str(&i.stdout).expect("inspect json");
    assert_eq!(v[0]["Id"], id.as_str());
    assert_eq!(v[0]["Isolation"], "container");
    assert_eq!(v[0]["State"]["Running"], true);
    assert_eq!(v[0]["Config"]["argv"][0], "sh");
    assert!(v[0]["State"]["StartedAt"]
        .as_str()
        .expect("StartedAt")
        .ends_with('Z'));

    // exec: a process in the workload's namespaces, with its privileges and the given user.
    let e = rvmm(
        root,
        &["exec", "-u", "app", "-e", "X=1", "-w", "/tmp", "bg", "sh", "-c",
          "id -u; echo $X; pwd; hostname; tr '\\0' ' ' </proc/1/cmdline; echo; grep -E '^(CapEff|NoNewPrivs):' /proc/self/status"],
        None,
    );
    assert_eq!(e.code, 0, "{}", e.stderr);
    let host = rvmm(root, &["exec", "bg", "hostname"], None).stdout;
    assert_eq!(
        e.stdout,
        format!(
            "1000\n1\n/tmp\n{host}sh -c {script} \nCapEff:\t0000000000000000\nNoNewPrivs:\t0\n"
        )
    );
    let e = rvmm(root, &["exec", "bg", "nonexistent"], None);
    assert_eq!(e.code, 127, "{}", e.stderr);
    assert!(
        e.stderr.contains("executable file not found"),
        "{}",
        e.stderr
    );
    let e = rvmm(root, &["exec", "-i", "bg", "cat"], Some("through exec\n"));
    assert_eq!(
        (e.code, e.stdout.as_str()),
        (0, "through exec\n"),
        "{}",
        e.stderr
    );

    let s = rvmm(root, &["stop", "-t", "20", "bg"], None);
    assert_eq!((s.code, s.stdout.as_str()), (0, "bg\n"), "{}", s.stderr);
    let w = rvmm(root, &["wait", "bg"], None);
    assert_eq!((w.code, w.stdout.as_str()), (0, "3\n"), "{}", w.stderr);
    let logs = rvmm(root, &["logs", "bg"], None);
    assert_eq!(logs.stdout, "out\nterm\n");
    let i = rvmm(root, &["inspect", "bg"], None);
    let v: serde_json::Value = serde_json::from_str(&i.stdout).expect("inspect json");
    assert_eq!(v[0]["State"]["ExitCode"], 3);
    assert!(rvmm(root, &["rm", "bg"], None).code == 0);

    // kill: SIGKILL by default, 137.
    let o = rvmm(
        root,
        &[
            "run",
            "-d",
            "--isolation=container",
            "--network=none",
            "--name",
            "k",
            BB,
            "sleep",
            "600",
        ],
        None,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(rvmm(root, &["kill", "k"], None).code, 0);
    let w = rvmm(root, &["wait", "k"], None);
    assert_eq!(w.stdout, "137\n", "{}", w.stderr);
    let bad = rvmm(root, &["kill", "-s", "ALRM", "k"], None);
    assert_ne!(bad.code, 0);
    assert_eq!(bad.stderr.lines().count(), 1, "{}", bad.stderr);
    assert_eq!(rvmm(root, &["rm", "k"], None).code, 0);

    // rm -f of a running run; --rm with -d removes the run when it ends.
    let o = rvmm(
        root,
        &[
            "run",
            "-d",
            "--rm",
            "--isolation=container",
            "--network=none",
            "--name",
            "f",
            BB,
            "sleep",
            "600",
        ],
        None,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let r = rvmm(root, &["rm", "f"], None);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("running"), "{}", r.stderr);
    assert_eq!(rvmm(root, &["rm", "-f", "f"], None).code, 0);
    assert!(rvmm(root, &["ps", "-aq"], None).stdout.trim().is_empty());

    // A run that cannot start: the same status and line as attached, no ID.
    let a = rvmm(
        root,
        &[
            "run",
            "--rm",
            "--isolation=container",
            "--network=none",
            BB,
            "nonexistent",
        ],
        None,
    );
    let d = rvmm(
        root,
        &[
            "run",
            "-d",
            "--rm",
            "--isolation=container",
            "--network=none",
            BB,
            "nonexistent",
        ],
        None,
    );
    assert_eq!(a.code, 127);
    assert_eq!(
        (d.code, d.stdout.as_str(), d.stderr.as_str()),
        (a.code, "", a.stderr.as_str())
    );
}

/// `rvmm run -d` stops reading the run's stderr once the workload runs: what rvmm says after
/// that (here its `RVMM_TIMINGS` line, written as the run is handed to rvmm-shim) goes to the
/// run's log, and the run goes on. (Under load, such a write into the abandoned pipe used to end
/// the run before its output reached the log.)
#[test]
fn a_detached_container_says_the_rest_into_its_log() {
    let Some(env) = setup() else { return };
    let root = env.store.path();
    let _cleanup = common::run::RemoveRuns {
        root,
        names: &["said"],
    };
    let o = Command::new(common::rvmm_bin())
        .arg("--root")
        .arg(root)
        .args([
            "run",
            "-d",
            "--isolation=container",
            "--network=none",
            "--name",
            "said",
        ])
        .args([BB, "sh", "-c", "echo ready; sleep 1; echo done"])
        .env("RVMM_TIMINGS", "1")
        .stdin(Stdio::null())
        .output()
        .expect("rvmm run -d");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("rvmm-timings"), "said to run -d: {err}");
    let w = rvmm(root, &["wait", "said"], None);
    assert_eq!((w.code, w.stdout.as_str()), (0, "0\n"), "{}", w.stderr);
    let logs = rvmm(root, &["logs", "said"], None);
    assert_eq!(logs.stdout, "ready\ndone\n", "{}", logs.stderr);
    assert!(
        logs.stderr.starts_with("rvmm-timings isolation=container ")
            && logs.stderr.contains(" handover_ms="),
        "{}",
        logs.stderr
    );
}

/// A detached busybox httpd on `-p 127.0.0.1:PORT:80`: `logs -f` while a request is made, `exec`
/// reading and writing the server's files (exit 3), `exec -t`, two execs at once, `kill -s
/// USR1` to a trap, `inspect`, and `stop -t 2` of a workload that ignores SIGTERM (`wait`: 137).
/// The checks are tests/common/lifecycle.rs's, the same as for a VM.
#[test]
fn detached_httpd_logs_follow_exec_usr1_and_stop_after_grace() {
    let Some(env) = setup() else { return };
    common::lifecycle::detached_httpd(env.store.path(), "container");
}

/// `setsid sh -c 'rvmm run -d ...'`: the run outlives the shell and its session; then SIGKILL
/// to its supervisor takes the run with it and `rvmm gc` leaves nothing behind (no process,
/// mount, cgroup, veth, lease or run directory).
#[test]
fn detached_run_survives_its_shell_and_gc_cleans_after_a_killed_supervisor() {
    let Some(env) = setup() else { return };
    common::lifecycle::survives_its_shell_then_gc_after_a_killed_supervisor(
        env.store.path(),
        "container",
    );
}

/// The Debian minbase userland detached: `logs -f`, `exec -u` (exit 3), `exec -t`, `exec -i`,
/// `kill -s SIGUSR1`, and `rm -f` of the running run.
#[test]
fn detached_debian_exec_logs_and_rm_f() {
    let Some(env) = setup() else { return };
    if !common::have_tools(&["debootstrap"]) {
        return;
    }
    common::lifecycle::debian_exec_logs_and_rm_f(env.store.path(), "container");
}

/// Once its workload has run a moment, an attached container run is kept by `rvmm-shim` in the
/// same process (not by the big rvmm binary, which is no longer mapped): signals still reach the
/// workload, an out-of-memory kill is still named, and the run still ends clean (`--rm`).
#[test]
fn a_running_container_is_kept_by_rvmm_shim_alone() {
    let Some(env) = setup() else { return };
    let start = |extra: &[&str], script: &str| {
        Command::new(common::rvmm_bin())
            .arg("--root")
            .arg(env.store.path())
            .args(["run", "--rm", "--isolation=container", "--network=none"])
            .args(extra)
            .args([BB, "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("rvmm")
    };
    let kept_by_shim = |pid: u32| {
        let shim = std::fs::read_link(format!("/proc/{pid}/exe"))
            .is_ok_and(|e| e.to_string_lossy().ends_with("/rvmm-shim"));
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        shim && !maps.lines().any(|l| l.ends_with("/rvmm"))
    };
    let mut child = start(
        &[],
        "trap 'exit 9' TERM; echo ready; while :; do sleep 0.1; done",
    );
    let mut out = child.stdout.take().expect("stdout");
    let mut seen = [0u8; 6];
    std::io::Read::read_exact(&mut out, &mut seen).expect("ready");
    assert!(
        common::lifecycle::wait_until(std::time::Duration::from_secs(5), || kept_by_shim(
            child.id()
        )),
        "the run is not kept by rvmm-shim: {:?}",
        std::fs::read_link(format!("/proc/{}/exe", child.id()))
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let o = child.wait_with_output().expect("wait");
    assert_eq!(
        o.status.code(),
        Some(9),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The kernel's OOM killer, after the handover: rvmm __finish names it.
    let child = start(
        &["--memory", "16m", "--memory-swap", "16m"],
        "sleep 0.5; x=$(head -c 64m /dev/zero | tr '\\0' a); echo survived",
    );
    let o = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(137), "{err}");
    assert!(err.contains("killed by the kernel's OOM killer"), "{err}");
    let ps = rvmm(env.store.path(), &["ps", "-aq"], None);
    assert!(ps.stdout.trim().is_empty(), "--rm left {}", ps.stdout);
    // A shim from another build refuses in one line.
    let o = Command::new(env!("CARGO_BIN_EXE_rvmm-shim"))
        .args(["0123456789abcdef", "wait", "dir=/", "pid=1"])
        .output()
        .expect("rvmm-shim");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("rvmm-shim: this binary is from another build"),
        "{err}"
    );
}

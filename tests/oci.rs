//! rvmm-oci, the OCI runtime command line, driven by hand as an engine drives it: bundles
//! unpacked by umoci from the test images, then create/start/state/exec/ps/pause/kill/delete and
//! run, config.json's process, root, mounts, hooks and linux sections, and bad input (one line,
//! exit 1, nothing left). tests/engines.rs drives it through podman.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{have_root, have_tools};
use serde_json::{json, Value};

pub fn oci_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rvmm-oci"))
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs rvmm-oci with its output in files, not pipes: a container's processes inherit them (as
/// they inherit conmon's), and would hold a pipe open long after rvmm-oci exits.
fn oci(root: &Path, args: &[&str]) -> Out {
    let out = tempfile::tempfile().unwrap();
    let err = tempfile::tempfile().unwrap();
    let st = Command::new(oci_bin())
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .status()
        .expect("run rvmm-oci");
    let read = |mut f: std::fs::File| {
        use std::io::{Read, Seek};
        let mut s = String::new();
        f.rewind().unwrap();
        f.read_to_string(&mut s).unwrap();
        s
    };
    Out {
        code: st.code().unwrap_or(-1),
        stdout: read(out),
        stderr: read(err),
    }
}

/// Runs rvmm-oci with stdout and stderr in the file `out` (made anew), which the container's
/// processes may go on writing to after rvmm-oci exits (a VM's supervisor, as under conmon);
/// returns its exit code.
fn oci_into(root: &Path, args: &[&str], out: &Path) -> Option<i32> {
    let f = std::fs::File::create(out).unwrap();
    Command::new(oci_bin())
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .status()
        .expect("run rvmm-oci")
        .code()
}

/// A bundle of the busybox test image (umoci unpack), its config.json changed by `edit`.
fn bundle(dir: &Path, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let imgs = common::images::test_images();
    let b = dir.join("bundle");
    let st = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", imgs.join("busybox").display()))
        .arg(&b)
        .stdout(Stdio::null())
        .status()
        .expect("run umoci");
    assert!(st.success(), "umoci unpack failed");
    let p = b.join("config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    cfg["process"]["terminal"] = json!(false);
    edit(&mut cfg);
    std::fs::write(&p, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    b
}

fn ready() -> bool {
    have_root() && have_tools(&["umoci"])
}

/// The cgroup directories of container `id` in every v1 hierarchy and the unified one.
fn cgroups_of(id: &str) -> Vec<String> {
    let mut v = Vec::new();
    for d in common::run::ls(Path::new("/sys/fs/cgroup")) {
        let p = Path::new("/sys/fs/cgroup")
            .join(&d)
            .join("rvmm")
            .join(format!("oci-{id}"));
        if p.exists() {
            v.push(p.display().to_string());
        }
    }
    v
}

fn state(root: &Path, id: &str) -> Value {
    let o = oci(root, &["state", id]);
    assert_eq!(o.code, 0, "state: {}", o.stderr);
    serde_json::from_str(&o.stdout).unwrap()
}

/// create → state created → start → running → exec (waited, detached) → ps → pause/resume →
/// kill → stopped → delete: nothing of the container is left.
#[test]
fn create_start_exec_kill_delete() {
    if !ready() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("state");
    let b = bundle(t.path(), |c| {
        c["process"]["args"] = json!(["sh", "-c", "echo started > /tmp/started; exec sleep 1000"]);
        c["hostname"] = json!("ocitest");
    });
    let pidf = t.path().join("init.pid");
    let o = oci(
        &root,
        &[
            "create",
            "--bundle",
            b.to_str().unwrap(),
            "--pid-file",
            pidf.to_str().unwrap(),
            "c1",
        ],
    );
    assert_eq!(o.code, 0, "create: {}", o.stderr);
    let pid: i32 = std::fs::read_to_string(&pidf)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let s = state(&root, "c1");
    assert_eq!(s["status"], "created");
    assert_eq!(s["pid"], pid);
    assert_eq!(s["bundle"], b.canonicalize().unwrap().to_str().unwrap());
    assert_eq!(s["ociVersion"], "1.2.0");
    // The init waits: the workload has not run.
    assert!(!b.join("rootfs/tmp/started").exists());
    let o = oci(&root, &["create", "--bundle", b.to_str().unwrap(), "c1"]);
    assert_eq!(
        (o.code, o.stderr.trim()),
        (1, "rvmm-oci: container c1 already exists")
    );

    let o = oci(&root, &["start", "c1"]);
    assert_eq!(o.code, 0, "start: {}", o.stderr);
    assert!(common::lifecycle::wait_until(
        Duration::from_secs(10),
        || { b.join("rootfs/tmp/started").exists() }
    ));
    assert_eq!(state(&root, "c1")["status"], "running");
    let o = oci(&root, &["start", "c1"]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("only a created container can be started"),
        "{}",
        o.stderr
    );

    // exec: the container's namespaces, cgroup and process, the flags' changes, its status.
    let o = oci(
        &root,
        &[
            "exec", "--env", "X=1", "--cwd", "/tmp", "c1", "sh", "-c",
            "hostname; echo $X; pwd; cat started; id -u; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; exit 5",
        ],
    );
    assert_eq!(o.code, 5, "{}", o.stderr);
    // umoci's capabilities: CAP_AUDIT_WRITE, CAP_KILL, CAP_NET_BIND_SERVICE.
    assert_eq!(
        o.stdout,
        "ocitest\n1\n/tmp\nstarted\n0\nCapEff:\t0000000020000420\nNoNewPrivs:\t1\n"
    );
    let o = oci(&root, &["exec", "--user", "1000:1000", "c1", "id", "-u"]);
    assert_eq!((o.code, o.stdout.as_str()), (0, "1000\n"), "{}", o.stderr);
    let o = oci(&root, &["exec", "c1", "no-such-program"]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("executable file not found"),
        "{}",
        o.stderr
    );
    // A process document, as conmon and the runc shim pass it.
    let pf = t.path().join("process.json");
    let proc = json!({"args": ["sleep", "900"], "cwd": "/", "env": ["PATH=/bin"],
                      "user": {"uid": 0, "gid": 0}});
    std::fs::write(&pf, proc.to_string()).unwrap();
    let epid = t.path().join("exec.pid");
    let o = oci(
        &root,
        &[
            "exec",
            "--process",
            pf.to_str().unwrap(),
            "--detach",
            "--pid-file",
            epid.to_str().unwrap(),
            "c1",
        ],
    );
    assert_eq!(o.code, 0, "exec -d: {}", o.stderr);
    let exec_pid: i32 = std::fs::read_to_string(&epid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Ambient capabilities: a non-root process keeps what the spec raises there across exec.
    let amb = t.path().join("ambient.json");
    let caps = json!(["CAP_NET_BIND_SERVICE", "CAP_KILL"]);
    let doc = json!({"args": ["sh", "-c", "grep -E '^Cap(Eff|Amb)' /proc/self/status"],
        "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 1000, "gid": 1000},
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps,
            "inheritable": ["CAP_NET_BIND_SERVICE"], "ambient": ["CAP_NET_BIND_SERVICE"]}});
    std::fs::write(&amb, doc.to_string()).unwrap();
    let o = oci(&root, &["exec", "--process", amb.to_str().unwrap(), "c1"]);
    assert_eq!(
        (o.code, o.stdout.as_str()),
        (0, "CapEff:\t0000000000000400\nCapAmb:\t0000000000000400\n"),
        "{}",
        o.stderr
    );
    let o = oci(&root, &["ps", "--format", "json", "c1"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let pids: Vec<i32> = serde_json::from_str(&o.stdout).unwrap();
    assert!(
        pids.contains(&pid) && pids.contains(&exec_pid),
        "{pids:?} {pid} {exec_pid}"
    );

    let o = oci(&root, &["pause", "c1"]);
    assert_eq!(o.code, 0, "pause: {}", o.stderr);
    assert_eq!(state(&root, "c1")["status"], "paused");
    let o = oci(&root, &["resume", "c1"]);
    assert_eq!(o.code, 0, "resume: {}", o.stderr);
    assert_eq!(state(&root, "c1")["status"], "running");

    let o = oci(&root, &["delete", "c1"]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("is running"), "{}", o.stderr);
    let o = oci(&root, &["kill", "--all", "c1", "KILL"]);
    assert_eq!(o.code, 0, "kill: {}", o.stderr);
    // We are not the init's parent here (an engine's subreaper would be): it stays a zombie
    // until the harness reaps it, which counts as stopped.
    assert!(common::lifecycle::wait_until(
        Duration::from_secs(10),
        || { state(&root, "c1")["status"] == "stopped" }
    ));
    let o = oci(&root, &["kill", "c1", "TERM"]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("stopped"), "{}", o.stderr);
    let o = oci(&root, &["delete", "c1"]);
    assert_eq!(o.code, 0, "delete: {}", o.stderr);
    let o = oci(&root, &["state", "c1"]);
    assert_eq!(
        (o.code, o.stderr.trim()),
        (1, "rvmm-oci: container c1 does not exist")
    );
    assert_eq!(common::run::ls(&root), Vec::<String>::new());
    assert_eq!(cgroups_of("c1"), Vec::<String>::new());
}

/// `run`: config.json's process, root, mounts, hooks and linux sections reach the workload, the
/// exit status is the workload's, and everything goes with it.
#[test]
fn run_applies_the_bundle_config() {
    if !ready() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("state");
    let hooks_out = t.path().join("hooks");
    std::fs::create_dir(&hooks_out).unwrap();
    let shared = t.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("data"), "from the host\n").unwrap();
    let hook = |name: &str| {
        json!({"path": "/bin/sh", "args": ["sh", "-c",
            format!("cat > {}/{name}", hooks_out.display())]})
    };
    let script = "id; pwd; echo $GREETING; hostname; ulimit -n; \
         grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; \
         touch /x 2>/dev/null || echo root ro; cat /mnt/shared/data; \
         touch /mnt/shared/new 2>/dev/null || echo bind ro; \
         wc -c < /etc/motd; cat /proc/sys/net/ipv4/ip_forward; \
         cat /sys/fs/cgroup/memory$(grep :memory: /proc/self/cgroup | cut -d: -f3)/memory.limit_in_bytes; \
         exit 3";
    let b = bundle(t.path(), |c| {
        let p = &mut c["process"];
        p["args"] = json!(["sh", "-c", script]);
        p["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [50]});
        p["cwd"] = json!("/home");
        p["env"] = json!(["PATH=/bin:/usr/bin", "GREETING=hello"]);
        p["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 512, "soft": 256}]);
        p["noNewPrivileges"] = json!(true);
        p["capabilities"] = json!({"bounding": ["CAP_KILL", "CAP_CHOWN"],
            "effective": ["CAP_KILL", "CAP_CHOWN"], "permitted": ["CAP_KILL", "CAP_CHOWN"]});
        c["root"]["readonly"] = json!(true);
        c["hostname"] = json!("bundled");
        c["mounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"destination": "/mnt/shared",
            "type": "bind", "source": shared, "options": ["rbind", "ro"]}));
        c["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1"});
        c["linux"]["maskedPaths"]
            .as_array_mut()
            .unwrap()
            .push(json!("/etc/motd"));
        c["linux"]["resources"]["memory"] = json!({"limit": 64 * 1024 * 1024});
        c["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mknod"], "action": "SCMP_ACT_ERRNO"}]});
        c["hooks"] = json!({"createRuntime": [hook("createRuntime")],
            "poststop": [hook("poststop")]});
    });
    let o = oci(&root, &["run", "--bundle", b.to_str().unwrap(), "r1"]);
    assert_eq!(o.code, 3, "{}", o.stderr);
    // The effective set is empty: uid 1000 without ambient capabilities.
    assert_eq!(
        o.stdout,
        "uid=1000(app) gid=1000(app) groups=50(staff),1000(app)\n/home\nhello\nbundled\n256\n\
         CapEff:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\nroot ro\nfrom the host\n\
         bind ro\n0\n1\n67108864\n",
        "{}",
        o.stderr
    );
    let cr: Value =
        serde_json::from_slice(&std::fs::read(hooks_out.join("createRuntime")).unwrap()).unwrap();
    assert_eq!(
        (cr["id"].as_str(), cr["status"].as_str()),
        (Some("r1"), Some("creating"))
    );
    assert!(cr["pid"].as_i64().unwrap() > 0);
    let ps: Value =
        serde_json::from_slice(&std::fs::read(hooks_out.join("poststop")).unwrap()).unwrap();
    assert_eq!(ps["status"], "stopped");
    assert_eq!(common::run::ls(&root), Vec::<String>::new());
    assert_eq!(cgroups_of("r1"), Vec::<String>::new());
}

/// Bad bundles, ids and commands: one line on stderr (and a JSON line in --log), exit 1, and
/// nothing created.
#[test]
fn bad_input_is_one_line_and_leaves_nothing() {
    if !ready() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("state");
    let good = bundle(t.path(), |c| c["process"]["args"] = json!(["true"]));
    let bad = |name: &str, edit: &dyn Fn(&Path)| {
        let d = t.path().join(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::copy(good.join("config.json"), d.join("config.json")).unwrap();
        std::os::unix::fs::symlink(good.join("rootfs"), d.join("rootfs")).unwrap();
        edit(&d);
        d
    };
    let edit_cfg = |d: &Path, f: &dyn Fn(&mut Value)| {
        let p = d.join("config.json");
        let mut c: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        f(&mut c);
        std::fs::write(&p, c.to_string()).unwrap();
    };
    let mut cases: Vec<(PathBuf, &str)> = vec![
        (
            bad("no-config", &|d| {
                std::fs::remove_file(d.join("config.json")).unwrap()
            }),
            "config.json",
        ),
        (
            bad("not-json", &|d| {
                std::fs::write(d.join("config.json"), "{ not json").unwrap()
            }),
            "config.json",
        ),
        (
            bad("no-rootfs", &|d| {
                std::fs::remove_file(d.join("rootfs")).unwrap()
            }),
            "rootfs",
        ),
        (
            bad("no-args", &|d| {
                edit_cfg(d, &|c| c["process"]["args"] = json!([]))
            }),
            "args",
        ),
        (
            bad("bad-ns", &|d| {
                edit_cfg(d, &|c| {
                    c["linux"]["namespaces"] = json!([{"type": "time"}, {"type": "mount"}])
                })
            }),
            "time",
        ),
        (
            bad("no-mountns", &|d| {
                edit_cfg(d, &|c| c["linux"]["namespaces"] = json!([{"type": "pid"}]))
            }),
            "mount namespace",
        ),
        (
            bad("no-program", &|d| {
                edit_cfg(d, &|c| c["process"]["args"] = json!(["/no/such/program"]))
            }),
            "/no/such/program",
        ),
        (
            bad("terminal", &|d| {
                edit_cfg(d, &|c| c["process"]["terminal"] = json!(true))
            }),
            "--console-socket",
        ),
        (
            bad("bad-mount", &|d| {
                edit_cfg(d, &|c| {
                    c["mounts"].as_array_mut().unwrap().push(json!({"destination": "/x", "type": "bind", "source": "/no/such/dir", "options": ["bind"]}))
                })
            }),
            "/no/such/dir",
        ),
        (
            bad("bad-hook", &|d| {
                edit_cfg(d, &|c| {
                    c["hooks"] = json!({"createRuntime": [{"path": "/bin/false"}]})
                })
            }),
            "/bin/false",
        ),
    ];
    cases.push((
        bad("bad-isolation", &|d| {
            edit_cfg(d, &|c| {
                c["annotations"]["io.rvmm.isolation"] = json!("sandbox")
            })
        }),
        "isolation \"sandbox\"",
    ));
    // What a guest cannot have is refused before any VM exists.
    cases.push((
        bad("vm-nfs", &|d| {
            edit_cfg(d, &|c| {
                c["annotations"]["io.rvmm.isolation"] = json!("vm");
                c["mounts"].as_array_mut().unwrap().push(
                    json!({"destination": "/n", "type": "nfs", "source": "h:/n", "options": []}),
                );
            })
        }),
        "not available in VM isolation",
    ));
    cases.push((
        bad("vm-hook", &|d| {
            edit_cfg(d, &|c| {
                c["annotations"]["io.rvmm.isolation"] = json!("vm");
                c["hooks"] = json!({"createContainer": [{"path": "/bin/true"}]});
            })
        }),
        "cannot run in VM isolation",
    ));
    let log = t.path().join("log.json");
    for (i, (b, what)) in cases.iter().enumerate() {
        let id = format!("bad{i}");
        let o = oci(
            &root,
            &[
                "--log",
                log.to_str().unwrap(),
                "--log-format",
                "json",
                "create",
                "--bundle",
                b.to_str().unwrap(),
                &id,
            ],
        );
        let err = o.stderr;
        assert_eq!(o.code, 1, "{}: {err}", b.display());
        assert_eq!(err.lines().count(), 1, "{}: {err}", b.display());
        assert!(
            err.starts_with("rvmm-oci: ") && err.contains(what),
            "{}: {err}",
            b.display()
        );
        assert_eq!(
            common::run::ls(&root),
            Vec::<String>::new(),
            "{}",
            b.display()
        );
        assert_eq!(cgroups_of(&id), Vec::<String>::new(), "{}", b.display());
    }
    let lines = std::fs::read_to_string(&log).unwrap();
    assert_eq!(lines.lines().count(), cases.len());
    for l in lines.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["level"], "error", "{l}");
        assert!(
            v["msg"].as_str().is_some_and(|m| !m.is_empty()) && v["time"].is_string(),
            "{l}"
        );
    }
    for (args, what) in [
        (vec!["state", "../x"], "not valid"),
        (vec!["start", "nope"], "does not exist"),
        (vec!["kill", "nope"], "does not exist"),
        (vec!["delete", "nope"], "does not exist"),
        (vec!["exec", "nope", "true"], "does not exist"),
        (vec!["kill", "nope", "SIGNOPE"], "unknown signal"),
    ] {
        let o = oci(&root, &args);
        assert_eq!(o.code, 1, "{args:?}");
        assert_eq!(o.stderr.lines().count(), 1, "{args:?}: {}", o.stderr);
        assert!(o.stderr.contains(what), "{args:?}: {}", o.stderr);
    }
    // The flag is checked as the annotation is.
    let o = oci(
        &root,
        &[
            "--isolation",
            "bogus",
            "create",
            "--bundle",
            good.to_str().unwrap(),
            "flagged",
        ],
    );
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("isolation \"bogus\""), "{}", o.stderr);
    assert_eq!(common::run::ls(&root), Vec::<String>::new());
    // delete --force of what does not exist is not an error (engines clean up that way).
    assert_eq!(oci(&root, &["delete", "--force", "nope"]).code, 0);
    // Nor of a directory without a state (a create killed before it wrote one): it goes,
    // and so does the lock file the delete took.
    std::fs::create_dir_all(root.join("leftover")).unwrap();
    let o = oci(&root, &["delete", "--force", "leftover"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(common::run::ls(&root), Vec::<String>::new());
}

/// `features` is the runtime spec's document; `--version` names the spec.
#[test]
fn features_and_version() {
    let o = Command::new(oci_bin()).arg("features").output().unwrap();
    assert!(o.status.success());
    let f: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(f["ociVersionMin"], "1.0.0");
    let hooks: Vec<&str> = f["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for h in [
        "prestart",
        "createRuntime",
        "createContainer",
        "startContainer",
        "poststart",
        "poststop",
    ] {
        assert!(hooks.contains(&h), "{hooks:?}");
    }
    let ns: Vec<&str> = f["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        ns.contains(&"pid") && ns.contains(&"mount") && !ns.contains(&"user"),
        "{ns:?}"
    );
    let o = Command::new(oci_bin()).arg("--version").output().unwrap();
    let v = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && v.contains("spec: 1.2.0"), "{v}");
}

/// `create` killed with SIGKILL while a createRuntime hook runs: the container is there,
/// stopped; its init and the hook go; `delete` removes the rest (state, cgroup).
#[test]
fn a_killed_create_leaves_a_stopped_container_that_delete_removes() {
    if !ready() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("state");
    let marker = t.path().join("hook.pid");
    let b = bundle(t.path(), |c| {
        c["process"]["args"] = json!(["true"]);
        c["hooks"] = json!({"createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c",
            format!("echo $$ > {0}.tmp; mv {0}.tmp {0}; exec sleep 60", marker.display())]}]});
    });
    let mut create = Command::new(oci_bin())
        .arg("--root")
        .arg(&root)
        .args(["create", "--bundle", b.to_str().unwrap(), "k1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(common::lifecycle::wait_until(
        Duration::from_secs(20),
        || marker.exists()
    ));
    let hook: i32 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    create.kill().unwrap();
    create.wait().unwrap();
    assert!(
        common::lifecycle::wait_until(Duration::from_secs(10), || {
            !Path::new(&format!("/proc/{hook}")).exists()
                || std::fs::read_to_string(format!("/proc/{hook}/stat"))
                    .is_ok_and(|s| s.contains(") Z"))
        }),
        "the hook outlived create"
    );
    assert_eq!(state(&root, "k1")["status"], "stopped");
    // The init read EOF on its sync pipe and left; the cgroup empties.
    assert!(common::lifecycle::wait_until(
        Duration::from_secs(10),
        || {
            cgroups_of("k1").iter().all(|d| {
                std::fs::read_to_string(Path::new(d).join("cgroup.procs"))
                    .is_ok_and(|p| p.trim().is_empty())
            })
        }
    ));
    let o = oci(&root, &["delete", "k1"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(common::run::ls(&root), Vec::<String>::new());
    assert_eq!(cgroups_of("k1"), Vec::<String>::new());
}

/// VM isolation needs /dev/kvm, the guest kernel and rvmm-init; the runs share one snapshot
/// directory (the first boots, the others restore).
fn vm_ready() -> bool {
    if !(ready() && common::have_kvm() && common::guest::kernel().is_some()) {
        return false;
    }
    if let Err(e) = rvmm::vm::guest_init_path() {
        return common::require(common::Cap::Kernel, false, &format!("{e:#}"));
    }
    static SNAPSHOTS: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let snaps = SNAPSHOTS.get_or_init(|| tempfile::tempdir().unwrap());
    std::env::set_var("RVMM_SNAPSHOTS", snaps.path());
    true
}

/// A VM container by hand, as an engine drives one: create (the supervisor restores the VM and
/// waits) → created → start → the workload's output on the engine's stdout → exec on the guest's
/// kernel → ps → kill TERM reaches the workload's trap → stopped → delete leaves nothing; then a
/// supervisor killed with SIGKILL takes its VMM along and delete cleans up; then `run` with a
/// read-only root, a tmpfs and a file bind from the bundle.
#[test]
fn vm_isolation_create_start_exec_kill_delete() {
    if !vm_ready() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("state");
    let b = bundle(t.path(), |c| {
        c["annotations"]["io.rvmm.isolation"] = json!("vm");
        c["hostname"] = json!("ocivm");
        c["process"]["args"] = json!([
            "sh",
            "-c",
            "trap 'echo got-term; exit 3' TERM; echo started; while :; do sleep 0.2; done"
        ]);
    });
    let out_path = t.path().join("out");
    let create = |id: &str| {
        let code = oci_into(
            &root,
            &["create", "--bundle", b.to_str().unwrap(), id],
            &out_path,
        );
        assert_eq!(
            code,
            Some(0),
            "create: {}",
            std::fs::read_to_string(&out_path).unwrap_or_default()
        );
    };
    let output = || std::fs::read_to_string(&out_path).unwrap_or_default();
    let wait_for =
        |what: &dyn Fn() -> bool| common::lifecycle::wait_until(Duration::from_secs(120), what);

    create("v1");
    let st = state(&root, "v1");
    assert_eq!(st["status"], "created", "{st}");
    let pid = st["pid"].as_i64().unwrap() as i32;
    assert!(common::lifecycle::alive(pid));
    assert!(!cgroups_of("v1").is_empty());
    let o = oci(&root, &["start", "v1"]);
    assert_eq!(o.code, 0, "start: {}", o.stderr);
    assert_eq!(state(&root, "v1")["status"], "running");
    assert!(wait_for(&|| output().contains("started")), "{}", output());
    let o = oci(
        &root,
        &["exec", "v1", "sh", "-c", "uname -r; hostname; exit 4"],
    );
    assert_eq!(o.code, 4, "exec: {}", o.stderr);
    let host = String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout).unwrap();
    let mut lines = o.stdout.lines();
    let guest = lines.next().unwrap_or_default();
    assert!(
        !guest.is_empty() && guest != host.trim(),
        "guest kernel {guest:?}"
    );
    assert_eq!(lines.next(), Some("ocivm"), "{}", o.stdout);
    let o = oci(&root, &["ps", "--format", "json", "v1"]);
    let pids: Vec<i32> = serde_json::from_str(&o.stdout).unwrap();
    assert!(pids.contains(&pid), "{pids:?}");
    // A running container is not deleted without --force.
    let o = oci(&root, &["delete", "v1"]);
    assert_eq!(o.code, 1, "{}", o.stdout);
    let o = oci(&root, &["kill", "v1", "TERM"]);
    assert_eq!(o.code, 0, "kill: {}", o.stderr);
    assert!(
        wait_for(&|| state(&root, "v1")["status"] == "stopped"),
        "{}",
        output()
    );
    assert!(output().contains("got-term"), "{}", output());
    let o = oci(&root, &["kill", "v1", "TERM"]);
    assert_eq!(o.code, 1, "a stopped container has nothing to signal");
    assert_eq!(oci(&root, &["delete", "v1"]).code, 0);
    assert_eq!(common::run::ls(&root), Vec::<String>::new());
    assert_eq!(cgroups_of("v1"), Vec::<String>::new());

    // kill -9 of the supervisor: its VMM goes too (nothing left in the cgroup), delete cleans up.
    create("v2");
    assert_eq!(oci(&root, &["start", "v2"]).code, 0);
    let pid = state(&root, "v2")["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill(2) of the supervisor this test made.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_for(&|| state(&root, "v2")["status"] == "stopped"));
    let procs = || {
        cgroups_of("v2")
            .iter()
            .map(|d| std::fs::read_to_string(format!("{d}/cgroup.procs")).unwrap_or_default())
            .collect::<String>()
    };
    assert!(
        wait_for(&|| procs().trim().is_empty()),
        "the VMM outlived its supervisor: {}",
        procs()
    );
    let o = oci(&root, &["delete", "v2"]);
    assert_eq!(o.code, 0, "delete: {}", o.stderr);
    assert_eq!(cgroups_of("v2"), Vec::<String>::new());
    assert_eq!(common::run::ls(&root), Vec::<String>::new());

    // `run`: a read-only root, a tmpfs and a file bound from the host, the exit status.
    let shared = t.path().join("greeting");
    std::fs::write(&shared, "from the host\n").unwrap();
    std::fs::create_dir(t.path().join("ro")).unwrap();
    let b = bundle(&t.path().join("ro"), |c| {
        c["annotations"]["io.rvmm.isolation"] = json!("vm");
        c["root"]["readonly"] = json!(true);
        c["mounts"].as_array_mut().unwrap().extend([
            json!({"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "size=1m"]}),
            json!({"destination": "/etc/greeting", "type": "bind", "source": shared, "options": ["rbind", "ro"]}),
        ]);
        c["process"]["args"] = json!([
            "sh",
            "-c",
            "touch /x 2>/dev/null || echo read-only; echo ok > /scratch/y && cat /scratch/y; cat /etc/greeting; exit 9"
        ]);
    });
    let code = oci_into(
        &root,
        &["run", "--bundle", b.to_str().unwrap(), "v3"],
        &out_path,
    );
    assert_eq!(code, Some(9), "{}", output());
    assert_eq!(output(), "read-only\nok\nfrom the host\n");
    assert!(!b.join("rootfs/x").exists());
    assert_eq!(common::run::ls(&root), Vec::<String>::new());
    assert_eq!(cgroups_of("v3"), Vec::<String>::new());
}

/// The engine's network namespace, as podman or a CNI plugin leaves it: a veth whose inside end is
/// eth0 with an address and a default route. A VM container there takes eth0 over (its tap and
/// two tc redirects): its guest reaches a server on the host end; again after a VM was killed
/// with SIGKILL in the namespace (its stale redirect is replaced); and eth0 is given back when a
/// VM ends.
#[test]
fn vm_isolation_takes_over_the_engines_interface() {
    if !(vm_ready() && have_tools(&["ip", "tc"])) {
        return;
    }
    use std::io::{Read as _, Write as _};
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("state");
    let tag = std::process::id() % 200 + 20;
    let ns = format!("rvmm-oci-t{tag}");
    let host_if = format!("rvoh{tag}");
    let (host_ip, guest_ip) = (format!("10.213.{tag}.1"), format!("10.213.{tag}.2"));
    let sh = |cmd: &str| {
        let st = Command::new("sh").args(["-c", cmd]).status().unwrap();
        assert!(st.success(), "{cmd}");
    };
    struct Gone(String, String);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
            let _ = Command::new("ip").args(["link", "del", &self.1]).status();
        }
    }
    let _gone = Gone(ns.clone(), host_if.clone());
    sh(&format!(
        "ip netns add {ns} && ip link add {host_if} type veth peer name eth0 netns {ns} && \
         ip addr add {host_ip}/24 dev {host_if} && ip link set {host_if} up && \
         ip -n {ns} addr add {guest_ip}/24 dev eth0 && ip -n {ns} link set eth0 up && \
         ip -n {ns} link set lo up && ip -n {ns} route add default via {host_ip}"
    ));
    let server = std::net::TcpListener::bind((host_ip.as_str(), 0)).unwrap();
    let port = server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in server.incoming().flatten() {
            let mut b = [0u8; 256];
            let _ = c.read(&mut b);
            let _ = c.write_all(b"HTTP/1.0 200 OK\r\n\r\nhello-from-the-host\n");
        }
    });
    let b = bundle(t.path(), |c| {
        c["annotations"]["io.rvmm.isolation"] = json!("vm");
        let mut namespaces: Vec<Value> = c["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["type"] != "network")
            .cloned()
            .collect();
        namespaces.push(json!({"type": "network", "path": format!("/run/netns/{ns}")}));
        c["linux"]["namespaces"] = json!(namespaces);
        c["process"]["args"] = json!([
            "sh",
            "-c",
            format!(
                "ip -4 -o addr show eth0 | grep -o '{guest_ip}/24'; printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {host_ip} {port} | tail -1; sleep ${{HOLD:-0}}"
            )
        ]);
    });
    let run = |id: &str| {
        let out = t.path().join(format!("{id}.out"));
        let code = oci_into(&root, &["run", "--bundle", b.to_str().unwrap(), id], &out);
        (code, std::fs::read_to_string(&out).unwrap())
    };
    let want = format!("{guest_ip}/24\nhello-from-the-host\n");
    let ingress = || {
        let o = Command::new("ip")
            .args([
                "netns", "exec", &ns, "tc", "-j", "qdisc", "show", "dev", "eth0",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).contains("\"ingress\"")
    };
    assert_eq!(run("net1"), (Some(0), want.clone()));
    assert!(!ingress(), "eth0 was not given back");
    // A VM killed with SIGKILL while it holds eth0 leaves its redirect behind.
    let cfg = b.join("config.json");
    let mut c: Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    c["process"]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!("HOLD=1000"));
    std::fs::write(&cfg, c.to_string()).unwrap();
    let o = oci(&root, &["create", "--bundle", b.to_str().unwrap(), "held"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(oci(&root, &["start", "held"]).code, 0);
    assert!(common::lifecycle::wait_until(
        Duration::from_secs(60),
        ingress
    ));
    let pid = state(&root, "held")["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill(2) of the supervisor this test made.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(common::lifecycle::wait_until(
        Duration::from_secs(30),
        || state(&root, "held")["status"] == "stopped"
    ));
    assert_eq!(oci(&root, &["delete", "held"]).code, 0);
    c["process"]["env"].as_array_mut().unwrap().pop();
    std::fs::write(&cfg, c.to_string()).unwrap();
    assert_eq!(run("net2"), (Some(0), want));
    assert!(!ingress(), "eth0 was not given back");
    assert_eq!(common::run::ls(&root), Vec::<String>::new());
}

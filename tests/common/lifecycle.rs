//! Checks of detached runs (`run -d`, `logs -f`, `exec`, `kill`, `stop`, `wait`, `inspect`,
//! `rm -f`, a killed supervisor and `gc`) written once and run in both isolations by
//! tests/container.rs and tests/vm_run.rs. Each check takes a store the caller's `RunEnv` holds,
//! whose drop compares the host (mounts, cgroups, links, leases, run dirs) with before.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::run::{rvmm, Out, RemoveRuns};

pub const BB: &str = "localhost/busybox";
pub const DEBIAN: &str = "localhost/debian";

/// Polls `f` every 100 ms until it holds or `limit` has passed.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    loop {
        if f() {
            return true;
        }
        if t0.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `rvmm run -d --isolation=ISO FLAGS IMAGE ARGS`: the run's ID (asserted to be one).
pub fn run_detached(
    root: &Path,
    isolation: &str,
    flags: &[&str],
    image: &str,
    args: &[&str],
) -> String {
    let iso = format!("--isolation={isolation}");
    let mut a = vec!["run", "-d", iso.as_str()];
    a.extend_from_slice(flags);
    a.push(image);
    a.extend_from_slice(args);
    let t = Instant::now();
    let o = rvmm(root, &a, None);
    eprintln!("{isolation}: run -d took {:?}", t.elapsed());
    assert_eq!(o.code, 0, "run -d failed: {}", o.stderr);
    let id = o.stdout.trim().to_string();
    assert!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "run -d printed {:?}",
        o.stdout
    );
    id
}

/// Is `pid` a live process (not gone, not a zombie)?
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

/// The parent of `pid`.
pub fn ppid(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()
}

/// The run's state file, as JSON.
pub fn state_of(root: &Path, id: &str) -> serde_json::Value {
    let b = std::fs::read(root.join("runs").join(id).join("state.json")).expect("state.json");
    serde_json::from_slice(&b).expect("state.json is JSON")
}

/// `rvmm inspect RUN`'s one object.
pub fn inspect(root: &Path, run: &str) -> serde_json::Value {
    let i = rvmm(root, &["inspect", run], None);
    assert_eq!(i.code, 0, "{}", i.stderr);
    let v: serde_json::Value = serde_json::from_str(&i.stdout).expect("inspect prints JSON");
    v[0].clone()
}

/// `GET path` on 127.0.0.1:port, retried until the answer contains `want` or `limit` passed: the
/// last answer.
pub fn http_get(port: u16, path: &str, want: &str, limit: Duration) -> String {
    let mut body = String::new();
    wait_until(limit, || {
        body.clear();
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes());
            let _ = s.read_to_string(&mut body);
        }
        body.contains(want)
    });
    body
}

/// Bytes a reader thread collects.
type Collected = Arc<Mutex<Vec<u8>>>;

/// `rvmm logs -f RUN` in the background, its stdout and stderr collected as they come.
pub struct Follow {
    child: Child,
    out: Collected,
    err: Collected,
    readers: Vec<JoinHandle<()>>,
}

impl Follow {
    pub fn start(root: &Path, run: &str) -> Follow {
        let mut child = Command::new(super::rvmm_bin())
            .arg("--root")
            .arg(root)
            .args(["logs", "-f", run])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("rvmm logs -f");
        let (out, err) = (Arc::default(), Arc::default());
        let mut readers = Vec::new();
        let pipes: [(Box<dyn Read + Send>, &Collected); 2] = [
            (Box::new(child.stdout.take().expect("stdout")), &out),
            (Box::new(child.stderr.take().expect("stderr")), &err),
        ];
        for (mut pipe, buf) in pipes {
            let buf = Arc::clone(buf);
            readers.push(std::thread::spawn(move || {
                let mut b = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut b) {
                    if n == 0 {
                        return;
                    }
                    buf.lock().unwrap().extend_from_slice(&b[..n]);
                }
            }));
        }
        Follow {
            child,
            out,
            err,
            readers,
        }
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// Has the follower's exited? Waits up to `limit` for it.
    pub fn ended_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut st = None;
        wait_until(limit, || {
            st = self.child.try_wait().ok().flatten();
            st.is_some()
        });
        if st.is_some() {
            for r in self.readers.drain(..) {
                let _ = r.join();
            }
        }
        st
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_exec(root: &Path, args: &[&str]) -> Child {
    Command::new(super::rvmm_bin())
        .arg("--root")
        .arg(root)
        .arg("exec")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rvmm exec")
}

/// What the checks expect of the isolation: how long a run may take to react (a VM on software
/// KVM is slow, more so under load).
fn patience(isolation: &str) -> Duration {
    if isolation == "vm" {
        Duration::from_secs(120)
    } else {
        Duration::from_secs(20)
    }
}

/// A detached busybox httpd on `-p 127.0.0.1:PORT:80` under a shell that traps USR1 and ignores
/// SIGTERM. `logs -f` follows the run while a request is made (httpd's log line of that request
/// reaches the follower's stderr) and ends when the run ends; `inspect` shows it running with its
/// pid, address and port; `exec` reads the file the server serves, writes one that the server
/// then serves, and exits 3; `exec -t` has a terminal; two execs at once keep their output and
/// status apart; `kill -s USR1` reaches the trap; `stop -t 2` kills the workload that ignores
/// SIGTERM after the grace time, and `wait` prints 137.
pub fn detached_httpd(root: &Path, isolation: &str) {
    let slow = patience(isolation);
    let _cleanup = RemoveRuns {
        root,
        names: &["web"],
    };
    let port = super::images::free_port();
    let publish = format!("127.0.0.1:{port}:80");
    let id = run_detached(
        root,
        isolation,
        &["--network=bridge", "--name", "web", "-p", &publish],
        BB,
        &[
            "sh",
            "-c",
            "trap '' TERM; (trap '' USR1; exec httpd -f -vv -p 80 -h /var/www) & \
             trap 'echo got-usr1' USR1; echo started; while :; do sleep 1; done",
        ],
    );
    let mut follow = Follow::start(root, "web");
    assert!(
        wait_until(slow, || follow.stdout().contains("started")),
        "logs -f never showed the workload's first line: {:?} {:?}",
        follow.stdout(),
        follow.stderr()
    );
    let body = http_get(port, "/index.html", "hello from rvmm", slow);
    assert!(body.contains("hello from rvmm"), "httpd on -p: {body:?}");
    // busybox httpd -vv logs each request on its stderr: the follower gets it while it runs.
    assert!(
        wait_until(slow, || follow.stderr().contains("url:/index.html")),
        "the request never reached logs -f: {:?}",
        follow.stderr()
    );

    let v = inspect(root, "web");
    assert_eq!(v["Id"], id.as_str());
    assert_eq!(v["Isolation"], isolation);
    assert_eq!(v["State"]["Status"], "running");
    // State.Pid is the workload's host pid: a container's first process; a VM's workload has none
    // on the host (RunState::pid stays 0).
    let pid = v["State"]["Pid"].as_i64().unwrap_or(-1);
    if isolation == "container" {
        assert!(pid > 0 && alive(pid as i32), "{v}");
    } else {
        assert_eq!(pid, 0, "{v}");
    }
    assert!(v["State"]["FinishedAt"].is_null(), "{v}");
    assert!(
        v["NetworkSettings"]["IPAddress"]
            .as_str()
            .is_some_and(|a| a.starts_with("10.77.")),
        "{v}"
    );
    assert!(
        v["NetworkSettings"]["Ports"]
            .to_string()
            .contains(&port.to_string()),
        "{v}"
    );
    assert_eq!(v["Config"]["argv"][0], "sh");

    // exec: the server's root, as the server sees it.
    let e = rvmm(
        root,
        &[
            "exec",
            "web",
            "sh",
            "-c",
            "cat /var/www/index.html; echo made-by-exec > /var/www/exec.html; exit 3",
        ],
        None,
    );
    assert_eq!(
        (e.code, e.stdout.as_str()),
        (3, "hello from rvmm\n"),
        "{}",
        e.stderr
    );
    let body = http_get(port, "/exec.html", "made-by-exec", slow);
    assert!(body.contains("made-by-exec"), "{body:?}");
    // -t: a terminal on the exec's side (stdout shows the pty's \r\n).
    let e = rvmm(
        root,
        &["exec", "-t", "web", "sh", "-c", "test -t 1 && echo tty"],
        None,
    );
    assert_eq!((e.code, e.stdout.as_str()), (0, "tty\r\n"), "{}", e.stderr);
    // Two at once: the first is still running when the second starts and ends.
    let a = spawn_exec(
        root,
        &[
            "web",
            "sh",
            "-c",
            "echo a-in; sleep 3; echo a-out >&2; exit 4",
        ],
    );
    let b = spawn_exec(root, &["web", "sh", "-c", "echo b; exit 5"]);
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let show = |o: &std::process::Output| {
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    assert_eq!(show(&a), (Some(4), "a-in\n".into(), "a-out\n".into()));
    assert_eq!(show(&b), (Some(5), "b\n".into(), String::new()));

    // USR1 reaches the trap (the shell runs it after its current sleep).
    let k = rvmm(root, &["kill", "-s", "USR1", "web"], None);
    assert_eq!((k.code, k.stdout.as_str()), (0, "web\n"), "{}", k.stderr);
    assert!(
        wait_until(slow, || follow.stdout().contains("got-usr1")),
        "USR1 never reached the trap: {:?}",
        follow.stdout()
    );
    assert!(
        follow.ended_within(Duration::ZERO).is_none(),
        "logs -f ended early"
    );

    // stop: SIGTERM is ignored, so it is killed after 2 s; wait (from another process) says 137.
    let waiter = Command::new(super::rvmm_bin())
        .arg("--root")
        .arg(root)
        .args(["wait", "web"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let s = rvmm(root, &["stop", "-t", "2", "web"], None);
    let took = t.elapsed();
    assert_eq!((s.code, s.stdout.as_str()), (0, "web\n"), "{}", s.stderr);
    assert!(
        took >= Duration::from_secs(2),
        "stop did not wait the grace time: {took:?}"
    );
    let w = waiter.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&w.stdout), "137\n");
    assert_eq!(rvmm(root, &["wait", "web"], None).stdout, "137\n");
    // The follower ends with the run, having seen all of it.
    let st = follow.ended_within(slow);
    assert!(
        st.is_some_and(|s| s.success()),
        "logs -f did not end with the run: {st:?}"
    );
    assert_eq!(follow.stdout(), "started\ngot-usr1\n");
    let v = inspect(root, "web");
    assert_eq!(
        (
            &v["State"]["Status"],
            &v["State"]["ExitCode"],
            &v["State"]["Pid"]
        ),
        (&"exited".into(), &137.into(), &0.into())
    );
    assert!(v["State"]["FinishedAt"].is_string(), "{v}");
    let e = rvmm(root, &["exec", "web", "true"], None);
    assert_ne!(e.code, 0);
    assert!(e.stderr.contains("not running"), "{}", e.stderr);
    let r = rvmm(root, &["rm", "web"], None);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// A detached run started by a shell in a session of its own (as from a terminal), which exits
/// and whose session is hung up: the run stays up and serves `exec`. Then its supervisor is killed
/// with SIGKILL: the run dies with it (its rvmm, the workload, and in a VM the VMM), and `rvmm gc`
/// frees what the run held; the caller's `RunEnv` checks that no mount, cgroup, veth/tap, lease
/// or run directory is left (the run has `--rm`).
pub fn survives_its_shell_then_gc_after_a_killed_supervisor(root: &Path, isolation: &str) {
    let slow = patience(isolation);
    let _cleanup = RemoveRuns {
        root,
        names: &["orphan"],
    };
    let idfile = root.join("orphan.id");
    let cmd = format!(
        "{} --root {} run -d --rm --isolation={isolation} --network=bridge --name orphan {BB} \
         sh -c 'while :; do sleep 1; done' > {}; echo $$",
        super::rvmm_bin().display(),
        root.display(),
        idfile.display()
    );
    let t = Instant::now();
    let sh = Command::new("setsid")
        .args(["-w", "sh", "-c", &cmd])
        .stdin(Stdio::null())
        .output()
        .expect("setsid sh");
    eprintln!(
        "{isolation}: setsid sh -c 'rvmm run -d' took {:?}",
        t.elapsed()
    );
    assert!(
        sh.status.success(),
        "{}",
        String::from_utf8_lossy(&sh.stderr)
    );
    let sid: i32 = String::from_utf8_lossy(&sh.stdout)
        .trim()
        .parse()
        .expect("the shell's pid");
    // The shell is gone; hang up what is left of its session, as a closing terminal would.
    assert!(!alive(sid));
    // SAFETY: a signal to a process group this test created (setsid made it the session's).
    unsafe { libc::kill(-sid, libc::SIGHUP) };
    let id = std::fs::read_to_string(&idfile)
        .expect("the run's id")
        .trim()
        .to_string();
    std::fs::remove_file(&idfile).unwrap();
    assert_eq!(id.len(), 64, "{id:?}");
    std::thread::sleep(Duration::from_millis(500));
    let ps = rvmm(root, &["ps"], None);
    assert!(
        ps.stdout
            .lines()
            .any(|l| l.contains("orphan") && l.contains("Up ")),
        "the run did not outlive its shell:\n{}",
        ps.stdout
    );
    let e = rvmm(root, &["exec", "orphan", "echo", "still-here"], None);
    assert_eq!(
        (e.code, e.stdout.as_str()),
        (0, "still-here\n"),
        "{}",
        e.stderr
    );

    let st = state_of(root, &id);
    let run_rvmm = st["rvmm_pid"].as_i64().expect("rvmm_pid") as i32;
    let workload = st["pid"].as_i64().expect("pid") as i32;
    let args = |pid: i32| -> Vec<String> {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    };
    // A detached run is its own supervisor: one process keeps it and writes its log, in a session
    // of its own (a container's is `rvmm-shim PROTOCOL wait ...` once its workload runs, a warm
    // VM's `rvmm-vmm PROTOCOL session FD` once its snapshot is restored), with no supervisor
    // process above it.
    let kept = args(run_rvmm);
    let (binary, mode) = if isolation == "container" {
        ("rvmm-shim", "wait")
    } else {
        ("rvmm-vmm", "session")
    };
    assert!(
        kept[0].ends_with(binary) && kept.get(2).map(String::as_str) == Some(mode),
        "the run is not kept by {binary}: {kept:?}"
    );
    let parent = args(ppid(run_rvmm).expect("the run's process has a parent"));
    assert!(
        !parent.iter().any(|a| a == "__supervise"),
        "a supervisor process keeps the run: {parent:?}"
    );
    let supervisor = run_rvmm;
    // The supervisor is in a session of its own, not the shell's.
    // SAFETY: getsid on a pid.
    assert_ne!(unsafe { libc::getsid(supervisor) }, sid);
    let mut pids = vec![supervisor];
    if isolation == "container" {
        // The workload's pid as the host sees it (a VM's workload has none: 0).
        assert!(alive(workload), "workload pid {workload}");
        pids.push(workload);
    }
    // SAFETY: SIGKILL to the supervisor this test's run started.
    assert_eq!(unsafe { libc::kill(supervisor, libc::SIGKILL) }, 0);
    assert!(
        wait_until(slow, || pids.iter().all(|&p| !alive(p))),
        "processes of the run outlived its killed supervisor: {:?}",
        pids.iter().filter(|&&p| alive(p)).collect::<Vec<_>>()
    );
    let g = rvmm(root, &["gc"], None);
    assert_eq!(g.code, 0, "{}", g.stderr);
    assert!(g.stdout.contains("1 dead run"), "{}", g.stdout);
    assert!(
        rvmm(root, &["ps", "-aq"], None).stdout.trim().is_empty(),
        "gc left the run"
    );
}

/// The Debian minbase userland detached: `logs -f` follows its stdout and stderr apart, `exec`
/// as a user of the image's /etc/passwd reads a file of the image and exits 3, `exec -t` has a
/// terminal, `exec -i` passes stdin, and `rm -f` removes the running run.
pub fn debian_exec_logs_and_rm_f(root: &Path, isolation: &str) {
    let slow = patience(isolation);
    let _cleanup = RemoveRuns {
        root,
        names: &["deb"],
    };
    let debian = super::images::debian_image();
    let o = rvmm(
        root,
        &["pull", "-q", &format!("oci:{}", debian.display())],
        None,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    run_detached(
        root,
        isolation,
        &["--network=none", "--name", "deb"],
        DEBIAN,
        &[
            "bash",
            "-c",
            "echo hello-debian; echo to-stderr >&2; trap 'echo got-usr1' USR1; \
             while :; do sleep 1; done",
        ],
    );
    let mut follow = Follow::start(root, "deb");
    assert!(
        wait_until(slow, || follow.stdout() == "hello-debian\n"
            && follow.stderr() == "to-stderr\n"),
        "{:?} {:?}",
        follow.stdout(),
        follow.stderr()
    );
    let e = rvmm(
        root,
        &[
            "exec",
            "-u",
            "app",
            "deb",
            "bash",
            "-c",
            "id -un; cat /etc/debian_version | cut -d. -f1; ls /proc/1/cmdline >/dev/null && echo ok; exit 3",
        ],
        None,
    );
    assert_eq!(
        (e.code, e.stdout.as_str()),
        (3, "app\n12\nok\n"),
        "{}",
        e.stderr
    );
    let e = rvmm(
        root,
        &["exec", "-t", "deb", "bash", "-c", "test -t 1 && echo tty"],
        None,
    );
    assert_eq!((e.code, e.stdout.as_str()), (0, "tty\r\n"), "{}", e.stderr);
    let e: Out = rvmm(
        root,
        &["exec", "-i", "deb", "wc", "-c"],
        Some("twelve bytes"),
    );
    assert_eq!((e.code, e.stdout.trim()), (0, "12"), "{}", e.stderr);
    let k = rvmm(root, &["kill", "-s", "SIGUSR1", "deb"], None);
    assert_eq!(k.code, 0, "{}", k.stderr);
    assert!(
        wait_until(slow, || follow.stdout().contains("got-usr1")),
        "{:?}",
        follow.stdout()
    );
    // rm -f of the running run: killed, removed, and the follower ends.
    let r = rvmm(root, &["rm", "-f", "deb"], None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        follow.ended_within(slow).is_some(),
        "logs -f outlived rm -f"
    );
    assert!(rvmm(root, &["ps", "-aq"], None).stdout.trim().is_empty());
}

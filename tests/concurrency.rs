//! Concurrency (issue 21, part 4): many runs of both isolations started at once against one
//! store, attached and detached, with and without `-p`, while pulls of the same and of different
//! images, `rmi` and `gc` race with them. What it checks is in docs/reliability.md.
//!
//! `RVMM_CONCURRENCY=N` sets the number of runs (a fifth of them VMs, started warm from one
//! snapshot prepared before, the rest containers). The default, 50, is the storm the issue asks
//! for and what CI runs (`cargo test --workspace --all-targets`); about 3½ minutes on a 2-core
//! kvm_pvm host (docs/reliability.md).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::images::{free_port, rvmm_ok, test_images, Registry};

const BB: &str = "localhost/busybox";

/// The number of runs without `RVMM_CONCURRENCY`: CI's size (see the module doc).
const DEFAULT_RUNS: usize = 50;

/// How long the runs may take to all be up (a guard against a hang, not a timing assertion: on a
/// loaded 2-core host 50 starts take a minute or two).
const READY_DEADLINE: Duration = Duration::from_secs(900);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Iso {
    Container,
    Vm,
}

/// One run of the storm.
#[derive(Clone, Debug)]
struct Plan {
    name: String,
    iso: Iso,
    detached: bool,
    /// `-p PORT:8080`: the workload serves its own name there.
    port: Option<u16>,
    bridge: bool,
}

/// A run started: the attached rvmm (or `run -d`) and what it printed so far.
struct Started {
    plan: Plan,
    child: Child,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
    cidfile: PathBuf,
    /// `run -d` returned 0 (detached), or the workload printed "ready" (attached).
    up: bool,
    /// The "ready" line, once seen.
    ready: Option<String>,
    /// Why it failed, if it did.
    failed: Option<String>,
}

/// The workload of every run: it serves its name on 8080 when published, prints its MAC and
/// address, and runs until SIGTERM, which it answers with "bye" and status 0.
fn script(name: &str, publish: bool) -> String {
    let httpd = if publish {
        format!("mkdir -p /tmp/w; echo {name} > /tmp/w/id; httpd -p 8080 -h /tmp/w; ")
    } else {
        String::new()
    };
    format!(
        "trap 'echo bye; exit 0' TERM; {httpd}\
         echo \"ready mac=$(cat /sys/class/net/eth0/address 2>/dev/null) $(ip -4 -o addr show eth0 2>/dev/null)\"; \
         while :; do sleep 1; done"
    )
}

struct Env {
    root: PathBuf,
    snaps: PathBuf,
    tmp: PathBuf,
}

impl Env {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(common::rvmm_bin());
        c.arg("--root")
            .arg(&self.root)
            .args(args)
            .env("RVMM_SNAPSHOTS", &self.snaps)
            .env("RVMM_TIMINGS", "1")
            .stdin(Stdio::null());
        c
    }

    /// Runs rvmm to the end: (status, stdout, stderr).
    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let o = self
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("rvmm");
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    fn start(&self, k: usize, plan: &Plan) -> Started {
        let iso = match plan.iso {
            Iso::Container => "--isolation=container",
            Iso::Vm => "--isolation=vm",
        };
        let cidfile = self.tmp.join(format!("{k}.cid"));
        let mut args: Vec<String> = vec!["run".into(), iso.into(), "--name".into()];
        args.push(plan.name.clone());
        if plan.detached {
            args.push("-d".into());
        } else {
            args.push("--rm".into());
            args.push("--cidfile".into());
            args.push(cidfile.display().to_string());
        }
        if !plan.bridge {
            args.push("--network=none".into());
        }
        if let Some(p) = plan.port {
            args.push("-p".into());
            args.push(format!("{p}:8080"));
        }
        args.extend([
            BB.to_string(),
            "sh".into(),
            "-c".into(),
            script(&plan.name, plan.port.is_some()),
        ]);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = self
            .cmd(&a)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn rvmm");
        let out = Arc::new(Mutex::new(String::new()));
        let err = Arc::new(Mutex::new(String::new()));
        for (mut r, buf) in [
            (
                Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
                out.clone(),
            ),
            (Box::new(child.stderr.take().expect("stderr")), err.clone()),
        ] {
            std::thread::spawn(move || {
                let mut b = [0u8; 4096];
                while let Ok(n) = r.read(&mut b) {
                    if n == 0 {
                        break;
                    }
                    buf.lock()
                        .expect("lock")
                        .push_str(&String::from_utf8_lossy(&b[..n]));
                }
            });
        }
        Started {
            plan: plan.clone(),
            child,
            out,
            err,
            cidfile,
            up: false,
            ready: None,
            failed: None,
        }
    }
}

/// Kills and removes whatever a failing test left running (attached rvmms get SIGKILL, then
/// `rm -f` and `gc` clean up after them).
struct Reaper<'a> {
    env: &'a Env,
    names: Vec<String>,
    pids: Vec<u32>,
}

impl Drop for Reaper<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for p in &self.pids {
            // SAFETY: kill(2) on a child of ours.
            unsafe { libc::kill(*p as i32, libc::SIGKILL) };
        }
        for n in &self.names {
            let _ = self.env.run(&["rm", "-f", n]);
        }
        let _ = self.env.run(&["gc"]);
    }
}

/// The "ready" line's MAC and IPv4 address (without the prefix length).
fn identity(line: &str) -> (String, String) {
    let mac = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("mac="))
        .unwrap_or_default()
        .to_string();
    let ip = line
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_default()
        .to_string();
    (mac, ip)
}

/// GET /id through 127.0.0.1:port.
fn fetch_id(port: u16) -> Result<String, String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /id HTTP/1.0\r\nHost: x\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut r = String::new();
    s.read_to_string(&mut r).map_err(|e| e.to_string())?;
    r.split_once("\r\n\r\n")
        .map(|(_, body)| body.trim().to_string())
        .ok_or_else(|| format!("no HTTP response: {r:?}"))
}

/// Side jobs racing with the runs: every command must succeed.
fn side_jobs(
    env: &Arc<Env>,
    reg: &str,
    done: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Vec<String>>> {
    let mut jobs = Vec::new();
    let imgs = test_images();
    // The same image pulled three times at once, and two other images.
    for (i, image) in ["t/multi", "t/multi", "t/multi", "t/busybox", "t/zstd"]
        .iter()
        .enumerate()
    {
        let (env, image) = (env.clone(), format!("{reg}/{image}:latest"));
        jobs.push(std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200 * i as u64));
            let (code, _, err) = env.run(&["pull", "-q", &image]);
            if code == 0 {
                vec![]
            } else {
                vec![format!("pull {image}: {code}: {err}")]
            }
        }));
    }
    // Pull and remove another image, and give the runs' image an extra name and take it away
    // again, while the runs use it.
    {
        let env = env.clone();
        let multi = format!("oci:{}", imgs.join("multi").display());
        jobs.push(std::thread::spawn(move || {
            let mut failed = vec![];
            for round in 0..3 {
                for args in [
                    vec!["pull", "-q", multi.as_str()],
                    vec!["tag", BB, "localhost/alias"],
                    vec!["rmi", "localhost/multi"],
                    vec!["rmi", "localhost/alias"],
                ] {
                    let (code, _, err) = env.run(&args);
                    if code != 0 {
                        failed.push(format!("round {round}: {args:?}: {code}: {err}"));
                    }
                }
            }
            let (code, _, err) = env.run(&["pull", "-q", &multi]);
            if code != 0 {
                failed.push(format!("final pull of multi: {err}"));
            }
            failed
        }));
    }
    // gc, over and over, until the runs are done.
    {
        let (env, done) = (env.clone(), done.clone());
        jobs.push(std::thread::spawn(move || {
            let mut failed = vec![];
            let mut n = 0;
            while !done.load(Ordering::SeqCst) {
                let (code, out, err) = env.run(&["gc"]);
                if code != 0 {
                    failed.push(format!("gc {n}: {code}: {out}{err}"));
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
            eprintln!("{n} gc runs raced with the runs");
            failed
        }));
    }
    jobs
}

#[test]
fn many_runs_at_once_share_nothing_and_leave_nothing() {
    if !common::have_root()
        || !common::have_tools(&[
            "umoci",
            "skopeo",
            "ip",
            "iptables",
            "mkfs.erofs",
            "unshare",
            "flock",
            "docker-registry",
        ])
    {
        return;
    }
    let vm = common::have_kvm()
        && common::guest::kernel().is_some()
        && match rvmm::vm::guest_init_path() {
            Ok(_) => true,
            Err(e) => common::require(common::Cap::Kernel, false, &format!("{e:#}")),
        };
    let n: usize = std::env::var("RVMM_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_RUNS);
    let n_vm = if vm { n.div_ceil(5) } else { 0 };
    let imgs = test_images();
    let store = common::images::store();
    let snaps = tempfile::tempdir().expect("tempdir");
    let tmp = tempfile::tempdir().expect("tempdir");
    let env = Arc::new(Env {
        root: store.path().to_path_buf(),
        snaps: snaps.path().to_path_buf(),
        tmp: tmp.path().to_path_buf(),
    });
    let root = env.root.clone();
    rvmm_ok(
        &root,
        &[
            "pull",
            "-q",
            &format!("oci:{}", imgs.join("busybox").display()),
        ],
    );
    let reg = Registry::start(None);
    let oci = |l: &str| format!("oci:{}:latest", imgs.join(l).display());
    for l in ["busybox", "multi", "zstd"] {
        reg.push(&oci(l), &format!("t/{l}:latest"), &[], None);
    }
    // One snapshot, prepared once: the VMs of the storm all start warm from it.
    let mut snapshot = None;
    if n_vm > 0 {
        let t = Instant::now();
        let (code, out, err) = env.run(&["snapshot", "prewarm"]);
        assert_eq!(code, 0, "prewarm: {err}");
        eprintln!("prewarm: {} in {:?}", out.trim(), t.elapsed());
        snapshot = Some(snapshot_files(&env.snaps));
    }
    let before = common::run::HostState::now(&root);

    // The plan: a fifth VMs (all on the bridge: the snapshot is of that machine), the rest
    // containers; a third detached; a quarter publishing a port; some containers without a network.
    let mut ports = BTreeSet::new();
    while ports.len() < n / 4 + 2 {
        ports.insert(free_port());
    }
    let mut ports = ports.into_iter();
    let mut plans: Vec<Plan> = (0..n)
        .map(|i| {
            let iso = if vm && i % 5 == 4 && (i / 5) < n_vm {
                Iso::Vm
            } else {
                Iso::Container
            };
            let port = (i % 4 == 1).then(|| ports.next().expect("port"));
            Plan {
                name: format!("cc-{i}"),
                iso,
                detached: i % 3 == 0,
                port,
                bridge: iso == Iso::Vm || port.is_some() || i % 6 != 2,
            }
        })
        .collect();
    let n_vm = plans.iter().filter(|p| p.iso == Iso::Vm).count();
    // Runs that must lose a race: three at once for one name, two for one port; exactly one of
    // each group may start.
    let dup_port = ports.next().expect("port");
    let contenders: Vec<Plan> = (0..3)
        .map(|i| Plan {
            name: "cc-same-name".into(),
            iso: if vm && i == 2 {
                Iso::Vm
            } else {
                Iso::Container
            },
            detached: i == 1,
            port: None,
            bridge: true,
        })
        .chain((0..2).map(|i| Plan {
            name: format!("cc-same-port-{i}"),
            iso: Iso::Container,
            detached: false,
            port: Some(dup_port),
            bridge: true,
        }))
        .collect();
    plans.extend(contenders.iter().cloned());
    eprintln!(
        "{} runs at once ({} VMs, {} detached, {} with -p) plus {} meant to lose a race for a name or a port",
        n,
        n_vm,
        plans[..n].iter().filter(|p| p.detached).count(),
        plans[..n].iter().filter(|p| p.port.is_some()).count(),
        contenders.len()
    );

    // Go: every run, the pulls, rmi and gc at once.
    let done = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let mut runs: Vec<Started> = plans
        .iter()
        .enumerate()
        .map(|(k, p)| env.start(k, p))
        .collect();
    let mut reaper = Reaper {
        env: &env,
        names: plans.iter().map(|p| p.name.clone()).collect(),
        pids: runs.iter().map(|r| r.child.id()).collect(),
    };
    let jobs = side_jobs(&env, &reg.host(), &done);

    // Wait until every run is up (or has failed).
    let mut last_poll = Instant::now() - Duration::from_secs(10);
    loop {
        let poll_logs = last_poll.elapsed() >= Duration::from_secs(2);
        if poll_logs {
            last_poll = Instant::now();
        }
        for r in runs
            .iter_mut()
            .filter(|r| r.ready.is_none() && r.failed.is_none())
        {
            if r.plan.detached {
                if !r.up {
                    if let Ok(Some(st)) = r.child.try_wait() {
                        if st.success() {
                            r.up = true;
                        } else {
                            std::thread::sleep(Duration::from_millis(50));
                            r.failed =
                                Some(format!("run -d: {st}: {}", r.err.lock().expect("lock")));
                        }
                    }
                }
                if r.up && poll_logs {
                    let (_, out, err) = env.run(&["logs", &r.plan.name]);
                    if err.contains("ambiguous") || err.contains("more than one") {
                        // Another run got the same name: counted as a second winner below.
                        r.ready = Some(format!("a second run with this name: {err}"));
                    } else if let Some(l) = out.lines().find(|l| l.starts_with("ready")) {
                        r.ready = Some(l.to_string());
                        r.err.lock().expect("lock").push_str(&err);
                    }
                }
            } else {
                let ready = r
                    .out
                    .lock()
                    .expect("lock")
                    .lines()
                    .find(|l| l.starts_with("ready"))
                    .map(str::to_string);
                if let Some(l) = ready {
                    r.ready = Some(l);
                    r.up = true;
                } else if let Ok(Some(st)) = r.child.try_wait() {
                    std::thread::sleep(Duration::from_millis(50));
                    r.failed = Some(format!("{st}: {}", r.err.lock().expect("lock")));
                }
            }
        }
        if runs.iter().all(|r| r.ready.is_some() || r.failed.is_some()) {
            break;
        }
        if t0.elapsed() >= READY_DEADLINE {
            // What each run that is not up said, and where it is, for the failure message.
            let stuck: Vec<String> = runs
                .iter()
                .filter(|r| r.ready.is_none() && r.failed.is_none())
                .map(|r| {
                    let (code, out, err) = env.run(&["logs", &r.plan.name]);
                    format!(
                        "{:?} run -d returned: {}\n  stdout: {}\n  stderr: {}\n  logs ({code}): {out}{err}",
                        r.plan,
                        r.up,
                        r.out.lock().expect("lock"),
                        r.err.lock().expect("lock"),
                    )
                })
                .collect();
            let ps = Command::new("ps")
                .args(["-eo", "pid,ppid,stat,wchan:20,args"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let ps: Vec<&str> = ps
                .lines()
                .filter(|l| l.contains("rvmm") || l.contains("sleep"))
                .collect();
            panic!(
                "runs not up after {READY_DEADLINE:?}:\n{}\nprocesses:\n{}",
                stuck.join("\n"),
                ps.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let all_up = t0.elapsed();
    eprintln!("all {} runs up after {all_up:?}", runs.len());

    // The storm's runs: 0 failures.
    let failed: Vec<String> = runs[..n]
        .iter()
        .filter_map(|r| r.failed.as_ref().map(|f| format!("{}: {f}", r.plan.name)))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {n} runs failed: {failed:#?}",
        failed.len()
    );
    // The contenders: exactly one per group, the others refused in one line.
    for (group, what) in [("cc-same-name", "the name"), ("cc-same-port", "port")] {
        let g: Vec<&Started> = runs[n..]
            .iter()
            .filter(|r| r.plan.name.starts_with(group))
            .collect();
        let winners: Vec<&&Started> = g.iter().filter(|r| r.ready.is_some()).collect();
        assert_eq!(
            winners.len(),
            1,
            "{group}: {} runs started: {:?}",
            winners.len(),
            g.iter()
                .map(|r| (&r.plan, &r.ready, &r.failed))
                .collect::<Vec<_>>()
        );
        for r in g.iter().filter(|r| r.ready.is_none()) {
            let f = r.failed.as_deref().unwrap_or_default();
            assert!(
                f.contains(what) && f.contains("in use"),
                "{group}: the loser did not say why: {f}"
            );
        }
    }
    let live: Vec<&Started> = runs.iter().filter(|r| r.ready.is_some()).collect();

    // While all of them run: nothing shared.
    let names: Vec<&str> = live.iter().map(|r| r.plan.name.as_str()).collect();
    let mut args = vec!["inspect"];
    args.extend(names.iter().copied());
    let (code, out, err) = env.run(&args);
    assert_eq!(code, 0, "inspect: {err}");
    let inspected: Vec<serde_json::Value> = serde_json::from_str(&out).expect("inspect json");
    assert_eq!(inspected.len(), live.len());
    let by_name: BTreeMap<String, &serde_json::Value> = inspected
        .iter()
        .map(|v| (v["Name"].as_str().unwrap_or_default().to_string(), v))
        .collect();
    assert_eq!(by_name.len(), live.len(), "two runs with one name");
    let mut seen: BTreeMap<&str, BTreeMap<String, String>> = BTreeMap::new();
    let mut claim = |what: &'static str, value: String, owner: &str| {
        if value.is_empty() {
            return;
        }
        if let Some(other) = seen
            .entry(what)
            .or_default()
            .insert(value.clone(), owner.to_string())
        {
            panic!("{owner} and {other} share the {what} {value}");
        }
    };
    let mut ids = Vec::new();
    for r in &live {
        let v = by_name[&r.plan.name];
        let name = r.plan.name.as_str();
        assert_eq!(v["State"]["Running"], true, "{name}: {v}");
        let id = v["Id"].as_str().unwrap_or_default().to_string();
        if !r.plan.detached {
            let cid = std::fs::read_to_string(&r.cidfile).unwrap_or_default();
            assert_eq!(cid, id, "{name}: the cidfile names another run");
        }
        claim("ID", id.clone(), name);
        ids.push(id.clone());
        let (mac, ip) = identity(r.ready.as_deref().unwrap_or_default());
        let net = &v["NetworkSettings"];
        if r.plan.bridge {
            assert!(
                ip.starts_with("10.77."),
                "{name}: no address: {:?}",
                r.ready
            );
            assert_eq!(
                net["IPAddress"].as_str(),
                Some(ip.as_str()),
                "{name}: inspect and the workload disagree on the IP"
            );
            assert_eq!(
                net["MacAddress"].as_str(),
                Some(mac.as_str()),
                "{name}: inspect and the workload disagree on the MAC"
            );
            claim("IP", ip, name);
            claim("MAC", mac, name);
        } else {
            assert!(
                ip.is_empty() && net["IPAddress"].is_null(),
                "{name}: --network=none has an address: {v}"
            );
        }
        // The host devices it holds, from its state.
        let state: serde_json::Value = serde_json::from_slice(
            &std::fs::read(root.join("runs").join(&id).join("state.json")).expect("state"),
        )
        .expect("state json");
        if let Some(veth) = state["veth"].as_str() {
            claim("link", veth.to_string(), name);
        }
        for t in state["taps"].as_array().into_iter().flatten() {
            claim("link", t.as_str().unwrap_or_default().to_string(), name);
        }
        if r.plan.bridge {
            assert_eq!(
                state["veth"].is_string() as usize + state["taps"].as_array().map_or(0, Vec::len),
                1,
                "{name}: {state}"
            );
        }
        if let Some(p) = r.plan.port {
            claim("port", p.to_string(), name);
            let got = fetch_id(p).unwrap_or_else(|e| panic!("{name}: 127.0.0.1:{p}: {e}"));
            assert_eq!(got, name, "127.0.0.1:{p} answered for another run");
        }
    }
    let (_, ps, _) = env.run(&["ps", "-q"]);
    assert_eq!(ps.lines().count(), live.len(), "ps: {ps}");
    eprintln!(
        "{} runs up at once: {} IPs, {} MACs, {} links, {} ports, all distinct",
        live.len(),
        seen.get("IP").map_or(0, BTreeMap::len),
        seen.get("MAC").map_or(0, BTreeMap::len),
        seen.get("link").map_or(0, BTreeMap::len),
        seen.get("port").map_or(0, BTreeMap::len),
    );

    // Stop them all at once: SIGTERM to the attached rvmms, `stop` for the detached runs.
    let stoppers: Vec<_> = live
        .iter()
        .map(|r| {
            if r.plan.detached {
                let (env, name) = (env.clone(), r.plan.name.clone());
                Some(std::thread::spawn(move || {
                    env.run(&["stop", "-t", "300", &name])
                }))
            } else {
                // SAFETY: kill(2) on a child of ours.
                unsafe { libc::kill(r.child.id() as i32, libc::SIGTERM) };
                None
            }
        })
        .collect();
    let mut bad = Vec::new();
    for (r, s) in runs.iter_mut().filter(|r| r.ready.is_some()).zip(stoppers) {
        let name = r.plan.name.clone();
        if let Some(s) = s {
            let (code, _, err) = s.join().expect("stop");
            if code != 0 {
                bad.push(format!("{name}: stop: {err}"));
                continue;
            }
            let (code, status, werr) = env.run(&["wait", &name]);
            let (_, out, err) = env.run(&["logs", &name]);
            if code != 0 || status.trim() != "0" {
                // With the run's log: a run's own error line goes there.
                bad.push(format!("{name}: wait: {status}{werr}; its log: {out}{err}"));
            }
            if !out.contains("bye") {
                bad.push(format!("{name}: no bye in the log: {out}"));
            }
            if r.plan.iso == Iso::Vm && !err.contains("rvmm-timings warm=1") {
                bad.push(format!("{name}: not started from the snapshot: {err}"));
            }
            let (code, _, err) = env.run(&["rm", &name]);
            if code != 0 {
                bad.push(format!("{name}: rm: {err}"));
            }
        } else {
            let st = r.child.wait().expect("wait");
            std::thread::sleep(Duration::from_millis(100));
            if st.code() != Some(0) || !r.out.lock().expect("lock").contains("bye") {
                bad.push(format!(
                    "{name}: {st}: {}{}",
                    r.out.lock().expect("lock"),
                    r.err.lock().expect("lock")
                ));
            }
            let err = r.err.lock().expect("lock").clone();
            if r.plan.iso == Iso::Vm && !err.contains("rvmm-timings warm=1") {
                bad.push(format!("{name}: not started from the snapshot: {err}"));
            }
        }
    }
    for r in runs.iter_mut().filter(|r| r.ready.is_none()) {
        let _ = r.child.wait();
    }
    let total = t0.elapsed();
    done.store(true, Ordering::SeqCst);
    let side: Vec<String> = jobs
        .into_iter()
        .flat_map(|j| j.join().expect("side job"))
        .collect();
    assert!(bad.is_empty(), "runs that did not end well: {bad:#?}");
    assert!(side.is_empty(), "pulls, rmi or gc failed: {side:#?}");
    reaper.pids.clear();
    eprintln!("all stopped with status 0 after {total:?}");

    // The store and the host afterwards.
    let (code, out, err) = env.run(&["gc"]);
    assert_eq!(code, 0, "gc: {out}{err}");
    common::run::assert_clean(
        &root,
        &env.snaps,
        &ids,
        &before,
        "after the storm and rvmm gc",
    );
    let (_, ps, _) = env.run(&["ps", "-aq"]);
    assert!(ps.trim().is_empty(), "runs left: {ps}");
    let images = rvmm_ok(&root, &["images"]);
    for want in [
        "localhost/busybox",
        "localhost/multi",
        "t/multi",
        "t/busybox",
        "t/zstd",
    ] {
        assert!(images.contains(want), "{want} missing: {images}");
    }
    assert!(!images.contains("alias"), "{images}");
    if let Some(before) = snapshot {
        // The machine's snapshot is as it was; what was added is whole image snapshots (the
        // first VM run of each image saves one; runs racing to save the same keep the first).
        let after = snapshot_files(&env.snaps);
        let (kept, added): (Vec<_>, Vec<_>) = after.into_iter().partition(|f| before.contains(f));
        assert_eq!(
            kept, before,
            "the snapshot the VMs were restored from changed"
        );
        let mut keys: Vec<&str> = added
            .iter()
            .filter_map(|f| f.0.split_once('/'))
            .map(|(k, _)| k)
            .collect();
        keys.dedup();
        for k in &keys {
            let files: Vec<&str> = added
                .iter()
                .filter_map(|f| f.0.strip_prefix(&format!("{k}/")))
                .collect();
            assert_eq!(files, ["identity.txt", "memory", "snapshot.json"], "{k}");
            let id = std::fs::read_to_string(env.snaps.join(k).join("identity.txt"))
                .expect("identity.txt");
            assert!(
                id.contains("\nimage "),
                "{k} is not an image snapshot: {id}"
            );
        }
        assert_eq!(keys.len() * 3, added.len(), "{added:?}");
    }
    drop(reaper);
    eprintln!(
        "{n} runs ({n_vm} VMs) at once: up in {all_up:?}, done in {total:?}; nothing shared, nothing left"
    );
}

/// The snapshot directory's entries with the size, mtime and (for snapshot.json) content of their
/// files: restores map the memory file copy-on-write and must never write to it.
fn snapshot_files(dir: &Path) -> Vec<(String, u64, i64, Vec<u8>)> {
    use std::os::unix::fs::MetadataExt;
    let mut v = Vec::new();
    for e in common::run::ls(dir) {
        let p = dir.join(&e);
        for f in common::run::ls(&p) {
            let m = std::fs::metadata(p.join(&f)).expect("stat");
            let body = if f.ends_with(".json") {
                std::fs::read(p.join(&f)).unwrap_or_default()
            } else {
                Vec::new()
            };
            v.push((format!("{e}/{f}"), m.len(), m.mtime(), body));
        }
        if !p.is_dir() {
            v.push((e, 0, 0, Vec::new()));
        }
    }
    v
}

//! `rvmm logs`, `stop`, `kill`, `wait`, `inspect`: runs that outlive the command (`run -d`), in
//! either isolation. A run is found by name or ID prefix; its rvmm process relays the signals it
//! gets to the workload (a second SIGTERM kills it, as an attached run does with Ctrl-C twice).

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rvmm::run::logs;
use rvmm::run::state::{self, RunState, Status};

use super::Global;

/// The one run that `want` (name or ID prefix) names.
pub fn find(global: &Global, want: &str) -> anyhow::Result<RunState> {
    let runs = state::list(&global.root)?;
    let hit: Vec<_> = runs
        .into_iter()
        .filter(|r| r.name == want || (!want.is_empty() && r.id.starts_with(want)))
        .collect();
    match hit.len() {
        0 => bail!("no such run: {want}"),
        1 => Ok(hit.into_iter().next().expect("one")),
        _ => bail!("{want} is ambiguous: more than one run's ID starts with it"),
    }
}

/// Runs `each` on every run `wants` names, in order. A name that finds no run, or that `each`
/// refuses, is one line on stderr; the status is 1 when any failed, as with Docker's commands.
fn for_each_run(
    global: &Global,
    wants: &[String],
    mut each: impl FnMut(&str, RunState) -> anyhow::Result<()>,
) -> u8 {
    let mut failed = false;
    for want in wants {
        if let Err(e) = find(global, want).and_then(|r| each(want, r)) {
            eprintln!("rvmm: {e:#}");
            failed = true;
        }
    }
    u8::from(failed)
}

/// The run's state as it is now on disk (None once it is removed, e.g. by `--rm`).
fn reread(r: &RunState) -> Option<RunState> {
    RunState::load(&r.dir)
}

#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// Keep following the log until the run ends.
    #[arg(short, long)]
    pub follow: bool,
    /// Only the last N records ("all" for every one).
    #[arg(short = 'n', long, value_name = "N")]
    pub tail: Option<String>,
    /// Only records since this time: RFC 3339 (2026-12-04T18:00:00Z), Unix seconds, or a
    /// duration ago (30s, 10m, 2h).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Show each record's time.
    #[arg(short, long)]
    pub timestamps: bool,
    /// The run (name or ID prefix).
    pub run: String,
}

/// `--since` as nanoseconds since the epoch.
fn since_nanos(s: &str) -> anyhow::Result<u128> {
    if let Some(n) = logs::parse_rfc3339(s) {
        return Ok(n);
    }
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok((secs * 1e9) as u128);
        }
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let mult = match unit {
        "s" => 1u64,
        "m" => 60,
        "h" => 3600,
        _ => bail!("--since {s:?}: give an RFC 3339 time, Unix seconds, or a duration like 10m"),
    };
    let ago = num
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| anyhow::anyhow!("--since {s:?} is out of range"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    Ok(now.saturating_sub(u128::from(ago) * 1_000_000_000))
}

pub fn logs(args: LogsArgs, global: &Global) -> anyhow::Result<u8> {
    let run = find(global, &args.run)?;
    let since = args.since.as_deref().map(since_nanos).transpose()?;
    let tail = match args.tail.as_deref() {
        None | Some("all") => None,
        Some(n) => Some(
            n.parse::<usize>()
                .map_err(|_| anyhow::anyhow!("--tail {n:?} is not a number"))?,
        ),
    };
    let mut recs = logs::read(&run.dir);
    if let Some(t) = since {
        recs.retain(|r| r.nanos() >= t);
    }
    if let Some(n) = tail {
        let skip = recs.len().saturating_sub(n);
        recs.drain(..skip);
    }
    let print = |recs: &[logs::Record]| {
        let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
        for r in recs {
            let w: &mut dyn Write = if r.stream == "stderr" {
                &mut err
            } else {
                &mut out
            };
            if args.timestamps {
                let _ = write!(w, "{} ", r.time);
            }
            let _ = w.write_all(r.log.as_bytes());
        }
        let _ = out.flush();
    };
    print(&recs);
    if !args.follow {
        return Ok(0);
    }
    // Follow: new records as they come, until the run has ended and its log is read to the end.
    let mut seen = logs::read(&run.dir).len();
    loop {
        let ended = reread(&run).is_none_or(|s| s.status == Status::Exited || !s.alive());
        let all = logs::read(&run.dir);
        // A rotation starts the current file over: count from what is there now.
        if all.len() < seen {
            seen = 0;
        }
        let new: Vec<_> = all[seen..]
            .iter()
            .filter(|r| since.is_none_or(|t| r.nanos() >= t))
            .cloned()
            .collect();
        seen = all.len();
        print(&new);
        if ended {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[derive(clap::Args, Debug)]
pub struct StopArgs {
    /// Seconds to wait after the stop signal before killing the workload (default: the run's
    /// --stop-timeout, else 10; -1 waits for ever).
    #[arg(
        short = 't',
        long = "time",
        value_name = "SECONDS",
        allow_negative_numbers = true
    )]
    pub time: Option<i64>,
    /// The runs (names or ID prefixes).
    #[arg(required = true)]
    pub runs: Vec<String>,
}

/// Sends `sig` to the run's rvmm process, which relays it to the workload.
fn signal_run(r: &RunState, sig: i32) -> bool {
    // SAFETY: kill with a pid we checked is the run's live rvmm (alive() compares start times).
    r.alive() && unsafe { libc::kill(r.rvmm_pid, sig) } == 0
}

/// Kills the workload: its rvmm takes a second SIGTERM (or SIGINT) as "kill it now", as an
/// attached run does with Ctrl-C twice.
fn kill_run(r: &RunState) {
    for _ in 0..2 {
        signal_run(r, libc::SIGTERM);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the run has ended (or `limit` passed): its final state, if it still exists.
fn wait_end(r: &RunState, limit: Option<Duration>) -> Option<RunState> {
    let t0 = Instant::now();
    loop {
        match reread(r) {
            Some(s) if s.status == Status::Exited => return Some(s),
            Some(s) if !s.alive() => {
                // Its rvmm died without finishing the state: gc records it.
                state::gc(r.dir.parent().and_then(|p| p.parent()).unwrap_or(&r.dir));
                return reread(r);
            }
            None => return None,
            Some(_) => {}
        }
        if limit.is_some_and(|l| t0.elapsed() >= l) {
            return reread(r);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn stop(args: StopArgs, global: &Global) -> anyhow::Result<u8> {
    Ok(for_each_run(global, &args.runs, |want, r| {
        if r.alive() {
            signal_run(&r, r.stop_signal);
            let secs = args.time.or(r.stop_timeout.map(i64::from)).unwrap_or(10);
            let limit = u64::try_from(secs).ok().map(Duration::from_secs);
            let s = wait_end(&r, limit);
            if s.as_ref().is_some_and(|s| s.status != Status::Exited) {
                kill_run(&r);
                wait_end(&r, None);
            }
        }
        println!("{want}");
        Ok(())
    }))
}

#[derive(clap::Args, Debug)]
pub struct KillArgs {
    /// The signal (name with or without SIG, or number).
    #[arg(short, long, default_value = "KILL")]
    pub signal: String,
    /// The runs (names or ID prefixes).
    #[arg(required = true)]
    pub runs: Vec<String>,
}

pub fn kill(args: KillArgs, global: &Global) -> anyhow::Result<u8> {
    let sig = rvmm::runspec::signal_number(&args.signal)
        .ok_or_else(|| anyhow::anyhow!("invalid signal {:?}", args.signal))?;
    let relayed = rvmm::run::RELAYED_SIGNALS.contains(&sig) || sig == libc::SIGWINCH;
    if sig != libc::SIGKILL && !relayed {
        bail!(
            "signal {} cannot be delivered to a workload yet (SIGKILL, SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 can)",
            args.signal
        );
    }
    Ok(for_each_run(global, &args.runs, |want, r| {
        if !r.alive() {
            bail!("{want} is not running");
        }
        if sig == libc::SIGKILL {
            kill_run(&r);
        } else {
            signal_run(&r, sig);
        }
        println!("{want}");
        Ok(())
    }))
}

#[derive(clap::Args, Debug)]
pub struct WaitArgs {
    /// The runs (names or ID prefixes).
    #[arg(required = true)]
    pub runs: Vec<String>,
}

pub fn wait(args: WaitArgs, global: &Global) -> anyhow::Result<u8> {
    Ok(for_each_run(global, &args.runs, |want, r| {
        let code = wait_end(&r, None)
            .and_then(|s| s.exit_code)
            .ok_or_else(|| {
                anyhow::anyhow!("{want} was removed before its exit status could be read (--rm)")
            })?;
        println!("{code}");
        Ok(())
    }))
}

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// The runs (names or ID prefixes).
    #[arg(required = true)]
    pub runs: Vec<String>,
}

/// RFC 3339 of Unix seconds, for `inspect`.
fn time_of(secs: Option<u64>) -> serde_json::Value {
    secs.map(|s| {
        serde_json::Value::String(logs::rfc3339(
            std::time::UNIX_EPOCH + Duration::from_secs(s),
        ))
    })
    .unwrap_or(serde_json::Value::Null)
}

pub fn inspect(args: InspectArgs, global: &Global) -> anyhow::Result<u8> {
    let mut out = Vec::new();
    let status = for_each_run(global, &args.runs, |_, r| {
        let mut config: serde_json::Map<String, serde_json::Value> =
            std::fs::read(r.dir.join("spec.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
        let labels: serde_json::Map<String, serde_json::Value> = r
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
            .collect();
        config.insert("Cmd".into(), r.command.clone().into());
        config.insert("Labels".into(), labels.into());
        config.insert(
            "StopSignal".into(),
            rvmm::runspec::signal_name(r.stop_signal).into(),
        );
        config.insert("StopTimeout".into(), r.stop_timeout.into());
        let running = r.alive();
        // Docker's "Mounts": what the spec mounted, volumes by name.
        let mounts: Vec<serde_json::Value> = config
            .get("mounts")
            .and_then(|m| serde_json::from_value::<Vec<rvmm::runspec::Mount>>(m.clone()).ok())
            .unwrap_or_default()
            .iter()
            .map(|m| {
                use rvmm::runspec::MountKind;
                let name = (m.kind == MountKind::Volume)
                    .then(|| std::path::Path::new(&m.source).parent()?.file_name())
                    .flatten()
                    .map(|n| n.to_string_lossy().into_owned());
                serde_json::json!({
                    "Type": match m.kind {
                        MountKind::Bind => "bind",
                        MountKind::Volume => "volume",
                        MountKind::Tmpfs => "tmpfs",
                    },
                    "Name": name,
                    "Source": m.source,
                    "Destination": m.destination,
                    "Mode": m.options,
                    "RW": !m.read_only,
                })
            })
            .collect();
        out.push(serde_json::json!({
            "Id": r.id,
            "Name": r.name,
            "Image": r.image,
            "Isolation": r.isolation.as_str(),
            "Created": time_of(Some(r.created)),
            "State": {
                "Status": if running { "running" } else { "exited" },
                "Running": running,
                "Pid": if running { r.pid } else { 0 },
                "ExitCode": r.exit_code,
                "StartedAt": time_of(r.started_at),
                "FinishedAt": time_of(r.finished_at),
            },
            "Detached": r.detached,
            "Command": r.command,
            "NetworkSettings": {
                "IPAddress": r.address.as_deref().and_then(|a| a.split('/').next()),
                "MacAddress": r.mac,
                "Ports": r.ports,
            },
            "LogPath": r.dir.join(logs::LOG_FILE),
            "Mounts": mounts,
            "Config": config,
        }));
        Ok(())
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(status)
}

/// `rvmm __supervise DIR -- ARGS` (started by `run -d`, not by users).
#[derive(clap::Args, Debug)]
pub struct SuperviseArgs {
    /// The run's directory (ROOT/runs/ID).
    pub dir: std::path::PathBuf,
    #[arg(last = true)]
    pub args: Vec<std::ffi::OsString>,
}

pub fn supervise(a: SuperviseArgs) -> anyhow::Result<u8> {
    let rvmm = std::env::current_exe().context("locating rvmm")?;
    Ok(rvmm::run::supervise::supervise(&rvmm, &a.dir, &a.args)?)
}

/// `rvmm __finish DIR STATUS [--rm] [--memory N] [--log]` (exec'd by `rvmm-shim wait` once the
/// workload ended, in the process that kept the run; not for users).
#[derive(clap::Args, Debug)]
pub struct FinishArgs {
    /// The run's directory (ROOT/runs/ID).
    pub dir: std::path::PathBuf,
    /// How the workload ended: exit:N or signal:N.
    pub status: String,
    /// Remove the run (`--rm`).
    #[arg(long)]
    pub rm: bool,
    /// The run's --memory, in bytes (for the out-of-memory line).
    #[arg(long)]
    pub memory: Option<u64>,
    /// The run is detached: rvmm's last line goes to its log.
    #[arg(long)]
    pub log: bool,
}

pub fn finish(a: FinishArgs) -> anyhow::Result<u8> {
    let Some(status) = rvmm_shim::keep::parse_status(&a.status) else {
        bail!(
            "invalid workload status {:?} (exit:N or signal:N)",
            a.status
        );
    };
    Ok(rvmm::container::finish_kept(
        &a.dir, status, a.rm, a.memory, a.log,
    ))
}

/// `rm -f`: stops a running run first (SIGKILL, as Docker does).
pub fn force_stop(r: &RunState) {
    if r.alive() {
        kill_run(r);
        wait_end(r, Some(Duration::from_secs(30)));
    }
}

#[derive(clap::Args, Debug)]
#[command(trailing_var_arg = true)]
pub struct ExecArgs {
    /// Keep stdin attached.
    #[arg(short, long)]
    pub interactive: bool,
    /// Allocate a pseudo-terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// User to run as: name, uid, name:group or uid:gid (resolved in the workload's root).
    #[arg(short, long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,
    /// Working directory (default: the run's).
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// Set an environment variable (KEY=VALUE) on top of the run's.
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// The run (name or ID prefix).
    pub run: String,
    /// Command and arguments.
    #[arg(required = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// `rvmm exec`: a new process in a running workload, with its privileges.
pub fn exec(args: ExecArgs, global: &Global) -> anyhow::Result<u8> {
    let r = find(global, &args.run)?;
    if !r.alive() {
        bail!("{} is not running", args.run);
    }
    let mut spec: rvmm::runspec::RunSpec = std::fs::read(r.dir.join("spec.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| anyhow::anyhow!("{}'s configuration (spec.json) is missing", args.run))?;
    spec.argv = args.command.clone();
    spec.tty = args.tty;
    spec.stdin = args.interactive;
    for e in &args.env {
        let Some((k, _)) = e.split_once('=') else {
            bail!("invalid environment variable {e:?} (KEY=VALUE)");
        };
        spec.env
            .retain(|x| x.split_once('=').map(|p| p.0) != Some(k));
        spec.env.push(e.clone());
    }
    if let Some(w) = &args.workdir {
        if !w.starts_with('/') {
            bail!("the working directory {w:?} is not absolute");
        }
        spec.cwd = w.clone();
    }
    if r.isolation == state::Isolation::Vm {
        // The user is looked up in the image (the guest's root is out of reach from here).
        let user = match &args.user {
            Some(u) => {
                let store = rvmm::image::Store::open(&global.root)?;
                let image = rvmm::image::resolve_with(
                    &store,
                    &r.image,
                    &Default::default(),
                    rvmm::image::PullPolicy::Never,
                )?;
                Some(rvmm::runspec::resolve_user(u, &image.layers)?.0)
            }
            None => None,
        };
        let req = rvmm_proto::ExecRequest {
            argv: spec.argv,
            env: spec.env,
            user,
            cwd: args.workdir.clone(),
            tty: args.tty,
            stdin: args.interactive,
            winsize: None,
        };
        return Ok(rvmm::vm::exec::exec(&r.dir, &args.run, req)?);
    }
    if let Some(u) = &args.user {
        // The user is looked up in the workload's own root, as it is now.
        let root = std::path::PathBuf::from(format!("/proc/{}/root", r.pid));
        spec.user = rvmm::runspec::resolve_user(u, &[root])?.0;
    }
    if !args.interactive {
        // SAFETY: replacing our stdin with /dev/null before the workload inherits it.
        unsafe {
            let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                libc::dup2(fd, 0);
                libc::close(fd);
            }
        }
    }
    Ok(rvmm::container::exec::exec(&r, &spec)?)
}

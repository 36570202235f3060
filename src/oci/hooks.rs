//! OCI hooks: a program run with the container's state on its stdin (config.json `hooks`).

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::config::Hook;

/// How long a hook without a `timeout` may run: longer than any hook engines ship takes, short
/// enough that a hung one does not hang the engine for ever.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `h` with `state` on its stdin, its environment exactly `h.env`, `h.args[0]` as its
/// argv[0]; waits at most its timeout (then kills it). An error names the hook, how it ended and
/// the end of what it wrote to stderr.
pub fn run(h: &Hook, state: &[u8]) -> Result<(), String> {
    let mut cmd = Command::new(&h.path);
    if let Some((argv0, rest)) = h.args.split_first() {
        cmd.arg0(argv0).args(rest);
    }
    cmd.env_clear();
    for e in &h.env {
        if let Some((k, v)) = e.split_once('=') {
            cmd.env(k, v);
        }
    }
    // A hook dies with us (a killed create leaves no hook behind).
    // SAFETY: prctl between fork and exec, async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    };
    // Its own process group: a timeout kills whatever it started too.
    cmd.process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("hook {}: {e}", h.path))?;
    // Written from a thread of its own that blocks SIGPIPE: a hook that exits without reading
    // its stdin is fine (EPIPE, and the signal dies with the thread), and one that neither reads
    // nor exits cannot hang us past its timeout.
    let writer = child.stdin.take().map(|mut stdin| {
        let state = state.to_vec();
        std::thread::spawn(move || {
            let mut set = nix::sys::signal::SigSet::empty();
            set.add(nix::sys::signal::Signal::SIGPIPE);
            let _ = set.thread_block();
            let _ = stdin.write_all(&state);
        })
    });
    let mut stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.take(64 * 1024).read_to_end(&mut s);
        }
        s
    });
    let limit = h
        .timeout
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT);
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                // SAFETY: kill(2) of the hook's own process group.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("hook {}: waiting: {e}", h.path)),
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let err = reader.join().unwrap_or_default();
    let err = String::from_utf8_lossy(&err);
    let tail = err.trim();
    let how = match status {
        Some(s) if s.success() => return Ok(()),
        Some(s) => format!("{s}"),
        None => format!("timed out after {} s", limit.as_secs()),
    };
    Err(if tail.is_empty() {
        format!("hook {} failed: {how}", h.path)
    } else {
        format!("hook {} failed: {how}: {tail}", h.path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(script: &str, timeout: Option<u64>) -> Hook {
        Hook {
            path: "/bin/sh".into(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec!["GREETING=hi".into()],
            timeout,
        }
    }

    #[test]
    fn hooks_get_the_state_and_their_environment_only() {
        let d = tempfile::tempdir().expect("tempdir");
        let out = d.path().join("out");
        let h = hook(
            &format!("cat > {0}; echo \"$GREETING $HOME\" >> {0}", out.display()),
            None,
        );
        run(&h, b"{\"id\":\"x\"}\n").expect("the hook runs");
        assert_eq!(
            std::fs::read_to_string(&out).expect("the hook wrote"),
            "{\"id\":\"x\"}\nhi \n"
        );
    }

    #[test]
    fn a_failing_or_hung_hook_is_an_error_naming_it() {
        let e = run(&hook("echo broken >&2; exit 3", None), b"").expect_err("the hook fails");
        assert!(
            e.contains("/bin/sh") && e.contains("3") && e.contains("broken"),
            "{e}"
        );
        let t = Instant::now();
        let e = run(&hook("sleep 30", Some(1)), b"").expect_err("the hook fails");
        assert!(e.contains("timed out"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
        let e = run(
            &Hook {
                path: "/nonexistent/hook".into(),
                ..Hook::default()
            },
            b"",
        )
        .expect_err("the hook fails");
        assert!(e.contains("/nonexistent/hook"), "{e}");
    }
}

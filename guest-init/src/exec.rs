//! `rvmm exec` inside the guest: processes started next to the workload, with its root, limits
//! and privileges (the workload's spec with the exec's argv, env, user, cwd and terminal), their
//! stdio relayed as exec frames on the control port (docs/vm-channel.md).

use std::collections::VecDeque;

use rvmm_proto::{frame, ExecRequest, RunSpec};

use crate::sys::write_all;
use crate::Channel;
use rvmm_workload::Failure;

/// Execs running at once; a request beyond it fails with 125.
const MAX_EXECS: usize = 32;
/// Stdin bytes an exec may have waiting for its process to read them; past it the rest of its
/// input is dropped and its stdin closed (the host does not wait for the guest's reads).
const MAX_PENDING_STDIN: usize = 8 << 20;
/// Bytes read from an exec's output at a time (one frame with its id).
const CHUNK: usize = 32 * 1024;
/// How long an exited exec's pty may stay open (a background process) before its EXIT goes.
const LATE: std::time::Duration = std::time::Duration::from_millis(500);

struct Exec {
    id: u32,
    pid: libc::pid_t,
    /// Its stdout (with a tty: the pty's master), stderr and stdin; -1 once closed.
    out: libc::c_int,
    err: libc::c_int,
    input: libc::c_int,
    tty: bool,
    pending: VecDeque<u8>,
    /// Stdin ended on the host: close it once `pending` is written.
    input_eof: bool,
    status: Option<i32>,
    exited_at: Option<std::time::Instant>,
    /// Readable once the process has exited (-1: none, or reaped).
    pidfd: libc::c_int,
}

impl Exec {
    fn close(fd: &mut libc::c_int) {
        if *fd >= 0 {
            // SAFETY: closing an fd this exec owns, once.
            unsafe { libc::close(*fd) };
            *fd = -1;
        }
    }
}

#[derive(Default)]
pub struct Execs {
    list: Vec<Exec>,
}

fn pipe() -> Option<[libc::c_int; 2]> {
    let mut p = [0; 2];
    // SAFETY: p is a valid array of two ints.
    (unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } == 0).then_some(p)
}

fn set_nonblocking(fd: libc::c_int) {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

impl Execs {
    /// Starts exec `id` from the JSON request `payload`; reports EXEC_STARTED or EXEC_FAILED.
    pub fn start(&mut self, ch: &mut Channel, workload: &RunSpec, id: u32, payload: &[u8]) {
        let fail = |ch: &mut Channel, code: u8, msg: &str| {
            let mut p = vec![code];
            p.extend_from_slice(msg.as_bytes());
            ch.send(frame::EXEC_FAILED, &frame::with_id(id, &p));
        };
        if self.list.iter().any(|e| e.id == id) {
            return; // a host bug or a replay: the first one stands
        }
        if self.list.len() >= MAX_EXECS {
            return fail(ch, 125, "too many execs at once in this VM");
        }
        let Ok(req) = serde_json::from_slice::<ExecRequest>(payload) else {
            return fail(ch, 125, "malformed exec request");
        };
        if req.argv.is_empty() {
            return fail(ch, 125, "no command");
        }
        let mut spec = workload.clone();
        spec.argv = req.argv;
        // The hint is where the workload's argv[0] is, not the exec's.
        spec.exec_hint = None;
        spec.env = req.env;
        if let Some(u) = req.user {
            spec.user = u;
        }
        if let Some(cwd) = req.cwd {
            spec.cwd = cwd;
        }
        spec.tty = req.tty;
        spec.stdin = req.stdin;
        match spawn(&spec, req.winsize) {
            Ok((pid, out, err, input)) => {
                for fd in [out, err, input] {
                    if fd >= 0 {
                        set_nonblocking(fd);
                    }
                }
                self.list.push(Exec {
                    id,
                    pid,
                    out,
                    err,
                    input,
                    tty: spec.tty,
                    pending: VecDeque::new(),
                    input_eof: false,
                    status: None,
                    exited_at: None,
                    pidfd: crate::sys::pidfd_open(pid),
                });
                ch.send(frame::EXEC_STARTED, &frame::with_id(id, &[]));
            }
            Err(f) => fail(ch, f.status, &f.message),
        }
    }

    /// A host frame for exec `id` other than EXEC.
    pub fn input(&mut self, kind: u8, id: u32, payload: &[u8]) {
        let Some(e) = self.list.iter_mut().find(|e| e.id == id) else {
            return;
        };
        match kind {
            frame::EXEC_STDIN if e.input >= 0 && !e.input_eof => {
                if e.pending.len() + payload.len() > MAX_PENDING_STDIN {
                    e.pending.clear();
                    e.input_eof = true;
                } else {
                    e.pending.extend(payload);
                }
            }
            frame::EXEC_STDIN_EOF => e.input_eof = true,
            frame::EXEC_SIGNAL if payload.len() == 4 => {
                let sig = frame::le32_at(payload, 0).map_or(0, i32::from_le_bytes);
                if e.status.is_none() {
                    // SAFETY: signalling the exec's process group, then the process.
                    unsafe {
                        libc::kill(-e.pid, sig);
                        libc::kill(e.pid, sig);
                    }
                }
            }
            frame::EXEC_WINSIZE if payload.len() == 4 && e.tty && e.out >= 0 => {
                let ws = libc::winsize {
                    ws_row: u16::from_le_bytes([payload[0], payload[1]]),
                    ws_col: u16::from_le_bytes([payload[2], payload[3]]),
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                // SAFETY: setting the pty's size from a filled winsize.
                unsafe { libc::ioctl(e.out, libc::TIOCSWINSZ, &ws) };
            }
            _ => {}
        }
    }

    /// What to poll: (fd, events) of every exec's open streams.
    pub fn pollfds(&self) -> Vec<libc::pollfd> {
        let mut v = Vec::new();
        for e in &self.list {
            for fd in [e.out, e.err] {
                if fd >= 0 {
                    v.push(libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    });
                }
            }
            if e.pidfd >= 0 {
                v.push(libc::pollfd {
                    fd: e.pidfd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            if e.input >= 0 && (!e.pending.is_empty() || e.input_eof) {
                v.push(libc::pollfd {
                    fd: e.input,
                    events: libc::POLLOUT,
                    revents: 0,
                });
            }
        }
        v
    }

    /// Moves what is ready: output to the host, pending input to the processes.
    pub fn relay(&mut self, ch: &mut Channel, buf: &mut [u8]) {
        let chunk = buf.len().min(CHUNK);
        for e in &mut self.list {
            for (is_err, kind) in [(false, frame::EXEC_STDOUT), (true, frame::EXEC_STDERR)] {
                let fd = if is_err { e.err } else { e.out };
                if fd < 0 {
                    continue;
                }
                // A few reads per round: one busy exec does not starve the others.
                for _ in 0..8 {
                    // SAFETY: reading into our buffer.
                    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), chunk) };
                    if n > 0 {
                        ch.send(kind, &frame::with_id(e.id, &buf[..n as usize]));
                        continue;
                    }
                    let again = n < 0
                        && matches!(
                            std::io::Error::last_os_error().raw_os_error(),
                            Some(libc::EAGAIN) | Some(libc::EINTR)
                        );
                    if !again {
                        // EOF, or EIO from a pty whose slave is gone.
                        Exec::close(if is_err { &mut e.err } else { &mut e.out });
                        if e.tty {
                            e.input = -1; // it was the master too
                        }
                    }
                    break;
                }
            }
            while e.input >= 0 && !e.pending.is_empty() {
                let (a, _) = e.pending.as_slices();
                // SAFETY: writing from a live slice.
                let n = unsafe { libc::write(e.input, a.as_ptr().cast(), a.len()) };
                if n <= 0 {
                    let err = std::io::Error::last_os_error().raw_os_error();
                    if n < 0 && matches!(err, Some(libc::EAGAIN) | Some(libc::EINTR)) {
                        break;
                    }
                    // The process closed its stdin: drop the rest.
                    e.pending.clear();
                    Exec::close(&mut e.input);
                    break;
                }
                e.pending.drain(..n as usize);
            }
            if e.input_eof && e.pending.is_empty() && e.input >= 0 {
                if e.tty {
                    // The host's stdin ended: ^D, as a terminal would send.
                    write_all(e.input, &[4]);
                    e.input = -1; // the master is `out`'s too: closed with it
                } else {
                    Exec::close(&mut e.input);
                }
            }
        }
    }

    /// A reaped child: true when it was an exec.
    pub fn reaped(&mut self, pid: libc::pid_t, status: i32) -> bool {
        match self.list.iter_mut().find(|e| e.pid == pid) {
            Some(e) => {
                e.status = Some(status);
                e.exited_at = Some(std::time::Instant::now());
                Exec::close(&mut e.pidfd);
                true
            }
            None => false,
        }
    }

    /// When the loop must look again without an event: an exec without a pidfd (the kernel has
    /// none) needs its 50 ms rounds; an exited one whose pty stays open, its half second.
    pub fn deadlines(&self) -> Vec<u128> {
        let mut v = Vec::new();
        for e in &self.list {
            if e.status.is_none() && e.pidfd < 0 {
                v.push(50);
            }
            if let Some(t) = e.exited_at {
                v.push(LATE.saturating_sub(t.elapsed()).as_millis() + 1);
            }
        }
        v
    }

    /// Sends EXEC_EXIT for every exec that has exited and whose output is drained (or, with a
    /// pty kept open by a background process, after half a second), and forgets it.
    pub fn finish(&mut self, ch: &mut Channel) {
        let mut i = 0;
        while i < self.list.len() {
            let e = &mut self.list[i];
            let drained = e.out < 0 && e.err < 0;
            let late = e.exited_at.is_some_and(|t| t.elapsed() > LATE);
            match e.status {
                Some(s) if drained || late => {
                    ch.send(frame::EXEC_EXIT, &frame::with_id(e.id, &s.to_le_bytes()));
                    if !e.tty {
                        Exec::close(&mut e.input);
                    }
                    Exec::close(&mut e.out);
                    Exec::close(&mut e.err);
                    Exec::close(&mut e.pidfd);
                    self.list.swap_remove(i);
                }
                _ => i += 1,
            }
        }
    }
}

/// Forks the exec's process: (pid, stdout or pty master, stderr, stdin or pty master), -1 for
/// what it does not have. A failure has the workload's statuses (125, 126, 127).
fn spawn(
    spec: &RunSpec,
    winsize: Option<(u16, u16)>,
) -> Result<(libc::pid_t, libc::c_int, libc::c_int, libc::c_int), Failure> {
    let os = |what: &str| Failure::os(what);
    let err_pipe = pipe().ok_or_else(|| os("pipe"))?;
    let mut close_later = vec![err_pipe[0], err_pipe[1]];
    let result = (|| {
        let (out, err, input): ([libc::c_int; 2], [libc::c_int; 2], Option<[libc::c_int; 2]>);
        if spec.tty {
            let (mut m, mut s) = (0, 0);
            let ws = winsize.map(|(r, c)| libc::winsize {
                ws_row: r,
                ws_col: c,
                ws_xpixel: 0,
                ws_ypixel: 0,
            });
            // SAFETY: openpty fills two fds; the winsize pointer is null or a live value.
            let r = unsafe {
                libc::openpty(
                    &mut m,
                    &mut s,
                    std::ptr::null_mut(),
                    std::ptr::null(),
                    ws.as_ref().map_or(std::ptr::null(), |w| w as *const _),
                )
            };
            if r != 0 {
                return Err(os("openpty"));
            }
            // SAFETY: the master is ours; it must not reach the process.
            unsafe { libc::fcntl(m, libc::F_SETFD, libc::FD_CLOEXEC) };
            // SAFETY: as above, the slave is closed in the child after dup2.
            unsafe { libc::fcntl(s, libc::F_SETFD, libc::FD_CLOEXEC) };
            close_later.push(s);
            out = [m, s];
            err = [-1, -1];
            input = None;
        } else {
            out = pipe().ok_or_else(|| os("pipe"))?;
            close_later.push(out[1]);
            err = pipe().ok_or_else(|| os("pipe"))?;
            close_later.push(err[1]);
            input = if spec.stdin {
                let p = pipe().ok_or_else(|| os("pipe"))?;
                close_later.push(p[0]);
                Some(p)
            } else {
                None
            };
        }
        // SAFETY: fork in a single-threaded process.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(os("fork"));
        }
        if pid == 0 {
            crate::workload::child(spec, err_pipe[1], out, err, input, false);
        }
        Ok((pid, out, err, input))
    })();
    let (pid, out, err, input) = match result {
        Ok(r) => r,
        Err(e) => {
            for fd in close_later {
                // SAFETY: closing fds made above.
                unsafe { libc::close(fd) };
            }
            return Err(e);
        }
    };
    // The child's ends go; the exec-error pipe says whether it got as far as exec.
    for fd in close_later.iter().copied().filter(|&fd| fd != err_pipe[0]) {
        // SAFETY: closing the child's ends (and our copy of the error pipe's write end).
        unsafe { libc::close(fd) };
    }
    let mut msg = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        // SAFETY: reading into a local buffer.
        let n = unsafe { libc::read(err_pipe[0], b.as_mut_ptr().cast(), b.len()) };
        if n > 0 {
            msg.extend_from_slice(&b[..n as usize]);
        } else if n == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
    // SAFETY: closing the error pipe's read end.
    unsafe { libc::close(err_pipe[0]) };
    if !msg.is_empty() {
        let mut st = 0;
        // SAFETY: reaping our child, which failed before exec.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        for fd in [out[0], err[0], input.map_or(-1, |p| p[1])] {
            if fd >= 0 {
                // SAFETY: closing our ends.
                unsafe { libc::close(fd) };
            }
        }
        return Err(Failure {
            status: msg[0],
            message: String::from_utf8_lossy(&msg[1..]).into_owned(),
        });
    }
    let stdin = if spec.tty {
        if spec.stdin {
            out[0]
        } else {
            -1
        }
    } else {
        input.map_or(-1, |p| p[1])
    };
    Ok((pid, out[0], err[0], stdin))
}

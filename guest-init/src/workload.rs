//! Starting the workload on the channel's ports, and relaying signals (and, with -t, the pty)
//! until it exits.

use rvmm_proto::{frame, RunSpec, Security};

use crate::sys::{c, write_all};
use crate::{Channel, Fail};
use rvmm_workload::Failure;

fn pipe() -> Result<[libc::c_int; 2], Fail> {
    let mut p = [0; 2];
    // SAFETY: p is a valid array of two ints.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Failure::os("pipe"));
    }
    Ok(p)
}

/// A process forked before READY that has already dropped its bounding set and installed the
/// boot-time seccomp filter, and waits to become the workload. Installing the filter is the costliest step of starting a
/// workload on kvm_pvm (about 1.4 s), and this way a snapshot holds it done.
pub struct Zygote {
    pid: libc::pid_t,
    sock: libc::c_int,
}

impl Drop for Zygote {
    /// Unused, it sees its socket close and exits.
    fn drop(&mut self) {
        // SAFETY: closing our end of the socket pair, once.
        unsafe { libc::close(self.sock) };
    }
}

/// What the zygote gets (and, as fds in this order: the root directory, the exec-error pipe,
/// stdout, then stderr and stdin when present).
#[derive(serde::Serialize, serde::Deserialize)]
struct Handoff {
    spec: RunSpec,
    has_err: bool,
    has_in: bool,
}

/// Forks the zygote for `security` (none when it has no seccomp filter to install).
pub fn zygote(security: &Security) -> Option<Zygote> {
    if !security.enforce || security.seccomp.is_empty() {
        return None;
    }
    let mut sv = [0; 2];
    // SAFETY: sv is a valid array of two ints.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            sv.as_mut_ptr(),
        )
    };
    if r != 0 {
        return None;
    }
    // SAFETY: fork in a single-threaded process.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        // SAFETY: closing our own socket pair.
        unsafe {
            libc::close(sv[0]);
            libc::close(sv[1]);
        }
        return None;
    }
    if pid == 0 {
        // SAFETY: closing the parent's end in the child.
        unsafe { libc::close(sv[0]) };
        // Its buffers, heap and stack grown, its own copy of what it shares with PID 1, and
        // PID 1's code mapped, before the snapshot (fork copies no file mappings): a warm start
        // then does not fault them in.
        let mut mem = ZygoteMemory {
            buf: vec![0u8; 1 << 20],
            stack: vec![0u8; 256 << 10],
        };
        crate::sys::touch_pages(mem.buf.as_mut_ptr(), 64 << 10);
        let top = mem.stack.len() - (64 << 10);
        crate::sys::touch_pages(mem.stack[top..].as_mut_ptr(), 64 << 10);
        crate::sys::warm(256 << 10, 64 << 10);
        crate::sys::prefault();
        // The bounding set and the filter are the same for every run of the host. The filter
        // first, while PID 1's full capabilities let it go in without no_new_privs.
        if rvmm_workload::privileges::install_seccomp(&security.seccomp).is_err()
            || rvmm_workload::privileges::drop_bounding(security.caps).is_err()
        {
            // The parent sees the socket close and forks the workload itself.
            // SAFETY: leaving the child.
            unsafe { libc::_exit(125) };
        }
        // Installed: tell the parent, which waits for it so a snapshot never catches the
        // installation half done.
        // SAFETY: a one-byte send from a static buffer.
        unsafe { libc::send(sv[1], b"k".as_ptr().cast(), 1, libc::MSG_NOSIGNAL) };
        zygote_main(sv[1], mem);
    }
    // SAFETY: closing the child's end in the parent.
    unsafe { libc::close(sv[1]) };
    let z = Zygote { pid, sock: sv[0] };
    let mut b = [0u8; 1];
    (recv_from_zygote(z.sock, &mut b) == 1).then_some(z)
}

/// One message from the zygote's socket into `buf` (retried on EINTR); its length, 0 at EOF, or
/// -1.
fn recv_from_zygote(sock: libc::c_int, buf: &mut [u8]) -> isize {
    loop {
        // SAFETY: a receive into the caller's buffer, at most its length.
        let n = unsafe { libc::recv(sock, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return n;
        }
    }
}

/// The zygote's receive buffer (for its handoff) and the stack of its exec child, allocated
/// before the snapshot.
struct ZygoteMemory {
    buf: Vec<u8>,
    stack: Vec<u8>,
}

/// The zygote: waits for its handoff, enters the workload's root, takes the workload's
/// privileges and starts it (see below); then sleeps.
fn zygote_main(sock: libc::c_int, mem: ZygoteMemory) -> ! {
    let ZygoteMemory { mut buf, mut stack } = mem;
    let Some((n, fds)) = crate::sys::recv_with_fds(sock, &mut buf) else {
        // SAFETY: leaving the zygote: the workload was forked another way, or never started.
        unsafe { libc::_exit(0) }
    };
    let Ok(h) = serde_json::from_slice::<Handoff>(&buf[..n]) else {
        // SAFETY: as above.
        unsafe { libc::_exit(125) }
    };
    // `buf` stays: unmapping it would cost the start more than its pages cost the sleeping zygote.
    if fds.len() != 3 + usize::from(h.has_err) + usize::from(h.has_in) {
        // SAFETY: as above.
        unsafe { libc::_exit(125) }
    }
    let (root, err_fd, out) = (fds[0], fds[1], fds[2]);
    let err = if h.has_err { fds[3] } else { -1 };
    let input = h.has_in.then(|| [fds[fds.len() - 1], -1]);
    // PID 1 moved to the workload's root after this process forked: follow it.
    // SAFETY: directory changes with a valid fd and NUL-terminated paths.
    let entered = unsafe {
        libc::fchdir(root) == 0
            && libc::chroot(c(".").as_ptr()) == 0
            && libc::chdir(c("/").as_ptr()) == 0
    };
    // From here on a failure is the workload's: PID 1 gets this process as the workload (which
    // it reaps, with the reason on the error pipe) rather than trying again with a fork.
    let me = std::process::id() as libc::pid_t;
    if !entered {
        reply_pid(sock, me);
        let why = format!("entering the root: {}", std::io::Error::last_os_error());
        fail_child(err_fd, 125, why)
    }
    // SAFETY: closing our copy of the root fd.
    unsafe { libc::close(root) };
    crate::sys::trace("zygote: in the root");
    let prog = match setup_child(&h.spec, [-1, out], [-1, err], input, true, false) {
        Ok(p) => p,
        Err(f) => {
            reply_pid(sock, me);
            fail_child(err_fd, f.status, f.message)
        }
    };
    // The zygote's own address space is a copy of PID 1's: an exec here would tear it down
    // first (~0.25 s of emulated kernel work on kvm_pvm). A child that shares it (CLONE_VM,
    // the zygote waiting as for vfork) execs instead, as a child of PID 1 (CLONE_PARENT); the
    // zygote then only sleeps, and its memory goes with the VM.
    let args = ExecArgs {
        prog: &prog,
        spec: &h.spec,
        err_fd,
    };
    // SAFETY: the child runs on its own stack in our memory while we wait (CLONE_VFORK); `args`
    // and the stack outlive it (it has exec'd or exited when clone returns).
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(stack.len()) as usize & !15;
        libc::clone(
            exec_child,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT | libc::SIGCHLD,
            &args as *const ExecArgs as *mut libc::c_void,
        )
    };
    if pid < 0 {
        // No clone: the zygote becomes the workload itself, as before.
        reply_pid(sock, me);
        let f = exec_in_session(&h.spec, &prog);
        fail_child(err_fd, f.status, f.message)
    }
    reply_pid(sock, pid);
    // Nothing of the workload's may stay open here: its pipes, ports and pty end with it.
    // SAFETY: closing every descriptor of this process.
    if unsafe { libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) } != 0 {
        for fd in 0..1024 {
            // SAFETY: as above, one at a time.
            unsafe { libc::close(fd) };
        }
    }
    loop {
        // SAFETY: sleeping until the VM ends.
        unsafe { libc::pause() };
    }
}

/// What the zygote's exec child needs (in the zygote's memory, which it shares).
struct ExecArgs<'a> {
    prog: &'a std::ffi::CString,
    spec: &'a RunSpec,
    err_fd: libc::c_int,
}

/// The zygote's exec child: its own session, then the workload's program.
extern "C" fn exec_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the zygote's ExecArgs, alive while the zygote waits for this exec.
    let a = unsafe { &*(arg as *const ExecArgs) };
    let f = exec_in_session(a.spec, a.prog);
    fail_child(a.err_fd, f.status, f.message)
}

/// Leads a new session (with -t, of the terminal on stdout), then execs `prog`; returns only if
/// that failed.
fn exec_in_session(spec: &RunSpec, prog: &std::ffi::CString) -> Failure {
    // SAFETY: session and controlling-terminal calls on our own stdio.
    unsafe {
        libc::setsid();
        if spec.tty {
            libc::ioctl(1, libc::TIOCSCTTY, 0);
        }
    }
    crate::sys::trace("child: ready to exec");
    rvmm_workload::exec(prog, &spec.argv, &spec.env)
}

/// Tells PID 1 which process is the workload (the zygote's answer to its handoff).
fn reply_pid(sock: libc::c_int, pid: libc::pid_t) {
    let b = pid.to_le_bytes();
    // SAFETY: a send from a local buffer.
    unsafe { libc::send(sock, b.as_ptr().cast(), b.len(), libc::MSG_NOSIGNAL) };
}

/// A child's failure to its parent: status and message on the error pipe, then exit.
fn fail_child(err_fd: libc::c_int, code: u8, msg: String) -> ! {
    let mut b = vec![code];
    b.extend_from_slice(msg.as_bytes());
    write_all(err_fd, &b);
    // SAFETY: leaving the child.
    unsafe { libc::_exit(code as i32) }
}

/// Hands the workload to the zygote; the workload's pid (a child of this process), or None (the
/// zygote is gone) to fork instead.
fn handoff(
    z: Zygote,
    spec: &RunSpec,
    err_fd: libc::c_int,
    out: libc::c_int,
    err: libc::c_int,
    input: Option<libc::c_int>,
) -> Option<libc::pid_t> {
    // SAFETY: NUL-terminated path.
    let root = unsafe {
        libc::open(
            c("/").as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    let h = Handoff {
        spec: spec.clone(),
        has_err: err >= 0,
        has_in: input.is_some(),
    };
    let mut fds = vec![root, err_fd, out];
    if err >= 0 {
        fds.push(err);
    }
    fds.extend(input);
    let sent = root >= 0
        && serde_json::to_vec(&h)
            .map_err(|e| e.to_string())
            .and_then(|j| crate::sys::send_with_fds(z.sock, &j, &fds))
            .is_ok();
    // SAFETY: closing our root fd; killing a zygote we could not reach.
    unsafe {
        if root >= 0 {
            libc::close(root);
        }
        if !sent {
            libc::kill(z.pid, libc::SIGKILL);
        }
    }
    if !sent {
        return None;
    }
    // The zygote answers with the workload's pid once it has exec'd (or failed: its error is on
    // the error pipe). No answer: it died before it started anything.
    let mut b = [0u8; 4];
    (recv_from_zygote(z.sock, &mut b) == 4).then(|| libc::pid_t::from_le_bytes(b))
    // `z` drops here: its socket closes.
}

/// The channel's stdin, stdout and stderr ports (opened once, before READY: Linux lets one open
/// file own a port at a time; the workload gets duplicates).
pub struct Stdio {
    pub stdin: libc::c_int,
    pub stdout: libc::c_int,
    pub stderr: libc::c_int,
}

pub fn run(
    spec: &RunSpec,
    ch: &mut Channel,
    zygote: Option<Zygote>,
    stdio: &Stdio,
) -> Result<i32, Fail> {
    if spec.argv.is_empty() {
        return Err(Failure::setup("no command"));
    }
    let err_pipe = pipe()?;
    // Output: a pty with -t (one stream, as with Docker), else the stdout and stderr ports
    // themselves: the workload's writes go to the host with no copy through this process.
    let (mut master, slave) = (-1, -1);
    let (out_pipe, err_out_pipe) = if spec.tty {
        let mut m = 0;
        let mut s = 0;
        // SAFETY: openpty fills two fds.
        if unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        } != 0
        {
            return Err(Failure::os("openpty"));
        }
        master = m;
        // The terminal is the workload's /dev/console too, as in a container.
        rvmm_workload::bind_console("", &format!("/proc/self/fd/{s}"))?;
        (([m, s]), [-1, -1])
    } else {
        ([-1, stdio.stdout], [-1, stdio.stderr])
    };
    let _ = slave;
    let in_pipe = if spec.stdin && !spec.tty {
        Some([stdio.stdin, -1])
    } else {
        None
    };

    let handed = zygote.and_then(|z| {
        handoff(
            z,
            spec,
            err_pipe[1],
            out_pipe[1],
            err_out_pipe[1],
            in_pipe.map(|p| p[0]),
        )
    });
    let pid = match handed {
        Some(pid) => {
            crate::sys::trace("handed to the zygote");
            pid
        }
        None => {
            crate::sys::trace("fork");
            // SAFETY: fork in a single-threaded process.
            let pid = unsafe { libc::fork() };
            if pid < 0 {
                return Err(Failure::os("fork"));
            }
            if pid == 0 {
                child(spec, err_pipe[1], out_pipe, err_out_pipe, in_pipe, false);
            }
            pid
        }
    };
    // SAFETY: closing the child's ends in the parent (the pty's slave; the ports stay open
    // here, for the pty relay).
    unsafe {
        libc::close(err_pipe[1]);
        if spec.tty {
            libc::close(out_pipe[1]);
        }
    }
    let mut msg = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: reading into a local buffer.
        let n = unsafe { libc::read(err_pipe[0], buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        msg.extend_from_slice(&buf[..n as usize]);
    }
    if !msg.is_empty() {
        let mut st = 0;
        // SAFETY: reaping our child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        return Err(Failure {
            status: msg[0],
            message: String::from_utf8_lossy(&msg[1..]).into_owned(),
        });
    }
    let mut started = crate::INIT_UPTIME_MS
        .load(std::sync::atomic::Ordering::Relaxed)
        .to_le_bytes()
        .to_vec();
    started.extend_from_slice(&crate::sys::uptime_ms().to_le_bytes());
    started.extend_from_slice(
        &crate::SPEC_UPTIME_MS
            .load(std::sync::atomic::Ordering::Relaxed)
            .to_le_bytes(),
    );
    crate::sys::trace("workload exec'd");
    ch.send(frame::STARTED, &started);
    let pty = (master >= 0).then_some(Pty {
        master,
        out: stdio.stdout,
        input: spec.stdin.then_some(stdio.stdin),
    });
    relay(ch, pid, pty, spec)
}

/// With -t: the pty's master, the stdout port its output goes to, and the stdin port its input
/// comes from (with -i).
struct Pty {
    master: libc::c_int,
    out: libc::c_int,
    input: Option<libc::c_int>,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn child(
    spec: &RunSpec,
    err_fd: libc::c_int,
    out: [libc::c_int; 2],
    err: [libc::c_int; 2],
    input: Option<[libc::c_int; 2]>,
    prepared: bool,
) -> ! {
    let prog = match setup_child(spec, out, err, input, prepared, true) {
        Ok(p) => p,
        Err(f) => fail_child(err_fd, f.status, f.message),
    };
    crate::sys::trace("child: ready to exec");
    let f = rvmm_workload::exec(&prog, &spec.argv, &spec.env);
    fail_child(err_fd, f.status, f.message)
}

/// The workload's stdio and privileges in this process (in a new session of its own with
/// `session`); returns the program to exec.
fn setup_child(
    spec: &RunSpec,
    out: [libc::c_int; 2],
    err: [libc::c_int; 2],
    input: Option<[libc::c_int; 2]>,
    prepared: bool,
    session: bool,
) -> Result<std::ffi::CString, Failure> {
    // SAFETY: fd and identity setup in the forked child before exec.
    unsafe {
        if session {
            libc::setsid();
        }
        if spec.tty {
            let slave = out[1];
            if session {
                libc::ioctl(slave, libc::TIOCSCTTY, 0);
            }
            libc::dup2(slave, 0);
            libc::dup2(slave, 1);
            libc::dup2(slave, 2);
            if !spec.stdin {
                let n = libc::open(c("/dev/null").as_ptr(), libc::O_RDONLY);
                libc::dup2(n, 0);
            }
        } else {
            libc::dup2(out[1], 1);
            libc::dup2(err[1], 2);
            match input {
                Some(p) => {
                    libc::dup2(p[0], 0);
                }
                None => {
                    let n = libc::open(c("/dev/null").as_ptr(), libc::O_RDONLY);
                    libc::dup2(n, 0);
                }
            }
        }
    }
    // The same steps as in a container (rvmm-workload): limits, bounding set, user, caps, cwd,
    // PATH lookup, seccomp.
    rvmm_workload::privileges::become_workload(spec, prepared)
}

/// With -t, how long the pty may stay open (a background process) once the workload has exited.
const DRAIN: std::time::Duration = std::time::Duration::from_millis(500);

/// Handles control frames (signals, window sizes) and, with -t, moves the pty's bytes, until the
/// workload is gone; returns its status (Docker numbering).
fn relay(
    ch: &mut Channel,
    pid: libc::pid_t,
    mut pty: Option<Pty>,
    spec: &RunSpec,
) -> Result<i32, Fail> {
    let mut execs = crate::exec::Execs::default();
    let mut dec = frame::Decoder::default();
    let mut out_open = pty.is_some();
    let mut status: Option<i32> = None;
    let mut drained_since: Option<std::time::Instant> = None;
    let mut buf = vec![0u8; 32 * 1024];
    let master = pty.as_ref().map_or(-1, |p| p.master);
    // The loop sleeps until something happens: a frame, output, the workload's or an exec's
    // end (their pidfds). It used to wake every 50 ms to reap, which kept an idle VM's vCPU
    // busy (every guest-kernel instruction is emulated on kvm_pvm: ~27% of a core).
    let mut pidfd = crate::sys::pidfd_open(pid);
    if pidfd < 0 {
        crate::sys::trace("no pidfd for the workload: looking for its end every 50 ms");
    }
    loop {
        let mut fds = vec![
            libc::pollfd {
                fd: ch.fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if out_open { master } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: pty.as_ref().and_then(|p| p.input).unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: pidfd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        fds.extend(execs.pollfds());
        // Orphans re-parented to PID 1 are reaped at least every few seconds; without a pidfd
        // the workload's end is looked for every 50 ms, as before.
        let idle = if pidfd >= 0 || status.is_some() {
            5000
        } else {
            50
        };
        let drain = drained_since.map(|t| DRAIN.saturating_sub(t.elapsed()).as_millis() + 1);
        let timeout = crate::sys::poll_timeout(idle, drain.into_iter().chain(execs.deadlines()));
        // SAFETY: polling a valid array.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if let Some(p) = pty.as_mut() {
            if fds[1].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                // SAFETY: reading into our buffer.
                let n = unsafe { libc::read(master, buf.as_mut_ptr().cast(), buf.len()) };
                if n > 0 {
                    write_all(p.out, &buf[..n as usize]);
                } else {
                    out_open = false; // EIO: the slave is gone
                    crate::sys::trace("pty closed");
                }
            }
            if fds[2].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                // SAFETY: reading into our buffer.
                let n = unsafe { libc::read(fds[2].fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n > 0 {
                    write_all(master, &buf[..n as usize]);
                } else if n == 0
                    || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR)
                {
                    // The host's stdin ended: ^D, as a terminal would send.
                    write_all(master, &[4]);
                    p.input = None;
                }
            }
        }
        if fds[0].revents & libc::POLLIN != 0 {
            // SAFETY: reading into our buffer.
            let n = unsafe { libc::read(ch.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                dec.feed(&buf[..n as usize]);
                while let Ok(Some((kind, payload))) = dec.next_frame() {
                    match kind {
                        frame::SIGNAL if payload.len() == 4 => {
                            let sig = frame::le32_at(&payload, 0).map_or(0, i32::from_le_bytes);
                            // SAFETY: signalling the workload's process group, then the workload.
                            unsafe {
                                libc::kill(-pid, sig);
                                libc::kill(pid, sig);
                            }
                        }
                        frame::EXEC => {
                            if let Some((id, req)) = frame::split_id(&payload) {
                                execs.start(ch, spec, id, req);
                            }
                        }
                        frame::EXEC_STDIN
                        | frame::EXEC_STDIN_EOF
                        | frame::EXEC_SIGNAL
                        | frame::EXEC_WINSIZE => {
                            if let Some((id, rest)) = frame::split_id(&payload) {
                                execs.input(kind, id, rest);
                            }
                        }
                        frame::WINSIZE if payload.len() == 4 && master >= 0 => {
                            // SAFETY: setting the pty size with a filled winsize.
                            unsafe {
                                let mut ws: libc::winsize = std::mem::zeroed();
                                ws.ws_row = u16::from_le_bytes([payload[0], payload[1]]);
                                ws.ws_col = u16::from_le_bytes([payload[2], payload[3]]);
                                libc::ioctl(master, libc::TIOCSWINSZ, &ws);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        execs.relay(ch, &mut buf);
        // Reap everything; note the workload's end, and the execs'.
        loop {
            let mut st = 0;
            // SAFETY: rusage is plain data; wait4 fills it.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: reaping any child without blocking.
            let r = unsafe { libc::wait4(-1, &mut st, libc::WNOHANG, &mut ru) };
            if r <= 0 {
                break;
            }
            let code = if libc::WIFEXITED(st) {
                libc::WEXITSTATUS(st)
            } else {
                128 + libc::WTERMSIG(st)
            };
            if r == pid {
                if pidfd >= 0 {
                    // SAFETY: closing our pidfd of the reaped workload, once.
                    unsafe { libc::close(pidfd) };
                    pidfd = -1;
                }
                crate::sys::trace(&format!(
                    "workload reaped (user {} ms, sys {} ms, {} faults, {} major)",
                    ru.ru_utime.tv_sec * 1000 + ru.ru_utime.tv_usec / 1000,
                    ru.ru_stime.tv_sec * 1000 + ru.ru_stime.tv_usec / 1000,
                    ru.ru_minflt + ru.ru_majflt,
                    ru.ru_majflt
                ));
                status = Some(code);
            } else {
                execs.reaped(r, code);
            }
        }
        execs.finish(ch);
        if let Some(s) = status {
            // Without -t the output is on its way already: everything the workload wrote is
            // queued on the ports, and the host takes it before the EXIT frame that follows. With
            // -t, what is still in the pty is sent; a background process keeping the pty open
            // does not hold the VM up for more than a moment.
            let since = *drained_since.get_or_insert_with(std::time::Instant::now);
            if !out_open || since.elapsed() > DRAIN {
                return Ok(s);
            }
        }
    }
}

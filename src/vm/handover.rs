//! A warm VM run's handover from `rvmm run` to the small `rvmm-vmm` binary.
//!
//! Once a snapshot is restored, what is left of a VM run (the session until the workload's EXIT,
//! `rvmm exec`, the published ports, the run's log and epilogue) needs none of the image store,
//! registry client or command line that make rvmm's binary 70 MB. So `rvmm run` execs
//! `rvmm-vmm PROTOCOL session FD` in the same process, as a container run execs `rvmm-shim`
//! (docs/benchmarks/lean.md): the pid stays (the state file, `rvmm stop`/`kill`/`wait`, the VMM
//! still its child) and the process then maps the VMM's code only, which the VMM process maps
//! too. FD is a memfd holding the [`Handover`] as JSON; the descriptors it names are inherited.
//!
//! A run with no `rvmm-vmm` next to rvmm, or whose exec fails, keeps running in `rvmm run`:
//! both run the same [`super::run_tail`]. `RVMM_NO_HANDOVER=1` keeps every run in rvmm.

use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::jail::Vmm;
use super::machine::{HostEnds, Started};
use super::Tail;
use crate::run::RunState;
use crate::sibling;

/// The mode argument of `rvmm-vmm` that resumes a run.
pub const MODE: &str = "session";

/// A fingerprint of what `rvmm run` hands over (this file, the tail, the RunSpec, the version):
/// an `rvmm-vmm` from another build refuses in one line.
pub const PROTOCOL: u64 = sibling::fnv1a(
    include_bytes!("handover.rs"),
    sibling::fnv1a(
        include_bytes!("mod.rs"),
        sibling::fnv1a(
            include_bytes!("../../proto/src/lib.rs"),
            sibling::VERSION_FINGERPRINT,
        ),
    ),
);

/// Everything the rest of the run needs, with the descriptors it inherits.
/// `T` is `&Tail` where it is written, `Tail` where it is read.
#[derive(Serialize, Deserialize)]
struct Handover<T> {
    tail: T,
    /// [`Tail::t0`] as CLOCK_MONOTONIC nanoseconds.
    t0_ns: u64,
    /// The directory a cold boot would have saved a snapshot into: removed at the end.
    staging: Option<PathBuf>,
    vmm_pid: i32,
    vmm_sock: RawFd,
    /// The channel's host ends: to guest, from guest, stdin, stdout, stderr.
    ends: [RawFd; 5],
    /// The published ports' sockets, with their container ports.
    tcp: Vec<(RawFd, u16)>,
    udp: Vec<(RawFd, u16)>,
}

/// The binary to hand a run over to: `rvmm-vmm` next to rvmm, unless `RVMM_NO_HANDOVER` is set.
pub fn target() -> Option<PathBuf> {
    if std::env::var_os("RVMM_NO_HANDOVER").is_some_and(|v| !v.is_empty() && v != "0") {
        return None;
    }
    super::jail::vmm_binary_path()
}

/// [`PROTOCOL`] as `rvmm-vmm`'s first argument.
pub fn protocol_arg() -> String {
    format!("{PROTOCOL:016x}")
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Replaces this process with `exe PROTOCOL session FD`, handing it the run. Returns only if
/// that failed, with everything as it was: the caller then keeps the run itself.
pub(super) fn exec(
    exe: &Path,
    tail: &Tail,
    started: &Started,
    publisher: Option<&crate::net::Publisher>,
    staging: Option<&Path>,
    inherit: &[RawFd],
) -> std::io::Error {
    let (vmm_pid, vmm_sock) = started.vmm.raw_parts();
    let e = &started.ends;
    let (tcp, udp) = publisher.map(|p| p.raw_fds()).unwrap_or_default();
    let h = Handover {
        tail,
        t0_ns: monotonic_ns().saturating_sub(tail.t0.elapsed().as_nanos() as u64),
        staging: staging.map(Path::to_owned),
        vmm_pid,
        vmm_sock,
        ends: [
            e.to_guest.as_raw_fd(),
            e.from_guest.as_raw_fd(),
            e.stdin.as_raw_fd(),
            e.stdout.as_raw_fd(),
            e.stderr.as_raw_fd(),
        ],
        tcp,
        udp,
    };
    let json = match serde_json::to_vec(&h) {
        Ok(j) => j,
        Err(e) => return std::io::Error::other(e),
    };
    // SAFETY: memfd_create with a NUL-terminated name; the fd is ours (not close-on-exec: the
    // new program reads it).
    let memfd = unsafe { libc::memfd_create(c"rvmm-handover".as_ptr(), 0) };
    if memfd < 0 {
        return std::io::Error::last_os_error();
    }
    // SAFETY: a descriptor just created, owned here.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(memfd) });
    // The new program reads it from the start (the offset is the open file's, shared).
    if let Err(e) = file.write_all(&json).and_then(|()| file.rewind()) {
        return e;
    }
    let argv: [std::ffi::OsString; 4] = [
        super::jail::VMM_BINARY.into(),
        protocol_arg().into(),
        MODE.into(),
        memfd.to_string().into(),
    ];
    let mut fds: Vec<RawFd> = inherit.to_vec();
    fds.push(h.vmm_sock);
    fds.extend(h.ends);
    fds.extend(h.tcp.iter().chain(&h.udp).map(|&(fd, _)| fd));
    fds.extend(crate::run::supervise::start_fd());
    // The session unblocks the signals once it has its handlers.
    rvmm_shim::exec_keeping(exe, &argv, &fds)
}

/// A descriptor named in the handover, taken over once (a bad or repeated number is an error,
/// not a double close).
fn take(fd: RawFd, taken: &mut Vec<RawFd>) -> Result<OwnedFd, String> {
    // SAFETY: F_GETFD only asks whether the descriptor is open.
    if fd < 3 || taken.contains(&fd) || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("descriptor {fd} is not one it was given"));
    }
    taken.push(fd);
    // SAFETY: open, not taken before, and handed to this process for exactly this.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fcntl on a descriptor we own: nothing this process starts inherits it.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(fd)
}

/// `rvmm-vmm PROTOCOL session FD`: the rest of a warm VM run (see the module's text). Returns
/// the run's status.
pub fn session_main(fd: Option<&str>) -> u8 {
    // As in `rvmm run`: the run owns host resources (taps, cgroups), so a closed stdout, or the
    // VMM's stdin pipe closing under a feeder, must not kill it before it releases them; writes
    // fail with EPIPE instead.
    // SAFETY: changing a signal disposition before any thread exists; no handler runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let code = match resume(fd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rvmm: {e}");
            125
        }
    };
    crate::run::supervise::close_own_log();
    code
}

fn resume(fd: Option<&str>) -> Result<u8, String> {
    let by_hand =
        |why: String| format!("rvmm-vmm session: it is started by rvmm, not by hand ({why})");
    let fd: RawFd = fd
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| by_hand("no handover descriptor".into()))?;
    let mut taken = Vec::new();
    let mut memfd = std::fs::File::from(take(fd, &mut taken).map_err(by_hand)?);
    let mut json = Vec::new();
    memfd
        .read_to_end(&mut json)
        .map_err(|e| format!("reading the handover: {e}"))?;
    drop(memfd);
    let mut h: Handover<Tail> =
        serde_json::from_slice(&json).map_err(|e| format!("the handover is corrupt: {e}"))?;
    crate::run::supervise::protect_start_fd();
    let ago = Duration::from_nanos(monotonic_ns().saturating_sub(h.t0_ns));
    h.tail.t0 = Instant::now().checked_sub(ago).unwrap_or_else(Instant::now);
    // The records first: whatever fails below still ends the run (`Cleanup`'s drop).
    let state = RunState::load(&h.tail.dir).ok_or_else(|| {
        format!(
            "the run's state ({}) is unreadable",
            h.tail.dir.join("state.json").display()
        )
    })?;
    let book = crate::run::Cleanup { state, lease: None };
    // The image's snapshot, when this run saves it, goes through the directory the VMM was given.
    let snapshot_out = h
        .tail
        .at_root
        .is_some()
        .then(|| h.staging.clone())
        .flatten();
    let vmm = Vmm::adopt(h.vmm_pid, take(h.vmm_sock, &mut taken)?, snapshot_out)?;
    let [to_guest, from_guest, stdin, stdout, stderr] = h.ends;
    let ends = HostEnds {
        to_guest: take(to_guest, &mut taken)?,
        from_guest: take(from_guest, &mut taken)?,
        stdin: take(stdin, &mut taken)?,
        stdout: take(stdout, &mut taken)?,
        stderr: take(stderr, &mut taken)?,
    };
    let mut tcp = Vec::new();
    for (fd, port) in &h.tcp {
        tcp.push((std::net::TcpListener::from(take(*fd, &mut taken)?), *port));
    }
    let mut udp = Vec::new();
    for (fd, port) in &h.udp {
        udp.push((std::net::UdpSocket::from(take(*fd, &mut taken)?), *port));
    }
    let publisher =
        (!tcp.is_empty() || !udp.is_empty()).then(|| crate::net::Publisher::from_parts(tcp, udp));
    let started = Started {
        vmm,
        ends,
        warm: true,
        restored: None,
    };
    let code = super::run_tail(h.tail, started, publisher, book);
    if let Some(s) = &h.staging {
        let _ = std::fs::remove_dir_all(s);
    }
    code.map_err(|e| crate::error::chain(&e))
}

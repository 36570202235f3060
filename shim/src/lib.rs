//! `rvmm-shim`: rvmm's long-lived small process, with no dependency but libc, so that what stays
//! resident for a run's whole life maps a few pages of code instead of rvmm's image store,
//! registry client, VMM and command line (docs/benchmarks/lean.md).
//!
//! - `rvmm-shim PROTOCOL wait KEY=VALUE...` ([`keep`]): a container run does its setup in `rvmm`,
//!   and once the workload has started rvmm execs the shim in the same process ([`exec_wait`]).
//!   The pid stays, so the state file, `rvmm stop`/`kill`/`wait` and the workload's parent-death
//!   signal work as before. The shim relays signals, forwards the published ports, writes the
//!   workload's output to the run's log (a detached run), waits for the workload, and execs
//!   `rvmm __finish` for the run's epilogue (state, cgroup, network, `--rm`).
//!
//! The fingerprint of this crate's sources is the first argument: a shim from another build
//! refuses in one line instead of misreading what it was given.

pub mod forward;
pub mod keep;
pub mod log;
pub mod signals;

use std::ffi::{CString, OsStr, OsString};
use std::net::Ipv4Addr;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The shim's file name, next to `rvmm`.
pub const BINARY: &str = "rvmm-shim";

/// FNV-1a of `bytes`, continuing from `h`: protocol fingerprints, computed at compile time.
pub const fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        h = (h ^ bytes[i] as u64).wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

/// The fingerprint of this build's version: where every protocol fingerprint starts.
pub const VERSION_FINGERPRINT: u64 =
    fnv1a(env!("CARGO_PKG_VERSION").as_bytes(), 0xcbf2_9ce4_8422_2325);

/// A fingerprint of what rvmm and the shim hand each other: the shim's arguments (this file),
/// `rvmm __finish`'s (keep.rs), and the log it writes.
const PROTOCOL: u64 = fnv1a(
    include_bytes!("lib.rs"),
    fnv1a(
        include_bytes!("keep.rs"),
        fnv1a(include_bytes!("log.rs"), VERSION_FINGERPRINT),
    ),
);

/// A helper's first argument: checks it is `ours` (else says so in one line and returns false).
pub fn check_protocol(helper: &str, ours: u64, theirs: Option<&str>) -> bool {
    let ours = format!("{ours:016x}");
    if theirs == Some(ours.as_str()) {
        return true;
    }
    eprintln!(
        "{helper}: this binary is from another build than the rvmm that started it \
         (protocol {ours}, asked for {}): rebuild both (cargo build), or remove {helper} to \
         let rvmm do its work itself",
        theirs.unwrap_or("none")
    );
    false
}

/// The shim's first arguments: the protocol fingerprint, then the mode.
pub fn args(mode: &str) -> [OsString; 2] {
    [format!("{PROTOCOL:016x}").into(), mode.into()]
}

/// Moves /dev/null onto this process's stdout and stderr (nobody reads them any more; what the
/// process still has to say goes to the run's log).
pub fn null_stdio() {
    // SAFETY: opening /dev/null and moving it onto this process's stdout and stderr.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null >= 0 {
            libc::dup2(null, 1);
            libc::dup2(null, 2);
            libc::close(null);
        }
    }
}

/// What a container run hands the shim: everything it needs to wait for the workload and end
/// the run. File descriptors it names were made inheritable by [`exec_wait`]; the image layers'
/// lock is inherited without a name and held until the run has ended.
#[derive(Debug, Default, PartialEq)]
pub struct Handover {
    /// The rvmm binary that ends the run (`rvmm __finish`).
    pub rvmm: PathBuf,
    /// The run's directory (its state.json and log).
    pub dir: PathBuf,
    /// The workload's first process, a child of this process.
    pub pid: i32,
    /// Stop signals (SIGINT/SIGTERM) already relayed: the next one kills.
    pub stops: i32,
    /// `--rm`.
    pub remove: bool,
    /// `--memory`, for the out-of-memory message.
    pub memory: Option<u64>,
    /// The workload's address and the published ports' listening sockets (fd, container port).
    pub target: Option<Ipv4Addr>,
    pub tcp: Vec<(RawFd, u16)>,
    pub udp: Vec<(RawFd, u16)>,
    /// The read ends of the workload's stdout and stderr, when the shim writes them to the
    /// run's log (a detached run).
    pub log: Option<(RawFd, RawFd)>,
}

impl Handover {
    fn to_args(&self) -> Vec<OsString> {
        let path = |key: &str, p: &Path| {
            let mut a = OsString::from(key);
            a.push(p);
            a
        };
        let mut a = vec![path("rvmm=", &self.rvmm), path("dir=", &self.dir)];
        a.push(format!("pid={}", self.pid).into());
        a.push(format!("stops={}", self.stops).into());
        a.push(format!("rm={}", u8::from(self.remove)).into());
        if let Some(m) = self.memory {
            a.push(format!("memory={m}").into());
        }
        if let Some(t) = self.target {
            a.push(format!("target={t}").into());
        }
        for (key, list) in [("tcp", &self.tcp), ("udp", &self.udp)] {
            for (fd, port) in list {
                a.push(format!("{key}={fd}:{port}").into());
            }
        }
        if let Some((out, err)) = self.log {
            a.push(format!("log={out}:{err}").into());
        }
        a
    }

    fn from_args(args: &[OsString]) -> Result<Handover, String> {
        let mut h = Handover::default();
        for arg in args {
            let bytes = arg.as_bytes();
            let eq = bytes
                .iter()
                .position(|&b| b == b'=')
                .ok_or_else(|| format!("argument {arg:?} is not KEY=VALUE"))?;
            let (key, raw) = (&bytes[..eq], &bytes[eq + 1..]);
            match key {
                b"rvmm" => h.rvmm = PathBuf::from(OsStr::from_bytes(raw)),
                b"dir" => h.dir = PathBuf::from(OsStr::from_bytes(raw)),
                _ => {
                    let bad = || format!("argument {arg:?}");
                    let value = std::str::from_utf8(raw).map_err(|_| bad())?;
                    match key {
                        b"pid" => h.pid = value.parse().map_err(|_| bad())?,
                        b"stops" => h.stops = value.parse().map_err(|_| bad())?,
                        b"rm" => h.remove = value == "1",
                        b"memory" => h.memory = Some(value.parse().map_err(|_| bad())?),
                        b"target" => h.target = Some(value.parse().map_err(|_| bad())?),
                        b"tcp" => h.tcp.push(pair(value).ok_or_else(bad)?),
                        b"udp" => h.udp.push(pair(value).ok_or_else(bad)?),
                        b"log" => h.log = Some(pair(value).ok_or_else(bad)?),
                        _ => return Err(format!("unknown argument {arg:?}")),
                    }
                }
            }
        }
        if h.pid <= 0 || h.dir.as_os_str().is_empty() || h.rvmm.as_os_str().is_empty() {
            return Err("rvmm, a run directory and a workload pid are needed".into());
        }
        Ok(h)
    }
}

/// `A:B`.
fn pair<A: std::str::FromStr, B: std::str::FromStr>(value: &str) -> Option<(A, B)> {
    let (a, b) = value.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Replaces this process (a container run whose workload has started) with `shim wait`, handing
/// it `h` and keeping `inherit` open. Returns only if that failed, with everything as it was:
/// the caller then keeps the run itself.
pub fn exec_wait(shim: &Path, h: &Handover, inherit: &[RawFd]) -> std::io::Error {
    let mut argv: Vec<OsString> = vec![BINARY.into()];
    argv.extend(args("wait"));
    argv.extend(h.to_args());
    let fds: Vec<RawFd> = inherit
        .iter()
        .copied()
        .chain(h.tcp.iter().chain(&h.udp).map(|&(fd, _)| fd))
        .chain(h.log.into_iter().flat_map(|(o, e)| [o, e]))
        .collect();
    exec_keeping(shim, &argv, &fds)
}

/// Replaces this process with `program` (`argv`, this environment), keeping `fds` open across
/// the exec. Signals stay blocked across it (the mask is inherited) until the new program has
/// its handlers and unblocks them, so none is lost or kills it. Returns only if the exec failed,
/// with the descriptors and the signal mask as they were.
pub fn exec_keeping(program: &Path, argv: &[OsString], fds: &[RawFd]) -> std::io::Error {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    signals::block_all(true);
    set_cloexec(fds, false);
    let e = exec(program, argv);
    set_cloexec(fds, true);
    signals::block_all(false);
    e
}

/// execv(2); returns the error.
fn exec(program: &Path, argv: &[OsString]) -> std::io::Error {
    let Ok(path) = CString::new(program.as_os_str().as_bytes()) else {
        return std::io::ErrorKind::InvalidInput.into();
    };
    let Ok(argv) = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
    else {
        return std::io::ErrorKind::InvalidInput.into();
    };
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: NUL-terminated strings and a NULL-terminated array that outlive the call.
    unsafe { libc::execv(path.as_ptr(), ptrs.as_ptr()) };
    std::io::Error::last_os_error()
}

fn set_cloexec(fds: &[RawFd], on: bool) {
    for &fd in fds {
        // SAFETY: fcntl on this process's own descriptors.
        unsafe { libc::fcntl(fd, libc::F_SETFD, if on { libc::FD_CLOEXEC } else { 0 }) };
    }
}

/// The main of the `rvmm-shim` binary: `rvmm-shim PROTOCOL wait KEY=VALUE...`.
pub fn main() -> u8 {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let theirs = args.first().and_then(|a| a.to_str());
    if !check_protocol(BINARY, PROTOCOL, theirs) {
        return 2;
    }
    let usage = |why: &str| {
        eprintln!("{BINARY}: {why} (it is started by rvmm, not by hand)");
        2
    };
    match args.get(1).and_then(|m| m.to_str()) {
        Some("wait") => match Handover::from_args(&args[2..]) {
            Ok(h) => keep::keep(&h),
            Err(why) => usage(&why),
        },
        _ => usage("unknown mode"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handover_survives_its_arguments() {
        let h = Handover {
            rvmm: PathBuf::from("/usr/local/bin/rvmm"),
            dir: PathBuf::from("/var/lib/rvmm x/runs/ab=c"),
            pid: 4242,
            stops: 1,
            remove: true,
            memory: Some(64 << 20),
            target: Some(Ipv4Addr::new(10, 88, 0, 7)),
            tcp: vec![(7, 80), (8, 443)],
            udp: vec![(9, 53)],
            log: Some((10, 11)),
        };
        assert_eq!(Handover::from_args(&h.to_args()), Ok(h));
        let plain = Handover {
            rvmm: PathBuf::from("rvmm"),
            dir: PathBuf::from("/r"),
            pid: 1,
            ..Handover::default()
        };
        assert_eq!(Handover::from_args(&plain.to_args()), Ok(plain));
    }

    #[test]
    fn bad_arguments_are_refused() {
        for bad in [
            &["rvmm=r", "pid=1"][..],
            &["rvmm=r", "dir=/r"],
            &["dir=/r", "pid=1"],
            &["rvmm=r", "dir=/r", "pid=x"],
            &["rvmm=r", "dir=/r", "pid=3", "tcp=3"],
            &["rvmm=r", "dir=/r", "pid=3", "log=3:x"],
            &["rvmm=r", "dir=/r", "pid=3", "what=3"],
            &["rvmm=r", "dir=/r", "pid=3", "nokey"],
        ] {
            let a: Vec<OsString> = bad.iter().map(OsString::from).collect();
            assert!(Handover::from_args(&a).is_err(), "{bad:?}");
        }
    }
}

//! `rvmm-shim`: the small process that keeps a container run once its workload is running, and
//! the supervisor of a detached run (the roles crun's waiting parent and conmon play for podman).
//!
//! A container run does its setup in `rvmm` (image, network, cgroup, namespaces). Once the
//! workload has started, rvmm execs `rvmm-shim wait` in the same process ([`exec_wait`]): the
//! pid stays, so the state file, `rvmm stop`/`kill`/`wait` and the workload's parent-death signal
//! work as before. The shim relays signals, forwards the published ports, waits for the
//! workload and does the run's epilogue from the state file (`RunState::finish`). `rvmm run -d`
//! starts `rvmm-shim supervise` as the run's supervisor (`run::supervise`). What stays resident
//! for a run's whole life is then this binary's few pages, not rvmm's image store, registry
//! client and command line (docs/benchmarks/lean.md). Without `rvmm-shim` next to `rvmm`, rvmm
//! does all of it itself. A terminal run (`-t`) keeps its relay in rvmm.

use std::ffi::{CString, OsStr, OsString};
use std::net::Ipv4Addr;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::net::Forward;
use crate::sibling;

/// The shim's file name, next to `rvmm`.
pub const SHIM_BINARY: &str = "rvmm-shim";

/// A fingerprint of what rvmm hands the shim: its arguments (this file), the supervisor's pipes
/// (supervise.rs) and the state file it finishes (state.rs).
const PROTOCOL: u64 = sibling::fnv1a(
    include_bytes!("shim.rs"),
    sibling::fnv1a(
        include_bytes!("supervise.rs"),
        sibling::fnv1a(include_bytes!("state.rs"), sibling::VERSION_FINGERPRINT),
    ),
);

/// The `rvmm-shim` binary next to this rvmm, if there is one.
pub fn binary_path() -> Option<PathBuf> {
    sibling::binary_path(SHIM_BINARY)
}

/// The shim's first arguments: the protocol fingerprint, then the mode.
pub fn args(mode: &str) -> [OsString; 2] {
    [format!("{PROTOCOL:016x}").into(), mode.into()]
}

/// What a container run hands the shim: everything it needs to wait for the workload and end
/// the run. File descriptors it names were made inheritable by [`exec_wait`]; the image layers'
/// lock is inherited without a name and held until the shim exits.
#[derive(Debug, Default, PartialEq)]
pub struct Handover {
    /// The run's directory (its state.json).
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
    pub tcp: Vec<Forward>,
    pub udp: Vec<Forward>,
}

impl Handover {
    fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut dir = OsString::from("dir=");
        dir.push(&self.dir);
        a.push(dir);
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
            if key == b"dir" {
                h.dir = PathBuf::from(OsStr::from_bytes(raw));
                continue;
            }
            let value = std::str::from_utf8(raw).map_err(|_| format!("argument {arg:?}"))?;
            let bad = || format!("argument {arg:?}");
            let fd_port = || -> Result<Forward, String> {
                let (fd, port) = value.split_once(':').ok_or_else(bad)?;
                Ok((
                    fd.parse().map_err(|_| bad())?,
                    port.parse().map_err(|_| bad())?,
                ))
            };
            match key {
                b"pid" => h.pid = value.parse().map_err(|_| bad())?,
                b"stops" => h.stops = value.parse().map_err(|_| bad())?,
                b"rm" => h.remove = value == "1",
                b"memory" => h.memory = Some(value.parse().map_err(|_| bad())?),
                b"target" => h.target = Some(value.parse().map_err(|_| bad())?),
                b"tcp" => h.tcp.push(fd_port()?),
                b"udp" => h.udp.push(fd_port()?),
                _ => return Err(format!("unknown argument {arg:?}")),
            }
        }
        if h.pid <= 0 || h.dir.as_os_str().is_empty() {
            return Err("a run directory and a workload pid are needed".into());
        }
        Ok(h)
    }
}

/// Replaces this process (a container run whose workload has started) with `rvmm-shim wait`.
/// Returns only if that failed, with everything as it was: the caller then keeps the run itself.
pub fn exec_wait(shim: &Path, h: &Handover, inherit: &[RawFd]) -> std::io::Error {
    let fail = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
    let mut argv: Vec<OsString> = vec![SHIM_BINARY.into()];
    argv.extend(args("wait"));
    argv.extend(h.to_args());
    let argv: Vec<CString> = match argv
        .into_iter()
        .map(|a| CString::new(a.into_encoded_bytes()))
        .collect()
    {
        Ok(v) => v,
        Err(e) => return fail(&e),
    };
    let path = match CString::new(shim.as_os_str().as_bytes()) {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let fds: Vec<RawFd> = inherit
        .iter()
        .copied()
        .chain(h.tcp.iter().chain(&h.udp).map(|&(fd, _)| fd))
        .collect();
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: sigprocmask and fcntl on this process's own mask and descriptors; execv with
    // NUL-terminated strings that outlive the call. Signals stay blocked across the exec (the
    // mask is inherited) until the shim has its handlers, so none is lost or kills it.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_BLOCK, &all, &mut old);
        for &fd in &fds {
            libc::fcntl(fd, libc::F_SETFD, 0);
        }
        libc::execv(path.as_ptr(), ptrs.as_ptr());
        let e = std::io::Error::last_os_error();
        for &fd in &fds {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        e
    }
}

/// The main of the `rvmm-shim` binary: `rvmm-shim PROTOCOL wait KEY=VALUE...` or
/// `rvmm-shim PROTOCOL supervise RVMM ROOT ID -- ARGS...`.
pub fn shim_exe_main() -> u8 {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let theirs = args.first().and_then(|a| a.to_str());
    if !sibling::check_protocol(SHIM_BINARY, PROTOCOL, theirs) {
        return 2;
    }
    let usage = |why: &str| {
        eprintln!("{SHIM_BINARY}: {why} (it is started by rvmm, not by hand)");
        2
    };
    match args.get(1).and_then(|m| m.to_str()) {
        Some("wait") => match Handover::from_args(&args[2..]) {
            Ok(h) => crate::container::keep(&h),
            Err(why) => usage(&why),
        },
        Some("supervise") => match &args[2..] {
            [rvmm, root, id, dashes, run_args @ ..] if dashes == "--" => {
                let id = id.to_string_lossy();
                match super::supervise::supervise(Path::new(rvmm), Path::new(root), &id, run_args) {
                    Ok(code) => code,
                    Err(e) => {
                        eprintln!("{SHIM_BINARY}: {e}");
                        125
                    }
                }
            }
            _ => usage("supervise needs RVMM ROOT ID -- ARGS"),
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
            dir: PathBuf::from("/var/lib/rvmm x/runs/ab=c"),
            pid: 4242,
            stops: 1,
            remove: true,
            memory: Some(64 << 20),
            target: Some(Ipv4Addr::new(10, 88, 0, 7)),
            tcp: vec![(7, 80), (8, 443)],
            udp: vec![(9, 53)],
        };
        assert_eq!(Handover::from_args(&h.to_args()), Ok(h));
        let plain = Handover {
            dir: PathBuf::from("/r"),
            pid: 1,
            ..Handover::default()
        };
        assert_eq!(Handover::from_args(&plain.to_args()), Ok(plain));
    }

    #[test]
    fn bad_arguments_are_refused() {
        for bad in [
            &["pid=1"][..],
            &["dir=/r"],
            &["dir=/r", "pid=x"],
            &["dir=/r", "pid=3", "tcp=3"],
            &["dir=/r", "pid=3", "what=3"],
            &["dir=/r", "pid=3", "nokey"],
        ] {
            let a: Vec<OsString> = bad.iter().map(OsString::from).collect();
            assert!(Handover::from_args(&a).is_err(), "{bad:?}");
        }
    }
}

//! The messages between `rvmm run` and its VMM process: JSON datagrams on a SOCK_SEQPACKET
//! socket pair, file descriptors beside them (SCM_RIGHTS). The VMM process opens no path of the
//! host: everything it uses arrives here.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The largest message either side sends (the setup is the largest, well under this).
const MAX_MESSAGE: usize = 64 * 1024;
/// The most descriptors one message carries.
pub(super) const MAX_FDS: usize = 32;

/// What the VMM process builds, and how it jails itself first. Descriptors follow in this
/// order: the console, then each port's input (if `input`) and output (if `output`), then one
/// tap per entry of `macs`, then one file per entry of `disk_files`.
#[derive(Serialize, Deserialize, Debug)]
pub(super) struct Setup {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u32,
    /// Disk slots (read-only flags), empty unless listed in `disk_files`; a disk can arrive
    /// later with [`ToVmm::ReplaceDisk`].
    pub disks: Vec<bool>,
    /// The slots whose file comes with the setup.
    pub disk_files: Vec<usize>,
    /// COM1 is our stdin and stdout (`rvmm vm`), not the console descriptor.
    pub console_stdio: bool,
    pub ports: Vec<Port>,
    pub macs: Vec<[u8; 6]>,
    /// Restore the snapshot in this directory (as the VMM process sees it) with this tag,
    /// instead of booting.
    pub restore: Option<(PathBuf, String)>,
    /// Where [`ToVmm::Snapshot`] writes (as the VMM process sees it).
    pub snapshot_out: Option<PathBuf>,
    pub jail: Option<Jail>,
    /// A virtio-fs device (`Some`), serving these directories (bound into the jail as
    /// `shares/N`; the device serves `shares`).
    pub fs: Option<Vec<crate::vmm::Share>>,
    /// Debug builds only: make this thread ("vcpu", "event" or "control") call something its
    /// filter forbids, for the test that proves the filters kill.
    pub test_violation: Option<String>,
}

#[derive(Serialize, Deserialize, Debug)]
pub(super) struct Port {
    pub name: String,
    pub input: bool,
    pub output: bool,
    pub barrier: bool,
}

/// How the VMM process confines itself before it creates the VM (docs/security.md).
#[derive(Serialize, Deserialize, Debug)]
pub(super) struct Jail {
    /// An empty directory of the host: a tmpfs mounted over it (in the VMM's own mount
    /// namespace) becomes its root.
    pub root: PathBuf,
    /// Host paths bound into that root.
    pub binds: Vec<Bind>,
    pub uid: u32,
    pub gid: u32,
    /// RLIMIT_NOFILE.
    pub nofile: u64,
    /// RLIMIT_FSIZE: the largest file it may write (a snapshot's memory file).
    pub fsize: u64,
    /// RLIMIT_NPROC for its uid: its threads.
    pub nproc: u64,
    /// Per-thread seccomp filters.
    pub seccomp: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub(super) struct Bind {
    pub source: PathBuf,
    /// Name in the jail's root.
    pub target: String,
    pub writable: bool,
}

/// The directory of the jail's root that holds the shared directories (`shares/0`, ...).
pub(crate) const SHARES: &str = "shares";

/// `rvmm run` → VMM.
#[derive(Serialize, Deserialize, Debug)]
pub(super) enum ToVmm {
    /// Pause, write a snapshot into `snapshot_out`, resume.
    Snapshot {
        tag: String,
    },
    /// Point disk `index` at the descriptor that comes with this message.
    ReplaceDisk {
        index: usize,
    },
    Stop,
}

/// VMM → `rvmm run`.
#[derive(Serialize, Deserialize, Debug)]
pub(super) enum FromVmm {
    /// The VM is created (or restored) and about to run; or why not.
    Built(Result<(), String>),
    /// The snapshot could not be restored (the snapshot's fault, unlike a failed `Built`).
    RestoreFailed(String),
    Snapshot(Result<u64, String>),
    Disk(Result<(), String>),
    /// How the VM ended: "reset", "shutdown", "stopped", or an error.
    Exit(Result<String, String>),
}

/// Sends one message with `fds`.
pub(super) fn send<T: Serialize>(sock: BorrowedFd, msg: &T, fds: &[RawFd]) -> std::io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let iov = [IoSlice::new(&body)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(std::io::Error::from)?;
    Ok(())
}

/// Receives one message and the descriptors that came with it; `None` when the other side has
/// closed. A message that does not parse, or was cut short, is an error.
pub(super) fn recv<T: DeserializeOwned>(
    sock: BorrowedFd,
) -> std::io::Result<Option<(T, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (bytes, flags, fds) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(r) => {
                let mut fds = Vec::new();
                for c in r.cmsgs().map_err(std::io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(v) = c {
                        // SAFETY: the kernel just installed these descriptors for us.
                        fds.extend(v.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                    }
                }
                break (r.bytes, r.flags, fds);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            // The peer died with messages of ours unread (a VMM killed mid-request): as closed.
            Err(nix::errno::Errno::ECONNRESET) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    };
    if bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
        return Err(std::io::Error::other("a message was cut short"));
    }
    let msg = serde_json::from_slice(&buf[..bytes]).map_err(std::io::Error::other)?;
    Ok(Some((msg, fds)))
}

//! TAP devices: the host end of a virtio-net device.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    #[error("tap name {0:?} is empty or longer than 15 bytes")]
    Name(String),
    #[error("cannot attach to tap {name}")]
    SetIff {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the tap fd non-blocking")]
    NonBlocking(#[source] std::io::Error),
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// An open TAP device (non-blocking, no packet information header, no vnet header).
#[derive(Debug)]
pub struct Tap {
    file: File,
}

impl Tap {
    /// Opens (creating it if needed, which takes CAP_NET_ADMIN) the tap called `name`.
    pub fn open(name: &str) -> Result<Tap, Error> {
        if name.is_empty() || name.len() > 15 {
            return Err(Error::Name(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(Error::OpenTun)?;
        // struct ifreq: 16-byte name, then the flags (short), padded to 40 bytes.
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, for which `ifr` is large enough.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, ifr.as_mut_ptr()) };
        if r < 0 {
            return Err(Error::SetIff {
                name: name.to_owned(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Tap { file })
    }

    /// Uses an already attached tap fd (made non-blocking here).
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, Error> {
        // SAFETY: F_GETFL/F_SETFL on an fd we own.
        let r = unsafe {
            let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK)
        };
        if r < 0 {
            return Err(Error::NonBlocking(std::io::Error::last_os_error()));
        }
        Ok(Tap {
            file: File::from(fd),
        })
    }

    /// The tap's file descriptor, to hand to another process (a jailed VMM).
    pub fn into_fd(self) -> OwnedFd {
        OwnedFd::from(self.file)
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Reads one frame; `Ok(None)` when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        // SAFETY: reading into a live buffer of `buf.len()` bytes.
        let n = unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(n as usize))
    }

    /// Writes one frame (dropped by the kernel if the tap is down, like a real link).
    pub fn write_frame(&self, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: writing from a live buffer of `frame.len()` bytes.
        let n = unsafe { libc::write(self.fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

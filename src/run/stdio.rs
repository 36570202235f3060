//! The terminal and the pipes of a run, the same for both isolations.

use std::os::fd::{FromRawFd, OwnedFd};

use crate::error::{last_os_error, IoError};

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> Result<(OwnedFd, OwnedFd), IoError> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(last_os_error("pipe2"));
    }
    // SAFETY: both fds were just returned by pipe2 and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The size of the terminal on our stdout, if it is one.
pub fn winsize() -> Option<nix::pty::Winsize> {
    // SAFETY: TIOCGWINSZ fills a winsize struct.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) == 0).then_some(nix::pty::Winsize {
            ws_row: ws.ws_row,
            ws_col: ws.ws_col,
            ws_xpixel: ws.ws_xpixel,
            ws_ypixel: ws.ws_ypixel,
        })
    }
}

/// Terminal restored on drop.
pub struct RawMode(Option<libc::termios>);

impl RawMode {
    /// Puts our stdin in raw mode when it is a terminal (a no-op otherwise).
    pub fn stdin() -> RawMode {
        // SAFETY: termios calls on fd 0 with a valid struct.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) == 0 {
                let saved = t;
                libc::cfmakeraw(&mut t);
                libc::tcsetattr(0, libc::TCSANOW, &t);
                RawMode(Some(saved))
            } else {
                RawMode(None)
            }
        }
    }

    /// Leaves the terminal as it is.
    pub fn none() -> RawMode {
        RawMode(None)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restoring the saved attributes of our stdin.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

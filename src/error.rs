//! What the library modules share for their error enums (each module has its own thiserror
//! `Error`; anyhow is only at the CLI boundary): an I/O error with what was being done.

use std::fmt::Display;

/// An I/O error and what failed ("creating /x", "reading /y"): the message names the action,
/// the source is the OS's reason (`{:#}` prints both).
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct IoError {
    pub what: String,
    #[source]
    pub source: std::io::Error,
}

impl IoError {
    /// The OS's error number (for callers that tell ENOSPC or ENOENT apart).
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// `.at(|| format!("reading {}", p.display()))` on an `io::Result`.
pub trait IoContext<T> {
    fn at<D: Display>(self, what: impl FnOnce() -> D) -> Result<T, IoError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at<D: Display>(self, what: impl FnOnce() -> D) -> Result<T, IoError> {
        self.map_err(|source| IoError {
            what: what().to_string(),
            source,
        })
    }
}

/// The last OS error of a raw system call, as an [`IoError`] naming the call.
pub fn last_os_error(what: impl Display) -> IoError {
    IoError {
        what: what.to_string(),
        source: std::io::Error::last_os_error(),
    }
}

/// An error and its causes on one line, "a: b: c" (what anyhow's `{:#}` prints), for the places
/// that report an error and go on.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

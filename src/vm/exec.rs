//! `rvmm exec` into a VM run. The run's process (attached `rvmm run`, or the supervisor's) serves
//! the run directory's `exec.sock`; each connection is one exec, bridged to the guest as exec
//! frames with an id on the channel's control port, where rvmm-init starts the process next to
//! the workload (docs/vm-channel.md). The client speaks the same frames without the id.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use rvmm_proto::{frame, ExecRequest};

/// Frames to the guest, written in order by one thread: the run loop, the `Start` and every
/// exec feed it, and none of them blocks on a guest that stops reading (except an exec's stdin,
/// which is the exec client's own backpressure).
#[derive(Clone)]
pub(crate) struct GuestWriter {
    tx: SyncSender<Vec<u8>>,
}

impl GuestWriter {
    /// The writer thread over `to_guest`; it ends when every sender is gone or the guest's end
    /// closes.
    pub(crate) fn new(to_guest: std::os::fd::OwnedFd) -> GuestWriter {
        let (tx, rx) = sync_channel::<Vec<u8>>(256);
        let mut f = std::fs::File::from(to_guest);
        std::thread::spawn(move || {
            for frames in rx {
                if f.write_all(&frames).is_err() {
                    return;
                }
            }
        });
        GuestWriter { tx }
    }

    /// Queues bytes (whole frames); blocks while 256 writes are queued.
    pub(crate) fn send(&self, frames: Vec<u8>) {
        let _ = self.tx.send(frames);
    }

    /// Queues bytes unless the queue is full (a guest that stopped reading): signals and
    /// window sizes from the run loop, which must not block.
    pub(crate) fn try_send(&self, frames: Vec<u8>) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(frames) {
            log::debug!("the guest does not read its channel; a control frame was dropped");
        }
    }
}

type Routes = Arc<Mutex<HashMap<u32, SyncSender<(u8, Vec<u8>)>>>>;

/// How long the run loop waits for an exec client that does not read its output.
const CLIENT_STALL: std::time::Duration = std::time::Duration::from_secs(2);

/// The exec server of one VM run.
pub(crate) struct ExecServer {
    path: PathBuf,
    routes: Routes,
}

/// The socket's path as the process can reach it however long the rvmm root's path is (a unix
/// socket path has 108 bytes): through an O_PATH fd of the run directory.
fn short_path(dir: &Path) -> std::io::Result<(std::fs::File, PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt;
    let d = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)?;
    let p = PathBuf::from(format!("/proc/self/fd/{}/exec.sock", d.as_raw_fd()));
    Ok((d, p))
}

/// Serves `dir`/exec.sock for the run whose channel `writer` feeds.
pub(crate) fn serve(dir: &Path, writer: GuestWriter) -> std::io::Result<ExecServer> {
    let path = dir.join("exec.sock");
    let _ = std::fs::remove_file(&path);
    let (_d, short) = short_path(dir)?;
    let listener = UnixListener::bind(&short)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let routes: Routes = Arc::default();
    let r = routes.clone();
    std::thread::Builder::new()
        .name("rvmm-exec".into())
        .spawn(move || {
            let next = AtomicU32::new(1);
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let id = next.fetch_add(1, Ordering::Relaxed);
                let (r, w) = (r.clone(), writer.clone());
                let _ = std::thread::Builder::new()
                    .name("rvmm-exec-conn".into())
                    .spawn(move || connection(conn, id, &r, &w));
            }
        })?;
    Ok(ExecServer { path, routes })
}

impl ExecServer {
    /// A guest frame: delivered to its exec's client if it is an exec frame (true), else false.
    pub(crate) fn deliver(&self, kind: u8, payload: &[u8]) -> bool {
        if !(frame::EXEC_STARTED..=frame::EXEC_FAILED).contains(&kind) {
            return false;
        }
        let Some((id, rest)) = frame::split_id(payload) else {
            return true;
        };
        let mut routes = crate::devices::lock(&self.routes);
        let mut last = kind == frame::EXEC_EXIT || kind == frame::EXEC_FAILED;
        if let Some(tx) = routes.get(&id) {
            // At most 64 frames wait for a client. One that does not read them (or a guest that
            // floods an exec faster than its client reads) holds the run loop for at most
            // CLIENT_STALL, then loses its exec: host memory stays bounded and the run goes on.
            let mut item = (kind, rest.to_vec());
            let t0 = std::time::Instant::now();
            loop {
                match tx.try_send(item) {
                    Ok(()) => break,
                    Err(TrySendError::Full(back)) if t0.elapsed() < CLIENT_STALL => {
                        item = back;
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    Err(_) => {
                        log::warn!("exec {id}: its client does not read its output; it is cut off");
                        last = true;
                        break;
                    }
                }
            }
        }
        if last {
            routes.remove(&id);
        }
        true
    }
}

impl Drop for ExecServer {
    /// The run ended: no new execs, and the clients of running ones see their connection end.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        crate::devices::lock(&self.routes).clear();
    }
}

/// One exec: the request, then the client's input to the guest, while another thread writes
/// the guest's frames for it to the client.
fn connection(conn: UnixStream, id: u32, routes: &Routes, writer: &GuestWriter) {
    let mut input = conn;
    let Ok(mut output) = input.try_clone() else {
        return;
    };
    let mut dec = frame::Decoder::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut request = None;
    while request.is_none() {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        dec.feed(&buf[..n]);
        match dec.next_frame() {
            Ok(Some((frame::EXEC, p))) => request = Some(p),
            Ok(Some(_)) | Err(_) => return,
            Ok(None) => {}
        }
    }
    let Some(req) = request else { return };
    let (tx, rx) = sync_channel::<(u8, Vec<u8>)>(64);
    crate::devices::lock(routes).insert(id, tx);
    let forward = std::thread::spawn(move || {
        for (kind, payload) in rx {
            if output.write_all(&frame::encode(kind, &payload)).is_err() {
                break;
            }
        }
        let _ = output.shutdown(std::net::Shutdown::Both);
    });
    writer.send(frame::encode(frame::EXEC, &frame::with_id(id, &req)));
    // The client's stdin, signals and window sizes, until it closes its side.
    'read: loop {
        while let Ok(Some((kind, p))) = dec.next_frame() {
            if matches!(
                kind,
                frame::EXEC_STDIN
                    | frame::EXEC_STDIN_EOF
                    | frame::EXEC_SIGNAL
                    | frame::EXEC_WINSIZE
            ) {
                writer.send(frame::encode(kind, &frame::with_id(id, &p)));
            }
        }
        match input.read(&mut buf) {
            Ok(0) | Err(_) => break 'read,
            Ok(n) => dec.feed(&buf[..n]),
        }
    }
    // The client went: its stdin ends (the process itself goes on, as with `docker exec`).
    writer.send(frame::encode(
        frame::EXEC_STDIN_EOF,
        &frame::with_id(id, &[]),
    ));
    let _ = forward.join();
}

static EXEC_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    EXEC_SIGNAL.store(sig, Ordering::SeqCst);
}

/// `rvmm exec` into the VM run whose directory is `dir`: returns the process's status.
pub fn exec(dir: &Path, name: &str, mut req: ExecRequest) -> super::Result<u8> {
    use crate::error::IoContext;
    let not_running = |_| super::Error::NotRunning(name.to_string());
    let (_d, short) = short_path(dir).map_err(not_running)?;
    let mut conn = UnixStream::connect(&short).map_err(not_running)?;
    if req.tty {
        req.winsize = crate::run::stdio::winsize().map(|w| (w.ws_row, w.ws_col));
    }
    let json = serde_json::to_vec(&req).map_err(super::Error::Json)?;
    conn.write_all(&frame::encode(frame::EXEC, &json))
        .at(|| "sending the exec request")?;
    let writer = Arc::new(Mutex::new(
        conn.try_clone().at(|| "cloning the exec socket")?,
    ));
    let send = {
        let w = writer.clone();
        move |kind: u8, p: &[u8]| {
            let _ = crate::devices::lock(&w).write_all(&frame::encode(kind, p));
        }
    };
    let _raw = (req.tty && req.stdin).then(crate::run::stdio::RawMode::stdin);
    if req.stdin {
        let send = send.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match std::io::stdin().read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => send(frame::EXEC_STDIN, &buf[..n]),
                }
            }
            send(frame::EXEC_STDIN_EOF, &[]);
        });
    }
    // Signals go to the process (with a tty, Ctrl-C is a byte on its terminal instead).
    crate::run::install_handler(on_signal, crate::run::RELAYED_SIGNALS);
    crate::run::install_handler(on_signal, &[libc::SIGWINCH]);
    let (frames_tx, frames_rx) = sync_channel::<Option<(u8, Vec<u8>)>>(16);
    let mut reader = conn;
    std::thread::spawn(move || {
        let mut dec = frame::Decoder::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => dec.feed(&buf[..n]),
            }
            while let Ok(Some(f)) = dec.next_frame() {
                if frames_tx.send(Some(f)).is_err() {
                    return;
                }
            }
        }
        let _ = frames_tx.send(None);
    });
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    loop {
        let sig = EXEC_SIGNAL.swap(0, Ordering::SeqCst);
        if sig == libc::SIGWINCH {
            if let Some(ws) = crate::run::stdio::winsize() {
                let mut p = ws.ws_row.to_le_bytes().to_vec();
                p.extend_from_slice(&ws.ws_col.to_le_bytes());
                send(frame::EXEC_WINSIZE, &p);
            }
        } else if sig != 0 {
            send(frame::EXEC_SIGNAL, &sig.to_le_bytes());
        }
        match frames_rx.recv_timeout(std::time::Duration::from_millis(50)) {
            Ok(Some((frame::EXEC_STDOUT, p))) => {
                let _ = out.write_all(&p);
                let _ = out.flush();
            }
            Ok(Some((frame::EXEC_STDERR, p))) => {
                let _ = err.write_all(&p);
            }
            Ok(Some((frame::EXEC_EXIT, p))) => {
                let code = frame::le32_at(&p, 0).map_or(0, i32::from_le_bytes);
                return Ok(code.clamp(0, 255) as u8);
            }
            Ok(Some((frame::EXEC_FAILED, p))) if !p.is_empty() => {
                let msg = String::from_utf8_lossy(&p[1..]).into_owned();
                if p[0] == 125 {
                    return Err(super::Error::Exec(msg));
                }
                eprintln!("rvmm: {msg}");
                return Ok(p[0]);
            }
            Ok(Some(_)) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Ok(None) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                // The run ended under the process: as a killed process.
                return Ok(137);
            }
        }
    }
}

/// Every guest → host exec frame kind (for the run loop's dispatch).
pub(crate) fn is_exec_frame(kind: u8) -> bool {
    (frame::EXEC_STARTED..=frame::EXEC_FAILED).contains(&kind)
}

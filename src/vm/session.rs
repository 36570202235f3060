//! A VM run from the moment its VM exists: the loop that sends the `Start`, saves the snapshot
//! at READY, relays signals, window sizes and output, serves `rvmm exec`, watches the start
//! deadline, and ends with what the guest reported; then the run's exit status.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rvmm_proto::frame;

use super::exec::{self, GuestWriter};
use super::jail::{Vmm, VmmControl};
use super::machine::HostEnds;
use super::snapshots::Snapshots;
use super::Error;
use crate::error::IoError;
use crate::run::stdio::{winsize, RawMode};
use crate::runspec::RunSpec;
use crate::vmm::VmExit;

/// Reads the guest's channel on a thread of its own: every frame, in order, then an `Err` if
/// the stream turns out corrupt. The receiver disconnects when the channel closes.
pub(super) fn frame_reader(from_guest: OwnedFd) -> Receiver<Result<(u8, Vec<u8>), String>> {
    // Bounded: when the main thread is slow (e.g. our stdout blocks), this thread stops reading,
    // the VMM's channel pipe fills and the guest's UART stalls; the host never queues without end.
    let (tx, rx) = std::sync::mpsc::sync_channel(16);
    let mut from_guest = std::fs::File::from(from_guest);
    std::thread::spawn(move || {
        let mut dec = frame::Decoder::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from_guest.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    dec.feed(&buf[..n]);
                    loop {
                        match dec.next_frame() {
                            Ok(Some(f)) => {
                                if tx.send(Ok(f)).is_err() {
                                    return;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                        }
                    }
                }
            }
        }
    });
    rx
}

/// Copies a port's pipe to `to` (our stdout or stderr, or the run's log) on a thread of its own,
/// until the pipe ends, or is empty once `done` is set.
fn relay_output(
    from: OwnedFd,
    to: std::os::fd::RawFd,
    done: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, IoError> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: fcntl on a pipe end we own.
    unsafe {
        let fl = libc::fcntl(from.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(from.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    let t = std::thread::Builder::new()
        .name("rvmm-output".into())
        .spawn(move || {
            // SAFETY: `to` is our stdout or stderr, or the log's pipe, open until this thread is
            // joined; ManuallyDrop never closes it.
            let mut out = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(to) });
            let mut from = std::fs::File::from(from);
            let mut buf = vec![0u8; 256 * 1024];
            let mut broken = false;
            loop {
                match from.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        // A closed stdout drops the rest, as a container's would fail to write.
                        if !broken && out.write_all(&buf[..n]).is_err() {
                            broken = true;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if done.load(Ordering::SeqCst) {
                            return;
                        }
                        let mut p = libc::pollfd {
                            fd: from.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        };
                        // SAFETY: polling one valid pollfd.
                        unsafe { libc::poll(&mut p, 1, 20) };
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        })
        .map_err(|source| IoError {
            what: "starting the output relay".into(),
            source,
        })?;
    Ok(t)
}

/// How long the loop waits, once the VMM has ended, for the guest's last frames still in the
/// channel's pipe.
const DRAIN: Duration = Duration::from_secs(5);

static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);
static STOPS: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    STOP_SIGNAL.store(sig, Ordering::SeqCst);
    if sig == libc::SIGINT || sig == libc::SIGTERM {
        STOPS.fetch_add(1, Ordering::SeqCst);
    }
}

/// What the guest reported over the channel.
#[derive(Default)]
pub(crate) struct GuestReport {
    pub(super) exit: Option<i32>,
    /// Guest uptime (ms) when PID 1 started, when the workload started, and when the `Start`
    /// arrived.
    pub(super) guest_times: Option<(u32, u32, u32)>,
    /// The workload could not start: status (125/126/127) and message.
    pub(super) failure: Option<rvmm_workload::Failure>,
}

impl GuestReport {
    /// Applies one guest frame: output goes to our stdout/stderr, status is recorded.
    /// Returns true for STARTED.
    pub(crate) fn apply(&mut self, kind: u8, payload: &[u8]) -> bool {
        match kind {
            frame::STDOUT => {
                let mut out = std::io::stdout();
                let _ = out.write_all(payload);
                let _ = out.flush();
            }
            frame::STDERR => {
                let _ = std::io::stderr().write_all(payload);
            }
            frame::STARTED => {
                let at = |i| frame::le32_at(payload, i).map(u32::from_le_bytes);
                if let (Some(init), Some(exec)) = (at(0), at(4)) {
                    self.guest_times = Some((init, exec, at(8).unwrap_or(0)));
                }
                return true;
            }
            frame::FAILED if !payload.is_empty() => {
                self.failure = Some(rvmm_workload::Failure {
                    status: payload[0],
                    message: String::from_utf8_lossy(&payload[1..]).into_owned(),
                });
            }
            frame::EXIT if payload.len() == 4 => {
                self.exit = frame::le32_at(payload, 0).map(i32::from_le_bytes);
            }
            _ => {}
        }
        false
    }
}

/// A snapshot a run saves on its way: its machine's at READY (a cold boot), or its image's at
/// ROOTED (the first run of an image on a machine). Owned, so a handover carries it.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
pub(crate) struct SnapshotPlan {
    /// Whose it is, for messages: "the machine's" or "the image's".
    pub(super) whose: String,
    /// The snapshots directory.
    pub(super) dir: PathBuf,
    pub(super) key: String,
    pub(super) tag: String,
    pub(super) identity: String,
    pub(super) run_id: String,
}

impl SnapshotPlan {
    /// Saves the VM's snapshot (paused meanwhile); how long it took, or None (logged).
    fn save(&self, vmm: &VmmControl) -> Option<Duration> {
        let snaps = Snapshots::at(self.dir.clone());
        let t = Instant::now();
        let saved = snaps.save(&self.key, &self.run_id, &self.identity, |d| {
            vmm.snapshot(d, &self.tag)
                .map_err(crate::vmm::Error::Snapshot)
        });
        match saved {
            Ok(bytes) => {
                log::info!(
                    "{} snapshot {} saved: {bytes} bytes of memory",
                    self.whose,
                    self.key
                );
                // Snapshots of a kernel, init, rvmm or image disk that has since been replaced.
                for k in snaps.gc() {
                    log::info!("removed unusable snapshot {k}");
                }
                Some(t.elapsed())
            }
            Err(e) => {
                log::warn!(
                    "cannot save {} snapshot for warm starts: {}",
                    self.whose,
                    crate::error::chain(&e)
                );
                None
            }
        }
    }
}

/// What the loop needs of the run.
pub(super) struct Session<'a> {
    pub(super) spec: &'a RunSpec,
    pub(super) dir: PathBuf,
    pub(super) vmm: VmmControl,
    /// The image disk, attached right before the first `Start` (none: the root is shared).
    pub(super) disk: Option<PathBuf>,
    /// Makes the run's `Start`, sent at READY (a restored guest is past READY: at once).
    pub(super) start: &'a super::StartMaker,
    pub(super) warm: bool,
    /// The machine's snapshot, saved at READY.
    pub(super) at_ready: Option<SnapshotPlan>,
    /// The image's snapshot: a root-only `Start` goes first, and the snapshot is saved when the
    /// guest says ROOTED; then the run's `Start`.
    pub(super) at_root: Option<SnapshotPlan>,
    pub(super) t0: Instant,
    /// Where the workload's stdout and stderr go: the run's log (a detached run,
    /// `run::supervise::OwnLog`), else this process's stdout and stderr.
    pub(super) output: Option<(std::os::fd::RawFd, std::os::fd::RawFd)>,
}

/// How the loop ended.
pub(super) struct Outcome {
    pub(super) report: GuestReport,
    /// The VM was stopped by our signal (second Ctrl-C, or Ctrl-C during the boot).
    pub(super) killed: Option<i32>,
    pub(super) start_timed_out: bool,
    pub(super) start_deadline: Duration,
    /// When the start watchdog fired: how long the VMM had waited for a CPU by then.
    pub(super) start_cpu_wait: Duration,
    /// The channel turned out corrupt.
    pub(super) corrupt: Option<String>,
    /// How the VMM process ended.
    pub(super) vm_result: Result<VmExit, String>,
    pub(super) started_at: Option<Duration>,
    /// Saving the machine's snapshot at READY, and the image's at ROOTED.
    pub(super) snapshot_took: Option<Duration>,
    pub(super) image_snapshot_took: Option<Duration>,
    pub(super) exit_frame_at: Option<Duration>,
    /// The size of the run's `Start` as frames.
    pub(super) start_bytes: usize,
}

/// The mutable state of the loop.
struct Loop<'s, 'a> {
    s: &'s Session<'a>,
    to_guest: GuestWriter,
    /// What has gone to the guest of the `Start`s.
    sent: Sent,
    at_ready: Option<&'s SnapshotPlan>,
    exec_server: Option<exec::ExecServer>,
    /// Says "the workload runs" to the stdin feeder.
    started_tx: std::sync::mpsc::Sender<()>,
    publisher: Option<crate::net::Publisher>,
    address: Option<std::net::Ipv4Addr>,
    out: Outcome,
}

impl Session<'_> {
    /// Runs the VM until the workload's EXIT (or the VM's end); `on_started` is called once the
    /// workload runs.
    pub(super) fn run(
        &self,
        vm: Vmm,
        ends: HostEnds,
        publisher: Option<crate::net::Publisher>,
        address: Option<std::net::Ipv4Addr>,
        mut on_started: impl FnMut(),
    ) -> Result<Outcome, Error> {
        let HostEnds {
            to_guest,
            from_guest,
            stdin,
            stdout,
            stderr,
        } = ends;
        // The start watchdog counts from here: building the image disk is not the guest's time.
        let vm_started = Instant::now();
        crate::run::install_handler(on_signal, crate::run::RELAYED_SIGNALS);
        let _raw = if self.spec.tty {
            crate::run::install_handler(on_signal, &[libc::SIGWINCH]);
            self.spec.stdin.then(RawMode::stdin)
        } else {
            None
        };
        // A run handed over to rvmm-vmm arrives with every signal blocked (none was lost or
        // killed it across the exec); with the handlers in place they can come.
        rvmm_shim::signals::block_all(false);
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let _stdin_unused = feed_stdin(self.spec.stdin, stdin, started_rx);
        // The stdout and stderr ports → our stdout and stderr (or the run's log).
        let (to_out, to_err) = self
            .output
            .unwrap_or((libc::STDOUT_FILENO, libc::STDERR_FILENO));
        let output_done = Arc::new(AtomicBool::new(false));
        let relays = [
            relay_output(stdout, to_out, output_done.clone())?,
            relay_output(stderr, to_err, output_done.clone())?,
        ];
        // guest → host, on its own thread so this one can watch signals.
        let rx = frame_reader(from_guest);
        let mut l = Loop {
            s: self,
            to_guest: GuestWriter::new(to_guest),
            sent: Sent::Nothing,
            at_ready: self.at_ready.as_ref(),
            exec_server: None,
            started_tx,
            publisher,
            address,
            out: Outcome {
                report: GuestReport::default(),
                killed: None,
                start_timed_out: false,
                start_deadline: super::start_timeout(self.warm),
                start_cpu_wait: Duration::ZERO,
                corrupt: None,
                vm_result: Ok(VmExit::Stopped),
                started_at: None,
                snapshot_took: None,
                image_snapshot_took: None,
                exit_frame_at: None,
                start_bytes: 0,
            },
        };
        if self.warm {
            l.send_start();
        }
        loop {
            l.signals();
            l.watchdog(vm_started);
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Ok((kind, payload))) => {
                    if l.frame(kind, &payload) {
                        on_started();
                    }
                }
                Ok(Err(e)) => {
                    // Reported as the run's one line if the guest sent no status before it.
                    l.out.corrupt = Some(e);
                    self.vmm.stop();
                }
                Err(RecvTimeoutError::Timeout) => {
                    if vm.is_finished() {
                        // Drain what is left, then stop. The reader thread ends when the VMM's
                        // end of the channel closes (the VMM is gone); on a loaded host it may
                        // still be behind the guest's last frames (its EXIT), so wait for that
                        // end rather than for a quiet moment.
                        let deadline = Instant::now() + DRAIN;
                        loop {
                            match rx.recv_timeout(Duration::from_millis(50)) {
                                Ok(Ok((kind, payload))) => {
                                    l.out.report.apply(kind, &payload);
                                }
                                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                                Ok(Err(_)) | Err(_) => break,
                            }
                        }
                        break;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    if vm.is_finished() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if l.out.report.exit.is_some() {
                // EXIT is the guest's last frame: all output came before it, and nothing in
                // the guest outlives the run (the image disk is read-only, the writable layer is
                // guest RAM). Stop the VM now rather than wait for the guest's own sync and
                // power-off.
                l.out.exit_frame_at = Some(self.t0.elapsed());
                self.vmm.stop();
                break;
            }
        }
        drop(l.exec_server.take());
        l.out.vm_result = vm.wait();
        // Everything the workload wrote before its EXIT is in the pipes now (the VMM writes the
        // control port's frames only after the output queued before them): copy it out, stop.
        output_done.store(true, Ordering::SeqCst);
        for r in relays {
            let _ = r.join();
        }
        let _ = std::io::stdout().flush();
        Ok(l.out)
    }
}

/// What the loop has sent the guest of its `Start`s.
#[derive(PartialEq)]
enum Sent {
    Nothing,
    /// The root-only `Start`: the run's follows at ROOTED.
    RootOnly,
    Run,
}

impl Loop<'_, '_> {
    /// Attaches the disk and queues the first `Start`: the root-only one when the image's
    /// snapshot is to be saved, else the run's.
    fn send_start(&mut self) {
        if self.sent != Sent::Nothing {
            return;
        }
        let attached = match &self.s.disk {
            Some(d) => self.s.vmm.replace_disk(0, d),
            None => Ok(()),
        };
        if let Err(e) = attached {
            // A VMM that died says why in the run's one line instead.
            if !self.s.vmm.has_ended() {
                eprintln!("rvmm: {}", crate::error::chain(&Error::AttachDisk(e)));
            }
            self.s.vmm.stop();
            return;
        }
        if self.s.at_root.is_some() && self.s.disk.is_some() {
            self.sent = Sent::RootOnly;
            self.queue(self.s.start.root_only());
        } else {
            self.send_run_start();
        }
    }

    /// Queues the run's `Start`, made now (its clock is the host's now).
    fn send_run_start(&mut self) {
        self.sent = Sent::Run;
        let frames = self.s.start.frames();
        if let Ok(f) = &frames {
            self.out.start_bytes = f.len();
        }
        self.queue(frames);
    }

    fn queue(&mut self, frames: Result<Vec<u8>, Error>) {
        match frames {
            Ok(f) => self.to_guest.try_send(f),
            Err(e) => {
                eprintln!("rvmm: {}", crate::error::chain(&e));
                self.s.vmm.stop();
            }
        }
    }

    /// ROOTED: the guest built the image's root for the root-only `Start`. The image's
    /// snapshot is saved, then the run's `Start` goes. (Unasked for, it means nothing.)
    fn rooted(&mut self) {
        if self.sent != Sent::RootOnly {
            return;
        }
        if let Some(plan) = &self.s.at_root {
            self.out.image_snapshot_took = plan.save(&self.s.vmm);
        }
        self.send_run_start();
    }

    fn send_winsize(&self) {
        if let Some(ws) = winsize() {
            let mut p = ws.ws_row.to_le_bytes().to_vec();
            p.extend_from_slice(&ws.ws_col.to_le_bytes());
            self.to_guest.try_send(frame::encode(frame::WINSIZE, &p));
        }
    }

    /// Relays what arrived since the last round: to the workload once it runs, or, before, a
    /// Ctrl-C or TERM stops the VM; a second one stops it in any case.
    fn signals(&mut self) {
        let sig = STOP_SIGNAL.swap(0, Ordering::SeqCst);
        if sig == 0 {
            return;
        }
        let started = self.out.started_at.is_some();
        if STOPS.load(Ordering::SeqCst) >= 2 {
            // Second Ctrl-C/TERM: the VM goes, as `docker kill` would.
            self.s.vmm.stop();
            self.out.killed = Some(libc::SIGKILL);
        } else if sig == libc::SIGWINCH {
            if started {
                self.send_winsize();
            }
        } else if !started {
            // Nothing to forward to yet: Ctrl-C or TERM during the boot stops the VM.
            if sig == libc::SIGINT || sig == libc::SIGTERM {
                self.s.vmm.stop();
                self.out.killed = Some(sig);
            }
        } else {
            self.to_guest
                .try_send(frame::encode(frame::SIGNAL, &sig.to_le_bytes()));
        }
    }

    /// Checked every round, not only when the channel is quiet: a guest that keeps sending
    /// frames without ever starting the workload is stopped too. The deadline counts the time
    /// the guest had: the time its VMM spent waiting for a CPU on a loaded host does not count
    /// (50 VMs restoring at once on 2 cores wait minutes for their turn, and a guest that
    /// never runs cannot be blamed for not starting), up to ten times the deadline in all.
    fn watchdog(&mut self, vm_started: Instant) {
        let o = &mut self.out;
        if o.started_at.is_some()
            || o.report.failure.is_some()
            || o.killed.is_some()
            || o.start_timed_out
        {
            return;
        }
        let wall = vm_started.elapsed();
        if wall <= o.start_deadline {
            return;
        }
        let waited = self.s.vmm.cpu_wait();
        if wall.saturating_sub(waited) > o.start_deadline || wall > o.start_deadline * 10 {
            o.start_timed_out = true;
            o.start_cpu_wait = waited;
            self.s.vmm.stop();
        }
    }

    /// One frame from the guest; true when it says the workload started.
    fn frame(&mut self, kind: u8, payload: &[u8]) -> bool {
        if kind == frame::READY {
            self.ready();
            return false;
        }
        if kind == frame::ROOTED {
            self.rooted();
            return false;
        }
        if exec::is_exec_frame(kind) {
            if let Some(s) = &self.exec_server {
                s.deliver(kind, payload);
            }
            return false;
        }
        if !self.out.report.apply(kind, payload) {
            return false;
        }
        self.out.started_at = Some(self.s.t0.elapsed());
        let _ = self.started_tx.send(());
        if self.s.spec.tty {
            self.send_winsize();
        }
        // `rvmm exec` from now on.
        match exec::serve(&self.s.dir, self.to_guest.clone()) {
            Ok(s) => self.exec_server = Some(s),
            Err(e) => log::warn!("rvmm exec will not reach this run: {e}"),
        }
        if let (Some(p), Some(addr)) = (self.publisher.take(), self.address) {
            p.start(addr);
        }
        true
    }

    /// READY: a cold boot saves the machine's snapshot first (once), then the `Start` goes.
    fn ready(&mut self) {
        if let Some(plan) = self.at_ready.take() {
            self.out.snapshot_took = plan.save(&self.s.vmm);
        }
        self.send_start();
    }
}

/// stdin → the stdin port, once the workload runs: nothing of this run may reach the guest
/// before a cold boot's snapshot at READY. Closing the pipe is the workload's EOF. Without `-i`
/// the pipe is returned, open and unused (the workload's stdin is /dev/null).
fn feed_stdin(attach: bool, stdin: OwnedFd, started: Receiver<()>) -> Option<OwnedFd> {
    if !attach {
        return Some(stdin);
    }
    let mut tg = std::fs::File::from(stdin);
    std::thread::spawn(move || {
        if started.recv().is_err() {
            return;
        }
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match std::io::stdin().read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tg.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    None
}

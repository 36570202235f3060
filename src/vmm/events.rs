//! The event thread: console input with flow control, virtio queue notifications, and the exit
//! EventFd, on one epoll loop (event-manager).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::control::ExitReason;
use super::Shared;
use crate::devices::lock;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::mmio::MmioTransport;

pub enum InputSource {
    Stdin,
    Owned(OwnedFd),
}

impl InputSource {
    fn fd(&self) -> RawFd {
        match self {
            InputSource::Stdin => 0,
            InputSource::Owned(f) => f.as_raw_fd(),
        }
    }
}

struct Input {
    src: InputSource,
    dev: Arc<Mutex<SerialDevice>>,
    drained: Arc<EventFd>,
    pending: Vec<u8>,
    paused: bool,
    closed: bool,
}

struct Notify {
    evt: EventFd,
    transport: Arc<Mutex<MmioTransport>>,
    queue: usize,
}

/// Token layout: 0 = exit; 1 + 2i = input i; 2 + 2i = drained i; NOTIFY_BASE + k = notify k.
const TOKEN_EXIT: u32 = 0;
const NOTIFY_BASE: u32 = 1 << 16;
const BACKEND_BASE: u32 = 1 << 20;

pub struct Handler {
    // A private duplicate of the exit eventfd for epoll.
    exit: EventFd,
    inputs: Vec<Input>,
    notifies: Vec<Notify>,
    backends: Vec<(RawFd, Arc<Mutex<MmioTransport>>, EventSet)>,
}

impl Handler {
    pub(crate) fn new(shared: Arc<Shared>) -> std::io::Result<Self> {
        let exit = shared.exit_evt.try_clone()?;
        Ok(Self {
            exit,
            inputs: Vec::new(),
            notifies: Vec::new(),
            backends: Vec::new(),
        })
    }

    pub fn add_input(
        &mut self,
        src: InputSource,
        dev: Arc<Mutex<SerialDevice>>,
        drained: Arc<EventFd>,
    ) {
        self.inputs.push(Input {
            src,
            dev,
            drained,
            pending: Vec::new(),
            paused: false,
            closed: false,
        });
    }

    /// Nothing to wait for (no device's notifications were added).
    pub fn is_empty(&self) -> bool {
        self.notifies.is_empty() && self.inputs.is_empty() && self.backends.is_empty()
    }

    pub fn add_notify(&mut self, evt: EventFd, transport: Arc<Mutex<MmioTransport>>, queue: usize) {
        self.notifies.push(Notify {
            evt,
            transport,
            queue,
        });
    }

    /// A device backend fd (e.g. a tap), polled edge-triggered for input; the device drains it.
    pub fn add_backend(&mut self, fd: RawFd, transport: Arc<Mutex<MmioTransport>>) {
        self.backends.push((fd, transport, EventSet::IN));
    }

    /// A device backend fd the device writes to, polled edge-triggered for room.
    pub fn add_backend_output(&mut self, fd: RawFd, transport: Arc<Mutex<MmioTransport>>) {
        self.backends.push((fd, transport, EventSet::OUT));
    }

    /// What the guest queued before it ended, delivered. The guest's last acts are to queue
    /// its EXIT frame, kick the queue and reset: the vCPU's reset can end [`run`]'s loop before
    /// it saw that kick (on a loaded host the event thread runs late), and output taken from the
    /// guest can still wait for room on a host pipe. Every queue is served, kicked or not: with
    /// VIRTIO_F_EVENT_IDX the driver leaves out a kick while it believes the device is still at
    /// work on the queue. Bounded: a ring's worth per round, a fixed number of rounds, and
    /// `grace` for the host's fds.
    fn flush(&mut self, grace: Duration) {
        let t0 = Instant::now();
        for n in &self.notifies {
            let _ = n.evt.read();
            for _ in 0..FLUSH_ROUNDS {
                if !lock(&n.transport).notify(n.queue) {
                    break;
                }
            }
        }
        loop {
            let waiting: Vec<_> = self
                .backends
                .iter()
                .filter(|(_, t, set)| set.contains(EventSet::OUT) && lock(t).output_pending())
                .collect();
            if waiting.is_empty() {
                return;
            }
            if t0.elapsed() >= grace {
                log::warn!("the guest's last output found no room on the host within {grace:?}");
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
            for (fd, t, _) in waiting {
                for _ in 0..FLUSH_ROUNDS {
                    if lock(t).backend_event(*fd).is_none() {
                        break;
                    }
                }
            }
        }
    }

    fn input_events(i: usize, inp: &Input) -> Events {
        Events::with_data_raw(inp.src.fd(), 1 + 2 * i as u32, EventSet::IN)
    }

    /// Moves pending bytes into the FIFO; reads more from the source when the FIFO has room.
    fn pump(&mut self, i: usize, ops: &mut EventOps, readable: bool) {
        let inp = &mut self.inputs[i];
        let mut dev = lock(&inp.dev);
        if !inp.pending.is_empty() {
            let n = dev.enqueue(&inp.pending);
            inp.pending.drain(..n);
        }
        let room = dev.fifo_room();
        if readable && inp.pending.is_empty() && room > 0 && !inp.closed {
            let mut buf = [0u8; 64];
            let want = room.min(buf.len());
            // SAFETY: reading into a live stack buffer of at least `want` bytes.
            let n = unsafe { libc::read(inp.src.fd(), buf.as_mut_ptr().cast(), want) };
            if n > 0 {
                let n = n as usize;
                let taken = dev.enqueue(&buf[..n]);
                inp.pending.extend_from_slice(&buf[taken..n]);
            } else if n == 0
                || !matches!(
                    std::io::Error::last_os_error().raw_os_error(),
                    Some(libc::EAGAIN) | Some(libc::EINTR)
                )
            {
                // EOF or a broken source: stop feeding.
                inp.closed = true;
            }
        }
        let full = !inp.pending.is_empty() || dev.fifo_room() == 0;
        drop(dev);
        let ev = Self::input_events(i, &self.inputs[i]);
        let inp = &mut self.inputs[i];
        if inp.closed {
            if !inp.paused {
                let _ = ops.remove(ev);
                inp.paused = true;
            }
        } else if full && !inp.paused {
            let _ = ops.remove(ev);
            inp.paused = true;
        } else if !full && inp.paused {
            inp.paused = ops.add(ev).is_err();
        }
    }
}

impl MutEventSubscriber for Handler {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::with_data(&self.exit, TOKEN_EXIT, EventSet::IN));
        for i in 0..self.inputs.len() {
            let inp = &self.inputs[i];
            let drained = Events::with_data(inp.drained.as_ref(), 2 + 2 * i as u32, EventSet::IN);
            let _ = ops.add(drained);
            // epoll refuses regular files: such an input is simply not fed.
            if ops.add(Self::input_events(i, inp)).is_err() {
                log::debug!("console input {i} cannot be polled; ignoring it");
                self.inputs[i].closed = true;
                self.inputs[i].paused = true;
            }
        }
        for (k, (fd, _, set)) in self.backends.iter().enumerate() {
            let ev = Events::with_data_raw(
                *fd,
                BACKEND_BASE + k as u32,
                *set | EventSet::EDGE_TRIGGERED,
            );
            if let Err(e) = ops.add(ev) {
                log::warn!("cannot poll device backend fd {fd}: {e:?}");
            }
        }
        for (k, n) in self.notifies.iter().enumerate() {
            let _ = ops.add(Events::with_data(
                &n.evt,
                NOTIFY_BASE + k as u32,
                EventSet::IN,
            ));
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        if token == TOKEN_EXIT {
            // Not read: it stays readable, so every loop waiting on it (the event thread's and
            // the virtio-fs thread's) wakes and sees `stopping`, which is set before the write.
            return;
        }
        if token >= BACKEND_BASE {
            if let Some((fd, t, _)) = self.backends.get(token as usize - BACKEND_BASE as usize) {
                let again = lock(t).backend_event(*fd);
                // The device stopped after a ring's worth: the rest goes through that queue's
                // notification, after the other events.
                if let Some(n) = again.and_then(|q| {
                    self.notifies
                        .iter()
                        .find(|n| n.queue == q && Arc::ptr_eq(&n.transport, t))
                }) {
                    let _ = n.evt.write(1);
                }
            }
            return;
        }
        if token >= NOTIFY_BASE {
            if let Some(n) = self.notifies.get(token as usize - NOTIFY_BASE as usize) {
                let _ = n.evt.read();
                if lock(&n.transport).notify(n.queue) {
                    // The device stopped after a ring's worth: come back after the other events.
                    let _ = n.evt.write(1);
                }
            }
            return;
        }
        let i = ((token - 1) / 2) as usize;
        if i >= self.inputs.len() {
            return;
        }
        if token % 2 == 1 {
            self.pump(i, ops, true);
        } else {
            let _ = self.inputs[i].drained.read();
            self.pump(i, ops, false);
        }
    }
}

/// Runs the event loop until the VM is stopping. With `deliver_last_words`, a guest that ended
/// itself (a reset or shutdown) still has what it queued before the end delivered: see
/// [`Handler::flush`].
pub fn run(
    handler: Handler,
    shared: &Arc<Shared>,
    deliver_last_words: bool,
) -> Result<(), event_manager::Error> {
    let handler = Arc::new(Mutex::new(handler));
    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> = EventManager::new()?;
    em.add_subscriber(handler.clone());
    while !shared.stopping.load(Ordering::Acquire) {
        em.run()?;
    }
    let guest_ended = matches!(
        *lock(&shared.reason),
        Some(ExitReason::Reset | ExitReason::Shutdown)
    );
    if deliver_last_words && guest_ended {
        lock(&handler).flush(FLUSH_GRACE);
    }
    Ok(())
}

/// How long a guest's last output may wait for room on the host's fds once the guest ended.
const FLUSH_GRACE: Duration = Duration::from_secs(5);
/// At most this many rounds of one queue's notification in a flush (each takes a ring's worth).
const FLUSH_ROUNDS: usize = 64;

#[allow(dead_code)]
fn _assert_send() {
    fn s<T: Send>() {}
    s::<Handler>();
    let _ = EFD_NONBLOCK;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::devices::virtio::{Mem, VirtioDevice};
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use virtio_queue::Queue;
    use vm_memory::GuestAddress;

    /// Counts its notifications; its output waits for room `blocked` more times.
    struct Dev {
        sizes: [u16; 1],
        processed: Arc<AtomicUsize>,
        blocked: Arc<AtomicUsize>,
    }
    impl VirtioDevice for Dev {
        fn device_type(&self) -> u32 {
            3
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn features(&self) -> u64 {
            0
        }
        fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
        fn process_queue(&mut self, _i: usize, _q: &mut Queue, _m: &Mem) -> bool {
            self.processed.fetch_add(1, Ordering::SeqCst);
            false
        }
        fn backend_fd_event(&mut self, _fd: RawFd, _q: &mut [Queue], _m: &Mem) -> u64 {
            let _ = self
                .blocked
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1));
            0
        }
        fn output_pending(&self) -> bool {
            self.blocked.load(Ordering::SeqCst) > 0
        }
    }

    struct Rig {
        shared: Arc<Shared>,
        handler: Handler,
        evt: EventFd,
        processed: Arc<AtomicUsize>,
        blocked: Arc<AtomicUsize>,
    }

    fn rig(blocked: usize) -> Rig {
        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            reason: Mutex::new(None),
            exit_evt: EventFd::new(EFD_NONBLOCK).unwrap(),
            pause: Default::default(),
            vcpu_threads: Mutex::new(Vec::new()),
            msr_index: Vec::new(),
            xsave: false,
        });
        let processed = Arc::new(AtomicUsize::new(0));
        let blocked = Arc::new(AtomicUsize::new(blocked));
        let dev = Dev {
            sizes: [16],
            processed: processed.clone(),
            blocked: blocked.clone(),
        };
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let t = Arc::new(Mutex::new(MmioTransport::activated_for_tests(
            Box::new(dev),
            mem,
        )));
        let mut handler = Handler::new(shared.clone()).unwrap();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        handler.add_notify(evt.try_clone().unwrap(), t.clone(), 0);
        // Any fd will do: the device decides when its output has room.
        handler.add_backend_output(evt.as_raw_fd(), t);
        Rig {
            shared,
            handler,
            evt,
            processed,
            blocked,
        }
    }

    /// The guest's last acts are a kick (its EXIT frame) and a reset; the vCPU's reset may
    /// stop the loop before the event thread ever looked at the kick.
    #[test]
    fn a_kick_before_the_guest_ended_is_still_served() {
        for (reason, kicked, served) in [
            (ExitReason::Reset, true, 1),
            (ExitReason::Shutdown, true, 1),
            // A buffer queued without a kick (EVENT_IDX suppressed it) is served too.
            (ExitReason::Reset, false, 1),
            // The host stopped it: nothing more is taken from the guest.
            (ExitReason::Stopped, true, 0),
        ] {
            let r = rig(0);
            if kicked {
                r.evt.write(1).unwrap();
            }
            r.shared.request_exit(reason);
            run(r.handler, &r.shared, true).unwrap();
            assert_eq!(r.processed.load(Ordering::SeqCst), served);
        }
    }

    #[test]
    fn last_output_waits_for_room_but_not_forever() {
        let mut r = rig(3);
        r.handler.flush(Duration::from_secs(5));
        assert_eq!(r.blocked.load(Ordering::SeqCst), 0);

        let mut r = rig(usize::MAX);
        let t0 = Instant::now();
        r.handler.flush(Duration::from_millis(50));
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(r.blocked.load(Ordering::SeqCst) < usize::MAX);
    }
}

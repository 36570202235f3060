//! The event thread: console input with flow control, virtio queue notifications, and the exit
//! EventFd, on one epoll loop (event-manager).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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

/// Runs the event loop until the VM is stopping.
pub fn run(handler: Handler, shared: &Arc<Shared>) -> Result<(), event_manager::Error> {
    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> = EventManager::new()?;
    em.add_subscriber(Arc::new(Mutex::new(handler)));
    while !shared.stopping.load(Ordering::Acquire) {
        em.run()?;
    }
    Ok(())
}

#[allow(dead_code)]
fn _assert_send() {
    fn s<T: Send>() {}
    s::<Handler>();
    let _ = EFD_NONBLOCK;
}

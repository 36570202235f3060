//! virtio-console with VIRTIO_CONSOLE_F_MULTIPORT: the host ↔ guest channel (docs/vm-channel.md).
//!
//! Each port is an independent byte stream with its own receive/transmit queue pair; the control
//! queues carry the port management messages (DEVICE_READY, DEVICE_ADD, PORT_READY, PORT_NAME,
//! PORT_OPEN). On the host a port is up to two fds owned by the device: `input` (read by the device,
//! its bytes go to the guest) and `output` (the guest's bytes are written there). Both are made
//! non-blocking and polled edge-triggered by the event thread.
//!
//! Flow control, both ways, with bounded host memory:
//! - guest → host: a transmit buffer is taken from the guest only when the port's staging buffer
//!   ([`STAGE`] bytes, allocated once) is empty, i.e. when the host fd accepted everything before
//!   it. A full host fd leaves the guest's buffers in its queue, and the guest's writer sleeps when
//!   its queue is full. A chain longer than the staging buffer is taken in pieces.
//! - host → guest: bytes are read from the host fd only into receive buffers the guest posted; with
//!   none posted, the host fd is not read (the host writer blocks on its pipe).
//! - the host's input reaching EOF closes the port from the host side (PORT_OPEN 0): the guest's
//!   reads then return EOF once the data before it is consumed.
//!
//! A *barrier* port (the frame channel) never overtakes the others: its output is written only
//! when every other port has written all the buffers the guest had queued, so a frame the guest
//! sends after writing output (the workload's EXIT after its last write) reaches the host after
//! that output.
//!
//! Nothing here trusts the guest: chains go through virtio-queue's Reader/Writer, control messages
//! are fixed-size and checked, port ids are bounded, and the host→guest control messages that wait
//! for guest buffers are bounded ([`MAX_CTRL_PENDING`]).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};

use super::{Mem, VirtioDevice, TYPE_CONSOLE};

/// VIRTIO_CONSOLE_F_MULTIPORT.
pub const F_MULTIPORT: u64 = 1 << 1;
/// Ports the device offers (max_nr_ports): the configured ones plus room for more (a later `exec`).
pub const MAX_PORTS: u32 = 8;
/// Queue sizes. The guest posts one page per receive buffer and one buffer of up to 32 KiB per
/// `write` on transmit queues.
pub const CTRL_QUEUE_SIZE: u16 = 32;
pub const DATA_QUEUE_SIZE: u16 = 64;
/// Bytes a port takes from the guest at a time (guest → host).
pub const STAGE: usize = 64 * 1024;
/// Host → guest control messages waiting for guest buffers.
pub const MAX_CTRL_PENDING: usize = 4 * MAX_PORTS as usize + 8;

pub const CTRL_RX: usize = 2;
pub const CTRL_TX: usize = 3;

/// Control events (struct virtio_console_control.event).
pub mod event {
    pub const DEVICE_READY: u16 = 0;
    pub const DEVICE_ADD: u16 = 1;
    pub const DEVICE_REMOVE: u16 = 2;
    pub const PORT_READY: u16 = 3;
    pub const CONSOLE_PORT: u16 = 4;
    pub const RESIZE: u16 = 5;
    pub const PORT_OPEN: u16 = 6;
    pub const PORT_NAME: u16 = 7;
}

/// struct virtio_console_control: id (le32), event (le16), value (le16).
const CTRL_LEN: usize = 8;

/// The receive queue of port `p`.
pub const fn rx_queue(p: u32) -> usize {
    if p == 0 {
        0
    } else {
        2 + 2 * p as usize
    }
}

/// The transmit queue of port `p`.
pub const fn tx_queue(p: u32) -> usize {
    rx_queue(p) + 1
}

/// The port of data queue `q` and whether it is a transmit queue (None for control queues).
fn port_of(q: usize) -> Option<(usize, bool)> {
    match q {
        0 | 1 => Some((0, q == 1)),
        CTRL_RX | CTRL_TX => None,
        _ => Some(((q - 2) / 2, q % 2 == 1)),
    }
}

/// One port's host side, as the VMM configuration gives it.
#[derive(Debug)]
pub struct PortBackend {
    /// Sent to the guest with PORT_NAME (the guest finds the port by it).
    pub name: String,
    /// Host → guest bytes.
    pub input: Option<OwnedFd>,
    /// Guest → host bytes.
    pub output: Option<OwnedFd>,
    /// See the module documentation.
    pub barrier: bool,
}

/// What a snapshot keeps of a port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortState {
    /// The guest sent PORT_READY.
    pub guest_ready: bool,
    /// The guest has the port open (PORT_OPEN from the guest).
    pub guest_open: bool,
    /// We told the guest the host side is open.
    pub host_open: bool,
    /// Bytes of the transmit chain at the head of the queue already taken.
    pub tx_taken: u32,
    /// Bytes taken from the guest and not yet written to the host fd.
    pub staged: Vec<u8>,
}

/// The device state a snapshot keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    pub multiport: bool,
    pub device_ready: bool,
    pub ports: Vec<PortState>,
    /// Host → guest control messages not delivered yet: (id, event, value).
    pub ctrl_pending: Vec<(u32, u16, u16)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsoleStats {
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub bad_chains: u64,
    pub bad_control: u64,
}

struct Port {
    name: String,
    input: Option<File>,
    output: Option<File>,
    barrier: bool,
    /// The host's input ended.
    input_done: bool,
    /// The host's output fd failed (e.g. nobody reads it): the guest's bytes are dropped.
    output_broken: bool,
    st: PortState,
    /// `st.staged[staged_off..]` is still to be written.
    staged_off: usize,
}

pub struct Console {
    queue_sizes: Vec<u16>,
    ports: Vec<Port>,
    multiport: bool,
    device_ready: bool,
    ctrl_pending: VecDeque<(u32, u16, u16)>,
    /// Host → guest bytes on their way into a receive buffer.
    scratch: Vec<u8>,
    /// A queue this call stopped on at its budget, with work left (see [`VirtioDevice::take_more`]).
    more: Option<usize>,
    pub stats: ConsoleStats,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} console ports is too many (maximum {MAX_PORTS})")]
    TooManyPorts(usize),
    #[error("cannot make a console port's fd non-blocking")]
    NonBlocking(#[source] std::io::Error),
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), Error> {
    // SAFETY: fcntl on an fd we own, with integer arguments.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(Error::NonBlocking(std::io::Error::last_os_error()));
    }
    // SAFETY: as above.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if r < 0 {
        return Err(Error::NonBlocking(std::io::Error::last_os_error()));
    }
    Ok(())
}
impl Console {
    pub fn new(backends: Vec<PortBackend>) -> Result<Self, Error> {
        if backends.len() > MAX_PORTS as usize {
            return Err(Error::TooManyPorts(backends.len()));
        }
        let mut ports = Vec::with_capacity(backends.len());
        for b in backends {
            for fd in b.input.iter().chain(b.output.iter()) {
                set_nonblocking(fd)?;
            }
            let host_open = b.input.is_some() || b.output.is_some();
            ports.push(Port {
                name: b.name,
                input: b.input.map(File::from),
                output: b.output.map(File::from),
                barrier: b.barrier,
                input_done: false,
                output_broken: false,
                st: PortState {
                    host_open,
                    staged: Vec::with_capacity(if host_open { STAGE } else { 0 }),
                    ..PortState::default()
                },
                staged_off: 0,
            });
        }
        let mut queue_sizes = Vec::new();
        for q in 0..2 * (MAX_PORTS as usize + 1) {
            queue_sizes.push(if port_of(q).is_none() {
                CTRL_QUEUE_SIZE
            } else {
                DATA_QUEUE_SIZE
            });
        }
        Ok(Self {
            queue_sizes,
            ports,
            multiport: false,
            device_ready: false,
            ctrl_pending: VecDeque::with_capacity(MAX_CTRL_PENDING),
            scratch: vec![0u8; 64 * 1024],
            more: None,
            stats: ConsoleStats::default(),
        })
    }

    /// The host fds the event thread polls: (fd, is it an input).
    pub fn backend_fds(&self) -> Vec<(RawFd, bool)> {
        let mut v = Vec::new();
        for p in &self.ports {
            if let Some(f) = &p.input {
                v.push((f.as_raw_fd(), true));
            }
            if let Some(f) = &p.output {
                v.push((f.as_raw_fd(), false));
            }
        }
        v
    }

    /// The saved device state.
    pub fn state(&self) -> ConsoleState {
        ConsoleState {
            multiport: self.multiport,
            device_ready: self.device_ready,
            ports: self
                .ports
                .iter()
                .map(|p| {
                    let mut s = p.st.clone();
                    s.staged = p.st.staged[p.staged_off.min(p.st.staged.len())..].to_vec();
                    s
                })
                .collect(),
            ctrl_pending: self.ctrl_pending.iter().copied().collect(),
        }
    }

    /// Puts saved state back (the host fds are this run's).
    pub fn set_state(&mut self, s: ConsoleState) -> Result<(), String> {
        if s.ports.len() != self.ports.len() {
            return Err(format!(
                "the saved console has {} ports, this one {}",
                s.ports.len(),
                self.ports.len()
            ));
        }
        if s.ctrl_pending.len() > MAX_CTRL_PENDING || s.ports.iter().any(|p| p.staged.len() > STAGE)
        {
            return Err("the saved console state is out of bounds".into());
        }
        self.multiport = s.multiport;
        self.device_ready = s.device_ready;
        self.ctrl_pending = s.ctrl_pending.into_iter().collect();
        for (p, st) in self.ports.iter_mut().zip(s.ports) {
            let mut staged = std::mem::take(&mut p.st.staged);
            staged.clear();
            staged.extend_from_slice(&st.staged);
            p.st = PortState { staged, ..st };
            p.staged_off = 0;
        }
        Ok(())
    }

    fn push_ctrl(&mut self, id: u32, ev: u16, value: u16) {
        if self.ctrl_pending.len() >= MAX_CTRL_PENDING {
            self.stats.bad_control += 1;
            log::debug!("virtio-console: control queue full, dropping event {ev} for port {id}");
            return;
        }
        self.ctrl_pending.push_back((id, ev, value));
    }

    /// Delivers pending control messages into the guest's control receive buffers.
    fn ctrl_rx(&mut self, q: &mut Queue, mem: &Mem) -> bool {
        let mut used = false;
        let mut budget = q.size();
        while let Some(&(id, ev, value)) = self.ctrl_pending.front() {
            if budget == 0 {
                self.more = Some(CTRL_RX);
                break;
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            budget -= 1;
            let head = chain.head_index();
            let mut msg = [0u8; CTRL_LEN];
            msg[..4].copy_from_slice(&id.to_le_bytes());
            msg[4..6].copy_from_slice(&ev.to_le_bytes());
            msg[6..].copy_from_slice(&value.to_le_bytes());
            let name: &[u8] = if ev == event::PORT_NAME {
                self.ports
                    .get(id as usize)
                    .map(|p| p.name.as_bytes())
                    .unwrap_or_default()
            } else {
                &[]
            };
            let len = match Writer::new(mem, chain) {
                Ok(mut w) if w.available_bytes() >= CTRL_LEN + name.len() => {
                    if w.write_all(&msg).and_then(|()| w.write_all(name)).is_err() {
                        self.stats.bad_chains += 1;
                    }
                    self.ctrl_pending.pop_front();
                    w.bytes_written()
                }
                _ => {
                    // Too small or broken: give it back empty, keep the message.
                    self.stats.bad_chains += 1;
                    0
                }
            };
            if let Err(e) = q.add_used(mem, head, u32::try_from(len).unwrap_or(0)) {
                log::debug!("virtio-console: add_used: {e}");
            }
            used = true;
        }
        used
    }

    /// Takes the guest's control messages and acts on them.
    fn ctrl_tx(&mut self, q: &mut Queue, mem: &Mem) -> bool {
        let mut used = false;
        // At most one ring's worth per call, on every queue here: a guest whose used ring
        // overlaps its avail ring makes each buffer given back a new one (see block.rs).
        let mut budget = q.size();
        loop {
            if budget == 0 {
                self.more = Some(CTRL_TX);
                break;
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            budget -= 1;
            let head = chain.head_index();
            let mut msg = [0u8; CTRL_LEN];
            let ok = match Reader::new(mem, chain) {
                Ok(mut r) => r.available_bytes() >= CTRL_LEN && r.read_exact(&mut msg).is_ok(),
                Err(_) => false,
            };
            if let Err(e) = q.add_used(mem, head, 0) {
                log::debug!("virtio-console: add_used: {e}");
            }
            used = true;
            if !ok {
                self.stats.bad_control += 1;
                continue;
            }
            let id = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
            let ev = u16::from_le_bytes([msg[4], msg[5]]);
            let value = u16::from_le_bytes([msg[6], msg[7]]);
            self.control_message(id, ev, value);
        }
        used
    }

    fn control_message(&mut self, id: u32, ev: u16, value: u16) {
        match ev {
            event::DEVICE_READY => {
                if value != 1 {
                    log::warn!("virtio-console: the guest driver failed to set up the device");
                } else if !self.device_ready {
                    self.device_ready = true;
                    for p in 0..self.ports.len() as u32 {
                        self.push_ctrl(p, event::DEVICE_ADD, 0);
                    }
                }
            }
            event::PORT_READY => {
                let Some(p) = self.ports.get_mut(id as usize) else {
                    self.stats.bad_control += 1;
                    return;
                };
                if value != 1 {
                    log::warn!("virtio-console: the guest could not add port {id}");
                    return;
                }
                if p.st.guest_ready {
                    return; // said twice: answered once
                }
                p.st.guest_ready = true;
                // Open before the name: a guest that finds a port by its name finds it connected
                // (Linux handles control messages in order; reads of an unconnected port are EOF).
                let (named, open) = (!p.name.is_empty(), p.st.host_open);
                if open {
                    self.push_ctrl(id, event::PORT_OPEN, 1);
                }
                if named {
                    self.push_ctrl(id, event::PORT_NAME, 1);
                }
            }
            event::PORT_OPEN => match self.ports.get_mut(id as usize) {
                Some(p) => p.st.guest_open = value != 0,
                None => self.stats.bad_control += 1,
            },
            _ => self.stats.bad_control += 1,
        }
    }

    /// Host → guest bytes of port `p` into the guest's receive buffers.
    fn rx(&mut self, p: usize, q: &mut Queue, mem: &Mem) -> bool {
        let mut used = false;
        let mut closed = false;
        {
            let Some(port) = self.ports.get_mut(p) else {
                return false;
            };
            let Some(input) = port.input.as_mut() else {
                return false;
            };
            if port.input_done {
                return false;
            }
            let mut budget = q.size();
            loop {
                if budget == 0 {
                    self.more = Some(rx_queue(p as u32));
                    break;
                }
                let Some(chain) = q.pop_descriptor_chain(mem) else {
                    break;
                };
                budget -= 1;
                let head = chain.head_index();
                let mut w = match Writer::new(mem, chain) {
                    Ok(w) => w,
                    Err(_) => {
                        self.stats.bad_chains += 1;
                        if let Err(e) = q.add_used(mem, head, 0) {
                            log::debug!("virtio-console: add_used: {e}");
                        }
                        used = true;
                        continue;
                    }
                };
                let room = w.available_bytes().min(self.scratch.len());
                if room == 0 {
                    self.stats.bad_chains += 1;
                    if let Err(e) = q.add_used(mem, head, 0) {
                        log::debug!("virtio-console: add_used: {e}");
                    }
                    used = true;
                    continue;
                }
                match input.read(&mut self.scratch[..room]) {
                    Ok(0) => {
                        q.go_to_previous_position();
                        closed = true;
                        break;
                    }
                    Ok(n) => {
                        if w.write_all(&self.scratch[..n]).is_err() {
                            self.stats.bad_chains += 1;
                        }
                        self.stats.rx_bytes += n as u64;
                        let len = u32::try_from(w.bytes_written()).unwrap_or(0);
                        if let Err(e) = q.add_used(mem, head, len) {
                            log::debug!("virtio-console: add_used: {e}");
                        }
                        used = true;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => q.go_to_previous_position(),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        q.go_to_previous_position();
                        break;
                    }
                    Err(e) => {
                        log::debug!("virtio-console: port {p} input: {e}");
                        q.go_to_previous_position();
                        closed = true;
                        break;
                    }
                }
            }
            if closed {
                port.input_done = true;
            }
        }
        if closed {
            // The host side of an input-only port goes: the guest's reads see EOF.
            let port = &mut self.ports[p];
            if port.output.is_none() && port.st.host_open {
                port.st.host_open = false;
                if port.st.guest_ready {
                    self.push_ctrl(p as u32, event::PORT_OPEN, 0);
                }
            }
        }
        used
    }

    /// Guest → host bytes of port `p`: writes what is staged, then takes the next buffers while
    /// the host fd accepts them. Returns (buffers used, everything queued was written).
    fn tx(&mut self, p: usize, q: &mut Queue, mem: &Mem) -> (bool, bool) {
        let Some(port) = self.ports.get_mut(p) else {
            return (false, true);
        };
        let mut used = false;
        // Every chain taken counts, and so does every piece of a long one.
        let mut budget = q.size();
        loop {
            // 1. What is staged goes first.
            while port.staged_off < port.st.staged.len() {
                let Some(out) = port.output.as_mut().filter(|_| !port.output_broken) else {
                    port.staged_off = port.st.staged.len();
                    break;
                };
                match out.write(&port.st.staged[port.staged_off..]) {
                    Ok(n) => {
                        port.staged_off += n;
                        self.stats.tx_bytes += n as u64;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return (used, false),
                    Err(e) => {
                        log::debug!("virtio-console: port {p} output: {e}");
                        port.output_broken = true;
                    }
                }
            }
            port.st.staged.clear();
            port.staged_off = 0;
            // 2. The next buffer (or the rest of a long one).
            if budget == 0 {
                self.more = Some(tx_queue(p as u32));
                return (used, false);
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                return (used, true);
            };
            budget -= 1;
            let head = chain.head_index();
            let taken = port.st.tx_taken as usize;
            let piece = Reader::new(mem, chain).ok().and_then(|mut r| {
                let total = r.available_bytes();
                let mut rest = if taken > 0 {
                    r.split_at(taken).ok()?
                } else {
                    r
                };
                let want = (total.checked_sub(taken)?).min(STAGE);
                port.st.staged.resize(want, 0);
                rest.read_exact(&mut port.st.staged).ok()?;
                Some((total, want))
            });
            match piece {
                Some((total, want)) if taken + want < total => {
                    // More of this chain later: it stays at the head of the queue.
                    port.st.tx_taken = (taken + want) as u32;
                    q.go_to_previous_position();
                }
                other => {
                    if other.is_none() {
                        self.stats.bad_chains += 1;
                        port.st.staged.clear();
                    }
                    port.st.tx_taken = 0;
                    if let Err(e) = q.add_used(mem, head, 0) {
                        log::debug!("virtio-console: add_used: {e}");
                    }
                    used = true;
                }
            }
        }
    }

    /// Writes out the transmit queues: the ordinary ports first, then the barrier ports if
    /// every ordinary port is written out. Returns the mask of queues used.
    fn tx_all(&mut self, queues: &mut [Queue], mem: &Mem) -> u64 {
        let mut mask = 0;
        let mut all_out = true;
        for barrier in [false, true] {
            if barrier && !all_out {
                break;
            }
            for p in 0..self.ports.len() {
                if self.ports[p].barrier != barrier {
                    continue;
                }
                let qi = tx_queue(p as u32);
                let Some(q) = queues.get_mut(qi).filter(|q| q.ready()) else {
                    continue;
                };
                let (used, out) = self.tx(p, q, mem);
                if used {
                    mask |= 1 << qi;
                }
                all_out &= out;
            }
        }
        mask
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        F_MULTIPORT
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_console_config: cols (le16), rows (le16), max_nr_ports (le32), emerg_wr.
        let mut cfg = [0u8; 12];
        cfg[4..8].copy_from_slice(&MAX_PORTS.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| cfg.get(usize::try_from(o).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, acked_features: u64) {
        self.multiport = acked_features & F_MULTIPORT != 0;
    }

    fn process_queue(&mut self, _index: usize, _queue: &mut Queue, _mem: &Mem) -> bool {
        // The transport calls `process`, which sees every queue (a port's output may wait for
        // the others').
        false
    }

    fn process(&mut self, index: usize, queues: &mut [Queue], mem: &Mem) -> u64 {
        let mut mask = 0;
        match port_of(index) {
            None if !self.multiport => {}
            None => {
                if index == CTRL_TX {
                    if let Some(q) = queues.get_mut(CTRL_TX) {
                        if self.ctrl_tx(q, mem) {
                            mask |= 1 << CTRL_TX;
                        }
                    }
                }
            }
            Some((p, false)) => {
                if let Some(q) = queues.get_mut(index) {
                    if self.rx(p, q, mem) {
                        mask |= 1 << index;
                    }
                }
            }
            Some((_, true)) => mask |= self.tx_all(queues, mem),
        }
        if self.multiport {
            if let Some(q) = queues.get_mut(CTRL_RX).filter(|q| q.ready()) {
                if self.ctrl_rx(q, mem) {
                    mask |= 1 << CTRL_RX;
                }
            }
        }
        mask
    }

    fn backend_fd_event(&mut self, fd: RawFd, queues: &mut [Queue], mem: &Mem) -> u64 {
        let mut mask = 0;
        for p in 0..self.ports.len() {
            let port = &self.ports[p];
            if port.input.as_ref().map(|f| f.as_raw_fd()) == Some(fd) {
                let qi = rx_queue(p as u32);
                if let Some(q) = queues.get_mut(qi).filter(|q| q.ready()) {
                    if self.rx(p, q, mem) {
                        mask |= 1 << qi;
                    }
                }
            }
        }
        // An output fd became writable: everything waiting may move (barrier ports included).
        mask |= self.tx_all(queues, mem);
        if let Some(q) = queues.get_mut(CTRL_RX).filter(|q| q.ready()) {
            if self.multiport && self.ctrl_rx(q, mem) {
                mask |= 1 << CTRL_RX;
            }
        }
        mask
    }

    fn take_more(&mut self) -> Option<usize> {
        self.more.take()
    }

    fn output_pending(&self) -> bool {
        // A barrier port waits only behind an ordinary port's staged bytes, so this covers both.
        self.ports
            .iter()
            .any(|p| p.staged_off < p.st.staged.len() && p.output.is_some() && !p.output_broken)
    }

    fn reset(&mut self) {
        self.more = None;
        self.device_ready = false;
        self.multiport = false;
        self.ctrl_pending.clear();
        for p in &mut self.ports {
            p.st.guest_ready = false;
            p.st.guest_open = false;
            p.st.tx_taken = 0;
            p.st.staged.clear();
            p.staged_off = 0;
        }
    }

    fn save_state(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self.state()).ok()
    }

    fn restore_state(&mut self, v: serde_json::Value) -> Result<(), String> {
        let s: ConsoleState =
            serde_json::from_value(v).map_err(|e| format!("console state: {e}"))?;
        self.set_state(s)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const F_WRITE: u16 = 2;
    const QSIZE: u16 = 16;

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array of two ints.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds were just created and are owned by nobody else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    /// Guest memory for the mock queues (one per device queue, 64 KiB apart from 0) and data
    /// above 4 MiB.
    struct Rig {
        mem: Mem,
    }

    type Vqs<'a> = Vec<MockSplitQueue<'a, Mem>>;

    impl Rig {
        fn new() -> Self {
            Rig {
                mem: Mem::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap(),
            }
        }
        /// The mock rings: made once (making them again would reset them).
        fn vqs(&self) -> Vqs<'_> {
            (0..2 * (MAX_PORTS as usize + 1))
                .map(|q| {
                    MockSplitQueue::create(&self.mem, GuestAddress(q as u64 * 0x1_0000), QSIZE)
                })
                .collect()
        }
    }

    fn queues(vqs: &Vqs) -> Vec<Queue> {
        vqs.iter()
            .map(|vq| vq.create_queue::<Queue>().unwrap())
            .collect()
    }

    /// The used entries (id, len) of queue `q`.
    fn used(vqs: &Vqs, q: usize) -> Vec<(u32, u32)> {
        let vq = &vqs[q];
        let n = vq.used().idx().load();
        (0..n)
            .map(|i| {
                let e = vq.used().ring().ref_at(i as usize).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    fn ctrl(id: u32, ev: u16, value: u16) -> [u8; 8] {
        let mut m = [0u8; 8];
        m[..4].copy_from_slice(&id.to_le_bytes());
        m[4..6].copy_from_slice(&ev.to_le_bytes());
        m[6..].copy_from_slice(&value.to_le_bytes());
        m
    }

    /// Sends control messages from the "guest" (one chain each, data at `at`).
    fn guest_ctrl(
        r: &Rig,
        vqs: &Vqs,
        c: &mut Console,
        qs: &mut [Queue],
        msgs: &[[u8; 8]],
        at: u64,
    ) {
        let vq = &vqs[CTRL_TX];
        let descs: Vec<_> = msgs
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let a = at + 16 * i as u64;
                r.mem.write_slice(m, GuestAddress(a)).unwrap();
                desc(a, 8, 0)
            })
            .collect();
        let base = vq.avail().idx().load();
        vq.add_desc_chains(&descs, base).unwrap();
        c.process(CTRL_TX, qs, &r.mem);
    }

    /// Posts `n` control receive buffers of 64 bytes at `at`.
    fn post_ctrl_rx(vqs: &Vqs, n: usize, at: u64) {
        let descs: Vec<_> = (0..n)
            .map(|i| desc(at + 64 * i as u64, 64, F_WRITE))
            .collect();
        vqs[CTRL_RX].add_desc_chains(&descs, 0).unwrap();
    }

    fn read_ctrl(r: &Rig, vqs: &Vqs, at: u64, i: usize) -> (u32, u16, u16, Vec<u8>, u32) {
        let (id, len) = used(vqs, CTRL_RX)[i];
        let mut b = vec![0u8; len as usize];
        r.mem
            .read_slice(&mut b, GuestAddress(at + 64 * u64::from(id)))
            .unwrap();
        let m = |i: usize| b[i];
        (
            u32::from_le_bytes([m(0), m(1), m(2), m(3)]),
            u16::from_le_bytes([m(4), m(5)]),
            u16::from_le_bytes([m(6), m(7)]),
            b[8..].to_vec(),
            len,
        )
    }

    #[test]
    fn handshake_adds_opens_and_names_ports() {
        let r = Rig::new();
        let (_in_r, in_w) = pipe();
        let (out_r, _out_w) = pipe();
        let mut c = Console::new(vec![
            PortBackend {
                name: "rvmm.control".into(),
                input: Some(OwnedFd::from(_in_r)),
                output: Some(OwnedFd::from(_out_w)),
                barrier: true,
            },
            PortBackend {
                name: String::new(),
                input: None,
                output: None,
                barrier: false,
            },
        ])
        .unwrap();
        drop((in_w, out_r));
        c.activate(F_MULTIPORT);
        let vqs = r.vqs();
        let mut qs = queues(&vqs);
        post_ctrl_rx(&vqs, 8, 0x40_0000);
        guest_ctrl(
            &r,
            &vqs,
            &mut c,
            &mut qs,
            &[ctrl(u32::MAX, event::DEVICE_READY, 1)],
            0x50_0000,
        );
        assert_eq!(used(&vqs, CTRL_TX).len(), 1);
        let at = 0x40_0000;
        let got: Vec<_> = (0..2).map(|i| read_ctrl(&r, &vqs, at, i)).collect();
        assert_eq!((got[0].0, got[0].1), (0, event::DEVICE_ADD));
        assert_eq!((got[1].0, got[1].1), (1, event::DEVICE_ADD));
        // PORT_READY: port 0 (connected, named) gets PORT_OPEN then PORT_NAME; port 1 nothing.
        guest_ctrl(
            &r,
            &vqs,
            &mut c,
            &mut qs,
            &[
                ctrl(0, event::PORT_READY, 1),
                ctrl(1, event::PORT_READY, 1),
                ctrl(0, event::PORT_READY, 1),
            ],
            0x50_0000,
        );
        let open = read_ctrl(&r, &vqs, at, 2);
        assert_eq!((open.0, open.1, open.2), (0, event::PORT_OPEN, 1));
        let name = read_ctrl(&r, &vqs, at, 3);
        assert_eq!(
            (name.0, name.1, name.3.as_slice()),
            (0, event::PORT_NAME, &b"rvmm.control"[..])
        );
        assert_eq!(used(&vqs, CTRL_RX).len(), 4);
        assert!(c.state().ports[0].guest_ready);
        // The guest opens the port.
        guest_ctrl(
            &r,
            &vqs,
            &mut c,
            &mut qs,
            &[ctrl(0, event::PORT_OPEN, 1)],
            0x50_0000,
        );
        assert!(c.state().ports[0].guest_open);
        // State survives a save and restore.
        let saved = c.save_state().unwrap();
        let mut c2 = Console::new(vec![
            PortBackend {
                name: "rvmm.control".into(),
                input: None,
                output: None,
                barrier: true,
            },
            PortBackend {
                name: String::new(),
                input: None,
                output: None,
                barrier: false,
            },
        ])
        .unwrap();
        c2.restore_state(saved).unwrap();
        assert_eq!(c2.state(), c.state());
        // A state with another number of ports is refused.
        let mut c3 = Console::new(Vec::new()).unwrap();
        assert!(c3.restore_state(c.save_state().unwrap()).is_err());
    }

    #[test]
    fn output_waits_for_the_host_and_frames_wait_for_output() {
        let r = Rig::new();
        let (ctl_r, ctl_w) = pipe();
        let (out_r, out_w) = pipe();
        // SAFETY: fcntl on our pipe.
        unsafe { libc::fcntl(out_w.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
        let mut c = Console::new(vec![
            PortBackend {
                name: "ctl".into(),
                input: None,
                output: Some(OwnedFd::from(ctl_w)),
                barrier: true,
            },
            PortBackend {
                name: "out".into(),
                input: None,
                output: Some(OwnedFd::from(out_w)),
                barrier: false,
            },
        ])
        .unwrap();
        c.activate(F_MULTIPORT);
        let vqs = r.vqs();
        let mut qs = queues(&vqs);
        // 48 KiB of output in three 16 KiB buffers (the pipe holds 4 KiB), then a frame.
        let data: Vec<u8> = (0..48 * 1024).map(|i| (i % 251) as u8).collect();
        r.mem.write_slice(&data, GuestAddress(0x100_0000)).unwrap();
        let descs: Vec<_> = (0..3)
            .map(|i| desc(0x100_0000 + i * 16384, 16384, 0))
            .collect();
        vqs[tx_queue(1)].add_desc_chains(&descs, 0).unwrap();
        r.mem
            .write_slice(b"EXIT", GuestAddress(0x180_0000))
            .unwrap();
        vqs[tx_queue(0)]
            .add_desc_chains(&[desc(0x180_0000, 4, 0)], 0)
            .unwrap();
        c.process(tx_queue(0), &mut qs, &r.mem);
        let mut ctl_r = ctl_r;
        let mut out_r = out_r;
        for f in [&ctl_r, &out_r] {
            // SAFETY: fcntl on our pipe.
            unsafe {
                libc::fcntl(f.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK);
            }
        }
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        let mut frames = Vec::new();
        for _ in 0..1000 {
            if let Ok(n) = ctl_r.read(&mut buf) {
                frames.extend_from_slice(&buf[..n]);
                // The frame is written only after every byte of output is in its pipe.
                while let Ok(n) = out_r.read(&mut buf) {
                    got.extend_from_slice(&buf[..n]);
                }
                assert_eq!(got.len(), data.len(), "a frame overtook the output");
            }
            if let Ok(n) = out_r.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
            if frames == b"EXIT" {
                break;
            }
            // The host's fd has room again.
            c.backend_fd_event(-1, &mut qs, &r.mem);
        }
        assert_eq!(got, data);
        assert_eq!(frames, b"EXIT");
        assert_eq!(used(&vqs, tx_queue(1)).len(), 3);
        assert_eq!(used(&vqs, tx_queue(0)).len(), 1);
    }

    #[test]
    fn long_chains_are_taken_in_pieces_and_input_ends_with_eof() {
        let r = Rig::new();
        let (out_r, out_w) = pipe();
        let (in_r, in_w) = pipe();
        let mut c = Console::new(vec![
            PortBackend {
                name: "out".into(),
                input: None,
                output: Some(OwnedFd::from(out_w)),
                barrier: false,
            },
            PortBackend {
                name: "in".into(),
                input: Some(OwnedFd::from(in_r)),
                output: None,
                barrier: false,
            },
        ])
        .unwrap();
        c.activate(F_MULTIPORT);
        let vqs = r.vqs();
        let mut qs = queues(&vqs);
        // One chain of 200 KiB (more than STAGE) over two descriptors.
        let data: Vec<u8> = (0..200 * 1024).map(|i| (i % 253) as u8).collect();
        r.mem.write_slice(&data, GuestAddress(0x100_0000)).unwrap();
        let vq = &vqs[tx_queue(0)];
        let chain = [
            RawDescriptor::from(SplitDescriptor::new(0x100_0000, 100 * 1024, 1, 1)),
            desc(0x100_0000 + 100 * 1024, 100 * 1024, 0),
        ];
        vq.add_desc_chains(&chain, 0).unwrap();
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            let mut out_r = out_r;
            out_r.read_to_end(&mut v).unwrap();
            v
        });
        for _ in 0..10_000 {
            c.process(tx_queue(0), &mut qs, &r.mem);
            if used(&vqs, tx_queue(0)).len() == 1 && c.ports[0].st.staged.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(used(&vqs, tx_queue(0)), vec![(0, 0)]);
        drop(c.ports[0].output.take());
        assert_eq!(reader.join().unwrap(), data);
        // Input: bytes into the posted buffers, then EOF closes the port from the host side.
        let mut in_w = in_w;
        in_w.write_all(b"hello").unwrap();
        drop(in_w);
        c.control_message(u32::MAX, event::DEVICE_READY, 1);
        c.control_message(1, event::PORT_READY, 1);
        c.ctrl_pending.clear();
        vqs[rx_queue(1)]
            .add_desc_chains(
                &[
                    desc(0x150_0000, 4096, F_WRITE),
                    desc(0x150_1000, 4096, F_WRITE),
                ],
                0,
            )
            .unwrap();
        c.process(rx_queue(1), &mut qs, &r.mem);
        assert_eq!(used(&vqs, rx_queue(1)), vec![(0, 5)]);
        let mut b = [0u8; 5];
        r.mem.read_slice(&mut b, GuestAddress(0x150_0000)).unwrap();
        assert_eq!(&b, b"hello");
        assert_eq!(
            c.ctrl_pending.iter().copied().collect::<Vec<_>>(),
            vec![(1, event::PORT_OPEN, 0)]
        );
        assert!(!c.state().ports[1].host_open);
    }

    #[test]
    fn garbage_from_the_guest_is_survived() {
        let r = Rig::new();
        let (_out_r, out_w) = pipe();
        let mut c = Console::new(vec![PortBackend {
            name: "out".into(),
            input: None,
            output: Some(OwnedFd::from(out_w)),
            barrier: false,
        }])
        .unwrap();
        c.activate(F_MULTIPORT);
        let vqs = r.vqs();
        let mut qs = queues(&vqs);
        // Chains outside memory, write-only buffers on a transmit queue, short control messages,
        // unknown events and port ids, on every queue.
        let bad = [
            desc(0xffff_0000_0000, 4096, 0),
            desc(0x100_0000, 4096, F_WRITE),
            desc(0x100_0000, u32::MAX, 0),
            desc(0x100_0000, 3, 0),
        ];
        for vq in &vqs {
            vq.add_desc_chains(&bad, 0).unwrap();
        }
        r.mem
            .write_slice(&ctrl(1000, event::PORT_READY, 1), GuestAddress(0x100_0000))
            .unwrap();
        for q in 0..qs.len() {
            c.process(q, &mut qs, &r.mem);
        }
        guest_ctrl(
            &r,
            &vqs,
            &mut c,
            &mut qs,
            &[
                ctrl(7, event::PORT_OPEN, 1),
                ctrl(0, 99, 1),
                ctrl(0, event::PORT_READY, 0),
            ],
            0x50_0000,
        );
        assert!(c.stats.bad_chains > 0);
        assert!(c.stats.bad_control > 0);
        // Every chain was given back.
        assert_eq!(used(&vqs, tx_queue(0)).len(), bad.len());
        assert_eq!(used(&vqs, CTRL_TX).len(), bad.len() + 3);
        // Reading a config beyond its end gives zeros.
        let mut b = [0xffu8; 4];
        c.read_config(u64::MAX - 1, &mut b);
        assert_eq!(b, [0; 4]);
        c.read_config(4, &mut b);
        assert_eq!(u32::from_le_bytes(b), MAX_PORTS);
    }
}

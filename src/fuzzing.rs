//! Entry points for the cargo-fuzz targets in fuzz/ (docs/fuzzing.md). Each takes one byte string
//! and drives the real code that a guest, or a file, feeds: nothing here re-implements a parser.
//! Every function checks properties besides "does not panic" and panics when one fails (a finding).
//!
//! Not an API: only the fuzz targets and `write_seeds` below use it.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::i8042::I8042;
use crate::devices::serial::SerialDevice;
use crate::devices::tap::Tap;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::console::{self, Console, PortBackend};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::{Mem, VirtioDevice};
use crate::devices::{Bus, BusDevice, IrqLine, SharedDevice};
use crate::vmm::layout;
use crate::vmm::snapshot::{Layout, SerialSnap, Slot, Snapshot};

/// Reads the fuzz input front to back; past the end everything reads as zero.
pub struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self(data)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(usize::MAX)
    }
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// Size of the guest RAM the virtio targets build (one region at guest address 0).
pub const GUEST_RAM: usize = 0x1_0000;

/// Guest RAM of [`GUEST_RAM`] bytes holding `image` (zero-padded, cut to size).
pub fn guest_memory(image: &[u8]) -> Mem {
    let mem = Mem::from_ranges(&[(GuestAddress(0), GUEST_RAM)]).expect("anonymous guest memory");
    let n = image.len().min(GUEST_RAM);
    mem.write_slice(&image[..n], GuestAddress(0))
        .expect("image fits guest memory");
    mem
}

fn irq() -> Arc<IrqLine> {
    Arc::new(IrqLine {
        gsi: 5,
        evt: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
    })
}

/// A disk backed by a memfd of `len` bytes, each sector filled with its number.
fn memfd_disk(len: u64) -> File {
    // SAFETY: a NUL-terminated name and flags; the returned fd is checked and then owned.
    let fd = unsafe { libc::memfd_create(c"rvmm-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh fd nothing else owns.
    let mut f = unsafe { File::from_raw_fd(fd) };
    let data: Vec<u8> = (0..len).map(|i| (i / 512) as u8).collect();
    f.write_all(&data).expect("memfd write");
    f
}

fn file_bytes(f: &File) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let len = f.metadata().expect("memfd metadata").len();
    let mut v = vec![0u8; len as usize];
    f.read_exact_at(&mut v, 0).expect("memfd read");
    v
}

/// A tap stand-in: one end of a non-blocking datagram socket pair (frame boundaries kept), and
/// the other end for the test.
fn socket_tap() -> (Tap, OwnedFd) {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::Datagram,
        None,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair");
    (Tap::from_fd(a).expect("tap from a socket"), b)
}

/// Every datagram waiting on `fd`.
fn drain(fd: &OwnedFd) -> Vec<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        // SAFETY: reading into a live buffer of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return frames;
        }
        frames.push(buf[..n as usize].to_vec());
    }
}

fn send(fd: &OwnedFd, frame: &[u8]) {
    use std::os::fd::AsRawFd;
    // SAFETY: sending from a live buffer of its length.
    unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
}

/// Largest frame virtio-net moves to the tap (its MAX_FRAME).
const NET_MAX_FRAME: usize = 65536 + 18;

/// One virtqueue as the guest set it up: size, ring addresses and indices from `input`. None
/// when the transport would refuse it (not a valid size, or rings outside RAM).
fn guest_queue(input: &mut Input<'_>, mem: &Mem, max_size: u16) -> Option<Queue> {
    let mut q = Queue::new(max_size).ok()?;
    let size = 1u16 << (input.u8() % 10);
    q.try_set_size(size).ok()?;
    q.set_desc_table_address(Some(u32::from(input.u16())), Some(0));
    q.set_avail_ring_address(Some(u32::from(input.u16())), Some(0));
    q.set_used_ring_address(Some(u32::from(input.u16())), Some(0));
    q.set_next_avail(input.u16());
    q.set_next_used(input.u16());
    q.set_event_idx(input.u8() & 1 == 1);
    q.set_ready(true);
    q.is_valid(mem).then_some(q)
}

/// Runs `process_queue` on `q` twice (a second notification), checking the used ring's index
/// advances by at most what was popped.
fn process(dev: &mut dyn VirtioDevice, index: usize, q: &mut Queue, mem: &Mem) {
    for _ in 0..2 {
        let used_before = q.next_used();
        let avail_before = q.next_avail();
        dev.process_queue(index, q, mem);
        let used = q.next_used().wrapping_sub(used_before);
        let popped = q.next_avail().wrapping_sub(avail_before);
        assert!(
            used <= popped,
            "a chain goes back on the used ring at most once"
        );
    }
}

/// virtio-blk: the guest's descriptor chains on the request queue, as the device walks them.
///
/// Input: disk sectors (u8 % 17) and extra bytes (u8, a partial sector), read-only (u8 & 1), the
/// queue ([`guest_queue`]), then guest RAM.
pub fn virtio_blk(data: &[u8]) {
    let mut input = Input::new(data);
    let len = u64::from(input.u8() % 17) * 512 + u64::from(input.u8());
    let read_only = input.u8() & 1 == 1;
    let header = input.bytes(12);
    let mem = guest_memory(input.rest());
    let file = memfd_disk(len);
    let before = file_bytes(&file);
    let check = file.try_clone().expect("dup memfd");
    let mut dev = Block::from_file(file, len, read_only, "rvmm-fuzz");
    let Some(mut q) = guest_queue(&mut Input::new(header), &mem, dev.queue_max_sizes()[0]) else {
        return;
    };
    process(&mut dev, 0, &mut q, &mem);
    let after = file_bytes(&check);
    assert_eq!(after.len(), before.len(), "the disk never grows");
    if read_only {
        assert!(after == before, "a read-only disk is never written");
    }
    // The partial sector at the end is outside the disk the guest sees.
    let whole = (len / 512 * 512) as usize;
    assert!(
        after[whole..] == before[whole..],
        "nothing written past the last sector"
    );
}

/// virtio-net: RX buffers the guest posted, filled from frames waiting on the "tap", and TX
/// chains, sent to it.
///
/// Input: up to 3 RX frames (u8 count, then u16 length and bytes each), the RX queue, the TX
/// queue ([`guest_queue`] each), then guest RAM.
pub fn virtio_net(data: &[u8]) {
    let mut input = Input::new(data);
    let (tap, peer) = socket_tap();
    for _ in 0..input.u8() % 4 {
        let n = usize::from(input.u16());
        send(&peer, input.bytes(n));
    }
    let rx_header = input.bytes(12);
    let tx_header = input.bytes(12);
    let mem = guest_memory(input.rest());
    let mut dev = Net::new(tap, [2, 0, 0, 0, 0, 1]);
    let max = dev.queue_max_sizes()[0];
    let rx = guest_queue(&mut Input::new(rx_header), &mem, max);
    let tx = guest_queue(&mut Input::new(tx_header), &mem, max);
    if let Some(mut q) = rx {
        process(&mut dev, 0, &mut q, &mem);
        let mut queues = [q];
        dev.backend_event(&mut queues, &mem);
    }
    if let Some(mut q) = tx {
        process(&mut dev, 1, &mut q, &mem);
    }
    for f in drain(&peer) {
        assert!(
            f.len() <= NET_MAX_FRAME,
            "a {}-byte frame reached the tap",
            f.len()
        );
    }
}

/// The host ends of the fuzz console's ports: what the test writes to and reads from.
pub struct ConsoleHosts {
    /// The write end of port 0's input (kept open: the port's input has no EOF).
    _input: File,
    /// The read ends of the ports' outputs.
    outputs: Vec<File>,
}

fn fuzz_pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is an array of two ints for pipe2 to fill.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just created and are owned by nothing else.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

/// Two ports as a run has them: "io" (host input `input`, output) and "control" (output, a
/// barrier). Returns the ports and the host ends.
fn console_ports(input: &[u8]) -> (Vec<PortBackend>, Vec<ConsoleHosts>) {
    let (in_r, mut in_w) = fuzz_pipe();
    let _ = in_w.write_all(input);
    let (out0_r, out0_w) = fuzz_pipe();
    let (out1_r, out1_w) = fuzz_pipe();
    let ports = vec![
        PortBackend {
            name: "io".into(),
            input: Some(in_r.into()),
            output: Some(out0_w.into()),
            barrier: false,
        },
        PortBackend {
            name: "control".into(),
            input: None,
            output: Some(out1_w.into()),
            barrier: true,
        },
    ];
    let hosts = vec![ConsoleHosts {
        _input: in_w,
        outputs: vec![out0_r, out1_r],
    }];
    (ports, hosts)
}

/// The multiport virtio-console: the guest's control messages, receive and transmit buffers on
/// two ports and the control queues, as the device walks them, with the host fds' events and
/// snapshot round trips in between.
///
/// Input: multiport (u8 & 1), host input for port 0 (u16 length, bytes), six queues (rx0, tx0,
/// control rx, control tx, rx1, tx1; [`guest_queue`] each), an op count (u8) and ops (u8: bit 7
/// set is a host fd event on fd `op % 3` of the console's, `op % 8 == 6` a state round trip,
/// else a notification of queue `op % 6`), then guest RAM.
pub fn virtio_console(data: &[u8]) {
    use std::io::Read;
    let mut input = Input::new(data);
    let multiport = input.u8() & 1 == 1;
    let n = usize::from(input.u16());
    let host_input = input.bytes(n);
    let headers: Vec<&[u8]> = (0..6).map(|_| input.bytes(12)).collect();
    let nops = usize::from(input.u8());
    let ops = input.bytes(nops);
    let mem = guest_memory(input.rest());
    let (ports, mut hosts) = console_ports(host_input);
    let mut dev = Console::new(ports).expect("two ports are allowed");
    dev.activate(if multiport { console::F_MULTIPORT } else { 0 });
    let fds: Vec<std::os::fd::RawFd> = dev.backend_fds().into_iter().map(|(fd, _)| fd).collect();
    // Queue indices of the six: rx0, tx0, ctrl rx, ctrl tx, rx1, tx1.
    let max = dev.queue_max_sizes().to_vec();
    let mut queues: Vec<Queue> = max
        .iter()
        .map(|&m| Queue::new(m).expect("the device's sizes are valid"))
        .collect();
    for (i, h) in headers.iter().enumerate() {
        if let Some(q) = guest_queue(&mut Input::new(h), &mem, max[i]) {
            queues[i] = q;
        }
    }
    let mut out = vec![0u8; 64 * 1024];
    for &op in ops {
        let before: Vec<(u16, u16)> = queues
            .iter()
            .map(|q| (q.next_avail(), q.next_used()))
            .collect();
        // Only a transmit queue or a host fd event can put bytes in the outputs.
        let writes_out = op & 0x80 != 0 || (op % 8 != 6 && op % 6 % 2 == 1);
        let mask = if op & 0x80 != 0 {
            let fd = fds[usize::from(op) % fds.len()];
            dev.backend_fd_event(fd, &mut queues, &mem)
        } else if op % 8 == 6 {
            let st = dev.state();
            assert!(
                st.ports.iter().all(|p| p.staged.len() <= console::STAGE),
                "a port stages at most STAGE bytes"
            );
            assert!(
                st.ctrl_pending.len() <= console::MAX_CTRL_PENDING,
                "the control messages waiting are bounded"
            );
            let saved = dev.save_state().expect("the console has state");
            dev.restore_state(saved).expect("its own state restores");
            assert!(dev.state() == st, "a restored console has the saved state");
            0
        } else {
            dev.process(usize::from(op % 6), &mut queues, &mem)
        };
        let _ = dev.take_more();
        for (i, (q, (avail, used))) in queues.iter().zip(before).enumerate() {
            let popped = q.next_avail().wrapping_sub(avail);
            let gave = q.next_used().wrapping_sub(used);
            assert!(gave <= popped, "queue {i}: a chain goes back at most once");
            assert!(
                popped <= q.size(),
                "queue {i}: at most a ring's worth per call (took {popped})"
            );
            if gave > 0 && i < 64 {
                assert!(mask & (1 << i) != 0, "queue {i} used but not reported");
            }
        }
        // The host reads what arrived, as rvmm run does (so outputs do not stay full); after the
        // ops that can write there only (draining empty pipes was half of each execution).
        for h in hosts.iter_mut().filter(|_| writes_out) {
            for o in &mut h.outputs {
                while matches!(o.read(&mut out), Ok(n) if n > 0) {}
            }
        }
    }
}

/// The virtio-mmio transport's registers with a virtio-blk (u8 % 4 == 0), a read-only virtio-blk
/// (1), a virtio-net (2) or a multiport virtio-console (3) behind it, and the queue work the
/// registers trigger.
///
/// Input: the device, then an op count (u8) and 8-byte ops `[op, size, offset u16, value u32]`,
/// then guest RAM. Ops: write, read, notify, backend event, configuration change, disk
/// replacement, and a driver set-up (every queue at addresses from `value`, up to DRIVER_OK).
pub fn virtio_mmio(data: &[u8]) {
    let mut input = Input::new(data);
    let kind = input.u8() % 4;
    let nops = usize::from(input.u8());
    let ops = input.bytes(nops * 8);
    let mem = guest_memory(input.rest());
    let mut peer = None;
    let mut backend_fds = Vec::new();
    let mut _hosts = Vec::new();
    let dev: Box<dyn VirtioDevice> = match kind {
        0 | 1 => Box::new(Block::from_file(
            memfd_disk(4096),
            4096,
            kind == 1,
            "rvmm-fuzz",
        )),
        2 => {
            let (tap, p) = socket_tap();
            send(&p, &[0x55; 60]);
            peer = Some(p);
            let net = Net::new(tap, [2, 0, 0, 0, 0, 1]);
            backend_fds.push(net.tap_fd());
            Box::new(net)
        }
        _ => {
            let (ports, hosts) = console_ports(b"host input");
            _hosts = hosts;
            let c = Console::new(ports).expect("two ports are allowed");
            backend_fds.extend(c.backend_fds().into_iter().map(|(fd, _)| fd));
            Box::new(c)
        }
    };
    let mut t = MmioTransport::new(dev, mem, irq()).expect("device queue sizes are valid");
    let mut ops = Input::new(ops);
    while !ops.is_empty() {
        let (op, size, off, v) = (ops.u8(), ops.u8(), u64::from(ops.u16()), ops.u32());
        let size = [1usize, 2, 4, 8][usize::from(size % 4)];
        let off = off % layout::VIRTIO_MMIO_SIZE;
        match op % 8 {
            0 | 1 => {
                let bytes = u64::from(v).wrapping_mul(0x0101_0101).to_le_bytes();
                t.write(off, &bytes[..size]);
            }
            2 => {
                let mut b = [0u8; 8];
                t.read(off, &mut b[..size]);
            }
            3 => {
                t.notify(v as usize % 4);
            }
            4 => {
                for &fd in &backend_fds {
                    t.backend_event(fd);
                }
            }
            5 => t.config_changed(),
            6 => {
                t.replace_disk(memfd_disk(u64::from(v % 8192)), u64::from(v));
            }
            _ => driver_setup(&mut t, v),
        }
        // Whatever happened, the identification registers stay put and the device only runs
        // with DRIVER_OK set.
        let mut magic = [0u8; 4];
        t.read(0, &mut magic);
        assert_eq!(u32::from_le_bytes(magic), 0x7472_6976);
        if t.state().activated {
            let mut st = [0u8; 4];
            t.read(0x70, &mut st);
            assert_ne!(u32::from_le_bytes(st) & 4, 0, "activated without DRIVER_OK");
        }
    }
    if let Some(p) = peer {
        for f in drain(&p) {
            assert!(f.len() <= NET_MAX_FRAME);
        }
    }
}

/// What a Linux driver does to bring a device up, with queue rings at addresses from `v`.
fn driver_setup(t: &mut MmioTransport, v: u32) {
    let mut w = |off: u64, val: u32| t.write(off, &val.to_le_bytes());
    w(0x70, 0);
    w(0x70, 3);
    w(0x24, 1);
    w(0x20, 1);
    w(0x24, 0);
    w(0x20, v & 0xffff);
    w(0x70, 0xb);
    for q in 0..2u32 {
        let base = (v >> 16).wrapping_add(q * 0x4000) & 0xfff0;
        w(0x30, q);
        w(0x38, 1 << ((v >> (q * 4)) % 9));
        w(0x80, base);
        w(0x84, 0);
        w(0x90, base + 0x1000);
        w(0x94, 0);
        w(0xa0, base + 0x2000);
        w(0xa4, 0);
        w(0x44, 1);
    }
    w(0x70, 0xf);
}

/// Counts the bytes a UART sends.
struct Counter(Arc<AtomicUsize>);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.fetch_add(buf.len(), Ordering::Relaxed);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The port-I/O bus as a VM has it (COM1, COM2, the i8042), and accesses a guest makes.
///
/// Input: 6-byte ops `[op, port selector, offset, size, value u16]`: write, read, host input for
/// a UART (`value` bytes), or a save-and-restore of a UART's state (as a snapshot does).
pub fn serial_i8042(data: &[u8]) {
    let resets = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let r = resets.clone();
    let mut bus = Bus::new();
    let mut uarts = Vec::new();
    for port in [layout::COM1_PORT, layout::COM2_PORT] {
        let drained = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
        let irq = IrqLine {
            gsi: 4,
            evt: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        };
        let uart = Arc::new(Mutex::new(SerialDevice::new(
            irq,
            Box::new(Counter(sent.clone())),
            drained,
        )));
        bus.insert(
            u64::from(port),
            u64::from(layout::SERIAL_PORT_SIZE),
            uart.clone(),
        )
        .expect("no overlap");
        uarts.push(uart);
    }
    let kbd: SharedDevice = Arc::new(Mutex::new(I8042::new(Box::new(move || {
        r.fetch_add(1, Ordering::Relaxed);
    }))));
    bus.insert(
        u64::from(layout::I8042_DATA_PORT),
        crate::devices::i8042::WINDOW,
        kbd,
    )
    .expect("no overlap");

    let mut input = Input::new(data);
    let mut expected_resets = 0;
    let mut data_writes = 0;
    while !input.is_empty() {
        let (op, sel, off, size, v) = (input.u8(), input.u8(), input.u8(), input.u8(), input.u16());
        let base = [
            layout::I8042_DATA_PORT,
            layout::COM1_PORT,
            layout::COM2_PORT,
        ][usize::from(sel % 3)];
        let port = u64::from(base) + u64::from(off % 16);
        let size = [1usize, 2, 4][usize::from(size % 3)];
        let uart = &uarts[usize::from(sel & 1)];
        match op % 6 {
            0..=2 => {
                let bytes = u32::from(v).to_le_bytes();
                if bus.write(port, &bytes[..size]) {
                    if port == u64::from(layout::I8042_CMD_PORT) && bytes[0] == 0xfe {
                        expected_resets += 1;
                    }
                    if base != layout::I8042_DATA_PORT {
                        data_writes += 1;
                    }
                }
            }
            3 => {
                let mut b = [0u8; 4];
                bus.read(port, &mut b[..size], 0xff);
            }
            4 => {
                let mut u = crate::devices::lock(uart);
                let room = u.fifo_room();
                let taken = u.enqueue(&vec![v as u8; usize::from(v % 100)]);
                assert!(taken <= room, "took {taken} bytes with room for {room}");
            }
            _ => {
                let mut u = crate::devices::lock(uart);
                let st = u.state();
                assert!(
                    st.in_buffer.len() <= 64,
                    "the receive FIFO holds at most 64 bytes"
                );
                let irq = IrqLine {
                    gsi: 4,
                    evt: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
                };
                let drained = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
                let back = SerialDevice::from_state(&st, irq, Box::new(std::io::sink()), drained)
                    .expect("a UART's own state restores");
                assert!(back.state() == st, "a restored UART has the saved state");
                *u = back;
            }
        }
    }
    assert_eq!(resets.load(Ordering::Relaxed), expected_resets);
    assert!(
        sent.load(Ordering::Relaxed) <= data_writes,
        "one byte out per register write at most"
    );
}

/// The host side of the VM channel: bytes from the guest, read in pieces as the frame reader
/// gets them, decoded and applied to the run's report as `rvmm run` does.
///
/// Input: a piece length (u8; 0 means 1) then that many bytes, repeated.
pub fn channel_host(data: &[u8]) {
    use rvmm_proto::frame::{self, Decoder, MAX_PAYLOAD};
    let mut input = Input::new(data);
    let mut dec = Decoder::default();
    let mut fed = Vec::new();
    let mut frames = Vec::new();
    let mut report = crate::vm::GuestReport::default();
    'outer: while !input.is_empty() {
        let n = usize::from(input.u8()).max(1);
        let piece = input.bytes(n);
        fed.extend_from_slice(piece);
        dec.feed(piece);
        loop {
            match dec.next_frame() {
                Ok(Some((kind, payload))) => {
                    assert!(payload.len() <= MAX_PAYLOAD);
                    report.apply(kind, &payload);
                    frames.push(frame::encode(kind, &payload));
                }
                Ok(None) => break,
                // The host stops the VM here.
                Err(_) => break 'outer,
            }
        }
    }
    // Frames re-encode to exactly the bytes they came from.
    let encoded: Vec<u8> = frames.concat();
    assert!(fed.starts_with(&encoded), "frames are the stream's prefix");
    // ... and the same bytes read in one piece give the same frames.
    let mut whole = Decoder::default();
    whole.feed(&fed);
    let mut again = Vec::new();
    while let Ok(Some((kind, payload))) = whole.next_frame() {
        again.push(frame::encode(kind, &payload));
    }
    assert!(
        again == frames,
        "the frames do not depend on how the stream was read"
    );
}

/// A `snapshot.json` as `Vm::restore` reads it, up to the KVM calls: parsed and checked against
/// the restoring VM's layout, then the UARTs and the virtio-mmio transports (with their queues,
/// over guest RAM of the layout's size) restored from it, and every queue notified once.
///
/// Input: the layout (u8 % 3: no devices; a read-only disk; a disk and a net device, with two
/// vCPUs), then the file.
pub fn snapshot(data: &[u8]) {
    let mut input = Input::new(data);
    let layout = fuzz_layout(input.u8());
    let raw = input.rest();
    let Ok(snap) = Snapshot::parse(raw, Path::new("snapshot.json"), "fuzz", &layout) else {
        return;
    };
    assert_eq!(snap.vcpus.len(), usize::from(layout.vcpus));
    assert_eq!(snap.serials.len(), 2);
    assert_eq!(snap.transports.len(), layout.devices.len());
    for s in &snap.serials {
        let irq = IrqLine {
            gsi: 4,
            evt: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        };
        let drained = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
        let _ = SerialDevice::from_state(&s.into(), irq, Box::new(std::io::sink()), drained);
    }
    let bytes = u64::from(layout.mem_mib) << 20;
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(bytes)
        .into_iter()
        .map(|(a, l)| (GuestAddress(a), l as usize))
        .collect();
    let mem = Mem::from_ranges(&ranges).expect("guest memory");
    for (slot, ts) in layout.devices.iter().zip(&snap.transports) {
        let mut _hosts = Vec::new();
        let mut dev: Box<dyn VirtioDevice> = match slot {
            Slot::Block { read_only } => {
                Box::new(Block::from_file(memfd_disk(0), 0, *read_only, "rvmm-fuzz"))
            }
            Slot::Net => Box::new(Net::new(socket_tap().0, [2, 0, 0, 0, 0, 1])),
            Slot::Console { .. } => {
                let (ports, hosts) = console_ports(b"");
                _hosts = hosts;
                Box::new(Console::new(ports).expect("two ports are allowed"))
            }
            Slot::Fs => Box::new(crate::devices::virtio::fs::Fs::new(None)),
        };
        // As the VMM's restore does: the device's own state first, refused if it does not fit.
        if let Some(d) = ts.device.clone() {
            if dev.restore_state(d).is_err() {
                continue;
            }
        }
        let queues = ts.queues.iter().cloned().map(Into::into).collect();
        if let Ok(mut t) = MmioTransport::restore(dev, mem.clone(), irq(), ts.state.clone(), queues)
        {
            for q in 0..t.num_queues() {
                t.notify(q);
            }
        }
    }
}

/// The layouts the snapshot target restores into.
pub fn fuzz_layout(sel: u8) -> Layout {
    let (vcpus, devices) = match sel % 4 {
        0 => (1, vec![]),
        1 => (1, vec![Slot::Block { read_only: true }]),
        2 => (2, vec![Slot::Block { read_only: false }, Slot::Net]),
        _ => (1, vec![Slot::Console { ports: 2 }]),
    };
    Layout {
        vcpus,
        mem_mib: 16,
        devices,
        channel: true,
        host: "fuzz".into(),
    }
}

/// A snapshot for [`fuzz_layout`]`(sel)` with zeroed KVM state and queues set up in RAM (seeds).
pub fn snapshot_seed(sel: u8) -> Vec<u8> {
    use crate::devices::virtio::mmio::TransportState;
    use crate::vmm::snapshot::{QueueSnap, Raw, TransportSnap, VcpuState, FORMAT, MAGIC};
    let layout = fuzz_layout(sel);
    let vcpu = VcpuState {
        regs: Raw::default(),
        sregs: Raw::default(),
        fpu: Raw::default(),
        xsave: None,
        xcrs: None,
        lapic: Raw::default(),
        mp_state: Raw::default(),
        events: Raw::default(),
        debugregs: Raw::default(),
        msrs: vec![(0x10, 12345), (0xc000_0080, 0x500)],
        tsc_khz: Some(2_000_000),
    };
    let queue = |i: u64| QueueSnap {
        max_size: 256,
        next_avail: 3,
        next_used: 3,
        event_idx_enabled: true,
        size: 64,
        ready: true,
        desc_table: 0x10_0000 + i * 0x4000,
        avail_ring: 0x10_1000 + i * 0x4000,
        used_ring: 0x10_2000 + i * 0x4000,
    };
    let transports = layout
        .devices
        .iter()
        .map(|d| TransportSnap {
            state: TransportState {
                acked_features: 1 << 32,
                status: 0xf,
                activated: true,
                ..Default::default()
            },
            queues: match d {
                Slot::Block { .. } => vec![queue(0)],
                Slot::Net | Slot::Fs => vec![queue(1), queue(2)],
                Slot::Console { ports } => (0..2 * (console::MAX_PORTS as u64 + 1))
                    .map(|i| {
                        let mut q = queue(3 + i);
                        q.ready = i < 2 + 2 * u64::from(*ports);
                        q.max_size = if (2..4).contains(&i) {
                            console::CTRL_QUEUE_SIZE
                        } else {
                            console::DATA_QUEUE_SIZE
                        };
                        q.size = q.size.min(q.max_size);
                        q
                    })
                    .collect(),
            },
            device: match d {
                Slot::Console { ports } => serde_json::to_value(console::ConsoleState {
                    multiport: true,
                    device_ready: true,
                    ports: (0..*ports)
                        .map(|p| console::PortState {
                            guest_ready: true,
                            guest_open: true,
                            host_open: true,
                            tx_taken: 0,
                            staged: if p == 0 {
                                b"staged".to_vec()
                            } else {
                                Vec::new()
                            },
                        })
                        .collect(),
                    ctrl_pending: vec![(1, console::event::PORT_OPEN, 1)],
                })
                .ok(),
                _ => None,
            },
        })
        .collect();
    let mut irqchips: Vec<Raw<kvm_bindings::kvm_irqchip>> = Vec::new();
    for i in 0..3 {
        let mut c = Raw::<kvm_bindings::kvm_irqchip>::default();
        c.0.chip_id = i;
        irqchips.push(c);
    }
    let snap = Snapshot {
        magic: MAGIC.into(),
        format: FORMAT,
        rvmm: crate::vmm::snapshot::rvmm_version(),
        tag: "fuzz".into(),
        layout: layout.clone(),
        cmdline: "console=ttyS0 reboot=k".into(),
        vcpus: vec![vcpu; usize::from(layout.vcpus)],
        irqchips,
        pit: Raw::default(),
        clock: Raw::default(),
        serials: vec![
            SerialSnap {
                regs: [12, 0, 0, 1, 3, 0x60, 8, 0xb0, 0],
                fifo: b"abc".to_vec(),
            },
            SerialSnap {
                regs: [12, 0, 1, 1, 3, 0x60, 8, 0xb0, 0],
                fifo: Vec::new(),
            },
        ],
        transports,
    };
    let mut v = vec![sel];
    v.extend(serde_json::to_vec(&snap).expect("snapshot json"));
    v
}

/// Seeds for every target: (target, name, bytes). `cargo test --lib write_fuzz_seeds --
/// --ignored` writes them to fuzz/seeds/.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    use rvmm_proto::frame;
    let mut v = Vec::new();
    // Queues: size 64 at desc 0x1000, avail 0x2000, used 0x3000; chains in RAM.
    let queue = |next_avail: u16| {
        let mut h = vec![6u8];
        for a in [0x1000u16, 0x2000, 0x3000, next_avail, next_avail] {
            h.extend(a.to_le_bytes());
        }
        h.push(0);
        h
    };
    // One RAM image with a request on each of the first three descriptors chains.
    let ram = |chains: &[&[(u64, u32, u16)]], headers: &[(u32, u64)]| {
        let mut m = vec![0u8; 0x8000];
        let mut d = 0u16;
        let mut heads = Vec::new();
        for chain in chains {
            heads.push(d);
            for (k, &(addr, len, flags)) in chain.iter().enumerate() {
                let more = k + 1 < chain.len();
                let at = 0x1000 + usize::from(d) * 16;
                m[at..at + 8].copy_from_slice(&addr.to_le_bytes());
                m[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
                let f = if more { flags | 1 } else { flags };
                m[at + 12..at + 14].copy_from_slice(&f.to_le_bytes());
                m[at + 14..at + 16].copy_from_slice(&(d + 1).to_le_bytes());
                d += 1;
            }
        }
        m[0x2002..0x2004].copy_from_slice(&(heads.len() as u16).to_le_bytes());
        for (i, h) in heads.iter().enumerate() {
            m[0x2004 + 2 * i..0x2006 + 2 * i].copy_from_slice(&h.to_le_bytes());
        }
        for (i, &(t, sector)) in headers.iter().enumerate() {
            let at = 0x4000 + i * 16;
            m[at..at + 4].copy_from_slice(&t.to_le_bytes());
            m[at + 8..at + 16].copy_from_slice(&sector.to_le_bytes());
        }
        // Guest RAM past the input is zero anyway.
        while m.last() == Some(&0) {
            m.pop();
        }
        m
    };
    let blk_ram = ram(
        &[
            &[(0x4000, 16, 0), (0x5000, 1024, 2), (0x6000, 1, 2)],
            &[(0x4010, 16, 0), (0x5000, 512, 0), (0x6001, 1, 2)],
            &[(0x4020, 16, 0), (0x5400, 20, 2), (0x6002, 1, 2)],
            &[(0x4030, 16, 0), (0x6003, 1, 2)],
        ],
        &[(0, 1), (1, 3), (8, 0), (4, 0)],
    );
    for ro in [0u8, 1] {
        let mut s = vec![8, 0, ro];
        s.extend(queue(0));
        s.extend(&blk_ram);
        v.push(("virtio_blk", format!("requests-ro{ro}"), s));
    }
    // The used ring on top of the avail ring, one buffer available: every used buffer made
    // another available (the device never returned).
    let mut s = vec![8, 0, 0, 4];
    for a in [0x1000u16, 0x2000, 0x2000, 0, 5] {
        s.extend(a.to_le_bytes());
    }
    s.push(0);
    let mut m = vec![0u8; 0x2004];
    m[0x2002] = 1;
    s.extend(m);
    v.push(("virtio_blk", "regression-used-ring-on-avail-ring".into(), s));
    // Net RX with the used ring on the avail ring and a frame waiting: every broken buffer
    // made another available, and the frame waited for a good one forever.
    let mut s = vec![1, 60, 0];
    s.extend([0x42; 60]);
    s.push(4);
    for a in [0x1000u16, 0x2000, 0x2000, 0, 5] {
        s.extend(a.to_le_bytes());
    }
    s.push(0);
    s.extend([0u8; 12]);
    let mut m = vec![0u8; 0x2004];
    m[0x2002] = 1;
    // Descriptor 0: a buffer outside guest RAM.
    m[0x1000..0x1008].copy_from_slice(&0xffff_0000_0000u64.to_le_bytes());
    m[0x1008] = 16;
    m[0x100c] = 2;
    s.extend(m);
    v.push(("virtio_net", "regression-used-ring-on-avail-ring".into(), s));
    // Net: two frames waiting, RX buffers at queue memory 0x1000, TX chains too.
    let net_ram = ram(
        &[&[(0x5000, 2048, 2)], &[(0x5800, 12, 0), (0x6000, 60, 0)]],
        &[],
    );
    let mut s = vec![2];
    for f in [&[0xffu8; 60][..], &[1u8; 1514][..]] {
        s.extend((f.len() as u16).to_le_bytes());
        s.extend(f);
    }
    s.extend(queue(0));
    s.extend(queue(1));
    s.extend(&net_ram);
    v.push(("virtio_net", "rx-and-tx".into(), s));
    // mmio: each device set up by a driver, a notify, reads of every register.
    for kind in 0..3u8 {
        let mut ops = Vec::new();
        let mut op = |o: u8, size: u8, off: u16, val: u32| {
            ops.push(o);
            ops.push(size);
            ops.extend(off.to_le_bytes());
            ops.extend(val.to_le_bytes());
        };
        op(7, 0, 0, 0x1000_0000 | (u32::from(kind) * 0x11));
        op(3, 0, 0, 0);
        op(3, 0, 0, 1);
        for off in (0..0x100u16).step_by(4) {
            op(2, 2, off, 0);
        }
        op(5, 0, 0, 0);
        op(6, 0, 0, 4096);
        op(0, 2, 0x70, 0);
        let mut s = vec![kind, (ops.len() / 8) as u8];
        s.extend(ops);
        s.extend(&blk_ram);
        v.push(("virtio_mmio", format!("driver-{kind}"), s));
    }
    // Ports: text to both UARTs, a loopback, input, a state round trip, the reset command.
    let mut s = Vec::new();
    let mut op = |o: u8, sel: u8, off: u8, size: u8, val: u16| {
        s.extend([o, sel, off, size]);
        s.extend(val.to_le_bytes());
    };
    for c in b"hi\n" {
        op(0, 1, 0, 0, u16::from(*c));
        op(0, 2, 0, 0, u16::from(*c));
    }
    op(0, 1, 4, 0, 0x10);
    op(0, 1, 0, 0, 0x41);
    op(3, 1, 5, 0, 0);
    op(3, 1, 0, 0, 0);
    op(4, 2, 0, 0, 70);
    op(5, 2, 0, 0, 0);
    op(3, 2, 0, 0, 0);
    op(0, 1, 3, 0, 0x80);
    op(0, 1, 0, 0, 1);
    op(3, 0, 4, 0, 0);
    op(0, 0, 4, 0, 0xfe);
    v.push(("serial_i8042", "mixed".into(), s));
    // Channel, both ways: the frames a run has, in pieces.
    let pieces = |stream: &[u8]| {
        let mut out = Vec::new();
        for c in stream.chunks(7) {
            out.push(c.len() as u8);
            out.extend(c);
        }
        out
    };
    let mut g = frame::encode(frame::READY, &[]);
    g.extend(frame::encode(
        frame::STARTED,
        &[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0],
    ));
    g.extend(frame::encode(frame::STDOUT, b"out\n"));
    g.extend(frame::encode(frame::STDERR, b"err\n"));
    g.extend(frame::encode(frame::FAILED, b"\x7fnot found"));
    g.extend(frame::encode(99, b"unknown"));
    g.extend(frame::encode(frame::EXIT, &42i32.to_le_bytes()));
    v.push(("channel_host", "run".into(), pieces(&g)));
    let mut g = frame::encode(frame::STDOUT, b"x");
    g.extend([frame::STDOUT, 0, 0, 1, 0]);
    v.push(("channel_host", "over-the-limit".into(), pieces(&g)));
    let mut start = rvmm_proto::Start::default();
    start.spec.argv = vec!["/bin/sh".into(), "-c".into(), "echo hi".into()];
    start.spec.env = vec!["PATH=/bin".into()];
    start.spec.cwd = "/".into();
    start.spec.hostname = "fuzz".into();
    start.spec.network.address = Some("10.88.0.2/16".into());
    start.spec.network.gateway = Some("10.88.0.1".into());
    start.spec.network.dns = vec!["10.88.0.1".into()];
    start.entropy = vec![7; 64];
    start.realtime = (1_700_000_000, 5);
    start.mac = Some([2, 0, 0, 0, 0, 1]);
    start.boot_security = true;
    let json = serde_json::to_vec(&start).expect("start json");
    let mut h = frame::encode_chunked(frame::SPEC, &json[..json.len() / 2]);
    h.extend(frame::encode(frame::STDIN, b"early"));
    h.extend(frame::encode_chunked(frame::SPEC, &json[json.len() / 2..]));
    h.extend(frame::encode(frame::SPEC_END, &[]));
    v.push(("guest_start", "start".into(), pieces(&h)));
    for sel in 0..4 {
        v.push(("snapshot", format!("layout-{sel}"), snapshot_seed(sel)));
    }
    // Console: both ports' queues and the control queues at queue memory 0x1000 (the same
    // rings: the device sees a guest that shares them), a control message in RAM, then every
    // queue notified, the host fds' events and a state round trip.
    let console_ram = ram(
        &[&[(0x5000, 8, 0)], &[(0x5800, 64, 2)], &[(0x6000, 4096, 2)]],
        &[],
    );
    let mut s = vec![1, 4, 0];
    s.extend(b"hi\n\x04");
    for _ in 0..6 {
        s.extend(queue(0));
    }
    let ops = [3u8, 2, 0, 1, 4, 5, 0x80, 0x81, 0x82, 6, 1, 0x40];
    s.push(ops.len() as u8);
    s.extend(ops);
    s.extend(&console_ram);
    v.push(("virtio_console", "ports".into(), s));
    // The used ring on top of the avail ring of every queue.
    let mut s = vec![1, 0, 0];
    for _ in 0..6 {
        s.push(4);
        for a in [0x1000u16, 0x2000, 0x2000, 0, 5] {
            s.extend(a.to_le_bytes());
        }
        s.push(0);
    }
    let ops = [0u8, 1, 2, 3, 4, 5, 0x80, 0x81];
    s.push(ops.len() as u8);
    s.extend(ops);
    let mut m = vec![0u8; 0x2004];
    m[0x2002] = 1;
    m[0x1008] = 64;
    m[0x100c] = 2;
    s.extend(m);
    v.push(("virtio_console", "used-ring-on-avail-ring".into(), s));
    v.extend(fs_seeds());
    v
}

/// Seeds of `virtio_fs`: a guest's mount reading, one changing things, one trying the ways out;
/// each on a writable and a read-only share.
fn fs_seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    use crate::devices::virtio::fs::abi::{self, op, Wire};
    let mut unique = 0u64;
    let mut req = |opcode: u32, node: u64, parts: &[&[u8]]| -> Vec<u8> {
        unique += 1;
        let body = parts.concat();
        let mut r = abi::InHeader {
            len: (40 + body.len()) as u32,
            opcode,
            unique,
            nodeid: node,
            uid: 1000,
            gid: 1000,
            ..Default::default()
        }
        .bytes()
        .to_vec();
        r.extend(body);
        // (room / 64, length, bytes)
        let mut framed = 0x1000u16.to_le_bytes().to_vec();
        framed.extend((r.len() as u16).to_le_bytes());
        framed.extend(r);
        framed
    };
    let init = abi::InitIn {
        major: 7,
        minor: 41,
        max_readahead: 1 << 17,
        flags: u32::MAX,
    };
    let open = |flags: i32| abi::OpenIn {
        flags: flags as u32,
        open_flags: 0,
    };
    let read = |fh: u64, size: u32| abi::ReadIn {
        fh,
        size,
        ..Default::default()
    };
    let release = |fh: u64| abi::ReleaseIn {
        fh,
        ..Default::default()
    };
    let mut sessions: Vec<(&str, Vec<Vec<u8>>)> = Vec::new();
    sessions.push((
        "mount-and-read",
        vec![
            req(op::INIT, 0, &[init.bytes()]),
            req(op::LOOKUP, 1, &[b"f\0"]),
            req(op::OPEN, 2, &[open(libc::O_RDONLY).bytes()]),
            req(op::READ, 2, &[read(1, 4096).bytes()]),
            req(op::RELEASE, 2, &[release(1).bytes()]),
            req(op::GETATTR, 1, &[abi::GetattrIn::default().bytes()]),
            req(op::STATFS, 1, &[]),
            req(op::OPENDIR, 1, &[open(0).bytes()]),
            req(op::READDIR, 1, &[read(2, 4096).bytes()]),
            req(op::RELEASEDIR, 1, &[release(2).bytes()]),
            req(op::LOOKUP, 1, &[b"d\0"]),
            req(op::FORGET, 2, &[abi::ForgetIn { nlookup: 1 }.bytes()]),
        ],
    ));
    let create = abi::CreateIn {
        flags: libc::O_RDWR as u32,
        mode: 0o644,
        ..Default::default()
    };
    let write = abi::WriteIn {
        fh: 1,
        size: 5,
        ..Default::default()
    };
    let setattr = abi::SetattrIn {
        valid: abi::fattr::SIZE | abi::fattr::MODE | abi::fattr::MTIME | abi::fattr::UID,
        size: 2,
        mode: 0o600,
        uid: 0,
        ..Default::default()
    };
    sessions.push((
        "change-things",
        vec![
            req(op::INIT, 0, &[init.bytes()]),
            req(op::CREATE, 1, &[create.bytes(), b"new\0"]),
            req(op::WRITE, 2, &[write.bytes(), b"hello"]),
            req(op::SETATTR, 2, &[setattr.bytes()]),
            req(
                op::MKDIR,
                1,
                &[
                    abi::MkdirIn {
                        mode: 0o755,
                        umask: 0,
                    }
                    .bytes(),
                    b"dir\0",
                ],
            ),
            req(op::SYMLINK, 3, &[b"link\0", b"../new\0"]),
            req(
                op::LINK,
                3,
                &[abi::LinkIn { oldnodeid: 2 }.bytes(), b"hard\0"],
            ),
            req(
                op::RENAME,
                1,
                &[abi::RenameIn { newdir: 3 }.bytes(), b"new\0", b"moved\0"],
            ),
            req(
                op::RENAME2,
                3,
                &[
                    abi::Rename2In {
                        newdir: 1,
                        flags: 2,
                        padding: 0,
                    }
                    .bytes(),
                    b"moved\0",
                    b"f\0",
                ],
            ),
            req(op::UNLINK, 3, &[b"hard\0"]),
            req(
                op::MKNOD,
                1,
                &[
                    abi::MknodIn {
                        mode: libc::S_IFIFO | 0o600,
                        ..Default::default()
                    }
                    .bytes(),
                    b"fifo\0",
                ],
            ),
            req(
                op::FSYNC,
                2,
                &[abi::FsyncIn {
                    fh: 1,
                    fsync_flags: 1,
                    padding: 0,
                }
                .bytes()],
            ),
            req(op::RMDIR, 1, &[b"dir\0"]),
            req(
                op::BATCH_FORGET,
                0,
                &[
                    abi::BatchForgetIn { count: 2, dummy: 0 }.bytes(),
                    abi::ForgetOne {
                        nodeid: 2,
                        nlookup: 1,
                    }
                    .bytes(),
                    abi::ForgetOne {
                        nodeid: 3,
                        nlookup: 9,
                    }
                    .bytes(),
                ],
            ),
            req(op::DESTROY, 0, &[]),
        ],
    ));
    sessions.push((
        "ways-out",
        vec![
            req(op::INIT, 0, &[init.bytes()]),
            req(op::LOOKUP, 1, &[b"out\0"]),
            req(op::OPEN, 2, &[open(libc::O_RDWR).bytes()]),
            req(op::LOOKUP, 2, &[b"secret\0"]),
            req(op::LOOKUP, 1, &[b"up\0"]),
            req(op::LOOKUP, 1, &[b"..\0"]),
            req(op::LOOKUP, 1, &[b"p\0"]),
            req(op::OPEN, 4, &[open(libc::O_RDONLY).bytes()]),
            req(op::CREATE, 1, &[create.bytes(), b"out\0"]),
            req(op::CREATE, 2, &[create.bytes(), b"x\0"]),
            req(
                op::RENAME,
                1,
                &[abi::RenameIn { newdir: 1 }.bytes(), b"f\0", b"../f\0"],
            ),
            req(op::LINK, 1, &[abi::LinkIn { oldnodeid: 2 }.bytes(), b"l\0"]),
            req(
                op::MKNOD,
                1,
                &[
                    abi::MknodIn {
                        mode: libc::S_IFCHR | 0o666,
                        rdev: 0x103,
                        ..Default::default()
                    }
                    .bytes(),
                    b"null\0",
                ],
            ),
            req(op::READLINK, 2, &[]),
            req(op::READ, 1, &[read(77, u32::MAX).bytes()]),
        ],
    ));
    let mut v = Vec::new();
    for (name, reqs) in sessions {
        for ro in [0u8, 1] {
            let mut s = vec![ro];
            for r in &reqs {
                s.extend(r);
            }
            v.push(("virtio_fs", format!("{name}-ro{ro}"), s));
        }
    }
    v
}

/// Node and handle bounds of the `virtio_fs` target's server (small, so the fuzzer reaches them).
const FS_LIMITS: crate::devices::virtio::fs::Limits = crate::devices::virtio::fs::Limits {
    inodes: 32,
    handles: 8,
};

/// virtio-fs's FUSE server on a real share: a file, a directory, a FIFO, symlinks pointing out of
/// the share (absolute and `..`), beside a directory it must never touch. Input: read-only bit,
/// then requests as (room / 64: u16, length: u16, bytes). Checks: a reply fits its room and its
/// header says its length and the request's ID; the server holds no more than its limits;
/// nothing outside the share changes; a read-only share does not change at all.
pub fn virtio_fs(data: &[u8]) {
    use crate::devices::virtio::fs::{abi, Server};
    use abi::Wire;
    let mut input = Input::new(data);
    let read_only = input.u8() & 1 == 1;
    let Ok(t) = tempfile::tempdir() else { return };
    let (share, outside) = (t.path().join("share"), t.path().join("outside"));
    let made = (|| -> std::io::Result<()> {
        std::fs::create_dir(&outside)?;
        std::fs::write(outside.join("secret"), "secret")?;
        std::fs::create_dir_all(share.join("d"))?;
        std::fs::write(share.join("f"), "file")?;
        std::os::unix::fs::symlink(&outside, share.join("out"))?;
        std::os::unix::fs::symlink("..", share.join("up"))?;
        let fifo = std::ffi::CString::new(share.join("p").as_os_str().as_encoded_bytes())
            .unwrap_or_default();
        // SAFETY: mkfifo with a NUL-terminated path.
        unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) };
        Ok(())
    })();
    if made.is_err() {
        return;
    }
    let before = tree_of(t.path());
    let Ok(mut server) = Server::new(&share, read_only, FS_LIMITS) else {
        return;
    };
    while !input.is_empty() {
        let room = usize::from(input.u16()) * 64;
        let len = usize::from(input.u16());
        let req = input.bytes(len);
        if let Some(out) = server.handle(req, room) {
            assert!(
                out.len() <= room,
                "a reply of {} bytes in {room}",
                out.len()
            );
            let h = abi::OutHeader::read(&out).expect("a reply has a header");
            assert_eq!(h.len as usize, out.len());
            assert_eq!(Some(h.unique), abi::InHeader::read(req).map(|r| r.unique));
        }
        let (inodes, handles) = server.held();
        assert!(inodes <= FS_LIMITS.inodes && handles <= FS_LIMITS.handles);
    }
    drop(server);
    let after = tree_of(t.path());
    // The share's own directory is the guest's too (as a bind mount's root is a container's:
    // its mode and owner may change).
    let outside_of = |tree: &[(String, String)]| -> Vec<(String, String)> {
        tree.iter()
            .filter(|(p, _)| p != "share" && !p.starts_with("share/"))
            .cloned()
            .collect()
    };
    assert_eq!(
        outside_of(&before),
        outside_of(&after),
        "outside the share changed"
    );
    if read_only {
        assert_eq!(before, after, "a read-only share changed");
    }
}

/// Every path under `root` (relative) with its type, mode, owner, size and a digest of its first
/// MiB.
fn tree_of(root: &Path) -> Vec<(String, String)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let rel = p.strip_prefix(root).unwrap_or(&p).display().to_string();
            let body = if m.is_file() {
                // The first MiB (the guest may make a file of terabytes, sparse: its size shows).
                let mut b = Vec::new();
                let _ = std::fs::File::open(&p).and_then(|f| {
                    std::io::Read::read_to_end(&mut std::io::Read::take(f, 1 << 20), &mut b)
                });
                format!("{:016x}", rvmm_shim::fnv1a(&b, 0xcbf2_9ce4_8422_2325))
            } else if m.file_type().is_symlink() {
                std::fs::read_link(&p)
                    .map(|l| l.display().to_string())
                    .unwrap_or_default()
            } else {
                String::new()
            };
            out.push((
                rel,
                format!("{:o} {}:{} {} {body}", m.mode(), m.uid(), m.gid(), m.len()),
            ));
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Runs the named target on `data` (for tests and seeds).
pub fn run(target: &str, data: &[u8]) {
    match target {
        "virtio_blk" => virtio_blk(data),
        "virtio_net" => virtio_net(data),
        "virtio_mmio" => virtio_mmio(data),
        "serial_i8042" => serial_i8042(data),
        "channel_host" => channel_host(data),
        "snapshot" => snapshot(data),
        "virtio_console" => virtio_console(data),
        "virtio_fs" => virtio_fs(data),
        // In fuzz/fuzz_targets/guest_start.rs: rvmm-init is not a dependency of this crate.
        "guest_start" => {}
        _ => panic!("no fuzz target {target}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Every seed runs through its target (so the targets work before any fuzzing).
    #[test]
    fn seeds_run_through_their_targets() {
        for (target, name, bytes) in seeds() {
            eprintln!("{target}/{name}");
            run(target, &bytes);
        }
    }

    #[test]
    fn snapshot_seeds_parse() {
        for sel in 0..4 {
            let s = snapshot_seed(sel);
            Snapshot::parse(&s[1..], Path::new("x"), "fuzz", &fuzz_layout(sel)).unwrap();
        }
    }

    /// Writes the seeds to fuzz/seeds/TARGET/NAME.
    #[test]
    #[ignore]
    fn write_fuzz_seeds() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        for (target, name, bytes) in seeds() {
            let d = root.join(target);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(name), bytes).unwrap();
        }
    }
}

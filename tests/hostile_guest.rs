//! A hostile guest, end to end: `rvmm run --isolation=vm` boots a purpose-built tiny "kernel"
//! (x86-64 machine code generated here, put where rvmm looks for its guest kernel) instead of
//! Linux. It writes garbage to every register of every virtio-mmio device, sets up queues full
//! of garbage descriptor chains and notifies them, writes garbage to COM1, COM2 and the i8042,
//! and floods the channel (the virtio-console's control port, port 0) with malformed frames and
//! frames of the largest size, never saying READY. Then either it sends a frame header over the size limit (the host must call the
//! stream corrupt and stop the VM), or it goes on flooding legal garbage (the start watchdog
//! must stop it).
//!
//! Either way the run ends with one line on stderr and status 125, nothing on stdout, the rvmm
//! process (which is the VMM) stays within a memory bound, and the host keeps nothing of the run:
//! no process, tap, lease, mount, cgroup or run directory (RunEnv checks on drop).

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use common::run::RunEnv;
use rvmm::vmm::layout;

static SERIAL: Mutex<()> = Mutex::new(());

/// Where the code is loaded and starts (the 64-bit boot protocol: long mode, identity-mapped).
const BASE: u64 = 0x10_0000;
/// Guest RAM the garbage descriptors point into (away from the code, inside the 64 MiB guest).
const GARBAGE_RAM: u64 = 0x40_0000;
const GARBAGE_RAM_LEN: u64 = 0x3b0_0000;
/// Queue rings the garbage driver sets up: device n, queue q at RINGS + (2n + q) * 0x4000.
const RINGS: u64 = 0x30_0000;
/// Virtio devices of a `--network bridge` VM: the image disk, the net device, the console.
const DEVICES: u32 = 3;
/// The virtio-console (the channel) among them.
const CONSOLE: u32 = 2;
/// Rings of the console driver that floods the channel (past the garbage drivers' rings).
const FLOOD_RING: u64 = RINGS + 2 * DEVICES as u64 * 0x4000;

/// xorshift64*: the garbage is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn u32(&mut self) -> u32 {
        (self.next() >> 32) as u32
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Straight-line x86-64 code.
#[derive(Default)]
struct Code(Vec<u8>);

impl Code {
    fn b(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    /// `mov rax, addr`
    fn rax(&mut self, addr: u64) -> &mut Self {
        self.b(&[0x48, 0xb8]).b(&addr.to_le_bytes())
    }
    /// A write of `size` bytes of `v` to memory (MMIO or RAM) at `addr`.
    fn store(&mut self, addr: u64, size: usize, v: u64) {
        self.rax(addr);
        self.b(&[0x48, 0xb9]).b(&v.to_le_bytes()); // mov rcx, v
        match size {
            1 => self.b(&[0x88, 0x08]),       // mov [rax], cl
            2 => self.b(&[0x66, 0x89, 0x08]), // mov [rax], cx
            4 => self.b(&[0x89, 0x08]),       // mov [rax], ecx
            _ => self.b(&[0x48, 0x89, 0x08]), // mov [rax], rcx
        };
    }
    /// A 32-bit read at `addr` (the value is dropped).
    fn load(&mut self, addr: u64) {
        self.rax(addr);
        self.b(&[0x8b, 0x10]); // mov edx, [rax]
    }
    fn out(&mut self, port: u16, v: u8) {
        self.b(&[0x66, 0xba]).b(&port.to_le_bytes()); // mov dx, port
        self.b(&[0xb0, v, 0xee]); // mov al, v; out dx, al
    }
    fn inb(&mut self, port: u16) {
        self.b(&[0x66, 0xba]).b(&port.to_le_bytes());
        self.b(&[0xec]); // in al, dx
    }
    /// `xor r8, r8`
    fn zero_r8(&mut self) {
        self.b(&[0x4d, 0x31, 0xc0]);
    }
    /// One more buffer on the flood ring: `inc r8w`, the avail index = r8w, notify `queue` of
    /// device `dev`, then spin until the device has used it (used index == r8w).
    fn offer_and_wait(&mut self, avail_idx: u64, used_idx: u64, dev: u32, queue: u32) {
        self.b(&[0x66, 0x41, 0xff, 0xc0]); // inc r8w
        self.rax(avail_idx);
        self.b(&[0x66, 0x44, 0x89, 0x00]); // mov [rax], r8w
        self.rax(mmio(dev, 0x50));
        self.b(&[0xc7, 0x00]).b(&queue.to_le_bytes()); // mov dword [rax], queue
        let wait = self.0.len();
        self.rax(used_idx);
        self.b(&[0x66, 0x8b, 0x10]); // mov dx, [rax]
        self.b(&[0x66, 0x44, 0x39, 0xc2]); // cmp dx, r8w
        let rel = wait as i64 - (self.0.len() as i64 + 2);
        self.b(&[0x75, rel as i8 as u8]); // jne wait
    }
    /// `jmp` back to code offset `to`.
    fn jmp_back(&mut self, to: usize) {
        let rel = to as i64 - (self.0.len() as i64 + 5);
        self.b(&[0xe9]).b(&(rel as i32).to_le_bytes());
    }
}

fn mmio(dev: u32, off: u64) -> u64 {
    layout::virtio_mmio_addr(dev) + off
}

/// Garbage to every register of device `dev`, of every size, and reads of every register.
fn garbage_registers(c: &mut Code, rng: &mut Rng, dev: u32) {
    for off in (0..0x200u64).step_by(4) {
        c.store(mmio(dev, off), 4, u64::from(rng.u32()));
    }
    for _ in 0..64 {
        let off = rng.next() % 0x1000;
        let size = [1, 2, 4, 8][(rng.next() % 4) as usize];
        c.store(mmio(dev, off), size, rng.next());
    }
    for off in (0..0x200u64).step_by(4) {
        c.load(mmio(dev, off));
    }
}

/// A driver that sets up device `dev`'s queues over garbage rings, tells the device it is
/// ready, notifies every queue (and some that do not exist), then writes garbage again.
fn garbage_queues(c: &mut Code, rng: &mut Rng, dev: u32) {
    let w = |c: &mut Code, off: u64, v: u32| c.store(mmio(dev, off), 4, u64::from(v));
    w(c, 0x70, 0);
    w(c, 0x70, 3);
    w(c, 0x24, 1);
    w(c, 0x20, 1);
    w(c, 0x24, 0);
    w(c, 0x20, rng.u32());
    w(c, 0x70, 0xb);
    for q in 0..2u32 {
        let ring = RINGS + u64::from(2 * dev + q) * 0x4000;
        // 64 descriptors: half point into guest RAM (any length up to 64 KiB, any flags,
        // any next), half anywhere.
        for i in 0..64u64 {
            let addr = if i % 2 == 0 {
                GARBAGE_RAM + rng.next() % GARBAGE_RAM_LEN
            } else {
                rng.next()
            };
            let rest = rng.next() & 0x003f_0007_0000_ffff; // next < 64, flags NEXT|WRITE|INDIRECT
            c.store(ring + i * 16, 8, addr);
            c.store(ring + i * 16 + 8, 8, rest);
        }
        // Avail ring: any flags and heads, an index far ahead.
        for i in 0..17u64 {
            c.store(ring + 0x1000 + i * 8, 8, rng.next());
        }
        w(c, 0x30, q);
        w(c, 0x38, 64);
        w(c, 0x80, ring as u32);
        w(c, 0x84, 0);
        w(c, 0x90, (ring + 0x1000) as u32);
        w(c, 0x94, 0);
        w(c, 0xa0, (ring + 0x2000) as u32);
        w(c, 0xa4, 0);
        w(c, 0x44, 1);
    }
    w(c, 0x70, 0xf);
    for q in [0, 1, 0, 1, 2, 0xffff, 0xffff_ffff] {
        w(c, 0x50, q);
    }
    // New garbage in the rings, notified again, then garbage to the registers of the running
    // device.
    for q in 0..2u64 {
        let ring = RINGS + (2 * u64::from(dev) + q) * 0x4000;
        for i in 0..32u64 {
            c.store(ring + i * 8, 8, rng.next());
            c.store(ring + 0x1000 + i * 8, 8, rng.next());
        }
        w(c, 0x50, q as u32);
    }
    garbage_registers(c, rng, dev);
}

/// Garbage to the UARTs' and the i8042's registers (but never the i8042's reset command).
fn garbage_ports(c: &mut Code, rng: &mut Rng, com2: bool) {
    let mut ports: Vec<u16> = (0..8).map(|i| layout::COM1_PORT + i).collect();
    if com2 {
        ports.extend((0..8).map(|i| layout::COM2_PORT + i));
    }
    ports.extend([layout::I8042_DATA_PORT, layout::I8042_CMD_PORT]);
    for _ in 0..4 {
        for &p in &ports {
            let mut v = rng.next() as u8;
            if p == layout::I8042_CMD_PORT && v == 0xfe {
                v = 0;
            }
            c.out(p, v);
            c.inb(p);
        }
    }
}

/// Frames a guest may send but which mean nothing, of every malformed kind the host must skip:
/// unknown kinds, host-to-guest kinds, EXIT and FAILED of the wrong length, and the largest
/// frames allowed. No STDOUT, STDERR, STARTED or READY.
fn garbage_frames(rng: &mut Rng) -> Vec<u8> {
    use rvmm_proto::frame;
    let mut s = Vec::new();
    let add = |s: &mut Vec<u8>, kind: u8, payload: &[u8]| s.extend(frame::encode(kind, payload));
    add(&mut s, frame::EXIT, &[]);
    add(&mut s, frame::EXIT, &[0, 0, 0]);
    add(&mut s, frame::EXIT, &[1, 0, 0, 0, 0]);
    add(&mut s, frame::FAILED, &[]);
    for kind in [
        frame::SPEC,
        frame::SPEC_END,
        frame::STDIN,
        frame::SIGNAL,
        frame::WINSIZE,
    ] {
        let n = (rng.next() % 64) as usize;
        add(&mut s, kind, &rng.bytes(n));
    }
    for _ in 0..200 {
        let kind = [0u8, 9, 14, 15, 0x7f, 0x80, 0xff][(rng.next() % 7) as usize];
        let n = (rng.next() % 1024) as usize;
        add(&mut s, kind, &rng.bytes(n));
    }
    for kind in [0u8, 0xff] {
        add(&mut s, kind, &rng.bytes(frame::MAX_PAYLOAD));
    }
    s
}

/// The hostile guest as an ELF: `corrupt` ends the flood with a frame header over the limit.
fn hostile_kernel(corrupt: bool) -> Vec<u8> {
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut c = Code::default();
    c.b(&[0xfa, 0xfc]); // cli; cld
    for dev in 0..DEVICES {
        garbage_registers(&mut c, &mut rng, dev);
        garbage_queues(&mut c, &mut rng, dev);
    }
    // A device slot that does not exist.
    garbage_registers(&mut c, &mut rng, DEVICES + 3);
    garbage_ports(&mut c, &mut rng, false);
    // COM2 at 8N1, no loopback, no interrupts, so the flood reaches the host.
    for (reg, v) in [(3u16, 0x03u8), (1, 0), (4, 0x03), (2, 0)] {
        c.out(layout::COM2_PORT + reg, v);
    }
    let mut frames = garbage_frames(&mut rng);
    if corrupt {
        frames.extend([0x42, 0xff, 0xff, 0xff, 0x7f]);
        frames.extend(rng.bytes(4096));
    }
    // A driver for the console that resets it (after the garbage above) and brings up port 0's
    // transmit queue (queue 1) with one descriptor over the frames: each round offers it again
    // and waits until the device has taken it all, on and on.
    let w = |c: &mut Code, off: u64, v: u32| c.store(mmio(CONSOLE, off), 4, u64::from(v));
    w(&mut c, 0x70, 0);
    w(&mut c, 0x70, 3);
    w(&mut c, 0x24, 1);
    w(&mut c, 0x20, 1); // VERSION_1
    w(&mut c, 0x24, 0);
    w(&mut c, 0x20, 0); // no multiport: port 0 needs none
    w(&mut c, 0x70, 0xb);
    w(&mut c, 0x30, 1);
    w(&mut c, 0x38, 64);
    w(&mut c, 0x80, FLOOD_RING as u32);
    w(&mut c, 0x84, 0);
    w(&mut c, 0x90, (FLOOD_RING + 0x1000) as u32);
    w(&mut c, 0x94, 0);
    w(&mut c, 0xa0, (FLOOD_RING + 0x2000) as u32);
    w(&mut c, 0xa4, 0);
    w(&mut c, 0x44, 1);
    w(&mut c, 0x70, 0xf);
    // Descriptor 0 (its address is patched in below, once the code's size is known): the
    // frames, device-readable, no next. Every avail ring entry is 0 (RAM starts zeroed).
    let desc_at = c.0.len();
    c.store(FLOOD_RING, 8, 0);
    c.store(FLOOD_RING + 8, 8, frames.len() as u64);
    c.store(FLOOD_RING + 0x1000, 2, 1); // VRING_AVAIL_F_NO_INTERRUPT
    c.zero_r8();
    let flood = c.0.len();
    c.offer_and_wait(FLOOD_RING + 0x1002, FLOOD_RING + 0x2002, CONSOLE, 1);
    if corrupt {
        // The host has stopped listening: garbage to COM2's registers too, on and on.
        garbage_ports(&mut c, &mut rng, true);
    }
    c.jmp_back(flood);
    let data_at = BASE + c.0.len() as u64;
    // `store` is `mov rax, addr; mov rcx, v; ...`: v is at +12.
    c.0[desc_at + 12..desc_at + 20].copy_from_slice(&data_at.to_le_bytes());
    let mut image = c.0;
    image.extend(frames);
    elf(&image)
}

/// A one-segment ELF64 loading `image` at BASE with entry BASE.
fn elf(image: &[u8]) -> Vec<u8> {
    let mut e = vec![0u8; 0x1000];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2;
    e[5] = 1;
    e[6] = 1;
    e[16..18].copy_from_slice(&2u16.to_le_bytes());
    e[18..20].copy_from_slice(&62u16.to_le_bytes());
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&BASE.to_le_bytes());
    e[32..40].copy_from_slice(&64u64.to_le_bytes());
    e[52..54].copy_from_slice(&64u16.to_le_bytes());
    e[54..56].copy_from_slice(&56u16.to_le_bytes());
    e[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = &mut e[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&7u32.to_le_bytes());
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes());
    ph[16..24].copy_from_slice(&BASE.to_le_bytes());
    ph[24..32].copy_from_slice(&BASE.to_le_bytes());
    ph[32..40].copy_from_slice(&(image.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(image.len() as u64).to_le_bytes());
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    e.extend_from_slice(image);
    e
}

/// What `rvmm run` did: status, output, and its peak resident memory (it is the VMM).
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
    max_rss_kib: i64,
}

/// Runs rvmm with the hostile guest as its kernel, and reaps it with its resource usage.
#[allow(clippy::zombie_processes)] // reaped by wait4, which also gives its peak RSS
fn run_hostile(env: &RunEnv, cache: &Path, extra_env: &[(&str, &str)]) -> Ran {
    let mut cmd = Command::new(common::rvmm_bin());
    cmd.arg("--root")
        .arg(env.store.path())
        .env("RVMM_CACHE_DIR", cache)
        .env("RVMM_SNAPSHOTS", env.store.path().join("hostile-snapshots"))
        .args([
            "run",
            "--rm",
            "--isolation=vm",
            "--memory=64m",
            "--network=bridge",
            "localhost/busybox",
            "true",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let mut stderr = String::new();
    let _ = err.read_to_string(&mut stderr);
    let stdout = reader.join().unwrap();
    let mut status = 0;
    // SAFETY: rusage is plain data, filled by wait4 for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our child with valid pointers.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(pid, child.id() as i32, "wait4");
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -libc::WTERMSIG(status)
    };
    Ran {
        code,
        stdout,
        stderr,
        max_rss_kib: ru.ru_maxrss,
    }
}

/// Processes whose command line names `needle` (the run's private store).
fn processes_naming(needle: &str) -> Vec<String> {
    common::run::ls(Path::new("/proc"))
        .into_iter()
        .filter(|p| p.chars().all(|c| c.is_ascii_digit()))
        .filter_map(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(needle).then(|| format!("{p}: {cmd}"))
        })
        .collect()
}

#[test]
fn a_hostile_guest_ends_with_one_line_and_leaves_nothing() {
    if !common::have_kvm()
        || !common::have_root()
        || !common::have_tools(&["umoci", "skopeo", "ip", "iptables", "mkfs.erofs"])
    {
        return;
    }
    if let Err(e) = rvmm::vm::guest_init_path() {
        common::require(common::Cap::Kernel, false, &format!("{e:#}"));
        return;
    }
    let env = RunEnv::new(&SERIAL, &["busybox"]);
    // The hostile guest goes where rvmm looks for its kernel, in a cache of its own.
    let cache = tempfile::tempdir().unwrap();
    let real = rvmm::kernel::vmlinux_path();
    let hash = real.parent().and_then(|p| p.file_name()).unwrap();
    let kdir = cache.path().join("kernel").join(hash);
    std::fs::create_dir_all(&kdir).unwrap();
    let store = env.store.path().to_string_lossy().into_owned();

    for corrupt in [true, false] {
        std::fs::write(kdir.join("vmlinux"), hostile_kernel(corrupt)).unwrap();
        let t = std::time::Instant::now();
        let r = run_hostile(&env, cache.path(), &[("RVMM_START_TIMEOUT", "10")]);
        eprintln!(
            "hostile guest (corrupt: {corrupt}): status {} after {:?}, rvmm peak RSS {} KiB; stderr: {}",
            r.code,
            t.elapsed(),
            r.max_rss_kib,
            r.stderr.trim_end()
        );
        assert_eq!(r.code, 125, "{}", r.stderr);
        assert_eq!(r.stdout, "", "nothing of the guest's garbage on stdout");
        let lines: Vec<&str> = r.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {:?}", r.stderr);
        let want = if corrupt {
            "rvmm: the guest's channel is corrupt: channel frame of 2147483647 bytes is over the limit ("
        } else {
            "rvmm: the microVM did not start the workload within 10s (booting;"
        };
        assert!(lines[0].starts_with(want), "{}", lines[0]);
        // The VMM ran in that process: its peak memory stays below the guest's RAM (64 MiB,
        // which the guest barely touches): no queue of guest frames or guest-sized allocation.
        assert!(
            r.max_rss_kib < 64 * 1024,
            "rvmm peaked at {} KiB",
            r.max_rss_kib
        );
        assert_eq!(processes_naming(&store), Vec::<String>::new());
        assert!(
            common::run::ls(&env.store.path().join("hostile-snapshots")).is_empty(),
            "no snapshot of a guest that never said READY"
        );
    }
    // RunEnv's drop: no tap, lease, mount, cgroup or run directory left.
}

/// The generated guest is small and self-contained: its code and data fit the guest's RAM far
/// below the rings and garbage buffers it points at.
#[test]
fn the_hostile_guest_fits_below_its_rings() {
    for corrupt in [true, false] {
        let k = hostile_kernel(corrupt);
        eprintln!("hostile guest (corrupt: {corrupt}): {} bytes", k.len());
        assert!(BASE + (k.len() as u64) < RINGS);
    }
}

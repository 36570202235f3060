//! VMM tests with a tiny purpose-built guest: a few hundred bytes of x86-64 machine code, started in
//! long mode from a minimal ELF written by the test. The guest is a script interpreter: the test
//! writes a list of operations (MMIO/RAM writes and reads of any size, port I/O, polling a used
//! ring) and the guest executes them. The script drives two virtio-blk devices through real
//! virtqueues, makes hostile requests and accesses, prints a marker and resets via the i8042.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rvmm::vmm::{layout, Console, DiskConfig, Vm, VmConfig, VmExit};

// ---------------------------------------------------------------- a tiny assembler

#[derive(Default)]
struct Asm {
    code: Vec<u8>,
    labels: HashMap<&'static str, usize>,
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    fn b(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }
    fn label(&mut self, l: &'static str) -> &mut Self {
        self.labels.insert(l, self.code.len());
        self
    }
    fn rel32(&mut self, l: &'static str) {
        self.fixups.push((self.code.len(), l));
        self.code.extend_from_slice(&[0; 4]);
    }
    fn jmp(&mut self, l: &'static str) -> &mut Self {
        self.code.push(0xe9);
        self.rel32(l);
        self
    }
    fn je(&mut self, l: &'static str) -> &mut Self {
        self.code.extend_from_slice(&[0x0f, 0x84]);
        self.rel32(l);
        self
    }
    fn jne(&mut self, l: &'static str) -> &mut Self {
        self.code.extend_from_slice(&[0x0f, 0x85]);
        self.rel32(l);
        self
    }
    /// cmp rax, imm8
    fn cmp_rax(&mut self, v: u8) -> &mut Self {
        self.b(&[0x48, 0x83, 0xf8, v])
    }
    fn finish(mut self) -> Vec<u8> {
        for (at, l) in &self.fixups {
            let target = self.labels[l] as i64;
            let rel = (target - (*at as i64 + 4)) as i32;
            self.code[*at..*at + 4].copy_from_slice(&rel.to_le_bytes());
        }
        self.code
    }
}

// Guest memory layout (all inside the ELF segment at 1 MiB).
const BASE: u64 = 0x10_0000;
const SCRIPT: u64 = 0x10_1000;
const Q0: u64 = 0x10_4000; // disk 0: desc table; avail at +0x400; used at +0x1000
const Q1: u64 = 0x10_a000; // disk 1 (read-only)
const HDRS: u64 = 0x10_6000;
const STATUS: u64 = 0x10_7000; // one status byte per request; results (u32s) from +0x100
const DATA_W: u64 = 0x10_8000;
const DATA_R: u64 = 0x10_9000;
const ID_BUF: u64 = 0x10_c000;
const RO_BUF: u64 = 0x10_d000;
const IMAGE_END: u64 = 0x10_e000;
const QSIZE: u16 = 64;

const OP_W32: u64 = 1;
const OP_OUT: u64 = 2;
const OP_R32: u64 = 3;
const OP_WAIT16: u64 = 4;
const OP_IN: u64 = 5;
const OP_W8: u64 = 6;
const OP_R8: u64 = 7;
const OP_W16: u64 = 8;
const OP_W64: u64 = 9;

/// The interpreter: RSI walks the script (op, a, b as u64s), RDI the results.
fn interpreter() -> Vec<u8> {
    let mut a = Asm::default();
    a.b(&[0x48, 0xbe]).b(&SCRIPT.to_le_bytes()); // mov rsi, SCRIPT
    a.b(&[0x48, 0xbf]).b(&(STATUS + 0x100).to_le_bytes()); // mov rdi, RESULTS
    a.label("loop");
    a.b(&[0x48, 0x8b, 0x06]); // mov rax, [rsi]
    a.b(&[0x48, 0x8b, 0x5e, 0x08]); // mov rbx, [rsi+8]
    a.b(&[0x48, 0x8b, 0x4e, 0x10]); // mov rcx, [rsi+16]
    a.b(&[0x48, 0x83, 0xc6, 0x18]); // add rsi, 24
    a.cmp_rax(OP_W32 as u8).je("w32");
    a.cmp_rax(OP_OUT as u8).je("out");
    a.cmp_rax(OP_R32 as u8).je("r32");
    a.cmp_rax(OP_WAIT16 as u8).je("wait");
    a.cmp_rax(OP_IN as u8).je("in");
    a.cmp_rax(OP_W8 as u8).je("w8");
    a.cmp_rax(OP_R8 as u8).je("r8");
    a.cmp_rax(OP_W16 as u8).je("w16");
    a.cmp_rax(OP_W64 as u8).je("w64");
    a.label("stop");
    a.b(&[0xf3, 0x90]).jmp("stop"); // pause; spin (the test resets or stops us)
    a.label("w32").b(&[0x89, 0x0b]).jmp("loop"); // mov [rbx], ecx
    a.label("w8").b(&[0x88, 0x0b]).jmp("loop"); // mov [rbx], cl
    a.label("w16").b(&[0x66, 0x89, 0x0b]).jmp("loop"); // mov [rbx], cx
    a.label("w64").b(&[0x48, 0x89, 0x0b]).jmp("loop"); // mov [rbx], rcx
    a.label("out");
    a.b(&[0x89, 0xda, 0x89, 0xc8, 0xee]).jmp("loop"); // mov edx,ebx; mov eax,ecx; out dx,al
    a.label("r32");
    a.b(&[0x8b, 0x03]); // mov eax, [rbx]
    a.label("store");
    a.b(&[0x89, 0x07, 0x48, 0x83, 0xc7, 0x04]).jmp("loop"); // mov [rdi],eax; add rdi,4
    a.label("r8");
    a.b(&[0x0f, 0xb6, 0x03]).jmp("store"); // movzx eax, byte [rbx]
    a.label("in");
    a.b(&[0x89, 0xda, 0x31, 0xc0, 0xec]).jmp("store"); // mov edx,ebx; xor eax,eax; in al,dx
    a.label("wait");
    a.b(&[0x0f, 0xb7, 0x03]); // movzx eax, word [rbx]
    a.b(&[0x39, 0xc8]); // cmp eax, ecx
    a.jne("wait");
    a.jmp("loop");
    a.finish()
}

/// A one-segment ELF64 loading `image` at BASE with entry BASE.
fn elf(image: &[u8]) -> Vec<u8> {
    elf_with(image, false)
}

/// Like [`elf`], plus a PT_NOTE with the Xen PVH entry note (entry BASE, 32-bit protected mode).
fn elf_pvh(image: &[u8]) -> Vec<u8> {
    elf_with(image, true)
}

fn elf_with(image: &[u8], pvh: bool) -> Vec<u8> {
    let mut e = vec![0u8; 0x1000];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // 64-bit
    e[5] = 1; // little endian
    e[6] = 1;
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&BASE.to_le_bytes()); // entry
    e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    e[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    e[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    e[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let ph = &mut e[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&7u32.to_le_bytes()); // RWX
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes()); // offset
    ph[16..24].copy_from_slice(&BASE.to_le_bytes()); // vaddr
    ph[24..32].copy_from_slice(&BASE.to_le_bytes()); // paddr
    ph[32..40].copy_from_slice(&(image.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(image.len() as u64).to_le_bytes());
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    if pvh {
        e[56..58].copy_from_slice(&2u16.to_le_bytes()); // phnum
        let note_off = 0x200usize;
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes()); // namesz
        note.extend_from_slice(&4u32.to_le_bytes()); // descsz
        note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&(BASE as u32).to_le_bytes());
        e[note_off..note_off + note.len()].copy_from_slice(&note);
        let ph = &mut e[120..176];
        ph[0..4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        ph[4..8].copy_from_slice(&4u32.to_le_bytes());
        ph[8..16].copy_from_slice(&(note_off as u64).to_le_bytes());
        ph[32..40].copy_from_slice(&(note.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&(note.len() as u64).to_le_bytes());
        ph[48..56].copy_from_slice(&4u64.to_le_bytes());
    }
    e.extend_from_slice(image);
    e
}

// ---------------------------------------------------------------- the guest image

struct Image {
    mem: Vec<u8>,
    script: Vec<u64>,
    /// Next free descriptor / request slot per queue.
    next_desc: [u16; 2],
    requests: [u16; 2],
}

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

fn mmio(dev: u64, off: u64) -> u64 {
    layout::virtio_mmio_addr(dev as u32) + off
}

impl Image {
    fn new() -> Self {
        let mut mem = vec![0u8; (IMAGE_END - BASE) as usize];
        let code = interpreter();
        mem[..code.len()].copy_from_slice(&code);
        Self {
            mem,
            script: Vec::new(),
            next_desc: [0; 2],
            requests: [0; 2],
        }
    }
    fn put(&mut self, addr: u64, bytes: &[u8]) {
        let o = (addr - BASE) as usize;
        self.mem[o..o + bytes.len()].copy_from_slice(bytes);
    }
    fn op(&mut self, op: u64, a: u64, b: u64) {
        self.script.extend_from_slice(&[op, a, b]);
    }
    fn out_str(&mut self, port: u16, s: &str) {
        for c in s.bytes() {
            self.op(OP_OUT, u64::from(port), u64::from(c));
        }
    }
    fn qbase(q: usize) -> u64 {
        [Q0, Q1][q]
    }
    /// Brings device `dev` (queue memory `q`) up to DRIVER_OK.
    fn init_device(&mut self, dev: u64, q: usize) {
        self.init_queues(dev, &[q]);
    }
    /// Brings device `dev` up with queue i using queue memory `qs[i]`.
    fn init_queues(&mut self, dev: u64, qs: &[usize]) {
        let w = |s: &mut Self, off, v| s.op(OP_W32, mmio(dev, off), v);
        w(self, 0x70, 0); // reset
        w(self, 0x70, 1);
        w(self, 0x70, 3);
        w(self, 0x24, 1); // driver features sel 1
        w(self, 0x20, 1); // VERSION_1
        w(self, 0x70, 0xb); // FEATURES_OK
        for (sel, &q) in qs.iter().enumerate() {
            w(self, 0x30, sel as u64);
            w(self, 0x38, u64::from(QSIZE));
            let b = Self::qbase(q);
            w(self, 0x80, b);
            w(self, 0x84, 0);
            w(self, 0x90, b + 0x400);
            w(self, 0x94, 0);
            w(self, 0xa0, b + 0x1000);
            w(self, 0xa4, 0);
            w(self, 0x44, 1); // ready
        }
        w(self, 0x70, 0xf); // DRIVER_OK
    }
    fn desc(&mut self, q: usize, addr: u64, len: u32, flags: u16, next: u16) -> u16 {
        let i = self.next_desc[q];
        self.next_desc[q] += 1;
        let at = Self::qbase(q) + u64::from(i) * 16;
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.put(at, &d);
        i
    }
    /// Queues a request whose descriptors are `chain` (addr, len, flags; NEXT is filled in) and
    /// whose head is the first; notifies and waits for the used ring to advance.
    fn request(&mut self, dev: u64, q: usize, chain: &[(u64, u32, u16)]) {
        let first = self.next_desc[q];
        for (k, &(addr, len, flags)) in chain.iter().enumerate() {
            let more = k + 1 < chain.len();
            let f = if more { flags | F_NEXT } else { flags };
            self.desc(q, addr, len, f, first + k as u16 + 1);
        }
        self.submit(dev, q, first);
    }
    fn submit(&mut self, dev: u64, q: usize, head: u16) {
        self.submit_to(dev, q, 0, head)
    }
    /// Makes `head` available on the queue whose memory is `q`, notifies queue `sel` of `dev`,
    /// and waits for the used ring to advance.
    fn submit_to(&mut self, dev: u64, q: usize, sel: u64, head: u16) {
        self.post(dev, q, sel, head);
        self.wait_used(q);
    }
    /// Makes `head` available on the queue whose memory is `q` and notifies queue `sel` of `dev`,
    /// without waiting.
    fn post(&mut self, dev: u64, q: usize, sel: u64, head: u16) {
        let n = self.requests[q];
        let avail = Self::qbase(q) + 0x400;
        self.put(avail + 4 + 2 * u64::from(n), &head.to_le_bytes());
        self.requests[q] += 1;
        // avail.flags = 0, avail.idx = n + 1
        self.op(OP_W32, avail, u64::from(n + 1) << 16);
        self.op(OP_W32, mmio(dev, 0x50), sel); // notify
    }
    /// Waits until the used ring of queue memory `q` has caught up with everything posted.
    fn wait_used(&mut self, q: usize) {
        let n = self.requests[q];
        self.op(OP_WAIT16, Self::qbase(q) + 0x1000 + 2, u64::from(n));
    }
    fn header(&mut self, slot: u64, rtype: u32, sector: u64) -> u64 {
        let at = HDRS + slot * 32;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&rtype.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.put(at, &h);
        at
    }
    fn build(mut self) -> Vec<u8> {
        self.op(0, 0, 0);
        let bytes: Vec<u8> = self.script.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert!(bytes.len() <= (Q0 - SCRIPT) as usize, "script too long");
        self.put(SCRIPT, &bytes);
        elf(&self.mem)
    }
}

const MARKER: &str = "RVMM-TINY-GUEST-OK\n";

fn disk_file(dir: &Path, name: &str, sectors: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    let data: Vec<u8> = (0..sectors * 512).map(|i| (i / 512) as u8 + 0x10).collect();
    std::fs::write(&p, data).unwrap();
    p
}

fn config(dir: &Path, kernel: Vec<u8>, disks: Vec<DiskConfig>) -> VmConfig {
    let k = dir.join("tiny.elf");
    std::fs::write(&k, kernel).unwrap();
    let mut cfg = VmConfig::new(k);
    cfg.mem_mib = 16;
    cfg.console = Console::File(dir.join("console.txt"));
    cfg.disks = disks;
    cfg
}

/// Runs the VM on a thread; stops it after a generous timeout so a broken VMM fails the test
/// instead of hanging it.
fn run_with_timeout(vm: Vm) -> Result<VmExit, rvmm::vmm::Error> {
    let stop = vm.stop_handle();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let r = vm.run();
        let _ = tx.send(());
        r
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        stop.stop();
    }
    t.join().unwrap()
}

#[test]
fn tiny_guest_serial_blk_hostile_and_reset() {
    if !common::have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d0 = disk_file(dir.path(), "d0.img", 16);
    let d1 = disk_file(dir.path(), "d1.img", 8);
    let d1_before = std::fs::read(&d1).unwrap();

    let mut g = Image::new();
    g.put(DATA_W, &[0xa5; 512]);
    g.put(STATUS, &[0xee; 0x40]); // untouched status bytes stay 0xee
    g.out_str(layout::COM1_PORT, "tiny: hello\n");
    g.init_device(0, 0);
    g.init_device(1, 1);
    // Disk 0: r0 write sector 2, r1 read sector 0, r2 write it back to sector 3.
    let h = g.header(0, 1, 2);
    g.request(0, 0, &[(h, 16, 0), (DATA_W, 512, 0), (STATUS, 1, F_WRITE)]);
    let h = g.header(1, 0, 0);
    g.request(
        0,
        0,
        &[(h, 16, 0), (DATA_R, 512, F_WRITE), (STATUS + 1, 1, F_WRITE)],
    );
    let h = g.header(2, 1, 3);
    g.request(
        0,
        0,
        &[(h, 16, 0), (DATA_R, 512, 0), (STATUS + 2, 1, F_WRITE)],
    );
    // r3: buffer outside guest RAM.
    let h = g.header(3, 0, 0);
    g.request(
        0,
        0,
        &[
            (h, 16, 0),
            (0xffff_0000_0000, 512, F_WRITE),
            (STATUS + 3, 1, F_WRITE),
        ],
    );
    // r4: a descriptor loop (hdr -> data -> hdr ...).
    let h = g.header(4, 0, 0);
    let a = g.next_desc[0];
    g.desc(0, h, 16, F_NEXT, a + 1);
    g.desc(0, DATA_R, 512, F_WRITE | F_NEXT, a);
    g.submit(0, 0, a);
    // r5: an absurd length.
    let h = g.header(5, 0, 0);
    g.request(
        0,
        0,
        &[
            (h, 16, 0),
            (DATA_R, u32::MAX, F_WRITE),
            (STATUS + 5, 1, F_WRITE),
        ],
    );
    // r6: get id; r7: flush; r8: unknown type; r9: read past the end.
    let h = g.header(6, 8, 0);
    g.request(
        0,
        0,
        &[(h, 16, 0), (ID_BUF, 20, F_WRITE), (STATUS + 6, 1, F_WRITE)],
    );
    let h = g.header(7, 4, 0);
    g.request(0, 0, &[(h, 16, 0), (STATUS + 7, 1, F_WRITE)]);
    let h = g.header(8, 99, 0);
    g.request(0, 0, &[(h, 16, 0), (STATUS + 8, 1, F_WRITE)]);
    let h = g.header(9, 0, 15);
    g.request(
        0,
        0,
        &[
            (h, 16, 0),
            (DATA_R, 1024, F_WRITE),
            (STATUS + 9, 1, F_WRITE),
        ],
    );
    // Disk 1 (read-only): a write fails, a read works.
    let h = g.header(16, 1, 0);
    g.request(
        1,
        1,
        &[(h, 16, 0), (DATA_W, 512, 0), (STATUS + 0x20, 1, F_WRITE)],
    );
    let h = g.header(17, 0, 1);
    g.request(
        1,
        1,
        &[
            (h, 16, 0),
            (RO_BUF, 512, F_WRITE),
            (STATUS + 0x21, 1, F_WRITE),
        ],
    );
    // Odd MMIO accesses and undefined registers; results go to STATUS+0x100.. as u32s.
    g.op(OP_R32, mmio(0, 0), 0); // [0] magic
    g.op(OP_R32, mmio(0, 8), 0); // [1] device id
    g.op(OP_R8, mmio(0, 0), 0); // [2] byte read of a register: 0
    g.op(OP_R32, mmio(0, 0xc8), 0); // [3] undefined register: 0
    g.op(OP_R32, mmio(5, 0), 0); // [4] no device there: 0
    g.op(OP_R32, mmio(0, 0x70), 0); // [5] status: 0xf
    g.op(OP_IN, 0x510, 0); // [6] unknown port: 0xff
    g.op(OP_R8, mmio(0, 0x100), 0); // [7] config byte 0: capacity 16
    g.op(OP_W8, mmio(0, 0x50), 0);
    g.op(OP_W16, mmio(0, 0x70), 0);
    g.op(OP_W64, mmio(0, 0x70), 0);
    g.op(OP_W32, mmio(0, 0xffe), 0xffff_ffff); // straddles the window end
    g.op(OP_W32, mmio(0, 0x0c8), 0xffff_ffff); // undefined register
    g.op(OP_W32, mmio(0, 0x80), 0xdead_0000); // queue address after DRIVER_OK: ignored
    g.op(OP_W8, mmio(0, 0x105), 0xff); // config write: ignored
    g.op(OP_W32, mmio(0, 0x1001), 1); // unaligned, other device
    g.op(OP_R32, mmio(0, 0x70), 0); // [8] status still 0xf
                                    // Disk 0 still works: r10 writes the status/results page to sector 7.
    let h = g.header(10, 1, 7);
    g.request(
        0,
        0,
        &[(h, 16, 0), (STATUS, 512, 0), (STATUS + 10, 1, F_WRITE)],
    );
    g.out_str(layout::COM1_PORT, MARKER);
    g.op(OP_OUT, u64::from(layout::I8042_CMD_PORT), 0xfe);
    let kernel = g.build();

    let cfg = config(
        dir.path(),
        kernel,
        vec![
            DiskConfig {
                path: Some(d0.clone()),
                read_only: false,
            },
            DiskConfig {
                path: Some(d1.clone()),
                read_only: true,
            },
        ],
    );
    let console = dir.path().join("console.txt");
    let vm = Vm::new(cfg).expect("create vm");
    let t0 = std::time::Instant::now();
    let exit = run_with_timeout(vm).expect("vm run");
    eprintln!("tiny guest ran in {:?}", t0.elapsed());
    let out = std::fs::read_to_string(&console).unwrap();
    assert_eq!(exit, VmExit::Reset, "console: {out}");
    assert!(out.contains("tiny: hello\n"), "console: {out}");
    assert!(out.ends_with(MARKER), "console: {out}");

    let disk = std::fs::read(&d0).unwrap();
    let sector = |n: usize| &disk[n * 512..(n + 1) * 512];
    assert!(sector(2).iter().all(|&b| b == 0xa5), "write landed");
    assert!(sector(3).iter().all(|&b| b == 0x10), "read then write back");
    assert!(
        sector(4).iter().all(|&b| b == 0x14),
        "other sectors untouched"
    );
    let st = sector(7);
    assert_eq!(st[0], 0, "write ok");
    assert_eq!(st[1], 0, "read ok");
    assert_eq!(st[2], 0, "write back ok");
    assert_eq!(
        st[3], 0xee,
        "out-of-RAM buffer: chain refused, status untouched"
    );
    assert_eq!(st[5], 0xee, "absurd length: chain refused");
    assert_eq!(st[6], 0, "get id ok");
    assert_eq!(st[7], 0, "flush ok");
    assert_eq!(st[8], 2, "unknown type unsupported");
    assert_eq!(st[9], 1, "read past the end fails");
    assert_eq!(st[0x20], 1, "write to read-only disk fails");
    assert_eq!(st[0x21], 0, "read from read-only disk works");
    let r = |i: usize| u32::from_le_bytes(st[0x100 + 4 * i..0x104 + 4 * i].try_into().unwrap());
    assert_eq!(r(0), 0x7472_6976);
    assert_eq!(r(1), 2);
    assert_eq!(r(2), 0);
    assert_eq!(r(3), 0);
    assert_eq!(r(4), 0);
    assert_eq!(r(5), 0xf);
    assert_eq!(r(6), 0xff);
    assert_eq!(r(7), 16);
    assert_eq!(r(8), 0xf);
    assert_eq!(
        std::fs::read(&d1).unwrap(),
        d1_before,
        "read-only disk unchanged"
    );
}

#[test]
fn stop_handle_ends_a_spinning_guest() {
    if !common::have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut g = Image::new();
    g.out_str(layout::COM1_PORT, "spin\n");
    let kernel = g.build(); // ends in the interpreter's spin loop
    let vm = Vm::new(config(dir.path(), kernel, vec![])).unwrap();
    let stop = vm.stop_handle();
    let t = std::thread::spawn(move || vm.run());
    // Wait for the guest to start, then stop it.
    let console = dir.path().join("console.txt");
    for _ in 0..600 {
        if std::fs::read_to_string(&console).unwrap_or_default() == "spin\n" {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.stop();
    assert_eq!(t.join().unwrap().unwrap(), VmExit::Stopped);
}

#[test]
fn channel_feeds_com2_with_flow_control() {
    if !common::have_kvm() {
        return;
    }
    // The guest polls COM2's line status and echoes every received byte back, 300 times:
    // more than the 64-byte FIFO, so input must be paused and resumed without loss.
    let dir = tempfile::tempdir().unwrap();
    const N: usize = 300;
    let mut a = Asm::default();
    // mov ecx, N
    a.b(&[0xb9]).b(&(N as u32).to_le_bytes());
    a.label("poll");
    a.b(&[0x66, 0xba]).b(&(layout::COM2_PORT + 5).to_le_bytes()); // mov dx, LSR
    a.b(&[0xec]); // in al, dx
    a.b(&[0xa8, 0x01]); // test al, 1
    a.b(&[0x0f, 0x84]);
    a.rel32("poll"); // jz poll
    a.b(&[0x66, 0xba]).b(&layout::COM2_PORT.to_le_bytes()); // mov dx, DATA
    a.b(&[0xec, 0xee]); // in al, dx; out dx, al
    a.b(&[0xff, 0xc9]); // dec ecx
    a.jne("poll");
    a.b(&[0x66, 0xba]).b(&layout::I8042_CMD_PORT.to_le_bytes());
    a.b(&[0xb0, 0xfe, 0xee]); // mov al, 0xfe; out dx, al
    a.label("spin").b(&[0xf3, 0x90]).jmp("spin");
    let code = a.finish();
    let kernel = elf(&code);

    let (in_r, in_w) = nix::unistd::pipe().unwrap();
    let (out_r, out_w) = nix::unistd::pipe().unwrap();
    let mut cfg = config(dir.path(), kernel, vec![]);
    cfg.channel = Some(rvmm::vmm::Channel {
        input: in_r,
        output: out_w,
    });
    let vm = Vm::new(cfg).unwrap();
    let payload: Vec<u8> = (0..N).map(|i| (i % 251) as u8).collect();
    let p = payload.clone();
    let writer = std::thread::spawn(move || {
        let mut f = std::fs::File::from(in_w);
        std::io::Write::write_all(&mut f, &p).unwrap();
        // dropping f closes the pipe: EOF just stops feeding
    });
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::from(out_r);
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut v).unwrap();
        v
    });
    let exit = run_with_timeout(vm).unwrap();
    writer.join().unwrap();
    let echoed = reader.join().unwrap();
    assert_eq!(exit, VmExit::Reset);
    assert_eq!(echoed, payload);
}

#[test]
fn bad_input_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let not_elf = dir.path().join("bzImage");
    std::fs::write(&not_elf, b"MZ not an elf").unwrap();
    let err = |cfg: VmConfig| match Vm::new(cfg) {
        Ok(_) => panic!("accepted bad config"),
        Err(e) => e.to_string(),
    };
    let e = err(VmConfig::new(dir.path().join("missing")));
    assert!(e.contains("cannot open kernel"), "{e}");
    let e = err(VmConfig::new(not_elf.clone()));
    assert!(e.contains("not an ELF"), "{e}");
    let mut c = config(dir.path(), elf(&[0xf4]), vec![]);
    c.mem_mib = 1;
    assert!(err(c).contains("too small"));
    let mut c = config(dir.path(), elf(&[0xf4]), vec![]);
    c.disks = vec![DiskConfig {
        path: Some(dir.path().join("nodisk.img")),
        read_only: false,
    }];
    assert!(err(c).contains("cannot open disk image"));
    let mut c = config(dir.path(), elf(&[0xf4]), vec![]);
    c.vcpus = 0;
    assert!(err(c).contains("vCPUs"));
}

// ---------------------------------------------------------------- virtio-net

const ETHERTYPE: u16 = 0x88b5; // local experimental
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(payload);
    f.resize(60, 0);
    f
}

/// A raw AF_PACKET socket on one interface; closed on drop.
struct PacketSocket(std::os::fd::OwnedFd);

impl PacketSocket {
    fn bind(ifname: &str) -> Self {
        use std::os::fd::FromRawFd;
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is a fresh socket we own.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(ifindex > 0, "no interface {ifname}");
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: binding our socket to a correctly sized sockaddr_ll.
        let r = unsafe {
            libc::bind(
                fd,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: setting a receive timeout with a correctly sized timeval.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        PacketSocket(owned)
    }

    /// The next frame coming *from* the interface's far side (the guest) with our ethertype.
    fn recv_incoming(&self, deadline: std::time::Instant) -> Option<Vec<u8>> {
        use std::os::fd::AsRawFd;
        while std::time::Instant::now() < deadline {
            let mut buf = [0u8; 2048];
            // SAFETY: sockaddr_ll is plain data.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: receiving into live buffers of the stated sizes.
            let n = unsafe {
                libc::recvfrom(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 14 {
                continue;
            }
            let f = &buf[..n as usize];
            if sll.sll_pkttype != libc::PACKET_OUTGOING
                && u16::from_be_bytes([f[12], f[13]]) == ETHERTYPE
            {
                return Some(f.to_vec());
            }
        }
        None
    }

    fn send(&self, f: &[u8]) {
        use std::os::fd::AsRawFd;
        // SAFETY: sending from a live buffer on a bound packet socket.
        let n = unsafe { libc::send(self.0.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
        assert_eq!(
            n,
            f.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn tiny_guest_virtio_net_tx_rx_echo() {
    if !common::have_kvm()
        || !common::have_root()
        || !common::require(
            common::Cap::Net,
            Path::new("/dev/net/tun").exists(),
            "/dev/net/tun missing",
        )
        || !common::have_tools(&["ip"])
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tap = format!("rvmmt{}", std::process::id() % 100_000);
    let mut g = Image::new();
    let hello = frame([0xff; 6], GUEST_MAC, b"from-guest");
    let mut txbuf = vec![0u8; 12];
    txbuf.extend_from_slice(&hello);
    g.put(DATA_W, &txbuf);
    g.init_queues(0, &[0, 1]); // RX uses queue memory 0, TX queue memory 1
    g.out_str(layout::COM1_PORT, "net up\n");
    // Host -> guest: one RX buffer, posted (and notified) before any frame exists, so only the
    // tap becoming readable can fill it.
    let d = g.desc(0, DATA_R, 2048, F_WRITE, 0);
    g.post(0, 0, 0, d);
    // Guest -> host.
    let d = g.desc(1, DATA_W, txbuf.len() as u32, 0, 0);
    g.submit_to(0, 1, 1, d);
    // Then echo what arrived (12-byte header + 60-byte frame).
    g.wait_used(0);
    let d = g.desc(1, DATA_R, 72, 0, 0);
    g.submit_to(0, 1, 1, d);
    g.out_str(layout::COM1_PORT, MARKER);
    g.op(OP_OUT, u64::from(layout::I8042_CMD_PORT), 0xfe);
    let mut cfg = config(dir.path(), g.build(), vec![]);
    cfg.net = vec![rvmm::vmm::NetConfig {
        tap: rvmm::vmm::TapSource::Name(tap.clone()),
        mac: GUEST_MAC,
    }];
    let vm = Vm::new(cfg).expect("create vm with a tap");
    // The tap lives as long as the VMM holds it: no cleanup needed. Keep IPv6 chatter off it.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6"), "1");
    let st = std::process::Command::new("ip")
        .args(["link", "set", "dev", &tap, "up"])
        .status()
        .unwrap();
    assert!(st.success());
    let sock = PacketSocket::bind(&tap);
    let t = std::thread::spawn(move || run_with_timeout(vm));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let got = sock.recv_incoming(deadline).expect("frame from the guest");
    assert_eq!(got, hello);
    let ping = frame(GUEST_MAC, [2, 0, 0, 0, 0, 1], b"from-host");
    sock.send(&ping);
    let echo = sock.recv_incoming(deadline).expect("echo from the guest");
    assert_eq!(echo, ping);
    let exit = t.join().unwrap().unwrap();
    assert_eq!(exit, VmExit::Reset);
    let out = std::fs::read_to_string(dir.path().join("console.txt")).unwrap();
    assert!(out.ends_with(MARKER), "{out}");
}

#[test]
fn cli_bad_input_is_one_line_and_nonzero() {
    let dir = tempfile::tempdir().unwrap();
    let not_elf = dir.path().join("bzImage");
    std::fs::write(&not_elf, b"MZ").unwrap();
    let tiny = dir.path().join("tiny.elf");
    std::fs::write(&tiny, elf(&[0xf4])).unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(common::rvmm_bin())
            .arg("vm")
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success());
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("rvmm: "), "{err}");
        err
    };
    let missing = dir.path().join("missing");
    assert!(run(&["--kernel".as_ref(), missing.as_os_str()]).contains("cannot open kernel"));
    assert!(run(&["--kernel".as_ref(), not_elf.as_os_str()]).contains("not an ELF"));
    let e = run(&[
        "--kernel".as_ref(),
        tiny.as_os_str(),
        "--disk".as_ref(),
        missing.as_os_str(),
    ]);
    assert!(e.contains("cannot open disk image"), "{e}");
    let e = run(&[
        "--kernel".as_ref(),
        tiny.as_os_str(),
        "--memory".as_ref(),
        "4".as_ref(),
    ]);
    assert!(e.contains("too small"), "{e}");
    // Nothing left behind in the directory.
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 2);
}

#[test]
fn initrd_is_loaded_high_and_announced_in_the_zero_page() {
    if !common::have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d0 = disk_file(dir.path(), "d0.img", 16);
    let initrd = dir.path().join("initrd.img");
    let content: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&initrd, &content).unwrap();
    let mem = 16u64 << 20;
    let expect_at = (mem - content.len() as u64) & !0xfff;

    let mut g = Image::new();
    g.init_device(0, 0);
    // Copy the zero page's first 1 KiB and the initrd's first 512 bytes to disk sectors 4.. and 8.
    let h = g.header(0, 1, 4);
    g.request(
        0,
        0,
        &[
            (h, 16, 0),
            (layout::ZERO_PAGE_START, 1024, 0),
            (STATUS, 1, F_WRITE),
        ],
    );
    let h = g.header(1, 1, 8);
    g.request(
        0,
        0,
        &[(h, 16, 0), (expect_at, 512, 0), (STATUS + 1, 1, F_WRITE)],
    );
    g.op(OP_OUT, u64::from(layout::I8042_CMD_PORT), 0xfe);
    let mut cfg = config(
        dir.path(),
        g.build(),
        vec![DiskConfig {
            path: Some(d0.clone()),
            read_only: false,
        }],
    );
    cfg.initrd = Some(initrd);
    cfg.cmdline = "console=ttyS0 rvmm.test=1".into();
    let vm = Vm::new(cfg).unwrap();
    assert!(vm.cmdline().contains("virtio_mmio.device=4K@0xd0000000:5"));
    assert!(vm.cmdline().contains("reboot=k"));
    assert_eq!(run_with_timeout(vm).unwrap(), VmExit::Reset);
    let disk = std::fs::read(&d0).unwrap();
    let zp = &disk[4 * 512..6 * 512];
    let u32_at = |o: usize| u32::from_le_bytes(zp[o..o + 4].try_into().unwrap());
    assert_eq!(u32_at(0x218) as u64, expect_at, "ramdisk_image");
    assert_eq!(u32_at(0x21c) as usize, content.len(), "ramdisk_size");
    assert_eq!(u32_at(0x228) as u64, layout::CMDLINE_START, "cmd_line_ptr");
    assert_eq!(&disk[8 * 512..9 * 512], &content[..512], "initrd bytes");
}

#[test]
fn cli_sigterm_stops_the_vm_cleanly() {
    if !common::have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut g = Image::new();
    g.out_str(layout::COM1_PORT, "spin\n");
    let kernel = dir.path().join("spin.elf");
    std::fs::write(&kernel, g.build()).unwrap();
    let console = dir.path().join("console.txt");
    let mut child = std::process::Command::new(common::rvmm_bin())
        .args(["vm", "--memory", "16", "--kernel"])
        .arg(&kernel)
        .arg("--console")
        .arg(&console)
        .spawn()
        .unwrap();
    for _ in 0..600 {
        if std::fs::read_to_string(&console).unwrap_or_default() == "spin\n" {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(130), "stopped by a signal: exit 130");
}

#[test]
fn pvh_entry_gets_start_info_with_initrd_module() {
    if !common::have_kvm() {
        return;
    }
    // 32-bit protected mode code: check the start info at EBX, print "PVH-OK" if it is right.
    let mut a = Asm::default();
    a.b(&[0x81, 0x3b]).b(&0x336e_c578u32.to_le_bytes()); // cmp dword [ebx], XEN_HVM_START_MAGIC
    a.jne("fail");
    a.b(&[0x83, 0x7b, 0x0c, 0x01]); // cmp dword [ebx+12], 1 (nr_modules)
    a.jne("fail");
    a.b(&[0x81, 0x7b, 0x18])
        .b(&(layout::CMDLINE_START as u32).to_le_bytes()); // cmdline_paddr
    a.jne("fail");
    a.b(&[0x66, 0xba]).b(&layout::COM1_PORT.to_le_bytes()); // mov dx, COM1
    for c in b"PVH-OK\n" {
        a.b(&[0xb0, *c, 0xee]); // mov al, c; out dx, al
    }
    a.label("fail");
    a.b(&[0x66, 0xba]).b(&layout::I8042_CMD_PORT.to_le_bytes());
    a.b(&[0xb0, 0xfe, 0xee]);
    a.label("spin").b(&[0xf3, 0x90]).jmp("spin");
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, [1u8; 4096]).unwrap();
    let mut cfg = config(dir.path(), elf_pvh(&a.finish()), vec![]);
    cfg.initrd = Some(initrd);
    let vm = Vm::new(cfg).unwrap();
    assert_eq!(run_with_timeout(vm).unwrap(), VmExit::Reset);
    let out = std::fs::read_to_string(dir.path().join("console.txt")).unwrap();
    assert_eq!(out, "PVH-OK\n");
}

/// A guest that echoes each COM2 byte plus the number of bytes it has seen (kept in ECX and at
/// COUNTER in RAM), and resets after ten.
fn counting_echo_guest() -> Vec<u8> {
    const COUNTER: u32 = 0x20_0000;
    let mut a = Asm::default();
    a.b(&[0x31, 0xc9]); // xor ecx, ecx
    a.label("poll");
    a.b(&[0x66, 0xba]).b(&(layout::COM2_PORT + 5).to_le_bytes()); // mov dx, LSR
    a.b(&[0xec]); // in al, dx
    a.b(&[0xa8, 0x01]); // test al, 1
    a.b(&[0x0f, 0x84]);
    a.rel32("poll"); // jz poll
    a.b(&[0x66, 0xba]).b(&layout::COM2_PORT.to_le_bytes()); // mov dx, DATA
    a.b(&[0xec]); // in al, dx
    a.b(&[0x00, 0xc8]); // add al, cl
    a.b(&[0xee]); // out dx, al
    a.b(&[0xff, 0xc1]); // inc ecx
    a.b(&[0x89, 0x0c, 0x25]).b(&COUNTER.to_le_bytes()); // mov [COUNTER], ecx
    a.b(&[0x83, 0xf9, 0x0a]); // cmp ecx, 10
    a.jne("poll");
    a.b(&[0x66, 0xba]).b(&layout::I8042_CMD_PORT.to_le_bytes());
    a.b(&[0xb0, 0xfe, 0xee]); // mov al, 0xfe; out dx, al
    a.label("spin").b(&[0xf3, 0x90]).jmp("spin");
    elf(&a.finish())
}

/// A VM of the counting guest with fresh channel pipes: (vm, guest input, guest output).
fn counting_vm(
    dir: &Path,
    restore_from: Option<(&Path, &str)>,
    mem_mib: u32,
) -> Result<(Vm, std::fs::File, std::sync::mpsc::Receiver<u8>), rvmm::vmm::Error> {
    let (in_r, in_w) = nix::unistd::pipe().unwrap();
    let (out_r, out_w) = nix::unistd::pipe().unwrap();
    let mut cfg = config(dir, counting_echo_guest(), vec![]);
    cfg.mem_mib = mem_mib;
    cfg.channel = Some(rvmm::vmm::Channel {
        input: in_r,
        output: out_w,
    });
    let vm = match restore_from {
        None => Vm::new(cfg)?,
        Some((snap, tag)) => Vm::restore(cfg, snap, tag)?,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(out_r);
        let mut b = [0u8; 1];
        while std::io::Read::read(&mut f, &mut b).unwrap_or(0) == 1 {
            if tx.send(b[0]).is_err() {
                return;
            }
        }
    });
    Ok((vm, std::fs::File::from(in_w), rx))
}

fn echo(input: &mut std::fs::File, output: &std::sync::mpsc::Receiver<u8>, n: usize) -> Vec<u8> {
    std::io::Write::write_all(input, &vec![b'A'; n]).unwrap();
    (0..n)
        .map(|_| output.recv_timeout(Duration::from_secs(30)).unwrap())
        .collect()
}

#[test]
fn snapshot_restores_a_running_guest_in_a_new_vm() {
    if !common::have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");

    // Boot, echo five bytes, snapshot while the guest polls COM2, then throw the VM away.
    let (vm, mut input, output) = counting_vm(dir.path(), None, 16).unwrap();
    let ctl = vm.controller();
    let t = std::thread::spawn(move || vm.run());
    assert_eq!(echo(&mut input, &output, 5), b"ABCDE");
    let written = ctl.snapshot(&snap, "tiny").unwrap();
    assert!(
        written > 0 && written < 16 << 20,
        "{written} bytes of memory written"
    );
    // The guest still runs after the snapshot.
    assert_eq!(echo(&mut input, &output, 1), b"F");
    ctl.stop();
    assert_eq!(t.join().unwrap().unwrap(), VmExit::Stopped);
    let memory = std::fs::read(snap.join("memory")).unwrap();
    assert_eq!(memory.len(), 16 << 20);
    // The guest stores its counter just after echoing a byte, so the pause may fall between the
    // echo of the fifth byte and that store: 4 or 5 (ECX, restored with the registers, has the rest).
    let counter = u32::from_le_bytes(memory[0x20_0000..0x20_0004].try_into().unwrap());
    assert!(counter == 4 || counter == 5, "counter {counter} in memory");

    // A new VM from the snapshot goes on from the fifth byte (registers, memory, UART state),
    // and its writes never reach the snapshot's memory file (MAP_PRIVATE).
    let (vm, mut input, output) = counting_vm(dir.path(), Some((&snap, "tiny")), 16).unwrap();
    let runner = std::thread::spawn(move || run_with_timeout(vm));
    assert_eq!(echo(&mut input, &output, 5), b"FGHIJ");
    assert_eq!(runner.join().unwrap().unwrap(), VmExit::Reset);
    assert!(std::fs::read(snap.join("memory")).unwrap() == memory);

    // Twice from the same snapshot: the same start.
    let (vm, mut input, output) = counting_vm(dir.path(), Some((&snap, "tiny")), 16).unwrap();
    let ctl = vm.controller();
    let runner = std::thread::spawn(move || vm.run());
    assert_eq!(echo(&mut input, &output, 1), b"F");
    ctl.stop();
    assert_eq!(runner.join().unwrap().unwrap(), VmExit::Stopped);

    // Refusals: one clear line each, never a VM.
    let refuse = |mem_mib: u32, tag: &str| -> String {
        match counting_vm(dir.path(), Some((&snap, tag)), mem_mib) {
            Ok(_) => panic!("restore accepted a mismatched snapshot"),
            Err(e) => e.to_string(),
        }
    };
    assert!(refuse(16, "other").contains("another kernel"));
    let e = refuse(32, "tiny");
    assert!(e.contains("16 MiB") && e.contains("32 MiB"), "{e}");
    let state = std::fs::read(snap.join("snapshot.json")).unwrap();
    std::fs::write(snap.join("snapshot.json"), &state[..state.len() / 2]).unwrap();
    let e = refuse(16, "tiny");
    assert!(e.contains("not an rvmm snapshot"), "{e}");
    std::fs::write(snap.join("snapshot.json"), &state).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(snap.join("memory"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let e = refuse(16, "tiny");
    assert!(e.contains("not 16 MiB"), "{e}");
    // A VM that is not running cannot be snapshotted.
    let (vm, _i, _o) = counting_vm(dir.path(), None, 16).unwrap();
    let e = vm.controller().snapshot(&dir.path().join("s2"), "tiny");
    assert!(e.unwrap_err().to_string().contains("not running"));
}

// ---------------------------------------------------------------- virtio-console

/// A hostile driver of the virtio-console: garbage control messages (short, out of RAM, unknown
/// events, port ids out of range, a flood of PORT_READY with no receive buffers for the answers)
/// and garbage transmit chains (out of RAM, absurd lengths, write-only buffers), then one good
/// transmit chain. The VMM gives every chain back, the host's end of the port gets exactly the
/// good bytes, and the guest goes on to its marker and reset.
#[test]
fn tiny_guest_garbage_on_virtio_console_queues() {
    if !common::have_kvm() {
        return;
    }
    use rvmm::devices::virtio::console::{
        event, CTRL_QUEUE_SIZE, CTRL_TX, DATA_QUEUE_SIZE, F_MULTIPORT,
    };
    let dir = tempfile::tempdir().unwrap();
    let mut g = Image::new();
    // Device 0 is the console (no disks): MULTIPORT and VERSION_1, transmit queue of port 0 on
    // queue memory 0, the control transmit queue on queue memory 1.
    let w = |g: &mut Image, off, v| g.op(OP_W32, mmio(0, off), v);
    w(&mut g, 0x70, 0);
    w(&mut g, 0x70, 3);
    w(&mut g, 0x24, 0);
    w(&mut g, 0x20, F_MULTIPORT);
    w(&mut g, 0x24, 1);
    w(&mut g, 0x20, 1);
    w(&mut g, 0x70, 0xb);
    for (sel, q, size) in [
        (1u64, 0usize, DATA_QUEUE_SIZE),
        (CTRL_TX as u64, 1, CTRL_QUEUE_SIZE),
    ] {
        w(&mut g, 0x30, sel);
        w(&mut g, 0x38, u64::from(size));
        let b = Image::qbase(q);
        w(&mut g, 0x80, b);
        w(&mut g, 0x90, b + 0x400);
        w(&mut g, 0xa0, b + 0x1000);
        w(&mut g, 0x44, 1);
    }
    w(&mut g, 0x70, 0xf);
    // Control messages at HDRS: (id, event, value).
    let msgs: [(u32, u16, u16); 6] = [
        (u32::MAX, event::DEVICE_READY, 1),
        (1000, event::PORT_READY, 1),
        (0, 999, 1),
        (7, event::PORT_OPEN, 1),
        (0, event::PORT_READY, 0),
        (0, event::PORT_OPEN, 1),
    ];
    for (i, &(id, ev, val)) in msgs.iter().enumerate() {
        let mut m = [0u8; 8];
        m[..4].copy_from_slice(&id.to_le_bytes());
        m[4..6].copy_from_slice(&ev.to_le_bytes());
        m[6..].copy_from_slice(&val.to_le_bytes());
        g.put(HDRS + 16 * i as u64, &m);
    }
    let ctrl_chains: Vec<(u64, u32, u16)> = (0..msgs.len())
        .map(|i| (HDRS + 16 * i as u64, 8, 0))
        .chain([
            (HDRS, 3, 0),             // too short
            (0xffff_0000_0000, 8, 0), // outside RAM
            (HDRS, u32::MAX, 0),      // absurd length
            (HDRS + 16, 8, F_WRITE),  // write-only
        ])
        // A flood of PORT_READY for a port that does not exist.
        .chain((0..20).map(|_| (HDRS + 16, 8, 0)))
        .collect();
    for &(addr, len, flags) in &ctrl_chains {
        let d = g.desc(1, addr, len, flags, 0);
        g.post(0, 1, CTRL_TX as u64, d);
    }
    g.wait_used(1);
    // Transmit: garbage, then the good bytes.
    let good = b"hello from the tiny guest\n";
    g.put(DATA_W, good);
    for &(addr, len, flags) in &[
        (0xffff_0000_0000u64, 16u32, 0u16),
        (DATA_W, u32::MAX, 0),
        (DATA_W, 512, F_WRITE),
        (DATA_W, good.len() as u32, 0),
    ] {
        let d = g.desc(0, addr, len, flags, 0);
        g.post(0, 0, 1, d);
    }
    g.wait_used(0);
    g.out_str(layout::COM1_PORT, MARKER);
    g.op(OP_OUT, u64::from(layout::I8042_CMD_PORT), 0xfe);
    let kernel = g.build();

    let (out_r, out_w) = nix::unistd::pipe().unwrap();
    let mut cfg = config(dir.path(), kernel, vec![]);
    cfg.ports = vec![rvmm::vmm::PortBackend {
        name: "tiny".into(),
        input: None,
        output: Some(out_w),
        barrier: false,
    }];
    let vm = Vm::new(cfg).expect("create vm");
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::from(out_r);
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut v).unwrap();
        v
    });
    let exit = run_with_timeout(vm).expect("vm run");
    let console = std::fs::read_to_string(dir.path().join("console.txt")).unwrap();
    let out = reader.join().unwrap();
    assert_eq!(exit, VmExit::Reset, "console: {console} out: {out:?}");
    assert!(console.ends_with(MARKER), "console: {console}");
    assert_eq!(out, good);
}

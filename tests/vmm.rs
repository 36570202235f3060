//! The VMM with a tiny purpose-built guest: a few hundred bytes of x86-64 code (assembled here) that the
//! VMM boots in long mode through its normal ELF path. The guest writes to the serial port, drives two
//! virtio-blk disks through real virtqueues (read, write, get-id), commits hostile requests (a buffer
//! outside guest RAM, a descriptor loop, an absurd length, a write to a read-only disk, odd-size MMIO
//! accesses), prints each request's status, and resets through the i8042. Seconds, on any KVM.

mod common;

use std::process::Command;
use std::time::Duration;

const LOAD: u64 = 0x10_0000; // HIGH_MEMORY_START: where the ELF segment is loaded
const DATA: u64 = LOAD + 0x1_0000; // data area inside the same segment
const MMIO0: u64 = 0xd000_0000; // virtio-mmio slot 0 (first --disk)
const MMIO1: u64 = 0xd000_1000; // slot 1

// Data area layout (absolute guest addresses).
const Q0: u64 = DATA; // queue of disk 0: desc table (16 x 16 B), avail at +0x100, used at +0x200
const Q1: u64 = DATA + 0x1000; // queue of disk 1
const HDR: u64 = DATA + 0x2000; // request headers, 16 B apart
const BUF: u64 = DATA + 0x3000; // data buffers, 0x200 apart
const STATUS: u64 = DATA + 0x4000; // status bytes, 1 apart
const QSIZE: u16 = 16;

/// A byte-level assembler for the handful of instructions the guest needs.
struct Asm(Vec<u8>);

impl Asm {
    fn mov_rdi(&mut self, v: u64) {
        self.0.extend_from_slice(&[0x48, 0xbf]);
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// mov dword [addr], v
    fn store32(&mut self, addr: u64, v: u32) {
        self.mov_rdi(addr);
        self.0.extend_from_slice(&[0xc7, 0x07]);
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// mov byte [addr], v
    fn store8(&mut self, addr: u64, v: u8) {
        self.mov_rdi(addr);
        self.0.extend_from_slice(&[0xc6, 0x07, v]);
    }
    /// mov al, [addr]
    fn load8(&mut self, addr: u64) {
        self.mov_rdi(addr);
        self.0.extend_from_slice(&[0x8a, 0x07]);
    }
    /// mov eax, [addr]
    fn load32(&mut self, addr: u64) {
        self.mov_rdi(addr);
        self.0.extend_from_slice(&[0x8b, 0x07]);
    }
    fn out_al(&mut self) {
        self.0.push(0xee); // out dx, al (dx = COM1)
    }
    fn putc(&mut self, c: u8) {
        self.0.extend_from_slice(&[0xb0, c]);
        self.out_al();
    }
    fn puts(&mut self, s: &str) {
        for b in s.bytes() {
            self.putc(b);
        }
    }
    fn put_mem(&mut self, addr: u64) {
        self.load8(addr);
        self.out_al();
    }
    fn put_digit(&mut self, addr: u64) {
        self.load8(addr);
        self.0.extend_from_slice(&[0x04, b'0']); // add al, '0'
        self.out_al();
    }
}

/// Bytes of the data area, addressed absolutely.
struct Data(Vec<u8>);

impl Data {
    fn put(&mut self, addr: u64, bytes: &[u8]) {
        let off = (addr - DATA) as usize;
        self.0[off..off + bytes.len()].copy_from_slice(bytes);
    }
    fn desc(&mut self, q: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = Vec::new();
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        self.put(q + u64::from(i) * 16, &d);
    }
    fn header(&mut self, n: u64, typ: u32, sector: u64) -> u64 {
        let a = HDR + n * 16;
        let mut h = Vec::new();
        h.extend_from_slice(&typ.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        self.put(a, &h);
        a
    }
    fn avail(&mut self, q: u64, heads: &[u16]) {
        self.put(q + 0x100, &0u16.to_le_bytes());
        self.put(q + 0x102, &(heads.len() as u16).to_le_bytes());
        for (i, h) in heads.iter().enumerate() {
            self.put(q + 0x104 + i as u64 * 2, &h.to_le_bytes());
        }
    }
}

const NEXT: u16 = 1;
const WRITE: u16 = 2;

/// Requests: (header, data, status) triples; returns the status byte addresses in print order.
fn build_data() -> (Data, Vec<u64>) {
    let mut d = Data(vec![0; 0x5000]);
    let st = |n: u64| STATUS + n;
    // Disk 0, request 0: read sector 0 into BUF+0.
    let h = d.header(0, 0, 0);
    d.desc(Q0, 0, h, 16, NEXT, 1);
    d.desc(Q0, 1, BUF, 512, NEXT | WRITE, 2);
    d.desc(Q0, 2, st(0), 1, WRITE, 0);
    // Request 1: write sector 1 from BUF+0x200.
    d.put(BUF + 0x200, b"GUEST-WROTE-THIS");
    let h = d.header(1, 1, 1);
    d.desc(Q0, 3, h, 16, NEXT, 4);
    d.desc(Q0, 4, BUF + 0x200, 512, NEXT, 5);
    d.desc(Q0, 5, st(1), 1, WRITE, 0);
    // Request 2 (hostile): read into an address far outside guest RAM.
    let h = d.header(2, 0, 0);
    d.desc(Q0, 6, h, 16, NEXT, 7);
    d.desc(Q0, 7, 0xffff_0000_0000, 512, NEXT | WRITE, 8);
    d.desc(Q0, 8, st(2), 1, WRITE, 0);
    // Request 3 (hostile): a descriptor that chains to itself.
    let h = d.header(3, 0, 0);
    d.desc(Q0, 9, h, 16, NEXT, 9);
    // Request 4 (hostile): an absurd length.
    let h = d.header(4, 0, 0);
    d.desc(Q0, 10, h, 16, NEXT, 11);
    d.desc(Q0, 11, BUF + 0x400, 0xffff_f000, NEXT | WRITE, 12);
    d.desc(Q0, 12, st(4), 1, WRITE, 0);
    // Request 5: get-id into BUF+0x600.
    let h = d.header(5, 8, 0);
    d.desc(Q0, 13, h, 16, NEXT, 14);
    d.desc(Q0, 14, BUF + 0x600, 20, NEXT | WRITE, 15);
    d.desc(Q0, 15, st(5), 1, WRITE, 0);
    d.avail(Q0, &[0, 3, 6, 9, 10, 13]);
    // Disk 1 (read-only), request 6: a write, which must fail.
    let h = d.header(6, 1, 0);
    d.desc(Q1, 0, h, 16, NEXT, 1);
    d.desc(Q1, 1, BUF + 0x200, 512, NEXT, 2);
    d.desc(Q1, 2, st(6), 1, WRITE, 0);
    d.avail(Q1, &[0]);
    // Status bytes start as 9 so that an untouched one shows.
    for n in 0..7 {
        d.put(st(n), &[9]);
    }
    (d, [0, 1, 2, 4, 5, 6].iter().map(|&n| st(n)).collect())
}

fn setup_queue(a: &mut Asm, mmio: u64, q: u64) {
    a.store32(mmio + 0x70, 0); // reset
    a.store32(mmio + 0x70, 1); // ACKNOWLEDGE
    a.store32(mmio + 0x70, 3); // DRIVER
    a.store32(mmio + 0x24, 1); // DriverFeaturesSel = 1
    a.store32(mmio + 0x20, 1); // VIRTIO_F_VERSION_1 (bit 32)
    a.store32(mmio + 0x70, 0xb); // FEATURES_OK
    a.store32(mmio + 0x30, 0); // QueueSel
    a.store32(mmio + 0x38, u32::from(QSIZE));
    a.store32(mmio + 0x80, q as u32);
    a.store32(mmio + 0x84, 0);
    a.store32(mmio + 0x90, (q + 0x100) as u32);
    a.store32(mmio + 0x94, 0);
    a.store32(mmio + 0xa0, (q + 0x200) as u32);
    a.store32(mmio + 0xa4, 0);
    a.store32(mmio + 0x44, 1); // QueueReady
    a.store32(mmio + 0x70, 0xf); // DRIVER_OK
}

fn guest_program() -> Vec<u8> {
    let (data, statuses) = build_data();
    let mut a = Asm(Vec::new());
    a.0.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    a.puts("HELLO\n");
    // Odd-size MMIO: a byte read and a byte write of the status register, a write to an undefined
    // register and to config space; all must be ignored.
    a.load8(MMIO0 + 0x70);
    a.store8(MMIO0 + 0x70, 0x80);
    a.store32(MMIO0 + 0xe0, 0xdead_beef);
    a.store32(MMIO0 + 0x100, 0xdead_beef);
    a.puts("M:");
    a.load32(MMIO0); // magic "virt": print its low byte
    a.out_al();
    setup_queue(&mut a, MMIO0, Q0);
    setup_queue(&mut a, MMIO1, Q1);
    a.store32(MMIO0 + 0x50, 0); // notify: the VMM handles the whole ring before the write returns
    a.store32(MMIO1 + 0x50, 0);
    a.puts("\nD:");
    for i in 0..16 {
        a.put_mem(BUF + i);
    }
    a.puts("\nS:");
    for s in statuses {
        a.put_digit(s);
    }
    a.puts("\nI:");
    for i in 0..6 {
        a.put_mem(BUF + 0x600 + i);
    }
    a.puts("\nEND\n");
    a.0.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // i8042 reset: out 0x64, 0xfe
    a.0.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp back (never reached)
    assert!(a.0.len() < (DATA - LOAD) as usize, "code overlaps data");
    let mut image = a.0;
    image.resize((DATA - LOAD) as usize, 0x90);
    image.extend_from_slice(&data.0);
    image
}

/// A minimal ELF64 executable: one PT_LOAD segment at LOAD, entry at its start.
fn elf(image: &[u8]) -> Vec<u8> {
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF");
    e.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    e.extend_from_slice(&[0; 8]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    e.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    e.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    e.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    e.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    e.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    e.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    e.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
                                              // Program header.
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&7u32.to_le_bytes()); // RWX
    e.extend_from_slice(&0x1000u64.to_le_bytes()); // p_offset
    e.extend_from_slice(&LOAD.to_le_bytes()); // p_vaddr
    e.extend_from_slice(&LOAD.to_le_bytes()); // p_paddr
    e.extend_from_slice(&(image.len() as u64).to_le_bytes()); // p_filesz
    e.extend_from_slice(&(image.len() as u64).to_le_bytes()); // p_memsz
    e.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    e.resize(0x1000, 0);
    e.extend_from_slice(image);
    e
}

#[test]
fn tiny_guest_drives_serial_virtio_blk_hostile_requests_and_i8042_reset() {
    if !common::have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, elf(&guest_program())).expect("write guest");
    let rw = dir.path().join("rw.img");
    let mut disk = vec![0u8; 64 * 1024];
    disk[..16].copy_from_slice(b"DISK-SECTOR-ZERO");
    std::fs::write(&rw, &disk).expect("write rw disk");
    let ro = dir.path().join("ro.img");
    std::fs::write(&ro, vec![0x5a; 64 * 1024]).expect("write ro disk");

    let out = Command::new(common::rvmm_bin())
        .arg("vm")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--disk")
        .arg(&rw)
        .arg("--disk")
        .arg(format!("{}:ro", ro.display()))
        .args(["--memory", "32", "--cmdline", "tiny"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("rvmm runs");
    let console = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "rvmm vm failed ({}): {err}\n{console}",
        out.status
    );
    assert!(console.starts_with("HELLO\n"), "{console}");
    assert!(console.contains("M:v"), "magic value not read: {console}");
    assert!(
        console.contains("D:DISK-SECTOR-ZERO"),
        "sector 0 not read: {console}"
    );
    // read ok, write ok, out-of-RAM buffer → IOERR, absurd length → IOERR, get-id ok, ro write → IOERR.
    assert!(console.contains("S:001101"), "statuses: {console}");
    assert!(console.contains("I:rw.img"), "device id: {console}");
    assert!(console.contains("END\n"), "{console}");
    let disk = std::fs::read(&rw).expect("read rw disk");
    assert_eq!(&disk[512..528], b"GUEST-WROTE-THIS", "sector 1 not written");
    let ro_disk = std::fs::read(&ro).expect("read ro disk");
    assert!(
        ro_disk.iter().all(|&b| b == 0x5a),
        "read-only disk was modified"
    );
    let _ = Duration::ZERO;
}

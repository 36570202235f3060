//! Snapshots of a paused VM: the saved state, its file format, and writing guest memory.
//!
//! A snapshot is a directory with two files:
//! - `snapshot.json`: a header ([`MAGIC`], [`FORMAT`], the rvmm version, the caller's `tag`, the
//!   machine [`Layout`], the kernel command line) and the state of every vCPU, the irqchip, the
//!   PIT, the KVM clock, both UARTs and every virtio-mmio transport with its queues. KVM's
//!   structures are stored as base64 of their bytes (they are plain integers);
//! - `memory`: guest RAM, regions back to back, written sparse (all-zero pages are holes).
//!
//! A restore maps `memory` `MAP_PRIVATE`: copy-on-write and demand-paged, so every VM restored
//! from one snapshot shares its clean pages through the page cache. See docs/snapshots.md.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use base64::Engine;
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::devices::virtio::mmio::TransportState;

/// First field of every snapshot.
pub const MAGIC: &str = "rvmm-snapshot";
/// Bumped whenever the saved state changes shape or meaning.
pub const FORMAT: u32 = 2;
pub const STATE_FILE: &str = "snapshot.json";
pub const MEMORY_FILE: &str = "memory";

/// KVM structures that are plain integers (any bit pattern is a valid value), so they can be
/// saved as their bytes.
///
/// # Safety
/// Implement only for `repr(C)` types made of integers and arrays or unions of them.
pub unsafe trait Pod: Default {}

macro_rules! pod {
    ($($t:ty),*) => {$(
        // SAFETY: a bindgen `repr(C)` struct of integers, arrays and integer unions.
        unsafe impl Pod for $t {}
    )*};
}
pod!(
    kvm_regs,
    kvm_sregs,
    kvm_fpu,
    kvm_xsave,
    kvm_xcrs,
    kvm_lapic_state,
    kvm_mp_state,
    kvm_vcpu_events,
    kvm_debugregs,
    kvm_irqchip,
    kvm_pit_state2,
    kvm_clock_data
);

/// A KVM structure, serialized as base64 of its bytes.
#[derive(Default)]
pub struct Raw<T: Pod>(pub T);

impl<T: Pod> Clone for Raw<T> {
    fn clone(&self) -> Self {
        // SAFETY: T is Pod: a bitwise copy is a valid, independent value (no pointers, no Drop).
        Raw(unsafe { std::ptr::read(&self.0) })
    }
}

impl<T: Pod> Serialize for Raw<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // SAFETY: T is Pod: reading its bytes is reading plain integers.
        let bytes = unsafe {
            std::slice::from_raw_parts((&self.0 as *const T).cast::<u8>(), size_of::<T>())
        };
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }
}

impl<'de, T: Pod> Deserialize<'de> for Raw<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)?;
        if bytes.len() != size_of::<T>() {
            return Err(serde::de::Error::custom(format!(
                "{} bytes where {} were expected",
                bytes.len(),
                size_of::<T>()
            )));
        }
        let mut v = T::default();
        // SAFETY: T is Pod (any bytes are a valid value) and exactly size_of::<T>() bytes are
        // copied into it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (&mut v as *mut T).cast::<u8>(),
                size_of::<T>(),
            )
        };
        Ok(Raw(v))
    }
}

/// Everything KVM keeps about one vCPU.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: Raw<kvm_regs>,
    pub sregs: Raw<kvm_sregs>,
    pub fpu: Raw<kvm_fpu>,
    /// When the host has XSAVE (not used by guests on kvm_pvm, which run with `noxsave`).
    pub xsave: Option<Raw<kvm_xsave>>,
    pub xcrs: Option<Raw<kvm_xcrs>>,
    pub lapic: Raw<kvm_lapic_state>,
    pub mp_state: Raw<kvm_mp_state>,
    pub events: Raw<kvm_vcpu_events>,
    pub debugregs: Raw<kvm_debugregs>,
    /// (index, value) of every MSR KVM lists and lets us read.
    pub msrs: Vec<(u32, u64)>,
    /// The guest's TSC frequency, when KVM reports it: a restore on a host with another TSC
    /// frequency sets it back (TSC scaling), so guest time does not drift.
    #[serde(default)]
    pub tsc_khz: Option<u32>,
}

/// A device slot on the virtio-mmio bus, in bus order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    Block {
        read_only: bool,
    },
    Net,
    /// A multiport virtio-console with this many ports.
    Console {
        ports: u32,
    },
    /// A virtio-fs device.
    Fs,
}

/// What a restore must provide the same way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub vcpus: u8,
    pub mem_mib: u32,
    pub devices: Vec<Slot>,
    /// Whether COM2 was connected (a channel).
    pub channel: bool,
    /// `HostKind::name()` of the host that took it.
    pub host: String,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let devs: Vec<&str> = self
            .devices
            .iter()
            .map(|d| match d {
                Slot::Block { read_only: true } => "disk(ro)",
                Slot::Block { read_only: false } => "disk",
                Slot::Net => "net",
                Slot::Console { .. } => "console",
                Slot::Fs => "fs",
            })
            .collect();
        write!(
            f,
            "{} vCPU, {} MiB, {}",
            self.vcpus,
            self.mem_mib,
            if devs.is_empty() {
                "no devices".to_string()
            } else {
                devs.join("+")
            }
        )
    }
}

/// A virtqueue's state (virtio-queue's `QueueState`, which has no serde).
#[derive(Clone, Serialize, Deserialize)]
pub struct QueueSnap {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<virtio_queue::QueueState> for QueueSnap {
    fn from(q: virtio_queue::QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnap> for virtio_queue::QueueState {
    fn from(q: QueueSnap) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

#[derive(Clone, Serialize, Deserialize)]
pub struct TransportSnap {
    pub state: TransportState,
    pub queues: Vec<QueueSnap>,
    /// The device's own state, for devices that have one (virtio-console).
    #[serde(default)]
    pub device: Option<serde_json::Value>,
}

/// vm-superio's `SerialState` (which has no serde).
#[derive(Clone, Serialize, Deserialize)]
pub struct SerialSnap {
    pub regs: [u8; 9],
    pub fifo: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialSnap {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        Self {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            fifo: s.in_buffer,
        }
    }
}

impl From<&SerialSnap> for vm_superio::serial::SerialState {
    fn from(s: &SerialSnap) -> Self {
        let r = s.regs;
        Self {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: s.fifo.clone(),
        }
    }
}

/// The whole saved VM but its memory.
#[derive(Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub magic: String,
    pub format: u32,
    /// The rvmm version that took it.
    pub rvmm: String,
    /// The caller's identity of the guest (kernel, init, ...): a restore must pass the same.
    pub tag: String,
    pub layout: Layout,
    pub cmdline: String,
    pub vcpus: Vec<VcpuState>,
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<Raw<kvm_irqchip>>,
    pub pit: Raw<kvm_pit_state2>,
    pub clock: Raw<kvm_clock_data>,
    /// COM1, COM2.
    pub serials: Vec<SerialSnap>,
    /// The virtio-mmio transports, in bus order.
    pub transports: Vec<TransportSnap>,
}

/// The rvmm version recorded in snapshots.
pub fn rvmm_version() -> String {
    format!("{} format {FORMAT}", env!("CARGO_PKG_VERSION"))
}

impl Snapshot {
    /// Reads `dir/snapshot.json` and checks that it is a snapshot of this format, taken by this
    /// rvmm, for `tag` and `layout`. Every refusal is one line saying what differs.
    pub fn load(dir: &Path, tag: &str, layout: &Layout) -> Result<Snapshot, String> {
        let path = dir.join(STATE_FILE);
        let raw =
            std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&raw, &path, tag, layout)
    }

    /// [`Snapshot::load`] of the bytes of a `snapshot.json` (`path` names it in messages).
    pub fn parse(raw: &[u8], path: &Path, tag: &str, layout: &Layout) -> Result<Snapshot, String> {
        #[derive(Deserialize)]
        struct Head {
            magic: String,
            format: u32,
            rvmm: String,
        }
        let head: Head = serde_json::from_slice(raw)
            .map_err(|e| format!("{} is not an rvmm snapshot: {e}", path.display()))?;
        if head.magic != MAGIC {
            return Err(format!("{} is not an rvmm snapshot", path.display()));
        }
        if head.format != FORMAT || head.rvmm != rvmm_version() {
            return Err(format!(
                "snapshot taken by rvmm {} (this is rvmm {})",
                head.rvmm,
                rvmm_version()
            ));
        }
        let snap: Snapshot = serde_json::from_slice(raw)
            .map_err(|e| format!("{} is corrupt: {e}", path.display()))?;
        if snap.tag != tag {
            return Err("snapshot taken for another kernel or guest init".into());
        }
        if &snap.layout != layout {
            let (a, b) = (&snap.layout, layout);
            let (was, is) = if a.host != b.host {
                (a.host.clone(), b.host.clone())
            } else if a.channel != b.channel {
                (
                    format!("channel {}", a.channel),
                    format!("channel {}", b.channel),
                )
            } else {
                (a.to_string(), b.to_string())
            };
            return Err(format!("snapshot taken for {was} (this VM is {is})"));
        }
        if snap.vcpus.len() != usize::from(layout.vcpus)
            || snap.irqchips.len() != 3
            || snap.serials.len() != 2
            || snap.transports.len() != layout.devices.len()
        {
            return Err(format!("{} is corrupt: parts are missing", path.display()));
        }
        Ok(snap)
    }

    /// Writes `snapshot.json` into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let mut f = File::create(dir.join(STATE_FILE))?;
        f.write_all(&serde_json::to_vec(self).map_err(std::io::Error::other)?)?;
        f.sync_all()
    }
}

/// The memory file's size: every region of guest RAM.
pub fn memory_file_len(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Page size used to find all-zero runs.
const PAGE: usize = 4096;

/// Writes guest RAM to `path`: regions back to back, all-zero pages left as holes. Returns the
/// bytes actually written.
///
/// The caller guarantees nothing writes guest memory meanwhile (vCPUs parked, devices locked).
pub fn write_memory(mem: &GuestMemoryMmap, path: &Path) -> std::io::Result<u64> {
    let f = File::create(path)?;
    f.set_len(memory_file_len(mem))?;
    let mut off = 0u64;
    let mut written = 0u64;
    for r in mem.iter() {
        let len = r.len() as usize;
        // SAFETY: the region is a live mapping of `len` bytes owned by `mem`; nothing writes it
        // while this runs (the caller's guarantee), and bytes are valid for any content.
        let bytes = unsafe { std::slice::from_raw_parts(r.as_ptr() as *const u8, len) };
        let mut i = 0;
        while i < len {
            // Coalesce a run of non-zero pages into one write.
            let start = i;
            while i < len && !is_zero(&bytes[i..(i + PAGE).min(len)]) {
                i += PAGE;
            }
            let end = i.min(len);
            if end > start {
                f.write_all_at(&bytes[start..end], off + start as u64)?;
                written += (end - start) as u64;
            }
            while i < len && is_zero(&bytes[i..(i + PAGE).min(len)]) {
                i += PAGE;
            }
        }
        off += len as u64;
    }
    f.sync_all()?;
    Ok(written)
}

fn is_zero(b: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle.
        unsafe { b.align_to::<u64>() }
    };
    head.iter().all(|&x| x == 0) && words.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn raw_round_trips_and_refuses_wrong_sizes() {
        let r = kvm_regs {
            rip: 0x1234_5678,
            rflags: 2,
            ..Default::default()
        };
        let s = serde_json::to_string(&Raw(r)).unwrap();
        let back: Raw<kvm_regs> = serde_json::from_str(&s).unwrap();
        assert_eq!(back.0.rip, 0x1234_5678);
        assert_eq!(back.0.rflags, 2);
        assert!(serde_json::from_str::<Raw<kvm_sregs>>(&s).is_err());
        assert!(serde_json::from_str::<Raw<kvm_regs>>("\"!!\"").is_err());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        let mut p = [0u8; 4096];
        p[4095] = 1;
        assert!(!is_zero(&p));
        p[4095] = 0;
        p[1] = 1;
        assert!(!is_zero(&p[1..]));
    }
}

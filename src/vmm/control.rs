//! Controlling a VM from other threads: why it stops, stop handles, and the [`Controller`] that
//! pauses every vCPU for a snapshot, writes it, resumes, and re-points a disk.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_irqchip;
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::SIGRTMIN;

use super::snapshot::{self, Layout, Raw, SerialSnap, Slot, Snapshot, TransportSnap, VcpuState};
use super::{ioctl_err, Error};
use crate::devices::lock;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::block;
use crate::devices::virtio::mmio::MmioTransport;

/// Why the VM is stopping (first reason wins).
#[derive(Debug, Clone)]
pub(crate) enum ExitReason {
    Reset,
    Shutdown,
    Stopped,
    Error(String),
}

/// State shared by the vCPU threads, the event thread and stop handles.
pub(crate) struct Shared {
    pub(crate) stopping: AtomicBool,
    pub(crate) reason: Mutex<Option<ExitReason>>,
    pub(crate) exit_evt: EventFd,
    pub(crate) pause: Pause,
    /// The running vCPU threads (empty before `run` and once it is stopping them).
    pub(crate) vcpu_threads: Mutex<Vec<libc::pthread_t>>,
    /// KVM's MSR index list, for saving vCPUs.
    pub(crate) msr_index: Vec<u32>,
    /// Whether vCPU state includes XSAVE.
    pub(crate) xsave: bool,
}

/// Parks vCPU threads for a snapshot: each one saves its own state and waits for the resume.
#[derive(Default)]
pub(crate) struct Pause {
    flag: AtomicBool,
    inner: Mutex<PauseInner>,
    cv: Condvar,
}

#[derive(Default)]
struct PauseInner {
    requested: bool,
    saved: Vec<(u8, Result<VcpuState, String>)>,
}

impl Pause {
    pub(crate) fn requested(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Called by vCPU `id` outside KVM_RUN: hands over its state, then waits for the resume (or
    /// the VM stopping).
    pub(crate) fn park(
        &self,
        id: u8,
        stopping: &AtomicBool,
        save: impl FnOnce() -> Result<VcpuState, String>,
    ) {
        let st = save();
        let mut g = lock(&self.inner);
        if !g.requested || g.saved.iter().any(|(i, _)| *i == id) {
            return;
        }
        g.saved.push((id, st));
        self.cv.notify_all();
        while g.requested && !stopping.load(Ordering::Acquire) {
            g = match self.cv.wait_timeout(g, Duration::from_millis(20)) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

impl Shared {
    pub(crate) fn request_exit(&self, r: ExitReason) {
        {
            let mut g = lock(&self.reason);
            if g.is_none() {
                *g = Some(r);
            }
        }
        self.stopping.store(true, Ordering::Release);
        let _ = self.exit_evt.write(1);
    }
}

/// Ends the VM from any thread.
#[derive(Clone)]
pub struct StopHandle(pub(crate) Arc<Shared>);

impl StopHandle {
    pub fn stop(&self) {
        self.0.request_exit(ExitReason::Stopped);
    }
}

/// Controls a running VM from another thread: stop it, snapshot it, swap a disk.
#[derive(Clone)]
pub struct Controller(pub(crate) Arc<Control>);

pub(crate) struct Control {
    pub(crate) shared: Arc<Shared>,
    pub(crate) vm: Arc<VmFd>,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) serials: [Arc<Mutex<SerialDevice>>; 2],
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub(crate) layout: Layout,
    pub(crate) cmdline: String,
}

/// How long a snapshot waits for the vCPUs to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

impl Controller {
    pub fn stop(&self) {
        self.0.shared.request_exit(ExitReason::Stopped);
    }

    /// Pauses the VM, writes a snapshot into `dir` (created if missing), and resumes it. `tag` is
    /// the caller's identity of the guest; a restore must present the same. Returns the bytes of
    /// guest memory written (zero pages are holes).
    pub fn snapshot(&self, dir: &Path, tag: &str) -> Result<u64, Error> {
        let vcpus = self.pause_all().map_err(Error::Snapshot);
        let result = vcpus.and_then(|vcpus| self.save_paused(dir, tag, vcpus));
        self.resume();
        result
    }

    fn save_paused(&self, dir: &Path, tag: &str, vcpus: Vec<VcpuState>) -> Result<u64, Error> {
        let c = &self.0;
        // Devices stay locked until memory is written: the event thread cannot touch a queue
        // (or the guest memory behind it) in between.
        let serials: Vec<_> = c.serials.iter().map(|s| lock(s)).collect();
        let transports: Vec<_> = c.transports.iter().map(|t| lock(t)).collect();
        let mut irqchips = Vec::new();
        for chip_id in 0..3 {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            c.vm.get_irqchip(&mut chip)
                .map_err(ioctl_err("KVM_GET_IRQCHIP"))?;
            irqchips.push(Raw(chip));
        }
        let snap = Snapshot {
            magic: snapshot::MAGIC.into(),
            format: snapshot::FORMAT,
            rvmm: snapshot::rvmm_version(),
            tag: tag.into(),
            layout: c.layout.clone(),
            cmdline: c.cmdline.clone(),
            vcpus,
            irqchips,
            pit: Raw(c.vm.get_pit2().map_err(ioctl_err("KVM_GET_PIT2"))?),
            clock: Raw(c.vm.get_clock().map_err(ioctl_err("KVM_GET_CLOCK"))?),
            serials: serials
                .iter()
                .map(|s| SerialSnap::from(s.state()))
                .collect(),
            transports: transports
                .iter()
                .map(|t| {
                    let (state, queues) = t.save();
                    TransportSnap {
                        state,
                        queues: queues.into_iter().map(Into::into).collect(),
                        device: t.device_state(),
                    }
                })
                .collect(),
        };
        let io = |e: std::io::Error| Error::Snapshot(format!("writing the snapshot: {e}"));
        std::fs::create_dir_all(dir).map_err(io)?;
        let written =
            snapshot::write_memory(&c.mem, &dir.join(snapshot::MEMORY_FILE)).map_err(io)?;
        snap.write(dir).map_err(io)?;
        Ok(written)
    }

    /// Parks every vCPU and collects their states.
    fn pause_all(&self) -> Result<Vec<VcpuState>, String> {
        let sh = &self.0.shared;
        let n = usize::from(self.0.layout.vcpus);
        {
            let mut g = lock(&sh.pause.inner);
            g.requested = true;
            g.saved.clear();
        }
        sh.pause.flag.store(true, Ordering::Release);
        let t0 = Instant::now();
        loop {
            {
                let threads = lock(&sh.vcpu_threads);
                if threads.len() != n {
                    return Err("the VM is not running".into());
                }
                for &t in threads.iter() {
                    // SAFETY: the thread is alive: `run` empties the list (under this lock)
                    // before it joins any vCPU thread.
                    unsafe { libc::pthread_kill(t, kick_signal()) };
                }
            }
            let g = lock(&sh.pause.inner);
            let (mut g, _) = match sh.pause.cv.wait_timeout(g, Duration::from_millis(2)) {
                Ok(r) => r,
                Err(p) => p.into_inner(),
            };
            if g.saved.len() == n {
                let mut saved = std::mem::take(&mut g.saved);
                saved.sort_by_key(|(id, _)| *id);
                return saved.into_iter().map(|(_, s)| s).collect();
            }
            if sh.stopping.load(Ordering::Acquire) {
                return Err("the VM is stopping".into());
            }
            if t0.elapsed() > PAUSE_TIMEOUT {
                return Err(format!("the vCPUs did not pause within {PAUSE_TIMEOUT:?}"));
            }
        }
    }

    pub(crate) fn resume(&self) {
        let p = &self.0.shared.pause;
        let mut g = lock(&p.inner);
        g.requested = false;
        g.saved.clear();
        p.flag.store(false, Ordering::Release);
        p.cv.notify_all();
    }

    /// Points disk `index` (in `VmConfig::disks` order) at `path` and tells the guest its new
    /// capacity (a configuration-change interrupt).
    pub fn replace_disk(&self, index: usize, path: &Path) -> Result<(), Error> {
        let read_only = self.disk_slot(index)?;
        let (file, size) = block::open_backing(path, read_only)?;
        self.put_disk(index, file, size)
    }

    /// Points disk `index` at an open file (a jailed VMM opens no host path): its size is its
    /// length, or for a block device where its end is.
    pub fn replace_disk_file(&self, index: usize, file: std::fs::File) -> Result<(), Error> {
        use std::io::Seek;
        self.disk_slot(index)?;
        let size = (&file)
            .seek(std::io::SeekFrom::End(0))
            .map_err(|e| Error::Snapshot(format!("the disk for slot {index}: {e}")))?;
        self.put_disk(index, file, size)
    }

    /// Whether disk `index` exists and is read-only.
    fn disk_slot(&self, index: usize) -> Result<bool, Error> {
        match self.0.layout.devices.get(index) {
            Some(Slot::Block { read_only }) if index < self.0.transports.len() => Ok(*read_only),
            _ => Err(Error::Snapshot(format!("device {index} is not a disk"))),
        }
    }

    fn put_disk(&self, index: usize, file: std::fs::File, size: u64) -> Result<(), Error> {
        let Some(t) = self.0.transports.get(index) else {
            return Err(Error::Snapshot(format!("there is no disk {index}")));
        };
        if !lock(t).replace_disk(file, size) {
            return Err(Error::Snapshot(format!("device {index} is not a disk")));
        }
        Ok(())
    }
}

/// Signal used to kick vCPU threads out of KVM_RUN.
pub(crate) fn kick_signal() -> i32 {
    SIGRTMIN() + 1
}

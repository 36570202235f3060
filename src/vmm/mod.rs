//! The VMM: KVM setup, guest memory, vCPUs, boot, event loop.
//!
//! ```no_run
//! # use rvmm::vmm::*;
//! let vm = Vm::new(VmConfig::new("vmlinux".into())).unwrap();
//! let stop = vm.stop_handle(); // Clone + Send: stop.stop() ends the VM from any thread
//! match vm.run().unwrap() { VmExit::Reset | VmExit::Shutdown | VmExit::Stopped => {} }
//! ```
//!
//! Threads: the thread calling [`Vm::run`] becomes the event thread (epoll via event-manager:
//! console input, virtio queue notifications, the exit EventFd); each vCPU gets its own thread.
//! See docs/ARCHITECTURE.md for the boot sequence.

pub mod boot;
mod events;
pub mod kvm;
pub mod layout;
pub mod mptable;
pub mod snapshot;
pub mod vcpu;

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, VcpuFd, VmFd};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::i8042::{self, I8042};
use crate::devices::serial::SerialDevice;
use crate::devices::tap::Tap;
use crate::devices::virtio::block::{self, Block};
use crate::devices::virtio::console::{self as vconsole, Console as VirtioConsole};
use crate::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::VirtioDevice;
use crate::devices::{lock, Bus, IrqLine, SharedDevice};

pub use crate::devices::virtio::console::PortBackend;
pub use kvm::HostKind;
use snapshot::{Layout, Raw, SerialSnap, Slot, Snapshot, TransportSnap, VcpuState};

/// Kernel command-line additions a guest needs on kvm_pvm: the one list in
/// guest-kernel/cmdline-kvm_pvm.txt, embedded in the binary (see `crate::kernel`).
pub fn pvm_cmdline_additions() -> String {
    crate::kernel::pvm_cmdline_additions().to_owned()
}

/// What to boot.
#[derive(Debug)]
pub struct VmConfig {
    /// Uncompressed ELF vmlinux (PVH note used when present).
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Kernel command line; the VMM appends `reboot=k` (if no `reboot=`), the kvm_pvm additions
    /// on kvm_pvm, and one `virtio_mmio.device=` per device.
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u32,
    /// virtio-blk disks, in order: /dev/vda, /dev/vdb, ...
    pub disks: Vec<DiskConfig>,
    /// COM1 (ttyS0, port 0x3f8, IRQ 4).
    pub console: Console,
    /// COM2 (ttyS1, port 0x2f8, IRQ 3): a byte channel to the guest.
    pub channel: Option<Channel>,
    /// virtio-net devices (eth0, eth1, ...), after the disks on the MMIO bus.
    pub net: Vec<NetConfig>,
    /// The ports of a multiport virtio-console, after the network devices on the MMIO bus (no
    /// device when empty): the host ↔ guest channel (docs/vm-channel.md).
    pub ports: Vec<PortBackend>,
}

/// A virtio-net device backed by a TAP.
#[derive(Debug)]
pub struct NetConfig {
    pub tap: TapSource,
    pub mac: [u8; 6],
}

/// Where the TAP comes from.
#[derive(Debug)]
pub enum TapSource {
    /// Open (or create) the tap with this name.
    Name(String),
    /// An already attached tap fd.
    Fd(OwnedFd),
}

impl VmConfig {
    /// The machine layout a snapshot of this VM records (and a restore must match).
    pub fn layout(&self) -> Layout {
        layout_of(self, kvm::host_kind())
    }

    /// One vCPU, 128 MiB, console on stdio, no disks, `console=ttyS0`.
    pub fn new(kernel: PathBuf) -> Self {
        Self {
            kernel,
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_owned(),
            vcpus: 1,
            mem_mib: 128,
            disks: Vec::new(),
            console: Console::Stdio,
            channel: None,
            net: Vec::new(),
            ports: Vec::new(),
        }
    }
}

/// A sensible base command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off nomodule";

#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// The backing file; `None` is an empty slot (zero sectors) until
    /// [`Controller::replace_disk`] points it at a file.
    pub path: Option<PathBuf>,
    pub read_only: bool,
}

/// How much of the guest's console a [`Console::File`] keeps; the rest is dropped.
pub const CONSOLE_FILE_LIMIT: u64 = 4 << 20;

/// Where COM1 goes.
#[derive(Debug, Clone)]
pub enum Console {
    /// Guest output to our stdout, our stdin to the guest.
    Stdio,
    /// Guest output to a file (created or truncated, at most [`CONSOLE_FILE_LIMIT`] bytes); no input.
    File(PathBuf),
    /// Discarded; no input.
    Null,
}

/// A byte channel on COM2. Bytes read from `input` go to the guest (flow-controlled, never
/// dropped; EOF just stops feeding); bytes the guest transmits go to `output`.
#[derive(Debug)]
pub struct Channel {
    pub input: OwnedFd,
    pub output: OwnedFd,
}

/// How the VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine (i8042 0xFE, triple fault): `reboot`, or `poweroff` with `reboot=k`.
    Reset,
    /// The guest powered off or halted its last vCPU.
    Shutdown,
    /// [`StopHandle::stop`] was called.
    Stopped,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kvm(#[from] kvm::Error),
    #[error("{what} failed")]
    KvmIoctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory of {0} MiB is too small (minimum {min} MiB)", min = layout::MIN_MEM_MIB)]
    MemoryTooSmall(u32),
    #[error("guest memory of {0} MiB is too large (maximum {max} MiB)", max = layout::MAX_MEM_MIB)]
    MemoryTooLarge(u32),
    #[error("{0} vCPUs is out of range (1 to {max})", max = layout::MAX_VCPUS)]
    Vcpus(u8),
    #[error("{0} disks is too many (maximum {max})", max = layout::MAX_VIRTIO_DEVICES)]
    TooManyDevices(usize),
    #[error("cannot allocate guest memory")]
    Memory(#[source] vm_memory::mmap::FromRangesError),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    #[error(transparent)]
    Disk(#[from] block::Error),
    #[error(transparent)]
    Tap(#[from] crate::devices::tap::Error),
    #[error(transparent)]
    Ports(#[from] vconsole::Error),
    #[error("cannot set up a device")]
    Device(#[source] crate::devices::Error),
    #[error("cannot create virtio queues")]
    Queue(#[source] virtio_queue::Error),
    #[error("cannot open console file {path}")]
    Console {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    #[error("event loop failed")]
    EventLoop(#[source] event_manager::Error),
    #[error("{0}")]
    Guest(String),
    #[error("{0}")]
    Snapshot(String),
}

fn ioctl_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::KvmIoctl { what, source }
}

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
    reason: Mutex<Option<ExitReason>>,
    exit_evt: EventFd,
    pub(crate) pause: Pause,
    /// The running vCPU threads (empty before `run` and once it is stopping them).
    vcpu_threads: Mutex<Vec<libc::pthread_t>>,
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
pub struct StopHandle(Arc<Shared>);

impl StopHandle {
    pub fn stop(&self) {
        self.0.request_exit(ExitReason::Stopped);
    }
}

/// Controls a running VM from another thread: stop it, snapshot it, swap a disk.
#[derive(Clone)]
pub struct Controller(Arc<Control>);

struct Control {
    shared: Arc<Shared>,
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    serials: [Arc<Mutex<SerialDevice>>; 2],
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    layout: Layout,
    cmdline: String,
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

    fn resume(&self) {
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
        let Some(t) = self.0.transports.get(index) else {
            return Err(Error::Snapshot(format!("there is no disk {index}")));
        };
        let read_only = match self.0.layout.devices.get(index) {
            Some(Slot::Block { read_only }) => *read_only,
            _ => return Err(Error::Snapshot(format!("device {index} is not a disk"))),
        };
        let (file, size) = block::open_backing(path, read_only)?;
        if !lock(t).replace_disk(file, size) {
            return Err(Error::Snapshot(format!("device {index} is not a disk")));
        }
        Ok(())
    }
}

/// A created, not yet running VM.
pub struct Vm {
    vm: Arc<VmFd>,
    vcpus: Vec<VcpuFd>,
    mem: GuestMemoryMmap,
    pio: Bus,
    mmio: Bus,
    shared: Arc<Shared>,
    events: events::Handler,
    kind: HostKind,
    cmdline: String,
    control: Controller,
}

/// How long `run` waits for vCPU threads to stop.
const VCPU_STOP_GRACE: Duration = Duration::from_secs(5);

/// Signal used to kick vCPU threads out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN() + 1
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// A snapshot being restored: its state and its memory file.
struct Restore {
    snap: Snapshot,
    memory: File,
}

impl Vm {
    /// Validates the configuration, creates the VM, loads the kernel and sets up every device and
    /// vCPU. Nothing runs yet. On error nothing is left behind (everything is owned and dropped).
    pub fn new(cfg: VmConfig) -> Result<Vm, Error> {
        Self::build(cfg, None)
    }

    /// Creates a VM from the snapshot in `dir` instead of booting: guest memory is the snapshot's
    /// memory file mapped copy-on-write, and vCPUs, interrupt controllers, clock and devices are
    /// put back as they were. `cfg` provides this run's backends (disks, taps, channel, console)
    /// and must have the snapshot's layout; its kernel, initrd and command line are not used.
    /// `tag` must be the one the snapshot was taken with. Any mismatch or damage is one clear
    /// error ([`Error::Snapshot`]).
    pub fn restore(cfg: VmConfig, dir: &Path, tag: &str) -> Result<Vm, Error> {
        let layout = layout_of(&cfg, kvm::host_kind());
        let snap = Snapshot::load(dir, tag, &layout).map_err(Error::Snapshot)?;
        let path = dir.join(snapshot::MEMORY_FILE);
        let memory = File::open(&path)
            .map_err(|e| Error::Snapshot(format!("cannot open {}: {e}", path.display())))?;
        let len = memory.metadata().map(|m| m.len()).unwrap_or(0);
        if len != u64::from(cfg.mem_mib) << 20 {
            return Err(Error::Snapshot(format!(
                "{} is {len} bytes, not {} MiB",
                path.display(),
                cfg.mem_mib
            )));
        }
        Self::build(cfg, Some(Restore { snap, memory }))
    }

    fn build(cfg: VmConfig, restore: Option<Restore>) -> Result<Vm, Error> {
        if cfg.mem_mib < layout::MIN_MEM_MIB {
            return Err(Error::MemoryTooSmall(cfg.mem_mib));
        }
        if cfg.mem_mib > layout::MAX_MEM_MIB {
            return Err(Error::MemoryTooLarge(cfg.mem_mib));
        }
        if cfg.vcpus == 0 || cfg.vcpus > layout::MAX_VCPUS {
            return Err(Error::Vcpus(cfg.vcpus));
        }
        let ndev = cfg.disks.len() + cfg.net.len() + usize::from(!cfg.ports.is_empty());
        if ndev > layout::MAX_VIRTIO_DEVICES as usize {
            return Err(Error::TooManyDevices(ndev));
        }
        let kind = kvm::host_kind();
        let vm_layout = layout_of(&cfg, kind);
        if restore.is_none() {
            boot::check_elf(&cfg.kernel)?;
        }
        let disks = cfg
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let id = format!("rvmm-vd{}", disk_letter(i));
                match &d.path {
                    Some(p) => Block::open(p, d.read_only, &id),
                    // An empty slot: no sectors until `Controller::replace_disk`.
                    None => Block::open(Path::new("/dev/null"), true, &id).map(|mut b| {
                        b.set_read_only(d.read_only);
                        b
                    }),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let nets = cfg
            .net
            .into_iter()
            .map(|n| {
                let tap = match n.tap {
                    TapSource::Name(name) => Tap::open(&name)?,
                    TapSource::Fd(fd) => Tap::from_fd(fd)?,
                };
                Ok(Net::new(tap, n.mac))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let console = if cfg.ports.is_empty() {
            None
        } else {
            Some(VirtioConsole::new(cfg.ports)?)
        };
        if restore.is_none() {
            if let Some(p) = &cfg.initrd {
                std::fs::metadata(p).map_err(|source| boot::Error::Initrd {
                    path: p.clone(),
                    source,
                })?;
            }
        }

        let kvm = kvm::open()?;
        let vm = kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(layout::KVM_TSS_START as usize)
            .map_err(ioctl_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(ioctl_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(ioctl_err("KVM_CREATE_PIT2"))?;

        // Guest RAM, split around the MMIO gap: anonymous for a boot, the snapshot's memory file
        // mapped copy-on-write for a restore.
        let bytes = u64::from(cfg.mem_mib) << 20;
        let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(bytes)
            .into_iter()
            .map(|(a, l)| (GuestAddress(a), l as usize))
            .collect();
        let mem = match &restore {
            None => GuestMemoryMmap::from_ranges(&ranges).map_err(Error::Memory)?,
            Some(r) => file_memory(&ranges, &r.memory)?,
        };
        for (slot, r) in mem.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: r.start_addr().raw_value(),
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which the returned Vm keeps
            // alive for as long as the VM fd exists.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let exit_evt = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        let msr_index = kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            reason: Mutex::new(None),
            exit_evt,
            pause: Pause::default(),
            vcpu_threads: Mutex::new(Vec::new()),
            msr_index,
            xsave: kvm.check_extension(Cap::Xsave),
        });

        let irq = |gsi: u32| -> Result<IrqLine, Error> {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
            vm.register_irqfd(&evt, gsi)
                .map_err(ioctl_err("KVM_IRQFD"))?;
            Ok(IrqLine { gsi, evt })
        };
        let saved = restore.as_ref().map(|r| &r.snap);
        let serial = |i: usize, irq: IrqLine, out, drained| match saved {
            None => Ok(SerialDevice::new(irq, out, drained)),
            Some(s) => SerialDevice::from_state(&(&s.serials[i]).into(), irq, out, drained)
                .map_err(Error::Snapshot),
        };

        // Port I/O: COM1, COM2, i8042.
        let mut pio = Bus::new();
        let mut handler = events::Handler::new(shared.clone()).map_err(Error::EventFd)?;
        let console_out: Box<dyn Write + Send> = match &cfg.console {
            Console::Stdio => Box::new(std::io::stdout()),
            Console::File(p) => Box::new(crate::devices::serial::Capped::new(
                File::create(p).map_err(|source| Error::Console {
                    path: p.clone(),
                    source,
                })?,
                CONSOLE_FILE_LIMIT,
            )),
            Console::Null => Box::new(std::io::sink()),
        };
        let drained1 = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?);
        let com1 = Arc::new(Mutex::new(serial(
            0,
            irq(layout::COM1_IRQ)?,
            console_out,
            drained1.clone(),
        )?));
        pio.insert(
            u64::from(layout::COM1_PORT),
            u64::from(layout::SERIAL_PORT_SIZE),
            com1.clone(),
        )
        .map_err(Error::Device)?;
        if matches!(cfg.console, Console::Stdio) {
            handler.add_input(events::InputSource::Stdin, com1.clone(), drained1);
        }
        let (chan_in, chan_out): (Option<OwnedFd>, Box<dyn Write + Send>) = match cfg.channel {
            Some(c) => (Some(c.input), Box::new(File::from(c.output))),
            None => (None, Box::new(std::io::sink())),
        };
        let drained2 = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?);
        let com2 = Arc::new(Mutex::new(serial(
            1,
            irq(layout::COM2_IRQ)?,
            chan_out,
            drained2.clone(),
        )?));
        pio.insert(
            u64::from(layout::COM2_PORT),
            u64::from(layout::SERIAL_PORT_SIZE),
            com2.clone(),
        )
        .map_err(Error::Device)?;
        if let Some(fd) = chan_in {
            handler.add_input(events::InputSource::Owned(fd), com2.clone(), drained2);
        }
        let s = shared.clone();
        let kbd: SharedDevice = Arc::new(Mutex::new(I8042::new(Box::new(move || {
            s.request_exit(ExitReason::Reset)
        }))));
        pio.insert(u64::from(layout::I8042_DATA_PORT), i8042::WINDOW, kbd)
            .map_err(Error::Device)?;

        // virtio-mmio devices.
        let mut mmio = Bus::new();
        let mut cmdline = cfg.cmdline.trim().to_owned();
        if !cmdline.split_whitespace().any(|w| w.starts_with("reboot=")) {
            cmdline.push_str(" reboot=k");
        }
        if kind == HostKind::Pvm {
            cmdline.push(' ');
            cmdline.push_str(&pvm_cmdline_additions());
        }
        // Each device with the backend fds the event thread polls for it: (fd, is an input).
        let devices = disks
            .into_iter()
            .map(|d| (Box::new(d) as Box<dyn VirtioDevice>, Vec::new()))
            .chain(nets.into_iter().map(|n| {
                let fd = n.tap_fd();
                (Box::new(n) as Box<dyn VirtioDevice>, vec![(fd, true)])
            }))
            .chain(console.into_iter().map(|c| {
                let fds = c.backend_fds();
                (Box::new(c) as Box<dyn VirtioDevice>, fds)
            }));
        let mut transports = Vec::new();
        for (i, (mut dev, backend_fds)) in devices.enumerate() {
            let idx = i as u32;
            let addr = layout::virtio_mmio_addr(idx);
            let gsi = layout::virtio_irq(idx);
            let irq = Arc::new(irq(gsi)?);
            let t = match saved {
                None => MmioTransport::new(dev, mem.clone(), irq).map_err(Error::Queue)?,
                Some(s) => {
                    let ts = s.transports[i].clone();
                    if let Some(d) = ts.device {
                        dev.restore_state(d).map_err(Error::Snapshot)?;
                    }
                    let queues = ts.queues.into_iter().map(Into::into).collect();
                    MmioTransport::restore(dev, mem.clone(), irq, ts.state, queues)
                        .map_err(Error::Snapshot)?
                }
            };
            let nq = t.num_queues();
            let t = Arc::new(Mutex::new(t));
            for q in 0..nq {
                let evt = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
                vm.register_ioevent(
                    &evt,
                    &IoEventAddress::Mmio(addr + QUEUE_NOTIFY_OFFSET),
                    q as u32,
                )
                .map_err(ioctl_err("KVM_IOEVENTFD"))?;
                handler.add_notify(evt, t.clone(), q);
            }
            for (fd, input) in backend_fds {
                if input {
                    handler.add_backend(fd, t.clone());
                } else {
                    handler.add_backend_output(fd, t.clone());
                }
            }
            mmio.insert(addr, layout::VIRTIO_MMIO_SIZE, t.clone())
                .map_err(Error::Device)?;
            transports.push(t);
            cmdline.push_str(&format!(
                " virtio_mmio.device={}K@{:#x}:{}",
                layout::VIRTIO_MMIO_SIZE / 1024,
                addr,
                gsi
            ));
        }

        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        match &restore {
            None => {
                let entry = boot::load(
                    &mem,
                    &cfg.kernel,
                    cfg.initrd.as_deref(),
                    &cmdline,
                    cfg.vcpus,
                )?;
                for id in 0..cfg.vcpus {
                    let fd = vm
                        .create_vcpu(u64::from(id))
                        .map_err(ioctl_err("KVM_CREATE_VCPU"))?;
                    vcpu::configure(&fd, id, cfg.vcpus, &cpuid, entry, &mem, kind)?;
                    vcpus.push(fd);
                }
            }
            Some(r) => {
                cmdline = r.snap.cmdline.clone();
                for (i, chip) in r.snap.irqchips.iter().enumerate() {
                    if chip.0.chip_id as usize != i {
                        return Err(Error::Snapshot(
                            "the saved irqchips are out of order".into(),
                        ));
                    }
                    vm.set_irqchip(&chip.0)
                        .map_err(ioctl_err("KVM_SET_IRQCHIP"))?;
                }
                vm.set_pit2(&r.snap.pit.0)
                    .map_err(ioctl_err("KVM_SET_PIT2"))?;
                for (id, st) in (0..cfg.vcpus).zip(&r.snap.vcpus) {
                    let fd = vm
                        .create_vcpu(u64::from(id))
                        .map_err(ioctl_err("KVM_CREATE_VCPU"))?;
                    vcpu::restore_state(&fd, id, cfg.vcpus, &cpuid, kind, st)?;
                    vcpus.push(fd);
                }
                // The guest's clock goes on from where it was saved (not from the host's
                // realtime clock): no jump, no timer firing early.
                let mut clock = r.snap.clock.0;
                clock.flags = 0;
                vm.set_clock(&clock).map_err(ioctl_err("KVM_SET_CLOCK"))?;
            }
        }
        log::debug!("kernel command line: {cmdline}");
        let vm = Arc::new(vm);
        let control = Controller(Arc::new(Control {
            shared: shared.clone(),
            vm: vm.clone(),
            mem: mem.clone(),
            serials: [com1, com2],
            transports,
            layout: vm_layout,
            cmdline: cmdline.clone(),
        }));
        Ok(Vm {
            vm,
            vcpus,
            mem,
            pio,
            mmio,
            shared,
            events: handler,
            kind,
            cmdline,
            control,
        })
    }

    /// A handle to stop, snapshot or re-point a disk of this VM once it runs.
    pub fn controller(&self) -> Controller {
        self.control.clone()
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.shared.clone())
    }

    /// The host kind detected.
    pub fn host_kind(&self) -> HostKind {
        self.kind
    }

    /// The final kernel command line (with the VMM's additions).
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// The guest memory (e.g. to find its mapping when measuring the VMM's overhead).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Runs the VM until the guest resets or powers off, a vCPU fails, or a stop handle fires.
    pub fn run(self) -> Result<VmExit, Error> {
        static KICK: Once = Once::new();
        KICK.call_once(|| {
            if let Err(e) = register_signal_handler(kick_signal(), noop_handler) {
                log::warn!("cannot install the vCPU kick handler: {e}");
            }
        });
        let Vm {
            vm,
            vcpus,
            mem,
            pio,
            mmio,
            shared,
            events,
            control,
            ..
        } = self;
        let mut threads = Vec::new();
        for (id, fd) in vcpus.into_iter().enumerate() {
            let (pio, mmio, sh) = (pio.clone(), mmio.clone(), shared.clone());
            let t = std::thread::Builder::new()
                .name(format!("rvmm-vcpu{id}"))
                .spawn(move || {
                    let _ = vmm_sys_util::signal::unblock_signal(kick_signal());
                    vcpu::run_loop(fd, id as u8, &pio, &mmio, &sh);
                });
            match t {
                Ok(t) => {
                    use std::os::unix::thread::JoinHandleExt;
                    lock(&shared.vcpu_threads).push(t.as_pthread_t());
                    threads.push(t)
                }
                Err(e) => {
                    shared
                        .request_exit(ExitReason::Error(format!("cannot start vCPU thread: {e}")));
                    break;
                }
            }
        }
        let loop_result = events::run(events, &shared);
        if loop_result.is_err() {
            shared.request_exit(ExitReason::Error("event loop failed".into()));
        }
        // No snapshot may kick a thread that is being joined.
        lock(&shared.vcpu_threads).clear();
        control.resume();
        // Kick every vCPU out of KVM_RUN until all threads are done. A vCPU blocked in a device
        // (e.g. writing to a console pipe nobody reads) is left behind after a grace period rather
        // than hanging the caller.
        let t0 = std::time::Instant::now();
        while threads.iter().any(|t| !t.is_finished()) && t0.elapsed() < VCPU_STOP_GRACE {
            for t in threads.iter().filter(|t| !t.is_finished()) {
                let _ = t.kill(kick_signal());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in threads {
            if t.is_finished() {
                let _ = t.join();
            } else {
                log::warn!("a vCPU thread did not stop within {VCPU_STOP_GRACE:?}; leaving it");
            }
        }
        drop(mem);
        drop(control);
        drop(vm);
        loop_result.map_err(Error::EventLoop)?;
        let reason = lock(&shared.reason).clone();
        match reason {
            Some(ExitReason::Reset) => Ok(VmExit::Reset),
            Some(ExitReason::Shutdown) => Ok(VmExit::Shutdown),
            Some(ExitReason::Stopped) | None => Ok(VmExit::Stopped),
            Some(ExitReason::Error(e)) => Err(Error::Guest(e)),
        }
    }
}

/// The layout a snapshot of a VM built from `cfg` records.
fn layout_of(cfg: &VmConfig, kind: HostKind) -> Layout {
    Layout {
        vcpus: cfg.vcpus,
        mem_mib: cfg.mem_mib,
        devices: cfg
            .disks
            .iter()
            .map(|d| Slot::Block {
                read_only: d.read_only,
            })
            .chain(cfg.net.iter().map(|_| Slot::Net))
            .chain((!cfg.ports.is_empty()).then_some(Slot::Console {
                ports: cfg.ports.len() as u32,
            }))
            .collect(),
        channel: cfg.channel.is_some(),
        host: kind.name().into(),
    }
}

/// Guest memory backed by `file` (regions back to back), private and copy-on-write.
fn file_memory(ranges: &[(GuestAddress, usize)], file: &File) -> Result<GuestMemoryMmap, Error> {
    let mut regions = Vec::new();
    let mut off = 0u64;
    for &(addr, len) in ranges {
        let fd = file
            .try_clone()
            .map_err(|e| Error::Snapshot(format!("memory file: {e}")))?;
        let region = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(fd, off))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE)
            .build()
            .map_err(|e| Error::Snapshot(format!("cannot map the memory file: {e}")))?;
        regions.push(
            GuestRegionMmap::new(region, addr)
                .ok_or_else(|| Error::Snapshot("memory region out of range".into()))?,
        );
        off += len as u64;
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| Error::Snapshot(format!("guest memory from the snapshot: {e}")))
}

fn disk_letter(i: usize) -> char {
    (b'a' + (i % 26) as u8) as char
}

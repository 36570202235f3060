//! The VMM: KVM setup, guest memory, vCPUs, boot, and the event loop. See docs/ARCHITECTURE.md for the
//! numbered boot sequence and the threads.

pub mod boot;
pub mod cpu;
pub mod layout;
pub mod mptable;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::serial::{self, RxEvents, SerialDevice};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::MmioTransport;
use crate::devices::{I8042Action, IrqLine, I8042};
use layout::*;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm (is KVM available, and may this user use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmApi(i32),
    #[error("KVM lacks a capability rvmm needs: {0}")]
    KvmCap(&'static str),
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("memory {0} MiB is out of range ({MIN_MEMORY_MIB}..={MAX_MEMORY_MIB} MiB)")]
    MemorySize(u32),
    #[error("vCPU count {0} is out of range (1..=32)")]
    VcpuCount(u8),
    #[error("cannot open kernel {path}")]
    Kernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a loadable vmlinux (an uncompressed x86-64 ELF kernel): {why}")]
    KernelFormat { path: PathBuf, why: String },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("cannot read initrd {path}")]
    Initrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd of {0} bytes does not fit in guest memory")]
    InitrdTooBig(u64),
    #[error(transparent)]
    Disk(#[from] crate::devices::virtio::block::Error),
    #[error("too many devices (at most {VIRTIO_MAX_DEVICES})")]
    TooManyDevices,
    #[error("cannot open console file {path}")]
    Console {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vCPU setup: {0}")]
    Setup(&'static str),
    #[error("event loop")]
    EventLoop(#[source] std::io::Error),
    #[error("vCPU {0} stopped the VM: {1}")]
    VcpuExit(u8, String),
}

/// Which KVM this host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// VMX/SVM in hardware.
    Hardware,
    /// kvm_pvm: KVM in software with shadow paging; guests need the command-line additions.
    Pvm,
}

impl HostKind {
    pub fn detect() -> HostKind {
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            HostKind::Pvm
        } else {
            HostKind::Hardware
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            HostKind::Hardware => "hardware KVM",
            HostKind::Pvm => "kvm_pvm (software KVM)",
        }
    }
}

pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

/// Where the first serial port (ttyS0, the guest console) goes.
pub enum Console {
    /// Our stdout, and our stdin feeds the guest.
    Stdio,
    File(PathBuf),
    Null,
}

/// The second serial port (ttyS1): bytes read from `input` go to the guest, what the guest sends goes
/// to `output`.
pub struct Channel {
    pub input: OwnedFd,
    pub output: OwnedFd,
}

pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The command line; the VMM appends its devices and, on kvm_pvm, the additions it needs.
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub disks: Vec<DiskConfig>,
    pub console: Console,
    pub channel: Option<Channel>,
}

/// How the VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset (i8042 0xFE, triple fault, or a KVM reset event): a `reboot`.
    Reset,
    /// The guest powered off or halted for good.
    Shutdown,
    /// Stopped from the host (StopHandle, a signal).
    Stopped,
}

const EXIT_NONE: u8 = 0;
const EXIT_RESET: u8 = 1;
const EXIT_SHUTDOWN: u8 = 2;
const EXIT_STOPPED: u8 = 3;
const EXIT_ERROR: u8 = 4;

/// Shared between threads: how the VM is ending, and the fd that wakes the main thread.
struct ExitState {
    reason: AtomicU8,
    error: Mutex<Option<Error>>,
    evt: EventFd,
}

impl ExitState {
    fn end(&self, reason: u8) {
        // The first reason wins.
        let _ = self
            .reason
            .compare_exchange(EXIT_NONE, reason, Ordering::SeqCst, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }
}

/// Ends the VM from any thread (or, through `raw_fd`, from a signal handler: write 8 bytes to it).
#[derive(Clone)]
pub struct StopHandle(Arc<ExitState>);

impl StopHandle {
    pub fn stop(&self) {
        self.0.end(EXIT_STOPPED);
    }

    /// An eventfd whose write stops the VM; async-signal-safe to write from a handler.
    pub fn raw_fd(&self) -> i32 {
        self.0.evt.as_raw_fd()
    }
}

/// The devices the vCPUs and the event loop share.
struct Devices {
    com1: SerialDevice,
    com2: SerialDevice,
    i8042: I8042,
    virtio: Vec<MmioTransport>,
}

pub struct Vm {
    kvm: Kvm,
    vm: VmFd,
    vcpus: Vec<VcpuFd>,
    devices: Arc<Mutex<Devices>>,
    exit: Arc<ExitState>,
    inputs: Vec<(File, Arc<RxEvents>, bool)>,
    _mem: GuestMemoryMmap,
}

impl Vm {
    pub fn new(cfg: VmConfig) -> Result<Vm, Error> {
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&cfg.mem_mib) {
            return Err(Error::MemorySize(cfg.mem_mib));
        }
        if !(1..=32).contains(&cfg.vcpus) {
            return Err(Error::VcpuCount(cfg.vcpus));
        }
        if cfg.disks.len() > VIRTIO_MAX_DEVICES {
            return Err(Error::TooManyDevices);
        }
        // Check the kernel before touching KVM, so that a typo gets the clearest error.
        std::fs::metadata(&cfg.kernel).map_err(|source| Error::Kernel {
            path: cfg.kernel.clone(),
            source,
        })?;

        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(Error::KvmApi(api));
        }
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::KvmCap(name));
            }
        }
        let host = HostKind::detect();
        let vm = kvm
            .create_vm()
            .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
        vm.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(|e| Error::Kvm("KVM_SET_TSS_ADDR", e))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(|e| Error::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        vm.create_irq_chip()
            .map_err(|e| Error::Kvm("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(|e| Error::Kvm("KVM_CREATE_PIT2", e))?;

        let mem = boot::create_memory(cfg.mem_mib)?;
        for (slot, r) in mem.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: r.start_addr().raw_value(),
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the Vm keeps for as long as the
            // VM exists; KVM only accesses it while the VM fd is open.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        }

        // Devices.
        let irq = |gsi: u32| -> Result<IrqLine, Error> {
            let line = IrqLine::new().map_err(Error::EventLoop)?;
            vm.register_irqfd(&line.0, gsi)
                .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
            Ok(line)
        };
        let mut inputs = Vec::new();
        let com1_out: Box<dyn Write + Send> = match &cfg.console {
            Console::Stdio => Box::new(std::io::stdout()),
            Console::File(p) => Box::new(File::create(p).map_err(|source| Error::Console {
                path: p.clone(),
                source,
            })?),
            Console::Null => Box::new(std::io::sink()),
        };
        let com1_events = RxEvents::new().map_err(Error::EventLoop)?;
        if matches!(cfg.console, Console::Stdio) {
            let stdin = std::io::stdin().as_raw_fd();
            // SAFETY: dup of our own stdin; the new fd is owned by the File.
            let fd = unsafe { libc::dup(stdin) };
            if fd >= 0 {
                // SAFETY: `fd` was just returned by dup and is owned by nobody else.
                let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                inputs.push((f, com1_events.clone(), true));
            }
        }
        let com1 = serial::new_serial(irq(IRQ_COM1)?, com1_events, com1_out);
        let com2_events = RxEvents::new().map_err(Error::EventLoop)?;
        let com2_out: Box<dyn Write + Send> = match &cfg.channel {
            Some(ch) => Box::new(File::from(ch.output.try_clone().map_err(Error::EventLoop)?)),
            None => Box::new(std::io::sink()),
        };
        if let Some(ch) = &cfg.channel {
            let f = File::from(ch.input.try_clone().map_err(Error::EventLoop)?);
            inputs.push((f, com2_events.clone(), false));
        }
        let com2 = serial::new_serial(irq(IRQ_COM2)?, com2_events, com2_out);

        let mut cmdline = cfg.cmdline.trim().to_string();
        let mut virtio = Vec::new();
        for (i, d) in cfg.disks.iter().enumerate() {
            let dev = Block::open(&d.path, d.read_only)?;
            virtio.push(MmioTransport::new(
                Box::new(dev),
                mem.clone(),
                irq(VIRTIO_IRQS[i])?,
            ));
            cmdline.push_str(&format!(
                " virtio_mmio.device=4K@{:#x}:{}",
                virtio_mmio_addr(i),
                VIRTIO_IRQS[i]
            ));
        }
        if host == HostKind::Pvm {
            cmdline.push(' ');
            cmdline.push_str(crate::kernel::pvm_cmdline_additions());
        }
        log::info!("guest command line: {cmdline}");

        let loaded = boot::load_kernel(
            &mem,
            &cfg.kernel,
            &cmdline,
            cfg.initrd.as_deref(),
            use_pvh(),
        )?;
        boot::write_boot_tables(&mem, matches!(loaded.entry, boot::Entry::Pvh(_)))?;
        log::info!("boot entry: {:?}", loaded.entry);
        mptable::write(&mem, cfg.vcpus)?;
        let mut vcpus = Vec::new();
        for id in 0..cfg.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
            cpu::setup(&kvm, &vcpu, id, cfg.vcpus, loaded.entry, host)?;
            vcpus.push(vcpu);
        }
        let exit = Arc::new(ExitState {
            reason: AtomicU8::new(EXIT_NONE),
            error: Mutex::new(None),
            evt: EventFd::new(0).map_err(Error::EventLoop)?,
        });
        Ok(Vm {
            kvm,
            vm,
            vcpus,
            devices: Arc::new(Mutex::new(Devices {
                com1,
                com2,
                i8042: I8042::default(),
                virtio,
            })),
            exit,
            inputs,
            _mem: mem,
        })
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.exit.clone())
    }

    /// Runs the VM until it ends. One thread per vCPU, one event-loop thread for the consoles.
    pub fn run(mut self) -> Result<VmExit, Error> {
        install_kick_handler();
        let stop_loop = Arc::new(AtomicBool::new(false));
        let loop_thread = {
            let inputs = std::mem::take(&mut self.inputs);
            let devices = self.devices.clone();
            let stop = stop_loop.clone();
            std::thread::Builder::new()
                .name("rvmm-events".into())
                .spawn(move || event_loop(inputs, devices, stop))
                .map_err(Error::EventLoop)?
        };
        let running = Arc::new(AtomicBool::new(true));
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for (id, vcpu) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let devices = self.devices.clone();
            let exit = self.exit.clone();
            let running = running.clone();
            let t = std::thread::Builder::new()
                .name(format!("rvmm-vcpu{id}"))
                .spawn(move || vcpu_loop(id as u8, vcpu, devices, exit, running))
                .map_err(Error::EventLoop)?;
            threads.push(t);
        }
        // Wait for an ending.
        let _ = self.exit.evt.read();
        running.store(false, Ordering::SeqCst);
        if self.exit.reason.load(Ordering::SeqCst) == EXIT_NONE {
            self.exit.end(EXIT_STOPPED);
        }
        // Kick vCPUs out of KVM_RUN until they have all returned.
        for t in threads {
            use std::os::unix::thread::JoinHandleExt;
            while !t.is_finished() {
                // SAFETY: pthread_kill on a thread we spawned and have not joined; the handler is a no-op.
                unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            let _ = t.join();
        }
        stop_loop.store(true, Ordering::SeqCst);
        let _ = loop_thread.join();
        if let Ok(mut d) = self.devices.lock() {
            let _ = d.com1.writer_mut().flush();
            let _ = d.com2.writer_mut().flush();
        }
        let _ = (&self.kvm, &self.vm);
        match self.exit.reason.load(Ordering::SeqCst) {
            EXIT_RESET => Ok(VmExit::Reset),
            EXIT_SHUTDOWN => Ok(VmExit::Shutdown),
            EXIT_ERROR => Err(self
                .exit
                .error
                .lock()
                .ok()
                .and_then(|mut e| e.take())
                .unwrap_or(Error::Setup("vCPU failed"))),
            _ => Ok(VmExit::Stopped),
        }
    }
}

/// PVH when the kernel has the entry, unless `RVMM_BOOT_PROTOCOL=linux64` asks for the 64-bit protocol.
fn use_pvh() -> bool {
    std::env::var("RVMM_BOOT_PROTOCOL").map_or(true, |v| v != "linux64")
}

fn kick_signal() -> i32 {
    libc::SIGRTMIN() + 1
}

fn install_kick_handler() {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    let _ = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop);
}

fn vcpu_loop(
    id: u8,
    mut vcpu: VcpuFd,
    devices: Arc<Mutex<Devices>>,
    exit: Arc<ExitState>,
    running: Arc<AtomicBool>,
) {
    let fail = |why: String| {
        if let Ok(mut e) = exit.error.lock() {
            e.get_or_insert(Error::VcpuExit(id, why));
        }
        exit.end(EXIT_ERROR);
    };
    while running.load(Ordering::SeqCst) {
        let r = vcpu.run();
        let Ok(mut d) = devices.lock() else {
            fail("device lock poisoned".into());
            return;
        };
        match r {
            Ok(VcpuExit::IoOut(port, data)) => {
                let v = data.first().copied().unwrap_or(0);
                match port {
                    p if (PORT_COM1..PORT_COM1 + 8).contains(&p) => {
                        let _ = d.com1.write((p - PORT_COM1) as u8, v);
                    }
                    p if (PORT_COM2..PORT_COM2 + 8).contains(&p) => {
                        let _ = d.com2.write((p - PORT_COM2) as u8, v);
                    }
                    PORT_I8042_DATA | PORT_I8042_CMD
                        if d.i8042.write(port - PORT_I8042_DATA, v) == I8042Action::Reset =>
                    {
                        exit.end(EXIT_RESET);
                        return;
                    }
                    _ => {}
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                let v = match port {
                    p if (PORT_COM1..PORT_COM1 + 8).contains(&p) => {
                        d.com1.read((p - PORT_COM1) as u8)
                    }
                    p if (PORT_COM2..PORT_COM2 + 8).contains(&p) => {
                        d.com2.read((p - PORT_COM2) as u8)
                    }
                    PORT_I8042_DATA | PORT_I8042_CMD => d.i8042.read(port - PORT_I8042_DATA),
                    _ => 0xff,
                };
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = v;
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => match virtio_slot(addr) {
                Some((i, off)) if i < d.virtio.len() => d.virtio[i].read(off, data),
                _ => data.fill(0),
            },
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if let Some((i, off)) = virtio_slot(addr) {
                    if let Some(t) = d.virtio.get_mut(i) {
                        t.write(off, data);
                    }
                }
            }
            Ok(VcpuExit::Hlt) => {
                exit.end(EXIT_SHUTDOWN);
                return;
            }
            Ok(VcpuExit::Shutdown) => {
                // A triple fault: what a reboot without reboot=k looks like.
                exit.end(EXIT_RESET);
                return;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                exit.end(if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                    EXIT_RESET
                } else {
                    EXIT_SHUTDOWN
                });
                return;
            }
            Ok(VcpuExit::InternalError) => {
                fail(
                    "KVM internal error (emulation failure: an instruction KVM cannot emulate)"
                        .into(),
                );
                return;
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                fail(format!("KVM entry failure (reason {reason:#x}, cpu {cpu})"));
                return;
            }
            Ok(VcpuExit::Intr) => {}
            Ok(other) => {
                log::debug!("vcpu{id}: unhandled exit {other:?}");
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                fail(format!("KVM_RUN failed: {e}"));
                return;
            }
        }
    }
}

fn virtio_slot(addr: u64) -> Option<(usize, u64)> {
    let end = virtio_mmio_addr(VIRTIO_MAX_DEVICES);
    if (VIRTIO_MMIO_BASE..end).contains(&addr) {
        let rel = addr - VIRTIO_MMIO_BASE;
        Some(((rel / VIRTIO_MMIO_SIZE) as usize, rel % VIRTIO_MMIO_SIZE))
    } else {
        None
    }
}

/// One input source feeding a serial port, with flow control.
struct InputFeeder {
    file: File,
    events: Arc<RxEvents>,
    com1: bool,
    devices: Arc<Mutex<Devices>>,
    pending: Vec<u8>,
    eof: bool,
}

impl InputFeeder {
    fn serial<'a>(&self, d: &'a mut Devices) -> &'a mut SerialDevice {
        if self.com1 {
            &mut d.com1
        } else {
            &mut d.com2
        }
    }

    /// Pushes pending bytes into the FIFO; returns true when everything pending went in.
    fn flush_pending(&mut self) -> bool {
        let Ok(mut d) = self.devices.lock() else {
            return false;
        };
        let mut pending = std::mem::take(&mut self.pending);
        let n = serial::feed(self.serial(&mut d), &pending);
        pending.drain(..n);
        self.pending = pending;
        if !self.pending.is_empty() {
            self.events.set_waiting();
        }
        self.pending.is_empty()
    }
}

impl MutEventSubscriber for InputFeeder {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.events.drained.as_raw_fd() {
            let _ = self.events.drained.read();
            if self.flush_pending() && !self.eof {
                let _ = ops.add(Events::new(&self.file, EventSet::IN));
            }
            return;
        }
        let mut buf = [0u8; 64];
        match self.file.read(&mut buf) {
            Ok(0) | Err(_) => {
                self.eof = true;
                let _ = ops.remove(Events::new(&self.file, EventSet::IN));
            }
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                if !self.flush_pending() {
                    // FIFO full: stop reading until the guest drains it.
                    let _ = ops.remove(Events::new(&self.file, EventSet::IN));
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.file, EventSet::IN));
        let _ = ops.add(Events::new(&self.events.drained, EventSet::IN));
    }
}

fn event_loop(
    inputs: Vec<(File, Arc<RxEvents>, bool)>,
    devices: Arc<Mutex<Devices>>,
    stop: Arc<AtomicBool>,
) {
    let Ok(mut em) = EventManager::<Box<dyn MutEventSubscriber + Send>>::new() else {
        return;
    };
    for (file, events, com1) in inputs {
        em.add_subscriber(Box::new(InputFeeder {
            file,
            events,
            com1,
            devices: devices.clone(),
            pending: Vec::new(),
            eof: false,
        }));
    }
    while !stop.load(Ordering::SeqCst) {
        if em.run_with_timeout(50).is_err() {
            break;
        }
    }
}

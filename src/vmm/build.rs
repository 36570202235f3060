//! Building a VM, step by step (docs/ARCHITECTURE.md numbers them): validate the configuration,
//! open the device backends, create the VM, guest memory, the port-I/O devices (serial ports,
//! i8042), the virtio-mmio devices, and the vCPUs, booted or restored from a snapshot.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::{layout_of, Channel, Console, FsConfig, VmConfig, CONSOLE_FILE_LIMIT};
use super::control::{Control, Controller, ExitReason, Pause, Shared};
use super::snapshot::{self, Snapshot};
use super::{boot, events, ioctl_err, kvm, layout, pvm_cmdline_additions, vcpu, Error, Vm};
use super::{DiskConfig, HostKind, NetConfig, PortBackend, TapSource};
use crate::devices::i8042::{self, I8042};
use crate::devices::serial::SerialDevice;
use crate::devices::tap::Tap;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::console::Console as VirtioConsole;
use crate::devices::virtio::fs::{Fs, Server};
use crate::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::VirtioDevice;
use crate::devices::{Bus, IrqLine, SharedDevice};

/// A snapshot being restored: its state and its memory file.
pub(crate) struct Restore {
    snap: Snapshot,
    memory: File,
}

impl Vm {
    /// Validates the configuration, creates the VM, loads the kernel and sets up every device and
    /// vCPU. Nothing runs yet. On error nothing is left behind (everything is owned and dropped).
    pub fn new(cfg: VmConfig) -> Result<Vm, Error> {
        build(cfg, None)
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
        build(cfg, Some(Restore { snap, memory }))
    }
}

/// Steps 1 to 10 of the boot sequence; a restore replaces loading the kernel and configuring the
/// vCPUs with putting back the saved state.
fn build(cfg: VmConfig, restore: Option<Restore>) -> Result<Vm, Error> {
    validate(&cfg, restore.is_none())?;
    let kind = kvm::host_kind();
    let vm_layout = layout_of(&cfg, kind);
    let VmConfig {
        kernel,
        initrd,
        cmdline: base_cmdline,
        vcpus: nvcpus,
        mem_mib,
        disks,
        console,
        channel,
        net,
        ports,
        fs,
    } = cfg;
    // A virtio-fs device that serves something gets a thread of its own; one without shares
    // answers EIO from the event thread.
    let fs_thread = fs.as_ref().is_some_and(|f| f.root.is_some());
    let devices = open_backends(&disks, net, ports, fs)?;

    let kvm = kvm::open()?;
    let vm = create_vm(&kvm)?;
    let mem = guest_memory(&vm, mem_mib, restore.as_ref())?;
    let shared = Arc::new(Shared {
        stopping: AtomicBool::new(false),
        reason: Mutex::new(None),
        exit_evt: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
        pause: Pause::default(),
        vcpu_threads: Mutex::new(Vec::new()),
        msr_index: kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default(),
        xsave: kvm.check_extension(Cap::Xsave),
    });
    let saved = restore.as_ref().map(|r| &r.snap);
    let mut b = Builder {
        vm: &vm,
        mem: &mem,
        saved,
        pio: Bus::new(),
        mmio: Bus::new(),
        handler: events::Handler::new(shared.clone()).map_err(Error::EventFd)?,
        fs_handler: events::Handler::new(shared.clone()).map_err(Error::EventFd)?,
        fs_thread,
        cmdline: command_line(&base_cmdline, kind),
    };
    let serials = b.serial_ports(&console, channel)?;
    b.i8042(&shared)?;
    let transports = b.virtio_devices(devices)?;

    let vcpus = match &restore {
        None => {
            let entry = boot::load(&mem, &kernel, initrd.as_deref(), &b.cmdline, nvcpus)?;
            create_vcpus(&kvm, &vm, nvcpus, |fd, id, cpuid| {
                vcpu::configure(fd, id, nvcpus, cpuid, entry, &mem, kind).map_err(Error::from)
            })?
        }
        Some(r) => {
            b.cmdline = r.snap.cmdline.clone();
            restore_vcpus(&kvm, &vm, nvcpus, kind, &r.snap)?
        }
    };
    let Builder {
        pio,
        mmio,
        handler,
        fs_handler,
        cmdline,
        ..
    } = b;
    log::debug!("kernel command line: {cmdline}");
    let vm = Arc::new(vm);
    let control = Controller(Arc::new(Control {
        shared: shared.clone(),
        vm: vm.clone(),
        mem: mem.clone(),
        serials,
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
        fs_events: fs_handler,
        kind,
        cmdline,
        control,
        filters: Default::default(),
    })
}

/// Step 1: machine size and device count in range, the kernel an ELF file, the initrd there.
pub(crate) fn validate(cfg: &VmConfig, booting: bool) -> Result<(), Error> {
    if cfg.mem_mib < layout::MIN_MEM_MIB {
        return Err(Error::MemoryTooSmall(cfg.mem_mib));
    }
    if cfg.mem_mib > layout::MAX_MEM_MIB {
        return Err(Error::MemoryTooLarge(cfg.mem_mib));
    }
    if cfg.vcpus == 0 || cfg.vcpus > layout::MAX_VCPUS {
        return Err(Error::Vcpus(cfg.vcpus));
    }
    let ndev = cfg.disks.len()
        + cfg.net.len()
        + usize::from(!cfg.ports.is_empty())
        + usize::from(cfg.fs.is_some());
    if ndev > layout::MAX_VIRTIO_DEVICES as usize {
        return Err(Error::TooManyDevices(ndev));
    }
    if booting {
        boot::check_elf(&cfg.kernel)?;
        if let Some(p) = &cfg.initrd {
            std::fs::metadata(p).map_err(|source| boot::Error::Initrd {
                path: p.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

/// A virtio device and the backend fds the event thread polls for it: (fd, is an input).
type DeviceWithBackend = (Box<dyn VirtioDevice>, Vec<(std::os::fd::RawFd, bool)>);

/// An empty file of no path.
fn empty_file() -> Result<File, Error> {
    // SAFETY: memfd_create with a valid C string; the fd is ours.
    let fd = unsafe { libc::memfd_create(c"rvmm-empty-slot".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::EventFd(std::io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor nobody else owns.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Step 1 (cont.): every disk image, tap and channel port opens (read-only disks read-only), in
/// MMIO order: disks, network devices, the console, the shared directories.
fn open_backends(
    disks: &[DiskConfig],
    net: Vec<NetConfig>,
    ports: Vec<PortBackend>,
    fs: Option<FsConfig>,
) -> Result<Vec<DeviceWithBackend>, Error> {
    let mut devices: Vec<DeviceWithBackend> = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let id = format!("rvmm-vd{}", disk_letter(i));
        let block = match &d.path {
            Some(p) => Block::open(p, d.read_only, &id)?,
            // An empty slot: no sectors until `Controller::replace_disk`.
            // (An empty memfd: a jailed VMM has no /dev/null.)
            None => Block::from_file(empty_file()?, 0, d.read_only, &id),
        };
        devices.push((Box::new(block), Vec::new()));
    }
    for n in net {
        let tap = match n.tap {
            TapSource::Name(name) => Tap::open(&name)?,
            TapSource::Fd(fd) => Tap::from_fd(fd)?,
        };
        let dev = Net::new(tap, n.mac);
        let fd = dev.tap_fd();
        devices.push((Box::new(dev), vec![(fd, true)]));
    }
    if !ports.is_empty() {
        let console = VirtioConsole::new(ports)?;
        let fds = console.backend_fds();
        devices.push((Box::new(console), fds));
    }
    if let Some(f) = fs {
        let server = match (f.root, f.proc_self_fd) {
            (None, _) => None,
            (Some(root), None) => Some(Server::new(&root, false, fs_limits())),
            (Some(root), Some(proc)) => Some(
                open_dir(&root)
                    .and_then(|r| Ok(Server::with_fds(r, proc.try_clone()?, false, fs_limits()))),
            ),
        }
        .transpose()
        .map_err(Error::Shares)?;
        devices.push((Box::new(Fs::new(server)), Vec::new()));
    }
    Ok(devices)
}

/// `path`, a directory, as an O_PATH descriptor.
fn open_dir(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(path)
        .map(Into::into)
}

/// What a guest can make a virtio-fs server hold: node descriptors within the VMM's open-file
/// limit (less what the VMM itself needs), open handles.
fn fs_limits() -> crate::devices::virtio::fs::Limits {
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    let room = nofile.saturating_sub(512) as usize;
    crate::devices::virtio::fs::Limits {
        inodes: room * 7 / 8,
        handles: (room / 8).max(16),
    }
}

/// Step 4: the VM with its TSS, in-kernel irqchip and PIT.
fn create_vm(kvm: &Kvm) -> Result<VmFd, Error> {
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
    Ok(vm)
}

/// Step 5: guest RAM, split around the MMIO gap: anonymous for a boot, the snapshot's memory file
/// mapped copy-on-write for a restore; each region a KVM memory slot.
fn guest_memory(
    vm: &VmFd,
    mem_mib: u32,
    restore: Option<&Restore>,
) -> Result<GuestMemoryMmap, Error> {
    let bytes = u64::from(mem_mib) << 20;
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(bytes)
        .into_iter()
        .map(|(a, l)| (GuestAddress(a), l as usize))
        .collect();
    let mem = match restore {
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
        // SAFETY: the region is a live mmap owned by `mem`, which the returned Vm keeps alive for
        // as long as the VM fd exists.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(mem)
}

/// Step 7: the caller's command line, `reboot=k` unless it chose, and the kvm_pvm additions.
fn command_line(base: &str, kind: HostKind) -> String {
    let mut cmdline = base.trim().to_owned();
    if !cmdline.split_whitespace().any(|w| w.starts_with("reboot=")) {
        cmdline.push_str(" reboot=k");
    }
    if kind == HostKind::Pvm {
        cmdline.push(' ');
        cmdline.push_str(&pvm_cmdline_additions());
    }
    cmdline
}

/// The devices of a VM being built, and the buses and event handler they are wired to.
struct Builder<'a> {
    vm: &'a VmFd,
    mem: &'a GuestMemoryMmap,
    saved: Option<&'a Snapshot>,
    pio: Bus,
    mmio: Bus,
    handler: events::Handler,
    /// The virtio-fs device's queue notifications: served on a thread of their own when it
    /// serves shared directories (`fs_thread`).
    fs_handler: events::Handler,
    fs_thread: bool,
    cmdline: String,
}

impl Builder<'_> {
    /// An interrupt line: an irqfd on an IOAPIC pin.
    fn irq(&self, gsi: u32) -> Result<IrqLine, Error> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        self.vm
            .register_irqfd(&evt, gsi)
            .map_err(ioctl_err("KVM_IRQFD"))?;
        Ok(IrqLine { gsi, evt })
    }

    /// A 16550 at `port`: new, or as the snapshot saved serial `index`.
    fn serial(
        &mut self,
        index: usize,
        port: u16,
        gsi: u32,
        out: Box<dyn Write + Send>,
    ) -> Result<(Arc<Mutex<SerialDevice>>, Arc<EventFd>), Error> {
        let drained = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?);
        let irq = self.irq(gsi)?;
        let dev = match self.saved {
            None => SerialDevice::new(irq, out, drained.clone()),
            Some(s) => {
                SerialDevice::from_state(&(&s.serials[index]).into(), irq, out, drained.clone())
                    .map_err(Error::Snapshot)?
            }
        };
        let dev = Arc::new(Mutex::new(dev));
        self.pio
            .insert(
                u64::from(port),
                u64::from(layout::SERIAL_PORT_SIZE),
                dev.clone(),
            )
            .map_err(Error::Device)?;
        Ok((dev, drained))
    }

    /// Step 6: COM1 (the console) and COM2 (the channel), with their inputs polled by the event
    /// thread.
    fn serial_ports(
        &mut self,
        console: &Console,
        channel: Option<Channel>,
    ) -> Result<[Arc<Mutex<SerialDevice>>; 2], Error> {
        let console_out: Box<dyn Write + Send> = match console {
            Console::Stdio => Box::new(std::io::stdout()),
            Console::File(p) => Box::new(crate::devices::serial::Capped::new(
                File::create(p).map_err(|source| Error::Console {
                    path: p.clone(),
                    source,
                })?,
                CONSOLE_FILE_LIMIT,
            )),
            Console::Fd(f) => Box::new(crate::devices::serial::Capped::new(
                f.try_clone().map_err(|source| Error::Console {
                    path: "(passed in)".into(),
                    source,
                })?,
                CONSOLE_FILE_LIMIT,
            )),
            Console::Null => Box::new(std::io::sink()),
        };
        let (com1, drained1) = self.serial(0, layout::COM1_PORT, layout::COM1_IRQ, console_out)?;
        if matches!(console, Console::Stdio) {
            self.handler
                .add_input(events::InputSource::Stdin, com1.clone(), drained1);
        }
        let (chan_in, chan_out): (Option<std::os::fd::OwnedFd>, Box<dyn Write + Send>) =
            match channel {
                Some(c) => (Some(c.input), Box::new(File::from(c.output))),
                None => (None, Box::new(std::io::sink())),
            };
        let (com2, drained2) = self.serial(1, layout::COM2_PORT, layout::COM2_IRQ, chan_out)?;
        if let Some(fd) = chan_in {
            self.handler
                .add_input(events::InputSource::Owned(fd), com2.clone(), drained2);
        }
        Ok([com1, com2])
    }

    /// Step 6 (cont.): the i8042, whose reset line ends the VM.
    fn i8042(&mut self, shared: &Arc<Shared>) -> Result<(), Error> {
        let s = shared.clone();
        let kbd: SharedDevice = Arc::new(Mutex::new(I8042::new(Box::new(move || {
            s.request_exit(ExitReason::Reset)
        }))));
        self.pio
            .insert(u64::from(layout::I8042_DATA_PORT), i8042::WINDOW, kbd)
            .map_err(Error::Device)
    }

    /// Step 6 (cont.): one virtio-mmio window per device, its IRQ an irqfd, each queue's
    /// QueueNotify an ioeventfd for the event thread, the backend fd polled, and one
    /// `virtio_mmio.device=` on the command line.
    fn virtio_devices(
        &mut self,
        devices: Vec<DeviceWithBackend>,
    ) -> Result<Vec<Arc<Mutex<MmioTransport>>>, Error> {
        let mut transports = Vec::new();
        for (i, (mut dev, backend_fds)) in devices.into_iter().enumerate() {
            let idx = i as u32;
            let addr = layout::virtio_mmio_addr(idx);
            let gsi = layout::virtio_irq(idx);
            let irq = Arc::new(self.irq(gsi)?);
            let is_fs = dev.device_type() == crate::devices::virtio::fs::TYPE_FS;
            let t = match self.saved {
                None => MmioTransport::new(dev, self.mem.clone(), irq).map_err(Error::Queue)?,
                Some(s) => {
                    let ts = s.transports[i].clone();
                    if let Some(d) = ts.device {
                        dev.restore_state(d).map_err(Error::Snapshot)?;
                    }
                    let queues = ts.queues.into_iter().map(Into::into).collect();
                    MmioTransport::restore(dev, self.mem.clone(), irq, ts.state, queues)
                        .map_err(Error::Snapshot)?
                }
            };
            let nq = t.num_queues();
            let t = Arc::new(Mutex::new(t));
            for q in 0..nq {
                let evt = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
                self.vm
                    .register_ioevent(
                        &evt,
                        &IoEventAddress::Mmio(addr + QUEUE_NOTIFY_OFFSET),
                        q as u32,
                    )
                    .map_err(ioctl_err("KVM_IOEVENTFD"))?;
                if is_fs && self.fs_thread {
                    self.fs_handler.add_notify(evt, t.clone(), q);
                } else {
                    self.handler.add_notify(evt, t.clone(), q);
                }
            }
            for (fd, input) in backend_fds {
                if input {
                    self.handler.add_backend(fd, t.clone());
                } else {
                    self.handler.add_backend_output(fd, t.clone());
                }
            }
            self.mmio
                .insert(addr, layout::VIRTIO_MMIO_SIZE, t.clone())
                .map_err(Error::Device)?;
            transports.push(t);
            self.cmdline.push_str(&format!(
                " virtio_mmio.device={}K@{:#x}:{}",
                layout::VIRTIO_MMIO_SIZE / 1024,
                addr,
                gsi
            ));
        }
        Ok(transports)
    }
}

/// Step 10: one vCPU per id, each set up by `setup` (CPUID, MSRs, registers).
fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    n: u8,
    mut setup: impl FnMut(&VcpuFd, u8, &kvm_bindings::CpuId) -> Result<(), Error>,
) -> Result<Vec<VcpuFd>, Error> {
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::new();
    for id in 0..n {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(ioctl_err("KVM_CREATE_VCPU"))?;
        setup(&fd, id, &cpuid)?;
        vcpus.push(fd);
    }
    Ok(vcpus)
}

/// Step 10 for a restore: the saved interrupt controllers, PIT, vCPU states and clock.
fn restore_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    n: u8,
    kind: HostKind,
    snap: &Snapshot,
) -> Result<Vec<VcpuFd>, Error> {
    for (i, chip) in snap.irqchips.iter().enumerate() {
        if chip.0.chip_id as usize != i {
            return Err(Error::Snapshot(
                "the saved irqchips are out of order".into(),
            ));
        }
        vm.set_irqchip(&chip.0)
            .map_err(ioctl_err("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&snap.pit.0)
        .map_err(ioctl_err("KVM_SET_PIT2"))?;
    let mut states = snap.vcpus.iter();
    let vcpus = create_vcpus(kvm, vm, n, |fd, id, cpuid| match states.next() {
        Some(st) => vcpu::restore_state(fd, id, n, cpuid, kind, st).map_err(Error::from),
        None => Err(Error::Snapshot(format!(
            "the snapshot has no state for vCPU {id}"
        ))),
    })?;
    // The guest's clock goes on from where it was saved (not from the host's realtime clock): no
    // jump, no timer firing early.
    let mut clock = snap.clock.0;
    clock.flags = 0;
    vm.set_clock(&clock).map_err(ioctl_err("KVM_SET_CLOCK"))?;
    Ok(vcpus)
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

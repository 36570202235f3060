//! What to build: the VM's configuration (machine size, kernel, disks, network, console, channel)
//! and the layout a snapshot of it records.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use super::kvm::{self, HostKind};
use super::snapshot::{Layout, Slot};
use crate::devices::virtio::console::PortBackend;

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
    /// A virtio-fs device, last on the MMIO bus (issue 19): shared host directories.
    pub fs: Option<FsConfig>,
}

/// The virtio-fs device of a VM: present from boot (a warm snapshot has it) whether or not
/// anything is shared yet.
#[derive(Debug, Clone, Default)]
pub struct FsConfig {
    /// The directories to share, in order (as the host names them): a jailed VMM binds each
    /// into its root as `shares/N` and serves that directory.
    pub shares: Vec<Share>,
    /// The directory the device serves, as the VMM process sees it (None: nothing, every
    /// request fails); set by the VMM process itself.
    pub root: Option<PathBuf>,
    /// /proc/self/fd, opened before the jail left /proc behind (the server reopens nodes
    /// through it); None: opened by path.
    pub proc_self_fd: Option<std::sync::Arc<OwnedFd>>,
}

/// One shared directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Share {
    pub source: PathBuf,
    pub read_only: bool,
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
            fs: None,
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
    /// Guest output to this open file (at most [`CONSOLE_FILE_LIMIT`] bytes); no input. A
    /// jailed VMM gets its console this way: it opens no path of the host.
    Fd(std::sync::Arc<std::fs::File>),
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

/// The layout a snapshot of a VM built from `cfg` records.
pub(crate) fn layout_of(cfg: &VmConfig, kind: HostKind) -> Layout {
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
            .chain(cfg.fs.as_ref().map(|_| Slot::Fs))
            .collect(),
        channel: cfg.channel.is_some(),
        host: kind.name().into(),
    }
}

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
mod build;
pub(crate) use build::validate;
mod config;
mod control;
mod events;
pub mod kvm;
pub mod layout;
pub mod mptable;
pub mod snapshot;
pub mod vcpu;

use std::path::PathBuf;
use std::sync::{Arc, Once};
use std::time::Duration;

use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::{register_signal_handler, Killable};

use crate::devices::virtio::block;
use crate::devices::{lock, Bus};

pub use crate::devices::virtio::console::PortBackend;
pub use config::{
    Channel, Console, DiskConfig, FsConfig, NetConfig, Share, TapSource, VmConfig,
    CONSOLE_FILE_LIMIT, DEFAULT_CMDLINE,
};
use control::{kick_signal, ExitReason, Shared};
pub use control::{Controller, StopHandle};
pub use kvm::HostKind;

/// Kernel command-line additions a guest needs on kvm_pvm: the one list in
/// guest-kernel/cmdline-kvm_pvm.txt, embedded in the binary (see `crate::kernel`).
pub fn pvm_cmdline_additions() -> String {
    crate::kernel::pvm_cmdline_additions().to_owned()
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
    Ports(#[from] crate::devices::virtio::console::Error),
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
    #[error("cannot open the shared directories")]
    Shares(#[source] std::io::Error),
}

fn ioctl_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::KvmIoctl { what, source }
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
    /// The virtio-fs device's notifications (empty without one): their own thread.
    fs_events: events::Handler,
    kind: HostKind,
    cmdline: String,
    control: Controller,
    filters: ThreadFilters,
}

/// Seccomp programs the VM's threads install on themselves before they touch the guest
/// (docs/security.md): each vCPU thread before its first KVM_RUN, the event thread before its
/// loop. A thread that cannot install its filter stops the VM.
#[derive(Default, Clone)]
pub struct ThreadFilters {
    pub vcpu: Option<seccompiler::BpfProgram>,
    pub event: Option<seccompiler::BpfProgram>,
    /// Called on a vCPU thread, and on the event thread, right after its filter is installed
    /// (the test that proves a forbidden call kills the VMM process).
    pub after_vcpu: Option<fn()>,
    pub after_event: Option<fn()>,
    /// The virtio-fs thread's filter.
    pub fs: Option<seccompiler::BpfProgram>,
    /// Called first on every vCPU thread and on the event thread (a jailed VMM drops there
    /// the capabilities only the virtio-fs thread keeps), and on the virtio-fs thread (which
    /// raises them); an error stops the VM.
    pub on_start: Option<fn() -> Result<(), String>>,
    pub on_fs_start: Option<fn() -> Result<(), String>>,
}

/// How long `run` waits for vCPU threads to stop.
const VCPU_STOP_GRACE: Duration = Duration::from_secs(5);

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl Vm {
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

    /// The seccomp filters `run` installs on the VM's threads.
    pub fn set_thread_filters(&mut self, filters: ThreadFilters) {
        self.filters = filters;
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
            fs_events,
            control,
            filters,
            ..
        } = self;
        let mut threads = Vec::new();
        for (id, fd) in vcpus.into_iter().enumerate() {
            let (pio, mmio, sh) = (pio.clone(), mmio.clone(), shared.clone());
            let filter = filters.vcpu.clone();
            let after = filters.after_vcpu;
            let on_start = filters.on_start;
            let t = std::thread::Builder::new()
                .name(format!("rvmm-vcpu{id}"))
                .spawn(move || {
                    let _ = vmm_sys_util::signal::unblock_signal(kick_signal());
                    if let Some(Err(e)) = on_start.map(|f| f()) {
                        sh.request_exit(ExitReason::Error(e));
                        return;
                    }
                    if let Some(f) = filter {
                        if let Err(e) = seccompiler::apply_filter(&f) {
                            sh.request_exit(ExitReason::Error(format!(
                                "cannot install the vCPU thread's seccomp filter: {e}"
                            )));
                            return;
                        }
                    }
                    if let Some(f) = after {
                        f();
                    }
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
        if !fs_events.is_empty() {
            let (sh, filter, on_fs_start) =
                (shared.clone(), filters.fs.clone(), filters.on_fs_start);
            // Not joined: it sleeps in its own loop, which the VM's end wakes, and holds nothing
            // the process needs afterwards.
            let t = std::thread::Builder::new()
                .name("rvmm-fs".into())
                .spawn(move || {
                    if let Some(Err(e)) = on_fs_start.map(|f| f()) {
                        sh.request_exit(ExitReason::Error(e));
                        return;
                    }
                    if let Some(f) = filter {
                        if let Err(e) = seccompiler::apply_filter(&f) {
                            sh.request_exit(ExitReason::Error(format!(
                                "cannot install the virtio-fs thread's seccomp filter: {e}"
                            )));
                            return;
                        }
                    }
                    if events::run(fs_events, &sh, false).is_err() {
                        sh.request_exit(ExitReason::Error("the virtio-fs loop failed".into()));
                    }
                });
            if let Err(e) = t {
                shared.request_exit(ExitReason::Error(format!(
                    "cannot start the virtio-fs thread: {e}"
                )));
            }
        }
        if let Some(Err(e)) = filters.on_start.map(|f| f()) {
            shared.request_exit(ExitReason::Error(e));
        }
        if let Some(f) = &filters.event {
            if let Err(e) = seccompiler::apply_filter(f) {
                shared.request_exit(ExitReason::Error(format!(
                    "cannot install the event thread's seccomp filter: {e}"
                )));
            }
        }
        if let Some(f) = filters.after_event {
            f();
        }
        let loop_result = events::run(events, &shared, true);
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

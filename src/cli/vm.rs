//! `rvmm vm`: boot a kernel and disks directly with rvmm's VMM (to compare VMMs on the same kernel and
//! disk, and to debug guests).

use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::Context;
use rvmm::vmm::{Console, DiskConfig, Vm, VmConfig, VmExit};

use super::Global;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Uncompressed vmlinux to boot. Default: the cached guest kernel (`rvmm kernel path`).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// A raw disk image, attached as virtio-blk (/dev/vda, /dev/vdb, ... in order); `:ro` for read-only.
    #[arg(long = "disk", value_name = "PATH[:ro]")]
    pub disks: Vec<String>,
    /// An initramfs (newc cpio, optionally gzip-compressed).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line. Default: console on ttyS0, reboot through the i8042, root on the first disk.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u8,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 128, value_name = "MIB")]
    pub memory: u32,
}

static STOP_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = STOP_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live local of the right size.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

pub fn exec(args: Args, _global: &Global) -> anyhow::Result<u8> {
    let kernel = match args.kernel {
        Some(k) => k,
        None => rvmm::kernel::cached_vmlinux()?,
    };
    let mut disks = Vec::new();
    for d in &args.disks {
        let (path, ro) = match d.strip_suffix(":ro") {
            Some(p) => (p, true),
            None => (d.as_str(), false),
        };
        let path = PathBuf::from(path);
        if !path.is_file() {
            anyhow::bail!("disk {} does not exist or is not a file", path.display());
        }
        disks.push(DiskConfig {
            path,
            read_only: ro,
        });
    }
    let cmdline = args.cmdline.unwrap_or_else(|| {
        let mut c = String::from("console=ttyS0 reboot=k panic=-1");
        if let Some(d) = disks.first() {
            c.push_str(if d.read_only {
                " root=/dev/vda ro"
            } else {
                " root=/dev/vda rw"
            });
        }
        c
    });
    let vm = Vm::new(VmConfig {
        kernel,
        initrd: args.initrd,
        cmdline,
        vcpus: args.cpus,
        mem_mib: args.memory,
        disks,
        console: Console::Stdio,
        channel: None,
    })
    .context("cannot start the VM")?;
    STOP_FD.store(vm.stop_handle().raw_fd(), Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let _ = vmm_sys_util::signal::register_signal_handler(sig, on_signal);
    }
    let exit = vm.run();
    STOP_FD.store(-1, Ordering::SeqCst);
    match exit? {
        VmExit::Reset | VmExit::Shutdown => Ok(0),
        VmExit::Stopped => Ok(130),
    }
}

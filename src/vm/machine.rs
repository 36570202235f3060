//! The machine a VM run gets: its configuration (vCPUs, memory, the image disk slot, taps, the
//! channel's ports and rvmm's ends of them), its snapshot identity, its initramfs, and the choice
//! between restoring the warm-start snapshot and booting.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use super::{cpio, guest_cmdline, jail, snapshots, Error};
use crate::error::{IoContext, IoError};
use crate::run::stdio::pipe;
use crate::vmm::{
    Console, DiskConfig, FsConfig, NetConfig, PortBackend, Share, TapSource, VmConfig,
};

/// A snapshot's identity (text), tag and key.
pub(super) type Ident = (String, String, String);

/// The machine a VM run gets, cold or warm.
pub(super) struct Machine {
    pub(super) kernel: PathBuf,
    pub(super) init: PathBuf,
    /// The workload privileges every run of this host gets (JSON), carried by the initramfs.
    pub(super) security: Vec<u8>,
    pub(super) vcpus: u8,
    pub(super) mem_mib: u32,
    pub(super) taps: Vec<Tap>,
    pub(super) mac: [u8; 6],
    pub(super) console: PathBuf,
    /// Host directories shared with the guest (virtio-fs; the device is there without any).
    pub(super) shares: Vec<Share>,
}

/// The host end of a machine's NIC: a tap by name (on rvmm's bridge), or an open tap descriptor
/// (made in an engine's network namespace; each configuration gets a duplicate).
#[derive(Clone)]
pub(super) enum Tap {
    Name(String),
    Fd(std::sync::Arc<OwnedFd>),
}

/// rvmm's ends of the channel's ports (docs/vm-channel.md): frames to and from rvmm-init, and
/// the workload's stdin, stdout and stderr.
pub(super) struct HostEnds {
    pub(super) to_guest: OwnedFd,
    pub(super) from_guest: OwnedFd,
    pub(super) stdin: OwnedFd,
    pub(super) stdout: OwnedFd,
    pub(super) stderr: OwnedFd,
}

/// A pipe with room for 1 MiB (as much as the host allows): fewer rounds through the event
/// thread when a VM streams output.
fn big_pipe() -> Result<(OwnedFd, OwnedFd), IoError> {
    use std::os::fd::AsRawFd;
    let (r, w) = pipe()?;
    // SAFETY: fcntl on a pipe we own; failing leaves the default size.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    Ok((r, w))
}

impl Machine {
    /// The VM configuration, with fresh channel pipes each time (a failed restore consumed the
    /// last ones), and rvmm's ends of them. The disk slot starts empty: the run's disk is
    /// attached right before the `Start`.
    pub(super) fn config(&self, initrd: Option<PathBuf>) -> Result<(VmConfig, HostEnds), Error> {
        let (to_guest_r, to_guest_w) = pipe()?;
        let (from_guest_r, from_guest_w) = pipe()?;
        let (stdin_r, stdin_w) = big_pipe()?;
        let (stdout_r, stdout_w) = big_pipe()?;
        let (stderr_r, stderr_w) = big_pipe()?;
        let port = |name: &str, input, output, barrier| PortBackend {
            name: name.into(),
            input,
            output,
            barrier,
        };
        use rvmm_proto::port;
        let ports = vec![
            port(port::CONTROL, Some(to_guest_r), Some(from_guest_w), true),
            port(port::STDIN, Some(stdin_r), None, false),
            port(port::STDOUT, None, Some(stdout_w), false),
            port(port::STDERR, None, Some(stderr_w), false),
        ];
        let cfg = VmConfig {
            kernel: self.kernel.clone(),
            initrd,
            cmdline: guest_cmdline(),
            vcpus: self.vcpus,
            mem_mib: self.mem_mib,
            disks: vec![DiskConfig {
                path: None,
                read_only: true,
            }],
            console: Console::File(self.console.clone()),
            channel: None,
            ports,
            fs: Some(FsConfig {
                shares: self.shares.clone(),
                ..Default::default()
            }),
            net: self
                .taps
                .iter()
                .map(|t| {
                    Ok(NetConfig {
                        tap: match t {
                            Tap::Name(n) => TapSource::Name(n.clone()),
                            Tap::Fd(fd) => {
                                TapSource::Fd(fd.try_clone().at(|| "duplicating the tap")?)
                            }
                        },
                        mac: self.mac,
                    })
                })
                .collect::<Result<_, IoError>>()?,
        };
        let ends = HostEnds {
            to_guest: to_guest_w,
            from_guest: from_guest_r,
            stdin: stdin_w,
            stdout: stdout_r,
            stderr: stderr_r,
        };
        Ok((cfg, ends))
    }

    /// The snapshot identity (text), tag and key of this machine; with `disk`, also those of its
    /// image snapshot for that image disk (made from one configuration and one look at the files).
    pub(super) fn identity(&self, disk: Option<&Path>) -> Result<(Ident, Option<Ident>), Error> {
        let (cfg, _) = self.config(None)?;
        let layout = cfg.layout();
        let ident = |identity: String| {
            let tag = snapshots::hash(&identity);
            let key = snapshots::key(&tag, &layout);
            (identity, tag, key)
        };
        let machine = snapshots::identity(&self.kernel, &self.init, &cfg.cmdline, &self.security);
        let image = disk.map(|d| ident(snapshots::image_identity(&machine, d)));
        Ok((ident(machine), image))
    }

    /// Writes the initramfs (rvmm-init as /init, nothing run-specific) into `dir`.
    pub(super) fn initrd(&self, dir: &Path) -> Result<PathBuf, Error> {
        let initrd = dir.join("initrd.cpio");
        let init_bytes =
            std::fs::read(&self.init).at(|| format!("reading {}", self.init.display()))?;
        let writing = || format!("writing {}", initrd.display());
        let file = std::fs::File::create(&initrd).at(writing)?;
        let mut w = cpio::Writer::new(std::io::BufWriter::new(file));
        (|| {
            for d in ["dev", "proc", "sys"] {
                w.dir(d)?;
            }
            w.file("init", 0o755, &init_bytes)?;
            w.dir("rvmm")?;
            w.file("rvmm/security.json", 0o600, &self.security)?;
            w.finish()
        })()
        .at(writing)?;
        Ok(initrd)
    }
}

/// N bytes from the kernel's CSPRNG.
pub(super) fn random_bytes<const N: usize>() -> Result<[u8; N], IoError> {
    let mut b = [0u8; N];
    let mut f = std::fs::File::open("/dev/urandom").at(|| "opening /dev/urandom")?;
    f.read_exact(&mut b).at(|| "reading /dev/urandom")?;
    Ok(b)
}

/// A VM ready to run, restored or about to boot, in its VMM process, and rvmm's ends of its
/// channel.
pub(super) struct Started {
    pub(super) vmm: jail::Vmm,
    pub(super) ends: HostEnds,
    pub(super) warm: bool,
    /// Which of the candidates was restored (none: booted).
    pub(super) restored: Option<usize>,
}

/// A snapshot [`restore_or_boot`] may restore.
pub(super) struct Candidate<'a> {
    pub(super) key: &'a str,
    pub(super) tag: &'a str,
    /// Where the restored VMM may write a snapshot (it will be asked for one).
    pub(super) snapshot_out: Option<&'a Path>,
}

/// Where a run's VMM process goes (see `jail::Request`).
pub(super) struct Place<'a> {
    pub(super) jail_dir: &'a Path,
    pub(super) id: &'a str,
    pub(super) cgroup: Option<&'a crate::cgroups::Cgroup>,
    /// Where a booted VMM may write the snapshot it is asked for (a restored one gets none).
    pub(super) snapshot_out: Option<&'a Path>,
}

impl<'a> Place<'a> {
    fn request<'b>(
        &self,
        cfg: VmConfig,
        restore: Option<(&'b Path, &'b str)>,
        snapshot_out: Option<&'b Path>,
    ) -> jail::Request<'b>
    where
        'a: 'b,
    {
        jail::Request {
            cfg,
            restore,
            snapshot_out,
            jail_dir: self.jail_dir,
            id: self.id,
            cgroup: self.cgroup,
        }
    }
}

/// Restores the first of `candidates` there is (unless `cold`), or builds the machine to boot
/// with a fresh initramfs in `dir`. A snapshot that cannot be restored is removed, with one line,
/// and the next is tried.
pub(super) fn restore_or_boot(
    machine: &Machine,
    snaps: &snapshots::Snapshots,
    candidates: &[Candidate],
    cold: bool,
    dir: &Path,
    place: &Place,
) -> Result<Started, Error> {
    for (i, c) in candidates.iter().enumerate().filter(|_| !cold) {
        let Some(sdir) = snaps.find(c.key) else {
            continue;
        };
        let (cfg, ends) = machine.config(None)?;
        match jail::spawn(place.request(cfg, Some((sdir.as_path(), c.tag)), c.snapshot_out)) {
            Ok(vmm) => {
                return Ok(Started {
                    vmm,
                    ends,
                    warm: true,
                    restored: Some(i),
                })
            }
            Err(jail::SpawnError::Restore(e)) => {
                let next = if i + 1 < candidates.len() {
                    "trying the next one"
                } else {
                    "booting the kernel instead"
                };
                eprintln!("rvmm: not using snapshot {} ({e}); {next}", c.key);
                snaps.remove(c.key);
            }
            Err(jail::SpawnError::Other(e)) => return Err(Error::Create(e)),
        }
    }
    let (cfg, ends) = machine.config(Some(machine.initrd(dir)?))?;
    let vmm = jail::spawn(place.request(cfg, None, place.snapshot_out))
        .map_err(|e| Error::Create(e.to_string()))?;
    Ok(Started {
        vmm,
        ends,
        warm: false,
        restored: None,
    })
}

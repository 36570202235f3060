//! Loading the kernel and initrd and writing the boot structures: PVH start info when the ELF has a
//! PVH note, the Linux 64-bit boot protocol's zero page otherwise; the command line; the MP table.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{self, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::layout;
use super::mptable;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open kernel {path}")]
    KernelOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {0} is not an ELF vmlinux (a bzImage or compressed kernel will not do)")]
    NotElf(PathBuf),
    #[error("cannot load kernel {path}")]
    KernelLoad {
        path: PathBuf,
        #[source]
        source: loader::Error,
    },
    #[error("cannot read initrd {path}")]
    Initrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {0} does not fit in guest memory above the kernel")]
    InitrdTooBig(PathBuf),
    #[error("kernel command line is invalid or longer than {max} bytes", max = layout::CMDLINE_MAX_SIZE - 1)]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("cannot write the command line to guest memory")]
    CmdlineLoad(#[source] loader::Error),
    #[error("cannot write boot parameters to guest memory")]
    BootParams(#[source] linux_loader::configurator::Error),
    #[error("cannot write boot structures to guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
    #[error("cannot write the MP table")]
    MpTable(#[source] mptable::Error),
}

/// How the vCPU must be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, RBX = start info.
    Pvh,
    /// Linux 64-bit boot protocol: long mode, identity paging, RSI = zero page.
    Linux64,
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    pub entry: u64,
    pub mode: EntryMode,
}

/// Checks that `path` is an ELF file (for a clear error before anything else happens).
pub fn check_elf(path: &Path) -> Result<(), Error> {
    let mut f = File::open(path).map_err(|source| Error::KernelOpen {
        path: path.to_owned(),
        source,
    })?;
    let mut magic = [0u8; 4];
    if f.read_exact(&mut magic).is_err() || magic != *b"\x7fELF" {
        return Err(Error::NotElf(path.to_owned()));
    }
    Ok(())
}

/// The e820 map for `mem`: low RAM below the EBDA, RAM from 1 MiB to the gap, RAM above 4 GiB.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    const RAM: u32 = 1;
    const RESERVED: u32 = 2;
    let mut v = vec![
        (0, layout::EBDA_START, RAM),
        (
            layout::EBDA_START,
            layout::HIMEM_START - layout::EBDA_START,
            RESERVED,
        ),
    ];
    for r in mem.iter() {
        use vm_memory::GuestMemoryRegion;
        let start = r.start_addr().raw_value();
        let end = start + r.len();
        let start = start.max(layout::HIMEM_START);
        if end > start {
            v.push((start, end - start, RAM));
        }
    }
    v
}

/// Loads everything and returns where the boot vCPU starts.
pub fn load(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    vcpus: u8,
) -> Result<BootEntry, Error> {
    check_elf(kernel)?;
    let mut f = File::open(kernel).map_err(|source| Error::KernelOpen {
        path: kernel.to_owned(),
        source,
    })?;
    let res = Elf::load(mem, None, &mut f, Some(GuestAddress(layout::HIMEM_START))).map_err(
        |source| match source {
            loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber) => {
                Error::NotElf(kernel.to_owned())
            }
            source => Error::KernelLoad {
                path: kernel.to_owned(),
                source,
            },
        },
    )?;
    let kernel_end = res.kernel_end;

    // Command line.
    let cl = Cmdline::try_from(cmdline, layout::CMDLINE_MAX_SIZE).map_err(Error::Cmdline)?;
    loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cl)
        .map_err(Error::CmdlineLoad)?;
    let cmdline_len = cmdline.len() as u32 + 1;

    // Initrd: page aligned, as high in low RAM as it fits.
    let initrd_at = match initrd {
        Some(p) => Some(load_initrd(mem, p, kernel_end)?),
        None => None,
    };

    mptable::setup(mem, vcpus).map_err(Error::MpTable)?;
    let e820 = e820_map(mem);

    // RVMM_BOOT_PROTOCOL=linux64 ignores the PVH note (for debugging and comparisons).
    let force64 = std::env::var("RVMM_BOOT_PROTOCOL").is_ok_and(|v| v == "linux64");
    match res.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) if !force64 => {
            let mut info = hvm_start_info {
                magic: linux_loader::loader::elf::start_info::XEN_HVM_START_MAGIC_VALUE,
                version: 1,
                cmdline_paddr: layout::CMDLINE_START,
                memmap_paddr: layout::PVH_MEMMAP_START,
                memmap_entries: e820.len() as u32,
                ..Default::default()
            };
            let memmap: Vec<hvm_memmap_table_entry> = e820
                .iter()
                .take(layout::PVH_MEMMAP_MAX)
                .map(|&(addr, size, type_)| hvm_memmap_table_entry {
                    addr,
                    size,
                    type_,
                    reserved: 0,
                })
                .collect();
            let mut modules = None;
            if let Some((addr, size)) = initrd_at {
                info.nr_modules = 1;
                info.modlist_paddr = layout::PVH_MODLIST_START;
                modules = Some(hvm_modlist_entry {
                    paddr: addr,
                    size,
                    cmdline_paddr: 0,
                    reserved: 0,
                });
            }
            let mut bp = BootParams::new(&info, GuestAddress(layout::PVH_INFO_START));
            bp.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_START));
            if let Some(m) = modules {
                bp.set_modules(&[m], GuestAddress(layout::PVH_MODLIST_START));
            }
            PvhBootConfigurator::write_bootparams(&bp, mem).map_err(Error::BootParams)?;
            Ok(BootEntry {
                entry: entry.raw_value(),
                mode: EntryMode::Pvh,
            })
        }
        _ => {
            let mut params = boot_params::default();
            params.hdr.boot_flag = 0xaa55;
            params.hdr.header = 0x5372_6448; // "HdrS"
            params.hdr.type_of_loader = 0xff;
            params.hdr.kernel_alignment = 0x100_0000;
            params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
            params.hdr.cmdline_size = cmdline_len;
            if let Some((addr, size)) = initrd_at {
                params.hdr.ramdisk_image = addr as u32;
                params.hdr.ramdisk_size = size as u32;
            }
            let mut table = [boot_e820_entry::default(); 128];
            let n = e820.len().min(table.len());
            for (slot, &(addr, size, r#type)) in table.iter_mut().zip(e820.iter()) {
                *slot = boot_e820_entry { addr, size, r#type };
            }
            params.e820_table = table;
            params.e820_entries = n as u8;
            let bp = BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_START));
            LinuxBootConfigurator::write_bootparams(&bp, mem).map_err(Error::BootParams)?;
            Ok(BootEntry {
                entry: res.kernel_load.raw_value(),
                mode: EntryMode::Linux64,
            })
        }
    }
}

/// Loads the initrd as high as it fits in low RAM (below the MMIO gap and 4 GiB), above the kernel.
fn load_initrd(mem: &GuestMemoryMmap, path: &Path, kernel_end: u64) -> Result<(u64, u64), Error> {
    let mut f = File::open(path).map_err(|source| Error::Initrd {
        path: path.to_owned(),
        source,
    })?;
    let size = f
        .metadata()
        .map_err(|source| Error::Initrd {
            path: path.to_owned(),
            source,
        })?
        .len();
    let low_end = mem
        .iter()
        .map(|r| {
            use vm_memory::GuestMemoryRegion;
            r.start_addr().raw_value() + r.len()
        })
        .filter(|&e| e <= layout::MMIO_GAP_START)
        .max()
        .unwrap_or(0);
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end && size <= u32::MAX as u64)
        .ok_or_else(|| Error::InitrdTooBig(path.to_owned()))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(Error::Memory)?;
    Ok((addr, size))
}

/// Writes the identity page tables (first 4 GiB, 2 MiB pages), the boot GDT and an empty IDT.
pub fn write_boot_tables(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), Error> {
    mem.write_obj(layout::PDPTE_START | 0x03, GuestAddress(layout::PML4_START))
        .map_err(Error::Memory)?;
    for d in 0..layout::PDE_COUNT {
        let pd = layout::PDE_START + d * 0x1000;
        mem.write_obj(pd | 0x03, GuestAddress(layout::PDPTE_START + d * 8))
            .map_err(Error::Memory)?;
        for i in 0..512u64 {
            let page = ((d * 512 + i) << 21) | 0x83;
            mem.write_obj(page, GuestAddress(pd + i * 8))
                .map_err(Error::Memory)?;
        }
    }
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::BOOT_GDT_START + i as u64 * 8))
            .map_err(Error::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))
        .map_err(Error::Memory)?;
    Ok(())
}

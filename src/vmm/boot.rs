//! Guest memory and the 64-bit Linux boot protocol: ELF vmlinux, command line, initrd, boot_params with
//! the e820 map, identity-mapped page tables and a GDT for the long-mode entry.

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{elf::Elf, load_cmdline, Cmdline, KernelLoader};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::layout::*;
use super::Error;

/// Guest RAM: one region below the MMIO gap, one above 4 GiB for what does not fit below it.
pub fn create_memory(mem_mib: u32) -> Result<GuestMemoryMmap, Error> {
    let size = u64::from(mem_mib) << 20;
    let mut ranges = vec![(GuestAddress(0), size.min(MMIO_GAP_START) as usize)];
    if size > MMIO_GAP_START {
        ranges.push((GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize));
    }
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::Memory(e.to_string()))
}

/// Which entry the vCPU starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// PVH: 32-bit protected mode, paging off, RBX = hvm_start_info.
    Pvh(GuestAddress),
    /// Linux 64-bit boot protocol: long mode, RSI = boot_params.
    Linux64(GuestAddress),
}

/// Where the kernel starts, and how the boot code must point the vCPU at it.
pub struct Loaded {
    pub entry: Entry,
}

/// Loads the vmlinux, the command line and the initrd, and writes boot_params.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    cmdline: &str,
    initrd: Option<&Path>,
    use_pvh: bool,
) -> Result<Loaded, Error> {
    let mut f = File::open(kernel).map_err(|source| Error::Kernel {
        path: kernel.to_path_buf(),
        source,
    })?;
    let res = Elf::load(mem, None, &mut f, Some(GuestAddress(HIGH_MEMORY_START))).map_err(|e| {
        Error::KernelFormat {
            path: kernel.to_path_buf(),
            why: e.to_string(),
        }
    })?;

    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| Error::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| Error::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| Error::Cmdline(e.to_string()))?;
    let cmdline_len = cl
        .as_cstring()
        .map_err(|e| Error::Cmdline(e.to_string()))?
        .as_bytes_with_nul()
        .len();

    let ram_end_low = last_addr_below_gap(mem);
    let mut initrd_at = None;
    if let Some(path) = initrd {
        let data = std::fs::read(path).map_err(|source| Error::Initrd {
            path: path.to_path_buf(),
            source,
        })?;
        // Page-aligned, as high as possible below the gap, above the kernel.
        let size = data.len() as u64;
        let addr = ram_end_low
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|&a| a > res.kernel_end)
            .ok_or(Error::InitrdTooBig(size))?;
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(|e| Error::Memory(e.to_string()))?;
        initrd_at = Some((addr, size));
    }

    let mut e820 = vec![
        (0, EBDA_START),
        (HIGH_MEMORY_START, ram_end_low - HIGH_MEMORY_START),
    ];
    if let Some(r) = mem
        .iter()
        .find(|r| r.start_addr().raw_value() >= MMIO_GAP_END)
    {
        e820.push((MMIO_GAP_END, r.len()));
    }

    if let (PvhBootCapability::PvhEntryPresent(pvh), true) = (res.pvh_boot_cap, use_pvh) {
        write_pvh_start_info(mem, &e820, cmdline_len, initrd_at)?;
        return Ok(Loaded {
            entry: Entry::Pvh(pvh),
        });
    }

    let mut params = boot_params::default();
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = 0x0100_0000;
    if let Some((addr, size)) = initrd_at {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (i, (addr, size)) in e820.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = 1; // E820_RAM
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| Error::Memory(e.to_string()))?;

    Ok(Loaded {
        entry: Entry::Linux64(res.kernel_load),
    })
}

/// hvm_start_info (version 1, with the memory map) and, for an initrd, one module entry.
fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    e820: &[(u64, u64)],
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), Error> {
    let _ = cmdline_len;
    let mut info = hvm_start_info {
        magic: 0x336e_c578, // XEN_HVM_START_MAGIC_VALUE
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|&(addr, size)| hvm_memmap_table_entry {
            addr,
            size,
            type_: 1, // RAM
            reserved: 0,
        })
        .collect();
    let mut params = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_START));
    if let Some((paddr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
        params = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_START));
        params.set_modules::<hvm_modlist_entry>(
            &[hvm_modlist_entry {
                paddr,
                size,
                ..Default::default()
            }],
            GuestAddress(PVH_MODLIST_START),
        );
    }
    params.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| Error::Memory(e.to_string()))
}

fn last_addr_below_gap(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .filter(|r| r.start_addr().raw_value() < MMIO_GAP_START)
        .map(|r| r.start_addr().raw_value() + r.len())
        .max()
        .unwrap_or(0)
}

/// GDT entries for the 64-bit entry: null, code (0x08), data (0x10), TSS (0x18).
pub const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// GDT entries for the PVH entry (32-bit flat): null, code (0x08), data (0x10), TSS (0x18).
pub const GDT_PVH: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];

pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Writes the GDT, an empty IDT and identity page tables for the first 4 GiB (2 MiB pages), so that the
/// entry code reaches RAM and the MMIO gap alike.
pub fn write_boot_tables(mem: &GuestMemoryMmap, pvh: bool) -> Result<(), Error> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|e| Error::Memory(e.to_string()))
    };
    let gdt = if pvh { &GDT_PVH } else { &GDT };
    for (i, e) in gdt.iter().enumerate() {
        w(*e, BOOT_GDT_START + i as u64 * 8)?;
    }
    w(0, BOOT_IDT_START)?;
    w(PDPTE_START | 0x03, PML4_START)?;
    for gib in 0..4u64 {
        w((PDE_START + gib * 0x1000) | 0x03, PDPTE_START + gib * 8)?;
    }
    for i in 0..4 * 512u64 {
        w((i << 21) | 0x83, PDE_START + i * 8)?;
    }
    Ok(())
}

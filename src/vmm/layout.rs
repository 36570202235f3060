//! Every guest-physical address and IRQ number the VMM uses, in one place.
//!
//! Guest memory map (x86-64):
//!
//! | range                     | what                                                  |
//! |---------------------------|-------------------------------------------------------|
//! | 0x0000_0500..0x0000_0520  | boot GDT (null, code64, data, tss)                    |
//! | 0x0000_0520..0x0000_0528  | boot IDT (empty)                                      |
//! | 0x0000_6000..0x0000_6040  | PVH `hvm_start_info`                                  |
//! | 0x0000_6040..0x0000_6060  | PVH module list (initrd)                              |
//! | 0x0000_6100..0x0000_6400  | PVH memory map                                        |
//! | 0x0000_7000..0x0000_8000  | Linux zero page (`boot_params`)                       |
//! | 0x0000_8ff0               | boot stack pointer                                    |
//! | 0x0000_9000..0x0000_f000  | identity page tables (PML4, PDPT, 4 PDs: first 4 GiB) |
//! | 0x0002_0000..0x0002_0800  | kernel command line                                   |
//! | 0x0009_fc00..0x000a_0000  | EBDA: MP table                                        |
//! | 0x000a_0000..0x0010_0000  | legacy hole (VGA, BIOS): reserved in e820             |
//! | 0x0010_0000..             | kernel (loaded at its ELF physical addresses)         |
//! | top of low RAM, down      | initrd (page aligned)                                 |
//! | 0xd000_0000..0xd000_0000+n*4K | virtio-mmio devices, one 4 KiB window each        |
//! | 0xfec0_0000               | IOAPIC (in-kernel)                                    |
//! | 0xfee0_0000               | local APIC (in-kernel)                                |
//! | 0x1_0000_0000..           | RAM above the MMIO gap when memory > 3.25 GiB         |

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (one empty entry, the guest installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH start info.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Maximum number of PVH memory map entries that fit before the zero page.
pub const PVH_MEMMAP_MAX: usize = 32;
/// Linux zero page (struct boot_params).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 table.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Four page directories (2 MiB pages identity-mapping the first 4 GiB, MMIO gap included).
pub const PDE_START: u64 = 0xb000;
/// Number of page directories at [`PDE_START`].
pub const PDE_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line size, including the terminating NUL (x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area, where the MP table goes.
pub const EBDA_START: u64 = 0x9fc00;
/// Size reserved for the MP table (enough for 254 CPUs is not needed: we cap vCPUs at [`MAX_VCPUS`]).
pub const MPTABLE_MAX_SIZE: u64 = 0x400;
/// Start of the legacy hole (VGA and BIOS).
pub const LEGACY_HOLE_START: u64 = 0xa0000;
/// Where high memory starts and where the kernel is loaded by default.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap (no RAM here).
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
/// Size of each virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC base address.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base address.
pub const APIC_START: u64 = 0xfee0_0000;

/// Legacy serial COM1 (ttyS0).
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 IRQ.
pub const COM1_IRQ: u32 = 4;
/// Legacy serial COM2 (ttyS1).
pub const COM2_PORT: u16 = 0x2f8;
/// COM2 IRQ.
pub const COM2_IRQ: u32 = 3;
/// Size of a 16550 register window.
pub const SERIAL_PORT_SIZE: u16 = 8;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_CMD_PORT: u16 = 0x64;

/// IRQ of the first virtio-mmio device; the next ones count up.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last usable IOAPIC pin for virtio devices (the in-kernel IOAPIC has 24 pins).
pub const VIRTIO_IRQ_MAX: u32 = 23;
/// Number of IOAPIC pins.
pub const IOAPIC_PINS: u32 = 24;
/// Maximum virtio-mmio devices (one IRQ each).
pub const MAX_VIRTIO_DEVICES: u32 = VIRTIO_IRQ_MAX - VIRTIO_IRQ_BASE + 1;

/// Maximum vCPUs (the MP table must fit in [`MPTABLE_MAX_SIZE`]).
pub const MAX_VCPUS: u8 = 32;

/// Smallest guest RAM we accept (a Linux guest needs a few MiB for itself).
pub const MIN_MEM_MIB: u32 = 16;
/// Largest guest RAM we accept.
pub const MAX_MEM_MIB: u32 = 256 * 1024;

/// The guest-physical address of virtio-mmio device `index`.
pub const fn virtio_mmio_addr(index: u32) -> u64 {
    VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE
}

/// The IRQ of virtio-mmio device `index`.
pub const fn virtio_irq(index: u32) -> u32 {
    VIRTIO_IRQ_BASE + index
}

/// The RAM regions for `mem_bytes` of guest memory: below the MMIO gap, then above 4 GiB.
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// KVM's three-page TSS region (needed by KVM on Intel before the first KVM_RUN).
pub const KVM_TSS_START: u64 = 0xfffb_d000;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn regions_split_around_the_gap() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        let r = ram_regions(4 << 30);
        assert_eq!(r[0], (0, MMIO_GAP_START));
        assert_eq!(r[1].0, MMIO_GAP_END);
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        const {
            assert!(PVH_MODLIST_START + 0x20 <= PVH_MEMMAP_START);
            assert!(PVH_MEMMAP_START + (PVH_MEMMAP_MAX as u64) * 24 <= ZERO_PAGE_START);
            assert!(ZERO_PAGE_START + 0x1000 <= BOOT_STACK_POINTER);
            assert!(PDE_START + PDE_COUNT * 0x1000 <= CMDLINE_START);
            assert!(EBDA_START + MPTABLE_MAX_SIZE <= LEGACY_HOLE_START);
            assert!(virtio_irq(MAX_VIRTIO_DEVICES - 1) < IOAPIC_PINS);
            assert!(KVM_TSS_START > APIC_START || KVM_TSS_START + 0x3000 <= IOAPIC_START);
        }
    }
}

//! Every guest-physical address and IRQ rvmm uses, in one place. The table in docs/ARCHITECTURE.md
//! mirrors this file.

/// GDT for the 64-bit entry (4 entries: null, code, data, TSS).
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: the kernel installs its own before it enables interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH: hvm_start_info, its memory map, and the module list (initrd).
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
pub const PVH_MODLIST_START: u64 = 0x6800;
/// `boot_params` ("zero page") for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapped page tables for the first 4 GiB: PML4, PDPT, four PDs (2 MiB pages) at 0xb000..0xf000.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// MP table (floating pointer + config table), in the EBDA.
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of low RAM in the e820 map (EBDA and legacy holes above).
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel and everything else above 1 MiB goes.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// The 32-bit MMIO gap below 4 GiB: no RAM here; devices live in it.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// KVM's TSS and identity-map pages (Intel needs them below 4 GiB, outside RAM).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// virtio-mmio transports, one 4 KiB window each, from here up.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The most virtio-mmio devices a VM can have (IRQs 5..=15 without 8).
pub const VIRTIO_MAX_DEVICES: usize = 8;
/// Legacy IRQs (GSIs) of the ISA devices.
pub const IRQ_COM1: u32 = 4;
pub const IRQ_COM2: u32 = 3;
/// GSIs of the virtio-mmio devices, in slot order.
pub const VIRTIO_IRQS: [u32; VIRTIO_MAX_DEVICES] = [5, 6, 7, 9, 10, 11, 12, 14];
/// I/O ports.
pub const PORT_COM1: u16 = 0x3f8;
pub const PORT_COM2: u16 = 0x2f8;
pub const PORT_I8042_DATA: u16 = 0x60;
pub const PORT_I8042_CMD: u16 = 0x64;
/// The smallest guest RAM rvmm accepts (MiB): the kernel, its page tables and an initramfs must fit.
pub const MIN_MEMORY_MIB: u32 = 32;
/// The largest (MiB): keeps absurd flags from mapping the host away.
pub const MAX_MEMORY_MIB: u32 = 64 * 1024;

/// Address of virtio-mmio slot `i`.
pub const fn virtio_mmio_addr(i: usize) -> u64 {
    VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE
}

/// Local APIC and I/O APIC MMIO windows (architectural), and the I/O APIC's pin count (KVM's).
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const IOAPIC_PINS: u8 = 24;

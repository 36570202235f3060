//! An Intel MultiProcessor table, so the guest finds every vCPU, the I/O APIC and the legacy IRQ routing
//! without ACPI (`--cpus N`).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR, MPTABLE_START};
use super::Error;

const MPC_SPEC: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer and the configuration table for `cpus` vCPUs, as bytes placed at
/// MPTABLE_START.
pub fn build(cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus; // APIC IDs 0..cpus are the vCPUs
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let mut e = vec![
            0u8,
            id,
            0x14,
            CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 },
        ];
        e.extend_from_slice(&0x600u32.to_le_bytes()); // CPU signature (family 6)
        e.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        e.extend_from_slice(&[0; 8]);
        entries.extend_from_slice(&e);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']); // bus 0: ISA
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // I/O interrupt: INT, conforming polarity/trigger, ISA bus IRQ `pin` → I/O APIC pin `pin`.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1 of every local APIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = MPTABLE_START + 16;
    let mut table = Vec::new();
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(MPC_SPEC);
    table.push(0); // checksum, below
    table.extend_from_slice(b"RVMM    ");
    table.extend_from_slice(b"rvmm microVM");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.extend_from_slice(&[0, 0]); // extended checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::new();
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, MPC_SPEC, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&table);
    out
}

/// Writes the MP table for `cpus` vCPUs into guest memory.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), Error> {
    let bytes = build(cpus);
    if MPTABLE_START + bytes.len() as u64 > super::layout::EBDA_START + 0x400 {
        return Err(Error::Setup("MP table does not fit in the EBDA"));
    }
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|e| Error::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        for cpus in [1u8, 2, 32] {
            let b = build(cpus);
            assert_eq!(&b[..4], b"_MP_");
            assert_eq!(b[..16].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            let table = &b[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(table.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count, u16::from(cpus) + 2 + u16::from(IOAPIC_PINS) + 2);
            assert!(b.len() <= 0x400, "{cpus} cpus: {} bytes", b.len());
        }
    }
}

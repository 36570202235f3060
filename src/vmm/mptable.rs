//! The Intel MultiProcessor table, so a guest without ACPI finds all vCPUs and the IOAPIC.
//! Written byte by byte at the start of the EBDA, where Linux looks for it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} vCPUs do not fit in the MP table (max {max})", max = layout::MAX_VCPUS)]
    TooManyCpus(u8),
    #[error("cannot write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the MP floating pointer followed by the configuration table, for a table placed at `base`.
pub fn build(base: u64, vcpus: u8) -> Result<Vec<u8>, Error> {
    if vcpus == 0 || vcpus > layout::MAX_VCPUS {
        return Err(Error::TooManyCpus(vcpus));
    }
    let ioapic_id = vcpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        let flags = 1 | if cpu == 0 { 2 } else { 0 }; // enabled, bootstrap processor
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // The IOAPIC.
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(layout::IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // ISA IRQ i → IOAPIC pin i.
    for pin in 0..layout::IOAPIC_PINS as u8 {
        entries.extend_from_slice(&[3, 0, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0: ExtINT, LINT1: NMI.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + 16;
    let len = 44 + entries.len();
    let mut hdr = Vec::with_capacity(len);
    hdr.extend_from_slice(b"PCMP");
    hdr.extend_from_slice(&(len as u16).to_le_bytes());
    hdr.push(4); // spec revision 1.4
    hdr.push(0); // checksum, below
    hdr.extend_from_slice(b"RVMM    ");
    hdr.extend_from_slice(b"RVMM-MICROVM");
    hdr.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    hdr.extend_from_slice(&0u16.to_le_bytes());
    hdr.extend_from_slice(&count.to_le_bytes());
    hdr.extend_from_slice(&(layout::APIC_START as u32).to_le_bytes());
    hdr.extend_from_slice(&0u16.to_le_bytes()); // extended table
    hdr.push(0);
    hdr.push(0);
    hdr.extend_from_slice(&entries);
    hdr[7] = checksum(&hdr);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&(table_addr as u32).to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(4);
    mpf.push(0); // checksum
    mpf.extend_from_slice(&[0; 5]);
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&hdr);
    Ok(mpf)
}

/// Writes the MP table for `vcpus` vCPUs at the EBDA.
pub fn setup(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), Error> {
    let t = build(layout::EBDA_START, vcpus)?;
    debug_assert!(t.len() as u64 <= layout::MPTABLE_MAX_SIZE);
    mem.write_slice(&t, GuestAddress(layout::EBDA_START))
        .map_err(Error::Write)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_size() {
        for n in [1u8, 2, layout::MAX_VCPUS] {
            let t = build(layout::EBDA_START, n).unwrap();
            assert!(t.len() as u64 <= layout::MPTABLE_MAX_SIZE);
            assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            assert_eq!(&t[16..20], b"PCMP");
            let len = u16::from_le_bytes([t[20], t[21]]) as usize;
            assert_eq!(len, t.len() - 16);
            assert_eq!(t[16..].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        }
        assert!(build(0, 0).is_err());
        assert!(build(0, layout::MAX_VCPUS + 1).is_err());
    }
}

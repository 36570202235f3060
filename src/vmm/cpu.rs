//! vCPU setup for the 64-bit entry: CPUID, MSRs, special registers (long mode), registers, FPU, LAPIC.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

use super::boot::{Entry, GDT, GDT_PVH};
use super::layout::*;
use super::{Error, HostKind};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// CPUID for vCPU `id` of `count`: what KVM supports, with the APIC IDs and topology made ours and the
/// hypervisor bit set. On kvm_pvm the guest runs CPUID natively and this changes nothing it sees; the
/// command line masks features there instead (guest-kernel/cmdline-kvm_pvm.txt).
pub fn cpuid(kvm: &Kvm, id: u8, count: u8) -> Result<CpuId, Error> {
    let mut c = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                // Initial APIC ID and logical processor count.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: count is valid
                }
            }
            0xb => {
                e.edx = u32::from(id); // x2APIC ID
            }
            6 => {
                e.ecx &= !(1 << 3); // no EPB (energy/perf bias MSR)
            }
            _ => {}
        }
    }
    Ok(c)
}

pub fn setup(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    id: u8,
    count: u8,
    entry: Entry,
    host: HostKind,
) -> Result<(), Error> {
    let _ = host;
    vcpu.set_cpuid2(&cpuid(kvm, id, count)?)
        .map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))?;
    setup_msrs(vcpu)?;
    setup_fpu(vcpu)?;
    setup_lapic(vcpu)?;
    if id == 0 {
        let regs = match entry {
            Entry::Linux64(rip) => {
                setup_sregs_long(vcpu)?;
                kvm_regs {
                    rflags: 0x2,
                    rip: rip.0,
                    rsp: BOOT_STACK_POINTER,
                    rbp: BOOT_STACK_POINTER,
                    rsi: ZERO_PAGE_START,
                    ..Default::default()
                }
            }
            Entry::Pvh(rip) => {
                setup_sregs_pvh(vcpu)?;
                kvm_regs {
                    rflags: 0x2,
                    rip: rip.0,
                    rbx: PVH_INFO_START,
                    ..Default::default()
                }
            }
        };
        vcpu.set_regs(&regs)
            .map_err(|e| Error::Kvm("KVM_SET_REGS", e))?;
    }
    Ok(())
}

fn setup_msrs(vcpu: &VcpuFd) -> Result<(), Error> {
    let entry = |index: u32, data: u64| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(0x174, 0),       // IA32_SYSENTER_CS
        entry(0x175, 0),       // IA32_SYSENTER_ESP
        entry(0x176, 0),       // IA32_SYSENTER_EIP
        entry(0xc000_0081, 0), // STAR
        entry(0xc000_0082, 0), // LSTAR
        entry(0xc000_0083, 0), // CSTAR
        entry(0xc000_0102, 0), // KERNEL_GS_BASE
        entry(0xc000_0084, 0), // SYSCALL_MASK
        entry(0x10, 0),        // TSC
        entry(0x1a0, 1),       // IA32_MISC_ENABLE: fast strings
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::Setup("too many MSRs"))?;
    let n = vcpu
        .set_msrs(&msrs)
        .map_err(|e| Error::Kvm("KVM_SET_MSRS", e))?;
    if n != entries.len() {
        // An MSR the host refuses is not fatal for booting; say which.
        log::debug!("KVM_SET_MSRS set {n} of {} MSRs", entries.len());
    }
    Ok(())
}

fn setup_fpu(vcpu: &VcpuFd) -> Result<(), Error> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| Error::Kvm("KVM_SET_FPU", e))
}

/// LINT0 as ExtINT (the PIC's output), LINT1 as NMI, as firmware would leave them.
fn setup_lapic(vcpu: &VcpuFd) -> Result<(), Error> {
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| Error::Kvm("KVM_GET_LAPIC", e))?;
    let set = |regs: &mut [std::os::raw::c_char; 1024], off: usize, mode: u32| {
        let mut v = [0u8; 4];
        for (i, b) in v.iter_mut().enumerate() {
            *b = regs[off + i] as u8;
        }
        let val = (u32::from_le_bytes(v) & !0x700) | (mode << 8);
        for (i, b) in val.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as std::os::raw::c_char;
        }
    };
    set(&mut lapic.regs, 0x350, 7); // LVT LINT0: ExtINT
    set(&mut lapic.regs, 0x360, 4); // LVT LINT1: NMI
    vcpu.set_lapic(&lapic)
        .map_err(|e| Error::Kvm("KVM_SET_LAPIC", e))
}

fn segment(gdt: &[u64; 4], index: usize, selector: u16) -> kvm_segment {
    let e = gdt[index];
    kvm_segment {
        base: ((e >> 16) & 0xff_ffff) | ((e >> 32) & 0xff00_0000),
        limit: {
            let l = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
            if (e >> 55) & 1 == 1 {
                (l << 12) | 0xfff
            } else {
                l
            }
        },
        selector,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g: ((e >> 55) & 1) as u8,
        avl: ((e >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// PVH entry state: 32-bit protected mode with flat segments, paging off.
fn setup_sregs_pvh(vcpu: &VcpuFd) -> Result<(), Error> {
    let mut s = vcpu
        .get_sregs()
        .map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?;
    let code = segment(&GDT_PVH, 1, 0x08);
    let data = segment(&GDT_PVH, 2, 0x10);
    let mut tss = segment(&GDT_PVH, 3, 0x18);
    tss.type_ = 0xb; // busy 32-bit TSS, as KVM requires for TR
    s.gdt.base = BOOT_GDT_START;
    s.gdt.limit = (GDT_PVH.len() * 8 - 1) as u16;
    s.idt.base = BOOT_IDT_START;
    s.idt.limit = 7;
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = tss;
    s.cr0 = X86_CR0_PE | 0x10; // protected mode, ET
    s.cr4 = 0;
    s.efer = 0;
    vcpu.set_sregs(&s)
        .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))
}

fn setup_sregs_long(vcpu: &VcpuFd) -> Result<(), Error> {
    let mut s = vcpu
        .get_sregs()
        .map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?;
    let code = segment(&GDT, 1, 0x08);
    let data = segment(&GDT, 2, 0x10);
    let tss = segment(&GDT, 3, 0x18);
    s.gdt.base = BOOT_GDT_START;
    s.gdt.limit = (GDT.len() * 8 - 1) as u16;
    s.idt.base = BOOT_IDT_START;
    s.idt.limit = 7;
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = tss;
    s.cr0 |= X86_CR0_PE | X86_CR0_PG;
    s.cr3 = PML4_START;
    s.cr4 |= X86_CR4_PAE;
    s.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&s)
        .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))
}

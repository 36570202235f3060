//! vCPU setup (CPUID, MSRs, registers, FPU, LAPIC) and the run loop.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;

use super::boot::{self, BootEntry, EntryMode};
use super::kvm::HostKind;
use super::snapshot::Raw;
pub use super::snapshot::VcpuState;
use super::{layout, ExitReason, Shared};
use crate::devices::Bus;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM vCPU setup failed: {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot write boot tables")]
    Boot(#[source] boot::Error),
    #[error("CPUID table too large")]
    Cpuid,
}

fn setup_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Setup { what, source }
}

/// Reads everything KVM keeps about a vCPU. `msr_index` is KVM's MSR index list: the MSRs it
/// refuses to read are left out.
pub fn save_state(fd: &VcpuFd, msr_index: &[u32], xsave: bool) -> Result<VcpuState, Error> {
    let mut msrs = Vec::new();
    let mut i = 0;
    while i < msr_index.len() {
        let entries: Vec<kvm_msr_entry> = msr_index[i..]
            .iter()
            .take(256)
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut m = Msrs::from_entries(&entries).map_err(|_| Error::Cpuid)?;
        let n = fd.get_msrs(&mut m).map_err(setup_err("KVM_GET_MSRS"))?;
        msrs.extend(m.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // KVM stops at the first MSR it cannot read: skip it.
        i += if n < entries.len() { n + 1 } else { n };
    }
    Ok(VcpuState {
        regs: Raw(fd.get_regs().map_err(setup_err("KVM_GET_REGS"))?),
        sregs: Raw(fd.get_sregs().map_err(setup_err("KVM_GET_SREGS"))?),
        fpu: Raw(fd.get_fpu().map_err(setup_err("KVM_GET_FPU"))?),
        xsave: if xsave {
            Some(Raw(fd.get_xsave().map_err(setup_err("KVM_GET_XSAVE"))?))
        } else {
            None
        },
        xcrs: if xsave {
            Some(Raw(fd.get_xcrs().map_err(setup_err("KVM_GET_XCRS"))?))
        } else {
            None
        },
        lapic: Raw(fd.get_lapic().map_err(setup_err("KVM_GET_LAPIC"))?),
        mp_state: Raw(fd.get_mp_state().map_err(setup_err("KVM_GET_MP_STATE"))?),
        events: Raw(fd
            .get_vcpu_events()
            .map_err(setup_err("KVM_GET_VCPU_EVENTS"))?),
        debugregs: Raw(fd
            .get_debug_regs()
            .map_err(setup_err("KVM_GET_DEBUGREGS"))?),
        msrs,
        tsc_khz: fd.get_tsc_khz().ok().filter(|&k| k > 0),
    })
}

/// Puts a saved state back, in the order KVM needs: CPUID first, the LAPIC before the MSRs
/// (TSC deadline), pending events last.
pub fn restore_state(
    fd: &VcpuFd,
    id: u8,
    count: u8,
    cpuid: &CpuId,
    kind: HostKind,
    st: &VcpuState,
) -> Result<(), Error> {
    let mut cpuid = cpuid.clone();
    filter_cpuid(&mut cpuid, id, count, kind);
    fd.set_cpuid2(&cpuid).map_err(setup_err("KVM_SET_CPUID2"))?;
    if let Some(khz) = st.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            if let Err(e) = fd.set_tsc_khz(khz) {
                log::warn!("vcpu {id}: cannot set the saved TSC frequency {khz} kHz: {e}");
            }
        }
    }
    fd.set_mp_state(st.mp_state.0)
        .map_err(setup_err("KVM_SET_MP_STATE"))?;
    fd.set_sregs(&st.sregs.0)
        .map_err(setup_err("KVM_SET_SREGS"))?;
    fd.set_regs(&st.regs.0).map_err(setup_err("KVM_SET_REGS"))?;
    match &st.xsave {
        // SAFETY: a kvm_xsave read back from KVM_GET_XSAVE of the same layout; the legacy
        // 4 KiB buffer is what KVM_SET_XSAVE reads.
        Some(x) => unsafe { fd.set_xsave(&x.0) }.map_err(setup_err("KVM_SET_XSAVE"))?,
        None => fd.set_fpu(&st.fpu.0).map_err(setup_err("KVM_SET_FPU"))?,
    }
    if let Some(x) = &st.xcrs {
        fd.set_xcrs(&x.0).map_err(setup_err("KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&st.debugregs.0)
        .map_err(setup_err("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&st.lapic.0)
        .map_err(setup_err("KVM_SET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = st
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let mut i = 0;
    while i < entries.len() {
        let chunk = &entries[i..(i + 256).min(entries.len())];
        let m = Msrs::from_entries(chunk).map_err(|_| Error::Cpuid)?;
        let n = fd.set_msrs(&m).map_err(setup_err("KVM_SET_MSRS"))?;
        if n < chunk.len() {
            log::debug!("vcpu {id}: KVM refused MSR {:#x}", chunk[n].index);
            i += n + 1;
        } else {
            i += n;
        }
    }
    fd.set_vcpu_events(&st.events.0)
        .map_err(setup_err("KVM_SET_VCPU_EVENTS"))
}

/// Filters KVM's supported CPUID for vCPU `id` of `count`.
pub fn filter_cpuid(cpuid: &mut CpuId, id: u8, count: u8, kind: HostKind) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // APIC id, logical processor count, CLFLUSH line size (8 * 8 bytes).
                e.ebx = (u32::from(id) << 24) | (u32::from(count) << 16) | (8 << 8);
                if count > 1 {
                    e.edx |= 1 << 28; // HTT
                }
                e.ecx |= 1 << 31; // running under a hypervisor
                if kind == HostKind::Hardware {
                    e.ecx &= !(1 << 5); // no VMX in the guest
                }
            }
            0xb | 0x1f => e.edx = u32::from(id),
            6 => e.ecx &= !(1 << 3), // no energy-performance bias
            _ => {}
        }
    }
}

fn seg_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
    let limit = (entry & 0xffff) | (((entry >> 48) & 0xf) << 16);
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            ((limit as u32) << 12) | 0xfff
        } else {
            limit as u32
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0x0000_f0ff) << 40)
}

/// GDT for the 64-bit boot protocol: null, code64, data, tss.
pub const GDT64: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
/// GDT for PVH (32-bit protected mode): null, code32, data, tss.
pub const GDT32: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Sets up vCPU `id` for booting at `entry` (only the boot vCPU gets registers; the others wait
/// for INIT/SIPI from the in-kernel LAPIC).
pub fn configure(
    fd: &VcpuFd,
    id: u8,
    count: u8,
    cpuid: &CpuId,
    entry: BootEntry,
    mem: &GuestMemoryMmap,
    kind: HostKind,
) -> Result<(), Error> {
    let mut cpuid = cpuid.clone();
    filter_cpuid(&mut cpuid, id, count, kind);
    fd.set_cpuid2(&cpuid).map_err(setup_err("KVM_SET_CPUID2"))?;

    // MSRs: a clean syscall/sysenter state, TSC 0, fast strings.
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        msr(0x174, 0),       // SYSENTER_CS
        msr(0x175, 0),       // SYSENTER_ESP
        msr(0x176, 0),       // SYSENTER_EIP
        msr(0xc000_0081, 0), // STAR
        msr(0xc000_0082, 0), // LSTAR
        msr(0xc000_0083, 0), // CSTAR
        msr(0xc000_0084, 0), // SYSCALL_MASK
        msr(0xc000_0102, 0), // KERNEL_GS_BASE
        msr(0x10, 0),        // TSC
        msr(0x1a0, 1),       // MISC_ENABLE: fast strings
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::Cpuid)?;
    let n = fd.set_msrs(&msrs).map_err(setup_err("KVM_SET_MSRS"))?;
    if n != entries.len() {
        log::debug!("vcpu {id}: KVM took {n} of {} boot MSRs", entries.len());
    }

    // FPU: x87 control word and MXCSR at their reset values.
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(setup_err("KVM_SET_FPU"))?;

    // LAPIC: LINT0 = ExtINT, LINT1 = NMI.
    let mut lapic = fd.get_lapic().map_err(setup_err("KVM_GET_LAPIC"))?;
    let lint0 = get_lapic_reg(&lapic, 0x350);
    let lint1 = get_lapic_reg(&lapic, 0x360);
    set_lapic_reg(&mut lapic, 0x350, (lint0 & !0x700) | 0x700);
    set_lapic_reg(&mut lapic, 0x360, (lint1 & !0x700) | 0x400);
    fd.set_lapic(&lapic).map_err(setup_err("KVM_SET_LAPIC"))?;

    if id != 0 {
        return Ok(());
    }

    let mut sregs = fd.get_sregs().map_err(setup_err("KVM_GET_SREGS"))?;
    let gdt = match entry.mode {
        EntryMode::Pvh => GDT32,
        EntryMode::Linux64 => GDT64,
    };
    boot::write_boot_tables(mem, &gdt).map_err(Error::Boot)?;
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;
    let code = seg_from_gdt(gdt[1], 1);
    let data = seg_from_gdt(gdt[2], 2);
    let tss = seg_from_gdt(gdt[3], 3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry.entry,
        ..Default::default()
    };
    match entry.mode {
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rbx = layout::PVH_INFO_START;
        }
        EntryMode::Linux64 => {
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rsp = layout::BOOT_STACK_POINTER;
            regs.rbp = layout::BOOT_STACK_POINTER;
            regs.rsi = layout::ZERO_PAGE_START;
        }
    }
    fd.set_sregs(&sregs).map_err(setup_err("KVM_SET_SREGS"))?;
    fd.set_regs(&regs).map_err(setup_err("KVM_SET_REGS"))?;
    Ok(())
}

fn get_lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = &l.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *b as _;
    }
}

/// Runs vCPU `id` until the VM stops. Exits are routed to the buses; the outcome is reported
/// through `shared`.
pub(crate) fn run_loop(mut fd: VcpuFd, id: u8, pio: &Bus, mmio: &Bus, shared: &Arc<Shared>) {
    loop {
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        if shared.pause.requested() {
            // An I/O or MMIO exit is complete only once KVM_RUN is entered again (RIP still points
            // at an OUT; an IN's data is not in RAX yet). Entering with immediate_exit finishes it
            // without running a guest instruction, so a snapshot neither repeats an OUT nor loses
            // an IN. With nothing pending it returns EINTR at once.
            fd.set_kvm_immediate_exit(1);
            let _ = fd.run();
            fd.set_kvm_immediate_exit(0);
            shared.pause.park(id, &shared.stopping, || {
                save_state(&fd, &shared.msr_index, shared.xsave).map_err(|e| format!("{e:#}"))
            });
            continue;
        }
        let reason = match fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                pio.read(u64::from(port), data, 0xff);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                pio.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                mmio.read(addr, data, 0);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::Hlt) => Some(ExitReason::Shutdown),
            Ok(VcpuExit::Shutdown) => Some(ExitReason::Reset),
            Ok(VcpuExit::SystemEvent(t, _)) if t == KVM_SYSTEM_EVENT_SHUTDOWN => {
                Some(ExitReason::Shutdown)
            }
            Ok(VcpuExit::SystemEvent(t, _)) if t == KVM_SYSTEM_EVENT_RESET => {
                Some(ExitReason::Reset)
            }
            Ok(VcpuExit::Intr) => None,
            Ok(VcpuExit::InternalError) => {
                let run = fd.get_kvm_run();
                // SAFETY: on KVM_EXIT_INTERNAL_ERROR the kernel filled the `internal` member of
                // the exit union; reading plain integers from it is sound.
                let (sub, ndata, data) = unsafe {
                    let i = &run.__bindgen_anon_1.internal;
                    (i.suberror, i.ndata, i.data)
                };
                let n = (ndata as usize).min(data.len());
                Some(ExitReason::Error(format!(
                    "vcpu {id}: KVM internal error (suberror {sub}{}) data {:x?}",
                    if sub == 1 { ": emulation failure" } else { "" },
                    &data[..n]
                )))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(ExitReason::Error(format!(
                "vcpu {id}: KVM entry failed (hardware reason {reason:#x} on cpu {cpu})"
            ))),
            Ok(other) => Some(ExitReason::Error(format!(
                "vcpu {id}: unexpected KVM exit {other:?}"
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(ExitReason::Error(format!("vcpu {id}: KVM_RUN failed: {e}"))),
        };
        if let Some(r) = reason {
            shared.request_exit(r);
            return;
        }
    }
}

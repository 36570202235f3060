//! The VMM process's seccomp filters, one per thread kind (docs/security.md): an allow-list of
//! what that thread calls, ioctl request numbers checked, every other call kills the process.
//!
//! The lists were taken from what the threads do (strace of a cold boot with a snapshot save, a
//! warm start, output and input, exec, a network run) and are checked by the VM tests: a call
//! missing here ends the run with a line naming the thread and the call.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::security::syscalls::number;

// KVM and tun ioctl request numbers (linux/kvm.h, linux/if_tun.h on x86_64).
const KVM_RUN: u64 = 0xae80;
const KVM_GET_REGS: u64 = 0x8090_ae81;
const KVM_GET_SREGS: u64 = 0x8138_ae83;
const KVM_GET_FPU: u64 = 0x81a0_ae8c;
const KVM_GET_MSRS: u64 = 0xc008_ae88;
const KVM_GET_LAPIC: u64 = 0x8400_ae8e;
const KVM_GET_XSAVE: u64 = 0x9000_aea4;
const KVM_GET_XSAVE2: u64 = 0x9000_aecf;
const KVM_GET_XCRS: u64 = 0x8188_aea6;
const KVM_GET_DEBUGREGS: u64 = 0x8080_aea1;
const KVM_GET_VCPU_EVENTS: u64 = 0x8040_ae9f;
const KVM_GET_MP_STATE: u64 = 0x8004_ae98;
const KVM_GET_TSC_KHZ: u64 = 0xaea3;
const KVM_KVMCLOCK_CTRL: u64 = 0xaead;
const KVM_IRQ_LINE: u64 = 0x4008_ae61;
const KVM_IRQ_LINE_STATUS: u64 = 0xc008_ae67;
const KVM_GET_IRQCHIP: u64 = 0xc208_ae62;
const KVM_GET_PIT2: u64 = 0x8070_ae9f;
const KVM_GET_CLOCK: u64 = 0x8030_ae7c;
const FIONBIO: u64 = 0x5421;

/// What every thread of ours calls: memory (the allocator), locks, time, signals for the vCPU
/// kick, reading and writing descriptors it already holds, and ending.
const COMMON: &[&str] = &[
    "read",
    "write",
    "readv",
    "writev",
    "close",
    "fcntl",
    "futex",
    "sched_yield",
    "nanosleep",
    "clock_nanosleep",
    "clock_gettime",
    "gettid",
    "getpid",
    "rt_sigreturn",
    "rt_sigprocmask",
    "sigaltstack",
    "mmap",
    "munmap",
    "mremap",
    "madvise",
    "mprotect",
    "brk",
    "getrandom",
    "sched_getaffinity",
    "exit",
    "exit_group",
    "restart_syscall",
];

/// A vCPU thread: KVM_RUN and what its exits lead to (device emulation writes to the channel's
/// pipes, the tap, the disk; interrupts), and saving its own state when a snapshot parks it.
const VCPU: &[&str] = &[
    "pread64",
    "pwrite64",
    "preadv",
    "pwritev",
    "fsync",
    "fdatasync",
    "lseek",
    "tgkill",
    "epoll_ctl",
];
const VCPU_IOCTLS: &[u64] = &[
    KVM_RUN,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_FPU,
    KVM_GET_MSRS,
    KVM_GET_LAPIC,
    KVM_GET_XSAVE,
    KVM_GET_XSAVE2,
    KVM_GET_XCRS,
    KVM_GET_DEBUGREGS,
    KVM_GET_VCPU_EVENTS,
    KVM_GET_MP_STATE,
    KVM_GET_TSC_KHZ,
    KVM_KVMCLOCK_CTRL,
    KVM_IRQ_LINE,
    KVM_IRQ_LINE_STATUS,
];

/// The event thread: epoll over queue notifications, the channel's pipes and the tap; block
/// I/O; stopping the vCPUs at the end (kicks, joins, unmapping guest memory).
const EVENT: &[&str] = &[
    "epoll_create1",
    "epoll_wait",
    "epoll_pwait",
    "epoll_ctl",
    "pread64",
    "pwrite64",
    "preadv",
    "pwritev",
    "fsync",
    "fdatasync",
    "lseek",
    "tgkill",
    "sendmsg",
    "sendto",
];
const EVENT_IOCTLS: &[u64] = &[KVM_IRQ_LINE, KVM_IRQ_LINE_STATUS, FIONBIO];

/// The control thread: requests from `rvmm run` (recvmsg), replies (sendmsg), snapshots (kicks
/// to park the vCPUs, the VM's interrupt controllers and clock, the files in the one writable
/// directory), a disk's size.
const CONTROL: &[&str] = &[
    "recvmsg",
    "sendmsg",
    "sendto",
    "tgkill",
    "lseek",
    "fstat",
    "statx",
    "newfstatat",
    "openat",
    "mkdir",
    "ftruncate",
    "fsync",
    "pwrite64",
];
const CONTROL_IOCTLS: &[u64] = &[KVM_GET_IRQCHIP, KVM_GET_PIT2, KVM_GET_CLOCK];

/// The virtio-fs thread: its loop over the device's queue notifications, and the file calls of
/// a passthrough server, all relative to descriptors it holds (no path of the jail is opened
/// by name but /proc/self/fd entries): openat2 beneath a node, reopening through
/// /proc/self/fd, making, removing, renaming and linking names, owners, modes, times, I/O.
const FS: &[&str] = &[
    "epoll_create1",
    "epoll_wait",
    "epoll_pwait",
    "epoll_ctl",
    "tgkill",
    "openat",
    "openat2",
    "newfstatat",
    "fstatfs",
    "fchownat",
    "fchmodat",
    "fchown",
    "fchmod",
    "utimensat",
    "mkdirat",
    "mknodat",
    "symlinkat",
    "linkat",
    "unlinkat",
    "renameat2",
    "readlinkat",
    "getdents64",
    "lseek",
    "pread64",
    "pwrite64",
    "ftruncate",
    "fsync",
    "fdatasync",
];

/// Which thread a filter is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Thread {
    Vcpu,
    Event,
    Control,
    Fs,
}

impl Thread {
    fn lists(self) -> (&'static [&'static str], &'static [u64]) {
        match self {
            Thread::Vcpu => (VCPU, VCPU_IOCTLS),
            Thread::Event => (EVENT, EVENT_IOCTLS),
            Thread::Control => (CONTROL, CONTROL_IOCTLS),
            Thread::Fs => (FS, EVENT_IOCTLS),
        }
    }
}

/// The compiled filter for `thread`.
pub(super) fn program(thread: Thread) -> Result<BpfProgram, String> {
    let (calls, ioctls) = thread.lists();
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for name in COMMON.iter().chain(calls) {
        let nr = number(name).ok_or_else(|| format!("unknown system call {name}"))?;
        rules.insert(i64::from(nr), Vec::new());
    }
    // Memory may be mapped and protected, never executable: code a guest smuggles into the
    // VMM's memory cannot be made to run.
    for name in ["mmap", "mprotect"] {
        let nr = number(name).ok_or_else(|| format!("unknown system call {name}"))?;
        let no_exec = SeccompCondition::new(
            2,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )
        .and_then(|c| SeccompRule::new(vec![c]))
        .map_err(|e| e.to_string())?;
        rules.insert(i64::from(nr), vec![no_exec]);
    }
    let ioctl_rules = ioctls
        .iter()
        .map(|&req| {
            SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, req)
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(i64::from(number("ioctl").unwrap_or(16)), ioctl_rules);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| e.to_string())?;
    BpfProgram::try_from(filter).map_err(|e| e.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_kind_compiles_and_no_thread_may_open_or_exec_or_fork() {
        for t in [Thread::Vcpu, Thread::Event, Thread::Control, Thread::Fs] {
            assert!(!program(t).unwrap().is_empty());
            let (calls, _) = t.lists();
            for forbidden in [
                "execve", "clone", "clone3", "fork", "socket", "connect", "ptrace",
            ] {
                assert!(!calls.contains(&forbidden) && !COMMON.contains(&forbidden));
            }
        }
        // Only the control thread opens files, and only because it writes snapshots.
        assert!(!VCPU.contains(&"openat") && !EVENT.contains(&"openat"));
    }

    /// The filter, applied for real in a child: data mappings work, an executable one kills.
    #[test]
    fn a_filtered_thread_may_map_memory_but_never_executable_memory() {
        for t in [Thread::Vcpu, Thread::Event, Thread::Control] {
            let prog = program(t).unwrap();
            // SAFETY: the child makes raw system calls only, on data made before the fork.
            match unsafe { nix::unistd::fork() }.unwrap() {
                // SAFETY: raw calls on a private anonymous mapping of our own.
                nix::unistd::ForkResult::Child => unsafe {
                    if seccompiler::apply_filter(&prog).is_err() {
                        libc::_exit(2);
                    }
                    let rw = libc::PROT_READ | libc::PROT_WRITE;
                    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
                    let p = libc::mmap(std::ptr::null_mut(), 4096, rw, flags, -1, 0);
                    if p == libc::MAP_FAILED || libc::mprotect(p, 4096, libc::PROT_READ) != 0 {
                        libc::_exit(3);
                    }
                    libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_EXEC);
                    libc::_exit(0)
                },
                nix::unistd::ForkResult::Parent { child } => {
                    let st = nix::sys::wait::waitpid(child, None).unwrap();
                    assert_eq!(
                        st,
                        nix::sys::wait::WaitStatus::Signaled(
                            child,
                            nix::sys::signal::Signal::SIGSYS,
                            false
                        ),
                        "{t:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn kvm_run_is_for_vcpus_only() {
        // KVM_RUN belongs to the vCPU threads alone.
        assert!(!EVENT_IOCTLS.contains(&KVM_RUN) && !CONTROL_IOCTLS.contains(&KVM_RUN));
    }
}

//! Capabilities (Docker's default set, `--cap-add`, `--cap-drop`, `--privileged`), no_new_privs
//! and seccomp (Docker's default profile, or one in Docker's JSON format).
//!
//! The seccomp profile is Docker's allow-list (moby/profiles/seccomp/default.json) for x86_64:
//! the unconditional allow set plus what Docker allows to the default capabilities
//! (chroot, ptrace and process_vm_* on kernels ≥ 4.8, arch_prctl, modify_ldt, personality,
//! clone/clone3). Everything else (mount, unshare, setns, keyctl, add_key, bpf, perf_event_open,
//! kexec, reboot, swapon, init_module, userfaultfd, …) fails with EPERM.

pub mod profile;
pub mod syscalls;

use caps::{Capability, CapsHashSet};
use seccompiler::BpfProgram;

pub use profile::Profile;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown capability {0:?}")]
    UnknownCapability(String),
    #[error("--cap-add {0} needs a devices cgroup (cgroup v1) in container isolation")]
    Mknod(String),
    #[error("invalid --security-opt {0:?} (rvmm knows no-new-privileges[=true|false], seccomp=PROFILE.json|unconfined)")]
    Opt(String),
    #[error("--security-opt {0:?}: rvmm applies no AppArmor or SELinux profile")]
    Lsm(String),
    #[error("reading seccomp profile {path}: {source}")]
    ReadProfile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Profile {
        path: String,
        #[source]
        source: profile::Error,
    },
}

/// The seccomp filter a run asks for.
#[derive(Debug, Clone, Default)]
pub enum Seccomp {
    /// Docker's default profile.
    #[default]
    Default,
    /// `seccomp=unconfined`: no filter.
    Unconfined,
    /// `seccomp=PROFILE.json`.
    Profile(Box<Profile>),
}

/// What `--privileged`, `--cap-add`, `--cap-drop` and `--security-opt` ask for. Checked when
/// parsed (before anything is created); turned into the workload's [`rvmm_proto::Security`] by
/// [`resolve`] once the isolation is known.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub privileged: bool,
    /// Capability numbers; `ALL` is [`ALL_CAPS`].
    pub cap_add: u64,
    pub cap_drop: u64,
    pub no_new_privs: bool,
    pub seccomp: Seccomp,
}

/// Every capability rvmm knows (up to CAP_CHECKPOINT_RESTORE, 40). A kernel that lacks some keeps
/// the ones it has.
pub const ALL_CAPS: u64 = (1 << 41) - 1;

/// The number of capability `name`: any case, with or without `CAP_`.
pub fn cap_index(name: &str) -> Option<u8> {
    let up = name.trim().to_ascii_uppercase();
    let full = if up.starts_with("CAP_") {
        up
    } else {
        format!("CAP_{up}")
    };
    full.parse::<Capability>().ok().map(|c| c.index())
}

/// `--cap-add`/`--cap-drop` values (Docker's syntax: names with or without `CAP_`, any case, or
/// `ALL`) as a mask.
pub fn parse_caps(names: &[String]) -> Result<u64, Error> {
    let mut m = 0;
    for n in names {
        if n.trim().eq_ignore_ascii_case("all") {
            m |= ALL_CAPS;
            continue;
        }
        let i = cap_index(n).ok_or_else(|| Error::UnknownCapability(n.clone()))?;
        m |= 1 << i;
    }
    Ok(m)
}

impl Request {
    /// Applies one `--security-opt` value (Docker's `KEY=VALUE`, or the older `KEY:VALUE`).
    pub fn security_opt(&mut self, opt: &str) -> Result<(), Error> {
        let (k, v) = match opt.split_once(['=', ':']) {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        match (k, v) {
            ("no-new-privileges", None | Some("true")) => self.no_new_privs = true,
            ("no-new-privileges", Some("false")) => self.no_new_privs = false,
            ("seccomp", Some("unconfined")) => self.seccomp = Seccomp::Unconfined,
            ("seccomp", Some("builtin")) => self.seccomp = Seccomp::Default,
            ("seccomp", Some(path)) if !path.is_empty() => {
                let json = std::fs::read(path).map_err(|source| Error::ReadProfile {
                    path: path.to_string(),
                    source,
                })?;
                let p = Profile::parse(&json).map_err(|source| Error::Profile {
                    path: path.to_string(),
                    source,
                })?;
                self.seccomp = Seccomp::Profile(Box::new(p));
            }
            // What rvmm does anyway: no LSM profile is applied.
            ("apparmor", Some("unconfined")) | ("label", Some("disable")) => {}
            ("apparmor" | "label", Some(_)) => return Err(Error::Lsm(opt.to_string())),
            _ => return Err(Error::Opt(opt.to_string())),
        }
        Ok(())
    }
}

/// The workload's privileges for `req`, Docker's way: `--privileged` gets every capability and no
/// seccomp filter; otherwise the default set with `--cap-drop` removed and `--cap-add` added
/// (`--cap-drop ALL` keeps only the added ones, `--cap-add ALL` all but the dropped ones), and the seccomp profile asked for, whose
/// capability-dependent rules follow the resulting set. `allow_mknod`: CAP_MKNOD may be granted
/// (a VM, or a container with a devices cgroup).
pub fn resolve(req: &Request, allow_mknod: bool) -> Result<rvmm_proto::Security, Error> {
    let mknod = 1u64 << Capability::CAP_MKNOD.index();
    let caps = if req.privileged {
        ALL_CAPS
    } else {
        if !allow_mknod && req.cap_add & mknod != 0 && req.cap_add != ALL_CAPS {
            return Err(Error::Mknod("MKNOD".into()));
        }
        let base = mask(&default_caps(allow_mknod));
        let caps = if req.cap_drop == ALL_CAPS {
            req.cap_add
        } else if req.cap_add == ALL_CAPS {
            ALL_CAPS & !req.cap_drop
        } else {
            (base & !req.cap_drop) | req.cap_add
        };
        if allow_mknod {
            caps
        } else {
            caps & !mknod
        }
    };
    let seccomp = if req.privileged {
        Vec::new()
    } else {
        match &req.seccomp {
            Seccomp::Default => program_for(caps),
            Seccomp::Unconfined => Vec::new(),
            Seccomp::Profile(p) => p.compile(caps).map_err(|source| Error::Profile {
                path: "the seccomp profile".into(),
                source,
            })?,
        }
    };
    Ok(rvmm_proto::Security {
        enforce: true,
        caps,
        seccomp,
        no_new_privs: req.no_new_privs,
        ambient: 0,
    })
}

fn mask(set: &CapsHashSet) -> u64 {
    set.iter().fold(0u64, |m, c| m | (1u64 << c.index()))
}

fn program_for(caps: u64) -> Vec<(u16, u8, u8, u32)> {
    let mut allowed = ALLOWED.to_vec();
    for (cap, calls) in CAP_SYSCALLS {
        if caps & (1 << cap.index()) != 0 {
            allowed.extend(
                calls
                    .iter()
                    .filter_map(|n| syscalls::number(n).map(i64::from)),
            );
        }
    }
    allow_list_program(&allowed, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32)
        .iter()
        .map(|f| (f.code, f.jt, f.jf, f.k))
        .collect()
}

/// What Docker's default profile allows beyond its base list when a capability is granted.
const CAP_SYSCALLS: &[(Capability, &[&str])] = &[
    (
        Capability::CAP_SYS_ADMIN,
        &[
            "bpf",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount2",
            "unshare",
        ],
    ),
    (Capability::CAP_SYS_BOOT, &["reboot"]),
    (
        Capability::CAP_SYS_MODULE,
        &["delete_module", "init_module", "finit_module"],
    ),
    (Capability::CAP_SYS_PACCT, &["acct"]),
    (
        Capability::CAP_SYS_PTRACE,
        &["kcmp", "pidfd_getfd", "process_madvise"],
    ),
    (Capability::CAP_SYS_RAWIO, &["iopl", "ioperm"]),
    (Capability::CAP_SYS_TIME, &["settimeofday", "clock_settime"]),
    (Capability::CAP_SYS_TTY_CONFIG, &["vhangup"]),
    (
        Capability::CAP_SYS_NICE,
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
    ),
    (Capability::CAP_SYSLOG, &["syslog"]),
    (Capability::CAP_BPF, &["bpf"]),
    (Capability::CAP_PERFMON, &["perf_event_open"]),
];

/// Docker's default capability set.
fn default_caps(allow_mknod: bool) -> CapsHashSet {
    use Capability::*;
    let mut s: CapsHashSet = [
        CAP_CHOWN,
        CAP_DAC_OVERRIDE,
        CAP_FSETID,
        CAP_FOWNER,
        CAP_NET_RAW,
        CAP_SETGID,
        CAP_SETUID,
        CAP_SETFCAP,
        CAP_SETPCAP,
        CAP_NET_BIND_SERVICE,
        CAP_SYS_CHROOT,
        CAP_KILL,
        CAP_AUDIT_WRITE,
    ]
    .into_iter()
    .collect();
    if allow_mknod {
        s.insert(CAP_MKNOD);
    }
    s
}

/// Compiles Docker's default profile to BPF (in the parent, before cloning).
///
/// The profile is an allow-list, that is a step function of the syscall number, so the program
/// binary-searches the boundaries of the allowed runs: any call costs the arch check and about eight
/// comparisons. (seccompiler's generic compiler tests the allowed numbers one after the other: two
/// instructions per allowed number below the one called, 1505 instructions in all.) Allowed calls
/// skip the filter either way, through the kernel's per-syscall action cache; but the kernel fills
/// that cache at install by running the filter for every syscall number, and denied calls run it
/// each time. In the guest, whose kernel kvm_pvm emulates, the install fell from 1.73 s to 0.57 s.
pub fn seccomp_program() -> BpfProgram {
    allow_list_program(ALLOWED, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32)
}

/// BPF_LD | BPF_W | BPF_ABS (both of the first are 0).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;
/// `offsetof(struct seccomp_data, nr)` and `arch`.
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;
/// `AUDIT_ARCH_X86_64`: EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE.
const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> seccompiler::sock_filter {
    seccompiler::sock_filter { code, jt, jf, k }
}

/// A filter that allows exactly the syscall numbers in `allowed` for x86_64 (x32 numbers, which have
/// bit 30 set, are above every allowed one and so denied), returns `deny` for the others, and kills
/// the process for another architecture.
fn allow_list_program(allowed: &[i64], deny: u32) -> BpfProgram {
    let mut nrs: Vec<u32> = allowed
        .iter()
        .map(|&n| u32::try_from(n).expect("syscall numbers are small"))
        .collect();
    nrs.sort_unstable();
    nrs.dedup();
    // Where the verdict flips, ascending: the start of each run of allowed numbers and the number
    // after its end. Below the first boundary the verdict is deny; past an odd count of them, allow.
    let mut bounds = Vec::new();
    for (i, &n) in nrs.iter().enumerate() {
        if i == 0 || nrs[i - 1] + 1 != n {
            bounds.push(n);
        }
        if nrs.get(i + 1) != Some(&(n + 1)) {
            bounds.push(n + 1);
        }
    }
    let mut prog = vec![
        insn(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_ARCH),
        insn(BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        insn(BPF_RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        insn(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_NR),
    ];
    search_tree(&bounds, false, deny, &mut prog);
    prog
}

/// Emits the search over `bounds` (sorted); `allowed_below` is the verdict for a number below all of
/// them. Each node is `jge bound`, falling through to the lower half, jumping over it to the upper.
fn search_tree(bounds: &[u32], allowed_below: bool, deny: u32, out: &mut BpfProgram) {
    if bounds.is_empty() {
        let verdict = if allowed_below {
            libc::SECCOMP_RET_ALLOW
        } else {
            deny
        };
        out.push(insn(BPF_RET_K, 0, 0, verdict));
        return;
    }
    let mid = bounds.len() / 2;
    let node = out.len();
    out.push(insn(BPF_JGE_K, 0, 0, bounds[mid]));
    search_tree(&bounds[..mid], allowed_below, deny, out);
    let lower = out.len() - node - 1;
    // Offsets are 8 bits: fine for a few hundred boundaries (Docker's list has about a hundred).
    out[node].jt = u8::try_from(lower).expect("seccomp search tree too wide for BPF jumps");
    let upper_allowed = allowed_below ^ (mid % 2 == 0);
    search_tree(&bounds[mid + 1..], upper_allowed, deny, out);
}

use libc::*;

/// Docker's default allow-list, x86_64 numbers.
const ALLOWED: &[i64] = &[
    SYS_accept,
    SYS_accept4,
    SYS_access,
    SYS_adjtimex,
    SYS_alarm,
    SYS_arch_prctl,
    SYS_bind,
    SYS_brk,
    SYS_capget,
    SYS_capset,
    SYS_chdir,
    SYS_chmod,
    SYS_chown,
    SYS_chroot,
    SYS_clock_adjtime,
    SYS_clock_getres,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_clone,
    SYS_clone3,
    SYS_close,
    SYS_close_range,
    SYS_connect,
    SYS_copy_file_range,
    SYS_creat,
    SYS_dup,
    SYS_dup2,
    SYS_dup3,
    SYS_epoll_create,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_ctl_old,
    SYS_epoll_pwait,
    SYS_epoll_pwait2,
    SYS_epoll_wait,
    SYS_epoll_wait_old,
    SYS_eventfd,
    SYS_eventfd2,
    SYS_execve,
    SYS_execveat,
    SYS_exit,
    SYS_exit_group,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_fadvise64,
    SYS_fallocate,
    SYS_fanotify_mark,
    SYS_fchdir,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_fchown,
    SYS_fchownat,
    SYS_fcntl,
    SYS_fdatasync,
    SYS_fgetxattr,
    SYS_flistxattr,
    SYS_flock,
    SYS_fork,
    SYS_fremovexattr,
    SYS_fsetxattr,
    SYS_fstat,
    SYS_fstatfs,
    SYS_fsync,
    SYS_ftruncate,
    SYS_futex,
    SYS_futex_waitv,
    SYS_futimesat,
    SYS_getcpu,
    SYS_getcwd,
    SYS_getdents,
    SYS_getdents64,
    SYS_getegid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getgroups,
    SYS_getitimer,
    SYS_getpeername,
    SYS_getpgid,
    SYS_getpgrp,
    SYS_getpid,
    SYS_getppid,
    SYS_getpriority,
    SYS_getrandom,
    SYS_getresgid,
    SYS_getresuid,
    SYS_getrlimit,
    SYS_get_robust_list,
    SYS_getrusage,
    SYS_getsid,
    SYS_getsockname,
    SYS_getsockopt,
    SYS_get_thread_area,
    SYS_gettid,
    SYS_gettimeofday,
    SYS_getuid,
    SYS_getxattr,
    SYS_inotify_add_watch,
    SYS_inotify_init,
    SYS_inotify_init1,
    SYS_inotify_rm_watch,
    SYS_io_cancel,
    SYS_ioctl,
    SYS_io_destroy,
    SYS_io_getevents,
    333,
    /* io_pgetevents */ SYS_ioprio_get,
    SYS_ioprio_set,
    SYS_io_setup,
    SYS_io_submit,
    SYS_io_uring_enter,
    SYS_io_uring_register,
    SYS_io_uring_setup,
    SYS_kill,
    SYS_landlock_add_rule,
    SYS_landlock_create_ruleset,
    SYS_landlock_restrict_self,
    SYS_lchown,
    SYS_lgetxattr,
    SYS_link,
    SYS_linkat,
    SYS_listen,
    SYS_listxattr,
    SYS_llistxattr,
    SYS_lremovexattr,
    SYS_lseek,
    SYS_lsetxattr,
    SYS_lstat,
    SYS_madvise,
    SYS_membarrier,
    SYS_memfd_create,
    SYS_memfd_secret,
    SYS_mincore,
    SYS_mkdir,
    SYS_mkdirat,
    SYS_mknod,
    SYS_mknodat,
    SYS_mlock,
    SYS_mlock2,
    SYS_mlockall,
    SYS_mmap,
    SYS_modify_ldt,
    SYS_mprotect,
    SYS_mq_getsetattr,
    SYS_mq_notify,
    SYS_mq_open,
    SYS_mq_timedreceive,
    SYS_mq_timedsend,
    SYS_mq_unlink,
    SYS_mremap,
    SYS_msgctl,
    SYS_msgget,
    SYS_msgrcv,
    SYS_msgsnd,
    SYS_msync,
    SYS_munlock,
    SYS_munlockall,
    SYS_munmap,
    SYS_name_to_handle_at,
    SYS_nanosleep,
    SYS_newfstatat,
    SYS_open,
    SYS_openat,
    SYS_openat2,
    SYS_pause,
    SYS_personality,
    SYS_pidfd_getfd,
    SYS_pidfd_open,
    SYS_pidfd_send_signal,
    SYS_pipe,
    SYS_pipe2,
    SYS_pkey_alloc,
    SYS_pkey_free,
    SYS_pkey_mprotect,
    SYS_poll,
    SYS_ppoll,
    SYS_prctl,
    SYS_pread64,
    SYS_preadv,
    SYS_preadv2,
    SYS_prlimit64,
    SYS_process_mrelease,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_pselect6,
    SYS_ptrace,
    SYS_pwrite64,
    SYS_pwritev,
    SYS_pwritev2,
    SYS_read,
    SYS_readahead,
    SYS_readlink,
    SYS_readlinkat,
    SYS_readv,
    SYS_recvfrom,
    SYS_recvmmsg,
    SYS_recvmsg,
    SYS_remap_file_pages,
    SYS_removexattr,
    SYS_rename,
    SYS_renameat,
    SYS_renameat2,
    SYS_restart_syscall,
    SYS_rmdir,
    SYS_rseq,
    SYS_rt_sigaction,
    SYS_rt_sigpending,
    SYS_rt_sigprocmask,
    SYS_rt_sigqueueinfo,
    SYS_rt_sigreturn,
    SYS_rt_sigsuspend,
    SYS_rt_sigtimedwait,
    SYS_rt_tgsigqueueinfo,
    SYS_sched_getaffinity,
    SYS_sched_getattr,
    SYS_sched_getparam,
    SYS_sched_get_priority_max,
    SYS_sched_get_priority_min,
    SYS_sched_getscheduler,
    SYS_sched_rr_get_interval,
    SYS_sched_setaffinity,
    SYS_sched_setattr,
    SYS_sched_setparam,
    SYS_sched_setscheduler,
    SYS_sched_yield,
    SYS_seccomp,
    SYS_select,
    SYS_semctl,
    SYS_semget,
    SYS_semop,
    SYS_semtimedop,
    SYS_sendfile,
    SYS_sendmmsg,
    SYS_sendmsg,
    SYS_sendto,
    SYS_setfsgid,
    SYS_setfsuid,
    SYS_setgid,
    SYS_setgroups,
    SYS_setitimer,
    SYS_setpgid,
    SYS_setpriority,
    SYS_setregid,
    SYS_setresgid,
    SYS_setresuid,
    SYS_setreuid,
    SYS_setrlimit,
    SYS_set_robust_list,
    SYS_setsid,
    SYS_setsockopt,
    SYS_set_thread_area,
    SYS_set_tid_address,
    SYS_setuid,
    SYS_setxattr,
    SYS_shmat,
    SYS_shmctl,
    SYS_shmdt,
    SYS_shmget,
    SYS_shutdown,
    SYS_sigaltstack,
    SYS_signalfd,
    SYS_signalfd4,
    SYS_socket,
    SYS_socketpair,
    SYS_splice,
    SYS_stat,
    SYS_statfs,
    SYS_statx,
    SYS_symlink,
    SYS_symlinkat,
    SYS_sync,
    SYS_sync_file_range,
    SYS_syncfs,
    SYS_sysinfo,
    SYS_tee,
    SYS_tgkill,
    SYS_time,
    SYS_timer_create,
    SYS_timer_delete,
    SYS_timer_getoverrun,
    SYS_timer_gettime,
    SYS_timer_settime,
    SYS_timerfd_create,
    SYS_timerfd_gettime,
    SYS_timerfd_settime,
    SYS_times,
    SYS_tkill,
    SYS_truncate,
    SYS_umask,
    SYS_uname,
    SYS_unlink,
    SYS_unlinkat,
    SYS_utime,
    SYS_utimensat,
    SYS_utimes,
    SYS_vfork,
    SYS_vmsplice,
    SYS_wait4,
    SYS_waitid,
    SYS_write,
    SYS_writev,
];

/// Docker's defaults as the [`rvmm_proto::Security`] of a workload, which the container child and
/// rvmm-init apply alike. `allow_mknod`: keep CAP_MKNOD (in a VM, or where a devices cgroup
/// limits what a node may open).
pub fn docker_default(allow_mknod: bool) -> rvmm_proto::Security {
    let caps = mask(&default_caps(allow_mknod));
    rvmm_proto::Security {
        enforce: true,
        caps,
        seccomp: program_for(caps),
        no_new_privs: false,
        ambient: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_compiles_and_blocks_the_dangerous() {
        for blocked in [
            SYS_mount,
            SYS_umount2,
            SYS_unshare,
            SYS_setns,
            SYS_keyctl,
            SYS_add_key,
            SYS_bpf,
            SYS_reboot,
            SYS_pivot_root,
            SYS_init_module,
            SYS_kexec_load,
            SYS_perf_event_open,
            SYS_userfaultfd,
            SYS_open_by_handle_at,
        ] {
            assert!(!ALLOWED.contains(&blocked), "{blocked}");
        }
        assert_eq!(default_caps(true).len(), 14);
    }

    /// Runs a classic BPF program of the instructions the compiler emits (and JEQ/JA, which
    /// seccompiler's programs use) against `seccomp_data { nr, arch }`: (verdict, instructions run).
    fn run(prog: &[seccompiler::sock_filter], nr: u32, arch: u32) -> (u32, usize) {
        let (mut pc, mut acc, mut steps) = (0usize, 0u32, 0usize);
        loop {
            let i = &prog[pc];
            steps += 1;
            pc += 1;
            match i.code {
                BPF_LD_W_ABS => {
                    acc = match i.k {
                        SECCOMP_DATA_NR => nr,
                        SECCOMP_DATA_ARCH => arch,
                        k => panic!("load of offset {k}"),
                    }
                }
                BPF_JEQ_K | BPF_JGE_K => {
                    let hit = if i.code == BPF_JEQ_K {
                        acc == i.k
                    } else {
                        acc >= i.k
                    };
                    pc += usize::from(if hit { i.jt } else { i.jf });
                }
                0x05 => pc += i.k as usize, // BPF_JMP | BPF_JA
                BPF_RET_K => return (i.k, steps),
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    const EPERM_RET: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;

    #[test]
    fn search_tree_allows_exactly_the_list_in_a_few_steps() {
        let prog = seccomp_program();
        let mut numbers: Vec<u32> = (0..1024).collect();
        // x32 syscalls (bit 30), the largest numbers, and just past each allowed one.
        numbers.extend([
            0x4000_0000,
            0x4000_0001,
            0x4000_0000 + 39,
            u32::MAX - 1,
            u32::MAX,
        ]);
        let mut worst = 0;
        for nr in numbers {
            let (verdict, steps) = run(&prog, nr, AUDIT_ARCH_X86_64);
            let want = if ALLOWED.contains(&i64::from(nr)) {
                libc::SECCOMP_RET_ALLOW
            } else {
                EPERM_RET
            };
            assert_eq!(verdict, want, "syscall {nr}");
            worst = worst.max(steps);
        }
        // Arch check (3) + load (1) + a balanced search + the return.
        assert!(worst <= 14, "{worst} instructions for one call");
        // Another architecture (i386) is killed before the number is looked at.
        assert_eq!(
            run(&prog, 0, 3 | 0x4000_0000).0,
            libc::SECCOMP_RET_KILL_PROCESS
        );
    }

    #[test]
    fn search_tree_matches_seccompilers_linear_program() {
        use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
        let linear: BpfProgram = SeccompFilter::new(
            ALLOWED.iter().map(|&n| (n, vec![])).collect(),
            SeccompAction::Errno(libc::EPERM as u32),
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .expect("the profile is a valid seccompiler filter")
        .try_into()
        .expect("seccompiler compiles it");
        let tree = seccomp_program();
        let (mut linear_steps, mut tree_steps) = (0, 0);
        for nr in (0..600).chain([0x4000_0000 + 1, u32::MAX]) {
            let (a, n) = run(&linear, nr, AUDIT_ARCH_X86_64);
            let (b, m) = run(&tree, nr, AUDIT_ARCH_X86_64);
            assert_eq!(a, b, "syscall {nr}");
            linear_steps += n;
            tree_steps += m;
        }
        assert!(
            tree_steps * 10 < linear_steps,
            "{tree_steps} vs {linear_steps}"
        );
    }

    #[test]
    fn search_tree_edge_cases() {
        for allowed in [
            &[][..],
            &[0],
            &[5],
            &[0, 1, 2],
            &[1, 3, 5, 7, 9, 11],
            &[0, 2, 3, 4, 400],
        ] {
            let prog = allow_list_program(allowed, EPERM_RET);
            for nr in 0..450 {
                let want = if allowed.contains(&i64::from(nr)) {
                    libc::SECCOMP_RET_ALLOW
                } else {
                    EPERM_RET
                };
                assert_eq!(
                    run(&prog, nr, AUDIT_ARCH_X86_64).0,
                    want,
                    "{allowed:?} {nr}"
                );
            }
        }
    }
}

#[cfg(test)]
mod request_tests {
    use super::*;

    #[test]
    fn default_request_is_the_boot_security() {
        // A VM run without privilege flags must match the initramfs's security (and so use the
        // zygote and the snapshot's installed filter).
        assert_eq!(
            resolve(&Request::default(), true).expect("resolve"),
            docker_default(true)
        );
        assert!(!docker_default(true).no_new_privs);
    }

    #[test]
    fn docker_capability_rules() {
        let bit = |c: Capability| 1u64 << c.index();
        let base = mask(&default_caps(true));
        let req = |add: &[&str], drop: &[&str]| Request {
            cap_add: parse_caps(&add.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("add"),
            cap_drop: parse_caps(&drop.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("drop"),
            ..Default::default()
        };
        let caps = |r: &Request| resolve(r, true).expect("resolve").caps;
        assert_eq!(
            caps(&req(&["sys_admin"], &["CAP_NET_RAW"])),
            (base | bit(Capability::CAP_SYS_ADMIN)) & !bit(Capability::CAP_NET_RAW)
        );
        assert_eq!(caps(&req(&["chown"], &["ALL"])), bit(Capability::CAP_CHOWN));
        assert_eq!(
            caps(&req(&["all"], &["mknod"])),
            ALL_CAPS & !bit(Capability::CAP_MKNOD)
        );
        assert!(parse_caps(&["CAP_NOPE".into()]).is_err());
        // Without a devices cgroup MKNOD is never granted, and asking for it is refused.
        assert!(resolve(&req(&["MKNOD"], &[]), false).is_err());
        assert_eq!(
            caps(&Request {
                privileged: true,
                ..Default::default()
            }),
            ALL_CAPS
        );
    }

    #[test]
    fn security_opt_syntax() {
        let mut r = Request::default();
        for (o, nnp) in [
            ("no-new-privileges", true),
            ("no-new-privileges=false", false),
            ("no-new-privileges:true", true),
        ] {
            r.security_opt(o).expect(o);
            assert_eq!(r.no_new_privs, nnp, "{o}");
        }
        r.security_opt("seccomp=unconfined").expect("unconfined");
        assert!(matches!(r.seccomp, Seccomp::Unconfined));
        assert!(r.security_opt("apparmor=unconfined").is_ok());
        for bad in ["bogus", "apparmor=x", "no-new-privileges=maybe", "seccomp="] {
            let e = r.security_opt(bad).expect_err(bad).to_string();
            assert!(!e.contains('\n'), "{e}");
        }
    }
}

//! The workload's identity and privileges, applied right before exec: resource limits, bounding
//! set, groups, uid/gid, capabilities, working directory, seccomp.

use std::ffi::CString;

use rvmm_proto::{Rlimit, RunSpec, Security};

use crate::{c, check, mkdir_p, Failure};

/// Shrinks the bounding set to `caps` (bit n = capability n) and clears the ambient set. Call
/// before changing user: it needs CAP_SETPCAP.
pub fn drop_bounding(caps: u64) -> Result<(), Failure> {
    for cap in 0..64u64 {
        if caps & (1 << cap) == 0 {
            // SAFETY: prctl with integer arguments.
            let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
            // EINVAL: a capability this kernel does not know, nothing to drop.
            if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                return Err(Failure::os(format!("dropping capability {cap}")));
            }
        }
    }
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    Ok(())
}

/// Sets the effective and permitted sets to `caps` (less what this process does not have: the
/// capabilities a kernel does not know) and the inheritable set to `inheritable` within them
/// (capset(2), version 3: two 32-bit words).
pub fn set_caps(caps: u64, inheritable: u64) -> Result<(), Failure> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut h = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut now = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capget with a valid header and room for two data words.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut h as *mut Header, now.as_mut_ptr()) };
    check(r as libc::c_int, || "reading capabilities".into())?;
    let have = u64::from(now[0].permitted) | (u64::from(now[1].permitted) << 32);
    let caps = caps & have;
    let inh = inheritable & caps;
    let (lo, hi) = (caps as u32, (caps >> 32) as u32);
    let d = [
        Data {
            effective: lo,
            permitted: lo,
            inheritable: inh as u32,
        },
        Data {
            effective: hi,
            permitted: hi,
            inheritable: (inh >> 32) as u32,
        },
    ];
    // SAFETY: capset with a valid header and two data words, as version 3 requires.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()) };
    check(r as libc::c_int, || "setting capabilities".into())
}

/// Sets no_new_privs.
pub fn set_no_new_privs() -> Result<(), Failure> {
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check(r, || "no_new_privs".into())
}

/// Installs the classic BPF `program` as a seccomp filter. Without no_new_privs set, the kernel
/// requires CAP_SYS_ADMIN: call it before the user and capabilities change.
pub fn install_seccomp(program: &[(u16, u8, u8, u32)]) -> Result<(), Failure> {
    let filter: Vec<libc::sock_filter> = program
        .iter()
        .map(|&(code, jt, jf, k)| libc::sock_filter { code, jt, jf, k })
        .collect();
    let prog = libc::sock_fprog {
        len: filter.len() as libc::c_ushort,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: seccomp(2) with a program that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &prog as *const libc::sock_fprog,
        )
    };
    check(r as libc::c_int, || "installing the seccomp filter".into())
}

/// The spec's resource limits (raising a hard limit needs CAP_SYS_RESOURCE: call while the
/// process still has it).
pub fn set_rlimits(limits: &[Rlimit]) -> Result<(), Failure> {
    for l in limits {
        let rl = libc::rlimit {
            rlim_cur: l.soft,
            rlim_max: l.hard,
        };
        // SAFETY: setrlimit with a filled struct.
        let r = unsafe { libc::setrlimit(l.resource as _, &rl) };
        check(r, || {
            let name = rvmm_proto::RLIMIT_NAMES
                .get(l.resource as usize)
                .copied()
                .unwrap_or("?");
            format!(
                "--ulimit {name}={}:{} (a hard limit above rvmm's own needs CAP_SYS_RESOURCE)",
                l.soft as i64, l.hard as i64
            )
        })?;
    }
    Ok(())
}

/// Whether the spec's privileges are to be applied (a spec without any leaves the process as is).
fn enforced(s: &Security) -> bool {
    s.enforce
}

/// Turns the calling process into the workload, short of exec: resource limits, the seccomp
/// filter (while the process may still install one without no_new_privs, as runc and crun do),
/// the bounding set (both skipped when `prepared`: a process that installed the filter and
/// dropped the set earlier, rvmm-init's zygote), groups, gid, uid, capabilities (uid 0 keeps the
/// spec's set; others end with none), the working directory (created when missing, as Docker
/// does), umask 022, the program looked up in PATH, and last no_new_privs when the spec asks for
/// it. Returns the program to exec.
///
/// The filter is installed before the steps that follow it: it must allow prctl, setgroups,
/// setresgid, setresuid, capset, mkdir, chdir, umask, stat and access (Docker's profile does).
pub fn become_workload(spec: &RunSpec, prepared: bool) -> Result<CString, Failure> {
    let sec = &spec.security;
    set_rlimits(&spec.rlimits)?;
    crate::set_affinity(&spec.cpus_allowed)?;
    if enforced(sec) && !prepared {
        if !sec.seccomp.is_empty() {
            install_seccomp(&sec.seccomp)?;
        }
        drop_bounding(sec.caps)?;
    }
    let u = &spec.user;
    let mut groups: Vec<libc::gid_t> = vec![u.gid];
    groups.extend(u.additional_gids.iter().copied());
    groups.dedup();
    mkdir_p(&spec.cwd);
    if enforced(sec) && sec.ambient & sec.caps != 0 && u.uid != 0 {
        // The permitted set survives the user change, for the ambient capabilities to come
        // from (execve clears the flag).
        // SAFETY: prctl with integer arguments.
        check(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1) }, || {
            "keeping capabilities across the user change".into()
        })?;
    }
    // SAFETY: plain syscalls with valid pointers.
    unsafe {
        check(libc::setgroups(groups.len(), groups.as_ptr()), || {
            "setgroups".into()
        })?;
        check(libc::setresgid(u.gid, u.gid, u.gid), || {
            format!("setgid {}", u.gid)
        })?;
        check(libc::setresuid(u.uid, u.uid, u.uid), || {
            format!("setuid {}", u.uid)
        })?;
    }
    if enforced(sec) {
        // uid 0 keeps the spec's set; for others the user change emptied the effective set and
        // (unless ambient capabilities kept it) the permitted one; the inheritable set is the
        // ambient one (empty unless an OCI bundle asks).
        let ambient = sec.ambient & sec.caps;
        set_caps(if u.uid == 0 { sec.caps } else { ambient }, ambient)?;
        for cap in (0..64).filter(|c| ambient & (1u64 << c) != 0) {
            // SAFETY: prctl with integer arguments.
            let r = unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    cap as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                )
            };
            check(r, || format!("raising ambient capability {cap}"))?;
        }
    }
    let cwd = c(&spec.cwd);
    // SAFETY: chdir with a NUL-terminated path; umask cannot fail.
    unsafe {
        check(libc::chdir(cwd.as_ptr()), || {
            format!("cannot enter working directory {}", spec.cwd)
        })?;
        libc::umask(0o022);
    }
    let argv0 = spec
        .argv
        .first()
        .ok_or_else(|| Failure::setup("no command"))?;
    let hinted = spec.exec_hint.as_deref().filter(|h| {
        !argv0.contains('/')
            && h.strip_suffix(argv0.as_str())
                .is_some_and(|d| d.ends_with('/'))
            && crate::executable(h)
    });
    let prog = match hinted {
        Some(h) => c(h),
        None => crate::resolve(argv0, &spec.env)?,
    };
    if enforced(sec) && sec.no_new_privs {
        set_no_new_privs()?;
    }
    Ok(prog)
}

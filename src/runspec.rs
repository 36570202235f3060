//! `RunSpec`: the contract both isolations consume (defined in the `rvmm-proto` crate so the guest's PID 1
//! shares it), and building it from the image config and the `run` flags, with Docker's rules.

use std::path::{Path, PathBuf};

use crate::error::{IoContext, IoError};

/// A run flag or an image setting that cannot be used, or a file the spec needs that cannot be
/// read. The message is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Io(#[from] IoError),
}

pub type Result<T> = std::result::Result<T, Error>;
pub use rvmm_proto::{
    Limits, Mount, MountKind, Network, NetworkMode, PortMapping, Protocol, RunSpec, User,
};

use crate::image::ImageConfig;

/// The `run` flags that shape the workload (isolation-independent).
#[derive(Debug, Clone, Default)]
pub struct RunFlags {
    /// `--entrypoint`: Some("") clears the image's entrypoint.
    pub entrypoint: Option<String>,
    /// Arguments after the image: replace Cmd.
    pub args: Vec<String>,
    /// `-e KEY=VALUE` or `-e KEY` (taken from rvmm's environment).
    pub env: Vec<String>,
    pub env_files: Vec<PathBuf>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub hostname: Option<String>,
    pub tty: bool,
    pub stdin: bool,
    pub read_only: bool,
    pub limits: Limits,
    pub network: NetworkMode,
    pub ports: Vec<PortMapping>,
    pub mounts: Vec<Mount>,
    /// `--ulimit`, parsed.
    pub ulimits: Vec<rvmm_proto::Rlimit>,
    /// `--shm-size`, bytes.
    pub shm_size: Option<u64>,
    /// `--group-add`: names (resolved in the image's /etc/group) or numbers.
    pub group_add: Vec<String>,
    /// `--add-host`, parsed: (name, address).
    pub add_hosts: Vec<(String, String)>,
    /// `--dns`, `--dns-search`.
    pub dns: Vec<String>,
    pub dns_search: Vec<String>,
    /// `--sysctl`, parsed.
    pub sysctls: Vec<(String, String)>,
    /// `--label KEY[=VALUE]`, parsed.
    pub labels: Vec<(String, String)>,
    /// `--stop-signal` (name or number), `--stop-timeout` (seconds).
    pub stop_signal: Option<String>,
    pub stop_timeout: Option<i32>,
    /// `--init`.
    pub init: bool,
    /// `--cpuset-cpus`, parsed.
    pub cpus_allowed: Vec<u32>,
    /// `--device`, resolved on the host.
    pub devices: Vec<rvmm_proto::DeviceNode>,
}

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Reads a file of the image's root filesystem from its unpacked layers (top layer first),
/// honouring whiteouts. `rel` is relative to `/`.
pub fn read_image_file(layers: &[PathBuf], rel: &str) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileTypeExt;
    for l in layers.iter().rev() {
        let p = l.join(rel);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_char_device() => return None, // whiteout
            Ok(m) if m.is_file() => return std::fs::read(&p).ok(),
            Ok(_) => return None,
            Err(_) => {
                let marker = p.parent().map(|d| {
                    d.join(format!(
                        ".wh.{}",
                        p.file_name().unwrap_or_default().to_string_lossy()
                    ))
                });
                if marker.is_some_and(|m| m.exists()) {
                    return None;
                }
            }
        }
    }
    None
}

/// What the merged view of image layers has at a path.
#[derive(Debug, PartialEq, Eq)]
enum Merged {
    Absent,
    Dir,
    /// A file, symlink or anything else that is not a directory.
    Other,
    /// Not decidable here (a symlink or non-directory on the way): the guest decides.
    Unknown,
}

/// `path`'s entry in the layers (bottom first) as overlayfs would merge them: the top layer that
/// has it decides; a whiteout (a `.wh.` marker or a 0:0 character device) hides it and everything
/// below, and so does an opaque directory above it (its `trusted.overlay.opaque` or a
/// `.wh..wh..opq` marker). Symlinks on the way are not followed: Unknown.
fn merged(layers: &[PathBuf], comps: &[&str]) -> Merged {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let opaque = |d: &Path| {
        d.join(".wh..wh..opq").exists() || {
            let p = std::ffi::CString::new(d.as_os_str().as_encoded_bytes()).unwrap_or_default();
            let mut v = [0u8; 1];
            // SAFETY: NUL-terminated names, a buffer of the size given.
            let n = unsafe {
                libc::lgetxattr(
                    p.as_ptr(),
                    c"trusted.overlay.opaque".as_ptr(),
                    v.as_mut_ptr().cast(),
                    1,
                )
            };
            n == 1 && v[0] == b'y'
        }
    };
    for l in layers.iter().rev() {
        let mut dir = l.clone();
        let mut below_opaque = false;
        for (i, c) in comps.iter().enumerate() {
            if dir.join(format!(".wh.{c}")).exists() {
                return Merged::Absent;
            }
            let p = dir.join(c);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_char_device() && m.rdev() == 0 => return Merged::Absent,
                Ok(m) if i + 1 == comps.len() => {
                    return if m.is_dir() {
                        Merged::Dir
                    } else {
                        Merged::Other
                    }
                }
                Ok(m) if m.is_dir() => {
                    below_opaque |= opaque(&p);
                    dir = p;
                }
                Ok(_) => return Merged::Unknown,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if below_opaque {
                        return Merged::Absent;
                    }
                    break;
                }
                Err(_) => return Merged::Unknown,
            }
        }
    }
    Merged::Absent
}

/// Where a VM's guest will find argv[0] along PATH (`RunSpec::exec_hint`), looked up in the image
/// (its layers, bottom first; an OCI bundle's rootfs is one layer): the first PATH directory
/// holding something of that name that is not a directory. None when argv[0] has a '/', PATH has
/// a relative or odd entry, a mount of the run covers a PATH directory, or a PATH directory's
/// path goes through a symlink: the guest then walks PATH itself, as it also does when the hint
/// is not executable there.
pub fn exec_hint(layers: &[PathBuf], spec: &RunSpec) -> Option<String> {
    let argv0 = spec.argv.first()?;
    if argv0.is_empty() || argv0.contains('/') || argv0 == "." || argv0 == ".." {
        return None;
    }
    let path = spec
        .env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    let covered = |d: &str| {
        spec.mounts.iter().any(|m| {
            let (a, b) = (m.destination.trim_end_matches('/'), d);
            a.is_empty()
                || a == b
                || b.starts_with(&format!("{a}/"))
                || a.starts_with(&format!("{b}/"))
        })
    };
    for d in path.split(':').filter(|d| !d.is_empty()) {
        let d = d.trim_end_matches('/');
        let comps: Vec<&str> = d.split('/').skip(1).filter(|c| !c.is_empty()).collect();
        if !d.starts_with('/') || comps.iter().any(|c| *c == "." || *c == "..") || covered(d) {
            return None;
        }
        // Every directory on the way must be a directory (not a symlink) in the merged view.
        for n in 1..=comps.len() {
            match merged(layers, &comps[..n]) {
                Merged::Dir => {}
                Merged::Absent => break,
                Merged::Other | Merged::Unknown => return None,
            }
        }
        let mut full = comps.clone();
        full.push(argv0);
        match merged(layers, &full) {
            Merged::Other => return Some(format!("{d}/{argv0}")),
            Merged::Absent | Merged::Dir => {}
            Merged::Unknown => return None,
        }
    }
    None
}

/// Builds the RunSpec from the image config and the flags. `layers` (bottom first) is where
/// /etc/passwd and /etc/group are read from to resolve users.
pub fn build(
    image: &ImageConfig,
    layers: &[PathBuf],
    flags: &RunFlags,
    default_hostname: &str,
) -> Result<RunSpec> {
    // argv: Docker's entrypoint/cmd rules.
    let (entrypoint, cmd) = match &flags.entrypoint {
        Some(e) => {
            let ep = if e.is_empty() {
                vec![]
            } else {
                vec![e.clone()]
            };
            (ep, flags.args.clone())
        }
        None => (
            image.entrypoint.clone().unwrap_or_default(),
            if flags.args.is_empty() {
                image.cmd.clone().unwrap_or_default()
            } else {
                flags.args.clone()
            },
        ),
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return Err(Error::Invalid("no command specified: the image has no Entrypoint or Cmd; give one after the image name".into()));
    }

    let hostname = flags
        .hostname
        .clone()
        .unwrap_or_else(|| default_hostname.to_string());
    if hostname.is_empty() || hostname.len() > 64 || hostname.contains('/') {
        return Err(Error::Invalid(format!("invalid hostname {hostname:?}")));
    }

    // Environment: image, then env files, then -e; later entries win.
    let mut env: Vec<String> = Vec::new();
    fn put(env: &mut Vec<String>, kv: String) {
        let key = kv.split('=').next().unwrap_or_default().to_string();
        env.retain(|e| e.split('=').next() != Some(key.as_str()));
        env.push(kv);
    }
    for e in &image.env {
        put(&mut env, e.clone());
    }
    for f in &flags.env_files {
        let text = std::fs::read_to_string(f).at(|| format!("reading env file {}", f.display()))?;
        for line in text.lines() {
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            put(&mut env, env_entry(line)?);
        }
    }
    for e in &flags.env {
        put(&mut env, env_entry(e)?);
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        put(&mut env, format!("PATH={DEFAULT_PATH}"));
    }
    put(&mut env, format!("HOSTNAME={hostname}"));

    let user_spec = flags
        .user
        .clone()
        .or_else(|| image.user.clone())
        .unwrap_or_default();
    let (mut user, home) = resolve_user(&user_spec, layers)?;
    for g in &flags.group_add {
        let gid = resolve_group(g, layers)?;
        if gid != user.gid && !user.additional_gids.contains(&gid) {
            user.additional_gids.push(gid);
        }
    }
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        put(
            &mut env,
            format!("HOME={}", home.unwrap_or_else(|| "/".into())),
        );
    }

    let cwd = flags
        .workdir
        .clone()
        .or_else(|| image.working_dir.clone())
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(Error::Invalid(format!(
            "working directory {cwd:?} must be absolute"
        )));
    }

    let stop_signal = match (&flags.stop_signal, &image.stop_signal) {
        (Some(s), _) => signal_number(s)
            .ok_or_else(|| Error::Invalid(format!("invalid --stop-signal {s:?}: not a signal")))?,
        (None, Some(s)) => signal_number(s)
            .ok_or_else(|| Error::Invalid(format!("image StopSignal {s:?} is not a signal")))?,
        (None, None) => libc::SIGTERM,
    };
    let mut labels = image.labels.clone();
    for (k, v) in &flags.labels {
        labels.retain(|l| &l.0 != k);
        labels.push((k.clone(), v.clone()));
    }

    Ok(RunSpec {
        argv,
        env,
        cwd,
        user,
        hostname,
        tty: flags.tty,
        stdin: flags.stdin,
        read_only: flags.read_only,
        limits: flags.limits.clone(),
        network: Network {
            mode: flags.network,
            ports: flags.ports.clone(),
            address: None,
            gateway: None,
            dns: flags.dns.clone(),
            dns_search: flags.dns_search.clone(),
            extra_hosts: flags.add_hosts.clone(),
        },
        mounts: with_image_volumes(&flags.mounts, &image.volumes)?,
        stop_signal,
        // Decided by the run core once the isolation and network are known.
        security: Default::default(),
        rlimits: {
            let mut r = default_rlimits();
            for u in &flags.ulimits {
                r.retain(|d| d.resource != u.resource);
                r.push(u.clone());
            }
            r
        },
        etc: Default::default(),
        privileged: false,
        sysctls: flags.sysctls.clone(),
        shm_size: flags.shm_size,
        labels,
        stop_timeout: flags.stop_timeout,
        init: flags.init,
        cpus_allowed: flags.cpus_allowed.clone(),
        devices: flags.devices.clone(),
        root_shared: false,
        exec_hint: None,
    })
}

/// The most open files a workload gets (Docker's default soft and hard limit, and Linux's default
/// fs.nr_open, which a guest kernel keeps).
const MAX_NOFILE: u64 = 1 << 20;

/// The resource limits a workload starts with: rvmm's own, as a container would inherit them,
/// with open files raised to the hard limit (at most [`MAX_NOFILE`]). Both isolations set exactly
/// these, so a VM's workload sees the same `ulimit -a` as a container's.
pub fn default_rlimits() -> Vec<rvmm_proto::Rlimit> {
    // RLIMIT_CPU (0) to RLIMIT_RTTIME (15), the resources Linux has had since 2.6.25.
    (0..16u32)
        .filter_map(|r| {
            // SAFETY: getrlimit fills a plain struct.
            let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
            // SAFETY: as above; an unknown resource fails and is skipped.
            if unsafe { libc::getrlimit(r as _, &mut rl) } != 0 {
                return None;
            }
            if r == libc::RLIMIT_NOFILE {
                rl.rlim_max = rl.rlim_max.min(MAX_NOFILE);
                rl.rlim_cur = rl.rlim_max;
            }
            Some(rvmm_proto::Rlimit {
                resource: r,
                soft: rl.rlim_cur,
                hard: rl.rlim_max,
            })
        })
        .collect()
}

/// `KEY=VALUE` as is; `KEY` alone takes rvmm's own value (and is dropped if unset... as Docker keeps it out).
fn env_entry(e: &str) -> Result<String> {
    if e.starts_with('=') || e.is_empty() {
        return Err(Error::Invalid(format!(
            "invalid environment variable {e:?}"
        )));
    }
    if e.contains('=') {
        return Ok(e.to_string());
    }
    Ok(format!("{e}={}", std::env::var(e).unwrap_or_default()))
}

/// Resolves `user[:group]` (names or numbers) against the image's /etc/passwd and /etc/group.
/// Returns the identity and the home directory.
pub fn resolve_user(spec: &str, layers: &[PathBuf]) -> Result<(User, Option<String>)> {
    let passwd =
        read_image_file(layers, "etc/passwd").map(|b| String::from_utf8_lossy(&b).into_owned());
    let group =
        read_image_file(layers, "etc/group").map(|b| String::from_utf8_lossy(&b).into_owned());
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let u = if u.is_empty() { "0" } else { u };
    let pw_entry = |pred: &dyn Fn(&[&str]) -> bool| -> Option<(u32, u32, String, String)> {
        passwd.as_deref()?.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() >= 7 && pred(&f) {
                Some((
                    f[2].parse().ok()?,
                    f[3].parse().ok()?,
                    f[0].to_string(),
                    f[5].to_string(),
                ))
            } else {
                None
            }
        })
    };
    let (uid, mut gid, name, home) = match u.parse::<u32>() {
        Ok(n) => match pw_entry(&|f| f[2] == n.to_string()) {
            Some((uid, gid, name, home)) => (uid, gid, Some(name), Some(home)),
            None => (n, 0, None, None),
        },
        Err(_) => {
            let (uid, gid, name, home) = pw_entry(&|f| f[0] == u).ok_or_else(|| {
                Error::Invalid(format!(
                    "unable to find user {u}: no matching entries in the image's /etc/passwd"
                ))
            })?;
            (uid, gid, Some(name), Some(home))
        }
    };
    let gr_entries: Vec<(String, u32, Vec<String>)> = group
        .as_deref()
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4).then(|| {
                Some((
                    f[0].to_string(),
                    f[2].parse().ok()?,
                    f[3].split(',')
                        .filter(|m| !m.is_empty())
                        .map(str::to_string)
                        .collect(),
                ))
            })?
        })
        .collect();
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => gr_entries
                .iter()
                .find(|e| e.0 == g)
                .map(|e| e.1)
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "unable to find group {g}: no matching entries in the image's /etc/group"
                    ))
                })?,
        };
    }
    let additional_gids = match &name {
        Some(n) => gr_entries
            .iter()
            .filter(|e| e.2.contains(n) && e.1 != gid)
            .map(|e| e.1)
            .collect(),
        None => vec![],
    };
    Ok((
        User {
            uid,
            gid,
            additional_gids,
        },
        home,
    ))
}

/// A `--group-add` value: a number, or a name in the image's /etc/group.
pub fn resolve_group(g: &str, layers: &[PathBuf]) -> Result<u32> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(n);
    }
    let group =
        read_image_file(layers, "etc/group").map(|b| String::from_utf8_lossy(&b).into_owned());
    group
        .as_deref()
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 3 && f[0] == g).then(|| f[2].parse().ok())?
        })
        .ok_or_else(|| {
            Error::Invalid(format!(
                "unable to find group {g}: no matching entries in the image's /etc/group"
            ))
        })
}

/// `--ulimit TYPE=SOFT[:HARD]` (Docker's names; -1 is unlimited).
pub fn parse_ulimit(s: &str) -> Result<rvmm_proto::Rlimit> {
    let (name, vals) = s.split_once('=').ok_or_else(|| {
        Error::Invalid(format!("invalid ulimit {s:?}: expected TYPE=SOFT[:HARD]"))
    })?;
    let resource = rvmm_proto::RLIMIT_NAMES
        .iter()
        .position(|n| *n == name)
        .ok_or_else(|| Error::Invalid(format!("invalid ulimit {s:?}: unknown type {name:?}")))?;
    let num = |v: &str| -> Result<u64> {
        match v.parse::<i64>() {
            Ok(-1) => Ok(libc::RLIM_INFINITY),
            Ok(n) if n >= 0 => Ok(n as u64),
            _ => Err(Error::Invalid(format!(
                "invalid ulimit {s:?}: {v:?} is not a limit"
            ))),
        }
    };
    let (soft, hard) = match vals.split_once(':') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => (num(vals)?, num(vals)?),
    };
    if soft > hard {
        return Err(Error::Invalid(format!(
            "invalid ulimit {s:?}: the soft limit is above the hard limit"
        )));
    }
    Ok(rvmm_proto::Rlimit {
        resource: resource as u32,
        soft,
        hard,
    })
}

/// `--add-host NAME:ADDR` (or `NAME=ADDR`); ADDR is an IP address or `host-gateway`.
pub fn parse_add_host(s: &str) -> Result<(String, String)> {
    let (name, addr) = s
        .split_once('=')
        .or_else(|| s.split_once(':'))
        .ok_or_else(|| {
            Error::Invalid(format!("invalid --add-host {s:?}: expected NAME:ADDRESS"))
        })?;
    let addr = addr.trim_start_matches('[').trim_end_matches(']');
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(Error::Invalid(format!(
            "invalid --add-host {s:?}: bad host name"
        )));
    }
    if addr != "host-gateway" && addr.parse::<std::net::IpAddr>().is_err() {
        return Err(Error::Invalid(format!(
            "invalid --add-host {s:?}: {addr:?} is not an IP address"
        )));
    }
    Ok((name.to_string(), addr.to_string()))
}

/// `--dns ADDR`: an IP address.
pub fn parse_dns(s: &str) -> Result<String> {
    s.parse::<std::net::IpAddr>()
        .map(|a| a.to_string())
        .map_err(|_| Error::Invalid(format!("invalid --dns {s:?}: not an IP address")))
}

/// `--dns-search DOMAIN` (`.` for none).
pub fn parse_dns_search(s: &str) -> Result<String> {
    let ok = s == "."
        || (!s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            }));
    if !ok {
        return Err(Error::Invalid(format!(
            "invalid --dns-search {s:?}: not a domain name"
        )));
    }
    Ok(s.to_string())
}

/// The sysctls whose value is per namespace (Docker's list): a container may set these.
pub fn namespaced_sysctl(key: &str) -> bool {
    matches!(
        key,
        "kernel.msgmax"
            | "kernel.msgmnb"
            | "kernel.msgmni"
            | "kernel.sem"
            | "kernel.shmall"
            | "kernel.shmmax"
            | "kernel.shmmni"
            | "kernel.shm_rmid_forced"
            | "kernel.domainname"
    ) || key.starts_with("fs.mqueue.")
        || key.starts_with("net.")
}

/// `--sysctl KEY=VALUE`. `vm`: the workload has its own kernel, so any key is its own; in a
/// container only namespaced ones are (the others would change the host).
pub fn parse_sysctl(s: &str, vm: bool) -> Result<(String, String)> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| Error::Invalid(format!("invalid --sysctl {s:?}: expected KEY=VALUE")))?;
    let k = k.trim().replace('/', ".");
    if k.is_empty()
        || k.split('.')
            .any(|c| c.is_empty() || c == ".." || !c.chars().all(|ch| ch.is_ascii_graphic()))
    {
        return Err(Error::Invalid(format!("invalid --sysctl {s:?}: bad key")));
    }
    if !vm && !namespaced_sysctl(&k) {
        return Err(Error::Invalid(format!("--sysctl {k} is not namespaced: in a container it would change the host (it is allowed with --isolation=vm)")));
    }
    if vm && k == "kernel.hostname" {
        return Err(Error::Invalid(
            "--sysctl kernel.hostname: use --hostname".into(),
        ));
    }
    Ok((k, v.to_string()))
}

/// `--cpuset-cpus 0-2,4` → [0, 1, 2, 4]; every CPU must be one of `available` (sorted).
pub fn parse_cpuset(s: &str, available: &[u32]) -> Result<Vec<u32>> {
    let Some(v) = crate::cgroups::parse_cpu_list(s).filter(|v| !v.is_empty()) else {
        return Err(Error::Invalid(format!(
            "invalid --cpuset-cpus {s:?}: expected a list like 0-2,4"
        )));
    };
    if let Some(c) = v.iter().find(|c| available.binary_search(c).is_err()) {
        return Err(Error::Invalid(format!(
            "--cpuset-cpus {s}: CPU {c} is not available (available: {})",
            cpu_list(available)
        )));
    }
    Ok(v)
}

/// [0, 1, 2, 4] → "0-2,4".
pub fn cpu_list(cpus: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// `--device HOST[:CONTAINER][:PERMISSIONS]`: the host node's kind, numbers, mode and owner.
pub fn parse_device(s: &str) -> Result<rvmm_proto::DeviceNode> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let parts: Vec<&str> = s.split(':').collect();
    let perms = |p: &str| !p.is_empty() && p.len() <= 3 && p.chars().all(|c| "rwm".contains(c));
    let (host, cont, access) = match parts.as_slice() {
        [h] => (*h, *h, "rwm"),
        [h, p] if perms(p) => (*h, *h, *p),
        [h, c] => (*h, *c, "rwm"),
        [h, c, p] if perms(p) => (*h, *c, *p),
        _ => {
            return Err(Error::Invalid(format!(
                "invalid --device {s:?}: expected HOST[:CONTAINER][:rwm]"
            )))
        }
    };
    if !cont.starts_with('/') || cont.split('/').any(|c| c == "..") {
        return Err(Error::Invalid(format!(
            "invalid --device {s:?}: the container path must be absolute, without .."
        )));
    }
    let m = std::fs::metadata(host).at(|| format!("--device {host}"))?;
    let ft = m.file_type();
    let kind = if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else {
        return Err(Error::Invalid(format!(
            "--device {host}: not a device node (directories of devices are not supported)"
        )));
    };
    let rdev = m.rdev();
    Ok(rvmm_proto::DeviceNode {
        path: cont.to_string(),
        kind,
        major: libc::major(rdev),
        minor: libc::minor(rdev),
        mode: m.mode() & 0o777,
        uid: m.uid(),
        gid: m.gid(),
        access: access.to_string(),
    })
}

/// `--memory-swap`: bytes, or -1 for unlimited swap.
pub fn parse_memory_swap(s: &str) -> Result<u64> {
    if s.trim() == "-1" {
        return Ok(u64::MAX);
    }
    parse_bytes(s)
}

/// `--label KEY[=VALUE]`.
pub fn parse_label(s: &str) -> Result<(String, String)> {
    let (k, v) = s.split_once('=').unwrap_or((s, ""));
    if k.is_empty() || k.contains(char::is_whitespace) {
        return Err(Error::Invalid(format!(
            "invalid --label {s:?}: expected KEY[=VALUE]"
        )));
    }
    Ok((k.to_string(), v.to_string()))
}

/// `--platform`: rvmm runs linux/amd64 images only.
pub fn check_platform(s: &str) -> Result<()> {
    let p = s.to_ascii_lowercase();
    if matches!(
        p.as_str(),
        "linux/amd64" | "linux/x86_64" | "linux/amd64/v1" | "amd64"
    ) {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "--platform {s}: rvmm runs linux/amd64 only"
    )))
}

/// `SIGTERM`, `TERM` or `15` → 15.
pub fn signal_number(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let name = s.strip_prefix("SIG").unwrap_or(s).to_ascii_uppercase();
    let n = match name.as_str() {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "STOP" => libc::SIGSTOP,
        "CONT" => libc::SIGCONT,
        "WINCH" => libc::SIGWINCH,
        "PWR" => libc::SIGPWR,
        _ => return None,
    };
    Some(n)
}

/// 15 → `SIGTERM` (a number without a name: as is).
pub fn signal_name(n: i32) -> String {
    for name in [
        "HUP", "INT", "QUIT", "KILL", "USR1", "USR2", "TERM", "STOP", "CONT", "WINCH", "PWR",
    ] {
        if signal_number(name) == Some(n) {
            return format!("SIG{name}");
        }
    }
    n.to_string()
}

/// Parses `-p [ip:]hostport:containerport[/tcp|udp]` (the ip must be empty, 0.0.0.0 or 127.0.0.1).
pub fn parse_port(s: &str) -> Result<PortMapping> {
    let (spec, proto) = match s.rsplit_once('/') {
        Some((a, "tcp")) => (a, Protocol::Tcp),
        Some((a, "udp")) => (a, Protocol::Udp),
        Some(_) => {
            return Err(Error::Invalid(format!(
                "invalid port mapping {s:?}: protocol must be tcp or udp"
            )))
        }
        None => (s, Protocol::Tcp),
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let (h, c) = match parts.as_slice() {
        [h, c] => (*h, *c),
        [_ip, h, c] => (*h, *c),
        _ => {
            return Err(Error::Invalid(format!(
                "invalid port mapping {s:?}: expected HOSTPORT:CONTAINERPORT[/tcp|udp]"
            )))
        }
    };
    let port = |p: &str| p.parse::<u16>().ok().filter(|&n| n > 0);
    Ok(PortMapping {
        host_port: port(h).ok_or_else(|| Error::Invalid(format!("invalid host port in {s:?}")))?,
        container_port: port(c)
            .ok_or_else(|| Error::Invalid(format!("invalid container port in {s:?}")))?,
        protocol: proto,
    })
}

/// `-v`, as Docker reads it: `HOST:PATH[:OPTS]` (a bind of a host path, absolute or starting with
/// `.`; made as a directory when missing), `NAME:PATH[:OPTS]` (a named volume, made on first use)
/// or `PATH` (an anonymous volume). OPTS: `ro`, `rw`, `nocopy` (volumes), and SELinux and
/// propagation options that change nothing here (`z`, `Z`, `private`, `rprivate`).
pub fn parse_volume(s: &str) -> Result<Mount> {
    let bad = |why: &str| Error::Invalid(format!("invalid volume {s:?}: {why}"));
    let parts: Vec<&str> = s.split(':').collect();
    let (src, dst, opts) = match parts.as_slice() {
        [d] => ("", *d, ""),
        [a, b] => (*a, *b, ""),
        [a, b, o] => (*a, *b, *o),
        _ => return Err(bad("expected HOST:PATH[:ro], NAME:PATH[:ro] or PATH")),
    };
    let mut read_only = false;
    let mut copy_up = true;
    for o in opts.split(',').filter(|o| !o.is_empty()) {
        match o {
            "ro" => read_only = true,
            "rw" => read_only = false,
            "nocopy" => copy_up = false,
            "z" | "Z" | "private" | "rprivate" | "consistent" | "cached" | "delegated" => {}
            _ => return Err(bad(&format!("unknown option {o:?}"))),
        }
    }
    check_destination(s, dst)?;
    let kind = if src.starts_with('/') || src.starts_with('.') {
        if !copy_up {
            return Err(bad("nocopy is for volumes, not host paths"));
        }
        MountKind::Bind
    } else if src.is_empty() || crate::volume::valid_name(src) {
        MountKind::Volume
    } else {
        return Err(bad(&format!(
            "{src:?} is neither a host path (/... or ./...) nor a volume name"
        )));
    };
    let source = match kind {
        MountKind::Bind => {
            // `-v` makes a missing host directory, as Docker does (`--mount` refuses).
            if std::fs::symlink_metadata(src).is_err() {
                std::fs::create_dir_all(src).at(|| format!("creating volume source {src}"))?;
            }
            bind_source(src)?
        }
        _ => src.to_string(),
    };
    Ok(Mount {
        source,
        destination: dst.to_string(),
        read_only,
        kind,
        options: String::new(),
        copy_up: kind == MountKind::Volume && copy_up,
    })
}

/// `--tmpfs PATH[:OPTS]`: a tmpfs with mount(8)'s tmpfs options (`size=64m,mode=1777,exec,...`)
/// over Docker's defaults (`nosuid,nodev,noexec`).
pub fn parse_tmpfs(s: &str) -> Result<Mount> {
    let (dst, opts) = s.split_once(':').unwrap_or((s, ""));
    check_destination(s, dst)?;
    tmpfs(s, dst, opts.to_string(), false)
}

/// A tmpfs mount whose options were normalised (sizes in bytes) and checked.
fn tmpfs(s: &str, dst: &str, opts: String, read_only: bool) -> Result<Mount> {
    let mut norm = Vec::new();
    for o in opts.split(',').filter(|o| !o.is_empty()) {
        match o.split_once('=') {
            Some(("size", v)) if !v.ends_with('%') => {
                norm.push(format!("size={}", parse_bytes(v)?))
            }
            _ => norm.push(o.to_string()),
        }
    }
    let options = norm.join(",");
    rvmm_workload::mounts::tmpfs_options(&options)
        .map_err(|e| Error::Invalid(format!("invalid tmpfs {s:?}: {e}")))?;
    Ok(Mount {
        source: String::new(),
        destination: dst.to_string(),
        read_only,
        kind: MountKind::Tmpfs,
        options,
        copy_up: false,
    })
}

/// `--mount type=bind|volume|tmpfs,source=..,target=..[,readonly][,volume-nocopy]
/// [,tmpfs-size=..][,tmpfs-mode=..]`, as Docker reads it (`src`, `dst`, `destination`, `ro`
/// are accepted too). A bind source must exist.
pub fn parse_mount(s: &str) -> Result<Mount> {
    let bad = |why: String| Error::Invalid(format!("invalid --mount {s:?}: {why}"));
    let mut kind = MountKind::Volume;
    let (mut src, mut dst) = (None, None);
    let mut read_only = false;
    let mut copy_up = true;
    let mut tmpfs_opts = Vec::new();
    let truth = |k: &str, v: Option<&str>| match v {
        None | Some("1" | "true") => Ok(true),
        Some("0" | "false") => Ok(false),
        Some(v) => Err(bad(format!("{k}={v}: expected true or false"))),
    };
    for field in s.split(',').filter(|f| !f.is_empty()) {
        let (k, v) = match field.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (field, None),
        };
        match (k, v) {
            ("type", Some("bind")) => kind = MountKind::Bind,
            ("type", Some("volume")) => kind = MountKind::Volume,
            ("type", Some("tmpfs")) => kind = MountKind::Tmpfs,
            ("type", Some(t)) => {
                return Err(bad(format!("type {t:?}: expected bind, volume or tmpfs")))
            }
            ("source" | "src", Some(v)) => src = Some(v),
            ("target" | "destination" | "dst", Some(v)) => dst = Some(v),
            ("readonly" | "ro", v) => read_only = truth(k, v)?,
            ("volume-nocopy", v) => copy_up = !truth(k, v)?,
            ("tmpfs-size", Some(v)) => tmpfs_opts.push(format!("size={}", parse_bytes(v)?)),
            ("tmpfs-mode", Some(v)) => tmpfs_opts.push(format!("mode={v}")),
            ("bind-propagation", Some("private" | "rprivate")) | ("consistency", Some(_)) => {}
            ("volume-driver", Some("local")) => {}
            _ => return Err(bad(format!("unknown or unsupported field {field:?}"))),
        }
    }
    let dst = dst.ok_or_else(|| bad("target is required".into()))?;
    check_destination(s, dst)?;
    let wrong_for = |what: &str| bad(format!("{what} is not for type {kind:?}").to_lowercase());
    if kind != MountKind::Tmpfs && !tmpfs_opts.is_empty() {
        return Err(wrong_for("tmpfs-size/tmpfs-mode"));
    }
    if kind != MountKind::Volume && !copy_up {
        return Err(wrong_for("volume-nocopy"));
    }
    match kind {
        MountKind::Tmpfs => {
            if src.is_some() {
                return Err(bad("a tmpfs has no source".into()));
            }
            tmpfs(s, dst, tmpfs_opts.join(","), read_only)
        }
        MountKind::Bind => {
            let src = src.ok_or_else(|| bad("a bind needs a source".into()))?;
            if std::fs::symlink_metadata(src).is_err() {
                return Err(bad(format!("bind source path does not exist: {src}")));
            }
            Ok(Mount {
                source: bind_source(src)?,
                destination: dst.to_string(),
                read_only,
                kind,
                options: String::new(),
                copy_up: false,
            })
        }
        MountKind::Volume => {
            let src = src.unwrap_or_default();
            if !src.is_empty() && !crate::volume::valid_name(src) {
                return Err(crate::volume::Error::InvalidName(src.to_string()))
                    .map_err(|e| bad(e.to_string()));
            }
            Ok(Mount {
                source: src.to_string(),
                destination: dst.to_string(),
                read_only,
                kind,
                options: String::new(),
                copy_up,
            })
        }
    }
}

/// A bind source as the host resolves it (absolute, symlinks followed once, here).
fn bind_source(src: &str) -> Result<String> {
    let p = Path::new(src)
        .canonicalize()
        .at(|| format!("volume source {src} does not exist"))?;
    Ok(p.display().to_string())
}

/// A mount's path in the workload: absolute, no `..`, not `/` itself.
fn check_destination(s: &str, dst: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::Invalid(format!("invalid mount {s:?}: {why}")));
    if !dst.starts_with('/') {
        return bad("the container path must be absolute");
    }
    if dst.split('/').any(|c| c == "..") {
        return bad("the container path must not contain ..");
    }
    if dst.split('/').all(str::is_empty) {
        return bad("the container path must not be /");
    }
    Ok(())
}

/// The flags' mounts and an anonymous volume for each of the image's `VOLUME`s that no flag
/// mounts something on, as Docker does (filled from the image, removed with the run under
/// `--rm` or with `rm -v`); parents before what is mounted in them.
fn with_image_volumes(mounts: &[Mount], volumes: &[String]) -> Result<Vec<Mount>> {
    let norm = |d: &str| d.trim_end_matches('/').to_string();
    let mut all = mounts.to_vec();
    for v in volumes {
        // Lexically cleaned and absolute, as Docker takes it.
        let mut parts: Vec<&str> = Vec::new();
        for c in v.split('/') {
            match c {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                c => parts.push(c),
            }
        }
        if parts.is_empty() {
            return Err(Error::Invalid(format!(
                "the image declares a volume at {v:?}: a volume cannot be mounted on /"
            )));
        }
        let destination = format!("/{}", parts.join("/"));
        if all.iter().any(|m| norm(&m.destination) == destination) {
            continue;
        }
        all.push(Mount {
            source: String::new(),
            destination,
            read_only: false,
            kind: MountKind::Volume,
            options: String::new(),
            copy_up: true,
        });
    }
    all.sort_by_key(|m| m.destination.split('/').filter(|c| !c.is_empty()).count());
    Ok(all)
}

/// Two mounts on one path are refused, as Docker does ("Duplicate mount point").
pub fn check_mounts(mounts: &[Mount]) -> Result<()> {
    let norm = |d: &str| d.trim_end_matches('/').to_string();
    let mut seen = std::collections::BTreeSet::new();
    for m in mounts {
        if !seen.insert(norm(&m.destination)) {
            return Err(Error::Invalid(format!(
                "duplicate mount point: {}",
                m.destination
            )));
        }
    }
    Ok(())
}

/// `512m`, `1g`, `1048576` → bytes.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| *n > 0.0)
        .ok_or_else(|| Error::Invalid(format!("invalid size {s:?}")))?;
    Ok((n * mult as f64) as u64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The PATH hint a VM's guest gets, against layers built here: whiteouts, an opaque
    /// directory, a symlinked PATH directory, mounts over PATH, argv[0] with a slash.
    #[test]
    fn exec_hints_follow_the_merged_layers_or_give_up() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let file = |p: PathBuf| {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"x").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        let (l0, l1) = (t.path().join("l0"), t.path().join("l1"));
        file(l0.join("bin/true"));
        file(l0.join("usr/bin/true"));
        file(l0.join("usr/local/bin/true"));
        // The top layer deletes /usr/local/bin/true.
        file(l1.join("usr/local/bin/.wh.true"));
        let layers = vec![l0.clone(), l1.clone()];
        let spec = |argv0: &str, env: &[&str]| RunSpec {
            argv: vec![argv0.to_string()],
            env: env.iter().map(|e| e.to_string()).collect(),
            ..RunSpec::default()
        };
        let s = spec("true", &[]);
        assert_eq!(exec_hint(&layers, &s).as_deref(), Some("/usr/bin/true"));
        // An opaque /usr/bin in the top layer hides the lower one's contents.
        file(l1.join("usr/bin/.wh..wh..opq"));
        assert_eq!(exec_hint(&layers, &s).as_deref(), Some("/bin/true"));
        // Nothing of that name anywhere: no hint (the guest says 127).
        assert_eq!(exec_hint(&layers, &spec("nope", &[])), None);
        // argv[0] with a slash, or a relative PATH entry: no hint.
        assert_eq!(exec_hint(&layers, &spec("./true", &[])), None);
        assert_eq!(exec_hint(&layers, &spec("true", &["PATH=bin:/bin"])), None);
        // A mount over a PATH directory (or over a parent of one): no hint.
        let mut m = spec("true", &[]);
        m.mounts.push(rvmm_proto::Mount {
            source: "/tmp".into(),
            destination: "/usr/local".into(),
            read_only: false,
            kind: rvmm_proto::MountKind::Bind,
            options: String::new(),
            copy_up: false,
        });
        assert_eq!(exec_hint(&layers, &m), None);
        // A PATH directory that is a symlink (usrmerge's /sbin -> usr/sbin): no hint.
        std::os::unix::fs::symlink("usr/sbin", l0.join("sbin")).unwrap();
        assert_eq!(
            exec_hint(&layers, &spec("true", &["PATH=/sbin:/bin"])),
            None
        );
        // ... unless the name is found before it.
        assert_eq!(
            exec_hint(&layers, &spec("true", &["PATH=/bin:/sbin"])).as_deref(),
            Some("/bin/true")
        );
    }

    fn img(ep: Option<&[&str]>, cmd: Option<&[&str]>) -> ImageConfig {
        ImageConfig {
            entrypoint: ep.map(|v| v.iter().map(|s| s.to_string()).collect()),
            cmd: cmd.map(|v| v.iter().map(|s| s.to_string()).collect()),
            env: vec!["A=1".into(), "B=2".into()],
            ..Default::default()
        }
    }

    #[test]
    fn docker_argv_rules() {
        let f = |ep: Option<&str>, args: &[&str]| RunFlags {
            entrypoint: ep.map(str::to_string),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let i = img(Some(&["/ep"]), Some(&["c1"]));
        assert_eq!(
            build(&i, &[], &f(None, &[]), "h").expect("spec").argv,
            ["/ep", "c1"]
        );
        assert_eq!(
            build(&i, &[], &f(None, &["x"]), "h").expect("spec").argv,
            ["/ep", "x"]
        );
        assert_eq!(
            build(&i, &[], &f(Some("/o"), &[]), "h").expect("spec").argv,
            ["/o"]
        );
        assert_eq!(
            build(&i, &[], &f(Some(""), &["sh"]), "h")
                .expect("spec")
                .argv,
            ["sh"]
        );
        assert!(build(&img(None, None), &[], &f(None, &[]), "h").is_err());
    }

    #[test]
    fn image_volumes_become_anonymous_volumes_unless_mounted() {
        let mut i = img(None, Some(&["x"]));
        i.volumes = vec!["/data/".into(), "var/lib/db/./x/..".into(), "/a/b".into()];
        let flags = RunFlags {
            mounts: vec![parse_tmpfs("/data").expect("tmpfs")],
            ..Default::default()
        };
        let s = build(&i, &[], &flags, "h").expect("spec");
        let got: Vec<_> = s
            .mounts
            .iter()
            .map(|m| (m.destination.as_str(), m.kind, m.source.as_str(), m.copy_up))
            .collect();
        assert_eq!(
            got,
            [
                ("/data", MountKind::Tmpfs, "", false),
                ("/a/b", MountKind::Volume, "", true),
                ("/var/lib/db", MountKind::Volume, "", true),
            ]
        );
        i.volumes = vec!["/..".into()];
        assert!(build(&i, &[], &flags, "h").is_err());
    }

    #[test]
    fn env_override_order() {
        let flags = RunFlags {
            env: vec!["B=3".into(), "C=4".into()],
            args: vec!["x".into()],
            ..Default::default()
        };
        let s = build(&img(None, None), &[], &flags, "box").expect("spec");
        assert!(s.env.contains(&"A=1".to_string()));
        assert!(s.env.contains(&"B=3".to_string()));
        assert!(!s.env.contains(&"B=2".to_string()));
        assert!(s.env.contains(&"HOSTNAME=box".to_string()));
        assert!(s.env.iter().any(|e| e.starts_with("PATH=")));
    }

    #[test]
    fn users_from_image_files() {
        let d = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(d.path().join("etc")).expect("mkdir");
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .expect("w");
        std::fs::write(
            d.path().join("etc/group"),
            "root:x:0:\napp:x:1000:\nstaff:x:50:app\n",
        )
        .expect("w");
        let layers = vec![d.path().to_path_buf()];
        let (u, home) = resolve_user("app", &layers).expect("user");
        assert_eq!(
            (u.uid, u.gid, u.additional_gids.clone()),
            (1000, 1000, vec![50])
        );
        assert_eq!(home.as_deref(), Some("/home/app"));
        let (u, _) = resolve_user("1000:staff", &layers).expect("user");
        assert_eq!((u.uid, u.gid), (1000, 50));
        let (u, _) = resolve_user("4242:4243", &layers).expect("user");
        assert_eq!((u.uid, u.gid), (4242, 4243));
        assert!(resolve_user("ghost", &layers).is_err());
        let (u, _) = resolve_user("", &layers).expect("root");
        assert_eq!(u.uid, 0);
    }

    #[test]
    fn flag_parsers() {
        assert_eq!(parse_port("8080:80").expect("p").host_port, 8080);
        assert_eq!(
            parse_port("127.0.0.1:53:53/udp").expect("p").protocol,
            Protocol::Udp
        );
        assert!(parse_port("80").is_err());
        assert!(parse_port("0:80").is_err());
        assert_eq!(parse_bytes("32m").expect("b"), 32 << 20);
        assert_eq!(parse_bytes("1g").expect("b"), 1 << 30);
        assert!(parse_bytes("lots").is_err());
        assert_eq!(signal_number("SIGKILL"), Some(9));
        assert_eq!(signal_number("term"), Some(15));
        assert!(parse_volume("/tmp:rel").is_err());
        assert!(parse_volume("/tmp:/x/../y").is_err());
        assert!(parse_volume("/tmp:/data:ro").expect("v").read_only);
    }

    #[test]
    fn mount_flags_follow_docker() {
        let v = |s: &str| parse_volume(s).expect(s);
        let m = v("/tmp:/data:ro,z");
        assert_eq!(
            (m.kind, m.read_only, m.copy_up),
            (MountKind::Bind, true, false)
        );
        let m = v("db-data:/var/lib/db");
        assert_eq!(
            (m.kind, m.source.as_str(), m.copy_up),
            (MountKind::Volume, "db-data", true)
        );
        let m = v("/cache");
        assert_eq!((m.kind, m.source.as_str()), (MountKind::Volume, ""));
        assert!(!v("db:/x:nocopy,ro").copy_up);
        for bad in [
            "/tmp:/x:nocopy",
            "a b:/x",
            "db:/x:shared",
            "/",
            "db:/",
            "a:b:c:d",
        ] {
            assert!(parse_volume(bad).is_err(), "{bad}");
        }
        let t = parse_tmpfs("/run:size=64m,mode=1777,exec").expect("tmpfs");
        assert_eq!(
            (t.kind, t.destination.as_str(), t.options.as_str()),
            (MountKind::Tmpfs, "/run", "size=67108864,mode=1777,exec")
        );
        assert!(parse_tmpfs("/run:size=x").is_err());
        assert!(parse_tmpfs("run").is_err());
        let m = |s: &str| parse_mount(s).expect(s);
        let b = m("type=bind,source=/tmp,target=/data,readonly");
        assert_eq!((b.kind, b.read_only), (MountKind::Bind, true));
        let b = m("type=bind,src=/tmp,dst=/data,ro=false");
        assert!(!b.read_only);
        let vol = m("source=db,target=/db,volume-nocopy");
        assert_eq!((vol.kind, vol.copy_up), (MountKind::Volume, false));
        assert_eq!(m("type=volume,target=/anon").source, "");
        let t = m("type=tmpfs,target=/t,tmpfs-size=1m,tmpfs-mode=700");
        assert_eq!(t.options, "size=1048576,mode=700");
        for bad in [
            "type=bind,source=/nonexistent-rvmm-test,target=/x",
            "type=bind,target=/x",
            "type=tmpfs,source=x,target=/x",
            "type=bind,source=/tmp,target=/x,volume-nocopy",
            "type=volume,target=/x,tmpfs-size=1m",
            "type=nfs,target=/x",
            "source=db",
            "type=volume,source=db,target=/x,readonly=maybe",
            "type=volume,source=db,target=/x,bogus=1",
        ] {
            assert!(parse_mount(bad).is_err(), "{bad}");
        }
        assert!(check_mounts(&[v("/a"), v("/b")]).is_ok());
        assert!(check_mounts(&[v("/a"), parse_tmpfs("/a/").expect("t")]).is_err());
    }

    #[test]
    fn flag_parsers_follow_docker() {
        let u = parse_ulimit("nofile=1024:2048").expect("ulimit");
        assert_eq!(
            (u.resource, u.soft, u.hard),
            (libc::RLIMIT_NOFILE, 1024, 2048)
        );
        let u = parse_ulimit("core=-1").expect("ulimit");
        assert_eq!((u.soft, u.hard), (libc::RLIM_INFINITY, libc::RLIM_INFINITY));
        for bad in ["nofile", "nope=1", "nofile=2:1", "nofile=x", "nofile=-2"] {
            assert!(parse_ulimit(bad).is_err(), "{bad}");
        }
        let eight: Vec<u32> = (0..8).collect();
        assert_eq!(
            parse_cpuset("0-2,4,1", &eight).expect("cpuset"),
            vec![0, 1, 2, 4]
        );
        for bad in ["", "2-1", "8", "a", "0-", ",", "0,,1"] {
            assert!(parse_cpuset(bad, &eight).is_err(), "{bad}");
        }
        let e = parse_cpuset("1-3", &[0, 1, 4]).expect_err("not available");
        assert_eq!(
            e.to_string(),
            "--cpuset-cpus 1-3: CPU 2 is not available (available: 0-1,4)"
        );
        assert_eq!(
            parse_sysctl("net/ipv4/ip_forward=1", false).expect("sysctl"),
            ("net.ipv4.ip_forward".into(), "1".into())
        );
        assert!(parse_sysctl("kernel.pid_max=9", false).is_err());
        assert!(parse_sysctl("kernel.pid_max=9", true).is_ok());
        assert!(parse_sysctl("net...x=1", true).is_err());
        assert!(parse_sysctl("kernel.hostname=x", true).is_err());
        assert_eq!(
            parse_add_host("db:10.0.0.1").expect("host"),
            ("db".into(), "10.0.0.1".into())
        );
        assert_eq!(
            parse_add_host("v6=[::1]").expect("host"),
            ("v6".into(), "::1".into())
        );
        assert!(parse_add_host("db:nothing").is_err());
        assert!(parse_dns("1.1.1.1").is_ok() && parse_dns("one").is_err());
        assert!(parse_dns_search("a.example").is_ok() && parse_dns_search("a..b").is_err());
        assert_eq!(
            parse_label("a=b=c").expect("label"),
            ("a".into(), "b=c".into())
        );
        assert!(check_platform("linux/amd64").is_ok() && check_platform("linux/arm64").is_err());
        assert_eq!(signal_name(15), "SIGTERM");
        assert_eq!(parse_memory_swap("-1").expect("swap"), u64::MAX);
    }
}

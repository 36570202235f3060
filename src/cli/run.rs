//! `rvmm run`.

use std::path::PathBuf;

use anyhow::Context;

use rvmm::container;
use rvmm::image::{self, Store};
use rvmm::run::{supervise, RunOptions};
use rvmm::runspec::{self, Limits, NetworkMode, RunFlags};

use super::pull::RegistryArgs;
use super::Global;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// A KVM microVM with its own kernel (hardware isolation).
    Vm,
    /// A namespaced container on the host kernel.
    Container,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Net {
    /// Only a loopback interface.
    None,
    /// A veth (container) or tap (VM) on the rvmm0 bridge, with NAT and -p.
    Bridge,
}

#[derive(clap::Args, Debug)]
#[command(trailing_var_arg = true)]
pub struct Args {
    /// Where the workload runs: vm (the default: its own kernel behind KVM) or container (the host
    /// kernel, namespaces; much faster to start, weaker boundary).
    #[arg(long, value_enum, default_value = "vm", env = "RVMM_ISOLATION")]
    pub isolation: Isolation,
    /// Set an environment variable (KEY=VALUE, or KEY to pass rvmm's own value).
    #[arg(short, long = "env", value_name = "KEY[=VALUE]")]
    pub env: Vec<String>,
    /// Read environment variables from a file (KEY=VALUE lines, # comments).
    #[arg(long, value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// Working directory inside the workload.
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// User to run as: name, uid, name:group or uid:gid (resolved in the image).
    #[arg(short, long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,
    /// Override the image's entrypoint ("" clears it).
    #[arg(long, value_name = "CMD")]
    pub entrypoint: Option<String>,
    /// Hostname of the workload (default: the first 12 digits of its ID).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Name of the run (default: generated); shown by `rvmm ps`, usable with `rvmm rm`.
    #[arg(long)]
    pub name: Option<String>,
    /// Remove the workload's writable layer when it exits. Without it, it is kept (exited, listed
    /// by `rvmm ps -a`) until `rvmm rm`.
    #[arg(long)]
    pub rm: bool,
    /// Run in the background: print the run's ID once the workload has started, and keep its
    /// output in the run's log (`rvmm logs`); `rvmm stop`, `kill`, `wait` and `rm -f` control it.
    #[arg(short, long)]
    pub detach: bool,
    /// Keep stdin attached.
    #[arg(short, long)]
    pub interactive: bool,
    /// Allocate a pseudo-terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// Memory limit (e.g. 64m, 1g); for VMs, the guest's RAM (default 256m there).
    #[arg(short, long, value_name = "BYTES")]
    pub memory: Option<String>,
    /// CPU limit (e.g. 0.5, 2); for VMs, the vCPU count (rounded up).
    #[arg(long, value_name = "N")]
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    #[arg(long, value_name = "N")]
    pub pids_limit: Option<u64>,
    /// Mount the root filesystem read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Network mode.
    #[arg(long, value_enum, default_value = "bridge")]
    pub network: Net,
    /// Publish a port: HOSTPORT:CONTAINERPORT[/tcp|udp].
    #[arg(short, long = "publish", value_name = "HOST:CONTAINER[/PROTO]")]
    pub publish: Vec<String>,
    /// Mount a host path, a named volume (made on first use, filled from the image) or a new
    /// anonymous volume: HOSTPATH:PATH[:ro], NAME:PATH[:ro|nocopy] or PATH.
    #[arg(short, long = "volume", value_name = "SRC:PATH[:OPTS]")]
    pub volume: Vec<String>,
    /// Mount, in Docker's long form: type=bind|volume|tmpfs,source=..,target=..[,readonly]
    /// [,volume-nocopy][,tmpfs-size=..][,tmpfs-mode=..].
    #[arg(long = "mount", value_name = "FIELDS")]
    pub mount: Vec<String>,
    /// Mount a new tmpfs: PATH[:OPTS] (size=64m,mode=1777,exec,...; default nosuid,nodev,noexec).
    #[arg(long, value_name = "PATH[:OPTS]")]
    pub tmpfs: Vec<String>,
    /// No pull progress output.
    #[arg(short, long)]
    pub quiet: bool,
    /// With --isolation=vm: boot the guest kernel instead of restoring the warm snapshot (and
    /// take none). Without it, a VM starts from a snapshot of a booted guest when one matches,
    /// and the first boot of a kind saves one.
    #[arg(long)]
    pub cold: bool,
    /// Add Linux capabilities (names with or without CAP_, or ALL).
    #[arg(long, value_name = "CAP")]
    pub cap_add: Vec<String>,
    /// Drop Linux capabilities (names with or without CAP_, or ALL).
    #[arg(long, value_name = "CAP")]
    pub cap_drop: Vec<String>,
    /// Give the workload every capability, no seccomp filter, all devices and a writable /sys
    /// (in a VM: inside the guest, which stays a VM).
    #[arg(long)]
    pub privileged: bool,
    /// Security options: no-new-privileges[=true|false], seccomp=PROFILE.json|unconfined.
    #[arg(long, value_name = "OPT")]
    pub security_opt: Vec<String>,
    /// Resource limit: TYPE=SOFT[:HARD] (core, cpu, data, fsize, locks, memlock, msgqueue, nice,
    /// nofile, nproc, rss, rtprio, rttime, sigpending, stack, as; -1 for unlimited).
    #[arg(long, value_name = "TYPE=SOFT[:HARD]")]
    pub ulimit: Vec<String>,
    /// Size of /dev/shm (default 64m).
    #[arg(long, value_name = "BYTES")]
    pub shm_size: Option<String>,
    /// Additional group (name in the image's /etc/group, or number).
    #[arg(long, value_name = "GROUP")]
    pub group_add: Vec<String>,
    /// A line for /etc/hosts: NAME:ADDRESS (ADDRESS may be host-gateway).
    #[arg(long, value_name = "NAME:ADDR")]
    pub add_host: Vec<String>,
    /// DNS server for the workload's resolv.conf (replaces the host's).
    #[arg(long, value_name = "ADDR")]
    pub dns: Vec<String>,
    /// DNS search domain ("." for none).
    #[arg(long, value_name = "DOMAIN")]
    pub dns_search: Vec<String>,
    /// Kernel parameter: KEY=VALUE (container: namespaced ones only; VM: set in the guest).
    #[arg(long, value_name = "KEY=VALUE")]
    pub sysctl: Vec<String>,
    /// Metadata: KEY[=VALUE] (shown by inspect, matched by ps --filter label=).
    #[arg(short = 'l', long = "label", value_name = "KEY[=VALUE]")]
    pub label: Vec<String>,
    /// Signal `stop` sends (default: the image's StopSignal, else SIGTERM).
    #[arg(long, value_name = "SIGNAL")]
    pub stop_signal: Option<String>,
    /// Seconds `stop` waits after the stop signal before killing (default 10).
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true)]
    pub stop_timeout: Option<i32>,
    /// When to pull the image: missing (default), always, never.
    #[arg(long, default_value = "missing", value_name = "POLICY")]
    pub pull: String,
    /// Write the run's ID to FILE (which must not exist).
    #[arg(long, value_name = "FILE")]
    pub cidfile: Option<PathBuf>,
    /// The image's platform: linux/amd64 is the only one rvmm runs.
    #[arg(long, value_name = "OS/ARCH")]
    pub platform: Option<String>,
    /// Run a tiny init as PID 1 that forwards signals and reaps zombies (in a VM, rvmm-init does).
    #[arg(long)]
    pub init: bool,
    /// CPUs the workload may run on (e.g. 0-2,4; in a VM, vCPU numbers).
    #[arg(long, value_name = "LIST")]
    pub cpuset_cpus: Option<String>,
    /// Relative CPU weight (default 1024; container isolation).
    #[arg(short = 'c', long, value_name = "N")]
    pub cpu_shares: Option<u64>,
    /// Memory plus swap limit (-1: unlimited swap; container isolation).
    #[arg(long, value_name = "BYTES", allow_hyphen_values = true)]
    pub memory_swap: Option<String>,
    /// Give a host device to the workload: HOST[:CONTAINER][:rwm] (container isolation).
    #[arg(long, value_name = "HOST[:CONT][:rwm]")]
    pub device: Vec<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// The image: NAME[:TAG], NAME@DIGEST, an image ID, oci:DIR[:TAG], docker-archive:FILE, oci-archive:FILE.
    pub image: String,
    /// Command and arguments (replace the image's Cmd).
    #[arg(allow_hyphen_values = true)]
    pub command: Vec<String>,
}

pub fn exec(args: Args, global: &Global) -> anyhow::Result<u8> {
    supervise::protect_start_fd();
    let flags = RunFlags {
        entrypoint: args.entrypoint.clone(),
        args: args.command.clone(),
        env: args.env.clone(),
        env_files: args.env_file.clone(),
        workdir: args.workdir.clone(),
        user: args.user.clone(),
        hostname: args.hostname.clone(),
        tty: args.tty,
        stdin: args.interactive,
        read_only: args.read_only,
        limits: Limits {
            memory_bytes: args
                .memory
                .as_deref()
                .map(runspec::parse_bytes)
                .transpose()?,
            cpus: args.cpus,
            pids: args.pids_limit,
            cpu_shares: args.cpu_shares,
            memory_swap: args
                .memory_swap
                .as_deref()
                .map(runspec::parse_memory_swap)
                .transpose()?,
        },
        network: match args.network {
            Net::None => NetworkMode::None,
            Net::Bridge => NetworkMode::Bridge,
        },
        ports: args
            .publish
            .iter()
            .map(|p| runspec::parse_port(p))
            .collect::<Result<_, runspec::Error>>()?,
        mounts: mounts(&args)?,
        ulimits: args
            .ulimit
            .iter()
            .map(|u| runspec::parse_ulimit(u))
            .collect::<Result<_, runspec::Error>>()?,
        shm_size: args
            .shm_size
            .as_deref()
            .map(runspec::parse_bytes)
            .transpose()?,
        group_add: args.group_add.clone(),
        add_hosts: args
            .add_host
            .iter()
            .map(|h| runspec::parse_add_host(h))
            .collect::<Result<_, runspec::Error>>()?,
        dns: args
            .dns
            .iter()
            .map(|d| runspec::parse_dns(d))
            .collect::<Result<_, runspec::Error>>()?,
        dns_search: args
            .dns_search
            .iter()
            .map(|d| runspec::parse_dns_search(d))
            .collect::<Result<_, runspec::Error>>()?,
        sysctls: args
            .sysctl
            .iter()
            .map(|s| runspec::parse_sysctl(s, args.isolation == Isolation::Vm))
            .collect::<Result<_, runspec::Error>>()?,
        labels: args
            .label
            .iter()
            .map(|l| runspec::parse_label(l))
            .collect::<Result<_, runspec::Error>>()?,
        stop_signal: args.stop_signal.clone(),
        stop_timeout: args.stop_timeout,
        init: args.init,
        cpus_allowed: match &args.cpuset_cpus {
            Some(s) => {
                let available: Vec<u32> = match args.isolation {
                    // The guest's vCPUs (⌈--cpus⌉, at least 1).
                    Isolation::Vm => {
                        (0..args.cpus.map_or(1, |c| c.ceil().clamp(1.0, 32.0) as u32)).collect()
                    }
                    // The CPUs of the cpuset the run's cgroup goes under (else every CPU).
                    Isolation::Container => rvmm::cgroups::Layout::detect()
                        .ok()
                        .and_then(|l| rvmm::cgroups::available_cpus(&l))
                        .filter(|v| !v.is_empty())
                        .unwrap_or_else(|| {
                            // SAFETY: sysconf with a constant.
                            let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
                            (0..n.max(1) as u32).collect()
                        }),
                };
                runspec::parse_cpuset(s, &available)?
            }
            None => Vec::new(),
        },
        devices: args
            .device
            .iter()
            .map(|d| runspec::parse_device(d))
            .collect::<Result<_, runspec::Error>>()?,
    };
    if args.isolation == Isolation::Vm {
        if !flags.devices.is_empty() {
            anyhow::bail!("--device: a host device cannot be given to a VM (its kernel has only virtio devices)");
        }
        if args.cpu_shares.is_some() {
            anyhow::bail!("--cpu-shares: a VM's vCPU threads are not in a cgroup (use --cpus)");
        }
        if args.memory_swap.is_some() {
            anyhow::bail!("--memory-swap: a VM has no swap; its memory is --memory");
        }
    }
    if flags.limits.memory_swap.is_some_and(|s| s != u64::MAX)
        && flags
            .limits
            .memory_bytes
            .is_none_or(|m| flags.limits.memory_swap < Some(m))
    {
        anyhow::bail!("--memory-swap needs --memory, and must be at least as large");
    }
    if args.cpu_shares.is_some_and(|s| !(2..=262_144).contains(&s)) {
        anyhow::bail!("--cpu-shares must be between 2 and 262144");
    }
    if let Some(s) = &args.stop_signal {
        if runspec::signal_number(s).is_none() {
            anyhow::bail!("invalid --stop-signal {s:?}: not a signal");
        }
    }
    if args.stop_timeout.is_some_and(|t| t < -1) {
        anyhow::bail!("invalid --stop-timeout: seconds, or -1 for no limit");
    }
    let policy = match args.pull.as_str() {
        "missing" => image::PullPolicy::Missing,
        "always" => image::PullPolicy::Always,
        "never" => image::PullPolicy::Never,
        p => anyhow::bail!("invalid --pull {p:?}: always, missing or never"),
    };
    if let Some(p) = &args.platform {
        runspec::check_platform(p)?;
    }
    if let Some(f) = &args.cidfile {
        if f.exists() {
            anyhow::bail!(
                "the cidfile {} exists: make sure the other run is gone, or delete the file",
                f.display()
            );
        }
    }
    if flags.network == NetworkMode::None
        && flags.add_hosts.iter().any(|(_, a)| a == "host-gateway")
    {
        anyhow::bail!("--add-host host-gateway needs --network bridge");
    }
    let mut privileges = rvmm::security::Request {
        privileged: args.privileged,
        cap_add: rvmm::security::parse_caps(&args.cap_add)?,
        cap_drop: rvmm::security::parse_caps(&args.cap_drop)?,
        ..Default::default()
    };
    for o in &args.security_opt {
        privileges.security_opt(o)?;
    }
    if let Some(c) = args.cpus {
        if !(c > 0.0 && c <= 1024.0) {
            anyhow::bail!("--cpus must be a positive number");
        }
    }
    let store = Store::open(&global.root)?;
    let resolved = image::resolve_with(
        &store,
        &args.image,
        &args.registry.options(args.quiet),
        policy,
    )?;
    // A supervised run (the second half of `run -d`) takes the ID its supervisor was given.
    let supervised = std::env::var_os(supervise::SUPERVISED_ENV).is_some();
    let id = std::env::var(supervise::RUN_ID_ENV)
        .ok()
        .filter(|v| supervised && v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(rvmm::run::new_id);
    let spec = runspec::build(&resolved.config, &resolved.layers, &flags, &id[..12])?;
    // The cidfile is written once, by the command the user typed (not again by a supervised run).
    if let Some(f) = args.cidfile.as_ref().filter(|_| !supervised) {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(f)
            .with_context(|| format!("creating the cidfile {}", f.display()))?;
        file.write_all(id.as_bytes())
            .with_context(|| format!("writing the cidfile {}", f.display()))?;
    }
    if args.detach && !supervised {
        // The image is here and the flags are good: the rest runs under a supervisor.
        return Ok(supervise::detach(&global.root, &id, !args.tty)?);
    }
    let opts = RunOptions {
        root: global.root.clone(),
        id: id.clone(),
        name: args
            .name
            .clone()
            .unwrap_or_else(|| format!("rvmm-{}", &id[..8])),
        remove: args.rm,
        image: resolved.reference.clone(),
        cold: args.cold,
        detached: supervised,
        logs_itself: supervised && std::env::var_os(supervise::LOGS_ITSELF_ENV).is_some(),
        privileges,
    };
    // A run owns host resources (taps, mounts, cgroups): a closed stdout must not kill rvmm before it
    // releases them. Writes then fail with EPIPE and the workload's output is dropped.
    // SAFETY: changing a signal disposition; no handler runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    match args.isolation {
        Isolation::Container => Ok(container::run(&spec, &resolved, &opts)?),
        Isolation::Vm => Ok(rvmm::vm::run(&spec, &resolved, &opts)?),
    }
}

/// `-v`, `--mount` and `--tmpfs`, parsed and checked, parents before what is mounted in them (as
/// Docker orders them).
fn mounts(args: &Args) -> Result<Vec<runspec::Mount>, runspec::Error> {
    let mut all = args
        .volume
        .iter()
        .map(|v| runspec::parse_volume(v))
        .chain(args.mount.iter().map(|m| runspec::parse_mount(m)))
        .chain(args.tmpfs.iter().map(|t| runspec::parse_tmpfs(t)))
        .collect::<Result<Vec<_>, _>>()?;
    runspec::check_mounts(&all)?;
    all.sort_by_key(|m| m.destination.split('/').filter(|c| !c.is_empty()).count());
    Ok(all)
}

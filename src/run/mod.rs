//! The run core: what a run is and does whichever isolation runs it, written once.
//!
//! `rvmm run` resolves the image and builds the [`RunSpec`](crate::runspec::RunSpec), then
//! [`prepare`] does the prologue (gc of dead runs, the name check, the run directory and state,
//! the cleanup guard, the layer lock, the network lease and published ports, and the last parts
//! of the spec: privileges, DNS, /etc contents). The isolation (`container::run` or `vm::run`)
//! takes the [`Prepared`] run and returns the workload's status through [`Prepared::finish`].
//! Neither isolation imports the other: what they share lives here, in `security`, `cgroups`
//! and `net`, and (inside the workload's root) in the `rvmm-workload` crate.

pub mod logs;
pub mod shim;
pub mod state;
pub mod stdio;
pub mod supervise;
pub mod timings;

use std::io::Read;
use std::path::PathBuf;

use crate::error::{IoContext, IoError};

/// What can go wrong in a run's prologue and plumbing, the same for both isolations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("the name {0:?} is already in use by another run")]
    NameInUse(String),
    #[error("-p needs --network bridge")]
    PortsNeedBridge,
    #[error("--add-host host-gateway needs --network bridge")]
    HostGatewayNeedsBridge,
    #[error(transparent)]
    Store(#[from] crate::image::store::Error),
    #[error(transparent)]
    Net(#[from] crate::net::Error),
    #[error(transparent)]
    Cgroups(#[from] crate::cgroups::Error),
    #[error(transparent)]
    Security(#[from] crate::security::Error),
    #[error("the run's state cannot be encoded")]
    StateJson(#[source] serde_json::Error),
    #[error("the run's supervisor ended without starting the run")]
    SupervisorGone,
    #[error(transparent)]
    Volume(#[from] crate::volume::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

use crate::runspec::{NetworkMode, RunSpec};
pub use state::{Isolation, RunState, Status};

/// How a run is kept and named (not part of the workload's RunSpec).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The store root (`--root`): runs live in ROOT/runs/ID.
    pub root: PathBuf,
    pub id: String,
    pub name: String,
    /// `--rm`: remove the run's directory (writable layer, logs) when it exits (else `rvmm rm`
    /// does).
    pub remove: bool,
    pub image: String,
    /// VM isolation: boot the kernel instead of restoring a snapshot, and take none (`--cold`).
    pub cold: bool,
    /// Run under a supervisor (`run -d`): the output goes to the run's log.
    pub detached: bool,
    /// A detached container run with no supervisor process reading its output: it writes the
    /// workload's output to the run's log itself (see `supervise::detach`).
    pub logs_itself: bool,
    /// What the flags ask of the workload's privileges; [`prepare`] turns it into the spec's
    /// `security` once the isolation is known.
    pub privileges: crate::security::Request,
}

/// A new run ID: 64 hex digits from the kernel's random pool.
pub fn new_id() -> String {
    let mut b = [0u8; 32];
    let mut f = std::fs::File::open("/dev/urandom").ok();
    if let Some(f) = f.as_mut() {
        let _ = f.read_exact(&mut b);
    }
    hex::encode(b)
}

/// What a run (either isolation) left on the host, removed on drop (every exit path, panics
/// included).
pub struct Cleanup {
    pub state: RunState,
    pub lease: Option<crate::net::Lease>,
}

impl Cleanup {
    /// See [`Prepared::started`] (a VM run handed over to rvmm-vmm has only this).
    pub fn started(&mut self) {
        self.state.started_at = Some(state::now());
        let _ = self.state.save();
        supervise::report_started();
    }

    /// See [`Prepared::finish`].
    pub fn finish(&mut self, code: i32, remove: bool) -> u8 {
        self.state.finish(code, remove);
        code.clamp(0, 255) as u8
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.state.status == Status::Running {
            // The run failed on a path that returned early (an error from the VMM's restore, a
            // panic): it is recorded as a setup failure, and `--rm` removes it, as `fail` would.
            let remove = self.state.remove;
            self.state.finish(125, remove);
        }
        self.state.release_host_resources();
        if let Some(l) = &self.lease {
            l.release();
        }
    }
}

/// A run after the shared prologue, ready for its isolation.
pub struct Prepared {
    /// The run's directory (ROOT/runs/ID).
    pub dir: PathBuf,
    /// The spec with everything the run decided filled in: address, gateway, DNS, privileges,
    /// /etc contents. Both isolations consume exactly this.
    pub spec: RunSpec,
    pub cleanup: Cleanup,
    /// The published ports, bound on the host; the isolation starts forwarding them to the
    /// workload's address once the workload runs.
    pub publisher: Option<crate::net::Publisher>,
    /// Keeps the image layers from being pruned while the run uses them.
    _layers: crate::image::store::Lock,
}

impl Prepared {
    /// The workload ended with `code` (Docker numbering): the state records it, the host
    /// resources go, and with `--rm` so does the run's directory. Returns the process status.
    pub fn finish(mut self, code: i32, remove: bool) -> u8 {
        self.cleanup.finish(code, remove)
    }

    /// The workload never started: the run is recorded as exited with 125.
    pub fn fail(mut self, remove: bool) {
        self.cleanup.finish(125, remove);
    }

    /// The workload was exec'd: recorded for `ps`, `inspect` and a waiting `run -d`.
    pub fn started(&mut self) {
        self.cleanup.started();
    }

    /// The lock that keeps the run's image layers (to be inherited by `rvmm-shim`).
    pub fn layers_fd(&self) -> std::os::fd::RawFd {
        self._layers.raw_fd()
    }

    /// The address the run got on the bridge, if any.
    pub fn address(&self) -> Option<std::net::Ipv4Addr> {
        self.cleanup.lease.as_ref().map(|l| l.addr)
    }
}

/// The prologue of every run: frees what dead runs left, checks the name, creates the run's
/// directory and state, locks the image layers, takes an address and binds the published ports
/// (bridge network), and fills in what the spec still lacks, the same for both isolations.
pub fn prepare(spec: &RunSpec, opts: &RunOptions, isolation: Isolation) -> Result<Prepared> {
    state::gc(&opts.root);
    // The name check and the run's first state write under one lock: two runs started at once
    // with one name must not both pass the check.
    let names_lock = state::lock_names(&opts.root)?;
    if state::list(&opts.root)?.iter().any(|s| s.name == opts.name) {
        return Err(Error::NameInUse(opts.name.clone()));
    }
    if spec.network.mode != NetworkMode::Bridge && !spec.network.ports.is_empty() {
        return Err(Error::PortsNeedBridge);
    }
    let store = crate::image::Store::open(&opts.root)?;
    let layers = store.use_layers()?;
    let dir = state::run_dir(&opts.root, &opts.id);
    std::fs::create_dir_all(&dir).at(|| format!("creating {}", dir.display()))?;
    let mut cleanup = Cleanup {
        state: RunState::new(opts, spec, isolation, &dir),
        lease: None,
    };
    cleanup.state.save()?;
    drop(names_lock);

    let mut spec = spec.clone();
    use_volumes(&mut spec, &opts.root, &mut cleanup.state)?;
    let mut publisher = None;
    if spec.network.mode == NetworkMode::Bridge {
        let (lease, p) = crate::net::attach_run(&mut spec.network, &opts.id)?;
        cleanup.lease = Some(lease);
        publisher = Some(p);
    }
    complete_spec(&mut spec, isolation, &opts.privileges)?;
    cleanup.state.address = spec.network.address.clone();
    cleanup.state.save()?;
    // What `rvmm inspect` shows as the run's configuration.
    if let Ok(j) = serde_json::to_vec_pretty(&spec) {
        let _ = std::fs::write(dir.join("spec.json"), j);
    }
    Ok(Prepared {
        dir,
        spec,
        cleanup,
        publisher,
        _layers: layers,
    })
}

/// The spec's volumes, made if they do not exist yet and recorded in the run's state under the
/// volume store's lock (so none is removed between here and the run's end); each mount's source
/// becomes the volume's directory.
fn use_volumes(spec: &mut RunSpec, root: &std::path::Path, state: &mut RunState) -> Result<()> {
    use crate::runspec::MountKind;
    if !spec.mounts.iter().any(|m| m.kind == MountKind::Volume) {
        return Ok(());
    }
    let lock = crate::volume::lock(root)?;
    for m in spec
        .mounts
        .iter_mut()
        .filter(|m| m.kind == MountKind::Volume)
    {
        let name = (!m.source.is_empty()).then_some(m.source.as_str());
        let (v, _) = crate::volume::create(root, name, Default::default(), &lock)?;
        m.source = crate::volume::data_dir(root, &v.name).display().to_string();
        state.volumes.push(v.name);
    }
    state.save()?;
    Ok(())
}

/// What the spec gets once the run's network is known, decided here once for both isolations:
/// the workload's privileges (Docker's defaults), its DNS servers, and its /etc/hostname,
/// /etc/hosts and /etc/resolv.conf.
fn complete_spec(
    spec: &mut RunSpec,
    isolation: Isolation,
    privileges: &crate::security::Request,
) -> Result<()> {
    // MKNOD is safe to grant where something still stands between a device node and the host:
    // the guest kernel, or the devices cgroup of a v1 host.
    let allow_mknod = match isolation {
        Isolation::Vm => true,
        Isolation::Container => {
            crate::cgroups::Layout::detect()?.version() == crate::cgroups::Version::V1
        }
    };
    spec.security = crate::security::resolve(privileges, allow_mknod)?;
    spec.privileged = privileges.privileged;
    let resolv = resolv_conf(
        &crate::net::host_resolv_conf(),
        &spec.network.dns,
        &spec.network.dns_search,
    );
    spec.network.dns = resolv
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver").map(|a| a.trim().to_string()))
        .collect();
    let addr = spec
        .network
        .address
        .as_deref()
        .and_then(|a| a.split('/').next());
    let mut hosts = rvmm_proto::rootfs::hosts(&spec.hostname, addr);
    for (name, a) in &spec.network.extra_hosts {
        let a = if a == "host-gateway" {
            spec.network
                .gateway
                .as_deref()
                .ok_or(Error::HostGatewayNeedsBridge)?
        } else {
            a
        };
        hosts.push_str(&format!("{a}\t{name}\n"));
    }
    spec.etc = rvmm_proto::EtcFiles {
        hostname: format!("{}\n", spec.hostname),
        hosts,
        resolv_conf: resolv,
    };
    Ok(())
}

/// The workload's resolv.conf: the host's (less loopback servers), with `--dns` servers instead
/// of its nameserver lines and `--dns-search` domains instead of its search line, as Docker does.
fn resolv_conf(host: &str, dns: &[String], search: &[String]) -> String {
    let mut out = String::new();
    for l in host.lines() {
        let key = l.split_whitespace().next().unwrap_or_default();
        if (key == "nameserver" && !dns.is_empty())
            || ((key == "search" || key == "domain") && !search.is_empty())
        {
            continue;
        }
        out.push_str(l);
        out.push('\n');
    }
    let domains: Vec<&str> = search
        .iter()
        .map(String::as_str)
        .filter(|d| *d != ".")
        .collect();
    if !domains.is_empty() {
        out.push_str(&format!("search {}\n", domains.join(" ")));
    }
    for d in dns {
        out.push_str(&format!("nameserver {d}\n"));
    }
    out
}

/// Signals rvmm relays to the workload (both isolations).
pub use rvmm_shim::signals::{install_handler, RELAYED as RELAYED_SIGNALS};

/// Human-readable byte counts as `--memory` takes them (for messages).
pub fn human_bytes(b: u64) -> String {
    if b >= 1 << 30 && b % (1 << 30) == 0 {
        format!("{}g", b >> 30)
    } else if b >= 1 << 20 && b % (1 << 20) == 0 {
        format!("{}m", b >> 20)
    } else {
        format!("{b}")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn resolv_conf_follows_docker() {
        let host = "search example.org\nnameserver 10.0.0.1\noptions ndots:2\n";
        assert_eq!(super::resolv_conf(host, &[], &[]), host);
        assert_eq!(
            super::resolv_conf(host, &["1.1.1.1".into()], &["a.test".into(), "b".into()]),
            "options ndots:2\nsearch a.test b\nnameserver 1.1.1.1\n"
        );
        assert_eq!(
            super::resolv_conf(host, &[], &[".".into()]),
            "nameserver 10.0.0.1\noptions ndots:2\n"
        );
    }
}

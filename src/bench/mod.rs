//! Benchmark harness: vm vs container vs the peers on this machine.
//!
//! Every contender is driven as a separate process, exactly as a user would run it, so the numbers include
//! everything a user waits for. Runs are interleaved between contenders so drift hits all alike; each
//! result is a JSON line; the report is Markdown with SVG charts.

mod contenders;
pub mod host;
pub mod measure;
pub mod report;
pub mod stats;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

pub use contenders::{qemu_microvm_command, Contender, PeerPaths, Workload};

/// The built-in sample image: built locally from Debian's busybox-static by scripts/make-test-images.sh,
/// imported by scripts/setup.sh.
pub const DEFAULT_IMAGE: &str = "localhost/rvmm-sample:latest";

/// Peers found on PATH.
pub fn contenders_from_path() -> PeerPaths {
    PeerPaths::from_path()
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for a contender failed")]
    Wait(#[source] std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("exited with status {code}: {stderr}")]
    Failed { code: i32, stderr: String },
    #[error("unknown scenario `{0}` (known: startup, cold, memory, density, io, boot, warm)")]
    UnknownScenario(String),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
}

/// A benchmark scenario; all run by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// launch → first byte and launch → exit for `true` and `echo`, warm store.
    Startup,
    /// The same from an empty store (image unpack, and for VMs the root disk build).
    Cold,
    /// Host cost of one idle instance.
    Memory,
    /// N instances at once: time to all ready, total memory.
    Density,
    /// Sequential write and read on the root filesystem.
    Io,
    /// Direct kernel boots: rvmm vm vs QEMU microvm vs Firecracker/Cloud Hypervisor on the same kernel and disk.
    Boot,
    /// Warm VM starts: the restore, and memory of VMs restored from one snapshot.
    Warm,
}

impl Scenario {
    pub const ALL: [Scenario; 7] = [
        Scenario::Startup,
        Scenario::Warm,
        Scenario::Cold,
        Scenario::Memory,
        Scenario::Density,
        Scenario::Io,
        Scenario::Boot,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Startup => "startup",
            Scenario::Cold => "cold",
            Scenario::Memory => "memory",
            Scenario::Density => "density",
            Scenario::Io => "io",
            Scenario::Boot => "boot",
            Scenario::Warm => "warm",
        }
    }

    pub fn parse(s: &str) -> Result<Scenario, Error> {
        Scenario::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| Error::UnknownScenario(s.to_string()))
    }
}

/// What to run and how often.
#[derive(Debug, Clone)]
pub struct Options {
    pub scenarios: Vec<Scenario>,
    /// Repetitions for fast contenders (containers), after `warmup` unrecorded runs.
    pub runs: usize,
    /// Repetitions for contenders that boot a kernel.
    pub vm_runs: usize,
    pub warmup: usize,
    /// Instances for the density scenario.
    pub density: usize,
    /// Image every rvmm contender runs.
    pub image: String,
    pub rvmm: PathBuf,
    /// Store root the warm runs use.
    pub root: PathBuf,
    pub out_dir: PathBuf,
    /// Per-run limits.
    pub timeout: Duration,
    pub vm_timeout: Duration,
    /// Skip VM density and repeated cold VM boots.
    pub quick: bool,
    /// Guest RAM for VM contenders, MiB.
    pub vm_memory_mib: u32,
    pub peers: contenders::PeerPaths,
}

/// One measurement, or one failure, as a JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub scenario: Scenario,
    pub contender: String,
    pub metric: String,
    pub unit: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x: Option<f64>,
}

/// Collects records, writes them as JSON lines as they arrive, and shows progress.
pub struct Recorder {
    pub records: Vec<Record>,
    jsonl: std::fs::File,
    tty: bool,
}

impl Recorder {
    fn new(out_dir: &std::path::Path) -> Result<Recorder, Error> {
        let path = out_dir.join("results.jsonl");
        let jsonl = std::fs::File::create(&path).map_err(|source| Error::Write { path, source })?;
        Ok(Recorder {
            records: Vec::new(),
            jsonl,
            tty: std::io::stderr().is_terminal(),
        })
    }

    pub fn value(&mut self, s: Scenario, contender: &str, metric: &str, unit: &str, value: f64) {
        self.push(Record {
            scenario: s,
            contender: contender.into(),
            metric: metric.into(),
            unit: unit.into(),
            value: Some(value),
            error: None,
            x: None,
        });
    }

    pub fn point(
        &mut self,
        s: Scenario,
        contender: &str,
        metric: &str,
        unit: &str,
        x: f64,
        y: f64,
    ) {
        self.push(Record {
            scenario: s,
            contender: contender.into(),
            metric: metric.into(),
            unit: unit.into(),
            value: Some(y),
            error: None,
            x: Some(x),
        });
    }

    pub fn failure(&mut self, s: Scenario, contender: &str, metric: &str, why: String) {
        self.progress_line(&format!("{} {contender}: {why}", s.name()));
        self.push(Record {
            scenario: s,
            contender: contender.into(),
            metric: metric.into(),
            unit: String::new(),
            value: None,
            error: Some(why),
            x: None,
        });
    }

    fn push(&mut self, r: Record) {
        if let Ok(line) = serde_json::to_string(&r) {
            let _ = writeln!(self.jsonl, "{line}");
        }
        self.records.push(r);
    }

    /// One progress line: rewritten in place on a terminal, a plain line otherwise.
    pub fn progress(&self, msg: &str) {
        if self.tty {
            eprint!("\r\x1b[2K[bench] {msg}");
        } else {
            eprintln!("[bench] {msg}");
        }
    }

    fn progress_line(&self, msg: &str) {
        if self.tty {
            eprintln!("\r\x1b[2K[bench] {msg}");
        } else {
            eprintln!("[bench] {msg}");
        }
    }
}

/// Runs the selected scenarios and writes results.jsonl, report.md and the charts into `out_dir`.
/// A contender that fails is recorded as a failure and the bench goes on.
pub fn run(opts: &Options) -> Result<PathBuf, Error> {
    std::fs::create_dir_all(&opts.out_dir).map_err(|source| Error::Write {
        path: opts.out_dir.clone(),
        source,
    })?;
    let mut host = host::Host::describe();
    let mut rec = Recorder::new(&opts.out_dir)?;
    let mut env = contenders::Env::prepare(opts, &mut rec)?;
    for &s in &opts.scenarios {
        rec.progress_line(&format!("scenario {}", s.name()));
        match s {
            Scenario::Startup => contenders::startup(opts, &env, &mut rec),
            Scenario::Cold => contenders::cold(opts, &env, &mut rec),
            Scenario::Memory => contenders::memory(opts, &env, &mut rec),
            Scenario::Density => contenders::density(opts, &env, &mut rec),
            Scenario::Io => contenders::io(opts, &env, &mut rec),
            Scenario::Boot => contenders::boot(opts, &mut env, &mut rec),
            Scenario::Warm => contenders::warm(opts, &env, &mut rec),
        }
    }
    if rec.tty {
        eprintln!();
    }
    host.finish();
    env.cleanup();
    let report = report::write(&opts.out_dir, &host, opts, &rec.records)?;
    Ok(report)
}

/// Flattens `image` (as the store at `root` resolves it) into the plain directory `dest`.
fn image_rootfs(root: &std::path::Path, image: &str, dest: &std::path::Path) -> Result<(), String> {
    let export = || -> Result<(), Box<dyn std::error::Error>> {
        let store = crate::image::Store::open(root)?;
        let opts = crate::image::PullOptions {
            quiet: true,
            ..Default::default()
        };
        let resolved = crate::image::resolve(&store, image, &opts)?;
        Ok(crate::image::disk::export_rootfs(&resolved, dest)?)
    };
    export().map_err(|e| crate::error::chain(&*e))
}

/// What a peer VMM must add to the kernel command line on this host (rvmm vm adds it itself).
fn peer_cmdline_additions() -> String {
    if crate::vmm::kvm::host_kind() == crate::vmm::HostKind::Pvm {
        crate::kernel::pvm_cmdline_additions().to_string()
    } else {
        String::new()
    }
}

//! One file per subcommand. Each exposes `Args` (clap) and `exec`, which returns the process exit code.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod bench;
mod doctor;
mod gc;
mod images;
mod kernel;
mod lifecycle;
mod load;
mod login;
mod ps;
mod pull;
mod run;
mod save;
mod snapshot;
mod tag;
mod vm;
mod volume;

/// Exit status when rvmm itself fails (as Docker uses 125).
pub const EXIT_RVMM_FAILED: u8 = 125;

/// Run OCI images in a KVM microVM or a namespaced container, and measure the difference.
#[derive(Parser, Debug)]
#[command(name = "rvmm", version, about, propagate_version = true)]
pub struct Cli {
    /// Store root (images, layers, disks). Default: /var/lib/rvmm for root, $XDG_DATA_HOME/rvmm otherwise.
    #[arg(long, global = true, env = "RVMM_ROOT", value_name = "DIR")]
    pub root: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand sees.
#[derive(Debug, Clone)]
pub struct Global {
    pub root: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run an image in a microVM or a container.
    Run(Box<run::Args>),
    /// Pull an image from a registry.
    Pull(pull::Args),
    /// Load an image from a docker-archive or OCI-archive tarball.
    Load(load::Args),
    /// List images in the store.
    Images(images::ListArgs),
    /// Remove images from the store.
    Rmi(images::RmiArgs),
    /// Give an image another name: SOURCE (name or ID) gets TARGET.
    Tag(tag::Args),
    /// Write images to a docker-archive or oci-archive (-o FILE, else stdout).
    Save(save::Args),
    /// Log in to a registry (credentials go to Docker's config.json, which pull uses).
    Login(login::LoginArgs),
    /// Log out of a registry (remove its credentials from Docker's config.json).
    Logout(login::LogoutArgs),
    /// Image subcommands (inspect, ls, rm, tag, save, prune).
    #[command(subcommand)]
    Image(images::ImageCommand),
    /// List running workloads (both isolations); -a includes exited ones.
    Ps(ps::Args),
    /// Remove runs (their writable layers and logs); -f stops running ones first.
    Rm(ps::RmArgs),
    /// Show a run's output (runs started with -d keep it in their log).
    Logs(lifecycle::LogsArgs),
    /// Stop runs: their stop signal, then SIGKILL after -t seconds.
    Stop(lifecycle::StopArgs),
    /// Send a signal to runs' workloads (default SIGKILL).
    Kill(lifecycle::KillArgs),
    /// Wait for runs to end and print their exit statuses.
    Wait(lifecycle::WaitArgs),
    /// Show runs' state and configuration as JSON.
    Inspect(lifecycle::InspectArgs),
    /// Run a command in a running workload (container isolation).
    Exec(lifecycle::ExecArgs),
    /// The supervisor of a detached run (started by `run -d` when rvmm-shim is missing).
    #[command(name = "__supervise", hide = true)]
    Supervise(lifecycle::SuperviseArgs),
    /// The end of a container run kept by rvmm-shim (exec'd by the shim).
    #[command(name = rvmm_shim::keep::FINISH, hide = true)]
    Finish(lifecycle::FinishArgs),
    /// The jailed VMM process of a VM run (started by rvmm itself).
    #[command(name = "__vmm", hide = true)]
    Vmm,
    /// Remove what dead runs left behind (mounts, cgroups, taps, veths, rules, run dirs).
    Gc(gc::Args),
    /// Volumes: directories rvmm keeps for workloads (create, ls, inspect, rm, prune).
    #[command(subcommand)]
    Volume(volume::Command),
    /// Warm-start snapshots of VM isolation (ls, rm, gc, prewarm).
    #[command(subcommand)]
    Snapshot(snapshot::Command),
    /// Boot a kernel and disks directly with rvmm's VMM (low level).
    Vm(vm::Args),
    /// Build or locate the guest kernel.
    #[command(subcommand)]
    Kernel(kernel::Command),
    /// Benchmark vm vs container vs peers and write a report.
    Bench(bench::Args),
    /// Report what this host offers (KVM kind, cgroups, tun, kernel, tools).
    Doctor(doctor::Args),
}

pub fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    let global = Global {
        root: cli.root.unwrap_or_else(rvmm::paths::default_root),
    };
    match cli.command {
        Command::Run(a) => run::exec(*a, &global),
        Command::Pull(a) => pull::exec(a, &global),
        Command::Load(a) => load::exec(a, &global),
        Command::Images(a) => images::list(a, &global),
        Command::Tag(a) => tag::exec(a, &global),
        Command::Save(a) => save::exec(a, &global),
        Command::Login(a) => login::login(a),
        Command::Logout(a) => login::logout(a),
        Command::Snapshot(c) => snapshot::exec(c, &global),
        Command::Volume(c) => volume::exec(c, &global),
        Command::Rmi(a) => images::rmi(a, &global),
        Command::Image(c) => images::image(c, &global),
        Command::Ps(a) => ps::exec(a, &global),
        Command::Rm(a) => ps::rm(a, &global),
        Command::Logs(a) => lifecycle::logs(a, &global),
        Command::Stop(a) => lifecycle::stop(a, &global),
        Command::Kill(a) => lifecycle::kill(a, &global),
        Command::Wait(a) => lifecycle::wait(a, &global),
        Command::Inspect(a) => lifecycle::inspect(a, &global),
        Command::Exec(a) => lifecycle::exec(a, &global),
        Command::Supervise(a) => lifecycle::supervise(a),
        Command::Finish(a) => lifecycle::finish(a),
        Command::Vmm => Ok(rvmm::vm::jail::vmm_main()),
        Command::Gc(a) => gc::exec(a, &global),
        Command::Vm(a) => vm::exec(a, &global),
        Command::Kernel(c) => kernel::exec(c, &global),
        Command::Bench(a) => bench::exec(a, &global),
        Command::Doctor(a) => doctor::exec(a, &global),
    }
}

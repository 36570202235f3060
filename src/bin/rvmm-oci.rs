//! `rvmm-oci`: rvmm as an OCI runtime, with runc's command line (create, start, state, kill,
//! delete, ps, list, pause, resume, features, run), for engines such as podman (conmon) and
//! containerd (its runc shim). docs/engines.md shows how to plug it in.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use rvmm::oci::{self, state::Store, CreateOptions};

#[derive(Parser)]
#[command(
    name = "rvmm-oci",
    version = concat!(env!("CARGO_PKG_VERSION"), "\nspec: 1.2.0"),
    about = "rvmm as an OCI runtime: runc's command line, for podman, containerd and friends"
)]
struct Cli {
    /// Where container state lives (engines that cannot pass --root can set RVMM_OCI_ROOT).
    #[arg(long, global = true, env = "RVMM_OCI_ROOT", default_value = oci::state::DEFAULT_ROOT, value_name = "DIR")]
    root: PathBuf,
    /// Also write errors and warnings to this file (engines read it).
    #[arg(long, global = true, value_name = "FILE")]
    log: Option<PathBuf>,
    /// The --log file's format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log debug messages too.
    #[arg(long, global = true)]
    debug: bool,
    /// Accepted for runc compatibility (error, warn, info, debug).
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Accepted: cgroups are always made through cgroupfs; a systemd cgroupsPath
    /// (slice:prefix:name) becomes the scope systemd would make, slice/prefix-name.scope.
    #[arg(long, global = true)]
    systemd_cgroup: bool,
    /// Accepted for runc compatibility; rootless containers are not supported.
    #[arg(long, global = true, value_name = "true|false|auto")]
    rootless: Option<String>,
    /// The isolation of containers this command creates, for engines that cannot set the
    /// io.rvmm.isolation annotation (default: container, or vm when this binary is called
    /// rvmm-oci-vm).
    #[arg(
        long,
        global = true,
        env = "RVMM_OCI_ISOLATION",
        value_name = "container|vm"
    )]
    isolation: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct CreateArgs {
    /// The bundle: a directory with config.json.
    #[arg(short, long, default_value = ".", value_name = "DIR")]
    bundle: PathBuf,
    /// A unix socket that receives the terminal's master (process.terminal).
    #[arg(long, value_name = "PATH")]
    console_socket: Option<PathBuf>,
    /// Write the init's pid here.
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// Descriptors 3 .. 3+N are passed to the workload.
    #[arg(long, default_value_t = 0, value_name = "N")]
    preserve_fds: u32,
    /// Accepted for runc compatibility (rvmm always uses pivot_root).
    #[arg(long)]
    no_pivot: bool,
    /// Accepted for runc compatibility (no session keyring is made).
    #[arg(long)]
    no_new_keyring: bool,
    /// The container's id.
    id: String,
}

#[derive(clap::Args)]
struct ExecArgs {
    /// A JSON process document (the spec's `process`) instead of the flags and ARGS.
    #[arg(short, long, value_name = "FILE")]
    process: Option<PathBuf>,
    /// Return once the process runs.
    #[arg(short, long)]
    detach: bool,
    /// Write the process's pid here.
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// A unix socket that receives the terminal's master.
    #[arg(long, value_name = "PATH")]
    console_socket: Option<PathBuf>,
    /// Give the process a terminal.
    #[arg(short, long)]
    tty: bool,
    /// The working directory.
    #[arg(long, value_name = "DIR")]
    cwd: Option<String>,
    /// NAME=VALUE, added to the container's environment.
    #[arg(short, long, value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// UID[:GID].
    #[arg(short, long)]
    user: Option<String>,
    /// A supplementary group.
    #[arg(short = 'g', long, value_name = "GID")]
    additional_gids: Vec<u32>,
    /// Set no_new_privs for the process.
    #[arg(long)]
    no_new_privs: bool,
    /// A capability added to the process's sets.
    #[arg(short, long, value_name = "CAP")]
    cap: Vec<String>,
    /// Descriptors 3 .. 3+N are passed to the process.
    #[arg(long, default_value_t = 0, value_name = "N")]
    preserve_fds: u32,
    /// Accepted for runc compatibility.
    #[arg(long, value_name = "LABEL")]
    process_label: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long, value_name = "PROFILE")]
    apparmor: Option<String>,
    /// The container's id.
    id: String,
    /// The command and its arguments (without --process).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Create a container from a bundle; its init waits for `start`.
    Create(CreateArgs),
    /// Start a created container's process.
    Start { id: String },
    /// Create and start a container, wait for it and delete it (or leave it running with -d).
    Run {
        #[command(flatten)]
        create: CreateArgs,
        /// Return once it started.
        #[arg(short, long)]
        detach: bool,
    },
    /// Run a process in a running container: its own process with these changes, or a
    /// process document (--process).
    Exec(ExecArgs),
    /// Print a container's state (JSON).
    State { id: String },
    /// Send a signal to a container's init (default SIGTERM), or with --all to all its processes.
    Kill {
        /// Every process of the container.
        #[arg(short, long)]
        all: bool,
        id: String,
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    /// Delete a stopped (or created) container; --force kills a running one first.
    Delete {
        #[arg(short, long)]
        force: bool,
        id: String,
    },
    /// List a container's processes.
    Ps {
        #[arg(short, long, value_enum, default_value_t = ListFormat::Table)]
        format: ListFormat,
        id: String,
    },
    /// List containers.
    #[command(alias = "ls")]
    List {
        #[arg(short, long, value_enum, default_value_t = ListFormat::Table)]
        format: ListFormat,
        /// Ids only.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Freeze every process of a container.
    Pause { id: String },
    /// Thaw a paused container.
    Resume { id: String },
    /// What this runtime implements (JSON, the runtime spec's features document).
    Features,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum ListFormat {
    Table,
    Json,
}

fn main() -> ExitCode {
    // SAFETY: default SIGPIPE disposition before any thread exists (`rvmm-oci list | head`).
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // A VM container's VMM process, when no rvmm-vmm is installed beside this binary.
    if std::env::args_os().nth(1).is_some_and(|a| a == "__vmm") {
        return ExitCode::from(rvmm::vm::jail::vmm_main());
    }
    let cli = Cli::parse();
    let level = if cli.debug || cli.log_level.as_deref() == Some("debug") {
        "debug"
    } else {
        "warn"
    };
    env_logger::Builder::from_env(env_logger::Env::default().filter_or("RVMM_LOG", level))
        .format_timestamp_millis()
        .init();
    let (log, format) = (cli.log.clone(), cli.log_format);
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let msg = rvmm::error::chain(&e);
            eprintln!("rvmm-oci: {msg}");
            if let Some(p) = log {
                log_error(&p, format, &msg);
            }
            ExitCode::from(1)
        }
    }
}

/// One line in the `--log` file: runc's JSON (`level`, `msg`, `time`) or plain text.
fn log_error(path: &Path, format: LogFormat, msg: &str) {
    let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    else {
        return;
    };
    let time = oci::state::rfc3339_now();
    let line = match format {
        LogFormat::Json => {
            serde_json::json!({"level": "error", "msg": msg, "time": time}).to_string()
        }
        LogFormat::Text => format!("time=\"{time}\" level=error msg={msg:?}"),
    };
    let _ = writeln!(f, "{line}");
}

fn dispatch(cli: Cli) -> oci::Result<u8> {
    let store = Store::new(&cli.root);
    match cli.command {
        Command::Create(a) => {
            oci::create(&store, &a.id, &create_options(&a, cli.isolation.as_deref()))?;
        }
        Command::Start { id } => oci::start(&store, &id)?,
        Command::Run { create, detach } => {
            let pid = oci::create(
                &store,
                &create.id,
                &create_options(&create, cli.isolation.as_deref()),
            )?;
            rvmm_shim::signals::forward_to(pid, 0);
            if let Err(e) = oci::start(&store, &create.id) {
                let _ = oci::delete(&store, &create.id, true);
                return Err(e);
            }
            if detach {
                return Ok(0);
            }
            let code = oci::wait_exit(pid);
            rvmm_shim::signals::stop_forwarding();
            oci::delete(&store, &create.id, true)?;
            return Ok(code);
        }
        Command::Exec(a) => {
            let o = oci::ExecOptions {
                process: a.process,
                args: a.args,
                cwd: a.cwd,
                env: a.env,
                user: a.user,
                additional_gids: a.additional_gids,
                tty: a.tty,
                no_new_privs: a.no_new_privs,
                caps: a.cap,
                detach: a.detach,
                pid_file: a.pid_file,
                console_socket: a.console_socket,
                preserve_fds: a.preserve_fds,
            };
            return oci::exec(&store, &a.id, &o);
        }
        Command::State { id } => println!("{}", oci::state_json(&store, &id)?),
        Command::Kill { all, id, signal } => {
            let sig = oci::parse_signal(&signal)?;
            oci::kill(&store, &id, sig, all)?;
        }
        Command::Delete { force, id } => oci::delete(&store, &id, force)?,
        Command::Ps { format, id } => {
            let pids = oci::pids(&store, &id)?;
            match format {
                ListFormat::Json => {
                    println!("{}", serde_json::to_string(&pids).unwrap_or_default())
                }
                ListFormat::Table => {
                    println!("PID\tCMD");
                    for p in pids {
                        let cmd =
                            std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
                        println!("{p}\t{}", cmd.trim());
                    }
                }
            }
        }
        Command::List { format, quiet } => list(&store, format, quiet)?,
        Command::Pause { id } => oci::pause(&store, &id, true)?,
        Command::Resume { id } => oci::pause(&store, &id, false)?,
        Command::Features => println!(
            "{}",
            serde_json::to_string_pretty(&oci::features()).unwrap_or_default()
        ),
    }
    Ok(0)
}

/// Called `rvmm-oci-vm` (a link to this binary): VM isolation unless told otherwise.
fn named_for_vms() -> bool {
    std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().ends_with("-vm")))
        .unwrap_or(false)
}

fn create_options(a: &CreateArgs, isolation: Option<&str>) -> CreateOptions {
    CreateOptions {
        isolation: isolation.map(str::to_string),
        default_vm: named_for_vms(),
        bundle: a.bundle.clone(),
        console_socket: a.console_socket.clone(),
        pid_file: a.pid_file.clone(),
        preserve_fds: a.preserve_fds,
    }
}

fn list(store: &Store, format: ListFormat, quiet: bool) -> oci::Result<()> {
    let mut out = Vec::new();
    for id in store.ids() {
        // A container whose state went away meanwhile (a concurrent delete) is not listed.
        if let Ok(c) = store.load(&id) {
            out.push(c);
        }
    }
    if quiet {
        for c in &out {
            println!("{}", c.id);
        }
        return Ok(());
    }
    match format {
        ListFormat::Json => {
            let v: Vec<_> = out.iter().map(|c| store.report(c)).collect();
            println!("{}", serde_json::to_string(&v).unwrap_or_default());
        }
        ListFormat::Table => {
            println!("ID\tPID\tSTATUS\tBUNDLE\tCREATED\tOWNER");
            for c in &out {
                let r = store.report(c);
                println!(
                    "{}\t{}\t{}\t{}\t{}\troot",
                    r.id,
                    r.pid,
                    r.status,
                    r.bundle.display(),
                    r.created
                );
            }
        }
    }
    Ok(())
}

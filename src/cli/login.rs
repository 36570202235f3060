//! `rvmm login` and `rvmm logout`: registry credentials in Docker's config file
//! (`$DOCKER_CONFIG/config.json`, default `~/.docker/config.json`), which `pull` and `run` use.

use std::io::{BufRead, IsTerminal, Read, Write};

use anyhow::{bail, Context};
use rvmm::image::auth;

#[derive(clap::Args, Debug)]
pub struct LoginArgs {
    /// User name.
    #[arg(short, long)]
    pub username: Option<String>,
    /// Password (insecure: it shows in the process list and shell history; prefer --password-stdin).
    #[arg(short, long)]
    pub password: Option<String>,
    /// Read the password from stdin.
    #[arg(long)]
    pub password_stdin: bool,
    /// Talk plain HTTP to this registry (host[:port]); loopback registries always use HTTP. Repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,
    /// The registry, HOST[:PORT] (default: Docker Hub).
    pub registry: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct LogoutArgs {
    /// The registry, HOST[:PORT] (default: Docker Hub).
    pub registry: Option<String>,
}

/// As docker: any failure is one line and status 1.
pub fn login(args: LoginArgs) -> anyhow::Result<u8> {
    match try_login(args) {
        Ok(()) => {
            println!("Login Succeeded");
            Ok(0)
        }
        Err(e) => {
            eprintln!("rvmm: {e:#}");
            Ok(1)
        }
    }
}

fn try_login(args: LoginArgs) -> anyhow::Result<()> {
    let registry = auth::normalize_registry(args.registry.as_deref())?;
    if args.password.is_some() && args.password_stdin {
        bail!("--password and --password-stdin are mutually exclusive");
    }
    let (user, password) = if args.password_stdin {
        let Some(user) = args.username else {
            bail!("--password-stdin needs --username");
        };
        let mut p = String::new();
        std::io::stdin()
            .read_to_string(&mut p)
            .context("reading the password from stdin")?;
        (user, p.trim_end_matches(['\n', '\r']).to_string())
    } else if let Some(p) = args.password {
        eprintln!("WARNING! Using --password via the CLI is insecure. Use --password-stdin.");
        let user = match args.username {
            Some(u) => u,
            None => prompt_user(&registry)?,
        };
        (user, p)
    } else {
        let user = match args.username {
            Some(u) => u,
            None => prompt_user(&registry)?,
        };
        (user, prompt_password()?)
    };
    if user.is_empty() {
        bail!("a username is required");
    }
    if password.is_empty() {
        bail!("a password is required");
    }
    let host = rvmm::image::reference::host_of(&registry);
    let plain_http = host == "localhost"
        || host == "::1"
        || host.starts_with("127.")
        || args.insecure_registries.iter().any(|r| r == &registry);
    auth::verify(&registry, &user, &password, plain_http)?;
    auth::store(&registry, &user, &password)?;
    Ok(())
}

fn prompt_user(registry: &str) -> anyhow::Result<String> {
    if !std::io::stdin().is_terminal() {
        bail!("cannot ask for a username: stdin is not a terminal (use --username)");
    }
    eprint!("Username for {registry}: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the username")?;
    Ok(line.trim().to_string())
}

/// Reads a line from the terminal with echo off.
fn prompt_password() -> anyhow::Result<String> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!("cannot ask for a password: stdin is not a terminal (use --password-stdin)");
    }
    let saved = tcgetattr(&stdin).context("reading the terminal settings")?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    tcsetattr(&stdin, SetArg::TCSANOW, &quiet).context("turning off the terminal echo")?;
    eprint!("Password: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    let _ = tcsetattr(&stdin, SetArg::TCSANOW, &saved);
    eprintln!();
    read.context("reading the password")?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

pub fn logout(args: LogoutArgs) -> anyhow::Result<u8> {
    let registry = auth::normalize_registry(args.registry.as_deref())?;
    if auth::remove(&registry)? {
        println!(
            "Removing login credentials for {}",
            auth::config_key(&registry)
        );
    } else {
        eprintln!("Not logged in to {}", auth::config_key(&registry));
    }
    Ok(0)
}

//! `rvmm pull`.

use rvmm::image::{self, PullOptions, Source, Store};

use super::Global;

/// Registry options shared by `pull` and `run`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    /// Credentials for the registry, USER:PASSWORD (default: ~/.docker/config.json, else anonymous).
    #[arg(long, value_name = "USER:PASS")]
    pub creds: Option<String>,
    /// Talk plain HTTP to this registry (host[:port]); loopback registries always use HTTP. Repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,
}

impl RegistryArgs {
    pub fn options(&self, quiet: bool) -> PullOptions {
        PullOptions {
            creds: self.creds.clone(),
            insecure_registries: self.insecure_registries.clone(),
            quiet,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image to pull: NAME[:TAG], NAME@sha256:DIGEST, or oci:DIR[:TAG], docker-archive:FILE[:NAME], oci-archive:FILE[:TAG].
    pub image: String,
    /// No progress output.
    #[arg(short, long)]
    pub quiet: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

pub fn exec(args: Args, global: &Global) -> anyhow::Result<u8> {
    let src = Source::parse(&args.image)?;
    let store = Store::open(&global.root)?;
    let opts = args.registry.options(args.quiet);
    let rec = match &src {
        Source::Registry(r) => image::pull(&store, r, &opts)?,
        other => image::import(&store, other, &opts)?,
    };
    if !args.quiet {
        let name = rec
            .names
            .first()
            .cloned()
            .unwrap_or_else(|| args.image.clone());
        eprintln!(
            "{name}: pulled {} ({})",
            rec.manifest_digest,
            human_size(rec.size)
        );
    }
    println!("{}", rec.id);
    Ok(0)
}

/// 1234567 → "1.2 MB" (decimal units, as docker prints).
pub fn human_size(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < units.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.3} {}", units[u])
            .replace(".000 ", " ")
            .trim_end()
            .to_string()
    }
}

//! `rvmm load`.

use std::path::PathBuf;

use rvmm::image::{self, PullOptions, Store};

use super::Global;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The archive: what `docker save` / `podman save` write, or an OCI archive (gzip/zstd accepted).
    #[arg(short, long, value_name = "FILE")]
    pub input: PathBuf,
    /// No progress output.
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn exec(args: Args, global: &Global) -> anyhow::Result<u8> {
    let store = Store::open(&global.root)?;
    let opts = PullOptions {
        quiet: args.quiet,
        ..Default::default()
    };
    for rec in image::load(&store, &args.input, &opts)? {
        if rec.names.is_empty() {
            println!("Loaded image ID: {}", rec.id);
        }
        for n in &rec.names {
            println!("Loaded image: {n}");
        }
    }
    Ok(0)
}

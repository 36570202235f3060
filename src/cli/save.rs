//! `rvmm save` (also `rvmm image save`).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;
use rvmm::image::export::{self, Format};
use rvmm::image::Store;

use super::Global;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Write to FILE (it appears only once complete) instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// docker-archive (loads with `docker load`) or oci-archive (an OCI image layout in a tar).
    #[arg(long, value_name = "FORMAT", default_value = "docker-archive")]
    pub format: String,
    /// Images to save: name, name@digest or ID. A docker-archive keeps each name as a RepoTag.
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<String>,
}

pub fn exec(args: Args, global: &Global) -> anyhow::Result<u8> {
    let format: Format = args.format.parse()?;
    if args.output.is_none() && std::io::stdout().is_terminal() {
        anyhow::bail!(
            "refusing to write an image archive to a terminal: use -o FILE or redirect stdout"
        );
    }
    let store = Store::open(&global.root)?;
    let images = export::select(&store, &args.images)?;
    match &args.output {
        Some(path) => export::save_file(&store, &images, format, path)?,
        None => {
            let out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
            let mut out = export::write_to(&store, &images, format, out)?;
            out.flush().context("writing the archive to stdout")?;
        }
    }
    Ok(0)
}

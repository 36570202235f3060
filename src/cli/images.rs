//! `rvmm images`, `rvmm rmi`, `rvmm image inspect`.

use super::Global;

#[derive(clap::Args, Debug)]
pub struct ListArgs {}

#[derive(clap::Args, Debug)]
pub struct RmiArgs {
    /// Images to remove.
    #[arg(required = true)]
    pub images: Vec<String>,
}

#[derive(clap::Subcommand, Debug)]
pub enum ImageCommand {
    /// Print an image's config as JSON.
    Inspect {
        /// The image reference.
        image: String,
    },
}

pub fn list(_args: ListArgs, _global: &Global) -> anyhow::Result<u8> {
    anyhow::bail!("`rvmm images` is not implemented yet")
}

pub fn rmi(_args: RmiArgs, _global: &Global) -> anyhow::Result<u8> {
    anyhow::bail!("`rvmm rmi` is not implemented yet")
}

pub fn image(_cmd: ImageCommand, _global: &Global) -> anyhow::Result<u8> {
    anyhow::bail!("`rvmm image` is not implemented yet")
}

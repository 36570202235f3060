//! OCI images: references, registry client, content-addressed store, safe layer unpacking.
//!
//! The interface the isolations use (kept stable; internals are free):
//! `Store::open(root)?.resolve(reference, &opts)? -> ResolvedImage` with the parsed config and the
//! unpacked layer directories, bottom layer first.

use std::path::PathBuf;

/// The parts of an image config a run needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageConfig {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub exposed_ports: Vec<String>,
    pub volumes: Vec<String>,
    pub stop_signal: Option<String>,
    pub labels: Vec<(String, String)>,
}

/// An image ready to run: its identity, config, and unpacked layer directories (bottom first).
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// Normalized reference as the user would read it (e.g. `docker.io/library/busybox:latest`).
    pub reference: String,
    /// `sha256:...` of the manifest.
    pub manifest_digest: String,
    /// `sha256:...` of the config blob (the image ID).
    pub config_digest: String,
    pub config: ImageConfig,
    /// Unpacked layer directories, bottom layer first. Never written by a run.
    pub layers: Vec<PathBuf>,
}

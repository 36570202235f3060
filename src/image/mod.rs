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

pub mod auth;
pub mod disk;
pub mod export;
pub mod local;
pub mod reference;
pub mod registry;
pub mod spec;
pub mod store;
pub mod unpack;

/// Makes ring the TLS provider of registry connections (rustls needs one chosen before the first
/// client is built). Idempotent.
pub(crate) fn tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider is installed already: that one serves as well. rustls
        // deprecates ring's provider for its lack of post-quantum key exchange; aws-lc-rs has
        // it but adds a large C build, and a pull's secrets are registry tokens, not long-lived.
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

pub use reference::{Reference, Source};
pub use store::{ImageRecord, Store};

/// Why an image could not be pulled, imported, loaded or resolved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("image {image} is not in the store, and --pull never forbids pulling it")]
    NotInStore { image: String },
    #[error(transparent)]
    Reference(#[from] reference::ParseError),
    /// Setting up the registry client failed (bad `--creds`, unreadable auth config, ...).
    #[error(transparent)]
    Registry(#[from] registry::Error),
    /// Reading a local layout or archive failed before the import began.
    #[error(transparent)]
    Local(#[from] local::Error),
    #[error("pulling {reference}")]
    Pull {
        reference: String,
        #[source]
        source: store::Error,
    },
    /// `what` names the source with its transport (`oci:/path`, `docker-archive:/file`).
    #[error("importing {what}")]
    Import {
        what: String,
        #[source]
        source: store::Error,
    },
    #[error("{} holds no image named {name}", path.display())]
    NoImageNamed { path: PathBuf, name: String },
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(
        "layer {} of {image} is missing from the store (run `rvmm rmi` and pull again)",
        layer.display()
    )]
    MissingLayer { layer: PathBuf, image: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// `USER:PASS` for basic auth (else ~/.docker/config.json, else anonymous).
    pub creds: Option<String>,
    /// Registries spoken to over plain HTTP (loopback always is).
    pub insecure_registries: Vec<String>,
    /// No progress bars.
    pub quiet: bool,
}

fn progress(opts: &PullOptions) -> Box<dyn store::Progress> {
    if opts.quiet {
        Box::new(store::Quiet)
    } else {
        Box::new(store::Bars::new())
    }
}

/// Pulls `reference` from its registry into the store.
pub fn pull(store: &Store, reference: &Reference, opts: &PullOptions) -> Result<ImageRecord> {
    let mut f = registry::RegistryFetcher::new(reference, opts)?;
    let names = if reference.tag.is_some() {
        let mut r = reference.clone();
        r.digest = None;
        vec![r.to_string()]
    } else {
        vec![]
    };
    store
        .import(&mut f, &names, progress(opts).as_ref())
        .map_err(|source| Error::Pull {
            reference: reference.to_string(),
            source,
        })
}

/// Imports the image `src` names (any transport) into the store.
pub fn import(store: &Store, src: &Source, opts: &PullOptions) -> Result<ImageRecord> {
    let p = progress(opts);
    let importing = |what: String| move |source| Error::Import { what, source };
    match src {
        Source::Registry(r) => pull(store, r, opts),
        Source::OciLayout { path, tag } => {
            let mut l = local::Layout::open(path, tag.as_deref())?;
            let names: Vec<String> = local::layout_name(path, l.ref_name()).into_iter().collect();
            store
                .import(&mut l, &names, p.as_ref())
                .map_err(importing(format!("oci:{}", path.display())))
        }
        Source::OciArchive { path, tag } => {
            let dir = local::extract_archive(path)?;
            let mut l = local::Layout::open(dir.path(), tag.as_deref())?;
            let names: Vec<String> = l
                .ref_name()
                .and_then(|n| local::layout_name(&archive_stem(path), Some(n)))
                .into_iter()
                .collect();
            store
                .import(&mut l, &names, p.as_ref())
                .map_err(importing(format!("oci-archive:{}", path.display())))
        }
        Source::DockerArchive { path, name } => {
            let dir = local::extract_archive(path)?;
            let entries = local::docker_entries(dir.path())?;
            let entry = match name {
                Some(n) => {
                    let want = Reference::parse(n)
                        .map(|r| r.to_string())
                        .unwrap_or(n.clone());
                    entries
                        .iter()
                        .find(|e| local::docker_names(e).contains(&want))
                        .ok_or_else(|| Error::NoImageNamed {
                            path: path.clone(),
                            name: n.clone(),
                        })?
                }
                None => &entries[0],
            };
            let mut a = local::DockerArchive::new(
                dir.path(),
                entry,
                format!("docker-archive:{}", path.display()),
            )?;
            store
                .import(&mut a, &local::docker_names(entry), p.as_ref())
                .map_err(importing(format!("docker-archive:{}", path.display())))
        }
    }
}

/// `rvmm load -i FILE`: every image in a docker-archive or OCI archive.
pub fn load(store: &Store, path: &std::path::Path, opts: &PullOptions) -> Result<Vec<ImageRecord>> {
    let dir = local::extract_archive(path)?;
    let p = progress(opts);
    let mut out = Vec::new();
    match local::archive_kind(dir.path())? {
        local::ArchiveKind::Docker => {
            for e in local::docker_entries(dir.path())? {
                let mut a =
                    local::DockerArchive::new(dir.path(), &e, format!("{}", path.display()))?;
                out.push(store.import(&mut a, &local::docker_names(&e), p.as_ref())?);
            }
        }
        local::ArchiveKind::Oci => {
            for d in local::layout_entries(dir.path())? {
                let tag = d
                    .annotations
                    .get("org.opencontainers.image.ref.name")
                    .cloned();
                let mut l = local::Layout::open(dir.path(), tag.as_deref())?;
                let names: Vec<String> = local::layout_name(&archive_stem(path), tag.as_deref())
                    .into_iter()
                    .collect();
                out.push(store.import(&mut l, &names, p.as_ref())?);
            }
        }
    }
    Ok(out)
}

/// `/x/busybox.tar` → a path whose file name is `busybox` (for naming archive images).
fn archive_stem(path: &std::path::Path) -> std::path::PathBuf {
    let stem = path
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .split('.')
                .next()
                .unwrap_or("image")
                .to_string()
        })
        .unwrap_or_else(|| "image".into());
    std::env::temp_dir().join(stem)
}

/// Finds `image` in the store (name or ID), importing or pulling it when it is not there
/// (local transports are always re-read: cheap when nothing changed). Unpacked layers included.
pub fn resolve(store: &Store, image: &str, opts: &PullOptions) -> Result<ResolvedImage> {
    resolve_with(store, image, opts, PullPolicy::Missing)
}

/// `run --pull`: when an image is fetched from its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Only when the store does not have it (Docker's default).
    #[default]
    Missing,
    /// Every time (the store keeps what did not change).
    Always,
    /// Never: an image the store lacks is an error.
    Never,
}

/// [`resolve`] with a pull policy. A transport (`oci:`, archives) is always read from its source,
/// except with `Never`, which only looks in the store.
pub fn resolve_with(
    store: &Store,
    image: &str,
    opts: &PullOptions,
    policy: PullPolicy,
) -> Result<ResolvedImage> {
    let is_transport = ["oci:", "oci-archive:", "docker-archive:", "docker://"]
        .iter()
        .any(|p| image.starts_with(p));
    let found = (!is_transport && policy != PullPolicy::Always)
        .then(|| store.find(image))
        .transpose()?
        .flatten();
    let rec = match (found, policy) {
        (Some(r), _) => r,
        (None, PullPolicy::Never) => {
            return Err(Error::NotInStore {
                image: image.to_string(),
            })
        }
        (None, _) => import(store, &Source::parse(image)?, opts)?,
    };
    let cfg = store.config(&rec)?;
    let layers = rec
        .layers
        .iter()
        .map(|l| store.layer_path(&l.diff_id))
        .collect::<Vec<_>>();
    for l in &layers {
        if !l.is_dir() {
            return Err(Error::MissingLayer {
                layer: l.clone(),
                image: image.to_string(),
            });
        }
    }
    Ok(ResolvedImage {
        reference: rec.names.first().cloned().unwrap_or_else(|| rec.id.clone()),
        manifest_digest: rec.manifest_digest.clone(),
        config_digest: rec.id.clone(),
        config: cfg.run_config(),
        layers,
    })
}

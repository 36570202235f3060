//! Local sources: OCI image-layout directories, OCI archives and docker-archives.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::reference::{valid_digest, Reference};
use super::spec::{self, Compression, Descriptor, Document};
use super::store::{self, BlobWriter, FetchError, Fetcher};
use super::unpack::{self, UnpackOptions};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{} is not an OCI image layout (no oci-layout file)", dir.display())]
    NotALayout {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("oci-layout is not valid JSON")]
    LayoutJson(#[source] serde_json::Error),
    #[error("unsupported OCI layout version {0}")]
    LayoutVersion(String),
    #[error("{}: index.json is missing", dir.display())]
    NoIndex {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Spec(#[from] spec::Error),
    #[error("index.json is not an image index")]
    IndexIsManifest,
    #[error("{}: no image tagged {tag:?}", dir.display())]
    NoSuchTag { dir: PathBuf, tag: String },
    #[error(
        "{} holds {count} images; name one with oci:{}:TAG (tags: {tags})",
        dir.display(),
        dir.display()
    )]
    WhichImage {
        dir: PathBuf,
        count: usize,
        tags: String,
    },
    #[error("malformed digest {0:?}")]
    MalformedDigest(String),
    #[error("document of {0} bytes is too large")]
    DocumentTooLarge(u64),
    #[error("{}: blob {digest} is missing", dir.display())]
    MissingBlob {
        dir: PathBuf,
        digest: String,
        #[source]
        source: std::io::Error,
    },
    #[error("manifest {0} in the layout does not match its digest or size")]
    ManifestMismatch(String),
    /// Storing a blob failed (the store's message names the blob).
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("opening {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating a temporary directory for the archive")]
    TempDir(#[source] std::io::Error),
    #[error("{} is not a readable tar archive", path.display())]
    NotATar {
        path: PathBuf,
        #[source]
        source: unpack::Error,
    },
    #[error("not an image archive: neither a docker-archive (manifest.json) nor an OCI archive (oci-layout, index.json)")]
    NotAnArchive,
    #[error("docker-archive: manifest.json is missing")]
    DockerNoManifest(#[source] std::io::Error),
    #[error("docker-archive: manifest.json is malformed")]
    DockerBadManifest(#[source] serde_json::Error),
    #[error("docker-archive holds no images")]
    DockerEmpty,
    /// A path in manifest.json that would leave the archive.
    #[error(transparent)]
    DockerPath(#[from] unpack::Error),
    #[error("docker-archive: bad path {0:?}")]
    DockerBadPath(String),
    #[error("docker-archive: {rel} is missing")]
    DockerMissing {
        rel: String,
        #[source]
        source: std::io::Error,
    },
    #[error("docker-archive: {0} is not a regular file")]
    DockerNotFile(String),
    #[error("docker-archive: reading {rel}")]
    DockerRead {
        rel: String,
        #[source]
        source: std::io::Error,
    },
    #[error("docker-archive: writing the synthesized manifest")]
    DockerManifest(#[source] serde_json::Error),
    #[error("docker-archive has no image index")]
    DockerNoIndex,
    #[error("docker-archive has no blob {0}")]
    DockerNoBlob(String),
}

pub type Result<T> = std::result::Result<T, Error>;

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OCI image-layout directory; one manifest of its index.json chosen.
pub struct Layout {
    dir: PathBuf,
    chosen: Descriptor,
}

/// One image of a layout: its descriptor and its `ref.name`, if any.
pub fn layout_entries(dir: &Path) -> Result<Vec<Descriptor>> {
    let layout = fs::read(dir.join("oci-layout")).map_err(|source| Error::NotALayout {
        dir: dir.to_path_buf(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_slice(&layout).map_err(Error::LayoutJson)?;
    if v["imageLayoutVersion"].as_str() != Some("1.0.0") {
        return Err(Error::LayoutVersion(v["imageLayoutVersion"].to_string()));
    }
    let idx = fs::read(dir.join("index.json")).map_err(|source| Error::NoIndex {
        dir: dir.to_path_buf(),
        source,
    })?;
    match spec::parse_document(&idx, Some(spec::OCI_INDEX))? {
        Document::Index(i) => Ok(i.manifests),
        Document::Manifest(_) => Err(Error::IndexIsManifest),
    }
}

impl Layout {
    pub fn open(dir: &Path, tag: Option<&str>) -> Result<Layout> {
        let entries = layout_entries(dir)?;
        let name_of = |d: &Descriptor| d.annotations.get(REF_NAME).cloned();
        let chosen = match tag {
            Some(t) => entries
                .iter()
                .find(|d| name_of(d).is_some_and(|n| n == t || n.ends_with(&format!(":{t}"))))
                .ok_or_else(|| Error::NoSuchTag {
                    dir: dir.to_path_buf(),
                    tag: t.to_string(),
                })?,
            None if entries.len() == 1 => &entries[0],
            None => entries
                .iter()
                .find(|d| name_of(d).as_deref() == Some("latest"))
                .ok_or_else(|| {
                    let names: Vec<_> = entries.iter().filter_map(name_of).collect();
                    Error::WhichImage {
                        dir: dir.to_path_buf(),
                        count: entries.len(),
                        tags: names.join(", "),
                    }
                })?,
        }
        .clone();
        Ok(Layout {
            dir: dir.to_path_buf(),
            chosen,
        })
    }

    /// The chosen manifest's `ref.name` annotation.
    pub fn ref_name(&self) -> Option<&str> {
        self.chosen.annotations.get(REF_NAME).map(String::as_str)
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        if !valid_digest(digest) {
            return Err(Error::MalformedDigest(digest.to_string()));
        }
        Ok(self.dir.join("blobs/sha256").join(&digest[7..]))
    }

    fn missing_blob(&self, digest: &str) -> impl FnOnce(std::io::Error) -> Error {
        let (dir, digest) = (self.dir.clone(), digest.to_string());
        move |source| Error::MissingBlob {
            dir,
            digest,
            source,
        }
    }

    fn read_doc(&self, d: &Descriptor) -> Result<Vec<u8>> {
        if d.size > spec::MAX_DOCUMENT {
            return Err(Error::DocumentTooLarge(d.size));
        }
        let p = self.blob_path(&d.digest)?;
        fs::read(&p).map_err(self.missing_blob(&d.digest))
    }
}

impl Fetcher for Layout {
    fn describe(&self) -> String {
        format!("oci:{}", self.dir.display())
    }

    fn root(&mut self) -> std::result::Result<(Vec<u8>, Option<String>), FetchError> {
        let d = self.chosen.clone();
        let b = self.read_doc(&d)?;
        let got = format!("sha256:{}", super::store::sha256_hex(&b));
        if got != d.digest || b.len() as u64 != d.size {
            return Err(Error::ManifestMismatch(d.digest).into());
        }
        Ok((b, Some(d.media_type).filter(|m| !m.is_empty())))
    }

    fn manifest(&mut self, d: &Descriptor) -> std::result::Result<Vec<u8>, FetchError> {
        Ok(self.read_doc(d)?)
    }

    fn blob(&mut self, d: &Descriptor, w: &mut BlobWriter) -> std::result::Result<(), FetchError> {
        let p = self.blob_path(&d.digest)?;
        let mut f = File::open(&p).map_err(self.missing_blob(&d.digest))?;
        w.copy_from(&mut f).map_err(Error::Store)?;
        Ok(())
    }
}

/// A name for an image from a layout: a full reference if `ref.name` is one, else
/// `localhost/<dir name>:<ref.name or latest>`.
pub fn layout_name(dir: &Path, ref_name: Option<&str>) -> Option<String> {
    if let Some(n) = ref_name {
        if n.contains('/') || n.contains(':') {
            if let Ok(r) = Reference::parse(n) {
                return Some(r.to_string());
            }
        }
    }
    let base = dir
        .canonicalize()
        .ok()?
        .file_name()?
        .to_string_lossy()
        .to_lowercase()
        .replace(
            |c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_'),
            "-",
        );
    let tag = ref_name.unwrap_or("latest");
    Reference::parse(&format!("localhost/{base}:{tag}"))
        .ok()
        .map(|r| r.to_string())
}

/// Extracts an archive (tar, optionally compressed) into a fresh temp dir, with the same
/// confinement rules as layers.
pub fn extract_archive(path: &Path) -> Result<tempfile::TempDir> {
    let open = |source| Error::Open {
        path: path.to_path_buf(),
        source,
    };
    let read = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    let f = File::open(path).map_err(open)?;
    let mut head = [0u8; 4];
    let n = (&f).read(&mut head).map_err(read)?;
    let f = File::open(path).map_err(open)?;
    let r: Box<dyn Read> = match Compression::sniff(&head[..n]) {
        Compression::None => Box::new(std::io::BufReader::new(f)),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f))),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(f).map_err(read)?),
    };
    let dir = tempfile::Builder::new()
        .prefix("rvmm-archive-")
        .tempdir()
        .map_err(Error::TempDir)?;
    unpack::unpack(
        r,
        dir.path(),
        UnpackOptions {
            privileged: false,
            lowers: &[],
        },
    )
    .map_err(|source| Error::NotATar {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(dir)
}

/// What an extracted archive is.
pub enum ArchiveKind {
    Oci,
    Docker,
}

pub fn archive_kind(dir: &Path) -> Result<ArchiveKind> {
    if dir.join("oci-layout").exists() && dir.join("index.json").exists() {
        // `docker save` since 25 writes both; prefer its manifest.json for the names.
        if dir.join("manifest.json").exists() {
            return Ok(ArchiveKind::Docker);
        }
        return Ok(ArchiveKind::Oci);
    }
    if dir.join("manifest.json").exists() {
        return Ok(ArchiveKind::Docker);
    }
    Err(Error::NotAnArchive)
}

#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "PascalCase")]
pub struct DockerArchiveEntry {
    pub config: String,
    #[serde(default)]
    pub repo_tags: Option<Vec<String>>,
    pub layers: Vec<String>,
}

pub fn docker_entries(dir: &Path) -> Result<Vec<DockerArchiveEntry>> {
    let b = fs::read(dir.join("manifest.json")).map_err(Error::DockerNoManifest)?;
    let v: Vec<DockerArchiveEntry> =
        serde_json::from_slice(&b).map_err(Error::DockerBadManifest)?;
    if v.is_empty() {
        return Err(Error::DockerEmpty);
    }
    Ok(v)
}

/// One image of an extracted docker-archive, served as an OCI manifest we synthesize.
pub struct DockerArchive {
    desc: String,
    manifest: Vec<u8>,
    files: HashMap<String, PathBuf>,
}

impl DockerArchive {
    pub fn new(dir: &Path, entry: &DockerArchiveEntry, desc: String) -> Result<DockerArchive> {
        let mut files = HashMap::new();
        let mut describe = |rel: &str, media_type: Option<&str>| -> Result<Descriptor> {
            let clean =
                unpack::clean(rel.as_bytes())?.ok_or_else(|| Error::DockerBadPath(rel.into()))?;
            let p = dir.join(clean);
            let meta = fs::symlink_metadata(&p).map_err(|source| Error::DockerMissing {
                rel: rel.to_string(),
                source,
            })?;
            if !meta.is_file() {
                return Err(Error::DockerNotFile(rel.to_string()));
            }
            let read = |source| Error::DockerRead {
                rel: rel.to_string(),
                source,
            };
            let mut f = File::open(&p).map_err(read)?;
            let mut h = Sha256::new();
            let mut head = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = f.read(&mut buf).map_err(read)?;
                if n == 0 {
                    break;
                }
                if head.len() < 4 {
                    head.extend_from_slice(&buf[..n.min(4)]);
                }
                h.update(&buf[..n]);
            }
            let digest = format!("sha256:{}", hex::encode(h.finalize()));
            let mt = media_type
                .map(str::to_string)
                .unwrap_or_else(|| Compression::sniff(&head).media_type().to_string());
            files.insert(digest.clone(), p);
            Ok(Descriptor {
                media_type: mt,
                digest,
                size: meta.len(),
                platform: None,
                annotations: Default::default(),
            })
        };
        let config = describe(&entry.config, Some(spec::OCI_CONFIG))?;
        let layers = entry
            .layers
            .iter()
            .map(|l| describe(l, None))
            .collect::<Result<Vec<_>>>()?;
        let m = spec::Manifest {
            schema_version: 2,
            media_type: Some(spec::OCI_MANIFEST.to_string()),
            config,
            layers,
        };
        Ok(DockerArchive {
            desc,
            manifest: serde_json::to_vec(&m).map_err(Error::DockerManifest)?,
            files,
        })
    }
}

impl Fetcher for DockerArchive {
    fn describe(&self) -> String {
        self.desc.clone()
    }

    fn root(&mut self) -> std::result::Result<(Vec<u8>, Option<String>), FetchError> {
        Ok((self.manifest.clone(), Some(spec::OCI_MANIFEST.to_string())))
    }

    fn manifest(&mut self, _d: &Descriptor) -> std::result::Result<Vec<u8>, FetchError> {
        Err(Error::DockerNoIndex.into())
    }

    fn blob(&mut self, d: &Descriptor, w: &mut BlobWriter) -> std::result::Result<(), FetchError> {
        let p = self
            .files
            .get(&d.digest)
            .ok_or_else(|| Error::DockerNoBlob(d.digest.clone()))?;
        let mut f = File::open(p).map_err(|source| Error::Open {
            path: p.clone(),
            source,
        })?;
        w.copy_from(&mut f).map_err(Error::Store)?;
        Ok(())
    }
}

/// Docker-style names from a docker-archive's RepoTags.
pub fn docker_names(entry: &DockerArchiveEntry) -> Vec<String> {
    entry
        .repo_tags
        .iter()
        .flatten()
        .filter_map(|t| Reference::parse(t).ok().map(|r| r.to_string()))
        .collect()
}

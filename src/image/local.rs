//! Local sources: OCI image-layout directories, OCI archives and docker-archives.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::reference::{valid_digest, Reference};
use super::spec::{self, Compression, Descriptor, Document};
use super::store::{BlobWriter, Fetcher};
use super::unpack::{self, UnpackOptions};

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OCI image-layout directory; one manifest of its index.json chosen.
pub struct Layout {
    dir: PathBuf,
    chosen: Descriptor,
}

/// One image of a layout: its descriptor and its `ref.name`, if any.
pub fn layout_entries(dir: &Path) -> anyhow::Result<Vec<Descriptor>> {
    let layout = fs::read(dir.join("oci-layout")).with_context(|| {
        format!(
            "{} is not an OCI image layout (no oci-layout file)",
            dir.display()
        )
    })?;
    let v: serde_json::Value =
        serde_json::from_slice(&layout).context("oci-layout is not valid JSON")?;
    if v["imageLayoutVersion"].as_str() != Some("1.0.0") {
        bail!("unsupported OCI layout version {}", v["imageLayoutVersion"]);
    }
    let idx = fs::read(dir.join("index.json"))
        .with_context(|| format!("{}: index.json is missing", dir.display()))?;
    match spec::parse_document(&idx, Some(spec::OCI_INDEX))? {
        Document::Index(i) => Ok(i.manifests),
        Document::Manifest(_) => bail!("index.json is not an image index"),
    }
}

impl Layout {
    pub fn open(dir: &Path, tag: Option<&str>) -> anyhow::Result<Layout> {
        let entries = layout_entries(dir)?;
        let name_of = |d: &Descriptor| d.annotations.get(REF_NAME).cloned();
        let chosen = match tag {
            Some(t) => entries
                .iter()
                .find(|d| name_of(d).is_some_and(|n| n == t || n.ends_with(&format!(":{t}"))))
                .with_context(|| format!("{}: no image tagged {t:?}", dir.display()))?,
            None if entries.len() == 1 => &entries[0],
            None => entries
                .iter()
                .find(|d| name_of(d).as_deref() == Some("latest"))
                .with_context(|| {
                    let names: Vec<_> = entries.iter().filter_map(name_of).collect();
                    format!(
                        "{} holds {} images; name one with oci:{}:TAG (tags: {})",
                        dir.display(),
                        entries.len(),
                        dir.display(),
                        names.join(", ")
                    )
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

    fn blob_path(&self, digest: &str) -> anyhow::Result<PathBuf> {
        if !valid_digest(digest) {
            bail!("malformed digest {digest:?}");
        }
        Ok(self.dir.join("blobs/sha256").join(&digest[7..]))
    }

    fn read_doc(&self, d: &Descriptor) -> anyhow::Result<Vec<u8>> {
        if d.size > spec::MAX_DOCUMENT {
            bail!("document of {} bytes is too large", d.size);
        }
        let p = self.blob_path(&d.digest)?;
        fs::read(&p)
            .with_context(|| format!("{}: blob {} is missing", self.dir.display(), d.digest))
    }
}

impl Fetcher for Layout {
    fn describe(&self) -> String {
        format!("oci:{}", self.dir.display())
    }

    fn root(&mut self) -> anyhow::Result<(Vec<u8>, Option<String>)> {
        let d = self.chosen.clone();
        let b = self.read_doc(&d)?;
        let got = format!("sha256:{}", super::store::sha256_hex(&b));
        if got != d.digest || b.len() as u64 != d.size {
            bail!(
                "manifest {} in the layout does not match its digest or size",
                d.digest
            );
        }
        Ok((b, Some(d.media_type).filter(|m| !m.is_empty())))
    }

    fn manifest(&mut self, d: &Descriptor) -> anyhow::Result<Vec<u8>> {
        self.read_doc(d)
    }

    fn blob(&mut self, d: &Descriptor, w: &mut BlobWriter) -> anyhow::Result<()> {
        let p = self.blob_path(&d.digest)?;
        let mut f = File::open(&p)
            .with_context(|| format!("{}: blob {} is missing", self.dir.display(), d.digest))?;
        w.copy_from(&mut f)
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
pub fn extract_archive(path: &Path) -> anyhow::Result<tempfile::TempDir> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut head = [0u8; 4];
    let n = (&f).read(&mut head)?;
    let f = File::open(path)?;
    let r: Box<dyn Read> = match Compression::sniff(&head[..n]) {
        Compression::None => Box::new(std::io::BufReader::new(f)),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f))),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(f)?),
    };
    let dir = tempfile::Builder::new().prefix("rvmm-archive-").tempdir()?;
    unpack::unpack(
        r,
        dir.path(),
        UnpackOptions {
            privileged: false,
            lowers: &[],
        },
    )
    .with_context(|| format!("{} is not a readable tar archive", path.display()))?;
    Ok(dir)
}

/// What an extracted archive is.
pub enum ArchiveKind {
    Oci,
    Docker,
}

pub fn archive_kind(dir: &Path) -> anyhow::Result<ArchiveKind> {
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
    bail!("not an image archive: neither a docker-archive (manifest.json) nor an OCI archive (oci-layout, index.json)")
}

#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "PascalCase")]
pub struct DockerArchiveEntry {
    pub config: String,
    #[serde(default)]
    pub repo_tags: Option<Vec<String>>,
    pub layers: Vec<String>,
}

pub fn docker_entries(dir: &Path) -> anyhow::Result<Vec<DockerArchiveEntry>> {
    let b =
        fs::read(dir.join("manifest.json")).context("docker-archive: manifest.json is missing")?;
    let v: Vec<DockerArchiveEntry> =
        serde_json::from_slice(&b).context("docker-archive: manifest.json is malformed")?;
    if v.is_empty() {
        bail!("docker-archive holds no images");
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
    pub fn new(
        dir: &Path,
        entry: &DockerArchiveEntry,
        desc: String,
    ) -> anyhow::Result<DockerArchive> {
        let mut files = HashMap::new();
        let mut describe = |rel: &str, media_type: Option<&str>| -> anyhow::Result<Descriptor> {
            let clean = unpack::clean(rel.as_bytes())?
                .with_context(|| format!("docker-archive: bad path {rel:?}"))?;
            let p = dir.join(clean);
            let meta = fs::symlink_metadata(&p)
                .with_context(|| format!("docker-archive: {rel} is missing"))?;
            if !meta.is_file() {
                bail!("docker-archive: {rel} is not a regular file");
            }
            let mut f = File::open(&p)?;
            let mut h = Sha256::new();
            let mut head = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = f.read(&mut buf)?;
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
            .collect::<anyhow::Result<Vec<_>>>()?;
        let m = spec::Manifest {
            schema_version: 2,
            media_type: Some(spec::OCI_MANIFEST.to_string()),
            config,
            layers,
        };
        Ok(DockerArchive {
            desc,
            manifest: serde_json::to_vec(&m)?,
            files,
        })
    }
}

impl Fetcher for DockerArchive {
    fn describe(&self) -> String {
        self.desc.clone()
    }

    fn root(&mut self) -> anyhow::Result<(Vec<u8>, Option<String>)> {
        Ok((self.manifest.clone(), Some(spec::OCI_MANIFEST.to_string())))
    }

    fn manifest(&mut self, _d: &Descriptor) -> anyhow::Result<Vec<u8>> {
        bail!("docker-archive has no image index")
    }

    fn blob(&mut self, d: &Descriptor, w: &mut BlobWriter) -> anyhow::Result<()> {
        let p = self
            .files
            .get(&d.digest)
            .with_context(|| format!("docker-archive has no blob {}", d.digest))?;
        let mut f = File::open(p)?;
        w.copy_from(&mut f)
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

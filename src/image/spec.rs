//! The OCI and Docker v2 schema 2 documents rvmm reads: manifests, indexes, image configs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const OCI_LAYER_NONDIST_GZIP: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("manifest is not valid JSON")]
    NotJson(#[source] serde_json::Error),
    #[error("unsupported manifest schemaVersion {0:?} (only schema 2 is supported)")]
    SchemaVersion(Option<u32>),
    #[error("unsupported manifest media type {0}")]
    MediaType(String),
    #[error("bad image index")]
    BadIndex(#[source] serde_json::Error),
    #[error("bad image manifest")]
    BadManifest(#[source] serde_json::Error),
    #[error("image config of {0} bytes is too large")]
    ConfigTooLarge(u64),
    #[error("unsupported layer media type {0:?}")]
    LayerMediaType(String),
    #[error("unsupported or malformed digest {0:?}")]
    Digest(String),
    #[error("bad image config")]
    BadConfig(#[source] serde_json::Error),
    #[error("image config rootfs type {0:?} is not \"layers\"")]
    RootfsType(String),
    #[error("image config has a malformed diff_id {0:?}")]
    DiffId(String),
    #[error("image is for {0}, not linux")]
    Os(String),
    #[error("image is for {0}, not amd64")]
    Architecture(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Every manifest media type we understand, for the registry's Accept header.
pub const MANIFEST_TYPES: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// Largest manifest, index or config we accept (registries cap manifests at 4 MiB).
pub const MAX_DOCUMENT: u64 = 4 << 20;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// From a layer media type; `None` for a type that is not a layer we can unpack.
    pub fn from_media_type(mt: &str) -> Option<Compression> {
        match mt {
            OCI_LAYER
            | DOCKER_LAYER
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Compression::None),
            OCI_LAYER_GZIP | DOCKER_LAYER_GZIP | OCI_LAYER_NONDIST_GZIP => Some(Compression::Gzip),
            OCI_LAYER_ZSTD => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// Sniffed from the first bytes (docker-archive layers carry no media type).
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => OCI_LAYER,
            Compression::Gzip => OCI_LAYER_GZIP,
            Compression::Zstd => OCI_LAYER_ZSTD,
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image manifest (OCI or Docker v2s2: the same shape).
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// An image index or Docker manifest list.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

/// A manifest document as fetched: either an image manifest or an index.
#[derive(Debug, Clone)]
pub enum Document {
    Manifest(Manifest),
    Index(Index),
}

/// Parses a manifest or index, by the declared media type when there is one, by shape otherwise.
pub fn parse_document(bytes: &[u8], declared: Option<&str>) -> Result<Document> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        schema_version: Option<u32>,
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        config: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(bytes).map_err(Error::NotJson)?;
    let mt = declared
        .filter(|m| !m.is_empty() && *m != "application/json")
        .map(str::to_string)
        .or(probe.media_type.clone());
    if probe.schema_version != Some(2) {
        return Err(Error::SchemaVersion(probe.schema_version));
    }
    let is_index = match mt.as_deref() {
        Some(OCI_INDEX | DOCKER_LIST) => true,
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        Some(other) => return Err(Error::MediaType(other.to_string())),
        None => probe.manifests.is_some() && probe.config.is_none(),
    };
    if is_index {
        let idx: Index = serde_json::from_slice(bytes).map_err(Error::BadIndex)?;
        for d in &idx.manifests {
            check_descriptor(d)?;
        }
        Ok(Document::Index(idx))
    } else {
        let m: Manifest = serde_json::from_slice(bytes).map_err(Error::BadManifest)?;
        check_descriptor(&m.config)?;
        if m.config.size > MAX_DOCUMENT {
            return Err(Error::ConfigTooLarge(m.config.size));
        }
        for l in &m.layers {
            check_descriptor(l)?;
            if Compression::from_media_type(&l.media_type).is_none() {
                return Err(Error::LayerMediaType(l.media_type.clone()));
            }
        }
        Ok(Document::Manifest(m))
    }
}

fn check_descriptor(d: &Descriptor) -> Result<()> {
    if !super::reference::valid_digest(&d.digest) {
        return Err(Error::Digest(d.digest.clone()));
    }
    Ok(())
}

/// Picks linux/amd64 from an index.
pub fn select_platform(idx: &Index) -> Option<&Descriptor> {
    idx.manifests.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    })
}

/// The image config (`application/vnd.oci.image.config.v1+json`), the parts rvmm reads.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct ImageConfigFile {
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: Option<ContainerConfig>,
    pub rootfs: RootFs,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub volumes: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub stop_signal: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<String>,
}

impl ImageConfigFile {
    pub fn parse(bytes: &[u8]) -> Result<ImageConfigFile> {
        let c: ImageConfigFile = serde_json::from_slice(bytes).map_err(Error::BadConfig)?;
        if c.rootfs.kind != "layers" {
            return Err(Error::RootfsType(c.rootfs.kind));
        }
        for d in &c.rootfs.diff_ids {
            if !super::reference::valid_digest(d) {
                return Err(Error::DiffId(d.clone()));
            }
        }
        if !c.os.is_empty() && c.os != "linux" {
            return Err(Error::Os(c.os));
        }
        if !c.architecture.is_empty() && c.architecture != "amd64" {
            return Err(Error::Architecture(c.architecture));
        }
        Ok(c)
    }

    /// What a run needs from the config.
    pub fn run_config(&self) -> super::ImageConfig {
        let c = self.config.clone().unwrap_or_default();
        super::ImageConfig {
            entrypoint: c.entrypoint,
            cmd: c.cmd,
            env: c.env.unwrap_or_default(),
            working_dir: c.working_dir.filter(|w| !w.is_empty()),
            user: c.user.filter(|u| !u.is_empty()),
            exposed_ports: c.exposed_ports.unwrap_or_default().into_keys().collect(),
            volumes: c.volumes.unwrap_or_default().into_keys().collect(),
            stop_signal: c.stop_signal.filter(|s| !s.is_empty()),
            labels: c.labels.unwrap_or_default().into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_manifest_and_index() {
        let d = format!("sha256:{}", "0".repeat(64));
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"{DOCKER_CONFIG}","digest":"{d}","size":10}},"layers":[{{"mediaType":"{DOCKER_LAYER_GZIP}","digest":"{d}","size":5}}]}}"#
        );
        assert!(matches!(
            parse_document(m.as_bytes(), None),
            Ok(Document::Manifest(_))
        ));
        let i = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{d}","size":3,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        match parse_document(i.as_bytes(), None) {
            Ok(Document::Index(idx)) => assert!(select_platform(&idx).is_some()),
            other => panic!("{other:?}"),
        }
        let bad_layer = m.replace(DOCKER_LAYER_GZIP, "application/x-foo");
        assert!(parse_document(bad_layer.as_bytes(), None).is_err());
        assert!(parse_document(b"{\"schemaVersion\":1}", None).is_err());
        assert!(parse_document(b"not json", None).is_err());
        assert!(parse_document(m.as_bytes(), Some("text/html")).is_err());
    }
}

//! The content-addressed image store.
//!
//! ```text
//! ROOT/lock                   flock: held exclusively while importing or removing
//! ROOT/layers.lock            flock: shared by every run using layers, exclusive to delete layers
//! ROOT/index.json             the images: names → manifest, config (image ID), layers (atomic rewrite)
//! ROOT/blobs/sha256/HEX       manifests, configs and layer blobs, each verified while it streamed in
//! ROOT/layers/HEX             one unpacked layer per diff_id (overlayfs-ready), renamed in when complete
//! ROOT/tmp/                   partial blobs and layers; emptied under the lock by the next import
//! ```

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::spec::{self, Compression, Descriptor, Document, ImageConfigFile, Manifest};
use super::unpack::{self, UnpackOptions};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating the image store at {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("locking the image store")]
    Lock(#[source] io::Error),
    #[error("locking the layers")]
    LockLayers(#[source] io::Error),
    #[error("blob {digest} is missing from the store")]
    MissingBlob {
        digest: String,
        #[source]
        source: io::Error,
    },
    #[error("reading the store's index.json")]
    ReadIndex(#[source] io::Error),
    #[error("the store's index.json is corrupt (`rvmm gc --repair` rebuilds it)")]
    CorruptIndex(#[source] serde_json::Error),
    #[error("writing the store's index.json")]
    WriteIndex(#[source] io::Error),
    #[error("creating a temporary file in the image store")]
    Temp(#[source] io::Error),
    #[error("image ID prefix {0} is ambiguous")]
    AmbiguousId(String),
    #[error("no such image: {0}")]
    NoSuchImage(String),
    #[error("refusing to create a tag with a digest reference: {0}")]
    TagWithDigest(String),
    /// A source (registry, layout, archive) failed; its error says what and where.
    #[error(transparent)]
    Fetch(FetchError),
    #[error(transparent)]
    Spec(#[from] spec::Error),
    #[error("{0} has no linux/amd64 image")]
    NoPlatform(String),
    #[error("manifest of {0} bytes is too large")]
    ManifestTooLarge(u64),
    #[error("nested image indexes are not supported")]
    NestedIndex,
    #[error("stored manifest of {0} is an index")]
    StoredIndex(String),
    #[error("manifest has {layers} layers but the config lists {diff_ids} diff_ids")]
    LayerCount { layers: usize, diff_ids: usize },
    #[error("{what} {digest} is {got} bytes, not the {want} its descriptor says")]
    SizeMismatch {
        what: &'static str,
        digest: String,
        got: u64,
        want: u64,
    },
    #[error("{what} digest mismatch: expected {expected}, got {got}")]
    DigestMismatch {
        what: &'static str,
        expected: String,
        got: String,
    },
    #[error("blob {digest} is larger than the {size} bytes its descriptor says")]
    BlobTooLarge { digest: String, size: u64 },
    #[error("blob {digest} is truncated: got {got} of {want} bytes")]
    BlobTruncated { digest: String, got: u64, want: u64 },
    #[error("reading blob {digest}")]
    ReadBlob {
        digest: String,
        #[source]
        source: io::Error,
    },
    #[error("writing blob {digest}")]
    WriteBlob {
        digest: String,
        #[source]
        source: io::Error,
    },
    #[error("storing blob {digest}")]
    StoreBlob {
        digest: String,
        #[source]
        source: io::Error,
    },
    #[error("unpacking layer {layer}")]
    UnpackLayer {
        layer: String,
        #[source]
        source: Box<Error>,
    },
    #[error(transparent)]
    Unpack(#[from] unpack::Error),
    /// Unpacking into a directory of the store (named, so a full disk names where it filled up).
    #[error("into {}", path.display())]
    UnpackInto {
        path: PathBuf,
        #[source]
        source: unpack::Error,
    },
    #[error("layer content digest {got} does not match the config's diff_id {diff_id}")]
    DiffIdMismatch { got: String, diff_id: String },
    #[error("storing the unpacked layer")]
    StoreLayer(#[source] io::Error),
    #[error("removing unused content under {}", path.display())]
    Sweep {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("a blob digest that is not sha256: {0}")]
    NotSha256(String),
    #[error("copying blob {digest}")]
    CopyBlob {
        digest: String,
        #[source]
        source: io::Error,
    },
    #[error("writing the image layout {}", path.display())]
    WriteLayout {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// What a [`Fetcher`] fails with: its own module's error, boxed (the store only passes it on).
pub type FetchError = Box<dyn std::error::Error + Send + Sync>;

/// One image in the index.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ImageRecord {
    /// The config digest (`sha256:…`), Docker's image ID.
    pub id: String,
    pub manifest_digest: String,
    /// Full names `registry/repository:tag`; empty for a dangling image.
    pub names: Vec<String>,
    /// Layer blob digests and their diff_ids, bottom first.
    pub layers: Vec<LayerRecord>,
    /// Compressed size of config + layers, bytes.
    pub size: u64,
    /// The config's `created`, as written there.
    pub created: Option<String>,
    /// When this store got it (unix seconds).
    pub added: u64,
    /// `registry/repository@sha256:…` for each repository it came from (manifests differ
    /// between repositories holding the same image, e.g. recompressed layers).
    #[serde(default)]
    pub repo_digests: Vec<String>,
}

impl ImageRecord {
    /// The manifest digest this image has in the repository of `name` (else the latest one).
    pub fn digest_for(&self, name: &str) -> &str {
        let repo = super::reference::Reference::parse(name)
            .map(|r| r.name())
            .unwrap_or_default();
        self.repo_digests
            .iter()
            .find_map(|rd| {
                rd.split_once('@')
                    .filter(|(r, _)| *r == repo)
                    .map(|(_, d)| d)
            })
            .unwrap_or(&self.manifest_digest)
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct LayerRecord {
    pub digest: String,
    pub diff_id: String,
    pub size: u64,
}

#[derive(Serialize, Deserialize, Debug, Default)]
struct Index {
    images: Vec<ImageRecord>,
}

/// Something that can hand over a manifest and its blobs: a registry, a layout, an archive.
pub trait Fetcher {
    /// A short description for messages (`127.0.0.1:5000/busybox:latest`, `oci:/path`).
    fn describe(&self) -> String;
    /// The top-level manifest or index: bytes, and the media type the source declared.
    fn root(&mut self) -> std::result::Result<(Vec<u8>, Option<String>), FetchError>;
    /// A manifest by digest (an index entry).
    fn manifest(&mut self, d: &Descriptor) -> std::result::Result<Vec<u8>, FetchError>;
    /// Streams a blob into `w`, which verifies it.
    fn blob(&mut self, d: &Descriptor, w: &mut BlobWriter) -> std::result::Result<(), FetchError>;
}

pub struct Store {
    root: PathBuf,
}

/// An exclusive or shared flock, released on drop.
pub struct Lock(File);

impl Lock {
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

fn flock(path: &Path, op: i32) -> io::Result<Option<Lock>> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    // SAFETY: f is an open file descriptor for the duration of the call.
    if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(Lock(f)))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The hex part of a `sha256:` digest (validated by the parsers before it gets here).
fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

impl Store {
    /// Opens (creating as needed) the store at `root`.
    pub fn open(root: &Path) -> Result<Store> {
        for d in ["blobs/sha256", "layers", "tmp"] {
            fs::create_dir_all(root.join(d)).map_err(|source| Error::Create {
                path: root.to_path_buf(),
                source,
            })?;
        }
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The store-wide write lock (blocks until free).
    pub fn lock(&self) -> Result<Lock> {
        flock(&self.root.join("lock"), libc::LOCK_EX)
            .and_then(|l| l.ok_or_else(|| io::ErrorKind::WouldBlock.into()))
            .map_err(Error::Lock)
    }

    /// Held by a run for as long as it uses layer directories.
    pub fn use_layers(&self) -> Result<Lock> {
        flock(&self.root.join("layers.lock"), libc::LOCK_SH)
            .and_then(|l| l.ok_or_else(|| io::ErrorKind::WouldBlock.into()))
            .map_err(Error::LockLayers)
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(hex_of(digest))
    }

    pub fn layer_path(&self, diff_id: &str) -> PathBuf {
        self.root.join("layers").join(hex_of(diff_id))
    }

    fn has_blob(&self, d: &Descriptor) -> bool {
        fs::metadata(self.blob_path(&d.digest)).is_ok_and(|m| m.len() == d.size)
    }

    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        fs::read(self.blob_path(digest)).map_err(|source| Error::MissingBlob {
            digest: digest.to_string(),
            source,
        })
    }

    /// All images in the index.
    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        Ok(self.load_index()?.images)
    }

    fn load_index(&self) -> Result<Index> {
        match fs::read(self.root.join("index.json")) {
            Ok(b) => serde_json::from_slice(&b).map_err(Error::CorruptIndex),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(Error::ReadIndex(e)),
        }
    }

    fn save_index(&self, idx: &Index) -> Result<()> {
        let mut tmp =
            tempfile::NamedTempFile::new_in(self.root.join("tmp")).map_err(Error::Temp)?;
        serde_json::to_writer_pretty(&mut tmp, idx).map_err(|e| Error::WriteIndex(e.into()))?;
        tmp.as_file().sync_all().map_err(Error::WriteIndex)?;
        // The index being replaced stays as index.json.prev (a hard link, no copy), for
        // `rvmm gc --repair` should index.json ever be damaged.
        let index = self.root.join("index.json");
        let prev = self.root.join("index.json.prev");
        let _ = fs::remove_file(&prev);
        let _ = fs::hard_link(&index, &prev);
        tmp.persist(&index)
            .map_err(|e| Error::WriteIndex(e.error))?;
        Ok(())
    }

    /// Finds an image by full name, by `name@digest` (manifest digest), or by ID (prefix of at least 4 hex).
    pub fn find(&self, name_or_id: &str) -> Result<Option<ImageRecord>> {
        let images = self.images()?;
        let hexish = name_or_id.strip_prefix("sha256:").unwrap_or(name_or_id);
        if hexish.len() >= 4 && hexish.len() <= 64 && hexish.bytes().all(|b| b.is_ascii_hexdigit())
        {
            let hits: Vec<_> = images
                .iter()
                .filter(|i| hex_of(&i.id).starts_with(hexish))
                .collect();
            if hits.len() == 1 {
                return Ok(Some(hits[0].clone()));
            }
            if hits.len() > 1 {
                return Err(Error::AmbiguousId(name_or_id.to_string()));
            }
        }
        if let Ok(r) = super::reference::Reference::parse(name_or_id) {
            if let Some(d) = &r.digest {
                let rd = format!("{}@{d}", r.name());
                return Ok(images
                    .into_iter()
                    .find(|i| &i.manifest_digest == d || i.repo_digests.contains(&rd)));
            }
            let full = r.to_string();
            return Ok(images.into_iter().find(|i| i.names.contains(&full)));
        }
        Ok(images
            .into_iter()
            .find(|i| i.names.iter().any(|n| n == name_or_id)))
    }

    /// Imports an image from `src` under `names`. Idempotent: present blobs and layers are reused.
    /// On any failure the store is left as it was (new blobs and layers are removed again).
    pub fn import(
        &self,
        src: &mut dyn Fetcher,
        names: &[String],
        progress: &dyn Progress,
    ) -> Result<ImageRecord> {
        let _lock = self.lock()?;
        self.clear_tmp();
        let mut txn = Txn {
            created: Vec::new(),
            committed: false,
        };
        let rec = self.import_locked(src, names, progress, &mut txn)?;
        txn.committed = true;
        Ok(rec)
    }

    fn import_locked(
        &self,
        src: &mut dyn Fetcher,
        names: &[String],
        progress: &dyn Progress,
        txn: &mut Txn,
    ) -> Result<ImageRecord> {
        let (bytes, declared) = src.root().map_err(Error::Fetch)?;
        let (manifest, manifest_bytes) = match spec::parse_document(&bytes, declared.as_deref())? {
            Document::Manifest(m) => (m, bytes),
            Document::Index(idx) => {
                let d = spec::select_platform(&idx)
                    .or_else(|| {
                        // A single-entry index without platform (common in OCI layouts).
                        (idx.manifests.len() == 1 && idx.manifests[0].platform.is_none())
                            .then(|| &idx.manifests[0])
                    })
                    .ok_or_else(|| Error::NoPlatform(src.describe()))?
                    .clone();
                if d.size > spec::MAX_DOCUMENT {
                    return Err(Error::ManifestTooLarge(d.size));
                }
                let b = src.manifest(&d).map_err(Error::Fetch)?;
                check_bytes(&b, &d.digest, Some(d.size), "manifest")?;
                match spec::parse_document(
                    &b,
                    Some(&d.media_type)
                        .filter(|m| !m.is_empty())
                        .map(|m| m.as_str()),
                )? {
                    Document::Manifest(m) => (m, b),
                    Document::Index(_) => return Err(Error::NestedIndex),
                }
            }
        };
        let manifest_digest = format!("sha256:{}", sha256_hex(&manifest_bytes));
        self.put_bytes(&manifest_digest, &manifest_bytes, txn)?;

        // Config.
        let config = manifest.config.clone();
        if !self.has_blob(&config) {
            let mut w = self.blob_writer(&config.digest, Some(config.size))?;
            src.blob(&config, &mut w).map_err(Error::Fetch)?;
            self.commit_blob(w, txn)?;
        }
        let cfg_bytes = self.read_blob(&config.digest)?;
        check_bytes(&cfg_bytes, &config.digest, Some(config.size), "config")?;
        let cfg = ImageConfigFile::parse(&cfg_bytes)?;
        if cfg.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(Error::LayerCount {
                layers: manifest.layers.len(),
                diff_ids: cfg.rootfs.diff_ids.len(),
            });
        }

        // Layers.
        let mut layers = Vec::new();
        for (i, (l, diff_id)) in manifest.layers.iter().zip(&cfg.rootfs.diff_ids).enumerate() {
            layers.push(LayerRecord {
                digest: l.digest.clone(),
                diff_id: diff_id.clone(),
                size: l.size,
            });
            if self.layer_path(diff_id).is_dir() {
                // Unpacked already (from another image's copy of the layer, maybe compressed
                // differently): keep this image's own blob too, so `rvmm save` can write the
                // image as it came.
                if !self.has_blob(l) {
                    let mut w = self.blob_writer(&l.digest, Some(l.size))?;
                    w.progress = Some(progress.layer_start(i, l));
                    src.blob(l, &mut w).map_err(Error::Fetch)?;
                    self.commit_blob(w, txn)?;
                }
                progress.layer_done(i, l, "already present");
                continue;
            }
            if !self.has_blob(l) {
                let mut w = self.blob_writer(&l.digest, Some(l.size))?;
                w.progress = Some(progress.layer_start(i, l));
                src.blob(l, &mut w).map_err(Error::Fetch)?;
                self.commit_blob(w, txn)?;
            }
            let comp = Compression::from_media_type(&l.media_type).unwrap_or(Compression::None);
            let lowers: Vec<PathBuf> = cfg.rootfs.diff_ids[..i]
                .iter()
                .rev()
                .map(|d| self.layer_path(d))
                .collect();
            self.unpack_layer(&l.digest, comp, diff_id, &lowers, txn)
                .map_err(|e| Error::UnpackLayer {
                    layer: short(&l.digest).to_string(),
                    source: Box::new(e),
                })?;
            progress.layer_done(i, l, "unpacked");
        }

        let record = ImageRecord {
            id: config.digest.clone(),
            manifest_digest,
            names: names.to_vec(),
            size: config.size + manifest.layers.iter().map(|l| l.size).sum::<u64>(),
            layers,
            created: cfg.created.clone(),
            added: now(),
            repo_digests: Vec::new(),
        };
        let new_rds: Vec<String> = names
            .iter()
            .filter_map(|n| super::reference::Reference::parse(n).ok())
            .map(|r| format!("{}@{}", r.name(), record.manifest_digest))
            .collect();
        let mut record = record;
        record.repo_digests = new_rds.clone();
        let mut idx = self.load_index()?;
        for img in &mut idx.images {
            img.names.retain(|n| !names.contains(n));
        }
        if let Some(existing) = idx.images.iter_mut().find(|i| i.id == record.id) {
            for n in names {
                if !existing.names.contains(n) {
                    existing.names.push(n.clone());
                }
            }
            for rd in &new_rds {
                let repo = rd.split('@').next().unwrap_or_default();
                existing
                    .repo_digests
                    .retain(|x| x.split('@').next() != Some(repo));
                existing.repo_digests.push(rd.clone());
            }
            existing.manifest_digest = record.manifest_digest.clone();
            existing.layers = record.layers.clone();
            existing.size = record.size;
            let mut out = existing.clone();
            if !names.is_empty() {
                out.names = names.to_vec();
            }
            self.save_index(&idx)?;
            return Ok(out);
        }
        idx.images.push(record.clone());
        self.save_index(&idx)?;
        Ok(record)
    }

    fn put_bytes(&self, digest: &str, bytes: &[u8], txn: &mut Txn) -> Result<()> {
        if self.blob_path(digest).exists() {
            return Ok(());
        }
        let mut w = self.blob_writer(digest, Some(bytes.len() as u64))?;
        w.write_chunk(bytes)?;
        self.commit_blob(w, txn)
    }

    /// A writer that verifies size and digest as bytes arrive.
    pub fn blob_writer(&self, digest: &str, size: Option<u64>) -> Result<BlobWriter> {
        Ok(BlobWriter {
            file: tempfile::NamedTempFile::new_in(self.root.join("tmp")).map_err(Error::Temp)?,
            hasher: Sha256::new(),
            written: 0,
            digest: digest.to_string(),
            size,
            progress: None,
        })
    }

    fn commit_blob(&self, w: BlobWriter, txn: &mut Txn) -> Result<()> {
        let dest = self.blob_path(&w.digest);
        let (file, digest) = w.finish()?;
        let store_err = |source| Error::StoreBlob {
            digest: digest.clone(),
            source,
        };
        file.as_file().sync_all().map_err(store_err)?;
        file.persist(&dest).map_err(|e| store_err(e.error))?;
        txn.created.push(dest);
        Ok(())
    }

    fn unpack_layer(
        &self,
        digest: &str,
        comp: Compression,
        diff_id: &str,
        lowers: &[PathBuf],
        txn: &mut Txn,
    ) -> Result<()> {
        let read_err = |source| Error::ReadBlob {
            digest: digest.to_string(),
            source,
        };
        let blob = File::open(self.blob_path(digest)).map_err(read_err)?;
        let mut head = [0u8; 4];
        let n = (&blob).read(&mut head).map_err(read_err)?;
        let comp = match (comp, Compression::sniff(&head[..n])) {
            // Trust the bytes over a media type that says "uncompressed" (docker-archive, some layouts).
            (Compression::None, sniffed) => sniffed,
            (c, _) => c,
        };
        let blob = File::open(self.blob_path(digest)).map_err(read_err)?;
        let reader: Box<dyn Read> = match comp {
            Compression::None => Box::new(BufReader::with_capacity(1 << 16, blob)),
            Compression::Gzip => Box::new(flate2::read::GzDecoder::new(BufReader::with_capacity(
                1 << 16,
                blob,
            ))),
            Compression::Zstd => {
                Box::new(zstd::stream::read::Decoder::new(blob).map_err(read_err)?)
            }
        };
        let mut hashing = HashingReader {
            inner: reader,
            hasher: Sha256::new(),
        };
        let tmp = tempfile::Builder::new()
            .prefix("layer-")
            .tempdir_in(self.root.join("tmp"))
            .map_err(Error::Temp)?;
        let opts = UnpackOptions {
            lowers,
            ..UnpackOptions::for_current_user()
        };
        unpack::unpack(&mut hashing, tmp.path(), opts).map_err(|source| Error::UnpackInto {
            path: tmp.path().to_path_buf(),
            source,
        })?;
        let got = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
        if got != diff_id {
            return Err(Error::DiffIdMismatch {
                got,
                diff_id: diff_id.to_string(),
            });
        }
        fs::set_permissions(
            tmp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .map_err(Error::StoreLayer)?;
        let dest = self.layer_path(diff_id);
        let path = tmp.keep();
        if let Err(e) = fs::rename(&path, &dest) {
            let _ = fs::remove_dir_all(&path);
            return Err(Error::StoreLayer(e));
        }
        txn.created.push(dest);
        Ok(())
    }

    /// Removes leftovers of killed imports. Call with the store lock held.
    fn clear_tmp(&self) {
        if let Ok(rd) = fs::read_dir(self.root.join("tmp")) {
            for e in rd.flatten() {
                let p = e.path();
                let _ = if p.is_dir() {
                    remove_tree(&p)
                } else {
                    fs::remove_file(&p)
                };
            }
        }
    }

    /// Removes `name` (or the image with this ID, all its names). Returns the removed image's ID
    /// when the image itself went (it had no names left), and whether layers stayed for `rvmm gc`.
    pub fn remove(&self, name_or_id: &str) -> Result<RemoveOutcome> {
        let _lock = self.lock()?;
        let Some(rec) = self.find(name_or_id)? else {
            return Err(Error::NoSuchImage(name_or_id.to_string()));
        };
        let mut idx = self.load_index()?;
        let by_name = rec.names.iter().any(|n| {
            super::reference::Reference::parse(name_or_id).is_ok_and(|r| &r.to_string() == n)
                || n == name_or_id
        });
        let mut untagged = Vec::new();
        if let Some(img) = idx.images.iter_mut().find(|i| i.id == rec.id) {
            if by_name && img.names.len() > 1 {
                let full = super::reference::Reference::parse(name_or_id)
                    .map(|r| r.to_string())
                    .unwrap_or_else(|_| name_or_id.to_string());
                img.names.retain(|n| n != &full && n != name_or_id);
                untagged.push(full);
                self.save_index(&idx)?;
                return Ok(RemoveOutcome {
                    untagged,
                    deleted: None,
                    layers_kept: false,
                });
            }
            untagged = img.names.clone();
        }
        idx.images.retain(|i| i.id != rec.id);
        self.save_index(&idx)?;
        let layers_kept = !self.sweep(&idx)?;
        Ok(RemoveOutcome {
            untagged,
            deleted: Some(rec.id),
            layers_kept,
        })
    }

    /// Deletes blobs and layers no image references. Returns false when layers are in use by a run
    /// (they stay for a later sweep). Call with the store lock held.
    fn sweep(&self, idx: &Index) -> Result<bool> {
        let mut keep_blobs = BTreeSet::new();
        let mut keep_layers = BTreeSet::new();
        for img in &idx.images {
            keep_blobs.insert(hex_of(&img.id).to_string());
            keep_blobs.insert(hex_of(&img.manifest_digest).to_string());
            for rd in &img.repo_digests {
                if let Some((_, d)) = rd.split_once('@') {
                    keep_blobs.insert(hex_of(d).to_string());
                }
            }
            for l in &img.layers {
                keep_blobs.insert(hex_of(&l.digest).to_string());
                keep_layers.insert(hex_of(&l.diff_id).to_string());
            }
        }
        let blobs = self.root.join("blobs/sha256");
        let sweep_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Sweep { path, source }
        };
        for e in fs::read_dir(&blobs).map_err(sweep_err(&blobs))?.flatten() {
            if !keep_blobs.contains(e.file_name().to_string_lossy().as_ref()) {
                // An index's blob (for an OCI layout manifest list) is kept only while referenced.
                let _ = fs::remove_file(e.path());
            }
        }
        let Some(_layers) = flock(
            &self.root.join("layers.lock"),
            libc::LOCK_EX | libc::LOCK_NB,
        )
        .map_err(Error::LockLayers)?
        else {
            return Ok(false);
        };
        let layers = self.root.join("layers");
        for e in fs::read_dir(&layers).map_err(sweep_err(&layers))?.flatten() {
            if !keep_layers.contains(e.file_name().to_string_lossy().as_ref()) {
                let p = e.path();
                remove_tree(&p).map_err(sweep_err(&p))?;
            }
        }
        Ok(true)
    }

    /// `rvmm tag SOURCE TARGET`: gives the image `source` names (name, `name@digest` or ID prefix)
    /// the extra name `target`, taking it from whichever image had it before (as Docker does).
    pub fn tag(&self, source: &str, target: &super::reference::Reference) -> Result<ImageRecord> {
        if target.digest.is_some() {
            return Err(Error::TagWithDigest(target.to_string()));
        }
        let _lock = self.lock()?;
        let Some(rec) = self.find(source)? else {
            return Err(Error::NoSuchImage(source.to_string()));
        };
        let full = target.to_string();
        let mut idx = self.load_index()?;
        for img in &mut idx.images {
            if img.id != rec.id {
                img.names.retain(|n| n != &full);
            }
        }
        let img = idx
            .images
            .iter_mut()
            .find(|i| i.id == rec.id)
            .ok_or_else(|| Error::NoSuchImage(source.to_string()))?;
        if !img.names.contains(&full) {
            img.names.push(full);
        }
        let out = img.clone();
        self.save_index(&idx)?;
        Ok(out)
    }

    /// `rvmm gc` for the store: unreferenced blobs and layers, tmp leftovers.
    pub fn gc(&self) -> Result<bool> {
        let _lock = self.lock()?;
        self.clear_tmp();
        let idx = self.load_index()?;
        self.sweep(&idx)
    }

    /// `rvmm gc --check`: verifies, without changing anything, that the index parses and that every
    /// indexed image has its manifest, config and layer blobs with the right digest and every layer
    /// unpacked. Returns one line per problem (empty: consistent).
    pub fn check(&self) -> Result<Vec<Problem>> {
        let _lock = self.lock()?;
        let idx = self.load_index()?;
        Ok(self.check_index(&idx))
    }

    fn check_index(&self, idx: &Index) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut hashed: std::collections::BTreeMap<String, Option<String>> = Default::default();
        let mut blob_ok = |digest: &str| -> std::result::Result<(), String> {
            let got = hashed
                .entry(digest.to_string())
                .or_insert_with(|| hash_file(&self.blob_path(digest)).ok())
                .clone();
            match got {
                None => Err(format!("blob {digest} is missing or unreadable")),
                Some(h) if h != hex_of(digest) => {
                    Err(format!("blob {digest} has the wrong digest sha256:{h}"))
                }
                Some(_) => Ok(()),
            }
        };
        for img in &idx.images {
            let mut problems = Vec::new();
            if let Err(e) = blob_ok(&img.manifest_digest) {
                problems.push(format!("manifest: {e}"));
            }
            if let Err(e) = blob_ok(&img.id) {
                problems.push(format!("config: {e}"));
            }
            for l in &img.layers {
                if let Err(e) = blob_ok(&l.digest) {
                    problems.push(format!("layer: {e}"));
                }
                if !self.layer_path(&l.diff_id).is_dir() {
                    problems.push(format!("layer {} is not unpacked", l.diff_id));
                }
            }
            for what in problems {
                out.push(Problem {
                    image: img.id.clone(),
                    names: img.names.clone(),
                    what,
                });
            }
        }
        out
    }

    /// `rvmm gc --repair`: makes the store consistent again. A corrupt index.json is moved aside
    /// (to `index.json.corrupt`) and rebuilt from the previous index (`index.json.prev`, kept by
    /// every index update) and the manifests in the store: images found only through their
    /// manifest come back without a name. Images whose content is damaged are dropped from the
    /// index (pull them again). Returns what was done, one line each.
    pub fn repair(&self) -> Result<Vec<String>> {
        let _lock = self.lock()?;
        self.clear_tmp();
        let mut done = Vec::new();
        let mut idx = match self.load_index() {
            Ok(idx) => idx,
            Err(Error::CorruptIndex(_)) => {
                let index = self.root.join("index.json");
                let aside = self.root.join("index.json.corrupt");
                fs::rename(&index, &aside).map_err(Error::WriteIndex)?;
                done.push(format!(
                    "moved the corrupt index.json to {}",
                    aside.display()
                ));
                let idx = self.rebuild_index();
                done.push(format!(
                    "rebuilt index.json: {} image(s), {} without a name",
                    idx.images.len(),
                    idx.images.iter().filter(|i| i.names.is_empty()).count()
                ));
                idx
            }
            Err(e) => return Err(e),
        };
        let broken: BTreeSet<String> = self
            .check_index(&idx)
            .into_iter()
            .map(|p| {
                done.push(format!("dropped {}: {}", p.label(), p.what));
                p.image
            })
            .collect();
        idx.images.retain(|i| !broken.contains(&i.id));
        self.save_index(&idx)?;
        self.sweep(&idx)?;
        Ok(done)
    }

    /// An index from `index.json.prev` (if it parses) plus every stored manifest whose config
    /// and layers are all present.
    fn rebuild_index(&self) -> Index {
        let mut idx: Index = fs::read(self.root.join("index.json.prev"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let Ok(rd) = fs::read_dir(self.root.join("blobs/sha256")) else {
            return idx;
        };
        for e in rd.flatten() {
            let Ok(bytes) = fs::read(e.path()) else {
                continue;
            };
            if bytes.len() as u64 > spec::MAX_DOCUMENT {
                continue;
            }
            let Ok(Document::Manifest(m)) = spec::parse_document(&bytes, None) else {
                continue;
            };
            let manifest_digest = format!("sha256:{}", sha256_hex(&bytes));
            if idx.images.iter().any(|i| i.id == m.config.digest) {
                continue;
            }
            let Ok(cfg) = self
                .read_blob(&m.config.digest)
                .ok()
                .map(|b| ImageConfigFile::parse(&b))
                .transpose()
            else {
                continue;
            };
            let Some(cfg) = cfg else { continue };
            if cfg.rootfs.diff_ids.len() != m.layers.len() {
                continue;
            }
            idx.images.push(ImageRecord {
                id: m.config.digest.clone(),
                manifest_digest,
                names: Vec::new(),
                layers: m
                    .layers
                    .iter()
                    .zip(&cfg.rootfs.diff_ids)
                    .map(|(l, d)| LayerRecord {
                        digest: l.digest.clone(),
                        diff_id: d.clone(),
                        size: l.size,
                    })
                    .collect(),
                size: m.config.size + m.layers.iter().map(|l| l.size).sum::<u64>(),
                created: cfg.created.clone(),
                added: now(),
                repo_digests: Vec::new(),
            });
        }
        idx
    }

    /// The parsed config of an image.
    pub fn config(&self, rec: &ImageRecord) -> Result<ImageConfigFile> {
        Ok(ImageConfigFile::parse(&self.read_blob(&rec.id)?)?)
    }

    /// Writes `rec` as an OCI image layout in `dir` (created), tagged `tag`: its manifest, config
    /// and layer blobs as stored (hard links when the filesystem allows, copies otherwise).
    pub fn export_layout(&self, rec: &ImageRecord, dir: &Path, tag: &str) -> Result<()> {
        let manifest_bytes = self.read_blob(&rec.manifest_digest)?;
        let m = self.manifest(rec)?;
        let blobs = dir.join("blobs/sha256");
        let layout_err = |source| Error::WriteLayout {
            path: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(&blobs).map_err(layout_err)?;
        let digests = std::iter::once(rec.manifest_digest.as_str())
            .chain(std::iter::once(m.config.digest.as_str()))
            .chain(m.layers.iter().map(|l| l.digest.as_str()));
        for d in digests {
            let hex = d
                .strip_prefix("sha256:")
                .ok_or_else(|| Error::NotSha256(d.to_string()))?;
            let (src, dst) = (self.blob_path(d), blobs.join(hex));
            if dst.exists() {
                continue;
            }
            if fs::hard_link(&src, &dst).is_err() {
                fs::copy(&src, &dst).map_err(|source| Error::CopyBlob {
                    digest: d.to_string(),
                    source,
                })?;
            }
        }
        let media_type = m
            .media_type
            .clone()
            .unwrap_or_else(|| spec::OCI_MANIFEST.to_string());
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": media_type,
                "digest": rec.manifest_digest,
                "size": manifest_bytes.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }],
        });
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .map_err(layout_err)?;
        let index = serde_json::to_vec(&index).map_err(|e| layout_err(e.into()))?;
        fs::write(dir.join("index.json"), index).map_err(layout_err)?;
        Ok(())
    }

    /// The manifest of an image.
    pub fn manifest(&self, rec: &ImageRecord) -> Result<Manifest> {
        match spec::parse_document(&self.read_blob(&rec.manifest_digest)?, None)? {
            Document::Manifest(m) => Ok(m),
            Document::Index(_) => Err(Error::StoredIndex(rec.id.clone())),
        }
    }
}

#[derive(Debug)]
pub struct RemoveOutcome {
    pub untagged: Vec<String>,
    pub deleted: Option<String>,
    pub layers_kept: bool,
}

/// Removes a tree whose directories may be read-only for us.
pub fn remove_tree(p: &Path) -> io::Result<()> {
    match fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            make_writable(p);
            fs::remove_dir_all(p)
        }
    }
}

fn make_writable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = fs::symlink_metadata(p) {
        if m.is_dir() {
            let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o700));
            if let Ok(rd) = fs::read_dir(p) {
                for e in rd.flatten() {
                    make_writable(&e.path());
                }
            }
        }
    }
}

/// Paths an import created; removed again unless the import commits.
struct Txn {
    created: Vec<PathBuf>,
    committed: bool,
}

impl Drop for Txn {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for p in self.created.iter().rev() {
            let _ = if p.is_dir() {
                remove_tree(p)
            } else {
                fs::remove_file(p)
            };
        }
    }
}

/// One thing [`Store::check`] found wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The image ID.
    pub image: String,
    pub names: Vec<String>,
    pub what: String,
}

impl Problem {
    /// The image's first name, else its short ID.
    pub fn label(&self) -> String {
        self.names
            .first()
            .cloned()
            .unwrap_or_else(|| short(&self.image).to_string())
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.label(), self.what)
    }
}

fn hash_file(p: &Path) -> io::Result<String> {
    let mut f = File::open(p)?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

pub fn short(digest: &str) -> &str {
    let h = hex_of(digest);
    &h[..h.len().min(12)]
}

fn check_bytes(b: &[u8], digest: &str, size: Option<u64>, what: &'static str) -> Result<()> {
    if let Some(s) = size {
        if b.len() as u64 != s {
            return Err(Error::SizeMismatch {
                what,
                digest: short(digest).to_string(),
                got: b.len() as u64,
                want: s,
            });
        }
    }
    let got = format!("sha256:{}", sha256_hex(b));
    if got != digest {
        return Err(Error::DigestMismatch {
            what,
            expected: digest.to_string(),
            got,
        });
    }
    Ok(())
}

/// Verifies a blob as it streams into a temp file in the store.
pub struct BlobWriter {
    file: tempfile::NamedTempFile,
    hasher: Sha256,
    written: u64,
    digest: String,
    size: Option<u64>,
    pub progress: Option<indicatif::ProgressBar>,
}

impl BlobWriter {
    pub fn write_chunk(&mut self, chunk: &[u8]) -> Result<()> {
        self.written += chunk.len() as u64;
        if let Some(s) = self.size {
            if self.written > s {
                return Err(Error::BlobTooLarge {
                    digest: short(&self.digest).to_string(),
                    size: s,
                });
            }
        }
        self.hasher.update(chunk);
        self.file
            .write_all(chunk)
            .map_err(|source| Error::WriteBlob {
                digest: self.digest.clone(),
                source,
            })?;
        if let Some(p) = &self.progress {
            p.set_position(self.written);
        }
        Ok(())
    }

    /// Copies everything from `r`.
    pub fn copy_from(&mut self, r: &mut dyn Read) -> Result<()> {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = r.read(&mut buf).map_err(|source| Error::ReadBlob {
                digest: self.digest.clone(),
                source,
            })?;
            if n == 0 {
                return Ok(());
            }
            self.write_chunk(&buf[..n])?;
        }
    }

    fn finish(self) -> Result<(tempfile::NamedTempFile, String)> {
        if let Some(p) = &self.progress {
            p.finish_and_clear();
        }
        if let Some(s) = self.size {
            if self.written != s {
                return Err(Error::BlobTruncated {
                    digest: short(&self.digest).to_string(),
                    got: self.written,
                    want: s,
                });
            }
        }
        let got = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        if got != self.digest {
            return Err(Error::DigestMismatch {
                what: "blob",
                expected: self.digest,
                got,
            });
        }
        Ok((self.file, self.digest))
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Progress reporting for imports: bars on a terminal, nothing otherwise.
pub trait Progress {
    fn layer_start(&self, i: usize, d: &Descriptor) -> indicatif::ProgressBar;
    fn layer_done(&self, i: usize, d: &Descriptor, what: &str);
}

/// No output.
pub struct Quiet;

impl Progress for Quiet {
    fn layer_start(&self, _i: usize, _d: &Descriptor) -> indicatif::ProgressBar {
        indicatif::ProgressBar::hidden()
    }
    fn layer_done(&self, _i: usize, _d: &Descriptor, _what: &str) {}
}

/// Bars per layer on stderr when it is a terminal.
pub struct Bars {
    multi: indicatif::MultiProgress,
    tty: bool,
}

impl Bars {
    pub fn new() -> Bars {
        use std::io::IsTerminal;
        let tty = io::stderr().is_terminal();
        let multi = indicatif::MultiProgress::with_draw_target(if tty {
            indicatif::ProgressDrawTarget::stderr()
        } else {
            indicatif::ProgressDrawTarget::hidden()
        });
        Bars { multi, tty }
    }
}

impl Default for Bars {
    fn default() -> Self {
        Bars::new()
    }
}

impl Progress for Bars {
    fn layer_start(&self, _i: usize, d: &Descriptor) -> indicatif::ProgressBar {
        let pb = self.multi.add(indicatif::ProgressBar::new(d.size));
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_prefix(short(&d.digest).to_string());
        pb
    }
    fn layer_done(&self, _i: usize, d: &Descriptor, what: &str) {
        if self.tty {
            let _ = self.multi.println(format!("{} {what}", short(&d.digest)));
        }
    }
}

//! `rvmm save`: images from the store as a docker-archive or an OCI archive.
//!
//! Blobs are streamed from the store into the tar (never a whole layer in memory) and checked
//! against their digests on the way. A file is written unnamed (`O_TMPFILE`) in the directory
//! of its destination and only linked and renamed into place once complete, so a save that fails
//! or is killed leaves no partial file behind.
//!
//! docker-archive (what `docker save` / `podman save` write, loadable by both):
//! `manifest.json` (`Config`, `RepoTags`, `Layers` per image), `<config hex>.json`, and each
//! layer uncompressed as `<diff_id hex>.tar`, so its digest is its diff_id.
//! oci-archive: an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/`) with the
//! layers as stored (compressed), one index entry per image named by
//! `org.opencontainers.image.ref.name`. Both keep the config blob byte for byte, so the image ID
//! survives a save and load.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::reference::{Reference, DOCKER_HUB};
use super::spec::{self, Compression, Document, Manifest};
use super::store::{short, ImageRecord, Store};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no such image: {0}")]
    NoSuchImage(String),
    #[error("unknown archive format {0:?} (use docker-archive or oci-archive)")]
    UnknownFormat(String),
    #[error("reading the image store")]
    Store(#[source] super::store::Error),
    #[error("reading blob {digest} from the store")]
    Blob {
        digest: String,
        #[source]
        source: io::Error,
    },
    #[error("image {0} has no readable image manifest in the store")]
    BadManifest(String),
    #[error("layer blob {digest} of image {image} is not in the store (pull the image again)")]
    MissingLayer { image: String, digest: String },
    #[error("cannot write {}", path.display())]
    Output {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing the archive")]
    Write(#[source] io::Error),
}

/// The two archive formats, named as podman names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    DockerArchive,
    OciArchive,
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format, Error> {
        match s {
            "docker-archive" => Ok(Format::DockerArchive),
            "oci-archive" => Ok(Format::OciArchive),
            _ => Err(Error::UnknownFormat(s.to_string())),
        }
    }
}

/// One image to save, and the name it was asked for by (none when asked for by ID or digest).
#[derive(Debug, Clone)]
pub struct Selected {
    pub record: ImageRecord,
    pub name: Option<Reference>,
}

/// Finds every image named on the command line (name, `name@digest` or ID prefix).
pub fn select(store: &Store, images: &[String]) -> Result<Vec<Selected>, Error> {
    images
        .iter()
        .map(|arg| {
            let record = store
                .find(arg)
                .map_err(Error::Store)?
                .ok_or_else(|| Error::NoSuchImage(arg.clone()))?;
            let name = Reference::parse(arg)
                .ok()
                .filter(|r| r.digest.is_none() && record.names.contains(&r.to_string()));
            Ok(Selected { record, name })
        })
        .collect()
}

/// `docker.io/library/busybox:latest` → `busybox:latest`, as Docker writes RepoTags.
pub fn familiar(r: &Reference) -> String {
    let full = r.to_string();
    if r.registry == DOCKER_HUB {
        let rest = &full[DOCKER_HUB.len() + 1..];
        return rest.strip_prefix("library/").unwrap_or(rest).to_string();
    }
    full
}

/// Writes the archive to `out` (stdout, say) and returns it.
pub fn write_to<W: Write>(
    store: &Store,
    images: &[Selected],
    format: Format,
    out: W,
) -> Result<W, Error> {
    let mut tar = tar::Builder::new(out);
    match format {
        Format::DockerArchive => docker_archive(store, images, &mut tar)?,
        Format::OciArchive => oci_archive(store, images, &mut tar)?,
    }
    tar.into_inner().map_err(Error::Write)
}

/// Writes the archive to `path`, which appears only once it is complete.
pub fn save_file(
    store: &Store,
    images: &[Selected],
    format: Format,
    path: &Path,
) -> Result<(), Error> {
    let out = Output::create(path)?;
    let w = write_to(
        store,
        images,
        format,
        io::BufWriter::with_capacity(1 << 16, out),
    )?;
    let out = w.into_inner().map_err(|e| Error::Write(e.into_error()))?;
    out.commit()
}

/// A file being written in the directory of its destination, invisible until [`Output::commit`].
struct Output {
    file: File,
    path: PathBuf,
    /// `None`: an `O_TMPFILE` file, which vanishes if rvmm dies. Otherwise a named temp file,
    /// where the filesystem has no `O_TMPFILE`.
    named: Option<tempfile::TempPath>,
}

impl Output {
    fn create(path: &Path) -> Result<Output, Error> {
        let oerr = |source| Error::Output {
            path: path.to_path_buf(),
            source,
        };
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if path.file_name().is_none() {
            return Err(oerr(io::Error::from(io::ErrorKind::InvalidInput)));
        }
        match OpenOptions::new()
            .write(true)
            .mode(0o666)
            .custom_flags(libc::O_TMPFILE)
            .open(dir)
        {
            Ok(file) => Ok(Output {
                file,
                path: path.to_path_buf(),
                named: None,
            }),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
                ) =>
            {
                let t = tempfile::Builder::new()
                    .prefix(".rvmm-save-")
                    .tempfile_in(dir)
                    .map_err(oerr)?;
                let (file, named) = t.into_parts();
                Ok(Output {
                    file,
                    path: path.to_path_buf(),
                    named: Some(named),
                })
            }
            Err(e) => Err(oerr(e)),
        }
    }

    fn commit(self) -> Result<(), Error> {
        let oerr = |source| Error::Output {
            path: self.path.clone(),
            source,
        };
        self.file.sync_all().map_err(oerr)?;
        if let Some(named) = self.named {
            return named.persist(&self.path).map_err(|e| oerr(e.error));
        }
        // Give the unnamed file a temporary name beside the destination, then rename it over.
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = self.path.file_name().unwrap_or_default().as_bytes();
        let mut tmp_name = b".".to_vec();
        tmp_name.extend_from_slice(base);
        tmp_name.extend_from_slice(format!(".rvmm-save-{}", std::process::id()).as_bytes());
        let tmp = dir.join(std::ffi::OsStr::from_bytes(&tmp_name));
        let from = std::ffi::CString::new(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
            .map_err(|e| oerr(io::Error::other(e)))?;
        let to = std::ffi::CString::new(tmp.as_os_str().as_bytes())
            .map_err(|e| oerr(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let _ = std::fs::remove_file(&tmp);
        // SAFETY: two valid NUL-terminated paths that outlive the call; nothing else is shared.
        let r = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if r != 0 {
            return Err(oerr(io::Error::last_os_error()));
        }
        if let Err(e) = std::fs::rename(&tmp, &self.path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(oerr(e));
        }
        Ok(())
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// A regular-file tar header: mode 0644, owner 0, mtime 0 (archives of the same images are the same bytes).
fn file_header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

fn append_bytes<W: Write>(tar: &mut tar::Builder<W>, path: &str, data: &[u8]) -> Result<(), Error> {
    let mut h = file_header(data.len() as u64);
    tar.append_data(&mut h, path, data).map_err(Error::Write)
}

fn append_dir<W: Write>(tar: &mut tar::Builder<W>, path: &str) -> Result<(), Error> {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    h.set_mode(0o755);
    h.set_mtime(0);
    tar.append_data(&mut h, path, io::empty())
        .map_err(Error::Write)
}

/// Streams `size` bytes from `r` into the tar as `path`, failing (so the archive is abandoned)
/// unless they are exactly `size` bytes whose sha256 is `digest`.
fn append_verified<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    r: impl Read,
    size: u64,
    digest: &str,
) -> Result<(), Error> {
    let mut h = file_header(size);
    let reader = Verified {
        inner: r,
        hasher: Sha256::new(),
        seen: 0,
        size,
        digest,
    };
    tar.append_data(&mut h, path, reader).map_err(Error::Write)
}

struct Verified<'a, R> {
    inner: R,
    hasher: Sha256,
    seen: u64,
    size: u64,
    digest: &'a str,
}

impl<R: Read> Read for Verified<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen += n as u64;
        let bad = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("blob {} in the store {what}", short(self.digest)),
            )
        };
        if self.seen > self.size {
            return Err(bad("is larger than its descriptor says"));
        }
        self.hasher.update(&buf[..n]);
        if n == 0 && !buf.is_empty() {
            if self.seen != self.size {
                return Err(bad("is shorter than its descriptor says"));
            }
            let got = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
            if got != self.digest {
                return Err(bad("does not match its digest"));
            }
        }
        Ok(n)
    }
}

fn open_blob(store: &Store, digest: &str) -> Result<File, Error> {
    File::open(store.blob_path(digest)).map_err(|source| Error::Blob {
        digest: digest.to_string(),
        source,
    })
}

/// How a stored layer blob is compressed, by its first bytes (as the store unpacks it).
fn sniff_blob(store: &Store, digest: &str) -> Result<Compression, Error> {
    let mut f = open_blob(store, digest)?;
    let mut head = [0u8; 4];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]).map_err(|source| Error::Blob {
            digest: digest.to_string(),
            source,
        })? {
            0 => break,
            k => n += k,
        }
    }
    Ok(Compression::sniff(&head[..n]))
}

/// A stored layer blob, decompressed.
fn open_layer(store: &Store, digest: &str) -> Result<Box<dyn Read>, Error> {
    let comp = sniff_blob(store, digest)?;
    let f = open_blob(store, digest)?;
    Ok(match comp {
        Compression::None => Box::new(BufReader::with_capacity(1 << 16, f)),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(BufReader::with_capacity(
            1 << 16,
            f,
        ))),
        Compression::Zstd => {
            Box::new(
                zstd::stream::read::Decoder::new(f).map_err(|source| Error::Blob {
                    digest: digest.to_string(),
                    source,
                })?,
            )
        }
    })
}

/// The uncompressed size of a stored layer: its length when it is not compressed, else one
/// streaming pass through the decompressor (nothing kept).
fn layer_size(store: &Store, digest: &str) -> Result<u64, Error> {
    let berr = |source| Error::Blob {
        digest: digest.to_string(),
        source,
    };
    if sniff_blob(store, digest)? == Compression::None {
        return Ok(std::fs::metadata(store.blob_path(digest))
            .map_err(berr)?
            .len());
    }
    let mut r = open_layer(store, digest)?;
    io::copy(&mut r, &mut io::sink()).map_err(berr)
}

/// What to write for one image: which of its stored manifests, and its layers' diff_ids.
struct Plan {
    manifest_digest: String,
    manifest: Manifest,
    diff_ids: Vec<String>,
}

/// Picks the manifest to write: the one of the repository the image was named by, else the
/// latest, else any other it was pulled with; the first whose blobs are all in the store.
fn plan(store: &Store, s: &Selected) -> Result<Plan, Error> {
    let rec = &s.record;
    let mut candidates: Vec<String> = Vec::new();
    if let Some(n) = &s.name {
        candidates.push(rec.digest_for(&n.to_string()).to_string());
    }
    candidates.push(rec.manifest_digest.clone());
    candidates.extend(
        rec.repo_digests
            .iter()
            .filter_map(|rd| rd.split_once('@').map(|(_, d)| d.to_string())),
    );
    let diff_ids = store.config(rec).map_err(Error::Store)?.rootfs.diff_ids;
    let mut fallback = None;
    let mut seen = BTreeSet::new();
    for d in candidates {
        if !seen.insert(d.clone()) {
            continue;
        }
        let Ok(bytes) = store.read_blob(&d) else {
            continue;
        };
        let Ok(Document::Manifest(manifest)) = spec::parse_document(&bytes, None) else {
            continue;
        };
        if manifest.config.digest != rec.id || manifest.layers.len() != diff_ids.len() {
            continue;
        }
        let complete = manifest
            .layers
            .iter()
            .all(|l| store.blob_path(&l.digest).is_file());
        let p = Plan {
            manifest_digest: d,
            manifest,
            diff_ids: diff_ids.clone(),
        };
        if complete {
            return Ok(p);
        }
        fallback.get_or_insert(p);
    }
    fallback.ok_or_else(|| Error::BadManifest(rec.id.clone()))
}

/// A stored blob holding the layer `diff_id`: `digest` when the store has it, else another
/// image's copy of the same content (stores written before every image kept its own blobs).
fn layer_blob(
    store: &Store,
    all: &[ImageRecord],
    image: &str,
    digest: &str,
    diff_id: &str,
) -> Result<String, Error> {
    if store.blob_path(digest).is_file() {
        return Ok(digest.to_string());
    }
    all.iter()
        .flat_map(|i| i.layers.iter())
        .find(|l| l.diff_id == diff_id && store.blob_path(&l.digest).is_file())
        .map(|l| l.digest.clone())
        .ok_or_else(|| Error::MissingLayer {
            image: image.to_string(),
            digest: digest.to_string(),
        })
}

fn display_name(s: &Selected) -> String {
    s.name
        .as_ref()
        .map(|n| n.to_string())
        .unwrap_or_else(|| short(&s.record.id).to_string())
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

fn docker_archive<W: Write>(
    store: &Store,
    images: &[Selected],
    tar: &mut tar::Builder<W>,
) -> Result<(), Error> {
    // One manifest.json entry per image, its RepoTags gathered from every argument naming it.
    let mut entries: Vec<(&Selected, Vec<String>)> = Vec::new();
    for s in images {
        let tag = s.name.as_ref().map(familiar);
        match entries.iter_mut().find(|(e, _)| e.record.id == s.record.id) {
            Some((_, tags)) => {
                if let Some(t) = tag.filter(|t| !tags.contains(t)) {
                    tags.push(t);
                }
            }
            None => entries.push((s, tag.into_iter().collect())),
        }
    }
    let all = store.images().map_err(Error::Store)?;
    let mut written = BTreeSet::new();
    let mut manifest = Vec::new();
    for (s, tags) in &entries {
        let rec = &s.record;
        let plan = plan(store, s)?;
        let cfg_path = format!("{}.json", hex_of(&rec.id));
        if written.insert(cfg_path.clone()) {
            let size = std::fs::metadata(store.blob_path(&rec.id))
                .map_err(|source| Error::Blob {
                    digest: rec.id.clone(),
                    source,
                })?
                .len();
            append_verified(tar, &cfg_path, open_blob(store, &rec.id)?, size, &rec.id)?;
        }
        let mut layers = Vec::new();
        for (l, diff_id) in plan.manifest.layers.iter().zip(&plan.diff_ids) {
            let path = format!("{}.tar", hex_of(diff_id));
            if written.insert(path.clone()) {
                let blob = layer_blob(store, &all, &display_name(s), &l.digest, diff_id)?;
                let size = layer_size(store, &blob)?;
                append_verified(tar, &path, open_layer(store, &blob)?, size, diff_id)?;
            }
            layers.push(path);
        }
        manifest.push(serde_json::json!({
            "Config": cfg_path,
            "RepoTags": if tags.is_empty() { serde_json::Value::Null } else { tags.clone().into() },
            "Layers": layers,
        }));
    }
    let body = serde_json::to_vec(&manifest).map_err(|e| Error::Write(io::Error::other(e)))?;
    append_bytes(tar, "manifest.json", &body)
}

/// A Docker v2s2 manifest rewritten with OCI media types (same config and layer blobs);
/// an OCI manifest stays as stored.
fn oci_manifest(store: &Store, plan: &Plan) -> Result<Vec<u8>, Error> {
    let m = &plan.manifest;
    let docker = m.media_type.as_deref() == Some(spec::DOCKER_MANIFEST)
        || m.config.media_type == spec::DOCKER_CONFIG;
    if !docker {
        return store.read_blob(&plan.manifest_digest).map_err(Error::Store);
    }
    let layer_type = |mt: &str| match mt {
        spec::DOCKER_LAYER_GZIP => spec::OCI_LAYER_GZIP.to_string(),
        spec::DOCKER_LAYER => spec::OCI_LAYER.to_string(),
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
            spec::OCI_LAYER_NONDIST_GZIP.to_string()
        }
        other => other.to_string(),
    };
    let v = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": spec::OCI_MANIFEST,
        "config": {
            "mediaType": spec::OCI_CONFIG,
            "digest": m.config.digest,
            "size": m.config.size,
        },
        "layers": m.layers.iter().map(|l| serde_json::json!({
            "mediaType": layer_type(&l.media_type),
            "digest": l.digest,
            "size": l.size,
        })).collect::<Vec<_>>(),
    });
    serde_json::to_vec(&v).map_err(|e| Error::Write(io::Error::other(e)))
}

fn oci_archive<W: Write>(
    store: &Store,
    images: &[Selected],
    tar: &mut tar::Builder<W>,
) -> Result<(), Error> {
    append_bytes(tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    append_dir(tar, "blobs/")?;
    append_dir(tar, "blobs/sha256/")?;
    let mut written = BTreeSet::new();
    let mut index = Vec::new();
    for s in images {
        let plan = plan(store, s)?;
        let m = &plan.manifest;
        for l in &m.layers {
            if !store.blob_path(&l.digest).is_file() {
                return Err(Error::MissingLayer {
                    image: display_name(s),
                    digest: l.digest.clone(),
                });
            }
        }
        let blobs = std::iter::once(&m.config).chain(m.layers.iter());
        for d in blobs {
            if written.insert(d.digest.clone()) {
                let path = format!("blobs/sha256/{}", hex_of(&d.digest));
                append_verified(tar, &path, open_blob(store, &d.digest)?, d.size, &d.digest)?;
            }
        }
        let mbytes = oci_manifest(store, &plan)?;
        let mdigest = format!("sha256:{}", hex::encode(Sha256::digest(&mbytes)));
        if written.insert(mdigest.clone()) {
            append_bytes(tar, &format!("blobs/sha256/{}", hex_of(&mdigest)), &mbytes)?;
        }
        let mut desc = serde_json::json!({
            "mediaType": spec::OCI_MANIFEST,
            "digest": mdigest,
            "size": mbytes.len(),
        });
        if let Some(n) = &s.name {
            desc["annotations"] =
                serde_json::json!({ "org.opencontainers.image.ref.name": n.to_string() });
        }
        if !index.contains(&desc) {
            index.push(desc);
        }
    }
    let idx = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": spec::OCI_INDEX,
        "manifests": index,
    });
    let body = serde_json::to_vec(&idx).map_err(|e| Error::Write(io::Error::other(e)))?;
    append_bytes(tar, "index.json", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn familiar_names() {
        let f = |s: &str| {
            Reference::parse(s)
                .map(|r| familiar(&r))
                .unwrap_or_default()
        };
        assert_eq!(f("busybox"), "busybox:latest");
        assert_eq!(f("docker.io/user/app:v1"), "user/app:v1");
        assert_eq!(f("127.0.0.1:5000/t/x:y"), "127.0.0.1:5000/t/x:y");
        assert_eq!(f("localhost/multi"), "localhost/multi:latest");
    }

    #[test]
    fn formats_parse() {
        assert_eq!(
            "docker-archive".parse::<Format>().ok(),
            Some(Format::DockerArchive)
        );
        assert_eq!(
            "oci-archive".parse::<Format>().ok(),
            Some(Format::OciArchive)
        );
        let e = "tar".parse::<Format>().err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("unknown archive format \"tar\" (use docker-archive or oci-archive)")
        );
    }

    #[test]
    fn verified_reader_checks_size_and_digest() {
        let data = b"hello";
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
        let read = |d: &[u8], size: u64| {
            let mut r = Verified {
                inner: d,
                hasher: Sha256::new(),
                seen: 0,
                size,
                digest: &digest,
            };
            io::copy(&mut r, &mut io::sink())
        };
        assert_eq!(read(data, 5).ok(), Some(5));
        assert!(read(data, 4).is_err());
        assert!(read(data, 6).is_err());
        assert!(read(b"hellO", 5).is_err());
    }
}

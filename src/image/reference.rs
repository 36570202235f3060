//! Image references as Docker and Podman users write them, and the transports for local material.
//!
//! `busybox` → `docker.io/library/busybox:latest`; `host:port/repo:tag`; `repo@sha256:…`;
//! `oci:/path/to/layout[:tag]`; `docker-archive:/path/file.tar[:name:tag]`; `oci-archive:/path/file.tar[:ref]`
//! (archive paths end at the first ':', as in skopeo).

use std::fmt;
use std::path::PathBuf;

/// The registry Docker Hub names resolve to.
pub const DOCKER_HUB: &str = "docker.io";

/// A parse failure, with the offending input in the message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct ParseError {
    pub input: String,
    pub reason: &'static str,
}

/// This module's error (parsing is all it does).
pub type Error = ParseError;

/// A registry reference, normalized: `registry/repository[:tag][@digest]` with at least one of tag or digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A registry (the default transport, `docker://` accepted as a prefix).
    Registry(Reference),
    /// An OCI image-layout directory, optionally the manifest whose `org.opencontainers.image.ref.name` is `tag`.
    OciLayout { path: PathBuf, tag: Option<String> },
    /// An OCI image-layout in a tar archive.
    OciArchive { path: PathBuf, tag: Option<String> },
    /// A `docker save` / `podman save` tarball, optionally the image named `name`.
    DockerArchive { path: PathBuf, name: Option<String> },
}

impl Source {
    /// Parses a `run`/`pull` argument: a transport prefix, or a registry reference.
    pub fn parse(input: &str) -> Result<Source, ParseError> {
        let err = |reason| ParseError {
            input: input.to_string(),
            reason,
        };
        if let Some(rest) = input.strip_prefix("oci:") {
            let (path, tag) = split_path_suffix(rest);
            if path.is_empty() {
                return Err(err("oci: needs a layout directory"));
            }
            return Ok(Source::OciLayout {
                path: PathBuf::from(path),
                tag,
            });
        }
        if let Some(rest) = input.strip_prefix("oci-archive:") {
            // oci-archive:/path/file.tar[:ref] — as skopeo: the path ends at the first ':', so a
            // ref may be a full name (`localhost/app:v1`, what `rvmm save` writes).
            let (path, tag) = match rest.split_once(':') {
                Some((p, t)) => (p, Some(t.to_string()).filter(|t| !t.is_empty())),
                None => (rest, None),
            };
            if path.is_empty() {
                return Err(err("oci-archive: needs a tar file"));
            }
            return Ok(Source::OciArchive {
                path: PathBuf::from(path),
                tag,
            });
        }
        if let Some(rest) = input.strip_prefix("docker-archive:") {
            // docker-archive:/path/file.tar[:name:tag] — as skopeo: the path ends at the first ':'
            // (names may hold '/' and ':', `127.0.0.1:5000/app:v1`).
            let (path, name) = match rest.split_once(':') {
                Some((p, n)) => (p, Some(n.to_string())),
                None => (rest, None),
            };
            if path.is_empty() {
                return Err(err("docker-archive: needs a tar file"));
            }
            return Ok(Source::DockerArchive {
                path: PathBuf::from(path),
                name: name.filter(|n| !n.is_empty()),
            });
        }
        let plain = input.strip_prefix("docker://").unwrap_or(input);
        Reference::parse(plain)
            .map(Source::Registry)
            .map_err(|e| ParseError {
                input: input.to_string(),
                reason: e.reason,
            })
    }
}

/// `path[:tag]` where a tag never contains '/'.
fn split_path_suffix(rest: &str) -> (&str, Option<String>) {
    match rest.rfind(':') {
        Some(i) if !rest[i + 1..].contains('/') => {
            let tag = &rest[i + 1..];
            (&rest[..i], (!tag.is_empty()).then(|| tag.to_string()))
        }
        _ => (rest, None),
    }
}

impl Reference {
    /// Parses and normalizes a Docker-style reference.
    pub fn parse(input: &str) -> Result<Reference, ParseError> {
        let err = |reason| ParseError {
            input: input.to_string(),
            reason,
        };
        if input.is_empty() {
            return Err(err("empty"));
        }
        if input.len() > 512 {
            return Err(err("too long"));
        }
        let (name_tag, digest) = match input.split_once('@') {
            Some((n, d)) => {
                if !valid_digest(d) {
                    return Err(err(
                        "digest must be sha256: followed by 64 lowercase hex digits",
                    ));
                }
                (n, Some(d.to_string()))
            }
            None => (input, None),
        };
        let last_slash = name_tag.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => (
                &name_tag[..last_slash + i],
                Some(&name_tag[last_slash + i + 1..]),
            ),
            None => (name_tag, None),
        };
        if let Some(t) = tag {
            if !valid_tag(t) {
                return Err(err(
                    "tag must be 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'",
                ));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                if !valid_registry(first) {
                    return Err(err("registry must be host[:port]"));
                }
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if !valid_repository(&repository) {
            return Err(err(
                "repository must be lowercase components of [a-z0-9] joined by '.', '_', '__' or '-', separated by '/'",
            ));
        }
        // Docker's limit on the whole name (distribution's NameTotalLengthMax); it also keeps every
        // normalized reference short enough to parse again.
        if registry.len() + 1 + repository.len() > 255 {
            return Err(err(
                "name (registry/repository) is longer than 255 characters",
            ));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_string()),
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// `registry/repository` (what `rvmm images` shows as REPOSITORY).
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// Is this a registry we talk plain HTTP to by default (loopback)?
    pub fn is_loopback(&self) -> bool {
        let host = host_of(&self.registry);
        host == "localhost" || host == "::1" || host.starts_with("127.")
    }
}

/// `host[:port]` → host (bracketed IPv6 unwrapped).
pub fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.split(':').next().unwrap_or(registry)
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// `sha256:` and 64 lowercase hex digits.
pub fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn valid_registry(r: &str) -> bool {
    let (host, port) = match r.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || r.starts_with('[') => (h, Some(p)),
        _ => (r, None),
    };
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner.ends_with(']') && inner.len() > 1
    } else {
        !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'-')
            })
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|c| c.is_ascii_digit())
            && p.parse::<u32>().is_ok_and(|n| n > 0 && n < 65536)
    });
    host_ok && port_ok
}

fn valid_repository(r: &str) -> bool {
    !r.is_empty() && r.len() <= 255 && r.split('/').all(valid_component)
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__', or any number of '-'.
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(c: u8) -> bool {
    c.is_ascii_digit() || c.is_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> String {
        Reference::parse(s)
            .map(|r| r.to_string())
            .unwrap_or_else(|e| format!("ERR {}", e.reason))
    }

    #[test]
    fn docker_normalization() {
        assert_eq!(r("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(r("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(r("user/app"), "docker.io/user/app:latest");
        assert_eq!(
            r("index.docker.io/library/alpine"),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(r("localhost/app"), "localhost/app:latest");
        assert_eq!(r("127.0.0.1:5000/a/b:v1"), "127.0.0.1:5000/a/b:v1");
        assert_eq!(r("quay.io/x/y_z__w-v.u"), "quay.io/x/y_z__w-v.u:latest");
        let d = "sha256:".to_string() + &"a".repeat(64);
        assert_eq!(
            r(&format!("busybox@{d}")),
            format!("docker.io/library/busybox@{d}")
        );
        assert_eq!(
            r(&format!("busybox:1@{d}")),
            format!("docker.io/library/busybox:1@{d}")
        );
    }

    #[test]
    fn rejects_bad_references() {
        for bad in [
            "",
            "Busybox",
            "busybox:",
            "busybox:-x",
            "busybox@sha256:abc",
            "busybox@md5:0123",
            "a//b",
            "/abs",
            "x/",
            "a..b",
            "host:99999/x",
            "a b",
            "busybox:tag:again",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn names_over_255_characters_are_refused() {
        // What fuzzing found: a 507-byte reference whose normalized form did not parse again.
        let long = format!("{}.io/{}", "r".repeat(248), "a".repeat(255));
        assert!(Reference::parse(&long).is_err());
        let ok = format!("example.com/{}", "a".repeat(243));
        let r = Reference::parse(&ok).expect("a 255-character name parses");
        assert_eq!(Reference::parse(&r.to_string()).ok(), Some(r));
    }

    #[test]
    fn transports() {
        assert_eq!(
            Source::parse("oci:/tmp/layout:v2").ok(),
            Some(Source::OciLayout {
                path: "/tmp/layout".into(),
                tag: Some("v2".into())
            })
        );
        assert_eq!(
            Source::parse("oci:./a:b/layout").ok(),
            Some(Source::OciLayout {
                path: "./a:b/layout".into(),
                tag: None
            })
        );
        assert_eq!(
            Source::parse("docker-archive:/x/img.tar:busybox:latest").ok(),
            Some(Source::DockerArchive {
                path: "/x/img.tar".into(),
                name: Some("busybox:latest".into())
            })
        );
        assert_eq!(
            Source::parse("docker-archive:/x/img.tar:127.0.0.1:5000/a/b:v1").ok(),
            Some(Source::DockerArchive {
                path: "/x/img.tar".into(),
                name: Some("127.0.0.1:5000/a/b:v1".into())
            })
        );
        assert_eq!(
            Source::parse("oci-archive:/x/img.tar:localhost/app:v1").ok(),
            Some(Source::OciArchive {
                path: "/x/img.tar".into(),
                tag: Some("localhost/app:v1".into())
            })
        );
        assert_eq!(
            Source::parse("oci-archive:/x/img.tar").ok(),
            Some(Source::OciArchive {
                path: "/x/img.tar".into(),
                tag: None
            })
        );
        assert_eq!(
            Source::parse("docker-archive:/x/img.tar").ok(),
            Some(Source::DockerArchive {
                path: "/x/img.tar".into(),
                name: None
            })
        );
        assert!(matches!(
            Source::parse("docker://busybox"),
            Ok(Source::Registry(_))
        ));
        assert!(Source::parse("oci:").is_err());
    }
}

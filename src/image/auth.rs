//! Registry credentials kept in Docker's config file, and checking them against a registry the
//! way `docker login` does.
//!
//! The file is `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`. Credentials live under
//! `auths.<key>.auth` as base64 of `USER:PASSWORD`; the key is the registry's `host[:port]`, and
//! `https://index.docker.io/v1/` for Docker Hub (what docker writes). Other keys of the file are
//! kept as they are. Credential helpers (`credsStore`, `credHelpers`) are not used.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;

use super::reference::DOCKER_HUB;

/// The key docker uses for Docker Hub in `auths`.
pub const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no place for the docker config: neither DOCKER_CONFIG nor HOME is set")]
    NoConfigDir,
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not valid JSON", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: {what} is not a JSON object", path.display())]
    NotObject { path: PathBuf, what: &'static str },
    #[error("{}: the auth for {key} is not base64 of USER:PASSWORD", path.display())]
    BadAuth { path: PathBuf, key: String },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid registry {0:?} (expected HOST[:PORT])")]
    BadRegistry(String),
    #[error("{0}: unauthorized: incorrect username or password")]
    Unauthorized(String),
    #[error("{registry}: {url} answered {status}")]
    Status {
        registry: String,
        url: String,
        status: u16,
    },
    #[error("{registry}: unsupported authentication challenge {challenge:?}")]
    Challenge { registry: String, challenge: String },
    #[error("{registry}: the token service sent no token")]
    NoToken { registry: String },
    #[error("{registry}: cannot reach {url}")]
    Http {
        registry: String,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("starting the HTTP runtime")]
    Runtime(#[source] io::Error),
}

/// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
pub fn config_path() -> Result<PathBuf, Error> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".docker/config.json"))
        .ok_or(Error::NoConfigDir)
}

/// What a user types for a registry (`https://host:port/v2/`, `docker.io`, nothing) → `host[:port]`,
/// with every Docker Hub spelling mapped to `docker.io`.
pub fn normalize_registry(input: Option<&str>) -> Result<String, Error> {
    let Some(raw) = input.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(DOCKER_HUB.to_string());
    };
    let s = raw
        .strip_prefix("https://")
        .or_else(|| raw.strip_prefix("http://"))
        .unwrap_or(raw);
    let host = s.split('/').next().unwrap_or_default().to_ascii_lowercase();
    let ok = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b));
    if !ok {
        return Err(Error::BadRegistry(raw.to_string()));
    }
    Ok(match host.as_str() {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
        _ => host,
    })
}

/// The `auths` key `docker login` writes for `registry` (normalized).
pub fn config_key(registry: &str) -> String {
    if registry == DOCKER_HUB {
        DOCKER_HUB_KEY.to_string()
    } else {
        registry.to_string()
    }
}

/// Every `auths` key that may hold credentials for `registry`, the one docker writes first.
fn lookup_keys(registry: &str) -> Vec<String> {
    if registry == DOCKER_HUB {
        vec![
            DOCKER_HUB_KEY.into(),
            "index.docker.io".into(),
            "docker.io".into(),
            "https://index.docker.io".into(),
            "https://registry-1.docker.io".into(),
        ]
    } else {
        vec![
            registry.to_string(),
            format!("https://{registry}"),
            format!("http://{registry}"),
            format!("https://{registry}/v2/"),
            format!("http://{registry}/v2/"),
        ]
    }
}

/// The config file as JSON; `None` when there is none.
fn read_config(path: &Path) -> Result<Option<serde_json::Value>, Error> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Some(serde_json::json!({})));
    }
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|source| Error::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    if !v.is_object() {
        return Err(Error::NotObject {
            path: path.to_path_buf(),
            what: "the file",
        });
    }
    Ok(Some(v))
}

/// Writes `v` to `path` through a 0600 temp file beside it and a rename.
fn write_config(path: &Path, v: &serde_json::Value) -> Result<(), Error> {
    let werr = |source| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(werr)?;
    }
    // NamedTempFile creates the file with mode 0600.
    let mut tmp = tempfile::Builder::new()
        .prefix(".config.json.")
        .tempfile_in(dir)
        .map_err(werr)?;
    let mut body = serde_json::to_vec_pretty(v).map_err(|e| werr(io::Error::other(e)))?;
    body.push(b'\n');
    tmp.write_all(&body).map_err(werr)?;
    tmp.as_file().sync_all().map_err(werr)?;
    tmp.persist(path).map_err(|e| werr(e.error))?;
    Ok(())
}

/// The credentials stored for `registry` (normalized), if any.
pub fn lookup(registry: &str) -> Result<Option<(String, String)>, Error> {
    let path = match config_path() {
        Ok(p) => p,
        Err(Error::NoConfigDir) => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(cfg) = read_config(&path)? else {
        return Ok(None);
    };
    for key in lookup_keys(registry) {
        let Some(auth) = cfg["auths"][&key]["auth"].as_str() else {
            continue;
        };
        let bad = || Error::BadAuth {
            path: path.clone(),
            key: key.clone(),
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| bad())?;
        let s = String::from_utf8(raw).map_err(|_| bad())?;
        let (u, p) = s.split_once(':').ok_or_else(bad)?;
        return Ok(Some((u.to_string(), p.to_string())));
    }
    Ok(None)
}

/// Stores credentials for `registry` (normalized); returns the file written.
pub fn store(registry: &str, user: &str, password: &str) -> Result<PathBuf, Error> {
    let path = config_path()?;
    let mut cfg = read_config(&path)?.unwrap_or_else(|| serde_json::json!({}));
    let not_object = |what| Error::NotObject {
        path: path.clone(),
        what,
    };
    let root = cfg.as_object_mut().ok_or_else(|| not_object("the file"))?;
    let auths = root.entry("auths").or_insert_with(|| serde_json::json!({}));
    let auths = auths
        .as_object_mut()
        .ok_or_else(|| not_object("\"auths\""))?;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    auths.insert(config_key(registry), serde_json::json!({ "auth": auth }));
    write_config(&path, &cfg)?;
    Ok(path)
}

/// Removes every entry for `registry` (normalized). False when there was none.
pub fn remove(registry: &str) -> Result<bool, Error> {
    let path = config_path()?;
    let Some(mut cfg) = read_config(&path)? else {
        return Ok(false);
    };
    let Some(auths) = cfg.get_mut("auths").and_then(|a| a.as_object_mut()) else {
        return Ok(false);
    };
    let mut removed = false;
    for key in lookup_keys(registry) {
        removed |= auths.remove(&key).is_some();
    }
    if removed {
        write_config(&path, &cfg)?;
    }
    Ok(removed)
}

/// A `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// Parses `Basic realm="x"` or `Bearer realm="https://auth/token",service="registry"`.
pub fn parse_challenge(h: &str) -> Option<Challenge> {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let params = parse_params(rest);
    let get = |k: &str| {
        params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    if scheme.eq_ignore_ascii_case("basic") {
        Some(Challenge::Basic)
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Some(Challenge::Bearer {
            realm: get("realm").filter(|r| !r.is_empty())?,
            service: get("service"),
        })
    } else {
        None
    }
}

/// `k1="v, 1", k2=v2` → pairs (quotes removed, `\"` unescaped).
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() && chars.peek().is_none() {
            return out;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => {
                            if let Some(n) = chars.next() {
                                val.push(n);
                            }
                        }
                        _ => val.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    val.push(c);
                    chars.next();
                }
            }
        }
        out.push((key.trim().to_string(), val.trim().to_string()));
    }
}

/// The host to speak the distribution API to for `registry` (normalized).
fn api_host(registry: &str) -> &str {
    if registry == DOCKER_HUB {
        "registry-1.docker.io"
    } else {
        registry
    }
}

/// Checks `user`/`password` against `registry` (normalized) as `docker login` does: `GET /v2/`,
/// then answer its challenge (basic auth, or a token from its token service) and ask again.
/// `plain_http` speaks HTTP instead of HTTPS (loopback and `--insecure-registry`).
pub fn verify(registry: &str, user: &str, password: &str, plain_http: bool) -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    rt.block_on(verify_async(registry, user, password, plain_http))
}

async fn verify_async(
    registry: &str,
    user: &str,
    password: &str,
    plain_http: bool,
) -> Result<(), Error> {
    let scheme = if plain_http { "http" } else { "https" };
    let url = format!("{scheme}://{}/v2/", api_host(registry));
    let http = |url: &str| {
        let url = url.to_string();
        move |source| Error::Http {
            registry: registry.to_string(),
            url,
            source,
        }
    };
    let status = |url: &str, s: reqwest::StatusCode| Error::Status {
        registry: registry.to_string(),
        url: url.to_string(),
        status: s.as_u16(),
    };
    super::tls_provider();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(http(&url))?;
    let res = client.get(&url).send().await.map_err(http(&url))?;
    match res.status() {
        // A registry that asks for no credentials takes any (docker says "Login Succeeded" too).
        s if s.is_success() => return Ok(()),
        reqwest::StatusCode::UNAUTHORIZED => {}
        s => return Err(status(&url, s)),
    }
    let header = res
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let challenge = parse_challenge(&header).ok_or_else(|| Error::Challenge {
        registry: registry.to_string(),
        challenge: header.clone(),
    })?;
    let retry = match challenge {
        Challenge::Basic => client.get(&url).basic_auth(user, Some(password)),
        Challenge::Bearer { realm, service } => {
            let mut token_url = reqwest::Url::parse(&realm).map_err(|_| Error::Challenge {
                registry: registry.to_string(),
                challenge: header.clone(),
            })?;
            {
                let mut q = token_url.query_pairs_mut();
                if let Some(s) = &service {
                    q.append_pair("service", s);
                }
                q.append_pair("account", user);
                q.append_pair("client_id", "rvmm");
                q.append_pair("offline_token", "true");
            }
            let turl = token_url.to_string();
            let res = client
                .get(token_url)
                .basic_auth(user, Some(password))
                .send()
                .await
                .map_err(http(&turl))?;
            match res.status() {
                s if s.is_success() => {}
                reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN => {
                    return Err(Error::Unauthorized(registry.to_string()))
                }
                s => return Err(status(&turl, s)),
            }
            let body = res.bytes().await.map_err(http(&turl))?;
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let token = v["token"]
                .as_str()
                .or_else(|| v["access_token"].as_str())
                .filter(|t| !t.is_empty())
                .ok_or_else(|| Error::NoToken {
                    registry: registry.to_string(),
                })?;
            client.get(&url).bearer_auth(token)
        }
    };
    let res = retry.send().await.map_err(http(&url))?;
    match res.status() {
        s if s.is_success() => Ok(()),
        reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN => {
            Err(Error::Unauthorized(registry.to_string()))
        }
        s => Err(status(&url, s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_normalize() {
        let n = |s: &str| normalize_registry(Some(s));
        assert_eq!(normalize_registry(None).ok().as_deref(), Some("docker.io"));
        assert_eq!(n("").ok().as_deref(), Some("docker.io"));
        assert_eq!(n("index.docker.io").ok().as_deref(), Some("docker.io"));
        assert_eq!(
            n("https://index.docker.io/v1/").ok().as_deref(),
            Some("docker.io")
        );
        assert_eq!(
            n("http://127.0.0.1:5000/v2/").ok().as_deref(),
            Some("127.0.0.1:5000")
        );
        assert_eq!(n("Quay.IO").ok().as_deref(), Some("quay.io"));
        assert!(n("bad host").is_err());
        assert!(n("a\"b").is_err());
        assert_eq!(config_key("docker.io"), DOCKER_HUB_KEY);
        assert_eq!(config_key("127.0.0.1:5000"), "127.0.0.1:5000");
    }

    #[test]
    fn challenges_parse() {
        assert_eq!(
            parse_challenge(r#"Basic realm="rvmm-test""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="a,b""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
            })
        );
        assert_eq!(
            parse_challenge("bearer realm=https://x/t"),
            Some(Challenge::Bearer {
                realm: "https://x/t".into(),
                service: None
            })
        );
        assert_eq!(parse_challenge("Bearer service=\"x\""), None);
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge(""), None);
        assert_eq!(
            parse_params(r#"a="x\"y", b=2,,c"#),
            vec![
                ("a".into(), "x\"y".into()),
                ("b".into(), "2".into()),
                ("c".into(), String::new())
            ]
        );
    }
}

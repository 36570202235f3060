//! Pulling over the OCI distribution API, with oci-client doing HTTP, token auth and redirects.

use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;

use super::reference::Reference;
use super::spec::{Descriptor, MANIFEST_TYPES};
use super::store::{self, sha256_hex, BlobWriter, FetchError, Fetcher};
use super::PullOptions;

/// Registry failures, each one line a user can act on (oci-client's error chains are flattened
/// into `message`: they repeat themselves and may span lines).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reference {0} has neither tag nor digest")]
    NoTagOrDigest(String),
    #[error("--creds must be USER:PASSWORD")]
    BadCreds,
    #[error(transparent)]
    Auth(#[from] super::auth::Error),
    #[error("starting the HTTP runtime")]
    Runtime(#[source] std::io::Error),
    #[error("{registry}: authentication failed (use `rvmm login` or --creds USER:PASS)")]
    Unauthorized { registry: String },
    #[error("{reference}: no such image in the registry")]
    NotFound { reference: String },
    #[error("{registry}: {message}")]
    Registry { registry: String, message: String },
    #[error("manifest digest mismatch: asked for {asked}, the registry sent {got}")]
    ManifestDigest { asked: String, got: String },
    #[error("{registry}: download of {blob} broke off: {message}")]
    BrokeOff {
        registry: String,
        blob: String,
        message: String,
    },
    /// Storing a downloaded blob failed (the store's message names the blob).
    #[error(transparent)]
    Store(#[from] store::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

pub struct RegistryFetcher {
    client: oci_client::Client,
    reference: Reference,
    oci_ref: oci_client::Reference,
    auth: RegistryAuth,
    rt: tokio::runtime::Runtime,
}

impl RegistryFetcher {
    pub fn new(reference: &Reference, opts: &PullOptions) -> Result<RegistryFetcher> {
        let insecure = reference.is_loopback()
            || opts
                .insecure_registries
                .iter()
                .any(|r| r == &reference.registry);
        let protocol = if insecure {
            ClientProtocol::HttpsExcept(vec![reference.registry.clone()])
        } else {
            ClientProtocol::Https
        };
        super::tls_provider();
        let config = ClientConfig {
            protocol,
            connect_timeout: Some(Duration::from_secs(15)),
            read_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        let oci_ref = match (&reference.tag, &reference.digest) {
            (_, Some(d)) => oci_client::Reference::with_digest(
                reference.registry.clone(),
                reference.repository.clone(),
                d.clone(),
            ),
            (Some(t), None) => oci_client::Reference::with_tag(
                reference.registry.clone(),
                reference.repository.clone(),
                t.clone(),
            ),
            (None, None) => return Err(Error::NoTagOrDigest(reference.to_string())),
        };
        let auth = credentials(reference, opts)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        Ok(RegistryFetcher {
            client: oci_client::Client::new(config),
            reference: reference.clone(),
            oci_ref,
            auth,
            rt,
        })
    }

    fn pull_manifest(&self, r: &oci_client::Reference) -> Result<Vec<u8>> {
        let (bytes, _digest) = self
            .rt
            .block_on(self.client.pull_manifest_raw(r, &self.auth, MANIFEST_TYPES))
            .map_err(|e| explain(e, &self.reference))?;
        Ok(bytes.to_vec())
    }
}

/// Turns oci-client's errors into one line a user can act on.
fn explain(e: oci_client::errors::OciDistributionError, r: &Reference) -> Error {
    use oci_client::errors::OciDistributionError as E;
    let msg = e.to_string();
    let unauthorized = || Error::Unauthorized {
        registry: r.registry.clone(),
    };
    let not_found = || Error::NotFound {
        reference: r.to_string(),
    };
    match &e {
        E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => unauthorized(),
        E::ImageManifestNotFoundError(_) => not_found(),
        _ if msg.contains("MANIFEST_UNKNOWN")
            || msg.contains("NAME_UNKNOWN")
            || msg.contains("manifest unknown")
            || msg.contains("name unknown")
            || msg.contains("404") =>
        {
            not_found()
        }
        _ if msg.contains("UNAUTHORIZED") || msg.contains("401") => unauthorized(),
        _ => Error::Registry {
            registry: r.registry.clone(),
            message: one_line(&e),
        },
    }
}

fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = x.source();
    }
    s.replace('\n', " ")
}

impl Fetcher for RegistryFetcher {
    fn describe(&self) -> String {
        self.reference.to_string()
    }

    fn root(&mut self) -> std::result::Result<(Vec<u8>, Option<String>), FetchError> {
        let bytes = self.pull_manifest(&self.oci_ref)?;
        if let Some(d) = &self.reference.digest {
            let got = format!("sha256:{}", sha256_hex(&bytes));
            if &got != d {
                return Err(Error::ManifestDigest {
                    asked: d.clone(),
                    got,
                }
                .into());
            }
        }
        Ok((bytes, None))
    }

    fn manifest(&mut self, d: &Descriptor) -> std::result::Result<Vec<u8>, FetchError> {
        let r = self.oci_ref.clone_with_digest(d.digest.clone());
        Ok(self.pull_manifest(&r)?)
    }

    fn blob(&mut self, d: &Descriptor, w: &mut BlobWriter) -> std::result::Result<(), FetchError> {
        let reference = &self.reference;
        self.rt.block_on(async {
            let mut stream = self
                .client
                .pull_blob_stream(&self.oci_ref, d.digest.as_str())
                .await
                .map_err(|e| explain(e, reference))?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| Error::BrokeOff {
                    registry: reference.registry.clone(),
                    blob: super::store::short(&d.digest).to_string(),
                    message: one_line(&e),
                })?;
                w.write_chunk(&chunk)?;
            }
            Ok::<(), Error>(())
        })?;
        Ok(())
    }
}

/// `--creds USER:PASS`, else Docker's config file (`$DOCKER_CONFIG/config.json`, default
/// `~/.docker/config.json`, as `rvmm login` writes it), else anonymous.
fn credentials(r: &Reference, opts: &PullOptions) -> Result<RegistryAuth> {
    if let Some(c) = &opts.creds {
        let Some((u, p)) = c.split_once(':') else {
            return Err(Error::BadCreds);
        };
        return Ok(RegistryAuth::Basic(u.to_string(), p.to_string()));
    }
    Ok(match super::auth::lookup(&r.registry)? {
        Some((u, p)) => RegistryAuth::Basic(u, p),
        None => RegistryAuth::Anonymous,
    })
}

//! The agent's own identity: attesting to the daemon with a join token, keeping the SVID
//! and key in data_dir (0600) so a restart needs no token, and renewing at half-life.

use std::fmt;
use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::transport::Channel;
use zeroize::Zeroizing;

use mayfly_common::svid::{bundle_pem, generate_csr, parse_pem_certs};
use mayfly_common::tls::{TrustBundle, client_config, connect, peer_identity, server_id};
use mayfly_common::{SpiffeId, TrustDomain, fsutil};
use mayfly_proto::v1::node_client::NodeClient;
use mayfly_proto::v1::{self};

/// The agent's SVID and key.
#[derive(Clone)]
pub struct NodeIdentity {
    pub spiffe_id: SpiffeId,
    /// DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("stored identity in {dir} is unusable ({reason}); remove it and attest again")]
    Corrupt { dir: PathBuf, reason: String },
    #[error(
        "no join token: pass --join-token, set join_token or join_token_file in agent.toml, or MAYFLY_JOIN_TOKEN"
    )]
    NoJoinToken,
    #[error(
        "no trust bundle for the first connection: set trust_bundle_path to the PEM from `mayflyd bundle show`"
    )]
    NoBootstrapBundle,
    #[error("the daemon refused: {0}")]
    Refused(String),
    #[error("cannot reach the daemon at {address}: {message}")]
    Unreachable { address: String, message: String },
    #[error("TLS: {0}")]
    Tls(#[from] mayfly_common::tls::TlsError),
    #[error("key or CSR: {0}")]
    Crypto(#[from] mayfly_common::svid::CaError),
}

/// The agent's identity and the bundle it last received, as kept on disk.
pub type StoredIdentity = (NodeIdentity, Vec<Vec<u8>>);

/// The files an agent keeps in its data_dir.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    dir: PathBuf,
}

impl IdentityFiles {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn svid_path(&self) -> PathBuf {
        self.dir.join("agent-svid.pem")
    }

    /// Refuses a data_dir, or an agent key in it, that another user owns or may write:
    /// whoever can plant the key there is the agent. Nothing to check before it exists.
    pub fn check(&self) -> Result<(), String> {
        if !self.dir.exists() {
            return Ok(());
        }
        let me = crate::sys::euid();
        fsutil::check_private_dir(&self.dir, me)
            .and_then(|()| fsutil::check_private_file(&self.key_path(), me))
            .map_err(|why| format!("data_dir: {why}"))
    }

    fn key_path(&self) -> PathBuf {
        self.dir.join("agent-svid.key")
    }

    fn bundle_path(&self) -> PathBuf {
        self.dir.join("bundle.pem")
    }

    /// The stored identity and bundle, or `None` when the agent has never attested.
    pub fn load(&self) -> Result<Option<StoredIdentity>, NodeError> {
        let key = match std::fs::read(self.key_path()) {
            Ok(key) => Zeroizing::new(key),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(NodeError::Io {
                    path: self.key_path(),
                    source,
                });
            }
        };
        let corrupt = |reason: String| NodeError::Corrupt {
            dir: self.dir.clone(),
            reason,
        };
        let chain = parse_pem_certs(&self.read_text(&self.svid_path())?)
            .map_err(|e| corrupt(format!("SVID: {e}")))?;
        let bundle = parse_pem_certs(&self.read_text(&self.bundle_path())?)
            .map_err(|e| corrupt(format!("bundle: {e}")))?;
        let identity = identity_from(chain, key).map_err(|e| corrupt(e.to_string()))?;
        Ok(Some((identity, bundle)))
    }

    pub fn save(&self, identity: &NodeIdentity, bundle: &[Vec<u8>]) -> Result<(), NodeError> {
        fsutil::ensure_private_dir(&self.dir, 0o700).map_err(|source| NodeError::Io {
            path: self.dir.clone(),
            source,
        })?;
        // Key first: a crash between the two leaves a key without a matching SVID, which
        // `load` reports, rather than an SVID whose key is lost.
        self.write(&self.key_path(), &identity.key_pkcs8)?;
        self.write(&self.svid_path(), bundle_pem(&identity.chain).as_bytes())?;
        self.save_bundle(bundle)
    }

    pub fn save_bundle(&self, bundle: &[Vec<u8>]) -> Result<(), NodeError> {
        self.write(&self.bundle_path(), bundle_pem(bundle).as_bytes())
    }

    /// Forgets the identity (after eviction); the bundle stays for the next attestation.
    pub fn clear(&self) -> Result<(), NodeError> {
        for path in [self.key_path(), self.svid_path()] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(NodeError::Io { path, source }),
            }
        }
        Ok(())
    }

    /// The bundle kept from the last attestation, if any.
    pub fn stored_bundle(&self) -> Option<Vec<Vec<u8>>> {
        std::fs::read_to_string(self.bundle_path())
            .ok()
            .and_then(|pem| parse_pem_certs(&pem).ok())
    }

    fn write(&self, path: &Path, contents: &[u8]) -> Result<(), NodeError> {
        fsutil::write_atomic(path, contents, 0o600).map_err(|source| NodeError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    fn read_text(&self, path: &Path) -> Result<String, NodeError> {
        std::fs::read_to_string(path).map_err(|source| NodeError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

fn identity_from(
    chain: Vec<Vec<u8>>,
    key_pkcs8: Zeroizing<Vec<u8>>,
) -> Result<NodeIdentity, NodeError> {
    let leaf = chain
        .first()
        .ok_or_else(|| NodeError::Refused("the daemon returned an empty SVID chain".into()))?;
    let peer = peer_identity(leaf)?;
    let not_before = x509_parser::parse_x509_certificate(leaf)
        .map(|(_, c)| c.validity().not_before.timestamp())
        .unwrap_or(peer.not_after);
    Ok(NodeIdentity {
        spiffe_id: peer.spiffe_id,
        serial: peer.serial,
        not_before,
        not_after: peer.not_after,
        chain,
        key_pkcs8,
    })
}

/// Trades a join token for the agent's SVID, over TLS that checks the daemon's SPIFFE ID.
pub async fn attest(
    address: &str,
    trust_domain: &TrustDomain,
    bootstrap: &[Vec<u8>],
    join_token: &str,
) -> Result<(NodeIdentity, v1::Bundle), NodeError> {
    let bundle = TrustBundle::new(bootstrap)?;
    let config = client_config(server_id(trust_domain).map_err(tls_id)?, bundle, None)?;
    let channel = connect(address, config)
        .await
        .map_err(|e| unreachable(address, e))?;
    let (key, csr) = generate_csr(None)?;
    let response = NodeClient::new(channel)
        .attest(v1::AttestRequest {
            join_token: join_token.to_string(),
            csr,
        })
        .await
        .map_err(|s| NodeError::Refused(s.message().to_string()))?
        .into_inner();
    let bundle = response
        .bundle
        .ok_or_else(|| NodeError::Refused("the daemon sent no bundle".into()))?;
    Ok((identity_from(response.svid_chain, key)?, bundle))
}

/// Asks for a fresh SVID for a new key over the current authenticated channel.
pub async fn renew(
    client: &mut NodeClient<Channel>,
    current: &NodeIdentity,
) -> Result<(NodeIdentity, v1::Bundle), NodeError> {
    let (key, csr) = generate_csr(None)?;
    let response = client
        .renew_agent(v1::RenewAgentRequest { csr })
        .await
        .map_err(|s| NodeError::Refused(s.message().to_string()))?
        .into_inner();
    let bundle = response
        .bundle
        .ok_or_else(|| NodeError::Refused("the daemon sent no bundle".into()))?;
    let renewed = identity_from(response.svid_chain, key)?;
    if renewed.spiffe_id != current.spiffe_id {
        return Err(NodeError::Refused(format!(
            "renewal returned {} for agent {}",
            renewed.spiffe_id, current.spiffe_id
        )));
    }
    Ok((renewed, bundle))
}

/// An authenticated channel to the daemon with `identity` as the client certificate.
pub async fn authenticated_client(
    address: &str,
    trust_domain: &TrustDomain,
    bundle: TrustBundle,
    identity: &NodeIdentity,
) -> Result<NodeClient<Channel>, NodeError> {
    let chain = identity
        .chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_pkcs8.to_vec()));
    let config = client_config(
        server_id(trust_domain).map_err(tls_id)?,
        bundle,
        Some((chain, key)),
    )?;
    let channel = connect(address, config)
        .await
        .map_err(|e| unreachable(address, e))?;
    Ok(NodeClient::new(channel)
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(16 * 1024 * 1024))
}

fn tls_id(e: mayfly_common::SpiffeIdError) -> NodeError {
    NodeError::Tls(mayfly_common::tls::TlsError::BadSpiffeId(e))
}

fn unreachable(address: &str, e: tonic::transport::Error) -> NodeError {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    NodeError::Unreachable {
        address: address.to_string(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, SystemTime};

    use mayfly_common::svid::{SvidRequest, X509Authority, generate_ca};

    #[test]
    fn identity_round_trips_through_private_files() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let ca = generate_ca("example.org", Duration::from_secs(3600), SystemTime::now()).unwrap();
        let authority = X509Authority::new(&ca.cert_der, &ca.key_pkcs8).unwrap();
        let (key, csr) = generate_csr(None).unwrap();
        let issued = authority
            .sign_svid(
                &csr,
                &SvidRequest::new("spiffe://example.org/node/a", Duration::from_secs(600)),
                SystemTime::now(),
            )
            .unwrap();
        let identity = identity_from(vec![issued.cert_der], key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files = IdentityFiles::new(&dir.path().join("agent"));
        assert!(files.load().unwrap().is_none());
        files
            .save(&identity, std::slice::from_ref(&ca.cert_der))
            .unwrap();
        let (loaded, bundle) = files.load().unwrap().unwrap();
        assert_eq!(loaded.serial, identity.serial);
        assert_eq!(*loaded.key_pkcs8, *identity.key_pkcs8);
        assert_eq!(bundle, vec![ca.cert_der]);
        for entry in std::fs::read_dir(dir.path().join("agent")).unwrap() {
            let mode = entry.unwrap().metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert!(!format!("{loaded:?}").contains(&hex::encode(&loaded.key_pkcs8[..16])));
        files.clear().unwrap();
        assert!(files.load().unwrap().is_none());
    }
}

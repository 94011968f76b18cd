//! The node API's TLS: the daemon's own serving SVID (re-issued at half-life and on every
//! CA change), the SPIFFE client verifier, and the accept loop that hands finished
//! handshakes to tonic.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use mayfly_common::TrustDomain;
use mayfly_common::gather::Gather;
use mayfly_common::tls::{SpiffeClientVerifier, TrustBundle, server_id};

use mayfly_common::clock::unix;

use crate::ca::manager::Authorities;
use crate::ca::{SvidRequest, generate_csr};
use crate::identity::Registry;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const SERVER_SVID_TTL: Duration = Duration::from_secs(3600);

/// Hands rustls the current serving certificate; swapped whole on renewal.
#[derive(Debug)]
pub struct ServingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
        )
    }
}

impl ServingCert {
    fn replace(&self, key: Arc<CertifiedKey>) {
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = key;
    }
}

/// Issues the daemon's own SVID, `spiffe://TD/mayfly/server`, from the active CA.
fn issue_serving_cert(
    trust_domain: &TrustDomain,
    names: &ServingNames,
    authorities: &Authorities,
    now: std::time::SystemTime,
) -> anyhow::Result<(Arc<CertifiedKey>, i64)> {
    let id = server_id(trust_domain)?;
    let (key, csr) = generate_csr(Some(id.as_str()))?;
    let issued = authorities.x509.sign_svid(
        &csr,
        &SvidRequest {
            spiffe_id: id.as_str(),
            dns_names: &names.dns,
            ip_addresses: &names.ips,
            ttl: SERVER_SVID_TTL,
        },
        now,
    )?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec()));
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key_der)?;
    let chain = vec![CertificateDer::from(issued.cert_der)];
    Ok((
        Arc::new(CertifiedKey::new(chain, signing)),
        mayfly_common::svid::renewal_due(issued.not_before, issued.not_after, 0.5),
    ))
}

/// The DNS names and IP addresses the daemon's certificate names: those agents dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingNames {
    pub dns: Vec<String>,
    pub ips: Vec<std::net::IpAddr>,
}

impl ServingNames {
    /// `configured` (the `server_names` setting) when given; otherwise what agents on
    /// this host and, listening on every address, on others can reach it by.
    pub fn new(configured: &[String], listen: std::net::SocketAddr) -> Self {
        let mut names = Self {
            dns: Vec::new(),
            ips: Vec::new(),
        };
        if configured.is_empty() {
            names.add("localhost");
            names.add("127.0.0.1");
            names.add("::1");
            if let Some(host) = crate::sys::hostname() {
                names.add(&host);
            }
            if listen.ip().is_unspecified() {
                match crate::sys::interface_addresses() {
                    Ok(all) => names.ips.extend(all),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot list this host's addresses for the daemon's certificate; set server_names")
                    }
                }
            } else {
                names.ips.push(listen.ip());
            }
        } else {
            for name in configured {
                names.add(name);
            }
        }
        names.dns.sort();
        names.dns.dedup();
        names.ips.sort();
        names.ips.dedup();
        names
    }

    fn add(&mut self, name: &str) {
        match name.parse::<std::net::IpAddr>() {
            Ok(ip) => self.ips.push(ip),
            Err(_) if rustls_pki_types::DnsName::try_from(name).is_ok() => {
                self.dns.push(name.to_ascii_lowercase());
            }
            Err(_) => tracing::warn!(name, "not a DNS name; left out of the daemon's certificate"),
        }
    }
}

/// Builds the node API's rustls config and keeps its serving cert and trust bundle
/// current as the CA changes. The certificate names `names`.
pub fn server_config(
    registry: Arc<Registry>,
    names: ServingNames,
) -> anyhow::Result<rustls::ServerConfig> {
    let trust_domain = registry.trust_domain().clone();
    let authorities = registry.ca().current();
    let bundle = TrustBundle::new(&authorities.bundle.x509_authorities)?;
    tracing::info!(dns = ?names.dns, ips = ?names.ips, "the node API's certificate names these addresses");
    let (key, mut renew_at) =
        issue_serving_cert(&trust_domain, &names, &authorities, registry.now())?;
    let serving = Arc::new(ServingCert {
        current: RwLock::new(key),
    });
    let verifier = Arc::new(SpiffeClientVerifier::new(
        trust_domain.clone(),
        bundle.clone(),
    ));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(serving.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];

    let mut changes = registry.ca().subscribe();
    tokio::spawn(async move {
        loop {
            let wait = Duration::from_secs((renew_at - unix(registry.now())).max(1) as u64);
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
            let authorities = registry.ca().current();
            if let Err(e) = bundle.replace(&authorities.bundle.x509_authorities) {
                tracing::error!(error = %e, "could not load the new trust bundle");
            }
            match issue_serving_cert(&trust_domain, &names, &authorities, registry.now()) {
                Ok((key, next)) => {
                    serving.replace(key);
                    renew_at = next;
                    tracing::debug!("renewed the daemon's serving SVID");
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not renew the daemon's serving SVID");
                    renew_at = unix(registry.now()) + 30;
                }
            }
        }
    });
    Ok(config)
}

/// Accepts TCP connections and completes TLS handshakes off the accept path; failed
/// handshakes (unknown CA, foreign trust domain, no TLS) are logged and dropped.
pub fn incoming(
    listener: TcpListener,
    config: rustls::ServerConfig,
) -> mpsc::Receiver<Result<Gather<TlsStream<tokio::net::TcpStream>>, std::io::Error>> {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        loop {
            let (tcp, peer): (tokio::net::TcpStream, SocketAddr) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let handshakes = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = handshakes.send(Ok(Gather::new(stream))).await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, error = %e, "TLS handshake refused");
                    }
                    Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
                }
            });
            if tx.is_closed() {
                break;
            }
        }
    });
    rx
}

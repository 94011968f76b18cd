//! mTLS between daemon and agents, keyed on SPIFFE IDs rather than host names.
//! Both verifiers check the chain against the trust domain's current bundle (which
//! changes as the CA rotates) and then the peer's SPIFFE ID.

use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::{SpiffeId, TrustDomain};

/// What a peer certificate says about who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub spiffe_id: SpiffeId,
    /// Lowercase hex, no leading zeros stripped beyond DER's own encoding.
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("certificate is not valid DER X.509: {0}")]
    BadCertificate(String),
    #[error("certificate carries no SPIFFE ID (it needs exactly one spiffe:// URI SAN)")]
    NoSpiffeId,
    #[error("certificate carries more than one URI SAN; an X509-SVID has exactly one")]
    SeveralUris,
    #[error("certificate's SPIFFE ID is invalid: {0}")]
    BadSpiffeId(#[from] crate::SpiffeIdError),
    #[error("the trust bundle holds no usable CA certificate")]
    EmptyBundle,
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Reads the SPIFFE ID, serial and expiry of a DER certificate.
pub fn peer_identity(der: &[u8]) -> Result<PeerIdentity, TlsError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                uris.push(*uri);
            }
        }
    }
    let uri = match uris.as_slice() {
        [] => return Err(TlsError::NoSpiffeId),
        [one] => *one,
        _ => return Err(TlsError::SeveralUris),
    };
    Ok(PeerIdentity {
        spiffe_id: SpiffeId::parse(uri)?,
        serial: hex_serial(cert.raw_serial()),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Serial numbers are shown and stored as lowercase hex of their DER bytes.
pub fn hex_serial(raw: &[u8]) -> String {
    let trimmed = match raw {
        [0, rest @ ..] if !rest.is_empty() => rest,
        other => other,
    };
    trimmed.iter().map(|b| format!("{b:02x}")).collect()
}

/// The CA certificates a peer's chain must end in; swapped whole when the bundle changes.
#[derive(Clone)]
pub struct TrustBundle {
    roots: Arc<RwLock<Arc<RootCertStore>>>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("authorities", &self.current().len())
            .finish()
    }
}

impl TrustBundle {
    pub fn new(authorities: &[Vec<u8>]) -> Result<Self, TlsError> {
        let store = root_store(authorities)?;
        Ok(Self {
            roots: Arc::new(RwLock::new(Arc::new(store))),
        })
    }

    pub fn replace(&self, authorities: &[Vec<u8>]) -> Result<(), TlsError> {
        let store = root_store(authorities)?;
        let mut guard = self
            .roots
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *guard = Arc::new(store);
        Ok(())
    }

    pub fn current(&self) -> Arc<RootCertStore> {
        self.roots
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

fn root_store(authorities: &[Vec<u8>]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store
        .add_parsable_certificates(authorities.iter().map(|d| CertificateDer::from(d.clone())));
    if added == 0 {
        return Err(TlsError::EmptyBundle);
    }
    Ok(store)
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// Server side: accepts anonymous clients (only `Attest` serves them) and otherwise
/// requires a chain to the bundle and a SPIFFE ID in this trust domain.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    trust_domain: TrustDomain,
    bundle: TrustBundle,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    pub fn new(trust_domain: TrustDomain, bundle: TrustBundle) -> Self {
        Self {
            trust_domain,
            bundle,
            algorithms: provider().signature_verification_algorithms,
        }
    }

    fn inner(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        WebPkiClientVerifier::builder_with_provider(self.bundle.current(), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner()?
            .verify_client_cert(end_entity, intermediates, now)?;
        let identity = peer_identity(end_entity)
            .map_err(|e| rustls::Error::General(format!("client certificate: {e}")))?;
        if !identity.spiffe_id.is_member_of(&self.trust_domain) {
            return Err(rustls::Error::General(format!(
                "client certificate belongs to trust domain {}, not {}",
                identity.spiffe_id.trust_domain(),
                self.trust_domain
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Client side: the server must chain to the bundle and present exactly the expected
/// SPIFFE ID; host names play no part.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    expected: SpiffeId,
    bundle: TrustBundle,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(expected: SpiffeId, bundle: TrustBundle) -> Self {
        Self {
            expected,
            bundle,
            algorithms: provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.bundle.current(),
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let identity = peer_identity(end_entity)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        if identity.spiffe_id != self.expected {
            return Err(rustls::Error::General(format!(
                "server presented {}, expected {}",
                identity.spiffe_id, self.expected
            )));
        }
        // The right SPIFFE ID is not enough: the certificate must also be for the address
        // dialed, so that a certificate for the daemon's ID obtained elsewhere (or a daemon
        // of another deployment sharing the CA) is not taken for this one.
        rustls::client::verify_server_name(&parsed, server_name).map_err(|e| {
            rustls::Error::General(format!(
                "the daemon's certificate ({}) does not name the address dialed, {}: {e}; \
                 list that address in the daemon's server_names",
                identity.spiffe_id,
                server_name.to_str()
            ))
        })?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The SPIFFE ID the daemon serves the node API under.
pub fn server_id(trust_domain: &TrustDomain) -> Result<SpiffeId, crate::SpiffeIdError> {
    SpiffeId::from_parts(trust_domain, "/mayfly/server")
}

/// A client config for talking to the daemon, with or without an agent SVID.
pub fn client_config(
    expected_server: SpiffeId,
    bundle: TrustBundle,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            expected_server,
            bundle,
        )));
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Opens a gRPC channel to `addr` over TLS with `config`, connecting now. `addr` is
/// "host:port", or several separated by commas: see [`connect_lazy`].
pub async fn connect(
    addr: &str,
    config: rustls::ClientConfig,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let targets = Targets::parse(addr);
    endpoint(targets.first())?
        .connect_with_connector(tls_connector(targets, config))
        .await
}

/// Like `connect`, but connects on first use and reconnects by itself after a failure, so
/// a caller can hold it while a daemon is down. With several daemons ("a:8081,b:8081", or
/// a name that resolves to several addresses) each new connection tries them in turn,
/// the one that worked last first, giving each [`CONNECT_EACH`]: a daemon that dies is
/// replaced by another on the next reconnect.
pub fn connect_lazy(
    addr: &str,
    config: rustls::ClientConfig,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let targets = Targets::parse(addr);
    Ok(endpoint(targets.first())?.connect_with_connector_lazy(tls_connector(targets, config)))
}

/// How long one address may take to accept a TCP connection before the next is tried.
pub const CONNECT_EACH: std::time::Duration = std::time::Duration::from_secs(1);

/// The daemons a client may reach, and which one answered last.
#[derive(Clone)]
struct Targets {
    list: Arc<[String]>,
    last_good: Arc<std::sync::atomic::AtomicUsize>,
}

impl Targets {
    fn parse(addr: &str) -> Self {
        let mut list: Vec<String> = addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect();
        if list.is_empty() {
            list.push(addr.to_string());
        }
        Self {
            list: list.into(),
            last_good: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        }
    }

    fn first(&self) -> &str {
        &self.list[0]
    }

    /// A TCP connection to the first daemon that accepts one, the last good one first,
    /// and the host part of the address it was reached at (the name its certificate must
    /// carry).
    async fn connect(&self) -> std::io::Result<(tokio::net::TcpStream, ServerName<'static>)> {
        use std::sync::atomic::Ordering;
        let start = self.last_good.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for i in 0..self.list.len() {
            let index = (start + i) % self.list.len();
            let target = &self.list[index];
            match connect_one(target).await {
                Ok(tcp) => {
                    self.last_good.store(index, Ordering::Relaxed);
                    return Ok((tcp, server_name(target)?));
                }
                Err(e) => failures.push(format!("{target}: {e}")),
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("no daemon reachable ({})", failures.join("; ")),
        ))
    }
}

/// The name a daemon's certificate must carry when dialed at `target` ("host:port",
/// "[v6]:port", or a bare host).
fn server_name(target: &str) -> std::io::Result<ServerName<'static>> {
    let host = match target.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => match target.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
            _ => target,
        },
    };
    ServerName::try_from(host.to_string()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{host:?} (from the daemon address {target:?}) is not a host name or IP address: {e}"),
        )
    })
}

/// Every address `target` resolves to, each given [`CONNECT_EACH`].
async fn connect_one(target: &str) -> std::io::Result<tokio::net::TcpStream> {
    let mut last = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{target} resolves to no address"),
    );
    for address in tokio::net::lookup_host(target).await? {
        match tokio::time::timeout(CONNECT_EACH, tokio::net::TcpStream::connect(address)).await {
            Ok(Ok(tcp)) => return Ok(tcp),
            Ok(Err(e)) => last = e,
            Err(_) => {
                last = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{address} did not accept within {CONNECT_EACH:?}"),
                )
            }
        }
    }
    Err(last)
}

fn endpoint(addr: &str) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect_timeout(std::time::Duration::from_secs(5))
            .http2_keep_alive_interval(std::time::Duration::from_secs(15))
            .keep_alive_timeout(std::time::Duration::from_secs(10))
            .keep_alive_while_idle(true),
    )
}

type TlsIo = hyper_util::rt::TokioIo<TlsStream>;

fn tls_connector(
    targets: Targets,
    config: rustls::ClientConfig,
) -> impl tower::Service<
    http::Uri,
    Response = TlsIo,
    Error = std::io::Error,
    Future = impl std::future::Future<Output = Result<TlsIo, std::io::Error>> + Send,
> + Clone
+ Send
+ 'static {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    tower::service_fn(move |_: http::Uri| {
        let connector = connector.clone();
        let targets = targets.clone();
        async move {
            Ok(hyper_util::rt::TokioIo::new(
                open(&targets, &connector).await?,
            ))
        }
    })
}

/// One mTLS connection to the first of `addr`'s daemons that answers, as [`connect`] makes
/// them, for a client that speaks HTTP/2 on it itself.
pub async fn connect_stream(
    addr: &str,
    config: rustls::ClientConfig,
) -> std::io::Result<TlsStream> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    open(&Targets::parse(addr), &connector).await
}

/// A client's mTLS stream, its writes gathered until each flush.
pub type TlsStream = crate::gather::Gather<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

async fn open(
    targets: &Targets,
    connector: &tokio_rustls::TlsConnector,
) -> std::io::Result<TlsStream> {
    let (tcp, name) = targets.connect().await?;
    tcp.set_nodelay(true)?;
    Ok(crate::gather::Gather::new(
        connector.connect(name, tcp).await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_checked_is_the_host_the_agent_dials() {
        let name = |t: &str| server_name(t).map(|n| n.to_str().into_owned());
        assert_eq!(name("127.0.0.1:8081").unwrap(), "127.0.0.1");
        assert_eq!(name("[::1]:8081").unwrap(), "::1");
        assert_eq!(name("daemon.example:8081").unwrap(), "daemon.example");
        assert_eq!(name("daemon.example").unwrap(), "daemon.example");
        assert!(matches!(
            server_name("127.0.0.1:8081").unwrap(),
            ServerName::IpAddress(_)
        ));
        let err = server_name("bad name:8081").unwrap_err();
        assert!(err.to_string().contains("bad name"), "{err}");
    }
}

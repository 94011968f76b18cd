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
        _server_name: &ServerName<'_>,
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

/// Opens a gRPC channel to `addr` ("host:port") over TLS with `config`, connecting now.
pub async fn connect(
    addr: &str,
    config: rustls::ClientConfig,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    endpoint(addr)?
        .connect_with_connector(tls_connector(addr, config))
        .await
}

/// Like `connect`, but connects on first use and reconnects by itself after a failure, so
/// a caller can hold it while the daemon is down.
pub fn connect_lazy(
    addr: &str,
    config: rustls::ClientConfig,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    Ok(endpoint(addr)?.connect_with_connector_lazy(tls_connector(addr, config)))
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

type TlsIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

fn tls_connector(
    addr: &str,
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
    let target = addr.to_string();
    tower::service_fn(move |_: http::Uri| {
        let connector = connector.clone();
        let target = target.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            // The verifier ignores the name; SNI just needs a syntactically valid one.
            let name = ServerName::try_from("mayfly-daemon")
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    })
}

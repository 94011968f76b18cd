//! A small HTTP/1.1 JSON client for the Vault API, over plain TCP or rustls (aws-lc-rs),
//! plus the login state (a fixed token or an AppRole login whose token is cached).
//! One connection per request: rotations are rare, and it keeps the client stateless.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;

use crate::secrets::{SecretStoreError, SecretValue};

/// A whole request, connect to last body byte; Vault answers KV calls in milliseconds, so
/// this only trips on a server that accepted the connection and then hung.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest server error text carried into our errors, so a chatty proxy page stays short.
const MAX_ERROR_TEXT: usize = 200;

/// Where the Vault API listens, parsed once from `http(s)://host[:port]`.
#[derive(Clone)]
pub(crate) struct VaultHttp {
    /// Host name or IP literal without IPv6 brackets, for connecting and for SNI.
    host: String,
    port: u16,
    /// The authority as the user wrote it, for the Host header.
    authority: HeaderValue,
    /// Present for https:// addresses.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// The address as given, for error messages (it holds no credentials: we reject userinfo).
    address: Arc<str>,
}

/// One answer from Vault.
pub(crate) struct VaultResponse {
    pub status: StatusCode,
    pub body: Bytes,
}

impl VaultResponse {
    /// The body as JSON; an empty body (204) is `null`.
    pub fn json(&self) -> Result<Value, SecretStoreError> {
        if self.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| SecretStoreError::Malformed(format!("Vault answer is not JSON: {e}")))
    }

    /// Vault's first `errors` entry, shortened, or "" when it sent none.
    pub fn error_text(&self) -> String {
        let text = serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| {
                v.get("errors")?
                    .as_array()?
                    .iter()
                    .filter_map(Value::as_str)
                    .next()
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        let text = text.trim().replace('\n', " ");
        match text.char_indices().nth(MAX_ERROR_TEXT) {
            Some((cut, _)) => format!("{}…", &text[..cut]),
            None => text,
        }
    }
}

impl VaultHttp {
    /// Parses `address` and, for https, builds a TLS client trusting `ca_cert_pem` (every
    /// certificate in it) or, without one, the Mozilla roots.
    pub fn new(address: &str, ca_cert_pem: Option<&str>) -> Result<Self, SecretStoreError> {
        let bad =
            |why: &str| SecretStoreError::Refused(format!("Vault address {address:?}: {why}"));
        let uri: Uri = address.parse().map_err(|_| bad("not a URL"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("must start with http:// or https://")),
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("must be scheme://host[:port] with no path"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad(
                "credentials in the URL are not supported; use the auth setting",
            ));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority_header =
            HeaderValue::from_str(authority.as_str()).map_err(|_| bad("bad host"))?;
        let tls = if https {
            let name = ServerName::try_from(host.clone()).map_err(|_| bad("bad host name"))?;
            Some((tls_connector(ca_cert_pem)?, name))
        } else {
            None
        };
        Ok(Self {
            host,
            port,
            authority: authority_header,
            tls,
            address: address.into(),
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// Sends one request to `path_and_query` (starting `/v1/`) and reads the whole answer.
    /// Only failures to talk to Vault are errors here; any HTTP status is returned.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        token: Option<&SecretValue>,
        body: Option<&Value>,
    ) -> Result<VaultResponse, SecretStoreError> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path_and_query)
            .header(header::HOST, self.authority.clone());
        if let Some(token) = token {
            let mut value = HeaderValue::from_str(token.expose()).map_err(|_| {
                SecretStoreError::Refused("the Vault token is not a valid header value".into())
            })?;
            // Keeps the token out of hyper's debug output and HPACK tables.
            value.set_sensitive(true);
            req = req.header("x-vault-token", value);
        }
        let payload = match body {
            Some(body) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(body.to_string())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|e| SecretStoreError::Refused(format!("bad request path: {e}")))?;
        let unreachable = |what: String| {
            SecretStoreError::Unreachable(format!(
                "{} ({method} {}): {what}",
                self.address,
                strip_query(path_and_query)
            ))
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(unreachable(e.to_string())),
            Err(_) => Err(unreachable(format!("no answer within {REQUEST_TIMEOUT:?}"))),
        }
    }

    async fn exchange(&self, req: Request<Full<Bytes>>) -> Result<VaultResponse, ExchangeError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(ExchangeError::Connect)?;
        // Small request/response pairs: Nagle would only add delay.
        tcp.set_nodelay(true).map_err(ExchangeError::Connect)?;
        match &self.tls {
            None => exchange_over(tcp, req).await,
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(ExchangeError::Tls)?;
                exchange_over(tls, req).await
            }
        }
    }
}

impl fmt::Debug for VaultHttp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultHttp")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

async fn exchange_over<IO>(
    io: IO,
    req: Request<Full<Bytes>>,
) -> Result<VaultResponse, ExchangeError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(ExchangeError::Handshake)?;
    // The connection task ends once `sender` is dropped below; a failure on it also
    // surfaces through `send_request`, so its own result carries nothing new.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender
        .send_request(req)
        .await
        .map_err(ExchangeError::Send)?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(ExchangeError::Read)?
        .to_bytes();
    Ok(VaultResponse { status, body })
}

/// Why one request to Vault got no answer.
#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("HTTP handshake: {0}")]
    Handshake(hyper::Error),
    #[error("sending the request: {0}")]
    Send(hyper::Error),
    #[error("reading the answer: {0}")]
    Read(hyper::Error),
}

fn tls_connector(ca_cert_pem: Option<&str>) -> Result<TlsConnector, SecretStoreError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_cert_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| {
                    SecretStoreError::Refused(format!("Vault CA bundle is not valid PEM: {e}"))
                })?;
                roots.add(cert).map_err(|e| {
                    SecretStoreError::Refused(format!("Vault CA bundle has a bad certificate: {e}"))
                })?;
            }
            if roots.is_empty() {
                return Err(SecretStoreError::Refused(
                    "Vault CA bundle holds no certificate".into(),
                ));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    // The provider is named here rather than taken from the process default, so this works
    // whether or not main installed one, and never pulls in a second crypto library.
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| SecretStoreError::Refused(format!("TLS setup: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Query strings carry only version numbers today, but errors name paths without them.
fn strip_query(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

/// How requests authenticate.
pub(crate) enum Login {
    Token(SecretValue),
    AppRole {
        role_id: String,
        secret_id: SecretValue,
        /// `/v1/auth/<mount>/login`, built once.
        login_path: String,
        /// The client token from the last login; `None` until the first request or after
        /// Vault refused it.
        cached: Mutex<Option<SecretValue>>,
    },
}

impl Login {
    /// Sends a request with the current token. With AppRole, a 403 may just mean the cached
    /// token expired or was revoked, so it logs in again once and retries.
    pub async fn send(
        &self,
        http: &VaultHttp,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<VaultResponse, SecretStoreError> {
        match self {
            Login::Token(token) => http.send(method, path_and_query, Some(token), body).await,
            Login::AppRole { cached, .. } => {
                let token = self.app_role_token(http, false).await?;
                let resp = http
                    .send(method.clone(), path_and_query, Some(&token), body)
                    .await?;
                if resp.status != StatusCode::FORBIDDEN {
                    return Ok(resp);
                }
                {
                    let mut cached = cached.lock().await;
                    // Another request may already have replaced the token we used.
                    if cached.as_ref() == Some(&token) {
                        *cached = None;
                    }
                }
                let token = self.app_role_token(http, true).await?;
                http.send(method, path_and_query, Some(&token), body).await
            }
        }
    }

    /// The cached AppRole token, logging in when there is none. `after_refusal` only
    /// changes the error text, so an operator can tell a bad role from a bad policy.
    async fn app_role_token(
        &self,
        http: &VaultHttp,
        after_refusal: bool,
    ) -> Result<SecretValue, SecretStoreError> {
        let Login::AppRole {
            role_id,
            secret_id,
            login_path,
            cached,
        } = self
        else {
            return Err(SecretStoreError::Refused("not an AppRole login".into()));
        };
        // Held across the login so concurrent requests share one login instead of racing.
        let mut cached = cached.lock().await;
        if let Some(token) = cached.as_ref() {
            return Ok(token.clone());
        }
        let body = json!({"role_id": role_id, "secret_id": secret_id.expose()});
        let resp = http
            .send(Method::POST, login_path, None, Some(&body))
            .await?;
        if !resp.status.is_success() {
            let when = if after_refusal {
                " (after Vault refused the previous token)"
            } else {
                ""
            };
            return Err(match resp.status {
                StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN => SecretStoreError::Refused(
                    format!("AppRole login failed{when}: {}", resp.error_text()),
                ),
                StatusCode::NOT_FOUND => SecretStoreError::Refused(format!(
                    "AppRole login failed{when}: no auth method at {login_path}"
                )),
                other => status_error(other, &resp, "AppRole login"),
            });
        }
        let token = resp
            .json()?
            .pointer("/auth/client_token")
            .and_then(Value::as_str)
            .map(SecretValue::new)
            .ok_or_else(|| {
                SecretStoreError::Malformed("AppRole login answer has no auth.client_token".into())
            })?;
        *cached = Some(token.clone());
        Ok(token)
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Login::Token(_) => "token",
            Login::AppRole { .. } => "approle",
        }
    }
}

/// Maps a non-success status to our error. `what` names the object (never a value).
pub(crate) fn status_error(
    status: StatusCode,
    resp: &VaultResponse,
    what: &str,
) -> SecretStoreError {
    let text = resp.error_text();
    match status {
        StatusCode::FORBIDDEN => SecretStoreError::Refused(format!("{what}: permission denied")),
        StatusCode::NOT_FOUND => SecretStoreError::NotFound(what.to_owned()),
        StatusCode::BAD_REQUEST if text.contains("check-and-set") => SecretStoreError::Conflict,
        // A KV mount migrating to v2 (also right after a dev server starts) answers 400
        // for a moment; it is a wait, not a refusal.
        StatusCode::BAD_REQUEST if text.starts_with("Upgrading from non-versioned") => {
            SecretStoreError::Unreachable(format!("{what}: {text}"))
        }
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
            // 503 is also how a sealed or standby Vault answers: worth retrying later.
            SecretStoreError::Unreachable(format!("{what}: Vault answered {s}: {text}"))
        }
        s => SecretStoreError::Refused(format!("{what}: Vault answered {s}: {text}")),
    }
}

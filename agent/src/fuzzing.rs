//! Entry points for the fuzz targets (`fuzz-targets/`): thin wrappers that let them drive
//! parsers private to this crate with arbitrary bytes. Not an API: nothing else calls them,
//! and each runs the same code the agent runs on the same input.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use prost::Message;
use zeroize::Zeroizing;

use mayfly_common::TrustDomain;
use mayfly_proto::workload::ValidateJwtsvidResponse;

use crate::credentials::HeldCredentials;
use crate::sinks::{SinkConfig, check_all};
use crate::state::{Bundle, SecretView, WorkloadState};
use crate::workload_api::{WorkloadApiError, grpc};

/// `grpc-timeout` as the Workload API reads it: whether a deadline was set, or the refusal.
pub fn grpc_timeout(value: &[u8]) -> Result<bool, tonic::Status> {
    let Ok(value) = HeaderValue::from_bytes(value) else {
        // hyper refuses such a header before the agent sees it.
        return Ok(false);
    };
    let mut headers = HeaderMap::new();
    headers.insert("grpc-timeout", value);
    grpc::deadline(&headers).map(|d| d.is_some())
}

/// A Workload API request body, read whole: the length-prefixed message unframed, then
/// decoded as each request type the socket serves. Returns the message's length.
pub fn grpc_request(body: &[u8], encoding: Option<&[u8]>) -> Result<usize, tonic::Status> {
    use mayfly_proto::v1;
    use mayfly_proto::workload;

    let encoding = encoding.and_then(|e| HeaderValue::from_bytes(e).ok());
    let message = grpc::unframe(Bytes::copy_from_slice(body), encoding.as_ref())?;
    // Which type a body is decoded as depends on the path; every one must refuse cleanly.
    let _ = workload::X509svidRequest::decode(message.clone());
    let _ = workload::X509BundlesRequest::decode(message.clone());
    let _ = workload::JwtsvidRequest::decode(message.clone());
    let _ = workload::JwtBundlesRequest::decode(message.clone());
    let _ = workload::ValidateJwtsvidRequest::decode(message.clone());
    let _ = v1::WatchSecretsRequest::decode(message.clone());
    let _ = v1::GetCredentialRequest::decode(message.clone());
    let _ = v1::HolderElevationRequest::decode(message.clone());
    let _ = v1::HolderEndElevationRequest::decode(message.clone());
    Ok(message.len())
}

/// `ValidateJWTSVID` past the caller's attestation: the token checked against `jwt_keys`
/// (kid, SPKI DER) of `trust_domain`, and the claims converted for the response.
pub fn validate_jwt_svid(
    svid: &str,
    audience: &str,
    trust_domain: &TrustDomain,
    jwt_keys: &[(String, Vec<u8>)],
    now: SystemTime,
) -> Result<ValidateJwtsvidResponse, WorkloadApiError> {
    let bundle = Bundle {
        trust_domain: trust_domain.clone(),
        x509_authorities: Vec::new(),
        jwt_keys: jwt_keys.to_vec(),
        sequence: 1,
    };
    crate::workload_api::validate_jwt_svid(svid, audience, &bundle, now)
}

/// A template sink with `template` checked as the agent checks it at start, then rendered
/// against a state holding one granted secret (`secrets['orders-db']`) and one svid sink
/// (`svids.web`). Returns the rendered text, `None` if the sink waits for something.
pub fn render_template(template: &str) -> Result<Option<String>, String> {
    let mut svid = toml::Table::new();
    svid.insert("kind".into(), "svid".into());
    svid.insert("name".into(), "web".into());
    svid.insert("hint".into(), "web".into());
    svid.insert("cert_path".into(), "/srv/tls/cert.pem".into());
    svid.insert("key_path".into(), "/srv/tls/key.pem".into());
    let mut sink = toml::Table::new();
    sink.insert("kind".into(), "template".into());
    sink.insert("path".into(), "/srv/app/config".into());
    sink.insert("template".into(), template.into());
    let configs = [svid, sink]
        .into_iter()
        .map(|table| toml::Value::Table(table).try_into::<SinkConfig>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let sinks = check_all(&configs, false).map_err(|e| e.to_string())?;
    let state = fuzzing_state().map_err(|e| e.to_string())?;
    let files =
        crate::sinks::render::render(&sinks[1], &sinks, &state, &HeldCredentials::default())
            .map_err(|e| e.to_string())?;
    Ok(files.map(|files| {
        files
            .iter()
            .map(|f| String::from_utf8_lossy(&f.contents).into_owned())
            .collect()
    }))
}

fn fuzzing_state() -> Result<WorkloadState, mayfly_common::SpiffeIdError> {
    let mut state = WorkloadState::empty(Bundle {
        trust_domain: TrustDomain::new("example.org")?,
        x509_authorities: Vec::new(),
        jwt_keys: Vec::new(),
        sequence: 1,
    });
    let mut secrets = BTreeMap::new();
    secrets.insert(
        "orders-db".to_owned(),
        Arc::new(SecretView {
            name: "orders-db".to_owned(),
            version: "v1".to_owned(),
            username: "orders_a".to_owned(),
            value: Arc::new(Zeroizing::new(b"s3cret-Value".to_vec())),
            granted_to: vec!["spiffe://example.org/app".to_owned()],
            sets: Vec::new(),
        }),
    );
    state.secrets = secrets;
    state.synced = true;
    Ok(state)
}

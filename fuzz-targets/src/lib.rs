//! What each fuzz target runs: one function per parser that takes input from outside the
//! process, fed arbitrary bytes. `fuzz/fuzz_targets/NAME.rs` calls `NAME` under libFuzzer;
//! `tests/replay.rs` calls it on every committed corpus and regression input, so
//! `cargo test` keeps a crash found once fixed.
//!
//! A function never panics on any input: errors are the expected outcome for most bytes.
//! Where cheap, it also checks a property of what parsed (a SPIFFE ID re-parses to itself,
//! a signed SVID carries the requested ID) and panics if that fails, which the fuzzer
//! reports like any crash.

#![forbid(unsafe_code)]

use std::io::Cursor;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use prost::Message;

use mayfly_common::svid::{SvidRequest, X509Authority, generate_ca, parse_pem_certs};
use mayfly_common::tls::{TrustBundle, peer_identity};
use mayfly_common::{Selector, SpiffeId, TrustDomain};

/// What a target runs: any bytes in, a panic only for a bug.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/fuzz_targets/` and `fuzz/corpus/` name them.
pub const TARGETS: &[(&str, Target)] = &[
    ("spiffe_id", spiffe_id),
    ("selector", selector),
    ("certificate", certificate),
    ("csr", csr),
    ("join_token", join_token),
    ("jwt_svid", jwt_svid),
    ("grpc_request", grpc_request),
    ("grpc_timeout", grpc_timeout),
    ("daemon_config", daemon_config),
    ("agent_config", agent_config),
    ("secret_spec", secret_spec),
    ("template", template),
    ("audit_export", audit_export),
];

/// The trust domain of the CA and JWT key every target signs and validates with.
pub const TRUST_DOMAIN: &str = "example.org";

/// The SPIFFE ID the `csr` target asks the CA to sign for.
pub const WORKLOAD_ID: &str = "spiffe://example.org/workload";

/// The SPIFFE ID the `join_token` target signs the agent's CSR for.
pub const AGENT_ID: &str = "spiffe://example.org/mayfly/agent/node-1";

/// The kid of the JWT key `jwt_svid` validates against.
pub const JWT_KID: &str = "fuzz-jwt-key";

/// The instant JWT-SVIDs are validated at (2027-01-15), fixed so that a committed token
/// keeps taking the same path; corpus tokens expire in 2030.
pub const JWT_NOW_UNIX: u64 = 1_800_000_000;

/// `TrustDomain::new` and `SpiffeId::parse`. A parsed ID re-parses from its text to the
/// same value, and its trust domain on its own parses too.
pub fn spiffe_id(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(text) {
        assert_eq!(id.as_str(), text, "a SPIFFE ID is kept as given");
        let again = SpiffeId::parse(id.as_str()).expect("a parsed SPIFFE ID re-parses");
        assert_eq!(again, id);
        let domain = TrustDomain::new(id.trust_domain().as_str())
            .expect("the trust domain of a SPIFFE ID parses on its own");
        assert_eq!(&domain, id.trust_domain());
        assert!(id.is_member_of(&domain));
        let rebuilt = SpiffeId::from_parts(&domain, id.path()).expect("its parts rebuild it");
        assert_eq!(rebuilt, id);
    }
    if let Ok(domain) = TrustDomain::new(text) {
        let id = domain.id();
        assert!(!id.has_path());
        assert_eq!(
            TrustDomain::new(id.as_str()).expect("spiffe://<domain> parses"),
            domain
        );
    }
}

/// `Selector::parse` from text, and from the protobuf form registrations carry. A parsed
/// selector prints as text that parses back to it.
pub fn selector(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(parsed) = Selector::parse(text) {
        let printed = parsed.to_string();
        assert_eq!(Selector::parse(&printed).as_ref(), Ok(&parsed));
        let message = mayfly_proto::v1::Selector::from(&parsed);
        assert_eq!(Selector::try_from(&message).as_ref(), Ok(&parsed));
    }
    // The protobuf form: `type` up to the first `:`, the rest as `value`.
    let (selector_type, value) = text.split_once(':').unwrap_or((text, ""));
    let message = mayfly_proto::v1::Selector {
        r#type: selector_type.to_owned(),
        value: value.to_owned(),
    };
    if let Ok(parsed) = Selector::try_from(&message) {
        assert_eq!(Selector::parse(&parsed.to_string()).as_ref(), Ok(&parsed));
    }
}

/// Certificates as peers and operators hand them over: a DER certificate read for its
/// SPIFFE ID, serial and expiry (`peer_identity`, on every mTLS connection), loaded as a
/// trust anchor, and PEM text read for certificates (`parse_pem_certs`, bundle files).
pub fn certificate(data: &[u8]) {
    install_crypto_provider();
    if let Ok(identity) = peer_identity(data) {
        assert_eq!(
            SpiffeId::parse(identity.spiffe_id.as_str()).as_ref(),
            Ok(&identity.spiffe_id)
        );
        assert!(identity.serial.bytes().all(|b| b.is_ascii_hexdigit()));
    }
    let _ = TrustBundle::new(&[data.to_vec()]);
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(certs) = parse_pem_certs(text)
    {
        for der in &certs {
            let _ = peer_identity(der);
        }
        let _ = TrustBundle::new(&certs);
    }
}

/// A CSR signed by the CA for one entry, as `SignSvids` does for every workload CSR: the
/// request is parsed and its signature verified, and a signed SVID carries the entry's ID.
pub fn csr(data: &[u8]) {
    let dns_names = ["web.example.org".to_owned()];
    let request = SvidRequest {
        dns_names: &dns_names,
        ..SvidRequest::new(WORKLOAD_ID, Duration::from_secs(3600))
    };
    if let Ok(issued) = fixtures().ca.sign_svid(data, &request, SystemTime::now()) {
        let identity = peer_identity(&issued.cert_der).expect("a signed SVID is readable");
        assert_eq!(identity.spiffe_id.as_str(), WORKLOAD_ID);
        assert_eq!(identity.serial, issued.serial_hex);
    }
}

/// The node API's `Attest` request as a new agent sends it, before TLS identifies anyone:
/// the protobuf message decoded, the join token hashed as the store looks it up (the lookup
/// itself is a bound SQL parameter), and the CSR signed for the token's agent ID.
pub fn join_token(data: &[u8]) {
    let Ok(request) = mayfly_proto::v1::AttestRequest::decode(data) else {
        return;
    };
    let hash = mayfly_daemon::identity::token_hash(&request.join_token);
    // The daemon names a token by the first 12 hex digits of its hash in audit and logs.
    assert!(hash.len() == 64 && hash.is_char_boundary(12));
    let request_for_agent = SvidRequest::new(AGENT_ID, Duration::from_secs(3600));
    if let Ok(issued) = fixtures()
        .ca
        .sign_svid(&request.csr, &request_for_agent, SystemTime::now())
    {
        let identity = peer_identity(&issued.cert_der).expect("a signed SVID is readable");
        assert_eq!(identity.spiffe_id.as_str(), AGENT_ID);
    }
}

/// `ValidateJWTSVID`: the first line is the audience. If the second line starts with `{`,
/// the rest is taken as the claims and signed with the trust domain's JWT key under a
/// well-formed header, so that the fuzzer reaches the claim checks behind the signature;
/// otherwise the rest is the token as a workload sends it. An accepted token's subject is a
/// SPIFFE ID in the trust domain.
pub fn jwt_svid(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (audience, rest) = text.split_once('\n').unwrap_or((text, ""));
    let fixtures = fixtures();
    let token = if rest.starts_with('{') {
        fixtures.sign_jwt(rest)
    } else {
        rest.to_owned()
    };
    let now = UNIX_EPOCH + Duration::from_secs(JWT_NOW_UNIX);
    if let Ok(response) = mayfly_agent::fuzzing::validate_jwt_svid(
        &token,
        audience,
        &fixtures.trust_domain,
        &fixtures.jwt_keys,
        now,
    ) {
        let subject = SpiffeId::parse(&response.spiffe_id).expect("an accepted sub parses");
        assert!(subject.is_member_of(&fixtures.trust_domain));
        assert!(
            response
                .claims
                .is_some_and(|c| c.fields.contains_key("sub"))
        );
    }
}

/// A Workload API request body: the gRPC length-prefixed message, then the message decoded
/// as each request type. The first byte says whether the request names a `grpc-encoding`
/// (odd) and is not part of the body.
pub fn grpc_request(data: &[u8]) {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let encoding = (flags & 1 == 1).then_some(&b"gzip"[..]);
    if let Ok(len) = mayfly_agent::fuzzing::grpc_request(body, encoding) {
        assert_eq!(len + 5, body.len(), "one message, all of the body");
        assert_eq!(body[0], 0, "only uncompressed messages are read");
    }
}

/// The `grpc-timeout` header of a Workload API request. Only 1 to 8 digits and a unit set a
/// deadline.
pub fn grpc_timeout(data: &[u8]) {
    if let Ok(true) = mayfly_agent::fuzzing::grpc_timeout(data) {
        let (unit, digits) = data.split_last().expect("a deadline needs a unit");
        assert!((1..=8).contains(&digits.len()));
        assert!(digits.iter().all(u8::is_ascii_digit));
        assert!(b"HMSmun".contains(unit));
    }
}

/// `daemon.toml`, with its `[[secret]]` definitions and every other table, parsed and checked
/// as `mayflyd` does at start.
pub fn daemon_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = mayfly_daemon::config::DaemonConfig::parse(text, Path::new("fuzz/daemon.toml"));
    }
}

/// `agent.toml`, sinks and `[exec]` included, parsed and checked as `mayfly-agent` does.
pub fn agent_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = mayfly_agent::config::AgentConfig::parse(text, Path::new("fuzz/agent.toml"));
    }
}

/// Definitions as `mayflyd secret create` and `mayflyd credential create` send them to the
/// admin API: TOML parsed and checked, as a rotated secret (name, schedule, window,
/// generator, users, store, target, grants, sets) and as a TTL-bound credential.
pub fn secret_spec(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = mayfly_daemon::secrets::spec::SecretSpec::from_toml(text) {
        spec.parsed_schedule()
            .expect("a checked definition's schedule parses");
    }
    let _ = mayfly_daemon::creds::spec::CredentialSpec::from_toml(text);
}

/// A template sink's template: compiled as the agent checks it at start, then rendered with
/// a granted secret and an svid sink in reach.
pub fn template(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = mayfly_agent::fuzzing::render_template(text);
    }
}

/// An audit export as `mayflyd audit verify --file` reads it: JSON lines, each an audit
/// record whose hash chains to the one before.
pub fn audit_export(data: &[u8]) {
    if let Ok(verdict) = mayfly_daemon::audit::verify_export(Cursor::new(data), None) {
        // The verdict is printed for the operator; it must always be printable.
        let _ = format!("{verdict:?}");
    }
}

/// Installs aws-lc-rs as rustls's process-wide provider, as every `main` does. Installing
/// twice is refused, which is fine: the first one stands.
fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// What every signing and validating target shares, made once per process.
struct Fixtures {
    trust_domain: TrustDomain,
    ca: X509Authority,
    jwt_key: EcdsaKeyPair,
    jwt_keys: Vec<(String, Vec<u8>)>,
}

impl Fixtures {
    /// A compact ES256 JWT of `claims` (any text), signed with the trust domain's key.
    fn sign_jwt(&self, claims: &str) -> String {
        let header = format!(r#"{{"alg":"ES256","kid":"{JWT_KID}","typ":"JWT"}}"#);
        let mut token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let signature = self
            .jwt_key
            .sign(&SystemRandom::new(), token.as_bytes())
            .expect("signing with a P-256 key cannot fail");
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature.as_ref()));
        token
    }
}

fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        install_crypto_provider();
        // Ten years, so that neither the CA nor its SVIDs expire during a fuzzing run.
        let material = generate_ca(
            TRUST_DOMAIN,
            Duration::from_secs(10 * 365 * 86_400),
            SystemTime::now(),
        )
        .expect("a CA for the fuzz targets");
        let ca = X509Authority::new(&material.cert_der, &material.key_pkcs8)
            .expect("a freshly generated CA loads");
        let jwt_key = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &material.jwt_key_pkcs8,
        )
        .expect("a freshly generated JWT key loads");
        let spki = mayfly_common::svid::JwtAuthority::new(JWT_KID, &material.jwt_key_pkcs8)
            .expect("a freshly generated JWT key loads")
            .public_key_spki()
            .to_vec();
        Fixtures {
            trust_domain: TrustDomain::new(TRUST_DOMAIN).expect("a valid trust domain"),
            ca,
            jwt_key,
            jwt_keys: vec![(JWT_KID.to_owned(), spki)],
        }
    })
}

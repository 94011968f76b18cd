//! The Workload API served on a real Unix socket to the `spiffe` crate's client (the
//! conformance check) and to the raw generated client for what that client hides. SVIDs and
//! JWT-SVIDs come from the real `mayfly_common::svid` CA and signer.
//!
//! The process runs the tests under one uid, so "a caller under another uid" is simulated
//! with an attestor that maps this process to a uid with no entry; the kernel-level uid
//! check is covered by the end-to-end tests that run workloads as other users.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use futures::future::BoxFuture;
use tokio::net::UnixStream;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Request};
use x509_parser::prelude::FromDer as _;

use mayfly_common::svid::{
    CaMaterial, JwtAuthority, SvidRequest, X509Authority, generate_ca, generate_csr,
};
use mayfly_common::{Selector, SpiffeId, TrustDomain};
use mayfly_proto::WORKLOAD_HEADER;
use mayfly_proto::v1::GetCredentialRequest;
use mayfly_proto::v1::workload_credentials_client::WorkloadCredentialsClient;
use mayfly_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use mayfly_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest,
};

use super::*;
use crate::state::{Bundle, EntryView, JwtIssuer, WorkloadState, X509Svid};

const CALLER_ID: &str = "spiffe://example.org/caller";
const CALLER_ADMIN_ID: &str = "spiffe://example.org/caller-admin";
const OTHER_ID: &str = "spiffe://example.org/other";
const JWT_TTL: Duration = Duration::from_secs(300);
const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing is sent" is watched for; a wrong message would arrive well within it.
const QUIET: Duration = Duration::from_millis(300);

/// Hands back `unix:uid:<uid>` and `unix:gid:<gid>` of the caller, optionally pretending
/// the caller is someone else.
enum TestAttestor {
    AsIs,
    AsUid(u32),
    Failing,
}

impl CallerAttestor for TestAttestor {
    fn attest(&self, peer: PeerCredentials) -> BoxFuture<'_, Result<Vec<Selector>, AttestError>> {
        Box::pin(async move {
            match self {
                Self::AsIs => Ok(vec![Selector::Uid(peer.uid), Selector::Gid(peer.gid)]),
                Self::AsUid(uid) => Ok(vec![Selector::Uid(*uid), Selector::Gid(peer.gid)]),
                Self::Failing => Err(AttestError::ProcessGone { pid: 4242 }),
            }
        })
    }
}

/// Real time plus a movable offset, so the `spiffe` client (which reads the wall clock)
/// and the server agree on what is expired while cache lifetimes can still be skipped.
struct TestClock {
    offset_secs: AtomicU64,
}

impl TestClock {
    fn advance(&self, secs: u64) {
        self.offset_secs.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now(&self) -> SystemTime {
        SystemTime::now() + Duration::from_secs(self.offset_secs.load(Ordering::SeqCst))
    }
}

/// The real JWT signer, standing in for the daemon round trip, counting its mints.
struct SigningIssuer {
    authority: JwtAuthority,
    state: watch::Receiver<Arc<WorkloadState>>,
    clock: Arc<TestClock>,
    mints: AtomicUsize,
}

#[tonic::async_trait]
impl JwtIssuer for SigningIssuer {
    async fn mint(
        &self,
        entry_id: &str,
        audience: &[String],
    ) -> Result<(String, i64), tonic::Status> {
        let spiffe_id = {
            let state = self.state.borrow();
            let entry = state.entries.iter().find(|e| e.id == entry_id);
            entry
                .map(|e| e.spiffe_id.clone())
                .ok_or_else(|| tonic::Status::not_found("no such entry"))?
        };
        let now = self.clock.now();
        let token = self
            .authority
            .sign(spiffe_id.as_str(), audience, JWT_TTL, now)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        self.mints.fetch_add(1, Ordering::SeqCst);
        let exp = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            + JWT_TTL.as_secs() as i64;
        Ok((token, exp))
    }
}

/// Stands in for the daemon's `IssueCredential`: a lease per call, for whichever SPIFFE ID
/// asks, except that `not-granted` is refused as the daemon refuses it.
#[derive(Default)]
struct FakeCredentialIssuer {
    asked: std::sync::Mutex<Vec<mayfly_proto::v1::IssueCredentialRequest>>,
}

#[tonic::async_trait]
impl crate::credentials::CredentialIssuer for FakeCredentialIssuer {
    async fn issue(
        &self,
        request: mayfly_proto::v1::IssueCredentialRequest,
    ) -> Result<mayfly_proto::v1::IssuedCredential, tonic::Status> {
        let n = {
            let mut asked = self.asked.lock().unwrap();
            asked.push(request.clone());
            asked.len()
        };
        if request.name == "not-granted" {
            return Err(tonic::Status::permission_denied(format!(
                "credential not-granted is not granted to {}",
                request.spiffe_id
            )));
        }
        let now = mayfly_common::clock::unix(SystemTime::now());
        Ok(mayfly_proto::v1::IssuedCredential {
            lease_id: format!("ls-{n}"),
            name: request.name,
            kind: "postgres_dynamic".into(),
            values: [
                ("username".to_string(), format!("v_{n}")),
                ("password".to_string(), format!("Pw-{n}")),
            ]
            .into(),
            issued_at: now,
            expires_at: now + 600,
            notice: String::new(),
            facts: Some(mayfly_proto::v1::CredentialFacts {
                grants: vec![request.spiffe_id],
                sets: vec!["prod".into()],
                max_ttl_seconds: 86_400,
            }),
        })
    }
}

struct Fixture {
    ca: CaMaterial,
    authority: X509Authority,
    state: watch::Sender<Arc<WorkloadState>>,
    issuer: Arc<SigningIssuer>,
    credential_issuer: Arc<FakeCredentialIssuer>,
    clock: Arc<TestClock>,
    socket: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), ServeError>>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// Serves a state with three entries: two the test process matches (by uid, and by
    /// uid and gid), one for uid 4242. Every entry has an SVID.
    async fn start(attestor: TestAttestor) -> Self {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let ca = generate_ca(
            "example.org",
            Duration::from_secs(86_400),
            SystemTime::now(),
        )
        .unwrap();
        let authority = X509Authority::new(&ca.cert_der, &ca.key_pkcs8).unwrap();
        let bundle = Bundle {
            trust_domain: TrustDomain::new("example.org").unwrap(),
            x509_authorities: vec![ca.cert_der.clone()],
            jwt_keys: vec![(ca.jwt_kid.clone(), ca.jwt_public_spki.clone())],
            sequence: 1,
        };
        let mut state = WorkloadState::empty(bundle);
        state.entries = vec![
            entry("e-caller", CALLER_ID, vec![Selector::Uid(my_uid())]),
            entry(
                "e-caller-admin",
                CALLER_ADMIN_ID,
                vec![Selector::Uid(my_uid()), Selector::Gid(my_gid())],
            ),
            entry("e-other", OTHER_ID, vec![Selector::Uid(4242)]),
        ];
        for e in &state.entries {
            state.svids.insert(e.id.clone(), issue(&authority, e));
        }
        let (state_tx, state_rx) = watch::channel(Arc::new(state));

        let clock = Arc::new(TestClock {
            offset_secs: AtomicU64::new(0),
        });
        let issuer = Arc::new(SigningIssuer {
            authority: JwtAuthority::new(&ca.jwt_kid, &ca.jwt_key_pkcs8).unwrap(),
            state: state_rx.clone(),
            clock: clock.clone(),
            mints: AtomicUsize::new(0),
        });
        let credential_issuer = Arc::new(FakeCredentialIssuer::default());
        let credentials = crate::credentials::CredentialCache::new(
            credential_issuer.clone(),
            clock.clone(),
            state_rx.clone(),
        );
        let api = WorkloadApi::new(state_rx, Arc::new(attestor), issuer.clone())
            .with_clock(clock.clone())
            .with_credentials(credentials);

        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent").join("workload.sock");
        let listener = bind(&socket).unwrap();
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(serve_listener(listener, api, async {
            let _ = shutdown_rx.await;
        }));
        Self {
            ca,
            authority,
            state: state_tx,
            issuer,
            credential_issuer,
            clock,
            socket,
            shutdown: Some(shutdown_tx),
            server,
            _dir: dir,
        }
    }

    async fn spiffe_client(&self) -> spiffe::WorkloadApiClient {
        spiffe::WorkloadApiClient::connect_to(self.endpoint())
            .await
            .unwrap()
    }

    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The generated client, which sends no security header unless told to.
    async fn raw_client(&self) -> SpiffeWorkloadApiClient<Channel> {
        SpiffeWorkloadApiClient::new(self.channel().await)
    }

    async fn credentials_client(&self) -> WorkloadCredentialsClient<Channel> {
        WorkloadCredentialsClient::new(self.channel().await)
    }

    async fn channel(&self) -> Channel {
        let path = self.socket.clone();
        tonic::transport::Endpoint::from_static("http://workload.local")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    let stream = UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .unwrap()
    }

    /// Publishes a changed copy of the current state.
    fn update(&self, change: impl FnOnce(&mut WorkloadState)) {
        let mut next = (**self.state.borrow()).clone();
        change(&mut next);
        self.state.send_replace(Arc::new(next));
    }

    /// Issues a fresh SVID for `entry_id` and publishes it; returns its leaf DER.
    fn rotate(&self, entry_id: &str) -> Vec<u8> {
        let entry = self
            .state
            .borrow()
            .entries
            .iter()
            .find(|e| e.id == entry_id)
            .unwrap()
            .clone();
        let svid = issue(&self.authority, &entry);
        let leaf = svid.chain[0].clone();
        self.update(|s| {
            s.svids.insert(entry_id.to_owned(), svid);
        });
        leaf
    }

    fn leaf(&self, entry_id: &str) -> Vec<u8> {
        self.state.borrow().svids[entry_id].chain[0].clone()
    }
}

fn entry(id: &str, spiffe_id: &str, selectors: Vec<Selector>) -> Arc<EntryView> {
    Arc::new(EntryView {
        id: id.to_owned(),
        spiffe_id: SpiffeId::parse(spiffe_id).unwrap(),
        selectors,
        hint: format!("hint-{id}"),
        sets: Vec::new(),
        revision: 1,
        expires_at: 0,
    })
}

fn issue(authority: &X509Authority, entry: &EntryView) -> Arc<X509Svid> {
    let (key, csr) = generate_csr(Some(entry.spiffe_id.as_str())).unwrap();
    let issued = authority
        .sign_svid(
            &csr,
            &SvidRequest::new(entry.spiffe_id.as_str(), Duration::from_secs(3600)),
            SystemTime::now(),
        )
        .unwrap();
    Arc::new(X509Svid {
        entry_id: entry.id.clone(),
        spiffe_id: entry.spiffe_id.clone(),
        hint: entry.hint.clone(),
        chain: vec![issued.cert_der],
        key_pkcs8: Arc::new(key),
        serial: issued.serial_hex,
        not_before: issued.not_before,
        not_after: issued.not_after,
    })
}

fn my_uid() -> u32 {
    crate::sys::testing::real_uid()
}

fn my_gid() -> u32 {
    crate::sys::testing::real_gid()
}

fn with_header<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(WORKLOAD_HEADER, "true".parse().unwrap());
    request
}

/// The public key inside a PKCS#8 P-256 key equals the one in the certificate.
fn assert_key_matches_cert(key_pkcs8: &[u8], cert_der: &[u8]) {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key_pkcs8).unwrap();
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der).unwrap();
    assert_eq!(
        key.public_key().as_ref(),
        cert.public_key().subject_public_key.data.as_ref(),
        "the private key does not belong to the certificate"
    );
}

fn is_no_identity(e: &spiffe::WorkloadApiError) -> bool {
    matches!(e, spiffe::WorkloadApiError::NoIdentityIssued)
}

#[tokio::test]
async fn x509_context_holds_every_svid_of_the_caller_with_its_key_and_bundle() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let f = Fixture::start(TestAttestor::AsIs).await;
    let context = f.spiffe_client().await.fetch_x509_context().await.unwrap();

    let ids: Vec<String> = context
        .svids()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect();
    assert_eq!(
        ids,
        [CALLER_ID, CALLER_ADMIN_ID],
        "uid 4242's entry must not leak"
    );
    let default = context.default_svid().unwrap();
    assert_eq!(default.hint(), Some("hint-e-caller"));
    assert_eq!(default.leaf().as_bytes(), f.leaf("e-caller").as_slice());
    assert_key_matches_cert(default.private_key().as_ref(), default.leaf().as_bytes());

    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let bundle = context.bundle_set().get(&td).unwrap();
    assert_eq!(bundle.authorities().len(), 1);
    assert_eq!(bundle.authorities()[0].as_bytes(), f.ca.cert_der.as_slice());
}

#[tokio::test]
async fn x509_stream_sends_rotations_only_and_denies_once_the_entries_are_gone() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let f = Fixture::start(TestAttestor::AsIs).await;
    let mut stream = f
        .spiffe_client()
        .await
        .stream_x509_contexts()
        .await
        .unwrap();
    let first = tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        first.default_svid().unwrap().leaf().as_bytes(),
        f.leaf("e-caller").as_slice()
    );

    // Another workload's rotation changes nothing this caller sees.
    f.rotate("e-other");
    assert!(
        tokio::time::timeout(QUIET, stream.next()).await.is_err(),
        "a message was sent although this caller's SVIDs did not change"
    );

    let rotated = f.rotate("e-caller");
    let next = tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let svid = next.default_svid().unwrap();
    assert_eq!(svid.leaf().as_bytes(), rotated.as_slice());
    assert_key_matches_cert(svid.private_key().as_ref(), svid.leaf().as_bytes());

    f.update(|s| s.entries.retain(|e| e.id == "e-other"));
    let denied = tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap()
        .unwrap();
    assert!(is_no_identity(&denied.unwrap_err()));
    assert!(
        tokio::time::timeout(WAIT, stream.next())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn x509_fetch_waits_for_an_svid_not_yet_issued() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let f = Fixture::start(TestAttestor::AsIs).await;
    f.update(|s| s.svids.retain(|id, _| id == "e-other"));
    let client = f.spiffe_client().await;
    let fetch = tokio::spawn(async move { client.fetch_x509_svid().await });
    tokio::time::sleep(QUIET).await;
    assert!(!fetch.is_finished(), "answered before any SVID existed");

    let leaf = f.rotate("e-caller-admin");
    let svid = tokio::time::timeout(WAIT, fetch)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(svid.spiffe_id().to_string(), CALLER_ADMIN_ID);
    assert_eq!(svid.leaf().as_bytes(), leaf.as_slice());
}

#[tokio::test]
async fn x509_source_follows_a_rotation() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let f = Fixture::start(TestAttestor::AsIs).await;
    let source = tokio::time::timeout(
        WAIT,
        spiffe::X509Source::builder().endpoint(f.endpoint()).build(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        source.svid().unwrap().leaf().as_bytes(),
        f.leaf("e-caller").as_slice()
    );
    let mut updates = source.updated();
    let rotated = f.rotate("e-caller");
    tokio::time::timeout(WAIT, updates.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(source.svid().unwrap().leaf().as_bytes(), rotated.as_slice());
    source.shutdown().await;
}

#[tokio::test]
async fn a_caller_without_an_entry_gets_bundles_but_no_identity() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let f = Fixture::start(TestAttestor::AsUid(4243)).await;
    let client = f.spiffe_client().await;

    assert!(is_no_identity(&client.fetch_x509_svid().await.unwrap_err()));
    assert!(is_no_identity(
        &client.fetch_jwt_svid(["backend"], None).await.unwrap_err()
    ));
    assert_eq!(f.issuer.mints.load(Ordering::SeqCst), 0);

    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let x509 = client.fetch_x509_bundles().await.unwrap();
    assert_eq!(
        x509.get(&td).unwrap().authorities()[0].as_bytes(),
        f.ca.cert_der.as_slice()
    );
    let jwt = client.fetch_jwt_bundles().await.unwrap();
    assert!(
        jwt.get(&td)
            .unwrap()
            .find_jwt_authority(&f.ca.jwt_kid)
            .is_some()
    );
}

#[tokio::test]
async fn jwt_svid_is_minted_once_per_half_life_and_validates() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let f = Fixture::start(TestAttestor::AsIs).await;
    let client = f.spiffe_client().await;

    let svid = client.fetch_jwt_svid(["backend"], None).await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), CALLER_ID);
    assert_eq!(svid.hint(), Some("hint-e-caller"));
    // Without a spiffe_id the API mints for every identity of the caller; the client
    // picks the first.
    assert_eq!(f.issuer.mints.load(Ordering::SeqCst), 2);
    let again = client.fetch_jwt_svid(["backend"], None).await.unwrap();
    assert_eq!(again.token(), svid.token(), "the cached token is reused");
    assert_eq!(f.issuer.mints.load(Ordering::SeqCst), 2);

    let validated = client
        .validate_jwt_token("backend", svid.token())
        .await
        .unwrap();
    assert_eq!(validated.spiffe_id().to_string(), CALLER_ID);

    let mut raw = f.raw_client().await;
    let response = raw
        .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
            audience: "backend".into(),
            svid: svid.token().into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.spiffe_id, CALLER_ID);
    let claims = response.claims.unwrap().fields;
    assert_eq!(
        claims["sub"].kind,
        Some(prost_types::value::Kind::StringValue(CALLER_ID.into()))
    );
    assert!(matches!(
        claims["exp"].kind,
        Some(prost_types::value::Kind::NumberValue(_))
    ));

    let wrong = client
        .validate_jwt_token("someone-else", svid.token())
        .await
        .unwrap_err();
    assert!(wrong.is_invalid_argument(), "{wrong}");

    // Every identity of the caller, both served from the cache.
    let all = client.fetch_all_jwt_svids(["backend"], None).await.unwrap();
    let ids: Vec<String> = all.iter().map(|s| s.spiffe_id().to_string()).collect();
    assert_eq!(ids, [CALLER_ID, CALLER_ADMIN_ID]);
    assert_eq!(all[0].token(), svid.token());
    assert_eq!(f.issuer.mints.load(Ordering::SeqCst), 2);

    // Past half the lifetime, a fresh token is minted.
    f.clock.advance(JWT_TTL.as_secs() / 2 + 1);
    let fresh = client.fetch_jwt_svid(["backend"], None).await.unwrap();
    assert_ne!(fresh.token(), svid.token());
    assert_eq!(f.issuer.mints.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn jwt_svid_for_a_named_identity_is_limited_to_what_the_caller_holds() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let f = Fixture::start(TestAttestor::AsIs).await;
    let client = f.spiffe_client().await;

    let admin = spiffe::SpiffeId::new(CALLER_ADMIN_ID).unwrap();
    let all = client
        .fetch_all_jwt_svids(["backend"], Some(&admin))
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].spiffe_id(), &admin);

    let other = spiffe::SpiffeId::new(OTHER_ID).unwrap();
    let denied = client
        .fetch_jwt_svid(["backend"], Some(&other))
        .await
        .unwrap_err();
    assert!(is_no_identity(&denied), "{denied}");

    let mut raw = f.raw_client().await;
    for (audience, spiffe_id) in [
        (vec![], ""),
        (vec![String::new()], ""),
        (vec!["backend".to_owned()], "not-a-spiffe-id"),
    ] {
        let status = raw
            .fetch_jwtsvid(with_header(JwtsvidRequest {
                audience: audience.clone(),
                spiffe_id: spiffe_id.into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{audience:?} {spiffe_id}"
        );
    }
}

#[tokio::test]
async fn validation_rejects_tokens_it_cannot_vouch_for() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let f = Fixture::start(TestAttestor::AsIs).await;
    let mut raw = f.raw_client().await;
    let validate = |audience: &str, svid: &str| {
        with_header(ValidateJwtsvidRequest {
            audience: audience.into(),
            svid: svid.into(),
        })
    };

    // Signed by this trust domain's key, but for a subject in another trust domain.
    let foreign = f
        .issuer
        .authority
        .sign(
            "spiffe://elsewhere.org/x",
            &["backend".to_owned()],
            JWT_TTL,
            SystemTime::now(),
        )
        .unwrap();
    for (audience, svid, why) in [
        ("", "a.b.c", "audience must be specified"),
        ("backend", "", "svid must be specified"),
        ("backend", "not-a-jwt", "the JWT-SVID is not valid"),
        ("backend", foreign.as_str(), "elsewhere.org"),
    ] {
        let status = raw
            .validate_jwtsvid(validate(audience, svid))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(why), "{}", status.message());
    }
}

#[tokio::test]
async fn jwt_bundle_stream_follows_key_changes_only() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let f = Fixture::start(TestAttestor::AsIs).await;
    let mut stream = f.spiffe_client().await.stream_jwt_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let first = tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.get(&td).unwrap().jwt_authorities().count(), 1);

    f.rotate("e-caller");
    assert!(tokio::time::timeout(QUIET, stream.next()).await.is_err());

    let next_ca = generate_ca(
        "example.org",
        Duration::from_secs(86_400),
        SystemTime::now(),
    )
    .unwrap();
    f.update(|s| {
        let mut bundle = (*s.bundle).clone();
        bundle
            .jwt_keys
            .push((next_ca.jwt_kid.clone(), next_ca.jwt_public_spki.clone()));
        bundle.sequence += 1;
        s.bundle = Arc::new(bundle);
    });
    let next = tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let bundle = next.get(&td).unwrap();
    assert!(bundle.find_jwt_authority(&f.ca.jwt_kid).is_some());
    assert!(bundle.find_jwt_authority(&next_ca.jwt_kid).is_some());
}

#[tokio::test]
async fn requests_without_the_security_header_are_invalid() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let f = Fixture::start(TestAttestor::AsIs).await;
    let mut raw = f.raw_client().await;
    let statuses = [
        raw.fetch_x509svid(X509svidRequest {}).await.unwrap_err(),
        raw.fetch_x509_bundles(X509BundlesRequest {})
            .await
            .unwrap_err(),
        raw.fetch_jwt_bundles(JwtBundlesRequest {})
            .await
            .unwrap_err(),
        raw.fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["backend".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err(),
        raw.validate_jwtsvid(ValidateJwtsvidRequest {
            audience: "backend".into(),
            svid: "a.b.c".into(),
        })
        .await
        .unwrap_err(),
    ];
    for status in statuses {
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "security header missing from request");
    }
    let mut wrong_value = Request::new(X509svidRequest {});
    wrong_value
        .metadata_mut()
        .insert(WORKLOAD_HEADER, "yes".parse().unwrap());
    let status = raw.fetch_x509svid(wrong_value).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn failed_attestation_is_retryable_and_reveals_nothing() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let f = Fixture::start(TestAttestor::Failing).await;
    let mut raw = f.raw_client().await;
    let status = raw
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "workload attestation failed");
}

#[tokio::test]
async fn shutdown_ends_open_streams_with_unavailable() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut f = Fixture::start(TestAttestor::AsIs).await;
    let mut raw = f.raw_client().await;
    let mut stream = raw
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());

    let _ = f.shutdown.take().unwrap().send(());
    let served = tokio::time::timeout(WAIT, &mut f.server)
        .await
        .expect("shutdown waited on an open stream");
    served.unwrap().unwrap();
    let end = stream.message().await;
    assert!(
        matches!(&end, Err(s) if s.code() == Code::Unavailable),
        "{end:?}"
    );
}

#[tokio::test]
async fn bind_replaces_a_stale_socket_and_refuses_a_live_one() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run").join("mayfly").join("api.sock");

    let live = bind(&socket).unwrap();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o777);
    assert!(matches!(bind(&socket), Err(ServeError::SocketInUse(p)) if p == socket));

    // Dropping the listener leaves the file behind, as a crashed agent would.
    drop(live);
    assert!(socket.exists());
    let _rebound = bind(&socket).unwrap();
}

#[tokio::test]
async fn serve_removes_its_socket_on_the_way_out() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let f = Fixture::start(TestAttestor::AsIs).await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let api = WorkloadApi::new(
        f.state.subscribe(),
        Arc::new(TestAttestor::AsIs),
        f.issuer.clone(),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let path = socket.clone();
    let server = tokio::spawn(async move {
        serve(&path, api, async {
            let _ = stopped.await;
        })
        .await
    });
    wait_for_socket(&socket).await;
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix://{}", socket.display()))
        .await
        .unwrap();
    assert!(client.fetch_x509_svid().await.is_ok());
    let _ = stop.send(());
    tokio::time::timeout(WAIT, server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!socket.exists());
}

async fn wait_for_socket(path: &Path) {
    for _ in 0..200 {
        if UnixStream::connect(path).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never accepted a connection", path.display());
}

/// What a raw HTTP/2 request got back: the HTTP status, the headers, every data frame's
/// bytes run together, and the trailers (none for a headers-only answer).
struct RawAnswer {
    status: http::StatusCode,
    headers: http::HeaderMap,
    body: Vec<u8>,
    trailers: Option<http::HeaderMap>,
}

impl RawAnswer {
    /// The gRPC status code, from the trailers or, for a headers-only answer, the headers.
    fn grpc_status(&self) -> Option<&str> {
        self.trailers
            .as_ref()
            .unwrap_or(&self.headers)
            .get("grpc-status")
            .map(|v| v.to_str().unwrap())
    }
}

/// Sends one request as given, over HTTP/2 on a new connection to the fixture's socket,
/// and reads the whole answer.
async fn raw_call(
    f: &Fixture,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> RawAnswer {
    let stream = UnixStream::connect(&f.socket).await.unwrap();
    let (send, connection) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(connection);
    raw_call_on(send, method, path, headers, body).await
}

/// [`raw_call`] on a connection already open.
async fn raw_call_on(
    send: h2::client::SendRequest<bytes::Bytes>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> RawAnswer {
    let mut send = send.ready().await.unwrap();
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://workload.local{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (response, mut body_tx) = send
        .send_request(request.body(()).unwrap(), body.is_empty())
        .unwrap();
    if !body.is_empty() {
        body_tx.send_data(body.into(), true).unwrap();
    }
    let response = tokio::time::timeout(WAIT, response).await.unwrap().unwrap();
    let (parts, mut received) = response.into_parts();
    let mut body = Vec::new();
    while let Some(chunk) = tokio::time::timeout(WAIT, received.data()).await.unwrap() {
        let chunk = chunk.unwrap();
        let _ = received.flow_control().release_capacity(chunk.len());
        body.extend_from_slice(&chunk);
    }
    let trailers = tokio::time::timeout(WAIT, received.trailers())
        .await
        .unwrap()
        .unwrap();
    RawAnswer {
        status: parts.status,
        headers: parts.headers,
        body,
        trailers,
    }
}

/// A gRPC message: the uncompressed flag (or `compressed`), the length, the bytes.
fn grpc_message(bytes: &[u8], compressed: bool) -> Vec<u8> {
    let mut framed = vec![u8::from(compressed)];
    framed.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    framed.extend_from_slice(bytes);
    framed
}

const GRPC: [(&str, &str); 3] = [
    ("content-type", "application/grpc"),
    ("te", "trailers"),
    (WORKLOAD_HEADER, "true"),
];

#[tokio::test]
async fn what_is_not_grpc_gets_an_http_error_and_unknown_methods_are_unimplemented() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let f = Fixture::start(TestAttestor::AsIs).await;
    let x509 = "/SpiffeWorkloadAPI/FetchX509SVID";

    let get = raw_call(&f, "GET", x509, &GRPC, Vec::new()).await;
    assert_eq!(get.status, http::StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(get.headers["allow"], "POST");

    let json = [
        ("content-type", "application/json"),
        (WORKLOAD_HEADER, "true"),
    ];
    let wrong_type = raw_call(&f, "POST", x509, &json, grpc_message(&[], false)).await;
    assert_eq!(wrong_type.status, http::StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // Newer optional methods (FetchWITSVID) and anything else: Unimplemented, headers only.
    for path in [
        "/SpiffeWorkloadAPI/FetchWITSVID",
        "/grpc.health.v1.Health/Check",
    ] {
        let answer = raw_call(&f, "POST", path, &GRPC, grpc_message(&[], false)).await;
        assert_eq!(answer.status, http::StatusCode::OK);
        assert_eq!(answer.grpc_status(), Some("12"), "{path}");
        assert!(answer.trailers.is_none() && answer.body.is_empty());
        let message = answer.headers["grpc-message"].to_str().unwrap();
        assert!(message.contains("FetchWITSVID") || message.contains("Health"));
    }
}

#[tokio::test]
async fn malformed_requests_are_refused_by_name() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let f = Fixture::start(TestAttestor::AsIs).await;
    let jwt = "/SpiffeWorkloadAPI/FetchJWTSVID";
    let request = JwtsvidRequest {
        audience: vec!["backend".into()],
        spiffe_id: String::new(),
    };
    let encoded = prost::Message::encode_to_vec(&request);

    // The same request, well formed, is answered.
    let ok = raw_call(&f, "POST", jwt, &GRPC, grpc_message(&encoded, false)).await;
    assert_eq!(ok.grpc_status(), Some("0"));
    assert!(ok.body.len() > 5);

    let compressed = raw_call(
        &f,
        "POST",
        jwt,
        &[GRPC[0], GRPC[1], GRPC[2], ("grpc-encoding", "gzip")],
        grpc_message(&encoded, true),
    )
    .await;
    assert_eq!(compressed.grpc_status(), Some("12"));
    assert_eq!(compressed.headers["grpc-accept-encoding"], "identity");
    assert!(
        compressed.headers["grpc-message"]
            .to_str()
            .unwrap()
            .contains("gzip")
    );

    let huge = JwtsvidRequest {
        audience: vec!["a".repeat(grpc::MAX_REQUEST_BYTES)],
        spiffe_id: String::new(),
    };
    let too_large = raw_call(
        &f,
        "POST",
        jwt,
        &GRPC,
        grpc_message(&prost::Message::encode_to_vec(&huge), false),
    )
    .await;
    assert_eq!(too_large.grpc_status(), Some("11"));

    let mut two = grpc_message(&encoded, false);
    two.extend(grpc_message(&encoded, false));
    let two = raw_call(&f, "POST", jwt, &GRPC, two).await;
    assert_eq!(two.grpc_status(), Some("13"));

    let cut = grpc_message(&encoded, false);
    let cut = raw_call(&f, "POST", jwt, &GRPC, cut[..cut.len() - 1].to_vec()).await;
    assert_eq!(cut.grpc_status(), Some("13"));

    let none = raw_call(&f, "POST", jwt, &GRPC, Vec::new()).await;
    assert_eq!(none.grpc_status(), Some("13"));

    let garbage = raw_call(&f, "POST", jwt, &GRPC, grpc_message(&[0xff; 8], false)).await;
    assert_eq!(garbage.grpc_status(), Some("13"));

    let bad_timeout = [GRPC[0], GRPC[1], GRPC[2], ("grpc-timeout", "soon")];
    let bad_timeout = raw_call(&f, "POST", jwt, &bad_timeout, grpc_message(&encoded, false)).await;
    assert_eq!(bad_timeout.grpc_status(), Some("3"));

    // None of it disturbed the server.
    let again = raw_call(&f, "POST", jwt, &GRPC, grpc_message(&encoded, false)).await;
    assert_eq!(again.grpc_status(), Some("0"));
}

#[tokio::test]
async fn a_stream_ends_with_deadline_exceeded_when_its_grpc_timeout_passes() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let f = Fixture::start(TestAttestor::AsIs).await;
    let headers = [GRPC[0], GRPC[1], GRPC[2], ("grpc-timeout", "300m")];
    let started = std::time::Instant::now();
    let answer = raw_call(
        &f,
        "POST",
        "/SpiffeWorkloadAPI/FetchX509SVID",
        &headers,
        grpc_message(&[], false),
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(answer.headers["content-type"], "application/grpc");
    // The first message came, whole, before the deadline ended the stream.
    let len = u32::from_be_bytes(answer.body[1..5].try_into().unwrap()) as usize;
    assert_eq!(answer.body.len(), 5 + len);
    let response: X509svidResponse = prost::Message::decode(&answer.body[5..]).unwrap();
    assert_eq!(response.svids.len(), 2);
    assert_eq!(answer.grpc_status(), Some("4"));
}

#[tokio::test]
async fn calls_after_the_first_on_one_connection_are_answered() {
    // The agent asks workloads to keep no HPACK table (SETTINGS_HEADER_TABLE_SIZE 0) and
    // drops what the first request put there once they acknowledge: every later request
    // opens with a table size update, and must still be understood.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let f = Fixture::start(TestAttestor::AsIs).await;
    let stream = UnixStream::connect(&f.socket).await.unwrap();
    let (send, connection) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(connection);
    let request = JwtsvidRequest {
        audience: vec!["backend".into()],
        spiffe_id: String::new(),
    };
    let body = grpc_message(&prost::Message::encode_to_vec(&request), false);
    for call in 0..4 {
        let answer = raw_call_on(
            send.clone(),
            "POST",
            "/SpiffeWorkloadAPI/FetchJWTSVID",
            &GRPC,
            body.clone(),
        )
        .await;
        assert_eq!(answer.grpc_status(), Some("0"), "call {call}");
        let response: JwtsvidResponse = prost::Message::decode(&answer.body[5..]).unwrap();
        assert_eq!(response.svids.len(), 2, "call {call}");
    }
}

fn credential_request(name: &str, spiffe_id: &str) -> GetCredentialRequest {
    GetCredentialRequest {
        name: name.into(),
        spiffe_id: spiffe_id.into(),
        ttl_seconds: 0,
    }
}

#[tokio::test]
async fn a_credential_goes_to_the_spiffe_id_named_and_is_reused() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let f = Fixture::start(TestAttestor::AsIs).await;
    let mut client = f.credentials_client().await;

    // The caller holds two SPIFFE IDs: it must say which asks.
    let status = client
        .get_credential(with_header(credential_request("orders-db", "")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains(CALLER_ID) && status.message().contains(CALLER_ADMIN_ID),
        "{}",
        status.message()
    );

    let first = client
        .get_credential(with_header(credential_request("orders-db", CALLER_ID)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.spiffe_id, CALLER_ID);
    assert_eq!(first.values["username"], "v_1");
    assert_eq!(first.kind, "postgres_dynamic");
    let again = client
        .get_credential(with_header(credential_request("orders-db", CALLER_ID)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.lease_id, first.lease_id, "served from the cache");
    {
        let asked = f.credential_issuer.asked.lock().unwrap();
        assert_eq!(asked.len(), 1);
        assert_eq!(asked[0].spiffe_id, CALLER_ID);
    }

    // An identity of someone else's entry is refused here, before the daemon is asked.
    let status = client
        .get_credential(with_header(credential_request("orders-db", OTHER_ID)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains(error::NO_IDENTITY_ISSUED),
        "{}",
        status.message()
    );
    assert!(status.message().contains(OTHER_ID), "{}", status.message());
    assert_eq!(f.credential_issuer.asked.lock().unwrap().len(), 1);

    // Without the security header nothing is looked at.
    let status = client
        .get_credential(credential_request("orders-db", CALLER_ID))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "security header missing from request");
}

#[tokio::test]
async fn a_caller_with_one_identity_need_not_name_it_and_refusals_pass_through() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let f = Fixture::start(TestAttestor::AsUid(4242)).await;
    let mut client = f.credentials_client().await;
    let credential = client
        .get_credential(with_header(credential_request("orders-db", "")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(credential.spiffe_id, OTHER_ID);

    let status = client
        .get_credential(with_header(credential_request("not-granted", "")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("not granted"),
        "{}",
        status.message()
    );

    let status = client
        .get_credential(with_header(GetCredentialRequest {
            ttl_seconds: -5,
            ..credential_request("orders-db", "")
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_caller_without_an_entry_gets_no_credential() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let f = Fixture::start(TestAttestor::AsUid(31337)).await;
    let status = f
        .credentials_client()
        .await
        .get_credential(with_header(credential_request("orders-db", "")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains(error::NO_IDENTITY_ISSUED),
        "{}",
        status.message()
    );
    assert!(f.credential_issuer.asked.lock().unwrap().is_empty());
}

/// A set the daemon would push: the built-in policies and `text`.
fn pushed_policy(text: &str) -> Arc<crate::policy::AgentPolicy> {
    use mayfly_common::policy::{DEFAULTS, DEFAULTS_NAME};
    let source = |name: &str, text: &str| mayfly_proto::v1::PolicySource {
        name: name.into(),
        text: text.into(),
    };
    let pushed = mayfly_proto::v1::PolicySet {
        hash: format!("test-{}", text.len()),
        enforce: true,
        sources: vec![source(DEFAULTS_NAME, DEFAULTS), source("extra.cedar", text)],
        json: String::new(),
    };
    Arc::new(crate::policy::AgentPolicy::compile(&pushed).expect("the test policy compiles"))
}

#[tokio::test]
async fn a_forbid_pushed_later_stops_a_cached_credential_without_the_daemon() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let f = Fixture::start(TestAttestor::AsIs).await;
    let mut client = f.credentials_client().await;
    let first = client
        .get_credential(with_header(credential_request("orders-db", CALLER_ID)))
        .await
        .unwrap()
        .into_inner();

    // A set about other credentials changes nothing.
    f.update(|s| {
        s.policy = Some(pushed_policy(
            r#"@id("staging-off") forbid(principal, action == Mayfly::Action::"obtain_credential", resource in Mayfly::CredentialSet::"staging");"#,
        ))
    });
    let again = client
        .get_credential(with_header(credential_request("orders-db", CALLER_ID)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.lease_id, first.lease_id);

    // One about the set this credential is in refuses it, from the cache, naming the policy.
    f.update(|s| {
        s.policy = Some(pushed_policy(
            r#"@id("prod-frozen") forbid(principal, action == Mayfly::Action::"obtain_credential", resource in Mayfly::CredentialSet::"prod") when { context.ttl_seconds == 0 };"#,
        ))
    });
    let status = client
        .get_credential(with_header(credential_request("orders-db", CALLER_ID)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("prod-frozen"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("orders-db"),
        "{}",
        status.message()
    );
    assert_eq!(
        f.credential_issuer.asked.lock().unwrap().len(),
        1,
        "decided at the agent: the daemon was asked once, for the first"
    );

    // The context is the request's: another TTL is not covered by that policy.
    let mut other_ttl = credential_request("orders-db", CALLER_ID);
    other_ttl.ttl_seconds = 300;
    client
        .get_credential(with_header(other_ttl))
        .await
        .expect("a request the policy does not cover");
}

//! The foundation end to end: a real `mayflyd` process, its operator CLI, and a test
//! client playing the agent over real gRPC + mTLS.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::Code;
use x509_parser::prelude::{FromDer, X509Certificate};

use mayfly_common::tls::peer_identity;
use mayfly_daemon::ca::{SvidRequest, X509Authority, generate_ca, generate_csr};
use mayfly_proto::v1::{self, sync_message::Update};
use mayfly_tests::harness::{DaemonOptions, DaemonProcess, Immutable, csr_request, init};
use mayfly_tests::pg::TestDatabase;

const AGENT_A: &str = "spiffe://example.org/node/a";
const AGENT_B: &str = "spiffe://example.org/node/b";

fn create_entry(daemon: &DaemonProcess, spiffe_id: &str, parent: &str, uid: u32) -> String {
    let selector = format!("unix:uid:{uid}");
    daemon
        .create_entry(
            spiffe_id,
            parent,
            &selector,
            &["--x509-ttl", "10m", "--dns", "web.example.org"],
        )
        .unwrap()
}

fn agents(daemon: &DaemonProcess) -> Vec<serde_json::Value> {
    daemon
        .cli_json(&["agent", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn entries(daemon: &DaemonProcess) -> Vec<serde_json::Value> {
    daemon
        .cli_json(&["entry", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

async fn next_update(stream: &mut tonic::Streaming<v1::SyncMessage>) -> Update {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a sync message within 5 s")
        .expect("stream open")
        .expect("no error")
        .update
        .expect("an update")
}

#[tokio::test]
async fn agent_attests_signs_svids_and_hears_entry_changes() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let agent = daemon.attest(AGENT_A).await.unwrap();
    assert_eq!(agent.spiffe_id, AGENT_A);
    let me = peer_identity(&agent.chain[0]).unwrap();
    assert_eq!(me.spiffe_id.as_str(), AGENT_A);
    let listed = agents(&daemon);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["serial"], me.serial);
    assert_eq!(listed[0]["status"], "active");

    let first = create_entry(&daemon, "spiffe://example.org/web", AGENT_A, 1000);
    let mut node = daemon.node(&agent).await.unwrap();
    let mut stream = node.sync(v1::SyncRequest {}).await.unwrap().into_inner();
    match next_update(&mut stream).await {
        Update::FullState(state) => {
            assert_eq!(state.entries.len(), 1);
            assert_eq!(state.entries[0].id, first);
            assert_eq!(state.bundle.unwrap().x509_authorities.len(), 1);
        }
        other => panic!("expected full state first, got {other:?}"),
    }

    let signed = node
        .sign_svids(csr_request(&first))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(signed.svids.len(), 1);
    let svid = &signed.svids[0];
    assert_eq!(svid.spiffe_id, "spiffe://example.org/web");
    let leaf = peer_identity(&svid.svid_chain[0]).unwrap();
    assert_eq!(leaf.spiffe_id.as_str(), "spiffe://example.org/web");
    assert_eq!(leaf.serial, svid.serial);
    let (_, cert) = X509Certificate::from_der(&svid.svid_chain[0]).unwrap();
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!(
        (600..=620).contains(&lifetime),
        "entry TTL 10m honoured, got {lifetime}s"
    );
    let bundle = daemon.bundle().unwrap();
    let (_, ca) = X509Certificate::from_der(&bundle[0]).unwrap();
    assert_eq!(cert.issuer(), ca.subject());
    cert.verify_signature(Some(ca.public_key())).unwrap();

    let second = create_entry(&daemon, "spiffe://example.org/db", AGENT_A, 1001);
    match next_update(&mut stream).await {
        Update::EntryUpserted(entry) => assert_eq!(entry.id, second),
        other => panic!("expected the new entry, got {other:?}"),
    }
    daemon.cli_ok(&["entry", "delete", &second]).unwrap();
    match next_update(&mut stream).await {
        Update::EntryDeleted(id) => assert_eq!(id, second),
        other => panic!("expected the deletion, got {other:?}"),
    }
    let gone = node.sign_svids(csr_request(&second)).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
}

/// The `svid.sign` records on the trail.
fn sign_records(daemon: &DaemonProcess) -> Vec<serde_json::Value> {
    daemon
        .cli_json(&["audit", "list", "--action", "svid.sign"])
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn svids_whose_record_cannot_be_committed_are_never_handed_out() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let agent = daemon.attest(AGENT_A).await.unwrap();
    let entry = create_entry(&daemon, "spiffe://example.org/web", AGENT_A, 1000);
    let mut node = daemon.node(&agent).await.unwrap();
    let first = node
        .sign_svids(csr_request(&entry))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sign_records(&daemon).len(), 1);

    // The write-ahead log every commit goes through can no longer be written: the audit
    // record and the serial of the next SVID cannot be made durable. The SVID is signed
    // by then, and must not leave.
    let wal = daemon.data_dir().join("mayfly.db-wal");
    assert!(wal.exists(), "the datastore runs in WAL mode");
    let locked = Immutable::set(wal);
    let refused = node.sign_svids(csr_request(&entry)).await;
    drop(locked);
    let refused = refused.expect_err("an SVID left without its record");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("could not record the signed SVIDs"),
        "{refused:?}"
    );
    assert!(
        daemon.log().contains("refusing to hand them out"),
        "the operator is told: {}",
        daemon.log()
    );
    assert_eq!(sign_records(&daemon).len(), 1, "nothing half-recorded");

    // Once the disk takes writes again, signing resumes on the same chain, intact.
    let again = node
        .sign_svids(csr_request(&entry))
        .await
        .unwrap()
        .into_inner();
    let records = sign_records(&daemon);
    assert_eq!(records.len(), 2);
    let trail = serde_json::Value::Array(records).to_string();
    for signed in [&first.svids[0], &again.svids[0]] {
        assert!(
            trail.contains(&signed.serial),
            "{} on the trail",
            signed.serial
        );
    }
    let verified = daemon.cli_ok(&["audit", "verify"]).unwrap();
    assert!(verified.starts_with("audit log intact"), "{verified}");
}

#[tokio::test]
async fn join_tokens_are_single_use_and_expire() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let token = daemon.join_token(AGENT_A).unwrap();
    let attest = |token: String| {
        let daemon = &daemon;
        async move {
            let (_key, csr) = generate_csr(None).unwrap();
            daemon
                .anonymous_node()
                .await
                .unwrap()
                .attest(v1::AttestRequest {
                    join_token: token,
                    csr,
                })
                .await
        }
    };
    attest(token.clone()).await.unwrap();
    let reused = attest(token).await.unwrap_err();
    assert_eq!(reused.code(), Code::PermissionDenied);
    assert!(
        reused.message().contains("already used"),
        "{}",
        reused.message()
    );

    let short = daemon
        .cli_json(&["token", "generate", "--spiffe-id", AGENT_B, "--ttl", "1s"])
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = attest(short).await.unwrap_err();
    assert_eq!(expired.code(), Code::PermissionDenied);
    assert!(
        expired.message().contains("expired"),
        "{}",
        expired.message()
    );

    let unknown = attest("not-a-token".into()).await.unwrap_err();
    assert_eq!(unknown.code(), Code::PermissionDenied);
    assert_eq!(
        agents(&daemon).len(),
        1,
        "refused attestations register nothing"
    );
}

#[tokio::test]
async fn bad_csrs_are_refused_and_change_nothing() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let token = daemon.join_token(AGENT_A).unwrap();
    let mut anonymous = daemon.anonymous_node().await.unwrap();

    let (_key, good) = generate_csr(None).unwrap();
    let mut tampered = good.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let wants_ca = ca_params.serialize_request(&key).unwrap().der().to_vec();
    let mut san_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    san_params.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from("spiffe://example.org/admin").unwrap(),
    )];
    let extra_san = san_params.serialize_request(&key).unwrap().der().to_vec();

    for (what, csr) in [
        ("malformed", b"definitely not DER".to_vec()),
        ("bad signature", tampered),
        ("asks for cA=true", wants_ca),
        ("asks for another SAN", extra_san),
    ] {
        let refused = anonymous
            .attest(v1::AttestRequest {
                join_token: token.clone(),
                csr,
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{what}: {refused:?}");
        assert!(!refused.message().is_empty());
    }
    assert!(agents(&daemon).is_empty(), "no agent was registered");

    // The token was never consumed, so the legitimate agent still gets in.
    anonymous
        .attest(v1::AttestRequest {
            join_token: token,
            csr: good,
        })
        .await
        .unwrap();
    assert_eq!(agents(&daemon).len(), 1);
}

#[tokio::test]
async fn agents_get_only_their_own_entries() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let a = daemon.attest(AGENT_A).await.unwrap();
    let b = daemon.attest(AGENT_B).await.unwrap();
    let mine = create_entry(&daemon, "spiffe://example.org/a-app", AGENT_A, 1000);
    let theirs = create_entry(&daemon, "spiffe://example.org/b-app", AGENT_B, 1000);
    let mut node = daemon.node(&a).await.unwrap();

    let mut batch = csr_request(&mine);
    batch.csrs.extend(csr_request(&theirs).csrs);
    let refused = node.sign_svids(batch).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains(&theirs), "{}", refused.message());

    let missing = node
        .sign_svids(csr_request("no-such-entry"))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let mut stream = node.sync(v1::SyncRequest {}).await.unwrap().into_inner();
    match next_update(&mut stream).await {
        Update::FullState(state) => {
            let ids: Vec<_> = state.entries.iter().map(|e| e.id.clone()).collect();
            assert_eq!(ids, vec![mine.clone()]);
        }
        other => panic!("expected full state, got {other:?}"),
    }
    // A batch of several CSRs for its own entries is signed whole.
    let mut batch = csr_request(&mine);
    batch.csrs.extend(csr_request(&mine).csrs);
    let signed = node.sign_svids(batch).await.unwrap().into_inner();
    assert_eq!(signed.svids.len(), 2);
    assert_ne!(signed.svids[0].serial, signed.svids[1].serial);

    // Once one SVID of each agent is revoked, a reconnecting agent's deny list has its own
    // serial only: it never holds the other's.
    let mine_serial = signed.svids[0].serial.clone();
    let mut b_node = daemon.node(&b).await.unwrap();
    let theirs_serial = b_node
        .sign_svids(csr_request(&theirs))
        .await
        .unwrap()
        .into_inner()
        .svids[0]
        .serial
        .clone();
    for serial in [&mine_serial, &theirs_serial] {
        let out = daemon
            .cli(&[
                "revoke", "svid", "--serial", serial, "--reason", "test", "--wait", "0s",
            ])
            .unwrap();
        // Recorded; exit 3 because no agent here acknowledges.
        assert_eq!(out.status.code(), Some(3), "{out:?}");
    }
    let deny_list = |update: Update| match update {
        Update::FullState(state) => state
            .deny_list
            .into_iter()
            .map(|line| line.serial)
            .collect::<Vec<_>>(),
        other => panic!("expected full state, got {other:?}"),
    };
    let mut again = node.sync(v1::SyncRequest {}).await.unwrap().into_inner();
    assert_eq!(deny_list(next_update(&mut again).await), vec![mine_serial]);
    let mut b_stream = b_node.sync(v1::SyncRequest {}).await.unwrap().into_inner();
    assert_eq!(
        deny_list(next_update(&mut b_stream).await),
        vec![theirs_serial]
    );
}

#[tokio::test]
async fn evicted_and_banned_agents_are_cut_off_at_once() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let agent = daemon.attest(AGENT_A).await.unwrap();
    let entry = create_entry(&daemon, "spiffe://example.org/web", AGENT_A, 1000);
    let mut node = daemon.node(&agent).await.unwrap();
    let mut stream = node.sync(v1::SyncRequest {}).await.unwrap().into_inner();
    assert!(matches!(
        next_update(&mut stream).await,
        Update::FullState(_)
    ));

    daemon
        .cli_ok(&["agent", "evict", AGENT_A, "--reason", "test"])
        .unwrap();
    match next_update(&mut stream).await {
        Update::Evicted(evicted) => {
            assert!(!evicted.banned);
            assert_eq!(evicted.reason, "test");
        }
        other => panic!("expected eviction, got {other:?}"),
    }
    let refused = node.sign_svids(csr_request(&entry)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // Eviction is not a ban: a new token brings the agent back.
    let again = daemon.attest(AGENT_A).await.unwrap();
    let mut node = daemon.node(&again).await.unwrap();
    node.sign_svids(csr_request(&entry)).await.unwrap();
    // The superseded SVID no longer opens the door.
    let mut stale = daemon.node(&agent).await.unwrap();
    let stale_err = stale.sign_svids(csr_request(&entry)).await.unwrap_err();
    assert_eq!(stale_err.code(), Code::Unauthenticated, "{stale_err:?}");

    daemon.cli_ok(&["agent", "ban", AGENT_A]).unwrap();
    let banned = node.sign_svids(csr_request(&entry)).await.unwrap_err();
    assert_eq!(banned.code(), Code::PermissionDenied);
    let rejoin = daemon.attest(AGENT_A).await.unwrap_err();
    assert!(rejoin.to_string().contains("banned"), "{rejoin}");
    assert_eq!(agents(&daemon)[0]["status"], "banned");
}

#[tokio::test]
async fn invalid_entries_are_refused_by_the_cli() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "--spiffe-id",
                "spiffe://Example.org/web",
                "--parent-id",
                AGENT_A,
                "--selector",
                "unix:uid:1",
            ],
            "lowercase",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://other.org/web",
                "--parent-id",
                AGENT_A,
                "--selector",
                "unix:uid:1",
            ],
            "trust domain",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/a/../b",
                "--parent-id",
                AGENT_A,
                "--selector",
                "unix:uid:1",
            ],
            "spiffe_id",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org",
                "--parent-id",
                AGENT_A,
                "--selector",
                "unix:uid:1",
            ],
            "path",
        ),
        (
            &[
                "--spiffe-id",
                "spiffe://example.org/web",
                "--parent-id",
                AGENT_A,
                "--selector",
                "k8s:ns:x",
            ],
            "selector",
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec!["entry", "create"];
        all.extend_from_slice(args);
        let out = daemon.cli(&all).unwrap();
        assert!(!out.status.success(), "{all:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(stderr.contains(needle), "{all:?}: {stderr}");
    }
    assert!(entries(&daemon).is_empty(), "nothing was stored");
}

#[tokio::test]
async fn client_certificates_from_another_trust_domain_are_refused() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let foreign = generate_ca(
        "other.org",
        Duration::from_secs(3600),
        std::time::SystemTime::now(),
    )
    .unwrap();
    let authority = X509Authority::new(&foreign.cert_der, &foreign.key_pkcs8).unwrap();
    let (key, csr) = generate_csr(None).unwrap();
    let issued = authority
        .sign_svid(
            &csr,
            &SvidRequest {
                spiffe_id: "spiffe://other.org/node/a",
                dns_names: &[],
                ip_addresses: &[],
                ttl: Duration::from_secs(600),
            },
            std::time::SystemTime::now(),
        )
        .unwrap();
    let impostor = mayfly_tests::harness::AgentIdentity {
        spiffe_id: "spiffe://other.org/node/a".into(),
        chain: vec![issued.cert_der],
        key: key.to_vec(),
        bundle: daemon.bundle().unwrap(),
    };
    let outcome = match daemon.node(&impostor).await {
        Ok(mut node) => node
            .sync(v1::SyncRequest {})
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(outcome.is_err(), "a foreign client certificate got through");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        daemon.log().contains("TLS handshake refused"),
        "the daemon logs why: {}",
        daemon.log()
    );
    assert!(agents(&daemon).is_empty());
}

#[tokio::test]
async fn oversized_messages_are_refused() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions {
        extra_toml: "max_message_bytes = 65536\n".into(),
        ..DaemonOptions::default()
    })
    .unwrap();
    let agent = daemon.attest(AGENT_A).await.unwrap();
    let mut node = daemon.node(&agent).await.unwrap();
    let huge = v1::SignSvidsRequest {
        csrs: vec![v1::SvidCsr {
            entry_id: "x".into(),
            csr: vec![0u8; 200_000],
        }],
    };
    let refused = node.sign_svids(huge).await.unwrap_err();
    assert!(
        matches!(refused.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{refused:?}"
    );
    // The connection and the agent are still fine afterwards.
    let entry = create_entry(&daemon, "spiffe://example.org/web", AGENT_A, 1000);
    node.sign_svids(csr_request(&entry)).await.unwrap();
}

#[test]
fn a_broken_config_names_the_file_line_and_key() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.toml");
    std::fs::write(
        &path,
        "trust_domain = \"example.org\"\n[svid]\nx509_ttl = \"1h\"\nx509_tll = \"2h\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(mayfly_tests::harness::binary("mayflyd").unwrap())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(stderr.contains("line 4"), "{stderr}");
    assert!(stderr.contains("x509_tll"), "{stderr}");
}

#[tokio::test]
async fn ca_prepare_and_activate_rotate_the_signing_key() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let agent = daemon.attest(AGENT_A).await.unwrap();
    let entry = create_entry(&daemon, "spiffe://example.org/web", AGENT_A, 1000);
    let mut node = daemon.node(&agent).await.unwrap();
    let mut stream = node.sync(v1::SyncRequest {}).await.unwrap().into_inner();
    assert!(matches!(
        next_update(&mut stream).await,
        Update::FullState(_)
    ));

    let slots = daemon.cli_json(&["ca", "show"]).unwrap();
    assert_eq!(slots.as_array().unwrap().len(), 1);
    assert_eq!(slots[0]["state"], "active");
    let old_ca = daemon.bundle().unwrap()[0].clone();

    daemon.cli_ok(&["ca", "prepare"]).unwrap();
    assert_eq!(
        daemon.bundle().unwrap().len(),
        2,
        "prepared CA is published early"
    );
    match next_update(&mut stream).await {
        Update::BundleChanged(bundle) => assert_eq!(bundle.x509_authorities.len(), 2),
        other => panic!("expected a bundle change, got {other:?}"),
    }
    let before = node
        .sign_svids(csr_request(&entry))
        .await
        .unwrap()
        .into_inner();
    let (_, leaf) = X509Certificate::from_der(&before.svids[0].svid_chain[0]).unwrap();
    let (_, old) = X509Certificate::from_der(&old_ca).unwrap();
    assert_eq!(
        leaf.issuer(),
        old.subject(),
        "still signing with the active CA"
    );

    let again = daemon.cli(&["ca", "prepare"]).unwrap();
    assert!(!again.status.success(), "only one prepared CA at a time");

    daemon.cli_ok(&["ca", "activate"]).unwrap();
    let slots = daemon.cli_json(&["ca", "show"]).unwrap();
    let states: Vec<_> = slots
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap().to_string())
        .collect();
    assert!(
        states.contains(&"active".to_string()) && states.contains(&"retired".to_string()),
        "{states:?}"
    );
    match next_update(&mut stream).await {
        Update::BundleChanged(bundle) => assert_eq!(bundle.x509_authorities.len(), 2),
        other => panic!("expected a bundle change, got {other:?}"),
    }
    let after = node
        .sign_svids(csr_request(&entry))
        .await
        .unwrap()
        .into_inner();
    let (_, leaf) = X509Certificate::from_der(&after.svids[0].svid_chain[0]).unwrap();
    assert_ne!(leaf.issuer(), old.subject(), "signing moved to the new CA");
    let nothing = daemon.cli(&["ca", "activate"]).unwrap();
    assert!(!nothing.status.success());
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("no prepared CA"));
}

#[tokio::test]
async fn restart_keeps_the_ca_entries_and_agents() {
    init();
    let mut daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let agent = daemon.attest(AGENT_A).await.unwrap();
    let entry = create_entry(&daemon, "spiffe://example.org/web", AGENT_A, 1000);
    let bundle = daemon.bundle().unwrap();
    let key_dir = daemon.data_dir().join("ca");
    for file in std::fs::read_dir(&key_dir).unwrap() {
        let mode = file.unwrap().metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "CA key files are private");
    }
    let sock_mode = std::fs::metadata(&daemon.admin_socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(sock_mode, 0o600, "admin socket is private");

    daemon.kill();
    daemon.spawn().unwrap();
    assert_eq!(daemon.bundle().unwrap(), bundle, "same CA after restart");
    let mut node = daemon.node(&agent).await.unwrap();
    node.sign_svids(csr_request(&entry)).await.unwrap();
}

#[tokio::test]
async fn the_admin_socket_refuses_other_users() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    // Let `nobody` reach the socket path so the socket's own mode is what stops it.
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(mayfly_tests::harness::binary("mayflyd").unwrap())
        .args(["entry", "list"])
        .env("MAYFLY_ADMIN_SOCKET", &daemon.admin_socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "uid 65534 must not administer the daemon"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.to_lowercase().contains("permission denied"),
        "{stderr}"
    );
}

/// An operator's typo (`chmod 666` on the socket) does not open the daemon: every admin
/// method is gated on the caller's uid, and each refusal is on the audit trail.
#[tokio::test]
async fn a_socket_opened_to_everyone_still_refuses_other_users_on_every_method() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&daemon.admin_socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let before = daemon.cli_json(&["entry", "list"]).unwrap();
    for (args, method) in [
        (&["entry", "list"][..], "list_entries"),
        (
            &[
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/evil",
                "--parent-id",
                "spiffe://example.org/node/x",
                "--selector",
                "unix:uid:0",
            ][..],
            "create_entry",
        ),
        (&["secret", "get", "anything"][..], "get_secret_value"),
        (&["audit", "verify"][..], "verify_audit"),
    ] {
        let out = std::process::Command::new(mayfly_tests::harness::binary("mayflyd").unwrap())
            .args(args)
            .env("MAYFLY_ADMIN_SOCKET", &daemon.admin_socket)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must be refused");
        assert!(
            stderr.contains("uid 65534 may not administer this daemon"),
            "{args:?}: {stderr}"
        );
        mayfly_tests::harness::wait_for(
            &format!("the {method} refusal on the audit trail"),
            Duration::from_secs(10),
            || {
                daemon
                    .cli_json(&["audit", "list", "--action", "admin.denied"])
                    .unwrap()
                    .to_string()
                    .contains(&format!("\"{method}\""))
            },
        );
    }
    assert_eq!(
        daemon.cli_json(&["entry", "list"]).unwrap(),
        before,
        "nothing was created"
    );
}

#[tokio::test]
async fn postgres_datastore_serves_the_same_flows() {
    init();
    let db = TestDatabase::create().await.unwrap();
    let mut daemon = DaemonProcess::start(DaemonOptions {
        datastore_url: db.url.clone(),
        ..DaemonOptions::default()
    })
    .unwrap();
    let agent = daemon.attest(AGENT_A).await.unwrap();
    let entry = create_entry(&daemon, "spiffe://example.org/web", AGENT_A, 1000);
    daemon.kill();
    daemon.spawn().unwrap();
    let mut node = daemon.node(&agent).await.unwrap();
    let signed = node
        .sign_svids(csr_request(&entry))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(signed.svids[0].spiffe_id, "spiffe://example.org/web");
    assert_eq!(entries(&daemon).len(), 1);
    drop(daemon);
    db.drop_database().await.unwrap();
}

#[tokio::test]
async fn secrets_never_reach_the_log_or_the_cli() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let token = daemon.join_token(AGENT_A).unwrap();
    let (_key, csr) = generate_csr(None).unwrap();
    let mut anonymous = daemon.anonymous_node().await.unwrap();
    anonymous
        .attest(v1::AttestRequest {
            join_token: token.clone(),
            csr: csr.clone(),
        })
        .await
        .unwrap();
    // A replay is refused and logged, still without the token.
    anonymous
        .attest(v1::AttestRequest {
            join_token: token.clone(),
            csr,
        })
        .await
        .unwrap_err();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = daemon.log();
    assert!(log.contains("attestation refused"), "the refusal is logged");
    assert!(!log.contains(&token), "the join token leaked into the log");

    let mut key_material = Vec::new();
    for file in std::fs::read_dir(daemon.data_dir().join("ca")).unwrap() {
        key_material.push(std::fs::read(file.unwrap().path()).unwrap());
    }
    let ca_json = daemon.cli_ok(&["ca", "show", "--output", "json"]).unwrap();
    let jwks = daemon
        .cli_ok(&["bundle", "show", "--format", "jwks"])
        .unwrap();
    for text in [&log, &ca_json, &jwks] {
        assert!(!text.contains("PRIVATE KEY"));
        for key in &key_material {
            let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, key);
            assert!(!text.contains(&b64[..40]), "CA key material leaked");
            assert!(!text.contains(&hex::encode(&key[key.len() - 32..])));
        }
    }
}

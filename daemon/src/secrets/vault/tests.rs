//! Against a real OpenBao dev server (`bao` on PATH): one shared plain-http server for the
//! suite, started on first use, and one https server for the CA bundle test.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::OnceCell;

use super::client::VaultHttp;
use super::*;

const ROOT: &str = "root";

fn setup() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The shared server's address. Its process lives in a thread that never ends, and dies
/// with the test binary through PR_SET_PDEATHSIG.
async fn shared_bao() -> &'static str {
    static ADDRESS: OnceCell<String> = OnceCell::const_new();
    ADDRESS
        .get_or_init(|| async {
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                // The death signal fires when the thread that spawned the child exits, so
                // this thread spawns it and then lives as long as the server does.
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let mut bao = runtime.block_on(BaoProcess::start(false));
                let _ = tx.send(bao.address.clone());
                let _ = bao.child.wait();
            });
            rx.await.expect("bao keeper thread")
        })
        .await
}

/// A dev server with its own HOME, killed when dropped.
struct BaoProcess {
    child: Child,
    address: String,
    ca_pem: Option<String>,
    _home: TempDir,
}

impl BaoProcess {
    /// Starts a server and waits until its KV mount answers. Retries on new ports when
    /// the server exits early: another test binary may take a port between our check and
    /// bao's bind.
    async fn start(tls: bool) -> Self {
        let mut logs = String::new();
        for _ in 0..3 {
            match Self::try_start(tls).await {
                Ok(bao) => return bao,
                Err(log) => logs.push_str(&log),
            }
        }
        panic!("bao did not start: {logs}");
    }

    async fn try_start(tls: bool) -> Result<Self, String> {
        let home = TempDir::new().expect("tempdir");
        let port = free_port_pair();
        let log_path = home.path().join("bao.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = Command::new("bao");
        cmd.args([
            "server",
            "-dev",
            "-dev-root-token-id=root",
            "-dev-no-store-token",
            &format!("-dev-listen-address=127.0.0.1:{port}"),
        ]);
        let certs = home.path().join("certs");
        if tls {
            std::fs::create_dir(&certs).expect("certs dir");
            cmd.arg("-dev-tls")
                .arg(format!("-dev-tls-cert-dir={}", certs.display()));
        }
        cmd.env("HOME", home.path())
            .env_remove("VAULT_ADDR")
            .env_remove("BAO_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        crate::sys::die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .expect("start `bao` (export PATH=/work/main/.venv/bin:$PATH)");
        let scheme = if tls { "https" } else { "http" };
        let mut bao = Self {
            child,
            address: format!("{scheme}://127.0.0.1:{port}"),
            ca_pem: None,
            _home: home,
        };
        let failed = |bao: &mut Self, why: &str| {
            let _ = bao.child.kill();
            let _ = bao.child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            Err(format!("{why}:\n{log}\n"))
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let ca_path = certs.join("vault-ca.pem");
        let mut http = None;
        loop {
            if let Ok(Some(status)) = bao.child.try_wait() {
                return failed(&mut bao, &format!("bao exited with {status}"));
            }
            if Instant::now() > deadline {
                return failed(&mut bao, "bao was not ready within 60 s");
            }
            if http.is_none() {
                if tls {
                    // The CA file is written during start-up; a half-written one fails
                    // to parse or to verify, and is simply read again.
                    bao.ca_pem = std::fs::read_to_string(&ca_path).ok();
                }
                if !tls || bao.ca_pem.is_some() {
                    http = VaultHttp::new(&bao.address, bao.ca_pem.as_deref()).ok();
                }
            }
            if let Some(client) = &http
                && kv_ready(client).await
            {
                return Ok(bao);
            }
            if tls {
                http = None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// True once the dev server's `secret/` KV v2 mount serves requests. /sys/health says 200
/// while the mount is still upgrading to v2 and answering 400 to everything.
async fn kv_ready(http: &VaultHttp) -> bool {
    let token = SecretValue::new(ROOT);
    match http
        .send(
            Method::GET,
            "/v1/secret/metadata/readiness-probe",
            Some(&token),
            None,
        )
        .await
    {
        Ok(resp) => resp.status == StatusCode::NOT_FOUND,
        Err(_) => false,
    }
}

impl Drop for BaoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port whose successor is also free: the dev server's cluster listener takes
/// PORT+1, and fails to start if that is taken.
fn free_port_pair() -> u16 {
    loop {
        let a = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = a.local_addr().expect("addr").port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// One call with the root token that must succeed.
async fn admin(address: &str, method: Method, path: &str, body: Option<Value>) -> Value {
    let http = VaultHttp::new(address, None).expect("address");
    let resp = http
        .send(
            method.clone(),
            path,
            Some(&SecretValue::new(ROOT)),
            body.as_ref(),
        )
        .await
        .expect("admin call");
    assert!(
        resp.status.is_success(),
        "{method} {path}: {} {}",
        resp.status,
        String::from_utf8_lossy(&resp.body)
    );
    resp.json().expect("json")
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn config(address: &str, path: &str, auth: VaultAuth) -> VaultStoreConfig {
    VaultStoreConfig {
        address: address.to_owned(),
        mount: "secret".into(),
        path: path.to_owned(),
        auth,
        ca_cert_pem: None,
    }
}

fn root_store(address: &str, path: &str) -> VaultKvStore {
    VaultKvStore::new(config(
        address,
        path,
        VaultAuth::Token(SecretValue::new(ROOT)),
    ))
    .expect("store")
}

fn cred(user: &str, password: &str) -> Credential {
    Credential {
        username: user.into(),
        password: SecretValue::new(password),
    }
}

fn stages_of(versions: &[VersionInfo]) -> Vec<(String, Vec<String>)> {
    versions
        .iter()
        .map(|v| (v.id.clone(), v.stages.clone()))
        .collect()
}

#[tokio::test]
async fn ensure_exists_writes_the_initial_value_once() {
    setup();
    let address = shared_bao().await;
    let path = unique("app/ensure");
    let store = root_store(address, &path);

    assert!(store.get_current().await.unwrap().is_none());
    assert!(store.versions().await.unwrap().is_empty());

    let first = cred("app", "first-password");
    store.ensure_exists(&first).await.unwrap();
    let (id, value) = store.get_current().await.unwrap().expect("current");
    assert!(
        id.starts_with("initial-") && id.len() == "initial-".len() + 32,
        "{id}"
    );
    assert_eq!(value, first);
    assert!(store.get_previous().await.unwrap().is_none());

    // A second call (a restarted daemon) must not replace the working value.
    store
        .ensure_exists(&cred("app", "second-password"))
        .await
        .unwrap();
    assert_eq!(
        store.get_current().await.unwrap(),
        Some((id.clone(), first))
    );

    // What any other Vault reader sees: plain username/password data, and the stage key.
    let data = admin(
        address,
        Method::GET,
        &format!("/v1/secret/data/{path}"),
        None,
    )
    .await;
    assert_eq!(
        data["data"]["data"],
        json!({"username": "app", "password": "first-password"})
    );
    let meta = admin(
        address,
        Method::GET,
        &format!("/v1/secret/metadata/{path}"),
        None,
    )
    .await;
    assert_eq!(meta["data"]["custom_metadata"][CURRENT_KEY], "1");
    assert_eq!(meta["data"]["custom_metadata"]["mayfly_token_1"], json!(id));
}

#[tokio::test]
async fn a_secret_written_by_hand_a_second_ago_is_adopted_then_rotated() {
    setup();
    let address = shared_bao().await;
    let path = unique("app/adopt");
    admin(
        address,
        Method::POST,
        &format!("/v1/secret/data/{path}"),
        Some(json!({"data": {"username": "app", "password": "by-hand"}})),
    )
    .await;
    let store = root_store(address, &path);
    assert!(
        store.get_current().await.unwrap().is_none(),
        "not Mayfly's yet"
    );
    let adopted = store.adopt().await.unwrap().expect("adopted");
    assert!(adopted.token.starts_with("adopted-"), "{adopted:?}");
    assert!(adopted.detail.contains("KV version 1"), "{adopted:?}");
    assert_eq!(
        store.get_current().await.unwrap(),
        Some((adopted.token.clone(), cred("app", "by-hand")))
    );
    assert_eq!(store.adopt().await.unwrap(), None, "only once");
    // Written a second ago, but now recorded as Mayfly's: the rotation proceeds.
    store
        .put_pending("next", &cred("app", "rotated"))
        .await
        .unwrap();
    store.promote("next").await.unwrap();
    assert_eq!(
        store.get_previous().await.unwrap(),
        Some((adopted.token, cred("app", "by-hand")))
    );
}

#[tokio::test]
async fn a_hand_written_value_that_is_not_a_credential_is_not_adopted() {
    setup();
    let address = shared_bao().await;
    let path = unique("app/adopt-bad");
    admin(
        address,
        Method::POST,
        &format!("/v1/secret/data/{path}"),
        Some(json!({"data": {"api_key": "abc"}})),
    )
    .await;
    let store = root_store(address, &path);
    match store.adopt().await {
        Err(SecretStoreError::Malformed(why)) => {
            assert!(why.contains("username and password"), "{why}");
            assert!(!why.contains("abc"), "never the value: {why}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        store.get_current().await.unwrap().is_none(),
        "nothing changed"
    );
}

#[tokio::test]
async fn a_managed_secret_another_writer_changed_is_refused_saying_what_was_seen() {
    setup();
    let address = shared_bao().await;
    let path = unique("app/guard");
    let store = root_store(address, &path);
    store.ensure_exists(&cred("app", "managed")).await.unwrap();
    admin(
        address,
        Method::POST,
        &format!("/v1/secret/data/{path}"),
        Some(json!({"data": {"username": "app", "password": "by-hand"}})),
    )
    .await;
    assert_eq!(store.adopt().await.unwrap(), None, "managed: not adopted");
    match store.put_pending("next", &cred("app", "rotated")).await {
        Err(SecretStoreError::OtherWriter(seen)) => {
            assert!(seen.contains("KV version 2"), "{seen}");
            assert!(seen.contains("not a Mayfly rotation"), "{seen}");
            assert!(seen.contains("current is version 1"), "{seen}");
            assert!(!seen.contains("by-hand"), "never the value: {seen}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store.get_current().await.unwrap().map(|(_, v)| v),
        Some(cred("app", "managed")),
        "nothing changed"
    );
}

#[tokio::test]
async fn rotation_moves_current_to_previous_and_is_idempotent() {
    setup();
    let address = shared_bao().await;
    let store = root_store(address, &unique("app/rotate"));
    let old = cred("app", "old-password");
    let new = cred("app", "new-password");
    store.ensure_exists(&old).await.unwrap();
    let (initial, _) = store.get_current().await.unwrap().unwrap();

    store.put_pending("rot-2", &new).await.unwrap();
    // Same token again, even with another value: the first value stays.
    store
        .put_pending("rot-2", &cred("app", "other"))
        .await
        .unwrap();
    assert_eq!(store.get_version("rot-2").await.unwrap(), Some(new.clone()));
    assert_eq!(store.get_version("never-written").await.unwrap(), None);
    assert_eq!(
        stages_of(&store.versions().await.unwrap()),
        vec![
            ("rot-2".into(), vec!["pending".into()]),
            (initial.clone(), vec!["current".into()]),
        ]
    );
    // Until promote, readers still get the old value.
    assert_eq!(
        store.get_current().await.unwrap(),
        Some((initial.clone(), old.clone()))
    );

    store.promote("rot-2").await.unwrap();
    store.promote("rot-2").await.unwrap();
    assert_eq!(
        store.get_current().await.unwrap(),
        Some(("rot-2".into(), new.clone()))
    );
    assert_eq!(
        store.get_previous().await.unwrap(),
        Some((initial.clone(), old))
    );
    let versions = store.versions().await.unwrap();
    assert_eq!(
        stages_of(&versions),
        vec![
            ("rot-2".into(), vec!["current".into()]),
            (initial, vec!["previous".into()]),
        ]
    );
    assert!(versions.iter().all(|v| v.created_at.is_some()));

    assert!(matches!(
        store.promote("no-such-token").await,
        Err(SecretStoreError::VersionNotFound(_))
    ));
}

#[tokio::test]
async fn long_rotation_history_stays_within_vault_limits() {
    setup();
    let address = shared_bao().await;
    let path = unique("app/long");
    let store = root_store(address, &path);
    store.ensure_exists(&cred("app", "p0")).await.unwrap();
    // More rotations than KV keeps versions (10) and than we keep tokens.
    for i in 1..=14 {
        let token = format!("rot-{i}");
        store
            .put_pending(&token, &cred("app", &format!("p{i}")))
            .await
            .unwrap();
        store.promote(&token).await.unwrap();
    }
    assert_eq!(
        store.get_current().await.unwrap(),
        Some(("rot-14".into(), cred("app", "p14")))
    );
    assert_eq!(
        store.get_previous().await.unwrap(),
        Some(("rot-13".into(), cred("app", "p13")))
    );
    let meta = admin(
        address,
        Method::GET,
        &format!("/v1/secret/metadata/{path}"),
        None,
    )
    .await;
    let custom = meta["data"]["custom_metadata"].as_object().unwrap();
    let token_keys = custom
        .keys()
        .filter(|k| k.starts_with(TOKEN_KEY_PREFIX))
        .count();
    assert!(token_keys <= KEPT_TOKENS, "{custom:?}");
    let versions = store.versions().await.unwrap();
    assert_eq!(versions.first().map(|v| v.id.as_str()), Some("rot-14"));
    assert!(versions.len() <= 10, "{versions:?}");
}

#[tokio::test]
async fn concurrent_writers_with_different_tokens_one_wins() {
    setup();
    let address = shared_bao().await;
    let path = unique("app/race");
    let a = root_store(address, &path);
    let b = root_store(address, &path);
    a.ensure_exists(&cred("app", "start")).await.unwrap();

    let (from_a, from_b) = (cred("app", "from-a"), cred("app", "from-b"));
    let (ra, rb) = tokio::join!(
        a.put_pending("daemon-a", &from_a),
        b.put_pending("daemon-b", &from_b),
    );
    let (winner, loser_result, winner_value) = match (&ra, &rb) {
        (Ok(()), _) => ("daemon-a", rb, "from-a"),
        (_, Ok(())) => ("daemon-b", ra, "from-b"),
        _ => panic!("neither writer won: {ra:?} {rb:?}"),
    };
    assert!(
        matches!(
            loser_result,
            Err(SecretStoreError::Conflict | SecretStoreError::OtherWriter(_))
        ),
        "{loser_result:?}"
    );
    let pending: Vec<_> = a
        .versions()
        .await
        .unwrap()
        .into_iter()
        .filter(|v| v.stages.contains(&"pending".to_owned()))
        .map(|v| v.id)
        .collect();
    assert_eq!(pending, vec![winner.to_owned()]);
    assert_eq!(
        b.get_version(winner).await.unwrap(),
        Some(cred("app", winner_value))
    );
    // A writer arriving after the race, while the winner's rotation is still pending, must
    // not stack another pending version on it.
    match b.put_pending("daemon-late", &cred("app", "late")).await {
        Err(SecretStoreError::OtherWriter(seen)) => {
            assert!(seen.contains("pending under another rotation"), "{seen}");
            assert!(seen.contains(winner), "names the other rotation: {seen}");
        }
        other => panic!("a late writer must be refused: {other:?}"),
    }
    // The winner's own retry still succeeds.
    a.put_pending(winner, &cred("app", "retry")).await.unwrap();
    a.promote(winner).await.unwrap();
    assert_eq!(
        b.get_current().await.unwrap(),
        Some((winner.to_owned(), cred("app", winner_value)))
    );
}

#[tokio::test]
async fn approle_logs_in_and_logs_in_again_when_its_token_is_revoked() {
    setup();
    let address = shared_bao().await;
    let path = unique("app/approle");
    let name = unique("mayfly");
    let mount = unique("approle");
    admin(
        address,
        Method::POST,
        &format!("/v1/sys/auth/{mount}"),
        Some(json!({"type": "approle"})),
    )
    .await;
    let policy = format!(
        "path \"secret/data/{path}\" {{ capabilities = [\"create\", \"read\", \"update\"] }}\n\
         path \"secret/metadata/{path}\" {{ capabilities = [\"read\", \"update\"] }}\n"
    );
    admin(
        address,
        Method::POST,
        &format!("/v1/sys/policies/acl/{name}"),
        Some(json!({"policy": policy})),
    )
    .await;
    admin(
        address,
        Method::POST,
        &format!("/v1/auth/{mount}/role/{name}"),
        Some(json!({"token_policies": [name], "token_ttl": "1h"})),
    )
    .await;
    let role_id = admin(
        address,
        Method::GET,
        &format!("/v1/auth/{mount}/role/{name}/role-id"),
        None,
    )
    .await["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret_id = admin(
        address,
        Method::POST,
        &format!("/v1/auth/{mount}/role/{name}/secret-id"),
        None,
    )
    .await["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let store = VaultKvStore::new(config(
        address,
        &path,
        VaultAuth::AppRole {
            role_id: role_id.clone(),
            secret_id: SecretValue::new(secret_id.clone()),
            mount: mount.clone(),
        },
    ))
    .unwrap();
    store.ensure_exists(&cred("app", "one")).await.unwrap();
    store
        .put_pending("rot-1", &cred("app", "two"))
        .await
        .unwrap();
    store.promote("rot-1").await.unwrap();
    assert_eq!(
        store.get_current().await.unwrap(),
        Some(("rot-1".into(), cred("app", "two")))
    );

    // Revoke the token the store logged in with: the next call must log in again.
    let Login::AppRole { cached, .. } = &store.login else {
        panic!("not an AppRole login");
    };
    let first_token = cached.lock().await.clone().expect("logged in");
    admin(
        address,
        Method::POST,
        "/v1/auth/token/revoke",
        Some(json!({"token": first_token.expose()})),
    )
    .await;
    assert_eq!(
        store.get_current().await.unwrap(),
        Some(("rot-1".into(), cred("app", "two")))
    );
    let second_token = cached.lock().await.clone().expect("logged in again");
    assert_ne!(first_token, second_token);

    // The policy covers only this path.
    let elsewhere = VaultKvStore::new(config(
        address,
        &unique("app/other"),
        VaultAuth::AppRole {
            role_id: role_id.clone(),
            secret_id: SecretValue::new(secret_id),
            mount: mount.clone(),
        },
    ))
    .unwrap();
    assert!(matches!(
        elsewhere.get_current().await,
        Err(SecretStoreError::Refused(_))
    ));

    let bad_secret = VaultKvStore::new(config(
        address,
        &path,
        VaultAuth::AppRole {
            role_id,
            secret_id: SecretValue::new("not-the-secret-id"),
            mount,
        },
    ))
    .unwrap();
    let err = bad_secret.get_current().await.unwrap_err();
    assert!(matches!(err, SecretStoreError::Refused(_)), "{err:?}");
    assert!(!err.to_string().contains("not-the-secret-id"), "{err}");
}

#[tokio::test]
async fn a_token_without_permission_is_refused() {
    setup();
    let address = shared_bao().await;
    let name = unique("readonly-elsewhere");
    admin(
        address,
        Method::POST,
        &format!("/v1/sys/policies/acl/{name}"),
        Some(json!({"policy": "path \"secret/data/elsewhere\" { capabilities = [\"read\"] }"})),
    )
    .await;
    let created = admin(
        address,
        Method::POST,
        "/v1/auth/token/create",
        Some(json!({"policies": [name], "ttl": "10m"})),
    )
    .await;
    let token = created["auth"]["client_token"].as_str().unwrap().to_owned();

    let path = unique("app/refused");
    root_store(address, &path)
        .ensure_exists(&cred("app", "hidden-password"))
        .await
        .unwrap();
    let store = VaultKvStore::new(config(
        address,
        &path,
        VaultAuth::Token(SecretValue::new(token.clone())),
    ))
    .unwrap();
    for err in [
        store.get_current().await.unwrap_err(),
        store
            .put_pending("rot-1", &cred("app", "new-password"))
            .await
            .unwrap_err(),
    ] {
        let SecretStoreError::Refused(message) = &err else {
            panic!("expected Refused, got {err:?}");
        };
        assert!(message.contains("permission denied"), "{message}");
        let text = err.to_string();
        assert!(
            !text.contains(&token) && !text.contains("password"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn https_with_a_ca_bundle() {
    setup();
    let bao = BaoProcess::start(true).await;
    let path = unique("app/tls");
    let store = VaultKvStore::new(VaultStoreConfig {
        ca_cert_pem: bao.ca_pem.clone(),
        ..config(
            &bao.address,
            &path,
            VaultAuth::Token(SecretValue::new(ROOT)),
        )
    })
    .unwrap();
    store.ensure_exists(&cred("app", "over-tls")).await.unwrap();
    assert_eq!(
        store.get_current().await.unwrap().map(|(_, c)| c),
        Some(cred("app", "over-tls"))
    );

    // Without the bundle the dev CA is not trusted (the Mozilla roots are used instead).
    let untrusting = VaultKvStore::new(config(
        &bao.address,
        &path,
        VaultAuth::Token(SecretValue::new(ROOT)),
    ))
    .unwrap();
    let err = untrusting.get_current().await.unwrap_err();
    assert!(
        matches!(&err, SecretStoreError::Unreachable(m) if m.contains("TLS")),
        "{err:?}"
    );
}

#[tokio::test]
async fn nothing_listening_is_unreachable() {
    setup();
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let store = root_store(&format!("http://127.0.0.1:{port}"), "app/x");
    assert!(matches!(
        store.get_current().await,
        Err(SecretStoreError::Unreachable(_))
    ));
}

#[test]
fn debug_never_shows_tokens_secret_ids_or_passwords() {
    let token_config = config(
        "http://127.0.0.1:8200",
        "app/x",
        VaultAuth::Token(SecretValue::new("hvs.TOKEN-VALUE")),
    );
    let approle_config = config(
        "http://127.0.0.1:8200",
        "app/x",
        VaultAuth::AppRole {
            role_id: "role".into(),
            secret_id: SecretValue::new("SECRET-ID-VALUE"),
            mount: "approle".into(),
        },
    );
    let shown = [
        format!("{token_config:?}"),
        format!("{approle_config:?}"),
        format!("{:?}", VaultKvStore::new(token_config).unwrap()),
        format!("{:?}", VaultKvStore::new(approle_config).unwrap()),
        format!("{:?}", cred("app", "PASSWORD-VALUE")),
    ];
    for text in shown {
        for secret in ["TOKEN-VALUE", "SECRET-ID-VALUE", "PASSWORD-VALUE"] {
            assert!(!text.contains(secret), "{text}");
        }
    }
}

#[test]
fn bad_addresses_and_paths_are_rejected() {
    let with = |address: &str, path: &str| {
        VaultKvStore::new(config(
            address,
            path,
            VaultAuth::Token(SecretValue::new(ROOT)),
        ))
    };
    assert!(with("http://127.0.0.1:8200", "db/orders").is_ok());
    assert!(with("https://vault.example", "db/orders").is_ok());
    assert!(with("ftp://vault.example", "db/orders").is_err());
    assert!(with("http://vault.example/v1", "db/orders").is_err());
    assert!(with("http://user:pw@vault.example", "db/orders").is_err());
    for path in ["", "/db", "db/", "db//x", "db/../sys", "db/a b", "db?x=1"] {
        assert!(with("http://127.0.0.1:8200", path).is_err(), "{path:?}");
    }
}

#[test]
fn pruning_keeps_staged_versions_and_the_newest_tokens() {
    let mut custom: BTreeMap<String, String> =
        (1..=20).map(|n| (token_key(n), format!("t{n}"))).collect();
    custom.insert(CURRENT_KEY.into(), "20".into());
    custom.insert(PREVIOUS_KEY.into(), "3".into());
    custom.insert("owner".into(), "team-a".into());
    prune_tokens(&mut custom).unwrap();
    let kept: Vec<u64> = custom
        .keys()
        .filter_map(|k| k.strip_prefix(TOKEN_KEY_PREFIX)?.parse().ok())
        .collect();
    let mut expected: Vec<u64> = (11..=20).collect();
    expected.push(3);
    expected.sort_unstable();
    let mut kept_sorted = kept;
    kept_sorted.sort_unstable();
    assert_eq!(kept_sorted, expected);
    assert_eq!(custom.get("owner").map(String::as_str), Some("team-a"));
}

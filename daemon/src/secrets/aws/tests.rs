//! Against a real moto_server (from PATH), started once per test binary on a free port.

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_sdk_secretsmanager::config::Credentials;

use super::*;

/// One moto for every test here: it starts in about a second, and each test uses its own
/// secret name, so they cannot see each other.
static MOTO: OnceLock<Result<String, String>> = OnceLock::new();

fn moto_endpoint() -> String {
    match MOTO.get_or_init(start_moto) {
        Ok(url) => url.clone(),
        Err(why) => panic!("moto_server did not start: {why}"),
    }
}

/// Starts moto on a thread that lives as long as the test process. A static is never
/// dropped, so instead of a Drop guard the server is told to die with that thread
/// (PR_SET_PDEATHSIG), which happens when the test binary exits, however it exits.
fn start_moto() -> Result<String, String> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("moto_server".into())
        .spawn(move || {
            let mut command = Command::new("moto_server");
            command
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            crate::sys::die_with_parent(&mut command);
            let mut child = match command.spawn() {
                Ok(child) => child,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!(
                        "cannot run moto_server (put /work/main/.venv/bin on PATH): {e}"
                    )));
                    return;
                }
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break;
                }
                if let Ok(Some(status)) = child.try_wait() {
                    let _ = ready_tx.send(Err(format!("moto_server exited: {status}")));
                    return;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = ready_tx.send(Err("moto_server not listening after 30 s".into()));
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = ready_tx.send(Ok(format!("http://127.0.0.1:{port}")));
            let _ = child.wait();
        })
        .map_err(|e| format!("cannot start the moto thread: {e}"))?;
    ready_rx
        .recv()
        .map_err(|_| "the moto thread ended without a word".to_string())?
}

fn unique_secret(name: &str) -> String {
    format!("mayfly-test-{name}-{}", uuid::Uuid::new_v4().simple())
}

fn token() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn credential(username: &str, password: &str) -> Credential {
    Credential {
        username: username.into(),
        password: SecretValue::new(password),
    }
}

fn test_loader() -> ConfigLoader {
    aws_config::defaults(BehaviorVersion::latest()).credentials_provider(Credentials::new(
        "testing",
        "testing",
        None,
        None,
        "mayfly-tests",
    ))
}

async fn store_at(secret_id: &str, endpoint: String) -> AwsSecretsManagerStore {
    AwsSecretsManagerStore::with_loader(
        AwsStoreConfig {
            secret_id: secret_id.into(),
            region: "us-east-1".into(),
            endpoint_url: Some(endpoint),
        },
        test_loader(),
    )
    .await
    .unwrap()
}

async fn store(secret_id: &str) -> AwsSecretsManagerStore {
    store_at(secret_id, moto_endpoint()).await
}

/// The labels as AWS reports them, read past the store.
async fn raw_labels(store: &AwsSecretsManagerStore) -> HashMap<String, Vec<String>> {
    let mut labels = store.describe().await.unwrap();
    for stages in labels.values_mut() {
        stages.sort();
    }
    labels
}

fn has_label(labels: &HashMap<String, Vec<String>>, label: &str) -> Vec<String> {
    labels
        .iter()
        .filter(|(_, l)| l.iter().any(|s| s == label))
        .map(|(id, _)| id.clone())
        .collect()
}

#[tokio::test]
async fn ensure_exists_creates_once_and_get_current_reads_it() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let store = store(&unique_secret("ensure")).await;
    let first = credential("app", "first-password");

    assert!(store.ensure_exists(&first).await.unwrap());
    assert!(
        !store
            .ensure_exists(&credential("app", "other"))
            .await
            .unwrap()
    );

    let (id, current) = store.get_current().await.unwrap().unwrap();
    assert_eq!(current, first);
    assert_eq!(store.get_previous().await.unwrap(), None);
    let versions = store.versions().await.unwrap();
    assert_eq!(
        versions,
        vec![VersionInfo {
            id,
            stages: vec!["current".into()],
            created_at: None
        }]
    );
}

#[tokio::test]
async fn ensure_exists_fills_a_secret_created_without_value() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let name = unique_secret("empty");
    let store = store(&name).await;
    store
        .client
        .create_secret()
        .name(&name)
        .send()
        .await
        .unwrap();
    assert_eq!(store.get_current().await.unwrap(), None);

    let initial = credential("app", "initial");
    assert!(store.ensure_exists(&initial).await.unwrap());
    assert_eq!(store.get_current().await.unwrap().unwrap().1, initial);
}

#[tokio::test]
async fn rotation_makes_new_current_old_previous_and_leaves_nothing_pending() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let store = store(&unique_secret("rotate")).await;
    let old = credential("app", "old-password");
    let new = credential("app", "new-password");
    store.ensure_exists(&old).await.unwrap();
    let (old_id, _) = store.get_current().await.unwrap().unwrap();
    let t = token();

    store.put_pending(&t, &new).await.unwrap();
    assert_eq!(store.get_version(&t).await.unwrap(), Some(new.clone()));
    assert_eq!(
        store.get_current().await.unwrap(),
        Some((old_id.clone(), old.clone()))
    );
    let pending = store.versions().await.unwrap();
    assert_eq!(pending[0].id, t);
    assert_eq!(pending[0].stages, vec!["pending".to_string()]);

    store.promote(&t).await.unwrap();

    assert_eq!(store.get_current().await.unwrap(), Some((t.clone(), new)));
    assert_eq!(
        store.get_previous().await.unwrap(),
        Some((old_id.clone(), old))
    );
    let labels = raw_labels(&store).await;
    assert!(has_label(&labels, STAGE_PENDING).is_empty(), "{labels:?}");
    let versions = store.versions().await.unwrap();
    assert_eq!(
        versions
            .iter()
            .map(|v| (v.id.as_str(), v.stages.clone()))
            .collect::<Vec<_>>(),
        vec![
            (t.as_str(), vec!["current".to_string()]),
            (old_id.as_str(), vec!["previous".to_string()])
        ]
    );
}

#[tokio::test]
async fn put_pending_twice_with_one_token_keeps_the_first_value() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let store = store(&unique_secret("twice")).await;
    store
        .ensure_exists(&credential("app", "initial"))
        .await
        .unwrap();
    let t = token();
    let first = credential("app", "first-pending");

    store.put_pending(&t, &first).await.unwrap();
    store
        .put_pending(&t, &credential("app", "second-pending"))
        .await
        .unwrap();
    assert_eq!(store.get_version(&t).await.unwrap(), Some(first.clone()));

    // Once promoted, a replayed put_pending must not relabel the version as pending.
    store.promote(&t).await.unwrap();
    store
        .put_pending(&t, &credential("app", "third"))
        .await
        .unwrap();
    assert_eq!(store.get_current().await.unwrap(), Some((t, first)));
    assert!(has_label(&raw_labels(&store).await, STAGE_PENDING).is_empty());
}

#[tokio::test]
async fn promote_twice_changes_nothing_the_second_time() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let store = store(&unique_secret("promote2")).await;
    store.ensure_exists(&credential("app", "a")).await.unwrap();
    let t = token();
    store
        .put_pending(&t, &credential("app", "b"))
        .await
        .unwrap();
    store.promote(&t).await.unwrap();
    let after_first = raw_labels(&store).await;

    store.promote(&t).await.unwrap();

    assert_eq!(raw_labels(&store).await, after_first);
    assert_eq!(has_label(&after_first, STAGE_CURRENT), vec![t]);
}

#[tokio::test]
async fn a_late_promote_of_an_overtaken_rotation_does_not_roll_back() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let store = store(&unique_secret("overtaken")).await;
    store.ensure_exists(&credential("app", "a")).await.unwrap();
    let (first, second) = (token(), token());
    store
        .put_pending(&first, &credential("app", "b"))
        .await
        .unwrap();
    store.promote(&first).await.unwrap();
    store
        .put_pending(&second, &credential("app", "c"))
        .await
        .unwrap();
    store.promote(&second).await.unwrap();

    let err = store.promote(&first).await.unwrap_err();

    assert!(matches!(err, SecretStoreError::Refused(_)), "{err:?}");
    assert_eq!(store.get_current().await.unwrap().unwrap().0, second);
    assert_eq!(store.get_previous().await.unwrap().unwrap().0, first);
}

#[tokio::test]
async fn promote_completes_after_a_crash_between_the_stage_moves() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let name = unique_secret("crash");
    let store = store(&name).await;
    let old = credential("app", "old");
    let new = credential("app", "new");
    store.ensure_exists(&old).await.unwrap();
    let (old_id, _) = store.get_current().await.unwrap().unwrap();
    let t = token();
    store.put_pending(&t, &new).await.unwrap();

    // The first half of promote, as a crashed rotator would have left it.
    store
        .client
        .update_secret_version_stage()
        .secret_id(&name)
        .version_stage(STAGE_CURRENT)
        .move_to_version_id(&t)
        .remove_from_version_id(&old_id)
        .send()
        .await
        .unwrap();
    let half_done = raw_labels(&store).await;
    assert_eq!(
        half_done[&t],
        vec![STAGE_CURRENT.to_string(), STAGE_PENDING.to_string()]
    );

    store.promote(&t).await.unwrap();

    let labels = raw_labels(&store).await;
    assert_eq!(labels[&t], vec![STAGE_CURRENT.to_string()]);
    assert_eq!(labels[&old_id], vec![STAGE_PREVIOUS.to_string()]);
    assert_eq!(store.get_current().await.unwrap(), Some((t, new)));
    assert_eq!(store.get_previous().await.unwrap(), Some((old_id, old)));
}

#[tokio::test]
async fn a_missing_secret_is_not_found_everywhere() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let name = unique_secret("missing");
    let store = store(&name).await;
    let t = token();

    let not_found =
        |r: SecretStoreError| matches!(r, SecretStoreError::NotFound(ref n) if *n == name);
    assert!(not_found(store.get_current().await.unwrap_err()));
    assert!(not_found(store.get_previous().await.unwrap_err()));
    assert!(not_found(store.get_version(&t).await.unwrap_err()));
    assert!(not_found(
        store
            .put_pending(&t, &credential("app", "x"))
            .await
            .unwrap_err()
    ));
    assert!(not_found(store.promote(&t).await.unwrap_err()));
    assert!(not_found(store.versions().await.unwrap_err()));
}

#[tokio::test]
async fn unknown_versions_are_none_or_version_not_found() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let store = store(&unique_secret("unknown")).await;
    store.ensure_exists(&credential("app", "a")).await.unwrap();
    let t = token();

    assert_eq!(store.get_version(&t).await.unwrap(), None);
    assert!(matches!(
        store.promote(&t).await.unwrap_err(),
        SecretStoreError::VersionNotFound(v) if v == t
    ));
}

#[tokio::test]
async fn short_tokens_are_refused_before_anything_is_written() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let store = store(&unique_secret("short")).await;
    store.ensure_exists(&credential("app", "a")).await.unwrap();

    let err = store
        .put_pending("rotation-1", &credential("app", "b"))
        .await
        .unwrap_err();
    assert!(matches!(err, SecretStoreError::Refused(_)));
    assert!(err.to_string().contains("32 to 64"), "{err}");
    assert!(store.promote(&"x".repeat(65)).await.is_err());
    assert_eq!(store.versions().await.unwrap().len(), 1);
}

#[tokio::test]
async fn the_password_shows_in_no_debug_output_or_error() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let name = unique_secret("debug");
    let store = store(&name).await;
    let password = "hunter2-very-secret";
    store
        .ensure_exists(&credential("app", password))
        .await
        .unwrap();

    let current = store.get_current().await.unwrap();
    for shown in [
        format!("{store:?}"),
        format!("{:?}", store.config()),
        format!("{current:?}"),
    ] {
        assert!(!shown.contains(password), "{shown}");
    }
    assert!(format!("{current:?}").contains("redacted"));

    // A value of the wrong shape: serde_json would quote the number in its own message.
    let t = token();
    store
        .client
        .put_secret_value()
        .secret_id(&name)
        .client_request_token(&t)
        .secret_string(r#"{"username": "app", "password": 987654321}"#)
        .send()
        .await
        .unwrap();
    let err = store.get_current().await.unwrap_err();
    assert!(matches!(err, SecretStoreError::Malformed(_)), "{err:?}");
    for shown in [err.to_string(), format!("{err:?}")] {
        assert!(!shown.contains("987654321"), "{shown}");
    }
}

#[tokio::test]
async fn an_endpoint_that_does_not_answer_is_unreachable() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // A port that was free a moment ago: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = store_at(&unique_secret("down"), format!("http://127.0.0.1:{port}")).await;

    let err = store.get_current().await.unwrap_err();
    assert!(matches!(err, SecretStoreError::Unreachable(_)), "{err:?}");
}

#[tokio::test]
async fn bad_configuration_is_refused_at_construction() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let config = |secret_id: &str, region: &str, endpoint: Option<&str>| AwsStoreConfig {
        secret_id: secret_id.into(),
        region: region.into(),
        endpoint_url: endpoint.map(Into::into),
    };
    for bad in [
        config("", "us-east-1", None),
        config("db", " ", None),
        config("db", "us-east-1", Some("127.0.0.1:4566")),
        config("db", "us-east-1", Some("ftp://host")),
    ] {
        let built = AwsSecretsManagerStore::with_loader(bad.clone(), test_loader()).await;
        assert!(
            matches!(built, Err(SecretStoreError::Refused(_))),
            "{bad:?} was accepted"
        );
    }
}

//! Mayfly's own secret store: versions kept in the datastore, each sealed with
//! AES-256-GCM under a key file in data_dir (0600) and bound to its secret and version, so
//! a ciphertext copied to another row does not open.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::aead::{AES_256_GCM, Aad, Nonce, RandomizedNonceKey};
use zeroize::Zeroizing;

use mayfly_common::fsutil;

use super::{Credential, SecretStore, SecretStoreError, SecretValue, VersionInfo};
use crate::store::{LocalVersionRecord, Store, StoreError};

const NONCE_LEN: usize = 12;

/// The data_dir key that seals secret values and definitions at rest.
pub struct SealingKey {
    key: RandomizedNonceKey,
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealingKey(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    #[error("secrets key file {path}: {source}")]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secrets key file {0} is not a 32-byte AES-256 key")]
    BadKey(PathBuf),
    #[error("sealed data does not open with this daemon's key (wrong key, or tampered)")]
    Open,
    #[error("sealing failed")]
    Seal,
}

impl SealingKey {
    /// Loads `<data_dir>/secrets.key`, creating it (32 random bytes, 0600) on first use.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, SealError> {
        let path = data_dir.join("secrets.key");
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => Zeroizing::new(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut fresh = Zeroizing::new(vec![0u8; 32]);
                rand::fill(&mut fresh[..]);
                fsutil::write_atomic(&path, &fresh, 0o600).map_err(|source| {
                    SealError::KeyFile {
                        path: path.clone(),
                        source,
                    }
                })?;
                fresh
            }
            Err(source) => return Err(SealError::KeyFile { path, source }),
        };
        let key = RandomizedNonceKey::new(&AES_256_GCM, &bytes)
            .map_err(|_| SealError::BadKey(path.clone()))?;
        Ok(Self { key })
    }

    /// nonce || ciphertext || tag, bound to `context`.
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut buffer = plaintext.to_vec();
        let nonce = self
            .key
            .seal_in_place_append_tag(Aad::from(context.as_bytes()), &mut buffer)
            .map_err(|_| SealError::Seal)?;
        let mut out = Vec::with_capacity(NONCE_LEN + buffer.len());
        out.extend_from_slice(nonce.as_ref());
        out.extend_from_slice(&buffer);
        Ok(out)
    }

    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        if sealed.len() < NONCE_LEN {
            return Err(SealError::Open);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Open)?;
        let mut buffer = Zeroizing::new(body.to_vec());
        let plain_len = self
            .key
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut buffer)
            .map_err(|_| SealError::Open)?
            .len();
        buffer.truncate(plain_len);
        Ok(buffer)
    }
}

/// One secret in Mayfly's own store.
pub struct LocalStore {
    datastore: Store,
    key: Arc<SealingKey>,
    secret: String,
}

impl LocalStore {
    pub fn new(datastore: Store, key: Arc<SealingKey>, secret: &str) -> Self {
        Self {
            datastore,
            key,
            secret: secret.to_string(),
        }
    }

    fn context(&self, version: &str) -> String {
        format!("mayfly-secret\0{}\0{version}", self.secret)
    }

    fn open(&self, record: &LocalVersionRecord) -> Result<Credential, SecretStoreError> {
        let plain = self
            .key
            .open(&self.context(&record.version_id), &record.sealed)
            .map_err(|e| SecretStoreError::Malformed(e.to_string()))?;
        decode_credential(&plain)
    }

    async fn staged(&self, stage: &str) -> Result<Option<(String, Credential)>, SecretStoreError> {
        let versions = self
            .datastore
            .local_versions(&self.secret)
            .await
            .map_err(db)?;
        versions
            .iter()
            .find(|v| v.stage == stage)
            .map(|v| Ok((v.version_id.clone(), self.open(v)?)))
            .transpose()
    }
}

#[tonic::async_trait]
impl SecretStore for LocalStore {
    async fn put_pending(&self, token: &str, value: &Credential) -> Result<(), SecretStoreError> {
        let plain = Zeroizing::new(encode_credential(value));
        let sealed = self
            .key
            .seal(&self.context(token), plain.as_bytes())
            .map_err(|e| SecretStoreError::Refused(e.to_string()))?;
        self.datastore
            .insert_local_version(
                &self.secret,
                &LocalVersionRecord {
                    version_id: token.to_string(),
                    stage: "pending".into(),
                    sealed,
                    created_at: mayfly_common::clock::unix(std::time::SystemTime::now()),
                },
            )
            .await
            .map_err(db)
    }

    async fn get_version(&self, token: &str) -> Result<Option<Credential>, SecretStoreError> {
        let versions = self
            .datastore
            .local_versions(&self.secret)
            .await
            .map_err(db)?;
        versions
            .iter()
            .find(|v| v.version_id == token)
            .map(|v| self.open(v))
            .transpose()
    }

    async fn get_current(&self) -> Result<Option<(String, Credential)>, SecretStoreError> {
        self.staged("current").await
    }

    async fn get_previous(&self) -> Result<Option<(String, Credential)>, SecretStoreError> {
        self.staged("previous").await
    }

    async fn promote(&self, token: &str) -> Result<(), SecretStoreError> {
        self.datastore
            .promote_local_version(&self.secret, token)
            .await
            .map_err(|e| match e {
                StoreError::NotFound { id, .. } => SecretStoreError::VersionNotFound(id),
                other => db(other),
            })
    }

    async fn versions(&self) -> Result<Vec<VersionInfo>, SecretStoreError> {
        let versions = self
            .datastore
            .local_versions(&self.secret)
            .await
            .map_err(db)?;
        Ok(versions
            .into_iter()
            .map(|v| VersionInfo {
                id: v.version_id,
                stages: if v.stage.is_empty() {
                    vec![]
                } else {
                    vec![v.stage]
                },
                created_at: Some(v.created_at),
            })
            .collect())
    }
}

/// `{"username": …, "password": …}`, the shape every store keeps.
pub fn encode_credential(value: &Credential) -> String {
    serde_json::json!({ "username": value.username, "password": value.password.expose() })
        .to_string()
}

pub fn decode_credential(bytes: &[u8]) -> Result<Credential, SecretStoreError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|_| SecretStoreError::Malformed("not JSON".into()))?;
    let field = |name: &str| {
        value
            .get(name)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| SecretStoreError::Malformed(format!("no string field `{name}`")))
    };
    Ok(Credential {
        username: field("username")?,
        password: SecretValue::new(field("password")?),
    })
}

fn db(e: StoreError) -> SecretStoreError {
    SecretStoreError::Unreachable(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred(user: &str, password: &str) -> Credential {
        Credential {
            username: user.into(),
            password: SecretValue::new(password),
        }
    }

    #[tokio::test]
    async fn versions_rotate_through_current_and_previous() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let datastore = Store::connect(None, dir.path()).await.unwrap();
        let key = Arc::new(SealingKey::load_or_create(dir.path()).unwrap());
        let store = LocalStore::new(datastore.clone(), key.clone(), "app-db");
        assert!(store.get_current().await.unwrap().is_none());

        let t1 = "a".repeat(32);
        let t2 = "b".repeat(32);
        store.put_pending(&t1, &cred("app", "one")).await.unwrap();
        store
            .put_pending(&t1, &cred("app", "ignored"))
            .await
            .unwrap();
        store.promote(&t1).await.unwrap();
        store.promote(&t1).await.unwrap();
        let (id, current) = store.get_current().await.unwrap().unwrap();
        assert_eq!(
            (id.as_str(), current.password.expose()),
            (t1.as_str(), "one")
        );

        store.put_pending(&t2, &cred("app", "two")).await.unwrap();
        assert_eq!(
            store.get_current().await.unwrap().unwrap().0,
            t1,
            "pending is not current"
        );
        store.promote(&t2).await.unwrap();
        assert_eq!(
            store
                .get_current()
                .await
                .unwrap()
                .unwrap()
                .1
                .password
                .expose(),
            "two"
        );
        assert_eq!(store.get_previous().await.unwrap().unwrap().0, t1);
        let stages: Vec<_> = store
            .versions()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.stages)
            .collect();
        assert!(!stages.iter().flatten().any(|s| s == "pending"));

        // Rows hold ciphertext only, and a ciphertext moved to another secret does not open.
        let rows = datastore.local_versions("app-db").await.unwrap();
        assert!(
            rows.iter()
                .all(|r| !String::from_utf8_lossy(&r.sealed).contains("two"))
        );
        let other = LocalStore::new(datastore.clone(), key, "other");
        assert!(other.open(&rows[0]).is_err());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("secrets.key"))
                .unwrap()
                .permissions(),
        ) & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn secret_values_never_print() {
        let c = cred("app", "hunter2-very-secret");
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}

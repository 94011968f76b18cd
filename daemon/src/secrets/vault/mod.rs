//! `VaultKvStore`: a secret's rotation versions as the versions of one Vault/OpenBao KV v2
//! secret, with the stages (current, previous, pending) and each version's rotation token
//! kept in that secret's `custom_metadata`, so any reader can find the working value.

pub(crate) mod client;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};
use serde_json::{Map, Value, json};
use tokio::sync::Mutex;

use self::client::{Login, VaultHttp, VaultResponse, status_error};
use crate::secrets::{
    Adopted, Credential, SecretStore, SecretStoreError, SecretValue, VersionInfo,
};

/// `custom_metadata` key: the KV version number of the current value.
pub const CURRENT_KEY: &str = "mayfly_current";
/// `custom_metadata` key: the KV version number of the previous value.
pub const PREVIOUS_KEY: &str = "mayfly_previous";
/// `custom_metadata` key: the KV version number of the pending value.
pub const PENDING_KEY: &str = "mayfly_pending";
/// `custom_metadata` key prefix: `mayfly_token_<N>` holds the rotation token of version N.
pub const TOKEN_KEY_PREFIX: &str = "mayfly_token_";

/// Token keys kept besides those of the staged versions. Vault allows 64 custom_metadata
/// keys per secret, and KV keeps 10 versions by default, so older tokens name nothing.
const KEPT_TOKENS: usize = 10;
/// Vault's limit on one custom_metadata value.
const MAX_TOKEN_LEN: usize = 512;
/// How many times a metadata update is retried when another writer changed the metadata
/// between our read and our write (OpenBao's `metadata_cas`).
const METADATA_ATTEMPTS: usize = 5;
/// How long a version written under another token holds off a new one while it is pending
/// (another daemon's rotation in progress) or has no token yet (another daemon between its
/// data write and its metadata write). Older ones were abandoned by a crash or a given-up
/// rotation, and a new pending version may replace them.
const OTHER_WRITER_WINDOW: Duration = Duration::from_secs(300);

/// How to reach one KV v2 secret.
#[derive(Debug, Clone)]
pub struct VaultStoreConfig {
    /// `https://vault.example:8200` (or `http://` for a local dev server).
    pub address: String,
    /// The KV v2 mount, e.g. `secret`.
    pub mount: String,
    /// The secret's path inside the mount, e.g. `db/orders`.
    pub path: String,
    pub auth: VaultAuth,
    /// PEM CA certificates to trust for https, instead of the Mozilla roots.
    pub ca_cert_pem: Option<String>,
}

/// How the store logs in to Vault. Debug never shows the token or secret id.
#[derive(Debug, Clone)]
pub enum VaultAuth {
    Token(SecretValue),
    AppRole {
        role_id: String,
        secret_id: SecretValue,
        /// Where the AppRole auth method is mounted; Vault's default is `approle`.
        mount: String,
    },
}

/// A [`SecretStore`] backed by one Vault/OpenBao KV v2 secret.
pub struct VaultKvStore {
    http: VaultHttp,
    login: Login,
    mount: String,
    path: String,
    /// Serializes this instance's writes; other daemons are kept out by check-and-set.
    write_lock: Mutex<()>,
}

impl VaultKvStore {
    pub fn new(config: VaultStoreConfig) -> Result<Self, SecretStoreError> {
        let VaultStoreConfig {
            address,
            mount,
            path,
            auth,
            ca_cert_pem,
        } = config;
        check_path("mount", &mount)?;
        check_path("path", &path)?;
        let http = VaultHttp::new(&address, ca_cert_pem.as_deref())?;
        let login = match auth {
            VaultAuth::Token(token) => Login::Token(token),
            VaultAuth::AppRole {
                role_id,
                secret_id,
                mount,
            } => {
                check_path("AppRole mount", &mount)?;
                Login::AppRole {
                    role_id,
                    secret_id,
                    login_path: format!("/v1/auth/{mount}/login"),
                    cached: Mutex::new(None),
                }
            }
        };
        Ok(Self {
            http,
            login,
            mount,
            path,
            write_lock: Mutex::new(()),
        })
    }

    /// Gives the secret a current version holding `initial` unless it already has one.
    /// The version gets a fresh token `initial-<32 hex>`.
    pub async fn ensure_exists(&self, initial: &Credential) -> Result<(), SecretStoreError> {
        let _guard = self.write_lock.lock().await;
        let meta = self.read_metadata().await?.unwrap_or_default();
        if meta.stage(CURRENT_KEY)?.is_some() {
            return Ok(());
        }
        let token = format!("initial-{}", hex::encode(rand::random::<[u8; 16]>()));
        // cas is 0 for a new secret; a secret that exists without our stages (made by
        // hand, say) gets `initial` as its newest version and is managed from then on.
        let version = match self.write_data(initial, meta.latest).await {
            Ok(version) => version,
            Err(SecretStoreError::Conflict) => {
                // Another daemon created it first; its value is as good as ours.
                let meta = self.read_metadata().await?.unwrap_or_default();
                return match meta.stage(CURRENT_KEY)? {
                    Some(_) => Ok(()),
                    None => Err(SecretStoreError::Conflict),
                };
            }
            Err(e) => return Err(e),
        };
        self.update_stages(|meta, custom| {
            if meta.stage(CURRENT_KEY)?.is_some() {
                // A concurrent ensure_exists recorded its version first; ours stays unused.
                return Ok(false);
            }
            custom.insert(token_key(version), token.clone());
            custom.insert(CURRENT_KEY.into(), version.to_string());
            Ok(true)
        })
        .await
    }

    /// `mount/path`, to name the secret in errors.
    fn describe(&self) -> String {
        format!("{}/{}", self.mount, self.path)
    }

    async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<VaultResponse, SecretStoreError> {
        self.login
            .send(&self.http, method, path_and_query, body)
            .await
    }

    /// The secret's metadata, or `None` when the secret does not exist.
    async fn read_metadata(&self) -> Result<Option<KvMetadata>, SecretStoreError> {
        let path = format!("/v1/{}/metadata/{}", self.mount, self.path);
        let resp = self.call(Method::GET, &path, None).await?;
        match resp.status {
            StatusCode::OK => KvMetadata::parse(&resp.json()?).map(Some),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(status_error(s, &resp, &self.describe())),
        }
    }

    /// Writes `value` as a new KV version, only if the newest version is still `cas`.
    /// Returns the new version number; `Conflict` if someone wrote first.
    async fn write_data(&self, value: &Credential, cas: u64) -> Result<u64, SecretStoreError> {
        let path = format!("/v1/{}/data/{}", self.mount, self.path);
        let body = json!({
            "data": {"username": value.username, "password": value.password.expose()},
            "options": {"cas": cas},
        });
        let resp = self.call(Method::POST, &path, Some(&body)).await?;
        if !resp.status.is_success() {
            return Err(status_error(resp.status, &resp, &self.describe()));
        }
        resp.json()?
            .pointer("/data/version")
            .and_then(Value::as_u64)
            .ok_or_else(|| {
                SecretStoreError::Malformed("KV write answer has no data.version".into())
            })
    }

    /// The credential stored as KV version `version`, or `None` if Vault no longer has it
    /// (deleted, destroyed, or pruned by `max_versions`).
    async fn read_version(&self, version: u64) -> Result<Option<Credential>, SecretStoreError> {
        let path = format!("/v1/{}/data/{}?version={version}", self.mount, self.path);
        let resp = self.call(Method::GET, &path, None).await?;
        match resp.status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            s => return Err(status_error(s, &resp, &self.describe())),
        }
        let doc = resp.json()?;
        let data = doc.pointer("/data/data");
        let field = |name: &str| data.and_then(|d| d.get(name)).and_then(Value::as_str);
        match (field("username"), field("password")) {
            (Some(username), Some(password)) => Ok(Some(Credential {
                username: username.to_owned(),
                password: SecretValue::new(password),
            })),
            // Says which fields are missing, never what the data holds.
            _ => Err(SecretStoreError::Malformed(format!(
                "{} version {version} lacks a string username and password",
                self.describe()
            ))),
        }
    }

    /// The rotation token and value of the version a stage key names.
    async fn read_stage(
        &self,
        stage_key: &str,
    ) -> Result<Option<(String, Credential)>, SecretStoreError> {
        let Some(meta) = self.read_metadata().await? else {
            return Ok(None);
        };
        let Some(version) = meta.stage(stage_key)? else {
            return Ok(None);
        };
        let token = meta.tokens.get(&version).cloned().ok_or_else(|| {
            SecretStoreError::Malformed(format!(
                "{}: {stage_key} names version {version}, which has no rotation token",
                self.describe()
            ))
        })?;
        match self.read_version(version).await? {
            Some(value) => Ok(Some((token, value))),
            None => Err(SecretStoreError::VersionNotFound(format!(
                "{} KV version {version} ({stage_key})",
                self.describe()
            ))),
        }
    }

    /// Read-modify-write of our custom_metadata keys. `change` edits a copy of the map and
    /// says whether to write it. With OpenBao the write carries `metadata_cas`, so a change
    /// made by another writer in between is detected and the edit is redone on fresh
    /// metadata; HashiCorp Vault has no metadata check-and-set and ignores the field.
    async fn update_stages<F>(&self, mut change: F) -> Result<(), SecretStoreError>
    where
        F: FnMut(&KvMetadata, &mut BTreeMap<String, String>) -> Result<bool, SecretStoreError>,
    {
        for _ in 0..METADATA_ATTEMPTS {
            let meta = self
                .read_metadata()
                .await?
                .ok_or_else(|| SecretStoreError::NotFound(self.describe()))?;
            let mut custom = meta.custom.clone();
            if !change(&meta, &mut custom)? {
                return Ok(());
            }
            prune_tokens(&mut custom)?;
            let mut body = Map::new();
            body.insert("custom_metadata".into(), json!(custom));
            if let Some(cas) = meta.metadata_version {
                body.insert("metadata_cas".into(), json!(cas));
            }
            let path = format!("/v1/{}/metadata/{}", self.mount, self.path);
            let resp = self
                .call(Method::POST, &path, Some(&Value::Object(body)))
                .await?;
            if resp.status.is_success() {
                return Ok(());
            }
            match status_error(resp.status, &resp, &self.describe()) {
                SecretStoreError::Conflict => continue,
                e => return Err(e),
            }
        }
        Err(SecretStoreError::Conflict)
    }
}

#[tonic::async_trait]
impl SecretStore for VaultKvStore {
    async fn put_pending(&self, token: &str, value: &Credential) -> Result<(), SecretStoreError> {
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(SecretStoreError::Refused(format!(
                "a rotation token must be 1 to {MAX_TOKEN_LEN} bytes to fit Vault's custom_metadata"
            )));
        }
        let _guard = self.write_lock.lock().await;
        let meta = self.read_metadata().await?.unwrap_or_default();
        if meta.version_of(token).is_some() {
            return Ok(());
        }
        if let Some(seen) = meta.other_writer(&self.describe())? {
            // Check-and-set only stops writers that read the same metadata; one that starts
            // after another's write would otherwise stack a second pending version on top.
            return Err(SecretStoreError::OtherWriter(seen));
        }
        let version = match self.write_data(value, meta.latest).await {
            Ok(version) => version,
            Err(SecretStoreError::Conflict) => {
                // Lost the check-and-set. It is only ours if an earlier attempt with this
                // token won and recorded itself in the meantime.
                let meta = self.read_metadata().await?.unwrap_or_default();
                return match meta.version_of(token) {
                    Some(_) => Ok(()),
                    None => Err(SecretStoreError::Conflict),
                };
            }
            Err(e) => return Err(e),
        };
        self.update_stages(|_, custom| {
            custom.insert(token_key(version), token.to_owned());
            custom.insert(PENDING_KEY.into(), version.to_string());
            Ok(true)
        })
        .await
    }

    async fn get_version(&self, token: &str) -> Result<Option<Credential>, SecretStoreError> {
        let Some(meta) = self.read_metadata().await? else {
            return Ok(None);
        };
        match meta.version_of(token) {
            Some(version) => self.read_version(version).await,
            None => Ok(None),
        }
    }

    async fn get_current(&self) -> Result<Option<(String, Credential)>, SecretStoreError> {
        self.read_stage(CURRENT_KEY).await
    }

    async fn get_previous(&self) -> Result<Option<(String, Credential)>, SecretStoreError> {
        self.read_stage(PREVIOUS_KEY).await
    }

    async fn promote(&self, token: &str) -> Result<(), SecretStoreError> {
        let _guard = self.write_lock.lock().await;
        let describe = self.describe();
        self.update_stages(|meta, custom| {
            let version = meta.version_of(token).ok_or_else(|| {
                SecretStoreError::VersionNotFound(format!("{describe}: the version to promote"))
            })?;
            let current = meta.stage(CURRENT_KEY)?;
            let pending = meta.stage(PENDING_KEY)?;
            if current == Some(version) {
                // Already done; only a crash between promote's two effects could leave
                // pending behind, and there is just one write, so this is mere tidiness.
                if pending == Some(version) {
                    custom.remove(PENDING_KEY);
                    return Ok(true);
                }
                return Ok(false);
            }
            if !meta.kept.contains_key(&version) {
                return Err(SecretStoreError::VersionNotFound(format!(
                    "{describe} KV version {version} (deleted or pruned)"
                )));
            }
            match current {
                Some(old) => custom.insert(PREVIOUS_KEY.into(), old.to_string()),
                None => custom.remove(PREVIOUS_KEY),
            };
            custom.insert(CURRENT_KEY.into(), version.to_string());
            custom.remove(PENDING_KEY);
            Ok(true)
        })
        .await
    }

    async fn adopt(&self) -> Result<Option<Adopted>, SecretStoreError> {
        let _guard = self.write_lock.lock().await;
        let Some(meta) = self.read_metadata().await? else {
            return Ok(None);
        };
        // Only a secret with none of Mayfly's markers: one Mayfly manages keeps its guard.
        let unmarked = meta.stage(CURRENT_KEY)?.is_none()
            && meta.stage(PENDING_KEY)?.is_none()
            && meta.tokens.is_empty();
        let version = meta.latest;
        if !unmarked || version == 0 || !meta.kept.contains_key(&version) {
            return Ok(None);
        }
        // It must be a credential Mayfly can rotate; the error names the missing fields.
        if self.read_version(version).await?.is_none() {
            return Ok(None);
        }
        let token = format!("adopted-{}", hex::encode(rand::random::<[u8; 16]>()));
        let mut took = false;
        self.update_stages(|meta, custom| {
            took = false;
            if meta.latest != version
                || meta.stage(CURRENT_KEY)?.is_some()
                || !meta.tokens.is_empty()
            {
                // Written again, or adopted by another daemon, meanwhile.
                return Ok(false);
            }
            custom.insert(token_key(version), token.clone());
            custom.insert(CURRENT_KEY.into(), version.to_string());
            took = true;
            Ok(true)
        })
        .await?;
        let written = match meta.kept.get(&version) {
            Some(Some(at)) => format!(", written at unix {at}"),
            _ => String::new(),
        };
        Ok(took.then(|| Adopted {
            token,
            detail: format!("{} KV version {version}{written}", self.describe()),
        }))
    }

    async fn versions(&self) -> Result<Vec<VersionInfo>, SecretStoreError> {
        let Some(meta) = self.read_metadata().await? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (version, token) in meta.tokens.iter().rev() {
            // A token can outlive its version when max_versions prunes it.
            let Some(created_at) = meta.kept.get(version) else {
                continue;
            };
            let mut stages = Vec::new();
            for (key, name) in [
                (CURRENT_KEY, "current"),
                (PREVIOUS_KEY, "previous"),
                (PENDING_KEY, "pending"),
            ] {
                if meta.stage(key)? == Some(*version) {
                    stages.push(name.to_owned());
                }
            }
            out.push(VersionInfo {
                id: token.clone(),
                stages,
                created_at: *created_at,
            });
        }
        Ok(out)
    }
}

impl fmt::Debug for VaultKvStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultKvStore")
            .field("address", &self.http.address())
            .field("mount", &self.mount)
            .field("path", &self.path)
            .field("auth", &self.login.kind())
            .finish()
    }
}

/// What a KV v2 metadata read tells us.
#[derive(Debug, Default)]
struct KvMetadata {
    /// Vault's newest version number (0 when the secret has none): the check-and-set value
    /// for the next write.
    latest: u64,
    /// OpenBao's `current_metadata_version`, for `metadata_cas`; absent on HashiCorp Vault.
    metadata_version: Option<u64>,
    custom: BTreeMap<String, String>,
    /// Rotation token by KV version, from the `mayfly_token_<N>` keys.
    tokens: BTreeMap<u64, String>,
    /// Versions whose data Vault still holds (not deleted or destroyed), with their
    /// creation time in Unix seconds when it parses.
    kept: BTreeMap<u64, Option<i64>>,
}

impl KvMetadata {
    fn parse(doc: &Value) -> Result<Self, SecretStoreError> {
        let malformed = |why: &str| SecretStoreError::Malformed(format!("KV metadata: {why}"));
        let data = doc.get("data").ok_or_else(|| malformed("no data"))?;
        let latest = data
            .get("current_version")
            .and_then(Value::as_u64)
            .ok_or_else(|| malformed("no current_version"))?;
        let metadata_version = data.get("current_metadata_version").and_then(Value::as_u64);
        let mut custom = BTreeMap::new();
        if let Some(map) = data.get("custom_metadata").and_then(Value::as_object) {
            for (k, v) in map {
                if let Some(v) = v.as_str() {
                    custom.insert(k.clone(), v.to_owned());
                }
            }
        }
        let tokens = custom
            .iter()
            .filter_map(|(k, v)| {
                let n = k.strip_prefix(TOKEN_KEY_PREFIX)?.parse::<u64>().ok()?;
                Some((n, v.clone()))
            })
            .collect();
        let mut kept = BTreeMap::new();
        if let Some(versions) = data.get("versions").and_then(Value::as_object) {
            for (n, info) in versions {
                let Ok(n) = n.parse::<u64>() else { continue };
                let destroyed = info.get("destroyed").and_then(Value::as_bool) == Some(true);
                let deleted = info
                    .get("deletion_time")
                    .and_then(Value::as_str)
                    .is_some_and(|t| !t.is_empty());
                if destroyed || deleted {
                    continue;
                }
                let created = info
                    .get("created_time")
                    .and_then(Value::as_str)
                    .and_then(unix_seconds);
                kept.insert(n, created);
            }
        }
        Ok(Self {
            latest,
            metadata_version,
            custom,
            tokens,
            kept,
        })
    }

    /// The KV version a stage key names, if set.
    fn stage(&self, key: &str) -> Result<Option<u64>, SecretStoreError> {
        self.custom
            .get(key)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    SecretStoreError::Malformed(format!(
                        "custom_metadata {key} is not a version number"
                    ))
                })
            })
            .transpose()
    }

    fn version_of(&self, token: &str) -> Option<u64> {
        self.tokens
            .iter()
            .find_map(|(n, t)| (t == token).then_some(*n))
    }

    /// What another writer did within [`OTHER_WRITER_WINDOW`]: made another token's version
    /// pending, or wrote the newest version without a rotation token. Callers have already
    /// checked that their own token is not recorded, so any pending version is someone
    /// else's. `secret` names it in the message.
    fn other_writer(&self, secret: &str) -> Result<Option<String>, SecretStoreError> {
        let window = OTHER_WRITER_WINDOW.as_secs();
        let when = |version: u64| match self.kept.get(&version) {
            Some(Some(at)) => format!("at unix {at}"),
            _ => "recently".to_string(),
        };
        if let Some(pending) = self.stage(PENDING_KEY)?
            && self.written_within(pending, OTHER_WRITER_WINDOW)
        {
            let token = self.tokens.get(&pending).map_or("none", String::as_str);
            return Ok(Some(format!(
                "{secret}: KV version {pending} is pending under another rotation (token \
                 {token}), written {}: another daemon is rotating this secret; retry once it \
                 is done (a pending version older than {window} s counts as abandoned)",
                when(pending)
            )));
        }
        let unrecorded = self.latest > 0 && !self.tokens.contains_key(&self.latest);
        if unrecorded && self.written_within(self.latest, OTHER_WRITER_WINDOW) {
            return Ok(Some(format!(
                "{secret}: KV version {} was written {} by a writer that is not a Mayfly \
                 rotation (it has no rotation token), and Mayfly manages this secret \
                 (current is version {}): either another daemon is between its write and \
                 its record (retry in a few seconds), or someone wrote it by hand or with \
                 another tool, and that value is not Mayfly's; rotate through `mayflyd \
                 secret rotate` only, and retry {window} s after that write to replace it",
                self.latest,
                when(self.latest),
                self.custom.get(CURRENT_KEY).map_or("none", String::as_str)
            )));
        }
        Ok(None)
    }

    fn written_within(&self, version: u64, window: Duration) -> bool {
        let Some(Some(created)) = self.kept.get(&version) else {
            return false;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        // Clock skew between us and Vault only shifts the window, in either direction.
        now - created < window.as_secs() as i64
    }
}

fn token_key(version: u64) -> String {
    format!("{TOKEN_KEY_PREFIX}{version}")
}

/// Drops token keys beyond the newest [`KEPT_TOKENS`], except the staged versions', so the
/// secret stays inside Vault's custom_metadata limits however long it rotates.
fn prune_tokens(custom: &mut BTreeMap<String, String>) -> Result<(), SecretStoreError> {
    let mut staged = Vec::new();
    for key in [CURRENT_KEY, PREVIOUS_KEY, PENDING_KEY] {
        if let Some(v) = custom.get(key) {
            staged.push(v.parse::<u64>().map_err(|_| {
                SecretStoreError::Malformed(format!(
                    "custom_metadata {key} is not a version number"
                ))
            })?);
        }
    }
    let mut numbered: Vec<u64> = custom
        .keys()
        .filter_map(|k| k.strip_prefix(TOKEN_KEY_PREFIX)?.parse().ok())
        .collect();
    numbered.sort_unstable_by(|a, b| b.cmp(a));
    for old in numbered.into_iter().skip(KEPT_TOKENS) {
        if !staged.contains(&old) {
            custom.remove(&token_key(old));
        }
    }
    Ok(())
}

/// Vault's RFC 3339 times (`2024-05-01T10:00:00.123456789Z`) as Unix seconds.
fn unix_seconds(text: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339(text).ok()?;
    t.duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs() as i64)
}

/// Mount and path segments are used in URLs unescaped, so only URL-safe characters pass,
/// and no empty, `.` or `..` segment can climb to another path.
fn check_path(what: &str, value: &str) -> Result<(), SecretStoreError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let ok = !value.is_empty()
        && value
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != ".." && seg.chars().all(ok_char));
    if ok {
        Ok(())
    } else {
        Err(SecretStoreError::Refused(format!(
            "Vault {what} {value:?} must be /-separated segments of letters, digits, '-', '_', '.'"
        )))
    }
}

//! AWS Secrets Manager as a `SecretStore`: one AWS secret per rotated credential, whose
//! versions are keyed by Mayfly's rotation token (the ClientRequestToken) and moved through
//! AWSPENDING → AWSCURRENT → AWSPREVIOUS the way AWS's rotation Lambdas do, without a Lambda.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, ConfigLoader, Region};
use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_secretsmanager::operation::get_secret_value::GetSecretValueOutput;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::secrets::{Credential, SecretStore, SecretStoreError, SecretValue, VersionInfo};

const STAGE_CURRENT: &str = "AWSCURRENT";
const STAGE_PREVIOUS: &str = "AWSPREVIOUS";
const STAGE_PENDING: &str = "AWSPENDING";

/// AWS rejects a ClientRequestToken outside this length (and so does moto).
const TOKEN_MIN_CHARS: usize = 32;
const TOKEN_MAX_CHARS: usize = 64;

/// Where the secret lives. Holds no credential: the AWS keys come from the standard chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsStoreConfig {
    /// The secret's name or ARN.
    pub secret_id: String,
    /// e.g. `us-east-1`.
    pub region: String,
    /// Another endpoint than AWS's own (moto in tests, a VPC endpoint in production).
    pub endpoint_url: Option<String>,
}

/// A `SecretStore` backed by one AWS Secrets Manager secret whose SecretString is the JSON
/// `{"username": …, "password": …}`.
///
/// It calls only DescribeSecret, GetSecretValue, PutSecretValue and UpdateSecretVersionStage
/// (plus CreateSecret in [`AwsSecretsManagerStore::ensure_exists`]), the permission set of
/// AWS's own rotation functions, so an operator's existing rotation policy is enough.
pub struct AwsSecretsManagerStore {
    client: Client,
    config: AwsStoreConfig,
}

impl fmt::Debug for AwsSecretsManagerStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The SDK client is left out: its config is long and says nothing about the secret.
        f.debug_struct("AwsSecretsManagerStore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl AwsSecretsManagerStore {
    /// A store for `config.secret_id`, with AWS credentials from the standard chain
    /// (environment, profile, web identity, container or instance role).
    pub async fn new(config: AwsStoreConfig) -> Result<Self, SecretStoreError> {
        Self::with_loader(config, aws_config::defaults(BehaviorVersion::latest())).await
    }

    /// Like [`Self::new`] but on a caller's loader, e.g. one with explicit credentials.
    pub async fn with_loader(
        config: AwsStoreConfig,
        loader: ConfigLoader,
    ) -> Result<Self, SecretStoreError> {
        validate_config(&config)?;
        // Bound every call: a rotation stuck on a silent endpoint would hold its lease forever.
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_timeout(Duration::from_secs(60))
            .build();
        let mut loader = loader
            .region(Region::new(config.region.clone()))
            .timeout_config(timeouts);
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url.clone());
        }
        let sdk_config = loader.load().await;
        Ok(Self {
            client: Client::new(&sdk_config),
            config,
        })
    }

    pub fn config(&self) -> &AwsStoreConfig {
        &self.config
    }

    /// Creates the secret with `initial` as its AWSCURRENT value unless it already has a
    /// current value. Returns whether it wrote `initial`. Creating secrets is otherwise the
    /// operator's job: the `SecretStore` methods answer `NotFound` for a missing secret.
    pub async fn ensure_exists(&self, initial: &Credential) -> Result<bool, SecretStoreError> {
        let encoded = encode_credential(initial)?;
        // The SDK fills in a fresh ClientRequestToken, which becomes the first VersionId.
        let created = self
            .client
            .create_secret()
            .name(&self.config.secret_id)
            .secret_string(encoded.as_str())
            .send()
            .await;
        match created {
            Ok(_) => {
                tracing::info!(secret = %self.config.secret_id, "created the secret");
                return Ok(true);
            }
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_resource_exists_exception()) => {}
            Err(err) => return Err(self.map_error("CreateSecret", err)),
        }
        // It exists; it may still have no value (created empty by hand or by Terraform).
        let versions = self.describe().await?;
        if holder_of(&versions, STAGE_CURRENT).is_some() {
            return Ok(false);
        }
        // Without VersionStages, PutSecretValue labels the new version AWSCURRENT.
        self.client
            .put_secret_value()
            .secret_id(&self.config.secret_id)
            .secret_string(encoded.as_str())
            .send()
            .await
            .map_err(|err| self.map_error("PutSecretValue", err))?;
        tracing::info!(secret = %self.config.secret_id, "gave the empty secret its first value");
        Ok(true)
    }

    /// Version id → staging labels. `NotFound` when the secret does not exist.
    async fn describe(&self) -> Result<HashMap<String, Vec<String>>, SecretStoreError> {
        let described = self
            .client
            .describe_secret()
            .secret_id(&self.config.secret_id)
            .send()
            .await
            .map_err(|err| self.map_error("DescribeSecret", err))?;
        // A secret without any value has no map at all.
        Ok(described.version_ids_to_stages.unwrap_or_default())
    }

    /// The version holding `stage`, or `None`. Always names the stage: moto can answer a
    /// GetSecretValue without one with a stale version.
    async fn get_by_stage(
        &self,
        stage: &str,
    ) -> Result<Option<(String, Credential)>, SecretStoreError> {
        let fetched = self
            .client
            .get_secret_value()
            .secret_id(&self.config.secret_id)
            .version_stage(stage)
            .send()
            .await;
        match fetched {
            Ok(output) => {
                let Some(id) = output.version_id.clone() else {
                    return Err(SecretStoreError::Refused(format!(
                        "GetSecretValue {stage} on secret {}: the reply has no VersionId",
                        self.config.secret_id
                    )));
                };
                let credential = decode_credential(&id, output)?;
                Ok(Some((id, credential)))
            }
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                // The same error means "no such secret" and "no version has this stage";
                // DescribeSecret tells them apart.
                self.describe().await?;
                Ok(None)
            }
            Err(err) => Err(self.map_error("GetSecretValue", err)),
        }
    }

    /// Removes `stage` from version `from`.
    async fn remove_stage(&self, stage: &str, from: &str) -> Result<(), SecretStoreError> {
        self.client
            .update_secret_version_stage()
            .secret_id(&self.config.secret_id)
            .version_stage(stage)
            .remove_from_version_id(from)
            .send()
            .await
            .map_err(|err| self.map_stage_error(err))?;
        Ok(())
    }

    /// Stage moves name the version that holds the label now; AWS refuses one that no longer
    /// does, which means another writer moved it since our DescribeSecret.
    fn map_stage_error<E, R>(&self, err: SdkError<E, R>) -> SecretStoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: fmt::Debug,
    {
        if err.code() == Some("InvalidParameterException") {
            tracing::warn!(
                secret = %self.config.secret_id,
                error = %DisplayErrorContext(&err),
                "UpdateSecretVersionStage refused; the secret changed under us"
            );
            return SecretStoreError::Conflict;
        }
        self.map_error("UpdateSecretVersionStage", err)
    }

    /// Turns an SDK error into the store's error. AWS's messages never carry the secret
    /// value, and for unparseable replies only a fixed text is used, so none leaks here.
    fn map_error<E, R>(&self, operation: &str, err: SdkError<E, R>) -> SecretStoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: fmt::Debug,
    {
        let secret = &self.config.secret_id;
        match &err {
            SdkError::ServiceError(service) => {
                let error = service.err();
                if error.code() == Some("ResourceNotFoundException") {
                    return SecretStoreError::NotFound(secret.clone());
                }
                SecretStoreError::Refused(format!(
                    "{operation} on secret {secret}: {}: {}",
                    error.code().unwrap_or("unknown error"),
                    error.message().unwrap_or("no message")
                ))
            }
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => {
                SecretStoreError::Unreachable(format!(
                    "{operation} on secret {secret}: {}",
                    DisplayErrorContext(&err)
                ))
            }
            SdkError::ResponseError(_) => SecretStoreError::Unreachable(format!(
                "{operation} on secret {secret}: the reply is not a Secrets Manager response \
                 (is the endpoint right?)"
            )),
            // ConstructionFailure (no credentials found, bad parameter) and any future kind.
            _ => SecretStoreError::Refused(format!(
                "{operation} on secret {secret}: the request could not be made: {}",
                DisplayErrorContext(&err)
            )),
        }
    }
}

#[tonic::async_trait]
impl SecretStore for AwsSecretsManagerStore {
    async fn put_pending(&self, token: &str, value: &Credential) -> Result<(), SecretStoreError> {
        check_token(token)?;
        // AWS refuses a second write under a token with a different value, but moto overwrites
        // it: look first, so the first value wins on both.
        if self.describe().await?.contains_key(token) {
            tracing::debug!(secret = %self.config.secret_id, version = token, "already stored");
            return Ok(());
        }
        let encoded = encode_credential(value)?;
        let put = self
            .client
            .put_secret_value()
            .secret_id(&self.config.secret_id)
            .client_request_token(token)
            .secret_string(encoded.as_str())
            .version_stages(STAGE_PENDING)
            .send()
            .await;
        match put {
            Ok(_) => {
                tracing::info!(
                    secret = %self.config.secret_id, version = token, "stored as pending"
                );
                Ok(())
            }
            // Another writer stored this token since our DescribeSecret: theirs was first.
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_resource_exists_exception()) =>
            {
                Ok(())
            }
            Err(err) => Err(self.map_error("PutSecretValue", err)),
        }
    }

    async fn get_version(&self, token: &str) -> Result<Option<Credential>, SecretStoreError> {
        check_token(token)?;
        let fetched = self
            .client
            .get_secret_value()
            .secret_id(&self.config.secret_id)
            .version_id(token)
            .send()
            .await;
        match fetched {
            Ok(output) => decode_credential(token, output).map(Some),
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                // Missing version or missing secret: only the latter is an error.
                self.describe().await?;
                Ok(None)
            }
            Err(err) => Err(self.map_error("GetSecretValue", err)),
        }
    }

    async fn get_current(&self) -> Result<Option<(String, Credential)>, SecretStoreError> {
        self.get_by_stage(STAGE_CURRENT).await
    }

    async fn get_previous(&self) -> Result<Option<(String, Credential)>, SecretStoreError> {
        self.get_by_stage(STAGE_PREVIOUS).await
    }

    async fn promote(&self, token: &str) -> Result<(), SecretStoreError> {
        check_token(token)?;
        // Decide from the labels as they are, so a rerun after a crash between the two stage
        // moves only does what is left.
        let versions = self.describe().await?;
        let Some(labels) = versions.get(token) else {
            return Err(SecretStoreError::VersionNotFound(token.to_owned()));
        };
        // A version that is neither pending nor current belongs to a rotation that another
        // one overtook; promoting it on a late replay would roll the secret back.
        if !labels
            .iter()
            .any(|l| l == STAGE_PENDING || l == STAGE_CURRENT)
        {
            return Err(SecretStoreError::Refused(format!(
                "version {token} of secret {} is neither pending nor current; a later \
                 rotation has replaced it",
                self.config.secret_id
            )));
        }
        let current = holder_of(&versions, STAGE_CURRENT);
        if current != Some(token) {
            let mut request = self
                .client
                .update_secret_version_stage()
                .secret_id(&self.config.secret_id)
                .version_stage(STAGE_CURRENT)
                .move_to_version_id(token);
            if let Some(current) = current {
                request = request.remove_from_version_id(current);
            }
            // AWS (and moto) label the version it leaves AWSPREVIOUS themselves.
            request
                .send()
                .await
                .map_err(|err| self.map_stage_error(err))?;
            tracing::info!(secret = %self.config.secret_id, version = token, "made current");
        }
        // AWSPENDING is on one version at most; whichever holds it, a finished rotation has none.
        if let Some(pending) = holder_of(&versions, STAGE_PENDING) {
            self.remove_stage(STAGE_PENDING, pending).await?;
        }
        Ok(())
    }

    async fn versions(&self) -> Result<Vec<VersionInfo>, SecretStoreError> {
        // DescribeSecret has no per-version dates (ListSecretVersionIds has, but needs a
        // permission rotation policies do not grant), so order by stage: in a rotation the
        // pending version is the newest, then current, then previous.
        let mut versions: Vec<VersionInfo> = self
            .describe()
            .await?
            .into_iter()
            .map(|(id, labels)| VersionInfo {
                id,
                stages: labels
                    .iter()
                    .filter_map(|l| mayfly_stage(l))
                    .map(str::to_owned)
                    .collect(),
                created_at: None,
            })
            .collect();
        versions.sort_by(|a, b| {
            age_rank(&a.stages)
                .cmp(&age_rank(&b.stages))
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(versions)
    }
}

/// The JSON kept in SecretString, the layout of AWS's own rotation templates.
#[derive(Serialize)]
struct StoredCredentialRef<'a> {
    username: &'a str,
    password: &'a str,
}

#[derive(Deserialize)]
struct StoredCredential {
    username: String,
    password: String,
}

fn validate_config(config: &AwsStoreConfig) -> Result<(), SecretStoreError> {
    if config.secret_id.trim().is_empty() {
        return Err(SecretStoreError::Refused(
            "the AWS secret id is empty; name the secret or give its ARN".into(),
        ));
    }
    if config.region.trim().is_empty() {
        return Err(SecretStoreError::Refused(
            "the AWS region is empty; give one such as us-east-1".into(),
        ));
    }
    if let Some(url) = &config.endpoint_url {
        let parsed: Result<http::Uri, _> = url.parse();
        let usable = parsed.as_ref().is_ok_and(|uri| {
            matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some()
        });
        if !usable {
            return Err(SecretStoreError::Refused(format!(
                "the AWS endpoint URL {url:?} is not an http(s) URL with a host"
            )));
        }
    }
    Ok(())
}

fn check_token(token: &str) -> Result<(), SecretStoreError> {
    let chars = token.chars().count();
    if (TOKEN_MIN_CHARS..=TOKEN_MAX_CHARS).contains(&chars) {
        return Ok(());
    }
    Err(SecretStoreError::Refused(format!(
        "rotation token {token:?} has {chars} characters; AWS Secrets Manager uses it as the \
         ClientRequestToken, which must have {TOKEN_MIN_CHARS} to {TOKEN_MAX_CHARS} (a UUID fits)"
    )))
}

/// The version carrying `stage`, if any; AWS keeps each stage on one version at most.
fn holder_of<'a>(versions: &'a HashMap<String, Vec<String>>, stage: &str) -> Option<&'a str> {
    versions
        .iter()
        .find(|(_, labels)| labels.iter().any(|l| l == stage))
        .map(|(id, _)| id.as_str())
}

/// AWS's label for the stages Mayfly knows; operators' own labels are not Mayfly's business.
fn mayfly_stage(label: &str) -> Option<&'static str> {
    match label {
        STAGE_CURRENT => Some("current"),
        STAGE_PREVIOUS => Some("previous"),
        STAGE_PENDING => Some("pending"),
        _ => None,
    }
}

/// Lower is newer; versions with none of our stages go last.
fn age_rank(stages: &[String]) -> u8 {
    stages
        .iter()
        .map(|s| match s.as_str() {
            "pending" => 0,
            "current" => 1,
            _ => 2,
        })
        .min()
        .unwrap_or(3)
}

fn encode_credential(credential: &Credential) -> Result<Zeroizing<String>, SecretStoreError> {
    // Our copy is wiped on drop; the SDK's copy of the request is out of our hands.
    serde_json::to_string(&StoredCredentialRef {
        username: &credential.username,
        password: credential.password.expose(),
    })
    .map(Zeroizing::new)
    .map_err(|_| SecretStoreError::Malformed("the credential could not be written as JSON".into()))
}

fn decode_credential(
    version_id: &str,
    mut output: GetSecretValueOutput,
) -> Result<Credential, SecretStoreError> {
    let Some(text) = output.secret_string.take().map(Zeroizing::new) else {
        let what = if output.secret_binary.is_some() {
            "holds SecretBinary"
        } else {
            "has no value"
        };
        return Err(SecretStoreError::Malformed(format!(
            "version {version_id} {what}; Mayfly keeps SecretString JSON \
             {{\"username\", \"password\"}}"
        )));
    };
    // serde_json's own message can quote the offending value, which may be the password:
    // report only where and what kind of error it was.
    let stored: StoredCredential = serde_json::from_str(&text).map_err(|err| {
        SecretStoreError::Malformed(format!(
            "version {version_id}: SecretString is not JSON {{\"username\": string, \"password\": \
             string}} ({:?} error at line {}, column {})",
            err.classify(),
            err.line(),
            err.column()
        ))
    })?;
    Ok(Credential {
        username: stored.username,
        // Moving the String hands its buffer to Zeroizing without a copy.
        password: SecretValue::new(stored.password),
    })
}

#[cfg(test)]
mod tests;

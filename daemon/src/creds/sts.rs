//! `aws_sts`: short-lived AWS credentials from `AssumeRole`, through the AWS SDK's STS
//! client on the same aws-lc-rs stack as Secrets Manager. Each lease is one role session:
//! `RoleSessionName` is the lease id and `SourceIdentity` the workload's SPIFFE ID (in the
//! characters STS allows), so CloudTrail names both; session tags carry the trust domain
//! and the full SPIFFE ID; an optional inline session policy narrows the role further.
//!
//! STS grants 15 minutes at least and the role's maximum (1 to 12 h) at most. An STS
//! session cannot be ended early one by one: revoking the lease drops every copy Mayfly
//! handed out, and the session itself lasts until its expiry, which is why TTLs here stay
//! short.

use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_sts::Client;
use aws_sdk_sts::types::Tag;

use super::{BackendError, Issued};
use crate::secrets::SecretValue;

/// STS's shortest session.
pub const MIN_TTL: Duration = Duration::from_secs(15 * 60);

/// STS's longest session (the role's own maximum may be lower; STS then refuses).
pub const MAX_TTL: Duration = Duration::from_secs(12 * 3600);

/// Below this botocore refreshes on nearly every call (it refreshes 15 minutes before
/// expiry), so issuing is allowed but the answer says so.
pub const ADVISED_TTL: Duration = Duration::from_secs(30 * 60);

pub struct AwsSts {
    client: Client,
    role_arn: String,
    policy: Option<String>,
    trust_domain: String,
}

impl AwsSts {
    /// A client with the daemon's own AWS credentials from the standard chain.
    pub async fn new(
        role_arn: &str,
        region: &str,
        endpoint_url: Option<&str>,
        policy: Option<String>,
        trust_domain: &str,
    ) -> Result<Self, BackendError> {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_timeout(Duration::from_secs(30))
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region.to_string()))
            .timeout_config(timeouts);
        if let Some(url) = endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let config = loader.load().await;
        Ok(Self {
            client: Client::new(&config),
            role_arn: role_arn.to_string(),
            policy,
            trust_domain: trust_domain.to_string(),
        })
    }

    /// One role session for `holder` lasting `ttl_secs`; returns it and when it expires.
    pub async fn issue(
        &self,
        lease_id: &str,
        holder: &str,
        ttl_secs: i64,
        elevation: &str,
    ) -> Result<(Issued, i64), BackendError> {
        let tag = |key: &str, value: &str| {
            Tag::builder()
                .key(key)
                .value(value)
                .build()
                .map_err(|e| BackendError::Config(format!("session tag {key}: {e}")))
        };
        let mut request = self
            .client
            .assume_role()
            .role_arn(&self.role_arn)
            .role_session_name(lease_id)
            .source_identity(source_identity(holder))
            .duration_seconds(i32::try_from(ttl_secs).unwrap_or(i32::MAX))
            .tags(tag("mayfly:trust-domain", &self.trust_domain)?)
            .tags(tag("mayfly:spiffe-id", &truncate(holder, 256))?)
            .tags(tag("mayfly:lease", lease_id)?);
        if !elevation.is_empty() {
            request = request.tags(tag("mayfly:elevation", elevation)?);
        }
        if let Some(policy) = &self.policy {
            request = request.policy(policy);
        }
        let answer = request.send().await.map_err(|e| {
            use aws_sdk_sts::error::SdkError;
            let detail = aws_sdk_sts::error::DisplayErrorContext(&e).to_string();
            match e {
                SdkError::ServiceError(_) => BackendError::Refused(format!("STS: {detail}")),
                _ => BackendError::Unavailable(format!("STS: {detail}")),
            }
        })?;
        let credentials = answer
            .credentials()
            .ok_or_else(|| BackendError::Refused("STS answered without credentials".into()))?;
        let expires_at = credentials.expiration().secs();
        let backend_id = answer
            .assumed_role_user()
            .map(|user| user.assumed_role_id().to_string())
            .unwrap_or_else(|| lease_id.to_string());
        let expiration = chrono::DateTime::from_timestamp(expires_at, 0)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default();
        Ok((
            Issued {
                backend_id,
                values: vec![
                    (
                        "access_key_id".into(),
                        SecretValue::new(credentials.access_key_id()),
                    ),
                    (
                        "secret_access_key".into(),
                        SecretValue::new(credentials.secret_access_key()),
                    ),
                    (
                        "session_token".into(),
                        SecretValue::new(credentials.session_token()),
                    ),
                    ("expiration".into(), SecretValue::new(expiration)),
                ],
            },
            expires_at,
        ))
    }
}

/// The SPIFFE ID in the characters `SourceIdentity` allows (letters, digits and
/// `_+=,.@-`, 2 to 64 of them): the scheme dropped and each `/` written `@`, e.g.
/// `spiffe://example.org/ns/web` -> `example.org@ns@web`.
pub fn source_identity(spiffe_id: &str) -> String {
    let bare = spiffe_id.strip_prefix("spiffe://").unwrap_or(spiffe_id);
    let mapped: String = bare
        .chars()
        .map(|c| match c {
            '/' => '@',
            c if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) => c,
            _ => '_',
        })
        .collect();
    truncate(&mapped, 64)
}

fn truncate(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spiffe_id_becomes_a_source_identity_sts_accepts() {
        assert_eq!(
            source_identity("spiffe://example.org/ns/web"),
            "example.org@ns@web"
        );
        assert_eq!(
            source_identity("spiffe://example.org/a b%"),
            "example.org@a_b_"
        );
        let long = format!("spiffe://example.org/{}", "x".repeat(100));
        assert_eq!(source_identity(&long).len(), 64);
    }
}

//! TTL-bound credentials (dynamic database users and the like) that the daemon issues for
//! this agent's workloads: the credential as the agent holds it, the call to the daemon
//! behind a trait, and why a request for one failed. The cache itself is in [`cache`].

mod cache;
mod feed;
pub mod format;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use zeroize::Zeroizing;

use mayfly_common::SpiffeId;
use mayfly_proto::v1;

pub use cache::{CredentialCache, CredentialProgress};
pub use feed::{CredentialFeed, HeldCredentials};

/// Asks the daemon for a credential; the agent's implementation calls `IssueCredential`
/// and `RenewCredential` with its own SVID, tests count the calls.
#[tonic::async_trait]
pub trait CredentialIssuer: Send + Sync + 'static {
    async fn issue(
        &self,
        request: v1::IssueCredentialRequest,
    ) -> Result<v1::IssuedCredential, tonic::Status>;

    /// Extends a lease the agent holds. A daemon that cannot (an older one, or a lease at
    /// its max TTL) answers UNIMPLEMENTED or FAILED_PRECONDITION, and the cache issues anew.
    async fn renew(
        &self,
        request: v1::RenewCredentialRequest,
    ) -> Result<v1::RenewedCredential, tonic::Status> {
        let _ = request;
        Err(tonic::Status::unimplemented("this issuer does not renew"))
    }

    /// Asks the daemon for an elevation of a workload this agent serves.
    async fn request_elevation(
        &self,
        request: v1::HolderElevationRequest,
    ) -> Result<v1::Elevation, tonic::Status> {
        let _ = request;
        Err(tonic::Status::unimplemented(
            "this issuer does not ask for elevations",
        ))
    }

    /// Ends (or withdraws) a workload's own elevation.
    async fn end_elevation(
        &self,
        request: v1::HolderEndElevationRequest,
    ) -> Result<v1::Elevation, tonic::Status> {
        let _ = request;
        Err(tonic::Status::unimplemented(
            "this issuer does not end elevations",
        ))
    }
}

/// What one cached credential answers: the same SPIFFE ID asking for the same definition
/// with the same TTL. A different TTL is a different lease, so it is a different key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CredentialKey {
    pub spiffe_id: SpiffeId,
    /// The credential definition's name.
    pub name: String,
    /// As the workload asked: 0 for the definition's default.
    pub ttl_seconds: i64,
}

/// A credential the daemon issued to one SPIFFE ID, as the cache keeps it. Its values are
/// wiped when the last holder drops it and never appear in Debug output.
#[derive(Clone)]
pub struct Credential {
    pub name: String,
    /// The backend's kind, e.g. `postgres_dynamic`.
    pub kind: String,
    pub spiffe_id: SpiffeId,
    pub lease_id: String,
    values: BTreeMap<String, Zeroizing<String>>,
    /// Unix seconds, as the daemon set them.
    pub issued_at: i64,
    pub expires_at: i64,
    /// When its lease was last extended (its issue until then): the reuse period counts
    /// from here.
    pub renewed_at: i64,
    /// Set by the daemon when it adjusted the request (a TTL clamped to the maximum).
    pub notice: String,
    /// Its definition as the policies see it: the agent decides each hand-out on these.
    /// `None` from an older daemon, or on what a workload was handed (`exec`).
    pub facts: Option<v1::CredentialFacts>,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("spiffe_id", &self.spiffe_id)
            .field("lease_id", &self.lease_id)
            .field(
                "values",
                &format_args!("<{:?} redacted>", self.value_names()),
            )
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl Credential {
    /// The daemon's answer for `spiffe_id`; its values move into wiped storage.
    pub fn from_issued(issued: v1::IssuedCredential, spiffe_id: SpiffeId) -> Self {
        let v1::IssuedCredential {
            lease_id,
            name,
            kind,
            values,
            issued_at,
            expires_at,
            notice,
            facts,
        } = issued;
        Self {
            name,
            kind,
            spiffe_id,
            lease_id,
            values: values
                .into_iter()
                .map(|(key, value)| (key, Zeroizing::new(value)))
                .collect(),
            issued_at,
            expires_at,
            renewed_at: issued_at,
            notice,
            facts,
        }
    }

    /// What the Workload API answered a workload (`mayfly-agent exec` holds it so).
    pub fn from_workload(
        message: v1::WorkloadCredential,
    ) -> Result<Self, mayfly_common::SpiffeIdError> {
        let spiffe_id = SpiffeId::parse(&message.spiffe_id)?;
        let v1::WorkloadCredential {
            name,
            kind,
            values,
            lease_id,
            issued_at,
            expires_at,
            notice,
            ..
        } = message;
        let issued = v1::IssuedCredential {
            lease_id,
            name,
            kind,
            values,
            issued_at,
            expires_at,
            notice,
            facts: None,
        };
        Ok(Self::from_issued(issued, spiffe_id))
    }

    /// The same credential with its lease extended as `renewed` says.
    pub fn renewed(&self, renewed: &v1::RenewedCredential) -> Self {
        Self {
            expires_at: renewed.expires_at,
            renewed_at: renewed.renewed_at,
            notice: renewed.notice.clone(),
            ..self.clone()
        }
    }

    /// Whether its backend can extend it: an STS session cannot.
    pub fn renewable(&self) -> bool {
        self.kind != "aws_sts"
    }

    /// The message a workload receives.
    pub fn to_message(&self) -> v1::WorkloadCredential {
        v1::WorkloadCredential {
            name: self.name.clone(),
            kind: self.kind.clone(),
            values: self
                .values
                .iter()
                .map(|(key, value)| (key.clone(), value.to_string()))
                .collect(),
            lease_id: self.lease_id.clone(),
            issued_at: self.issued_at,
            expires_at: self.expires_at,
            spiffe_id: self.spiffe_id.as_str().to_owned(),
            notice: self.notice.clone(),
        }
    }

    /// One of its values by name, or `lease_id` / `expires_at` (RFC 3339) when it has no
    /// value of that name.
    pub fn value(&self, key: &str) -> Option<Zeroizing<String>> {
        match (self.values.get(key), key) {
            (Some(value), _) => Some(value.clone()),
            (None, "lease_id") => Some(Zeroizing::new(self.lease_id.clone())),
            (None, "expires_at") => Some(Zeroizing::new(format::rfc3339(self.expires_at))),
            (None, _) => None,
        }
    }

    /// Every value, for a template or redaction.
    pub fn values(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The names of its values (`username`, `password`), never the values.
    pub fn value_names(&self) -> Vec<&str> {
        self.values.keys().map(String::as_str).collect()
    }

    /// Its TTL since it was issued or last renewed.
    fn ttl_ms(&self) -> i64 {
        (self.expires_at - self.renewed_at)
            .max(0)
            .saturating_mul(1000)
    }

    /// Until when (unix ms) the cache hands it out without asking the daemon: two thirds
    /// of its TTL, so that what a workload gets always has a third left.
    pub fn reuse_until_ms(&self) -> i64 {
        self.renewed_at.saturating_mul(1000) + self.ttl_ms() * 2 / 3
    }

    /// The last moment (unix ms) it is handed out at all, even with the daemon down: a
    /// quarter of its TTL left, time for the workload to use it and ask again.
    pub fn usable_until_ms(&self) -> i64 {
        self.expires_at.saturating_mul(1000) - self.ttl_ms() / 4
    }
}

/// Why `--ttl` was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TtlError {
    #[error("`{text}`: {reason}")]
    Unparsable { text: String, reason: String },
    #[error("`{0}`: a TTL is whole seconds, at least 1s")]
    NotWholeSeconds(String),
}

/// A TTL asked for (`--ttl`, a sink's `ttl`): a humantime duration of whole seconds, at least one.
pub fn parse_ttl(text: &str) -> Result<Duration, TtlError> {
    let ttl = humantime::parse_duration(text).map_err(|e| TtlError::Unparsable {
        text: text.to_string(),
        reason: e.to_string(),
    })?;
    if ttl < Duration::from_secs(1) || ttl.subsec_nanos() != 0 {
        return Err(TtlError::NotWholeSeconds(text.to_string()));
    }
    Ok(ttl)
}

/// Why a workload's request for a credential failed. Every message is safe to show the
/// workload: the daemon's refusals are its own words about the request, everything else
/// is logged with its detail and told here by what went wrong.
#[non_exhaustive]
#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialError {
    /// The daemon refused: the credential is not granted to this SPIFFE ID, there is no
    /// such credential, or the SPIFFE ID is no workload of this agent.
    #[error("mayflyd refused: {0}")]
    Refused(String),
    /// The daemon found the request itself wrong.
    #[error("mayflyd rejected the request: {0}")]
    Rejected(String),
    /// The daemon or the credential's backend cannot be reached, and there is no cached
    /// copy with a quarter of its TTL left to serve meanwhile.
    #[error(
        "credential {name} cannot be issued now: mayflyd or its backend is unavailable, and the agent holds no cached copy with a quarter of its TTL left; retry"
    )]
    Unavailable { name: String },
    /// The SPIFFE ID's entry left this agent while the daemon was issuing.
    #[error("{spiffe_id} no longer has an entry on this agent")]
    HolderGone { spiffe_id: SpiffeId },
    /// The lease was revoked before the daemon's answer reached the agent.
    #[error("the new lease of credential {name} was revoked as it was issued; retry")]
    RevokedOnArrival { name: String },
    /// Anything else the daemon answered; its words are in the agent's log.
    #[error("mayflyd could not issue credential {name} ({code:?}); the agent's log has the detail")]
    Failed { name: String, code: tonic::Code },
}

impl CredentialError {
    /// The daemon's answer as what the workload is told.
    fn from_daemon(name: &str, status: &tonic::Status) -> Self {
        use tonic::Code;
        match status.code() {
            Code::PermissionDenied | Code::NotFound => Self::Refused(status.message().to_owned()),
            Code::InvalidArgument | Code::OutOfRange => Self::Rejected(status.message().to_owned()),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Self::Unavailable {
                name: name.to_owned(),
            },
            code => Self::Failed {
                name: name.to_owned(),
                code,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued(issued_at: i64, expires_at: i64) -> Credential {
        Credential::from_issued(
            v1::IssuedCredential {
                lease_id: "ls-1".into(),
                name: "orders-db".into(),
                kind: "postgres_dynamic".into(),
                values: [
                    ("username".to_string(), "v_orders_1".to_string()),
                    ("password".to_string(), "Pw-hunter2-xyz".to_string()),
                ]
                .into(),
                issued_at,
                expires_at,
                notice: String::new(),
                facts: None,
            },
            SpiffeId::parse("spiffe://example.org/app").unwrap(),
        )
    }

    #[test]
    fn ttls_are_whole_seconds() {
        assert_eq!(parse_ttl("30m"), Ok(Duration::from_secs(1800)));
        assert!(
            parse_ttl("500ms")
                .unwrap_err()
                .to_string()
                .contains("whole seconds")
        );
        assert!(parse_ttl("soon").is_err());
    }

    #[test]
    fn reused_for_two_thirds_and_handed_out_until_a_quarter_is_left() {
        let credential = issued(1000, 1600);
        assert_eq!(credential.reuse_until_ms(), 1_400_000);
        assert_eq!(credential.usable_until_ms(), 1_450_000);
        // A credential with no lifetime is never reused.
        let instant = issued(1000, 1000);
        assert_eq!(instant.reuse_until_ms(), 1_000_000);
        assert_eq!(instant.usable_until_ms(), 1_000_000);
    }

    #[test]
    fn values_reach_the_message_but_never_debug() {
        let credential = issued(1000, 1600);
        let shown = format!("{credential:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("password") && shown.contains("ls-1"),
            "{shown}"
        );
        let message = credential.to_message();
        assert_eq!(message.values["password"], "Pw-hunter2-xyz");
        assert_eq!(message.spiffe_id, "spiffe://example.org/app");
        assert_eq!(message.expires_at, 1600);
    }

    #[test]
    fn daemon_answers_become_what_the_workload_is_told() {
        let refused = CredentialError::from_daemon(
            "orders-db",
            &tonic::Status::permission_denied("credential orders-db is not granted to x"),
        );
        assert!(matches!(refused, CredentialError::Refused(_)));
        assert!(refused.to_string().contains("not granted"), "{refused}");
        let down = CredentialError::from_daemon(
            "orders-db",
            &tonic::Status::unavailable("tcp connect error 10.0.0.5:8081"),
        );
        assert!(matches!(down, CredentialError::Unavailable { .. }));
        assert!(!down.to_string().contains("10.0.0.5"), "{down}");
        let other = CredentialError::from_daemon(
            "orders-db",
            &tonic::Status::failed_precondition("backend at 10.0.0.9 said no"),
        );
        assert!(!other.to_string().contains("10.0.0.9"), "{other}");
        assert!(other.to_string().contains("FailedPrecondition"), "{other}");
    }
}

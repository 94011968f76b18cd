//! Why a Workload API call failed, and the one place where that becomes a gRPC status: the
//! caller gets a message that is safe to show (no key, no internal path), the log gets the
//! detail.

use std::path::PathBuf;

use tonic::{Code, Status};

use mayfly_common::svid::CaError;

use crate::attest::workload::AttestError;
use crate::credentials::CredentialError;

/// Message SPIRE uses for "this caller matches no registration entry". The `spiffe` crate
/// (0.19) looks for exactly this phrase in a `PermissionDenied` status to report
/// `NoIdentityIssued` and retry with backoff, so it must stay in every such message.
pub(crate) const NO_IDENTITY_ISSUED: &str = "no identity issued";

/// Everything a Workload API call can fail with.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum WorkloadApiError {
    /// The request lacks `workload.spiffe.io: true`, which every SPIFFE client sends; its
    /// absence means the request did not come from a Workload API client (SSRF guard).
    #[error("security header missing from request")]
    MissingSecurityHeader,
    /// The connection carries no peer credentials, so the caller cannot be attested.
    #[error(
        "the caller's process credentials are unavailable; the Workload API only serves local processes over its Unix socket"
    )]
    NoPeerCredentials,
    /// The workload attestor could not find out who the caller is (for example the process
    /// exited before it could be inspected).
    #[error("workload attestation failed")]
    Attestation {
        /// The attestor's own words; logged, not sent, as they may name local paths.
        source: AttestError,
    },
    /// The caller matches no registration entry, or not the one it asked for.
    #[error("{NO_IDENTITY_ISSUED}{}", .requested.as_deref().map(|id| format!(": the caller is not entitled to {id}")).unwrap_or_default())]
    NoIdentityIssued {
        /// The SPIFFE ID the caller asked for, when it named one.
        requested: Option<String>,
    },
    /// The daemon's policies, decided here, refuse it (the deciding policies named). Not
    /// worded as "no identity issued": a client shows this reason instead of retrying.
    #[error("{0}")]
    PolicyDenied(String),
    /// A required request field is empty.
    #[error("{0} must be specified")]
    MissingField(&'static str),
    /// `spiffe_id` in a JWT-SVID request is not a SPIFFE ID.
    #[error("the requested spiffe_id is not a valid SPIFFE ID: {0}")]
    InvalidSpiffeId(mayfly_common::SpiffeIdError),
    /// The JWT-SVID handed to `ValidateJWTSVID` does not validate.
    #[error("the JWT-SVID is not valid: {0}")]
    InvalidJwt(CaError),
    /// The JWT-SVID names a subject outside every trust domain this agent has keys for.
    #[error("the JWT-SVID's subject is in trust domain {0}, for which this agent has no bundle")]
    ForeignTrustDomain(String),
    /// The daemon refused or failed to mint a JWT-SVID.
    #[error("could not mint a JWT-SVID")]
    Mint(Status),
    /// The agent is stopping or its state is gone; the client should reconnect.
    #[error("the agent is shutting down; reconnect and retry")]
    ShuttingDown,
    /// A credential request named no SPIFFE ID and the caller holds several.
    #[error("the caller holds several SPIFFE IDs ({}): name one in spiffe_id", .0.join(", "))]
    AmbiguousSpiffeId(Vec<String>),
    /// `ttl_seconds` in a credential request is below zero.
    #[error("ttl_seconds must be 0 (the credential's default) or more, not {0}")]
    NegativeTtl(i64),
    /// This agent was started without a credential cache.
    #[error("this agent serves no credentials")]
    NoCredentials,
    /// The credential cache could not give the credential.
    #[error(transparent)]
    Credential(CredentialError),
}

impl WorkloadApiError {
    /// The gRPC status the caller sees. Details that are not safe to send are logged here.
    pub(crate) fn into_status(self) -> Status {
        tracing::debug!(error = %self, "Workload API call refused");
        let code = match &self {
            Self::MissingSecurityHeader
            | Self::MissingField(_)
            | Self::InvalidSpiffeId(_)
            | Self::InvalidJwt(_)
            | Self::ForeignTrustDomain(_)
            | Self::AmbiguousSpiffeId(_)
            | Self::NegativeTtl(_) => Code::InvalidArgument,
            Self::NoPeerCredentials => Code::Unauthenticated,
            // A failed attestation is usually a race with a process that is starting or
            // exiting; Unavailable makes SPIFFE clients retry instead of giving up.
            Self::Attestation { source } => {
                tracing::warn!(error = %source, "workload attestation failed");
                Code::Unavailable
            }
            Self::NoIdentityIssued { .. } | Self::PolicyDenied(_) => Code::PermissionDenied,
            Self::Mint(status) => {
                tracing::warn!(code = ?status.code(), error = %status.message(), "minting a JWT-SVID failed");
                match status.code() {
                    // The daemon's policies refused it: say so (the deciding policies are
                    // named; their ids are what the operator wrote, nothing secret).
                    Code::PermissionDenied
                        if mayfly_common::policy::is_denial(status.message()) =>
                    {
                        return Status::permission_denied(status.message().to_string());
                    }
                    // The entry vanished on the server between our check and the mint.
                    Code::PermissionDenied | Code::NotFound => {
                        return Status::permission_denied(NO_IDENTITY_ISSUED);
                    }
                    Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                        return Status::unavailable(
                            "could not mint a JWT-SVID: mayflyd is unreachable; retry",
                        );
                    }
                    _ => Code::Internal,
                }
            }
            Self::ShuttingDown => Code::Unavailable,
            Self::NoCredentials => Code::Unimplemented,
            Self::Credential(error) => match error {
                CredentialError::Refused(_) | CredentialError::HolderGone { .. } => {
                    Code::PermissionDenied
                }
                CredentialError::Rejected(_) => Code::InvalidArgument,
                CredentialError::Unavailable { .. } | CredentialError::RevokedOnArrival { .. } => {
                    Code::Unavailable
                }
                _ => Code::Internal,
            },
        };
        Status::new(code, self.to_string())
    }
}

/// Why the Workload API socket could not be bound or served.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another process is already answering on the socket.
    #[error("the Workload API socket {0} is in use: is another mayfly-agent running?")]
    SocketInUse(PathBuf),
    /// Creating the directory, removing a stale socket, binding or setting the mode failed.
    #[error("could not set up the Workload API socket {path}: {source}")]
    Socket {
        /// The socket path from the configuration.
        path: PathBuf,
        source: std::io::Error,
    },
}

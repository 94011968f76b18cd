//! The one place errors become gRPC statuses: a message safe to show the caller, and a
//! log line with the detail where the caller must not see it.

use tonic::Status;

use crate::ca::CaError;
use crate::ca::manager::CaManagerError;
use crate::identity::IdentityError;
use crate::secrets::runtime::EngineError;
use crate::store::StoreError;

impl From<IdentityError> for Status {
    fn from(error: IdentityError) -> Self {
        match &error {
            IdentityError::InvalidArgument { .. }
            | IdentityError::Csr { .. }
            | IdentityError::BatchTooLarge { .. } => Status::invalid_argument(error.to_string()),
            IdentityError::EntryNotFound(_) => Status::not_found(error.to_string()),
            IdentityError::EntryNotYours { .. }
            | IdentityError::PolicyDenied { .. }
            | IdentityError::JoinToken(_)
            | IdentityError::AgentEvicted(_)
            | IdentityError::AgentBanned(_) => Status::permission_denied(error.to_string()),
            IdentityError::UnknownAgent(_) | IdentityError::StaleAgentSvid { .. } => {
                Status::unauthenticated(error.to_string())
            }
            IdentityError::Store(store) => store_status(store),
            IdentityError::Signing(ca) => internal("signing", ca),
            IdentityError::Policy(message) => Status::internal(message),
        }
    }
}

impl From<CaManagerError> for Status {
    fn from(error: CaManagerError) -> Self {
        match &error {
            CaManagerError::NothingPrepared
            | CaManagerError::AlreadyPrepared(_)
            | CaManagerError::NotRetired { .. } => Status::failed_precondition(error.to_string()),
            CaManagerError::NoSuchSlot(_) => Status::not_found(error.to_string()),
            CaManagerError::Store(store) => store_status(store),
            _ => internal("CA", &error),
        }
    }
}

pub fn store_status(error: &StoreError) -> Status {
    match error {
        StoreError::NotFound { .. } => Status::not_found(error.to_string()),
        StoreError::Conflict { .. } => Status::already_exists(error.to_string()),
        StoreError::Unsupported(_) | StoreError::Io { .. } => {
            Status::failed_precondition(error.to_string())
        }
        _ => internal("datastore", error),
    }
}

pub fn ca_status(error: &CaError) -> Status {
    Status::invalid_argument(error.to_string())
}

/// Internal detail goes to the log only; the caller gets a generic message.
fn internal(what: &str, error: &dyn std::fmt::Display) -> Status {
    tracing::error!(error = %error, "{what} failure");
    Status::internal(format!("{what} failure; see the daemon's log"))
}

impl From<EngineError> for Status {
    fn from(error: EngineError) -> Self {
        match &error {
            EngineError::UnknownSecret(_) => Status::not_found(error.to_string()),
            EngineError::Spec(_) | EngineError::Build(_) => {
                Status::invalid_argument(error.to_string())
            }
            EngineError::Busy(_) | EngineError::Conflict(_) => {
                Status::failed_precondition(error.to_string())
            }
            EngineError::Store(_) | EngineError::Target(_) | EngineError::Generator(_) => {
                Status::unavailable(error.to_string())
            }
            _ => internal("secrets", &error),
        }
    }
}

pub fn revoke_status(error: crate::revoke::RevokeError) -> Status {
    use crate::revoke::RevokeError;
    match error {
        RevokeError::Invalid(m) => Status::invalid_argument(m),
        RevokeError::NotFound(m) => Status::not_found(m),
        RevokeError::Failed(m) => Status::failed_precondition(m),
        RevokeError::Store(e) => store_status(&e),
        RevokeError::Identity(e) => e.into(),
        RevokeError::Engine(e) => e.into(),
        RevokeError::Credentials(e) => e.into(),
    }
}

impl From<crate::creds::CredsError> for Status {
    fn from(error: crate::creds::CredsError) -> Self {
        use crate::creds::{BackendError, CredsError};
        match &error {
            CredsError::NotFound(_) => Status::not_found(error.to_string()),
            CredsError::Denied(_) => Status::permission_denied(error.to_string()),
            CredsError::Invalid(_) | CredsError::Spec(_) => {
                Status::invalid_argument(error.to_string())
            }
            CredsError::FromConfig(_) | CredsError::NotRenewable(_) => {
                Status::failed_precondition(error.to_string())
            }
            CredsError::Backend(BackendError::Unavailable(_)) => {
                Status::unavailable(error.to_string())
            }
            CredsError::Backend(_) => Status::failed_precondition(error.to_string()),
            CredsError::Store(store) => store_status(store),
            _ => internal("credentials", &error),
        }
    }
}

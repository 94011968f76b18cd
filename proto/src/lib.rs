//! The contract between `mayflyd`, `mayfly-agent` and SPIFFE workloads: the generated
//! gRPC services and the identity types both sides must agree on.

pub mod fsutil;
pub mod selector;
pub mod spiffe_id;
pub mod svid;
pub mod tls;

pub use selector::{Selector, SelectorError};
pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};

/// The SPIFFE Workload API. Its proto has no package, so the service is `SpiffeWorkloadAPI`.
pub mod workload {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("_");
}

/// Mayfly's own APIs: node (daemon <-> agent) and admin (operator CLI <-> daemon).
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("mayfly.v1");
}

/// Metadata every Workload API request must carry.
pub const WORKLOAD_HEADER: &str = "workload.spiffe.io";

//! The daemon's gRPC edges: the node API (agents, mTLS) and the admin API (operators,
//! Unix socket). Errors become gRPC statuses in one place, `status`.

pub mod admin;
pub mod convert;
pub mod elevation;
pub mod node;
pub mod status;
pub mod tls;

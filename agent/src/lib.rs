//! mayfly-agent as a library: the binary and the end-to-end tests share it.

pub mod attest;
pub mod state;
pub mod workload_api;

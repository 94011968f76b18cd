//! mayflyd as a library: the binary, the end-to-end tests and the bench harness share it.

pub mod api;
pub mod audit;
pub mod blast;
pub mod ca;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod creds;
pub mod dev;
pub mod elevation;
pub use mayfly_common::fsutil;
pub mod health;
pub mod identity;
pub mod metrics;
pub mod policy;
pub mod reload;
pub mod revoke;
pub mod secrets;
pub mod server;
pub mod store;
pub mod sys;
pub mod visibility;

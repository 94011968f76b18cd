//! mayfly-agent as a library: the binary, `mayflyd dev` and the end-to-end tests share it.

// Every `unsafe` block lives in `sys`, which allows it; the compiler keeps it that way.
#![deny(unsafe_code)]

pub mod attest;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod exec;
// Exists for the fuzz targets (fuzz-targets/) only.
#[doc(hidden)]
pub mod fuzzing;
pub mod ops;
pub mod policy;
pub mod reload;
pub mod run;
pub mod secret_ref;
pub mod sinks;
pub mod state;
pub mod sync;
pub mod sys;
pub mod workload_api;

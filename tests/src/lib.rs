//! Shared harness for the end-to-end tests (real binaries, real services) and the pieces
//! of the `mayfly-bench` load client.

pub mod bench;
pub mod harness;
pub mod interop;
pub mod pg;
pub mod services;

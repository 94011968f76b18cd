//! Shared harness for the end-to-end tests: real binaries, real services.

pub mod harness;
pub mod pg;

//! mayflyd: the daemon's library, so integration tests and the bench harness can reuse it.

pub mod ca;

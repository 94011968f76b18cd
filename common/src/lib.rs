//! What `mayflyd` and `mayfly-agent` share beyond the wire: SPIFFE IDs and selectors parsed
//! once, the SVID rules (building, checking, bundles, JWTs), SPIFFE-aware mTLS, Cedar policy decisions, the clock,
//! atomic files, how a program loads its config and starts its logging, and the operations
//! endpoint (metrics, liveness, readiness) each serves.

#![forbid(unsafe_code)]

pub mod clock;
pub mod fsutil;
pub mod gather;
pub mod ops;
pub mod policy;
pub mod process;
pub mod selector;
pub mod spiffe_id;
pub mod svid;
pub mod tls;

pub use selector::{Selector, SelectorError};
pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};

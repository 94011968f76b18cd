//! The daemon's certificate authority: the CA life cycle (`manager`) on top of the SVID
//! cryptography shared with the agent in `mayfly_common::svid`.

pub mod manager;

pub use mayfly_common::svid::*;

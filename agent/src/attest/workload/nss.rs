//! User and group names for the `user` and `group` selectors, from NSS (files, LDAP, SSSD).
//! A missing or unusable name only means one selector fewer, which can never widen what a
//! workload gets, so every failure here is logged and answered with `None`.

use std::ffi::CString;
use std::io;

use tracing::debug;

use crate::sys;

/// The login name of `uid`, if it has a usable one.
pub(super) fn user_name(uid: u32) -> Option<String> {
    usable_name("user", uid, sys::user_name(uid))
}

/// The name of group `gid`, if it has a usable one.
pub(super) fn group_name(gid: u32) -> Option<String> {
    usable_name("group", gid, sys::group_name(gid))
}

/// A name makes a selector only when it is non-empty UTF-8.
fn usable_name(kind: &'static str, id: u32, found: io::Result<Option<CString>>) -> Option<String> {
    match found {
        Ok(None) => None,
        Ok(Some(name)) => match name.into_string() {
            Ok(name) if !name.is_empty() => Some(name),
            _ => {
                debug!(
                    kind,
                    id, "name is empty or not UTF-8; omitting its selector"
                );
                None
            }
        },
        Err(error) => {
            debug!(kind, id, %error, "name lookup failed; omitting its selector");
            None
        }
    }
}

//! What the attestation tests share: processes to attest (run as other ids, left as
//! zombies), the peer credentials they would present, and the digests to expect.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use aws_lc_rs::digest;

use super::PeerCredentials;
use crate::sys::testing::{effective_gid, effective_uid, run_as, wait_until_exited_unreaped};

pub(super) fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

pub(super) fn is_root() -> bool {
    effective_uid() == 0
}

pub(super) fn sha256_of(path: &Path) -> [u8; 32] {
    let contents = fs::read(path).unwrap();
    digest::digest(&digest::SHA256, &contents)
        .as_ref()
        .try_into()
        .unwrap()
}

pub(super) fn which(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .map(|found| fs::canonicalize(found).unwrap())
        .unwrap()
}

/// Runs `program 30` with the given ids.
pub(super) fn spawn_as(
    program: &Path,
    uid: u32,
    gid: u32,
    groups: &'static [libc::gid_t],
) -> Child {
    let mut command = Command::new(program);
    command.arg("30");
    run_as(&mut command, uid, gid, groups);
    // A sibling test's fork may briefly hold a copied file open for writing.
    for _ in 0..50 {
        match command.spawn() {
            Ok(child) => return child,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("spawning {program:?}: {e}"),
        }
    }
    panic!("{program:?} stayed busy");
}

pub(super) fn peer_of(child: &Child, uid: u32, gid: u32) -> PeerCredentials {
    PeerCredentials {
        pid: Some(i32::try_from(child.id()).unwrap()),
        uid,
        gid,
        exe: None,
        written_by: None,
    }
}

/// Blocks until the child has exited, leaving it a zombie (not reaped).
pub(super) fn wait_until_zombie(child: &Child) {
    if let Err(e) = wait_until_exited_unreaped(child.id()) {
        panic!("waitid: {e}");
    }
}

pub(super) fn own_peer() -> PeerCredentials {
    PeerCredentials {
        pid: Some(i32::try_from(std::process::id()).unwrap()),
        uid: effective_uid(),
        gid: effective_gid(),
        exe: super::exe_stamp(i32::try_from(std::process::id()).unwrap()),
        written_by: None,
    }
}

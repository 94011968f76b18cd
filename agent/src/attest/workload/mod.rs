//! Workload attestation: turns the credentials the kernel reports for a Workload API
//! socket peer into the `unix` selectors registration entries match (uid, user, gid, group,
//! executable path and SHA-256), making sure the pid still names the process that connected.
//! This module makes the decision; `process` reads /proc through a pinned process,
//! `digest` hashes executables once per version, and `nss` names users and groups.

mod digest;
mod nss;
mod process;
#[cfg(test)]
mod testing;

use std::collections::BTreeSet;
use std::io;

use tokio::net::unix::UCred;

use mayfly_common::Selector;

use self::digest::DigestCache;
use self::nss::{group_name, user_name};
use self::process::ProcessPin;

/// How many executables' digests are remembered; a node rarely runs more distinct
/// binaries than this, and each entry is under a hundred bytes.
const DIGEST_CACHE_CAPACITY: usize = 1024;

/// What the kernel reported about the process at the other end of a Unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// `None` when the kernel could not name the peer's process.
    pub pid: Option<i32>,
    /// Effective uid of the peer when it connected.
    pub uid: u32,
    /// Effective gid of the peer when it connected.
    pub gid: u32,
    /// The executable the peer ran when it connected (device, inode): a call made after
    /// the process executed another program is refused, since the connection may by then
    /// be in the hands of a child that still runs the first one.
    pub exe: Option<(u64, u64)>,
    /// A process other than the one that connected that wrote on the connection before
    /// the request was answered (its pid, 0 when outside the agent's pid namespace): the
    /// connection was inherited or passed on, and the request is refused.
    pub written_by: Option<i32>,
}

impl PeerCredentials {
    /// Takes the SO_PEERCRED credentials of an accepted connection, and what its process
    /// runs now.
    pub fn from_ucred(cred: &UCred) -> PeerCredentials {
        let pid = visible_pid(cred.pid());
        PeerCredentials {
            pid,
            uid: cred.uid(),
            gid: cred.gid(),
            exe: pid.and_then(exe_stamp),
            written_by: None,
        }
    }
}

/// The (device, inode) of the executable `pid` runs.
fn exe_stamp(pid: i32) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(format!("/proc/{pid}/exe"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Why a workload could not be attested. The workload gets no identity in every case.
#[non_exhaustive]
#[derive(thiserror::Error, Debug)]
pub enum AttestError {
    #[error(
        "workload process {pid} exited before it could be attested; it must stay alive while it talks to the Workload API"
    )]
    ProcessGone { pid: i32 },
    #[error(
        "workload process {pid} changed while it was being attested ({reason}); the workload should reconnect"
    )]
    ProcessChanged { pid: i32, reason: String },
    #[error("peer pid {pid} is not a valid process id")]
    InvalidPid { pid: i32 },
    #[error(
        "not allowed to read {path} of workload process {pid}: {source}; the agent needs to run as root (or with CAP_SYS_PTRACE) to inspect other users' processes"
    )]
    PermissionDenied {
        pid: i32,
        path: String,
        source: io::Error,
    },
    #[error("cannot read {path} of workload process {pid}: {source}")]
    ProcRead {
        pid: i32,
        path: String,
        source: io::Error,
    },
    #[error("unexpected contents in {path} of workload process {pid}: {detail}")]
    ProcFormat {
        pid: i32,
        path: String,
        detail: &'static str,
    },
    #[error("the attestation task did not finish (is the agent shutting down?): {0}")]
    TaskFailed(#[from] tokio::task::JoinError),
}

/// Derives selectors for Workload API peers. Share one per agent (in an `Arc`): it holds
/// the cache that keeps a thousand connections from one binary down to one hash.
#[derive(Debug)]
pub struct WorkloadAttestor {
    digests: DigestCache,
}

impl WorkloadAttestor {
    pub fn new() -> Self {
        Self::with_cache_capacity(DIGEST_CACHE_CAPACITY)
    }

    fn with_cache_capacity(capacity: usize) -> Self {
        Self {
            digests: DigestCache::new(capacity),
        }
    }

    /// The peer's selectors, sorted and without duplicates.
    ///
    /// Fails rather than guess when the pid no longer names the process that connected.
    pub async fn attest(&self, peer: &PeerCredentials) -> Result<Vec<Selector>, AttestError> {
        let peer = *peer;
        // /proc, NSS (which may ask LDAP or SSSD) and file reads all block.
        let collected = tokio::task::spawn_blocking(move || collect(peer)).await??;
        let mut selectors = collected.selectors;
        if let Some(exe) = collected.executable {
            // The open file pins the exact binary that was running, so hashing it after the
            // pid checks cannot pick up another process's executable.
            let digest = self
                .digests
                .digest(peer_pid(&peer), exe.key, exe.file)
                .await?;
            selectors.insert(Selector::Sha256(digest));
            if let Some(path) = exe.path {
                selectors.insert(Selector::Path(path));
            }
        }
        Ok(selectors.into_iter().collect())
    }

    #[cfg(test)]
    fn hashes_computed(&self) -> usize {
        self.digests.hashes_computed()
    }
}

impl Default for WorkloadAttestor {
    fn default() -> Self {
        Self::new()
    }
}

/// Everything found under /proc, before the executable is hashed.
struct Collected {
    selectors: BTreeSet<Selector>,
    executable: Option<process::Executable>,
}

/// The kernel reports pid 0 when the peer lives in a pid namespace the agent cannot see;
/// there is no process of ours to inspect then.
fn visible_pid(pid: Option<i32>) -> Option<i32> {
    pid.filter(|&pid| pid > 0)
}

fn peer_pid(peer: &PeerCredentials) -> i32 {
    peer.pid.unwrap_or(0)
}

/// Reads the process's groups and executable, checking before and after that the pid
/// still belongs to the same live process with the credentials its socket reported.
fn collect(peer: PeerCredentials) -> Result<Collected, AttestError> {
    let mut gids = BTreeSet::from([peer.gid]);
    let mut executable = None;
    if let Some(pid) = peer.pid {
        if pid <= 0 {
            return Err(AttestError::InvalidPid { pid });
        }
        if let Some(other) = peer.written_by {
            return Err(AttestError::ProcessChanged {
                pid,
                reason: format!(
                    "another process (pid {other}) wrote on its Workload API connection; \
                     a connection inherited by a child or passed to another process is not \
                     answered, each process must connect itself"
                ),
            });
        }
        let process = ProcessPin::open(pid)?;
        let started = process.start_time()?;
        let credentials = process.credentials()?;
        credentials.check_against(&peer, pid)?;
        executable = process.executable()?;
        // A deleted (upgraded) binary keeps its inode while it runs: this compares that.
        if let Some(stamp) = peer.exe
            && exe_stamp(pid) != Some(stamp)
        {
            return Err(AttestError::ProcessChanged {
                pid,
                reason: "it executed another program since it connected to the Workload API, \
                         and the connection may now be another process's"
                    .into(),
            });
        }

        if process.start_time()? != started {
            return Err(AttestError::ProcessChanged {
                pid,
                reason: "its start time changed, so the pid now names another process".into(),
            });
        }
        if process.credentials()? != credentials {
            return Err(AttestError::ProcessChanged {
                pid,
                reason: "its uid, gid or groups changed".into(),
            });
        }
        if process.has_exited()? {
            return Err(AttestError::ProcessGone { pid });
        }
        gids.extend(credentials.groups);
    }

    let mut selectors = BTreeSet::from([Selector::Uid(peer.uid)]);
    if let Some(name) = user_name(peer.uid) {
        selectors.insert(Selector::User(name));
    }
    for gid in gids {
        selectors.insert(Selector::Gid(gid));
        if let Some(name) = group_name(gid) {
            selectors.insert(Selector::Group(name));
        }
    }
    Ok(Collected {
        selectors,
        executable,
    })
}

/// The Workload API asks through its own small trait, so it can be tested without /proc.
impl crate::workload_api::CallerAttestor for WorkloadAttestor {
    fn attest(
        &self,
        peer: PeerCredentials,
    ) -> futures::future::BoxFuture<'_, Result<Vec<Selector>, AttestError>> {
        Box::pin(async move { WorkloadAttestor::attest(self, &peer).await })
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::sync::Arc;

    use super::testing::*;
    use super::*;

    #[tokio::test]
    async fn attests_the_test_process_itself() {
        install_provider();
        let peer = own_peer();
        let selectors = WorkloadAttestor::new().attest(&peer).await.unwrap();

        let exe = std::env::current_exe().unwrap();
        assert!(
            selectors.contains(&Selector::Uid(peer.uid)),
            "{selectors:?}"
        );
        assert!(
            selectors.contains(&Selector::Gid(peer.gid)),
            "{selectors:?}"
        );
        assert!(selectors.contains(&Selector::Path(exe.to_str().unwrap().to_owned())));
        assert!(selectors.contains(&Selector::Sha256(sha256_of(&exe))));
        if peer.uid == 0 {
            assert!(selectors.contains(&Selector::User("root".into())));
        }
        if peer.gid == 0 {
            assert!(selectors.contains(&Selector::Group("root".into())));
        }
        let mut sorted = selectors.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(selectors, sorted);
    }

    #[tokio::test]
    async fn without_a_pid_only_the_ids_and_names_are_reported() {
        install_provider();
        let peer = PeerCredentials {
            pid: None,
            uid: 0,
            gid: 0,
            exe: None,
            written_by: None,
        };
        let selectors = WorkloadAttestor::new().attest(&peer).await.unwrap();
        assert_eq!(
            selectors,
            [
                Selector::Uid(0),
                Selector::User("root".into()),
                Selector::Gid(0),
                Selector::Group("root".into()),
            ]
        );
    }

    #[tokio::test]
    async fn attests_a_process_of_another_user_until_it_exits() {
        install_provider();
        if !is_root() {
            eprintln!("skipped: spawning a process as another uid needs root");
            return;
        }
        let sleep = which("sleep");
        let mut child = spawn_as(&sleep, 65534, 65534, &[]);
        let attestor = WorkloadAttestor::new();
        let peer = peer_of(&child, 65534, 65534);

        let selectors = attestor.attest(&peer).await.unwrap();
        assert!(selectors.contains(&Selector::Uid(65534)), "{selectors:?}");
        assert!(selectors.contains(&Selector::Gid(65534)), "{selectors:?}");
        assert!(selectors.contains(&Selector::Path(sleep.to_str().unwrap().to_owned())));
        assert!(selectors.contains(&Selector::Sha256(sha256_of(&sleep))));
        if user_name(65534).as_deref() == Some("nobody") {
            assert!(selectors.contains(&Selector::User("nobody".into())));
        }
        assert!(!selectors.contains(&Selector::Uid(0)), "{selectors:?}");

        let wrong_uid = PeerCredentials { uid: 1000, ..peer };
        let error = attestor.attest(&wrong_uid).await.unwrap_err();
        assert!(
            matches!(error, AttestError::ProcessChanged { .. }),
            "{error}"
        );
        let wrong_gid = PeerCredentials { gid: 0, ..peer };
        let error = attestor.attest(&wrong_gid).await.unwrap_err();
        assert!(
            matches!(error, AttestError::ProcessChanged { .. }),
            "{error}"
        );

        child.kill().unwrap();
        wait_until_zombie(&child);
        let error = attestor.attest(&peer).await.unwrap_err();
        assert!(matches!(error, AttestError::ProcessGone { .. }), "{error}");
        child.wait().unwrap();
        let error = attestor.attest(&peer).await.unwrap_err();
        assert!(matches!(error, AttestError::ProcessGone { .. }), "{error}");
    }

    #[tokio::test]
    async fn reports_supplementary_groups() {
        install_provider();
        if !is_root() {
            eprintln!("skipped: setting another process's groups needs root");
            return;
        }
        let mut child = spawn_as(&which("sleep"), 65534, 65534, &[100]);
        let selectors = WorkloadAttestor::new()
            .attest(&peer_of(&child, 65534, 65534))
            .await
            .unwrap();
        child.kill().unwrap();
        child.wait().unwrap();

        assert!(selectors.contains(&Selector::Gid(100)), "{selectors:?}");
        if let Some(name) = group_name(100) {
            assert!(selectors.contains(&Selector::Group(name)), "{selectors:?}");
        }
        assert!(selectors.contains(&Selector::Gid(65534)), "{selectors:?}");
    }

    #[tokio::test]
    async fn a_deleted_executable_gets_no_path_or_digest() {
        install_provider();
        if !is_root() {
            eprintln!("skipped: spawning a process as another uid needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("sleep");
        fs::copy(which("sleep"), &copy).unwrap();
        let mut child = spawn_as(&copy, 65534, 65534, &[]);
        fs::remove_file(&copy).unwrap();

        let selectors = WorkloadAttestor::new()
            .attest(&peer_of(&child, 65534, 65534))
            .await
            .unwrap();
        child.kill().unwrap();
        child.wait().unwrap();

        assert!(selectors.contains(&Selector::Uid(65534)), "{selectors:?}");
        assert!(
            !selectors
                .iter()
                .any(|s| matches!(s, Selector::Path(_) | Selector::Sha256(_))),
            "{selectors:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_attestations_of_one_binary_hash_it_once() {
        install_provider();
        let attestor = Arc::new(WorkloadAttestor::new());
        let peer = own_peer();
        let first = attestor.attest(&peer).await.unwrap();

        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let attestor = Arc::clone(&attestor);
                tokio::spawn(async move { attestor.attest(&peer).await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap(), first);
        }
        assert_eq!(attestor.hashes_computed(), 1);
        assert_eq!(attestor.digests.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_first_wave_of_concurrent_attestations_also_hashes_once() {
        install_provider();
        let attestor = Arc::new(WorkloadAttestor::new());
        let peer = own_peer();
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let attestor = Arc::clone(&attestor);
                tokio::spawn(async move { attestor.attest(&peer).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(attestor.hashes_computed(), 1);
    }

    #[tokio::test]
    async fn takes_the_kernel_reported_credentials_of_a_socket_peer() {
        install_provider();
        let (ours, _theirs) = tokio::net::UnixStream::pair().unwrap();
        let peer = PeerCredentials::from_ucred(&ours.peer_cred().unwrap());
        assert_eq!(peer, own_peer());
    }

    #[test]
    fn pid_zero_from_the_kernel_means_no_pid() {
        install_provider();
        assert_eq!(visible_pid(Some(0)), None);
        assert_eq!(visible_pid(None), None);
        assert_eq!(visible_pid(Some(7)), Some(7));
    }

    #[tokio::test]
    async fn a_bogus_pid_is_refused() {
        install_provider();
        let peer = PeerCredentials {
            pid: Some(-1),
            uid: 0,
            gid: 0,
            exe: None,
            written_by: None,
        };
        let error = WorkloadAttestor::new().attest(&peer).await.unwrap_err();
        assert!(
            matches!(error, AttestError::InvalidPid { pid: -1 }),
            "{error}"
        );
    }

    #[test]
    fn the_attestor_can_be_shared_across_tasks() {
        fn assert_send_sync<T: Send + Sync>(_: &T) {}
        fn assert_send<T: Send>(_: &T) {}
        install_provider();
        let attestor = WorkloadAttestor::new();
        assert_send_sync(&attestor);
        let peer = own_peer();
        assert_send(&attestor.attest(&peer));
    }
}

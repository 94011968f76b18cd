//! Workload attestation: turns the credentials the kernel reports for a Workload API
//! socket peer into the `unix` selectors registration entries match (uid, user, gid, group,
//! executable path and SHA-256), making sure the pid still names the process that connected.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ffi::{CStr, c_int};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use aws_lc_rs::digest;
use tokio::net::unix::UCred;
use tokio::sync::OnceCell;
use tracing::debug;

use mayfly_common::Selector;

/// How many executables' digests are remembered; a node rarely runs more distinct
/// binaries than this, and each entry is under a hundred bytes.
const DIGEST_CACHE_CAPACITY: usize = 1024;

/// Read size while hashing an executable.
const HASH_CHUNK: usize = 64 * 1024;

/// getpwuid_r/getgrgid_r buffers start here and double on ERANGE up to the maximum, which
/// only a group with thousands of members listed in /etc/group would need.
const NSS_BUFFER_INITIAL: usize = 1024;
const NSS_BUFFER_MAX: usize = 1 << 20;

/// What the kernel reported about the process at the other end of a Unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// `None` when the kernel could not name the peer's process.
    pub pid: Option<i32>,
    /// Effective uid of the peer when it connected.
    pub uid: u32,
    /// Effective gid of the peer when it connected.
    pub gid: u32,
}

impl PeerCredentials {
    /// Takes the SO_PEERCRED credentials of an accepted connection.
    pub fn from_ucred(cred: &UCred) -> PeerCredentials {
        PeerCredentials {
            pid: visible_pid(cred.pid()),
            uid: cred.uid(),
            gid: cred.gid(),
        }
    }
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
        self.digests
            .hashes
            .load(std::sync::atomic::Ordering::SeqCst)
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
    executable: Option<Executable>,
}

/// The running executable, opened through /proc/<pid>/exe.
struct Executable {
    /// `None` when the path the kernel reports does not lead to this very file.
    path: Option<String>,
    file: File,
    key: ExecutableKey,
}

/// Identifies one version of one file: a rebuilt or edited binary gets a new ctime at least,
/// and ctime cannot be set back by anyone short of changing the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ExecutableKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl ExecutableKey {
    fn of(metadata: &fs::Metadata) -> Self {
        Self {
            dev: metadata.dev(),
            ino: metadata.ino(),
            size: metadata.size(),
            mtime: (metadata.mtime(), metadata.mtime_nsec()),
            ctime: (metadata.ctime(), metadata.ctime_nsec()),
        }
    }
}

/// Digests by executable version, each computed once even when many connections ask at
/// the same moment: later callers wait on the first one's cell instead of hashing too.
#[derive(Debug)]
struct DigestCache {
    capacity: usize,
    slots: Mutex<CacheSlots>,
    #[cfg(test)]
    hashes: Arc<std::sync::atomic::AtomicUsize>,
}

#[derive(Debug, Default)]
struct CacheSlots {
    by_key: HashMap<ExecutableKey, Arc<OnceCell<[u8; 32]>>>,
    /// Insertion order, oldest first, for eviction.
    order: VecDeque<ExecutableKey>,
}

impl DigestCache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            slots: Mutex::default(),
            #[cfg(test)]
            hashes: Arc::default(),
        }
    }

    async fn digest(
        &self,
        pid: i32,
        key: ExecutableKey,
        file: File,
    ) -> Result<[u8; 32], AttestError> {
        let slot = self.slot(key);
        #[cfg(test)]
        let hashes = Arc::clone(&self.hashes);
        let digest = slot
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || {
                    #[cfg(test)]
                    hashes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    hash_executable(pid, file, key)
                })
                .await?
            })
            .await?;
        Ok(*digest)
    }

    /// The cell for `key`, created (evicting the oldest) if new. A cell whose hashing
    /// failed stays empty, so the next caller simply tries again.
    fn slot(&self, key: ExecutableKey) -> Arc<OnceCell<[u8; 32]>> {
        // Nothing panics while the lock is held, so a poisoned map is still consistent.
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = slots.by_key.get(&key) {
            return Arc::clone(slot);
        }
        while slots.by_key.len() >= self.capacity {
            let Some(oldest) = slots.order.pop_front() else {
                break;
            };
            slots.by_key.remove(&oldest);
        }
        let slot = Arc::new(OnceCell::new());
        slots.by_key.insert(key, Arc::clone(&slot));
        slots.order.push_back(key);
        slot
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.by_key.len()
    }
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
        let process = ProcessPin::open(pid)?;
        let started = process.start_time()?;
        let credentials = process.credentials()?;
        credentials.check_against(&peer, pid)?;
        executable = process.executable()?;

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

/// A workload process, held by a pidfd where the kernel offers one. While the pidfd's
/// process is alive its pid cannot be reused, so a liveness check after reading /proc
/// proves every read was of that process. The start-time check covers kernels (or
/// seccomp profiles) without pidfd_open.
struct ProcessPin {
    pid: i32,
    pidfd: Option<OwnedFd>,
}

/// The process's effective ids and supplementary groups, from /proc/<pid>/status.
#[derive(Debug, PartialEq, Eq)]
struct ProcessCredentials {
    euid: u32,
    egid: u32,
    groups: Vec<u32>,
}

impl ProcessPin {
    fn open(pid: i32) -> Result<Self, AttestError> {
        // SAFETY: pidfd_open takes a pid and a flags word and returns a new descriptor or -1;
        // no memory is shared with the kernel.
        let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
        if let Ok(fd) = RawFd::try_from(rc)
            && fd >= 0
        {
            // SAFETY: the kernel just created this descriptor for us; nothing else owns it.
            let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
            return Ok(Self {
                pid,
                pidfd: Some(pidfd),
            });
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::ESRCH) => Err(AttestError::ProcessGone { pid }),
            Some(libc::ENOSYS | libc::EPERM | libc::EACCES) => {
                debug!(pid, %error, "pidfd_open unavailable; relying on the start time to detect pid reuse");
                Ok(Self { pid, pidfd: None })
            }
            _ => Err(AttestError::ProcRead {
                pid,
                path: "pidfd".into(),
                source: error,
            }),
        }
    }

    /// True once the pinned process has exited (zombies included). Without a pidfd this
    /// cannot tell and says no; the start-time check then carries the weight.
    fn has_exited(&self) -> Result<bool, AttestError> {
        let Some(pidfd) = &self.pidfd else {
            return Ok(false);
        };
        let mut poll = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd that lives across the call, and a zero timeout; poll only
        // writes its `revents`.
        let rc = unsafe { libc::poll(&mut poll, 1, 0) };
        match rc {
            0 => Ok(false),
            rc if rc > 0 => Ok(true),
            _ => Err(AttestError::ProcRead {
                pid: self.pid,
                path: "pidfd".into(),
                source: io::Error::last_os_error(),
            }),
        }
    }

    /// Field 22 of /proc/<pid>/stat, in clock ticks since boot.
    fn start_time(&self) -> Result<u64, AttestError> {
        let path = format!("/proc/{}/stat", self.pid);
        let contents = fs::read(&path).map_err(|e| self.read_error(&path, e))?;
        let stat = parse_stat(&contents).map_err(|detail| AttestError::ProcFormat {
            pid: self.pid,
            path,
            detail,
        })?;
        // A zombie has exited: whatever it asked for, nobody is left to receive it.
        if matches!(stat.state, 'Z' | 'X' | 'x') {
            return Err(AttestError::ProcessGone { pid: self.pid });
        }
        Ok(stat.start_time)
    }

    fn credentials(&self) -> Result<ProcessCredentials, AttestError> {
        let path = format!("/proc/{}/status", self.pid);
        let contents = fs::read(&path).map_err(|e| self.read_error(&path, e))?;
        parse_status(&contents).map_err(|detail| AttestError::ProcFormat {
            pid: self.pid,
            path,
            detail,
        })
    }

    /// The running executable, or `None` when it has been deleted: a deleted binary has no
    /// path that names it, and its digest would vouch for a file nobody can inspect.
    fn executable(&self) -> Result<Option<Executable>, AttestError> {
        let link = format!("/proc/{}/exe", self.pid);
        let target = fs::read_link(&link).map_err(|e| self.read_error(&link, e))?;
        let file = File::open(&link).map_err(|e| self.read_error(&link, e))?;
        let metadata = file.metadata().map_err(|e| self.read_error(&link, e))?;
        // An execve between the readlink and the open would pair one binary's path with
        // another's content.
        let target_after = fs::read_link(&link).map_err(|e| self.read_error(&link, e))?;
        if target_after != target {
            return Err(AttestError::ProcessChanged {
                pid: self.pid,
                reason: "it executed another program".into(),
            });
        }
        if metadata.nlink() == 0 {
            debug!(pid = self.pid, path = ?target, "executable was deleted; omitting its path and sha256 selectors");
            return Ok(None);
        }
        Ok(Some(Executable {
            path: verified_path(self.pid, &target, &metadata),
            key: ExecutableKey::of(&metadata),
            file,
        }))
    }

    fn read_error(&self, path: &str, source: io::Error) -> AttestError {
        let pid = self.pid;
        let gone = source.kind() == io::ErrorKind::NotFound
            || source.raw_os_error() == Some(libc::ESRCH)
            || matches!(self.has_exited(), Ok(true));
        if gone {
            AttestError::ProcessGone { pid }
        } else if source.kind() == io::ErrorKind::PermissionDenied {
            AttestError::PermissionDenied {
                pid,
                path: path.to_owned(),
                source,
            }
        } else {
            AttestError::ProcRead {
                pid,
                path: path.to_owned(),
                source,
            }
        }
    }
}

impl ProcessCredentials {
    /// SO_PEERCRED reports the effective ids at connect time; a process that has since
    /// changed them (or a pid that now names another process) is not the peer.
    fn check_against(&self, peer: &PeerCredentials, pid: i32) -> Result<(), AttestError> {
        if self.euid != peer.uid {
            return Err(AttestError::ProcessChanged {
                pid,
                reason: format!(
                    "its effective uid is {}, not the {} its socket reported",
                    self.euid, peer.uid
                ),
            });
        }
        if self.egid != peer.gid {
            return Err(AttestError::ProcessChanged {
                pid,
                reason: format!(
                    "its effective gid is {}, not the {} its socket reported",
                    self.egid, peer.gid
                ),
            });
        }
        Ok(())
    }
}

/// The executable's path, if it is valid UTF-8 and still leads to the running file. It
/// does not when the binary was replaced by a rename (the kernel then reports the old name
/// with " (deleted)" appended) or lives in a mount namespace the agent does not share.
fn verified_path(pid: i32, target: &Path, running: &fs::Metadata) -> Option<String> {
    let same_file = fs::metadata(target)
        .is_ok_and(|found| found.dev() == running.dev() && found.ino() == running.ino());
    if !same_file {
        debug!(pid, path = ?target, "executable path no longer leads to the running binary; omitting the path selector");
        return None;
    }
    match target.to_str() {
        Some(path) if path.starts_with('/') => Some(path.to_owned()),
        _ => {
            debug!(pid, path = ?target, "executable path is not absolute UTF-8; omitting the path selector");
            None
        }
    }
}

/// Hashes the executable through the descriptor opened from /proc/<pid>/exe, so the digest
/// is of the exact binary that runs.
fn hash_executable(pid: i32, mut file: File, key: ExecutableKey) -> Result<[u8; 32], AttestError> {
    let read_error = |source| AttestError::ProcRead {
        pid,
        path: "its executable".into(),
        source,
    };
    let mut context = digest::Context::new(&digest::SHA256);
    let mut buffer = vec![0u8; HASH_CHUNK];
    loop {
        match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => context.update(&buffer[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_error(e)),
        }
    }
    // A digest of a file modified mid-read matches no version of it; do not cache that.
    let metadata = file.metadata().map_err(read_error)?;
    if ExecutableKey::of(&metadata) != key {
        return Err(AttestError::ProcessChanged {
            pid,
            reason: "its executable was modified while it was being hashed".into(),
        });
    }
    let mut out = [0u8; 32];
    // SHA-256 output is always 32 bytes, so the lengths match and this cannot panic.
    out.copy_from_slice(context.finish().as_ref());
    Ok(out)
}

/// The fields of /proc/<pid>/stat the attestor needs.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    state: char,
    start_time: u64,
}

fn parse_stat(contents: &[u8]) -> Result<Stat, &'static str> {
    // The command name (field 2) is in parentheses and may itself hold spaces, parentheses
    // or invalid UTF-8; it ends at the last ')'.
    let close = contents
        .iter()
        .rposition(|&b| b == b')')
        .ok_or("no ')' after the command name")?;
    let rest = std::str::from_utf8(&contents[close + 1..])
        .map_err(|_| "fields after the command name are not text")?;
    // Field 3 (state) comes first after the name, so field 22 is the 20th.
    let mut fields = rest.split_ascii_whitespace();
    let state = fields
        .next()
        .and_then(|s| s.chars().next())
        .ok_or("no state field")?;
    let start_time = fields
        .nth(18)
        .ok_or("no start time field")?
        .parse()
        .map_err(|_| "start time is not a number")?;
    Ok(Stat { state, start_time })
}

fn parse_status(contents: &[u8]) -> Result<ProcessCredentials, &'static str> {
    let mut uids = None;
    let mut gids = None;
    let mut groups = None;
    for line in contents.split(|&b| b == b'\n') {
        let (slot, value) = if let Some(value) = line.strip_prefix(b"Uid:") {
            (&mut uids, value)
        } else if let Some(value) = line.strip_prefix(b"Gid:") {
            (&mut gids, value)
        } else if let Some(value) = line.strip_prefix(b"Groups:") {
            (&mut groups, value)
        } else {
            continue;
        };
        // The kernel escapes the process name, so a key seen twice means we are not reading
        // what we think we are.
        if slot.is_some() {
            return Err("a Uid, Gid or Groups line appears twice");
        }
        let numbers = std::str::from_utf8(value)
            .map_err(|_| "a Uid, Gid or Groups line is not text")?
            .split_ascii_whitespace()
            .map(str::parse::<u32>)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| "a Uid, Gid or Groups line holds a non-number")?;
        *slot = Some(numbers);
    }
    // Uid and Gid list real, effective, saved and filesystem ids, in that order.
    let effective =
        |ids: Option<Vec<u32>>, missing| ids.and_then(|ids| ids.get(1).copied()).ok_or(missing);
    Ok(ProcessCredentials {
        euid: effective(uids, "no effective uid on the Uid line")?,
        egid: effective(gids, "no effective gid on the Gid line")?,
        groups: groups.ok_or("no Groups line")?,
    })
}

fn user_name(uid: u32) -> Option<String> {
    nss_name("user", uid, |buffer| {
        // SAFETY: `passwd` is plain C data for which all zeroes is a valid value;
        // getpwuid_r overwrites it.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and `buffer.len()` is the buffer's real
        // size; getpwuid_r is the thread-safe variant, writing only into what we pass.
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                &mut entry,
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                &mut found,
            )
        };
        if rc != 0 {
            return Err(rc);
        }
        if found.is_null() {
            return Ok(None);
        }
        // SAFETY: on success pw_name points at a NUL-terminated string inside `buffer`,
        // which is still alive here; it is copied out before the buffer is reused.
        Ok(Some(unsafe { CStr::from_ptr(entry.pw_name) }.to_owned()))
    })
}

fn group_name(gid: u32) -> Option<String> {
    nss_name("group", gid, |buffer| {
        // SAFETY: `group` is plain C data for which all zeroes is a valid value;
        // getgrgid_r overwrites it.
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and `buffer.len()` is the buffer's real
        // size; getgrgid_r is the thread-safe variant, writing only into what we pass.
        let rc = unsafe {
            libc::getgrgid_r(
                gid,
                &mut entry,
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                &mut found,
            )
        };
        if rc != 0 {
            return Err(rc);
        }
        if found.is_null() {
            return Ok(None);
        }
        // SAFETY: on success gr_name points at a NUL-terminated string inside `buffer`,
        // which is still alive here; it is copied out before the buffer is reused.
        Ok(Some(unsafe { CStr::from_ptr(entry.gr_name) }.to_owned()))
    })
}

/// Runs a getpwuid_r-style lookup, growing the buffer while it is too small. A missing or
/// unusable name only means one selector fewer, which can never widen what a workload gets.
fn nss_name(
    kind: &'static str,
    id: u32,
    mut lookup: impl FnMut(&mut [u8]) -> Result<Option<std::ffi::CString>, c_int>,
) -> Option<String> {
    let mut buffer = vec![0u8; NSS_BUFFER_INITIAL];
    loop {
        match lookup(&mut buffer) {
            Ok(None) => return None,
            Ok(Some(name)) => {
                return match name.into_string() {
                    Ok(name) if !name.is_empty() => Some(name),
                    _ => {
                        debug!(
                            kind,
                            id, "name is empty or not UTF-8; omitting its selector"
                        );
                        None
                    }
                };
            }
            Err(libc::ERANGE) if buffer.len() < NSS_BUFFER_MAX => {
                buffer.resize(buffer.len() * 2, 0);
            }
            Err(libc::EINTR) => {}
            Err(errno) => {
                let error = io::Error::from_raw_os_error(errno);
                debug!(kind, id, %error, "name lookup failed; omitting its selector");
                return None;
            }
        }
    }
}

/// The Workload API asks through its own small trait, so it can be tested without /proc.
impl crate::workload_api::CallerAttestor for WorkloadAttestor {
    fn attest(
        &self,
        peer: PeerCredentials,
    ) -> futures::future::BoxFuture<'_, Result<Vec<Selector>, String>> {
        Box::pin(async move {
            WorkloadAttestor::attest(self, &peer)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command};

    use super::*;

    fn install_provider() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        (unsafe { libc::geteuid() }) == 0
    }

    fn sha256_of(path: &Path) -> [u8; 32] {
        let contents = fs::read(path).unwrap();
        digest::digest(&digest::SHA256, &contents)
            .as_ref()
            .try_into()
            .unwrap()
    }

    fn which(program: &str) -> std::path::PathBuf {
        let path = std::env::var_os("PATH").unwrap();
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
            .map(|found| fs::canonicalize(found).unwrap())
            .unwrap()
    }

    /// Runs `program 30` with the given ids. Everything is set in one pre_exec hook because
    /// std drops root (setuid) before running hooks, after which setgroups would fail.
    fn spawn_as(program: &Path, uid: u32, gid: u32, groups: &'static [libc::gid_t]) -> Child {
        let mut command = Command::new(program);
        command.arg("30");
        // SAFETY: the hook runs between fork and exec and only makes async-signal-safe
        // system calls on data that lives for the whole program.
        unsafe {
            command.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
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

    fn peer_of(child: &Child, uid: u32, gid: u32) -> PeerCredentials {
        PeerCredentials {
            pid: Some(i32::try_from(child.id()).unwrap()),
            uid,
            gid,
        }
    }

    /// Blocks until the child has exited, leaving it a zombie (not reaped).
    fn wait_until_zombie(child: &Child) {
        // SAFETY: siginfo_t is plain C data; all zeroes is valid and waitid overwrites it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is valid for writes; WNOWAIT leaves the child for `Child::wait`.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                child.id(),
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        assert_eq!(rc, 0, "waitid: {}", io::Error::last_os_error());
    }

    fn own_peer() -> PeerCredentials {
        PeerCredentials {
            pid: Some(i32::try_from(std::process::id()).unwrap()),
            // SAFETY: getuid and getgid have no preconditions and cannot fail.
            uid: unsafe { libc::geteuid() },
            // SAFETY: as above.
            gid: unsafe { libc::getegid() },
        }
    }

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

    #[test]
    fn the_pidfd_notices_the_process_exiting() {
        install_provider();
        if !is_root() {
            eprintln!("skipped: spawn_as sets groups, which needs root");
            return;
        }
        let mut child = spawn_as(&which("sleep"), 0, 0, &[]);
        let pin = ProcessPin::open(i32::try_from(child.id()).unwrap()).unwrap();
        if pin.pidfd.is_none() {
            child.kill().unwrap();
            child.wait().unwrap();
            eprintln!("skipped: pidfd_open is not available here");
            return;
        }
        assert!(!pin.has_exited().unwrap());
        child.kill().unwrap();
        wait_until_zombie(&child);
        assert!(pin.has_exited().unwrap());
        child.wait().unwrap();
        assert!(pin.has_exited().unwrap());
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

    #[test]
    fn the_cache_evicts_the_oldest_entry_when_full() {
        install_provider();
        let cache = DigestCache::new(2);
        let key = |ino| ExecutableKey {
            dev: 1,
            ino,
            size: 10,
            mtime: (0, 0),
            ctime: (0, 0),
        };
        let first = cache.slot(key(1));
        cache.slot(key(2));
        assert!(Arc::ptr_eq(&first, &cache.slot(key(1))));
        cache.slot(key(3));
        assert_eq!(cache.len(), 2);
        assert!(!Arc::ptr_eq(&first, &cache.slot(key(1))));
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn a_changed_ctime_is_a_new_cache_entry() {
        install_provider();
        let cache = DigestCache::new(8);
        let key = ExecutableKey {
            dev: 1,
            ino: 2,
            size: 3,
            mtime: (4, 0),
            ctime: (5, 0),
        };
        let slot = cache.slot(key);
        let edited = ExecutableKey {
            ctime: (5, 1),
            ..key
        };
        assert!(!Arc::ptr_eq(&slot, &cache.slot(edited)));
    }

    #[test]
    fn parses_stat_when_the_command_name_has_spaces_and_parentheses() {
        install_provider();
        let mut line = b"4242 (evil) 0 0 (name) ".to_vec();
        line.push(0xff);
        line.extend_from_slice(
            b") S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 200 rest\n",
        );
        assert_eq!(
            parse_stat(&line),
            Ok(Stat {
                state: 'S',
                start_time: 987654
            })
        );
        assert!(parse_stat(b"4242 (truncated").is_err());
        assert!(parse_stat(b"4242 (x) S 1 2 3").is_err());
    }

    #[test]
    fn parses_status_ids_and_groups() {
        install_provider();
        let status = b"Name:\tapp\nUid:\t1000\t1001\t1002\t1003\nGid:\t2000\t2001\t2002\t2003\nGroups:\t100 27 \n";
        assert_eq!(
            parse_status(status),
            Ok(ProcessCredentials {
                euid: 1001,
                egid: 2001,
                groups: vec![100, 27],
            })
        );
        let no_groups = b"Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n";
        assert_eq!(parse_status(no_groups).unwrap().groups, Vec::<u32>::new());
        let twice = b"Uid:\t0\t0\t0\t0\nUid:\t1\t1\t1\t1\nGid:\t0\t0\t0\t0\nGroups:\t\n";
        assert!(parse_status(twice).is_err());
        assert!(parse_status(b"Uid:\t0\t0\t0\t0\nGroups:\t\n").is_err());
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

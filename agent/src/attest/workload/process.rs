//! A workload process pinned while it is inspected: a pidfd (where the kernel offers one)
//! keeps its pid from being reused, so what is read from /proc/<pid>/stat, status and exe
//! is proven to be of the process that connected, not of a newcomer with its pid.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use tracing::debug;

use super::digest::ExecutableKey;
use super::{AttestError, PeerCredentials};
use crate::sys;

/// A workload process, held by a pidfd where the kernel offers one. While the pidfd's
/// process is alive its pid cannot be reused, so a liveness check after reading /proc
/// proves every read was of that process. The start-time check covers kernels (or
/// seccomp profiles) without pidfd_open.
pub(super) struct ProcessPin {
    pid: i32,
    pidfd: Option<OwnedFd>,
}

/// The process's effective ids and supplementary groups, from /proc/<pid>/status.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ProcessCredentials {
    euid: u32,
    egid: u32,
    pub(super) groups: Vec<u32>,
}

/// The running executable, opened through /proc/<pid>/exe.
pub(super) struct Executable {
    /// `None` when the path the kernel reports does not lead to this very file.
    pub(super) path: Option<String>,
    pub(super) file: File,
    pub(super) key: ExecutableKey,
}

impl ProcessPin {
    pub(super) fn open(pid: i32) -> Result<Self, AttestError> {
        let error = match sys::pidfd_open(pid) {
            Ok(pidfd) => {
                return Ok(Self {
                    pid,
                    pidfd: Some(pidfd),
                });
            }
            Err(error) => error,
        };
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
    pub(super) fn has_exited(&self) -> Result<bool, AttestError> {
        let Some(pidfd) = &self.pidfd else {
            return Ok(false);
        };
        sys::poll_readable(pidfd.as_fd(), Duration::ZERO).map_err(|source| AttestError::ProcRead {
            pid: self.pid,
            path: "pidfd".into(),
            source,
        })
    }

    /// Field 22 of /proc/<pid>/stat, in clock ticks since boot.
    pub(super) fn start_time(&self) -> Result<u64, AttestError> {
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

    pub(super) fn credentials(&self) -> Result<ProcessCredentials, AttestError> {
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
    pub(super) fn executable(&self) -> Result<Option<Executable>, AttestError> {
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
    pub(super) fn check_against(
        &self,
        peer: &PeerCredentials,
        pid: i32,
    ) -> Result<(), AttestError> {
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

#[cfg(test)]
mod tests {
    use super::super::testing::{install_provider, is_root, spawn_as, wait_until_zombie, which};
    use super::*;

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
}

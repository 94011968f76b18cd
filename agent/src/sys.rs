//! Every call into libc that needs `unsafe`, each behind a small safe function: the rest of
//! the agent (and its tests) is `unsafe`-free, so a memory-safety review reads this file alone.
//! The wrappers translate C conventions (-1 and errno, out-parameters, caller-sized buffers)
//! into `io::Result` and owned values; what to make of a failure is the caller's business.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_int};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// getpw*_r/getgr*_r buffers start here and double on ERANGE up to the maximum, which
/// only a group with thousands of members listed in /etc/group would need.
const NSS_BUFFER_INITIAL: usize = 1024;
const NSS_BUFFER_MAX: usize = 1 << 20;

/// kill(2): sends `signal` to `pid` (or, as kill does, to a process group when negative).
pub fn kill(pid: i32, signal: c_int) -> io::Result<()> {
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// pidfd_open(2): a descriptor that refers to `pid`'s process for as long as it is held, so
/// the pid cannot be reused under us. Fails with ESRCH when there is no such process, and
/// with ENOSYS (or EPERM under some seccomp profiles) where the kernel offers no pidfds.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and a flags word and returns a new descriptor or -1;
    // no memory is shared with the kernel.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
    match RawFd::try_from(rc) {
        Ok(fd) if fd >= 0 => {
            // SAFETY: the kernel just created this descriptor for us; nothing else owns it.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        }
        _ => Err(io::Error::last_os_error()),
    }
}

/// poll(2) on one descriptor for POLLIN: true when the kernel reports it ready (for a
/// pidfd: its process has exited) within `timeout`, which is rounded down to milliseconds.
pub fn poll_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout_ms = c_int::try_from(timeout.as_millis()).unwrap_or(c_int::MAX);
    // SAFETY: one valid pollfd that lives across the call, and a count of one; poll only
    // writes its `revents`.
    let rc = unsafe { libc::poll(&mut poll, 1, timeout_ms) };
    match rc {
        0 => Ok(false),
        rc if rc > 0 => Ok(true),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Arranges for `command`'s child to get `signal` when the thread that spawned it dies
/// (prctl PR_SET_PDEATHSIG), so a supervised app does not outlive its supervisor.
pub fn set_parent_death_signal(command: &mut tokio::process::Command, signal: c_int) {
    // SAFETY: the hook runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed: prctl is one, and the closure captures nothing but an integer.
    unsafe {
        command.pre_exec(move || {
            // The PR_SET_PDEATHSIG argument is an unsigned long; a signal number always fits.
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Lifts the soft limit on open descriptors to the hard one, as LimitNOFILE does under
/// systemd. Leaves the limit as it is when it cannot be read.
pub fn raise_open_files_limit() -> io::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass, which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur >= limit.rlim_max {
        return Ok(());
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit only reads the struct we pass, which lives across the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// mallopt(M_ARENA_MAX): how many malloc arenas glibc may create. It only tunes the
/// allocator, and only arenas created after the call obey it.
pub fn set_malloc_arena_max(arenas: c_int) {
    // SAFETY: mallopt is MT-Safe and takes two integers; it changes allocator tuning only.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

/// The login name of `uid` from the passwd database (files, LDAP, SSSD: whatever NSS is
/// configured with), or `None` when it has none. May block on a network lookup.
pub fn user_name(uid: u32) -> io::Result<Option<CString>> {
    with_nss_buffer(|buffer| {
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

/// The name of group `gid` from the group database, or `None` when it has none.
pub fn group_name(gid: u32) -> io::Result<Option<CString>> {
    with_nss_buffer(|buffer| {
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

/// The uid of the user called `name`, or `None` when there is no such user.
pub fn user_id(name: &CStr) -> io::Result<Option<u32>> {
    with_nss_buffer(|buffer| {
        // SAFETY: `passwd` is plain C data for which all zeroes is a valid value;
        // getpwnam_r overwrites it.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: `name` is a NUL-terminated C string that outlives the call; `entry`,
        // `buffer` (with its real length) and `found` are ours for the call, and
        // getpwnam_r writes only into them.
        let rc = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut entry,
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                &mut found,
            )
        };
        if rc != 0 {
            return Err(rc);
        }
        Ok((!found.is_null()).then_some(entry.pw_uid))
    })
}

/// The gid of the group called `name`, or `None` when there is no such group.
pub fn group_id(name: &CStr) -> io::Result<Option<u32>> {
    with_nss_buffer(|buffer| {
        // SAFETY: `group` is plain C data for which all zeroes is a valid value;
        // getgrnam_r overwrites it.
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as for getpwnam_r in `user_id`, with `group` for `passwd`.
        let rc = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut entry,
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                &mut found,
            )
        };
        if rc != 0 {
            return Err(rc);
        }
        Ok((!found.is_null()).then_some(entry.gr_gid))
    })
}

/// Runs a getpwuid_r-style lookup (Ok, or the errno it returned), growing the buffer while
/// it is too small and retrying when interrupted.
fn with_nss_buffer<T>(
    mut lookup: impl FnMut(&mut [u8]) -> Result<Option<T>, c_int>,
) -> io::Result<Option<T>> {
    let mut buffer = vec![0u8; NSS_BUFFER_INITIAL];
    loop {
        match lookup(&mut buffer) {
            Ok(found) => return Ok(found),
            Err(libc::ERANGE) if buffer.len() < NSS_BUFFER_MAX => {
                buffer.resize(buffer.len() * 2, 0);
            }
            Err(libc::EINTR) => {}
            Err(errno) => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

/// geteuid(2): who owns what the agent keeps keys in.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// What only the tests need: who they run as, children under other ids, zombies.
/// Turns on `SO_PASSCRED` for `fd`. On a listening socket, every accepted connection
/// inherits it, so credentials are attached to what a client writes from its first byte.
pub(crate) fn pass_credentials(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `fd` is an open socket owned by the caller; the option value is a c_int
    // that outlives the call, and its size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PASSCRED,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One `recvmsg` into `buf`: the bytes read and the pid of the process that wrote them,
/// when the kernel said.
pub(crate) fn receive_with_writer(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<i32>)> {
    // Room for one SCM_CREDENTIALS message; descriptors a client sends (SCM_RIGHTS) do not
    // fit and are discarded by the kernel, as a plain read would.
    const SPACE: usize = 64;
    #[repr(C, align(8))]
    struct Control([u8; SPACE]);
    let mut control = Control([0; SPACE]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: zeroed is a valid msghdr (null pointers, zero lengths); the fields set below
    // point at `iov` and `control`, which live until the call returns.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = SPACE as _;
    // SAFETY: `fd` is an open socket; `msg` describes buffers valid for their lengths.
    let n = unsafe { libc::recvmsg(fd, &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut writer = None;
    // SAFETY: the CMSG_* walk stays inside the control buffer the kernel filled, whose
    // length it wrote into msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            let header = &*cmsg;
            if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_CREDENTIALS {
                let cred: libc::ucred = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                writer = Some(cred.pid);
            } else if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS
            {
                // Descriptors that did fit: close them, nothing here takes any.
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let bytes = header.cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    libc::close(std::ptr::read_unaligned(data.add(i)));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Ok((usize::try_from(n).unwrap_or(0), writer))
}

#[cfg(test)]
pub(crate) mod testing {
    use std::io;
    use std::os::unix::process::CommandExt;

    /// geteuid(2).
    pub fn effective_uid() -> u32 {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() }
    }

    /// getegid(2).
    pub fn effective_gid() -> u32 {
        // SAFETY: getegid has no preconditions and cannot fail.
        unsafe { libc::getegid() }
    }

    /// getuid(2).
    pub fn real_uid() -> u32 {
        // SAFETY: getuid has no preconditions and cannot fail.
        unsafe { libc::getuid() }
    }

    /// getgid(2).
    pub fn real_gid() -> u32 {
        // SAFETY: getgid has no preconditions and cannot fail.
        unsafe { libc::getgid() }
    }

    /// Makes `command`'s child run with these groups, gid and uid. Everything is set in one
    /// pre_exec hook because std drops root (setuid) before running hooks, after which
    /// setgroups would fail.
    pub fn run_as(
        command: &mut std::process::Command,
        uid: u32,
        gid: u32,
        groups: &'static [libc::gid_t],
    ) {
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
    }

    /// Blocks until the child `pid` has exited, leaving it a zombie (WNOWAIT: not reaped).
    pub fn wait_until_exited_unreaped(pid: u32) -> io::Result<()> {
        // SAFETY: siginfo_t is plain C data; all zeroes is valid and waitid overwrites it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is valid for writes; WNOWAIT leaves the child for `Child::wait`.
        let rc =
            unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

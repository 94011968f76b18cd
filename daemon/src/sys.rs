//! Every call into libc the daemon makes, each behind a safe function: this is the only
//! file of the crate with `unsafe`, and each block says why it is sound.

use std::io;

/// This process's real uid.
pub fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// This process's effective uid: the user the daemon acts as.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Sends `signal` to `pid` (a negative pid names a process group, as kill(2) says).
pub fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// SIGKILL to this process, at once: for the crash-safety tests' crash points.
pub fn kill_self() {
    // SAFETY: getpid cannot fail; kill(2) on our own pid touches no memory of ours.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

/// Runs `f` with the file-creation mask set to `mask`, then restores the previous one.
/// The mask is process-wide: callers use it only at startup, before other threads create
/// files.
pub fn with_umask<T>(mask: u32, f: impl FnOnce() -> T) -> T {
    // SAFETY: umask only changes this process's file-creation mask and cannot fail.
    let previous = unsafe { libc::umask(mask as libc::mode_t) };
    let out = f();
    // SAFETY: as above; this puts back the mask that was there.
    unsafe { libc::umask(previous) };
    out
}

/// The machine's host name, when it has one.
pub fn hostname() -> Option<String> {
    let mut name = [0u8; 256];
    // SAFETY: gethostname writes at most name.len() bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) };
    if rc != 0 {
        return None;
    }
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Some(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// The addresses of this host's network interfaces (IPv4 and IPv6), loopback included.
pub fn interface_addresses() -> io::Result<Vec<std::net::IpAddr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `list`, which is freed below.
    if unsafe { libc::getifaddrs(&raw mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addresses = Vec::new();
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, not yet freed; its
        // ifa_addr, when set, points at a sockaddr of the family it names, as long as the
        // list lives.
        unsafe {
            let node = &*cursor;
            if !node.ifa_addr.is_null() {
                match i32::from((*node.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let v4 = &*node.ifa_addr.cast::<libc::sockaddr_in>();
                        addresses.push(std::net::IpAddr::from(
                            u32::from_be(v4.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let v6 = &*node.ifa_addr.cast::<libc::sockaddr_in6>();
                        addresses.push(std::net::IpAddr::from(v6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cursor = node.ifa_next;
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once; nothing points into it now.
    unsafe { libc::freeifaddrs(list) };
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}

/// Makes the kernel kill a test's helper server (moto, OpenBao) when the test binary
/// dies, even without running destructors.
#[cfg(test)]
pub fn die_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs in the child between fork and exec; prctl is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_to_no_process_is_an_error() {
        // Pids are below 2^22 on Linux; this one cannot exist.
        assert!(kill(i32::MAX, 0).is_err());
        assert!(kill(std::process::id() as i32, 0).is_ok());
        assert!(hostname().is_some());
        let addresses = interface_addresses().unwrap();
        assert!(
            addresses.contains(&std::net::IpAddr::from([127, 0, 0, 1])),
            "{addresses:?}"
        );
        assert_eq!(effective_uid(), uid());
    }
}

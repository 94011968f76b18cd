//! Crash-safe file writes: a reader or a crash never sees a half-written file.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `contents` to `path` via a temp file in the same directory: fsync, rename,
/// fsync the directory. The file gets `mode` from its first byte on.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    write_atomic_owned(path, contents, mode, None, None)
}

/// [`write_atomic`], and the file also gets `uid`/`gid` (where given) before it replaces
/// the old one, so no reader ever sees the new content under the wrong owner.
pub fn write_atomic_owned(
    path: &Path,
    contents: &[u8],
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{:016x}",
        name.to_string_lossy(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed or the mode may be wider than the umask allows.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::fchown(&file, uid, gid)?;
            // chown clears set-id bits; the mode is the caller's to decide, so set it again.
            file.set_permissions(fs::Permissions::from_mode(mode))?;
        }
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates `dir` (and parents) and narrows it to `mode`.
pub fn ensure_private_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
}

/// Why `dir`, which holds keys, cannot be trusted by this process: it (after following
/// symlinks) or a directory above it is owned by another user, or one of them lets others
/// write into it (a sticky directory like /tmp excepted), or `dir` itself lets anyone else
/// in. An attacker who can write there could plant the key this process then trusts. The
/// message names the path, its owner and mode, and what to do.
/// `me` is the process's effective uid.
pub fn check_private_dir(dir: &Path, me: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let real = fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let via = if real != dir {
        format!(" (reached through a symlink: {})", real.display())
    } else {
        String::new()
    };
    let meta = fs::metadata(&real).map_err(|e| format!("{}: {e}", real.display()))?;
    if !meta.is_dir() {
        return Err(format!("{}{via} is not a directory", dir.display()));
    }
    if meta.uid() != me {
        return Err(format!(
            "{}{via} is owned by uid {}, not by this process (uid {me}), mode {:o}: another user \
             could plant keys there; use a directory of this user's (chown {me} {})",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777,
            real.display()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{}{via} has mode {:o}: others may read or write the keys in it; chmod 700 {}",
            dir.display(),
            meta.mode() & 0o7777,
            real.display()
        ));
    }
    let mut above = real.parent();
    while let Some(parent) = above {
        let meta = fs::metadata(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        let owner_ok = meta.uid() == 0 || meta.uid() == me;
        let writable_by_others = meta.mode() & 0o022 != 0;
        let sticky = meta.mode() & 0o1000 != 0;
        if !owner_ok || (writable_by_others && !sticky) {
            return Err(format!(
                "{}{via} lies under {}, owned by uid {} with mode {:o}: whoever can write there \
                 can replace the directory and the keys in it; keep data_dir under directories \
                 owned by root or uid {me} and not writable by others",
                dir.display(),
                parent.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ));
        }
        above = parent.parent();
    }
    Ok(())
}

/// Why the key file at `path` cannot be trusted: owned by another user, or readable or
/// writable by anyone else. A missing file is fine (it is created 0600).
pub fn check_private_file(path: &Path, me: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    if meta.file_type().is_symlink() {
        return Err(format!(
            "{} is a symlink: a key file must be a plain file of this process's user",
            path.display()
        ));
    }
    if meta.uid() != me {
        return Err(format!(
            "{} is owned by uid {}, not by this process (uid {me}), mode {:o}: it may have been \
             planted; check it, then chown {me} {}",
            path.display(),
            meta.uid(),
            meta.mode() & 0o7777,
            path.display()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} has mode {:o}: others may read or replace the key; chmod 600 {} (and consider \
             it exposed)",
            path.display(),
            meta.mode() & 0o7777,
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_directories_and_files_of_others_or_open_to_others_are_refused() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        ensure_private_dir(&data, 0o700).unwrap();
        let me = fs::metadata(&data).unwrap().uid();
        check_private_dir(&data, me).unwrap();
        let why = check_private_dir(&data, me + 1).unwrap_err();
        assert!(why.contains("is owned by uid"), "{why}");
        let key = data.join("secrets.key");
        check_private_file(&key, me).unwrap();
        write_atomic(&key, b"k", 0o600).unwrap();
        check_private_file(&key, me).unwrap();

        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let why = check_private_file(&key, me).unwrap_err();
        assert!(
            why.contains("mode 644") && why.contains("chmod 600"),
            "{why}"
        );
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();

        fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).unwrap();
        let why = check_private_dir(&data, me).unwrap_err();
        assert!(
            why.contains("mode 755") && why.contains("chmod 700"),
            "{why}"
        );
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).unwrap();

        // A symlink into a directory others may write: refused, naming both.
        let open = dir.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let target = open.join("data");
        ensure_private_dir(&target, 0o700).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let why = check_private_dir(&link, me).unwrap_err();
        assert!(why.contains("symlink") && why.contains("mode 777"), "{why}");

        let linked_key = data.join("linked.key");
        std::os::unix::fs::symlink(&key, &linked_key).unwrap();
        assert!(
            check_private_file(&linked_key, me)
                .unwrap_err()
                .contains("symlink")
        );
    }

    #[test]
    fn writes_with_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp files left behind");
    }
}

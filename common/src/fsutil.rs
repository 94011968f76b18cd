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

#[cfg(test)]
mod tests {
    use super::*;

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

//! The executable digest cache: the SHA-256 of each version of each binary, computed once
//! even when a thousand connections from it arrive at the same moment, and hashed through
//! the descriptor opened from /proc/<pid>/exe so the digest is of the exact file that runs.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, PoisonError};

use aws_lc_rs::digest;
use tokio::sync::OnceCell;

use super::AttestError;

/// Read size while hashing an executable.
const HASH_CHUNK: usize = 64 * 1024;

/// Identifies one version of one file: a rebuilt or edited binary gets a new ctime at least,
/// and ctime cannot be set back by anyone short of changing the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct ExecutableKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl ExecutableKey {
    pub(super) fn of(metadata: &fs::Metadata) -> Self {
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
pub(super) struct DigestCache {
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
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            slots: Mutex::default(),
            #[cfg(test)]
            hashes: Arc::default(),
        }
    }

    pub(super) async fn digest(
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
    pub(super) fn len(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.by_key.len()
    }

    #[cfg(test)]
    pub(super) fn hashes_computed(&self) -> usize {
        self.hashes.load(std::sync::atomic::Ordering::SeqCst)
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

#[cfg(test)]
mod tests {
    use super::super::testing::install_provider;
    use super::*;

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
}

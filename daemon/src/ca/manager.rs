//! The CA's life cycle: creates the first CA, prepares the next one at half-life,
//! activates it when a sixth of the active one's life remains, and publishes the
//! signing authorities and the bundle through a watch channel.
//!
//! Several daemons on one datastore share one CA: each slot's private keys are sealed into
//! its row with the sealing key every daemon holds (secrets.key), the datastore allows one
//! prepared and one active slot, and each daemon follows the bundle sequence every second,
//! loading whatever another daemon prepared, activated, tainted or removed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Mutex, watch};
use zeroize::Zeroizing;

use mayfly_common::TrustDomain;
use mayfly_common::clock::unix;

use super::{CaError, JwtAuthority, X509Authority, generate_ca};
use crate::fsutil;
use crate::secrets::local::SealingKey;
use crate::store::{CaSlotRecord, CaSlotState, Store, StoreError};

/// What signing and verification need right now; replaced whole on every CA change.
pub struct Authorities {
    pub active_slot: String,
    pub x509: Arc<X509Authority>,
    pub jwt: Arc<JwtAuthority>,
    pub bundle: BundleSnapshot,
}

/// The trust bundle as published to agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSnapshot {
    /// DER CA certificates, active first.
    pub x509_authorities: Vec<Vec<u8>>,
    /// (kid, SPKI DER) of every JWT key a valid JWT-SVID may be signed with.
    pub jwt_keys: Vec<(String, Vec<u8>)>,
    pub sequence: i64,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaManagerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crypto(#[from] CaError),
    #[error("CA key file {path}: {source}")]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("there is no prepared CA to activate; run `mayflyd ca prepare` first")]
    NothingPrepared,
    #[error("a prepared CA already exists ({0}); activate it before preparing another")]
    AlreadyPrepared(String),
    #[error("the datastore has no active CA")]
    NoActive,
    #[error("there is no CA slot {0}; `mayflyd ca show` lists them")]
    NoSuchSlot(String),
    #[error("CA slot {id} is {state}: only a retired CA can be revoked (taint it first)")]
    NotRetired { id: String, state: String },
    #[error(
        "CA slot {0}: its private key is neither sealed in the datastore nor in this daemon's \
         ca/ directory; start the daemon that made it once (it seals the key in), or copy its \
         ca/ key files here"
    )]
    KeyMissing(String),
    #[error("CA slot {0}: its sealed key does not open with this daemon's secrets.key")]
    KeySealing(String),
}

pub struct CaManager {
    store: Store,
    /// Key files of slots made before keys were sealed into the datastore.
    key_dir: PathBuf,
    sealing: Arc<SealingKey>,
    trust_domain: TrustDomain,
    ttl: Duration,
    published: watch::Sender<Arc<Authorities>>,
    // Serializes prepare/activate so the timer and an operator cannot race.
    changing: Mutex<()>,
}

impl CaManager {
    /// Loads the CA from the store, creating and activating the first one if there is none.
    pub async fn start(
        store: Store,
        data_dir: &Path,
        sealing: Arc<SealingKey>,
        trust_domain: TrustDomain,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Self, CaManagerError> {
        let key_dir = data_dir.join("ca");
        fsutil::ensure_private_dir(&key_dir, 0o700).map_err(|source| CaManagerError::KeyFile {
            path: key_dir.clone(),
            source,
        })?;
        seal_in_old_keys(&store, &key_dir, &sealing).await?;
        // Daemons starting together on a new datastore: one makes the first CA, the others
        // take it (the datastore allows one prepared and one active slot).
        for _ in 0..3 {
            let slots = store.list_ca_slots().await?;
            if slots.iter().any(|s| s.state == CaSlotState::Active) {
                break;
            }
            let slot = match slots.iter().find(|s| s.state == CaSlotState::Prepared) {
                Some(prepared) => prepared.clone(),
                None => match create_slot(&store, &sealing, &trust_domain, ttl, now).await {
                    Ok(slot) => slot,
                    Err(CaManagerError::Store(StoreError::Conflict { .. })) => continue,
                    Err(e) => return Err(e),
                },
            };
            match store.activate_ca_slot(&slot.id, unix(now)).await {
                Ok(_) => {
                    store.bump_bundle_sequence().await?;
                    tracing::info!(slot = %slot.id, "activated the first CA");
                }
                Err(StoreError::CaSlotNotPrepared { .. } | StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let authorities = load(&store, &key_dir, &sealing, now).await?;
        let (published, _) = watch::channel(Arc::new(authorities));
        Ok(Self {
            store,
            key_dir,
            sealing,
            trust_domain,
            ttl,
            published,
            changing: Mutex::new(()),
        })
    }

    pub fn current(&self) -> Arc<Authorities> {
        self.published.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Authorities>> {
        self.published.subscribe()
    }

    pub async fn slots(&self) -> Result<Vec<CaSlotRecord>, CaManagerError> {
        Ok(self.store.list_ca_slots().await?)
    }

    /// Creates the next CA and publishes it in the bundle without signing with it yet.
    pub async fn prepare(&self, now: SystemTime) -> Result<CaSlotRecord, CaManagerError> {
        let _guard = self.changing.lock().await;
        if let Some(prepared) = self.prepared().await? {
            return Err(CaManagerError::AlreadyPrepared(prepared.id));
        }
        let slot = match create_slot(
            &self.store,
            &self.sealing,
            &self.trust_domain,
            self.ttl,
            now,
        )
        .await
        {
            Ok(slot) => slot,
            // Another daemon prepared one in between.
            Err(CaManagerError::Store(StoreError::Conflict { .. })) => {
                self.republish(now).await?;
                let id = self.prepared().await?.map(|s| s.id).unwrap_or_default();
                return Err(CaManagerError::AlreadyPrepared(id));
            }
            Err(e) => return Err(e),
        };
        self.store.bump_bundle_sequence().await?;
        self.store.announce(&crate::cluster::Notice::Ca).await;
        self.republish(now).await?;
        tracing::info!(slot = %slot.id, "prepared the next CA");
        Ok(slot)
    }

    /// Switches signing to the prepared CA; the old one stays in the bundle until it expires.
    pub async fn activate(&self, now: SystemTime) -> Result<CaSlotRecord, CaManagerError> {
        let _guard = self.changing.lock().await;
        let prepared = self
            .prepared()
            .await?
            .ok_or(CaManagerError::NothingPrepared)?;
        match self.store.activate_ca_slot(&prepared.id, unix(now)).await {
            Ok(_) => {}
            // Another daemon activated it first: take what it did.
            Err(StoreError::CaSlotNotPrepared { state, .. }) if state == "active" => {
                self.republish(now).await?;
                return Ok(prepared);
            }
            Err(e) => return Err(e.into()),
        }
        self.store.bump_bundle_sequence().await?;
        self.store.announce(&crate::cluster::Notice::Ca).await;
        self.republish(now).await?;
        tracing::info!(slot = %prepared.id, "activated the prepared CA");
        Ok(prepared)
    }

    /// Switches signing to a new CA at once (preparing one if none is), for a CA whose key
    /// may be compromised. Returns the slot that was active, now retired.
    pub async fn taint(&self, now: SystemTime) -> Result<String, CaManagerError> {
        let old = self.current().active_slot.clone();
        if self.prepared().await?.is_none() {
            match self.prepare(now).await {
                Ok(_) | Err(CaManagerError::AlreadyPrepared(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.activate(now).await?;
        Ok(old)
    }

    /// Removes a retired CA from the bundle and its keys from the disk.
    pub async fn remove(&self, slot_id: &str, now: SystemTime) -> Result<(), CaManagerError> {
        let _guard = self.changing.lock().await;
        let slots = self.store.list_ca_slots().await?;
        let slot = slots
            .iter()
            .find(|s| s.id == slot_id)
            .ok_or_else(|| CaManagerError::NoSuchSlot(slot_id.to_string()))?;
        if slot.state != CaSlotState::Retired {
            return Err(CaManagerError::NotRetired {
                id: slot.id.clone(),
                state: slot.state.as_str().to_string(),
            });
        }
        self.store.delete_ca_slot(&slot.id).await?;
        remove_keys(&self.key_dir, &slot.id);
        self.store.bump_bundle_sequence().await?;
        self.store.announce(&crate::cluster::Notice::Ca).await;
        self.republish(now).await?;
        tracing::warn!(slot = %slot.id, "CA removed from the bundle");
        Ok(())
    }

    /// Prepares at half-life and activates at a sixth remaining; called on a timer.
    pub async fn tick(&self, now: SystemTime) -> Result<(), CaManagerError> {
        let slots = self.store.list_ca_slots().await?;
        let Some(active) = slots.iter().find(|s| s.state == CaSlotState::Active) else {
            return Err(CaManagerError::NoActive);
        };
        let life = (active.not_after - active.not_before).max(1);
        let now_s = unix(now);
        let has_prepared = slots.iter().any(|s| s.state == CaSlotState::Prepared);
        // Another daemon may do the same at the same moment: whoever is second finds the
        // work done.
        let done_elsewhere = |e: &CaManagerError| {
            matches!(
                e,
                CaManagerError::AlreadyPrepared(_) | CaManagerError::NothingPrepared
            )
        };
        if !has_prepared && now_s >= active.not_before + life / 2 {
            if let Err(e) = self.prepare(now).await
                && !done_elsewhere(&e)
            {
                return Err(e);
            }
        } else if has_prepared
            && active.not_after - now_s <= life / 6
            && let Err(e) = self.activate(now).await
            && !done_elsewhere(&e)
        {
            return Err(e);
        }
        let expired: Vec<&CaSlotRecord> = slots
            .iter()
            .filter(|s| s.state == CaSlotState::Retired && s.not_after <= now_s)
            .collect();
        if !expired.is_empty() {
            // An expired CA vouches for nothing: drop it from the bundle.
            for slot in expired {
                match self.store.delete_ca_slot(&slot.id).await {
                    // Another daemon removed it first.
                    Ok(_) | Err(StoreError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                remove_keys(&self.key_dir, &slot.id);
            }
            self.store.bump_bundle_sequence().await?;
            self.store.announce(&crate::cluster::Notice::Ca).await;
            self.republish(now).await?;
        }
        Ok(())
    }

    async fn prepared(&self) -> Result<Option<CaSlotRecord>, CaManagerError> {
        Ok(self
            .store
            .list_ca_slots()
            .await?
            .into_iter()
            .find(|s| s.state == CaSlotState::Prepared))
    }

    async fn republish(&self, now: SystemTime) -> Result<(), CaManagerError> {
        let authorities = load(&self.store, &self.key_dir, &self.sealing, now).await?;
        self.published.send_replace(Arc::new(authorities));
        Ok(())
    }

    /// Loads what another daemon on the datastore changed (a CA prepared, activated,
    /// tainted or removed: every change bumps the bundle sequence). True when it did.
    pub async fn sync(&self, now: SystemTime) -> Result<bool, CaManagerError> {
        let stored = self.store.bundle_sequence().await?;
        if stored == self.current().bundle.sequence {
            return Ok(false);
        }
        let _guard = self.changing.lock().await;
        if self.store.bundle_sequence().await? == self.current().bundle.sequence {
            return Ok(false);
        }
        self.republish(now).await?;
        tracing::info!(sequence = stored, active = %self.current().active_slot, "took up a CA change made by another daemon");
        Ok(true)
    }

    /// Follows the datastore every `every` until the daemon stops.
    pub async fn follow(
        self: Arc<Self>,
        clock: Arc<dyn mayfly_common::clock::Clock>,
        every: Duration,
    ) {
        let mut timer = tokio::time::interval(every);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            timer.tick().await;
            if let Err(e) = self.sync(clock.now()).await {
                tracing::error!(error = %e, "could not take up a CA change made by another daemon");
            }
        }
    }
}

/// Seals into the datastore the keys of slots made before keys were kept there, from this
/// daemon's ca/ directory, so that every daemon on the datastore can sign with them.
async fn seal_in_old_keys(
    store: &Store,
    key_dir: &Path,
    sealing: &SealingKey,
) -> Result<(), CaManagerError> {
    for slot in store.list_ca_slots().await? {
        if slot.x509_key_sealed.is_some() {
            continue;
        }
        let (Ok(x509), Ok(jwt)) = (
            read_key(&x509_key_path(key_dir, &slot.id)),
            read_key(&jwt_key_path(key_dir, &slot.id)),
        ) else {
            continue;
        };
        let (x509, jwt) = seal_keys(sealing, &slot.id, &x509, &jwt)?;
        store.set_ca_slot_keys(&slot.id, &x509, &jwt).await?;
        tracing::info!(slot = %slot.id, "sealed a CA slot's keys into the datastore");
    }
    Ok(())
}

fn seal_context(id: &str, which: &str) -> String {
    format!("mayfly-ca-key\0{id}\0{which}")
}

fn seal_keys(
    sealing: &SealingKey,
    id: &str,
    x509: &[u8],
    jwt: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), CaManagerError> {
    let seal = |which: &str, key: &[u8]| {
        sealing
            .seal(&seal_context(id, which), key)
            .map_err(|_| CaManagerError::KeySealing(id.to_string()))
    };
    Ok((seal("x509", x509)?, seal("jwt", jwt)?))
}

/// A slot's X.509 and JWT private keys (PKCS#8 DER).
type KeyPair = (Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>);

/// The private keys of `slot`: sealed in its row, or (a slot made before that) this
/// daemon's key files.
fn slot_keys(
    slot: &CaSlotRecord,
    key_dir: &Path,
    sealing: &SealingKey,
) -> Result<KeyPair, CaManagerError> {
    match (&slot.x509_key_sealed, &slot.jwt_key_sealed) {
        (Some(x509), Some(jwt)) => {
            let open = |which: &str, sealed: &[u8]| {
                sealing
                    .open(&seal_context(&slot.id, which), sealed)
                    .map_err(|_| CaManagerError::KeySealing(slot.id.clone()))
            };
            Ok((open("x509", x509)?, open("jwt", jwt)?))
        }
        _ => match (
            read_key(&x509_key_path(key_dir, &slot.id)),
            read_key(&jwt_key_path(key_dir, &slot.id)),
        ) {
            (Ok(x509), Ok(jwt)) => Ok((x509, jwt)),
            _ => Err(CaManagerError::KeyMissing(slot.id.clone())),
        },
    }
}

async fn create_slot(
    store: &Store,
    sealing: &SealingKey,
    trust_domain: &TrustDomain,
    ttl: Duration,
    now: SystemTime,
) -> Result<CaSlotRecord, CaManagerError> {
    let material = generate_ca(trust_domain.as_str(), ttl, now)?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    // The keys are in the row that names them, sealed: one insert, no file to lose.
    let (x509_key_sealed, jwt_key_sealed) =
        seal_keys(sealing, &id, &material.key_pkcs8, &material.jwt_key_pkcs8)?;
    let slot = CaSlotRecord {
        id,
        state: CaSlotState::Prepared,
        cert_der: material.cert_der.clone(),
        jwt_kid: material.jwt_kid.clone(),
        jwt_public_spki: material.jwt_public_spki.clone(),
        not_before: material.not_before,
        not_after: material.not_after,
        created_at: unix(now),
        activated_at: None,
        x509_key_sealed: Some(x509_key_sealed),
        jwt_key_sealed: Some(jwt_key_sealed),
    };
    store.insert_ca_slot(&slot).await?;
    Ok(slot)
}

async fn load(
    store: &Store,
    key_dir: &Path,
    sealing: &SealingKey,
    now: SystemTime,
) -> Result<Authorities, CaManagerError> {
    // The sequence before the slots: a change between the two reads then leaves an older
    // sequence with newer slots, which the next `sync` loads again, never the reverse (a
    // newer sequence with older slots would look up to date and stay stale).
    let sequence = store.bundle_sequence().await?;
    let slots = store.list_ca_slots().await?;
    let active = slots
        .iter()
        .find(|s| s.state == CaSlotState::Active)
        .ok_or(CaManagerError::NoActive)?;
    let (x509_key, jwt_key) = slot_keys(active, key_dir, sealing)?;
    let x509 = X509Authority::new(&active.cert_der, &x509_key)?;
    let jwt = JwtAuthority::new(&active.jwt_kid, &jwt_key)?;
    let now_s = unix(now);
    // Active first, then prepared, then retired ones that can still vouch for live SVIDs.
    let mut published: Vec<&CaSlotRecord> = slots
        .iter()
        .filter(|s| s.state != CaSlotState::Retired || s.not_after > now_s)
        .collect();
    published.sort_by_key(|s| match s.state {
        CaSlotState::Active => 0,
        CaSlotState::Prepared => 1,
        _ => 2,
    });
    let bundle = BundleSnapshot {
        x509_authorities: published.iter().map(|s| s.cert_der.clone()).collect(),
        jwt_keys: published
            .iter()
            .map(|s| (s.jwt_kid.clone(), s.jwt_public_spki.clone()))
            .collect(),
        sequence,
    };
    Ok(Authorities {
        active_slot: active.id.clone(),
        x509: Arc::new(x509),
        jwt: Arc::new(jwt),
        bundle,
    })
}

fn x509_key_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.x509.key"))
}

fn jwt_key_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.jwt.key"))
}

fn read_key(path: &Path) -> Result<Zeroizing<Vec<u8>>, CaManagerError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|source| CaManagerError::KeyFile {
            path: path.to_path_buf(),
            source,
        })
}

/// Removes the key files a slot made before keys were sealed into the datastore left.
fn remove_keys(dir: &Path, id: &str) {
    for path in [x509_key_path(dir, id), jwt_key_path(dir, id)] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not remove an expired CA key")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    async fn manager(dir: &Path, ttl: Duration, now: SystemTime) -> CaManager {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let store = Store::connect(None, dir).await.unwrap();
        CaManager::start(
            store,
            dir,
            Arc::new(SealingKey::load_or_create(dir).unwrap()),
            TrustDomain::new("example.org").unwrap(),
            ttl,
            now,
        )
        .await
        .unwrap()
    }

    fn states(slots: &[CaSlotRecord]) -> Vec<CaSlotState> {
        slots.iter().map(|s| s.state).collect()
    }

    #[tokio::test]
    async fn prepares_at_half_life_and_activates_at_a_sixth_remaining() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ca = manager(dir.path(), Duration::from_secs(600), t0).await;
        let first = ca.current();
        let slot = ca.slots().await.unwrap()[0].clone();
        let life = slot.not_after - slot.not_before;
        let at = |offset: i64| UNIX_EPOCH + Duration::from_secs((slot.not_before + offset) as u64);

        ca.tick(at(life / 2 - 1)).await.unwrap();
        assert_eq!(
            states(&ca.slots().await.unwrap()),
            vec![CaSlotState::Active]
        );

        ca.tick(at(life / 2)).await.unwrap();
        let slots = ca.slots().await.unwrap();
        assert_eq!(
            states(&slots),
            vec![CaSlotState::Active, CaSlotState::Prepared]
        );
        let published = ca.current();
        assert_eq!(published.bundle.x509_authorities.len(), 2);
        assert_eq!(
            published.active_slot, first.active_slot,
            "still signing with the first CA"
        );
        assert!(published.bundle.sequence > first.bundle.sequence);

        ca.tick(at(life - life / 6 - 1)).await.unwrap();
        assert_eq!(ca.current().active_slot, first.active_slot);

        ca.tick(at(life - life / 6)).await.unwrap();
        let switched = ca.current();
        assert_ne!(
            switched.active_slot, first.active_slot,
            "the prepared CA is active"
        );
        assert_eq!(
            switched.bundle.x509_authorities.len(),
            2,
            "the old CA stays published"
        );
        assert_eq!(switched.bundle.jwt_keys.len(), 2);

        // Once the old CA has expired it leaves the bundle and its keys leave the disk. By
        // then the second CA is itself at half-life, so a third has been prepared.
        ca.tick(at(life + 1)).await.unwrap();
        let slots = ca.slots().await.unwrap();
        assert!(
            slots.iter().all(|s| s.id != slot.id),
            "the expired CA is gone"
        );
        assert_eq!(
            states(&slots),
            vec![CaSlotState::Active, CaSlotState::Prepared]
        );
        assert!(
            !ca.current()
                .bundle
                .x509_authorities
                .contains(&slot.cert_der)
        );
        let key_files = std::fs::read_dir(dir.path().join("ca")).unwrap().count();
        assert_eq!(
            key_files, 0,
            "keys live sealed in the datastore, not in files"
        );
    }

    #[tokio::test]
    async fn restart_reuses_the_stored_ca() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let first = manager(dir.path(), Duration::from_secs(3600), now).await;
        let before = first.current().bundle.clone();
        drop(first);
        let second = manager(dir.path(), Duration::from_secs(3600), now).await;
        assert_eq!(
            second.current().bundle.x509_authorities,
            before.x509_authorities
        );
    }

    #[tokio::test]
    async fn forced_prepare_and_activate_follow_the_rules() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let ca = manager(dir.path(), Duration::from_secs(3600), now).await;
        assert!(matches!(
            ca.activate(now).await,
            Err(CaManagerError::NothingPrepared)
        ));
        ca.prepare(now).await.unwrap();
        assert!(matches!(
            ca.prepare(now).await,
            Err(CaManagerError::AlreadyPrepared(_))
        ));
        ca.activate(now).await.unwrap();
        let mut found = states(&ca.slots().await.unwrap());
        found.sort_by_key(|s| s.as_str());
        assert_eq!(found, vec![CaSlotState::Active, CaSlotState::Retired]);
    }

    #[tokio::test]
    async fn taint_switches_at_once_and_only_a_retired_ca_can_be_removed() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let ca = manager(dir.path(), Duration::from_secs(3600), now).await;
        let first = ca.current().active_slot.clone();
        assert_eq!(ca.taint(now).await.unwrap(), first);
        let second = ca.current().active_slot.clone();
        assert_ne!(second, first, "a new CA signs at once");
        assert_eq!(ca.current().bundle.x509_authorities.len(), 2);
        assert!(matches!(
            ca.remove(&second, now).await,
            Err(CaManagerError::NotRetired { .. })
        ));
        ca.remove(&first, now).await.unwrap();
        assert_eq!(ca.current().bundle.x509_authorities.len(), 1);
        assert!(matches!(
            ca.remove(&first, now).await,
            Err(CaManagerError::NoSuchSlot(_))
        ));
        // With a CA already prepared, taint activates that one.
        let prepared = ca.prepare(now).await.unwrap();
        assert_eq!(ca.taint(now).await.unwrap(), second);
        assert_eq!(ca.current().active_slot, prepared.id);
    }
}

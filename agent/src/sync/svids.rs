//! The workload SVID cache: keys generated on the node, CSRs signed in batches, each SVID
//! renewed at half-life ±10%, and the result published as the Workload API's state.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use zeroize::Zeroizing;

use mayfly_common::svid::{BACKDATE_SECS, CaError, generate_csr};
use mayfly_common::tls::{TlsError, peer_identity};
use mayfly_common::{Selector, SelectorError, SpiffeId, SpiffeIdError, TrustDomain};
use mayfly_proto::v1::{self};

use super::{Authorized, Backoff, ClientCell};
use crate::state::{Bundle, EntryView, PendingRevocation, SecretView, WorkloadState, X509Svid};

/// Why workload SVIDs could not be signed, or a signed SVID or an entry cannot be used.
/// Logged (never sent anywhere); signing is retried with backoff.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
enum SvidCacheError {
    #[error(transparent)]
    Csr(CaError),
    #[error("{:?}: {}", .0.code(), .0.message())]
    Daemon(tonic::Status),
    #[error("empty chain")]
    EmptyChain,
    #[error(transparent)]
    Identity(TlsError),
    #[error("SVID names {found}, entry wants {wanted}")]
    WrongSpiffeId { found: SpiffeId, wanted: String },
    #[error("{0}")]
    Certificate(x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error(transparent)]
    Selector(SelectorError),
    #[error(transparent)]
    SpiffeId(SpiffeIdError),
}

/// Per-entry bookkeeping beside the published SVID.
#[derive(Debug, Clone, Copy)]
struct Renewal {
    revision: i64,
    /// Unix milliseconds.
    due_ms: i64,
}

pub struct SvidCache {
    trust_domain: TrustDomain,
    /// This agent's SPIFFE ID, published with the state for policy decisions.
    node: String,
    max_batch: usize,
    client: ClientCell,
    authorized: watch::Receiver<Authorized>,
    published: watch::Sender<Arc<WorkloadState>>,
    svids: BTreeMap<String, Arc<X509Svid>>,
    renewals: HashMap<String, Renewal>,
    backoff: Backoff,
    retry_at_ms: Option<i64>,
    /// What each pending revocation made this cache do.
    effects: BTreeMap<String, Effects>,
}

#[derive(Debug, Clone, Default)]
struct Effects {
    dropped: Vec<String>,
    /// Entry id -> SPIFFE ID, for entries that must get a fresh SVID.
    awaiting: BTreeMap<String, String>,
    reissued: Vec<String>,
}

impl SvidCache {
    pub fn new(
        trust_domain: TrustDomain,
        node: String,
        max_batch: usize,
        client: ClientCell,
        authorized: watch::Receiver<Authorized>,
        published: watch::Sender<Arc<WorkloadState>>,
    ) -> Self {
        Self {
            trust_domain,
            node,
            max_batch: max_batch.max(1),
            client,
            authorized,
            published,
            svids: BTreeMap::new(),
            renewals: HashMap::new(),
            backoff: Backoff::default(),
            retry_at_ms: None,
            effects: BTreeMap::new(),
        }
    }

    /// Runs until the authorized state's sender is dropped.
    pub async fn run(mut self) {
        loop {
            let authorized = self.authorized.borrow_and_update().clone();
            self.reconcile(&authorized).await;
            let wake = self.next_wake_ms();
            let sleep = match wake {
                Some(at) => Duration::from_millis((at - now_ms()).max(0) as u64),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                changed = self.authorized.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    async fn reconcile(&mut self, authorized: &Authorized) {
        let now = now_ms();
        // What each new revocation takes from the cache, before anything is dropped.
        for revocation in &authorized.revocations {
            if self.effects.contains_key(&revocation.id) {
                continue;
            }
            let mut effects = Effects::default();
            for (entry_id, svid) in &self.svids {
                let denied = revocation.serials.iter().any(|s| s.serial == svid.serial);
                let entry_gone = !authorized.entries.contains_key(entry_id);
                if denied
                    || (entry_gone && revocation.entry_ids.contains(entry_id))
                    || revocation.everything
                {
                    effects.dropped.push(svid.serial.clone());
                    if !entry_gone {
                        effects
                            .awaiting
                            .insert(entry_id.clone(), svid.spiffe_id.to_string());
                    }
                }
            }
            self.effects.insert(revocation.id.clone(), effects);
        }
        self.effects
            .retain(|id, _| authorized.revocations.iter().any(|r| r.id == *id));
        // Drop what is no longer ours, no longer valid, or revoked.
        self.svids.retain(|id, svid| {
            authorized.entries.contains_key(id)
                && svid.not_after * 1000 > now
                && !authorized.deny.contains_key(&svid.serial)
        });
        self.renewals
            .retain(|id, _| authorized.entries.contains_key(id));

        let due: Vec<&v1::Entry> = authorized
            .entries
            .values()
            .filter(|entry| match self.renewals.get(&entry.id) {
                Some(r) if self.svids.contains_key(&entry.id) => {
                    r.revision != entry.revision || r.due_ms <= now
                }
                _ => true,
            })
            .collect();
        let retry_blocked = self.retry_at_ms.is_some_and(|at| at > now);
        if !due.is_empty() && authorized.synced && !retry_blocked {
            match self.sign(&due).await {
                Ok(()) => {
                    self.backoff.reset();
                    self.retry_at_ms = None;
                }
                Err(message) => {
                    let delay = self.backoff.next_delay();
                    tracing::warn!(error = %message, retry_in_ms = delay.as_millis() as u64, "signing workload SVIDs failed");
                    self.retry_at_ms = Some(now + delay.as_millis() as i64);
                }
            }
        }
        for effects in self.effects.values_mut() {
            let svids = &self.svids;
            effects.awaiting.retain(|entry_id, spiffe_id| {
                if !authorized.entries.contains_key(entry_id) {
                    return false;
                }
                if svids.contains_key(entry_id) {
                    effects.reissued.push(spiffe_id.clone());
                    return false;
                }
                true
            });
        }
        self.publish(authorized);
    }

    async fn sign(&mut self, due: &[&v1::Entry]) -> Result<(), SvidCacheError> {
        for chunk in due.chunks(self.max_batch) {
            let mut keys = HashMap::with_capacity(chunk.len());
            let mut csrs = Vec::with_capacity(chunk.len());
            for entry in chunk {
                let (key, csr) = generate_csr(None).map_err(SvidCacheError::Csr)?;
                keys.insert(entry.id.clone(), (key, entry.revision));
                csrs.push(v1::SvidCsr {
                    entry_id: entry.id.clone(),
                    csr,
                });
            }
            let mut client = self.client.borrow().clone();
            let signed = client
                .sign_svids(v1::SignSvidsRequest { csrs })
                .await
                .map_err(SvidCacheError::Daemon)?
                .into_inner();
            for svid in signed.svids {
                let Some((key, revision)) = keys.remove(&svid.entry_id) else {
                    continue;
                };
                let Some(entry) = chunk.iter().find(|e| e.id == svid.entry_id) else {
                    continue;
                };
                match self.build(entry, svid, key) {
                    Ok(built) => {
                        // Half-life ±10%, so a fleet's renewals do not arrive in step.
                        let fraction = rand::random_range(0.4..0.6);
                        let due_ms = renewal_due_ms(built.not_before, built.not_after, fraction);
                        self.renewals
                            .insert(built.entry_id.clone(), Renewal { revision, due_ms });
                        tracing::debug!(entry = %built.entry_id, spiffe_id = %built.spiffe_id, serial = %built.serial, "workload SVID ready");
                        self.svids.insert(built.entry_id.clone(), Arc::new(built));
                    }
                    Err(e) => {
                        tracing::warn!(entry = %entry.id, error = %e, "the daemon returned an unusable SVID")
                    }
                }
            }
        }
        Ok(())
    }

    fn build(
        &self,
        entry: &v1::Entry,
        signed: v1::SignedSvid,
        key: Zeroizing<Vec<u8>>,
    ) -> Result<X509Svid, SvidCacheError> {
        let leaf = signed
            .svid_chain
            .first()
            .ok_or(SvidCacheError::EmptyChain)?;
        let identity = peer_identity(leaf).map_err(SvidCacheError::Identity)?;
        if identity.spiffe_id.as_str() != entry.spiffe_id {
            return Err(SvidCacheError::WrongSpiffeId {
                found: identity.spiffe_id,
                wanted: entry.spiffe_id.clone(),
            });
        }
        let not_before = x509_parser::parse_x509_certificate(leaf)
            .map(|(_, c)| c.validity().not_before.timestamp())
            .map_err(SvidCacheError::Certificate)?;
        Ok(X509Svid {
            entry_id: entry.id.clone(),
            spiffe_id: identity.spiffe_id,
            hint: entry.hint.clone(),
            chain: signed.svid_chain,
            key_pkcs8: Arc::new(key),
            serial: identity.serial,
            not_before,
            not_after: identity.not_after,
        })
    }

    fn next_wake_ms(&self) -> Option<i64> {
        let renewals = self.renewals.values().map(|r| r.due_ms);
        let expiries = self.svids.values().map(|s| s.not_after * 1000);
        renewals.chain(expiries).chain(self.retry_at_ms).min()
    }

    fn publish(&self, authorized: &Authorized) {
        let Some(bundle) = authorized.bundle.as_ref() else {
            return;
        };
        let entries: Vec<Arc<EntryView>> = authorized
            .entries
            .values()
            .filter_map(|e| match entry_view(e) {
                Ok(view) => Some(Arc::new(view)),
                Err(reason) => {
                    tracing::warn!(entry = %e.id, %reason, "ignoring an entry the agent cannot use");
                    None
                }
            })
            .collect();
        let mut entries = entries;
        entries.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id).then(a.id.cmp(&b.id)));
        let secrets = authorized
            .secrets
            .values()
            .map(|s| {
                let view = SecretView {
                    name: s.name.clone(),
                    version: s.version.clone(),
                    username: s.username.clone(),
                    value: Arc::new(Zeroizing::new(s.value.clone())),
                    granted_to: s.granted_to.clone(),
                    sets: s.sets.clone(),
                };
                (s.name.clone(), Arc::new(view))
            })
            .collect();
        let revocations = authorized
            .revocations
            .iter()
            .map(|r| {
                let effects = self.effects.get(&r.id).cloned().unwrap_or_default();
                Arc::new(PendingRevocation {
                    message: r.clone(),
                    dropped: effects.dropped,
                    awaiting: effects.awaiting.into_values().collect(),
                    reissued: effects.reissued,
                })
            })
            .collect();
        let mut state = WorkloadState {
            entries,
            secrets,
            synced: authorized.synced,
            version: 0,
            revoked_ids: authorized.revoked_ids.clone(),
            revoked_secrets: authorized.revoked_secrets.clone(),
            revoked_all: authorized.revoked_all,
            revocations,
            policy: authorized.policy.clone(),
            node: self.node.clone(),
            svids: self.svids.clone(),
            bundle: Arc::new(Bundle {
                trust_domain: self.trust_domain.clone(),
                x509_authorities: bundle.x509_authorities.clone(),
                jwt_keys: bundle
                    .jwt_authorities
                    .iter()
                    .map(|k| (k.key_id.clone(), k.public_key.clone()))
                    .collect(),
                sequence: bundle.sequence_number,
            }),
        };
        self.published.send_if_modified(|current| {
            let same = current.bundle == state.bundle
                && current.synced == state.synced
                && current.revoked_ids == state.revoked_ids
                && current.revoked_secrets == state.revoked_secrets
                && current.revoked_all == state.revoked_all
                && current.revocations == state.revocations
                && current.policy == state.policy
                && current.secrets == state.secrets
                && current.entries == state.entries
                && current.svids.len() == state.svids.len()
                && current
                    .svids
                    .iter()
                    .zip(state.svids.iter())
                    .all(|((a, x), (b, y))| a == b && x.serial == y.serial);
            if same {
                return false;
            }
            state.version = current.version + 1;
            *current = Arc::new(state);
            true
        });
    }
}

fn entry_view(entry: &v1::Entry) -> Result<EntryView, SvidCacheError> {
    let selectors = entry
        .selectors
        .iter()
        .map(Selector::try_from)
        .collect::<Result<Vec<_>, _>>()
        .map_err(SvidCacheError::Selector)?;
    Ok(EntryView {
        id: entry.id.clone(),
        spiffe_id: SpiffeId::parse(&entry.spiffe_id).map_err(SvidCacheError::SpiffeId)?,
        selectors,
        hint: entry.hint.clone(),
        sets: entry.sets.clone(),
        revision: entry.revision,
        expires_at: entry.expires_at,
    })
}

/// `renewal_due` in milliseconds, so short test TTLs still spread out.
fn renewal_due_ms(not_before: i64, not_after: i64, fraction: f64) -> i64 {
    let issued_ms = (not_before + BACKDATE_SECS).min(not_after) * 1000;
    issued_ms + ((not_after * 1000 - issued_ms) as f64 * fraction) as i64
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

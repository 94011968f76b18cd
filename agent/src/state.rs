//! What the agent currently holds, published whole through a watch channel: the sync
//! stream and the SVID cache write it, the Workload API and sinks read it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use zeroize::Zeroizing;

use mayfly_common::{Selector, SpiffeId, TrustDomain};

/// A registration entry as the agent needs it: who may receive which identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryView {
    pub id: String,
    pub spiffe_id: SpiffeId,
    /// A caller must match every one of these.
    pub selectors: Vec<Selector>,
    pub hint: String,
    /// The policy sets (`Mayfly::EntrySet`) it is in.
    pub sets: Vec<String>,
    pub revision: i64,
    /// Unix seconds when it stops (an elevation's temporary entry); 0 for never.
    pub expires_at: i64,
}

impl EntryView {
    /// True when the caller's selectors include every selector of this entry.
    pub fn matches(&self, caller: &[Selector]) -> bool {
        !self.selectors.is_empty() && self.selectors.iter().all(|s| caller.contains(s))
    }
}

/// One X509-SVID with its private key, which never leaves the node.
#[derive(Clone)]
pub struct X509Svid {
    pub entry_id: String,
    pub spiffe_id: SpiffeId,
    pub hint: String,
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER.
    pub key_pkcs8: Arc<Zeroizing<Vec<u8>>>,
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

impl fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Svid")
            .field("entry_id", &self.entry_id)
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The trust domain's bundle as the daemon last published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub trust_domain: TrustDomain,
    /// DER CA certificates.
    pub x509_authorities: Vec<Vec<u8>>,
    /// (kid, SPKI DER) of the JWT signing keys.
    pub jwt_keys: Vec<(String, Vec<u8>)>,
    pub sequence: i64,
}

/// The current version of a secret granted to this agent or to some of its entries.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretView {
    pub name: String,
    pub version: String,
    pub username: String,
    pub value: Arc<Zeroizing<Vec<u8>>>,
    /// The SPIFFE IDs it is granted to: the agent's own, or its entries'.
    pub granted_to: Vec<String>,
    /// The policy sets (`Mayfly::SecretSet`) of its definition.
    pub sets: Vec<String>,
}

impl fmt::Debug for SecretView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretView")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("username", &self.username)
            .field("value", &"<redacted>")
            .field("granted_to", &self.granted_to)
            .field("sets", &self.sets)
            .finish()
    }
}

/// Everything the Workload API and the sinks serve, replaced whole on every change.
#[derive(Debug, Clone)]
pub struct WorkloadState {
    /// Entries whose parent is this agent, ordered by SPIFFE ID then id.
    pub entries: Vec<Arc<EntryView>>,
    /// Current SVID per entry id; an entry may briefly have none (just created).
    pub svids: BTreeMap<String, Arc<X509Svid>>,
    pub bundle: Arc<Bundle>,
    /// Granted secrets by name.
    pub secrets: BTreeMap<String, Arc<SecretView>>,
    /// True once the daemon has sent this agent's full state at least once.
    pub synced: bool,
    /// Bumped on every change, so a reader can tell when it has caught up.
    pub version: u64,
    /// SPIFFE IDs whose entries were revoked: sinks remove or blank their files.
    pub revoked_ids: BTreeSet<String>,
    /// Secrets whose grants were revoked with their entries.
    pub revoked_secrets: BTreeSet<String>,
    /// Everything is revoked (the agent was banned): every sink removes or blanks.
    pub revoked_all: bool,
    /// Revocations applied and not yet acknowledged, with what the SVID cache did.
    pub revocations: Vec<Arc<PendingRevocation>>,
    /// The daemon's policies, decided here for Workload API calls; none until pushed.
    pub policy: Option<Arc<crate::policy::AgentPolicy>>,
    /// This agent's SPIFFE ID (the `node` of a policy's context).
    pub node: String,
}

/// A revocation the agent is carrying out.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingRevocation {
    pub message: mayfly_proto::v1::Revocation,
    /// Serials the agent held and dropped.
    pub dropped: Vec<String>,
    /// SPIFFE IDs still valid here that wait for a fresh SVID.
    pub awaiting: Vec<String>,
    /// SPIFFE IDs that have their fresh SVID.
    pub reissued: Vec<String>,
}

impl WorkloadState {
    pub fn empty(bundle: Bundle) -> Self {
        Self {
            entries: Vec::new(),
            svids: BTreeMap::new(),
            bundle: Arc::new(bundle),
            secrets: BTreeMap::new(),
            synced: false,
            version: 0,
            revoked_ids: BTreeSet::new(),
            revoked_secrets: BTreeSet::new(),
            revoked_all: false,
            revocations: Vec::new(),
            policy: None,
            node: String::new(),
        }
    }

    /// The secrets granted to any SPIFFE ID a caller with these selectors holds.
    pub fn secrets_for(&self, caller: &[Selector]) -> Vec<Arc<SecretView>> {
        let ids: Vec<&str> = self
            .entries
            .iter()
            .filter(|e| e.matches(caller))
            .map(|e| e.spiffe_id.as_str())
            .collect();
        self.secrets
            .values()
            .filter(|s| s.granted_to.iter().any(|g| ids.contains(&g.as_str())))
            .cloned()
            .collect()
    }

    /// The entries a caller with these selectors may have, in a stable order.
    pub fn entries_for(&self, caller: &[Selector]) -> Vec<Arc<EntryView>> {
        self.entries
            .iter()
            .filter(|e| e.matches(caller))
            .cloned()
            .collect()
    }

    /// The SVIDs a caller with these selectors may have, in entry order.
    pub fn svids_for(&self, caller: &[Selector]) -> Vec<Arc<X509Svid>> {
        self.entries_for(caller)
            .iter()
            .filter_map(|e| self.svids.get(&e.id).cloned())
            .collect()
    }
}

/// Mints JWT-SVIDs for an entry; the agent asks the daemon, which holds the key.
#[tonic::async_trait]
pub trait JwtIssuer: Send + Sync + 'static {
    /// Returns the token and its expiry (unix seconds).
    async fn mint(
        &self,
        entry_id: &str,
        audience: &[String],
    ) -> Result<(String, i64), tonic::Status>;
}

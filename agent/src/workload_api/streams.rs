//! The three server streams (X509-SVIDs, X509 bundles, JWT bundles) as one pattern: a view
//! of the shared state, computed at once and again on every state change, sent only when
//! what this caller sees has changed.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::watch;

use mayfly_common::Selector;
use mayfly_proto::workload::{JwtBundlesResponse, X509BundlesResponse, X509svid, X509svidResponse};

use crate::state::{Bundle, WorkloadState, X509Svid};
use crate::workload_api::error::WorkloadApiError;

/// A boxed server stream, as the generated service trait wants it.
pub(crate) type ResponseStream<T> =
    Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;

/// What one stream shows a caller: compared with the last one sent to skip identical
/// messages, then encoded. Snapshots hold `Arc`s into the state rather than encoded
/// messages, so no extra copy of a private key lives as long as the stream.
pub(crate) trait View: PartialEq + Send + 'static {
    type Message: Send + 'static;

    /// `Ok(None)` means "nothing to send yet": wait for the next change.
    fn take(state: &WorkloadState, caller: &[Selector]) -> Result<Option<Self>, WorkloadApiError>
    where
        Self: Sized;

    fn encode(&self) -> Self::Message;
}

/// Streams `V` for `caller`: first as soon as there is something to send, then on every
/// change of what `V` shows. An error ends the stream; so does `closing` turning true.
pub(crate) fn watch_stream<V: View>(
    state: watch::Receiver<Arc<WorkloadState>>,
    closing: watch::Receiver<bool>,
    caller: Vec<Selector>,
) -> ResponseStream<V::Message> {
    struct Cursor<V> {
        state: watch::Receiver<Arc<WorkloadState>>,
        closing: watch::Receiver<bool>,
        caller: Vec<Selector>,
        last: Option<V>,
        done: bool,
    }

    let cursor = Cursor::<V> {
        state,
        closing,
        caller,
        last: None,
        done: false,
    };
    Box::pin(futures::stream::unfold(cursor, |mut c| async move {
        if c.done {
            return None;
        }
        loop {
            // Cloning the Arc releases the watch's read lock before any await.
            let current = c.state.borrow_and_update().clone();
            match V::take(&current, &c.caller) {
                Err(e) => {
                    c.done = true;
                    return Some((Err(e.into_status()), c));
                }
                Ok(Some(view)) if c.last.as_ref() != Some(&view) => {
                    let message = view.encode();
                    c.last = Some(view);
                    return Some((Ok(message), c));
                }
                Ok(_) => {}
            }
            let closing = c.closing.wait_for(|closing| *closing);
            tokio::select! {
                changed = c.state.changed() => {
                    // The publisher is gone: the agent is stopping.
                    if changed.is_ok() {
                        continue;
                    }
                }
                _ = closing => {}
            }
            c.done = true;
            return Some((Err(WorkloadApiError::ShuttingDown.into_status()), c));
        }
    }))
}

/// The caller's X509-SVIDs, in entry order, each with the hint of its entry.
#[derive(Debug)]
pub(crate) struct X509SvidView {
    svids: Vec<(Arc<X509Svid>, String)>,
    bundle: Arc<Bundle>,
}

impl PartialEq for X509SvidView {
    fn eq(&self, other: &Self) -> bool {
        self.bundle.x509_authorities == other.bundle.x509_authorities
            && self.svids.len() == other.svids.len()
            && self
                .svids
                .iter()
                .zip(&other.svids)
                .all(|((a, hint_a), (b, hint_b))| hint_a == hint_b && same_svid(a, b))
    }
}

/// Same content, whether or not the publisher reused the `Arc`.
fn same_svid(a: &X509Svid, b: &X509Svid) -> bool {
    a.spiffe_id == b.spiffe_id
        && a.chain == b.chain
        && (Arc::ptr_eq(&a.key_pkcs8, &b.key_pkcs8) || **a.key_pkcs8 == **b.key_pkcs8)
}

impl View for X509SvidView {
    type Message = X509svidResponse;

    /// A caller that matches no entry gets `PermissionDenied`, at the start as after an
    /// entry is deleted: SPIRE does the same, and the `spiffe` crate's sources then drop
    /// the identity and retry with backoff rather than keep serving a revoked one.
    /// Matching entries whose SVIDs are not issued yet, or a bundle not yet synced, mean
    /// "wait": clients reject a message without SVIDs or without a bundle.
    fn take(state: &WorkloadState, caller: &[Selector]) -> Result<Option<Self>, WorkloadApiError> {
        let entries = state.entries_for(caller);
        if entries.is_empty() {
            return Err(WorkloadApiError::NoIdentityIssued { requested: None });
        }
        // The policies may take some of them away; all of them is a refusal.
        let mut denial = None;
        let entries: Vec<_> = entries
            .into_iter()
            .filter(|e| {
                crate::policy::check(state, e, caller, crate::policy::WorkloadAsk::X509Svid)
                    .map_err(|why| denial = Some(why))
                    .is_ok()
            })
            .collect();
        if entries.is_empty() {
            return Err(WorkloadApiError::PolicyDenied(denial.unwrap_or_default()));
        }
        let svids: Vec<_> = entries
            .iter()
            .filter_map(|e| state.svids.get(&e.id).map(|s| (s.clone(), e.hint.clone())))
            .collect();
        if svids.is_empty() || state.bundle.x509_authorities.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            svids,
            bundle: state.bundle.clone(),
        }))
    }

    fn encode(&self) -> X509svidResponse {
        let bundle = self.bundle.x509_authorities.concat();
        X509svidResponse {
            svids: self
                .svids
                .iter()
                .map(|(svid, hint)| X509svid {
                    spiffe_id: svid.spiffe_id.as_str().to_owned(),
                    x509_svid: svid.chain.concat(),
                    x509_svid_key: svid.key_pkcs8.to_vec(),
                    bundle: bundle.clone(),
                    hint: hint.clone(),
                })
                .collect(),
            crl: Vec::new(),
            // Mayfly does not federate yet; an empty map tells clients "no foreign bundles".
            federated_bundles: Default::default(),
        }
    }
}

/// The trust domain's CA certificates, for any attested caller.
#[derive(Debug, PartialEq)]
pub(crate) struct X509BundlesView {
    trust_domain: String,
    authorities: Vec<Vec<u8>>,
}

impl View for X509BundlesView {
    type Message = X509BundlesResponse;

    fn take(state: &WorkloadState, _caller: &[Selector]) -> Result<Option<Self>, WorkloadApiError> {
        let bundle = &state.bundle;
        // Not synced yet: clients reject an empty bundle, so wait for the real one.
        if bundle.x509_authorities.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            trust_domain: bundle.trust_domain.as_str().to_owned(),
            authorities: bundle.x509_authorities.clone(),
        }))
    }

    fn encode(&self) -> X509BundlesResponse {
        X509BundlesResponse {
            crl: Vec::new(),
            bundles: [(self.trust_domain.clone(), self.authorities.concat())].into(),
        }
    }
}

/// The trust domain's JWT signing keys as a JWKS, for any attested caller.
#[derive(Debug, PartialEq)]
pub(crate) struct JwtBundlesView {
    trust_domain: String,
    keys: Vec<(String, Vec<u8>)>,
}

impl View for JwtBundlesView {
    type Message = JwtBundlesResponse;

    /// Sent even with no keys: an empty JWKS is a valid answer ("trust no JWT yet"), and
    /// clients accept it.
    fn take(state: &WorkloadState, _caller: &[Selector]) -> Result<Option<Self>, WorkloadApiError> {
        Ok(Some(Self {
            trust_domain: state.bundle.trust_domain.as_str().to_owned(),
            keys: state.bundle.jwt_keys.clone(),
        }))
    }

    fn encode(&self) -> JwtBundlesResponse {
        let jwks = mayfly_common::svid::jwt_jwks(&self.keys).to_string();
        JwtBundlesResponse {
            bundles: [(self.trust_domain.clone(), jwks.into_bytes())].into(),
        }
    }
}

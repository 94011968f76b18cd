//! The identity blast-radius report: for each principal, what it can reach now without
//! elevation (standing: SVIDs, secrets, credentials the policies grant it), what it could
//! reach through an elevation the policies would let it ask for (eligible), and what it
//! holds right now (live exposure: each outstanding credential by remaining TTL and the
//! definition's sensitivity). A principal holds zero standing privilege when its standing
//! reach has no secret and no credential.
//!
//! Every pair of principal and resource a permit could reach is decided by Cedar, exactly as
//! a request would be (forbids included); pairs no permit can reach are not asked. The
//! candidates come from the policy index: the definitions' grants (what the built-in
//! policies permit), permits that name the principal, and permits that name the resource
//! or one of its sets. A permit that names neither makes every pair a candidate; the report
//! says so, since that is the slow path. Eligible reach is computed for one principal at
//! a time: the fleet report (`--all`) ranks by standing reach and exposure, and leaves the
//! eligibility out (a permit naming a set of credentials and no principal would otherwise
//! have every principal decided against every credential in it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use mayfly_common::clock::{Clock, unix};
use mayfly_common::policy::{DEFAULTS, DEFAULTS_NAME, PermitScopes};

use crate::creds::spec::{CredentialSpec, SENSITIVITIES};
use crate::creds::{Broker, CredsError};
use crate::policy::{
    Access, AccessContext, Action, ElevationFacts, PolicyEngine, Principal, Resource, Source,
};
use crate::secrets::spec::SecretSpec;
use crate::store::{CredentialLease, EntryRecord, LeaseFilter, LeaseState, Store, StoreError};
use crate::visibility::Visibility;

/// One live credential of a principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposure {
    pub lease_id: String,
    pub credential: String,
    pub sensitivity: String,
    pub remaining_seconds: i64,
    pub elevation_id: String,
}

/// What one principal reaches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reach {
    pub principal: String,
    /// `workload` or `operator`.
    pub kind: &'static str,
    /// Entry ids whose X509-SVID it may have.
    pub svids: Vec<String>,
    pub secrets: Vec<String>,
    pub credentials: Vec<String>,
    /// Credentials it may ask an elevation for (and does not hold standing).
    pub eligible: Vec<String>,
    pub exposure: Vec<Exposure>,
}

impl Reach {
    pub fn zero_standing_privilege(&self) -> bool {
        self.secrets.is_empty() && self.credentials.is_empty()
    }

    pub fn exposure_seconds(&self) -> i64 {
        self.exposure.iter().map(|e| e.remaining_seconds).sum()
    }

    /// Remaining seconds weighted 1, 2, 4, 8 from low to critical.
    pub fn weighted_exposure(&self) -> i64 {
        self.exposure
            .iter()
            .map(|e| e.remaining_seconds * weight(&e.sensitivity))
            .sum()
    }
}

fn weight(sensitivity: &str) -> i64 {
    SENSITIVITIES
        .iter()
        .position(|s| *s == sensitivity)
        .map_or(2, |i| 1 << i)
}

/// The fleet's reach, sorted by weighted exposure (largest first), then by name.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub principals: Vec<Reach>,
    pub notes: Vec<String>,
    pub decisions: u64,
    pub elapsed_ms: i64,
}

impl Report {
    pub fn zero_standing(&self) -> usize {
        self.principals
            .iter()
            .filter(|r| r.zero_standing_privilege())
            .count()
    }

    /// Live exposure of the whole fleet, in seconds, by sensitivity.
    pub fn exposure_by_sensitivity(&self) -> BTreeMap<String, i64> {
        let mut by: BTreeMap<String, i64> =
            SENSITIVITIES.iter().map(|s| (s.to_string(), 0)).collect();
        for exposure in self.principals.iter().flat_map(|r| &r.exposure) {
            *by.entry(exposure.sensitivity.clone()).or_default() += exposure.remaining_seconds;
        }
        by
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlastError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Credentials(#[from] CredsError),
}

pub struct BlastRadius {
    view: Visibility,
    broker: Arc<Broker>,
    store: Store,
    policy: Arc<PolicyEngine>,
    clock: Arc<dyn Clock>,
    ai_agent_set: String,
}

/// Everything one report decides over, read once.
struct Inputs {
    entries: Vec<Arc<EntryRecord>>,
    secrets: Arc<[SecretSpec]>,
    credentials: Vec<Arc<CredentialSpec>>,
    leases: Vec<CredentialLease>,
    requesters: Vec<String>,
}

/// A workload as the report decides for it: once per agent that serves it.
struct Served {
    /// (agent, selectors of its entries there, their sets).
    agents: Vec<(String, Vec<String>, Vec<String>)>,
    entries: Vec<Arc<EntryRecord>>,
}

impl BlastRadius {
    pub fn new(
        view: Visibility,
        broker: Arc<Broker>,
        store: Store,
        policy: Arc<PolicyEngine>,
        clock: Arc<dyn Clock>,
        ai_agent_set: String,
    ) -> Self {
        Self {
            view,
            broker,
            store,
            policy,
            clock,
            ai_agent_set,
        }
    }

    async fn inputs(&self) -> Result<Inputs, BlastError> {
        let mut entries: Vec<_> = self.view.all_entries().values().cloned().collect();
        entries.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id).then(a.id.cmp(&b.id)));
        let requesters = self
            .store
            .list_elevations(None, None, 100_000)
            .await?
            .into_iter()
            .map(|e| e.requester)
            .collect();
        Ok(Inputs {
            entries,
            secrets: self.view.secret_definitions(),
            credentials: self.broker.specs().await?,
            leases: self
                .broker
                .leases(&LeaseFilter::default())
                .await?
                .into_iter()
                .filter(|l| matches!(l.state, LeaseState::Active | LeaseState::Issuing))
                .collect(),
            requesters,
        })
    }

    /// The reach of `principal` (a SPIFFE ID or `uid:N`), or of every principal Mayfly
    /// knows of (entries, grants, leases, elevation requesters) when `None`.
    pub async fn report(&self, principal: Option<&str>) -> Result<Report, BlastError> {
        let started = Instant::now();
        if let Some(p) = principal {
            check_principal(p)?;
        }
        let inputs = self.inputs().await?;
        let now = unix(self.clock.now());
        let active = self.policy.current();
        let defaults_loaded = active
            .sources
            .iter()
            .any(|s| s.name == DEFAULTS_NAME && s.text == DEFAULTS);
        let mut notes = Vec::new();
        let mut decisions = 0u64;
        let with_eligible = principal.is_some();
        if !with_eligible {
            notes.push(
                "eligible reach is left out of the fleet report: ask for one principal to see it"
                    .to_string(),
            );
        }

        // Who is served where, with what.
        let mut served: HashMap<&str, Served> = HashMap::new();
        for entry in &inputs.entries {
            let s = served.entry(entry.spiffe_id.as_str()).or_insert(Served {
                agents: Vec::new(),
                entries: Vec::new(),
            });
            s.entries.push(entry.clone());
            match s.agents.iter_mut().find(|(a, _, _)| *a == entry.parent_id) {
                Some((_, selectors, sets)) => {
                    selectors.extend(entry.selectors.iter().cloned());
                    sets.extend(entry.sets.iter().cloned());
                }
                None => s.agents.push((
                    entry.parent_id.clone(),
                    entry.selectors.clone(),
                    entry.sets.clone(),
                )),
            }
        }
        for s in served.values_mut() {
            for (_, selectors, sets) in &mut s.agents {
                selectors.sort();
                selectors.dedup();
                sets.sort();
                sets.dedup();
            }
        }

        // Every principal the report covers.
        let mut principals: BTreeSet<String> = BTreeSet::new();
        match principal {
            Some(p) => {
                principals.insert(p.to_string());
            }
            None => {
                principals.extend(inputs.entries.iter().map(|e| e.spiffe_id.clone()));
                principals.extend(inputs.secrets.iter().flat_map(|s| s.grants.iter().cloned()));
                principals.extend(
                    inputs
                        .credentials
                        .iter()
                        .flat_map(|c| c.grants.iter().cloned()),
                );
                principals.extend(inputs.leases.iter().map(|l| l.holder.clone()));
                principals.extend(inputs.requesters.iter().cloned());
            }
        }

        // Candidates from the index, per action.
        let secret_scopes = active.permit_scopes(Action::ReadSecret);
        let credential_scopes = active.permit_scopes(Action::ObtainCredential);
        let eligible_scopes = active.permit_scopes(Action::RequestElevation);
        let secret_plan = Plan::new(
            &secret_scopes,
            defaults_loaded.then_some("mayfly-default-secret"),
            "Mayfly::SecretSet",
            "Mayfly::Secret",
            inputs
                .secrets
                .iter()
                .map(|s| (s.name.as_str(), &s.sets[..], &s.grants[..])),
        );
        let credential_plan = Plan::new(
            &credential_scopes,
            defaults_loaded.then_some("mayfly-default-credential"),
            "Mayfly::CredentialSet",
            "Mayfly::Credential",
            inputs
                .credentials
                .iter()
                .map(|c| (c.name.as_str(), &c.sets[..], &c.grants[..])),
        );
        let eligible_plan = Plan::new(
            &eligible_scopes,
            None,
            "Mayfly::CredentialSet",
            "Mayfly::Credential",
            inputs
                .credentials
                .iter()
                .map(|c| (c.name.as_str(), &c.sets[..], &c.grants[..])),
        );
        for (plan, what) in [
            (&secret_plan, "read_secret"),
            (&credential_plan, "obtain_credential"),
            (&eligible_plan, "request_elevation"),
        ] {
            if !plan.broad.is_empty() && (with_eligible || what != "request_elevation") {
                notes.push(format!(
                    "{what}: permit {} names no principal or resource, so every pair was decided",
                    plan.broad.join(", ")
                ));
            }
        }

        let sensitivity: HashMap<&str, &str> = inputs
            .credentials
            .iter()
            .map(|c| (c.name.as_str(), c.sensitivity.as_str()))
            .collect();
        let mut exposures: HashMap<&str, Vec<Exposure>> = HashMap::new();
        for lease in &inputs.leases {
            if lease.expires_at <= now {
                continue;
            }
            exposures
                .entry(lease.holder.as_str())
                .or_default()
                .push(Exposure {
                    lease_id: lease.id.clone(),
                    credential: lease.credential.clone(),
                    sensitivity: sensitivity
                        .get(lease.credential.as_str())
                        .unwrap_or(&"medium")
                        .to_string(),
                    remaining_seconds: lease.expires_at - now,
                    elevation_id: lease.elevation_id.clone(),
                });
        }

        let mut reaches = Vec::with_capacity(principals.len());
        let unserved = Served {
            agents: vec![(String::new(), Vec::new(), Vec::new())],
            entries: Vec::new(),
        };
        for name in &principals {
            let operator = name.starts_with("uid:");
            let mut reach = Reach {
                principal: name.clone(),
                kind: if operator { "operator" } else { "workload" },
                exposure: exposures.remove(name.as_str()).unwrap_or_default(),
                ..Default::default()
            };
            if operator {
                let uid: u32 = name[4..].parse().unwrap_or(u32::MAX);
                let principal = Principal::Operator { uid, name: "" };
                let candidates = if with_eligible {
                    eligible_plan.candidates(name, "Mayfly::Operator")
                } else {
                    Vec::new()
                };
                for index in candidates {
                    let spec = &inputs.credentials[index];
                    decisions += 1;
                    let facts = ElevationFacts {
                        requester: name,
                        requester_kind: "operator",
                        reason: "(blast radius)",
                        ticket: "(any)",
                        ..Default::default()
                    };
                    if self.decide(
                        principal,
                        Action::RequestElevation,
                        spec.policy_resource(),
                        "",
                        &[],
                        Some(facts),
                    ) {
                        reach.eligible.push(spec.name.clone());
                    }
                }
            } else {
                let s = served.get(name.as_str()).unwrap_or(&unserved);
                let principal = Principal::Workload { spiffe_id: name };
                for entry in &s.entries {
                    decisions += 1;
                    if self.decide(
                        principal,
                        Action::SignX509Svid,
                        Resource::Entry(crate::policy::entry_facts(entry)),
                        &entry.parent_id,
                        &entry.selectors,
                        None,
                    ) {
                        reach.svids.push(entry.id.clone());
                    }
                }
                for index in secret_plan.candidates(name, "Mayfly::Workload") {
                    let spec = &inputs.secrets[index];
                    let resource = Resource::Secret {
                        name: &spec.name,
                        grants: &spec.grants,
                        sets: &spec.sets,
                    };
                    let granted = s.agents.iter().any(|(agent, selectors, _)| {
                        decisions += 1;
                        self.decide(
                            principal,
                            Action::ReadSecret,
                            resource,
                            agent,
                            selectors,
                            None,
                        )
                    });
                    if granted {
                        reach.secrets.push(spec.name.clone());
                    }
                }
                for index in credential_plan.candidates(name, "Mayfly::Workload") {
                    let spec = &inputs.credentials[index];
                    let granted = s.agents.iter().any(|(agent, selectors, _)| {
                        decisions += 1;
                        self.decide(
                            principal,
                            Action::ObtainCredential,
                            spec.policy_resource(),
                            agent,
                            selectors,
                            None,
                        )
                    });
                    if granted {
                        reach.credentials.push(spec.name.clone());
                    }
                }
                let candidates = if with_eligible {
                    eligible_plan.candidates(name, "Mayfly::Workload")
                } else {
                    Vec::new()
                };
                for index in candidates {
                    let spec = &inputs.credentials[index];
                    if reach.credentials.contains(&spec.name) {
                        continue;
                    }
                    let eligible = s.agents.iter().any(|(agent, selectors, sets)| {
                        decisions += 1;
                        let facts = ElevationFacts {
                            requester: name,
                            requester_kind: if sets.contains(&self.ai_agent_set) {
                                "ai_agent"
                            } else {
                                "workload"
                            },
                            reason: "(blast radius)",
                            ticket: "(any)",
                            ..Default::default()
                        };
                        self.decide(
                            principal,
                            Action::RequestElevation,
                            spec.policy_resource(),
                            agent,
                            selectors,
                            Some(facts),
                        )
                    });
                    if eligible {
                        reach.eligible.push(spec.name.clone());
                    }
                }
            }
            reaches.push(reach);
        }
        reaches.sort_by(|a, b| {
            b.weighted_exposure()
                .cmp(&a.weighted_exposure())
                .then_with(|| a.principal.cmp(&b.principal))
        });
        Ok(Report {
            principals: reaches,
            notes,
            decisions,
            elapsed_ms: started.elapsed().as_millis() as i64,
        })
    }

    /// One decision as a request would be decided (shadow mode counts as granted, as the
    /// request would be served).
    fn decide(
        &self,
        principal: Principal<'_>,
        action: Action,
        resource: Resource<'_>,
        node: &str,
        selectors: &[String],
        elevation: Option<ElevationFacts<'_>>,
    ) -> bool {
        self.policy
            .decide(&Access {
                principal,
                action,
                resource,
                context: AccessContext {
                    node,
                    selectors,
                    ttl_seconds: if elevation.is_some() { 60 } else { 0 },
                    source: Source::NodeApi,
                    method: "BlastRadius",
                    elevation,
                },
            })
            .granted()
    }
}

fn check_principal(p: &str) -> Result<(), BlastError> {
    if let Some(uid) = p.strip_prefix("uid:") {
        return uid
            .parse::<u32>()
            .map(|_| ())
            .map_err(|_| BlastError::Invalid(format!("principal `{p}`: uid:N takes a number")));
    }
    mayfly_common::SpiffeId::parse(p)
        .map(|_| ())
        .map_err(|e| BlastError::Invalid(format!("principal `{p}`: a SPIFFE ID or uid:N ({e})")))
}

/// Which resources of one kind a principal's permits can reach, from the index.
struct Plan {
    /// Permits that name no principal or resource (besides the built-in grant permit):
    /// every resource is a candidate for everyone.
    broad: Vec<String>,
    /// Whether the built-in grant permit is in force (grants are candidates).
    by_grants: bool,
    /// Resources a permit names (or names a set of): candidates for every principal.
    open: Vec<usize>,
    /// By grantee: the resources granting it.
    granted: HashMap<String, Vec<usize>>,
    /// Principals (type, id) a permit names: every resource is a candidate for them.
    named: BTreeSet<(String, String)>,
    count: usize,
}

impl Plan {
    fn new<'a>(
        scopes: &PermitScopes,
        built_in: Option<&str>,
        set_type: &str,
        resource_type: &str,
        resources: impl Iterator<Item = (&'a str, &'a [String], &'a [String])>,
    ) -> Self {
        let by_grants = built_in.is_some_and(|id| scopes.general.iter().any(|g| g == id));
        let broad: Vec<String> = scopes
            .general
            .iter()
            .filter(|g| Some(g.as_str()) != built_in)
            .cloned()
            .collect();
        let named_resources: BTreeSet<(&str, &str)> = scopes
            .resources
            .iter()
            .map(|(t, id)| (t.as_str(), id.as_str()))
            .collect();
        let mut open = Vec::new();
        let mut granted: HashMap<String, Vec<usize>> = HashMap::new();
        let mut count = 0;
        for (index, (name, sets, grants)) in resources.enumerate() {
            count += 1;
            if named_resources.contains(&(resource_type, name))
                || sets
                    .iter()
                    .any(|s| named_resources.contains(&(set_type, s.as_str())))
            {
                open.push(index);
            }
            if by_grants {
                for grant in grants {
                    granted.entry(grant.clone()).or_default().push(index);
                }
            }
        }
        Self {
            broad,
            by_grants,
            open,
            granted,
            named: scopes.principals.iter().cloned().collect(),
            count,
        }
    }

    /// The resources to decide for `principal` (of Cedar type `kind`), each once, in order.
    fn candidates(&self, principal: &str, kind: &str) -> Vec<usize> {
        if !self.broad.is_empty()
            || self
                .named
                .contains(&(kind.to_string(), principal.to_string()))
        {
            return (0..self.count).collect();
        }
        let mut out: Vec<usize> = self.open.clone();
        if self.by_grants
            && let Some(granted) = self.granted.get(principal)
        {
            out.extend(granted);
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

//! Policy decision latency: the daemon's own `PolicyEngine` with a generated set of 1,000
//! policies (audience forbids, per-workload credential permits, per-workload signing
//! forbids with a selector condition, time windows on secret sets) beside the built-in
//! ones, deciding requests about 10,000 entries, 1,000 workloads' credentials and 1,000
//! audiences, one at a time on one core; then the same with a quarter of them written
//! without a scope (`when { context.node == … }`), which every request of their action
//! must evaluate. The scoped set is what the signing run with policies loads.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, ensure};
use serde::Serialize;

use mayfly_common::clock::SystemClock;
use mayfly_daemon::policy::{
    Access, AccessContext, Action, EntryFacts, PolicyConfig, PolicyEngine, Principal, Resource,
    Source,
};

pub struct Options {
    pub policies: usize,
    /// Of `policies`, how many of the signing forbids name no principal in their scope.
    pub unscoped: usize,
    pub entities: usize,
    pub decisions: usize,
}

#[derive(Serialize, Debug)]
pub struct DecideResult {
    pub policies: usize,
    pub entities: usize,
    pub decisions: usize,
    pub load_ms: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub denied: usize,
    /// The same requests against the built-in policies alone.
    pub defaults_p50_us: f64,
    pub defaults_p99_us: f64,
    /// The same requests with `unscoped` of the policies written without a scope.
    pub unscoped: usize,
    pub unscoped_p50_us: f64,
    pub unscoped_p99_us: f64,
}

/// Writes `count` generated policies into `dir` as `bench.cedar`; the first `unscoped`
/// signing forbids name the node in a condition instead of the workload in their scope.
pub fn generate(dir: &Path, count: usize, unscoped: usize) -> Result<()> {
    let mut text = String::new();
    for i in 0..count {
        let policy = match i % 4 {
            2 if i / 4 < unscoped => format!(
                "@id(\"node-{i}\")\nforbid(principal, action == Mayfly::Action::\"sign_x509_svid\", resource)\nwhen {{ context.node == \"spiffe://example.org/node/q{i}\" && context.selectors.contains(\"unix:uid:{i}\") }};\n"
            ),
            0 => format!(
                "@id(\"aud-{i}\")\nforbid(principal, action == Mayfly::Action::\"mint_jwt_svid\", resource == Mayfly::Audience::\"svc-{i}\");\n"
            ),
            1 => format!(
                "@id(\"cred-{i}\")\npermit(principal == Mayfly::Workload::\"spiffe://example.org/w/{i}\", action == Mayfly::Action::\"obtain_credential\", resource == Mayfly::Credential::\"db-{}\");\n",
                i % 100
            ),
            2 => format!(
                "@id(\"workload-{i}\")\nforbid(principal == Mayfly::Workload::\"spiffe://example.org/w/{}\", action == Mayfly::Action::\"sign_x509_svid\", resource)\nwhen {{ context.selectors.contains(\"unix:uid:{i}\") }};\n",
                i % 1000
            ),
            _ => format!(
                "@id(\"hours-{i}\")\nforbid(principal, action == Mayfly::Action::\"read_secret\", resource in Mayfly::SecretSet::\"set-{i}\")\nunless {{ context.time.toTime() >= duration(\"1h\") && context.time.toTime() < duration(\"23h\") }};\n"
            ),
        };
        text.push_str(&policy);
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("bench.cedar"), text)?;
    Ok(())
}

/// Nearest-rank percentile of nanosecond samples, in microseconds.
fn percentile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

struct Workload {
    spiffe_id: String,
    entry_id: String,
    parent: String,
    selectors: Vec<String>,
}

fn workloads(n: usize) -> Vec<Workload> {
    (0..n)
        .map(|i| Workload {
            spiffe_id: format!("spiffe://example.org/w/{}", i % 1000),
            entry_id: format!("entry-{i}"),
            parent: format!("spiffe://example.org/node/q{}", i % 1000),
            selectors: vec![format!("unix:uid:{}", i % 2000)],
        })
        .collect()
}

/// Decides `decisions` requests cycling through signing, minting and credential requests
/// about `entities` entries; returns the sorted latencies (ns) and how many were denied.
fn measure(engine: &PolicyEngine, entities: &[Workload], decisions: usize) -> (Vec<u64>, usize) {
    let grants: Vec<String> = Vec::new();
    let sets: Vec<String> = Vec::new();
    let names: Vec<String> = (0..100).map(|i| format!("db-{i}")).collect();
    let audiences: Vec<String> = (0..1000).map(|i| format!("svc-{i}")).collect();
    let mut samples = Vec::with_capacity(decisions);
    let mut denied = 0;
    for n in 0..decisions {
        let w = &entities[(n * 7919) % entities.len()];
        let context = AccessContext {
            node: &w.parent,
            selectors: &w.selectors,
            ttl_seconds: 3600,
            source: Source::NodeApi,
            method: "bench",
            elevation: None,
        };
        let (action, resource) = match n % 3 {
            0 => (
                Action::SignX509Svid,
                Resource::Entry(EntryFacts {
                    id: &w.entry_id,
                    spiffe_id: &w.spiffe_id,
                    parent: &w.parent,
                    selectors: &w.selectors,
                    hint: "",
                    sets: &[],
                }),
            ),
            1 => (
                Action::MintJwtSvid,
                Resource::Audience(&audiences[(n * 31) % audiences.len()]),
            ),
            _ => (
                Action::ObtainCredential,
                Resource::Credential {
                    name: &names[n % names.len()],
                    kind: "postgres_dynamic",
                    grants: &grants,
                    sets: &sets,
                    max_ttl_seconds: 86_400,
                },
            ),
        };
        let access = Access {
            principal: Principal::Workload {
                spiffe_id: &w.spiffe_id,
            },
            action,
            resource,
            context,
        };
        let started = Instant::now();
        let decision = engine.decide(&access);
        samples.push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
        if !decision.allowed {
            denied += 1;
        }
    }
    samples.sort_unstable();
    (samples, denied)
}

/// Loads `policies` generated policies (`unscoped` of them without a scope) and decides.
fn load_and_measure(
    opts: &Options,
    unscoped: usize,
    entities: &[Workload],
) -> Result<(f64, usize, Vec<u64>, usize)> {
    let dir = tempfile::tempdir()?;
    generate(dir.path(), opts.policies, unscoped)?;
    let started = Instant::now();
    let engine = PolicyEngine::load(
        PolicyConfig {
            dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        },
        Arc::new(SystemClock),
    )?;
    let load_ms = started.elapsed().as_secs_f64() * 1000.0;
    let count = engine.current().policy_count();
    ensure!(
        count >= opts.policies,
        "the generated policies did not all load"
    );
    // Warm up allocator and caches, then measure.
    measure(&engine, entities, 1000.min(opts.decisions));
    let (samples, denied) = measure(&engine, entities, opts.decisions);
    ensure!(
        denied > 0,
        "the generated forbids never applied: the bench is not deciding"
    );
    Ok((load_ms, count, samples, denied))
}

pub fn run(opts: &Options) -> Result<DecideResult> {
    let entities = workloads(opts.entities);
    let (load_ms, count, samples, denied) = load_and_measure(opts, 0, &entities)?;
    let (_, _, unscoped, _) = load_and_measure(opts, opts.unscoped, &entities)?;
    let defaults = PolicyEngine::load(PolicyConfig::default(), Arc::new(SystemClock))?;
    let (baseline, _) = measure(&defaults, &entities, opts.decisions);
    Ok(DecideResult {
        policies: count,
        entities: opts.entities,
        decisions: opts.decisions,
        load_ms,
        p50_us: percentile_us(&samples, 50.0),
        p99_us: percentile_us(&samples, 99.0),
        max_us: percentile_us(&samples, 100.0),
        denied,
        defaults_p50_us: percentile_us(&baseline, 50.0),
        defaults_p99_us: percentile_us(&baseline, 99.0),
        unscoped: opts.unscoped,
        unscoped_p50_us: percentile_us(&unscoped, 50.0),
        unscoped_p99_us: percentile_us(&unscoped, 99.0),
    })
}

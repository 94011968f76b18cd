//! The TTL-bound credential bench, against a real mayflyd, PostgreSQL and OpenBao's
//! database engine on the same machine: a fresh dynamic PostgreSQL user through Mayfly's
//! `postgres_dynamic` and through `vault_dynamic` (OpenBao), beside OpenBao's own
//! `database/creds` answering directly; revoke-to-unusable (the operator's revoke until a
//! login as the user fails); and a bulk revocation of many live leases at the backend.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use sqlx::{ConnectOptions as _, Connection as _};

use mayfly_common::TrustDomain;
use mayfly_proto::v1;

use super::http1::{Conn, LoopbackAddr};
use super::{BenchAgent, Latencies, admin_and_bundle};

pub struct Options {
    pub node_addr: String,
    pub admin_socket: PathBuf,
    pub trust_domain: String,
    /// An admin login to the PostgreSQL the users are made on (`postgres://…/db`).
    pub pg_url: String,
    /// OpenBao with a database engine at `database/`, role `bench`, on the same PostgreSQL.
    pub vault_url: String,
    pub vault_token: String,
    pub count: usize,
    pub revocations: usize,
    pub bulk: usize,
}

#[derive(Serialize, Debug)]
pub struct CredsResult {
    pub count: usize,
    pub mayfly_pg_p50_ms: f64,
    pub mayfly_pg_p99_ms: f64,
    pub mayfly_vault_p50_ms: f64,
    pub mayfly_vault_p99_ms: f64,
    pub openbao_p50_ms: f64,
    pub openbao_p99_ms: f64,
    pub revocations: usize,
    pub revoke_to_unusable_p50_ms: f64,
    pub revoke_to_unusable_max_ms: f64,
    pub bulk: usize,
    pub bulk_issue_seconds: f64,
    pub bulk_revoke_seconds: f64,
    /// Leases of the bulk credential still live after its revocation; must be 0.
    pub bulk_left: usize,
}

const APP: &str = "bench/creds-app";

pub async fn run(opts: &Options) -> Result<CredsResult> {
    ensure!(opts.count > 0, "need a count");
    let trust_domain = TrustDomain::new(&opts.trust_domain)?;
    let (mut admin, bundle) = admin_and_bundle(&opts.admin_socket).await?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let app = format!("spiffe://{trust_domain}/{APP}-{run_id}");
    let agent_id = format!("spiffe://{trust_domain}/node/creds-{run_id}");
    admin
        .create_entry(v1::CreateEntryRequest {
            spiffe_id: app.clone(),
            parent_id: agent_id.clone(),
            selectors: vec!["unix:uid:0".into()],
            ..Default::default()
        })
        .await?;
    let agent = BenchAgent::attest(
        &mut admin,
        &opts.node_addr,
        &trust_domain,
        &bundle,
        &agent_id,
    )
    .await?;
    let mut node = agent.client().await?;
    let define = |name: &str, backend: String| v1::CreateCredentialRequest {
        definition: format!(
            "name = \"{name}\"\ngrants = [\"{app}\"]\ndefault_ttl = \"10m\"\n[backend]\n{backend}"
        ),
    };
    let pg_backend = format!(
        "kind = \"postgres_dynamic\"\nadmin_url = \"{}\"\n",
        opts.pg_url
    );
    for (name, backend) in [
        ("bench-pg", pg_backend.clone()),
        ("bench-bulk", pg_backend.clone()),
        (
            "bench-vault",
            format!(
                "kind = \"vault_dynamic\"\naddress = \"{}\"\nrole = \"bench\"\ntoken = \"{}\"\n",
                opts.vault_url, opts.vault_token
            ),
        ),
    ] {
        admin
            .create_credential(define(name, backend))
            .await
            .with_context(|| format!("defining {name}"))?;
    }
    let issue = |name: &str| v1::IssueCredentialRequest {
        name: name.into(),
        spiffe_id: app.clone(),
        ttl_seconds: 0,
    };

    // Fresh users, one after another, each a real CREATE ROLE.
    let mut mayfly_pg = Latencies::with_capacity(opts.count);
    let mut mayfly_vault = Latencies::with_capacity(opts.count);
    for _ in 0..opts.count {
        let started = Instant::now();
        node.issue_credential(issue("bench-pg")).await?;
        mayfly_pg.record(started.elapsed());
        let started = Instant::now();
        node.issue_credential(issue("bench-vault")).await?;
        mayfly_vault.record(started.elapsed());
    }
    eprintln!(
        "mayfly-bench: {} users each through Mayfly and Mayfly over OpenBao",
        opts.count
    );

    // OpenBao's own endpoint, on one keep-alive connection.
    let vault = LoopbackAddr::parse(&opts.vault_url)?;
    let token = http::HeaderValue::from_str(&opts.vault_token)?;
    let mut conn = Conn::connect(
        &vault,
        vec![(
            http::header::HeaderName::from_static("x-vault-token"),
            token,
        )],
    )
    .await?;
    let mut openbao = Latencies::with_capacity(opts.count);
    for _ in 0..opts.count {
        let started = Instant::now();
        let (status, _) = conn
            .send(
                http::Method::GET,
                "/v1/database/creds/bench",
                bytes::Bytes::new(),
            )
            .await?;
        ensure!(status.is_success(), "OpenBao answered {status}");
        openbao.record(started.elapsed());
    }
    eprintln!("mayfly-bench: {} users from OpenBao directly", opts.count);

    // Revoke to unusable: until a new login as the user is refused.
    let login_options = |user: &str, password: &str| -> Result<sqlx::postgres::PgConnectOptions> {
        let base: sqlx::postgres::PgConnectOptions = opts.pg_url.parse()?;
        Ok(base.username(user).password(password))
    };
    let mut unusable = Latencies::with_capacity(opts.revocations);
    for _ in 0..opts.revocations {
        let issued = node.issue_credential(issue("bench-pg")).await?.into_inner();
        let options = login_options(&issued.values["username"], &issued.values["password"])?;
        options.connect().await?.close().await?;
        let started = Instant::now();
        admin
            .revoke(v1::RevokeRequest {
                kind: "lease".into(),
                target: issued.lease_id.clone(),
                reason: "bench".into(),
                wait_ms: 1,
            })
            .await?;
        let deadline = started + Duration::from_secs(10);
        loop {
            if options.connect().await.is_err() {
                unusable.record(started.elapsed());
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the user still logs in after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    // Bulk: many live leases, then one `revoke credential`.
    let started = Instant::now();
    let mut issuing = tokio::task::JoinSet::new();
    for _ in 0..opts.bulk {
        let mut node = node.clone();
        let request = issue("bench-bulk");
        issuing.spawn(async move { node.issue_credential(request).await });
        while issuing.len() >= 16 {
            issuing.join_next().await.context("issue task")???;
        }
    }
    while let Some(done) = issuing.join_next().await {
        done??;
    }
    let bulk_issue = started.elapsed();
    eprintln!(
        "mayfly-bench: {} bulk leases live in {:.1} s",
        opts.bulk,
        bulk_issue.as_secs_f64()
    );
    let started = Instant::now();
    admin
        .revoke(v1::RevokeRequest {
            kind: "credential".into(),
            target: "bench-bulk".into(),
            reason: "bench".into(),
            wait_ms: 1,
        })
        .await?;
    let bulk_revoke = started.elapsed();
    let left = admin
        .list_leases(v1::ListLeasesRequest {
            credential: "bench-bulk".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .leases
        .len();
    // Leave nothing behind on the PostgreSQL: Mayfly's leases, then OpenBao's own.
    for name in ["bench-pg", "bench-vault"] {
        admin
            .revoke(v1::RevokeRequest {
                kind: "credential".into(),
                target: name.into(),
                reason: "bench cleanup".into(),
                wait_ms: 1,
            })
            .await?;
    }
    let (status, _) = conn
        .send(
            http::Method::PUT,
            "/v1/sys/leases/revoke-prefix/database/creds/bench",
            bytes::Bytes::new(),
        )
        .await?;
    ensure!(
        status.is_success(),
        "OpenBao revoke-prefix answered {status}"
    );
    Ok(CredsResult {
        count: opts.count,
        mayfly_pg_p50_ms: mayfly_pg.percentile_ms(50.0),
        mayfly_pg_p99_ms: mayfly_pg.percentile_ms(99.0),
        mayfly_vault_p50_ms: mayfly_vault.percentile_ms(50.0),
        mayfly_vault_p99_ms: mayfly_vault.percentile_ms(99.0),
        openbao_p50_ms: openbao.percentile_ms(50.0),
        openbao_p99_ms: openbao.percentile_ms(99.0),
        revocations: opts.revocations,
        revoke_to_unusable_p50_ms: unusable.percentile_ms(50.0),
        revoke_to_unusable_max_ms: unusable.percentile_ms(100.0),
        bulk: opts.bulk,
        bulk_issue_seconds: bulk_issue.as_secs_f64(),
        bulk_revoke_seconds: bulk_revoke.as_secs_f64(),
        bulk_left: left,
    })
}

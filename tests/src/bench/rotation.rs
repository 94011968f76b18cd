//! The rotation benchmarks: how long from a schedule firing to the new value being current
//! (PostgreSQL target), and how long 1,000 secrets due in the same second take to promote.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use serde::Serialize;

use mayfly_daemon::cli::{Connection, OutputFormat, operator};
use mayfly_proto::v1::{self};

use super::Latencies;

pub struct Options {
    pub admin_socket: PathBuf,
    pub rotations: usize,
    pub secrets: usize,
    pub pg_url: String,
}

#[derive(Serialize, Debug)]
pub struct RotationResult {
    pub rotations: usize,
    pub fire_to_promoted_p50_ms: f64,
    pub fire_to_promoted_p99_ms: f64,
    pub fire_to_promoted_max_ms: f64,
    pub secrets: usize,
    pub promoted: usize,
    pub missed: usize,
    pub all_promoted_after_ms: f64,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub async fn run(opts: &Options) -> Result<RotationResult> {
    let mut admin = operator::connect(&Connection {
        socket: Some(opts.admin_socket.clone()),
        config: None,
        output: OutputFormat::Json,
    })
    .await?;

    // 1. Schedule fires -> new value current, PostgreSQL target, every 2 s.
    let role = crate::services::pg_role("mayfly_bench").await?;
    let definition = format!(
        "name = \"bench-pg\"\nschedule = \"*/2 * * * * *\"\nusers = [\"{role}\"]\n[store]\nkind = \"local\"\n\
         [target]\nkind = \"postgres\"\nadmin_url = \"{}\"\n",
        opts.pg_url
    );
    admin
        .create_secret(v1::CreateSecretRequest {
            definition,
            ..Default::default()
        })
        .await?;
    let mut latencies = Latencies::with_capacity(opts.rotations);
    let mut last_version = String::new();
    let deadline = Instant::now() + Duration::from_secs(opts.rotations as u64 * 2 + 30);
    let mut first = true;
    while latencies.len() < opts.rotations {
        ensure!(Instant::now() < deadline, "rotations stalled");
        let seen = match admin
            .get_secret_value(v1::SecretRequest {
                name: "bench-pg".into(),
            })
            .await
        {
            Ok(v) => v.into_inner().version,
            Err(_) => String::new(),
        };
        let at = now_ms();
        if !seen.is_empty() && seen != last_version {
            if !first {
                // The schedule fires on even seconds; the change belongs to the latest one.
                let fired = at - at.rem_euclid(2000);
                latencies.record(Duration::from_millis((at - fired).max(0) as u64));
            }
            first = false;
            last_version = seen;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    admin
        .delete_secret(v1::SecretRequest {
            name: "bench-pg".into(),
        })
        .await?;
    crate::services::drop_pg_role(&role).await;

    // 2. `secrets` secrets due in the same second, local store, no target.
    let fire = SystemTime::now() + Duration::from_secs(20 + opts.secrets as u64 / 100);
    let fire_s = fire.duration_since(UNIX_EPOCH)?.as_secs();
    let (sec, min, hour) = (fire_s % 60, (fire_s / 60) % 60, (fire_s / 3600) % 24);
    let prefix = format!("bulk-{:08x}", rand::random::<u32>());
    for i in 0..opts.secrets {
        admin
            .create_secret(v1::CreateSecretRequest {
                definition: format!(
                    "name = \"{prefix}-{i}\"\nschedule = \"{sec} {min} {hour} * * *\"\n[store]\nkind = \"local\"\n[target]\nkind = \"none\"\n"
                ),
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating secret {i}"))?;
    }
    let fire_ms = fire_s as i64 * 1000;
    ensure!(
        now_ms() < fire_ms,
        "creating {} secrets took past their fire time",
        opts.secrets
    );
    let deadline = Instant::now() + Duration::from_secs(120 + opts.secrets as u64 / 10);
    let (promoted, done_at) = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let list = admin
            .list_secrets(v1::ListSecretsRequest {})
            .await?
            .into_inner()
            .secrets;
        let promoted = list
            .iter()
            .filter(|s| s.name.starts_with(&prefix) && s.last_outcome.starts_with("promoted"))
            .count();
        if promoted == opts.secrets {
            let last = list
                .iter()
                .filter(|s| s.name.starts_with(&prefix))
                .map(|s| s.last_run_at)
                .max()
                .unwrap_or(0);
            break (promoted, last * 1000);
        }
        if Instant::now() > deadline {
            break (promoted, now_ms());
        }
    };
    Ok(RotationResult {
        rotations: opts.rotations,
        fire_to_promoted_p50_ms: latencies.percentile_ms(50.0),
        fire_to_promoted_p99_ms: latencies.percentile_ms(99.0),
        fire_to_promoted_max_ms: latencies.percentile_ms(100.0),
        secrets: opts.secrets,
        promoted,
        missed: opts.secrets - promoted,
        all_promoted_after_ms: (done_at - fire_ms).max(0) as f64,
    })
}

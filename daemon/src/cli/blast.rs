//! `mayflyd blast-radius PRINCIPAL | --all`: what a principal can reach standing, what it
//! is eligible for, and what it holds now; or the fleet's table sorted by exposure.

use std::time::Duration;

use serde_json::{Value, json};

use mayfly_proto::v1;

use super::operator::{call, connect};
use super::output::{pretty, table};
use super::{Connection, OutputFormat};

pub async fn blast_radius(
    principal: Option<String>,
    all: bool,
    conn: &Connection,
) -> anyhow::Result<String> {
    if principal.is_none() && !all {
        anyhow::bail!("name a principal (a SPIFFE ID or uid:N), or ask for --all");
    }
    let mut client = connect(conn).await?;
    let report = call(
        client
            .blast_radius(v1::BlastRadiusRequest {
                principal: principal.unwrap_or_default(),
                all,
            })
            .await,
    )?;
    Ok(match conn.output {
        OutputFormat::Json => pretty(&report_json(&report, all)),
        OutputFormat::Table if all => fleet(&report),
        OutputFormat::Table => one(&report),
    })
}

fn reach_json(r: &v1::Reach) -> Value {
    json!({
        "principal": r.principal,
        "kind": r.kind,
        "standing": { "svids": r.svids, "secrets": r.secrets, "credentials": r.credentials },
        "eligible": { "credentials": r.eligible },
        "exposure": r.exposure.iter().map(|e| json!({
            "lease_id": e.lease_id,
            "credential": e.credential,
            "sensitivity": e.sensitivity,
            "remaining_seconds": e.remaining_seconds,
            "elevation_id": e.elevation_id,
        })).collect::<Vec<_>>(),
        "exposure_seconds": r.exposure_seconds,
        "weighted_exposure": r.weighted_exposure,
        "zero_standing_privilege": r.zero_standing_privilege,
    })
}

fn report_json(report: &v1::BlastRadiusReport, all: bool) -> Value {
    if !all && let [only] = report.principals.as_slice() {
        return reach_json(only);
    }
    let total = report.principals.len();
    json!({
        "principals": report.principals.iter().map(reach_json).collect::<Vec<_>>(),
        "total": total,
        "zero_standing": report.zero_standing,
        "zero_standing_share": share(report.zero_standing, total),
        "notes": report.notes,
        "decisions": report.decisions,
        "elapsed_ms": report.elapsed_ms,
    })
}

fn share(part: i64, total: usize) -> f64 {
    if total == 0 {
        0.0
    } else {
        part as f64 / total as f64
    }
}

fn seconds(s: i64) -> String {
    humantime::format_duration(Duration::from_secs(s.max(0) as u64)).to_string()
}

fn one(report: &v1::BlastRadiusReport) -> String {
    let Some(r) = report.principals.first() else {
        return "no such principal\n".into();
    };
    let exposure = r
        .exposure
        .iter()
        .map(|e| {
            format!(
                "{} {} ({}, {} left{})",
                e.credential,
                e.lease_id,
                e.sensitivity,
                seconds(e.remaining_seconds),
                if e.elevation_id.is_empty() {
                    String::new()
                } else {
                    format!(", elevation {}", e.elevation_id)
                }
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let rows = vec![
        vec!["Principal".into(), format!("{} ({})", r.principal, r.kind)],
        vec![
            "Zero standing privilege".into(),
            if r.zero_standing_privilege {
                "yes"
            } else {
                "no"
            }
            .into(),
        ],
        vec!["Standing SVIDs (entries)".into(), r.svids.join(", ")],
        vec!["Standing secrets".into(), r.secrets.join(", ")],
        vec!["Standing credentials".into(), r.credentials.join(", ")],
        vec!["Eligible by elevation".into(), r.eligible.join(", ")],
        vec!["Live exposure".into(), exposure],
        vec![
            "Exposure".into(),
            format!(
                "{} (weighted {})",
                seconds(r.exposure_seconds),
                r.weighted_exposure
            ),
        ],
    ];
    table(&["FIELD", "VALUE"], &rows)
}

fn fleet(report: &v1::BlastRadiusReport) -> String {
    let mut out = table(
        &[
            "PRINCIPAL",
            "KIND",
            "ZSP",
            "SECRETS",
            "CREDENTIALS",
            "ELIGIBLE",
            "LIVE",
            "EXPOSURE",
            "WEIGHTED",
        ],
        &report
            .principals
            .iter()
            .map(|r| {
                vec![
                    r.principal.clone(),
                    r.kind.clone(),
                    if r.zero_standing_privilege {
                        "yes"
                    } else {
                        "no"
                    }
                    .into(),
                    r.secrets.len().to_string(),
                    r.credentials.len().to_string(),
                    r.eligible.len().to_string(),
                    r.exposure.len().to_string(),
                    seconds(r.exposure_seconds),
                    r.weighted_exposure.to_string(),
                ]
            })
            .collect::<Vec<_>>(),
    );
    let total = report.principals.len();
    out.push_str(&format!(
        "\n{} of {} principals hold zero standing privilege ({:.0}%); {} decisions in {} ms\n",
        report.zero_standing,
        total,
        100.0 * share(report.zero_standing, total),
        report.decisions,
        report.elapsed_ms
    ));
    for note in &report.notes {
        out.push_str(&format!("note: {note}\n"));
    }
    out
}

//! Human-readable tables by default, JSON for scripts.

use serde_json::{Value, json};

use mayfly_proto::v1;

use super::OutputFormat;

/// Renders rows as an aligned table; `rows` hold one string per header.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

pub fn when(unix: i64) -> String {
    if unix <= 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix as u64),
    )
    .to_string()
}

pub fn entry_json(e: &v1::Entry) -> Value {
    json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
        "x509_svid_ttl": e.x509_svid_ttl,
        "jwt_svid_ttl": e.jwt_svid_ttl,
        "dns_names": e.dns_names,
        "hint": e.hint,
        "sets": e.sets,
        "revision": e.revision,
        "created_at": e.created_at,
        "updated_at": e.updated_at,
        "expires_at": if e.expires_at == 0 { Value::Null } else { json!(e.expires_at) },
    })
}

pub fn entries(format: OutputFormat, list: &[v1::Entry]) -> String {
    match format {
        OutputFormat::Json => pretty(&Value::Array(list.iter().map(entry_json).collect())),
        OutputFormat::Table => table(
            &[
                "ID",
                "SPIFFE ID",
                "PARENT",
                "SELECTORS",
                "X509 TTL",
                "JWT TTL",
            ],
            &list
                .iter()
                .map(|e| {
                    vec![
                        e.id.clone(),
                        e.spiffe_id.clone(),
                        e.parent_id.clone(),
                        e.selectors
                            .iter()
                            .map(|s| format!("{}:{}", s.r#type, s.value))
                            .collect::<Vec<_>>()
                            .join(","),
                        ttl(e.x509_svid_ttl),
                        ttl(e.jwt_svid_ttl),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
}

pub fn entry(format: OutputFormat, e: &v1::Entry) -> String {
    match format {
        OutputFormat::Json => pretty(&entry_json(e)),
        OutputFormat::Table => {
            let selectors = e
                .selectors
                .iter()
                .map(|s| format!("{}:{}", s.r#type, s.value))
                .collect::<Vec<_>>()
                .join(", ");
            let rows = vec![
                vec!["ID".into(), e.id.clone()],
                vec!["SPIFFE ID".into(), e.spiffe_id.clone()],
                vec!["Parent ID".into(), e.parent_id.clone()],
                vec!["Selectors".into(), selectors],
                vec!["X509-SVID TTL".into(), ttl(e.x509_svid_ttl)],
                vec!["JWT-SVID TTL".into(), ttl(e.jwt_svid_ttl)],
                vec!["DNS names".into(), e.dns_names.join(", ")],
                vec!["Hint".into(), e.hint.clone()],
                vec!["Policy sets".into(), e.sets.join(", ")],
                vec!["Revision".into(), e.revision.to_string()],
                vec!["Created".into(), when(e.created_at)],
                vec!["Updated".into(), when(e.updated_at)],
            ];
            table(&["FIELD", "VALUE"], &rows)
        }
    }
}

/// The results of creating `asked`, one line (or JSON object) each, in order.
pub fn batch_created(
    format: OutputFormat,
    asked: &[v1::CreateEntryRequest],
    results: &[v1::BatchCreateEntryResult],
) -> String {
    let refusal = |r: &v1::BatchCreateEntryResult| {
        format!("{:?}: {}", tonic::Code::from_i32(r.code), r.message)
    };
    match format {
        OutputFormat::Json => pretty(&Value::Array(
            asked
                .iter()
                .zip(results)
                .map(|(asked, r)| match &r.entry {
                    Some(e) => serde_json::json!({ "created": entry_json(e) }),
                    None => serde_json::json!({
                        "spiffe_id": asked.spiffe_id,
                        "parent_id": asked.parent_id,
                        "refused": refusal(r),
                    }),
                })
                .collect(),
        )),
        OutputFormat::Table => {
            let rows: Vec<_> = asked
                .iter()
                .zip(results)
                .enumerate()
                .map(|(i, (asked, r))| match &r.entry {
                    Some(e) => vec![
                        (i + 1).to_string(),
                        e.spiffe_id.clone(),
                        "created".into(),
                        e.id.clone(),
                    ],
                    None => vec![
                        (i + 1).to_string(),
                        asked.spiffe_id.clone(),
                        "refused".into(),
                        refusal(r),
                    ],
                })
                .collect();
            table(&["#", "SPIFFE ID", "RESULT", "ENTRY ID OR REASON"], &rows)
        }
    }
}

pub fn agents(format: OutputFormat, list: &[v1::Agent]) -> String {
    match format {
        OutputFormat::Json => pretty(&Value::Array(list.iter().map(agent_json).collect())),
        OutputFormat::Table => table(
            &["SPIFFE ID", "STATUS", "SERIAL", "ATTESTED", "SVID EXPIRES"],
            &list
                .iter()
                .map(|a| {
                    vec![
                        a.spiffe_id.clone(),
                        a.status.clone(),
                        a.serial.clone(),
                        when(a.attested_at),
                        when(a.svid_expires_at),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
}

pub fn agent_json(a: &v1::Agent) -> Value {
    json!({
        "spiffe_id": a.spiffe_id,
        "status": a.status,
        "serial": a.serial,
        "attested_at": a.attested_at,
        "svid_expires_at": a.svid_expires_at,
        "last_seen": a.last_seen,
    })
}

pub fn ca_slots(format: OutputFormat, slots: &[v1::CaSlot]) -> String {
    match format {
        OutputFormat::Json => pretty(&Value::Array(
            slots
                .iter()
                .map(|s| {
                    json!({
                        "id": s.id,
                        "state": s.state,
                        "subject_key_id": s.subject_key_id,
                        "not_before": s.not_before,
                        "not_after": s.not_after,
                        "jwt_key_id": s.jwt_key_id,
                        "certificate": s.certificate,
                    })
                })
                .collect(),
        )),
        OutputFormat::Table => table(
            &[
                "SLOT",
                "STATE",
                "SUBJECT KEY ID",
                "NOT BEFORE",
                "NOT AFTER",
                "JWT KEY ID",
            ],
            &slots
                .iter()
                .map(|s| {
                    vec![
                        s.id.clone(),
                        s.state.clone(),
                        s.subject_key_id.clone(),
                        when(s.not_before),
                        when(s.not_after),
                        s.jwt_key_id.clone(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
}

pub fn secret_json(s: &v1::SecretSummary) -> Value {
    json!({
        "name": s.name,
        "store": s.store,
        "target": s.target,
        "strategy": s.strategy,
        "schedule": s.schedule,
        "source": s.source,
        "next_run_at_ms": s.next_run_at,
        "last_run_at": s.last_run_at,
        "last_outcome": s.last_outcome,
        "grants": s.grants,
    })
}

pub fn job_json(j: &v1::RotationJob) -> Value {
    json!({
        "token": j.token,
        "state": j.state,
        "username": j.username,
        "trigger": j.trigger,
        "attempts": j.attempts,
        "last_error": j.last_error,
        "created_at": j.created_at,
        "finished_at": j.finished_at,
    })
}

pub fn secrets(format: OutputFormat, list: &[v1::SecretSummary]) -> String {
    match format {
        OutputFormat::Json => pretty(&Value::Array(list.iter().map(secret_json).collect())),
        OutputFormat::Table => table(
            &[
                "NAME",
                "STORE",
                "TARGET",
                "STRATEGY",
                "SCHEDULE",
                "NEXT RUN",
                "LAST OUTCOME",
            ],
            &list
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.store.clone(),
                        s.target.clone(),
                        s.strategy.clone(),
                        s.schedule.clone(),
                        when(s.next_run_at / 1000),
                        s.last_outcome.clone(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
}

pub fn secret_status(format: OutputFormat, status: &v1::SecretStatus) -> String {
    match format {
        OutputFormat::Json => pretty(&json!({
            "secret": status.secret.as_ref().map(secret_json),
            "versions": status.versions.iter().map(|v| json!({
                "id": v.id, "stages": v.stages, "created_at": v.created_at,
            })).collect::<Vec<_>>(),
            "jobs": status.jobs.iter().map(job_json).collect::<Vec<_>>(),
        })),
        OutputFormat::Table => {
            let mut out = secrets(format, &status.secret.iter().cloned().collect::<Vec<_>>());
            out.push_str("\nVERSIONS\n");
            out.push_str(&table(
                &["VERSION", "STAGES", "CREATED"],
                &status
                    .versions
                    .iter()
                    .map(|v| vec![v.id.clone(), v.stages.join(","), when(v.created_at)])
                    .collect::<Vec<_>>(),
            ));
            out.push_str("\nROTATIONS\n");
            out.push_str(&table(
                &[
                    "JOB", "STATE", "USER", "TRIGGER", "ATTEMPTS", "STARTED", "ERROR",
                ],
                &status
                    .jobs
                    .iter()
                    .map(|j| {
                        vec![
                            j.token.clone(),
                            j.state.clone(),
                            j.username.clone(),
                            j.trigger.clone(),
                            j.attempts.to_string(),
                            when(j.created_at),
                            j.last_error.clone(),
                        ]
                    })
                    .collect::<Vec<_>>(),
            ));
            out
        }
    }
}

fn ttl(seconds: i64) -> String {
    if seconds <= 0 {
        "default".into()
    } else {
        humantime::format_duration(std::time::Duration::from_secs(seconds as u64)).to_string()
    }
}

pub fn pretty(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    text.push('\n');
    text
}

fn when_ms(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64),
    )
    .to_string()
}

pub fn revocation_json(r: &v1::RevocationReport) -> Value {
    json!({
        "id": r.id,
        "kind": r.kind,
        "target": r.target,
        "reason": r.reason,
        "actor": r.actor,
        "created_at_ms": r.created_at,
        "serials": r.serials,
        "entry_ids": r.entry_ids,
        "spiffe_ids": r.spiffe_ids,
        "agents_affected": r.agents.len(),
        "acknowledged": r.agents.iter().filter(|a| a.acknowledged).map(|a| &a.agent).collect::<Vec<_>>(),
        "not_acknowledged": r.agents.iter().filter(|a| !a.acknowledged).map(|a| &a.agent).collect::<Vec<_>>(),
        "agents": r.agents.iter().map(|a| json!({
            "agent": a.agent,
            "acknowledged": a.acknowledged,
            "acked_at_ms": a.acked_at,
            "detail": serde_json::from_str::<Value>(&a.detail).unwrap_or(Value::Null),
        })).collect::<Vec<_>>(),
        "elapsed_ms": r.elapsed_ms,
        "notes": r.notes,
    })
}

pub fn revocation_report(format: OutputFormat, r: &v1::RevocationReport) -> String {
    if format == OutputFormat::Json {
        return pretty(&revocation_json(r));
    }
    let acked = r.agents.iter().filter(|a| a.acknowledged).count();
    let missing: Vec<&str> = r
        .agents
        .iter()
        .filter(|a| !a.acknowledged)
        .map(|a| a.agent.as_str())
        .collect();
    let mut out = format!(
        "revocation {} ({} {}): {} agents affected, {} acknowledged, {} not acknowledged, {} ms\n",
        r.id,
        r.kind,
        r.target,
        r.agents.len(),
        acked,
        missing.len(),
        r.elapsed_ms
    );
    out.push_str(&format!("reason: {}\n", r.reason));
    if !r.serials.is_empty() {
        out.push_str(&format!("deny-listed serials: {}\n", r.serials.join(", ")));
    }
    for note in &r.notes {
        out.push_str(&format!("note: {note}\n"));
    }
    for agent in &missing {
        out.push_str(&format!("not acknowledged: {agent}\n"));
    }
    out
}

pub fn revocations(format: OutputFormat, list: &[v1::RevocationReport]) -> String {
    match format {
        OutputFormat::Json => pretty(&Value::Array(list.iter().map(revocation_json).collect())),
        OutputFormat::Table => table(
            &["ID", "KIND", "TARGET", "WHEN", "ACKED", "REASON"],
            &list
                .iter()
                .map(|r| {
                    vec![
                        r.id.clone(),
                        r.kind.clone(),
                        r.target.clone(),
                        when_ms(r.created_at),
                        format!(
                            "{}/{}",
                            r.agents.iter().filter(|a| a.acknowledged).count(),
                            r.agents.len()
                        ),
                        r.reason.clone(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
}

pub fn audit_json(r: &v1::AuditRecord) -> Value {
    json!({
        "seq": r.seq,
        "at_ms": r.at_ms,
        "actor": r.actor,
        "action": r.action,
        "subject": r.subject,
        "scope": r.scope,
        "ttl_secs": r.ttl_secs,
        "reason": r.reason,
        "outcome": r.outcome,
        "detail": r.detail,
        "prev_hash": r.prev_hash,
        "hash": r.hash,
    })
}

pub fn audit_records(format: OutputFormat, list: &[v1::AuditRecord]) -> String {
    match format {
        OutputFormat::Json => pretty(&Value::Array(list.iter().map(audit_json).collect())),
        OutputFormat::Table => table(
            &[
                "SEQ", "TIME", "ACTOR", "ACTION", "SUBJECT", "OUTCOME", "SCOPE", "REASON",
            ],
            &list
                .iter()
                .map(|r| {
                    vec![
                        r.seq.to_string(),
                        when_ms(r.at_ms),
                        r.actor.clone(),
                        r.action.clone(),
                        r.subject.clone(),
                        r.outcome.clone(),
                        r.scope.clone(),
                        r.reason.clone(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let out = table(
            &["A", "LONGER"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(out, "A    LONGER\nxyz  1\nq    22\n");
    }
}

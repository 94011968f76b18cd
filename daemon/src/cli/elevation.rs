//! `mayflyd elevation …`: ask for temporary access, review others' requests, end one's
//! own, and read the record of each. Talks to the daemon's elevation socket, which every
//! local user may reach: the daemon knows the caller by its uid.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use serde_json::{Value, json};
use tonic::transport::Channel;

use mayfly_proto::v1;
use mayfly_proto::v1::elevations_client::ElevationsClient;

use super::operator::call;
use super::output::{pretty, table, when};
use super::{Connection, OutputFormat};
use crate::config::DaemonConfig;

#[derive(Debug, Subcommand)]
pub enum ElevationCommand {
    /// Ask for temporary access to a credential or a secret, for as long as the task
    /// needs. (A workload asks for an entry's identity through its agent.)
    #[command(group(clap::ArgGroup::new("scope").required(true).args(["credential", "secret"])))]
    Request {
        /// The credential definition to obtain while the elevation lasts.
        #[arg(long)]
        credential: Option<String>,
        /// The secret to read while the elevation lasts (rotated when it ends).
        #[arg(long)]
        secret: Option<String>,
        /// How long, e.g. 30m.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Why: what the task is.
        #[arg(long)]
        reason: String,
        /// The ticket the work is tracked under (policies may require one).
        #[arg(long, default_value = "")]
        ticket: String,
        /// Active at once without approval, flagged and to be reviewed afterwards.
        #[arg(long)]
        break_glass: bool,
    },
    /// Elevations you may read, newest first.
    List {
        /// pending, active, rejected, expired, cancelled, ended or elapsed.
        #[arg(long)]
        state: Option<String>,
        /// Only those of this requester (`uid:1000` or a SPIFFE ID).
        #[arg(long)]
        requester: Option<String>,
    },
    /// The whole record: reviews, credentials issued under it, how it ended.
    Show { id: String },
    /// Approve another's pending request.
    Approve {
        id: String,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Deny another's pending request.
    Deny {
        id: String,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// The task is done: end the elevation now and revoke what was issued under it.
    End {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Withdraw your own pending request.
    Cancel {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Review a break-glass elevation after the fact.
    Review {
        id: String,
        #[arg(long)]
        comment: String,
    },
    /// The current value of the secret of your own active elevation (printed: the
    /// secret is rotated when the elevation ends).
    Secret { id: String },
    /// Obtain the credential of your own active elevation (printed: it is yours).
    Credential {
        id: String,
        /// Shorter than the definition's default; never past the elevation's end.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
}

/// The elevation socket: `MAYFLY_ELEVATION_SOCKET`, else beside the admin socket the
/// connection names, else the configured one.
fn socket_path(conn: &Connection) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("MAYFLY_ELEVATION_SOCKET") {
        return Ok(PathBuf::from(path));
    }
    if let Some(path) = &conn.socket {
        return Ok(path.with_file_name("elevation.sock"));
    }
    let config = conn
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("/etc/mayfly/daemon.toml"));
    if config.exists() {
        return Ok(DaemonConfig::load(&config)?.elevation_socket());
    }
    Ok(PathBuf::from("/run/mayfly/elevation.sock"))
}

/// A client of the elevation socket at `path`.
pub async fn connect(path: &Path) -> anyhow::Result<ElevationsClient<Channel>> {
    if !path.exists() {
        anyhow::bail!(
            "elevation socket {} does not exist: is mayflyd running? (set MAYFLY_ELEVATION_SOCKET)",
            path.display()
        );
    }
    let channel = super::operator::unix_channel(path.to_path_buf(), "elevation").await?;
    Ok(ElevationsClient::new(channel))
}

pub async fn elevation(command: ElevationCommand, conn: &Connection) -> anyhow::Result<String> {
    let mut client = connect(&socket_path(conn)?).await?;
    let format = conn.output;
    Ok(match command {
        ElevationCommand::Request {
            credential,
            secret,
            ttl,
            reason,
            ticket,
            break_glass,
        } => {
            let made = call(
                client
                    .request_elevation(v1::ElevationRequest {
                        scope_kind: if secret.is_some() {
                            "secret"
                        } else {
                            "credential"
                        }
                        .into(),
                        scope_name: credential.or(secret).unwrap_or_default(),
                        ttl_seconds: ttl.as_secs() as i64,
                        reason,
                        ticket,
                        break_glass,
                    })
                    .await,
            )?;
            one(format, &made)
        }
        ElevationCommand::List { state, requester } => {
            let list = call(
                client
                    .list_elevations(v1::ListElevationsRequest {
                        state: state.unwrap_or_default(),
                        requester: requester.unwrap_or_default(),
                    })
                    .await,
            )?;
            many(format, &list.elevations)
        }
        ElevationCommand::Show { id } => {
            let detail = call(client.get_elevation(v1::GetElevationRequest { id }).await)?;
            shown(format, &detail)
        }
        ElevationCommand::Approve { id, comment } => {
            one(format, &review(&mut client, id, true, comment).await?)
        }
        ElevationCommand::Deny { id, comment } => {
            one(format, &review(&mut client, id, false, comment).await?)
        }
        ElevationCommand::End { id, reason } => {
            let detail = call(
                client
                    .end_elevation(v1::EndElevationRequest { id, reason })
                    .await,
            )?;
            shown(format, &detail)
        }
        ElevationCommand::Cancel { id, reason } => {
            let cancelled = call(
                client
                    .cancel_elevation(v1::EndElevationRequest { id, reason })
                    .await,
            )?;
            one(format, &cancelled)
        }
        ElevationCommand::Review { id, comment } => {
            let reviewed = call(
                client
                    .review_break_glass(v1::ReviewElevationRequest {
                        id,
                        approve: true,
                        comment,
                    })
                    .await,
            )?;
            one(format, &reviewed)
        }
        ElevationCommand::Secret { id } => {
            let secret = call(
                client
                    .read_elevated_secret(v1::GetElevationRequest { id })
                    .await,
            )?;
            let value = String::from_utf8_lossy(&secret.value).into_owned();
            match format {
                OutputFormat::Json => pretty(&json!({
                    "elevation_id": secret.elevation_id,
                    "name": secret.name,
                    "version": secret.version,
                    "username": secret.username,
                    "value": value,
                    "ends_at": secret.ends_at,
                })),
                OutputFormat::Table => table(
                    &["FIELD", "VALUE"],
                    &[
                        vec!["Secret".into(), secret.name.clone()],
                        vec!["Version".into(), secret.version.clone()],
                        vec!["Username".into(), secret.username.clone()],
                        vec!["Value".into(), value],
                        vec!["Rotated at".into(), when(secret.ends_at)],
                    ],
                ),
            }
        }
        ElevationCommand::Credential { id, ttl } => {
            let issued = call(
                client
                    .issue_elevated_credential(v1::IssueElevatedCredentialRequest {
                        id,
                        ttl_seconds: ttl.map(|d| d.as_secs() as i64).unwrap_or(0),
                    })
                    .await,
            )?;
            credential(format, &issued)
        }
    })
}

async fn review(
    client: &mut ElevationsClient<Channel>,
    id: String,
    approve: bool,
    comment: String,
) -> anyhow::Result<v1::Elevation> {
    call(
        client
            .review_elevation(v1::ReviewElevationRequest {
                id,
                approve,
                comment,
            })
            .await,
    )
}

fn elevation_json(e: &v1::Elevation) -> Value {
    let at = |t: i64| if t == 0 { Value::Null } else { json!(t) };
    json!({
        "id": e.id,
        "requester": e.requester,
        "requester_name": e.requester_name,
        "requester_kind": e.requester_kind,
        "agent_id": e.agent_id,
        "scope": { "kind": e.scope_kind, "name": e.scope_name },
        "reason": e.reason,
        "ticket": e.ticket,
        "requested_ttl": e.requested_ttl,
        "break_glass": e.break_glass,
        "state": e.state,
        "created_at": e.created_at,
        "pending_until": e.pending_until,
        "activated_at": at(e.activated_at),
        "ends_at": at(e.ends_at),
        "ended_at": at(e.ended_at),
        "ended_by": e.ended_by,
        "end_reason": e.end_reason,
        "revocation_id": e.revocation_id,
        "review_required": e.review_required,
        "reviewed_by": e.reviewed_by,
        "reviewed_at": at(e.reviewed_at),
        "review_comment": e.review_comment,
        "policy_set": e.policy_set,
        "reviews": e.reviews.iter().map(|r| json!({
            "reviewer_uid": r.reviewer_uid,
            "reviewer_name": r.reviewer_name,
            "verdict": r.verdict,
            "comment": r.comment,
            "at": r.at,
        })).collect::<Vec<_>>(),
        "notices": e.notices,
        "granted_entry": e.granted_entry,
    })
}

fn one(format: OutputFormat, e: &v1::Elevation) -> String {
    match format {
        OutputFormat::Json => pretty(&elevation_json(e)),
        OutputFormat::Table => table(&["FIELD", "VALUE"], &rows(e)),
    }
}

fn rows(e: &v1::Elevation) -> Vec<Vec<String>> {
    let at = |t: i64| if t == 0 { String::new() } else { when(t) };
    let mut rows = vec![
        vec!["ID".into(), e.id.clone()],
        vec!["State".into(), e.state.clone()],
        vec![
            "Requester".into(),
            format!(
                "{} ({}, {})",
                e.requester, e.requester_kind, e.requester_name
            ),
        ],
        vec!["Scope".into(), format!("{} {}", e.scope_kind, e.scope_name)],
        vec!["Reason".into(), e.reason.clone()],
        vec!["Ticket".into(), e.ticket.clone()],
        vec!["TTL asked".into(), ttl(e.requested_ttl)],
        vec!["Break-glass".into(), e.break_glass.to_string()],
        vec!["Requested".into(), when(e.created_at)],
        vec!["Pending until".into(), at(e.pending_until)],
        vec!["Active from".into(), at(e.activated_at)],
        vec!["Ends".into(), at(e.ends_at)],
        vec!["Ended".into(), at(e.ended_at)],
        vec!["Ended by".into(), e.ended_by.clone()],
        vec!["End reason".into(), e.end_reason.clone()],
        vec!["Revocation".into(), e.revocation_id.clone()],
        vec!["Policy set".into(), e.policy_set.clone()],
    ];
    if !e.granted_entry.is_empty() {
        rows.push(vec!["Temporary entry".into(), e.granted_entry.clone()]);
    }
    if e.review_required {
        rows.push(vec![
            "Break-glass review".into(),
            if e.reviewed_by.is_empty() {
                "REQUIRED, not yet given".into()
            } else {
                format!(
                    "{} at {}: {}",
                    e.reviewed_by,
                    at(e.reviewed_at),
                    e.review_comment
                )
            },
        ]);
    }
    for r in &e.reviews {
        rows.push(vec![
            "Review".into(),
            format!(
                "{} by uid {} ({}) at {}: {}",
                r.verdict,
                r.reviewer_uid,
                r.reviewer_name,
                when(r.at),
                r.comment
            ),
        ]);
    }
    for notice in &e.notices {
        rows.push(vec!["Notice".into(), notice.clone()]);
    }
    rows
}

fn ttl(seconds: i64) -> String {
    humantime::format_duration(Duration::from_secs(seconds.max(0) as u64)).to_string()
}

fn many(format: OutputFormat, list: &[v1::Elevation]) -> String {
    match format {
        OutputFormat::Json => pretty(&Value::Array(list.iter().map(elevation_json).collect())),
        OutputFormat::Table => table(
            &[
                "ID",
                "STATE",
                "REQUESTER",
                "KIND",
                "SCOPE",
                "TTL",
                "REQUESTED",
                "REASON",
            ],
            &list
                .iter()
                .map(|e| {
                    vec![
                        e.id.clone(),
                        e.state.clone(),
                        e.requester.clone(),
                        e.requester_kind.clone(),
                        format!("{} {}", e.scope_kind, e.scope_name),
                        ttl(e.requested_ttl),
                        when(e.created_at),
                        e.reason.clone(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
}

fn shown(format: OutputFormat, detail: &v1::ElevationDetail) -> String {
    let elevation = detail.elevation.clone().unwrap_or_default();
    match format {
        OutputFormat::Json => pretty(&json!({
            "elevation": elevation_json(&elevation),
            "leases": detail.leases.iter().map(super::credentials::lease_json).collect::<Vec<_>>(),
            "svids": detail.svids.iter().map(|s| json!({
                "serial": s.serial,
                "spiffe_id": s.spiffe_id,
                "agent_id": s.agent_id,
                "issued_at": s.issued_at,
                "not_after": s.not_after,
            })).collect::<Vec<_>>(),
            "revocation": detail.revocation.as_ref().map(super::output::revocation_json),
        })),
        OutputFormat::Table => {
            let mut out = table(&["FIELD", "VALUE"], &rows(&elevation));
            out.push_str("\nIssued under it:\n");
            out.push_str(&table(
                &[
                    "LEASE",
                    "CREDENTIAL",
                    "HOLDER",
                    "AS",
                    "ISSUED",
                    "EXPIRES",
                    "STATE",
                ],
                &detail
                    .leases
                    .iter()
                    .map(|l| {
                        vec![
                            l.id.clone(),
                            l.credential.clone(),
                            l.holder.clone(),
                            l.backend_id.clone(),
                            when(l.issued_at),
                            when(l.expires_at),
                            l.state.clone(),
                        ]
                    })
                    .collect::<Vec<_>>(),
            ));
            if !detail.svids.is_empty() {
                out.push_str("\nSVIDs signed for its temporary entry:\n");
                out.push_str(&table(
                    &["SERIAL", "SPIFFE ID", "AGENT", "ISSUED", "NOT AFTER"],
                    &detail
                        .svids
                        .iter()
                        .map(|s| {
                            vec![
                                s.serial.clone(),
                                s.spiffe_id.clone(),
                                s.agent_id.clone(),
                                when(s.issued_at),
                                when(s.not_after),
                            ]
                        })
                        .collect::<Vec<_>>(),
                ));
            }
            if let Some(revocation) = &detail.revocation {
                out.push_str("\nTaken back by:\n");
                out.push_str(&super::output::revocation_report(format, revocation));
            }
            out
        }
    }
}

fn credential(format: OutputFormat, c: &v1::WorkloadCredential) -> String {
    match format {
        OutputFormat::Json => pretty(&json!({
            "name": c.name,
            "kind": c.kind,
            "lease_id": c.lease_id,
            "values": c.values,
            "issued_at": c.issued_at,
            "expires_at": c.expires_at,
            "notice": c.notice,
        })),
        OutputFormat::Table => {
            let mut rows = vec![
                vec!["Credential".into(), format!("{} ({})", c.name, c.kind)],
                vec!["Lease".into(), c.lease_id.clone()],
                vec!["Expires".into(), when(c.expires_at)],
            ];
            for (key, value) in &c.values {
                rows.push(vec![key.clone(), value.clone()]);
            }
            if !c.notice.is_empty() {
                rows.push(vec!["Notice".into(), c.notice.clone()]);
            }
            table(&["FIELD", "VALUE"], &rows)
        }
    }
}

//! `mayfly-agent elevate …`: a workload (or an AI agent's tool) asks its agent for
//! temporary access to a credential, a secret or an entry's identity as the identity the
//! agent attests it as, and ends it when its task is done. Prints the elevation as JSON;
//! once operators have approved, the credential comes from `mayfly-agent creds get`, the
//! secret and the SVID from the Workload API and the sinks like any granted to it.

use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use mayfly_proto::v1;
use mayfly_proto::v1::workload_elevation_client::WorkloadElevationClient;

use super::api;
use super::endpoint::WorkloadEndpoint;

#[derive(Debug, Subcommand)]
pub enum ElevateCommand {
    /// Ask for what this workload is not granted, for as long as the task needs.
    #[command(group(clap::ArgGroup::new("scope").required(true).args(["credential", "secret", "entry"])))]
    Request {
        /// A credential definition.
        #[arg(long)]
        credential: Option<String>,
        /// A secret (rotated when the elevation ends).
        #[arg(long)]
        secret: Option<String>,
        /// An entry (its id, or a SPIFFE ID one entry gives): its identity, on this node,
        /// for this workload.
        #[arg(long)]
        entry: Option<String>,
        /// How long, e.g. 15m.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// What the task is.
        #[arg(long)]
        reason: String,
        #[arg(long, default_value = "")]
        ticket: String,
        /// Active at once, flagged, reviewed afterwards (if the policies allow it).
        #[arg(long)]
        break_glass: bool,
        /// Which of this workload's SPIFFE IDs asks; needed only when it holds several.
        #[arg(long)]
        spiffe_id: Option<String>,
    },
    /// The task is done: end the elevation now.
    End {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long)]
        spiffe_id: Option<String>,
    },
    /// Withdraw a pending request.
    Cancel {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long)]
        spiffe_id: Option<String>,
    },
}

pub async fn run(command: ElevateCommand, socket: Option<&str>) -> anyhow::Result<String> {
    let endpoint = WorkloadEndpoint::resolve(socket)?;
    let mut client = WorkloadElevationClient::new(endpoint.connect().await?);
    let elevation = match command {
        ElevateCommand::Request {
            credential,
            secret,
            entry,
            ttl,
            reason,
            ticket,
            break_glass,
            spiffe_id,
        } => client
            .request_elevation(api::request(v1::HolderElevationRequest {
                spiffe_id: spiffe_id.unwrap_or_default(),
                request: Some(v1::ElevationRequest {
                    scope_kind: if secret.is_some() {
                        "secret"
                    } else if entry.is_some() {
                        "entry"
                    } else {
                        "credential"
                    }
                    .into(),
                    scope_name: credential.or(secret).or(entry).unwrap_or_default(),
                    ttl_seconds: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
                    reason,
                    ticket,
                    break_glass,
                }),
            }))
            .await
            .map_err(api::status)?,
        ElevateCommand::End {
            id,
            reason,
            spiffe_id,
        } => client
            .end_elevation(api::request(v1::HolderEndElevationRequest {
                spiffe_id: spiffe_id.unwrap_or_default(),
                id,
                reason,
                cancel: false,
            }))
            .await
            .map_err(api::status)?,
        ElevateCommand::Cancel {
            id,
            reason,
            spiffe_id,
        } => client
            .end_elevation(api::request(v1::HolderEndElevationRequest {
                spiffe_id: spiffe_id.unwrap_or_default(),
                id,
                reason,
                cancel: true,
            }))
            .await
            .map_err(api::status)?,
    }
    .into_inner();
    Ok(json!({
        "id": elevation.id,
        "state": elevation.state,
        "requester": elevation.requester,
        "requester_kind": elevation.requester_kind,
        "scope": { "kind": elevation.scope_kind, "name": elevation.scope_name },
        "requested_ttl": elevation.requested_ttl,
        "break_glass": elevation.break_glass,
        "pending_until": elevation.pending_until,
        "ends_at": elevation.ends_at,
        "end_reason": elevation.end_reason,
    })
    .to_string())
}

//! `mayfly-agent elevate …`: a workload (or an AI agent's tool) asks its agent for
//! temporary access to a credential as the identity the agent attests it as, and ends it
//! when its task is done. Prints the elevation as JSON; the credential itself then comes
//! from `mayfly-agent creds get` once operators have approved.

use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use mayfly_proto::v1;
use mayfly_proto::v1::workload_elevation_client::WorkloadElevationClient;

use super::api;
use super::endpoint::WorkloadEndpoint;

#[derive(Debug, Subcommand)]
pub enum ElevateCommand {
    /// Ask for a credential this workload is not granted, for as long as the task needs.
    Request {
        /// The credential definition.
        #[arg(long)]
        credential: String,
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
            ttl,
            reason,
            ticket,
            break_glass,
            spiffe_id,
        } => client
            .request_elevation(api::request(v1::HolderElevationRequest {
                spiffe_id: spiffe_id.unwrap_or_default(),
                request: Some(v1::ElevationRequest {
                    scope_kind: "credential".into(),
                    scope_name: credential,
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

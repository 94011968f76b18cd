//! `mayflyd credential …` and `mayflyd lease …`: TTL-bound credential definitions and the
//! leases issued under them, as tables or JSON. Never a credential's value: the daemon does
//! not keep them.

use anyhow::Context as _;
use serde_json::{Value, json};

use mayfly_proto::v1;

use super::operator::{call, connect};
use super::output::{pretty, table, when};
use super::{Connection, CredentialCommand, LeaseCommand, OutputFormat};

pub async fn credential(command: CredentialCommand, conn: &Connection) -> anyhow::Result<String> {
    let mut client = connect(conn).await?;
    let format = conn.output;
    Ok(match command {
        CredentialCommand::Create { file } => {
            let definition = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let summary = call(
                client
                    .create_credential(v1::CreateCredentialRequest { definition })
                    .await,
            )?;
            credentials(format, &[summary])
        }
        CredentialCommand::List => {
            let list = call(client.list_credentials(v1::ListCredentialsRequest {}).await)?;
            credentials(format, &list.credentials)
        }
        CredentialCommand::Show { name } => {
            let summary = call(client.get_credential(v1::CredentialRequest { name }).await)?;
            credentials(format, &[summary])
        }
        CredentialCommand::Delete { name } => {
            let deleted = call(
                client
                    .delete_credential(v1::CredentialRequest { name })
                    .await,
            )?;
            match format {
                OutputFormat::Json => pretty(&json!({ "deleted": deleted.name })),
                OutputFormat::Table => format!("deleted credential {}\n", deleted.name),
            }
        }
    })
}

pub async fn lease(command: LeaseCommand, conn: &Connection) -> anyhow::Result<String> {
    let mut client = connect(conn).await?;
    let format = conn.output;
    Ok(match command {
        LeaseCommand::List {
            holder,
            credential,
            all,
        } => {
            let list = call(
                client
                    .list_leases(v1::ListLeasesRequest {
                        holder: holder.unwrap_or_default(),
                        credential: credential.unwrap_or_default(),
                        all,
                    })
                    .await,
            )?;
            leases(format, &list.leases)
        }
        LeaseCommand::Show { id } => {
            let lease = call(client.get_lease(v1::LeaseRequest { id }).await)?;
            leases(format, &[lease])
        }
    })
}

fn duration(seconds: i64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(seconds.max(0) as u64)).to_string()
}

fn credential_json(c: &v1::CredentialSummary) -> Value {
    json!({
        "name": c.name, "kind": c.kind, "grants": c.grants, "default_ttl": c.default_ttl,
        "max_ttl": c.max_ttl, "source": c.source, "live_leases": c.live_leases,
    })
}

fn credentials(format: OutputFormat, list: &[v1::CredentialSummary]) -> String {
    match format {
        OutputFormat::Json => pretty(&Value::Array(list.iter().map(credential_json).collect())),
        OutputFormat::Table => table(
            &["NAME", "KIND", "DEFAULT TTL", "MAX TTL", "LIVE", "GRANTS"],
            &list
                .iter()
                .map(|c| {
                    vec![
                        c.name.clone(),
                        c.kind.clone(),
                        duration(c.default_ttl),
                        duration(c.max_ttl),
                        c.live_leases.to_string(),
                        c.grants.join(","),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
}

pub(super) fn lease_json(l: &v1::Lease) -> Value {
    json!({
        "id": l.id, "credential": l.credential, "holder": l.holder, "agent_id": l.agent_id,
        "backend_id": l.backend_id, "issued_at": l.issued_at, "expires_at": l.expires_at,
        "state": l.state, "revoked_at": l.revoked_at, "reason": l.reason,
    })
}

fn leases(format: OutputFormat, list: &[v1::Lease]) -> String {
    match format {
        OutputFormat::Json => pretty(&Value::Array(list.iter().map(lease_json).collect())),
        OutputFormat::Table => table(
            &[
                "ID",
                "CREDENTIAL",
                "HOLDER",
                "AS",
                "EXPIRES",
                "STATE",
                "REASON",
            ],
            &list
                .iter()
                .map(|l| {
                    vec![
                        l.id.clone(),
                        l.credential.clone(),
                        l.holder.clone(),
                        l.backend_id.clone(),
                        when(l.expires_at),
                        l.state.clone(),
                        l.reason.clone(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
}

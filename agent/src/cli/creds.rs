//! `mayfly-agent creds …`: asks the agent's Workload API for a TTL-bound credential as the
//! process running the command, and prints it as JSON, as `KEY=value` lines, or as AWS
//! `credential_process` output. Values go to stdout only: an error names the credential
//! and what is wrong with it, never a value.

use mayfly_proto::v1::workload_credentials_client::WorkloadCredentialsClient;
use mayfly_proto::v1::{GetCredentialRequest, WorkloadCredential};

use super::endpoint::WorkloadEndpoint;
use super::{CredentialRequest, CredsCommand, CredsFormat, api};
use crate::credentials::format;
pub use crate::credentials::{TtlError, parse_ttl};

/// Fetches the credential and renders it; the text is what the command prints.
pub async fn run(command: CredsCommand, socket: Option<&str>) -> anyhow::Result<String> {
    let (request, render): (_, fn(&WorkloadCredential) -> anyhow::Result<String>) = match command {
        CredsCommand::Get {
            request,
            format: CredsFormat::Json,
        } => (request, render_json),
        CredsCommand::Get {
            request,
            format: CredsFormat::Env,
        } => (request, render_env),
        CredsCommand::Aws { request } => (request, render_aws),
    };
    let CredentialRequest {
        name,
        spiffe_id,
        ttl,
    } = request;
    let endpoint = WorkloadEndpoint::resolve(socket)?;
    let mut client = WorkloadCredentialsClient::new(endpoint.connect().await?);
    let credential = client
        .get_credential(api::request(GetCredentialRequest {
            name,
            spiffe_id: spiffe_id.unwrap_or_default(),
            ttl_seconds: ttl.map_or(0, |ttl| i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
        }))
        .await
        .map_err(api::status)?
        .into_inner();
    render(&credential)
}

fn render_json(credential: &WorkloadCredential) -> anyhow::Result<String> {
    Ok(format::json(credential).to_string())
}

fn render_env(credential: &WorkloadCredential) -> anyhow::Result<String> {
    Ok(format::env(credential)?.to_string())
}

/// AWS `credential_process` output; a credential without AWS keys is refused by name.
fn render_aws(credential: &WorkloadCredential) -> anyhow::Result<String> {
    format::aws_process(credential)
        .map(|text| text.to_string())
        .map_err(|e| anyhow::anyhow!("{e}: use `mayfly-agent creds get`"))
}

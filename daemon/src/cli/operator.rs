//! Operator subcommands: each is one admin API call over the daemon's Unix socket.

use std::path::{Path, PathBuf};

use anyhow::Context;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use mayfly_proto::v1::admin_client::AdminClient;
use mayfly_proto::v1::{self};

use super::output::{self, pretty};
use super::{
    AgentCommand, AuditCommand, BundleCommand, BundleFormat, CaCommand, Connection, EntryCommand,
    OutputFormat, RevokeCommand, RevokeOptions, SecretCommand, TokenCommand,
};
use crate::api::convert;
use crate::audit;
use crate::config::DaemonConfig;

/// Opens an admin client on the socket named by the flags, env or config.
pub async fn connect(conn: &Connection) -> anyhow::Result<AdminClient<Channel>> {
    let path = socket_path(conn)?;
    if !path.exists() {
        anyhow::bail!(
            "admin socket {} does not exist: is mayflyd running? (set --socket or MAYFLY_ADMIN_SOCKET)",
            path.display()
        );
    }
    Ok(AdminClient::new(unix_channel(path, "admin").await?))
}

/// A gRPC channel over the daemon's Unix socket at `path` (`what`: which one, for errors).
pub(super) async fn unix_channel(path: PathBuf, what: &str) -> anyhow::Result<Channel> {
    Endpoint::from_static("http://mayflyd.local")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| format!("connecting to the {what} socket"))
}

fn socket_path(conn: &Connection) -> anyhow::Result<PathBuf> {
    if let Some(path) = &conn.socket {
        return Ok(path.clone());
    }
    if let Some(config) = &conn.config {
        return Ok(DaemonConfig::load(config)?.admin_socket);
    }
    let default_config = Path::new("/etc/mayfly/daemon.toml");
    if default_config.exists() {
        return Ok(DaemonConfig::load(default_config)?.admin_socket);
    }
    Ok(PathBuf::from("/run/mayfly/admin.sock"))
}

/// Turns a gRPC status into an error whose text is the daemon's message.
pub(super) fn call<T>(result: Result<tonic::Response<T>, tonic::Status>) -> anyhow::Result<T> {
    result
        .map(tonic::Response::into_inner)
        .map_err(|status| anyhow::anyhow!("{} ({:?})", status.message(), status.code()))
}

fn secs(d: Option<std::time::Duration>) -> i64 {
    d.map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// One entry of an `entry create --file` document.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryDocument {
    spiffe_id: String,
    parent_id: String,
    selectors: Vec<String>,
    #[serde(default)]
    x509_svid_ttl: i64,
    #[serde(default)]
    jwt_svid_ttl: i64,
    #[serde(default)]
    dns_names: Vec<String>,
    #[serde(default)]
    hint: String,
    #[serde(default)]
    sets: Vec<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EntriesDocument {
    entries: Vec<EntryDocument>,
}

/// The entries of an `entry create --file` document (`-`: standard input).
fn read_entries(file: &Path) -> anyhow::Result<Vec<v1::CreateEntryRequest>> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading entries from standard input")?
    } else {
        std::fs::read_to_string(file)
            .with_context(|| format!("reading entries from {}", file.display()))?
    };
    let document: EntriesDocument = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not an entries document ({{\"entries\": [{{\"spiffe_id\": …, \"parent_id\": …, \"selectors\": […]}}]}})",
            file.display()
        )
    })?;
    Ok(document
        .entries
        .into_iter()
        .map(|e| v1::CreateEntryRequest {
            spiffe_id: e.spiffe_id,
            parent_id: e.parent_id,
            selectors: e.selectors,
            x509_svid_ttl: e.x509_svid_ttl,
            jwt_svid_ttl: e.jwt_svid_ttl,
            dns_names: e.dns_names,
            hint: e.hint,
            sets: e.sets,
        })
        .collect())
}

/// Creates every entry of `file`, as many to a call as the daemon takes. Prints each one's result; fails, after
/// printing, when any was refused.
async fn create_entries(
    client: &mut AdminClient<Channel>,
    format: OutputFormat,
    file: &Path,
) -> anyhow::Result<String> {
    let entries = read_entries(file)?;
    let asked = entries.len();
    let mut results: Vec<v1::BatchCreateEntryResult> = Vec::with_capacity(asked);
    for chunk in entries.chunks(crate::identity::MAX_ENTRY_BATCH) {
        let request = v1::BatchCreateEntryRequest {
            entries: chunk.to_vec(),
        };
        let answer = call(client.batch_create_entry(request).await).with_context(|| {
            let created = results.iter().filter(|r| r.entry.is_some()).count();
            format!("{created} of {asked} entries were created before this call failed")
        })?;
        results.extend(answer.results);
    }
    let refused = results.iter().filter(|r| r.entry.is_none()).count();
    let shown = output::batch_created(format, &entries, &results);
    if refused > 0 {
        print!("{shown}");
        anyhow::bail!("{refused} of {asked} entries were refused (the others were created)");
    }
    Ok(shown)
}

pub async fn entry(command: EntryCommand, conn: &Connection) -> anyhow::Result<String> {
    let mut client = connect(conn).await?;
    let format = conn.output;
    Ok(match command {
        EntryCommand::Create(super::EntryFields {
            file: Some(file), ..
        }) => create_entries(&mut client, format, &file).await?,
        EntryCommand::Create(f) => {
            let created = call(
                client
                    .create_entry(v1::CreateEntryRequest {
                        spiffe_id: f.spiffe_id.unwrap_or_default(),
                        parent_id: f.parent_id.unwrap_or_default(),
                        selectors: f.selectors,
                        x509_svid_ttl: secs(f.x509_ttl),
                        jwt_svid_ttl: secs(f.jwt_ttl),
                        dns_names: f.dns_names,
                        hint: f.hint,
                        sets: f.sets,
                    })
                    .await,
            )?;
            output::entry(format, &created)
        }
        EntryCommand::List {
            parent_id,
            spiffe_id,
        } => {
            let list = call(
                client
                    .list_entries(v1::ListEntriesRequest {
                        parent_id: parent_id.unwrap_or_default(),
                        spiffe_id: spiffe_id.unwrap_or_default(),
                    })
                    .await,
            )?;
            output::entries(format, &list.entries)
        }
        EntryCommand::Show { id } => output::entry(
            format,
            &call(client.get_entry(v1::GetEntryRequest { id }).await)?,
        ),
        EntryCommand::Update { id, fields } => {
            let dns_names = if fields.clear_dns {
                Some(v1::DnsNames { names: vec![] })
            } else if fields.dns_names.is_empty() {
                None
            } else {
                Some(v1::DnsNames {
                    names: fields.dns_names,
                })
            };
            let sets = if fields.clear_sets {
                Some(v1::SetNames { names: vec![] })
            } else if fields.sets.is_empty() {
                None
            } else {
                Some(v1::SetNames { names: fields.sets })
            };
            let updated = call(
                client
                    .update_entry(v1::UpdateEntryRequest {
                        id,
                        spiffe_id: fields.spiffe_id,
                        parent_id: fields.parent_id,
                        selectors: fields.selectors,
                        x509_svid_ttl: fields.x509_ttl.map(|d| d.as_secs() as i64),
                        jwt_svid_ttl: fields.jwt_ttl.map(|d| d.as_secs() as i64),
                        dns_names,
                        hint: fields.hint,
                        sets,
                    })
                    .await,
            )?;
            output::entry(format, &updated)
        }
        EntryCommand::Delete { id } => {
            let deleted = call(client.delete_entry(v1::DeleteEntryRequest { id }).await)?;
            match format {
                OutputFormat::Json => pretty(&serde_json::json!({ "deleted": deleted.id })),
                OutputFormat::Table => format!("deleted entry {}\n", deleted.id),
            }
        }
    })
}

pub async fn token(command: TokenCommand, conn: &Connection) -> anyhow::Result<String> {
    let mut client = connect(conn).await?;
    let TokenCommand::Generate { spiffe_id, ttl } = command;
    let issued = call(
        client
            .generate_join_token(v1::GenerateJoinTokenRequest {
                spiffe_id,
                ttl: secs(ttl),
            })
            .await,
    )?;
    Ok(match conn.output {
        OutputFormat::Json => pretty(&serde_json::json!({
            "token": issued.token,
            "spiffe_id": issued.spiffe_id,
            "expires_at": issued.expires_at,
        })),
        OutputFormat::Table => format!(
            "Token: {}\nSPIFFE ID: {}\nExpires: {}\n",
            issued.token,
            issued.spiffe_id,
            output::when(issued.expires_at)
        ),
    })
}

pub async fn agent(command: AgentCommand, conn: &Connection) -> anyhow::Result<String> {
    let mut client = connect(conn).await?;
    let format = conn.output;
    Ok(match command {
        AgentCommand::List => {
            let list = call(client.list_agents(v1::ListAgentsRequest {}).await)?;
            output::agents(format, &list.agents)
        }
        AgentCommand::Evict { spiffe_id, reason } => {
            let agent = call(
                client
                    .evict_agent(v1::AgentRequest { spiffe_id, reason })
                    .await,
            )?;
            output::agents(format, &[agent])
        }
        AgentCommand::Ban { spiffe_id, reason } => {
            let agent = call(
                client
                    .ban_agent(v1::AgentRequest { spiffe_id, reason })
                    .await,
            )?;
            output::agents(format, &[agent])
        }
    })
}

pub async fn bundle(command: BundleCommand, conn: &Connection) -> anyhow::Result<String> {
    let mut client = connect(conn).await?;
    let BundleCommand::Show { format } = command;
    let bundle = call(client.get_bundle(v1::GetBundleRequest {}).await)?;
    Ok(match (conn.output, format) {
        (OutputFormat::Json, _) | (_, BundleFormat::Jwks) => {
            let mut text = bundle.jwks;
            text.push('\n');
            text
        }
        (OutputFormat::Table, BundleFormat::Pem) => bundle.pem,
    })
}

pub async fn ca(command: CaCommand, conn: &Connection) -> anyhow::Result<String> {
    let mut client = connect(conn).await?;
    let slots = match command {
        CaCommand::Show => call(client.show_ca(v1::ShowCaRequest {}).await)?,
        CaCommand::Prepare => call(client.prepare_ca(v1::PrepareCaRequest {}).await)?,
        CaCommand::Activate => call(client.activate_ca(v1::ActivateCaRequest {}).await)?,
        CaCommand::Revoke { slot } => call(
            client
                .revoke_ca(v1::RevokeCaRequest {
                    slot_id: slot.unwrap_or_default(),
                })
                .await,
        )?,
        CaCommand::Taint { options } => {
            if options.reason.trim().is_empty() {
                anyhow::bail!("--reason must say why, for the audit trail");
            }
            let report = call(
                client
                    .taint_ca(v1::TaintCaRequest {
                        reason: options.reason,
                        wait_ms: options.wait.as_millis().max(1) as i64,
                    })
                    .await,
            )?;
            return acknowledged(conn.output, &report);
        }
    };
    Ok(output::ca_slots(conn.output, &slots.slots))
}

pub async fn secret(command: SecretCommand, conn: &Connection) -> anyhow::Result<String> {
    let mut client = connect(conn).await?;
    let format = conn.output;
    Ok(match command {
        SecretCommand::Create { file, value_file } => {
            let definition = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let current_value = match value_file {
                Some(path) => {
                    let mut value = std::fs::read(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    if value.ends_with(b"\n") {
                        value.pop();
                        if value.ends_with(b"\r") {
                            value.pop();
                        }
                    }
                    if value.is_empty() {
                        anyhow::bail!("--value-file {} is empty", path.display());
                    }
                    value
                }
                None => Vec::new(),
            };
            let summary = call(
                client
                    .create_secret(v1::CreateSecretRequest {
                        definition,
                        current_value,
                    })
                    .await,
            )?;
            output::secrets(format, &[summary])
        }
        SecretCommand::List => {
            let list = call(client.list_secrets(v1::ListSecretsRequest {}).await)?;
            output::secrets(format, &list.secrets)
        }
        SecretCommand::Show { name } => {
            let status = call(client.get_secret_status(v1::SecretRequest { name }).await)?;
            output::secrets(format, &status.secret.into_iter().collect::<Vec<_>>())
        }
        SecretCommand::Status { name } => {
            let status = call(client.get_secret_status(v1::SecretRequest { name }).await)?;
            output::secret_status(format, &status)
        }
        SecretCommand::Delete { name } => {
            let deleted = call(client.delete_secret(v1::SecretRequest { name }).await)?;
            match format {
                OutputFormat::Json => pretty(&serde_json::json!({ "deleted": deleted.name })),
                OutputFormat::Table => format!("deleted secret {}\n", deleted.name),
            }
        }
        SecretCommand::Rotate { name } => {
            let outcome = call(
                client
                    .rotate_secret(v1::SecretRequest { name: name.clone() })
                    .await,
            )?;
            let job = outcome.job.unwrap_or_default();
            if job.state != "promoted" {
                anyhow::bail!(
                    "rotation of {name} {}: {} (the current version is untouched)",
                    job.state,
                    job.last_error
                );
            }
            match format {
                OutputFormat::Json => pretty(&output::job_json(&job)),
                OutputFormat::Table => {
                    format!("rotated {name}: version {} is current\n", job.token)
                }
            }
        }
        SecretCommand::Get { name } => {
            let value = call(client.get_secret_value(v1::SecretRequest { name }).await)?;
            match format {
                OutputFormat::Json => pretty(&serde_json::json!({
                    "name": value.name,
                    "version": value.version,
                    "username": value.username,
                    "value": value.value,
                })),
                OutputFormat::Table => format!("{}\n", value.value),
            }
        }
    })
}

/// A revocation report in which some agent did not acknowledge: printed, and exit 3.
#[derive(Debug)]
pub struct Unacknowledged(pub String);

impl std::fmt::Display for Unacknowledged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unacknowledged {}

pub async fn revoke(command: RevokeCommand, conn: &Connection) -> anyhow::Result<String> {
    let mut client = connect(conn).await?;
    let format = conn.output;
    let (kind, target, options): (&str, String, RevokeOptions) = match command {
        RevokeCommand::List => {
            let list = call(client.list_revocations(v1::ListRevocationsRequest {}).await)?;
            return Ok(output::revocations(format, &list.revocations));
        }
        RevokeCommand::Status { id } => {
            let report = call(client.get_revocation(v1::GetRevocationRequest { id }).await)?;
            return Ok(output::revocation_report(format, &report));
        }
        RevokeCommand::Svid { serial, options } => ("svid", serial, options),
        RevokeCommand::Entry { spiffe_id, options } => ("entry", spiffe_id, options),
        RevokeCommand::Selector { selector, options } => ("selector", selector, options),
        RevokeCommand::Agent { id, options } => ("agent", id, options),
        RevokeCommand::Secret { name, options } => ("secret", name, options),
        RevokeCommand::Lease { id, options } => ("lease", id, options),
        RevokeCommand::Credential { name, options } => ("credential", name, options),
    };
    if options.reason.trim().is_empty() {
        anyhow::bail!("--reason must say why, for the audit trail");
    }
    let report = call(
        client
            .revoke(v1::RevokeRequest {
                kind: kind.to_string(),
                target,
                reason: options.reason,
                wait_ms: options.wait.as_millis().max(1) as i64,
            })
            .await,
    )?;
    acknowledged(format, &report)
}

/// The report; an error carrying it (exit 3) when some agent did not acknowledge.
fn acknowledged(format: OutputFormat, report: &v1::RevocationReport) -> anyhow::Result<String> {
    let text = output::revocation_report(format, report);
    if report.agents.iter().any(|a| !a.acknowledged) {
        return Err(Unacknowledged(text).into());
    }
    Ok(text)
}

pub async fn audit(command: AuditCommand, conn: &Connection) -> anyhow::Result<String> {
    let format = conn.output;
    // An export is checked here, without a daemon: the point is to trust neither the
    // daemon nor its store.
    if let AuditCommand::Verify {
        head,
        file: Some(path),
    } = &command
    {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open the export {}", path.display()))?;
        let verdict = audit::verify_export(std::io::BufReader::new(file), head.as_ref())
            .with_context(|| format!("cannot check the export {}", path.display()))?;
        return verification(format, convert::verification(verdict));
    }
    let mut client = connect(conn).await?;
    match command {
        AuditCommand::List {
            since,
            subject,
            action,
            limit,
        } => {
            let since_ms = since.as_deref().map(parse_since).transpose()?.unwrap_or(0);
            let records = collect_audit(
                &mut client,
                v1::ListAuditRequest {
                    since_ms,
                    subject: subject.unwrap_or_default(),
                    action: action.unwrap_or_default(),
                    limit: limit.unwrap_or(0),
                },
            )
            .await?;
            Ok(output::audit_records(format, &records))
        }
        AuditCommand::Export { format: _ } => {
            let records = collect_audit(&mut client, v1::ListAuditRequest::default()).await?;
            let mut out = String::new();
            for record in &records {
                out.push_str(&output::audit_json(record).to_string());
                out.push('\n');
            }
            Ok(out)
        }
        AuditCommand::Verify { head, file: _ } => {
            let (head_seq, head_hash) = head
                .map(|h| (h.seq(), h.hash().to_string()))
                .unwrap_or_default();
            let request = v1::VerifyAuditRequest {
                head_seq,
                head_hash,
            };
            verification(format, call(client.verify_audit(request).await)?)
        }
    }
}

/// The verdict, with the head in the form `--head` takes back; an error (exit 1) naming
/// the first record that cannot be trusted.
fn verification(format: OutputFormat, verdict: v1::VerifyAuditResponse) -> anyhow::Result<String> {
    let head = format!("{}:{}", verdict.head_seq, verdict.head_hash);
    if verdict.first_bad_seq > 0 {
        anyhow::bail!(
            "the audit log is broken at record {}: {} ({} records before it verify; the last \
             good one is head {head})",
            verdict.first_bad_seq,
            verdict.problem,
            verdict.good,
        );
    }
    Ok(match format {
        OutputFormat::Json => pretty(&serde_json::json!({
            "records": verdict.good,
            "head_seq": verdict.head_seq,
            "head_hash": verdict.head_hash,
            "head": head,
            "intact": true,
        })),
        OutputFormat::Table => format!("audit log intact: {} records\nhead {head}\n", verdict.good),
    })
}

async fn collect_audit(
    client: &mut AdminClient<Channel>,
    request: v1::ListAuditRequest,
) -> anyhow::Result<Vec<v1::AuditRecord>> {
    let mut stream = call(client.list_audit(request).await)?;
    let mut records = Vec::new();
    while let Some(record) = stream
        .message()
        .await
        .map_err(|status| anyhow::anyhow!("{} ({:?})", status.message(), status.code()))?
    {
        records.push(record);
    }
    Ok(records)
}

/// `--since`: an RFC 3339 time, or an age such as `90m`.
fn parse_since(text: &str) -> anyhow::Result<i64> {
    let at = match humantime::parse_rfc3339_weak(text) {
        Ok(at) => at,
        Err(_) => {
            let age = humantime::parse_duration(text).map_err(|_| {
                anyhow::anyhow!("--since {text}: give a time (2026-12-01T10:00:00Z) or an age (1h)")
            })?;
            std::time::SystemTime::now()
                .checked_sub(age)
                .unwrap_or(std::time::UNIX_EPOCH)
        }
    };
    Ok(at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0))
}

/// `mayflyd backup --out FILE`: the daemon writes a consistent copy of its SQLite
/// datastore. A relative path is taken from the current directory.
pub async fn backup(out: PathBuf, conn: &Connection) -> anyhow::Result<String> {
    let path = if out.is_absolute() {
        out
    } else {
        std::env::current_dir()?.join(out)
    };
    let mut client = connect(conn).await?;
    let done = call(
        client
            .backup(v1::BackupRequest {
                path: path.display().to_string(),
            })
            .await,
    )?;
    Ok(match conn.output {
        OutputFormat::Json => output::pretty(&serde_json::json!({
            "path": done.path,
            "bytes": done.bytes,
        })),
        OutputFormat::Table => format!(
            "backed up to {} ({} bytes); keep it with a copy of secrets.key\n",
            done.path, done.bytes
        ),
    })
}

//! `mayfly-agent api …`: a Workload API client for operators, over the agent's socket.

use std::path::Path;

use anyhow::{Context, bail};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use mayfly_common::fsutil;
use mayfly_common::svid::{bundle_pem, pem_block};
use mayfly_common::tls::peer_identity;
use mayfly_proto::WORKLOAD_HEADER;
use mayfly_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use mayfly_proto::workload::{
    JwtsvidRequest, ValidateJwtsvidRequest, X509svidRequest, X509svidResponse,
};

use super::endpoint::WorkloadEndpoint;
use super::{ApiCommand, Endpoint, FetchKind};

/// The endpoint named by the flag, `SPIFFE_ENDPOINT_SOCKET`, or the default.
pub fn endpoint_of(endpoint: &Endpoint) -> anyhow::Result<WorkloadEndpoint> {
    WorkloadEndpoint::resolve(endpoint.socket.as_deref())
}

pub async fn client(
    endpoint: &WorkloadEndpoint,
) -> anyhow::Result<SpiffeWorkloadApiClient<Channel>> {
    Ok(SpiffeWorkloadApiClient::new(endpoint.connect().await?))
}

pub fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        WORKLOAD_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    request
}

/// A refusal as one line: the agent's message and the gRPC code.
pub fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", e.message(), e.code())
}

pub async fn run(command: ApiCommand, endpoint: &Endpoint) -> anyhow::Result<String> {
    let mut api = client(&endpoint_of(endpoint)?).await?;
    match command {
        ApiCommand::Fetch {
            kind: FetchKind::X509 { write },
        } => {
            let mut stream = api
                .fetch_x509svid(request(X509svidRequest {}))
                .await
                .map_err(status)?
                .into_inner();
            let first = stream
                .next()
                .await
                .context("the agent closed the stream")?
                .map_err(status)?;
            if let Some(dir) = write {
                write_x509(&dir, &first)?;
            }
            describe_x509(&first, endpoint.json)
        }
        ApiCommand::Fetch {
            kind:
                FetchKind::Jwt {
                    audience,
                    spiffe_id,
                },
        } => {
            let response = api
                .fetch_jwtsvid(request(JwtsvidRequest {
                    audience,
                    spiffe_id: spiffe_id.unwrap_or_default(),
                }))
                .await
                .map_err(status)?
                .into_inner();
            if endpoint.json {
                let list: Vec<_> = response
                    .svids
                    .iter()
                    .map(|s| serde_json::json!({"spiffe_id": s.spiffe_id, "svid": s.svid, "hint": s.hint}))
                    .collect();
                return Ok(format!("{}\n", serde_json::to_string_pretty(&list)?));
            }
            Ok(response
                .svids
                .iter()
                .map(|s| format!("token({}):\n\t{}\n", s.spiffe_id, s.svid))
                .collect())
        }
        ApiCommand::Validate { audience, svid } => {
            let response = api
                .validate_jwtsvid(request(ValidateJwtsvidRequest { audience, svid }))
                .await
                .map_err(status)?
                .into_inner();
            Ok(format!(
                "SVID is valid.\nSPIFFE ID : {}\n",
                response.spiffe_id
            ))
        }
        ApiCommand::Watch { count } => {
            let mut stream = api
                .fetch_x509svid(request(X509svidRequest {}))
                .await
                .map_err(status)?
                .into_inner();
            let mut seen = 0;
            while let Some(update) = stream.next().await {
                let update = update.map_err(status)?;
                print!("{}", describe_x509(&update, endpoint.json)?);
                seen += 1;
                if count.is_some_and(|c| seen >= c) {
                    break;
                }
            }
            Ok(String::new())
        }
    }
}

fn describe_x509(response: &X509svidResponse, json: bool) -> anyhow::Result<String> {
    let mut rows = Vec::new();
    for svid in &response.svids {
        let leaf = split_der(&svid.x509_svid)?
            .into_iter()
            .next()
            .context("empty SVID chain")?;
        let identity = peer_identity(&leaf)?;
        rows.push((
            svid.spiffe_id.clone(),
            identity.serial,
            identity.not_after,
            svid.hint.clone(),
        ));
    }
    if json {
        let list: Vec<_> = rows
            .iter()
            .map(|(id, serial, exp, hint)| serde_json::json!({"spiffe_id": id, "serial": serial, "expires_at": exp, "hint": hint}))
            .collect();
        return Ok(format!("{}\n", serde_json::to_string_pretty(&list)?));
    }
    let mut out = format!("Received {} svid(s)\n", rows.len());
    for (id, serial, exp, hint) in rows {
        let when = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(exp.max(0) as u64),
        );
        out.push_str(&format!(
            "\nSPIFFE ID:\t{id}\nSerial:\t\t{serial}\nExpires:\t{when}\nHint:\t\t{hint}\n"
        ));
    }
    Ok(out)
}

fn write_x509(dir: &Path, response: &X509svidResponse) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (i, svid) in response.svids.iter().enumerate() {
        let chain = split_der(&svid.x509_svid)?;
        let bundle = split_der(&svid.bundle)?;
        let key = zeroize::Zeroizing::new(pem_block("PRIVATE KEY", &svid.x509_svid_key));
        let write = |name: String, data: &[u8], mode: u32| {
            let path = dir.join(name);
            fsutil::write_atomic(&path, data, mode)
                .with_context(|| format!("writing {}", path.display()))
        };
        write(
            format!("svid.{i}.pem"),
            bundle_pem(&chain).as_bytes(),
            0o644,
        )?;
        write(format!("svid.{i}.key"), key.as_bytes(), 0o600)?;
        write(
            format!("bundle.{i}.pem"),
            bundle_pem(&bundle).as_bytes(),
            0o644,
        )?;
    }
    Ok(())
}

/// Splits concatenated DER certificates, as the Workload API sends them.
pub fn split_der(mut bytes: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(bytes)
            .map_err(|e| anyhow::anyhow!("bad certificate in chain: {e}"))?;
        let used = bytes.len() - rest.len();
        if used == 0 {
            bail!("bad certificate in chain");
        }
        out.push(bytes[..used].to_vec());
        bytes = rest;
    }
    Ok(out)
}

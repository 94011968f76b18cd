//! The Rust side of the Workload API interop matrix: the `spiffe` crate (and, for the one
//! request that crate cannot make, a call without the security header, tonic's generated
//! client) driven by commands on stdin, one JSON line per command on stdout reporting what
//! the client itself parsed. tests/interop/README.md describes the commands; the Python
//! (grpcio) and Node (@grpc/grpc-js) programs beside it answer the same ones.

use std::io::BufRead as _;

use futures::StreamExt as _;
use serde_json::{Value, json};
use spiffe::{JwtSvid, SpiffeId, WorkloadApiClient, WorkloadApiError, X509Context};

use mayfly_proto::workload::X509svidRequest;
use mayfly_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

type X509Stream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<X509Context, WorkloadApiError>> + Send>>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let endpoint = std::env::var("SPIFFE_ENDPOINT_SOCKET")?;
    if let Ok(uid) = std::env::var("INTEROP_RUN_AS_UID") {
        drop_to(uid.parse()?)?;
    }
    let client = WorkloadApiClient::connect_to(&endpoint).await?;
    let mut x509: Option<X509Stream> = None;
    let (tx, mut lines) = tokio::sync::mpsc::channel::<String>(8);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = lines.recv().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["x509_open"] => match client.stream_x509_contexts().await {
                Ok(stream) => {
                    let mut stream: X509Stream = Box::pin(stream);
                    let first = next_x509(&mut stream).await;
                    x509 = Some(stream);
                    first
                }
                Err(e) => error(&e),
            },
            ["x509_next"] => match x509.as_mut() {
                Some(stream) => next_x509(stream).await,
                None => json!({"ok": false, "code": "CLIENT", "message": "no open stream"}),
            },
            ["x509_bundles"] => match client.fetch_x509_bundles().await {
                Ok(set) => {
                    let bundles: serde_json::Map<String, Value> = set
                        .iter()
                        .map(|(td, bundle)| {
                            let bytes: usize = bundle
                                .authorities()
                                .iter()
                                .map(|c| c.as_bytes().len())
                                .sum();
                            (td.to_string(), json!(bytes))
                        })
                        .collect();
                    json!({"ok": true, "bundles": bundles})
                }
                Err(e) => error(&e),
            },
            ["jwt", audience] => match client.fetch_jwt_svid([*audience], None).await {
                Ok(svid) => json!({"ok": true, "svids": [jwt(&svid)]}),
                Err(e) => error(&e),
            },
            ["jwt", audience, spiffe_id] => match SpiffeId::new(*spiffe_id) {
                Ok(id) => match client.fetch_jwt_svid([*audience], Some(&id)).await {
                    Ok(svid) => json!({"ok": true, "svids": [jwt(&svid)]}),
                    Err(e) => error(&e),
                },
                Err(e) => json!({"ok": false, "code": "CLIENT", "message": e.to_string()}),
            },
            ["validate", audience, token] => match client.validate_jwt_token(audience, token).await
            {
                Ok(svid) => json!({
                    "ok": true,
                    "spiffe_id": svid.spiffe_id().to_string(),
                    "aud": svid.audience(),
                }),
                Err(e) => error(&e),
            },
            ["jwt_bundles"] => match client.fetch_jwt_bundles().await {
                Ok(set) => {
                    let bundles: serde_json::Map<String, Value> = set
                        .iter()
                        .map(|(td, bundle)| {
                            (td.to_string(), json!(bundle.jwt_authorities().count()))
                        })
                        .collect();
                    json!({"ok": true, "bundles": bundles})
                }
                Err(e) => error(&e),
            },
            ["noheader"] => without_header(&endpoint).await,
            ["quit"] => break,
            _ => {
                json!({"ok": false, "code": "CLIENT", "message": format!("unknown command `{line}`")})
            }
        };
        println!("{answer}");
    }
    Ok(())
}

/// Becomes `uid` (group `uid`, no supplementary groups) before anything connects, so the
/// agent sees a caller of that uid.
fn drop_to(uid: u32) -> anyhow::Result<()> {
    // SAFETY: setgroups/setgid/setuid take plain values; the process is single-threaded
    // in what matters here (the runtime's threads hold no credentials of their own).
    let failed = unsafe {
        libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(uid) != 0
            || libc::setuid(uid) != 0
    };
    if failed {
        anyhow::bail!("becoming uid {uid}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

async fn next_x509(stream: &mut X509Stream) -> Value {
    match stream.next().await {
        Some(Ok(context)) => {
            let bundle_bytes: usize = context
                .bundle_set()
                .iter()
                .flat_map(|(_, bundle)| bundle.authorities().iter().map(|c| c.as_bytes().len()))
                .sum();
            let svids: Vec<Value> = context
                .svids()
                .iter()
                .map(|svid| {
                    json!({
                        "spiffe_id": svid.spiffe_id().to_string(),
                        "chain_bytes": svid.cert_chain().iter().map(|c| c.as_bytes().len()).sum::<usize>(),
                        "key_bytes": svid.private_key().as_bytes().len(),
                        "bundle_bytes": bundle_bytes,
                    })
                })
                .collect();
            json!({"ok": true, "svids": svids})
        }
        Some(Err(e)) => error(&e),
        None => json!({"ok": false, "code": "EOF", "message": "the stream ended"}),
    }
}

fn jwt(svid: &JwtSvid) -> Value {
    json!({"spiffe_id": svid.spiffe_id().to_string(), "token": svid.token()})
}

/// The `spiffe` crate always sends `workload.spiffe.io`; tonic's own client, on the same
/// stack, does not unless told.
async fn without_header(endpoint: &str) -> Value {
    let Some(path) = endpoint.strip_prefix("unix://") else {
        return json!({"ok": false, "code": "CLIENT", "message": "not a unix endpoint"});
    };
    let path = path.to_owned();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await;
    let channel = match channel {
        Ok(channel) => channel,
        Err(e) => return json!({"ok": false, "code": "CLIENT", "message": e.to_string()}),
    };
    let mut api = SpiffeWorkloadApiClient::new(channel);
    match api.fetch_x509svid(X509svidRequest {}).await {
        Ok(response) => match response.into_inner().message().await {
            Ok(Some(_)) => json!({"ok": true, "svids": []}),
            Ok(None) => json!({"ok": false, "code": "EOF", "message": "the stream ended"}),
            Err(status) => status_json(&format!("{:?}", status.code()), status.message()),
        },
        Err(status) => status_json(&format!("{:?}", status.code()), status.message()),
    }
}

/// What the crate reported, with its gRPC code in the canonical upper-case name when it
/// carried one.
fn error(e: &WorkloadApiError) -> Value {
    match e {
        WorkloadApiError::NoIdentityIssued => status_json("PermissionDenied", &e.to_string()),
        WorkloadApiError::PermissionDenied(message) => status_json("PermissionDenied", message),
        WorkloadApiError::Transport(spiffe::transport::TransportError::Status(status)) => {
            status_json(&format!("{:?}", status.code()), &e.to_string())
        }
        other => json!({"ok": false, "code": "CLIENT", "message": other.to_string()}),
    }
}

/// `InvalidArgument` -> `INVALID_ARGUMENT`, the name gRPC's other stacks print.
fn status_json(camel: &str, message: &str) -> Value {
    let mut code = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            code.push('_');
        }
        code.push(c.to_ascii_uppercase());
    }
    json!({"ok": false, "code": code, "message": message})
}

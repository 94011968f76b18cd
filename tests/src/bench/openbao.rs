//! The OpenBao peer: a PKI mount whose `sign` endpoint issues SVID-shaped certificates,
//! the thing Mayfly's CA is compared against.

use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode};
use serde_json::{Value, json};

use super::http1::{Conn, LoopbackAddr};
use super::{BenchResult, CsrPool, Worker, drive};

/// The mount the bench owns; it is dropped and recreated on every run so reruns against
/// the same server start from the same state.
pub const MOUNT: &str = "pki-bench";
pub const ROLE: &str = "svid";
pub const ID_PREFIX: &str = "spiffe://example.org/w/";

pub struct Options {
    pub bao_addr: String,
    pub token: String,
    pub count: u64,
    pub concurrency: usize,
    pub csr_pool: usize,
}

fn token_header(token: &str) -> Result<Vec<(HeaderName, HeaderValue)>> {
    let mut v = HeaderValue::from_str(token).context("the token is not a valid header value")?;
    v.set_sensitive(true);
    Ok(vec![(HeaderName::from_static("x-vault-token"), v)])
}

/// Sends one setup call and insists on a 2xx answer.
async fn call(conn: &mut Conn, method: Method, path: &str, body: Value) -> Result<Value> {
    let payload = if body.is_null() {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    let (status, bytes) = conn
        .send(method.clone(), path, payload)
        .await
        .with_context(|| format!("{method} {path}"))?;
    if !status.is_success() {
        bail!(
            "{method} {path}: {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&bytes).with_context(|| format!("{method} {path}: answer is not JSON"))
}

/// Mounts PKI, makes an EC P-256 root and a role that signs SPIFFE-shaped leaves.
pub async fn setup(conn: &mut Conn) -> Result<()> {
    let mount_path = format!("/v1/sys/mounts/{MOUNT}");
    // Deleting a mount that is not there succeeds, so this is safe on a fresh server.
    call(conn, Method::DELETE, &mount_path, Value::Null).await?;
    call(conn, Method::POST, &mount_path, json!({"type": "pki"})).await?;
    call(
        conn,
        Method::POST,
        &format!("{mount_path}/tune"),
        json!({"max_lease_ttl": "87600h"}),
    )
    .await?;
    call(
        conn,
        Method::POST,
        &format!("/v1/{MOUNT}/root/generate/internal"),
        json!({"common_name": "bench", "key_type": "ec", "key_bits": 256, "ttl": "24h"}),
    )
    .await?;
    call(
        conn,
        Method::POST,
        &format!("/v1/{MOUNT}/roles/{ROLE}"),
        json!({
            "allow_any_name": true,
            "allowed_uri_sans": "spiffe://*",
            "key_type": "ec",
            "key_bits": 256,
            "no_store": true,
            "ttl": "1h",
            "max_ttl": "1h",
            "require_cn": false,
        }),
    )
    .await?;
    Ok(())
}

/// The body of every sign request, serialized once per pool entry before the clock starts.
fn sign_bodies(pool: &CsrPool) -> Vec<Bytes> {
    pool.entries()
        .iter()
        .map(|e| {
            Bytes::from(json!({"csr": e.pem, "uri_sans": e.spiffe_id, "ttl": "1h"}).to_string())
        })
        .collect()
}

/// Checks a sign answer: 200 and a PEM certificate in `data.certificate`.
fn check_sign_answer(status: StatusCode, body: &[u8]) -> Result<()> {
    if status != StatusCode::OK {
        bail!("status {status}: {}", String::from_utf8_lossy(body));
    }
    let v: Value = serde_json::from_slice(body).context("answer is not JSON")?;
    let cert = v
        .pointer("/data/certificate")
        .and_then(Value::as_str)
        .context("answer has no data.certificate")?;
    ensure!(
        cert.starts_with("-----BEGIN CERTIFICATE-----"),
        "data.certificate is not a PEM certificate"
    );
    Ok(())
}

struct SignWorker {
    conn: Conn,
    path: Arc<str>,
    bodies: Arc<[Bytes]>,
}

impl Worker for SignWorker {
    async fn request(&mut self, seq: u64) -> Result<()> {
        // The pool is never empty and the remainder is below its length, so the index fits.
        let body = self.bodies[(seq % self.bodies.len() as u64) as usize].clone();
        let (status, answer) = self.conn.send(Method::POST, &self.path, body).await?;
        check_sign_answer(status, &answer)
    }
}

/// Runs the whole `openbao-sign` benchmark and returns its result (errors included).
pub async fn run(opts: &Options) -> Result<(BenchResult, Option<String>)> {
    ensure!(opts.concurrency > 0, "--concurrency must be at least 1");
    let addr = LoopbackAddr::parse(&opts.bao_addr)?;
    let headers = token_header(&opts.token)?;

    let mut admin = Conn::connect(&addr, headers.clone()).await?;
    setup(&mut admin).await?;
    drop(admin);

    let pool = CsrPool::generate(opts.csr_pool, ID_PREFIX)?;
    let bodies: Arc<[Bytes]> = sign_bodies(&pool).into();
    let path: Arc<str> = format!("/v1/{MOUNT}/sign/{ROLE}").into();

    // Connections are opened before the clock starts, so the run measures signing, not
    // connection set-up; no warm-up request, so exactly `count` sign calls are made.
    let mut workers = Vec::with_capacity(opts.concurrency);
    for _ in 0..opts.concurrency {
        workers.push(SignWorker {
            conn: Conn::connect(&addr, headers.clone()).await?,
            path: Arc::clone(&path),
            bodies: Arc::clone(&bodies),
        });
    }

    let outcome = drive(workers, opts.count).await;
    let first_error = outcome.first_error.clone();
    let result =
        BenchResult::from_outcome("openbao", opts.count, opts.concurrency, pool.len(), outcome);
    Ok((result, first_error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_answer_checks() {
        let good = br#"{"data":{"certificate":"-----BEGIN CERTIFICATE-----\nMII..."}}"#;
        assert!(check_sign_answer(StatusCode::OK, good).is_ok());
        assert!(check_sign_answer(StatusCode::BAD_REQUEST, good).is_err());
        assert!(check_sign_answer(StatusCode::OK, br#"{"data":{}}"#).is_err());
        assert!(check_sign_answer(StatusCode::OK, b"nope").is_err());
    }
}

//! The sink benchmark: a secret rotated on the daemon, timed until the agent's sink file
//! holds the new value. Two clocks per rotation: from the rotate request (all four rotation
//! steps, then the push and the file write) and from the daemon's answer that the new
//! version is promoted (the push and the write alone).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use serde::Serialize;

use mayfly_daemon::cli::{Connection, OutputFormat, operator};
use mayfly_proto::v1::{self};

use super::Latencies;

pub struct Options {
    pub admin_socket: PathBuf,
    /// A secret already granted to the agent, with a sink writing its value to `file`.
    pub secret: String,
    pub file: PathBuf,
    pub rotations: usize,
}

#[derive(Serialize, Debug)]
pub struct SinkResult {
    pub rotations: usize,
    pub request_to_file_p50_ms: f64,
    pub request_to_file_p99_ms: f64,
    pub request_to_file_max_ms: f64,
    pub promoted_to_file_p50_ms: f64,
    pub promoted_to_file_p99_ms: f64,
    pub promoted_to_file_max_ms: f64,
}

pub async fn run(opts: &Options) -> Result<SinkResult> {
    let mut admin = operator::connect(&Connection {
        socket: Some(opts.admin_socket.clone()),
        config: None,
        output: OutputFormat::Json,
    })
    .await?;
    let name = v1::SecretRequest {
        name: opts.secret.clone(),
    };
    let mut from_request = Latencies::with_capacity(opts.rotations);
    let mut from_promoted = Latencies::with_capacity(opts.rotations);
    for _ in 0..opts.rotations {
        let before = std::fs::read(&opts.file).unwrap_or_default();
        let requested = Instant::now();
        admin.rotate_secret(name.clone()).await?;
        let promoted = Instant::now();
        let deadline = promoted + Duration::from_secs(10);
        loop {
            let now = std::fs::read(&opts.file).unwrap_or_default();
            if now != before && !now.is_empty() {
                let at = Instant::now();
                from_request.record(at - requested);
                from_promoted.record(at - promoted);
                let expected = admin.get_secret_value(name.clone()).await?.into_inner();
                ensure!(
                    now == expected.value.as_bytes(),
                    "the sink file changed to something other than the promoted value"
                );
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the sink file did not change within 10 s"
            );
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        // Apart, like rotations are: the next one does not race the last write.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(SinkResult {
        rotations: opts.rotations,
        request_to_file_p50_ms: from_request.percentile_ms(50.0),
        request_to_file_p99_ms: from_request.percentile_ms(99.0),
        request_to_file_max_ms: from_request.percentile_ms(100.0),
        promoted_to_file_p50_ms: from_promoted.percentile_ms(50.0),
        promoted_to_file_p99_ms: from_promoted.percentile_ms(99.0),
        promoted_to_file_max_ms: from_promoted.percentile_ms(100.0),
    })
}

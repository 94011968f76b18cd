//! Finding 3 of the hardening issue: a caller with no certificate could make the daemon
//! check thousands of made-up join tokens and write a record for each. Refusals are now
//! summarised on the trail, and a source refused more than its budget is told to wait
//! (`ResourceExhausted`) before its next attempt costs anything.

use std::time::Duration;

use tonic::Code;

use mayfly_daemon::ca::generate_csr;
use mayfly_proto::v1;
use mayfly_tests::harness::{AgentProcess, DaemonOptions, DaemonProcess, init, wait_for};

#[tokio::test]
async fn a_source_refused_too_often_is_slowed_down_and_does_not_grow_the_trail() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let mut anonymous = daemon.anonymous_node().await.unwrap();
    let (_key, csr) = generate_csr(None).unwrap();
    let mut codes = Vec::new();
    for i in 0..60 {
        let status = anonymous
            .attest(v1::AttestRequest {
                join_token: format!("made-up-token-{i}"),
                csr: csr.clone(),
            })
            .await
            .unwrap_err();
        codes.push((status.code(), status.message().to_string()));
    }
    let slowed = codes
        .iter()
        .filter(|(code, _)| *code == Code::ResourceExhausted)
        .count();
    // The budget is 20 refusals, regaining one a second while the loop runs.
    assert!(
        (30..=40).contains(&slowed),
        "expected most of the 60 attempts slowed down, got {slowed}: {codes:?}"
    );
    assert_ne!(
        codes[0].0,
        Code::ResourceExhausted,
        "the first attempt is judged"
    );
    let (_, message) = codes.last().unwrap();
    assert!(
        message.contains("too many refused calls from 127.0.0.1") && message.contains("retry in"),
        "{message}"
    );

    // The same source's calls without a certificate are slowed down too.
    let status = anonymous
        .sign_svids(v1::SignSvidsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // A real agent behind the same address waits for the budget to refill, then attests.
    let token = daemon
        .join_token("spiffe://example.org/node/patient")
        .unwrap();
    let mut attested = None;
    for _ in 0..30 {
        match anonymous
            .attest(v1::AttestRequest {
                join_token: token.clone(),
                csr: csr.clone(),
            })
            .await
        {
            Ok(response) => {
                attested = Some(response.into_inner());
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    let attested = attested.expect("the agent attests once the budget refills");
    assert_eq!(attested.spiffe_id, "spiffe://example.org/node/patient");

    // The trail holds the first refusal of each kind, not one record per attempt.
    let records = daemon
        .cli_json(&["audit", "list", "--action", "agent.attest"])
        .unwrap();
    let denied = records
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["outcome"] == "denied")
        .count();
    assert!(
        denied <= 2,
        "{denied} refusal records for 60 attempts: {records:#}"
    );
}

#[tokio::test]
async fn a_workload_looping_on_a_refused_call_leaves_one_record_and_a_count() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let agent = AgentProcess::start(&daemon, "spiffe://example.org/node/loop").unwrap();
    // No entry for this workload: every fetch is refused and reported by the agent.
    for _ in 0..40 {
        let out = agent.api(&["fetch", "x509"], None).unwrap();
        assert!(!out.status.success());
    }
    let denied = |daemon: &DaemonProcess| -> Vec<serde_json::Value> {
        daemon
            .cli_json(&["audit", "list", "--action", "workload.denied"])
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    };
    wait_for("the agent's report", Duration::from_secs(10), || {
        !denied(&daemon).is_empty()
    });
    // Reports are sent about once a second; give the last one time to arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let records = denied(&daemon);
    assert!(
        records.len() <= 2,
        "{} records for 40 refusals: {records:#?}",
        records.len()
    );
    assert_eq!(records[0]["subject"], "FetchX509SVID", "{records:#?}");
}

//! Runtime authorization end to end: a real `mayflyd` with Cedar policies in its
//! policy_dir, real agents and the `spiffe` crate as the workload, the node API played
//! over mTLS, and the operator's `mayflyd policy …` commands.

use std::time::Duration;

use spiffe::WorkloadApiClient;
use tokio_stream::StreamExt;
use tonic::Code;

use mayfly_proto::v1::{self, sync_message::Update};
use mayfly_tests::harness::{
    AgentProcess, DaemonOptions, DaemonProcess, csr_request, init, wait_for,
};

const NODE_A: &str = "spiffe://example.org/node/a";
const NODE_B: &str = "spiffe://example.org/node/b";

const NO_BILLING: &str = r#"@id("no-billing-tokens")
forbid(principal, action == Mayfly::Action::"mint_jwt_svid", resource == Mayfly::Audience::"billing");
"#;

/// A daemon whose policy_dir holds `files`; `enforce = false` for shadow mode.
fn daemon_with(files: &[(&str, &str)], enforce: bool) -> (DaemonProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let daemon = DaemonProcess::start(DaemonOptions {
        extra_toml: format!(
            "[policy]\ndir = \"{}\"\nenforce = {enforce}\n",
            dir.path().display()
        ),
        ..Default::default()
    })
    .unwrap();
    (daemon, dir)
}

fn audit(daemon: &DaemonProcess, action: &str) -> Vec<serde_json::Value> {
    daemon
        .cli_json(&["audit", "list", "--action", action])
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn mint(entry_id: &str, audience: &str) -> v1::MintJwtSvidRequest {
    v1::MintJwtSvidRequest {
        entry_id: entry_id.to_string(),
        audience: vec![audience.to_string()],
    }
}

fn policy_hash(daemon: &DaemonProcess) -> String {
    daemon.cli_json(&["policy", "show"]).unwrap()["hash"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A JWT-SVID for the permitted audience "orders", once the agent has the entry (it
/// arrives asynchronously).
async fn permitted_jwt(api: &WorkloadApiClient) -> spiffe::JwtSvid {
    for _ in 0..100 {
        if let Ok(jwt) = api.fetch_jwt_svid(["orders"], None).await {
            return jwt;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no JWT-SVID for a permitted audience within 10 s");
}

#[tokio::test]
async fn a_forbidden_jwt_audience_is_refused_at_the_agent_while_others_work() {
    init();
    let (daemon, _dir) = daemon_with(&[("jwt.cedar", NO_BILLING)], true);
    daemon
        .create_entry("spiffe://example.org/web", NODE_A, "unix:uid:0", &[])
        .unwrap();
    let agent = AgentProcess::start(&daemon, NODE_A).unwrap();
    let api = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();

    // The entry reaches the agent asynchronously; a permitted audience works once it has.
    let token = permitted_jwt(&api).await;
    assert_eq!(token.spiffe_id().to_string(), "spiffe://example.org/web");

    let refused = api
        .fetch_jwt_svid(["billing"], None)
        .await
        .expect_err("the forbidden audience is refused");
    let text = format!("{refused:?}");
    assert!(
        text.contains("PermissionDenied") && text.contains("no-billing-tokens"),
        "{text}"
    );

    // Decided at the agent, which reports it: on the daemon's trail within a second or so.
    wait_for(
        "the agent's denial on the audit trail",
        Duration::from_secs(10),
        || {
            audit(&daemon, "workload.denied").iter().any(|r| {
                r["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("denied by policy no-billing-tokens")
            })
        },
    );
    let denied = audit(&daemon, "jwt.mint");
    let hash = policy_hash(&daemon);
    let granted = denied
        .iter()
        .find(|r| r["outcome"] == "ok")
        .expect("the grant is on the trail");
    assert!(
        granted["detail"].to_string().contains(&hash),
        "a granting record carries the policy set's hash: {granted}"
    );
}

#[tokio::test]
async fn a_node_scoped_forbid_stops_one_agents_signing_only() {
    init();
    let (daemon, _dir) = daemon_with(
        &[(
            "nodes.cedar",
            &format!(
                "@id(\"quarantine-node-b\")\nforbid(principal, action == Mayfly::Action::\"sign_x509_svid\", resource)\nwhen {{ context.node == \"{NODE_B}\" }};\n"
            ),
        )],
        true,
    );
    let a = daemon.attest(NODE_A).await.unwrap();
    let b = daemon.attest(NODE_B).await.unwrap();
    let on_a = daemon
        .create_entry("spiffe://example.org/web", NODE_A, "unix:uid:1000", &[])
        .unwrap();
    let on_b = daemon
        .create_entry("spiffe://example.org/web", NODE_B, "unix:uid:1000", &[])
        .unwrap();

    let signed = daemon
        .node(&a)
        .await
        .unwrap()
        .sign_svids(csr_request(&on_a))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(signed.svids.len(), 1);
    let refused = daemon
        .node(&b)
        .await
        .unwrap()
        .sign_svids(csr_request(&on_b))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("quarantine-node-b"),
        "{refused:?}"
    );

    // Refusals are noted without waiting for their commit: wait for it here.
    wait_for("the denial on the trail", Duration::from_secs(10), || {
        audit(&daemon, "svid.sign")
            .iter()
            .any(|r| r["outcome"] == "denied")
    });
    let trail = audit(&daemon, "svid.sign");
    let denial = trail
        .iter()
        .find(|r| r["outcome"] == "denied")
        .expect("the denial is on the trail");
    assert_eq!(denial["actor"], NODE_B);
    assert!(
        denial["detail"].to_string().contains("quarantine-node-b"),
        "{denial}"
    );
    assert!(
        trail.iter().any(|r| r["outcome"] == "ok"
            && r["actor"] == NODE_A
            && r["detail"].to_string().contains(&policy_hash(&daemon))),
        "{trail:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbid_on_an_entry_set_stops_the_entries_in_it_until_they_leave_it() {
    init();
    let (daemon, _dir) = daemon_with(
        &[(
            "frozen.cedar",
            "@id(\"frozen-entries\")\nforbid(principal, action == Mayfly::Action::\"sign_x509_svid\", resource in Mayfly::EntrySet::\"frozen\");\n",
        )],
        true,
    );
    let a = daemon.attest(NODE_A).await.unwrap();
    let frozen = daemon
        .create_entry(
            "spiffe://example.org/web",
            NODE_A,
            "unix:uid:1000",
            &["--set", "frozen", "--set", "prod", "--set", "frozen"],
        )
        .unwrap();
    let thawed = daemon
        .create_entry(
            "spiffe://example.org/api",
            NODE_A,
            "unix:uid:1001",
            &["--set", "prod"],
        )
        .unwrap();
    let shown = daemon.cli_json(&["entry", "show", &frozen]).unwrap();
    assert_eq!(
        shown["sets"],
        serde_json::json!(["frozen", "prod"]),
        "{shown}"
    );

    let mut node = daemon.node(&a).await.unwrap();
    let refused = node.sign_svids(csr_request(&frozen)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("frozen-entries"), "{refused:?}");
    let signed = node
        .sign_svids(csr_request(&thawed))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(signed.svids.len(), 1);

    // Bad set names are refused by name, and the entry stays as it was.
    let bad = daemon
        .cli(&["entry", "update", &frozen, "--set", "tab\there"])
        .unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("sets"), "{stderr}");
    let unchanged = daemon.cli_json(&["entry", "show", &frozen]).unwrap();
    assert_eq!(unchanged["sets"], serde_json::json!(["frozen", "prod"]));

    daemon
        .cli_ok(&["entry", "update", &frozen, "--clear-sets"])
        .unwrap();
    let signed = node
        .sign_svids(csr_request(&frozen))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(signed.svids.len(), 1, "out of the set, signed again");
}

/// A window of two hours that does not include the present hour (UTC), and one that does.
fn windows() -> (String, String) {
    let hour = (mayfly_common::clock::unix(std::time::SystemTime::now()) / 3600 % 24) as u32;
    let window = |from: u32, hours: u32| {
        format!(
            "@id(\"office-hours\")\nforbid(principal, action == Mayfly::Action::\"read_secret\", resource)\n\
             unless {{ context.time.toTime() >= duration(\"{from}h\") && context.time.toTime() < duration(\"{}h\") }};\n",
            from + hours
        )
    };
    // Two hours ending 2 hours before now (or starting 3 hours after, early in the day)
    // leave now and the next hour outside; three hours from the hour before hold now and
    // the next hour, so the test may cross an hour either way.
    let outside = if hour >= 4 { hour - 4 } else { hour + 3 };
    let inside = hour.saturating_sub(1).min(21);
    (window(outside, 2), window(inside, 3))
}

async fn next_full_state(stream: &mut tonic::Streaming<v1::SyncMessage>) -> v1::FullState {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a sync message within 10 s")
            .expect("stream open")
            .expect("no error");
        if let Some(Update::FullState(state)) = message.update {
            return state;
        }
    }
}

#[tokio::test]
async fn a_time_window_refuses_a_secret_grant_outside_it_and_a_reload_grants_it_inside() {
    init();
    let (outside, inside) = windows();
    let (daemon, dir) = daemon_with(&[("hours.cedar", &outside)], true);
    let agent = daemon.attest(NODE_A).await.unwrap();
    daemon
        .create_entry("spiffe://example.org/db", NODE_A, "unix:uid:1000", &[])
        .unwrap();
    daemon
        .define_secret(
            "name = \"db-password\"\nschedule = \"@yearly\"\ngrants = [\"spiffe://example.org/db\"]\n\
             [store]\nkind = \"local\"\n[target]\nkind = \"none\"\n",
        )
        .unwrap();
    daemon.cli_ok(&["secret", "rotate", "db-password"]).unwrap();

    let mut node = daemon.node(&agent).await.unwrap();
    let mut stream = node.sync(v1::SyncRequest {}).await.unwrap().into_inner();
    let state = next_full_state(&mut stream).await;
    assert_eq!(state.entries.len(), 1);
    assert!(
        state.secrets.is_empty(),
        "outside the window the secret is not granted: {:?}",
        state.secrets.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    wait_for(
        "the refused grant on the trail",
        Duration::from_secs(10),
        || {
            audit(&daemon, "secret.grant")
                .iter()
                .any(|r| r["outcome"] == "denied")
        },
    );
    let denial = audit(&daemon, "secret.grant")
        .into_iter()
        .find(|r| r["outcome"] == "denied")
        .expect("the refused grant is on the trail");
    assert!(
        denial["reason"].as_str().unwrap().contains("office-hours"),
        "{denial}"
    );

    // Inside the window, reloaded: the agent's stream gets the secret at once.
    std::fs::write(dir.path().join("hours.cedar"), inside).unwrap();
    daemon.cli_ok(&["policy", "reload"]).unwrap();
    let state = next_full_state(&mut stream).await;
    assert_eq!(
        state
            .secrets
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["db-password"]
    );
    let reloads = audit(&daemon, "policy.reload");
    assert!(reloads.iter().any(|r| r["outcome"] == "ok"), "{reloads:?}");
}

#[tokio::test]
async fn an_invalid_policy_is_refused_and_the_old_one_keeps_deciding() {
    init();
    let (daemon, dir) = daemon_with(&[("jwt.cedar", NO_BILLING)], true);
    let agent = daemon.attest(NODE_A).await.unwrap();
    let entry = daemon
        .create_entry("spiffe://example.org/web", NODE_A, "unix:uid:1000", &[])
        .unwrap();
    let before = policy_hash(&daemon);

    std::fs::write(
        dir.path().join("typo.cedar"),
        "permit(principal, action, resource)\nwhen { resource.onwer == \"x\" };\n",
    )
    .unwrap();
    let out = daemon.cli(&["policy", "reload"]).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("typo.cedar:2:") && stderr.contains("onwer"),
        "names the file, line and attribute: {stderr}"
    );
    assert!(stderr.contains("the active policy set stays"), "{stderr}");
    assert_eq!(policy_hash(&daemon), before);
    let refused = daemon
        .node(&agent)
        .await
        .unwrap()
        .mint_jwt_svid(mint(&entry, "billing"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let failed = audit(&daemon, "policy.reload");
    assert!(
        failed.iter().any(|r| r["outcome"] == "failed"
            && r["reason"].as_str().unwrap_or("").contains("typo.cedar:2:")),
        "{failed:?}"
    );

    // `policy validate` says the same offline, and a daemon will not start on it.
    let out = daemon
        .cli(&["policy", "validate", &dir.path().display().to_string()])
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("typo.cedar:2:"));
    let refused = DaemonProcess::start(DaemonOptions {
        extra_toml: format!("[policy]\ndir = \"{}\"\n", dir.path().display()),
        ..Default::default()
    })
    .err()
    .expect("a daemon does not start on a policy set that does not validate");
    assert!(
        format!("{refused:#}").contains("loading the policies: typo.cedar:2:"),
        "{refused:#}"
    );
}

#[tokio::test]
async fn a_reload_under_load_loses_no_request() {
    init();
    let (daemon, dir) = daemon_with(&[("jwt.cedar", NO_BILLING)], true);
    let agent = daemon.attest(NODE_A).await.unwrap();
    let entry = daemon
        .create_entry("spiffe://example.org/web", NODE_A, "unix:uid:1000", &[])
        .unwrap();
    let node = daemon.node(&agent).await.unwrap();

    let load = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for worker in 0..4 {
            let mut node = node.clone();
            let entry = entry.clone();
            tasks.push(tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for i in 0..150 {
                    let audience = format!("svc-{worker}-{i}");
                    let ok = node.mint_jwt_svid(mint(&entry, &audience)).await.is_ok();
                    let billing = node.mint_jwt_svid(mint(&entry, "billing")).await;
                    outcomes.push((ok, billing.map(|_| ()).map_err(|e| e.code())));
                }
                outcomes
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all
    });
    // Reloads of sets that all forbid billing, one of them extended each time.
    for n in 0..6 {
        let extra = format!(
            "@id(\"extra-{n}\")\nforbid(principal, action == Mayfly::Action::\"mint_jwt_svid\", resource == Mayfly::Audience::\"never-{n}\");\n"
        );
        std::fs::write(dir.path().join("extra.cedar"), extra).unwrap();
        daemon.cli_ok(&["policy", "reload"]).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let outcomes = load.await.unwrap();
    assert_eq!(outcomes.len(), 600);
    assert!(
        outcomes.iter().all(|(ok, _)| *ok),
        "every permitted request was granted across the reloads"
    );
    assert!(
        outcomes
            .iter()
            .all(|(_, billing)| *billing == Err(Code::PermissionDenied)),
        "every forbidden request was refused across the reloads"
    );
}

#[tokio::test]
async fn shadow_mode_audits_would_be_denials_and_refuses_nothing() {
    init();
    let (daemon, _dir) = daemon_with(&[("jwt.cedar", NO_BILLING)], false);
    let agent = daemon.attest(NODE_A).await.unwrap();
    let entry = daemon
        .create_entry("spiffe://example.org/web", NODE_A, "unix:uid:1000", &[])
        .unwrap();
    daemon
        .node(&agent)
        .await
        .unwrap()
        .mint_jwt_svid(mint(&entry, "billing"))
        .await
        .expect("shadow mode refuses nothing");
    let shown = daemon.cli_ok(&["policy", "show"]).unwrap();
    assert!(shown.contains("mode: shadow"), "{shown}");
    wait_for(
        "the would-be denial on the trail",
        Duration::from_secs(5),
        || {
            audit(&daemon, "jwt.mint").iter().any(|r| {
                r["outcome"] == "would-deny"
                    && r["reason"]
                        .as_str()
                        .unwrap_or("")
                        .contains("no-billing-tokens")
            })
        },
    );
}

#[tokio::test]
async fn policy_test_explains_a_decision_with_what_the_daemon_knows() {
    init();
    let (daemon, _dir) = daemon_with(&[("jwt.cedar", NO_BILLING)], true);
    let json = daemon
        .cli_json(&[
            "policy",
            "test",
            "--principal",
            "Mayfly::Workload::\"spiffe://example.org/web\"",
            "--action",
            "mint_jwt_svid",
            "--resource",
            "Mayfly::Audience::\"billing\"",
        ])
        .unwrap();
    assert_eq!(json["decision"], "deny");
    assert_eq!(json["policies"][0], "no-billing-tokens");
    let json = daemon
        .cli_json(&[
            "policy",
            "test",
            "--principal",
            "Mayfly::Operator::\"0\"",
            "--action",
            "admin_write",
            "--resource",
            "Mayfly::AdminCall::\"CreateEntry\"",
            "--context",
            "{\"time\": \"2026-01-01T03:00:00Z\"}",
        ])
        .unwrap();
    assert_eq!(json["decision"], "allow");
    assert_eq!(json["policies"][0], "mayfly-default-admin");
    assert_eq!(
        json["request"]["context"]["time"],
        "2026-01-01T03:00:00.000Z"
    );
    let out = daemon
        .cli(&[
            "policy",
            "test",
            "--principal",
            "Mayfly::Robot::\"x\"",
            "--action",
            "fly",
            "--resource",
            "Mayfly::Audience::\"a\"",
        ])
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown action `fly`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn an_admin_forbid_refuses_the_call_but_never_the_policy_calls() {
    init();
    let (daemon, dir) = daemon_with(
        &[(
            "admin.cedar",
            "@id(\"no-new-entries\")\nforbid(principal, action, resource == Mayfly::AdminCall::\"CreateEntry\");\n",
        )],
        true,
    );
    let out = daemon
        .cli(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/web",
            "--parent-id",
            NODE_A,
            "--selector",
            "unix:uid:1000",
        ])
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-new-entries"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        daemon.cli_ok(&["entry", "list"]).is_ok(),
        "reads still work"
    );
    // Even a policy forbidding every admin call leaves show and reload, to undo it.
    std::fs::write(
        dir.path().join("admin.cedar"),
        "forbid(principal, action, resource);\n",
    )
    .unwrap();
    daemon.cli_ok(&["policy", "reload"]).unwrap();
    assert!(daemon.cli(&["entry", "list"]).unwrap().status.code() != Some(0));
    std::fs::remove_file(dir.path().join("admin.cedar")).unwrap();
    daemon.cli_ok(&["policy", "reload"]).unwrap();
    daemon
        .create_entry("spiffe://example.org/web", NODE_A, "unix:uid:1000", &[])
        .unwrap();
}

#[tokio::test]
async fn the_agent_decides_with_the_callers_selectors_and_holds_a_deny_while_the_daemon_is_down() {
    init();
    let local_only = r#"@id("root-gets-no-x509")
forbid(principal, action == Mayfly::Action::"sign_x509_svid", resource)
when { context.source == "workload_api" && context.selectors.contains("unix:uid:0") };
"#;
    let (mut daemon, _dir) = daemon_with(
        &[("jwt.cedar", NO_BILLING), ("local.cedar", local_only)],
        true,
    );
    daemon
        .create_entry("spiffe://example.org/web", NODE_A, "unix:uid:0", &[])
        .unwrap();
    let agent = AgentProcess::start(&daemon, NODE_A).unwrap();
    let api = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    permitted_jwt(&api).await;

    // The daemon signed the SVID (its requests come from the node API); the agent, which
    // knows the caller is uid 0, refuses to hand it out.
    let refused = api
        .fetch_x509_context()
        .await
        .expect_err("the X509-SVID is refused to this caller");
    let text = format!("{refused:?}");
    assert!(text.contains("root-gets-no-x509"), "{text}");

    // With the daemon gone, the pushed policy still refuses billing at the agent.
    daemon.kill();
    let refused = api
        .fetch_jwt_svid(["billing"], None)
        .await
        .expect_err("still refused");
    let text = format!("{refused:?}");
    assert!(
        text.contains("PermissionDenied") && text.contains("no-billing-tokens"),
        "{text}"
    );
}

/// `mayfly-agent exec` with one secret in the environment, running `touch PATH`; its status.
fn exec_with_secret(agent: &AgentProcess, secret: &str, touch: &std::path::Path) -> Option<i32> {
    let mut child =
        std::process::Command::new(mayfly_tests::harness::binary("mayfly-agent").unwrap())
            .arg("exec")
            .arg("--socket")
            .arg(&agent.socket_path)
            .args(["--env", &format!("KEY=secret:{secret}"), "--wait", "3s"])
            .args(["--", "/bin/sh", "-c", &format!("touch {}", touch.display())])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        assert!(std::time::Instant::now() < deadline, "exec did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn the_agent_withholds_a_secret_a_policy_forbids_on_the_workload_api() {
    init();
    let forbid = r#"@id("no-app-key-on-the-socket")
forbid(principal, action == Mayfly::Action::"read_secret", resource == Mayfly::Secret::"app-key")
when { context.source == "workload_api" };
"#;
    let (daemon, _dir) = daemon_with(&[("secrets.cedar", forbid)], true);
    daemon
        .create_entry("spiffe://example.org/app", NODE_A, "unix:uid:0", &[])
        .unwrap();
    for name in ["app-key", "open-key"] {
        daemon
            .define_secret(&format!(
                "name = \"{name}\"\nschedule = \"@yearly\"\ngrants = [\"spiffe://example.org/app\"]\n\
                 [store]\nkind = \"local\"\n[target]\nkind = \"none\"\n"
            ))
            .unwrap();
        daemon.cli_ok(&["secret", "rotate", name]).unwrap();
    }
    let agent = AgentProcess::start(&daemon, NODE_A).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open");
    assert_eq!(exec_with_secret(&agent, "open-key", &open), Some(0));
    assert!(open.exists(), "a permitted secret reaches the program");
    // The daemon granted app-key to the agent (its policy speaks of the Workload API
    // only); the agent does not hand it to the workload.
    let withheld = dir.path().join("withheld");
    assert_eq!(exec_with_secret(&agent, "app-key", &withheld), Some(125));
    assert!(!withheld.exists());
}

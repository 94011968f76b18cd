//! The Workload API interop matrix: `mayflyd dev` as a newcomer runs it, and one client
//! program per gRPC stack nobody here wrote (the Rust `spiffe` crate, Python grpcio on
//! gRPC's C core, Node @grpc/grpc-js), each asked the whole matrix. Every assertion is on
//! what the client itself reported.

use std::time::{Duration, Instant};

use serde_json::Value;

use mayfly_tests::harness::init;
use mayfly_tests::interop::{DevMode, InteropClient, Stack};

/// A uid with no entry: `nobody`.
const UNREGISTERED_UID: u32 = 65534;

fn ids(answer: &Value) -> Vec<String> {
    let mut ids: Vec<String> = answer["svids"]
        .as_array()
        .map(|svids| {
            svids
                .iter()
                .filter_map(|s| s["spiffe_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// Reads stream messages until the client reports exactly `want` (an entry's SVID is
/// signed a moment after the entry reaches the agent, so an intermediate state may come
/// first); fails with every message seen.
fn x509_until(client: &mut InteropClient, want: &[&str]) -> Value {
    let mut want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let answer = client.ask("x509_next").unwrap();
        assert_eq!(
            answer["ok"],
            true,
            "{}: stream error {answer}",
            client.stack.name()
        );
        if ids(&answer) == want {
            return answer;
        }
        seen.push(answer);
        assert!(
            Instant::now() < deadline && seen.len() < 20,
            "{}: never reported {want:?}; saw {seen:?}",
            client.stack.name()
        );
    }
}

fn assert_whole_svids(stack: Stack, answer: &Value) {
    for svid in answer["svids"].as_array().unwrap() {
        for field in ["chain_bytes", "key_bytes", "bundle_bytes"] {
            assert!(
                svid[field].as_u64().unwrap_or(0) > 0,
                "{}: {field} empty in {svid}",
                stack.name()
            );
        }
    }
}

fn assert_code(stack: Stack, answer: &Value, code: &str, what: &str) {
    assert_eq!(
        answer["ok"],
        false,
        "{}: {what} succeeded: {answer}",
        stack.name()
    );
    assert_eq!(answer["code"], code, "{}: {what}: {answer}", stack.name());
}

fn matrix(stack: Stack) {
    init();
    let dev = DevMode::start().unwrap();
    let td = "example.org";
    let mut client = InteropClient::start(stack, &dev.endpoint(), None).unwrap();
    let name = stack.name();

    // FetchX509SVID: the first message, then one after an entry is created, then one
    // after it is deleted, all on the same stream.
    let first = client.ask("x509_open").unwrap();
    assert_eq!(first["ok"], true, "{name}: {first}\n{}", client.stderr());
    assert_eq!(ids(&first), vec![dev.workload_id.clone()], "{name}");
    assert_whole_svids(stack, &first);

    let extra = format!("spiffe://{td}/interop/{name}");
    let created = dev
        .cli_json(&[
            "entry",
            "create",
            "--spiffe-id",
            &extra,
            "--parent-id",
            &dev.node_id,
            "--selector",
            "unix:uid:0",
        ])
        .unwrap();
    let both = x509_until(&mut client, &[&dev.workload_id, &extra]);
    assert_whole_svids(stack, &both);
    let id = created["id"].as_str().unwrap();
    let deleted = dev.cli(&["entry", "delete", id]).unwrap();
    assert!(
        deleted.status.success(),
        "{}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    x509_until(&mut client, &[&dev.workload_id]);

    // FetchX509Bundles.
    let bundles = client.ask("x509_bundles").unwrap();
    assert_eq!(bundles["ok"], true, "{name}: {bundles}");
    assert!(
        bundles["bundles"][td].as_u64().unwrap_or(0) > 0,
        "{name}: {bundles}"
    );

    // FetchJWTSVID, then ValidateJWTSVID with the right and a wrong audience.
    let audience = format!("aud-{name}");
    let jwt = client.ask(&format!("jwt {audience}")).unwrap();
    assert_eq!(jwt["ok"], true, "{name}: {jwt}");
    assert_eq!(ids(&jwt), vec![dev.workload_id.clone()], "{name}");
    let token = jwt["svids"][0]["token"].as_str().unwrap().to_owned();
    let valid = client.ask(&format!("validate {audience} {token}")).unwrap();
    assert_eq!(valid["ok"], true, "{name}: {valid}");
    assert_eq!(valid["spiffe_id"], dev.workload_id.as_str(), "{name}");
    assert!(
        valid["aud"]
            .as_array()
            .is_some_and(|aud| aud.iter().any(|a| a == audience.as_str())),
        "{name}: {valid}"
    );
    let wrong = client
        .ask(&format!("validate someone-else {token}"))
        .unwrap();
    assert_code(stack, &wrong, "INVALID_ARGUMENT", "a wrong audience");

    // FetchJWTBundles.
    let jwt_bundles = client.ask("jwt_bundles").unwrap();
    assert_eq!(jwt_bundles["ok"], true, "{name}: {jwt_bundles}");
    assert!(
        jwt_bundles["bundles"][td].as_u64().unwrap_or(0) >= 1,
        "{name}: {jwt_bundles}"
    );

    // No security header.
    let bare = client.ask("noheader").unwrap();
    assert_code(
        stack,
        &bare,
        "INVALID_ARGUMENT",
        "a request without the header",
    );
    drop(client);

    // A uid with no entry.
    let mut stranger =
        InteropClient::start(stack, &dev.endpoint(), Some(UNREGISTERED_UID)).unwrap();
    let denied = stranger.ask("x509_open").unwrap();
    assert_code(
        stack,
        &denied,
        "PERMISSION_DENIED",
        "an unregistered uid's X509-SVID",
    );
    let denied = stranger.ask("jwt anyone").unwrap();
    assert_code(
        stack,
        &denied,
        "PERMISSION_DENIED",
        "an unregistered uid's JWT-SVID",
    );
    drop(stranger);
    assert!(
        dev.cli(&["entry", "list"]).unwrap().status.success(),
        "the dev daemon still answers"
    );
}

#[test]
fn the_spiffe_crate_passes_the_whole_matrix() {
    matrix(Stack::RustSpiffe);
}

#[test]
fn python_grpcio_passes_the_whole_matrix() {
    matrix(Stack::PythonGrpcio);
}

#[test]
fn node_grpc_js_passes_the_whole_matrix() {
    matrix(Stack::NodeGrpcJs);
}

/// `mayflyd dev` makes its join token and its entry as an operator would, so both are on
/// the audit trail, and the trail verifies.
#[test]
fn dev_mode_leaves_an_audit_record_of_its_token_and_entry() {
    init();
    let dev = DevMode::start().unwrap();
    let records = dev.cli_json(&["audit", "list"]).unwrap();
    let records = records.as_array().unwrap();
    let find = |action: &str| {
        records
            .iter()
            .find(|r| r["action"] == action)
            .unwrap_or_else(|| panic!("no {action} record in {records:?}"))
    };
    let token = find("token.create");
    assert_eq!(token["subject"], dev.node_id.as_str());
    assert!(
        token["actor"].as_str().unwrap().starts_with("uid:"),
        "{token}"
    );
    let entry = find("entry.create");
    assert_eq!(entry["subject"], dev.workload_id.as_str());
    // The agent then attested with that token.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dev
        .cli_json(&["audit", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["action"] == "agent.attest")
    {
        assert!(Instant::now() < deadline, "no attestation record");
        std::thread::sleep(Duration::from_millis(100));
    }
    let verify = dev.cli(&["audit", "verify"]).unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

/// `mayfly-agent api --socket` takes what `SPIFFE_ENDPOINT_SOCKET` takes, and says which
/// endpoint it could not reach or could not read.
#[test]
fn the_api_client_takes_every_endpoint_form_and_names_what_it_cannot_use() {
    init();
    let dev = DevMode::start().unwrap();
    let agent = mayfly_tests::harness::binary("mayfly-agent").unwrap();
    let run = |socket: Option<&str>, env: Option<&str>| {
        let mut command = std::process::Command::new(&agent);
        command.args(["api", "fetch", "x509"]);
        if let Some(socket) = socket {
            command.args(["--socket", socket]);
        }
        command.env_remove("SPIFFE_ENDPOINT_SOCKET");
        if let Some(env) = env {
            command.env("SPIFFE_ENDPOINT_SOCKET", env);
        }
        command.output().unwrap()
    };
    let path = dev.workload_socket.display().to_string();
    for (socket, env) in [
        (Some(dev.endpoint()), None),
        (Some(path.clone()), None),
        (Some(format!("unix:{path}")), None),
        (None, Some(dev.endpoint())),
    ] {
        let out = run(socket.as_deref(), env.as_deref());
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(&dev.workload_id),
            "--socket {socket:?} / SPIFFE_ENDPOINT_SOCKET {env:?}: {}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let missing = "unix:///nonexistent/mayfly/api.sock";
    for (socket, env, says) in [
        (
            Some(missing),
            None,
            "cannot reach the Workload API at unix:///nonexistent/mayfly/api.sock",
        ),
        (
            None,
            Some(missing),
            "cannot reach the Workload API at unix:///nonexistent/mayfly/api.sock",
        ),
        (
            Some("http://127.0.0.1:1"),
            None,
            "--socket `http://127.0.0.1:1`: unsupported scheme",
        ),
        (
            None,
            Some("tcp://localhost:1"),
            "SPIFFE_ENDPOINT_SOCKET `tcp://localhost:1`",
        ),
        (Some("unix://host/x.sock"), None, "names no host"),
    ] {
        let out = run(socket, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{socket:?} {env:?} succeeded");
        assert!(stderr.contains(says), "{socket:?} {env:?}: {stderr}");
    }
}

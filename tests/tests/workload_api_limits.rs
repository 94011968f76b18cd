//! A local user with no entry cannot exhaust the agent's descriptors: before, twenty
//! thousand idle connections from such a uid left registered workloads unanswered and
//! sinks failing with "Too many open files". Now a uid holds at most
//! `max_connections_per_uid` (more are closed at accept), and a connection that sends no
//! request within `first_request_timeout` is closed; registered workloads keep being
//! served throughout.

use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use mayfly_tests::harness::{AgentProcess, DaemonOptions, DaemonProcess, init, wait_for};

/// Opens 100 connections as uid 1101 and reports, as JSON, how many the agent closed
/// within 1 s (refused at accept) and how many within 4 s (idle ones too).
const FLOOD: &str = r#"
import json, socket, sys, time
conns = []
for _ in range(100):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    conns.append(s)
def closed():
    # The agent speaks first (its HTTP/2 settings): drain what it sent, then look for EOF.
    n = 0
    for s in conns:
        s.setblocking(False)
        try:
            while True:
                data = s.recv(4096)
                if data == b"":
                    n += 1
                    break
        except BlockingIOError:
            pass
        except OSError:
            n += 1
    return n
time.sleep(1)
early = closed()
time.sleep(3)
print(json.dumps({"early": early, "late": closed()}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_uid_cannot_hold_the_agents_connections() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let node = "spiffe://example.org/node/limits";
    daemon
        .create_entry("spiffe://example.org/root-app", node, "unix:uid:0", &[])
        .unwrap();
    let agent = AgentProcess::start_with(
        &daemon,
        node,
        "max_connections_per_uid = 20\nfirst_request_timeout = \"2s\"\n",
    )
    .unwrap();
    wait_for(
        "the registered workload is served",
        Duration::from_secs(15),
        || {
            agent
                .api(&["fetch", "x509"], None)
                .unwrap()
                .status
                .success()
        },
    );

    let flood = Command::new("python3")
        .args(["-c", FLOOD])
        .arg(&agent.socket_path)
        .uid(1101)
        .gid(1101)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // While the flood holds its connections, the registered workload is answered.
    std::thread::sleep(Duration::from_millis(500));
    let fetched = agent.api(&["fetch", "x509"], None).unwrap();
    assert!(
        fetched.status.success(),
        "{}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    let out = flood.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(counts["early"], 80, "all but 20 closed at accept: {counts}");
    assert_eq!(
        counts["late"], 100,
        "the idle 20 closed after 2 s: {counts}"
    );
    assert!(
        agent.log().contains("too many open"),
        "the refusal is logged:\n{}",
        agent.log()
    );
    // And served still, once they are gone.
    assert!(
        agent
            .api(&["fetch", "x509"], None)
            .unwrap()
            .status
            .success()
    );
}

//! A path or sha256 selector cannot be borrowed through an inherited connection: a process
//! connects to the Workload API and forks; the parent executes the entitled binary while
//! the child, still the original program, asks for an SVID on the inherited socket.
//! Before, the agent attested the connecting pid at request time only, found the entitled
//! binary there, and handed the child its SVID and key. Now the agent reads with the
//! writer's credentials (SO_PASSCRED) and refuses a request another process wrote; it also
//! compares the executable the connecting process runs with the one it ran at accept.

use std::process::Command;
use std::time::Duration;

use mayfly_tests::harness::{AgentProcess, DaemonOptions, DaemonProcess, binary, init, wait_for};

const DRIVER: &str = r#"
import os, socket, sys, time
sock, helper, entitled = sys.argv[1:4]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sock)
fd = s.fileno()
os.set_inheritable(fd, True)
if os.fork() == 0:
    # The child: wait until the parent runs the entitled binary, then use its connection.
    time.sleep(1.0)
    os.execv(helper, [helper, str(fd)])
else:
    # The parent, the pid the agent saw connect, becomes the entitled program.
    os.execv(entitled, [entitled, "4"])
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forked_child_cannot_borrow_the_selectors_of_what_its_parent_executes() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let node = "spiffe://example.org/node/borrow";
    let entitled = std::fs::canonicalize("/usr/bin/sleep").unwrap();
    daemon
        .create_entry(
            "spiffe://example.org/only-sleep",
            node,
            &format!("unix:path:{}", entitled.display()),
            &[],
        )
        .unwrap();
    let agent = AgentProcess::start(&daemon, node).unwrap();
    let helper = binary("fd-fetch").unwrap();
    let mut answer = String::new();
    wait_for(
        "the agent answers the borrowed connection",
        Duration::from_secs(20),
        || {
            let out = Command::new("python3")
                .args(["-c", DRIVER])
                .arg(&agent.socket_path)
                .arg(&helper)
                .arg(&entitled)
                .output()
                .unwrap();
            answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
            // Until the agent has its entry, any answer is "no identity".
            !answer.is_empty() && !answer.contains("no identity")
        },
    );
    assert!(
        answer.starts_with("err") && !answer.contains("only-sleep"),
        "the child must not get the entitled binary's SVID: {answer}\n{}",
        agent.log()
    );
    // The workload is told nothing more; the agent's refusal, on the daemon's trail, says why.
    wait_for(
        "the refusal on the audit trail",
        Duration::from_secs(10),
        || {
            daemon
                .cli_json(&["audit", "list", "--action", "workload.denied"])
                .unwrap()
                .to_string()
                .contains("wrote on its Workload API connection")
        },
    );
}

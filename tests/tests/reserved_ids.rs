//! The daemon's own identity and the line between agents and workloads cannot be crossed
//! by an operator's command: before, `entry create` and `token generate` accepted
//! `spiffe://TD/mayfly/server`, and a workload holding it served the node API to agents
//! that then sent it their join tokens.

use mayfly_tests::harness::{AgentProcess, DaemonOptions, DaemonProcess, init};

fn refused(daemon: &DaemonProcess, args: &[&str]) -> String {
    let err = daemon
        .cli_ok(args)
        .expect_err(&format!("`{}` must be refused", args.join(" ")));
    err.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_ids_and_agents_ids_are_not_given_to_workloads() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    let node = "spiffe://example.org/node/reserved";
    let _agent = AgentProcess::start(&daemon, node).unwrap();
    let entries = || {
        daemon
            .cli_json(&["entry", "list"])
            .unwrap()
            .as_array()
            .unwrap()
            .len()
    };
    let before = entries();

    for reserved in [
        "spiffe://example.org/mayfly/server",
        "spiffe://example.org/mayfly/anything",
        "spiffe://example.org/mayfly",
    ] {
        let err = refused(
            &daemon,
            &[
                "entry",
                "create",
                "--spiffe-id",
                reserved,
                "--parent-id",
                node,
                "--selector",
                "unix:uid:0",
            ],
        );
        assert!(err.contains("reserved for the daemon"), "{err}");
        let err = refused(&daemon, &["token", "generate", "--spiffe-id", reserved]);
        assert!(err.contains("reserved for the daemon"), "{err}");
    }
    // An agent's identity is not a workload's, nor a workload's an agent's.
    let err = refused(
        &daemon,
        &[
            "entry",
            "create",
            "--spiffe-id",
            node,
            "--parent-id",
            node,
            "--selector",
            "unix:uid:0",
        ],
    );
    assert!(err.contains("is an agent's identity"), "{err}");
    daemon
        .create_entry("spiffe://example.org/web", node, "unix:uid:0", &[])
        .unwrap();
    let err = refused(
        &daemon,
        &[
            "token",
            "generate",
            "--spiffe-id",
            "spiffe://example.org/web",
        ],
    );
    assert!(err.contains("is a workload's identity"), "{err}");
    let id = daemon
        .create_entry("spiffe://example.org/api", node, "unix:uid:0", &[])
        .unwrap();
    let err = refused(
        &daemon,
        &[
            "entry",
            "update",
            &id,
            "--spiffe-id",
            "spiffe://example.org/mayfly/server",
        ],
    );
    assert!(err.contains("reserved for the daemon"), "{err}");
    assert_eq!(entries(), before + 2, "nothing else was made");
}

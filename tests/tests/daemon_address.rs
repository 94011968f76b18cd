//! The rest of finding 4 of the hardening issue: an agent checked only the daemon's SPIFFE
//! ID, so any certificate for that ID (issued by mistake, or by another deployment on the
//! same CA) passed for the daemon wherever the agent dialed. Now the daemon's certificate
//! names the addresses agents reach it at (`server_names`), and agents check the address
//! they dialed against it.

use mayfly_common::tls::{TrustBundle, client_config, connect, server_id};
use mayfly_daemon::ca::generate_csr;
use mayfly_proto::v1;
use mayfly_proto::v1::node_client::NodeClient;
use mayfly_tests::harness::{DaemonOptions, DaemonProcess, init};

/// Attests with a fresh join token through `address`; the error's text on failure.
async fn attest_at(daemon: &DaemonProcess, address: &str, agent: &str) -> Result<(), String> {
    let bundle = TrustBundle::new(&daemon.bundle().unwrap()).unwrap();
    let config = client_config(server_id(&daemon.trust_domain).unwrap(), bundle, None).unwrap();
    let channel = connect(address, config)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let (_key, csr) = generate_csr(None).unwrap();
    NodeClient::new(channel)
        .attest(v1::AttestRequest {
            join_token: daemon.join_token(agent).unwrap(),
            csr,
        })
        .await
        .map(|_| ())
        .map_err(|status| format!("{status:?}"))
}

fn port(daemon: &DaemonProcess) -> &str {
    daemon.node_addr.rsplit_once(':').unwrap().1
}

#[tokio::test]
async fn an_agent_refuses_a_daemon_whose_certificate_does_not_name_the_address_dialed() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions {
        extra_toml: "server_names = [\"127.0.0.1\"]\n".into(),
        ..DaemonOptions::default()
    })
    .unwrap();
    attest_at(
        &daemon,
        &daemon.node_addr,
        "spiffe://example.org/node/by-ip",
    )
    .await
    .expect("the address the certificate names is accepted");
    // The same daemon, the same SPIFFE ID, reached by a name its certificate lacks.
    let err = attest_at(
        &daemon,
        &format!("localhost:{}", port(&daemon)),
        "spiffe://example.org/node/by-name",
    )
    .await
    .expect_err("a name the certificate lacks is refused");
    assert!(
        err.contains("does not name the address dialed, localhost") && err.contains("server_names"),
        "{err}"
    );
}

#[tokio::test]
async fn by_default_the_daemon_is_reachable_by_its_loopback_names() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    for (address, agent) in [
        (daemon.node_addr.clone(), "spiffe://example.org/node/ip"),
        (
            format!("localhost:{}", port(&daemon)),
            "spiffe://example.org/node/localhost",
        ),
    ] {
        attest_at(&daemon, &address, agent)
            .await
            .unwrap_or_else(|e| panic!("{address}: {e}"));
    }
}

#[test]
fn a_server_name_that_is_neither_a_name_nor_an_address_is_refused_at_start() {
    init();
    let err = DaemonProcess::start(DaemonOptions {
        extra_toml: "server_names = [\"not a name\"]\n".into(),
        ..DaemonOptions::default()
    })
    .err()
    .expect("the daemon refuses to start");
    let text = format!("{err:#}");
    assert!(
        text.contains("server_names") && text.contains("not a name"),
        "{text}"
    );
}

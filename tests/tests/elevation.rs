//! Just-in-time elevation end to end: a real daemon and agent, a PostgreSQL of the test's
//! own that checks passwords, and operators of different uids on the elevation socket.
//! An operator and an AI-agent workload each ask for database access nobody holds standing;
//! two of three approvers (never the requester) activate it; the dynamic user works; `end`
//! drops it and terminates its open session at once, an expiry does the same unattended.
//! Requests above a cap, without a required ticket, or approved by their own requester are
//! refused naming the policy; break-glass is active at once and shows as needing review.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use sqlx::Connection as _;

use mayfly_tests::harness::{AgentProcess, DaemonOptions, DaemonProcess, binary, init, wait_for};
use mayfly_tests::services::PasswordPostgres;

const AGENT: &str = "spiffe://example.org/node/jit-agent";
const BOT: &str = "spiffe://example.org/ai/triage-bot";
const BOT_UID: u32 = 1000;
/// The requesting operator and two approvers.
const ALICE: u32 = 1101;
const BOB: u32 = 1102;
const CAROL: u32 = 1103;
const WAIT: Duration = Duration::from_secs(20);

const POLICIES: &str = r#"
// Anyone may ask for the orders database, with a reason.
@id("orders-db-eligible")
permit(principal, action == Mayfly::Action::"request_elevation", resource == Mayfly::Credential::"orders-db")
when { context.reason != "" };

// A ticket is required, except for break-glass.
@id("ticket-required")
forbid(principal, action == Mayfly::Action::"request_elevation", resource)
when { context.ticket == "" && !context.break_glass };

// Operators up to an hour, AI agents up to fifteen minutes.
@id("operator-cap")
forbid(principal is Mayfly::Operator, action == Mayfly::Action::"request_elevation", resource)
when { context.ttl_seconds > 3600 };
@id("ai-agent-cap")
forbid(principal, action == Mayfly::Action::"request_elevation", resource)
when { context.requester_kind == "ai_agent" && context.ttl_seconds > 900 };

// The deploy key and the deployer identity: anyone may ask (ticket and caps as above).
@id("deploy-key-eligible")
permit(principal, action == Mayfly::Action::"request_elevation", resource == Mayfly::Secret::"deploy-key");
@id("elevatable-identities")
permit(principal, action == Mayfly::Action::"request_elevation", resource in Mayfly::EntrySet::"elevatable");

// Production credentials need two approvals (the built-in policy activates on one).
@id("prod-two-approvals")
forbid(principal, action == Mayfly::Action::"activate_elevation", resource in Mayfly::CredentialSet::"prod")
when { context.approvals < 2 };
"#;

struct Jit {
    daemon: DaemonProcess,
    pg: PasswordPostgres,
    elevation_socket: std::path::PathBuf,
    _policies: tempfile::TempDir,
}

impl Jit {
    fn start() -> Self {
        Self::start_with("")
    }

    fn start_with(extra_toml: &str) -> Self {
        Self::start_full(extra_toml, false, &[])
    }

    fn start_full(extra_toml: &str, metrics: bool, env: &[(&str, &str)]) -> Self {
        let pg = PasswordPostgres::start().unwrap();
        let policies = tempfile::tempdir().unwrap();
        std::fs::write(policies.path().join("jit.cedar"), POLICIES).unwrap();
        let daemon = DaemonProcess::start(DaemonOptions {
            extra_toml: format!(
                "[policy]\ndir = \"{}\"\n{extra_toml}",
                policies.path().display()
            ),
            env: [
                ("MAYFLY_LEASE_SWEEP_MS", "200"),
                ("MAYFLY_ELEVATION_SWEEP_MS", "200"),
            ]
            .iter()
            .chain(env)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            metrics,
            ..DaemonOptions::default()
        })
        .unwrap();
        // Other uids reach the elevation socket (0666) through the daemon's directory.
        std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o711))
            .unwrap();
        let definition = daemon.dir.path().join("orders-db.toml");
        std::fs::write(
            &definition,
            format!(
                "name = \"orders-db\"\ngrants = []\nsets = [\"prod\"]\ndefault_ttl = \"10m\"\n\
                 max_ttl = \"1h\"\n[backend]\nkind = \"postgres_dynamic\"\nadmin_url = \"{}\"\n",
                pg.admin_url()
            ),
        )
        .unwrap();
        daemon
            .cli_ok(&[
                "credential",
                "create",
                "--file",
                definition.to_str().unwrap(),
            ])
            .unwrap();
        let elevation_socket = daemon.dir.path().join("elevation.sock");
        Self {
            daemon,
            pg,
            elevation_socket,
            _policies: policies,
        }
    }

    /// `mayflyd elevation ARGS --output json` as `uid`.
    fn as_uid(&self, uid: u32, args: &[&str]) -> Output {
        Command::new(binary("mayflyd").unwrap())
            .arg("elevation")
            .args(args)
            .args(["--output", "json"])
            .env("MAYFLY_ELEVATION_SOCKET", &self.elevation_socket)
            .uid(uid)
            .gid(uid)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, uid: u32, args: &[&str]) -> serde_json::Value {
        let out = self.as_uid(uid, args);
        assert!(
            out.status.success(),
            "mayflyd elevation {} as uid {uid}: {}",
            args.join(" "),
            stderr(&out)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn refused(&self, uid: u32, args: &[&str]) -> String {
        let out = self.as_uid(uid, args);
        assert!(
            !out.status.success(),
            "mayflyd elevation {} as uid {uid} should be refused",
            args.join(" ")
        );
        stderr(&out)
    }

    fn show(&self, id: &str) -> serde_json::Value {
        self.ok(CAROL, &["show", id])
    }

    async fn login(&self, credential: &serde_json::Value) -> anyhow::Result<()> {
        self.pg
            .login(value(credential, "username"), value(credential, "password"))
            .await
    }

    /// An open session of `credential`'s user, kept open by the test.
    async fn session(&self, credential: &serde_json::Value) -> sqlx::PgConnection {
        let options = sqlx::postgres::PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.pg.port)
            .username(value(credential, "username"))
            .password(value(credential, "password"))
            .database("postgres");
        let mut conn = sqlx::PgConnection::connect_with(&options).await.unwrap();
        sqlx::query("SELECT 1").execute(&mut conn).await.unwrap();
        conn
    }
}

/// A webhook receiver: records each JSON body POSTed to it, answering the first with a
/// 500 (so that the daemon must retry) and every other with a 200.
struct Hooks {
    port: u16,
    received: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl Hooks {
    async fn start() -> Self {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = received.clone();
        tokio::spawn(async move {
            let mut first = true;
            // Bounded: far more than the test sends.
            for _ in 0..100 {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let body = loop {
                    let n = conn.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text[..end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + length {
                            break Some(buf[end + 4..end + 4 + length].to_vec());
                        }
                    }
                };
                let status = if first {
                    "500 Internal Server Error"
                } else {
                    "200 OK"
                };
                if !first && let Some(body) = body {
                    store
                        .lock()
                        .unwrap()
                        .push(serde_json::from_slice(&body).unwrap());
                }
                first = false;
                let _ = conn
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        Self { port, received }
    }

    fn events(&self) -> Vec<serde_json::Value> {
        self.received.lock().unwrap().clone()
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn value<'a>(credential: &'a serde_json::Value, key: &str) -> &'a str {
    credential["values"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} in {credential}"))
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn id(elevation: &serde_json::Value) -> String {
    elevation["id"].as_str().unwrap().to_string()
}

/// `mayfly-agent ARGS` against `agent`'s socket, as the workload's uid.
fn workload(agent: &AgentProcess, args: &[&str]) -> Output {
    Command::new(binary("mayfly-agent").unwrap())
        .args(args)
        .arg("--socket")
        .arg(&agent.socket_path)
        .uid(BOT_UID)
        .gid(BOT_UID)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_gets_database_access_by_two_approvals_and_loses_it_and_its_session_at_end() {
    init();
    let hooks = Hooks::start().await;
    let jit = Jit::start_with(&format!(
        "[elevation]\nmax_pending = 2\n[[notify]]\nurl = \"http://127.0.0.1:{}/hooks/jit\"\nevents = [\"activate\", \"end\", \"break-glass\"]\n",
        hooks.port
    ));
    let request = |ttl: &str, ticket: &str| -> Vec<String> {
        let mut args = vec![
            "request",
            "--credential",
            "orders-db",
            "--ttl",
            ttl,
            "--reason",
            "fix order 4711",
        ];
        if !ticket.is_empty() {
            args.extend(["--ticket", ticket]);
        }
        args.into_iter().map(String::from).collect()
    };

    // Refused, naming the policy: no ticket; longer than operators may ask for.
    let why = jit.refused(ALICE, &strs(&request("30m", "")));
    assert!(why.contains("ticket-required"), "{why}");
    let why = jit.refused(ALICE, &strs(&request("2h", "CHG-1")));
    assert!(why.contains("operator-cap"), "{why}");
    // A credential nobody defined, and nonsense, are refused by name.
    let why = jit.refused(
        ALICE,
        &[
            "request",
            "--credential",
            "nope",
            "--ttl",
            "5m",
            "--reason",
            "x",
            "--ticket",
            "T",
        ],
    );
    assert!(why.contains("no credential named `nope`"), "{why}");

    let asked = jit.ok(ALICE, &strs(&request("30m", "CHG-1")));
    let el = id(&asked);
    assert_eq!(asked["state"], "pending");
    assert_eq!(asked["requester"], format!("uid:{ALICE}"));
    assert_eq!(asked["requester_kind"], "operator");

    // Nobody approves their own request; a pending one issues nothing.
    let why = jit.refused(ALICE, &["approve", &el]);
    assert!(why.contains("nobody reviews their own request"), "{why}");
    let why = jit.refused(ALICE, &["credential", &el]);
    assert!(why.contains("not active"), "{why}");

    // One approval is not enough for a production credential; the same approver twice
    // counts once.
    let once = jit.ok(BOB, &["approve", &el, "--comment", "looks right"]);
    assert_eq!(once["state"], "pending", "{once}");
    let why = jit.refused(BOB, &["approve", &el]);
    assert!(why.contains("reviewed elevation"), "{why}");
    let twice = jit.ok(CAROL, &["approve", &el]);
    assert_eq!(twice["state"], "active", "{twice}");
    assert_eq!(twice["reviews"].as_array().unwrap().len(), 2);

    // The requester gets the database user; nobody else gets it under this elevation.
    let why = jit.refused(BOB, &["credential", &el]);
    assert!(why.contains("is not"), "{why}");
    let credential = jit.ok(ALICE, &["credential", &el]);
    jit.login(&credential).await.unwrap();
    let ends_at = twice["ends_at"].as_i64().unwrap();
    assert!(credential["expires_at"].as_i64().unwrap() <= ends_at);
    let mut open = jit.session(&credential).await;

    // The task is done: the user is dropped and the open session ends with it.
    let ended = jit.ok(ALICE, &["end", &el, "--reason", "fixed"]);
    assert_eq!(ended["elevation"]["state"], "ended", "{ended}");
    assert_eq!(ended["elevation"]["end_reason"], "fixed");
    let leases = ended["leases"].as_array().unwrap();
    assert_eq!(leases.len(), 1, "{ended}");
    assert_eq!(leases[0]["state"], "revoked");
    assert!(
        sqlx::query("SELECT 1").execute(&mut open).await.is_err(),
        "the open session was terminated"
    );
    assert!(jit.login(&credential).await.is_err(), "the user is gone");
    let why = jit.refused(ALICE, &["credential", &el]);
    assert!(why.contains("not active"), "{why}");

    // A denial rejects (the built-in threshold is one).
    let other = id(&jit.ok(CAROL, &strs(&request("10m", "CHG-2"))));
    let rejected = jit.ok(ALICE, &["deny", &other, "--comment", "not today"]);
    assert_eq!(rejected["state"], "rejected", "{rejected}");

    // Break-glass: active at once, flagged, and it needs a review by someone else.
    let glass = jit.ok(
        BOB,
        &[
            "request",
            "--credential",
            "orders-db",
            "--ttl",
            "10m",
            "--reason",
            "outage",
            "--break-glass",
        ],
    );
    assert_eq!(glass["state"], "active", "{glass}");
    assert_eq!(glass["review_required"], true);
    let glass_id = id(&glass);
    let shown = jit.show(&glass_id);
    assert!(
        shown["elevation"]["notices"]
            .to_string()
            .contains("needs a review"),
        "{shown}"
    );
    let why = jit.refused(BOB, &["review", &glass_id, "--comment", "fine"]);
    assert!(why.contains("nobody reviews their own"), "{why}");
    // The webhook heard of it (after one refused delivery, retried), and of the other
    // events it asked for, in order; never a credential.
    wait_for("the break-glass webhook", WAIT, || {
        hooks.events().iter().any(|e| e["event"] == "break-glass")
    });
    let events = hooks.events();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["activate", "end", "break-glass"], "{events:?}");
    assert_eq!(events[2]["elevation"]["id"], glass_id.as_str());
    assert_eq!(events[2]["elevation"]["review_required"], true);
    let sent = serde_json::to_string(&events).unwrap();
    assert!(!sent.contains(value(&credential, "password")), "{sent}");
    let reviewed = jit.ok(CAROL, &["review", &glass_id, "--comment", "outage INC-9"]);
    assert_eq!(reviewed["reviewed_by"], format!("uid:{CAROL}"));
    jit.ok(BOB, &["end", &glass_id]);

    // A local user cannot flood the reviewers: two pending requests at most here; an
    // oversized reason is refused by name; a withdrawn request makes room again.
    let huge = "x".repeat(5000);
    let why = jit.refused(
        ALICE,
        &[
            "request",
            "--credential",
            "orders-db",
            "--ttl",
            "5m",
            "--ticket",
            "T",
            "--reason",
            &huge,
        ],
    );
    assert!(why.contains("reason: at most 1024 characters"), "{why}");
    let first = id(&jit.ok(ALICE, &strs(&request("5m", "CHG-3"))));
    jit.ok(ALICE, &strs(&request("5m", "CHG-4")));
    let why = jit.refused(ALICE, &strs(&request("5m", "CHG-5")));
    assert!(why.contains("max_pending"), "{why}");
    let why = jit.refused(BOB, &["cancel", &first]);
    assert!(why.contains("only its requester withdraws"), "{why}");
    let cancelled = jit.ok(ALICE, &["cancel", &first]);
    assert_eq!(cancelled["state"], "cancelled");
    jit.ok(ALICE, &strs(&request("5m", "CHG-5")));

    // Everything stays listable, and the record is on the hash chain.
    let all = jit.ok(CAROL, &["list"]);
    let states: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states.len(), 6, "{all}");
    assert!(states.contains(&"ended") && states.contains(&"rejected"));
    let shown = jit.show(&el);
    assert_eq!(shown["elevation"]["ended_by"], format!("uid:{ALICE}"));
    assert!(
        !shown["elevation"]["revocation_id"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    assert_eq!(shown["leases"].as_array().unwrap().len(), 1);
    let trail = jit
        .daemon
        .cli_json(&["audit", "list", "--action", "elevation.review"])
        .unwrap();
    let verdicts: Vec<&str> = trail
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["outcome"].as_str())
        .filter(|o| *o == "approve" || *o == "deny")
        .collect();
    assert_eq!(verdicts.len(), 3, "{trail}");
    assert!(
        trail
            .to_string()
            .contains("nobody reviews their own request"),
        "the self-approval is on the trail as refused: {trail}"
    );
    assert!(
        jit.daemon
            .cli_ok(&["audit", "verify"])
            .unwrap()
            .starts_with("audit log intact")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ai_agent_asks_through_its_agent_and_loses_the_user_when_its_elevation_elapses() {
    init();
    let jit = Jit::start();
    jit.daemon
        .create_entry(
            BOT,
            AGENT,
            &format!("unix:uid:{BOT_UID}"),
            &["--set", "ai-agents"],
        )
        .unwrap();
    let agent = AgentProcess::start(&jit.daemon, AGENT).unwrap();
    let elevate = |ttl: &str| {
        workload(
            &agent,
            &[
                "elevate",
                "request",
                "--credential",
                "orders-db",
                "--ttl",
                ttl,
                "--ticket",
                "INC-7",
                "--reason",
                "triage the stuck orders",
            ],
        )
    };

    // Not granted standing: nothing to fetch.
    let out = workload(&agent, &["creds", "get", "orders-db"]);
    assert!(!out.status.success());

    // An AI agent gets fifteen minutes at most.
    let mut refused = String::new();
    wait_for("the agent serves the bot", WAIT, || {
        let out = elevate("30m");
        refused = stderr(&out);
        !out.status.success() && refused.contains("ai-agent-cap")
    });
    let out = elevate("8s");
    assert!(out.status.success(), "{}", stderr(&out));
    let asked: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(asked["requester"], BOT);
    assert_eq!(asked["requester_kind"], "ai_agent");
    assert_eq!(asked["state"], "pending");
    let el = id(&asked);
    jit.ok(BOB, &["approve", &el]);
    let active = jit.ok(CAROL, &["approve", &el]);
    assert_eq!(active["state"], "active", "{active}");

    // The bot fetches the user as any granted workload would, until the elevation's end.
    let out = workload(&agent, &["creds", "get", "orders-db", "--format", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let credential: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    jit.login(&credential).await.unwrap();
    let mut open = jit.session(&credential).await;

    // Unattended: the elevation elapses, the user is dropped and its session ended.
    // Recorded as elapsed first, then taken back: wait for the take-back's revocation.
    wait_for("the elevation elapses and is taken back", WAIT, || {
        let shown = jit.show(&el);
        shown["elevation"]["state"] == "elapsed" && shown["elevation"]["revocation_id"] != ""
    });
    let shown = jit.show(&el);
    assert_eq!(shown["leases"][0]["state"], "revoked", "{shown}");
    assert!(sqlx::query("SELECT 1").execute(&mut open).await.is_err());
    assert!(jit.login(&credential).await.is_err());
    let out = workload(&agent, &["creds", "get", "orders-db"]);
    assert!(!out.status.success(), "nothing more after the end");

    // The bot cannot end an elevation that is not its own.
    let alices = id(&jit.ok(
        ALICE,
        &[
            "request",
            "--credential",
            "orders-db",
            "--ttl",
            "5m",
            "--reason",
            "r",
            "--ticket",
            "T",
        ],
    ));
    let out = workload(&agent, &["elevate", "end", &alices]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is not"), "{}", stderr(&out));
    assert_eq!(jit.show(&alices)["elevation"]["state"], "pending");

    // A new one is ended by the bot itself once its task is done.
    let out = elevate("10m");
    assert!(out.status.success(), "{}", stderr(&out));
    let second = id(&serde_json::from_slice(&out.stdout).unwrap());
    jit.ok(BOB, &["approve", &second]);
    jit.ok(CAROL, &["approve", &second]);
    let out = workload(&agent, &["elevate", "end", &second, "--reason", "done"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(jit.show(&second)["elevation"]["state"], "ended");
    assert!(
        jit.daemon
            .cli_ok(&["audit", "verify"])
            .unwrap()
            .starts_with("audit log intact")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blast_radius_shows_standing_eligible_and_live_reach_and_the_fleet_by_exposure() {
    init();
    const REPORTS: &str = "spiffe://example.org/reports";
    const REPORTS_UID: u32 = 1001;
    let jit = Jit::start_full("", true, &[("MAYFLY_BLAST_INTERVAL_MS", "200")]);
    let definition = jit.daemon.dir.path().join("reports-db.toml");
    std::fs::write(
        &definition,
        format!(
            "name = \"reports-db\"\ngrants = [\"{REPORTS}\"]\nsensitivity = \"high\"\n\
             default_ttl = \"10m\"\n[backend]\nkind = \"postgres_dynamic\"\nadmin_url = \"{}\"\n",
            jit.pg.admin_url()
        ),
    )
    .unwrap();
    jit.daemon
        .cli_ok(&[
            "credential",
            "create",
            "--file",
            definition.to_str().unwrap(),
        ])
        .unwrap();
    // A typo in a definition's sensitivity is refused by name.
    let bad = jit.daemon.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&definition)
            .unwrap()
            .replace("reports-db", "bad-db")
            .replace("\"high\"", "\"hgih\""),
    )
    .unwrap();
    let out = jit
        .daemon
        .cli(&["credential", "create", "--file", bad.to_str().unwrap()])
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("sensitivity `hgih`"));
    jit.daemon
        .create_entry(REPORTS, AGENT, &format!("unix:uid:{REPORTS_UID}"), &[])
        .unwrap();
    jit.daemon
        .create_entry(
            BOT,
            AGENT,
            &format!("unix:uid:{BOT_UID}"),
            &["--set", "ai-agents"],
        )
        .unwrap();
    let agent = AgentProcess::start(&jit.daemon, AGENT).unwrap();
    let mut fetched = false;
    wait_for("the reports workload's credential", WAIT, || {
        let out = Command::new(binary("mayfly-agent").unwrap())
            .args(["creds", "get", "reports-db", "--socket"])
            .arg(&agent.socket_path)
            .uid(REPORTS_UID)
            .gid(REPORTS_UID)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        fetched = out.status.success();
        fetched
    });

    let reports = jit.daemon.cli_json(&["blast-radius", REPORTS]).unwrap();
    assert_eq!(
        reports["standing"]["credentials"],
        serde_json::json!(["reports-db"]),
        "{reports}"
    );
    assert_eq!(reports["zero_standing_privilege"], false);
    assert_eq!(reports["standing"]["svids"].as_array().unwrap().len(), 1);
    assert_eq!(
        reports["eligible"]["credentials"],
        serde_json::json!(["orders-db"])
    );
    let exposure = reports["exposure"].as_array().unwrap();
    assert_eq!(exposure.len(), 1, "{reports}");
    assert_eq!(exposure[0]["credential"], "reports-db");
    assert_eq!(exposure[0]["sensitivity"], "high");
    assert!(exposure[0]["remaining_seconds"].as_i64().unwrap() > 500);

    let bot = jit.daemon.cli_json(&["blast-radius", BOT]).unwrap();
    assert_eq!(bot["zero_standing_privilege"], true, "{bot}");
    assert_eq!(bot["standing"]["credentials"], serde_json::json!([]));
    assert_eq!(
        bot["eligible"]["credentials"],
        serde_json::json!(["orders-db"])
    );

    let fleet = jit.daemon.cli_json(&["blast-radius", "--all"]).unwrap();
    let principals = fleet["principals"].as_array().unwrap();
    assert_eq!(
        principals[0]["principal"], REPORTS,
        "largest exposure first: {fleet}"
    );
    assert_eq!(fleet["total"], 2);
    assert_eq!(fleet["zero_standing"], 1);
    let table = jit.daemon.cli_ok(&["blast-radius", "--all"]).unwrap();
    assert!(
        table.contains("1 of 2 principals hold zero standing privilege"),
        "{table}"
    );

    // Nonsense is refused by name.
    let out = jit
        .daemon
        .cli(&["blast-radius", "not a principal"])
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("a SPIFFE ID or uid:N"));

    // The same figures as gauges, from a report made after the lease was issued (one is
    // made every 200 ms here; an earlier one had no exposure yet).
    let mut figures = (None, None);
    for _ in 0..100 {
        figures = (
            jit.daemon
                .metric("mayfly_principals_zero_standing_privilege")
                .await
                .unwrap(),
            jit.daemon
                .metric("mayfly_credential_exposure_seconds{sensitivity=\"high\"}")
                .await
                .unwrap(),
        );
        if figures.0 == Some(1.0) && figures.1.is_some_and(|s| s > 500.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(figures.0, Some(1.0), "{figures:?}");
    assert!(figures.1.is_some_and(|s| s > 500.0), "{figures:?}");
}

/// The content of a file, "" when it is missing.
fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_holds_a_secret_and_an_identity_only_while_their_elevations_last() {
    init();
    let jit = Jit::start();
    const DEPLOYER: &str = "spiffe://example.org/deployer";
    // The bot holds nothing standing; the deployer identity is served to no agent (its
    // entry's parent never attests): it exists to be elevated to.
    jit.daemon
        .create_entry(BOT, AGENT, &format!("unix:uid:{BOT_UID}"), &[])
        .unwrap();
    let template = jit
        .daemon
        .create_entry(
            DEPLOYER,
            "spiffe://example.org/node/elevation-only",
            "unix:uid:0",
            &["--set", "elevatable"],
        )
        .unwrap();
    jit.daemon
        .define_secret(
            "name = \"deploy-key\"\nschedule = \"@yearly\"\ngrants = []\n[store]\nkind = \"local\"\n\
             [target]\nkind = \"none\"\n",
        )
        .unwrap();
    jit.daemon
        .cli_ok(&["secret", "rotate", "deploy-key"])
        .unwrap();
    let files = tempfile::tempdir().unwrap();
    let key_file = files.path().join("deploy-key");
    let svid_dir = files.path().join("deployer");
    std::fs::create_dir(&svid_dir).unwrap();
    let agent = AgentProcess::start_with(
        &jit.daemon,
        AGENT,
        &format!(
            "[[sink]]\nkind = \"secret\"\nsecret = \"deploy-key\"\npath = \"{}\"\nuntil_granted = true\n\
             [[sink]]\nkind = \"svid\"\nspiffe_id = \"{DEPLOYER}\"\ncert_path = \"{d}/svid.pem\"\n\
             key_path = \"{d}/svid.key\"\nbundle_path = \"{d}/bundle.pem\"\non_revoke = \"blank\"\n",
            key_file.display(),
            d = svid_dir.display()
        ),
    )
    .unwrap();
    let elevate = |flag: &str, name: &str| {
        let mut out = None;
        wait_for("the agent serves the bot", WAIT, || {
            let tried = workload(
                &agent,
                &[
                    "elevate",
                    "request",
                    flag,
                    name,
                    "--ttl",
                    "10m",
                    "--ticket",
                    "CHG-9",
                    "--reason",
                    "ship release 42",
                ],
            );
            let served = tried.status.success() || !stderr(&tried).contains("serves no workload");
            out = Some(tried);
            served
        });
        let out = out.unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        id(&serde_json::from_slice(&out.stdout).unwrap())
    };

    // ----- a secret -----
    assert_eq!(read(&key_file), "", "nothing standing");
    let el = elevate("--secret", "deploy-key");
    let active = jit.ok(BOB, &["approve", &el]);
    assert_eq!(active["state"], "active", "{active}");
    wait_for("the secret reaches the sink", WAIT, || {
        !read(&key_file).is_empty()
    });
    let seen = read(&key_file);
    let out = workload(&agent, &["elevate", "end", &el, "--reason", "released"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = jit.show(&el);
    assert_eq!(shown["elevation"]["state"], "ended");
    let revocation = &shown["revocation"];
    assert!(
        revocation["acknowledged"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == AGENT),
        "{revocation:#}"
    );
    assert!(
        revocation["notes"].to_string().contains("rotation 1 of 1"),
        "the secret is replaced: {revocation:#}"
    );
    assert!(!key_file.exists(), "the sink's file is gone with the grant");
    assert!(
        shown["elevation"]["notices"]
            .to_string()
            .contains("rotated"),
        "{shown:#}"
    );

    // An operator reads it through an elevation of her own: the value the bot saw is
    // worth nothing now; nobody else reads hers.
    let alices = id(&jit.ok(
        ALICE,
        &[
            "request",
            "--secret",
            "deploy-key",
            "--ttl",
            "5m",
            "--ticket",
            "CHG-9",
            "--reason",
            "check the deploy key",
        ],
    ));
    let out = jit.as_uid(ALICE, &["secret", &alices]);
    assert!(!out.status.success(), "not active before approval");
    jit.ok(CAROL, &["approve", &alices]);
    let read_by_alice = jit.ok(ALICE, &["secret", &alices]);
    let now_value = read_by_alice["value"].as_str().unwrap();
    assert!(!now_value.is_empty());
    assert_ne!(
        now_value,
        seen.trim_end(),
        "rotated when the bot's elevation ended"
    );
    let refused = jit.refused(BOB, &["secret", &alices]);
    assert!(refused.contains("is not"), "{refused}");
    jit.ok(ALICE, &["end", &alices]);
    let after = jit.ok(
        CAROL,
        &[
            "request",
            "--secret",
            "deploy-key",
            "--ttl",
            "5m",
            "--ticket",
            "T",
            "--reason",
            "again",
        ],
    );
    jit.ok(BOB, &["approve", &id(&after)]);
    let again = jit.ok(CAROL, &["secret", &id(&after)]);
    assert_ne!(
        again["value"], read_by_alice["value"],
        "rotated at her end too"
    );
    jit.ok(CAROL, &["end", &id(&after)]);

    // ----- an identity -----
    // Operators cannot be given an entry's identity; a workload is, on its own node.
    let out = jit.as_uid(
        ALICE,
        &[
            "request", "--entry", DEPLOYER, "--ttl", "5m", "--reason", "r",
        ],
    );
    assert!(!out.status.success());
    let el = elevate("--entry", DEPLOYER);
    let active = jit.ok(ALICE, &["approve", &el]);
    assert_eq!(active["state"], "active", "{active}");
    let cert = svid_dir.join("svid.pem");
    wait_for(
        "the elevated identity's SVID reaches the sink",
        WAIT,
        || !read(&cert).is_empty(),
    );
    let shown = jit.show(&el);
    let granted = shown["elevation"]["granted_entry"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!granted.is_empty() && granted != template, "{shown:#}");
    let svids = shown["svids"].as_array().unwrap();
    assert!(!svids.is_empty(), "{shown:#}");
    assert_eq!(svids[0]["spiffe_id"], DEPLOYER);
    let serial = svids[0]["serial"].as_str().unwrap().to_string();
    // The SVID ends no later than the elevation.
    let ends_at = shown["elevation"]["ends_at"].as_i64().unwrap();
    assert!(
        svids[0]["not_after"].as_i64().unwrap() <= ends_at,
        "{shown:#}"
    );

    let out = workload(&agent, &["elevate", "end", &el]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = jit.show(&el);
    let revocation = &shown["revocation"];
    assert!(
        revocation["serials"].to_string().contains(&serial),
        "the SVID is deny-listed: {revocation:#}"
    );
    assert!(
        revocation["acknowledged"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == AGENT),
        "{revocation:#}"
    );
    assert_eq!(read(&cert), "", "the SVID sink is blanked");
    let left = jit
        .daemon
        .cli_json(&["entry", "list", "--spiffe-id", DEPLOYER])
        .unwrap();
    let left: Vec<_> = left
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].clone())
        .collect();
    assert_eq!(
        left,
        vec![serde_json::json!(template)],
        "only the template stays"
    );

    // An entry nobody may elevate to is refused by policy.
    let out = workload(
        &agent,
        &[
            "elevate", "request", "--entry", BOT, "--ttl", "5m", "--ticket", "T", "--reason", "r",
        ],
    );
    assert!(!out.status.success());
    assert!(
        jit.daemon
            .cli_ok(&["audit", "verify"])
            .unwrap()
            .starts_with("audit log intact")
    );
}

//! Legacy app injection end to end: a real daemon rotating secrets, a real agent keeping
//! sink files current, apps reading those files (and logging in to a PostgreSQL that checks
//! passwords), and `mayfly-agent exec` supervising a child.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use mayfly_tests::harness::{
    AgentProcess, DaemonOptions, DaemonProcess, Immutable, binary, init, wait_for,
};
use mayfly_tests::services::PasswordPostgres;

fn define(daemon: &DaemonProcess, toml: &str) -> Value {
    daemon.define_secret(toml).unwrap()
}

fn current(daemon: &DaemonProcess, name: &str) -> (String, String, String) {
    daemon.current_secret(name).unwrap()
}

const AGENT_ID: &str = "spiffe://example.org/node/a";

/// An opaque secret in Mayfly's own store, granted to `grants`, with one version already.
fn opaque_secret(daemon: &DaemonProcess, name: &str, grants: &[&str]) {
    let grants = grants
        .iter()
        .map(|g| format!("\"{g}\""))
        .collect::<Vec<_>>()
        .join(", ");
    define(
        daemon,
        &format!(
            "name = \"{name}\"\nschedule = \"@yearly\"\ngrants = [{grants}]\n[store]\nkind = \"local\"\n[target]\nkind = \"none\"\n"
        ),
    );
    daemon.cli_ok(&["secret", "rotate", name]).unwrap();
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn sink_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("mayfly-sinks-")
        .tempdir()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_reading_its_credential_file_never_fails_a_login_across_20_rotations() {
    init();
    let pg = PasswordPostgres::start().unwrap();
    let user_a = pg.role("orders_a", "initial-Password-a1").await.unwrap();
    let user_b = pg.role("orders_b", "initial-Password-b1").await.unwrap();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    define(
        &daemon,
        &format!(
            "name = \"orders-db\"\nschedule = \"@yearly\"\nstrategy = \"alternating-users\"\nusers = [\"{user_a}\", \"{user_b}\"]\n\
             grants = [\"{AGENT_ID}\"]\n[store]\nkind = \"local\"\n[target]\nkind = \"postgres\"\nadmin_url = \"{}\"\n\
             login_url = \"postgres://127.0.0.1:{}/postgres\"\n",
            pg.admin_url(),
            pg.port
        ),
    );
    daemon.cli_ok(&["secret", "rotate", "orders-db"]).unwrap();
    let files = sink_dir();
    let creds = files.path().join("orders.conf");
    let agent = AgentProcess::start_with(
        &daemon,
        AGENT_ID,
        &format!(
            "[[sink]]\nkind = \"template\"\npath = \"{}\"\n\
             template = \"user={{{{ secrets['orders-db'].username }}}}\\npassword={{{{ secrets['orders-db'].password }}}}\\nversion={{{{ secrets['orders-db'].version }}}}\\nend\\n\"\n",
            creds.display()
        ),
    )
    .unwrap();
    let (version, _, _) = current(&daemon, "orders-db");
    wait_for("the first credential file", Duration::from_secs(10), || {
        read(&creds).contains(&version)
    });

    // A reader hammering the file: every read must be a whole file.
    let stop = Arc::new(AtomicBool::new(false));
    let partial = Arc::new(AtomicUsize::new(0));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, partial, reads, creds) =
            (stop.clone(), partial.clone(), reads.clone(), creds.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let text = std::fs::read_to_string(&creds).unwrap_or_default();
                let whole = text.starts_with("user=") && text.ends_with("\nend\n");
                if !whole {
                    partial.fetch_add(1, Ordering::Relaxed);
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // The app: reads the file at every connection, as a legacy app with a config file does.
    let app = {
        let (stop, creds) = (stop.clone(), creds.clone());
        let pg_port = pg.port;
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0usize, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let text = std::fs::read_to_string(&creds).unwrap_or_default();
                let field = |name: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(&format!("{name}=")))
                        .unwrap_or_default()
                        .to_string()
                };
                let options = sqlx::postgres::PgConnectOptions::new()
                    .host("127.0.0.1")
                    .port(pg_port)
                    .username(&field("user"))
                    .password(&field("password"))
                    .database("postgres");
                use sqlx::Connection;
                match sqlx::PgConnection::connect_with(&options).await {
                    Ok(conn) => {
                        ok += 1;
                        let _ = conn.close().await;
                    }
                    Err(e) => failed.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed)
        })
    };

    let mut seen = vec![current(&daemon, "orders-db")];
    for _ in 0..20 {
        daemon.cli_ok(&["secret", "rotate", "orders-db"]).unwrap();
        let now = current(&daemon, "orders-db");
        wait_for(
            "the sink to follow the rotation",
            Duration::from_secs(10),
            || read(&creds).contains(&now.0),
        );
        seen.push(now);
        // Rotations in production are hours apart; here, enough for the app to use each one.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = app.await.unwrap();
    reader.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} failed logins: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok > 40, "the app logged in only {ok} times");
    assert_eq!(
        partial.load(Ordering::Relaxed),
        0,
        "a reader saw a partial file"
    );
    assert!(reads.load(Ordering::Relaxed) > 100);
    // The server really checks: the credential from two rotations back no longer works.
    let (_, old_user, old_password) = &seen[seen.len() - 3];
    assert!(pg.login(old_user, old_password).await.is_err());
    let (_, user, password) = seen.last().unwrap();
    pg.login(user, password).await.unwrap();
    // The file holds nothing but what it should, with the secret mode.
    let mode = std::fs::metadata(&creds).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600);
    for (_, _, value) in &seen {
        assert!(
            !agent.log().contains(value.as_str()),
            "a value reached the agent log"
        );
        assert!(
            !daemon.log().contains(value.as_str()),
            "a value reached the daemon log"
        );
    }
}

#[test]
fn files_keep_their_mode_and_owner_and_are_rewritten_only_on_change() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    opaque_secret(&daemon, "api-key", &[AGENT_ID]);
    opaque_secret(&daemon, "other-key", &[AGENT_ID]);
    daemon
        .cli_ok(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/web",
            "--parent-id",
            AGENT_ID,
            "--selector",
            "unix:uid:4242",
            "--hint",
            "web",
        ])
        .unwrap();
    let files = sink_dir();
    let key = files.path().join("api-key");
    let env = files.path().join("app.env");
    let tls = files.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    let extra = format!(
        "[[sink]]\nkind = \"secret\"\nsecret = \"api-key\"\npath = \"{key}\"\nmode = \"0640\"\nowner = \"65534\"\ngroup = \"65534\"\n\
         [[sink]]\nkind = \"env\"\npath = \"{env}\"\nvars = {{ OTHER = \"secret:other-key\", OTHER_VERSION = \"secret:other-key:version\" }}\n\
         [[sink]]\nkind = \"svid\"\nname = \"web\"\nhint = \"web\"\ncert_path = \"{tls}/svid.pem\"\nkey_path = \"{tls}/svid.key\"\nbundle_path = \"{tls}/bundle.pem\"\n",
        key = key.display(),
        env = env.display(),
        tls = tls.display(),
    );
    let mut agent = AgentProcess::start_with(&daemon, AGENT_ID, &extra).unwrap();
    let (_, _, api_key) = current(&daemon, "api-key");
    wait_for("the sinks' first files", Duration::from_secs(10), || {
        read(&key) == api_key && tls.join("bundle.pem").exists() && env.exists()
    });
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!(
        (meta.mode() & 0o777, meta.uid(), meta.gid()),
        (0o640, 65534, 65534)
    );
    let (other_version, _, other) = current(&daemon, "other-key");
    assert_eq!(
        read(&env),
        format!("OTHER=\"{other}\"\nOTHER_VERSION=\"{other_version}\"\n")
    );
    // The SVID sink: the web entry's certificate, a private key only its owner reads.
    let cert = read(&tls.join("svid.pem"));
    let der = mayfly_common::svid::parse_pem_certs(&cert).unwrap();
    let identity = mayfly_common::tls::peer_identity(&der[0]).unwrap();
    assert_eq!(identity.spiffe_id.as_str(), "spiffe://example.org/web");
    assert!(read(&tls.join("svid.key")).starts_with("-----BEGIN PRIVATE KEY-----"));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode(&tls.join("svid.key")), 0o600);
    assert_eq!(mode(&tls.join("svid.pem")), 0o644);
    assert_eq!(mode(&tls.join("bundle.pem")), 0o644);

    // Someone loosens the file; the next rotation puts mode and owner right again.
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    std::os::unix::fs::chown(&key, Some(0), Some(0)).unwrap();
    let key_mtime = std::fs::metadata(&key).unwrap().modified().unwrap();
    let env_mtime = std::fs::metadata(&env).unwrap().modified().unwrap();
    daemon.cli_ok(&["secret", "rotate", "api-key"]).unwrap();
    let (_, _, rotated) = current(&daemon, "api-key");
    wait_for("the rotated key", Duration::from_secs(10), || {
        read(&key) == rotated
    });
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!(
        (meta.mode() & 0o777, meta.uid(), meta.gid()),
        (0o640, 65534, 65534)
    );
    assert!(meta.modified().unwrap() >= key_mtime);
    // The env sink's secret did not change: its file was not touched.
    assert_eq!(
        std::fs::metadata(&env).unwrap().modified().unwrap(),
        env_mtime
    );

    // An agent restart rewrites nothing that is already right.
    let key_mtime = std::fs::metadata(&key).unwrap().modified().unwrap();
    agent.kill();
    agent.spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        std::fs::metadata(&key).unwrap().modified().unwrap(),
        key_mtime
    );
    assert_eq!(
        std::fs::metadata(&env).unwrap().modified().unwrap(),
        env_mtime
    );
    // (The SVID is re-signed for a fresh key after a restart, so its files may change.)
    let leftovers: Vec<PathBuf> = std::fs::read_dir(files.path())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

#[test]
fn a_template_naming_an_ungranted_secret_stops_the_agent_and_writes_nothing() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    opaque_secret(&daemon, "granted", &[AGENT_ID]);
    opaque_secret(&daemon, "private", &["spiffe://example.org/someone-else"]);
    let files = sink_dir();
    let good = files.path().join("good");
    let bad = files.path().join("bad.conf");
    let extra = format!(
        "[[sink]]\nkind = \"secret\"\nsecret = \"granted\"\npath = \"{}\"\n\
         [[sink]]\nkind = \"template\"\npath = \"{}\"\ntemplate = \"key={{{{ secrets.private.value }}}}\"\n",
        good.display(),
        bad.display()
    );
    let message = match AgentProcess::start_with(&daemon, AGENT_ID, &extra) {
        Err(e) => e.to_string(),
        Ok(mut agent) => {
            let status = agent.wait_exit(Duration::from_secs(15)).unwrap();
            assert!(!status.success());
            agent.log()
        }
    };
    assert!(
        message.contains("needs secret `private`, which is not granted"),
        "{message}"
    );
    assert!(!good.exists() && !bad.exists(), "nothing is written");
}

#[test]
fn an_unwritable_directory_is_reported_and_the_previous_file_stays() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    opaque_secret(&daemon, "api-key", &[AGENT_ID]);
    let files = sink_dir();
    let locked = files.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    let key = locked.join("api-key");
    let agent = AgentProcess::start_with(
        &daemon,
        AGENT_ID,
        &format!(
            "[[sink]]\nkind = \"secret\"\nsecret = \"api-key\"\npath = \"{}\"\n",
            key.display()
        ),
    )
    .unwrap();
    let (_, _, first) = current(&daemon, "api-key");
    wait_for("the first file", Duration::from_secs(10), || {
        read(&key) == first
    });
    // Root ignores permission bits; the immutable attribute stops even root.
    let immutable = Immutable::set(&locked);
    daemon.cli_ok(&["secret", "rotate", "api-key"]).unwrap();
    let (_, _, second) = current(&daemon, "api-key");
    wait_for(
        "the write error in the log",
        Duration::from_secs(10),
        || agent.log().contains("sink not updated"),
    );
    drop(immutable);
    let log = agent.log();
    assert!(
        log.contains(&key.display().to_string()),
        "the error names the file: {log}"
    );
    assert_eq!(read(&key), first, "the previous file is intact");
    // Retried without another rotation once the directory is writable again.
    wait_for("the retried write", Duration::from_secs(15), || {
        read(&key) == second
    });
    assert!(!agent.log().contains(&second) && !agent.log().contains(&first));
}

/// `mayfly-agent exec` against `agent`, with a child shell script writing into `dir`.
fn exec(agent: &AgentProcess, args: &[&str], script: &str) -> std::process::Child {
    exec_as(agent, None, args, script)
}

fn exec_as(
    agent: &AgentProcess,
    uid: Option<u32>,
    args: &[&str],
    script: &str,
) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new(binary("mayfly-agent").unwrap());
    if let Some(uid) = uid {
        command.uid(uid).gid(uid);
    }
    command
        .arg("exec")
        .arg("--socket")
        .arg(&agent.socket_path)
        .args(args)
        .args(["--", "/bin/sh", "-c", script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn lines(path: &Path) -> Vec<String> {
    read(path).lines().map(str::to_string).collect()
}

#[test]
fn exec_restarts_its_child_once_per_rotation_forwards_signals_and_returns_its_code() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    // Tests run as root: the exec process is a uid-0 workload.
    daemon
        .cli_ok(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/app",
            "--parent-id",
            AGENT_ID,
            "--selector",
            "unix:uid:0",
        ])
        .unwrap();
    opaque_secret(&daemon, "app-key", &["spiffe://example.org/app"]);
    opaque_secret(&daemon, "unused", &["spiffe://example.org/app"]);
    let agent = AgentProcess::start(&daemon, AGENT_ID).unwrap();
    let dir = sink_dir();
    let starts = dir.path().join("starts");
    let signals = dir.path().join("signals");
    let env_file = dir.path().join("app.env");
    std::fs::write(
        &env_file,
        "# from a file\nKEY_VERSION=secret:app-key:version\nMODE=prod\n",
    )
    .unwrap();
    let script = format!(
        "echo \"$KEY $KEY_VERSION $MODE $SPIFFE_ENDPOINT_SOCKET\" >> {starts}; \
         trap 'echo usr1 >> {signals}' USR1; trap 'exit 0' TERM; while :; do sleep 0.05; done",
        starts = starts.display(),
        signals = signals.display()
    );
    let env_file_arg = env_file.display().to_string();
    let mut child = exec(
        &agent,
        &[
            "--env",
            "KEY=secret:app-key",
            "--env-file",
            &env_file_arg,
            "--stop-timeout",
            "5s",
        ],
        &script,
    );
    let (version, _, value) = current(&daemon, "app-key");
    wait_for("the first start", Duration::from_secs(15), || {
        lines(&starts).len() == 1
    });
    assert_eq!(
        lines(&starts)[0],
        format!(
            "{value} {version} prod unix://{}",
            agent.socket_path.display()
        )
    );
    for round in 2..=4 {
        daemon.cli_ok(&["secret", "rotate", "app-key"]).unwrap();
        let (_, _, value) = current(&daemon, "app-key");
        wait_for("a restart", Duration::from_secs(15), || {
            lines(&starts).len() == round
        });
        assert!(lines(&starts)[round - 1].starts_with(&value));
    }
    // Changes that do not touch what the child was given restart nothing.
    daemon.cli_ok(&["secret", "rotate", "unused"]).unwrap();
    daemon
        .cli_ok(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/another",
            "--parent-id",
            AGENT_ID,
            "--selector",
            "unix:uid:0",
        ])
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(lines(&starts).len(), 4, "restarted without a change");
    // Signals reach the child.
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    wait_for("the forwarded signal", Duration::from_secs(5), || {
        lines(&signals) == ["usr1"]
    });
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_child(&mut child, Duration::from_secs(10));
    assert_eq!(
        status.code(),
        Some(0),
        "the child's exit code after its TERM trap"
    );
    assert_eq!(lines(&starts).len(), 4);
    assert!(!agent.log().contains(&value));

    // Its exit code is exec's.
    let mut failing = exec(&agent, &["--env", "KEY=secret:app-key"], "exit 7");
    assert_eq!(
        wait_child(&mut failing, Duration::from_secs(15)).code(),
        Some(7)
    );

    // A secret this workload is not granted: a clear error, and the program never runs.
    let never = dir.path().join("never");
    let mut refused = exec(
        &agent,
        &["--env", "KEY=secret:not-granted", "--wait", "2s"],
        &format!("touch {}", never.display()),
    );
    let status = wait_child(&mut refused, Duration::from_secs(15));
    assert_eq!(status.code(), Some(125));
    let mut stderr = String::new();
    std::io::Read::read_to_string(refused.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("not-granted") && stderr.contains("not granted"),
        "{stderr}"
    );
    assert!(!never.exists());

    // Another uid's workload, with an entry of its own, gets only what its entry is granted.
    daemon
        .cli_ok(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/nobody",
            "--parent-id",
            AGENT_ID,
            "--selector",
            "unix:uid:65534",
        ])
        .unwrap();
    opaque_secret(&daemon, "nobody-key", &["spiffe://example.org/nobody"]);
    let (_, _, nobody_value) = current(&daemon, "nobody-key");
    let out = dir.path().join("nobody");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let mut theirs = exec_as(
        &agent,
        Some(65534),
        &["--env", "KEY=secret:nobody-key"],
        &format!("echo \"$KEY\" > {}", out.display()),
    );
    assert_eq!(
        wait_child(&mut theirs, Duration::from_secs(15)).code(),
        Some(0)
    );
    assert_eq!(read(&out).trim(), nobody_value);
    let mut not_theirs = exec_as(
        &agent,
        Some(65534),
        &["--env", "KEY=secret:app-key", "--wait", "2s"],
        &format!("echo \"$KEY\" > {}", out.display()),
    );
    assert_eq!(
        wait_child(&mut not_theirs, Duration::from_secs(15)).code(),
        Some(125)
    );
    assert_eq!(
        read(&out).trim(),
        nobody_value,
        "app-key never reached uid 65534"
    );
}

fn wait_child(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process did not exit in {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_agents_exec_child_starts_after_its_files_and_restarts_once_per_change() {
    init();
    let daemon = DaemonProcess::start(DaemonOptions::default()).unwrap();
    opaque_secret(&daemon, "app-key", &[AGENT_ID]);
    opaque_secret(&daemon, "app-cfg", &[AGENT_ID]);
    let dir = sink_dir();
    let cfg = dir.path().join("cfg");
    let starts = dir.path().join("starts");
    let stop = dir.path().join("stop");
    let script = format!(
        "echo \"$KEY $(cat {cfg})\" >> {starts}; trap 'exit 0' TERM; \
         while :; do sleep 0.05; [ -e {stop} ] && exit 3; done",
        cfg = cfg.display(),
        starts = starts.display(),
        stop = stop.display()
    );
    let extra = format!(
        "[[sink]]\nkind = \"secret\"\nsecret = \"app-cfg\"\npath = \"{cfg}\"\non_change = \"restart\"\n\
         [exec]\ncommand = [\"/bin/sh\", \"-c\", {script:?}]\nenv = {{ KEY = \"secret:app-key\" }}\nstop_timeout = \"5s\"\n",
        cfg = cfg.display(),
    );
    let mut agent = AgentProcess::start_with(&daemon, AGENT_ID, &extra).unwrap();
    let (_, _, key) = current(&daemon, "app-key");
    let (_, _, config) = current(&daemon, "app-cfg");
    wait_for("the child's first start", Duration::from_secs(15), || {
        lines(&starts).len() == 1
    });
    assert_eq!(
        lines(&starts)[0],
        format!("{key} {config}"),
        "the file was there before the child"
    );

    // Its environment changed: one restart.
    daemon.cli_ok(&["secret", "rotate", "app-key"]).unwrap();
    let (_, _, key) = current(&daemon, "app-key");
    wait_for(
        "the restart for the new key",
        Duration::from_secs(15),
        || lines(&starts).len() == 2,
    );
    // A file it reads changed (on_change = "restart"): one restart.
    daemon.cli_ok(&["secret", "rotate", "app-cfg"]).unwrap();
    let (_, _, config) = current(&daemon, "app-cfg");
    wait_for(
        "the restart for the new file",
        Duration::from_secs(15),
        || lines(&starts).len() == 3,
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(lines(&starts).len(), 3, "exactly one restart per change");
    assert_eq!(lines(&starts)[2], format!("{key} {config}"));

    // The child's end is the agent's: a failing exit code stops it with an error.
    std::fs::write(&stop, "").unwrap();
    let status = agent.wait_exit(Duration::from_secs(15)).unwrap();
    assert!(!status.success());
    assert!(
        agent.log().contains("exited with code 3"),
        "{}",
        agent.log()
    );
    assert!(!agent.log().contains(&key) && !agent.log().contains(&config));
}

/// A promotion carries its value to every stream: the secret's store (an AWS or Vault call
/// for those stores) is read once per rotation, not once per agent holding the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_reads_the_secret_once_however_many_agents_hold_it() {
    use mayfly_tests::bench::fanout;

    init();
    let daemon = DaemonProcess::start(DaemonOptions {
        metrics: true,
        ..DaemonOptions::default()
    })
    .unwrap();
    let result = fanout::run(&fanout::Options {
        node_addr: daemon.node_addr.clone(),
        admin_socket: daemon.admin_socket.clone(),
        metrics_addr: daemon.metrics_addr.clone().unwrap(),
        trust_domain: daemon.trust_domain.to_string(),
        agents: 8,
        rotations: 3,
    })
    .await
    .unwrap();
    assert_eq!(
        result.missed, 0,
        "every agent gets every version: {result:?}"
    );
    assert_eq!(
        result.store_reads_per_rotation, 1.0,
        "one read of the store per promotion: {result:?}"
    );
}

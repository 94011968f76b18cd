//! Starts the real `mayflyd` binary on a temporary data_dir and a free port, and gives
//! tests an operator CLI, an admin client and agent-side node API clients.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::transport::Channel;

use mayfly_common::TrustDomain;
use mayfly_common::tls::{TrustBundle, client_config, connect, server_id};
use mayfly_daemon::ca::{generate_csr, parse_pem_certs};
use mayfly_proto::v1::node_client::NodeClient;
use mayfly_proto::v1::{self};

/// Installs aws-lc-rs as rustls's provider; every test calls it first.
pub fn init() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// The directory holding the workspace's built binaries (target/debug or target/release).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // Test executables live in target/<profile>/deps; binaries one level up.
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.exists() {
        bail!(
            "{} is not built: run `cargo build --bins` first (scripts/test does)",
            path.display()
        );
    }
    Ok(path)
}

#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub trust_domain: String,
    pub datastore_url: String,
    /// Appended to the generated daemon.toml.
    pub extra_toml: String,
    /// Extra environment for the daemon process.
    pub env: Vec<(String, String)>,
    /// Serve /metrics on a free 127.0.0.1 port (`DaemonProcess::metrics`).
    pub metrics: bool,
    /// Another daemon's data_dir whose sealing key (secrets.key) this one shares, as every
    /// daemon on one datastore must; nothing else is copied.
    pub keys_from: Option<PathBuf>,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        Self {
            trust_domain: "example.org".into(),
            datastore_url: String::new(),
            extra_toml: String::new(),
            env: Vec::new(),
            metrics: false,
            keys_from: None,
        }
    }
}

/// A running `mayflyd run` process; killed on drop.
pub struct DaemonProcess {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub admin_socket: PathBuf,
    pub node_addr: String,
    /// `127.0.0.1:PORT` of the metrics endpoint, when asked for.
    pub metrics_addr: Option<String>,
    pub trust_domain: TrustDomain,
    /// Environment for the next spawn; tests change it between restarts.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl DaemonProcess {
    pub fn start(options: DaemonOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("mayfly-e2e-").tempdir()?;
        let port = free_port();
        let admin_socket = dir.path().join("admin.sock");
        let config_path = dir.path().join("daemon.toml");
        let metrics_addr = options
            .metrics
            .then(|| format!("127.0.0.1:{}", free_port()));
        if let Some(from) = &options.keys_from {
            copy_shared_keys(from, &dir.path().join("data"))?;
        }
        let metrics_line = metrics_addr
            .as_ref()
            .map(|addr| format!("metrics_listen = \"{addr}\"\n"))
            .unwrap_or_default();
        let config = format!(
            "trust_domain = \"{td}\"\ndata_dir = \"{data}\"\ndatastore_url = \"{url}\"\n\
             node_listen = \"127.0.0.1:{port}\"\nadmin_socket = \"{sock}\"\n{metrics_line}{extra}\n",
            td = options.trust_domain,
            data = dir.path().join("data").display(),
            url = options.datastore_url,
            sock = admin_socket.display(),
            extra = options.extra_toml,
        );
        std::fs::write(&config_path, config)?;
        let mut process = Self {
            trust_domain: TrustDomain::new(&options.trust_domain)?,
            config_path,
            admin_socket,
            node_addr: format!("127.0.0.1:{port}"),
            metrics_addr,
            env: options.env.clone(),
            child: None,
            dir,
        };
        process.spawn()?;
        Ok(process)
    }

    /// Starts (or restarts) the process on the same config and data.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(binary("mayflyd")?)
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env(
                "RUST_LOG",
                "debug,h2=info,hyper=info,hyper_util=info,tower=info,rustls=info,sqlx=info,aws=info,aws_smithy_runtime=info,aws_config=info",
            )
            .env("MAYFLY_ROTATION_RETRY_MS", "100")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting mayflyd")?;
        self.child = Some(child);
        let (admin, node) = (self.admin_socket.clone(), self.node_addr.clone());
        let log = self.log_path();
        wait_until_up(&mut self.child, "mayflyd", &log, || {
            std::os::unix::net::UnixStream::connect(&admin).is_ok()
                && std::net::TcpStream::connect(&node).is_ok()
        })
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the daemon to exit by itself (a crash point, say).
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let log = self.log_path();
        wait_for_exit(&mut self.child, "mayflyd", &log, timeout)
    }

    /// Stops the daemon with SIGTERM, as systemd would, and waits for it to exit.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("mayflyd is not running");
        };
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "mayflyd ignored SIGTERM for {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("mayflyd.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The metrics endpoint's answer to `GET /metrics` (over 127.0.0.1 only).
    pub async fn metrics(&self) -> anyhow::Result<String> {
        crate::bench::http1::metrics(self.metrics_address()?).await
    }

    /// One sample from /metrics, by its full name with labels, e.g.
    /// `mayfly_rotations_total{secret="db",outcome="failed"}`; `None` if absent.
    pub async fn metric(&self, series: &str) -> anyhow::Result<Option<f64>> {
        crate::bench::http1::metric(self.metrics_address()?, series).await
    }

    fn metrics_address(&self) -> anyhow::Result<&str> {
        self.metrics_addr
            .as_deref()
            .context("this daemon was started without metrics")
    }

    /// Runs an operator subcommand against this daemon.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        operator_cli(&self.admin_socket, args)
    }

    /// Runs an operator subcommand that must succeed, returning its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        operator_ok(&self.admin_socket, args)
    }

    /// Runs an operator subcommand with `--output json` and parses the result.
    pub fn cli_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        operator_json(&self.admin_socket, args)
    }

    /// `mayflyd secret create --file` with `toml` as the file; the summary it prints.
    pub fn define_secret(&self, toml: &str) -> anyhow::Result<serde_json::Value> {
        let path = self
            .dir
            .path()
            .join(format!("secret-{}.toml", rand::random::<u32>()));
        std::fs::write(&path, toml)?;
        self.cli_json(&["secret", "create", "--file", &path.to_string_lossy()])
    }

    /// (version, username, value) of the secret's current version, as an operator reads it.
    pub fn current_secret(&self, name: &str) -> anyhow::Result<(String, String, String)> {
        let v = self.cli_json(&["secret", "get", name])?;
        let field = |key: &str| {
            v[key]
                .as_str()
                .map(str::to_string)
                .with_context(|| format!("no {key} in `secret get {name}`"))
        };
        Ok((field("version")?, field("username")?, field("value")?))
    }

    /// `mayflyd entry create` for `spiffe_id` under `parent` with `selector` and any
    /// `extra` flags; the new entry's id.
    pub fn create_entry(
        &self,
        spiffe_id: &str,
        parent: &str,
        selector: &str,
        extra: &[&str],
    ) -> anyhow::Result<String> {
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--parent-id",
            parent,
            "--selector",
            selector,
        ];
        args.extend_from_slice(extra);
        self.cli_json(&args)?["id"]
            .as_str()
            .map(str::to_string)
            .context("no id in `entry create` output")
    }

    /// A fresh join token for `spiffe_id`.
    pub fn join_token(&self, spiffe_id: &str) -> anyhow::Result<String> {
        let value = self.cli_json(&["token", "generate", "--spiffe-id", spiffe_id])?;
        value["token"]
            .as_str()
            .map(str::to_string)
            .context("no token in output")
    }

    /// The trust bundle's CA certificates (DER), as an operator would hand to an agent.
    pub fn bundle(&self) -> anyhow::Result<Vec<Vec<u8>>> {
        let pem = self.cli_ok(&["bundle", "show"])?;
        Ok(parse_pem_certs(&pem)?)
    }

    /// A node API client without a client certificate (only Attest accepts it).
    pub async fn anonymous_node(&self) -> anyhow::Result<NodeClient<Channel>> {
        let bundle = TrustBundle::new(&self.bundle()?)?;
        let config = client_config(server_id(&self.trust_domain)?, bundle, None)?;
        Ok(NodeClient::new(connect(&self.node_addr, config).await?))
    }

    /// Attests a new agent with a join token and returns its identity.
    pub async fn attest(&self, agent_id: &str) -> anyhow::Result<AgentIdentity> {
        let token = self.join_token(agent_id)?;
        let (key, csr) = generate_csr(None)?;
        let response = self
            .anonymous_node()
            .await?
            .attest(v1::AttestRequest {
                join_token: token,
                csr,
            })
            .await?
            .into_inner();
        let bundle = response
            .bundle
            .map(|b| b.x509_authorities)
            .context("no bundle in AttestResponse")?;
        Ok(AgentIdentity {
            spiffe_id: response.spiffe_id,
            chain: response.svid_chain,
            key: key.to_vec(),
            bundle,
        })
    }

    /// A node API client authenticated as `agent`.
    pub async fn node(&self, agent: &AgentIdentity) -> anyhow::Result<NodeClient<Channel>> {
        let bundle = TrustBundle::new(&agent.bundle)?;
        let chain = agent
            .chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(agent.key.clone()));
        let config = client_config(server_id(&self.trust_domain)?, bundle, Some((chain, key)))?;
        Ok(NodeClient::new(connect(&self.node_addr, config).await?)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024))
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A SignSvids request with one fresh CSR for `entry_id`.
pub fn csr_request(entry_id: &str) -> v1::SignSvidsRequest {
    let (_key, csr) = generate_csr(None).expect("a fresh P-256 CSR");
    v1::SignSvidsRequest {
        csrs: vec![v1::SvidCsr {
            entry_id: entry_id.to_string(),
            csr,
        }],
    }
}

/// An attested agent's SVID and key, as the agent would keep them.
#[derive(Clone)]
pub struct AgentIdentity {
    pub spiffe_id: String,
    pub chain: Vec<Vec<u8>>,
    pub key: Vec<u8>,
    pub bundle: Vec<Vec<u8>>,
}

impl std::fmt::Debug for AgentIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentIdentity")
            .field("spiffe_id", &self.spiffe_id)
            .finish_non_exhaustive()
    }
}

/// A running `mayfly-agent run` process attested to a daemon; killed on drop.
pub struct AgentProcess {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub socket_path: PathBuf,
    pub spiffe_id: String,
    child: Option<Child>,
}

impl AgentProcess {
    /// Writes agent.toml (bootstrap bundle from the daemon, a fresh join token) and starts
    /// the agent, waiting until its Workload API socket answers.
    pub fn start(daemon: &DaemonProcess, spiffe_id: &str) -> anyhow::Result<Self> {
        Self::start_with(daemon, spiffe_id, "")
    }

    /// [`AgentProcess::start`] with `extra_toml` (sinks, `[exec]`) appended to agent.toml.
    pub fn start_with(
        daemon: &DaemonProcess,
        spiffe_id: &str,
        extra_toml: &str,
    ) -> anyhow::Result<Self> {
        Self::start_with_addresses(daemon, &daemon.node_addr, spiffe_id, extra_toml)
    }

    /// Attested through `daemon` (its bundle and join token), configured with
    /// `addresses` as its `daemon_address` (several daemons, comma-separated).
    pub fn start_with_addresses(
        daemon: &DaemonProcess,
        addresses: &str,
        spiffe_id: &str,
        extra_toml: &str,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("mayfly-agent-e2e-")
            .tempdir()?;
        // Workloads under other uids must reach the socket.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let bundle_path = dir.path().join("bootstrap.pem");
        std::fs::write(&bundle_path, daemon.cli_ok(&["bundle", "show"])?)?;
        let token = daemon.join_token(spiffe_id)?;
        let socket_path = dir.path().join("api.sock");
        let config_path = dir.path().join("agent.toml");
        std::fs::write(
            &config_path,
            format!(
                "trust_domain = \"{td}\"\ndaemon_address = \"{addr}\"\ntrust_bundle_path = \"{bundle}\"\n\
                 join_token_file = \"{token_file}\"\ndata_dir = \"{data}\"\nsocket_path = \"{sock}\"\n{extra_toml}\n",
                td = daemon.trust_domain,
                addr = addresses,
                bundle = bundle_path.display(),
                token_file = dir.path().join("token").display(),
                data = dir.path().join("data").display(),
                sock = socket_path.display(),
            ),
        )?;
        std::fs::write(dir.path().join("token"), token)?;
        let mut agent = Self {
            dir,
            config_path,
            socket_path,
            spiffe_id: spiffe_id.to_string(),
            child: None,
        };
        agent.spawn()?;
        Ok(agent)
    }

    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(&self.socket_path);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(binary("mayfly-agent")?)
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env(
                "RUST_LOG",
                "debug,h2=info,hyper=info,hyper_util=info,tower=info,rustls=info",
            )
            .env_remove("MAYFLY_JOIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting mayfly-agent")?;
        self.child = Some(child);
        let socket = self.socket_path.clone();
        let log = self.log_path();
        wait_until_up(&mut self.child, "mayfly-agent", &log, || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        })
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the agent process to exit by itself, returning its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let log = self.log_path();
        wait_for_exit(&mut self.child, "mayfly-agent", &log, timeout)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// Sends `signal` (e.g. "HUP") to the running agent.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .child
            .as_ref()
            .context("the agent is not running")?
            .id();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket_path.display())
    }

    /// Runs `mayfly-agent api …` against this agent, as `uid` when given.
    pub fn api(&self, args: &[&str], uid: Option<u32>) -> anyhow::Result<Output> {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(binary("mayfly-agent")?);
        command
            .arg("api")
            .args(args)
            .arg("--socket")
            .arg(&self.socket_path)
            .stdin(Stdio::null());
        if let Some(uid) = uid {
            command.uid(uid).gid(uid);
        }
        Ok(command.output()?)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `mayflyd ARGS` against the daemon whose admin socket is `admin_socket`, as an
/// operator runs it.
pub fn operator_cli(admin_socket: &Path, args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(binary("mayflyd")?)
        .args(args)
        .env("MAYFLY_ADMIN_SOCKET", admin_socket)
        .stdin(Stdio::null())
        .output()?)
}

/// [`operator_cli`] that must succeed, returning its stdout.
pub fn operator_ok(admin_socket: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = operator_cli(admin_socket, args)?;
    if !out.status.success() {
        bail!(
            "mayflyd {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// [`operator_cli`] with `--output json`, parsed.
pub fn operator_json(admin_socket: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    Ok(serde_json::from_str(&operator_ok(admin_socket, &all)?)?)
}

/// A file or directory made immutable (`chattr +i`), which stops writes even by root
/// (root ignores permission bits), until this is dropped: a failing test still leaves a
/// temporary directory its owner can remove.
pub struct Immutable(PathBuf);

impl Immutable {
    pub fn set(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        chattr("+i", &path);
        Immutable(path)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        chattr("-i", &self.0);
    }
}

fn chattr(flag: &str, path: &Path) {
    let status = std::process::Command::new("chattr")
        .arg(flag)
        .arg(path)
        .status()
        .expect("chattr runs");
    assert!(
        status.success(),
        "chattr {flag} must work on the test filesystem"
    );
}

/// Polls `check` every 20 ms until it holds, failing the test after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to 30 s for a started process to be `ready`, failing with its log if it exits.
fn wait_until_up(
    child: &mut Option<Child>,
    what: &str,
    log: &Path,
    ready: impl Fn() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(process) = child.as_mut()
            && let Some(status) = process.try_wait()?
        {
            bail!("{what} exited with {status}; log:\n{}", read_log(log));
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} did not come up in 30 s; log:\n{}", read_log(log));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for a process to exit by itself, returning its status.
fn wait_for_exit(
    child: &mut Option<Child>,
    what: &str,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(process) = child.as_mut()
            && let Some(status) = process.try_wait()?
        {
            *child = None;
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!(
                "{what} still running after {timeout:?}; log:\n{}",
                read_log(log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Copies the sealing key (secrets.key) from one data_dir into another (0700/0600), and
/// nothing else: the CA keys are sealed in the datastore, and the rest of a data_dir is
/// the daemon's own.
fn copy_shared_keys(from: &Path, to: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let private_dir = |dir: &Path| -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(())
    };
    let copy = |src: &Path, dst: &Path| -> anyhow::Result<()> {
        std::fs::copy(src, dst).with_context(|| format!("copying {}", src.display()))?;
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o600))?;
        Ok(())
    };
    private_dir(to)?;
    copy(&from.join("secrets.key"), &to.join("secrets.key"))
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

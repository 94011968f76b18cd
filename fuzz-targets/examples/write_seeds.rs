//! Writes the seed inputs of every fuzz target into `fuzz/corpus/NAME/`, made by the
//! project's own code wherever there is some: CSRs from the agent's key generation, SVIDs
//! signed by the CA code, JWT-SVIDs signed by the JWT authority, an audit export from the
//! daemon's store, the example configs of `config/`. The fuzzer grows the corpus from them;
//! run again only to reseed (`cargo run -p mayfly-fuzz-targets --example write_seeds`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use prost::Message;

use mayfly_common::svid::{
    JwtAuthority, SvidRequest, X509Authority, bundle_pem, generate_ca, generate_csr,
};
use mayfly_daemon::audit::record_hash;
use mayfly_daemon::store::{AuditFields, AuditFilter, Store};
use mayfly_fuzz_targets::{AGENT_ID, JWT_KID, JWT_NOW_UNIX, TRUST_DOMAIN, WORKLOAD_ID};
use mayfly_proto::{v1, workload};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let corpus = root.join("fuzz/corpus");
    let seeds = Seeds { corpus };

    seeds.text_set(
        "spiffe_id",
        &[
            "spiffe://example.org/ns/prod/sa/web",
            "spiffe://example.org",
            "example.org",
            "spiffe://a-b_c.0/x/y.z/-_",
            "spiffe://Example.org/a",
            "spiffe://example.org:8443/a",
            "spiffe://user@example.org/a",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a/",
            "spiffe://example.org/a%20b",
            "spiffe://example.org/a?q=1#f",
            "https://example.org/a",
        ],
    )?;
    seeds.text_set(
        "selector",
        &[
            "unix:uid:1000",
            "unix:gid:0",
            "unix:user:www-data",
            "unix:group:wheel",
            "unix:path:/usr/bin/app",
            "unix:sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "unix:uid:4294967296",
            "unix:path:relative",
            "k8s:ns:default",
            "unix:",
        ],
    )?;

    // Certificates and CSRs, made by the project's CA and CSR code.
    let now = SystemTime::now();
    let material = generate_ca(TRUST_DOMAIN, Duration::from_secs(365 * 86_400), now)?;
    let ca = X509Authority::new(&material.cert_der, &material.key_pkcs8)?;
    let (_key, workload_csr) = generate_csr(Some(WORKLOAD_ID))?;
    let (_key, bare_csr) = generate_csr(None)?;
    let (_key, agent_csr) = generate_csr(Some(AGENT_ID))?;
    let dns_names = ["web.example.org".to_owned()];
    let svid = ca.sign_svid(
        &workload_csr,
        &SvidRequest {
            dns_names: &dns_names,
            ..SvidRequest::new(WORKLOAD_ID, Duration::from_secs(3600))
        },
        now,
    )?;
    let rcgen_csr = rcgen_csr()?;
    seeds.bytes_set(
        "certificate",
        &[
            ("svid.der", svid.cert_der.clone()),
            ("ca.der", material.cert_der.clone()),
            (
                "bundle.pem",
                bundle_pem(&[svid.cert_der.clone(), material.cert_der.clone()]).into_bytes(),
            ),
        ],
    )?;
    seeds.bytes_set(
        "csr",
        &[
            ("workload.der", workload_csr.clone()),
            ("bare.der", bare_csr.clone()),
            ("rcgen-dns.der", rcgen_csr),
        ],
    )?;
    let attest = |token: &str, csr: &[u8]| {
        v1::AttestRequest {
            join_token: token.to_owned(),
            csr: csr.to_vec(),
        }
        .encode_to_vec()
    };
    let token = URL_SAFE_NO_PAD.encode([7u8; 32]);
    seeds.bytes_set(
        "join_token",
        &[
            ("attest.pb", attest(&token, &agent_csr)),
            ("no-spiffe-id.pb", attest(&token, &bare_csr)),
            ("empty-token.pb", attest("", &agent_csr)),
        ],
    )?;

    // JWT-SVIDs: tokens as the JWT authority signs them (another key than the target's, so
    // they stop at the signature), and claims the target signs itself.
    let jwt = JwtAuthority::new(JWT_KID, &material.jwt_key_pkcs8)?;
    let issued_at = UNIX_EPOCH + Duration::from_secs(JWT_NOW_UNIX - 60);
    let one = jwt.sign(
        "spiffe://example.org/web",
        &["orders".to_owned()],
        Duration::from_secs(300),
        issued_at,
    )?;
    let many = jwt.sign(
        "spiffe://example.org/web",
        &["orders".to_owned(), "billing".to_owned()],
        Duration::from_secs(300),
        issued_at,
    )?;
    seeds.text_set(
        "jwt_svid",
        &[
            &format!("orders\n{one}"),
            &format!("billing\n{many}"),
            "orders\n{\"sub\":\"spiffe://example.org/web\",\"aud\":\"orders\",\"exp\":1900000000,\"iat\":1799999940}",
            "orders\n{\"sub\":\"spiffe://example.org/web\",\"aud\":[\"orders\",\"billing\"],\"exp\":1900000000,\"nbf\":1700000000,\"x\":{\"nested\":[1,2.5,null,true]}}",
            "orders\n{\"sub\":\"spiffe://other.org/web\",\"aud\":\"orders\",\"exp\":1900000000}",
            "orders\n{\"sub\":\"spiffe://example.org/web\",\"aud\":\"orders\",\"exp\":1700000000}",
            "orders\neyJhbGciOiJub25lIn0.eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlLm9yZy93ZWIifQ.",
        ],
    )?;

    // Workload API request bodies: a flag byte (odd: grpc-encoding named), then the body.
    let framed = |flags: u8, compressed: u8, message: &[u8]| {
        let mut body = vec![flags, compressed];
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(message);
        body
    };
    let validate = workload::ValidateJwtsvidRequest {
        audience: "orders".into(),
        svid: one.clone(),
    }
    .encode_to_vec();
    let fetch = workload::JwtsvidRequest {
        audience: vec!["orders".into(), "billing".into()],
        spiffe_id: "spiffe://example.org/web".into(),
    }
    .encode_to_vec();
    seeds.bytes_set(
        "grpc_request",
        &[
            ("empty.bin", framed(0, 0, &[])),
            ("validate.bin", framed(0, 0, &validate)),
            ("fetch-jwt.bin", framed(0, 0, &fetch)),
            ("compressed.bin", framed(1, 1, &fetch)),
            ("short.bin", framed(0, 0, &fetch)[..9].to_vec()),
        ],
    )?;
    seeds.text_set(
        "grpc_timeout",
        &[
            "1S",
            "100m",
            "99999999H",
            "5n",
            "30u",
            "2M",
            "123456789S",
            "S",
            "1s",
        ],
    )?;

    // Configs: the documented examples, as shipped and with every commented-out table on.
    let daemon_toml = std::fs::read_to_string(root.join("config/daemon.toml"))?;
    let agent_toml = std::fs::read_to_string(root.join("config/agent.toml"))?;
    seeds.text_set(
        "daemon_config",
        &[&daemon_toml, &uncomment(&daemon_toml, "# [[secret]]")],
    )?;
    seeds.text_set(
        "agent_config",
        &[&agent_toml, &uncomment(&agent_toml, "# [[sink]]")],
    )?;
    seeds.text_set(
        "secret_spec",
        &[
            "name = \"orders-db\"\nschedule = \"0 3 * * *\"\nwindow = { start = \"02:00\", duration = \"3h\" }\nstrategy = \"alternating-users\"\nusers = [\"orders_a\", \"orders_b\"]\nmax_attempts = 5\ngrants = [\"spiffe://example.org/orders\"]\nsets = [\"prod-db\"]\ngenerator = { length = 32, lowercase = true, uppercase = true, digits = true, symbols = true, exclude = \"\" }\n[store]\nkind = \"local\"\n[target]\nkind = \"postgres\"\nadmin_url = \"postgres://mayfly_admin:x@db:5432/postgres\"\n",
            "name = \"api-key\"\nschedule = \"rate(12h)\"\nstrategy = \"single-user\"\n[store]\nkind = \"vault\"\naddress = \"https://vault:8200\"\nmount = \"secret\"\npath = \"api/key\"\napprole = { role_id = \"r\", secret_id = \"s\" }\n[target]\nkind = \"none\"\nhook = [\"/usr/local/bin/install-key\"]\n",
            "name = \"aws\"\nschedule = \"@daily\"\nstrategy = \"single-user\"\nusers = [\"app\"]\n[store]\nkind = \"aws\"\nsecret_id = \"prod/app\"\nregion = \"eu-west-1\"\n[target]\nkind = \"mysql\"\nadmin_url = \"mysql://root:x@db:3306\"\nhost = \"%\"\n",
            "name = \"orders\"\ngrants = [\"spiffe://example.org/orders\"]\ndefault_ttl = \"1h\"\n[backend]\nkind = \"postgres_dynamic\"\nadmin_url = \"postgres://postgres@127.0.0.1/db\"\n",
        ],
    )?;
    seeds.text_set(
        "template",
        &[
            "127.0.0.1:5432:*:{{ secrets['orders-db'].username }}:{{ secrets['orders-db'].password }}\ncert={{ svids.web.cert_path }} td={{ trust_domain }}\n",
            "{{ secrets.nope.password }}",
            "{% for name in secrets %}{{ name }}={{ secrets[name].value | upper }}\n{% endfor %}",
            "{% if trust_domain == 'example.org' %}{{ svids.web | tojson }}{% else %}{{ 1 / 0 }}{% endif %}\n",
            "{% set x = [1, 2, 3] %}{{ x | join(',') }} {{ range(3) | list }} {{ 'a' ~ 'b' }}",
            "{{ unclosed",
        ],
    )?;
    seeds.text_set("audit_export", &[&audit_export().await?])?;
    Ok(())
}

struct Seeds {
    corpus: PathBuf,
}

impl Seeds {
    fn text_set(&self, target: &str, inputs: &[&str]) -> anyhow::Result<()> {
        let named: Vec<(String, Vec<u8>)> = inputs
            .iter()
            .enumerate()
            .map(|(n, text)| (format!("seed-{n:02}.txt"), text.as_bytes().to_vec()))
            .collect();
        self.write(target, &named)
    }

    fn bytes_set(&self, target: &str, inputs: &[(&str, Vec<u8>)]) -> anyhow::Result<()> {
        let named: Vec<(String, Vec<u8>)> = inputs
            .iter()
            .map(|(name, data)| (format!("seed-{name}"), data.clone()))
            .collect();
        self.write(target, &named)
    }

    fn write(&self, target: &str, named: &[(String, Vec<u8>)]) -> anyhow::Result<()> {
        let dir = self.corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, data) in named {
            std::fs::write(dir.join(name), data)?;
        }
        println!("{target}: {} seeds", named.len());
        Ok(())
    }
}

/// A CSR made by rcgen directly, with a DNS SAN and a subject, unlike the agent's.
fn rcgen_csr() -> anyhow::Result<Vec<u8>> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec!["web.example.org".to_owned()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "web");
    Ok(params.serialize_request(&key)?.der().to_vec())
}

/// `text` with the commented-out example starting at `marker` turned on, up to the next
/// line of dashes or blank line.
fn uncomment(text: &str, marker: &str) -> String {
    let mut on = false;
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with(marker) {
            on = true;
        } else if on && (line.starts_with("# ---") || line.trim().is_empty()) {
            on = false;
        }
        let line = match line.strip_prefix("# ") {
            Some(rest) if on => rest,
            _ => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// An audit export as `mayflyd audit export` writes it: records appended to a fresh SQLite
/// store by the daemon's chain code, read back, one JSON object a line.
async fn audit_export() -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let store = Store::connect(None, dir.path()).await?;
    let at_ms = 1_764_000_000_000;
    let records = [
        (
            "token.generate",
            "spiffe://example.org/mayfly/agent/node-1",
            "",
        ),
        (
            "agent.attest",
            "spiffe://example.org/mayfly/agent/node-1",
            "",
        ),
        (
            "entry.create",
            "spiffe://example.org/web",
            "{\"selectors\":[\"unix:uid:1000\"]}",
        ),
        ("secret.read", "orders-db", ""),
    ];
    let fields: Vec<AuditFields> = records
        .iter()
        .enumerate()
        .map(|(n, (action, subject, detail))| AuditFields {
            at_ms: at_ms + n as i64 * 1000,
            actor: "operator root (uid 0)".into(),
            action: (*action).into(),
            subject: (*subject).into(),
            scope: String::new(),
            ttl_secs: 0,
            reason: String::new(),
            outcome: "ok".into(),
            detail: (*detail).into(),
        })
        .collect();
    store
        .append_audit(&fields, &[], &[], None, record_hash)
        .await?;
    let rows = store
        .list_audit(&AuditFilter {
            limit: 100,
            ..AuditFilter::default()
        })
        .await?;
    let mut out = String::new();
    for row in rows {
        out.push_str(&serde_json::to_string(&row)?);
        out.push('\n');
    }
    Ok(out)
}

//! `mayfly-agent creds …`: asks the agent's Workload API for a TTL-bound credential as the
//! process running the command, and prints it as JSON, as `KEY=value` lines, or as AWS
//! `credential_process` output. Values go to stdout only: an error names the credential
//! and what is wrong with it, never a value.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::bail;
use serde::Serialize;

use mayfly_proto::v1::workload_credentials_client::WorkloadCredentialsClient;
use mayfly_proto::v1::{GetCredentialRequest, WorkloadCredential};

use super::endpoint::WorkloadEndpoint;
use super::{CredentialRequest, CredsCommand, CredsFormat, api};

/// The value names an AWS credential carries: an STS session's keys.
const ACCESS_KEY_ID: &str = "access_key_id";
const SECRET_ACCESS_KEY: &str = "secret_access_key";
const SESSION_TOKEN: &str = "session_token";

/// Fetches the credential and renders it; the text is what the command prints.
pub async fn run(command: CredsCommand, socket: Option<&str>) -> anyhow::Result<String> {
    let (request, render): (_, fn(&WorkloadCredential) -> anyhow::Result<String>) = match command {
        CredsCommand::Get {
            request,
            format: CredsFormat::Json,
        } => (request, render_json),
        CredsCommand::Get {
            request,
            format: CredsFormat::Env,
        } => (request, render_env),
        CredsCommand::Aws { request } => (request, render_aws),
    };
    let CredentialRequest {
        name,
        spiffe_id,
        ttl,
    } = request;
    let endpoint = WorkloadEndpoint::resolve(socket)?;
    let mut client = WorkloadCredentialsClient::new(endpoint.connect().await?);
    let credential = client
        .get_credential(api::request(GetCredentialRequest {
            name,
            spiffe_id: spiffe_id.unwrap_or_default(),
            ttl_seconds: ttl.map_or(0, |ttl| i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
        }))
        .await
        .map_err(api::status)?
        .into_inner();
    render(&credential)
}

/// `--ttl`: a humantime duration of whole seconds, at least one.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|e| format!("`{text}`: {e}"))?;
    if ttl < Duration::from_secs(1) || ttl.subsec_nanos() != 0 {
        return Err(format!("`{text}`: a TTL is whole seconds, at least 1s"));
    }
    Ok(ttl)
}

/// Every field of the credential, values included.
fn render_json(credential: &WorkloadCredential) -> anyhow::Result<String> {
    #[derive(Serialize)]
    struct Shown<'a> {
        name: &'a str,
        kind: &'a str,
        spiffe_id: &'a str,
        lease_id: &'a str,
        issued_at: i64,
        expires_at: i64,
        values: BTreeMap<&'a str, &'a str>,
        notice: &'a str,
    }
    let shown = Shown {
        name: &credential.name,
        kind: &credential.kind,
        spiffe_id: &credential.spiffe_id,
        lease_id: &credential.lease_id,
        issued_at: credential.issued_at,
        expires_at: credential.expires_at,
        values: credential
            .values
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect(),
        notice: &credential.notice,
    };
    Ok(format!("{}\n", serde_json::to_string_pretty(&shown)?))
}

/// `KEY=value` lines, the value names upper-cased, then the lease and its expiry: what an
/// env file or `export $(…)` takes.
fn render_env(credential: &WorkloadCredential) -> anyhow::Result<String> {
    let values: BTreeMap<String, &str> = credential
        .values
        .iter()
        .map(|(key, value)| (env_name(key), value.as_str()))
        .collect();
    let mut out = String::new();
    for (key, value) in values {
        if value.contains(['\n', '\r', '\0']) {
            bail!(
                "value {key} of credential {} holds a line break, which a KEY=value line cannot carry; use --format json",
                credential.name
            );
        }
        out.push_str(&format!("{key}={value}\n"));
    }
    out.push_str(&format!("MAYFLY_LEASE_ID={}\n", credential.lease_id));
    out.push_str(&format!(
        "MAYFLY_EXPIRES_AT={}\n",
        rfc3339(credential.expires_at)
    ));
    Ok(out)
}

/// AWS `credential_process` output; a credential without AWS keys is refused by name.
fn render_aws(credential: &WorkloadCredential) -> anyhow::Result<String> {
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct Process<'a> {
        version: u8,
        access_key_id: &'a str,
        secret_access_key: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        session_token: Option<&'a str>,
        expiration: String,
    }
    let value = |key: &str| credential.values.get(key).map(String::as_str);
    let (Some(access_key_id), Some(secret_access_key)) =
        (value(ACCESS_KEY_ID), value(SECRET_ACCESS_KEY))
    else {
        let mut names: Vec<&str> = credential.values.keys().map(String::as_str).collect();
        names.sort_unstable();
        bail!(
            "credential {} is of kind {} and holds no AWS keys ({ACCESS_KEY_ID}, {SECRET_ACCESS_KEY}) but {}: use `mayfly-agent creds get`",
            credential.name,
            credential.kind,
            names.join(", ")
        );
    };
    let process = Process {
        version: 1,
        access_key_id,
        secret_access_key,
        session_token: value(SESSION_TOKEN),
        expiration: rfc3339(credential.expires_at),
    };
    Ok(format!("{}\n", serde_json::to_string(&process)?))
}

/// A value's name as an environment variable: upper-cased, anything but letters, digits
/// and `_` made `_`, and never starting with a digit.
fn env_name(key: &str) -> String {
    let mut name: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
    }
    name
}

/// Unix seconds as RFC 3339 in UTC, e.g. `2026-01-01T00:00:00Z`.
fn rfc3339(unix_seconds: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_secs(u64::try_from(unix_seconds).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credential(values: &[(&str, &str)]) -> WorkloadCredential {
        WorkloadCredential {
            name: "orders-db".into(),
            kind: "postgres_dynamic".into(),
            values: values
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            lease_id: "ls-0123".into(),
            issued_at: 1_767_225_000,
            expires_at: 1_767_225_600,
            spiffe_id: "spiffe://example.org/app".into(),
            notice: String::new(),
        }
    }

    #[test]
    fn env_lines_upper_case_the_names_and_add_the_lease() {
        let text = render_env(&credential(&[
            ("username", "v_orders_1"),
            ("password", "Pw=1;x"),
            ("db-host", "h"),
        ]))
        .unwrap();
        assert_eq!(
            text,
            "DB_HOST=h\nPASSWORD=Pw=1;x\nUSERNAME=v_orders_1\nMAYFLY_LEASE_ID=ls-0123\n\
             MAYFLY_EXPIRES_AT=2026-01-01T00:00:00Z\n"
        );
        let err = render_env(&credential(&[("password", "a\nb")])).unwrap_err();
        assert!(err.to_string().contains("PASSWORD"), "{err}");
        assert!(!err.to_string().contains("a\nb"));
    }

    #[test]
    fn json_carries_every_field_with_the_values() {
        let text = render_json(&credential(&[("username", "u"), ("password", "p")])).unwrap();
        let shown: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(shown["values"]["password"], "p");
        assert_eq!(shown["lease_id"], "ls-0123");
        assert_eq!(shown["spiffe_id"], "spiffe://example.org/app");
        assert_eq!(shown["expires_at"], 1_767_225_600);
        assert_eq!(shown["kind"], "postgres_dynamic");
    }

    #[test]
    fn aws_output_is_credential_process_json() {
        let text = render_aws(&credential(&[
            ("access_key_id", "AKIAEXAMPLE"),
            ("secret_access_key", "wJalrSECRET"),
            ("session_token", "FwoGTOKEN"),
        ]))
        .unwrap();
        assert_eq!(
            text,
            "{\"Version\":1,\"AccessKeyId\":\"AKIAEXAMPLE\",\"SecretAccessKey\":\"wJalrSECRET\",\
             \"SessionToken\":\"FwoGTOKEN\",\"Expiration\":\"2026-01-01T00:00:00Z\"}\n"
        );
    }

    #[test]
    fn aws_refuses_another_kind_by_name_without_its_values() {
        let err = render_aws(&credential(&[("username", "u"), ("password", "hunter2")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("orders-db") && err.contains("postgres_dynamic"),
            "{err}"
        );
        assert!(err.contains("no AWS keys"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn ttls_are_whole_seconds() {
        assert_eq!(parse_ttl("30m"), Ok(Duration::from_secs(1800)));
        assert!(parse_ttl("500ms").unwrap_err().contains("whole seconds"));
        assert!(parse_ttl("soon").is_err());
    }
}

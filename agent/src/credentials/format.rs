//! A credential as text: the JSON document, `KEY=value` lines, AWS `credential_process`
//! output and an AWS shared-credentials profile. `mayfly-agent creds` prints them and
//! credential sinks write them, so both say the same thing the same way. An error names
//! the credential and the value's name, never a value.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;
use zeroize::Zeroizing;

use mayfly_proto::v1::WorkloadCredential;

/// The value names an AWS credential carries: an STS session's keys.
pub const ACCESS_KEY_ID: &str = "access_key_id";
pub const SECRET_ACCESS_KEY: &str = "secret_access_key";
pub const SESSION_TOKEN: &str = "session_token";

#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error(
        "value {key} of credential {name} holds a line break, which a KEY=value line cannot carry; use the JSON form"
    )]
    MultiLine { name: String, key: String },
    #[error(
        "credential {name} is of kind {kind} and holds no AWS keys ({ACCESS_KEY_ID}, {SECRET_ACCESS_KEY}) but {names}"
    )]
    NotAws {
        name: String,
        kind: String,
        names: String,
    },
}

/// Every field of the credential, values included, pretty-printed with a final newline.
pub fn json(credential: &WorkloadCredential) -> Zeroizing<String> {
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
    // Strings and integers only: serializing cannot fail.
    let mut text = Zeroizing::new(serde_json::to_string_pretty(&shown).unwrap_or_default());
    text.push('\n');
    text
}

/// `KEY=value` lines, the value names upper-cased, then the lease and its expiry: what an
/// env file or `export $(…)` takes.
pub fn env(credential: &WorkloadCredential) -> Result<Zeroizing<String>, FormatError> {
    let values: BTreeMap<String, &str> = credential
        .values
        .iter()
        .map(|(key, value)| (env_name(key), value.as_str()))
        .collect();
    let mut out = Zeroizing::new(String::new());
    for (key, value) in values {
        if value.contains(['\n', '\r', '\0']) {
            return Err(FormatError::MultiLine {
                name: credential.name.clone(),
                key,
            });
        }
        out.push_str(&key);
        out.push('=');
        out.push_str(value);
        out.push('\n');
    }
    out.push_str(&format!("MAYFLY_LEASE_ID={}\n", credential.lease_id));
    out.push_str(&format!(
        "MAYFLY_EXPIRES_AT={}\n",
        rfc3339(credential.expires_at)
    ));
    Ok(out)
}

/// The three AWS keys, or why the credential has none.
fn aws_keys(credential: &WorkloadCredential) -> Result<(&str, &str, Option<&str>), FormatError> {
    let value = |key: &str| credential.values.get(key).map(String::as_str);
    match (value(ACCESS_KEY_ID), value(SECRET_ACCESS_KEY)) {
        (Some(id), Some(secret)) => Ok((id, secret, value(SESSION_TOKEN))),
        _ => {
            let mut names: Vec<&str> = credential.values.keys().map(String::as_str).collect();
            names.sort_unstable();
            Err(FormatError::NotAws {
                name: credential.name.clone(),
                kind: credential.kind.clone(),
                names: names.join(", "),
            })
        }
    }
}

/// AWS `credential_process` output (Version 1), one line.
pub fn aws_process(credential: &WorkloadCredential) -> Result<Zeroizing<String>, FormatError> {
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
    let (access_key_id, secret_access_key, session_token) = aws_keys(credential)?;
    let process = Process {
        version: 1,
        access_key_id,
        secret_access_key,
        session_token,
        expiration: rfc3339(credential.expires_at),
    };
    let mut text = Zeroizing::new(serde_json::to_string(&process).unwrap_or_default());
    text.push('\n');
    Ok(text)
}

/// An AWS shared-credentials file holding one `[default]` profile, for apps that read
/// `~/.aws/credentials` (AWS_SHARED_CREDENTIALS_FILE) and nothing else.
pub fn aws_profile(credential: &WorkloadCredential) -> Result<Zeroizing<String>, FormatError> {
    let (access_key_id, secret_access_key, session_token) = aws_keys(credential)?;
    let mut out = Zeroizing::new(String::from("[default]\n"));
    for (key, value) in [
        ("aws_access_key_id", Some(access_key_id)),
        ("aws_secret_access_key", Some(secret_access_key)),
        ("aws_session_token", session_token),
    ] {
        let Some(value) = value else { continue };
        if value.contains(['\n', '\r']) {
            return Err(FormatError::MultiLine {
                name: credential.name.clone(),
                key: key.to_string(),
            });
        }
        out.push_str(key);
        out.push_str(" = ");
        out.push_str(value);
        out.push('\n');
    }
    out.push_str(&format!(
        "# mayfly lease {}, expires {}\n",
        credential.lease_id,
        rfc3339(credential.expires_at)
    ));
    Ok(out)
}

/// A value's name as an environment variable: upper-cased, anything but letters, digits
/// and `_` made `_`, and never starting with a digit.
pub fn env_name(key: &str) -> String {
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
pub fn rfc3339(unix_seconds: i64) -> String {
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
        let text = env(&credential(&[
            ("username", "v_orders_1"),
            ("password", "Pw=1;x"),
            ("db-host", "h"),
        ]))
        .unwrap();
        assert_eq!(
            *text,
            "DB_HOST=h\nPASSWORD=Pw=1;x\nUSERNAME=v_orders_1\nMAYFLY_LEASE_ID=ls-0123\n\
             MAYFLY_EXPIRES_AT=2026-01-01T00:00:00Z\n"
        );
        let err = env(&credential(&[("password", "a\nb")])).unwrap_err();
        assert!(err.to_string().contains("PASSWORD"), "{err}");
        assert!(!err.to_string().contains("a\nb"));
    }

    #[test]
    fn json_carries_every_field_with_the_values() {
        let text = json(&credential(&[("username", "u"), ("password", "p")]));
        let shown: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(shown["values"]["password"], "p");
        assert_eq!(shown["lease_id"], "ls-0123");
        assert_eq!(shown["spiffe_id"], "spiffe://example.org/app");
        assert_eq!(shown["expires_at"], 1_767_225_600);
        assert_eq!(shown["kind"], "postgres_dynamic");
        assert!(text.ends_with("}\n"));
    }

    #[test]
    fn aws_output_is_credential_process_json_or_a_profile() {
        let sts = credential(&[
            ("access_key_id", "AKIAEXAMPLE"),
            ("secret_access_key", "wJalrSECRET"),
            ("session_token", "FwoGTOKEN"),
        ]);
        assert_eq!(
            *aws_process(&sts).unwrap(),
            "{\"Version\":1,\"AccessKeyId\":\"AKIAEXAMPLE\",\"SecretAccessKey\":\"wJalrSECRET\",\
             \"SessionToken\":\"FwoGTOKEN\",\"Expiration\":\"2026-01-01T00:00:00Z\"}\n"
        );
        assert_eq!(
            *aws_profile(&sts).unwrap(),
            "[default]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = wJalrSECRET\n\
             aws_session_token = FwoGTOKEN\n# mayfly lease ls-0123, expires 2026-01-01T00:00:00Z\n"
        );
    }

    #[test]
    fn aws_refuses_another_kind_by_name_without_its_values() {
        let pg = credential(&[("username", "u"), ("password", "hunter2")]);
        for err in [aws_process(&pg).unwrap_err(), aws_profile(&pg).unwrap_err()] {
            let err = err.to_string();
            assert!(
                err.contains("orders-db") && err.contains("postgres_dynamic"),
                "{err}"
            );
            assert!(err.contains("no AWS keys"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }
}

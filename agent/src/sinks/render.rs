//! What a sink's files should hold for a given agent state: PEM for svid sinks, a value
//! for secret sinks, a credential (one value, JSON, env lines or an AWS profile) for
//! credential sinks, a minijinja template rendered with granted secrets, credentials and
//! SVID paths, or a `KEY="VALUE"` file for systemd's EnvironmentFile=.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use minijinja::value::{Object, Value};
use minijinja::{Environment, UndefinedBehavior};
use zeroize::Zeroizing;

use mayfly_common::svid::{bundle_pem, pem_block};

use super::{CredentialOutput, Sink, SinkKind, SvidSelect};
use crate::credentials::{Credential, CredentialKey, HeldCredentials, format};
use crate::secret_ref::{SecretRef, SecretRefError, ValueRef};
use crate::state::{SecretView, WorkloadState};

/// One file a sink should hold now.
pub struct RenderedFile {
    pub path: PathBuf,
    pub contents: Zeroizing<Vec<u8>>,
    pub mode: u32,
}

/// Why a sink cannot be rendered. The messages never carry a secret's value.
#[non_exhaustive]
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error(
        "sink `{sink}` needs secret `{secret}`, which is not granted to this agent or any of its entries (or does not exist)"
    )]
    NotGranted { sink: String, secret: String },
    #[error("sink `{sink}`: {source}")]
    Reference {
        sink: String,
        source: SecretRefError,
    },
    #[error(
        "sink `{sink}`: variable {key}: the value of {reference} spans lines, which EnvironmentFile= cannot hold"
    )]
    MultiLine {
        sink: String,
        key: String,
        reference: String,
    },
    #[error("sink `{sink}`: credential `{credential}` was refused: {why}")]
    CredentialRefused {
        sink: String,
        credential: String,
        why: String,
    },
    #[error("sink `{sink}`: credential `{credential}` has no value `{field}`; it has {names}")]
    NoSuchValue {
        sink: String,
        credential: String,
        field: String,
        names: String,
    },
    #[error("sink `{sink}`: {source}")]
    Format {
        sink: String,
        source: format::FormatError,
    },
    #[error("sink `{sink}`: the template failed: {message}")]
    Template { sink: String, message: String },
    /// Found at start, before any state: the message can only quote the template itself.
    #[error("sink `{sink}`: the template does not compile: {message}")]
    Compile { sink: String, message: String },
}

/// Compiles the template of sink `sink` once so that syntax errors stop the agent at start.
pub(super) fn compile_check(sink: &str, text: &str) -> Result<(), RenderError> {
    environment()
        .template_from_str(text)
        .map(|_| ())
        .map_err(|e| RenderError::Compile {
            sink: sink.to_owned(),
            message: describe(e),
        })
}

/// The files `sink` should hold for `state` and the credentials held, or `None` while
/// what it needs (an SVID not signed yet, a credential not issued yet) is not there.
pub(crate) fn render(
    sink: &Sink,
    all: &[Sink],
    state: &WorkloadState,
    held: &HeldCredentials,
) -> Result<Option<Vec<RenderedFile>>, RenderError> {
    let Some(credentials) = credentials_of(sink, held)? else {
        return Ok(None);
    };
    match &sink.kind {
        SinkKind::Svid {
            select,
            cert_path,
            key_path,
            bundle_path,
            include_intermediates,
            cert_mode,
            key_mode,
        } => {
            let entry = state.entries.iter().find(|e| match select {
                SvidSelect::SpiffeId(id) => e.spiffe_id == *id,
                SvidSelect::Hint(hint) => e.hint == *hint,
            });
            let Some(svid) = entry.and_then(|e| state.svids.get(&e.id)) else {
                return Ok(None);
            };
            let roots = &state.bundle.x509_authorities;
            let (cert, bundle) = if *include_intermediates {
                let mut bundle = svid.chain[1..].to_vec();
                bundle.extend(roots.iter().cloned());
                (bundle_pem(&svid.chain[..1]), bundle_pem(&bundle))
            } else {
                (bundle_pem(&svid.chain), bundle_pem(roots))
            };
            let key = Zeroizing::new(pem_block("PRIVATE KEY", &svid.key_pkcs8).into_bytes());
            let mut files = vec![
                RenderedFile {
                    path: cert_path.clone(),
                    contents: Zeroizing::new(cert.into_bytes()),
                    mode: *cert_mode,
                },
                RenderedFile {
                    path: key_path.clone(),
                    contents: key,
                    mode: *key_mode,
                },
            ];
            if let Some(path) = bundle_path {
                files.push(RenderedFile {
                    path: path.clone(),
                    contents: Zeroizing::new(bundle.into_bytes()),
                    mode: *cert_mode,
                });
            }
            Ok(Some(files))
        }
        SinkKind::Secret { secret, path, mode } => {
            let view = granted(sink, state, &secret.name)?;
            let contents = match secret.field {
                // The value as the store holds it, byte for byte: a key file may be binary.
                crate::secret_ref::SecretField::Value => Zeroizing::new(view.value.to_vec()),
                _ => Zeroizing::new(resolve(sink, secret, view)?.into_bytes()),
            };
            Ok(Some(vec![RenderedFile {
                path: path.clone(),
                contents,
                mode: *mode,
            }]))
        }
        SinkKind::Credential {
            name,
            output,
            path,
            mode,
        } => {
            let credential = &credentials[name];
            let message = credential.to_message();
            let formatted = |text: Result<Zeroizing<String>, format::FormatError>| {
                text.map_err(|source| RenderError::Format {
                    sink: sink.label.clone(),
                    source,
                })
            };
            let text = match output {
                CredentialOutput::Field(field) => value_of(sink, credential, field)?,
                CredentialOutput::Json => format::json(&message),
                CredentialOutput::Env => formatted(format::env(&message))?,
                CredentialOutput::AwsProfile => formatted(format::aws_profile(&message))?,
            };
            Ok(Some(vec![RenderedFile {
                path: path.clone(),
                contents: Zeroizing::new(text.as_bytes().to_vec()),
                mode: *mode,
            }]))
        }
        SinkKind::Template {
            text, path, mode, ..
        } => {
            let rendered = render_template(sink, text, all, state, &credentials)?;
            Ok(Some(vec![RenderedFile {
                path: path.clone(),
                contents: Zeroizing::new(rendered.into_bytes()),
                mode: *mode,
            }]))
        }
        SinkKind::Env { vars, path, mode } => {
            let mut out = Zeroizing::new(String::new());
            for (key, reference) in vars {
                let value = match reference {
                    ValueRef::Secret(reference) => {
                        let view = granted(sink, state, &reference.name)?;
                        Zeroizing::new(resolve(sink, reference, view)?)
                    }
                    ValueRef::Credential(reference) => {
                        value_of(sink, &credentials[&reference.name], &reference.field)?
                    }
                };
                if value.contains(['\n', '\r']) {
                    return Err(RenderError::MultiLine {
                        sink: sink.label.clone(),
                        key: key.clone(),
                        reference: reference.to_string(),
                    });
                }
                out.push_str(key);
                out.push_str("=\"");
                for c in value.chars() {
                    // Inside double quotes systemd (and sh) give these a meaning.
                    if matches!(c, '\\' | '"' | '$' | '`') {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push_str("\"\n");
            }
            Ok(Some(vec![RenderedFile {
                path: path.clone(),
                contents: Zeroizing::new(out.as_bytes().to_vec()),
                mode: *mode,
            }]))
        }
    }
}

/// The credentials `sink` writes, by name: `None` while one is not issued yet, an error
/// naming the daemon's refusal.
fn credentials_of(
    sink: &Sink,
    held: &HeldCredentials,
) -> Result<Option<BTreeMap<String, Arc<Credential>>>, RenderError> {
    let mut found = BTreeMap::new();
    for key in sink.credential_keys() {
        if let Some(credential) = held.held.get(&key) {
            found.insert(key.name.clone(), credential.clone());
        } else if let Some(why) = held.refused.get(&key) {
            return Err(RenderError::CredentialRefused {
                sink: sink.label.clone(),
                credential: key.name.clone(),
                why: why.clone(),
            });
        } else {
            return Ok(None);
        }
    }
    Ok(Some(found))
}

/// The lease ids of what `sink` would write from `held`.
pub(super) fn leases_of(sink: &Sink, held: &HeldCredentials) -> Vec<String> {
    sink.credential_keys()
        .iter()
        .filter_map(|key: &CredentialKey| held.held.get(key))
        .map(|c| c.lease_id.clone())
        .collect()
}

fn value_of(
    sink: &Sink,
    credential: &Credential,
    field: &str,
) -> Result<Zeroizing<String>, RenderError> {
    credential
        .value(field)
        .ok_or_else(|| RenderError::NoSuchValue {
            sink: sink.label.clone(),
            credential: credential.name.clone(),
            field: field.to_owned(),
            names: credential.value_names().join(", "),
        })
}

fn granted<'a>(
    sink: &Sink,
    state: &'a WorkloadState,
    name: &str,
) -> Result<&'a SecretView, RenderError> {
    state
        .secrets
        .get(name)
        .map(|s| s.as_ref())
        .ok_or_else(|| RenderError::NotGranted {
            sink: sink.label.clone(),
            secret: name.to_string(),
        })
}

fn resolve(sink: &Sink, reference: &SecretRef, view: &SecretView) -> Result<String, RenderError> {
    reference
        .resolve(view)
        .map_err(|source| RenderError::Reference {
            sink: sink.label.clone(),
            source,
        })
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    // A name the template does not have is a mistake to report, never an empty string.
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // Config files, not HTML: values go in as they are.
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    // A config file's last newline is part of it (Jinja drops it by default).
    // The default delimiters always build; should that ever change, Jinja's defaults stand.
    if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
        .keep_trailing_newline(true)
        .build()
    {
        env.set_syntax(syntax);
    }
    env
}

/// `secrets` in a template: looks up granted secrets and remembers the names it was asked
/// for and did not have, so the error can say which secret is missing.
struct SecretsObject {
    secrets: BTreeMap<String, Value>,
    missing: Mutex<Vec<String>>,
}

impl std::fmt::Debug for SecretsObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("secrets")
            .field("names", &self.secrets.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Object for SecretsObject {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let name = key.as_str()?;
        let found = self.secrets.get(name).cloned();
        if found.is_none()
            && let Ok(mut missing) = self.missing.lock()
        {
            missing.push(name.to_string());
        }
        found
    }

    fn enumerate(self: &Arc<Self>) -> minijinja::value::Enumerator {
        minijinja::value::Enumerator::Values(
            self.secrets
                .keys()
                .map(|k| Value::from(k.as_str()))
                .collect(),
        )
    }
}

fn render_template(
    sink: &Sink,
    text: &str,
    all: &[Sink],
    state: &WorkloadState,
    credentials: &BTreeMap<String, Arc<Credential>>,
) -> Result<String, RenderError> {
    let template_error = |message: String| RenderError::Template {
        sink: sink.label.clone(),
        message: redact(message, state, credentials),
    };
    let credential_values: BTreeMap<String, Value> = credentials
        .iter()
        .map(|(name, credential)| {
            let mut fields: BTreeMap<String, Value> = credential
                .values()
                .map(|(k, v)| (k.to_owned(), Value::from(v)))
                .collect();
            fields.insert("lease_id".into(), Value::from(credential.lease_id.as_str()));
            fields.insert(
                "expires_at".into(),
                Value::from(format::rfc3339(credential.expires_at)),
            );
            fields.insert("expires_at_unix".into(), Value::from(credential.expires_at));
            (name.clone(), Value::from(fields))
        })
        .collect();
    let mut secrets = BTreeMap::new();
    for (name, view) in &state.secrets {
        let value = String::from_utf8(view.value.to_vec()).ok();
        let mut fields = vec![
            ("name", Value::from(name.as_str())),
            ("version", Value::from(view.version.as_str())),
            ("username", Value::from(view.username.as_str())),
        ];
        if let Some(value) = value {
            fields.push(("password", Value::from(value.as_str())));
            fields.push(("value", Value::from(value)));
        }
        secrets.insert(name.clone(), Value::from_pairs(fields));
    }
    let secrets = Arc::new(SecretsObject {
        secrets,
        missing: Mutex::new(Vec::new()),
    });
    let svids: BTreeMap<String, Value> = all
        .iter()
        .filter_map(|s| match (&s.name, &s.kind) {
            (
                Some(name),
                SinkKind::Svid {
                    select,
                    cert_path,
                    key_path,
                    bundle_path,
                    ..
                },
            ) => {
                let spiffe_id = match select {
                    SvidSelect::SpiffeId(id) => id.as_str().to_string(),
                    SvidSelect::Hint(hint) => state
                        .entries
                        .iter()
                        .find(|e| e.hint == *hint)
                        .map(|e| e.spiffe_id.as_str().to_string())
                        .unwrap_or_default(),
                };
                let path = |p: &std::path::Path| Value::from(p.display().to_string());
                let mut fields = vec![
                    ("spiffe_id", Value::from(spiffe_id)),
                    ("cert_path", path(cert_path)),
                    ("key_path", path(key_path)),
                ];
                if let Some(bundle) = bundle_path {
                    fields.push(("bundle_path", path(bundle)));
                }
                Some((name.clone(), Value::from_pairs(fields)))
            }
            _ => None,
        })
        .collect();
    let context = Value::from_pairs([
        ("secrets", Value::from_dyn_object(secrets.clone())),
        ("svids", Value::from(svids)),
        ("credentials", Value::from(credential_values)),
        (
            "trust_domain",
            Value::from(state.bundle.trust_domain.as_str()),
        ),
    ]);
    let env = environment();
    let template = env
        .template_from_str(text)
        .map_err(|e| template_error(describe(e)))?;
    let mut out = CappedText::default();
    match template.render_captured_to(context, &mut out) {
        Ok(_) => String::from_utf8(std::mem::take(&mut *out.text))
            .map_err(|_| template_error("it rendered text that is not UTF-8".into())),
        Err(e) => {
            let missing = secrets.missing.lock().ok().and_then(|m| m.first().cloned());
            Err(match missing {
                Some(secret) => RenderError::NotGranted {
                    sink: sink.label.clone(),
                    secret,
                },
                None if out.full => template_error(format!(
                    "the rendered file would pass {} MiB",
                    MAX_RENDERED >> 20
                )),
                None if e.kind() == minijinja::ErrorKind::OutOfFuel => template_error(format!(
                    "it needs more than {TEMPLATE_FUEL} steps of work to render \
                     (a loop, or a string or list repeated, too large){}",
                    e.line().map(|l| format!(" (line {l})")).unwrap_or_default()
                )),
                None => template_error(describe(e)),
            })
        }
    }
}

/// The most work one render may take, in minijinja's fuel: one per instruction, plus a
/// 64th per byte (half a fuel per list slot) of every string or list an operator builds,
/// and a quarter per byte of text made from a list or map (`~`, `string`, a filter's
/// argument; bounded in the patched copy, vendor/minijinja/MAYFLY-PATCH.md). A config
/// file's template takes thousands; a million is a few hundredths of a second of CPU.
const TEMPLATE_FUEL: u64 = 1_000_000;

/// The largest file a template may render to.
const MAX_RENDERED: usize = 16 << 20;

/// The rendered text, refused past [`MAX_RENDERED`]: minijinja stops at the first write
/// that fails, so a template printing a huge value ends there instead of filling memory.
#[derive(Default)]
struct CappedText {
    text: Zeroizing<Vec<u8>>,
    full: bool,
}

impl std::io::Write for CappedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > MAX_RENDERED {
            self.full = true;
            return Err(std::io::Error::other("rendered file too large"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// minijinja's error in one line: what went wrong and on which line.
fn describe(e: minijinja::Error) -> String {
    let mut text = e.kind().to_string();
    if let Some(detail) = e.detail() {
        text.push_str(": ");
        text.push_str(detail);
    }
    if let Some(line) = e.line() {
        text.push_str(&format!(" (line {line})"));
    }
    text
}

/// A template error may quote what it choked on; a secret's or credential's value never
/// leaves here.
fn redact(
    mut message: String,
    state: &WorkloadState,
    credentials: &BTreeMap<String, Arc<Credential>>,
) -> String {
    let secrets = state
        .secrets
        .values()
        .filter_map(|view| std::str::from_utf8(&view.value).ok());
    let values = credentials
        .values()
        .flat_map(|c| c.values().map(|(_, v)| v));
    for value in secrets.chain(values) {
        if value.len() >= 4 {
            message = message.replace(value, "<redacted>");
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Bundle, WorkloadState};

    fn state_with(secrets: &[(&str, &str, &str)]) -> WorkloadState {
        let mut state = WorkloadState::empty(Bundle {
            trust_domain: mayfly_common::TrustDomain::new("example.org").unwrap(),
            x509_authorities: vec![],
            jwt_keys: vec![],
            sequence: 1,
        });
        for (name, user, value) in secrets {
            state.secrets.insert(
                name.to_string(),
                Arc::new(SecretView {
                    name: name.to_string(),
                    version: format!("v-{name}"),
                    username: user.to_string(),
                    value: Arc::new(Zeroizing::new(value.as_bytes().to_vec())),
                    granted_to: vec!["spiffe://example.org/app".into()],
                    sets: vec![],
                }),
            );
        }
        state.synced = true;
        state
    }

    fn sinks(toml_text: &str) -> Vec<Sink> {
        crate::sinks::parse_for_tests(toml_text).unwrap()
    }

    fn text(files: Option<Vec<RenderedFile>>) -> String {
        String::from_utf8(files.unwrap()[0].contents.to_vec()).unwrap()
    }

    #[test]
    fn templates_see_secrets_and_svid_paths() {
        let all = sinks(
            r#"
            [[sink]]
            kind = "svid"
            name = "web"
            hint = "web"
            cert_path = "/srv/tls/cert.pem"
            key_path = "/srv/tls/key.pem"
            [[sink]]
            kind = "template"
            path = "/srv/app/pgpass"
            template = "127.0.0.1:5432:*:{{ secrets['orders-db'].username }}:{{ secrets['orders-db'].password }}\ncert={{ svids.web.cert_path }} td={{ trust_domain }}\n"
            "#,
        );
        let state = state_with(&[("orders-db", "orders_a", "s3cret-Value")]);
        let out = text(render(&all[1], &all, &state, &HeldCredentials::default()).unwrap());
        assert_eq!(
            out,
            "127.0.0.1:5432:*:orders_a:s3cret-Value\ncert=/srv/tls/cert.pem td=example.org\n"
        );
    }

    #[test]
    fn a_missing_secret_is_named_not_rendered_empty() {
        let all = sinks(
            "[[sink]]\nkind = \"template\"\npath = \"/x/t\"\ntemplate = \"{{ secrets.nope.password }}\"\n",
        );
        let state = state_with(&[("orders-db", "u", "s3cret-Value")]);
        let err = render(&all[0], &all, &state, &HeldCredentials::default())
            .err()
            .unwrap();
        assert_eq!(
            err,
            RenderError::NotGranted {
                sink: "/x/t".into(),
                secret: "nope".into()
            }
        );
        let all = sinks(
            "[[sink]]\nkind = \"template\"\npath = \"/x/t\"\ntemplate = \"{{ nothing_here }}\"\n",
        );
        let err = render(&all[0], &all, &state, &HeldCredentials::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("undefined"), "{err}");
    }

    #[test]
    fn template_errors_never_quote_a_value() {
        let all = sinks(
            "[[sink]]\nkind = \"template\"\npath = \"/x/t\"\ntemplate = \"{{ secrets['db'].password | int }}\"\n",
        );
        let state = state_with(&[("db", "u", "s3cret-Value")]);
        if let Err(e) = render(&all[0], &all, &state, &HeldCredentials::default()) {
            assert!(!e.to_string().contains("s3cret-Value"), "{e}");
            assert!(!format!("{e:?}").contains("s3cret-Value"), "{e:?}");
        }
    }

    #[test]
    fn a_runaway_template_is_stopped_and_named() {
        let state = state_with(&[("db", "u", "s3cret-Value")]);
        let failure = |template: &str| {
            let all = sinks(&format!(
                "[[sink]]\nkind = \"template\"\npath = \"/x/t\"\ntemplate = '{template}'\n"
            ));
            render(&all[0], &all, &state, &HeldCredentials::default())
                .err()
                .unwrap()
                .to_string()
        };
        // Work: nested loops, and a string or a list repeated past the fuel.
        for template in [
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "{{ secrets.db.password * 90000000 }}",
            "{% set l = [secrets.db.username] * 100000 %}{% for x in l %}{% for y in l %}{% endfor %}{% endfor %}",
            // Text made from a list or map: a list repeated lazily (free to make, costly
            // to write out), and a list holding the same large string many times, turned
            // into text by `~`, the `string` and `pprint` filters and a filter's argument.
            "{{ \"\" ~ 100000000 * [secrets.db.username] }}",
            "{{ (100000000 * [1])|string }}",
            "{{ (100000000 * [1])|pprint }}",
            "{{ (100000000 * [1])|lower }}",
            "{{ (100000000 * [1])|join(\",\") }}",
            "{{ (100000000 * [secrets.db.password]) }}",
            "{% set s = secrets.db.password * 1000000 %}{% set l = [s, s, s, s, s, s, s, s, s, s] %}{% set m = [l, l, l, l, l, l, l, l, l, l] %}{{ \"\" ~ [m, m, m, m, m, m, m, m, m, m] }}",
            "{% set m = {\"k\": 100000000 * [1]} %}{{ m|string }}",
            // The same from constants, which minijinja folded when compiling, unfueled.
            "{{ \"\" ~ 12688826 * [\"ab\"] }}",
            "{{ 1 in 100000000 * [2] }}",
            "{{ 100000000 * [2] > 100000000 * [1] }}",
        ] {
            let err = failure(template);
            assert!(
                err.contains("more than 1000000 steps of work"),
                "{template}: {err}"
            );
            assert!(!err.contains("s3cret-Value"), "{err}");
        }
        // Size: a small value printed often enough passes the cap on the file.
        let err = failure(
            "{% set v = secrets.db.password * 10000 %}{% for i in range(100000) %}{{ v }}{% endfor %}",
        );
        assert!(err.contains("would pass 16 MiB"), "{err}");
        // A template within both limits renders as before.
        let all = sinks(
            "[[sink]]\nkind = \"template\"\npath = \"/x/t\"\ntemplate = '{% for i in range(3) %}{{ secrets.db.username }}{% endfor %}'\n",
        );
        let out = text(render(&all[0], &all, &state, &HeldCredentials::default()).unwrap());
        assert_eq!(out, "uuu");
        let all = sinks(
            "[[sink]]\nkind = \"template\"\npath = \"/x/t\"\ntemplate = '{{ \"users: \" ~ [secrets.db.username, 2] }} {{ {\"a\": [1]}|string }}'\n",
        );
        let out = text(render(&all[0], &all, &state, &HeldCredentials::default()).unwrap());
        assert_eq!(out, "users: ['u', 2] {'a': [1]}");
    }

    #[test]
    fn env_files_quote_for_systemd() {
        let all = sinks(
            "[[sink]]\nkind = \"env\"\npath = \"/x/env\"\nvars = { DB_USER = \"secret:db:username\", DB_PASSWORD = \"secret:db\" }\n",
        );
        let state = state_with(&[("db", "app", "a\"b$c\\d`e")]);
        assert_eq!(
            text(render(&all[0], &all, &state, &HeldCredentials::default()).unwrap()),
            "DB_PASSWORD=\"a\\\"b\\$c\\\\d\\`e\"\nDB_USER=\"app\"\n"
        );
        let state = state_with(&[("db", "app", "two\nlines")]);
        assert!(matches!(
            render(&all[0], &all, &state, &HeldCredentials::default()),
            Err(RenderError::MultiLine { .. })
        ));
    }

    #[test]
    fn an_svid_sink_waits_for_its_svid() {
        let all = sinks(
            "[[sink]]\nkind = \"svid\"\nspiffe_id = \"spiffe://example.org/web\"\ncert_path = \"/x/c\"\nkey_path = \"/x/k\"\n",
        );
        assert!(
            render(&all[0], &all, &state_with(&[]), &HeldCredentials::default())
                .unwrap()
                .is_none()
        );
    }

    const APP: &str = "spiffe://example.org/app";

    fn held(values: &[(&str, &str)], ttl_seconds: i64) -> HeldCredentials {
        let spiffe_id = mayfly_common::SpiffeId::parse(APP).unwrap();
        let credential = Credential::from_issued(
            mayfly_proto::v1::IssuedCredential {
                lease_id: "ls-7".into(),
                name: "orders-db".into(),
                kind: "postgres_dynamic".into(),
                values: values
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                issued_at: 1_767_225_000,
                expires_at: 1_767_225_600,
                notice: String::new(),
                facts: None,
            },
            spiffe_id.clone(),
        );
        let key = CredentialKey {
            spiffe_id,
            name: "orders-db".into(),
            ttl_seconds,
        };
        HeldCredentials {
            round: 1,
            held: [(key, Arc::new(credential))].into(),
            refused: Default::default(),
        }
    }

    #[test]
    fn credential_sinks_write_a_value_the_document_or_env_lines() {
        let all = sinks(&format!(
            "[[sink]]\nkind = \"credential\"\ncredential = \"orders-db\"\nspiffe_id = \"{APP}\"\nfield = \"password\"\npath = \"/x/pw\"\n\
             [[sink]]\nkind = \"credential\"\ncredential = \"orders-db\"\nspiffe_id = \"{APP}\"\npath = \"/x/db.json\"\n\
             [[sink]]\nkind = \"env\"\nspiffe_id = \"{APP}\"\npath = \"/x/db.env\"\n\
             vars = {{ PGUSER = \"credential:orders-db:username\", LEASE = \"credential:orders-db:lease_id\" }}\n\
             [[sink]]\nkind = \"template\"\ncredentials = [\"orders-db\"]\nspiffe_id = \"{APP}\"\npath = \"/x/t\"\n\
             template = \"{{{{ credentials['orders-db'].username }}}} {{{{ credentials['orders-db'].expires_at }}}}\"\n\
             [[sink]]\nkind = \"credential\"\ncredential = \"orders-db\"\nspiffe_id = \"{APP}\"\nformat = \"aws\"\npath = \"/x/aws\"\n"
        ));
        let state = state_with(&[]);
        let creds = held(&[("username", "v_orders_1"), ("password", "Pw-hunter2")], 0);
        let out = |i: usize| text(render(&all[i], &all, &state, &creds).unwrap());
        assert_eq!(out(0), "Pw-hunter2");
        let doc: serde_json::Value = serde_json::from_str(&out(1)).unwrap();
        assert_eq!(doc["values"]["username"], "v_orders_1");
        assert_eq!(doc["lease_id"], "ls-7");
        assert_eq!(out(2), "LEASE=\"ls-7\"\nPGUSER=\"v_orders_1\"\n");
        assert_eq!(out(3), "v_orders_1 2026-01-01T00:00:00Z");
        let err = render(&all[4], &all, &state, &creds)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("no AWS keys") && !err.contains("hunter2"),
            "{err}"
        );
        // Another TTL is another lease, not issued yet: the sink waits.
        let other = held(&[("username", "u")], 60);
        assert!(render(&all[0], &all, &state, &other).unwrap().is_none());
    }

    #[test]
    fn a_refused_credential_or_a_missing_value_is_named() {
        let all = sinks(&format!(
            "[[sink]]\nkind = \"credential\"\ncredential = \"orders-db\"\nspiffe_id = \"{APP}\"\nfield = \"token\"\npath = \"/x/pw\"\n"
        ));
        let state = state_with(&[]);
        let creds = held(&[("password", "Pw-hunter2")], 0);
        let err = render(&all[0], &all, &state, &creds)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("no value `token`") && err.contains("password"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
        let mut refused = HeldCredentials::default();
        refused.refused.insert(
            all[0].credential_keys()[0].clone(),
            "mayflyd refused: credential orders-db is not granted".into(),
        );
        let err = render(&all[0], &all, &state, &refused).err().unwrap();
        assert!(
            matches!(err, RenderError::CredentialRefused { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("not granted"), "{err}");
    }
}

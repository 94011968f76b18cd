//! What a sink's files should hold for a given agent state: PEM for svid sinks, a value
//! for secret sinks, a minijinja template rendered with granted secrets and SVID paths,
//! or a `KEY="VALUE"` file for systemd's EnvironmentFile=.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use minijinja::value::{Object, Value};
use minijinja::{Environment, UndefinedBehavior};
use zeroize::Zeroizing;

use mayfly_common::svid::{bundle_pem, pem_block};

use super::{Sink, SinkKind, SvidSelect};
use crate::secret_ref::{SecretRef, SecretRefError};
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

/// The files `sink` should hold for `state`, or `None` while what it needs (an SVID not
/// signed yet) is not there.
pub(super) fn render(
    sink: &Sink,
    all: &[Sink],
    state: &WorkloadState,
) -> Result<Option<Vec<RenderedFile>>, RenderError> {
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
        SinkKind::Template { text, path, mode } => {
            let rendered = render_template(sink, text, all, state)?;
            Ok(Some(vec![RenderedFile {
                path: path.clone(),
                contents: Zeroizing::new(rendered.into_bytes()),
                mode: *mode,
            }]))
        }
        SinkKind::Env { vars, path, mode } => {
            let mut out = Zeroizing::new(String::new());
            for (key, reference) in vars {
                let view = granted(sink, state, &reference.name)?;
                let value = Zeroizing::new(resolve(sink, reference, view)?);
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
) -> Result<String, RenderError> {
    let template_error = |message: String| RenderError::Template {
        sink: sink.label.clone(),
        message: redact(message, state),
    };
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
        (
            "trust_domain",
            Value::from(state.bundle.trust_domain.as_str()),
        ),
    ]);
    let env = environment();
    let template = env
        .template_from_str(text)
        .map_err(|e| template_error(describe(e)))?;
    match template.render(context) {
        Ok(text) => Ok(text),
        Err(e) => {
            let missing = secrets.missing.lock().ok().and_then(|m| m.first().cloned());
            Err(match missing {
                Some(secret) => RenderError::NotGranted {
                    sink: sink.label.clone(),
                    secret,
                },
                None => template_error(describe(e)),
            })
        }
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

/// A template error may quote what it choked on; a secret's value never leaves here.
fn redact(mut message: String, state: &WorkloadState) -> String {
    for view in state.secrets.values() {
        if let Ok(value) = std::str::from_utf8(&view.value)
            && value.len() >= 4
        {
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
        let out = text(render(&all[1], &all, &state).unwrap());
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
        let err = render(&all[0], &all, &state).err().unwrap();
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
        let err = render(&all[0], &all, &state).err().unwrap().to_string();
        assert!(err.contains("undefined"), "{err}");
    }

    #[test]
    fn template_errors_never_quote_a_value() {
        let all = sinks(
            "[[sink]]\nkind = \"template\"\npath = \"/x/t\"\ntemplate = \"{{ secrets['db'].password | int }}\"\n",
        );
        let state = state_with(&[("db", "u", "s3cret-Value")]);
        if let Err(e) = render(&all[0], &all, &state) {
            assert!(!e.to_string().contains("s3cret-Value"), "{e}");
            assert!(!format!("{e:?}").contains("s3cret-Value"), "{e:?}");
        }
    }

    #[test]
    fn env_files_quote_for_systemd() {
        let all = sinks(
            "[[sink]]\nkind = \"env\"\npath = \"/x/env\"\nvars = { DB_USER = \"secret:db:username\", DB_PASSWORD = \"secret:db\" }\n",
        );
        let state = state_with(&[("db", "app", "a\"b$c\\d`e")]);
        assert_eq!(
            text(render(&all[0], &all, &state).unwrap()),
            "DB_PASSWORD=\"a\\\"b\\$c\\\\d\\`e\"\nDB_USER=\"app\"\n"
        );
        let state = state_with(&[("db", "app", "two\nlines")]);
        assert!(matches!(
            render(&all[0], &all, &state),
            Err(RenderError::MultiLine { .. })
        ));
    }

    #[test]
    fn an_svid_sink_waits_for_its_svid() {
        let all = sinks(
            "[[sink]]\nkind = \"svid\"\nspiffe_id = \"spiffe://example.org/web\"\ncert_path = \"/x/c\"\nkey_path = \"/x/k\"\n",
        );
        assert!(render(&all[0], &all, &state_with(&[])).unwrap().is_none());
    }
}

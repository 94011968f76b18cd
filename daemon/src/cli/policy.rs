//! `mayflyd policy …`: validating policy files offline, and the active set of a running
//! daemon: shown, reloaded, and asked about one request.

use serde_json::{Value, json};

use mayfly_proto::v1;

use super::operator::{call, connect};
use super::output::{pretty, table, when};
use super::{Connection, OutputFormat, PolicyCommand};
use crate::policy::{self, PolicyConfig};

pub async fn policy(command: PolicyCommand, conn: &Connection) -> anyhow::Result<String> {
    let format = conn.output;
    let mut client = match command {
        // Offline: no daemon is asked.
        PolicyCommand::Validate { dir, no_defaults } => {
            return validate(&dir, !no_defaults, format);
        }
        _ => connect(conn).await?,
    };
    Ok(match command {
        PolicyCommand::Validate { .. } => String::new(),
        PolicyCommand::Show { text } => {
            let set = call(client.show_policy(v1::ShowPolicyRequest { text }).await)?;
            policy_set(format, &set)
        }
        PolicyCommand::Reload => {
            let set = call(client.reload_policy(v1::ReloadPolicyRequest {}).await)?;
            policy_set(format, &set)
        }
        PolicyCommand::Test {
            principal,
            action,
            resource,
            context,
        } => {
            let decision = call(
                client
                    .test_policy(v1::TestPolicyRequest {
                        principal,
                        action,
                        resource,
                        context_json: context.unwrap_or_default(),
                    })
                    .await,
            )?;
            match format {
                OutputFormat::Json => pretty(&json!({
                    "decision": decision.decision,
                    "policies": decision.policies,
                    "errors": decision.errors,
                    "policy_set": decision.policy_set,
                    "enforce": decision.enforce,
                    "request": serde_json::from_str::<Value>(&decision.request_json)
                        .unwrap_or(Value::Null),
                })),
                OutputFormat::Table => {
                    let mut out = format!("decision: {}\n", decision.decision);
                    if decision.policies.is_empty() {
                        out.push_str("decided by: no policy applied (default deny)\n");
                    } else {
                        out.push_str(&format!("decided by: {}\n", decision.policies.join(", ")));
                    }
                    for error in &decision.errors {
                        out.push_str(&format!("error: {error}\n"));
                    }
                    out.push_str(&format!(
                        "policy set: {}{}\n",
                        decision.policy_set,
                        if decision.enforce {
                            ""
                        } else {
                            " (shadow mode)"
                        }
                    ));
                    out
                }
            }
        }
    })
}

fn validate(dir: &std::path::Path, defaults: bool, format: OutputFormat) -> anyhow::Result<String> {
    let config = PolicyConfig {
        dir: Some(dir.to_path_buf()),
        enforce: true,
        defaults,
    };
    let schema = policy::schema()?;
    let compiled = policy::sources(&config).and_then(|s| policy::compile(&s, Some(&schema)));
    let compiled = match compiled {
        Ok(compiled) => compiled,
        Err(e) => anyhow::bail!(
            "{} does not validate:\n  {}",
            dir.display(),
            e.problems().join("\n  ")
        ),
    };
    let count: usize = compiled.listing.iter().map(|(_, ids)| ids.len()).sum();
    Ok(match format {
        OutputFormat::Json => pretty(&json!({
            "valid": true,
            "policies": count,
            "sources": compiled.listing.iter().map(|(name, ids)| json!({"name": name, "policy_ids": ids})).collect::<Vec<_>>(),
            "warnings": compiled.warnings,
        })),
        OutputFormat::Table => {
            let mut out = format!(
                "{}: {count} policies in {} files validate against the Mayfly schema\n",
                dir.display(),
                compiled.listing.len()
            );
            for warning in &compiled.warnings {
                out.push_str(&format!("warning: {warning}\n"));
            }
            out
        }
    })
}

fn policy_set(format: OutputFormat, set: &v1::ActivePolicySet) -> String {
    match format {
        OutputFormat::Json => pretty(&json!({
            "hash": set.hash,
            "enforce": set.enforce,
            "dir": set.dir,
            "loaded_at": set.loaded_at,
            "sources": set.sources.iter().map(|s| json!({"name": s.name, "policy_ids": s.policy_ids})).collect::<Vec<_>>(),
            "text": set.text,
        })),
        OutputFormat::Table => {
            let mut out = format!(
                "policy set {}\nmode: {}\ndir: {}\nloaded: {}\n\n",
                set.hash,
                if set.enforce {
                    "enforce"
                } else {
                    "shadow (denials are logged and audited, nothing is refused)"
                },
                if set.dir.is_empty() { "-" } else { &set.dir },
                when(set.loaded_at)
            );
            let rows: Vec<Vec<String>> = set
                .sources
                .iter()
                .flat_map(|s| {
                    s.policy_ids
                        .iter()
                        .map(move |id| vec![s.name.clone(), id.clone()])
                })
                .collect();
            out.push_str(&table(&["FILE", "POLICY"], &rows));
            if !set.text.is_empty() {
                out.push('\n');
                out.push_str(&set.text);
                out.push('\n');
            }
            out
        }
    }
}

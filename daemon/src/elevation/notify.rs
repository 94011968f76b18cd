//! Webhooks (`[[notify]]`): each step of an elevation is POSTed as JSON to the URLs that
//! asked for that event, from a queue of its own per URL so that a slow or failing
//! receiver delays nobody, retried with exponential backoff. What is sent is the
//! elevation's public record (who, what, why, until when), never a credential: the daemon
//! has the values only while it hands them out, and nothing here reads them.

use std::time::Duration;

use http::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::secrets::vault::client::VaultHttp;
use crate::store::ElevationRecord;

/// Every event a webhook may ask for.
pub const EVENTS: [&str; 9] = [
    "request",
    "approve",
    "deny",
    "activate",
    "reject",
    "end",
    "cancel",
    "expire",
    "break-glass",
];

/// Deliveries waiting per URL; beyond this the oldest are kept and new ones dropped (and
/// logged): the audit trail, not the webhook, is the record.
const QUEUE: usize = 1024;

/// Attempts per delivery, the first after 1 s and doubling to about 4 minutes in all.
const ATTEMPTS: u32 = 9;

/// `[[notify]]` in daemon.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// `http(s)://host[:port]/path`.
    pub url: String,
    /// Which events; all of them when absent.
    #[serde(default)]
    pub events: Vec<String>,
    /// PEM file with the CA certificates an https receiver is checked against (default:
    /// the Mozilla roots).
    #[serde(default)]
    pub ca_cert_file: Option<std::path::PathBuf>,
}

impl NotifyConfig {
    /// Checks the URL and the event names, so that a typo stops the daemon at start.
    pub fn check(&self) -> Result<(), String> {
        let (base, _) = split_url(&self.url)?;
        let ca = self.ca_pem()?;
        VaultHttp::new(&base, ca.as_deref()).map_err(|e| format!("notify {}: {e}", self.url))?;
        for event in &self.events {
            if !EVENTS.contains(&event.as_str()) {
                return Err(format!(
                    "notify {}: unknown event `{event}`: use {}",
                    self.url,
                    EVENTS.join(", ")
                ));
            }
        }
        Ok(())
    }

    fn ca_pem(&self) -> Result<Option<String>, String> {
        self.ca_cert_file
            .as_ref()
            .map(|path| {
                std::fs::read_to_string(path)
                    .map_err(|e| format!("notify {}: {}: {e}", self.url, path.display()))
            })
            .transpose()
    }

    fn wants(&self, event: &str) -> bool {
        self.events.is_empty() || self.events.iter().any(|e| e == event)
    }
}

/// `scheme://authority` and the path (with its query) of `url`.
fn split_url(url: &str) -> Result<(String, String), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| format!("notify url {url:?} is not a URL"))?;
    let scheme = uri
        .scheme_str()
        .ok_or_else(|| format!("notify url {url:?} has no scheme"))?;
    let authority = uri
        .authority()
        .ok_or_else(|| format!("notify url {url:?} has no host"))?;
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".to_string());
    Ok((format!("{scheme}://{authority}"), path))
}

struct Target {
    config: NotifyConfig,
    queue: mpsc::Sender<Value>,
}

/// Posts elevation events to the configured webhooks.
pub struct Notifier {
    targets: Vec<Target>,
}

impl Notifier {
    /// One delivery task per URL. Fails on a bad URL, CA file or event name.
    pub fn start(configs: &[NotifyConfig]) -> Result<Self, String> {
        let mut targets = Vec::new();
        for config in configs {
            config.check()?;
            let (base, path) = split_url(&config.url)?;
            let client = VaultHttp::new(&base, config.ca_pem()?.as_deref())
                .map_err(|e| format!("notify {}: {e}", config.url))?;
            let (queue, rx) = mpsc::channel(QUEUE);
            tokio::spawn(deliver(client, path, config.url.clone(), rx));
            targets.push(Target {
                config: config.clone(),
                queue,
            });
        }
        Ok(Self { targets })
    }

    /// Queues `event` about `record` (with `extra` fields, such as a reviewer) for every
    /// webhook that wants it; never waits.
    pub fn send(&self, event: &str, record: &ElevationRecord, extra: Value) {
        if self.targets.is_empty() {
            return;
        }
        let mut body = json!({
            "event": event,
            "at": mayfly_common::clock::unix(std::time::SystemTime::now()),
            "elevation": {
                "id": record.id,
                "state": record.state().as_str(),
                "requester": record.requester,
                "requester_name": record.requester_name,
                "requester_kind": record.requester_kind,
                "agent_id": record.agent_id,
                "scope": { "kind": record.scope_kind, "name": record.scope_name },
                "reason": record.reason,
                "ticket": record.ticket,
                "requested_ttl": record.requested_ttl,
                "break_glass": record.break_glass,
                "review_required": record.review_required,
                "ends_at": record.ends_at,
            },
        });
        if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
            body.extend(extra);
        }
        for target in self.targets.iter().filter(|t| t.config.wants(event)) {
            if target.queue.try_send(body.clone()).is_err() {
                tracing::warn!(url = %target.config.url, event, elevation = %record.id, "webhook queue full; event not sent (it is on the audit trail)");
            }
        }
    }
}

/// Delivers one URL's queue in order; each event is retried with backoff until the
/// receiver answers 2xx or the attempts run out.
async fn deliver(client: VaultHttp, path: String, url: String, mut rx: mpsc::Receiver<Value>) {
    while let Some(body) = rx.recv().await {
        let mut delay = Duration::from_secs(1);
        for attempt in 1..=ATTEMPTS {
            match client.send(Method::POST, &path, None, Some(&body)).await {
                Ok(resp) if resp.status.is_success() => break,
                Ok(resp) => {
                    tracing::warn!(%url, attempt, status = %resp.status, "webhook refused an event; retrying");
                }
                Err(e) => {
                    tracing::warn!(%url, attempt, error = %e, "webhook unreachable; retrying");
                }
            }
            if attempt == ATTEMPTS {
                tracing::error!(%url, event = %body["event"], "webhook gave up on an event after {ATTEMPTS} attempts");
                break;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(120));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_events_are_checked_by_name() {
        let config = |url: &str, events: &[&str]| NotifyConfig {
            url: url.into(),
            events: events.iter().map(|e| e.to_string()).collect(),
            ca_cert_file: None,
        };
        assert!(
            config("http://127.0.0.1:9/hooks/jit", &["request"])
                .check()
                .is_ok()
        );
        let e = config("ftp://x/y", &[]).check().unwrap_err();
        assert!(e.contains("http"), "{e}");
        let e = config("http://127.0.0.1:9/", &["requested"])
            .check()
            .unwrap_err();
        assert!(e.contains("unknown event `requested`"), "{e}");
        assert_eq!(
            split_url("https://hooks.example:8443/a/b?x=1").unwrap(),
            ("https://hooks.example:8443".into(), "/a/b?x=1".into())
        );
        assert_eq!(split_url("http://h").unwrap().1, "/");
    }
}

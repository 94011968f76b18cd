//! What one agent may see: the entries it serves, and the secrets granted to one of their
//! SPIFFE IDs or to the agent itself. Read from the registry's and the rotation engine's
//! published snapshots (watch channels), never from the store and never under a lock
//! another stream waits on, so a sync stream decides what to push without a query.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use tokio::sync::watch;

use crate::secrets::spec::SecretSpec;
use crate::store::EntryRecord;

/// The registry's entries by id, as it publishes them.
pub type EntryIndex = Arc<HashMap<String, Arc<EntryRecord>>>;

/// The loaded secret definitions, sorted by name, as the rotation engine publishes them.
pub type Definitions = Arc<[SecretSpec]>;

/// A secret one agent may hold, with the SPIFFE IDs it goes to there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub secret: String,
    pub to: Vec<String>,
}

#[derive(Clone)]
pub struct Visibility {
    entries: watch::Receiver<EntryIndex>,
    definitions: watch::Receiver<Definitions>,
}

impl Visibility {
    pub fn new(
        entries: watch::Receiver<EntryIndex>,
        definitions: watch::Receiver<Definitions>,
    ) -> Self {
        Self {
            entries,
            definitions,
        }
    }

    /// Entries whose parent is `agent`, sorted by SPIFFE ID then id.
    pub fn entries(&self, agent: &str) -> Vec<Arc<EntryRecord>> {
        let mut list: Vec<_> = self
            .entries
            .borrow()
            .values()
            .filter(|e| e.parent_id == agent)
            .cloned()
            .collect();
        list.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id).then(a.id.cmp(&b.id)));
        list
    }

    /// Every secret `agent` may hold, sorted by name.
    pub fn grants(&self, agent: &str) -> Vec<Grant> {
        let definitions = self.definitions.borrow().clone();
        grants_among(&definitions, &self.served(agent), agent)
    }

    /// The grant of one secret to `agent`, when it has one.
    pub fn grant(&self, agent: &str, secret: &str) -> Option<Grant> {
        let definitions = self.definitions.borrow().clone();
        let spec = definitions.iter().find(|s| s.name == secret)?;
        grants_among(std::slice::from_ref(spec), &self.served(agent), agent)
            .into_iter()
            .next()
    }

    /// The SPIFFE IDs `agent` serves workloads as.
    fn served(&self, agent: &str) -> BTreeSet<String> {
        self.entries
            .borrow()
            .values()
            .filter(|e| e.parent_id == agent)
            .map(|e| e.spiffe_id.clone())
            .collect()
    }
}

/// Of `specs`, those granted to `agent` itself or to one of the SPIFFE IDs in `served`.
pub fn grants_among(specs: &[SecretSpec], served: &BTreeSet<String>, agent: &str) -> Vec<Grant> {
    specs
        .iter()
        .filter_map(|spec| {
            let to: Vec<String> = spec
                .grants
                .iter()
                .filter(|g| served.contains(*g) || g.as_str() == agent)
                .cloned()
                .collect();
            (!to.is_empty()).then(|| Grant {
                secret: spec.name.clone(),
                to,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, spiffe_id: &str, parent: &str) -> (String, Arc<EntryRecord>) {
        (
            id.to_string(),
            Arc::new(EntryRecord {
                id: id.to_string(),
                spiffe_id: spiffe_id.to_string(),
                parent_id: parent.to_string(),
                ..Default::default()
            }),
        )
    }

    fn spec(name: &str, grants: &[&str]) -> SecretSpec {
        let mut spec = SecretSpec::from_toml(&format!(
            "name = \"{name}\"\nschedule = \"@yearly\"\n[store]\nkind = \"local\"\n[target]\nkind = \"none\"\n"
        ))
        .expect("spec");
        spec.grants = grants.iter().map(|g| g.to_string()).collect();
        spec
    }

    #[test]
    fn an_agent_sees_its_own_entries_and_the_secrets_granted_to_them() {
        let node_a = "spiffe://example.org/node/a";
        let node_b = "spiffe://example.org/node/b";
        let index: EntryIndex = Arc::new(
            [
                entry("2", "spiffe://example.org/web", node_a),
                entry("1", "spiffe://example.org/api", node_a),
                entry("3", "spiffe://example.org/db", node_b),
            ]
            .into_iter()
            .collect(),
        );
        let definitions: Definitions = vec![
            spec("db-password", &["spiffe://example.org/db"]),
            spec("shared", &["spiffe://example.org/web", node_b]),
            spec("web-token", &["spiffe://example.org/web"]),
        ]
        .into();
        let (_entries_tx, entries) = watch::channel(index);
        let (_definitions_tx, definitions) = watch::channel(definitions);
        let view = Visibility::new(entries, definitions);

        let ids: Vec<_> = view
            .entries(node_a)
            .iter()
            .map(|e| e.spiffe_id.clone())
            .collect();
        assert_eq!(
            ids,
            ["spiffe://example.org/api", "spiffe://example.org/web"]
        );
        let names: Vec<_> = view.grants(node_a).into_iter().map(|g| g.secret).collect();
        assert_eq!(names, ["shared", "web-token"]);
        assert_eq!(
            view.grant(node_b, "shared").map(|g| g.to),
            Some(vec![node_b.to_string()]),
            "a grant to the agent itself counts"
        );
        assert_eq!(view.grant(node_a, "db-password"), None);
        assert_eq!(view.grant(node_a, "no-such-secret"), None);
    }
}

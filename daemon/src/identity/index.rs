//! The registry's entries in memory, by id and by the agent that serves them.
//!
//! Every sync stream reads them (an agent's entries when it connects, who it serves when an
//! entry of its changes) and every change publishes a new version. Both maps are persistent
//! (`imbl`): a version shares all but the changed path with the one before, so a change
//! costs a few allocations rather than a copy of the whole index, and an agent's entries are
//! read without scanning everyone's. With a plain map both were linear in the entries: at
//! 100,000 of them a change copied the index (about 5 ms) and each connecting agent scanned
//! it twice.

use std::sync::Arc;

use crate::store::EntryRecord;

/// An agent's entries, ordered by SPIFFE ID, then id.
type Served = imbl::OrdMap<(String, String), Arc<EntryRecord>>;

#[derive(Clone, Default)]
pub struct Entries {
    by_id: imbl::HashMap<String, Arc<EntryRecord>>,
    by_parent: imbl::HashMap<String, Served>,
}

impl Entries {
    pub fn new(records: impl IntoIterator<Item = EntryRecord>) -> Self {
        let mut entries = Self::default();
        for record in records {
            entries.upsert(Arc::new(record));
        }
        entries
    }

    pub fn get(&self, id: &str) -> Option<&Arc<EntryRecord>> {
        self.by_id.get(id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Every entry, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &Arc<EntryRecord>> {
        self.by_id.values()
    }

    /// The entries `agent` serves, ordered by SPIFFE ID, then id.
    pub fn of_parent(&self, agent: &str) -> impl Iterator<Item = &Arc<EntryRecord>> {
        self.by_parent
            .get(agent)
            .into_iter()
            .flat_map(|m| m.values())
    }

    /// Adds `record`, or replaces the entry with its id (wherever it was served); returns
    /// the entry it replaced.
    pub fn upsert(&mut self, record: Arc<EntryRecord>) -> Option<Arc<EntryRecord>> {
        let old = self.remove(&record.id);
        let key = (record.spiffe_id.clone(), record.id.clone());
        self.by_parent
            .entry(record.parent_id.clone())
            .or_default()
            .insert(key, record.clone());
        self.by_id.insert(record.id.clone(), record);
        old
    }

    /// Removes the entry with this id; returns it.
    pub fn remove(&mut self, id: &str) -> Option<Arc<EntryRecord>> {
        let old = self.by_id.remove(id)?;
        let key = (old.spiffe_id.clone(), old.id.clone());
        if let Some(served) = self.by_parent.get_mut(&old.parent_id) {
            served.remove(&key);
            if served.is_empty() {
                self.by_parent.remove(&old.parent_id);
            }
        }
        Some(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, spiffe_id: &str, parent_id: &str, revision: i64) -> EntryRecord {
        EntryRecord {
            id: id.into(),
            spiffe_id: spiffe_id.into(),
            parent_id: parent_id.into(),
            revision,
            ..EntryRecord::default()
        }
    }

    fn ids<'a>(list: impl Iterator<Item = &'a Arc<EntryRecord>>) -> Vec<&'a str> {
        list.map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn an_agents_entries_are_its_own_in_order_and_follow_every_change() {
        let mut index = Entries::new([
            record("3", "spiffe://td/b", "spiffe://td/node/a", 1),
            record("1", "spiffe://td/b", "spiffe://td/node/a", 1),
            record("2", "spiffe://td/a", "spiffe://td/node/a", 1),
            record("4", "spiffe://td/a", "spiffe://td/node/b", 1),
        ]);
        assert_eq!(index.len(), 4);
        assert_eq!(ids(index.of_parent("spiffe://td/node/a")), ["2", "1", "3"]);
        assert_eq!(ids(index.of_parent("spiffe://td/node/b")), ["4"]);
        assert_eq!(
            ids(index.of_parent("spiffe://td/node/c")),
            Vec::<&str>::new()
        );

        // A version taken before a change keeps what it saw.
        let before = index.clone();
        // Moved to another agent, under another SPIFFE ID.
        let old = index.upsert(Arc::new(record(
            "1",
            "spiffe://td/c",
            "spiffe://td/node/b",
            2,
        )));
        assert_eq!(old.map(|o| o.revision), Some(1));
        assert_eq!(ids(index.of_parent("spiffe://td/node/a")), ["2", "3"]);
        assert_eq!(ids(index.of_parent("spiffe://td/node/b")), ["4", "1"]);
        assert_eq!(index.get("1").map(|e| e.revision), Some(2));
        assert_eq!(ids(before.of_parent("spiffe://td/node/a")), ["2", "1", "3"]);

        assert_eq!(index.remove("4").map(|e| e.id.clone()), Some("4".into()));
        assert!(index.remove("4").is_none());
        assert_eq!(ids(index.of_parent("spiffe://td/node/b")), ["1"]);
        index.remove("1");
        assert_eq!(
            ids(index.of_parent("spiffe://td/node/b")),
            Vec::<&str>::new()
        );
        assert_eq!(index.len(), 2);
        assert_eq!(before.len(), 4);
    }
}

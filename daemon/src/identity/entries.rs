//! Registration entries: created, changed and deleted through the store, checked field by
//! field, and published to the sync streams as they change.

use super::*;

impl Registry {
    pub async fn create_entry(&self, input: EntryInput) -> Result<EntryRecord, IdentityError> {
        let new = self.check_new_entry(input).await?;
        let record = self.store.create_entry(&new, unix(self.now())).await?;
        self.publish_upsert(record.clone());
        self.announce_entry(&record.id).await;
        Ok(record)
    }

    /// Creates several entries in one transaction (the bulk path of an operator loading a
    /// fleet); each gets its own result, in order. One refused (a bad field, an agent's
    /// identity, a duplicate) leaves the others to be created.
    pub async fn create_entries(
        &self,
        inputs: Vec<EntryInput>,
    ) -> Result<Vec<Result<EntryRecord, IdentityError>>, IdentityError> {
        if inputs.len() > MAX_ENTRY_BATCH {
            return Err(invalid(
                "entries",
                format!(
                    "{} entries in one call; at most {MAX_ENTRY_BATCH}, send the rest in further calls",
                    inputs.len()
                ),
            ));
        }
        let mut checked = Vec::with_capacity(inputs.len());
        for input in inputs {
            checked.push(self.check_new_entry(input).await);
        }
        let valid: Vec<&NewEntry> = checked.iter().flat_map(|c| c.as_ref().ok()).collect();
        let mut stored = self
            .store
            .create_entries(valid, unix(self.now()))
            .await?
            .into_iter();
        let results: Vec<Result<EntryRecord, IdentityError>> = checked
            .into_iter()
            .map(|c| {
                c.and_then(|_| {
                    let stored = stored.next().expect("the store answers each entry");
                    stored.map_err(IdentityError::from)
                })
            })
            .collect();
        let made: Vec<Arc<EntryRecord>> = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|record| Arc::new(record.clone()))
            .collect();
        // One new version of the index for the whole batch.
        self.entries.send_modify(|index| {
            Arc::make_mut(index).upsert_all(made.iter().cloned());
        });
        for record in made {
            let id = record.id.clone();
            let _ = self.changes.send(Change::EntryUpserted(record));
            self.announce_entry(&id).await;
        }
        Ok(results)
    }

    pub async fn update_entry(
        &self,
        id: &str,
        change: EntryChange,
    ) -> Result<EntryRecord, IdentityError> {
        let before = self.store.get_entry(id).await?;
        let update = self.check_entry_change(change)?;
        if let Some(spiffe_id) = &update.spiffe_id {
            self.not_an_agent(
                &SpiffeId::parse(spiffe_id).map_err(|e| invalid("spiffe_id", e.to_string()))?,
            )
            .await?;
        }
        let after = self
            .store
            .update_entry(id, &update, unix(self.now()))
            .await?;
        if before.parent_id != after.parent_id {
            // The old parent must drop it; the new one gets it as an upsert.
            let _ = self.changes.send(Change::EntryDeleted {
                id: before.id.clone(),
                parent_id: before.parent_id.clone(),
            });
        }
        self.publish_upsert(after.clone());
        self.announce_entry(&after.id).await;
        Ok(after)
    }

    pub async fn delete_entry(&self, id: &str) -> Result<EntryRecord, IdentityError> {
        let deleted = self.store.delete_entry(id).await?;
        self.entries.send_modify(|index| {
            Arc::make_mut(index).remove(&deleted.id);
        });
        let _ = self.changes.send(Change::EntryDeleted {
            id: deleted.id.clone(),
            parent_id: deleted.parent_id.clone(),
        });
        self.announce_entry(&deleted.id).await;
        Ok(deleted)
    }

    /// Drops entries a revocation deleted from the in-memory index. Agents hear of it
    /// through the revocation itself (which also says to remove their files), not as
    /// ordinary deletions.
    pub fn forget_revoked_entries(&self, ids: &[String]) {
        self.entries.send_modify(|index| {
            let index = Arc::make_mut(index);
            for id in ids {
                index.remove(id);
            }
        });
    }

    pub async fn get_entry(&self, id: &str) -> Result<EntryRecord, IdentityError> {
        Ok(self.store.get_entry(id).await?)
    }

    pub async fn list_entries(
        &self,
        filter: &EntryFilter,
    ) -> Result<Vec<EntryRecord>, IdentityError> {
        Ok(self.store.list_entries(filter).await?)
    }

    async fn announce_entry(&self, id: &str) {
        self.store
            .announce(&crate::cluster::Notice::Entry { id: id.to_string() })
            .await;
    }

    /// Takes up another daemon's change to entry `id`: read back, it is upserted here (a
    /// move between agents deletes it from the old one first), or deleted if it is gone.
    pub async fn take_entry_change(&self, id: &str) -> Result<(), IdentityError> {
        let known = self.entries.borrow().get(id).cloned();
        match self.store.get_entry(id).await {
            Ok(record) => {
                if let Some(old) = &known {
                    if old.revision >= record.revision && old.parent_id == record.parent_id {
                        return Ok(());
                    }
                    if old.parent_id != record.parent_id {
                        let _ = self.changes.send(Change::EntryDeleted {
                            id: old.id.clone(),
                            parent_id: old.parent_id.clone(),
                        });
                    }
                }
                self.publish_upsert(record);
            }
            Err(StoreError::NotFound { .. }) => {
                if let Some(old) = known {
                    self.entries.send_modify(|index| {
                        Arc::make_mut(index).remove(&old.id);
                    });
                    let _ = self.changes.send(Change::EntryDeleted {
                        id: old.id.clone(),
                        parent_id: old.parent_id.clone(),
                    });
                }
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Reads every entry and takes up what differs from the index here: what notices that
    /// never arrived would have said. Returns how many entries changed.
    pub async fn resync_entries(&self) -> Result<usize, IdentityError> {
        let stored = self.store.list_entries(&EntryFilter::default()).await?;
        let index = self.entries.borrow().clone();
        let mut changed = 0;
        let mut seen = std::collections::HashSet::with_capacity(stored.len());
        for record in stored {
            seen.insert(record.id.clone());
            let differs = index.get(&record.id).is_none_or(|old| {
                old.revision != record.revision || old.parent_id != record.parent_id
            });
            if differs {
                changed += 1;
                self.take_entry_change(&record.id).await?;
            }
        }
        for entry in index.values().filter(|e| !seen.contains(&e.id)) {
            changed += 1;
            self.take_entry_change(&entry.id).await?;
        }
        if changed > 0 {
            tracing::info!(
                changed,
                "caught up with entries changed through another daemon"
            );
        }
        Ok(changed)
    }

    pub(super) fn publish_upsert(&self, record: EntryRecord) {
        let record = Arc::new(record);
        self.entries.send_modify(|index| {
            Arc::make_mut(index).upsert(record.clone());
        });
        let _ = self.changes.send(Change::EntryUpserted(record));
    }

    /// `input` checked field by field, and not an agent's own identity.
    async fn check_new_entry(&self, input: EntryInput) -> Result<NewEntry, IdentityError> {
        let new = self.check_entry_input(input)?;
        self.not_an_agent(
            &SpiffeId::parse(&new.spiffe_id).map_err(|e| invalid("spiffe_id", e.to_string()))?,
        )
        .await?;
        Ok(new)
    }

    pub(super) fn check_entry_input(&self, input: EntryInput) -> Result<NewEntry, IdentityError> {
        let spiffe_id = self.workload_id("spiffe_id", &input.spiffe_id)?;
        let parent_id = self.member_id("parent_id", &input.parent_id)?;
        let selectors = check_selectors(&input.selectors)?;
        if selectors.is_empty() {
            return Err(invalid(
                "selectors",
                "an entry needs at least one selector, e.g. unix:uid:1000",
            ));
        }
        Ok(NewEntry {
            spiffe_id: spiffe_id.to_string(),
            parent_id: parent_id.to_string(),
            selectors,
            x509_svid_ttl: check_ttl("x509_svid_ttl", input.x509_svid_ttl)?,
            jwt_svid_ttl: check_ttl("jwt_svid_ttl", input.jwt_svid_ttl)?,
            dns_names: check_dns_names(&input.dns_names)?,
            hint: check_hint(&input.hint)?,
            sets: check_sets(&input.sets)?,
            expires_at: input.expires_at.max(0),
        })
    }

    pub(super) fn check_entry_change(
        &self,
        change: EntryChange,
    ) -> Result<EntryUpdate, IdentityError> {
        Ok(EntryUpdate {
            spiffe_id: change
                .spiffe_id
                .map(|s| self.workload_id("spiffe_id", &s).map(|id| id.to_string()))
                .transpose()?,
            parent_id: change
                .parent_id
                .map(|s| self.member_id("parent_id", &s).map(|id| id.to_string()))
                .transpose()?,
            selectors: match change.selectors {
                Some(list) if !list.is_empty() => Some(check_selectors(&list)?),
                _ => None,
            },
            x509_svid_ttl: change
                .x509_svid_ttl
                .map(|t| check_ttl("x509_svid_ttl", t))
                .transpose()?,
            jwt_svid_ttl: change
                .jwt_svid_ttl
                .map(|t| check_ttl("jwt_svid_ttl", t))
                .transpose()?,
            dns_names: change.dns_names.map(|d| check_dns_names(&d)).transpose()?,
            hint: change.hint.map(|h| check_hint(&h)).transpose()?,
            sets: change.sets.map(|s| check_sets(&s)).transpose()?,
        })
    }

    pub(super) fn member_id(
        &self,
        field: &'static str,
        text: &str,
    ) -> Result<SpiffeId, IdentityError> {
        let id = SpiffeId::parse(text).map_err(|e| invalid(field, e.to_string()))?;
        if !id.is_member_of(&self.trust_domain) {
            return Err(invalid(
                field,
                format!(
                    "{id} is not in this daemon's trust domain {}",
                    self.trust_domain
                ),
            ));
        }
        Ok(id)
    }

    pub(super) fn workload_id(
        &self,
        field: &'static str,
        text: &str,
    ) -> Result<SpiffeId, IdentityError> {
        let id = self.member_id(field, text)?;
        if !id.has_path() {
            return Err(invalid(
                field,
                "a workload SPIFFE ID needs a path, e.g. spiffe://example.org/web",
            ));
        }
        if is_reserved(&id) {
            return Err(invalid(
                field,
                format!(
                    "{id} is in {RESERVED_PREFIX}, reserved for the daemon itself (its node API \
                     serves as {RESERVED_PREFIX}server): nobody else may be issued it"
                ),
            ));
        }
        Ok(id)
    }

    /// Refuses to give a workload an attested agent's identity: an entry for it would let a
    /// workload on any node act as that agent towards other workloads.
    pub(super) async fn not_an_agent(&self, id: &SpiffeId) -> Result<(), IdentityError> {
        if self.store.get_agent(id.as_str()).await?.is_some() {
            return Err(invalid(
                "spiffe_id",
                format!("{id} is an agent's identity; an entry gives a workload its own"),
            ));
        }
        Ok(())
    }

    // ----- join tokens and agents -----
}

/// The most entries one `BatchCreateEntry` call creates (one transaction holds the
/// store's write lock while they go in).
pub const MAX_ENTRY_BATCH: usize = 1000;

/// Paths under this prefix are the daemon's own: no entry or join token may name one.
pub const RESERVED_PREFIX: &str = "/mayfly/";

fn is_reserved(id: &SpiffeId) -> bool {
    let path = id.path();
    path == RESERVED_PREFIX.trim_end_matches('/') || path.starts_with(RESERVED_PREFIX)
}

//! Secret definitions: sealed into the store, loaded into the live objects a rotation
//! uses (store client, target, schedule), kept fresh, and read back for operators.

use super::*;

impl RotationEngine {
    pub(super) fn loaded(&self, name: &str) -> Option<Arc<SecretRuntime>> {
        lock(&self.secrets).get(name).map(|l| l.runtime.clone())
    }

    /// The secret's runtime; one defined through another daemon is loaded from the store.
    pub(super) async fn runtime(&self, name: &str) -> Result<Arc<SecretRuntime>, EngineError> {
        match self.loaded(name) {
            Some(runtime) => Ok(runtime),
            None => self.fresh_runtime(name).await,
        }
    }

    /// The runtime for the secret's stored definition, rebuilt if it has changed.
    pub(super) async fn fresh_runtime(
        &self,
        name: &str,
    ) -> Result<Arc<SecretRuntime>, EngineError> {
        let record = self.datastore.get_secret(name).await?;
        self.load(&record).await
    }

    /// Builds (or keeps) the runtime for `record`.
    pub(super) async fn load(
        &self,
        record: &SecretRecord,
    ) -> Result<Arc<SecretRuntime>, EngineError> {
        if let Some(loaded) = lock(&self.secrets).get(&record.name)
            && loaded.sealed == record.spec_sealed
        {
            return Ok(loaded.runtime.clone());
        }
        let spec = self.open_spec(record)?;
        let runtime = Arc::new(SecretRuntime::build(spec, &self.datastore, &self.key).await?);
        self.change_loaded(|secrets| {
            secrets.insert(
                record.name.clone(),
                Loaded {
                    sealed: record.spec_sealed.clone(),
                    runtime: runtime.clone(),
                },
            );
        });
        Ok(runtime)
    }

    /// Brings the loaded secrets in line with the store: other daemons may have added,
    /// changed or deleted some.
    pub(super) async fn refresh(&self, records: &HashMap<String, SecretRecord>) {
        for record in records.values() {
            if let Err(e) = self.load(record).await {
                tracing::error!(secret = %record.name, error = %e, "could not load a secret definition");
            }
        }
        let stale = lock(&self.secrets)
            .keys()
            .any(|name| !records.contains_key(name));
        if stale {
            self.change_loaded(|secrets| secrets.retain(|name, _| records.contains_key(name)));
        }
    }

    /// Stores a definition; returns the sealed form that was stored.
    pub(super) async fn save_spec(
        &self,
        spec: &SecretSpec,
        source: &str,
    ) -> Result<Vec<u8>, EngineError> {
        spec.check()?;
        let json = serde_json::to_vec(spec).map_err(|e| EngineError::Internal(e.to_string()))?;
        let sealed = self
            .key
            .seal(&format!("mayfly-spec\0{}", spec.name), &json)
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let now = unix(self.clock.now());
        let existing = self.datastore.get_secret(&spec.name).await.ok();
        self.datastore
            .upsert_secret(&SecretRecord {
                name: spec.name.clone(),
                spec_sealed: sealed.clone(),
                source: source.to_string(),
                next_run_at: None,
                last_run_at: existing.as_ref().and_then(|r| r.last_run_at),
                last_outcome: existing
                    .map(|r| r.last_outcome)
                    .unwrap_or_else(|| "never run".into()),
                created_at: now,
                updated_at: now,
            })
            .await?;
        Ok(sealed)
    }

    pub(super) fn open_spec(&self, record: &SecretRecord) -> Result<SecretSpec, EngineError> {
        let json = self
            .key
            .open(
                &format!("mayfly-spec\0{}", record.name),
                &record.spec_sealed,
            )
            .map_err(|e| EngineError::Internal(format!("secret {}: {e}", record.name)))?;
        serde_json::from_slice(&json)
            .map_err(|e| EngineError::Internal(format!("secret {}: {e}", record.name)))
    }

    /// Adds (or replaces) a secret defined through the admin API.
    pub async fn create(&self, spec: SecretSpec) -> Result<(), EngineError> {
        if let Ok(existing) = self.datastore.get_secret(&spec.name).await
            && existing.source == "config"
        {
            return Err(EngineError::Conflict(format!(
                "secret {} is defined in daemon.toml; change it there",
                spec.name
            )));
        }
        let runtime = SecretRuntime::build(spec.clone(), &self.datastore, &self.key).await?;
        let sealed = self.save_spec(&spec, "api").await?;
        self.change_loaded(|secrets| {
            secrets.insert(
                spec.name.clone(),
                Loaded {
                    sealed,
                    runtime: Arc::new(runtime),
                },
            );
        });
        self.wake.notify_one();
        // The other daemons load it at once instead of at their next scheduler pass.
        self.datastore
            .announce(&crate::cluster::Notice::Secret {
                name: spec.name.clone(),
            })
            .await;
        Ok(())
    }

    /// Keeps `value` as the current version of `name`, a secret with none yet: what
    /// `mayflyd secret create --value-file` imports. On the audit trail as adopted.
    pub async fn import_current(&self, name: &str, value: &Credential) -> Result<(), EngineError> {
        let runtime = self.runtime(name).await?;
        if runtime.store.get_current().await?.is_some() {
            return Err(EngineError::Conflict(format!(
                "secret {name} has a current value already; rotate it instead"
            )));
        }
        let token = format!("adopted-{}", hex::encode(rand::random::<[u8; 16]>()));
        runtime.store.put_pending(&token, value).await?;
        runtime.store.promote(&token).await?;
        self.audit.note(
            Event::new(&Actor::Daemon, "secret.adopt", name)
                .scope(format!("version {token}"))
                .reason("imported with `mayflyd secret create --value-file`"),
        );
        tracing::info!(secret = %name, version = %token, "imported the current value");
        Ok(())
    }

    pub async fn delete(&self, name: &str) -> Result<(), EngineError> {
        self.runtime(name).await?;
        self.datastore.delete_secret(name).await?;
        self.drop_loaded(name);
        self.datastore
            .announce(&crate::cluster::Notice::Secret {
                name: name.to_string(),
            })
            .await;
        Ok(())
    }

    /// Forgets a deleted secret's definition.
    pub(super) fn drop_loaded(&self, name: &str) {
        if lock(&self.secrets).contains_key(name) {
            self.change_loaded(|secrets| {
                secrets.remove(name);
            });
        }
    }

    /// Changes the loaded secrets and republishes their definitions.
    fn change_loaded(&self, change: impl FnOnce(&mut HashMap<String, Loaded>)) {
        let mut secrets = lock(&self.secrets);
        change(&mut secrets);
        let mut specs: Vec<_> = secrets.values().map(|l| l.runtime.spec.clone()).collect();
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        self.definitions.send_replace(specs.into());
    }

    /// The loaded definitions, sorted by name.
    pub fn specs(&self) -> crate::visibility::Definitions {
        self.definitions.borrow().clone()
    }

    pub async fn spec(&self, name: &str) -> Result<SecretSpec, EngineError> {
        Ok(self.runtime(name).await?.spec.clone())
    }

    pub async fn record(&self, name: &str) -> Result<SecretRecord, EngineError> {
        Ok(self.datastore.get_secret(name).await?)
    }

    pub async fn jobs(&self, name: &str, limit: i64) -> Result<Vec<JobRecord>, EngineError> {
        Ok(self.datastore.jobs_for_secret(name, limit).await?)
    }

    pub async fn versions(
        &self,
        name: &str,
    ) -> Result<Vec<crate::secrets::VersionInfo>, EngineError> {
        Ok(self.runtime(name).await?.store.versions().await?)
    }

    /// The current value, for an operator (`mayflyd secret get`) or an agent push. Each
    /// call is one read of the secret's store (a query, or an AWS or Vault call), counted.
    pub async fn current(&self, name: &str) -> Result<Option<(String, Credential)>, EngineError> {
        let runtime = self.runtime(name).await?;
        self.metrics.secret_value_read();
        Ok(runtime.store.get_current().await?)
    }

    /// The current version with its value, as pushed to agents; one read of the store.
    pub async fn promoted(&self, name: &str) -> Result<Option<Arc<Promoted>>, EngineError> {
        Ok(self.current(name).await?.map(|(version, credential)| {
            Arc::new(Promoted {
                secret: name.to_string(),
                version,
                credential,
            })
        }))
    }
}

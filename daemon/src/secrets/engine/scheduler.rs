//! The scheduler and its lease: one daemon among several on a datastore holds the lease
//! and starts the rotations that fall due.

use super::*;

impl RotationEngine {
    /// Whether this daemon runs the scheduler now.
    pub fn is_leader(&self) -> bool {
        lock(&self.leader_until).is_some_and(|until| self.clock.now() < until)
    }

    /// Gives the scheduler lease up on shutdown, so another daemon takes over at once
    /// instead of after `lease_ttl`. Jobs still running keep their claims until they lapse.
    pub async fn step_down(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        *lock(&self.leader_until) = None;
        self.metrics.set_scheduler_leader(false);
        if let Err(e) = self
            .datastore
            .release_lease(SCHEDULER_LEASE, &self.lease.holder)
            .await
        {
            tracing::warn!(error = %e, "could not release the scheduler lease; it lapses by itself");
        }
    }

    /// Takes, renews or loses the scheduler lease every `renewal`; the holder also picks
    /// up jobs whose daemon went away.
    pub(super) async fn lease_loop(self: Arc<Self>) {
        let mut timer = tokio::time::interval(self.lease.renewal);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            timer.tick().await;
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            self.renew_lease().await;
        }
    }

    pub(super) async fn renew_lease(self: &Arc<Self>) {
        let now = self.clock.now();
        let until = now + self.lease.ttl;
        let was_leader = self.is_leader();
        let holder = &self.lease.holder;
        match self
            .datastore
            .acquire_lease(SCHEDULER_LEASE, holder, unix_ms(now), unix_ms(until))
            .await
        {
            Ok(true) => {
                *lock(&self.leader_until) = Some(until);
                if !was_leader {
                    tracing::info!(holder = %holder, "holding the scheduler lease: this daemon runs scheduled rotations");
                }
                self.resume(true).await;
            }
            Ok(false) => {
                *lock(&self.leader_until) = None;
                if was_leader {
                    tracing::warn!(holder = %holder, "lost the scheduler lease to another daemon");
                }
            }
            Err(e) => {
                // Keep what we hold: it lapses by itself at `leader_until`.
                tracing::error!(error = %e, "could not renew the scheduler lease");
            }
        }
        self.metrics.set_scheduler_leader(self.is_leader());
        self.wake.notify_one();
    }

    /// Keeps the loaded secrets in step with the store and, while this daemon holds the
    /// scheduler lease, starts due rotations; sleeps until the next one, a renewal, or a
    /// secret being added here.
    pub(super) async fn schedule_loop(self: Arc<Self>) {
        loop {
            let mut next_wake: Option<SystemTime> = None;
            // One read of every schedule per wake, not one per secret.
            let records: HashMap<String, SecretRecord> = match self.datastore.list_secrets().await {
                Ok(list) => {
                    let records = list.into_iter().map(|r| (r.name.clone(), r)).collect();
                    self.refresh(&records).await;
                    records
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not read the rotation schedules");
                    HashMap::new()
                }
            };
            let now = self.clock.now();
            if self.is_leader() {
                for record in records.values() {
                    if let Some(at) = self.schedule_one(record, now).await {
                        next_wake = Some(next_wake.map_or(at, |w| w.min(at)));
                    }
                }
            }
            let sleep = next_wake
                .and_then(|w| w.duration_since(self.clock.now()).ok())
                .unwrap_or(Duration::from_secs(60))
                .min(Duration::from_secs(60));
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// Starts the secret's rotation if it is due; returns when it is due next.
    pub(super) async fn schedule_one(
        self: &Arc<Self>,
        record: &SecretRecord,
        now: SystemTime,
    ) -> Option<SystemTime> {
        let name = &record.name;
        let runtime = self.loaded(name)?;
        let due = match record.next_run_at {
            Some(at) => at,
            None => {
                let last = record
                    .last_run_at
                    .map(|t| std::time::UNIX_EPOCH + Duration::from_secs(t as u64));
                let next = runtime.schedule.next_run(last, now)?;
                let at = unix_ms(next);
                if let Err(e) = self.datastore.set_secret_schedule(name, Some(at)).await {
                    tracing::error!(secret = %name, error = %e, "could not record the next rotation time");
                }
                at
            }
        };
        let due_time = std::time::UNIX_EPOCH + Duration::from_millis(due.max(0) as u64);
        if due_time > now {
            return Some(due_time);
        }
        let following = runtime.schedule.next_run(Some(now), now);
        let job = match self
            .new_job(&runtime, crate::store::TriggerKind::Schedule, Some(due))
            .await
        {
            Ok(job) => job,
            Err(e) => {
                tracing::error!(secret = %name, error = %e, "could not start a scheduled rotation");
                return following;
            }
        };
        match self
            .datastore
            .start_scheduled_job(&job, due, following.map(unix_ms))
            .await
        {
            Ok(ScheduledStart::Started) => self.spawn_job(job),
            Ok(ScheduledStart::Busy) => {
                tracing::info!(secret = %name, "skipping a scheduled rotation: another rotation of this secret is unfinished")
            }
            Ok(ScheduledStart::Taken) => {
                tracing::debug!(secret = %name, "this schedule slot was taken by another daemon")
            }
            Err(e) => {
                tracing::error!(secret = %name, error = %e, "could not start a scheduled rotation")
            }
        }
        following
    }
}

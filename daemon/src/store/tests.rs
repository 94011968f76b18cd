//! Store tests. Every behaviour test runs twice: against SQLite in a temporary directory
//! and against a throwaway database on the local PostgreSQL, created and dropped per test.

use std::future::Future;
use std::sync::Arc;

use sqlx::{Connection as _, Row as _};

use super::*;

const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Where one test's store lives; `connect` may be called more than once.
struct TestDb {
    url: Option<String>,
    dir: tempfile::TempDir,
}

impl TestDb {
    async fn connect(&self) -> Store {
        Store::connect(self.url.as_deref(), self.dir.path())
            .await
            .expect("connect to the test datastore")
    }
}

async fn on_sqlite<F, Fut>(body: F)
where
    F: FnOnce(TestDb) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("temp dir");
    body(TestDb { url: None, dir }).await;
}

/// Creates a uniquely named database, runs `body` on it, and drops the database even if
/// `body` panics (the panic is re-raised afterwards).
async fn on_postgres<F, Fut>(body: F)
where
    F: FnOnce(TestDb) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let name = format!("mayfly_test_{}", hex::encode(rand::random::<[u8; 8]>()));
    let mut admin = sqlx::PgConnection::connect(PG_ADMIN_URL)
        .await
        .expect("PostgreSQL at 127.0.0.1:5432 (start it with pg_ctlcluster ... main start)");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("create test database");

    let db = TestDb {
        url: Some(format!("postgres://postgres@127.0.0.1:5432/{name}")),
        dir: tempfile::tempdir().expect("temp dir"),
    };
    let outcome = tokio::spawn(body(db)).await;

    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .expect("drop test database");
    let _ = admin.close().await;
    if let Err(err) = outcome {
        std::panic::resume_unwind(err.into_panic());
    }
}

/// For each named `async fn(TestDb)`, a module with one test per backend.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
                super::on_sqlite(super::$name).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
                super::on_postgres(super::$name).await;
            }
        }
    )*};
}

on_both_backends!(
    entry_crud,
    entry_conflicts,
    join_token_single_use,
    join_token_concurrent_consume,
    agent_lifecycle,
    ca_slot_activation,
    bundle_sequence_grows,
    migrations_are_idempotent,
    lease_is_held_renewed_and_taken_over,
    lease_goes_to_one_of_many,
    one_unfinished_job_per_secret,
    job_claims_fence_progress,
    schedule_slot_starts_one_job,
    audit_appends_chain_across_daemons,
    audit_filters,
    revocation_bookkeeping,
    deny_list_is_split_by_agent,
    writes_that_read_first_wait_for_other_writers,
    elevation_lifecycle,
);

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|s| (*s).to_owned()).collect()
}

fn new_entry(spiffe_id: &str, parent_id: &str, selectors: &[&str]) -> NewEntry {
    NewEntry {
        spiffe_id: spiffe_id.to_owned(),
        parent_id: parent_id.to_owned(),
        selectors: strings(selectors),
        x509_svid_ttl: 3600,
        jwt_svid_ttl: 300,
        dns_names: strings(&["web.example", "api.example"]),
        hint: "web".to_owned(),
        sets: strings(&["prod"]),
        expires_at: 0,
    }
}

const NODE_A: &str = "spiffe://example.org/node/a";
const NODE_B: &str = "spiffe://example.org/node/b";

async fn entry_crud(db: TestDb) {
    let store = db.connect().await;

    let web = store
        .create_entry(
            &new_entry(
                "spiffe://example.org/web",
                NODE_A,
                &["unix:uid:1000", "unix:gid:1000"],
            ),
            100,
        )
        .await
        .expect("create web");
    assert!(
        uuid::Uuid::parse_str(&web.id).is_ok(),
        "id is a UUID: {}",
        web.id
    );
    assert_eq!(web.selectors, strings(&["unix:gid:1000", "unix:uid:1000"]));
    assert_eq!(web.dns_names, strings(&["web.example", "api.example"]));
    assert_eq!(
        (web.revision, web.created_at, web.updated_at),
        (1, 100, 100)
    );
    assert_eq!(store.get_entry(&web.id).await.expect("get web"), web);

    let api = store
        .create_entry(
            &new_entry("spiffe://example.org/api", NODE_A, &["unix:uid:1001"]),
            101,
        )
        .await
        .expect("create api");
    let db_entry = store
        .create_entry(
            &new_entry("spiffe://example.org/db", NODE_B, &["unix:uid:1002"]),
            102,
        )
        .await
        .expect("create db");

    let all = store
        .list_entries(&EntryFilter::default())
        .await
        .expect("list");
    let ids: Vec<&str> = all.iter().map(|e| e.spiffe_id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "spiffe://example.org/api",
            "spiffe://example.org/db",
            "spiffe://example.org/web"
        ]
    );
    let under_a = store
        .entries_for_parent(NODE_A)
        .await
        .expect("entries for A");
    assert_eq!(under_a, vec![api.clone(), web.clone()]);
    let by_id = store
        .list_entries(&EntryFilter {
            parent_id: None,
            spiffe_id: Some("spiffe://example.org/db".to_owned()),
        })
        .await
        .expect("filter by SPIFFE ID");
    assert_eq!(by_id, vec![db_entry.clone()]);
    let both = store
        .list_entries(&EntryFilter {
            parent_id: Some(NODE_B.to_owned()),
            spiffe_id: Some("spiffe://example.org/web".to_owned()),
        })
        .await
        .expect("filter by both");
    assert!(both.is_empty());

    let updated = store
        .update_entry(
            &web.id,
            &EntryUpdate {
                x509_svid_ttl: Some(600),
                selectors: Some(strings(&["unix:uid:1000"])),
                hint: Some("web-v2".to_owned()),
                sets: Some(strings(&["frozen", "prod"])),
                ..EntryUpdate::default()
            },
            200,
        )
        .await
        .expect("update web");
    assert_eq!(updated.revision, 2);
    assert_eq!((updated.created_at, updated.updated_at), (100, 200));
    assert_eq!(updated.x509_svid_ttl, 600);
    assert_eq!(updated.selectors, strings(&["unix:uid:1000"]));
    assert_eq!(updated.hint, "web-v2");
    assert_eq!(updated.sets, strings(&["frozen", "prod"]));
    assert_eq!(
        updated.jwt_svid_ttl, web.jwt_svid_ttl,
        "untouched fields stay"
    );
    assert_eq!(updated.dns_names, web.dns_names, "untouched fields stay");
    assert_eq!(
        store.get_entry(&web.id).await.expect("get updated"),
        updated
    );

    let bumped = store
        .update_entry(&web.id, &EntryUpdate::default(), 201)
        .await
        .expect("empty update");
    assert_eq!((bumped.revision, bumped.updated_at), (3, 201));

    let deleted = store.delete_entry(&api.id).await.expect("delete api");
    assert_eq!(deleted, api);
    for err in [
        store.get_entry(&api.id).await.expect_err("get deleted"),
        store.delete_entry(&api.id).await.expect_err("delete twice"),
        store
            .update_entry(&api.id, &EntryUpdate::default(), 300)
            .await
            .expect_err("update deleted"),
    ] {
        assert!(
            matches!(&err, StoreError::NotFound { id, .. } if *id == api.id),
            "got {err:?}"
        );
    }
    assert_eq!(
        store.entries_for_parent(NODE_A).await.expect("list").len(),
        1
    );
}

async fn entry_conflicts(db: TestDb) {
    let store = db.connect().await;
    let first = store
        .create_entry(
            &new_entry("spiffe://example.org/web", NODE_A, &["b:1", "a:1"]),
            100,
        )
        .await
        .expect("create");

    // Same identity, parent and selector set, spelled in another order with a repeat.
    let err = store
        .create_entry(
            &new_entry("spiffe://example.org/web", NODE_A, &["a:1", "b:1", "a:1"]),
            101,
        )
        .await
        .expect_err("duplicate");
    assert!(matches!(err, StoreError::Conflict { .. }), "got {err:?}");
    assert!(err.to_string().contains("already exists"), "{err}");

    // A different selector set or parent is a different entry.
    let other = store
        .create_entry(
            &new_entry("spiffe://example.org/web", NODE_A, &["a:1"]),
            102,
        )
        .await
        .expect("different selectors");
    store
        .create_entry(
            &new_entry("spiffe://example.org/web", NODE_B, &["a:1", "b:1"]),
            103,
        )
        .await
        .expect("different parent");

    // Updating `other` into `first`'s identity is refused and changes nothing.
    let err = store
        .update_entry(
            &other.id,
            &EntryUpdate {
                selectors: Some(strings(&["b:1", "a:1"])),
                ..EntryUpdate::default()
            },
            200,
        )
        .await
        .expect_err("update into a duplicate");
    assert!(matches!(err, StoreError::Conflict { .. }), "got {err:?}");
    assert_eq!(store.get_entry(&other.id).await.expect("get"), other);
    assert_eq!(store.get_entry(&first.id).await.expect("get"), first);
}

async fn join_token_single_use(db: TestDb) {
    let store = db.connect().await;
    let node = "spiffe://example.org/node/web-1";

    let created = store
        .create_join_token("aa11", node, 1000, 100)
        .await
        .expect("create token");
    assert_eq!(created.used_at, None);
    let err = store
        .create_join_token("aa11", node, 1000, 100)
        .await
        .expect_err("same hash twice");
    assert!(matches!(err, StoreError::Conflict { .. }), "got {err:?}");

    let used = store
        .consume_join_token("aa11", 200)
        .await
        .expect("first use");
    assert_eq!(
        used,
        JoinTokenRecord {
            hash: "aa11".to_owned(),
            spiffe_id: node.to_owned(),
            expires_at: 1000,
            created_at: 100,
            used_at: Some(200),
        }
    );
    let err = store
        .consume_join_token("aa11", 201)
        .await
        .expect_err("reuse");
    assert!(
        matches!(err, StoreError::TokenAlreadyUsed { used_at: 200 }),
        "got {err:?}"
    );

    // Expiry is inclusive: at `expires_at` the token is already dead, and stays unused.
    store
        .create_join_token("bb22", node, 300, 100)
        .await
        .expect("create short token");
    let err = store
        .consume_join_token("bb22", 300)
        .await
        .expect_err("expired");
    assert!(
        matches!(err, StoreError::TokenExpired { expires_at: 300 }),
        "got {err:?}"
    );
    let used_at: Option<i64> = sqlx::query("SELECT used_at FROM join_tokens WHERE hash = $1")
        .bind("bb22")
        .fetch_one(&store.pool)
        .await
        .expect("read token")
        .try_get("used_at")
        .expect("used_at");
    assert_eq!(
        used_at, None,
        "a failed consume must not mark the token used"
    );

    let err = store
        .consume_join_token("cc33", 200)
        .await
        .expect_err("unknown");
    assert!(matches!(err, StoreError::TokenUnknown), "got {err:?}");

    store
        .create_join_token("dd44", node, 5000, 100)
        .await
        .expect("create long token");
    assert_eq!(
        store.purge_expired_join_tokens(1000).await.expect("purge"),
        2
    );
    let err = store
        .consume_join_token("aa11", 1001)
        .await
        .expect_err("purged");
    assert!(matches!(err, StoreError::TokenUnknown), "got {err:?}");
    store
        .consume_join_token("dd44", 1001)
        .await
        .expect("unexpired token survives the purge");
}

async fn join_token_concurrent_consume(db: TestDb) {
    const CONSUMERS: usize = 16;
    let store = db.connect().await;
    store
        .create_join_token("race", "spiffe://example.org/node/x", 1000, 100)
        .await
        .expect("create token");

    let start = Arc::new(tokio::sync::Barrier::new(CONSUMERS));
    let mut tasks = Vec::new();
    for i in 0..CONSUMERS {
        let store = store.clone();
        let start = Arc::clone(&start);
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            store.consume_join_token("race", 200 + i as i64).await
        }));
    }
    let mut winners = 0;
    for task in tasks {
        match task.await.expect("consumer task") {
            Ok(_) => winners += 1,
            Err(StoreError::TokenAlreadyUsed { .. }) => {}
            Err(other) => panic!("unexpected error from a losing consumer: {other:?}"),
        }
    }
    assert_eq!(winners, 1, "exactly one consumer may win");
}

fn attested(spiffe_id: &str, serial: &str, at: i64) -> AgentRecord {
    AgentRecord {
        spiffe_id: spiffe_id.to_owned(),
        serial: serial.to_owned(),
        // Deliberately not Active: attestation makes an agent active whatever is passed.
        status: AgentStatus::Evicted,
        attested_at: at,
        svid_expires_at: at + 3600,
        last_seen: at,
        token_hash: format!("hash-{serial}"),
    }
}

async fn agent_lifecycle(db: TestDb) {
    let store = db.connect().await;
    assert_eq!(store.get_agent(NODE_A).await.expect("get"), None);

    let agent = store
        .upsert_attested_agent(&attested(NODE_A, "01", 100))
        .await
        .expect("attest");
    assert_eq!(agent.status, AgentStatus::Active);
    assert_eq!(agent.serial, "01");
    assert_eq!(
        store.get_agent(NODE_A).await.expect("get"),
        Some(agent.clone())
    );
    store
        .upsert_attested_agent(&attested(NODE_B, "b1", 100))
        .await
        .expect("attest B");
    let listed: Vec<String> = store
        .list_agents()
        .await
        .expect("list")
        .into_iter()
        .map(|a| a.spiffe_id)
        .collect();
    assert_eq!(listed, [NODE_A, NODE_B]);

    let renewed = store
        .update_agent_svid(NODE_A, "02", 5000)
        .await
        .expect("renew");
    assert_eq!(
        (renewed.serial.as_str(), renewed.svid_expires_at),
        ("02", 5000)
    );
    store.touch_agent(NODE_A, 150).await.expect("touch");
    assert_eq!(
        store
            .get_agent(NODE_A)
            .await
            .expect("get")
            .map(|a| a.last_seen),
        Some(150)
    );

    let evicted = store
        .set_agent_status(NODE_A, AgentStatus::Evicted)
        .await
        .expect("evict");
    assert_eq!(evicted.status, AgentStatus::Evicted);
    let err = store
        .update_agent_svid(NODE_A, "03", 6000)
        .await
        .expect_err("an evicted agent cannot renew");
    assert!(
        matches!(&err, StoreError::AgentNotActive { status, .. } if status == "evicted"),
        "got {err:?}"
    );

    let back = store
        .upsert_attested_agent(&attested(NODE_A, "04", 200))
        .await
        .expect("evicted agent re-attests");
    assert_eq!(
        (back.status, back.serial.as_str(), back.attested_at),
        (AgentStatus::Active, "04", 200)
    );

    store
        .set_agent_status(NODE_A, AgentStatus::Banned)
        .await
        .expect("ban");
    let err = store
        .upsert_attested_agent(&attested(NODE_A, "05", 300))
        .await
        .expect_err("a banned agent cannot re-attest");
    assert!(matches!(err, StoreError::AgentBanned { .. }), "got {err:?}");
    let still = store.get_agent(NODE_A).await.expect("get").expect("exists");
    assert_eq!(
        (still.status, still.serial.as_str()),
        (AgentStatus::Banned, "04")
    );

    let missing = "spiffe://example.org/node/missing";
    for err in [
        store
            .set_agent_status(missing, AgentStatus::Evicted)
            .await
            .expect_err("status of unknown"),
        store
            .touch_agent(missing, 1)
            .await
            .expect_err("touch unknown"),
        store
            .update_agent_svid(missing, "01", 1)
            .await
            .expect_err("renew unknown"),
    ] {
        assert!(matches!(err, StoreError::NotFound { .. }), "got {err:?}");
    }
}

fn slot(id: &str, created_at: i64) -> CaSlotRecord {
    CaSlotRecord {
        id: id.to_owned(),
        state: CaSlotState::Prepared,
        // Bytes that would not survive a text round trip.
        cert_der: vec![0x30, 0x82, 0x00, 0xff, 0xfe, created_at as u8],
        jwt_kid: format!("kid-{id}"),
        jwt_public_spki: vec![0x00, 0x01, 0x80, 0xff],
        not_before: created_at,
        not_after: created_at + 86_400,
        created_at,
        activated_at: None,
        x509_key_sealed: Some(vec![1, 2, 3]),
        jwt_key_sealed: None,
    }
}

async fn states(store: &Store) -> Vec<(String, CaSlotState)> {
    store
        .list_ca_slots()
        .await
        .expect("list slots")
        .into_iter()
        .map(|s| (s.id, s.state))
        .collect()
}

fn st(id: &str, state: CaSlotState) -> (String, CaSlotState) {
    (id.to_owned(), state)
}

async fn ca_slot_activation(db: TestDb) {
    use CaSlotState::{Active, Prepared, Retired};
    let store = db.connect().await;

    store
        .insert_ca_slot(&slot("a", 10))
        .await
        .expect("insert a");
    // One prepared CA at a time, whichever daemon prepares it.
    let err = store
        .insert_ca_slot(&slot("b", 20))
        .await
        .expect_err("a second prepared slot");
    assert!(matches!(err, StoreError::Conflict { .. }), "got {err:?}");
    let err = store
        .insert_ca_slot(&slot("a", 30))
        .await
        .expect_err("duplicate id");
    assert!(matches!(err, StoreError::Conflict { .. }), "got {err:?}");

    let a = store.activate_ca_slot("a", 30).await.expect("activate a");
    assert_eq!((a.state, a.activated_at), (Active, Some(30)));
    store
        .insert_ca_slot(&slot("b", 20))
        .await
        .expect("insert b");
    let listed = store.list_ca_slots().await.expect("list");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].cert_der, slot("a", 10).cert_der, "oldest first");
    assert_eq!(listed[1], slot("b", 20), "bytes intact, sealed keys too");
    let err = store
        .activate_ca_slot("a", 31)
        .await
        .expect_err("already active");
    assert!(
        matches!(err, StoreError::CaSlotNotPrepared { .. }),
        "got {err:?}"
    );

    let b = store.activate_ca_slot("b", 40).await.expect("activate b");
    assert_eq!((b.state, b.activated_at), (Active, Some(40)));
    assert_eq!(states(&store).await, [st("a", Retired), st("b", Active)]);

    // Failed activations roll back the retirement they started with: b stays active.
    let err = store
        .activate_ca_slot("missing", 50)
        .await
        .expect_err("missing");
    assert!(matches!(err, StoreError::NotFound { .. }), "got {err:?}");
    let err = store.activate_ca_slot("a", 50).await.expect_err("retired");
    assert!(
        matches!(&err, StoreError::CaSlotNotPrepared { state, .. } if state == "retired"),
        "got {err:?}"
    );
    assert_eq!(states(&store).await, [st("a", Retired), st("b", Active)]);

    // The store itself refuses a second active slot.
    let mut rogue = slot("c", 60);
    rogue.state = Active;
    let err = store
        .insert_ca_slot(&rogue)
        .await
        .expect_err("second active");
    assert!(matches!(err, StoreError::Conflict { .. }), "got {err:?}");

    store
        .insert_ca_slot(&slot("c", 60))
        .await
        .expect("insert c");
    let err = store.delete_ca_slot("b").await.expect_err("delete active");
    assert!(
        matches!(err, StoreError::CaSlotActive { .. }),
        "got {err:?}"
    );
    let retired = store.retire_ca_slot("b").await.expect("retire b");
    assert_eq!(retired.state, Retired);
    let deleted = store.delete_ca_slot("a").await.expect("delete a");
    assert_eq!(deleted.id, "a");
    let err = store.delete_ca_slot("a").await.expect_err("delete twice");
    assert!(matches!(err, StoreError::NotFound { .. }), "got {err:?}");
    let err = store.retire_ca_slot("a").await.expect_err("retire deleted");
    assert!(matches!(err, StoreError::NotFound { .. }), "got {err:?}");
    assert_eq!(states(&store).await, [st("b", Retired), st("c", Prepared)]);
}

async fn bundle_sequence_grows(db: TestDb) {
    let store = db.connect().await;
    assert_eq!(store.bundle_sequence().await.expect("read"), 0);
    assert_eq!(store.bump_bundle_sequence().await.expect("bump"), 1);
    assert_eq!(store.bump_bundle_sequence().await.expect("bump"), 2);
    assert_eq!(store.bundle_sequence().await.expect("read"), 2);
}

async fn migrations_are_idempotent(db: TestDb) {
    let first = db.connect().await;
    let expected = if db.url.is_some() {
        Backend::Postgres
    } else {
        Backend::Sqlite
    };
    assert_eq!(first.backend(), expected);
    let entry = first
        .create_entry(
            &new_entry("spiffe://example.org/web", NODE_A, &["unix:uid:1"]),
            1,
        )
        .await
        .expect("create");
    first.bump_bundle_sequence().await.expect("bump");
    first.close().await;

    let second = db.connect().await;
    assert_eq!(
        second.get_entry(&entry.id).await.expect("entry survives"),
        entry
    );
    assert_eq!(
        second.bundle_sequence().await.expect("sequence survives"),
        1
    );
    let applied: i64 = sqlx::query("SELECT COUNT(*) AS n FROM _sqlx_migrations")
        .fetch_one(&second.pool)
        .await
        .expect("count migrations")
        .try_get("n")
        .expect("n");
    // Every embedded migration, each applied exactly once.
    assert_eq!(applied, 10);

    if expected == Backend::Sqlite {
        let file = db.dir.path().join(SQLITE_FILE_NAME);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&file)
                .expect("db file exists")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "the database file is private");
        let journal: String = sqlx::query("PRAGMA journal_mode")
            .fetch_one(&second.pool)
            .await
            .expect("journal mode")
            .try_get(0)
            .expect("journal mode text");
        assert_eq!(journal, "wal");
        let foreign_keys: i64 = sqlx::query("PRAGMA foreign_keys")
            .fetch_one(&second.pool)
            .await
            .expect("foreign keys")
            .try_get(0)
            .expect("foreign keys flag");
        assert_eq!(foreign_keys, 1);
    }
}

const SCHEDULER: &str = "scheduler";

async fn lease_is_held_renewed_and_taken_over(db: TestDb) {
    // Two daemons, each with its own pool on the one datastore.
    let a = db.connect().await;
    let b = db.connect().await;
    assert_eq!(a.get_lease(SCHEDULER).await.expect("read"), None);
    assert!(
        a.acquire_lease(SCHEDULER, "a", 1_000, 16_000)
            .await
            .expect("take")
    );
    assert!(
        !b.acquire_lease(SCHEDULER, "b", 2_000, 17_000)
            .await
            .expect("refused")
    );
    assert!(
        a.acquire_lease(SCHEDULER, "a", 5_000, 20_000)
            .await
            .expect("renew")
    );
    // At the old expiry the renewed lease still holds.
    assert!(
        !b.acquire_lease(SCHEDULER, "b", 16_001, 31_001)
            .await
            .expect("refused")
    );
    assert_eq!(
        b.get_lease(SCHEDULER).await.expect("read"),
        Some(LeaseRecord {
            holder: "a".into(),
            expires_at: 20_000
        })
    );
    // A stops renewing: once the lease has run out, B takes it and A cannot renew.
    assert!(
        b.acquire_lease(SCHEDULER, "b", 20_001, 35_001)
            .await
            .expect("take over")
    );
    assert!(
        !a.acquire_lease(SCHEDULER, "a", 20_002, 35_002)
            .await
            .expect("lost")
    );
    // Other leases are independent.
    assert!(
        a.acquire_lease("other", "a", 20_003, 35_003)
            .await
            .expect("other")
    );
    // Releasing hands it over at once; only the holder can release.
    a.release_lease(SCHEDULER, "a")
        .await
        .expect("no-op release");
    assert!(
        !a.acquire_lease(SCHEDULER, "a", 21_000, 36_000)
            .await
            .expect("still b's")
    );
    b.release_lease(SCHEDULER, "b").await.expect("release");
    assert!(
        a.acquire_lease(SCHEDULER, "a", 21_001, 36_001)
            .await
            .expect("released")
    );
}

async fn lease_goes_to_one_of_many(db: TestDb) {
    const DAEMONS: usize = 8;
    let mut stores = Vec::new();
    for _ in 0..DAEMONS {
        stores.push(db.connect().await);
    }
    // Twice: on an empty table (all insert) and on an expired lease (all update).
    for (now, holder_prefix) in [(1_000, "first"), (100_000, "second")] {
        let start = Arc::new(tokio::sync::Barrier::new(DAEMONS));
        let mut tasks = Vec::new();
        for (i, store) in stores.iter().enumerate() {
            let store = store.clone();
            let start = Arc::clone(&start);
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                let holder = format!("{holder_prefix}-{i}");
                store
                    .acquire_lease(SCHEDULER, &holder, now, now + 15_000)
                    .await
                    .map(|won| won.then_some(holder))
            }));
        }
        let mut winners = Vec::new();
        for task in tasks {
            if let Some(holder) = task.await.expect("task").expect("acquire") {
                winners.push(holder);
            }
        }
        assert_eq!(winners.len(), 1, "exactly one daemon leads: {winners:?}");
        let lease = stores[0].get_lease(SCHEDULER).await.expect("read");
        assert_eq!(lease.map(|l| l.holder), winners.pop());
    }
}

fn secret_record(name: &str, next_run_at: Option<i64>) -> SecretRecord {
    SecretRecord {
        name: name.into(),
        spec_sealed: vec![1, 2, 3],
        source: "api".into(),
        next_run_at,
        last_run_at: None,
        last_outcome: "never run".into(),
        created_at: 1,
        updated_at: 1,
    }
}

fn job(token: &str, secret: &str, holder: &str, claim_until: i64) -> JobRecord {
    JobRecord {
        token: token.into(),
        secret_name: secret.into(),
        state: JobState::Created,
        username: String::new(),
        trigger_kind: TriggerKind::Manual,
        attempts: 0,
        last_error: String::new(),
        created_at: 1,
        updated_at: 1,
        finished_at: None,
        scheduled_for: None,
        claimed_by: holder.into(),
        claim_expires_at: claim_until,
    }
}

async fn one_unfinished_job_per_secret(db: TestDb) {
    let a = db.connect().await;
    let b = db.connect().await;
    for name in ["s", "t"] {
        a.upsert_secret(&secret_record(name, None))
            .await
            .expect("secret");
    }
    assert!(
        a.insert_job(&job("j1", "s", "a", 10_000))
            .await
            .expect("first")
    );
    // Another daemon asking to rotate the same secret is refused while j1 runs ...
    assert!(
        !b.insert_job(&job("j2", "s", "b", 10_000))
            .await
            .expect("busy")
    );
    // ... but not for another secret.
    assert!(
        b.insert_job(&job("j3", "t", "b", 10_000))
            .await
            .expect("other secret")
    );
    let mut finished = a.get_job("j1").await.expect("j1");
    finished.state = JobState::Promoted;
    finished.finished_at = Some(2);
    assert!(a.update_job(&finished, "a").await.expect("finish"));
    assert!(
        b.insert_job(&job("j2", "s", "b", 10_000))
            .await
            .expect("free again")
    );
    let mut failed = b.get_job("j2").await.expect("j2");
    failed.state = JobState::Failed;
    assert!(b.update_job(&failed, "b").await.expect("fail"));
    assert!(
        a.insert_job(&job("j4", "s", "a", 10_000))
            .await
            .expect("after a failure")
    );
    let unfinished: Vec<String> = a
        .resumable_jobs("nobody", 20_000)
        .await
        .expect("list")
        .into_iter()
        .map(|j| j.token)
        .collect();
    assert_eq!(unfinished, ["j3", "j4"]);
}

async fn job_claims_fence_progress(db: TestDb) {
    let a = db.connect().await;
    let b = db.connect().await;
    a.upsert_secret(&secret_record("s", None))
        .await
        .expect("secret");
    assert!(
        a.insert_job(&job("j", "s", "a", 10_000))
            .await
            .expect("insert")
    );
    let mut progress = a.get_job("j").await.expect("read");
    assert_eq!(
        (progress.claimed_by.as_str(), progress.claim_expires_at),
        ("a", 10_000)
    );

    // While A's claim holds, B can neither claim nor resume the job; A renews it.
    assert!(!b.claim_job("j", "b", 5_000, 20_000).await.expect("refused"));
    assert!(b.resumable_jobs("b", 5_000).await.expect("list").is_empty());
    assert_eq!(a.resumable_jobs("a", 5_000).await.expect("own").len(), 1);
    assert!(a.claim_job("j", "a", 9_000, 24_000).await.expect("renew"));
    assert!(
        !b.claim_job("j", "b", 10_001, 25_001)
            .await
            .expect("renewed")
    );

    // A goes silent; once its claim has run out, B takes the job over, and A's late
    // progress is refused rather than written over B's.
    let resumable = b.resumable_jobs("b", 24_001).await.expect("list");
    assert_eq!(resumable.len(), 1);
    assert!(
        b.claim_job("j", "b", 24_001, 39_001)
            .await
            .expect("take over")
    );
    progress.state = JobState::PendingStored;
    assert!(!a.update_job(&progress, "a").await.expect("fenced"));
    assert!(!a.claim_job("j", "a", 24_002, 39_002).await.expect("lost"));
    assert_eq!(b.get_job("j").await.expect("read").state, JobState::Created);
    progress.state = JobState::PendingStored;
    assert!(b.update_job(&progress, "b").await.expect("b records"));
    assert_eq!(
        a.get_job("j").await.expect("read").state,
        JobState::PendingStored
    );

    // A finished job cannot be claimed at all.
    progress.state = JobState::Promoted;
    assert!(b.update_job(&progress, "b").await.expect("finish"));
    assert!(
        !b.claim_job("j", "b", 50_000, 65_000)
            .await
            .expect("finished")
    );
    assert!(
        b.resumable_jobs("b", 50_000)
            .await
            .expect("list")
            .is_empty()
    );
}

async fn schedule_slot_starts_one_job(db: TestDb) {
    use ScheduledStart::*;
    let a = db.connect().await;
    let b = db.connect().await;
    a.upsert_secret(&secret_record("s", Some(2_000)))
        .await
        .expect("secret");
    let scheduled = |token: &str, holder: &str, slot: i64| JobRecord {
        scheduled_for: Some(slot),
        trigger_kind: TriggerKind::Schedule,
        ..job(token, "s", holder, 100_000)
    };
    // Both daemons think slot 2000 is due; the first takes it, the second finds it taken.
    assert_eq!(
        a.start_scheduled_job(&scheduled("a1", "a", 2_000), 2_000, Some(4_000))
            .await
            .expect("a"),
        Started
    );
    assert_eq!(
        b.start_scheduled_job(&scheduled("b1", "b", 2_000), 2_000, Some(4_000))
            .await
            .expect("b"),
        Taken
    );
    assert_eq!(
        a.get_secret("s").await.expect("read").next_run_at,
        Some(4_000)
    );
    // Slot 4000 comes while a1 is unfinished: the slot is spent without a job.
    assert_eq!(
        b.start_scheduled_job(&scheduled("b2", "b", 4_000), 4_000, Some(6_000))
            .await
            .expect("b"),
        Busy
    );
    assert_eq!(
        b.get_secret("s").await.expect("read").next_run_at,
        Some(6_000)
    );
    assert!(matches!(
        b.get_job("b2").await,
        Err(StoreError::NotFound { .. })
    ));
    // Even with the schedule wound back, a slot that has a job never gets a second.
    let mut done = a.get_job("a1").await.expect("a1");
    done.state = JobState::Promoted;
    assert!(a.update_job(&done, "a").await.expect("finish"));
    b.set_secret_schedule("s", Some(2_000))
        .await
        .expect("rewind");
    assert_eq!(
        b.start_scheduled_job(&scheduled("b3", "b", 2_000), 2_000, Some(4_000))
            .await
            .expect("b"),
        Busy
    );
    assert!(matches!(
        b.get_job("b3").await,
        Err(StoreError::NotFound { .. })
    ));
    let jobs = a.jobs_for_secret("s", 10).await.expect("jobs");
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].scheduled_for, Some(2_000));
}

/// The serial of one SVID for spiffe://example.org/web, issued by [`NODE_A`].
fn issued_web() -> IssuedSvidRecord {
    IssuedSvidRecord {
        serial: "0abc".into(),
        entry_id: "e1".into(),
        spiffe_id: "spiffe://example.org/web".into(),
        agent_id: NODE_A.into(),
        ca_slot: "slot".into(),
        issued_at: 100,
        not_after: 200,
    }
}

fn audit_fields(action: &str, subject: &str, at_ms: i64) -> AuditFields {
    AuditFields {
        at_ms,
        actor: "uid:0".into(),
        action: action.into(),
        subject: subject.into(),
        outcome: "ok".into(),
        ..AuditFields::default()
    }
}

async fn audit_appends_chain_across_daemons(db: TestDb) {
    // Two stores on one database, as two daemons sharing it: appends from both interleave
    // into one chain. On SQLite the second writer's stale tail makes its first attempt
    // fail, and a retry with the tail read afresh succeeds, as the audit writer does.
    let first = db.connect().await;
    let second = db.connect().await;
    let hash = crate::audit::record_hash;
    assert_eq!(
        first.audit_tail().await.unwrap(),
        (0, GENESIS_HASH.to_string())
    );
    let mut tasks = Vec::new();
    for (n, store) in [first.clone(), second.clone()].into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut tail = store.audit_tail().await.unwrap();
            for i in 0..20 {
                let record = [audit_fields("entry.create", &format!("w{n}-{i}"), 1000 + i)];
                tail = match store
                    .append_audit(&record, &[], &[], Some(&tail), hash)
                    .await
                {
                    Ok(tail) => tail,
                    Err(_) => store
                        .append_audit(&record, &[], &[], None, hash)
                        .await
                        .unwrap(),
                };
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let rows = first.list_audit(&AuditFilter::default()).await.unwrap();
    assert_eq!(rows.len(), 40);
    let verdict = crate::audit::verify_rows(&rows, None);
    assert_eq!(verdict.first_bad, None, "one chain: {verdict:?}");
    assert_eq!(verdict.head, second.audit_tail().await.unwrap());

    // Issued serials go in with their record.
    let issued = issued_web();
    first
        .append_audit(
            &[audit_fields("svid.sign", "w", 1)],
            std::slice::from_ref(&issued),
            &[],
            None,
            hash,
        )
        .await
        .unwrap();
    // Found where signing puts them, after they moved into the indexed table, and once
    // only when recorded again after the move.
    let second_issued = IssuedSvidRecord {
        serial: "0abd".into(),
        ..issued.clone()
    };
    for step in 0..3 {
        match step {
            1 => assert_eq!(second.index_recent().await.unwrap().0, 1),
            2 => {
                second
                    .append_audit(
                        &[audit_fields("svid.sign", "w", 2)],
                        &[issued.clone(), second_issued.clone()],
                        &[],
                        None,
                        hash,
                    )
                    .await
                    .unwrap();
            }
            _ => {}
        }
        assert_eq!(
            first.issued_svid("0abc").await.unwrap(),
            Some(issued.clone()),
            "step {step}"
        );
        let mut live = first
            .live_serials_for_entries(&["e1".into()], 150)
            .await
            .unwrap();
        live.sort_by(|a, b| a.serial.cmp(&b.serial));
        let expected = if step == 2 {
            vec![issued.clone(), second_issued.clone()]
        } else {
            vec![issued.clone()]
        };
        assert_eq!(live, expected, "step {step}");
        assert!(
            first
                .live_serials_for_entries(&["e1".into()], 200)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            first.live_serials_for_agent(NODE_A, 150).await.unwrap(),
            live,
            "step {step}"
        );
        assert_eq!(
            first
                .live_serials_for_slot("slot", 150)
                .await
                .unwrap()
                .len(),
            live.len(),
            "step {step}"
        );
    }
    // Pruned from both places.
    assert_eq!(first.prune_issued_svids(201).await.unwrap(), 3);
    assert_eq!(first.issued_svid("0abc").await.unwrap(), None);
    assert_eq!(first.index_recent().await.unwrap().0, 0);
    first.close().await;
    second.close().await;
}

async fn audit_filters(db: TestDb) {
    let store = db.connect().await;
    let hash = crate::audit::record_hash;
    let records = [
        audit_fields("entry.create", "spiffe://example.org/web", 100),
        audit_fields("revoke.entry", "spiffe://example.org/web", 200),
        audit_fields("revoke.ack", "rv-1", 300),
        audit_fields("revoked", "spiffe://example.org/api", 400),
    ];
    store
        .append_audit(&records, &[], &[], None, hash)
        .await
        .unwrap();
    let subjects = |rows: Vec<AuditRow>| rows.into_iter().map(|r| r.seq).collect::<Vec<_>>();
    let web = AuditFilter {
        subject: Some("spiffe://example.org/web".into()),
        ..AuditFilter::default()
    };
    assert_eq!(subjects(store.list_audit(&web).await.unwrap()), vec![1, 2]);
    // Indexed by subject a batch at a time: found the same before, after and across.
    assert_eq!(store.index_recent().await.unwrap(), (0, 4));
    assert_eq!(subjects(store.list_audit(&web).await.unwrap()), vec![1, 2]);
    store
        .append_audit(
            &[audit_fields(
                "entry.update",
                "spiffe://example.org/web",
                150,
            )],
            &[],
            &[],
            None,
            hash,
        )
        .await
        .unwrap();
    assert_eq!(
        subjects(store.list_audit(&web).await.unwrap()),
        vec![1, 2, 5]
    );
    assert_eq!(store.index_recent().await.unwrap(), (0, 1));
    assert_eq!(store.index_recent().await.unwrap(), (0, 0));
    assert_eq!(
        subjects(store.list_audit(&web).await.unwrap()),
        vec![1, 2, 5]
    );
    let web_after_one = AuditFilter {
        after_seq: 1,
        limit: 1,
        ..web.clone()
    };
    assert_eq!(
        subjects(store.list_audit(&web_after_one).await.unwrap()),
        vec![2]
    );
    let prefix = AuditFilter {
        subject: Some("spiffe://example.org/*".into()),
        ..AuditFilter::default()
    };
    assert_eq!(
        subjects(store.list_audit(&prefix).await.unwrap()),
        vec![1, 2, 4, 5]
    );
    // A family matches its members, not other actions that merely start alike.
    let family = AuditFilter {
        action: Some("revoke".into()),
        ..AuditFilter::default()
    };
    assert_eq!(
        subjects(store.list_audit(&family).await.unwrap()),
        vec![2, 3]
    );
    let since = AuditFilter {
        since_ms: Some(250),
        limit: 1,
        ..AuditFilter::default()
    };
    assert_eq!(subjects(store.list_audit(&since).await.unwrap()), vec![3]);
    let paged = AuditFilter {
        after_seq: 3,
        ..AuditFilter::default()
    };
    assert_eq!(
        subjects(store.list_audit(&paged).await.unwrap()),
        vec![4, 5]
    );
    store.close().await;
}

async fn revocation_bookkeeping(db: TestDb) {
    let store = db.connect().await;
    let doomed = store
        .create_entry(
            &new_entry("spiffe://example.org/db", NODE_A, &["unix:uid:5"]),
            1,
        )
        .await
        .unwrap();
    let revocation = RevocationRecord {
        id: "rv-1".into(),
        kind: "entry".into(),
        target: "spiffe://example.org/db".into(),
        reason: "test".into(),
        actor: "uid:0".into(),
        created_at: 1000,
        detail: "{}".into(),
    };
    let serials = [RevokedSerialRecord {
        serial: "0a".into(),
        not_after: 500,
    }];
    let deleted = store
        .create_revocation(
            &revocation,
            &serials,
            &[NODE_A.into(), NODE_B.into()],
            &[doomed.id.clone(), "already-gone".into()],
        )
        .await
        .unwrap();
    assert_eq!(
        deleted,
        vec![doomed.clone()],
        "deleted in the same transaction"
    );
    assert!(store.get_entry(&doomed.id).await.is_err());
    assert_eq!(store.get_revocation("rv-1").await.unwrap(), revocation);
    assert_eq!(store.deny_list(400).await.unwrap(), serials.to_vec());
    assert!(
        store.deny_list(500).await.unwrap().is_empty(),
        "expired lines are not sent"
    );
    assert_eq!(
        store.pending_revocations(NODE_A).await.unwrap(),
        vec![revocation.clone()]
    );

    // A's acknowledgement, as the audit writer applies it.
    let ack = AckUpdate {
        revocation_id: "rv-1".into(),
        agent_id: NODE_A.into(),
        at_ms: 1200,
        detail: "{\"files_removed\":[]}".into(),
    };
    store
        .append_audit(
            &[audit_fields("revoke.ack", "rv-1", 1200)],
            &[],
            std::slice::from_ref(&ack),
            None,
            crate::audit::record_hash,
        )
        .await
        .unwrap();
    // A second acknowledgement does not move the first.
    let later = AckUpdate {
        at_ms: 9999,
        ..ack.clone()
    };
    store
        .append_audit(&[], &[], &[later], None, crate::audit::record_hash)
        .await
        .unwrap();
    let acks = store.revocation_acks("rv-1").await.unwrap();
    assert_eq!(acks.len(), 2);
    assert_eq!(
        (acks[0].agent_id.as_str(), acks[0].acked_at),
        (NODE_A, Some(1200))
    );
    assert_eq!(
        (acks[1].agent_id.as_str(), acks[1].acked_at),
        (NODE_B, None)
    );
    assert!(store.pending_revocations(NODE_A).await.unwrap().is_empty());
    assert_eq!(store.pending_revocations(NODE_B).await.unwrap().len(), 1);
    assert!(
        store
            .revocation_ack("rv-1", "spiffe://example.org/node/z")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(store.list_revocations(10).await.unwrap(), vec![revocation]);
    assert_eq!(
        store.revocation_serials("rv-1").await.unwrap(),
        serials.to_vec()
    );
    assert_eq!(store.prune_revoked_serials(501).await.unwrap(), 1);
    store.close().await;
}

/// A reconnecting agent is sent the revoked serials of what was signed for it, wherever
/// the register keeps them; never another agent's.
async fn deny_list_is_split_by_agent(db: TestDb) {
    let store = db.connect().await;
    let hash = crate::audit::record_hash;
    let signed = |serial: &str, agent: &str, entry: &str| IssuedSvidRecord {
        serial: serial.into(),
        entry_id: entry.into(),
        agent_id: agent.into(),
        not_after: 500,
        ..issued_web()
    };
    let sign = |issued: Vec<IssuedSvidRecord>| {
        let store = &store;
        async move {
            let record = [audit_fields("svid.sign", "spiffe://example.org/web", 100)];
            store
                .append_audit(&record, &issued, &[], None, hash)
                .await
                .unwrap();
        }
    };
    // A workload's and the agent's own SVID for A, one workload's for B: moved into the
    // indexed table. Then one more each, left among the recent serials.
    sign(vec![
        signed("0a01", NODE_A, "e1"),
        signed("0a02", NODE_A, ""),
        signed("0b01", NODE_B, "e2"),
    ])
    .await;
    store.index_recent().await.unwrap();
    sign(vec![
        signed("0a03", NODE_A, "e1"),
        signed("0b02", NODE_B, "e2"),
    ])
    .await;

    let revocation = RevocationRecord {
        id: "rv-split".into(),
        kind: "selector".into(),
        target: "unix:uid:5".into(),
        reason: "test".into(),
        actor: "uid:0".into(),
        created_at: 1000,
        detail: "{}".into(),
    };
    let line = |serial: &str, not_after: i64| RevokedSerialRecord {
        serial: serial.into(),
        not_after,
    };
    // "0a00" has expired by 400. "0c01" has no record of whom it was signed for, which
    // the daemon never writes (the register is pruned with the deny list): nobody gets it.
    let serials = [
        line("0a00", 300),
        line("0a01", 500),
        line("0a02", 500),
        line("0a03", 500),
        line("0b01", 500),
        line("0b02", 500),
        line("0c01", 500),
    ];
    store
        .create_revocation(&revocation, &serials, &[NODE_A.into(), NODE_B.into()], &[])
        .await
        .unwrap();
    let serials_of =
        |lines: Vec<RevokedSerialRecord>| lines.into_iter().map(|l| l.serial).collect::<Vec<_>>();
    assert_eq!(
        serials_of(store.deny_list_for(NODE_A, 400).await.unwrap()),
        strings(&["0a01", "0a02", "0a03"])
    );
    assert_eq!(
        serials_of(store.deny_list_for(NODE_B, 400).await.unwrap()),
        strings(&["0b01", "0b02"])
    );
    assert_eq!(
        serials_of(
            store
                .deny_list_for("spiffe://example.org/node/c", 400)
                .await
                .unwrap()
        ),
        Vec::<String>::new()
    );
    // After the next move, the same parts; the whole list is still everyone's.
    store.index_recent().await.unwrap();
    assert_eq!(
        serials_of(store.deny_list_for(NODE_B, 400).await.unwrap()),
        strings(&["0b01", "0b02"])
    );
    assert_eq!(store.deny_list(400).await.unwrap(), serials[1..].to_vec());
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_writers_own_connection_writes_what_the_pool_would() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let hash = crate::audit::record_hash;
    let records = [
        audit_fields("svid.sign", "spiffe://example.org/web", 100),
        audit_fields("entry.create", "spiffe://example.org/api", 200),
    ];
    let issued = issued_web();

    // The same records through the pool on one file and through the appender on another.
    let (pool_dir, own_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let pooled = Store::connect(None, pool_dir.path()).await.unwrap();
    pooled
        .append_audit(&records, std::slice::from_ref(&issued), &[], None, hash)
        .await
        .unwrap();
    let store = Store::connect(None, own_dir.path()).await.unwrap();
    let mut appender = store.audit_appender().unwrap().expect("a SQLite file");
    let tail = appender
        .append(&records, std::slice::from_ref(&issued), &[], None, hash)
        .unwrap();
    let all = AuditFilter::default();
    let rows = store.list_audit(&all).await.unwrap();
    assert_eq!(rows, pooled.list_audit(&all).await.unwrap());
    assert_eq!(tail, store.audit_tail().await.unwrap());
    assert_eq!(appender.tail().unwrap(), tail);
    assert_eq!(
        store.issued_svid("0abc").await.unwrap(),
        Some(issued.clone())
    );

    // A tail that is not the chain's end fails whole and changes nothing; read afresh under
    // the lock, it appends.
    let more = [audit_fields("svid.sign", "spiffe://example.org/web", 300)];
    let other = IssuedSvidRecord {
        serial: "0abd".into(),
        ..issued.clone()
    };
    let stale = (1, rows[0].hash.clone());
    let err = appender
        .append(&more, std::slice::from_ref(&other), &[], Some(&stale), hash)
        .expect_err("seq 2 is taken");
    assert!(matches!(err, StoreError::Sqlite(_)), "{err:?}");
    assert_eq!(store.list_audit(&all).await.unwrap().len(), 2);
    assert_eq!(store.issued_svid("0abd").await.unwrap(), None);
    // Interleaved with the pool's appends, as with a second daemon on the file.
    store
        .append_audit(&more, &[], &[], None, hash)
        .await
        .unwrap();
    appender
        .append(&more, std::slice::from_ref(&other), &[], None, hash)
        .unwrap();
    let rows = store.list_audit(&all).await.unwrap();
    assert_eq!(rows.len(), 4);
    let verdict = crate::audit::verify_rows(&rows, None);
    assert_eq!(verdict.first_bad, None, "one chain: {verdict:?}");

    // Its move into the indexes is the pool's: readers find the same before and after.
    let web = AuditFilter {
        subject: Some("spiffe://example.org/web".into()),
        ..AuditFilter::default()
    };
    let seqs = |rows: Vec<AuditRow>| rows.into_iter().map(|r| r.seq).collect::<Vec<_>>();
    assert_eq!(seqs(store.list_audit(&web).await.unwrap()), vec![1, 3, 4]);
    assert_eq!(appender.index_recent().unwrap(), (2, 4));
    assert_eq!(appender.index_recent().unwrap(), (0, 0));
    assert_eq!(seqs(store.list_audit(&web).await.unwrap()), vec![1, 3, 4]);
    assert_eq!(
        store
            .live_serials_for_entries(&["e1".into()], 150)
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(store.index_recent().await.unwrap(), (0, 0));
    // Its errors are the store's, and say what failed.
    let shown = format!("{err}");
    assert!(shown.starts_with("datastore error: "), "{shown}");
    store.close().await;
    pooled.close().await;
}

#[tokio::test]
async fn a_store_that_is_not_a_sqlite_file_has_no_appender_of_its_own() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let memory = Store::connect(Some("sqlite::memory:"), dir.path())
        .await
        .unwrap();
    assert!(memory.audit_appender().unwrap().is_none());
    memory.close().await;
    on_postgres(|db| async move {
        let store = db.connect().await;
        assert!(store.audit_appender().unwrap().is_none());
        store.close().await;
    })
    .await;
}

#[tokio::test]
async fn connect_errors_hide_passwords() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().expect("temp dir");
    // Port 1 refuses connections, so this fails without touching a real server.
    let err = Store::connect(
        Some("postgres://postgres:hunter2@127.0.0.1:1/db?sslpassword=swordfish"),
        dir.path(),
    )
    .await
    .expect_err("nothing listens on port 1");
    let shown = format!("{err} / {err:?}");
    assert!(matches!(err, StoreError::Connect { .. }), "got {shown}");
    assert!(!shown.contains("hunter2"), "password leaked: {shown}");
    assert!(!shown.contains("swordfish"), "password leaked: {shown}");
    assert!(shown.contains("127.0.0.1:1"), "names the target: {shown}");

    let err = Store::connect(Some("mysql://root:pw@localhost/db"), dir.path())
        .await
        .expect_err("unsupported");
    assert!(
        matches!(&err, StoreError::UnsupportedUrl { scheme } if scheme == "mysql"),
        "got {err:?}"
    );
}

#[test]
fn redact_url_keeps_the_target_and_drops_secrets() {
    assert_eq!(
        redact_url("postgres://app:s3cr%40t@db.internal:5432/mayfly?sslmode=require"),
        "postgres://app:***@db.internal:5432/mayfly?…"
    );
    assert_eq!(
        redact_url("postgresql://app@db/mayfly"),
        "postgresql://app@db/mayfly"
    );
    assert_eq!(redact_url("postgres://db"), "postgres://db");
}

#[test]
fn sqlite_paths_survive_the_url() {
    assert_eq!(
        percent_encode_path("/var/lib/my dir/100%#?/mayfly.db"),
        "/var/lib/my%20dir/100%25%23%3F/mayfly.db"
    );
}

async fn writes_that_read_first_wait_for_other_writers(db: TestDb) {
    // A rotation promoting a version (read its stage, then write) while the audit writer
    // commits: on SQLite a transaction that read before another connection committed
    // cannot write any more ("database is locked" at once, whatever the busy timeout), so
    // every writing transaction must take the write lock first.
    let store = db.connect().await;
    store
        .upsert_secret(&secret_record("busy", None))
        .await
        .unwrap();
    let rotations = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..150 {
                let version = format!("v{i:03}");
                let record = LocalVersionRecord {
                    version_id: version.clone(),
                    stage: "pending".into(),
                    sealed: vec![7; 32],
                    created_at: i,
                };
                store.insert_local_version("busy", &record).await.unwrap();
                store
                    .promote_local_version("busy", &version)
                    .await
                    .unwrap_or_else(|e| panic!("promoting {version}: {e}"));
            }
        })
    };
    let hash = crate::audit::record_hash;
    let mut writers = Vec::new();
    for n in 0..3 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..100 {
                let record = [audit_fields("secret.rotate", &format!("a{n}-{i}"), i)];
                store
                    .append_audit(&record, &[], &[], None, hash)
                    .await
                    .unwrap_or_else(|e| panic!("appending a{n}-{i}: {e}"));
            }
        }));
    }
    rotations.await.unwrap();
    for writer in writers {
        writer.await.unwrap();
    }
    let versions = store.local_versions("busy").await.unwrap();
    let current: Vec<_> = versions.iter().filter(|v| v.stage == "current").collect();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0].version_id, "v149");
}

async fn elevation_lifecycle(db: TestDb) {
    let store = db.connect().await;
    let requester = "spiffe://example.org/ai/bot";
    let record = ElevationRecord {
        id: "el-1".into(),
        requester: requester.into(),
        requester_kind: "ai_agent".into(),
        scope_kind: "credential".into(),
        scope_name: "orders-db".into(),
        reason: "triage".into(),
        requested_ttl: 600,
        state: Some(ElevationState::Pending),
        created_at: 100,
        pending_until: 3700,
        policy_set: "abc".into(),
        ..Default::default()
    };
    store.insert_elevation(&record).await.expect("insert");
    assert_eq!(store.get_elevation("el-1").await.expect("get"), record);
    assert!(
        store
            .active_elevation(requester, "credential", "orders-db", 150)
            .await
            .expect("active")
            .is_none(),
        "pending is not active"
    );

    // One verdict per reviewer.
    let review = ElevationReview {
        elevation_id: "el-1".into(),
        reviewer_uid: 1102,
        reviewer_name: "bob".into(),
        verdict: "approve".into(),
        comment: String::new(),
        at: 120,
        policy_set: "abc".into(),
    };
    store
        .insert_elevation_review(&review)
        .await
        .expect("review");
    let again = store.insert_elevation_review(&review).await;
    assert!(
        matches!(again, Err(StoreError::Conflict { .. })),
        "{again:?}"
    );
    assert_eq!(
        store
            .elevation_reviews("el-1")
            .await
            .expect("reviews")
            .len(),
        1
    );

    // Activation and ending are conditional on the state they leave: once each.
    assert!(
        store
            .activate_elevation("el-1", 130, 730)
            .await
            .expect("activate")
    );
    assert!(
        !store
            .activate_elevation("el-1", 131, 731)
            .await
            .expect("again")
    );
    let active = store
        .active_elevation(requester, "credential", "orders-db", 150)
        .await
        .expect("active")
        .expect("found");
    assert_eq!(
        (active.activated_at, active.ends_at),
        (Some(130), Some(730))
    );
    assert!(store.elevations_due(729, 10).await.expect("due").is_empty());
    assert_eq!(store.elevations_due(730, 10).await.expect("due").len(), 1);
    let finish = |from, to| store.finish_elevation("el-1", from, to, 200, "uid:1101", "done");
    assert!(
        !finish(ElevationState::Pending, ElevationState::Cancelled)
            .await
            .expect("wrong state")
    );
    assert!(
        finish(ElevationState::Active, ElevationState::Ended)
            .await
            .expect("end")
    );
    assert!(
        !finish(ElevationState::Active, ElevationState::Ended)
            .await
            .expect("twice")
    );

    // Ended without its leases taken back: found once the grace has passed, until recorded.
    assert!(
        store
            .elevations_untaken(200, 10)
            .await
            .expect("untaken")
            .is_empty()
    );
    assert_eq!(
        store
            .elevations_untaken(231, 10)
            .await
            .expect("untaken")
            .len(),
        1
    );
    store
        .set_elevation_revocation("el-1", "rv-1")
        .await
        .expect("revocation");
    assert!(
        store
            .elevations_untaken(231, 10)
            .await
            .expect("untaken")
            .is_empty()
    );
    let listed = store
        .list_elevations(Some(ElevationState::Ended), Some(requester), 10)
        .await
        .expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].end_reason, "done");
}

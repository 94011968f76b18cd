//! Embedded schema migrations, one list per backend, run at connect by sqlx's migrator.
//! The SQL is compiled into the binary with `include_str!`, so a deployed daemon needs no
//! migration files on disk.

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, SqlSafeStr as _};

use super::{Backend, Result, StoreError};

/// One embedded migration: version, description, SQL.
type Embedded = (i64, &'static str, &'static str);

/// Append new versions at the end; never edit a released file (its checksum is recorded).
const SQLITE: &[Embedded] = &[
    (
        1,
        "init",
        include_str!("../../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "secrets",
        include_str!("../../migrations/sqlite/0002_secrets.sql"),
    ),
    (
        3,
        "leases",
        include_str!("../../migrations/sqlite/0003_leases.sql"),
    ),
    (
        4,
        "audit_revocations",
        include_str!("../../migrations/sqlite/0004_audit_revocations.sql"),
    ),
    (
        5,
        "credentials",
        include_str!("../../migrations/sqlite/0005_credentials.sql"),
    ),
    (
        6,
        "entry_sets",
        include_str!("../../migrations/sqlite/0006_entry_sets.sql"),
    ),
    (
        7,
        "elevations",
        include_str!("../../migrations/sqlite/0007_elevations.sql"),
    ),
    (
        8,
        "elevation_grants",
        include_str!("../../migrations/sqlite/0008_elevation_grants.sql"),
    ),
    (
        9,
        "shared_ca_keys",
        include_str!("../../migrations/sqlite/0009_shared_ca_keys.sql"),
    ),
    (
        10,
        "recent_serials",
        include_str!("../../migrations/sqlite/0010_recent_serials.sql"),
    ),
];

const POSTGRES: &[Embedded] = &[
    (
        1,
        "init",
        include_str!("../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "secrets",
        include_str!("../../migrations/postgres/0002_secrets.sql"),
    ),
    (
        3,
        "leases",
        include_str!("../../migrations/postgres/0003_leases.sql"),
    ),
    (
        4,
        "audit_revocations",
        include_str!("../../migrations/postgres/0004_audit_revocations.sql"),
    ),
    (
        5,
        "credentials",
        include_str!("../../migrations/postgres/0005_credentials.sql"),
    ),
    (
        6,
        "entry_sets",
        include_str!("../../migrations/postgres/0006_entry_sets.sql"),
    ),
    (
        7,
        "elevations",
        include_str!("../../migrations/postgres/0007_elevations.sql"),
    ),
    (
        8,
        "elevation_grants",
        include_str!("../../migrations/postgres/0008_elevation_grants.sql"),
    ),
    (
        9,
        "shared_ca_keys",
        include_str!("../../migrations/postgres/0009_shared_ca_keys.sql"),
    ),
    (
        10,
        "recent_serials",
        include_str!("../../migrations/postgres/0010_recent_serials.sql"),
    ),
];

/// Applies every migration the database has not seen yet. Safe to run on every start and
/// from several daemons at once: applied versions are skipped, and on PostgreSQL sqlx
/// holds an advisory lock while migrating.
pub(super) async fn run(pool: &AnyPool, backend: Backend) -> Result<()> {
    let embedded = match backend {
        Backend::Sqlite => SQLITE,
        Backend::Postgres => POSTGRES,
    };
    let migrations = embedded
        .iter()
        .map(|&(version, description, sql)| {
            Migration::new(
                version,
                Cow::Borrowed(description),
                MigrationType::Simple,
                sql.into_sql_str(),
                false,
            )
        })
        .collect();
    Migrator::with_migrations(migrations)
        .run(pool)
        .await
        .map_err(StoreError::Migrate)
}

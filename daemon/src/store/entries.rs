//! Registration entries: which SPIFFE ID a workload gets, under which parent (agent), when
//! it matches which selectors. Selectors and DNS names are stored as JSON text so that one
//! schema serves both backends.

use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Result, Store, StoreError};

const KIND: &str = "registration entry";

/// The columns every entry query reads, in the order [`entry_from_row`] expects.
macro_rules! entry_columns {
    () => {
        "id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl, dns_names, hint, \
         sets, revision, created_at, updated_at, expires_at"
    };
}

/// A stored registration entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryRecord {
    /// A UUID v4 the store assigns.
    pub id: String,
    pub spiffe_id: String,
    pub parent_id: String,
    /// Selectors such as `unix:uid:1000`, sorted and without duplicates.
    pub selectors: Vec<String>,
    /// Seconds.
    pub x509_svid_ttl: i64,
    /// Seconds.
    pub jwt_svid_ttl: i64,
    pub dns_names: Vec<String>,
    pub hint: String,
    /// The policy sets (`Mayfly::EntrySet`) it is in, sorted and without duplicates.
    pub sets: Vec<String>,
    /// Starts at 1 and grows by one on every update, so agents can tell stale copies.
    pub revision: i64,
    pub created_at: i64,
    pub updated_at: i64,
    /// Unix seconds after which it signs nothing and no SVID of it lasts; 0 for never.
    pub expires_at: i64,
}

/// What a caller supplies to create an entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewEntry {
    pub spiffe_id: String,
    pub parent_id: String,
    pub selectors: Vec<String>,
    pub x509_svid_ttl: i64,
    pub jwt_svid_ttl: i64,
    pub dns_names: Vec<String>,
    pub hint: String,
    pub sets: Vec<String>,
    /// Unix seconds; 0 for never.
    pub expires_at: i64,
}

/// A partial update: `None` leaves a field as it is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EntryUpdate {
    pub spiffe_id: Option<String>,
    pub parent_id: Option<String>,
    pub selectors: Option<Vec<String>>,
    pub x509_svid_ttl: Option<i64>,
    pub jwt_svid_ttl: Option<i64>,
    pub dns_names: Option<Vec<String>>,
    pub hint: Option<String>,
    pub sets: Option<Vec<String>>,
}

/// Narrows [`Store::list_entries`]; `None` matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EntryFilter {
    pub parent_id: Option<String>,
    pub spiffe_id: Option<String>,
}

impl Store {
    /// Creates an entry with a fresh id at revision 1. Fails with `Conflict` if an entry
    /// with the same SPIFFE ID, parent and selector set exists.
    pub async fn create_entry(&self, new: &NewEntry, now: i64) -> Result<EntryRecord> {
        self.create_entries([new], now)
            .await?
            .pop()
            .expect("the store answers each entry it is given")
    }

    /// Creates several entries in one transaction, each with a fresh id at revision 1, and
    /// answers for each in order. One that duplicates an existing entry, or one earlier in
    /// `new`, fails with `Conflict`; the others are created all the same.
    pub async fn create_entries<'a>(
        &self,
        new: impl IntoIterator<Item = &'a NewEntry>,
        now: i64,
    ) -> Result<Vec<Result<EntryRecord>>> {
        let mut tx = self.begin_write().await?;
        let mut created = Vec::new();
        for new in new {
            let row = sqlx::query(concat!(
                "INSERT INTO registration_entries (",
                entry_columns!(),
                ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 1, $10, $11, $12) \
                 ON CONFLICT DO NOTHING RETURNING ",
                entry_columns!()
            ))
            .bind(uuid::Uuid::new_v4().to_string())
            .bind(&new.spiffe_id)
            .bind(&new.parent_id)
            .bind(selectors_json(&new.selectors))
            .bind(new.x509_svid_ttl)
            .bind(new.jwt_svid_ttl)
            .bind(strings_json(&new.dns_names))
            .bind(&new.hint)
            .bind(strings_json(&new.sets))
            .bind(now)
            .bind(now)
            .bind(new.expires_at)
            .fetch_optional(&mut *tx)
            .await?;
            created.push(match row {
                Some(row) => entry_from_row(&row),
                None => Err(StoreError::Conflict {
                    kind: KIND,
                    detail: duplicate(&new.spiffe_id, &new.parent_id),
                }),
            });
        }
        tx.commit().await?;
        Ok(created)
    }

    /// The entry with this id.
    pub async fn get_entry(&self, id: &str) -> Result<EntryRecord> {
        let row = sqlx::query(concat!(
            "SELECT ",
            entry_columns!(),
            " FROM registration_entries WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => entry_from_row(&row),
            None => Err(not_found(id)),
        }
    }

    /// Entries matching `filter`, ordered by SPIFFE ID, then id.
    pub async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<EntryRecord>> {
        // One static statement per filter shape keeps every query plannable with an index
        // and avoids `$1 IS NULL OR ...`, whose parameter type PostgreSQL must guess.
        let query = match (&filter.parent_id, &filter.spiffe_id) {
            (None, None) => sqlx::query(concat!(
                "SELECT ",
                entry_columns!(),
                " FROM registration_entries ORDER BY spiffe_id, id"
            )),
            (Some(parent_id), None) => sqlx::query(concat!(
                "SELECT ",
                entry_columns!(),
                " FROM registration_entries WHERE parent_id = $1 ORDER BY spiffe_id, id"
            ))
            .bind(parent_id),
            (None, Some(spiffe_id)) => sqlx::query(concat!(
                "SELECT ",
                entry_columns!(),
                " FROM registration_entries WHERE spiffe_id = $1 ORDER BY spiffe_id, id"
            ))
            .bind(spiffe_id),
            (Some(parent_id), Some(spiffe_id)) => sqlx::query(concat!(
                "SELECT ",
                entry_columns!(),
                " FROM registration_entries WHERE parent_id = $1 AND spiffe_id = $2 \
                 ORDER BY spiffe_id, id"
            ))
            .bind(parent_id)
            .bind(spiffe_id),
        };
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(entry_from_row).collect()
    }

    /// Entries whose parent is this agent: what the sync stream sends it.
    pub async fn entries_for_parent(&self, parent_id: &str) -> Result<Vec<EntryRecord>> {
        self.list_entries(&EntryFilter {
            parent_id: Some(parent_id.to_owned()),
            spiffe_id: None,
        })
        .await
    }

    /// Applies the fields `update` sets, bumps the revision and sets `updated_at = now`,
    /// all in one statement so concurrent updates each get their own revision.
    pub async fn update_entry(
        &self,
        id: &str,
        update: &EntryUpdate,
        now: i64,
    ) -> Result<EntryRecord> {
        let row = sqlx::query(concat!(
            "UPDATE registration_entries SET ",
            "spiffe_id = COALESCE($1, spiffe_id), ",
            "parent_id = COALESCE($2, parent_id), ",
            "selectors = COALESCE($3, selectors), ",
            "x509_svid_ttl = COALESCE($4, x509_svid_ttl), ",
            "jwt_svid_ttl = COALESCE($5, jwt_svid_ttl), ",
            "dns_names = COALESCE($6, dns_names), ",
            "hint = COALESCE($7, hint), ",
            "sets = COALESCE($8, sets), ",
            "revision = revision + 1, ",
            "updated_at = $9 ",
            "WHERE id = $10 RETURNING ",
            entry_columns!()
        ))
        .bind(update.spiffe_id.as_deref())
        .bind(update.parent_id.as_deref())
        .bind(update.selectors.as_deref().map(selectors_json))
        .bind(update.x509_svid_ttl)
        .bind(update.jwt_svid_ttl)
        .bind(update.dns_names.as_deref().map(strings_json))
        .bind(update.hint.as_deref())
        .bind(update.sets.as_deref().map(strings_json))
        .bind(now)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| {
            StoreError::conflict_or_database(e, KIND, || {
                "another entry has the same SPIFFE ID, parent and selectors".to_owned()
            })
        })?;
        match row {
            Some(row) => entry_from_row(&row),
            None => Err(not_found(id)),
        }
    }

    /// Deletes the entry and returns what it was, so the caller can tell agents what to drop.
    pub async fn delete_entry(&self, id: &str) -> Result<EntryRecord> {
        let mut conn = self.pool.acquire().await?;
        delete_entry_in(&mut conn, id)
            .await?
            .ok_or_else(|| not_found(id))
    }
}

/// Deletes the entries with these ids (at most a few hundred) on `conn` in one statement,
/// returning those that existed.
pub(super) async fn delete_entries_in(
    conn: &mut sqlx::AnyConnection,
    ids: &[String],
) -> Result<Vec<EntryRecord>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "DELETE FROM registration_entries WHERE id IN ({}) RETURNING {}",
        super::audit::placeholders(1, ids.len()),
        entry_columns!()
    );
    // Built from fixed text and numbered placeholders only.
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for id in ids {
        query = query.bind(id);
    }
    let rows = query.fetch_all(&mut *conn).await?;
    rows.iter().map(entry_from_row).collect()
}

/// Deletes one entry on `conn` (a transaction's, or a pooled connection); `None` if it
/// did not exist.
pub(super) async fn delete_entry_in(
    conn: &mut sqlx::AnyConnection,
    id: &str,
) -> Result<Option<EntryRecord>> {
    let row = sqlx::query(concat!(
        "DELETE FROM registration_entries WHERE id = $1 RETURNING ",
        entry_columns!()
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(entry_from_row).transpose()
}

fn not_found(id: &str) -> StoreError {
    StoreError::NotFound {
        kind: KIND,
        id: id.to_owned(),
    }
}

fn duplicate(spiffe_id: &str, parent_id: &str) -> String {
    format!("an entry for {spiffe_id} under {parent_id} with the same selectors")
}

/// Canonical JSON for a selector set: sorted and deduplicated, so that `[b, a]` and
/// `[a, b, a]` hit the same unique constraint.
fn selectors_json(selectors: &[String]) -> String {
    let mut sorted: Vec<&str> = selectors.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    strings_json(&sorted)
}

fn strings_json<S: AsRef<str>>(values: &[S]) -> String {
    let values: Vec<&str> = values.iter().map(AsRef::as_ref).collect();
    // Serializing a list of strings cannot fail: serde_json only errors on maps with
    // non-string keys or on a failing writer, and this writes to a String.
    serde_json::to_string(&values).expect("a list of strings always serializes")
}

fn strings_from_json(what: &'static str, text: &str) -> Result<Vec<String>> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        what,
        detail: e.to_string(),
    })
}

fn entry_from_row(row: &AnyRow) -> Result<EntryRecord> {
    Ok(EntryRecord {
        id: row.try_get("id")?,
        spiffe_id: row.try_get("spiffe_id")?,
        parent_id: row.try_get("parent_id")?,
        selectors: strings_from_json("entry selector list", row.try_get("selectors")?)?,
        x509_svid_ttl: row.try_get("x509_svid_ttl")?,
        jwt_svid_ttl: row.try_get("jwt_svid_ttl")?,
        dns_names: strings_from_json("entry DNS name list", row.try_get("dns_names")?)?,
        hint: row.try_get("hint")?,
        sets: strings_from_json("entry policy set list", row.try_get("sets")?)?,
        revision: row.try_get("revision")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        expires_at: row.try_get("expires_at")?,
    })
}

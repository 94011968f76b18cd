//! CA slots: the signing CA certificates and JWT keys, each prepared early, then active
//! (signing), then retired (still in the bundle until its SVIDs expire). The private keys
//! are not here; they live in `data_dir` or upstream.

use std::fmt;
use std::str::FromStr;

use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Result, Store, StoreError};

const KIND: &str = "CA slot";

/// The columns every slot query reads.
macro_rules! slot_columns {
    () => {
        "id, state, cert_der, jwt_kid, jwt_public_spki, not_before, not_after, created_at, \
         activated_at, x509_key_sealed, jwt_key_sealed"
    };
}

/// Where a CA slot is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CaSlotState {
    /// Published in the bundle, not yet signing.
    Prepared,
    /// The one slot that signs new SVIDs.
    Active,
    /// No longer signs; kept while SVIDs it signed may still be in use.
    Retired,
}

impl CaSlotState {
    /// The text stored in the database and shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            CaSlotState::Prepared => "prepared",
            CaSlotState::Active => "active",
            CaSlotState::Retired => "retired",
        }
    }
}

impl fmt::Display for CaSlotState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CaSlotState {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "prepared" => Ok(CaSlotState::Prepared),
            "active" => Ok(CaSlotState::Active),
            "retired" => Ok(CaSlotState::Retired),
            other => Err(StoreError::Corrupt {
                what: "CA slot state",
                detail: format!("{other:?} is not prepared, active or retired"),
            }),
        }
    }
}

/// A stored CA slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaSlotRecord {
    pub id: String,
    pub state: CaSlotState,
    /// The CA certificate, DER.
    pub cert_der: Vec<u8>,
    /// Key id of the JWT signing key published in the bundle.
    pub jwt_kid: String,
    /// The JWT signing key's public half, DER SubjectPublicKeyInfo.
    pub jwt_public_spki: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
    pub created_at: i64,
    pub activated_at: Option<i64>,
    /// The private keys, sealed with the daemons' shared sealing key; `None` for a slot
    /// made before they were kept here, until a daemon holding its key files seals them in.
    pub x509_key_sealed: Option<Vec<u8>>,
    pub jwt_key_sealed: Option<Vec<u8>>,
}

impl Store {
    /// Stores a new slot as given (normally `Prepared`). A duplicate id or JWT key id is a
    /// `Conflict`, as is a second `Active` slot.
    pub async fn insert_ca_slot(&self, slot: &CaSlotRecord) -> Result<()> {
        sqlx::query(concat!(
            "INSERT INTO ca_slots (",
            slot_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ))
        .bind(&slot.id)
        .bind(slot.state.as_str())
        .bind(&slot.cert_der)
        .bind(&slot.jwt_kid)
        .bind(&slot.jwt_public_spki)
        .bind(slot.not_before)
        .bind(slot.not_after)
        .bind(slot.created_at)
        .bind(slot.activated_at)
        .bind(slot.x509_key_sealed.clone())
        .bind(slot.jwt_key_sealed.clone())
        .execute(&self.pool)
        .await
        .map_err(|e| {
            StoreError::conflict_or_database(e, KIND, || {
                format!(
                    "slot {:?} (JWT key id {:?}) collides with a stored slot's id, key id, \
                     or the active slot",
                    slot.id, slot.jwt_kid
                )
            })
        })?;
        Ok(())
    }

    /// Every slot, oldest first.
    pub async fn list_ca_slots(&self) -> Result<Vec<CaSlotRecord>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            slot_columns!(),
            " FROM ca_slots ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(slot_from_row).collect()
    }

    /// Makes the prepared slot `id` the active one and retires the one it replaces, in one
    /// transaction: readers see either the old CA or the new one active, never both or none.
    pub async fn activate_ca_slot(&self, id: &str, now: i64) -> Result<CaSlotRecord> {
        let mut tx = self.begin_write().await?;
        // Write first: a SQLite transaction that reads before writing can fail to upgrade
        // its lock under contention, and the busy timeout does not cover that case.
        sqlx::query("UPDATE ca_slots SET state = 'retired' WHERE state = 'active' AND id <> $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let activated = sqlx::query(concat!(
            "UPDATE ca_slots SET state = 'active', activated_at = $1 ",
            "WHERE id = $2 AND state = 'prepared' RETURNING ",
            slot_columns!()
        ))
        .bind(now)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| {
            // Two daemons activating different slots at once: the one-active index stops
            // the second.
            StoreError::conflict_or_database(e, KIND, || {
                "another slot was activated concurrently".to_owned()
            })
        })?;
        let Some(row) = activated else {
            // Dropping `tx` rolls back the retirement above.
            let current = sqlx::query("SELECT state FROM ca_slots WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            return Err(match current {
                Some(row) => StoreError::CaSlotNotPrepared {
                    id: id.to_owned(),
                    state: row.try_get("state")?,
                },
                None => not_found(id),
            });
        };
        let slot = slot_from_row(&row)?;
        tx.commit().await?;
        Ok(slot)
    }

    /// Retires the slot (active or prepared) and returns it.
    /// Seals in the keys of a slot made before they were kept in the datastore.
    pub async fn set_ca_slot_keys(&self, id: &str, x509: &[u8], jwt: &[u8]) -> Result<()> {
        sqlx::query(
            "UPDATE ca_slots SET x509_key_sealed = $1, jwt_key_sealed = $2 \
             WHERE id = $3 AND x509_key_sealed IS NULL",
        )
        .bind(x509.to_vec())
        .bind(jwt.to_vec())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The sealing check value, storing `candidate` first if there is none yet (the first
    /// daemon on the datastore). Returns what is stored.
    pub async fn sealing_check(&self, candidate: &[u8], now: i64) -> Result<Vec<u8>> {
        sqlx::query(
            "INSERT INTO sealing_check (id, sealed, created_at) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(candidate.to_vec())
        .bind(now)
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT sealed FROM sealing_check WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("sealed")?)
    }

    pub async fn retire_ca_slot(&self, id: &str) -> Result<CaSlotRecord> {
        let row = sqlx::query(concat!(
            "UPDATE ca_slots SET state = 'retired' WHERE id = $1 RETURNING ",
            slot_columns!()
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => slot_from_row(&row),
            None => Err(not_found(id)),
        }
    }

    /// Deletes a prepared or retired slot; the active slot cannot be deleted.
    pub async fn delete_ca_slot(&self, id: &str) -> Result<CaSlotRecord> {
        let row = sqlx::query(concat!(
            "DELETE FROM ca_slots WHERE id = $1 AND state <> 'active' RETURNING ",
            slot_columns!()
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = row {
            return slot_from_row(&row);
        }
        let exists = sqlx::query("SELECT id FROM ca_slots WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Err(match exists {
            Some(_) => StoreError::CaSlotActive { id: id.to_owned() },
            None => not_found(id),
        })
    }
}

fn not_found(id: &str) -> StoreError {
    StoreError::NotFound {
        kind: KIND,
        id: id.to_owned(),
    }
}

fn slot_from_row(row: &AnyRow) -> Result<CaSlotRecord> {
    let state: String = row.try_get("state")?;
    Ok(CaSlotRecord {
        id: row.try_get("id")?,
        state: state.parse()?,
        cert_der: row.try_get("cert_der")?,
        jwt_kid: row.try_get("jwt_kid")?,
        jwt_public_spki: row.try_get("jwt_public_spki")?,
        not_before: row.try_get("not_before")?,
        not_after: row.try_get("not_after")?,
        created_at: row.try_get("created_at")?,
        activated_at: row.try_get("activated_at")?,
        x509_key_sealed: row.try_get("x509_key_sealed")?,
        jwt_key_sealed: row.try_get("jwt_key_sealed")?,
    })
}

//! Single-use join tokens, stored only as the SHA-256 hex of the token: the store never
//! sees a token, so a leaked database cannot be replayed to attest a node.

use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Result, Store, StoreError};

const KIND: &str = "join token";

/// A stored join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRecord {
    /// SHA-256 hex of the token.
    pub hash: String,
    /// The SPIFFE ID the agent presenting it will receive.
    pub spiffe_id: String,
    pub expires_at: i64,
    pub created_at: i64,
    /// When the token was consumed; `None` while it is still usable.
    pub used_at: Option<i64>,
}

impl Store {
    /// Records a new token by its hash. A second token with the same hash is a `Conflict`.
    pub async fn create_join_token(
        &self,
        hash: &str,
        spiffe_id: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<JoinTokenRecord> {
        let row = sqlx::query(
            "INSERT INTO join_tokens (hash, spiffe_id, expires_at, created_at, used_at) \
             VALUES ($1, $2, $3, $4, NULL) \
             RETURNING hash, spiffe_id, expires_at, created_at, used_at",
        )
        .bind(hash)
        .bind(spiffe_id)
        .bind(expires_at)
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| {
            StoreError::conflict_or_database(e, KIND, || {
                "a token with the same hash was already issued".to_owned()
            })
        })?;
        token_from_row(&row)
    }

    /// Marks the token used and returns it. Exactly one of any number of concurrent callers
    /// succeeds: the claim is a single conditional UPDATE, which both backends serialise on
    /// the row. An expired token is left unused so the failure changes nothing.
    pub async fn consume_join_token(&self, hash: &str, now: i64) -> Result<JoinTokenRecord> {
        let claimed = sqlx::query(
            "UPDATE join_tokens SET used_at = $1 \
             WHERE hash = $2 AND used_at IS NULL AND expires_at > $3 \
             RETURNING hash, spiffe_id, expires_at, created_at, used_at",
        )
        .bind(now)
        .bind(hash)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = claimed {
            return token_from_row(&row);
        }

        // The claim failed; read the row only to say why. Reading after the UPDATE cannot
        // turn a failure into a success, so the gap between the two statements is harmless.
        let row = sqlx::query(
            "SELECT hash, spiffe_id, expires_at, created_at, used_at \
             FROM join_tokens WHERE hash = $1",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Err(StoreError::TokenUnknown);
        };
        let token = token_from_row(&row)?;
        // Reuse is reported ahead of expiry: a replayed token is the security event.
        match token.used_at {
            Some(used_at) => Err(StoreError::TokenAlreadyUsed { used_at }),
            None => Err(StoreError::TokenExpired {
                expires_at: token.expires_at,
            }),
        }
    }

    /// Reads a token that could still be consumed, without consuming it, so a caller can
    /// check everything else before the token is spent. Errors as `consume_join_token`.
    pub async fn get_join_token(&self, hash: &str, now: i64) -> Result<JoinTokenRecord> {
        let row = sqlx::query(
            "SELECT hash, spiffe_id, expires_at, created_at, used_at \
             FROM join_tokens WHERE hash = $1",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Err(StoreError::TokenUnknown);
        };
        let token = token_from_row(&row)?;
        match token.used_at {
            Some(used_at) => Err(StoreError::TokenAlreadyUsed { used_at }),
            None if token.expires_at <= now => Err(StoreError::TokenExpired {
                expires_at: token.expires_at,
            }),
            None => Ok(token),
        }
    }

    /// Deletes tokens that expired at or before `now`, used or not, and returns how many.
    /// Agents keep their own copy of the hash, so purging loses no history they need.
    pub async fn purge_expired_join_tokens(&self, now: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM join_tokens WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

fn token_from_row(row: &AnyRow) -> Result<JoinTokenRecord> {
    Ok(JoinTokenRecord {
        hash: row.try_get("hash")?,
        spiffe_id: row.try_get("spiffe_id")?,
        expires_at: row.try_get("expires_at")?,
        created_at: row.try_get("created_at")?,
        used_at: row.try_get("used_at")?,
    })
}

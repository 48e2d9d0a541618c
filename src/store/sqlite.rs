//! The embedded SQLite store: the default, so that `herald serve` needs no
//! setup. One broker process owns the file; one connection serialises writes,
//! and every commit is fsynced (synchronous = FULL) because an acknowledged
//! FireEvent must survive a power cut.

use std::{path::Path, str::FromStr, sync::Arc, time::Duration};

use sqlx::{
    QueryBuilder, Row, Sqlite, SqlitePool, Transaction,
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
    },
};

use super::{
    AddressStats, ChangeStream, Claim, ClaimedDelivery, EnqueueItem, EnqueueOptions, EnqueuedIds,
    Settlement, Store, StoreError, SubscribeRequest, Subscription, after, attach_exclusions,
    decode_attributes, encode_attributes, micros_to_system_time, now_micros, system_time_to_micros,
};
use crate::broker::{Event, SharedEvent};

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens the file (creating it on first start) and migrates the schema.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let location = path.display().to_string();
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|source| StoreError::Connect {
                location: location.clone(),
                source,
            })?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Connect { location, source })?;
        sqlx::migrate!("migrations/sqlite").run(&pool).await?;
        Ok(Self { pool })
    }

    async fn has_wildcard(
        tx: &mut Transaction<'_, Sqlite>,
        address: &str,
        contract: &str,
    ) -> Result<bool, StoreError> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM subscriptions WHERE address = ?1 AND contract = ?2 AND operation = ''",
        )
        .bind(address)
        .bind(contract)
        .fetch_optional(&mut **tx)
        .await?;
        Ok(found.is_some())
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn subscribe(&self, request: &SubscribeRequest) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let wildcard = Self::has_wildcard(&mut tx, &request.address, &request.contract).await?;
        if request.operation.is_empty() {
            sqlx::query("DELETE FROM subscription_exclusions WHERE address = ?1 AND contract = ?2")
                .bind(&request.address)
                .bind(&request.contract)
                .execute(&mut *tx)
                .await?;
        } else if wildcard {
            sqlx::query(
                "DELETE FROM subscription_exclusions WHERE address = ?1 AND contract = ?2 AND operation = ?3",
            )
            .bind(&request.address)
            .bind(&request.contract)
            .bind(&request.operation)
            .execute(&mut *tx)
            .await?;
        }
        if request.operation.is_empty() || !wildcard || request.secret.is_some() {
            let operation = if wildcard && !request.operation.is_empty() {
                ""
            } else {
                request.operation.as_str()
            };
            sqlx::query(
                "INSERT INTO subscriptions (address, contract, operation, secret, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (address, contract, operation)
                 DO UPDATE SET secret = COALESCE(excluded.secret, subscriptions.secret)",
            )
            .bind(&request.address)
            .bind(&request.contract)
            .bind(operation)
            .bind(&request.secret)
            .bind(now_micros())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn unsubscribe(
        &self,
        address: &str,
        contract: &str,
        operation: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        if operation.is_empty() {
            sqlx::query("DELETE FROM subscriptions WHERE address = ?1 AND contract = ?2")
                .bind(address)
                .bind(contract)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM subscription_exclusions WHERE address = ?1 AND contract = ?2")
                .bind(address)
                .bind(contract)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query(
                "DELETE FROM subscriptions WHERE address = ?1 AND contract = ?2 AND operation = ?3",
            )
            .bind(address)
            .bind(contract)
            .bind(operation)
            .execute(&mut *tx)
            .await?;
            if Self::has_wildcard(&mut tx, address, contract).await? {
                sqlx::query(
                    "INSERT INTO subscription_exclusions (address, contract, operation) VALUES (?1, ?2, ?3)
                     ON CONFLICT DO NOTHING",
                )
                .bind(address)
                .bind(contract)
                .bind(operation)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn subscriptions(&self) -> Result<Vec<Subscription>, StoreError> {
        let subscriptions: Vec<Subscription> = sqlx::query_as(
            "SELECT id, address, contract, operation, secret, created_at FROM subscriptions
             ORDER BY address, contract, operation",
        )
        .fetch_all(&self.pool)
        .await?;
        let exclusions: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT address, contract, operation FROM subscription_exclusions ORDER BY operation",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(attach_exclusions(subscriptions, exclusions))
    }

    async fn remove_address(&self, address: &str) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let removed = sqlx::query("DELETE FROM subscriptions WHERE address = ?1")
            .bind(address)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM subscription_exclusions WHERE address = ?1")
            .bind(address)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(removed)
    }

    async fn enqueue(
        &self,
        batch: &[EnqueueItem],
        options: &EnqueueOptions,
    ) -> Result<EnqueuedIds, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let lease_until = after(options.now, options.lease);
        let mut ids: EnqueuedIds = Vec::with_capacity(batch.len());
        let mut tx = self.pool.begin().await?;
        for item in batch {
            let event = item.event.event();
            let seq: i64 = sqlx::query_scalar(
                "INSERT INTO events (id, contract, operation, payload, time, attributes, source, fired_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING seq",
            )
            .bind(&event.id)
            .bind(&event.contract)
            .bind(&event.operation)
            .bind(event.payload.as_ref())
            .bind(system_time_to_micros(event.time))
            .bind(encode_attributes(&event.attributes))
            .bind(&event.source)
            .bind(options.now)
            .fetch_one(&mut *tx)
            .await?;
            let (state, attempts, lease, node) = if item.claimed {
                (
                    "inflight",
                    1,
                    Some(lease_until),
                    Some(options.node.as_str()),
                )
            } else {
                ("pending", 0, None, None)
            };
            let mut item_ids = Vec::with_capacity(item.targets.len());
            for target in &item.targets {
                // A subscription removed since the index last loaded gets no
                // delivery, instead of failing the batch.
                let id: Option<i64> = sqlx::query_scalar(
                    "INSERT INTO deliveries (event_seq, subscription_id, address, state, attempts,
                                             next_attempt_at, lease_until, claimed_by, created_at)
                     SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?6
                     WHERE EXISTS (SELECT 1 FROM subscriptions WHERE id = ?2)
                     RETURNING id",
                )
                .bind(seq)
                .bind(target.subscription_id)
                .bind(&target.address)
                .bind(state)
                .bind(attempts)
                .bind(options.now)
                .bind(lease)
                .bind(node)
                .fetch_optional(&mut *tx)
                .await?;
                item_ids.push(id);
            }
            ids.push(item_ids);
        }
        tx.commit().await?;
        Ok(ids)
    }

    async fn claim(&self, claim: &Claim) -> Result<Vec<ClaimedDelivery>, StoreError> {
        let lease_until = after(claim.now, claim.lease);
        let mut query = QueryBuilder::<Sqlite>::new(
            "UPDATE deliveries SET state = 'inflight', attempts = attempts + 1, lease_until = ",
        );
        query
            .push_bind(lease_until)
            .push(", claimed_by = ")
            .push_bind(&claim.node)
            .push(
                " WHERE id IN (SELECT id FROM deliveries
                   WHERE ((state = 'pending' AND next_attempt_at <= ",
            )
            .push_bind(claim.now)
            .push(") OR (state = 'inflight' AND lease_until < ")
            .push_bind(claim.now)
            .push("))");
        if !claim.skip_addresses.is_empty() {
            query.push(" AND address NOT IN (");
            let mut separated = query.separated(", ");
            for address in &claim.skip_addresses {
                separated.push_bind(address);
            }
            separated.push_unseparated(")");
        }
        query
            .push(" ORDER BY next_attempt_at, id LIMIT ")
            .push_bind(i64::try_from(claim.limit).unwrap_or(i64::MAX))
            .push(") RETURNING id");
        let mut tx = self.pool.begin().await?;
        let ids: Vec<i64> = query.build_query_scalar().fetch_all(&mut *tx).await?;
        if ids.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        // One read for the whole batch: the ids travel as a JSON array.
        let ids = serde_json::to_string(&ids).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let rows = sqlx::query(
            "SELECT d.id, d.address, d.attempts, d.created_at, s.secret,
                    e.id AS event_id, e.contract, e.operation, e.payload, e.time, e.attributes, e.source
             FROM deliveries d
             JOIN events e ON e.seq = d.event_seq
             JOIN subscriptions s ON s.id = d.subscription_id
             WHERE d.id IN (SELECT value FROM json_each(?1))
             ORDER BY d.next_attempt_at, d.id",
        )
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.iter().map(claimed_from_row).collect()
    }

    async fn settle(&self, outcomes: &[Settlement]) -> Result<(), StoreError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for outcome in outcomes {
            match outcome {
                Settlement::Delivered { id } => {
                    sqlx::query("DELETE FROM deliveries WHERE id = ?1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                Settlement::Retry { id, at, error } => {
                    sqlx::query(
                        "UPDATE deliveries SET state = 'pending', next_attempt_at = ?2, last_error = ?3,
                             lease_until = NULL, claimed_by = NULL
                         WHERE id = ?1",
                    )
                    .bind(id)
                    .bind(at)
                    .bind(error)
                    .execute(&mut *tx)
                    .await?;
                }
                Settlement::Dead { id, error } => {
                    sqlx::query(
                        "UPDATE deliveries SET state = 'dead', last_error = ?2, lease_until = NULL, claimed_by = NULL
                         WHERE id = ?1",
                    )
                    .bind(id)
                    .bind(error)
                    .execute(&mut *tx)
                    .await?;
                }
                Settlement::Release { id, at } => {
                    sqlx::query(
                        "UPDATE deliveries SET state = 'pending', next_attempt_at = ?2,
                             attempts = MAX(attempts - 1, 0), lease_until = NULL, claimed_by = NULL
                         WHERE id = ?1 AND state = 'inflight'",
                    )
                    .bind(id)
                    .bind(at)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn release_claims(&self, node: &str) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "UPDATE deliveries SET state = 'pending', lease_until = NULL, claimed_by = NULL
             WHERE state = 'inflight' AND claimed_by = ?1",
        )
        .bind(node)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn delivery_stats(&self) -> Result<Vec<AddressStats>, StoreError> {
        let rows = sqlx::query(
            "SELECT address,
                    SUM(state = 'pending') AS pending,
                    SUM(state = 'inflight') AS inflight,
                    SUM(state = 'dead') AS dead,
                    MIN(CASE WHEN state <> 'dead' THEN created_at END) AS oldest_undelivered,
                    (SELECT last_error FROM deliveries e
                     WHERE e.address = d.address AND e.last_error IS NOT NULL
                     ORDER BY e.id DESC LIMIT 1) AS last_error
             FROM deliveries d GROUP BY address ORDER BY address",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(AddressStats {
                    address: row.try_get("address")?,
                    pending: count(row.try_get("pending")?),
                    inflight: count(row.try_get("inflight")?),
                    dead: count(row.try_get("dead")?),
                    oldest_undelivered: row.try_get("oldest_undelivered")?,
                    last_error: row.try_get("last_error")?,
                })
            })
            .collect()
    }

    async fn retry_dead(&self, address: Option<&str>, now: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?1, created_at = ?1
             WHERE state = 'dead' AND (?2 IS NULL OR address = ?2)",
        )
        .bind(now)
        .bind(address)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn purge_delivered_events(&self) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "DELETE FROM events WHERE NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = events.seq)",
        )
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn changes(&self) -> Result<Option<ChangeStream>, StoreError> {
        // One process owns the file: there is nobody else to hear from.
        Ok(None)
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

fn count(value: Option<i64>) -> u64 {
    value.and_then(|v| u64::try_from(v).ok()).unwrap_or(0)
}

fn claimed_from_row(row: &SqliteRow) -> Result<ClaimedDelivery, StoreError> {
    let attempts: i64 = row.try_get("attempts")?;
    let attributes: String = row.try_get("attributes")?;
    let payload: Vec<u8> = row.try_get("payload")?;
    Ok(ClaimedDelivery {
        id: row.try_get("id")?,
        address: row.try_get("address")?,
        secret: row.try_get("secret")?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        created_at: row.try_get("created_at")?,
        event: Arc::new(SharedEvent::new(Event {
            id: row.try_get("event_id")?,
            contract: row.try_get("contract")?,
            operation: row.try_get("operation")?,
            payload: payload.into(),
            time: micros_to_system_time(row.try_get("time")?),
            attributes: decode_attributes(&attributes)?,
            source: row.try_get("source")?,
        })),
    })
}

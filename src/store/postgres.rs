//! The PostgreSQL store: the production backend, shareable by several broker
//! nodes. Dispatchers claim work with `FOR UPDATE SKIP LOCKED`, and nodes
//! learn of subscription changes through `LISTEN/NOTIFY`.

use std::{collections::HashSet, sync::Arc, time::Duration};

use futures::StreamExt;
use sqlx::{
    PgPool, Postgres, Row, Transaction,
    postgres::{PgListener, PgPoolOptions, PgRow},
};

use super::{
    AddressStats, ChangeStream, Claim, ClaimedDelivery, EnqueueItem, EnqueueOptions, EnqueuedIds,
    Settlement, Store, StoreError, SubscribeRequest, Subscription, Target, after,
    attach_exclusions, decode_attributes, encode_attributes, now_micros, redact,
    system_time_to_micros,
};
use crate::broker::{Event, SharedEvent};

/// SQLSTATE of a foreign key violation.
const FOREIGN_KEY_VIOLATION: &str = "23503";

/// The channel nodes notify each other on when subscriptions change.
const CHANGES_CHANNEL: &str = "herald_subscriptions";

/// Connections in the pool: the fire-path writer, the dispatcher's claims and
/// settlements, and admin queries each need one at times.
const POOL_SIZE: u32 = 8;

pub struct PostgresStore {
    pool: PgPool,
    url: String,
}

impl PostgresStore {
    /// Connects and brings the schema up to date (migrations take an advisory
    /// lock, so nodes starting together do not collide).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|source| StoreError::Connect {
                location: redact(url),
                source,
            })?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        Ok(Self {
            pool,
            url: url.to_owned(),
        })
    }

    async fn enqueue_once(
        &self,
        batch: &[EnqueueItem],
        options: &EnqueueOptions,
    ) -> Result<EnqueuedIds, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        // Take the events' and deliveries' ids first, so that rows can refer
        // to each other without relying on the order of RETURNING.
        let seqs = next_ids(&mut tx, "events", "seq", batch.len()).await?;
        let delivery_count: usize = batch.iter().map(|item| item.targets.len()).sum();
        let delivery_ids = next_ids(&mut tx, "deliveries", "id", delivery_count).await?;
        let lease_until = after(options.now, options.lease);
        let mut events = EventColumns::with_capacity(batch.len());
        let mut deliveries = DeliveryColumns::with_capacity(delivery_count);
        let mut ids = delivery_ids.iter();
        let mut planned: EnqueuedIds = Vec::with_capacity(batch.len());
        for (item, seq) in batch.iter().zip(&seqs) {
            events.push(*seq, item.event.event());
            let mut item_ids = Vec::with_capacity(item.targets.len());
            for target in &item.targets {
                let Some(&id) = ids.next() else { break };
                deliveries.push(id, *seq, target, item.claimed.then_some(lease_until));
                item_ids.push(Some(id));
            }
            planned.push(item_ids);
        }
        sqlx::query(
            "INSERT INTO events (seq, id, contract, operation, payload, time, attributes, source, fired_at)
             OVERRIDING SYSTEM VALUE
             SELECT seq, id, contract, operation, payload, time, attributes, source, $9
             FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::int8[], $7::text[], $8::text[])
                 AS t(seq, id, contract, operation, payload, time, attributes, source)",
        )
        .bind(&events.seqs)
        .bind(&events.ids)
        .bind(&events.contracts)
        .bind(&events.operations)
        .bind(&events.payloads)
        .bind(&events.times)
        .bind(&events.attributes)
        .bind(&events.sources)
        .bind(options.now)
        .execute(&mut *tx)
        .await?;
        // A subscription another node removed since this node's index last
        // loaded gets no delivery (the JOIN), instead of failing the batch.
        let inserted: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO deliveries (id, event_seq, subscription_id, address, state, attempts,
                                     next_attempt_at, lease_until, claimed_by, created_at)
             OVERRIDING SYSTEM VALUE
             SELECT t.id, t.event_seq, t.subscription_id, t.address,
                    CASE WHEN t.lease_until IS NULL THEN 'pending' ELSE 'inflight' END,
                    CASE WHEN t.lease_until IS NULL THEN 0 ELSE 1 END,
                    $6, t.lease_until, CASE WHEN t.lease_until IS NULL THEN NULL ELSE $7 END, $6
             FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::text[], $5::int8[])
                 WITH ORDINALITY AS t(id, event_seq, subscription_id, address, lease_until, ord)
             JOIN subscriptions s ON s.id = t.subscription_id
             ORDER BY t.ord
             RETURNING id",
        )
        .bind(&deliveries.ids)
        .bind(&deliveries.events)
        .bind(&deliveries.subscriptions)
        .bind(&deliveries.addresses)
        .bind(&deliveries.leases)
        .bind(options.now)
        .bind(&options.node)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let inserted: HashSet<i64> = inserted.into_iter().collect();
        for item_ids in &mut planned {
            for id in item_ids.iter_mut() {
                if id.is_some_and(|id| !inserted.contains(&id)) {
                    *id = None;
                }
            }
        }
        Ok(planned)
    }

    async fn notify(tx: &mut Transaction<'_, Postgres>) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(CHANGES_CHANNEL)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn subscribe(&self, request: &SubscribeRequest) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let wildcard: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM subscriptions WHERE address = $1 AND contract = $2 AND operation = '')",
        )
        .bind(&request.address)
        .bind(&request.contract)
        .fetch_one(&mut *tx)
        .await?;
        if request.operation.is_empty() {
            sqlx::query("DELETE FROM subscription_exclusions WHERE address = $1 AND contract = $2")
                .bind(&request.address)
                .bind(&request.contract)
                .execute(&mut *tx)
                .await?;
        } else if wildcard {
            sqlx::query(
                "DELETE FROM subscription_exclusions WHERE address = $1 AND contract = $2 AND operation = $3",
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
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (address, contract, operation)
                 DO UPDATE SET secret = COALESCE(EXCLUDED.secret, subscriptions.secret)",
            )
            .bind(&request.address)
            .bind(&request.contract)
            .bind(operation)
            .bind(&request.secret)
            .bind(now_micros())
            .execute(&mut *tx)
            .await?;
        }
        Self::notify(&mut tx).await?;
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
            sqlx::query("DELETE FROM subscriptions WHERE address = $1 AND contract = $2")
                .bind(address)
                .bind(contract)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM subscription_exclusions WHERE address = $1 AND contract = $2")
                .bind(address)
                .bind(contract)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query(
                "DELETE FROM subscriptions WHERE address = $1 AND contract = $2 AND operation = $3",
            )
            .bind(address)
            .bind(contract)
            .bind(operation)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO subscription_exclusions (address, contract, operation)
                 SELECT $1, $2, $3 WHERE EXISTS (
                     SELECT 1 FROM subscriptions WHERE address = $1 AND contract = $2 AND operation = '')
                 ON CONFLICT DO NOTHING",
            )
            .bind(address)
            .bind(contract)
            .bind(operation)
            .execute(&mut *tx)
            .await?;
        }
        Self::notify(&mut tx).await?;
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
        let removed = sqlx::query("DELETE FROM subscriptions WHERE address = $1")
            .bind(address)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM subscription_exclusions WHERE address = $1")
            .bind(address)
            .execute(&mut *tx)
            .await?;
        Self::notify(&mut tx).await?;
        tx.commit().await?;
        Ok(removed)
    }

    async fn enqueue(
        &self,
        batch: &[EnqueueItem],
        options: &EnqueueOptions,
    ) -> Result<EnqueuedIds, StoreError> {
        match self.enqueue_once(batch, options).await {
            // A subscription was deleted between the JOIN and the foreign-key
            // check: the second attempt no longer sees it.
            Err(StoreError::Database(sqlx::Error::Database(error)))
                if error.code().as_deref() == Some(FOREIGN_KEY_VIOLATION) =>
            {
                self.enqueue_once(batch, options).await
            }
            other => other,
        }
    }

    async fn claim(&self, claim: &Claim) -> Result<Vec<ClaimedDelivery>, StoreError> {
        let lease_until = after(claim.now, claim.lease);
        let rows = sqlx::query(
            "WITH due AS (
                 SELECT id FROM deliveries
                 WHERE state = 'pending' AND next_attempt_at <= $1 AND NOT (address = ANY($4::text[]))
                 ORDER BY next_attempt_at, id
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED
             ), expired AS (
                 SELECT id FROM deliveries
                 WHERE state = 'inflight' AND lease_until < $1 AND NOT (address = ANY($4::text[]))
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED
             ), claimed AS (
                 UPDATE deliveries d
                 SET state = 'inflight', attempts = d.attempts + 1, lease_until = $3, claimed_by = $5
                 WHERE d.id = ANY(ARRAY(SELECT id FROM due UNION ALL SELECT id FROM expired LIMIT $2))
                 RETURNING d.id, d.event_seq, d.subscription_id, d.address, d.attempts, d.created_at
             )
             SELECT c.id, c.address, c.attempts, c.created_at, s.secret,
                    e.id AS event_id, e.contract, e.operation, e.payload, e.time, e.attributes, e.source
             FROM claimed c
             JOIN events e ON e.seq = c.event_seq
             JOIN subscriptions s ON s.id = c.subscription_id
             ORDER BY c.id",
        )
        .bind(claim.now)
        .bind(i64::try_from(claim.limit).unwrap_or(i64::MAX))
        .bind(lease_until)
        .bind(&claim.skip_addresses)
        .bind(&claim.node)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(claimed_from_row).collect()
    }

    async fn settle(&self, outcomes: &[Settlement]) -> Result<(), StoreError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let mut delivered = Vec::new();
        let (mut retry_ids, mut retry_at, mut retry_errors) = (Vec::new(), Vec::new(), Vec::new());
        let (mut dead_ids, mut dead_errors) = (Vec::new(), Vec::new());
        let (mut release_ids, mut release_at) = (Vec::new(), Vec::new());
        for outcome in outcomes {
            match outcome {
                Settlement::Delivered { id } => delivered.push(*id),
                Settlement::Retry { id, at, error } => {
                    retry_ids.push(*id);
                    retry_at.push(*at);
                    retry_errors.push(error.as_str());
                }
                Settlement::Dead { id, error } => {
                    dead_ids.push(*id);
                    dead_errors.push(error.as_str());
                }
                Settlement::Release { id, at } => {
                    release_ids.push(*id);
                    release_at.push(*at);
                }
            }
        }
        let mut tx = self.pool.begin().await?;
        if !delivered.is_empty() {
            sqlx::query("DELETE FROM deliveries WHERE id = ANY($1::int8[])")
                .bind(&delivered)
                .execute(&mut *tx)
                .await?;
        }
        if !retry_ids.is_empty() {
            sqlx::query(
                "UPDATE deliveries d SET state = 'pending', next_attempt_at = t.at, last_error = t.error,
                     lease_until = NULL, claimed_by = NULL
                 FROM UNNEST($1::int8[], $2::int8[], $3::text[]) AS t(id, at, error)
                 WHERE d.id = t.id",
            )
            .bind(&retry_ids)
            .bind(&retry_at)
            .bind(&retry_errors)
            .execute(&mut *tx)
            .await?;
        }
        if !dead_ids.is_empty() {
            sqlx::query(
                "UPDATE deliveries d SET state = 'dead', last_error = t.error, lease_until = NULL, claimed_by = NULL
                 FROM UNNEST($1::int8[], $2::text[]) AS t(id, error)
                 WHERE d.id = t.id",
            )
            .bind(&dead_ids)
            .bind(&dead_errors)
            .execute(&mut *tx)
            .await?;
        }
        if !release_ids.is_empty() {
            sqlx::query(
                "UPDATE deliveries d SET state = 'pending', next_attempt_at = t.at,
                     attempts = GREATEST(d.attempts - 1, 0), lease_until = NULL, claimed_by = NULL
                 FROM UNNEST($1::int8[], $2::int8[]) AS t(id, at)
                 WHERE d.id = t.id AND d.state = 'inflight'",
            )
            .bind(&release_ids)
            .bind(&release_at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn release_claims(&self, node: &str) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "UPDATE deliveries SET state = 'pending', lease_until = NULL, claimed_by = NULL
             WHERE state = 'inflight' AND claimed_by = $1",
        )
        .bind(node)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn delivery_stats(&self) -> Result<Vec<AddressStats>, StoreError> {
        let rows = sqlx::query(
            "SELECT address,
                    COUNT(*) FILTER (WHERE state = 'pending') AS pending,
                    COUNT(*) FILTER (WHERE state = 'inflight') AS inflight,
                    COUNT(*) FILTER (WHERE state = 'dead') AS dead,
                    MIN(created_at) FILTER (WHERE state <> 'dead') AS oldest_undelivered,
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
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = $1, created_at = $1
             WHERE state = 'dead' AND ($2::text IS NULL OR address = $2)",
        )
        .bind(now)
        .bind(address)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn purge_delivered_events(&self) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "DELETE FROM events e WHERE NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = e.seq)",
        )
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn changes(&self) -> Result<Option<ChangeStream>, StoreError> {
        let mut listener = PgListener::connect(&self.url).await?;
        listener.listen(CHANGES_CHANNEL).await?;
        // PgListener reconnects by itself; a reconnect may have missed
        // notifications, so every item (including errors) means "reload".
        let stream = listener
            .into_stream()
            .map(|item| item.map(|_| ()).map_err(StoreError::from));
        Ok(Some(stream.boxed()))
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn claimed_from_row(row: &PgRow) -> Result<ClaimedDelivery, StoreError> {
    let attempts: i32 = row.try_get("attempts")?;
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
            time: super::micros_to_system_time(row.try_get("time")?),
            attributes: decode_attributes(&attributes)?,
            source: row.try_get("source")?,
        })),
    })
}

/// The next `count` values of a table's identity column.
async fn next_ids(
    tx: &mut Transaction<'_, Postgres>,
    table: &str,
    column: &str,
    count: usize,
) -> Result<Vec<i64>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT nextval(pg_get_serial_sequence($1, $2)) FROM generate_series(1, $3)",
    )
    .bind(table)
    .bind(column)
    .bind(i64::try_from(count).unwrap_or(i64::MAX))
    .fetch_all(&mut **tx)
    .await?)
}

/// Events as columns, for one UNNEST insert.
struct EventColumns<'a> {
    seqs: Vec<i64>,
    ids: Vec<&'a str>,
    contracts: Vec<&'a str>,
    operations: Vec<&'a str>,
    payloads: Vec<&'a [u8]>,
    times: Vec<i64>,
    attributes: Vec<String>,
    sources: Vec<&'a str>,
}

impl<'a> EventColumns<'a> {
    fn with_capacity(n: usize) -> Self {
        Self {
            seqs: Vec::with_capacity(n),
            ids: Vec::with_capacity(n),
            contracts: Vec::with_capacity(n),
            operations: Vec::with_capacity(n),
            payloads: Vec::with_capacity(n),
            times: Vec::with_capacity(n),
            attributes: Vec::with_capacity(n),
            sources: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, seq: i64, event: &'a Event) {
        self.seqs.push(seq);
        self.ids.push(&event.id);
        self.contracts.push(&event.contract);
        self.operations.push(&event.operation);
        self.payloads.push(&event.payload);
        self.times.push(system_time_to_micros(event.time));
        self.attributes.push(encode_attributes(&event.attributes));
        self.sources.push(&event.source);
    }
}

/// Deliveries as columns, for one UNNEST insert.
struct DeliveryColumns<'a> {
    ids: Vec<i64>,
    events: Vec<i64>,
    subscriptions: Vec<i64>,
    addresses: Vec<&'a str>,
    /// `Some` for deliveries stored as claimed by the enqueuing node.
    leases: Vec<Option<i64>>,
}

impl<'a> DeliveryColumns<'a> {
    fn with_capacity(n: usize) -> Self {
        Self {
            ids: Vec::with_capacity(n),
            events: Vec::with_capacity(n),
            subscriptions: Vec::with_capacity(n),
            addresses: Vec::with_capacity(n),
            leases: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, id: i64, event: i64, target: &'a Target, lease: Option<i64>) {
        self.ids.push(id);
        self.events.push(event);
        self.subscriptions.push(target.subscription_id);
        self.addresses.push(&target.address);
        self.leases.push(lease);
    }
}

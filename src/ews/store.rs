//! The adapter's durable state: subscriptions, watermarks, SyncStates, the
//! item events already published, and each mailbox's status.
//!
//! One sqlx `AnyPool` serves both backends: a SQLite file (the default, beside
//! the config) or PostgreSQL (several adapters may share one). The schema lives
//! in `migrations/ews/` with plain SQL both accept, apart from the broker's
//! own migrations.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::{
    AnyPool, Row,
    any::{AnyPoolOptions, install_default_drivers},
};

use crate::store::redact;

/// Connections to PostgreSQL. SQLite gets one: it has one writer anyway, and
/// a single connection never meets SQLITE_BUSY inside the process.
const POSTGRES_CONNECTIONS: u32 = 8;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state database {url}: {error}")]
    Open { url: String, error: sqlx::Error },
    #[error("cannot migrate the state database {url}: {error}")]
    Migrate {
        url: String,
        error: sqlx::migrate::MigrateError,
    },
    #[error("state database: {0}")]
    Query(#[from] sqlx::Error),
}

/// A stored subscription of one mailbox.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSubscription {
    pub mode: String,
    pub subscription_id: String,
    pub watermark: Option<String>,
    pub cookie: Option<String>,
    pub anchor: Option<String>,
}

/// One published item event, as remembered for de-duplication.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PublishedKey {
    pub mailbox: String,
    pub item_id: String,
    pub change_key: String,
    pub operation: String,
}

/// What a mailbox was doing, as `herald ews status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusRow {
    pub mailbox: String,
    pub state: String,
    pub detail: String,
    pub updated_at_ms: i64,
}

/// A cheap, cloneable handle on the state database.
#[derive(Debug, Clone)]
pub struct StateStore {
    pool: AnyPool,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl StateStore {
    /// Opens (creating a SQLite file if needed) and migrates the database.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let options = AnyPoolOptions::new()
            .max_connections(if sqlite { 1 } else { POSTGRES_CONNECTIONS })
            .acquire_timeout(CONNECT_TIMEOUT);
        let options = if sqlite {
            options.after_connect(|connection, _| {
                Box::pin(async move {
                    // WAL lets `herald ews status` read while the adapter writes;
                    // NORMAL syncs at checkpoints, which WAL keeps crash-safe.
                    sqlx::query("PRAGMA journal_mode = WAL")
                        .execute(&mut *connection)
                        .await?;
                    sqlx::query("PRAGMA synchronous = NORMAL")
                        .execute(&mut *connection)
                        .await?;
                    Ok(())
                })
            })
        } else {
            options
        };
        let pool = options
            .connect(url)
            .await
            .map_err(|error| StoreError::Open {
                url: redact(url),
                error,
            })?;
        let mut migrator = sqlx::migrate!("migrations/ews");
        // The database may be shared with the broker, whose migrations this
        // migrator does not know.
        migrator.set_ignore_missing(true);
        migrator
            .run(&pool)
            .await
            .map_err(|error| StoreError::Migrate {
                url: redact(url),
                error,
            })?;
        Ok(Self { pool })
    }

    /// Opens an existing database without migrating (for `herald ews status`).
    pub async fn open_existing(url: &str) -> Result<Self, StoreError> {
        install_default_drivers();
        let url_ro = url.replace("mode=rwc", "mode=ro");
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect(&url_ro)
            .await
            .map_err(|error| StoreError::Open {
                url: redact(url),
                error,
            })?;
        Ok(Self { pool })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn subscription(
        &self,
        mailbox: &str,
    ) -> Result<Option<StoredSubscription>, StoreError> {
        let row = sqlx::query(
            "SELECT mode, subscription_id, watermark, cookie, anchor FROM ews_subscription WHERE mailbox = $1",
        )
        .bind(mailbox)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|row| StoredSubscription {
            mode: row.get(0),
            subscription_id: row.get(1),
            watermark: row.get(2),
            cookie: row.get(3),
            anchor: row.get(4),
        }))
    }

    pub async fn save_subscription(
        &self,
        mailbox: &str,
        s: &StoredSubscription,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO ews_subscription (mailbox, mode, subscription_id, watermark, cookie, anchor, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (mailbox) DO UPDATE SET mode = excluded.mode, subscription_id = excluded.subscription_id, \
             watermark = excluded.watermark, cookie = excluded.cookie, anchor = excluded.anchor, updated_at = excluded.updated_at",
        )
        .bind(mailbox)
        .bind(&s.mode)
        .bind(&s.subscription_id)
        .bind(&s.watermark)
        .bind(&s.cookie)
        .bind(&s.anchor)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Stores the last watermark processed for a mailbox's subscription.
    pub async fn save_watermark(&self, mailbox: &str, watermark: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE ews_subscription SET watermark = $1, updated_at = $2 WHERE mailbox = $3",
        )
        .bind(watermark)
        .bind(now_ms())
        .bind(mailbox)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forgets the subscription id (after Unsubscribe) but keeps the watermark.
    pub async fn clear_subscription_id(&self, mailbox: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE ews_subscription SET subscription_id = '', cookie = NULL, updated_at = $1 WHERE mailbox = $2")
            .bind(now_ms())
            .bind(mailbox)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn sync_state(
        &self,
        mailbox: &str,
        folder: &str,
    ) -> Result<Option<String>, StoreError> {
        let row =
            sqlx::query("SELECT sync_state FROM ews_sync_state WHERE mailbox = $1 AND folder = $2")
                .bind(mailbox)
                .bind(folder)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|row| row.get(0)))
    }

    pub async fn save_sync_state(
        &self,
        mailbox: &str,
        folder: &str,
        state: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO ews_sync_state (mailbox, folder, sync_state, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (mailbox, folder) DO UPDATE SET sync_state = excluded.sync_state, updated_at = excluded.updated_at",
        )
        .bind(mailbox)
        .bind(folder)
        .bind(state)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// True when exactly this event (item, change key, operation) was published.
    pub async fn was_published(&self, key: &PublishedKey) -> Result<bool, StoreError> {
        let row = sqlx::query(
            "SELECT 1 FROM ews_published WHERE mailbox = $1 AND item_id = $2 AND change_key = $3 AND operation = $4",
        )
        .bind(&key.mailbox)
        .bind(&key.item_id)
        .bind(&key.change_key)
        .bind(&key.operation)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// True when any event about this version (item id and change key) of the
    /// item was published.
    pub async fn version_published(
        &self,
        mailbox: &str,
        item_id: &str,
        change_key: &str,
    ) -> Result<bool, StoreError> {
        let row = sqlx::query(
            "SELECT 1 FROM ews_published WHERE mailbox = $1 AND item_id = $2 AND change_key = $3 LIMIT 1",
        )
        .bind(mailbox)
        .bind(item_id)
        .bind(change_key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// True when any event about this item id (other than its removal) was
    /// published.
    pub async fn item_published(&self, mailbox: &str, item_id: &str) -> Result<bool, StoreError> {
        let row = sqlx::query(
            "SELECT 1 FROM ews_published WHERE mailbox = $1 AND item_id = $2 AND operation <> 'Gone' LIMIT 1",
        )
        .bind(mailbox)
        .bind(item_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// Item ids with a published event and no published removal.
    pub async fn published_items(&self, mailbox: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT DISTINCT item_id FROM ews_published WHERE mailbox = $1 AND operation <> 'Gone' \
             AND item_id NOT IN (SELECT item_id FROM ews_published WHERE mailbox = $1 AND operation = 'Gone')",
        )
        .bind(mailbox)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|row| row.get(0)).collect())
    }

    /// Remembers published events, in one transaction.
    pub async fn record_published(&self, keys: &[PublishedKey]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        for key in keys {
            sqlx::query(
                "INSERT INTO ews_published (mailbox, item_id, change_key, operation, published_at) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (mailbox, item_id, change_key, operation) DO UPDATE SET published_at = excluded.published_at",
            )
            .bind(&key.mailbox)
            .bind(&key.item_id)
            .bind(&key.change_key)
            .bind(&key.operation)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Forgets published events older than `before_ms`: a SyncState taken
    /// after them no longer reports them.
    pub async fn prune_published(&self, mailbox: &str, before_ms: i64) -> Result<u64, StoreError> {
        let done =
            sqlx::query("DELETE FROM ews_published WHERE mailbox = $1 AND published_at < $2")
                .bind(mailbox)
                .bind(before_ms)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected())
    }

    pub async fn set_status(
        &self,
        mailbox: &str,
        state: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO ews_mailbox_status (mailbox, state, detail, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (mailbox) DO UPDATE SET state = excluded.state, detail = excluded.detail, updated_at = excluded.updated_at",
        )
        .bind(mailbox)
        .bind(state)
        .bind(detail)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn statuses(&self) -> Result<Vec<StatusRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT mailbox, state, detail, updated_at FROM ews_mailbox_status ORDER BY mailbox",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| StatusRow {
                mailbox: row.get(0),
                state: row.get(1),
                detail: row.get(2),
                updated_at_ms: row.get(3),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trips_state_in_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("s.db").display());
        let store = StateStore::open(&url).await.unwrap();
        assert_eq!(store.subscription("a@x").await.unwrap(), None);
        let sub = StoredSubscription {
            mode: "pull".into(),
            subscription_id: "S".into(),
            watermark: Some("W1".into()),
            cookie: None,
            anchor: Some("a@x".into()),
        };
        store.save_subscription("a@x", &sub).await.unwrap();
        store.save_watermark("a@x", "W2").await.unwrap();
        assert_eq!(
            store
                .subscription("a@x")
                .await
                .unwrap()
                .unwrap()
                .watermark
                .as_deref(),
            Some("W2")
        );
        store.save_sync_state("a@x", "inbox", "S1").await.unwrap();
        store.save_sync_state("a@x", "inbox", "S2").await.unwrap();
        assert_eq!(
            store.sync_state("a@x", "inbox").await.unwrap().as_deref(),
            Some("S2")
        );
        let key = PublishedKey {
            mailbox: "a@x".into(),
            item_id: "I".into(),
            change_key: "C".into(),
            operation: "Created".into(),
        };
        store
            .record_published(std::slice::from_ref(&key))
            .await
            .unwrap();
        assert!(store.was_published(&key).await.unwrap());
        assert!(store.version_published("a@x", "I", "C").await.unwrap());
        assert!(!store.version_published("a@x", "I", "D").await.unwrap());
        assert_eq!(store.prune_published("a@x", now_ms() + 1).await.unwrap(), 1);
        store.close().await;
        // Reopening runs the migrations again without complaint.
        let store = StateStore::open(&url).await.unwrap();
        assert_eq!(
            store.sync_state("a@x", "inbox").await.unwrap().as_deref(),
            Some("S2")
        );
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }
}

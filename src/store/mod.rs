//! Where persistent subscriptions and the durable delivery queue live. One
//! [`Store`] trait, two implementations: PostgreSQL (production, shared by
//! several broker nodes) and an embedded SQLite file (the no-setup default).
//! Both pass the same conformance tests. Nothing outside this module sees SQL.

mod postgres;
mod sqlite;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::stream::BoxStream;
use thiserror::Error;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use crate::broker::SharedEvent;

/// The default embedded database file of `herald serve`.
pub const DEFAULT_SQLITE_FILE: &str = "herald.db";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot open the database at {location}: {source}")]
    Connect {
        location: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrating the database schema failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the database holds data this broker cannot read: {0}")]
    Corrupt(String),
    #[error(
        "'{0}://' is not a database Herald can use: give a postgres:// or postgresql:// URL, \
         or the path of an SQLite file (optionally as sqlite://PATH)"
    )]
    UnknownScheme(String),
}

/// A stored persistent subscription: one address, one contract, and one
/// operation or (when `operation` is empty) every operation but the excluded.
/// Read from a `subscriptions` row on either backend; the exclusions come from
/// their own table (see `attach_exclusions`).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Subscription {
    pub id: i64,
    pub address: String,
    pub contract: String,
    /// Empty: every operation of the contract except `excluded_operations`.
    pub operation: String,
    #[sqlx(skip)]
    pub excluded_operations: Vec<String>,
    /// `whsec_<base64>` secret signing webhook deliveries.
    pub secret: Option<String>,
    /// Unix microseconds.
    pub created_at: i64,
}

impl Subscription {
    /// Whether an event of `operation` reaches this subscription.
    pub fn matches(&self, operation: &str) -> bool {
        if self.operation.is_empty() {
            !self.excluded_operations.iter().any(|op| op == operation)
        } else {
            self.operation == operation
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeRequest {
    pub address: String,
    pub contract: String,
    /// Empty: every operation.
    pub operation: String,
    pub secret: Option<String>,
}

/// One fired event and the persistent subscriptions it must reach.
#[derive(Debug, Clone)]
pub struct EnqueueItem {
    pub event: Arc<SharedEvent>,
    pub targets: Vec<Target>,
    /// Store the deliveries already claimed by the enqueuing node (it delivers
    /// them from memory, sparing a claim), rather than pending.
    pub claimed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub subscription_id: i64,
    pub address: String,
    /// The subscription's webhook secret, for deliveries made from memory.
    pub secret: Option<String>,
}

/// Who enqueues, for deliveries stored as claimed.
#[derive(Debug, Clone)]
pub struct EnqueueOptions {
    /// Unix microseconds: the deliveries' creation time and the lease's start.
    pub now: i64,
    pub node: String,
    pub lease: Duration,
}

/// The id of each delivery stored for each item's targets, in order: `None`
/// where the target's subscription was removed meanwhile (no delivery).
pub type EnqueuedIds = Vec<Vec<Option<i64>>>;

/// A dispatcher's request for due deliveries.
#[derive(Debug, Clone)]
pub struct Claim {
    /// Who claims: written to the rows so a restarted node can release them.
    pub node: String,
    pub limit: usize,
    /// Unix microseconds: rows due at or before this are claimed.
    pub now: i64,
    /// How long the claim holds before another node may take the row over.
    pub lease: Duration,
    /// Addresses the dispatcher cannot take more work for right now.
    pub skip_addresses: Vec<String>,
}

/// A delivery a dispatcher owns until its lease ends.
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    pub id: i64,
    pub address: String,
    pub secret: Option<String>,
    /// Attempts including this one.
    pub attempts: u32,
    /// Unix microseconds when the delivery was queued.
    pub created_at: i64,
    /// Shared with every other delivery of the event this node holds.
    pub event: Arc<SharedEvent>,
}

/// What became of a claimed delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    Delivered {
        id: i64,
    },
    Retry {
        id: i64,
        at: i64,
        error: String,
    },
    Dead {
        id: i64,
        error: String,
    },
    /// Not attempted after all (the dispatcher paused the address or is
    /// stopping): pending again at `at`, and the claim's attempt not counted.
    Release {
        id: i64,
        at: i64,
    },
}

/// Delivery counts of one address, for the admin.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AddressStats {
    pub address: String,
    pub pending: u64,
    pub inflight: u64,
    pub dead: u64,
    /// Unix microseconds of the oldest undelivered (pending or in-flight) row.
    pub oldest_undelivered: Option<i64>,
    pub last_error: Option<String>,
}

/// Resolves each time another broker node changed the subscriptions.
pub type ChangeStream = BoxStream<'static, Result<(), StoreError>>;

#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// "postgres" or "sqlite", for logs.
    fn backend(&self) -> &'static str;

    /// Adds a subscription. Idempotent; a given secret replaces the old one.
    /// Subscribing to one operation under an every-operation subscription
    /// lifts that operation's exclusion.
    async fn subscribe(&self, request: &SubscribeRequest) -> Result<(), StoreError>;

    /// Removes one operation (adding an exclusion under an every-operation
    /// subscription), or with an empty operation everything the address has on
    /// the contract. Pending deliveries of removed subscriptions go with them.
    async fn unsubscribe(
        &self,
        address: &str,
        contract: &str,
        operation: &str,
    ) -> Result<(), StoreError>;

    /// Every subscription, with its exclusions, ordered by address, contract, operation.
    async fn subscriptions(&self) -> Result<Vec<Subscription>, StoreError>;

    /// Removes every subscription of an address (its endpoint is gone).
    async fn remove_address(&self, address: &str) -> Result<u64, StoreError>;

    /// Stores events and their deliveries in one transaction. A delivery
    /// whose subscription no longer exists is skipped, not an error.
    async fn enqueue(
        &self,
        batch: &[EnqueueItem],
        options: &EnqueueOptions,
    ) -> Result<EnqueuedIds, StoreError>;

    /// Claims up to `limit` due deliveries (or ones whose lease expired).
    async fn claim(&self, claim: &Claim) -> Result<Vec<ClaimedDelivery>, StoreError>;

    /// Records what became of claimed deliveries, in one transaction.
    async fn settle(&self, outcomes: &[Settlement]) -> Result<(), StoreError>;

    /// Returns a node's in-flight rows to pending (the node restarted).
    async fn release_claims(&self, node: &str) -> Result<u64, StoreError>;

    async fn delivery_stats(&self) -> Result<Vec<AddressStats>, StoreError>;

    /// Makes dead deliveries (of one address, or all) pending again, due now.
    async fn retry_dead(&self, address: Option<&str>, now: i64) -> Result<u64, StoreError>;

    /// Deletes events that have no delivery left.
    async fn purge_delivered_events(&self) -> Result<u64, StoreError>;

    /// A stream that yields when another node changed subscriptions, for
    /// backends shared by several nodes; `None` for a single-node backend.
    async fn changes(&self) -> Result<Option<ChangeStream>, StoreError>;

    async fn close(&self);
}

/// Where the store is: a PostgreSQL URL, or an SQLite file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    Postgres(String),
    Sqlite(PathBuf),
}

impl StoreLocation {
    /// `postgres://` and `postgresql://` URLs are PostgreSQL; `sqlite://PATH`
    /// or a plain path is an SQLite file. Any other `scheme://` is refused, so a
    /// mistyped URL never becomes a file of that name.
    pub fn parse(text: &str) -> Result<Self, StoreError> {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Ok(StoreLocation::Postgres(text.to_owned()));
        }
        if let Some(path) = text
            .strip_prefix("sqlite://")
            .or_else(|| text.strip_prefix("sqlite:"))
        {
            return Ok(StoreLocation::Sqlite(PathBuf::from(path)));
        }
        if let Some((scheme, _)) = text.split_once("://") {
            return Err(StoreError::UnknownScheme(scheme.to_owned()));
        }
        Ok(StoreLocation::Sqlite(PathBuf::from(text)))
    }
}

/// Opens (and migrates) the store at `location`.
pub async fn open(location: &StoreLocation) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match location {
        StoreLocation::Postgres(url) => Arc::new(PostgresStore::connect(url).await?),
        StoreLocation::Sqlite(path) => Arc::new(SqliteStore::open(path).await?),
    })
}

/// Now, in Unix microseconds.
pub fn now_micros() -> i64 {
    system_time_to_micros(SystemTime::now())
}

pub fn system_time_to_micros(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

pub fn micros_to_system_time(micros: i64) -> SystemTime {
    let magnitude = Duration::from_micros(micros.unsigned_abs());
    if micros >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

/// Microseconds in a duration, saturating.
/// `at` (Unix microseconds) plus `duration`, saturating: the one way deadlines
/// in microseconds are computed.
pub fn after(at: i64, duration: Duration) -> i64 {
    at.saturating_add(i64::try_from(duration.as_micros()).unwrap_or(i64::MAX))
}

fn encode_attributes(attributes: &BTreeMap<String, String>) -> String {
    serde_json::to_string(attributes).unwrap_or_else(|_| "{}".to_owned())
}

fn decode_attributes(text: &str) -> Result<BTreeMap<String, String>, StoreError> {
    serde_json::from_str(text).map_err(|e| {
        StoreError::Corrupt(format!(
            "event attributes are not a JSON object of strings: {e}"
        ))
    })
}

/// Groups subscription rows and exclusion rows into [`Subscription`]s.
fn attach_exclusions(
    mut subscriptions: Vec<Subscription>,
    exclusions: Vec<(String, String, String)>,
) -> Vec<Subscription> {
    let mut by_key: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for (address, contract, operation) in exclusions {
        by_key
            .entry((address, contract))
            .or_default()
            .push(operation);
    }
    for subscription in &mut subscriptions {
        if subscription.operation.is_empty()
            && let Some(excluded) =
                by_key.get(&(subscription.address.clone(), subscription.contract.clone()))
        {
            subscription.excluded_operations = excluded.clone();
        }
    }
    subscriptions
}

/// The URL without its password, for error messages.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

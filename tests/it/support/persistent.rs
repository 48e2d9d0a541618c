//! Brokers with persistent delivery for tests: a store per test on either
//! backend, delivery timings short enough for tests, and admin helpers.

use std::{sync::Arc, time::Duration};

use herald::{
    broker::Limits,
    delivery::{BindingOptions, DeliveryOptions, DispatcherOptions, retry::RetryPolicy},
    pb::v1::{
        PersistSubscribeRequest,
        persistent_subscription_service_client::PersistentSubscriptionServiceClient,
    },
    server::App,
    store::StoreLocation,
};
use tempfile::TempDir;
use tonic::transport::Channel;

use super::{TestBroker, postgres::TestDatabase, test_registry};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A store that exists for one test (a fresh PostgreSQL database, or an
/// SQLite file in a temporary directory).
pub struct TestStore {
    pub location: StoreLocation,
    _database: Option<TestDatabase>,
    _dir: Option<TempDir>,
}

impl TestStore {
    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Postgres => {
                let database = TestDatabase::create().await;
                Self {
                    location: StoreLocation::Postgres(database.url.clone()),
                    _database: Some(database),
                    _dir: None,
                }
            }
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                Self {
                    location: StoreLocation::Sqlite(dir.path().join("herald.db")),
                    _database: None,
                    _dir: Some(dir),
                }
            }
        }
    }

    /// The `--database-url` value for a `herald serve` process.
    pub fn url(&self) -> String {
        match &self.location {
            StoreLocation::Postgres(url) => url.clone(),
            StoreLocation::Sqlite(path) => path.display().to_string(),
        }
    }
}

/// Delivery settings with timings short enough for tests.
pub fn fast_delivery(node: &str) -> DeliveryOptions {
    DeliveryOptions {
        dispatcher: DispatcherOptions {
            node: node.to_owned(),
            lease: Duration::from_secs(5),
            poll_interval: Duration::from_millis(100),
            max_in_flight: 256,
            per_address_in_flight: 8,
            retry: RetryPolicy {
                max_attempts: 30,
                max_age: Duration::from_secs(3600),
                base_delay: Duration::from_millis(50),
                max_delay: Duration::from_millis(400),
            },
        },
        bindings: BindingOptions {
            call_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            extra_roots: None,
        },
    }
}

impl TestBroker {
    /// A broker with persistent delivery on `store`.
    pub async fn start_persistent(store: &TestStore, options: DeliveryOptions) -> Self {
        let registry = Arc::new(test_registry());
        let opened = herald::store::open(&store.location)
            .await
            .expect("open the store");
        let app = App::persistent(registry, Limits::default(), opened, options)
            .await
            .expect("start persistent delivery");
        Self::serve_app(app).await
    }

    pub async fn admin(&self) -> PersistentSubscriptionServiceClient<Channel> {
        PersistentSubscriptionServiceClient::new(self.channel().await)
    }

    /// Subscribes `address` persistently; panics if refused.
    pub async fn persist(&self, address: &str, contract: &str, operation: &str) {
        self.admin()
            .await
            .persist_subscribe(PersistSubscribeRequest {
                address: address.to_owned(),
                contract: contract.to_owned(),
                operation: operation.to_owned(),
                secret: String::new(),
            })
            .await
            .expect("persist subscribe");
    }
}

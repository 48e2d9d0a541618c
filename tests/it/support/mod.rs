//! The test harness: start a broker on an ephemeral port, talk to it with
//! typed helpers that read like the scenario, and stop it cleanly.

#![allow(dead_code)]

/// Instantiates async test functions taking a [`persistent::Backend`] as one
/// `#[tokio::test]` per backend, in modules `postgres` and `sqlite`.
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test($crate::support::persistent::Backend::Postgres).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test($crate::support::persistent::Backend::Sqlite).await;
                }
            )*
        }
    };
}

pub mod persistent;
pub mod postgres;
pub mod process;
pub mod receivers;
pub mod subscriber;

use std::{net::SocketAddr, path::Path, time::Duration};

use herald::{
    broker::{Broker, ContractRegistry, Limits, TransientStats},
    pb::v1::{
        Event, FireEventRequest, FireEventResponse, publish_service_client::PublishServiceClient,
    },
    server::{App, ServeError, ServeOptions, serve_app},
};
use prost::Message;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

pub use subscriber::TestSubscriber;

/// The generated code of the tests' own contract, `herald.test.v1.Orders`.
pub mod orders {
    tonic::include_proto!("herald.test.v1");
}

pub const ORDERS: &str = "herald.test.v1.Orders";

/// The compiled descriptors of `tests/proto/herald_test.proto`.
pub const TEST_DESCRIPTORS: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/herald_test_descriptor.bin"));

/// How long a test waits for something that should happen promptly.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A registry with the built-in contracts and the tests' Orders contract.
pub fn test_registry() -> ContractRegistry {
    ContractRegistry::builder()
        .load_descriptor_set(Path::new("herald_test.proto"), TEST_DESCRIPTORS)
        .expect("the test descriptors load")
        .build()
}

/// A broker serving on 127.0.0.1 with an ephemeral port.
pub struct TestBroker {
    pub addr: SocketAddr,
    pub broker: Broker,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), ServeError>>>,
}

impl TestBroker {
    pub async fn start() -> Self {
        Self::start_with(test_registry(), Limits::default()).await
    }

    pub async fn start_with(registry: ContractRegistry, limits: Limits) -> Self {
        let broker = Broker::new(registry, limits);
        Self::serve(broker).await
    }

    pub async fn serve(broker: Broker) -> Self {
        Self::serve_app(App {
            broker,
            persistence: None,
        })
        .await
    }

    pub async fn serve_app(app: App) -> Self {
        init_logging();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (shutdown, stop) = oneshot::channel::<()>();
        let options = ServeOptions {
            drain_timeout: Duration::from_secs(5),
        };
        let broker = app.broker.clone();
        let server = tokio::spawn(serve_app(listener, app, options, async {
            let _ = stop.await;
        }));
        Self {
            addr,
            broker,
            shutdown: Some(shutdown),
            server: Some(server),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .expect("valid url")
            .connect()
            .await
            .expect("connect to the test broker")
    }

    pub async fn publisher(&self) -> PublishServiceClient<Channel> {
        PublishServiceClient::new(self.channel().await)
    }

    pub async fn subscriber(&self) -> TestSubscriber {
        TestSubscriber::connect(self.channel().await).await
    }

    /// Begins shutdown and waits for the server to finish; fails the test if
    /// the server failed or panicked.
    pub async fn stop(mut self) {
        self.begin_shutdown();
        let server = self.server.take().expect("server running");
        tokio::time::timeout(Duration::from_secs(15), server)
            .await
            .expect("the server drains within its grace period")
            .expect("the server task did not panic")
            .expect("the server ended without error");
    }

    pub fn begin_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Waits until the broker has `expected` live transient subscribers.
    pub async fn wait_for_subscribers(&self, expected: usize) {
        self.wait_for_stats(|stats| stats.subscribers == expected)
            .await;
    }

    /// Waits until the transient registry's counts satisfy `done`.
    pub async fn wait_for_stats(&self, done: impl Fn(TransientStats) -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let stats = self.broker.transient_stats();
            if done(stats) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the broker's subscribers never got there: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.begin_shutdown();
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// Logs to stderr when `HERALD_TEST_LOG` names a filter (e.g. `debug`), for
/// looking into a failing test; silent otherwise.
pub fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("HERALD_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

/// An `Orders` payload.
pub fn order(id: &str, quantity: u32) -> orders::Order {
    orders::Order {
        order_id: id.to_owned(),
        quantity,
        customer: "ada".to_owned(),
    }
}

/// A FireEventRequest for the Orders contract.
pub fn order_event(operation: &str, order: &orders::Order) -> FireEventRequest {
    FireEventRequest {
        event: Some(Event {
            contract: ORDERS.to_owned(),
            operation: operation.to_owned(),
            payload: order.encode_to_vec().into(),
            ..Event::default()
        }),
    }
}

/// Fires one Orders event and returns the broker's answer.
pub async fn fire(
    publisher: &mut PublishServiceClient<Channel>,
    operation: &str,
    order: &orders::Order,
) -> FireEventResponse {
    publisher
        .fire_event(order_event(operation, order))
        .await
        .expect("fire succeeds")
        .into_inner()
}

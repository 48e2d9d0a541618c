//! `herald bench durable`: persistent delivery end to end, on PostgreSQL and on
//! SQLite. A broker with persistent delivery runs in this process; N gRPC
//! subscribers implementing the benchmark contract run here too and are
//! subscribed persistently; the publisher fires, and each tick's time from
//! firing to its receipt by the subscriber is recorded (fire, commit, claim,
//! call). Paced runs also time each FireEvent call, which answers only once the
//! event and its deliveries are committed.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use futures::StreamExt;
use hdrhistogram::Histogram;
use reqwest::Url;
use sqlx::{Connection, PgConnection};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, transport::Channel};

use super::{
    BenchError,
    herald::{bench_registry, connect},
    measure::{Arrival, Arrivals, Measurement, drive},
    workload::{Clock, Workload},
};
use crate::{
    broker::{Limits, registry::BENCH_CONTRACT},
    delivery::DeliveryOptions,
    pb::{
        bench::{
            Tick,
            bench_server::{Bench, BenchServer},
        },
        v1::{
            Event, FireEventRequest, PersistSubscribeRequest,
            persistent_subscription_service_client::PersistentSubscriptionServiceClient,
            publish_service_client::PublishServiceClient,
        },
    },
    server::{App, ServeOptions, serve_app},
    store::{self, StoreLocation},
};

/// The PostgreSQL server scratch databases are created on, unless told otherwise.
pub const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Arrivals a subscriber may hold before its server waits for the tally.
const ARRIVAL_QUEUE: usize = 65_536;

/// Concurrent FireEvent calls of a paced run, at most.
const MAX_CONCURRENT_FIRES: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub fn label(self) -> &'static str {
        match self {
            Backend::Postgres => "PostgreSQL",
            Backend::Sqlite => "SQLite",
        }
    }
}

#[derive(Debug, Clone)]
pub struct DurablePlan {
    pub workload: Workload,
    pub backends: Vec<Backend>,
    /// The PostgreSQL server to create a scratch database on.
    pub postgres: String,
    /// Calls in flight to one subscriber.
    pub per_address_in_flight: usize,
}

/// One backend's result.
#[derive(Debug)]
pub struct DurableRow {
    pub backend: Backend,
    pub outcome: Result<DurableMeasurement, String>,
}

#[derive(Debug)]
pub struct DurableMeasurement {
    pub delivery: Measurement,
    /// How long each FireEvent call took (paced runs only).
    pub fire_latency: Option<Histogram<u64>>,
}

pub async fn run(plan: &DurablePlan) -> Vec<DurableRow> {
    let mut rows = Vec::new();
    for &backend in &plan.backends {
        let outcome = run_backend(plan, backend).await.map_err(|e| e.to_string());
        rows.push(DurableRow { backend, outcome });
    }
    rows
}

async fn run_backend(
    plan: &DurablePlan,
    backend: Backend,
) -> Result<DurableMeasurement, BenchError> {
    let scratch = Scratch::create(backend, &plan.postgres).await?;
    let measured = measure_on(plan, &scratch.location).await;
    let removed = scratch.remove().await;
    let measured = measured?;
    removed?;
    Ok(measured)
}

async fn measure_on(
    plan: &DurablePlan,
    location: &StoreLocation,
) -> Result<DurableMeasurement, BenchError> {
    let broker = DurableBroker::start(location, plan.per_address_in_flight).await?;
    let measured = measure(&plan.workload, &broker.url).await;
    broker.stop().await?;
    measured
}

async fn measure(workload: &Workload, url: &str) -> Result<DurableMeasurement, BenchError> {
    let channel = connect(url).await?;
    let mut admin = PersistentSubscriptionServiceClient::new(channel.clone());
    let mut subscribers = Vec::with_capacity(workload.subscribers);
    let mut arrivals = Vec::with_capacity(workload.subscribers);
    for _ in 0..workload.subscribers {
        let (subscriber, stream) = TickSubscriber::start().await?;
        admin
            .persist_subscribe(PersistSubscribeRequest {
                address: subscriber.address.clone(),
                contract: BENCH_CONTRACT.to_owned(),
                operation: String::new(),
                secret: String::new(),
            })
            .await
            .map_err(|s| BenchError::System(format!("persistent subscribe failed: {s}")))?;
        subscribers.push(subscriber);
        arrivals.push(stream);
    }
    let fire_latency = Arc::new(Mutex::new(super::measure::new_histogram()?));
    let paced = workload.rate.is_some();
    let recorded = Arc::clone(&fire_latency);
    let delivery = drive(
        workload,
        Clock::start(),
        arrivals,
        move |ticks| async move {
            if paced {
                fire_one_by_one(channel, ticks, recorded).await
            } else {
                fire_streamed(channel, ticks).await
            }
        },
    )
    .await;
    drop(subscribers);
    let fire_latency = Arc::try_unwrap(fire_latency)
        .ok()
        .and_then(|m| m.into_inner().ok())
        .filter(|_| paced);
    Ok(DurableMeasurement {
        delivery: delivery?,
        fire_latency,
    })
}

fn tick_event(payload: bytes::Bytes) -> FireEventRequest {
    FireEventRequest {
        event: Some(Event {
            contract: BENCH_CONTRACT.to_owned(),
            operation: "Tick".to_owned(),
            payload,
            ..Event::default()
        }),
    }
}

/// Throughput: every tick on one FireEvents call (the broker commits
/// concurrent fires together).
async fn fire_streamed(
    channel: Channel,
    ticks: futures::stream::BoxStream<'static, bytes::Bytes>,
) -> Result<(), BenchError> {
    PublishServiceClient::new(channel)
        .fire_events(ticks.map(tick_event))
        .await
        .map_err(|s| BenchError::System(format!("FireEvents failed: {s}")))?;
    Ok(())
}

/// Latency: one FireEvent call per tick, at the offered rate, each timed.
async fn fire_one_by_one(
    channel: Channel,
    ticks: futures::stream::BoxStream<'static, bytes::Bytes>,
    latency: Arc<Mutex<Histogram<u64>>>,
) -> Result<(), BenchError> {
    let client = PublishServiceClient::new(channel);
    let failures = Arc::new(Mutex::new(None::<String>));
    ticks
        .for_each_concurrent(MAX_CONCURRENT_FIRES, |payload| {
            let mut client = client.clone();
            let latency = Arc::clone(&latency);
            let failures = Arc::clone(&failures);
            async move {
                let started = Instant::now();
                match client.fire_event(tick_event(payload)).await {
                    Ok(_) => {
                        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                        if let Ok(mut histogram) = latency.lock() {
                            histogram.saturating_record(nanos.max(1));
                        }
                    }
                    Err(status) => {
                        if let Ok(mut first) = failures.lock() {
                            first.get_or_insert(status.to_string());
                        }
                    }
                }
            }
        })
        .await;
    match failures.lock().ok().and_then(|mut f| f.take()) {
        Some(error) => Err(BenchError::System(format!("FireEvent failed: {error}"))),
        None => Ok(()),
    }
}

/// A broker with persistent delivery on a store, in this process.
struct DurableBroker {
    url: String,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<Result<(), crate::server::ServeError>>,
}

impl DurableBroker {
    async fn start(
        location: &StoreLocation,
        per_address_in_flight: usize,
    ) -> Result<Self, BenchError> {
        let registry = Arc::new(bench_registry()?);
        let opened = store::open(location)
            .await
            .map_err(|e| BenchError::Broker(e.to_string()))?;
        let mut options = DeliveryOptions::default();
        options.dispatcher.node = "herald-bench".to_owned();
        options.dispatcher.per_address_in_flight = per_address_in_flight;
        let app = App::persistent(registry, Limits::default(), opened, options)
            .await
            .map_err(|e| BenchError::Broker(e.to_string()))?;
        let listener = bind_loopback("the broker").await?;
        let url = format!("http://{}", local(&listener)?);
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve_app(
            listener,
            app,
            ServeOptions::default(),
            stop.clone().cancelled_owned(),
        ));
        Ok(Self { url, stop, server })
    }

    async fn stop(self) -> Result<(), BenchError> {
        self.stop.cancel();
        self.server
            .await
            .map_err(|e| BenchError::Task(e.to_string()))?
            .map_err(|e| BenchError::Broker(e.to_string()))
    }
}

/// A persistent subscriber: a gRPC server implementing the benchmark
/// contract, reporting each tick it receives. Stops when dropped.
struct TickSubscriber {
    address: String,
    stop: CancellationToken,
}

impl Drop for TickSubscriber {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl TickSubscriber {
    async fn start() -> Result<(Self, Arrivals), BenchError> {
        let listener = bind_loopback("a subscriber").await?;
        let address = format!("grpc://{}", local(&listener)?);
        let (arrivals, received) = mpsc::channel(ARRIVAL_QUEUE);
        let stop = CancellationToken::new();
        let server = tonic::transport::Server::builder()
            .add_service(BenchServer::new(Receiver { arrivals }))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            );
        tokio::spawn(server);
        Ok((
            Self { address, stop },
            ReceiverStream::new(received).boxed(),
        ))
    }
}

struct Receiver {
    arrivals: mpsc::Sender<Arrival>,
}

#[tonic::async_trait]
impl Bench for Receiver {
    async fn tick(&self, request: Request<Tick>) -> Result<Response<()>, Status> {
        let sent_nanos = request.into_inner().sent_nanos;
        let arrival = if sent_nanos > 0 {
            Arrival::Tick { sent_nanos }
        } else {
            Arrival::Unreadable
        };
        // The tally has stopped listening only once the run is over.
        let _ = self.arrivals.send(arrival).await;
        Ok(Response::new(()))
    }
}

async fn bind_loopback(what: &str) -> Result<TcpListener, BenchError> {
    TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|source| BenchError::Io {
            what: format!("binding {what} to loopback"),
            source,
        })
}

fn local(listener: &TcpListener) -> Result<std::net::SocketAddr, BenchError> {
    listener.local_addr().map_err(|source| BenchError::Io {
        what: "reading a listener's address".to_owned(),
        source,
    })
}

/// A store that exists for one run: a scratch PostgreSQL database, or an
/// SQLite file in a temporary directory. `remove` deletes it.
struct Scratch {
    location: StoreLocation,
    cleanup: Cleanup,
}

enum Cleanup {
    Database { server: String, name: String },
    Directory(tempfile::TempDir),
}

impl Scratch {
    async fn create(backend: Backend, server: &str) -> Result<Self, BenchError> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().map_err(|source| BenchError::Io {
                    what: "creating a temporary directory".to_owned(),
                    source,
                })?;
                Ok(Self {
                    location: StoreLocation::Sqlite(dir.path().join("herald-bench.db")),
                    cleanup: Cleanup::Directory(dir),
                })
            }
            Backend::Postgres => {
                let mut url = Url::parse(server)
                    .map_err(|e| BenchError::Broker(format!("bad PostgreSQL URL {server}: {e}")))?;
                if !url
                    .host_str()
                    .is_some_and(|h| h == "localhost" || h.starts_with("127.") || h == "[::1]")
                {
                    return Err(BenchError::Broker(format!(
                        "the benchmark uses a loopback PostgreSQL only; got {server}"
                    )));
                }
                let name = format!(
                    "herald_bench_{}_{}",
                    std::process::id(),
                    Clock::start().now_nanos()
                );
                let mut admin =
                    PgConnection::connect(server)
                        .await
                        .map_err(|e| BenchError::Unreachable {
                            address: server.to_owned(),
                            reason: e.to_string(),
                        })?;
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut admin)
                    .await
                    .map_err(|e| BenchError::Broker(format!("creating a scratch database: {e}")))?;
                let _ = admin.close().await;
                url.set_path(&name);
                Ok(Self {
                    location: StoreLocation::Postgres(url.to_string()),
                    cleanup: Cleanup::Database {
                        server: server.to_owned(),
                        name,
                    },
                })
            }
        }
    }

    async fn remove(self) -> Result<(), BenchError> {
        match self.cleanup {
            Cleanup::Directory(dir) => dir.close().map_err(|source| BenchError::Io {
                what: "removing the temporary directory".to_owned(),
                source,
            }),
            Cleanup::Database { server, name } => {
                let mut admin = PgConnection::connect(&server)
                    .await
                    .map_err(|e| BenchError::Broker(format!("dropping {name}: {e}")))?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await
                    .map_err(|e| BenchError::Broker(format!("dropping {name}: {e}")))?;
                let _ = admin.close().await;
                Ok(())
            }
        }
    }
}

//! Runs the broker on a listener until a shutdown future resolves, then drains:
//! stop accepting, tell health checkers, end subscriber streams with
//! UNAVAILABLE, let in-flight calls finish, and give up after a grace period.
//! `main` and the tests call the same function.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};

use crate::{
    api::{self, ApiError},
    broker::{Broker, ContractRegistry, Limits, SingleNode},
    delivery::{DeliveryOptions, Persistence, PersistenceError},
    store::Store,
};

/// How long in-flight calls may take to finish after shutdown begins.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How often idle connections are pinged, so that a peer that vanished without
/// closing (power loss, network partition) is noticed and its subscriptions freed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub drain_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// What `serve` runs: the broker, and persistent delivery when configured.
pub struct App {
    pub broker: Broker,
    pub persistence: Option<Persistence>,
}

impl App {
    /// A single-node broker whose persistent deliveries go through `store`.
    pub async fn persistent(
        registry: Arc<ContractRegistry>,
        limits: Limits,
        store: Arc<dyn Store>,
        options: DeliveryOptions,
    ) -> Result<Self, PersistenceError> {
        let persistence = Persistence::start(store, Arc::clone(&registry), options).await?;
        let broker = Broker::with_parts(
            registry,
            limits,
            Some(persistence.durable()),
            Arc::new(SingleNode),
        );
        Ok(Self {
            broker,
            persistence: Some(persistence),
        })
    }
}

/// Serves a broker with transient subscribers only (no store) on `listener`
/// until `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    broker: Broker,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let app = App {
        broker,
        persistence: None,
    };
    serve_app(listener, app, options, shutdown).await
}

/// Serves the whole app on `listener` until `shutdown` resolves, then drains
/// the gRPC server and stops persistent delivery.
pub async fn serve_app(
    listener: TcpListener,
    app: App,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let App {
        broker,
        persistence,
    } = app;
    let result = serve_grpc(listener, &broker, persistence.as_ref(), options, shutdown).await;
    // The gRPC server has drained: nothing fires any more.
    drop(broker);
    if let Some(persistence) = persistence {
        persistence.shutdown().await;
    }
    result
}

async fn serve_grpc(
    listener: TcpListener,
    broker: &Broker,
    persistence: Option<&Persistence>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let stopping = CancellationToken::new();
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let services = api::herald_services(persistence.is_some());
    for service in &services {
        health
            .set_service_status(service, tonic_health::ServingStatus::Serving)
            .await;
    }
    let routes = api::routes(
        broker,
        persistence.map(Persistence::admin),
        &stopping,
        health_service,
    )?;
    if let Ok(address) = listener.local_addr() {
        info!(%address, contracts = ?broker.registry().contract_names(), "herald is serving");
    }

    // The builder's `tcp_nodelay` does not apply to a listener we hand in, so
    // the accepted sockets get it here. Without it Nagle's algorithm holds each
    // small event written to a subscriber until the previous one is
    // acknowledged, and delayed ACKs turn that into milliseconds of latency.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .serve_with_incoming_shutdown(routes, incoming, stopping.clone().cancelled_owned());
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return Ok(result?),
        () = shutdown => {}
    }

    info!("shutting down: no new connections; ending subscriber streams");
    for service in std::iter::once("").chain(services) {
        health
            .set_service_status(service, tonic_health::ServingStatus::NotServing)
            .await;
    }
    stopping.cancel();
    match tokio::time::timeout(options.drain_timeout, server).await {
        Ok(result) => {
            info!("drained: every call finished");
            Ok(result?)
        }
        Err(_) => {
            warn!(
                grace = ?options.drain_timeout,
                "drain deadline passed; closing the remaining connections"
            );
            Ok(())
        }
    }
}

/// Resolves on SIGINT or SIGTERM (Ctrl-C elsewhere).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut interrupt), Ok(mut terminate)) => {
                tokio::select! {
                    _ = interrupt.recv() => info!("received SIGINT"),
                    _ = terminate.recv() => info!("received SIGTERM"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

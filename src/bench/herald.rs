//! Herald as a system under test: a broker on 127.0.0.1, port 0, run by the
//! real [`serve`] function in this process or by a `herald bench broker` child
//! process; each subscriber a `SubscriptionService.Subscribe` stream on its own
//! connection, the publisher one `PublishService.FireEvents` call.

use std::time::Duration;

use futures::{StreamExt, stream};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{
    Streaming,
    transport::{Channel, Endpoint},
};

use super::{
    BenchError, CONNECT_TIMEOUT,
    child::ChildBroker,
    measure::{Arrival, Arrivals, Measurement, drive, open_subscribers},
    workload::{Clock, Workload, sent_nanos},
};
use crate::{
    broker::{Broker, ContractRegistry, Limits, registry::BENCH_CONTRACT},
    pb::v1::{
        Ack, Event, EventFilter, FireEventRequest, SubscriptionCommand, SubscriptionMessage, ack,
        publish_service_client::PublishServiceClient, subscription_command::Command,
        subscription_message::Message, subscription_service_client::SubscriptionServiceClient,
    },
    server::{ServeError, ServeOptions, serve},
};

/// The operation of the benchmark contract that carries ticks.
pub const TICK_OPERATION: &str = "Tick";

/// How long a subscribe command may wait for its ack.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the in-process broker may take to drain after the run.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the broker under test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Placement {
    /// In this process, on the benchmark's own runtime.
    InProcess,
    /// In a child process (`herald bench broker`).
    Child,
}

/// How Herald is set up for a run.
#[derive(Debug, Clone, Copy)]
pub struct HeraldOptions {
    pub placement: Placement,
    /// Events each subscriber's queue holds before it lags.
    pub queue_capacity: usize,
}

/// The contracts a benchmark broker knows: the built-ins plus `herald.bench.v1.Bench`.
pub fn bench_registry() -> Result<ContractRegistry, BenchError> {
    Ok(ContractRegistry::builder()
        .with_builtin(BENCH_CONTRACT)
        .map_err(|e| BenchError::Broker(e.to_string()))?
        .build())
}

/// Runs the workload against a fresh broker.
pub async fn run(
    workload: &Workload,
    clock: Clock,
    options: HeraldOptions,
) -> Result<Measurement, BenchError> {
    let broker = BrokerUnderTest::start(options).await?;
    let cpu_before = broker.cpu_time()?;
    let measured = measure(workload, clock, &broker.url()).await;
    let cpu_after = broker.cpu_time()?;
    let stopped = broker.stop().await;
    let mut measurement = measured?;
    stopped?;
    measurement.server_cpu = cpu_before
        .zip(cpu_after)
        .map(|(before, after)| after.saturating_sub(before));
    Ok(measurement)
}

async fn measure(workload: &Workload, clock: Clock, url: &str) -> Result<Measurement, BenchError> {
    let subscribers = open_subscribers(workload.subscribers, |_| subscriber(url)).await?;
    let mut publisher = PublishServiceClient::new(connect(url).await?);
    drive(workload, clock, subscribers, |ticks| async move {
        let requests = ticks.map(|payload| FireEventRequest {
            event: Some(Event {
                contract: BENCH_CONTRACT.to_owned(),
                operation: TICK_OPERATION.to_owned(),
                payload,
                ..Event::default()
            }),
        });
        publisher
            .fire_events(requests)
            .await
            .map_err(|status| BenchError::System(format!("FireEvents failed: {status}")))?;
        Ok(())
    })
    .await
}

/// Opens a channel (one HTTP/2 connection) to the broker.
pub async fn connect(url: &str) -> Result<Channel, BenchError> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| BenchError::Broker(format!("bad broker URL {url}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    endpoint
        .connect()
        .await
        .map_err(|e| BenchError::Unreachable {
            address: url.to_owned(),
            reason: e.to_string(),
        })
}

/// A subscribe command for `contract` ("" operation = all of it).
pub fn subscribe_command(contract: &str, operation: &str) -> SubscriptionCommand {
    SubscriptionCommand {
        request_id: "bench".to_owned(),
        command: Some(Command::Subscribe(EventFilter {
            contract: contract.to_owned(),
            operation: operation.to_owned(),
        })),
    }
}

/// Waits for the ack of the stream's one subscribe command.
pub async fn await_ack(messages: &mut Streaming<SubscriptionMessage>) -> Result<(), BenchError> {
    let reply = tokio::time::timeout(ACK_TIMEOUT, messages.message())
        .await
        .map_err(|_| BenchError::Timeout {
            what: "subscribing",
            after: ACK_TIMEOUT,
        })?
        .map_err(|status| BenchError::System(format!("subscribe failed: {status}")))?;
    match reply.and_then(|reply| reply.message) {
        Some(Message::Ack(Ack {
            result: Some(ack::Result::Ok(_)),
            ..
        })) => Ok(()),
        other => Err(BenchError::System(format!(
            "subscribe was not acknowledged: {other:?}"
        ))),
    }
}

/// One subscriber on its own connection, subscribed to the ticks.
async fn subscriber(url: &str) -> Result<Arrivals, BenchError> {
    let channel = connect(url).await?;
    // The command stream ends after the one command; the broker keeps the
    // subscription (and the stream) open.
    let mut messages = SubscriptionServiceClient::new(channel)
        .subscribe(stream::iter([subscribe_command(
            BENCH_CONTRACT,
            TICK_OPERATION,
        )]))
        .await
        .map_err(|status| BenchError::System(format!("Subscribe failed: {status}")))?
        .into_inner();
    await_ack(&mut messages).await?;
    Ok(arrivals(messages))
}

fn arrivals(messages: Streaming<SubscriptionMessage>) -> Arrivals {
    stream::unfold(Some(messages), |messages| async move {
        let mut messages = messages?;
        loop {
            let arrival = match messages.message().await {
                Ok(Some(SubscriptionMessage {
                    message: Some(Message::Event(event)),
                })) => match sent_nanos(&event.payload) {
                    Some(sent_nanos) => Arrival::Tick { sent_nanos },
                    None => Arrival::Unreadable,
                },
                Ok(Some(SubscriptionMessage {
                    message: Some(Message::Lagged(lagged)),
                })) => Arrival::Missed(lagged.missed),
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some((Arrival::Broken(status.to_string()), None)),
            };
            return Some((arrival, Some(messages)));
        }
    })
    .boxed()
}

/// A broker started for one run.
enum BrokerUnderTest {
    InProcess {
        url: String,
        shutdown: oneshot::Sender<()>,
        server: JoinHandle<Result<(), ServeError>>,
    },
    Child(Box<ChildBroker>),
}

impl BrokerUnderTest {
    async fn start(options: HeraldOptions) -> Result<Self, BenchError> {
        match options.placement {
            Placement::InProcess => {
                let limits = Limits {
                    queue_capacity: options.queue_capacity,
                    ..Limits::default()
                };
                let broker = Broker::new(bench_registry()?, limits);
                let listener =
                    TcpListener::bind("127.0.0.1:0")
                        .await
                        .map_err(|source| BenchError::Io {
                            what: "binding 127.0.0.1:0".to_owned(),
                            source,
                        })?;
                let addr = listener.local_addr().map_err(|source| BenchError::Io {
                    what: "reading the listener's address".to_owned(),
                    source,
                })?;
                let (shutdown, stop) = oneshot::channel::<()>();
                let serve_options = ServeOptions {
                    drain_timeout: DRAIN_TIMEOUT,
                };
                let server = tokio::spawn(serve(listener, broker, serve_options, async {
                    let _ = stop.await;
                }));
                Ok(Self::InProcess {
                    url: format!("http://{addr}"),
                    shutdown,
                    server,
                })
            }
            Placement::Child => {
                let capacity = options.queue_capacity.to_string();
                let child = ChildBroker::spawn(&[
                    "bench",
                    "broker",
                    "--listen",
                    "127.0.0.1:0",
                    "--queue-capacity",
                    &capacity,
                ])
                .await?;
                Ok(Self::Child(Box::new(child)))
            }
        }
    }

    /// The broker's CPU time so far, when it has a process of its own.
    fn cpu_time(&self) -> Result<Option<Duration>, BenchError> {
        match self {
            Self::InProcess { .. } => Ok(None),
            Self::Child(child) => child.cpu_time().map(Some),
        }
    }

    fn url(&self) -> String {
        match self {
            Self::InProcess { url, .. } => url.clone(),
            Self::Child(child) => child.url(),
        }
    }

    async fn stop(self) -> Result<(), BenchError> {
        match self {
            Self::InProcess {
                shutdown, server, ..
            } => {
                let _ = shutdown.send(());
                tokio::time::timeout(DRAIN_TIMEOUT * 2, server)
                    .await
                    .map_err(|_| BenchError::Timeout {
                        what: "stopping the broker",
                        after: DRAIN_TIMEOUT * 2,
                    })?
                    .map_err(|e| BenchError::Task(e.to_string()))?
                    .map_err(|e| BenchError::Broker(e.to_string()))
            }
            Self::Child(child) => child.stop().await,
        }
    }
}

//! The part of a fan-out run that is the same for every system: one task per
//! subscriber counts what arrives and records its latency in its own HDR
//! histogram, the publisher is handed the workload's ticks, and the run ends
//! when every delivery is accounted for, when arrivals go quiet after the last
//! send, or at the workload's timeout, whichever comes first.

use std::{future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream, stream::BoxStream};
use hdrhistogram::Histogram;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    BenchError,
    workload::{Clock, Progress, SendLog, Workload, ticks},
};

/// Latencies above this are recorded as this (the histogram's upper bound).
const MAX_RECORDED_LATENCY: Duration = Duration::from_secs(60);

/// Significant decimal digits the histograms keep.
const HISTOGRAM_PRECISION: u8 = 3;

/// After the last send, a run ends once no delivery has arrived for this long:
/// whatever has not arrived by then was dropped.
const QUIET_AFTER_PUBLISHING: Duration = Duration::from_secs(2);

/// Subscribers set up at the same time before a run.
const SETUP_CONCURRENCY: usize = 32;

/// How long setting up one subscriber (connecting, subscribing, and the
/// system's confirmation) may take.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the run checks whether every delivery has arrived.
const PROGRESS_CHECK: Duration = Duration::from_millis(20);

/// What one subscriber receives.
#[derive(Debug)]
pub enum Arrival {
    /// A tick, with the send time it carries.
    Tick { sent_nanos: u64 },
    /// The system says this many events were dropped for this subscriber.
    Missed(u64),
    /// Something arrived that is not a tick (counted, not timed).
    Unreadable,
    /// The subscription broke; nothing more will arrive.
    Broken(String),
}

/// A subscriber as the run sees it: its arrivals, in order.
pub type Arrivals = BoxStream<'static, Arrival>;

/// What one subscriber saw.
#[derive(Debug, Clone)]
struct Tally {
    received: u64,
    missed: u64,
    unreadable: u64,
    last_receive_nanos: u64,
    latency: Histogram<u64>,
    broken: Option<String>,
}

impl Tally {
    fn new() -> Result<Self, BenchError> {
        Ok(Self {
            received: 0,
            missed: 0,
            unreadable: 0,
            last_receive_nanos: 0,
            latency: new_histogram()?,
            broken: None,
        })
    }

    fn accounted(&self) -> u64 {
        self.received + self.missed + self.unreadable
    }
}

pub(super) fn new_histogram() -> Result<Histogram<u64>, BenchError> {
    let high = u64::try_from(MAX_RECORDED_LATENCY.as_nanos()).unwrap_or(u64::MAX);
    Histogram::new_with_bounds(1, high, HISTOGRAM_PRECISION)
        .map_err(|e| BenchError::Histogram(e.to_string()))
}

/// The outcome of one system's run.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// Events the publisher sent.
    pub sent: u64,
    /// Deliveries a lossless run makes (sent × subscribers).
    pub expected: u64,
    /// Ticks that arrived.
    pub delivered: u64,
    /// Deliveries the system said it dropped (Herald's `lagged`).
    pub reported_missed: u64,
    /// From the first send to the last arrival.
    pub elapsed: Duration,
    /// From the first send to the last send.
    pub publishing: Duration,
    /// Publish-to-receive latency of every delivered tick, in nanoseconds.
    pub latency: Histogram<u64>,
    /// The first subscriber failure, if any broke.
    pub broken: Option<String>,
    /// Subscribers whose subscription broke.
    pub broken_subscribers: usize,
    /// CPU time the system under test spent on the run, when it is known (a
    /// Herald broker in a child process).
    pub server_cpu: Option<Duration>,
}

impl Measurement {
    /// Delivered ticks per second over the whole run.
    pub fn deliveries_per_second(&self) -> f64 {
        per_second(self.delivered, self.elapsed)
    }

    /// Events per second the publisher achieved.
    pub fn send_rate(&self) -> f64 {
        per_second(self.sent, self.publishing)
    }

    /// Deliveries that never arrived, reported or not.
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.delivered)
    }

    /// The server's CPU time per delivered event, when known.
    pub fn server_cpu_per_delivery(&self) -> Option<Duration> {
        let delivered = u32::try_from(self.delivered).ok().filter(|&n| n > 0)?;
        Some(self.server_cpu? / delivered)
    }

    /// The latency at `quantile`, or `None` when nothing arrived.
    pub fn latency_at(&self, quantile: f64) -> Option<Duration> {
        (!self.latency.is_empty())
            .then(|| Duration::from_nanos(self.latency.value_at_quantile(quantile)))
    }
}

fn per_second(count: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        0.0
    } else {
        count as f64 / elapsed.as_secs_f64()
    }
}

/// Sets up `count` subscribers with `open`, a few at a time.
pub async fn open_subscribers<F, Fut>(count: usize, open: F) -> Result<Vec<Arrivals>, BenchError>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<Arrivals, BenchError>>,
{
    stream::iter(0..count)
        .map(open)
        .map(within_setup_timeout)
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect()
        .await
}

/// Bounds one subscriber's setup by [`SETUP_TIMEOUT`].
pub async fn within_setup_timeout<T>(
    setup: impl Future<Output = Result<T, BenchError>>,
) -> Result<T, BenchError> {
    tokio::time::timeout(SETUP_TIMEOUT, setup)
        .await
        .map_err(|_| BenchError::Timeout {
            what: "setting up a subscriber",
            after: SETUP_TIMEOUT,
        })?
}

/// A subject or channel name no other run shares, so that concurrent runs by
/// others on the same NATS or Redis server never mix with this one.
pub fn unique_topic(clock: Clock) -> String {
    format!("herald.bench.{}.{}", std::process::id(), clock.now_nanos())
}

/// Runs the workload: one task per subscriber drains its arrivals while
/// `publish` sends the ticks it is given, then waits for the deliveries to
/// arrive (bounded by the workload's timeout) and adds everything up.
pub async fn drive<P, F>(
    workload: &Workload,
    clock: Clock,
    subscribers: Vec<Arrivals>,
    publish: P,
) -> Result<Measurement, BenchError>
where
    P: FnOnce(BoxStream<'static, Bytes>) -> F,
    F: Future<Output = Result<(), BenchError>>,
{
    let subscriber_count = subscribers.len() as u64;
    let stop = CancellationToken::new();
    let progress = Arc::new(Progress::new(subscribers.len()));
    let mut tasks = Vec::with_capacity(subscribers.len());
    for (index, arrivals) in subscribers.into_iter().enumerate() {
        let tally = Tally::new()?;
        tasks.push(tokio::spawn(receive(
            arrivals,
            tally,
            clock,
            workload.events,
            Reporter {
                progress: Arc::clone(&progress),
                index,
            },
            stop.clone(),
        )));
    }

    let log = Arc::new(SendLog::default());
    let deadline = Instant::now() + workload.timeout;
    let published = tokio::time::timeout_at(
        deadline,
        publish(ticks(workload, clock, Arc::clone(&log), Arc::clone(&progress)).boxed()),
    )
    .await;
    let publish_error = match published {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(error),
        Err(_) => Some(BenchError::Timeout {
            what: "publishing",
            after: workload.timeout,
        }),
    };
    if publish_error.is_none() {
        let expected = log.sent().saturating_mul(subscriber_count);
        wait_for_arrivals(&progress, expected, deadline).await;
    }
    stop.cancel();

    let mut total = Tally::new()?;
    let mut broken_subscribers = 0;
    for task in tasks {
        let tally = task.await.map_err(|e| BenchError::Task(e.to_string()))?;
        total.received += tally.received;
        total.missed += tally.missed;
        total.unreadable += tally.unreadable;
        total.last_receive_nanos = total.last_receive_nanos.max(tally.last_receive_nanos);
        total
            .latency
            .add(&tally.latency)
            .map_err(|e| BenchError::Histogram(format!("{e:?}")))?;
        if tally.broken.is_some() {
            broken_subscribers += 1;
            if total.broken.is_none() {
                total.broken = tally.broken;
            }
        }
    }
    if let Some(error) = publish_error {
        return Err(error);
    }

    let first_send = log.first().unwrap_or(0);
    let last_send = log.last().unwrap_or(first_send);
    let sent = log.sent();
    Ok(Measurement {
        sent,
        expected: sent.saturating_mul(subscriber_count),
        delivered: total.received,
        reported_missed: total.missed,
        elapsed: Duration::from_nanos(total.last_receive_nanos.saturating_sub(first_send)),
        publishing: Duration::from_nanos(last_send.saturating_sub(first_send)),
        latency: total.latency,
        broken: total.broken,
        broken_subscribers,
        server_cpu: None,
    })
}

/// Waits until `expected` deliveries are accounted for, arrivals have been
/// quiet for [`QUIET_AFTER_PUBLISHING`], or `deadline` passes.
async fn wait_for_arrivals(progress: &Progress, expected: u64, deadline: Instant) {
    let mut seen = progress.total();
    let mut last_progress = Instant::now();
    while seen < expected {
        let now = Instant::now();
        if now >= deadline || now.duration_since(last_progress) >= QUIET_AFTER_PUBLISHING {
            return;
        }
        tokio::time::sleep(PROGRESS_CHECK.min(deadline - now)).await;
        let current = progress.total();
        if current != seen {
            seen = current;
            last_progress = Instant::now();
        }
    }
}

/// Where one subscriber reports how far it has come.
struct Reporter {
    progress: Arc<Progress>,
    index: usize,
}

impl Reporter {
    fn add(&self, count: u64) {
        self.progress.add(self.index, count);
    }
}

/// One subscriber's loop: ends when all `events` are accounted for, the
/// subscription breaks or ends, or the run stops.
async fn receive(
    mut arrivals: Arrivals,
    mut tally: Tally,
    clock: Clock,
    events: u64,
    accounted: Reporter,
    stop: CancellationToken,
) -> Tally {
    while tally.accounted() < events {
        let arrival = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            arrival = arrivals.next() => arrival,
        };
        let Some(arrival) = arrival else {
            tally.broken = Some("the subscription ended early".to_owned());
            break;
        };
        let counted = match arrival {
            Arrival::Tick { sent_nanos } => {
                let now = clock.now_nanos();
                tally.received += 1;
                tally.last_receive_nanos = now;
                tally
                    .latency
                    .saturating_record(now.saturating_sub(sent_nanos).max(1));
                1
            }
            Arrival::Missed(missed) => {
                tally.missed += missed;
                missed
            }
            Arrival::Unreadable => {
                tally.unreadable += 1;
                1
            }
            Arrival::Broken(reason) => {
                tally.broken = Some(reason);
                break;
            }
        };
        accounted.add(counted);
    }
    if tally.broken.is_some() {
        // Nothing more will come: stop waiting for this subscriber's share.
        accounted.add(events.saturating_sub(tally.accounted()));
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::workload::sent_nanos;

    fn workload(events: u64) -> Workload {
        Workload {
            subscribers: 2,
            events,
            payload_bytes: 32,
            rate: None,
            window: 0,
            timeout: Duration::from_secs(10),
        }
    }

    /// A loopback "system": every tick the publisher sends reaches each subscriber.
    #[tokio::test]
    async fn counts_every_delivery_of_a_lossless_system() {
        let clock = Clock::start();
        let (tx_a, rx_a) = tokio::sync::mpsc::unbounded_channel::<Arrival>();
        let (tx_b, rx_b) = tokio::sync::mpsc::unbounded_channel::<Arrival>();
        let subscribers = vec![
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx_a).boxed(),
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx_b).boxed(),
        ];
        let measurement = drive(&workload(20), clock, subscribers, |mut ticks| async move {
            while let Some(payload) = ticks.next().await {
                let sent = sent_nanos(&payload).expect("a tick");
                for tx in [&tx_a, &tx_b] {
                    let _ = tx.send(Arrival::Tick { sent_nanos: sent });
                }
            }
            Ok(())
        })
        .await
        .expect("the run completes");
        assert_eq!(measurement.sent, 20);
        assert_eq!(measurement.expected, 40);
        assert_eq!(measurement.delivered, 40);
        assert_eq!(measurement.lost(), 0);
        assert_eq!(measurement.latency.len(), 40);
        assert!(measurement.broken.is_none());
    }

    #[tokio::test]
    async fn reported_drops_and_broken_subscriptions_end_the_wait() {
        let subscribers = vec![
            stream::iter([Arrival::Missed(3)])
                .chain(stream::pending())
                .boxed(),
            stream::iter([Arrival::Broken("reset".to_owned())]).boxed(),
        ];
        let measurement = drive(
            &workload(3),
            Clock::start(),
            subscribers,
            |ticks| async move {
                ticks.for_each(|_| async {}).await;
                Ok(())
            },
        )
        .await
        .expect("the run completes");
        assert_eq!(measurement.delivered, 0);
        assert_eq!(measurement.reported_missed, 3);
        assert_eq!(measurement.lost(), 6);
        assert_eq!(measurement.broken_subscribers, 1);
        assert_eq!(measurement.broken.as_deref(), Some("reset"));
        assert_eq!(measurement.latency_at(0.5), None);
    }
}

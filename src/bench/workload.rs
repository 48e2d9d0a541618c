//! The workload every system under test gets: the same count of subscribers,
//! the same `herald.bench.v1.Tick` payloads of the same size, offered as fast as
//! the publisher takes them or paced at a fixed rate. Each tick carries its send
//! time against one monotonic origin that publisher and subscribers share (they
//! live in this process), so publish-to-receive latency needs no clock sync.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::Stream;
use prost::Message;
use tokio::time::MissedTickBehavior;

use crate::pb::bench::Tick;

/// What each system is asked to carry.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Subscribers, each on its own connection.
    pub subscribers: usize,
    /// Events the publisher fires; each reaches every subscriber.
    pub events: u64,
    /// Size of each encoded `Tick` payload (at least the 9 bytes of its timestamp).
    pub payload_bytes: usize,
    /// Events per second to offer (open loop, for latency); `None` = as fast
    /// as the system carries them, see `window`.
    pub rate: Option<u32>,
    /// Without a rate, the publisher stays at most this many events ahead of
    /// the slowest subscriber, so that what is measured is the rate the system
    /// sustains, not how fast its buffers fill (or, for Herald, how many events
    /// a full queue drops). 0 = no limit.
    pub window: u64,
    /// The most one system's run may take from its first send; then whatever
    /// arrived is reported and the rest counts as lost.
    pub timeout: Duration,
}

impl Workload {
    /// Deliveries a lossless run makes: every event to every subscriber.
    pub fn expected_deliveries(&self) -> u64 {
        self.events.saturating_mul(self.subscribers as u64)
    }
}

/// Nanoseconds since one origin, taken from the monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    pub fn start() -> Self {
        Self {
            origin: Instant::now(),
        }
    }

    /// Nanoseconds since the origin; never 0, so a stamped tick always
    /// carries its timestamp on the wire (proto3 omits zero fields).
    pub fn now_nanos(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

/// How many deliveries each subscriber has accounted for (received, or
/// reported dropped), so that the publisher can stay within its window.
#[derive(Debug)]
pub struct Progress {
    per_subscriber: Vec<AtomicU64>,
}

impl Progress {
    pub fn new(subscribers: usize) -> Self {
        Self {
            per_subscriber: (0..subscribers).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn add(&self, subscriber: usize, count: u64) {
        if let Some(accounted) = self.per_subscriber.get(subscriber) {
            accounted.fetch_add(count, Ordering::AcqRel);
        }
    }

    /// Deliveries accounted for by all subscribers together.
    pub fn total(&self) -> u64 {
        self.per_subscriber
            .iter()
            .map(|n| n.load(Ordering::Acquire))
            .sum()
    }

    /// What the slowest subscriber has accounted for.
    pub fn slowest(&self) -> u64 {
        self.per_subscriber
            .iter()
            .map(|n| n.load(Ordering::Acquire))
            .min()
            .unwrap_or(u64::MAX)
    }
}

/// How often a publisher at the end of its window looks again.
const WINDOW_POLL: Duration = Duration::from_millis(1);

/// A publisher whose window has not moved for this long sends anyway: the
/// deliveries it waits for were lost without a word, and will count as lost.
const WINDOW_STALL: Duration = Duration::from_secs(1);

/// When the publisher sent its first and last tick, as [`Clock`] nanoseconds.
#[derive(Debug, Default)]
pub struct SendLog {
    first: AtomicU64,
    last: AtomicU64,
    sent: AtomicU64,
}

impl SendLog {
    fn record(&self, nanos: u64) {
        let _ = self
            .first
            .compare_exchange(0, nanos, Ordering::AcqRel, Ordering::Acquire);
        self.last.store(nanos, Ordering::Release);
        self.sent.fetch_add(1, Ordering::AcqRel);
    }

    /// The first send, if any.
    pub fn first(&self) -> Option<u64> {
        Some(self.first.load(Ordering::Acquire)).filter(|&n| n > 0)
    }

    pub fn last(&self) -> Option<u64> {
        Some(self.last.load(Ordering::Acquire)).filter(|&n| n > 0)
    }

    /// Ticks handed to the publisher so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }
}

/// The filler length that makes an encoded `Tick` exactly `payload_bytes` long.
/// Below 12 bytes there is no room for filler and a tick is its 9-byte timestamp.
pub fn filler_len(payload_bytes: usize) -> usize {
    // sent_nanos: 1 tag byte + 8 bytes; filler: 1 tag byte + a length varint.
    const FIXED: usize = 1 + 8 + 1;
    let mut filler = payload_bytes.saturating_sub(FIXED);
    while filler > 0 && FIXED + prost::length_delimiter_len(filler) + filler > payload_bytes {
        filler -= 1;
    }
    filler
}

/// The workload's ticks, each stamped with the clock at the moment the
/// publisher pulls it. Paced at `workload.rate` when set: a late tick is sent at
/// once (the offered rate is kept on average, not skipped). Otherwise held to
/// `workload.window` events ahead of the slowest subscriber in `progress`.
pub fn ticks(
    workload: &Workload,
    clock: Clock,
    log: Arc<SendLog>,
    progress: Arc<Progress>,
) -> impl Stream<Item = Bytes> + Send + use<> {
    let events = workload.events;
    let rate = workload.rate;
    let window = workload.window;
    let filler = vec![0xA5; filler_len(workload.payload_bytes)];
    async_stream::stream! {
        let mut pace = rate.map(|rate| {
            let mut interval =
                tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
            interval.set_missed_tick_behavior(MissedTickBehavior::Burst);
            interval
        });
        for seq in 0..events {
            match pace.as_mut() {
                Some(interval) => {
                    interval.tick().await;
                }
                None if window > 0 => wait_for_window(&progress, seq, window).await,
                None => {}
            }
            let sent_nanos = clock.now_nanos();
            log.record(sent_nanos);
            yield Bytes::from(
                Tick {
                    sent_nanos,
                    filler: filler.clone(),
                }
                .encode_to_vec(),
            );
        }
    }
}

/// Waits until sending event `seq` keeps the publisher within `window` events
/// of the slowest subscriber, or until the window has stalled.
async fn wait_for_window(progress: &Progress, seq: u64, window: u64) {
    let mut slowest = progress.slowest();
    let mut moved = tokio::time::Instant::now();
    while slowest.saturating_add(window) <= seq {
        if moved.elapsed() >= WINDOW_STALL {
            return;
        }
        tokio::time::sleep(WINDOW_POLL).await;
        let now = progress.slowest();
        if now != slowest {
            slowest = now;
            moved = tokio::time::Instant::now();
        }
    }
}

/// The send time a received payload carries, or `None` if it is not a `Tick`.
pub fn sent_nanos(payload: &[u8]) -> Option<u64> {
    Tick::decode(payload)
        .ok()
        .map(|tick| tick.sent_nanos)
        .filter(|&nanos| nanos > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tick_is_encoded_at_the_requested_size() {
        for size in [12, 64, 137, 138, 256, 1024, 70_000] {
            let tick = Tick {
                sent_nanos: u64::MAX,
                filler: vec![0; filler_len(size)],
            };
            assert_eq!(tick.encoded_len(), size, "payload of {size} bytes");
        }
        // Too small to hold more than the 9-byte timestamp.
        assert_eq!(filler_len(4), 0);
        assert_eq!(filler_len(11), 0);
    }

    #[tokio::test]
    async fn ticks_are_stamped_in_order_and_counted() {
        use futures::StreamExt;

        let workload = Workload {
            subscribers: 1,
            events: 5,
            payload_bytes: 64,
            rate: None,
            window: 0,
            timeout: Duration::from_secs(1),
        };
        let log = Arc::new(SendLog::default());
        let progress = Arc::new(Progress::new(1));
        let stamps: Vec<u64> = ticks(&workload, Clock::start(), Arc::clone(&log), progress)
            .map(|payload| sent_nanos(&payload).expect("a tick"))
            .collect()
            .await;
        assert_eq!(stamps.len(), 5);
        assert!(stamps.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(log.sent(), 5);
        assert_eq!(log.first(), stamps.first().copied());
        assert_eq!(log.last(), stamps.last().copied());
    }
}

//! The fire path's entrance to durable delivery: match the event against the
//! in-memory subscription index, hand it to the writer, and resolve once the
//! event and its deliveries are committed. The writer batches whatever fires
//! arrive while it commits into the next transaction (group commit), so
//! throughput is not bounded by one fsync per event. Deliveries this node's
//! dispatcher has room for are stored already claimed and handed to it in
//! memory (see [`super::handoff`]).

use std::sync::Arc;

use futures::{FutureExt, future::BoxFuture};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::{handoff::Handoff, index::SubscriptionIndex};
use crate::{
    broker::{BrokerError, DurableFanOut, SharedEvent},
    store::{ClaimedDelivery, EnqueueItem, EnqueueOptions, Store, now_micros},
};

/// Fires waiting for the writer. When full, publishers wait (backpressure)
/// instead of the broker buffering without bound.
pub const WRITER_QUEUE: usize = 8192;

/// Most events committed in one transaction.
pub const MAX_BATCH: usize = 1024;

struct WriteRequest {
    item: EnqueueItem,
    /// How many deliveries were stored (targets unsubscribed meanwhile are not).
    done: oneshot::Sender<Result<u32, BrokerError>>,
}

/// Implements [`DurableFanOut`] for the broker.
pub struct DeliveryQueue {
    index: Arc<SubscriptionIndex>,
    writer: mpsc::Sender<WriteRequest>,
}

impl DeliveryQueue {
    /// The queue and the writer loop to spawn. The loop ends when `stop` is
    /// cancelled, after committing what it was given until then; later fires
    /// fail with "shutting down".
    pub fn new(
        index: Arc<SubscriptionIndex>,
        writer: Writer,
        stop: CancellationToken,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (sender, requests) = mpsc::channel(WRITER_QUEUE);
        (
            Self {
                index,
                writer: sender,
            },
            write_loop(writer, requests, stop),
        )
    }
}

impl DurableFanOut for DeliveryQueue {
    fn enqueue(&self, event: Arc<SharedEvent>) -> BoxFuture<'static, Result<u32, BrokerError>> {
        let fired = event.event();
        let targets = self.index.targets(&fired.contract, &fired.operation);
        if targets.is_empty() {
            return futures::future::ready(Ok(0)).boxed();
        }
        let (done, committed) = oneshot::channel();
        let request = WriteRequest {
            item: EnqueueItem {
                event,
                targets,
                claimed: false,
            },
            done,
        };
        // Submitted now, so that submission order is firing order; only a
        // full queue defers the submission into the returned future.
        let deferred = match self.writer.try_send(request) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(request)) => Some((self.writer.clone(), request)),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return futures::future::ready(Err(BrokerError::ShuttingDown)).boxed();
            }
        };
        async move {
            if let Some((writer, request)) = deferred {
                writer
                    .send(request)
                    .await
                    .map_err(|_| BrokerError::ShuttingDown)?;
            }
            committed.await.map_err(|_| BrokerError::ShuttingDown)?
        }
        .boxed()
    }
}

/// What the writer needs besides its requests.
pub struct Writer {
    pub store: Arc<dyn Store>,
    /// Woken after each commit of pending deliveries.
    pub wake_dispatcher: Arc<Notify>,
    pub handoff: Handoff,
    /// This node's name and lease, for deliveries stored as claimed.
    pub node: String,
    pub lease: std::time::Duration,
}

async fn write_loop(
    writer: Writer,
    mut requests: mpsc::Receiver<WriteRequest>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let received = tokio::select! {
            received = requests.recv_many(&mut batch, MAX_BATCH) => received,
            () = stop.cancelled() => {
                // Refuse new work, then commit what is already queued.
                requests.close();
                requests.recv_many(&mut batch, MAX_BATCH).await
            }
        };
        if received == 0 {
            return;
        }
        writer.commit(&mut batch).await;
    }
}

impl Writer {
    /// Commits one batch and tells each waiting publisher the result. If the
    /// batch fails as a whole, its events are committed one at a time, so that an
    /// event the database refuses fails only its own publisher.
    async fn commit(&self, batch: &mut Vec<WriteRequest>) {
        let (mut items, waiters): (Vec<_>, Vec<_>) =
            batch.drain(..).map(|r| (r.item, r.done)).unzip();
        match self.store_items(&mut items).await {
            Ok(stored) => {
                for (waiter, count) in waiters.into_iter().zip(stored) {
                    let _ = waiter.send(Ok(count));
                }
            }
            Err(error) if items.len() == 1 => {
                for waiter in waiters {
                    let _ = waiter.send(Err(error.clone()));
                }
            }
            Err(_) => {
                warn!(
                    events = items.len(),
                    "a batch of persistent deliveries failed; committing its events one at a time"
                );
                for (item, waiter) in items.iter_mut().zip(waiters) {
                    let result = self
                        .store_items(std::slice::from_mut(item))
                        .await
                        .map(|stored| stored.first().copied().unwrap_or(0));
                    let _ = waiter.send(result);
                }
            }
        }
    }

    /// Stores the events and their deliveries in one transaction, hands this
    /// node's share of the deliveries to the dispatcher, and says how many
    /// deliveries each event got.
    async fn store_items(&self, items: &mut [EnqueueItem]) -> Result<Vec<u32>, BrokerError> {
        for item in items.iter_mut() {
            item.claimed = self.handoff.reserve(item.targets.len());
        }
        let options = EnqueueOptions {
            now: now_micros(),
            node: self.node.clone(),
            lease: self.lease,
        };
        match self.store.enqueue(items, &options).await {
            Ok(ids) => {
                self.hand_over(items, &ids, options.now);
                if items.iter().any(|item| !item.claimed) {
                    self.wake_dispatcher.notify_one();
                }
                Ok(ids
                    .iter()
                    .map(|item_ids| {
                        let stored = item_ids.iter().filter(|id| id.is_some()).count();
                        u32::try_from(stored).unwrap_or(u32::MAX)
                    })
                    .collect())
            }
            Err(error) => {
                error!(events = items.len(), %error, "could not queue persistent deliveries; the publishers get an error");
                let reserved = items
                    .iter()
                    .filter(|i| i.claimed)
                    .map(|i| i.targets.len())
                    .sum();
                self.handoff.unreserve(reserved);
                Err(BrokerError::Store(error.to_string()))
            }
        }
    }

    fn hand_over(&self, items: &[EnqueueItem], ids: &[Vec<Option<i64>>], created_at: i64) {
        for (item, item_ids) in items.iter().zip(ids) {
            if !item.claimed {
                continue;
            }
            for (target, id) in item.targets.iter().zip(item_ids) {
                match id {
                    Some(id) => self.handoff.hand_over(ClaimedDelivery {
                        id: *id,
                        address: target.address.clone(),
                        secret: target.secret.clone(),
                        attempts: 1,
                        created_at,
                        event: Arc::clone(&item.event),
                    }),
                    // The subscription went away meanwhile: no delivery.
                    None => self.handoff.unreserve(1),
                }
            }
        }
    }
}

//! The fire path's entrance to durable delivery: match the event against the
//! in-memory subscription index, hand it to the writer, and resolve once the
//! event and its deliveries are committed. The writer batches whatever fires
//! arrive while it commits into the next transaction (group commit), so
//! throughput is not bounded by one fsync per event.

use std::sync::Arc;

use futures::{FutureExt, future::BoxFuture};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::error;

use super::index::SubscriptionIndex;
use crate::{
    broker::{BrokerError, DurableFanOut, SharedEvent},
    store::{EnqueueItem, Store},
};

/// Fires waiting for the writer. When full, publishers wait (backpressure)
/// instead of the broker buffering without bound.
pub const WRITER_QUEUE: usize = 8192;

/// Most events committed in one transaction.
pub const MAX_BATCH: usize = 1024;

struct WriteRequest {
    item: EnqueueItem,
    done: oneshot::Sender<Result<(), BrokerError>>,
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
        store: Arc<dyn Store>,
        wake_dispatcher: Arc<Notify>,
        stop: CancellationToken,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (writer, requests) = mpsc::channel(WRITER_QUEUE);
        (
            Self { index, writer },
            write_loop(store, requests, wake_dispatcher, stop),
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
        let count = u32::try_from(targets.len()).unwrap_or(u32::MAX);
        let (done, committed) = oneshot::channel();
        let request = WriteRequest {
            item: EnqueueItem { event, targets },
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
            committed.await.map_err(|_| BrokerError::ShuttingDown)??;
            Ok(count)
        }
        .boxed()
    }
}

async fn write_loop(
    store: Arc<dyn Store>,
    mut requests: mpsc::Receiver<WriteRequest>,
    wake_dispatcher: Arc<Notify>,
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
        commit(store.as_ref(), &mut batch, &wake_dispatcher).await;
    }
}

/// Commits one batch and tells each waiting publisher the result.
async fn commit(store: &dyn Store, batch: &mut Vec<WriteRequest>, wake_dispatcher: &Notify) {
    let (items, waiters): (Vec<_>, Vec<_>) = batch.drain(..).map(|r| (r.item, r.done)).unzip();
    let result = store.enqueue(&items).await;
    if let Err(error) = &result {
        error!(events = items.len(), %error, "could not queue persistent deliveries; the publishers get an error");
    } else {
        wake_dispatcher.notify_one();
    }
    for waiter in waiters {
        let _ = waiter.send(
            result
                .as_ref()
                .map(|_| ())
                .map_err(|e| BrokerError::Store(e.to_string())),
        );
    }
}

//! Persistent delivery: subscriptions stored as addresses, an in-memory index
//! the fire path matches against, a durable queue written in group commits,
//! and a dispatcher that calls subscribers through bindings with retries and
//! dead letters. [`Persistence`] starts and stops all of it.

pub mod address;
pub mod admin;
pub mod binding;
pub mod dispatcher;
pub mod handoff;
pub mod index;
pub mod queue;
pub mod retry;

use std::{sync::Arc, time::Duration};

use thiserror::Error;
use tokio::sync::Notify;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

pub use admin::{Admin, AdminError, SubscriptionQuery};
pub use binding::{BindingError, BindingOptions};
pub use dispatcher::DispatcherOptions;

use crate::{
    broker::{ContractRegistry, DurableFanOut},
    store::{ChangeStream, Store, StoreError},
};

/// How often the index is rebuilt even without a change notification, in case
/// one was missed while a listener reconnected.
const INDEX_REFRESH: Duration = Duration::from_secs(30);

/// How often events with no delivery left are deleted.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Default)]
pub struct DeliveryOptions {
    pub dispatcher: DispatcherOptions,
    pub bindings: BindingOptions,
}

#[derive(Debug, Error)]
pub enum PersistenceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Binding(#[from] BindingError),
}

/// The running persistent-delivery subsystem.
pub struct Persistence {
    store: Arc<dyn Store>,
    queue: Arc<queue::DeliveryQueue>,
    admin: Admin,
    /// Cancelled to stop the dispatcher and the housekeeping loops.
    stop: CancellationToken,
    background: TaskTracker,
    /// Cancelled first at shutdown: the writer commits what it holds and ends.
    stop_writer: CancellationToken,
    writer: TaskTracker,
}

impl Persistence {
    /// Loads the subscription index and starts the writer, the dispatcher and
    /// the housekeeping loops.
    pub async fn start(
        store: Arc<dyn Store>,
        registry: Arc<ContractRegistry>,
        options: DeliveryOptions,
    ) -> Result<Self, PersistenceError> {
        // Listen before loading, so that no change falls between the two.
        let changes = store.changes().await?;
        let index = Arc::new(index::SubscriptionIndex::default());
        index.reload(store.as_ref()).await?;
        let wake = Arc::new(Notify::new());
        let bindings = Arc::new(binding::Bindings::new(
            Arc::clone(&registry),
            &options.bindings,
        )?);
        let stop = CancellationToken::new();
        let stop_writer = CancellationToken::new();
        let (handoff, intake) = handoff::channel(options.dispatcher.max_in_flight);
        let (queue, write_loop) = queue::DeliveryQueue::new(
            Arc::clone(&index),
            queue::Writer {
                store: Arc::clone(&store),
                wake_dispatcher: Arc::clone(&wake),
                handoff,
                node: options.dispatcher.node.clone(),
                lease: options.dispatcher.lease,
            },
            stop_writer.clone(),
        );
        let background = TaskTracker::new();
        let writer = TaskTracker::new();
        writer.spawn(write_loop);
        writer.close();

        let dispatcher = dispatcher::Dispatcher::new(
            Arc::clone(&store),
            bindings,
            Arc::clone(&index),
            intake,
            options.dispatcher.clone(),
        );
        background.spawn(dispatcher.run(Arc::clone(&wake), stop.clone()));
        background.spawn(keep_index_fresh(
            Arc::clone(&store),
            Arc::clone(&index),
            changes,
            stop.clone(),
        ));
        background.spawn(purge_delivered(Arc::clone(&store), stop.clone()));
        background.close();
        info!(
            backend = store.backend(),
            subscriptions = index.len(),
            node = %options.dispatcher.node,
            "persistent delivery started"
        );
        Ok(Self {
            admin: Admin {
                store: Arc::clone(&store),
                index,
                registry,
                wake_dispatcher: wake,
            },
            queue: Arc::new(queue),
            store,
            stop,
            background,
            stop_writer,
            writer,
        })
    }

    /// What the broker fires persistent deliveries into.
    pub fn durable(&self) -> Arc<dyn DurableFanOut> {
        Arc::clone(&self.queue) as Arc<dyn DurableFanOut>
    }

    pub fn admin(&self) -> Admin {
        self.admin.clone()
    }

    /// Stops after the broker stopped firing: the writer commits what it was
    /// given, the dispatcher lets calls in flight finish and returns the rest
    /// of its claims to the queue, and the store closes.
    pub async fn shutdown(self) {
        let Persistence {
            store,
            stop,
            background,
            stop_writer,
            writer,
            ..
        } = self;
        stop_writer.cancel();
        if tokio::time::timeout(Duration::from_secs(30), writer.wait())
            .await
            .is_err()
        {
            warn!("the queue writer did not finish in time");
        }
        debug!("queue writer finished");
        stop.cancel();
        background.wait().await;
        debug!("dispatcher and housekeeping finished");
        store.close().await;
        info!("persistent delivery stopped");
    }
}

/// Rebuilds the index when another node changes subscriptions (PostgreSQL
/// LISTEN/NOTIFY) and every [`INDEX_REFRESH`] in any case. When the change
/// feed fails it is opened again, and the index reloaded, since changes may
/// have been missed in between.
async fn keep_index_fresh(
    store: Arc<dyn Store>,
    index: Arc<index::SubscriptionIndex>,
    mut changes: Option<ChangeStream>,
    stop: CancellationToken,
) {
    use futures::StreamExt;
    let shared_backend = changes.is_some();
    loop {
        let notified = async {
            match changes.as_mut() {
                Some(stream) => stream.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            item = notified => {
                if !matches!(item, Some(Ok(()))) {
                    warn!("the subscription change feed failed; listening again");
                    changes = None;
                }
            }
            () = tokio::time::sleep(INDEX_REFRESH) => {}
        }
        if shared_backend && changes.is_none() {
            match store.changes().await {
                Ok(stream) => changes = stream,
                Err(error) => {
                    warn!(%error, "cannot listen for subscription changes; relying on periodic refresh")
                }
            }
        }
        if let Err(error) = index.reload(store.as_ref()).await {
            warn!(%error, "could not reload persistent subscriptions");
        }
    }
}

async fn purge_delivered(store: Arc<dyn Store>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(PURGE_INTERVAL) => {}
        }
        if let Err(error) = store.purge_delivered_events().await {
            warn!(%error, "could not delete delivered events");
        }
    }
}

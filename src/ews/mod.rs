//! The EWS adapter: subscribes to Exchange mailboxes with streaming, pull or
//! push notifications and fires every event on `herald.ews.v1.MailboxEvents`
//! in a broker, losing nothing across reconnects, restarts and throttling.
//!
//! How the parts fit:
//! - [`config`] reads the TOML file; [`client`] speaks HTTP/SOAP to Exchange
//!   with [`messages`] (requests and typed responses, parsed by [`xml`]);
//!   [`splitter`] cuts the streaming body into envelopes.
//! - [`streaming`], [`pull`] and [`push`] are the three ways to hear about
//!   events; all of them hand notifications to [`sink`], which fetches
//!   properties, de-duplicates, publishes through [`publish`] and closes gaps
//!   with SyncFolderItems. Each mailbox publishes on its own task (in
//!   streaming mode its [`lane`]), so one mailbox's slowness or throttling
//!   never delays another's events.
//! - [`store`] keeps the durable state; [`status`] shows each mailbox's state.
//! - [`fake`] is a fake Exchange server for tests, demos and the benchmark.

pub mod backoff;
pub mod bench;
pub mod client;
pub mod config;
pub mod fake;
pub mod lane;
pub mod messages;
pub mod publish;
pub mod pull;
pub mod push;
pub mod sink;
pub mod splitter;
pub mod status;
pub mod store;
pub mod streaming;
pub mod xml;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use self::{
    client::{Affinity, Ews, EwsError},
    config::{EwsConfig, Mailbox, Mode},
    publish::{PublishError, Publisher},
    status::{MailboxState, StatusBoard},
    store::{StateStore, StoreError},
};

/// How long a graceful stop may take (unsubscribing included).
pub const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ews(#[from] EwsError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("cannot listen for push notifications on {address}: {error}")]
    Listen {
        address: std::net::SocketAddr,
        error: std::io::Error,
    },
}

/// What every task of the adapter shares; cheap to clone.
#[derive(Clone)]
pub struct Shared {
    pub config: Arc<EwsConfig>,
    pub ews: Ews,
    pub store: StateStore,
    pub status: StatusBoard,
    pub publisher: Publisher,
    /// Cancelled when the adapter stops.
    pub cancel: CancellationToken,
}

impl Shared {
    /// Shows `mailbox` as backing off for `wait` because of `reason`, and
    /// waits; false if the adapter is stopping.
    pub async fn back_off(&self, mailbox: &str, wait: Duration, reason: String) -> bool {
        self.status
            .set(mailbox, MailboxState::BackingOff { wait, reason })
            .await;
        backoff::sleep(wait, &self.cancel).await
    }
}

/// Runs the adapter until `shutdown` resolves, then stops its tasks within
/// [`STOP_GRACE`]. In push mode `push_listener` is used when given, otherwise
/// `[push] listen` is bound.
pub async fn run(
    config: EwsConfig,
    push_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AdapterError> {
    let store = StateStore::open(&config.state).await?;
    let shared = Shared {
        ews: Ews::new(&config)?,
        publisher: Publisher::new(&config.broker, &config.source, config.retry)?,
        status: StatusBoard::new(store.clone()),
        store,
        config: Arc::new(config),
        cancel: CancellationToken::new(),
    };
    info!(
        url = %shared.config.url,
        mode = shared.config.mode.name(),
        mailboxes = shared.config.mailboxes.len(),
        broker = %shared.config.broker,
        "EWS adapter starting"
    );
    let tracker = TaskTracker::new();
    match shared.config.mode {
        Mode::Streaming => streaming::start(&shared, &tracker),
        Mode::Pull => pull::start(&shared, &tracker),
        Mode::Push => {
            let listener = match push_listener {
                Some(listener) => listener,
                None => {
                    let address = shared
                        .config
                        .push
                        .as_ref()
                        .map(|p| p.listen)
                        .unwrap_or(([127, 0, 0, 1], 0).into());
                    TcpListener::bind(address)
                        .await
                        .map_err(|error| AdapterError::Listen { address, error })?
                }
            };
            push::start(&shared, &tracker, listener);
        }
    }
    tracker.close();
    tokio::select! {
        () = shutdown => info!("EWS adapter stopping"),
        () = tracker.wait() => warn!("every adapter task ended"),
    }
    shared.cancel.cancel();
    if tokio::time::timeout(STOP_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!(grace = ?STOP_GRACE, "adapter tasks did not stop in time");
    }
    for mailbox in &shared.config.mailboxes {
        shared.status.stopped(&mailbox.address).await;
    }
    shared.store.close().await;
    info!("EWS adapter stopped");
    Ok(())
}

/// Unsubscribes the subscription a previous run stored for `mailbox` (it
/// still counts against Exchange's subscription limit), keeping its
/// watermark. Failures are logged: the subscription expires on its own.
pub async fn unsubscribe_stored(shared: &Shared, mailbox: &Mailbox) -> Result<(), StoreError> {
    let Some(stored) = shared.store.subscription(&mailbox.address).await? else {
        return Ok(());
    };
    if stored.subscription_id.is_empty() {
        return Ok(());
    }
    // Push subscriptions cannot be unsubscribed; the listener answers
    // Unsubscribe to their next notification instead.
    if stored.mode != Mode::Push.name() {
        let affinity = Affinity {
            anchor: stored
                .anchor
                .clone()
                .or_else(|| Some(mailbox.address.clone())),
            prefer_server_affinity: false,
            cookie: stored.cookie.clone(),
        };
        let body = messages::unsubscribe(&stored.subscription_id);
        let call = shared.ews.call(mailbox.impersonation(), &affinity, &body);
        match tokio::time::timeout(STOP_GRACE, call).await {
            Ok(Ok(answer)) => match messages::parse_status(&answer.body) {
                Ok(status) if !status.is_error() => {
                    info!(mailbox = %mailbox.address, subscription = %stored.subscription_id, "unsubscribed")
                }
                Ok(status) => {
                    info!(mailbox = %mailbox.address, code = %status.code, "old subscription already gone")
                }
                Err(error) => warn!(mailbox = %mailbox.address, %error, "cannot unsubscribe"),
            },
            Ok(Err(error)) => warn!(mailbox = %mailbox.address, %error, "cannot unsubscribe"),
            Err(_) => warn!(mailbox = %mailbox.address, "Unsubscribe timed out"),
        }
    }
    shared.store.clear_subscription_id(&mailbox.address).await
}

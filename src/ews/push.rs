//! Push notifications: Exchange POSTs SendNotification to our listener.
//!
//! The listener answers at once (OK, or Unsubscribe for a subscription id it
//! does not own, which is the only way to end a push subscription) and hands
//! the notification to its mailbox's task through a bounded queue; publishing
//! happens after the answer and never makes Exchange wait. When a mailbox's
//! queue is full the listener answers 503 and Exchange retries later.
//!
//! Each mailbox task checks that PreviousWatermark continues the stored
//! watermark (a gap triggers a catch-up), and recreates the subscription with
//! the last watermark when nothing at all, not even a StatusEvent, arrived for
//! `resubscribe_after` (twice StatusFrequency by default).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use dashmap::DashMap;
use tokio::{net::TcpListener, sync::mpsc, time::Instant};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::{
    Shared,
    backoff::{self, Backoff},
    client::EwsError,
    config::{Mailbox, Mode},
    messages::{self, Notification, SubscribeKind},
    sink::{self},
    status::MailboxState,
};

/// Notifications waiting for one mailbox's task. When full, the listener
/// answers 503 and Exchange sends the notification again later.
pub const MAILBOX_QUEUE: usize = 32;
/// Largest SendNotification body accepted.
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// How long a notification for an unknown subscription id waits while a
/// Subscribe is in flight (Exchange may push before its answer arrives).
const UNKNOWN_ID_GRACE: Duration = Duration::from_secs(3);

/// What the listener and the mailbox tasks share.
#[derive(Default)]
struct Listener {
    /// Which mailbox queue each live subscription id feeds.
    routes: DashMap<String, mpsc::Sender<Notification>>,
    /// Subscribe calls in flight.
    subscribing: AtomicUsize,
}

type Routes = Arc<Listener>;

pub fn start(shared: &Shared, tracker: &TaskTracker, listener: TcpListener) {
    let routes: Routes = Arc::new(Listener::default());
    for mailbox in &shared.config.mailboxes {
        tracker.spawn(run_mailbox(shared.clone(), mailbox.clone(), routes.clone()));
    }
    let app = Router::new()
        .fallback(receive)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(routes);
    let cancel = shared.cancel.clone();
    if let Ok(address) = listener.local_addr() {
        info!(%address, "push listener ready");
    }
    tracker.spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned());
        if let Err(error) = server.await {
            warn!(%error, "the push listener failed");
        }
    });
}

fn soap(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Handles one SendNotification from Exchange.
async fn receive(State(routes): State<Routes>, body: Bytes) -> Response {
    let notifications = match messages::parse_send_notification(&body) {
        Ok(notifications) => notifications,
        Err(error) => {
            warn!(%error, "unreadable push notification");
            return (StatusCode::BAD_REQUEST, "not a SendNotification request").into_response();
        }
    };
    let mut keep = true;
    for notification in notifications {
        let route = routes.route(&notification.subscription_id).await;
        match route {
            None => {
                info!(subscription = %notification.subscription_id, "notification for a subscription we do not own; answering Unsubscribe");
                keep = false;
            }
            Some(queue) => {
                if queue.try_send(notification).is_err() {
                    warn!("a mailbox queue is full; asking Exchange to retry");
                    return (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response();
                }
            }
        }
    }
    soap(StatusCode::OK, messages::send_notification_result(keep))
}

impl Listener {
    /// The queue for `id`, waiting a little for a Subscribe in flight.
    async fn route(&self, id: &str) -> Option<mpsc::Sender<Notification>> {
        let deadline = Instant::now() + UNKNOWN_ID_GRACE;
        loop {
            if let Some(queue) = self.routes.get(id).map(|r| r.clone()) {
                return Some(queue);
            }
            if self.subscribing.load(Ordering::SeqCst) == 0 || Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn run_mailbox(shared: Shared, mailbox: Mailbox, routes: Routes) {
    let address = mailbox.address.as_str();
    let (sender, mut queue) = mpsc::channel::<Notification>(MAILBOX_QUEUE);
    let stored = shared.store.subscription(address).await.ok().flatten();
    let mut watermark = stored
        .filter(|s| s.mode == Mode::Push.name())
        .and_then(|s| s.watermark);
    let mut subscription: Option<String> = None;
    let mut gap = true;
    // Periodic catch-ups advance the stored SyncState (see streaming.rs).
    let mut last_sync = Instant::now();
    // When the current subscription last heard from Exchange (or was
    // created). Only this moves the watchdog's deadline: the adapter's own
    // work (catch-ups, resyncs) says nothing about the subscription.
    let mut heard = Instant::now();
    let mut backoff = Backoff::new(shared.config.retry);
    let Some(push) = shared.config.push.clone() else {
        return;
    };
    while !shared.cancel.is_cancelled() {
        let Some(id) = subscription.clone() else {
            routes.subscribing.fetch_add(1, Ordering::SeqCst);
            let subscribed = subscribe(&shared, &mailbox, watermark.clone()).await;
            if let Ok((id, _)) = &subscribed {
                routes.routes.insert(id.clone(), sender.clone());
            }
            routes.subscribing.fetch_sub(1, Ordering::SeqCst);
            match subscribed {
                Ok((id, start)) => {
                    if watermark.is_none() {
                        watermark = start;
                    }
                    subscription = Some(id);
                    heard = Instant::now();
                    backoff.reset();
                }
                Err(EwsError::Cancelled) => break,
                Err(error) if error.code() == Some("ErrorInvalidWatermark") => {
                    warn!(
                        mailbox = address,
                        "watermark too old; resubscribing without it and resyncing"
                    );
                    watermark = None;
                    gap = true;
                }
                Err(error) => {
                    let reason = format!("Subscribe: {error}");
                    if !shared.back_off(address, backoff.next_wait(), reason).await {
                        break;
                    }
                }
            }
            continue;
        };
        if gap || last_sync.elapsed() >= shared.config.resync_interval {
            match sink::catch_up(&shared, &mailbox).await {
                Ok(_) => {
                    gap = false;
                    last_sync = Instant::now();
                }
                Err(error) if error.is_cancelled() => break,
                Err(error) => {
                    let wait = backoff.next_wait();
                    shared
                        .status
                        .set(
                            address,
                            MailboxState::Failed {
                                reason: format!("catch-up: {error}"),
                            },
                        )
                        .await;
                    if !backoff::sleep(wait, &shared.cancel).await {
                        break;
                    }
                    continue;
                }
            }
        }
        shared.status.set(address, MailboxState::Listening).await;
        let deadline = heard + push.resubscribe_after;
        let resync_at = last_sync + shared.config.resync_interval;
        let notification = tokio::select! {
            () = tokio::time::sleep_until(resync_at) => continue,
            notification = queue.recv() => notification,
            () = tokio::time::sleep_until(deadline) => {
                warn!(mailbox = address, silent = ?push.resubscribe_after, "nothing pushed, not even a StatusEvent; recreating the subscription");
                routes.routes.remove(&id);
                subscription = None;
                gap = true;
                continue;
            }
            () = shared.cancel.cancelled() => break,
        };
        let Some(notification) = notification else {
            break;
        };
        if notification.subscription_id != id {
            continue;
        }
        heard = Instant::now();
        if let (Some(previous), Some(last)) = (&notification.previous_watermark, &watermark)
            && previous != last
        {
            warn!(
                mailbox = address,
                "PreviousWatermark does not continue the stored watermark; catching up"
            );
            if let Err(error) = sink::catch_up(&shared, &mailbox).await {
                if error.is_cancelled() {
                    break;
                }
                warn!(mailbox = address, %error, "catch-up failed; retrying later");
                gap = true;
            }
        }
        match sink::deliver(&shared, &mailbox, &notification).await {
            Ok(_) => {
                if let Some(last) = notification.last_watermark() {
                    if let Err(error) = shared.store.save_watermark(address, last).await {
                        warn!(mailbox = address, %error, "cannot store the watermark");
                    }
                    watermark = Some(last.to_owned());
                }
            }
            Err(error) if error.is_cancelled() => break,
            Err(error) => {
                warn!(mailbox = address, %error, "cannot deliver a pushed notification; catching up");
                gap = true;
            }
        }
    }
    if let Some(id) = subscription {
        routes.routes.remove(&id);
    }
}

async fn subscribe(
    shared: &Shared,
    mailbox: &Mailbox,
    watermark: Option<String>,
) -> Result<(String, Option<String>), EwsError> {
    let Some(push) = &shared.config.push else {
        return Err(EwsError::Cancelled);
    };
    let kind = SubscribeKind::Push {
        status_frequency_minutes: push.status_frequency_minutes,
        url: push.public_url.clone(),
        watermark,
    };
    sink::subscribe_mailbox(shared, mailbox, Mode::Push, kind).await
}

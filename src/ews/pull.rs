//! Pull notifications: one task per mailbox calls GetEvents with the last
//! watermark every `interval_seconds`, at once again while MoreEvents is true,
//! and stores the watermark after every batch before asking for the next.
//!
//! Recovery: ErrorExpiredSubscription / ErrorSubscriptionNotFound resubscribe
//! with the last watermark (Exchange replays what came after it), at once the
//! first time and after a growing back-off while it keeps happening;
//! ErrorInvalidWatermark resubscribes without one. Both, like a restart, are
//! gaps closed by a catch-up from the stored SyncState.

use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::{
    Shared,
    backoff::{self, Backoff, Repeats},
    client::EwsError,
    config::{Mailbox, Mode},
    messages::{self, SubscribeKind},
    sink::{self, own_affinity, with_retry},
    status::MailboxState,
    unsubscribe_stored,
};

pub fn start(shared: &Shared, tracker: &TaskTracker) {
    for mailbox in &shared.config.mailboxes {
        tracker.spawn(run_mailbox(shared.clone(), mailbox.clone()));
    }
}

/// Codes after which the subscription is gone and must be recreated.
pub fn subscription_lost(code: &str) -> bool {
    matches!(
        code,
        "ErrorExpiredSubscription"
            | "ErrorSubscriptionNotFound"
            | "ErrorInvalidSubscription"
            | "ErrorInvalidPullSubscriptionId"
    )
}

async fn run_mailbox(shared: Shared, mailbox: Mailbox) {
    let address = mailbox.address.as_str();
    let stored = match shared.store.subscription(address).await {
        Ok(stored) => stored,
        Err(error) => {
            warn!(mailbox = address, %error, "cannot read the stored subscription");
            None
        }
    };
    // A crashed run's subscription still counts against Exchange's limits.
    if let Err(error) = unsubscribe_stored(&shared, &mailbox).await {
        warn!(mailbox = address, %error, "cannot clear the stored subscription");
    }
    let mut watermark = stored
        .filter(|s| s.mode == Mode::Pull.name())
        .and_then(|s| s.watermark);
    let mut subscription: Option<String> = None;
    let mut gap = true;
    // Periodic catch-ups advance the stored SyncState (see streaming.rs).
    let mut last_sync = Instant::now();
    let mut backoff = Backoff::new(shared.config.retry);
    // Paces resubscribing when the subscription keeps getting lost with no
    // working GetEvents in between.
    let mut losses = Repeats::new(shared.config.retry);
    let affinity = own_affinity(&mailbox);
    while !shared.cancel.is_cancelled() {
        let failure = match &subscription {
            None => match subscribe(&shared, &mailbox, watermark.clone()).await {
                Ok((id, start)) => {
                    subscription = Some(id);
                    if watermark.is_none() {
                        watermark = start;
                    }
                    continue;
                }
                Err(EwsError::Cancelled) => break,
                Err(error) if error.code() == Some("ErrorInvalidWatermark") => {
                    warn!(
                        mailbox = address,
                        "the stored watermark is too old; resubscribing without it and resyncing"
                    );
                    watermark = None;
                    gap = true;
                    continue;
                }
                Err(error) => format!("Subscribe: {error}"),
            },
            Some(_) if gap || last_sync.elapsed() >= shared.config.resync_interval => {
                match sink::catch_up(&shared, &mailbox).await {
                    Ok(_) => {
                        gap = false;
                        last_sync = Instant::now();
                        continue;
                    }
                    Err(error) if error.is_cancelled() => break,
                    Err(error) => format!("catch-up: {error}"),
                }
            }
            Some(id) => {
                shared.status.set(address, MailboxState::Polling).await;
                let body = messages::get_events(id, watermark.as_deref().unwrap_or_default());
                let result = with_retry(&shared, address, || async {
                    let answer = shared
                        .ews
                        .call(mailbox.impersonation(), &affinity, &body)
                        .await?;
                    messages::parse_get_events(&answer.body)?.map_err(EwsError::from_status)
                })
                .await;
                match result {
                    Ok(notification) => {
                        losses.progress();
                        let delivered = sink::deliver(&shared, &mailbox, &notification).await;
                        match delivered {
                            Ok(_) => {
                                backoff.reset();
                                if let Some(last) = notification.last_watermark() {
                                    if let Err(error) =
                                        shared.store.save_watermark(address, last).await
                                    {
                                        warn!(mailbox = address, %error, "cannot store the watermark");
                                    }
                                    watermark = Some(last.to_owned());
                                }
                                if notification.more_events {
                                    continue;
                                }
                                if !backoff::sleep(shared.config.pull.interval, &shared.cancel)
                                    .await
                                {
                                    break;
                                }
                                continue;
                            }
                            Err(error) if error.is_cancelled() => break,
                            Err(error) => format!("publishing: {error}"),
                        }
                    }
                    Err(EwsError::Cancelled) => break,
                    Err(error) if error.code().is_some_and(subscription_lost) => {
                        let wait = losses.occurred();
                        warn!(mailbox = address, %error, ?wait, "subscription lost; resubscribing with the last watermark");
                        subscription = None;
                        gap = true;
                        let reason = format!("the subscription keeps getting lost: {error}");
                        if !wait.is_zero() && !shared.back_off(address, wait, reason).await {
                            break;
                        }
                        continue;
                    }
                    Err(error) if error.code() == Some("ErrorInvalidWatermark") => {
                        warn!(
                            mailbox = address,
                            "watermark rejected; resubscribing without it and resyncing"
                        );
                        subscription = None;
                        watermark = None;
                        gap = true;
                        continue;
                    }
                    Err(error) => format!("GetEvents: {error}"),
                }
            }
        };
        if !shared.back_off(address, backoff.next_wait(), failure).await {
            break;
        }
    }
    if subscription.is_some()
        && let Err(error) = unsubscribe_stored(&shared, &mailbox).await
    {
        warn!(mailbox = address, %error, "cannot clear the stored subscription");
    }
}

/// Subscribes with `watermark` (if any); returns the id and start watermark.
async fn subscribe(
    shared: &Shared,
    mailbox: &Mailbox,
    watermark: Option<String>,
) -> Result<(String, Option<String>), EwsError> {
    let kind = SubscribeKind::Pull {
        timeout_minutes: shared.config.pull.timeout_minutes,
        watermark,
    };
    sink::subscribe_mailbox(shared, mailbox, Mode::Pull, kind).await
}

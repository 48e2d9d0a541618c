//! Streaming notifications: mailboxes are subscribed in groups of at most
//! `group_size` under one anchor (the alphabetically first mailbox), and each
//! group reads one long GetStreamingEvents response on its own connection.
//!
//! Affinity follows Exchange's rules: every request carries X-AnchorMailbox =
//! the group's anchor; Subscribe and GetStreamingEvents carry
//! X-PreferServerAffinity; the X-BackEndOverrideCookie returned by the first
//! Subscribe is echoed on every later request of the group.
//!
//! Reconnect discipline: ConnectionStatus Closed reopens at once with the same
//! ids (no gap); a socket error, garbage or `silence` without a byte reopens
//! with capped back-off and jitter and then catches up (a gap);
//! ErrorSubscriptionNotFound / ErrorInvalidSubscription for an id resubscribes
//! that mailbox and catches it up; ErrorMissedNotificationEvents keeps the
//! subscription and catches up. Notifications and catch-ups of a group are
//! processed in order by one task, behind a bounded queue, so reading the
//! stream never waits for GetItem or the broker unless that queue is full.

use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use tokio::{sync::mpsc, time::Instant};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::{
    Shared,
    backoff::{self, Backoff},
    client::{Affinity, EwsError},
    config::{Mailbox, Mode},
    messages::{self, ConnectionStatus, Notification, SubscribeKind},
    sink::{self, with_retry},
    splitter::EnvelopeSplitter,
    status::MailboxState,
    store::StoredSubscription,
    unsubscribe_stored,
};

/// Batches of work waiting for a group's processor. When full, the stream
/// reader waits (and Exchange's side of the connection buffers).
pub const GROUP_QUEUE: usize = 64;

/// Starts one task per group.
pub fn start(shared: &Shared, tracker: &TaskTracker) {
    for members in shared
        .config
        .mailboxes
        .chunks(shared.config.streaming.group_size)
    {
        let (work, queue) = mpsc::channel(GROUP_QUEUE);
        tracker.spawn(process(shared.clone(), queue, members.to_vec()));
        let group = Group {
            shared: shared.clone(),
            anchor: members[0].address.clone(),
            cookie: None,
            members: members
                .iter()
                .map(|mailbox| Member {
                    mailbox: mailbox.clone(),
                    subscription_id: None,
                    gap: true,
                    retry_at: None,
                    backoff: Backoff::new(shared.config.retry),
                })
                .collect(),
            work,
        };
        tracker.spawn(group.run());
    }
}

/// Work for a group's processor, done in order.
enum Work {
    Deliver(Vec<(Mailbox, Notification)>),
    CatchUp(Vec<Mailbox>),
}

struct Member {
    mailbox: Mailbox,
    subscription_id: Option<String>,
    /// True when events may have been missed since the last catch-up.
    gap: bool,
    /// When a failed Subscribe may be retried.
    retry_at: Option<Instant>,
    /// Spaces out the retries of a failing Subscribe.
    backoff: Backoff,
}

struct Group {
    shared: Shared,
    anchor: String,
    cookie: Option<String>,
    members: Vec<Member>,
    work: mpsc::Sender<Work>,
}

/// Why a stream ended.
enum Outcome {
    /// ConnectionStatus Closed: reopen at once, no gap.
    Closed,
    /// These subscription ids are gone: resubscribe them, then reopen.
    Resubscribe(Vec<String>),
    /// A mailbox's Subscribe may be retried now: reopen with it.
    Regroup,
    /// The connection broke: back off, reopen, catch up.
    Broken(String),
    /// Exchange is busy: wait this long.
    Busy(Duration),
    Cancelled,
}

impl Group {
    async fn run(mut self) {
        for member in &self.members {
            if let Err(error) = unsubscribe_stored(&self.shared, &member.mailbox).await {
                warn!(mailbox = %member.mailbox.address, %error, "cannot read the stored subscription");
            }
        }
        let mut backoff = Backoff::new(self.shared.config.retry);
        while !self.shared.cancel.is_cancelled() {
            self.subscribe_missing().await;
            let ids: Vec<String> = self
                .members
                .iter()
                .filter_map(|m| m.subscription_id.clone())
                .collect();
            if ids.is_empty() {
                let wait = backoff.next_wait();
                if !backoff::sleep(wait, &self.shared.cancel).await {
                    break;
                }
                continue;
            }
            match self.stream(&ids).await {
                Outcome::Closed => {
                    backoff.reset();
                    info!(anchor = %self.anchor, "stream closed by Exchange; reopening");
                }
                Outcome::Regroup => backoff.reset(),
                Outcome::Resubscribe(lost) => {
                    for member in &mut self.members {
                        if member
                            .subscription_id
                            .as_ref()
                            .is_some_and(|id| lost.contains(id))
                        {
                            warn!(mailbox = %member.mailbox.address, "subscription lost; resubscribing");
                            member.subscription_id = None;
                            member.gap = true;
                        }
                    }
                }
                Outcome::Broken(reason) => {
                    let wait = backoff.next_wait();
                    warn!(anchor = %self.anchor, %reason, ?wait, "stream broken; reconnecting after a pause");
                    self.mark_gap(&reason, wait).await;
                    if !backoff::sleep(wait, &self.shared.cancel).await {
                        break;
                    }
                }
                Outcome::Busy(wait) => {
                    self.mark_gap("Exchange is busy (ErrorServerBusy)", wait)
                        .await;
                    if !backoff::sleep(wait, &self.shared.cancel).await {
                        break;
                    }
                }
                Outcome::Cancelled => break,
            }
        }
        // Graceful stop: the subscriptions would otherwise count against
        // Exchange's limits until they expire.
        for member in &self.members {
            if member.subscription_id.is_some()
                && let Err(error) = unsubscribe_stored(&self.shared, &member.mailbox).await
            {
                warn!(mailbox = %member.mailbox.address, %error, "cannot clear the stored subscription");
            }
        }
    }

    async fn mark_gap(&mut self, reason: &str, wait: Duration) {
        for member in &mut self.members {
            member.gap = true;
            self.shared
                .status
                .set(
                    &member.mailbox.address,
                    MailboxState::BackingOff {
                        wait,
                        reason: reason.to_owned(),
                    },
                )
                .await;
        }
    }

    fn affinity(&self) -> Affinity {
        Affinity {
            anchor: Some(self.anchor.clone()),
            prefer_server_affinity: true,
            cookie: self.cookie.clone(),
        }
    }

    /// Subscribes every member without a subscription (the anchor first, as
    /// it is first in the list); a member that fails is retried later and
    /// never holds up the others.
    async fn subscribe_missing(&mut self) {
        let body = messages::subscribe(&sink::scope(&self.shared), &SubscribeKind::Streaming);
        let now = Instant::now();
        for index in 0..self.members.len() {
            let member = &self.members[index];
            if member.subscription_id.is_some() || member.retry_at.is_some_and(|at| at > now) {
                continue;
            }
            let mailbox = member.mailbox.clone();
            self.shared
                .status
                .set(&mailbox.address, MailboxState::Subscribing)
                .await;
            let affinity = self.affinity();
            let shared = self.shared.clone();
            let result = with_retry(&shared, &mailbox.address, || async {
                let answer = shared
                    .ews
                    .call(mailbox.impersonation(), &affinity, &body)
                    .await?;
                let subscribed =
                    messages::parse_subscribe(&answer.body)?.map_err(EwsError::from_status)?;
                Ok((subscribed, answer.backend_cookie))
            })
            .await;
            match result {
                Ok((subscribed, cookie)) => {
                    if self.cookie.is_none() {
                        self.cookie = cookie;
                    }
                    let stored = StoredSubscription {
                        mode: Mode::Streaming.name().to_owned(),
                        subscription_id: subscribed.subscription_id.clone(),
                        watermark: None,
                        cookie: self.cookie.clone(),
                        anchor: Some(self.anchor.clone()),
                    };
                    if let Err(error) = self
                        .shared
                        .store
                        .save_subscription(&mailbox.address, &stored)
                        .await
                    {
                        warn!(mailbox = %mailbox.address, %error, "cannot store the subscription");
                    }
                    let member = &mut self.members[index];
                    member.subscription_id = Some(subscribed.subscription_id);
                    member.retry_at = None;
                    member.backoff.reset();
                    self.shared
                        .status
                        .set(&mailbox.address, MailboxState::Subscribed)
                        .await;
                }
                Err(EwsError::Cancelled) => return,
                Err(error) => {
                    warn!(mailbox = %mailbox.address, %error, "cannot subscribe; other mailboxes go on");
                    let member = &mut self.members[index];
                    member.retry_at = Some(Instant::now() + member.backoff.next_wait());
                    self.shared
                        .status
                        .set(
                            &mailbox.address,
                            MailboxState::Failed {
                                reason: format!("Subscribe: {error}"),
                            },
                        )
                        .await;
                }
            }
        }
    }

    /// Opens GetStreamingEvents for `ids` and reads it until it ends.
    async fn stream(&mut self, ids: &[String]) -> Outcome {
        let config = &self.shared.config;
        let body = messages::get_streaming_events(
            ids.iter().map(String::as_str),
            config.streaming.connection_timeout_minutes,
        );
        let impersonate = self
            .members
            .iter()
            .find(|m| m.mailbox.address == self.anchor)
            .and_then(|m| m.mailbox.impersonation().map(str::to_owned));
        let affinity = self.affinity();
        let opened = tokio::select! {
            opened = self.shared.ews.open_stream(impersonate.as_deref(), &affinity, &body) => opened,
            () = self.shared.cancel.cancelled() => return Outcome::Cancelled,
        };
        let mut response = match opened {
            Ok(response) => response,
            Err(EwsError::Busy(wait)) => return Outcome::Busy(wait),
            Err(error) => return Outcome::Broken(format!("GetStreamingEvents: {error}")),
        };
        let by_id: HashMap<String, Mailbox> = self
            .members
            .iter()
            .filter_map(|m| m.subscription_id.clone().map(|id| (id, m.mailbox.clone())))
            .collect();
        let mut catch_up = Vec::new();
        for member in &mut self.members {
            if member.subscription_id.is_some() {
                self.shared
                    .status
                    .set(&member.mailbox.address, MailboxState::Streaming)
                    .await;
                if member.gap {
                    member.gap = false;
                    catch_up.push(member.mailbox.clone());
                }
            }
        }
        if !catch_up.is_empty() && self.work.send(Work::CatchUp(catch_up)).await.is_err() {
            return Outcome::Cancelled;
        }
        let next_retry = self
            .members
            .iter()
            .filter(|m| m.subscription_id.is_none())
            .filter_map(|m| m.retry_at)
            .min();
        let silence = config.streaming.silence;
        let mut splitter = EnvelopeSplitter::new();
        let mut lost: Vec<String> = Vec::new();
        loop {
            let chunk = tokio::select! {
                chunk = tokio::time::timeout(silence, response.chunk()) => chunk,
                () = self.shared.cancel.cancelled() => return Outcome::Cancelled,
                () = sleep_until(next_retry) => return Outcome::Regroup,
            };
            let chunk = match chunk {
                Err(_) => return Outcome::Broken(format!("no byte for {silence:?}")),
                Ok(Err(error)) => {
                    return Outcome::Broken(format!(
                        "connection failed: {}",
                        super::client::error_chain(&error)
                    ));
                }
                Ok(Ok(None)) => {
                    return match splitter.finish() {
                        Err(error) => self.unreadable(&error.to_string()),
                        Ok(()) if !lost.is_empty() => Outcome::Resubscribe(lost),
                        Ok(()) => Outcome::Broken(
                            "the stream ended without ConnectionStatus Closed".into(),
                        ),
                    };
                }
                Ok(Ok(Some(chunk))) => chunk,
            };
            splitter.push(&chunk);
            loop {
                let envelope = match splitter.next_envelope() {
                    Ok(Some(envelope)) => envelope,
                    Ok(None) => break,
                    Err(error) => return self.unreadable(&error.to_string()),
                };
                let messages = match messages::parse_streaming_envelope(&envelope) {
                    Ok(messages) => messages,
                    Err(error) => return self.unreadable(&error.to_string()),
                };
                for message in messages {
                    let mut batch = Vec::new();
                    for notification in message.notifications {
                        match by_id.get(&notification.subscription_id) {
                            Some(mailbox) => batch.push((mailbox.clone(), notification)),
                            None => {
                                warn!(anchor = %self.anchor, subscription = %notification.subscription_id, "notification for an unknown subscription")
                            }
                        }
                    }
                    if !batch.is_empty() && self.work.send(Work::Deliver(batch)).await.is_err() {
                        return Outcome::Cancelled;
                    }
                    if message.status.is_error() {
                        let code = message.status.code.as_str();
                        if message.error_subscription_ids.is_empty() {
                            // The whole request failed.
                            return match code {
                                "ErrorServerBusy" => Outcome::Busy(
                                    message.status.back_off.unwrap_or(Duration::from_secs(30)),
                                ),
                                "ErrorSubscriptionNotFound"
                                | "ErrorInvalidSubscription"
                                | "ErrorExpiredSubscription" => Outcome::Resubscribe(ids.to_vec()),
                                _ => Outcome::Broken(format!("{code}: {}", message.status.message)),
                            };
                        }
                        for id in &message.error_subscription_ids {
                            let mailbox = by_id.get(id).map(|m| m.address.as_str()).unwrap_or("?");
                            match code {
                                "ErrorMissedNotificationEvents" => {
                                    warn!(mailbox, "Exchange missed events; catching up");
                                    if let Some(mailbox) = by_id.get(id)
                                        && self
                                            .work
                                            .send(Work::CatchUp(vec![mailbox.clone()]))
                                            .await
                                            .is_err()
                                    {
                                        return Outcome::Cancelled;
                                    }
                                }
                                "ErrorNewEventStreamConnectionOpened" => {
                                    warn!(mailbox, "another stream opened this subscription");
                                }
                                _ => {
                                    warn!(mailbox, code, "subscription error");
                                    lost.push(id.clone());
                                }
                            }
                        }
                    }
                    match message.connection {
                        Some(ConnectionStatus::Closed) if lost.is_empty() => {
                            return Outcome::Closed;
                        }
                        Some(ConnectionStatus::Closed) => return Outcome::Resubscribe(lost),
                        _ if !lost.is_empty() => return Outcome::Resubscribe(lost),
                        _ => {}
                    }
                }
            }
        }
    }

    fn unreadable(&self, error: &str) -> Outcome {
        let mailboxes: Vec<&str> = self
            .members
            .iter()
            .map(|m| m.mailbox.address.as_str())
            .collect();
        warn!(anchor = %self.anchor, ?mailboxes, %error, "unreadable data in the stream; reconnecting");
        Outcome::Broken(format!("unreadable stream: {error}"))
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A group's processor: delivers notifications and runs catch-ups in order.
/// A failed catch-up is retried after a back-off, so a gap is never left open.
/// Every `resync_minutes` it catches every member up, which advances the
/// stored SyncStates and so bounds what a later catch-up has to go through.
async fn process(shared: Shared, mut queue: mpsc::Receiver<Work>, members: Vec<Mailbox>) {
    let mut pending: BTreeSet<Mailbox> = BTreeSet::new();
    let mut backoff = Backoff::new(shared.config.retry);
    let mut retry_at: Option<Instant> = None;
    let interval = shared.config.resync_interval;
    let mut resync = tokio::time::interval_at(Instant::now() + interval, interval);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Due catch-ups go before the notifications queued behind them.
        let work = tokio::select! {
            biased;
            () = shared.cancel.cancelled() => break,
            () = sleep_until(retry_at) => None,
            _ = resync.tick() => Some(Work::CatchUp(members.clone())),
            work = queue.recv() => match work {
                Some(work) => Some(work),
                None => break,
            },
        };
        match work {
            Some(Work::Deliver(batch)) => {
                if let Err(error) = sink::deliver(&shared, &batch).await {
                    if error.is_cancelled() {
                        break;
                    }
                    // The events may not have reached the broker: close the
                    // gap from the SyncState instead.
                    warn!(%error, "cannot deliver notifications; catching up instead");
                    pending.extend(batch.into_iter().map(|(mailbox, _)| mailbox));
                    retry_at = Some(Instant::now());
                }
            }
            Some(Work::CatchUp(mailboxes)) => {
                pending.extend(mailboxes);
                retry_at = Some(Instant::now());
            }
            None => {
                retry_at = None;
                let due: Vec<Mailbox> = std::mem::take(&mut pending).into_iter().collect();
                for mailbox in due {
                    let before = shared.status.get(&mailbox.address);
                    match sink::catch_up(&shared, &mailbox).await {
                        Ok(_) => {
                            backoff.reset();
                            let after = match before {
                                Some(MailboxState::CatchingUp) | None => MailboxState::Streaming,
                                Some(state) => state,
                            };
                            shared.status.set(&mailbox.address, after).await;
                        }
                        Err(error) if error.is_cancelled() => return,
                        Err(error) => {
                            let wait = backoff.next_wait();
                            shared
                                .status
                                .set(
                                    &mailbox.address,
                                    MailboxState::Failed {
                                        reason: format!("catch-up: {error}"),
                                    },
                                )
                                .await;
                            pending.insert(mailbox);
                            retry_at = Some(Instant::now() + wait);
                        }
                    }
                }
            }
        }
    }
}

//! Streaming notifications: mailboxes are subscribed in groups of at most
//! `group_size` under one anchor (the alphabetically first mailbox), and each
//! group reads one long GetStreamingEvents response on its own connection.
//!
//! Affinity follows Exchange's rules: every request carries X-AnchorMailbox =
//! the group's anchor; Subscribe and GetStreamingEvents carry
//! X-PreferServerAffinity; the X-BackEndOverrideCookie returned by the first
//! Subscribe is echoed on every later request of the group.
//!
//! One member never holds up its group: members are subscribed concurrently
//! (a bounded number at a time, the anchor's first and alone while the group
//! has no cookie, unless it takes too long); the stream opens with the
//! members that are subscribed, a failing member is retried on its own
//! back-off, and it joins the stream (one reopen, as GetStreamingEvents takes
//! a fixed list of ids) once subscribed.
//!
//! Reconnect discipline: ConnectionStatus Closed reopens at once with the same
//! ids (no gap); a socket error, garbage or `silence` without a byte reopens
//! with capped back-off and jitter and then catches up (a gap);
//! ErrorSubscriptionNotFound / ErrorInvalidSubscription for an id resubscribes
//! that mailbox and catches it up; ErrorMissedNotificationEvents keeps the
//! subscription and catches up. A stream the adapter closes itself (to
//! resubscribe a member or to add one) is a gap for every member on it.
//!
//! Notifications and catch-up requests go to each mailbox's own lane
//! ([`super::lane`]) without waiting, so reading the stream never waits for
//! GetItem, a catch-up or the broker, and a mailbox that is slow to publish
//! (a throttled GetItem, say) never delays the others of its group.

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::StreamExt;
use tokio::{
    sync::Semaphore,
    task::{self, JoinError, JoinSet},
    time::Instant,
};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::{
    Shared,
    backoff::{self, Backoff, Repeats},
    client::{Affinity, EwsError},
    config::{Mailbox, Mode},
    lane::{self, CATCH_UP_CONCURRENCY, LaneHandle},
    messages::{self, ConnectionStatus, SubscribeKind, Subscribed},
    sink::{self, with_retry},
    splitter::EnvelopeSplitter,
    status::MailboxState,
    store::StoredSubscription,
    unsubscribe_stored,
};

/// Subscribe calls one group has in flight at once. A member that hangs or
/// is throttled holds one of them, never the others; further members wait
/// for a free one.
const SUBSCRIBE_CONCURRENCY: usize = 8;
/// While a group has no affinity cookie, its first Subscribe (the anchor's)
/// goes alone so that the others can echo the cookie it returns. If it takes
/// longer than this, the others go ahead without the cookie (X-AnchorMailbox
/// still routes them to the anchor's backend).
const PILOT_PATIENCE: Duration = Duration::from_secs(2);
/// How long a stream about to open waits for the Subscribes in flight; then
/// it opens with the members already subscribed and the others join later.
const SETTLE: Duration = Duration::from_secs(3);
/// Members subscribed within this time of each other join the open stream
/// with one reopen.
const JOIN_DELAY: Duration = Duration::from_millis(500);
/// Starts one task per group, and one lane per mailbox.
pub fn start(shared: &Shared, tracker: &TaskTracker) {
    for members in shared
        .config
        .mailboxes
        .chunks(shared.config.streaming.group_size)
    {
        let catch_ups = Arc::new(Semaphore::new(CATCH_UP_CONCURRENCY));
        let group = Group {
            shared: shared.clone(),
            anchor: members[0].address.clone(),
            cookie: None,
            members: members
                .iter()
                .map(|mailbox| Member {
                    lane: lane::start(shared, tracker, mailbox, catch_ups.clone()),
                    mailbox: mailbox.clone(),
                    subscription: Subscription::Missing {
                        retry_at: Instant::now(),
                    },
                    stale: true,
                    gap: true,
                    backoff: Backoff::new(shared.config.retry),
                    losses: Repeats::new(shared.config.retry),
                })
                .collect(),
            attempts: JoinSet::new(),
            attempt_of: HashMap::new(),
            churn: Repeats::new(shared.config.retry),
        };
        tracker.spawn(group.run());
    }
}

/// Where a member's subscription stands.
enum Subscription {
    /// None; a Subscribe may start from `retry_at` on.
    Missing { retry_at: Instant },
    /// A Subscribe is in flight since then.
    Pending { since: Instant },
    /// Subscribed with this id.
    Active(String),
}

struct Member {
    mailbox: Mailbox,
    /// Where the member's notifications and catch-up requests go.
    lane: LaneHandle,
    subscription: Subscription,
    /// A previous run's subscription may still be stored: the first
    /// Subscribe unsubscribes it first.
    stale: bool,
    /// True when events may have been missed since the last catch-up.
    gap: bool,
    /// Spaces out the retries of a failing Subscribe.
    backoff: Backoff,
    /// Paces resubscribing when the subscription keeps getting lost with
    /// no event for it in between.
    losses: Repeats,
}

impl Member {
    fn id(&self) -> Option<&str> {
        match &self.subscription {
            Subscription::Active(id) => Some(id),
            _ => None,
        }
    }
}

/// What one Subscribe task returns: the subscription and the cookie set.
type SubscribeResult = Result<(Subscribed, Option<String>), EwsError>;

struct Group {
    shared: Shared,
    anchor: String,
    cookie: Option<String>,
    members: Vec<Member>,
    /// The Subscribe calls in flight, and the member each one is for.
    attempts: JoinSet<SubscribeResult>,
    attempt_of: HashMap<task::Id, usize>,
    /// Paces reopening when the group's stream keeps being taken over with
    /// no event in between.
    churn: Repeats,
}

/// Why a stream ended.
enum Outcome {
    /// ConnectionStatus Closed: reopen at once, no gap.
    Closed,
    /// These subscription ids are gone: resubscribe them, then reopen.
    Resubscribe(Vec<String>),
    /// The whole request failed for lost subscriptions: resubscribe all.
    ResubscribeAll,
    /// Another stream opened these subscriptions
    /// (ErrorNewEventStreamConnectionOpened) and Exchange closed this one.
    TakenOver,
    /// Members subscribed since the stream opened: reopen with them.
    Regroup,
    /// The connection broke: back off, reopen, catch up.
    Broken(String),
    /// Exchange is busy: wait this long.
    Busy(Duration),
    Cancelled,
}

impl Group {
    async fn run(mut self) {
        let mut backoff = Backoff::new(self.shared.config.retry);
        while !self.shared.cancel.is_cancelled() {
            if !self.gather().await {
                break;
            }
            let ids: Vec<String> = self
                .members
                .iter()
                .filter_map(|m| m.id().map(str::to_owned))
                .collect();
            match self.stream(&ids).await {
                Outcome::Closed => {
                    backoff.reset();
                    info!(anchor = %self.anchor, "stream closed by Exchange; reopening");
                }
                Outcome::Regroup => backoff.reset(),
                Outcome::Resubscribe(lost) => {
                    for index in 0..self.members.len() {
                        let member = &mut self.members[index];
                        if member.id().is_some_and(|id| lost.iter().any(|l| l == id)) {
                            let wait = member.losses.occurred();
                            self.resubscribe(index, wait).await;
                        }
                    }
                }
                Outcome::ResubscribeAll => {
                    // After the same wait, so that they open one stream.
                    let wait = self
                        .members
                        .iter_mut()
                        .filter(|m| m.id().is_some())
                        .map(|m| m.losses.occurred())
                        .max()
                        .unwrap_or_default();
                    for index in 0..self.members.len() {
                        if self.members[index].id().is_some() {
                            self.resubscribe(index, wait).await;
                        }
                    }
                }
                Outcome::TakenOver => {
                    // What the other stream got meanwhile is lost to this one.
                    let wait = self.churn.occurred();
                    warn!(anchor = %self.anchor, ?wait, "another stream took the subscriptions over; reopening");
                    self.mark_gap("another stream took the subscriptions over", wait)
                        .await;
                    if !backoff::sleep(wait, &self.shared.cancel).await {
                        break;
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
        // Subscribes in flight are abandoned; the subscriptions they may
        // create expire on their own.
        self.attempts.shutdown().await;
        // Graceful stop: the subscriptions would otherwise count against
        // Exchange's limits until they expire.
        let shared = &self.shared;
        futures::stream::iter(self.members.iter().filter(|m| m.id().is_some()))
            .for_each_concurrent(SUBSCRIBE_CONCURRENCY, |member| async move {
                if let Err(error) = unsubscribe_stored(shared, &member.mailbox).await {
                    warn!(mailbox = %member.mailbox.address, %error, "cannot clear the stored subscription");
                }
            })
            .await;
    }

    /// A member's subscription is gone: subscribe it again after `wait`.
    async fn resubscribe(&mut self, index: usize, wait: Duration) {
        let member = &mut self.members[index];
        warn!(mailbox = %member.mailbox.address, ?wait, "subscription lost; resubscribing");
        member.subscription = Subscription::Missing {
            retry_at: Instant::now() + wait,
        };
        member.gap = true;
        if !wait.is_zero() {
            let reason = "the subscription keeps getting lost".to_owned();
            self.shared
                .status
                .set(
                    &member.mailbox.address,
                    MailboxState::BackingOff { wait, reason },
                )
                .await;
        }
    }

    /// Subscribes the members that miss a subscription until the stream can
    /// open: at least one member is subscribed, and no Subscribe in flight
    /// started less than [`SETTLE`] ago (an older one, hanging or throttled,
    /// holds nobody up). False when stopping.
    async fn gather(&mut self) -> bool {
        loop {
            self.start_subscribes();
            let now = Instant::now();
            let subscribed = self.members.iter().any(|m| m.id().is_some());
            // When the youngest Subscribe in flight stops being waited for.
            let settled_at = self
                .members
                .iter()
                .filter_map(|m| match m.subscription {
                    Subscription::Pending { since } if since + SETTLE > now => Some(since + SETTLE),
                    _ => None,
                })
                .max();
            if subscribed && settled_at.is_none() {
                return true;
            }
            let wake = earliest(self.next_start(), settled_at.filter(|_| subscribed));
            tokio::select! {
                Some(joined) = self.attempts.join_next_with_id() => {
                    self.settle(joined).await;
                }
                () = sleep_until(wake) => {}
                () = self.shared.cancel.cancelled() => return false,
            }
        }
    }

    /// True while the group has no cookie and no subscription: its first
    /// Subscribe goes alone (see [`PILOT_PATIENCE`]).
    fn piloting(&self) -> bool {
        self.cookie.is_none() && !self.members.iter().any(|m| m.id().is_some())
    }

    /// When the oldest Subscribe in flight started.
    fn oldest_pending(&self) -> Option<Instant> {
        self.members
            .iter()
            .filter_map(|m| match m.subscription {
                Subscription::Pending { since } => Some(since),
                _ => None,
            })
            .min()
    }

    /// Starts a Subscribe for each member whose retry is due, as far as
    /// [`SUBSCRIBE_CONCURRENCY`] and the pilot rule allow.
    fn start_subscribes(&mut self) {
        let now = Instant::now();
        let mut room = SUBSCRIBE_CONCURRENCY.saturating_sub(self.attempts.len());
        if self.piloting() {
            match self.oldest_pending() {
                Some(since) if now < since + PILOT_PATIENCE => return,
                Some(_) => {}
                None => room = room.min(1),
            }
        }
        let body = messages::subscribe(&sink::scope(&self.shared), &SubscribeKind::Streaming);
        let affinity = self.affinity();
        for index in 0..self.members.len() {
            if room == 0 {
                break;
            }
            let member = &mut self.members[index];
            if !matches!(member.subscription, Subscription::Missing { retry_at } if retry_at <= now)
            {
                continue;
            }
            room -= 1;
            member.subscription = Subscription::Pending { since: now };
            let task = subscribe_member(
                self.shared.clone(),
                member.mailbox.clone(),
                affinity.clone(),
                body.clone(),
                std::mem::take(&mut member.stale),
            );
            let handle = self.attempts.spawn(task);
            self.attempt_of.insert(handle.id(), index);
        }
    }

    /// When [`Self::start_subscribes`] may have something new to start
    /// (None: only a Subscribe that ends can change that).
    fn next_start(&self) -> Option<Instant> {
        if self.attempts.len() >= SUBSCRIBE_CONCURRENCY {
            return None;
        }
        let retry = self
            .members
            .iter()
            .filter_map(|m| match m.subscription {
                Subscription::Missing { retry_at } => Some(retry_at),
                _ => None,
            })
            .min()?;
        match self.oldest_pending() {
            Some(since) if self.piloting() => Some(retry.max(since + PILOT_PATIENCE)),
            _ => Some(retry),
        }
    }

    /// Records how a Subscribe ended; true when a member got subscribed.
    async fn settle(&mut self, joined: Result<(task::Id, SubscribeResult), JoinError>) -> bool {
        let (task, result) = match joined {
            Ok(done) => done,
            Err(error) => {
                if let Some(index) = self.attempt_of.remove(&error.id()) {
                    self.subscribe_failed(index, format!("the Subscribe task ended: {error}"))
                        .await;
                }
                return false;
            }
        };
        let Some(index) = self.attempt_of.remove(&task) else {
            return false;
        };
        match result {
            Ok((subscribed, cookie)) => {
                if self.cookie.is_none() {
                    self.cookie = cookie;
                }
                let address = self.members[index].mailbox.address.clone();
                let stored = StoredSubscription {
                    mode: Mode::Streaming.name().to_owned(),
                    subscription_id: subscribed.subscription_id.clone(),
                    watermark: None,
                    cookie: self.cookie.clone(),
                    anchor: Some(self.anchor.clone()),
                };
                if let Err(error) = self.shared.store.save_subscription(&address, &stored).await {
                    warn!(mailbox = %address, %error, "cannot store the subscription");
                }
                let member = &mut self.members[index];
                member.subscription = Subscription::Active(subscribed.subscription_id);
                member.backoff.reset();
                self.shared
                    .status
                    .set(&address, MailboxState::Subscribed)
                    .await;
                true
            }
            Err(EwsError::Cancelled) => {
                self.members[index].subscription = Subscription::Missing {
                    retry_at: Instant::now(),
                };
                false
            }
            Err(error) => {
                self.subscribe_failed(index, format!("Subscribe: {error}"))
                    .await;
                false
            }
        }
    }

    async fn subscribe_failed(&mut self, index: usize, reason: String) {
        let member = &mut self.members[index];
        warn!(mailbox = %member.mailbox.address, %reason, "cannot subscribe; other mailboxes go on");
        member.subscription = Subscription::Missing {
            retry_at: Instant::now() + member.backoff.next_wait(),
        };
        self.shared
            .status
            .set(&member.mailbox.address, MailboxState::Failed { reason })
            .await;
    }

    /// Every member may miss events: each is caught up when the stream
    /// opens again. Those on the stream show the wait; the others keep
    /// showing why they have no subscription.
    async fn mark_gap(&mut self, reason: &str, wait: Duration) {
        for member in &mut self.members {
            member.gap = true;
            if member.id().is_none() {
                continue;
            }
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

    /// Opens GetStreamingEvents for `ids` and reads it until it ends.
    async fn stream(&mut self, ids: &[String]) -> Outcome {
        let body = messages::get_streaming_events(
            ids.iter().map(String::as_str),
            self.shared.config.streaming.connection_timeout_minutes,
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
        let by_id: HashMap<String, usize> = self
            .members
            .iter()
            .enumerate()
            .filter_map(|(index, m)| m.id().map(|id| (id.to_owned(), index)))
            .collect();
        let mut taken_over = false;
        for member in &mut self.members {
            if member.id().is_some() {
                self.shared
                    .status
                    .set(&member.mailbox.address, MailboxState::Streaming)
                    .await;
                if member.gap {
                    member.gap = false;
                    member.lane.catch_up();
                }
            }
        }
        let silence = self.shared.config.streaming.silence;
        let mut splitter = EnvelopeSplitter::new();
        let mut lost: Vec<String> = Vec::new();
        let mut last_byte = Instant::now();
        // When members subscribed meanwhile join (by reopening the stream).
        let mut join_at: Option<Instant> = None;
        loop {
            // Failing members are retried while the others stream.
            self.start_subscribes();
            let wake = self.next_start();
            let chunk = tokio::select! {
                chunk = tokio::time::timeout_at(last_byte + silence, response.chunk()) => chunk,
                () = self.shared.cancel.cancelled() => return Outcome::Cancelled,
                Some(joined) = self.attempts.join_next_with_id() => {
                    if self.settle(joined).await {
                        join_at.get_or_insert(Instant::now() + JOIN_DELAY);
                    }
                    continue;
                }
                () = sleep_until(wake) => continue,
                () = sleep_until(join_at) => return self.abandon(ids, Outcome::Regroup),
            };
            last_byte = Instant::now();
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
                        // Not the end Exchange announces: what it sent
                        // last may not have arrived.
                        Ok(()) if !lost.is_empty() => self.abandon(ids, Outcome::Resubscribe(lost)),
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
                    for notification in message.notifications {
                        match by_id.get(&notification.subscription_id) {
                            Some(&index) => {
                                // Events: the subscriptions work.
                                let member = &mut self.members[index];
                                member.losses.progress();
                                self.churn.progress();
                                member.lane.deliver(notification);
                            }
                            None => {
                                warn!(anchor = %self.anchor, subscription = %notification.subscription_id, "notification for an unknown subscription")
                            }
                        }
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
                                | "ErrorExpiredSubscription" => Outcome::ResubscribeAll,
                                _ => Outcome::Broken(format!("{code}: {}", message.status.message)),
                            };
                        }
                        for id in &message.error_subscription_ids {
                            let member = by_id.get(id).map(|&index| &self.members[index]);
                            let mailbox = member.map(|m| m.mailbox.address.as_str()).unwrap_or("?");
                            match code {
                                "ErrorMissedNotificationEvents" => {
                                    warn!(mailbox, "Exchange missed events; catching up");
                                    if let Some(member) = member {
                                        member.lane.catch_up();
                                    }
                                }
                                "ErrorNewEventStreamConnectionOpened" => {
                                    warn!(mailbox, "another stream opened this subscription");
                                    taken_over = true;
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
                            return if taken_over {
                                Outcome::TakenOver
                            } else {
                                Outcome::Closed
                            };
                        }
                        Some(ConnectionStatus::Closed) => return Outcome::Resubscribe(lost),
                        _ if !lost.is_empty() => {
                            return self.abandon(ids, Outcome::Resubscribe(lost));
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// The adapter closes a live stream itself: whatever Exchange had sent
    /// on it and the adapter had not read yet (a half-received envelope
    /// included) is lost, for every member on it. Each is caught up (what
    /// was already published is not published again).
    fn abandon(&mut self, ids: &[String], outcome: Outcome) -> Outcome {
        for member in &mut self.members {
            if member.id().is_some_and(|id| ids.iter().any(|i| i == id)) {
                member.gap = true;
            }
        }
        outcome
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

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    a.into_iter().chain(b).min()
}

/// One Subscribe of a member (after unsubscribing a previous run's
/// subscription, if `stale`), waiting out throttling on its own.
async fn subscribe_member(
    shared: Shared,
    mailbox: Mailbox,
    affinity: Affinity,
    body: String,
    stale: bool,
) -> SubscribeResult {
    if stale && let Err(error) = unsubscribe_stored(&shared, &mailbox).await {
        warn!(mailbox = %mailbox.address, %error, "cannot read the stored subscription");
    }
    shared
        .status
        .set(&mailbox.address, MailboxState::Subscribing)
        .await;
    with_retry(&shared, &mailbox.address, || async {
        let answer = shared
            .ews
            .call(mailbox.impersonation(), &affinity, &body)
            .await?;
        let subscribed = messages::parse_subscribe(&answer.body)?.map_err(EwsError::from_status)?;
        Ok((subscribed, answer.backend_cookie))
    })
    .await
}

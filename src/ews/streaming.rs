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
//! Notifications and catch-ups of a group go to its processor task behind a
//! bounded queue, so reading the stream never waits for GetItem or the
//! broker unless that queue is full. Catch-ups run beside it, a few at a
//! time; a mailbox's notifications wait while its own catch-up runs (so
//! de-duplication sees what the catch-up published), the others' do not.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use futures::StreamExt;
use tokio::{
    sync::mpsc,
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
    messages::{self, ConnectionStatus, Notification, SubscribeKind, Subscribed},
    sink::{self, SinkError, with_retry},
    splitter::EnvelopeSplitter,
    status::MailboxState,
    store::StoredSubscription,
    unsubscribe_stored,
};

/// Batches of work waiting for a group's processor. When full, the stream
/// reader waits (and Exchange's side of the connection buffers).
pub const GROUP_QUEUE: usize = 64;
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
/// Catch-ups one group runs at once; more wait for a free slot.
const CATCH_UP_CONCURRENCY: usize = 4;
/// Notifications of one mailbox held while its catch-up runs. Beyond this
/// they are dropped and the mailbox is caught up once more afterwards, which
/// recovers what they said.
const HELD_PER_MAILBOX: usize = 1024;

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
            work,
            churn: Repeats::new(shared.config.retry),
        };
        tracker.spawn(group.run());
    }
}

/// Work for a group's processor: notifications, delivered in order, and
/// mailboxes to catch up.
enum Work {
    Deliver(Vec<(Mailbox, Notification)>),
    CatchUp(Vec<Mailbox>),
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
    work: mpsc::Sender<Work>,
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
        let mut catch_up = Vec::new();
        for member in &mut self.members {
            if member.id().is_some() {
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
                    let mut batch = Vec::new();
                    for notification in message.notifications {
                        match by_id.get(&notification.subscription_id) {
                            Some(&index) => {
                                // Events: the subscriptions work.
                                self.members[index].losses.progress();
                                self.churn.progress();
                                batch.push((self.members[index].mailbox.clone(), notification));
                            }
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
                                | "ErrorExpiredSubscription" => Outcome::ResubscribeAll,
                                _ => Outcome::Broken(format!("{code}: {}", message.status.message)),
                            };
                        }
                        for id in &message.error_subscription_ids {
                            let member = by_id.get(id).map(|&index| &self.members[index].mailbox);
                            let mailbox = member.map(|m| m.address.as_str()).unwrap_or("?");
                            match code {
                                "ErrorMissedNotificationEvents" => {
                                    warn!(mailbox, "Exchange missed events; catching up");
                                    if let Some(member) = member
                                        && self
                                            .work
                                            .send(Work::CatchUp(vec![member.clone()]))
                                            .await
                                            .is_err()
                                    {
                                        return Outcome::Cancelled;
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

/// A group's processor: delivers notifications in order and runs catch-ups
/// beside them, at most [`CATCH_UP_CONCURRENCY`] at a time. A failed
/// catch-up is retried after a back-off, so a gap is never left open. Every
/// `resync_minutes` it catches every member up, which advances the stored
/// SyncStates and so bounds what a later catch-up has to go through.
async fn process(shared: Shared, mut queue: mpsc::Receiver<Work>, members: Vec<Mailbox>) {
    let cancel = shared.cancel.clone();
    let interval = shared.config.resync_interval;
    let mut resync = tokio::time::interval_at(Instant::now() + interval, interval);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut processor = Processor {
        lanes: members
            .into_iter()
            .map(|mailbox| (mailbox, Lane::new(&shared)))
            .collect(),
        shared,
        running: JoinSet::new(),
        running_for: HashMap::new(),
    };
    loop {
        processor.start_due();
        let wake = processor.next_due();
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            Some(joined) = processor.running.join_next_with_id() => {
                if !processor.finished(joined).await {
                    break;
                }
            }
            () = sleep_until(wake) => {}
            _ = resync.tick() => processor.want_all(),
            work = queue.recv() => match work {
                Some(Work::Deliver(batch)) => {
                    if !processor.deliver(batch).await {
                        break;
                    }
                }
                Some(Work::CatchUp(mailboxes)) => processor.want(mailboxes),
                None => break,
            },
        }
    }
    // The catch-ups see the cancellation and end on their own.
    while processor.running.join_next().await.is_some() {}
}

/// One mailbox's catch-ups, as the processor tracks them.
struct Lane {
    /// A catch-up is wanted from then on.
    due: Option<Instant>,
    /// A catch-up runs; the mailbox's notifications wait in `held`.
    running: bool,
    held: Vec<Notification>,
    /// Held notifications were dropped: catch up once more afterwards.
    overflowed: bool,
    /// Spaces out the retries of a failing catch-up.
    backoff: Backoff,
}

impl Lane {
    fn new(shared: &Shared) -> Self {
        Self {
            due: None,
            running: false,
            held: Vec::new(),
            overflowed: false,
            backoff: Backoff::new(shared.config.retry),
        }
    }

    /// Wants a catch-up no later than `at`.
    fn want_by(&mut self, at: Instant) {
        self.due = Some(self.due.map_or(at, |due| due.min(at)));
    }
}

struct Processor {
    shared: Shared,
    lanes: BTreeMap<Mailbox, Lane>,
    /// The catch-ups running, and the mailbox each one is for.
    running: JoinSet<Result<usize, SinkError>>,
    running_for: HashMap<task::Id, Mailbox>,
}

impl Processor {
    fn want(&mut self, mailboxes: impl IntoIterator<Item = Mailbox>) {
        let now = Instant::now();
        for mailbox in mailboxes {
            if let Some(lane) = self.lanes.get_mut(&mailbox) {
                lane.want_by(now);
            }
        }
    }

    fn want_all(&mut self) {
        let now = Instant::now();
        for lane in self.lanes.values_mut() {
            lane.want_by(now);
        }
    }

    /// Starts the catch-ups that are due, as far as there is room.
    fn start_due(&mut self) {
        let now = Instant::now();
        for (mailbox, lane) in &mut self.lanes {
            if self.running.len() >= CATCH_UP_CONCURRENCY {
                break;
            }
            if lane.running || lane.due.is_none_or(|due| due > now) {
                continue;
            }
            lane.due = None;
            lane.running = true;
            let (shared, mailbox_for_task) = (self.shared.clone(), mailbox.clone());
            let handle = self
                .running
                .spawn(async move { sink::catch_up(&shared, &mailbox_for_task).await });
            self.running_for.insert(handle.id(), mailbox.clone());
        }
    }

    /// When [`Self::start_due`] may have something to start (None: only a
    /// catch-up that ends can change that).
    fn next_due(&self) -> Option<Instant> {
        if self.running.len() >= CATCH_UP_CONCURRENCY {
            return None;
        }
        self.lanes
            .values()
            .filter(|lane| !lane.running)
            .filter_map(|lane| lane.due)
            .min()
    }

    /// Delivers notifications, holding those of mailboxes catching up.
    /// False when the adapter stops.
    async fn deliver(&mut self, batch: Vec<(Mailbox, Notification)>) -> bool {
        let mut now = Vec::new();
        for (mailbox, notification) in batch {
            match self.lanes.get_mut(&mailbox) {
                Some(lane) if lane.running => {
                    if lane.overflowed {
                        continue;
                    }
                    if lane.held.len() >= HELD_PER_MAILBOX {
                        warn!(mailbox = %mailbox.address, "too many notifications during a catch-up; catching up again instead");
                        lane.held.clear();
                        lane.overflowed = true;
                        continue;
                    }
                    lane.held.push(notification);
                }
                _ => now.push((mailbox, notification)),
            }
        }
        self.deliver_now(now).await
    }

    async fn deliver_now(&mut self, batch: Vec<(Mailbox, Notification)>) -> bool {
        if batch.is_empty() {
            return true;
        }
        if let Err(error) = sink::deliver(&self.shared, &batch).await {
            if error.is_cancelled() {
                return false;
            }
            // The events may not have reached the broker: close the gap from
            // the SyncState instead.
            warn!(%error, "cannot deliver notifications; catching up instead");
            self.want(batch.into_iter().map(|(mailbox, _)| mailbox));
        }
        true
    }

    /// Records how a catch-up ended and delivers what its mailbox held.
    /// False when the adapter stops.
    async fn finished(
        &mut self,
        joined: Result<(task::Id, Result<usize, SinkError>), JoinError>,
    ) -> bool {
        let (task, outcome) = match joined {
            Ok((_, Err(error))) if error.is_cancelled() => return false,
            Ok((task, Ok(_))) => (task, Ok(())),
            Ok((task, Err(error))) => (task, Err(format!("catch-up: {error}"))),
            Err(error) => (error.id(), Err(format!("the catch-up task ended: {error}"))),
        };
        let Some(mailbox) = self.running_for.remove(&task) else {
            return true;
        };
        let Some(lane) = self.lanes.get_mut(&mailbox) else {
            return true;
        };
        lane.running = false;
        let held = std::mem::take(&mut lane.held);
        match outcome {
            Ok(()) => {
                lane.backoff.reset();
                if std::mem::take(&mut lane.overflowed) {
                    lane.want_by(Instant::now());
                }
            }
            Err(reason) => {
                lane.overflowed = false;
                let retry_at = Instant::now() + lane.backoff.next_wait();
                lane.want_by(retry_at);
                // Shown over the mailbox's own state (it may well stream)
                // until the next catch-up starts.
                self.shared
                    .status
                    .begin(&mailbox.address, MailboxState::Failed { reason })
                    .await;
            }
        }
        self.deliver_now(held.into_iter().map(|n| (mailbox.clone(), n)).collect())
            .await
    }
}

//! A mailbox's lane in streaming mode: one small task per mailbox, fed by a
//! bounded queue, that publishes the mailbox's notifications in order and
//! runs its catch-ups. A GetItem waiting out ErrorServerBusy, a slow catch-up
//! or a publish being retried holds up only its own mailbox: the stream
//! reader hands notifications over without waiting, and the other lanes of
//! the group go on.
//!
//! Order within a mailbox: notifications are published in the order the
//! stream delivered them. While a catch-up runs, the mailbox's notifications
//! wait in its queue and are published after it, so de-duplication sees what
//! the catch-up published. A catch-up that waits for its turn (at most
//! [`CATCH_UP_CONCURRENCY`] run per group) does not hold the mailbox's
//! notifications back.
//!
//! Bounded memory: when a mailbox's queue is full, the notification is
//! dropped and a gap is marked. The lane then takes nothing new: it publishes
//! what its queue holds (all of it from before the gap), catches up, which
//! recovers what was dropped, and takes notifications again from the moment
//! that catch-up starts.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{
    sync::{AcquireError, OwnedSemaphorePermit, Semaphore, mpsc, mpsc::error::TrySendError},
    time::Instant,
};
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::{
    Shared, backoff::Backoff, config::Mailbox, messages::Notification, sink, status::MailboxState,
};

/// Notifications (and catch-up requests) waiting for one mailbox's lane.
/// When full, the notification is dropped and the mailbox is caught up once
/// the lane published what it holds, which recovers what was dropped.
pub const MAILBOX_QUEUE: usize = 1024;
/// Catch-ups one group runs at once; more wait for a free slot (their
/// mailboxes' notifications are published meanwhile).
pub const CATCH_UP_CONCURRENCY: usize = 4;

/// What the stream reader hands a lane, in stream order.
enum Input {
    /// Boxed: a queue's slots are allocated ahead, a box keeps them small.
    Deliver(Box<Notification>),
    /// Events may have been missed: catch up after what came before.
    CatchUp,
}

/// The stream reader's end of a lane. Handing over never waits.
pub struct LaneHandle {
    queue: mpsc::Sender<Input>,
    /// Set when an input was dropped because the queue was full; the lane
    /// clears it when the catch-up that recovers the drop starts. While set,
    /// inputs are dropped (that catch-up covers them too).
    overflowed: Arc<AtomicBool>,
    address: String,
}

impl LaneHandle {
    /// Hands a notification of this mailbox to its lane.
    pub fn deliver(&self, notification: Notification) {
        self.offer(Input::Deliver(Box::new(notification)));
    }

    /// Asks for a catch-up after the notifications handed over so far.
    pub fn catch_up(&self) {
        self.offer(Input::CatchUp);
    }

    fn offer(&self, input: Input) {
        if self.overflowed.load(Ordering::SeqCst) {
            return;
        }
        match self.queue.try_send(input) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                warn!(mailbox = %self.address, "too many notifications waiting; catching up instead");
                self.overflowed.store(true, Ordering::SeqCst);
            }
            // The lane ended: the adapter is stopping.
            Err(TrySendError::Closed(_)) => {}
        }
    }
}

/// Starts the lane of `mailbox` on `tracker`; `catch_ups` is the group's
/// share of [`CATCH_UP_CONCURRENCY`].
pub fn start(
    shared: &Shared,
    tracker: &TaskTracker,
    mailbox: &Mailbox,
    catch_ups: Arc<Semaphore>,
) -> LaneHandle {
    let (queue, inputs) = mpsc::channel(MAILBOX_QUEUE);
    let overflowed = Arc::new(AtomicBool::new(false));
    let lane = Lane {
        shared: shared.clone(),
        mailbox: mailbox.clone(),
        inputs,
        overflowed: overflowed.clone(),
        catch_ups,
        due: None,
        resync_at: Instant::now() + shared.config.resync_interval,
        backoff: Backoff::new(shared.config.retry),
    };
    tracker.spawn(lane.run());
    LaneHandle {
        queue,
        overflowed,
        address: mailbox.address.clone(),
    }
}

/// A catch-up's place in the line for one of its group's slots.
type Turn = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

struct Lane {
    shared: Shared,
    mailbox: Mailbox,
    inputs: mpsc::Receiver<Input>,
    overflowed: Arc<AtomicBool>,
    catch_ups: Arc<Semaphore>,
    /// A catch-up is wanted from then on.
    due: Option<Instant>,
    /// When the periodic catch-up is due: every `resync_interval` it
    /// advances the stored SyncStates, which bounds what a later catch-up
    /// has to go through.
    resync_at: Instant,
    /// Spaces out the retries of a failing catch-up.
    backoff: Backoff,
}

/// What the lane does next.
enum Step {
    Input(Option<Input>),
    CatchUp(Result<OwnedSemaphorePermit, AcquireError>),
    Wake,
    Stop,
}

impl Lane {
    async fn run(mut self) {
        let cancel = self.shared.cancel.clone();
        let mut turn: Option<Turn> = None;
        loop {
            let now = Instant::now();
            if now >= self.resync_at {
                self.resync_at = now + self.shared.config.resync_interval;
                self.want_by(now);
            }
            // After an overflow, what the queue holds came before the gap:
            // it is published first, then the catch-up closes the gap.
            let overflowed = self.overflowed.load(Ordering::SeqCst);
            if overflowed {
                self.want_by(now);
            }
            let draining = overflowed && !self.inputs.is_empty();
            if turn.is_none() && self.due.is_some_and(|due| due <= now) {
                turn = Some(Box::pin(self.catch_ups.clone().acquire_owned()));
            }
            let wake = self
                .due
                .map_or(self.resync_at, |due| due.min(self.resync_at));
            let step = tokio::select! {
                biased;
                () = cancel.cancelled() => Step::Stop,
                permit = wait_turn(&mut turn), if !draining => Step::CatchUp(permit),
                input = self.inputs.recv() => Step::Input(input),
                () = tokio::time::sleep_until(wake), if turn.is_none() => Step::Wake,
            };
            let keep_going = match step {
                Step::Stop | Step::Input(None) => false,
                Step::Wake => true,
                Step::Input(Some(Input::CatchUp)) => {
                    self.want_by(Instant::now());
                    true
                }
                Step::Input(Some(Input::Deliver(notification))) => {
                    self.deliver(*notification).await
                }
                Step::CatchUp(permit) => {
                    turn = None;
                    match permit {
                        Ok(permit) => self.catch_up(permit).await,
                        // The semaphore is never closed.
                        Err(_) => false,
                    }
                }
            };
            if !keep_going {
                break;
            }
        }
    }

    /// Wants a catch-up no later than `at`.
    fn want_by(&mut self, at: Instant) {
        self.due = Some(self.due.map_or(at, |due| due.min(at)));
    }

    /// Publishes one notification. False when the adapter stops.
    async fn deliver(&mut self, notification: Notification) -> bool {
        // Boxed: kept inline, the GetItem and publishing state would make
        // every idle lane (one per mailbox) as large as a busy one.
        match Box::pin(sink::deliver(&self.shared, &self.mailbox, &notification)).await {
            Ok(_) => true,
            Err(error) if error.is_cancelled() => false,
            Err(error) => {
                // The events may not have reached the broker: close the gap
                // from the SyncState instead.
                warn!(mailbox = %self.mailbox.address, %error, "cannot deliver a notification; catching up instead");
                self.want_by(Instant::now());
                true
            }
        }
    }

    /// Runs one catch-up in its group slot; a failed one is retried after a
    /// back-off, so a gap is never left open. False when the adapter stops.
    async fn catch_up(&mut self, permit: OwnedSemaphorePermit) -> bool {
        self.due = None;
        // A drop with nothing queued before it is covered by this catch-up;
        // otherwise the queue is published first and another one follows.
        if self.inputs.is_empty() {
            self.overflowed.store(false, Ordering::SeqCst);
        }
        let (shared, mailbox) = (self.shared.clone(), self.mailbox.clone());
        // A task of its own, so that a panic is a failed catch-up, not a
        // lost lane.
        let outcome = tokio::spawn(async move {
            let outcome = sink::catch_up(&shared, &mailbox).await;
            drop(permit);
            outcome
        })
        .await;
        let reason = match outcome {
            Ok(Ok(_)) => {
                self.backoff.reset();
                self.resync_at = Instant::now() + self.shared.config.resync_interval;
                return true;
            }
            Ok(Err(error)) if error.is_cancelled() => return false,
            Ok(Err(error)) => format!("catch-up: {error}"),
            Err(error) => format!("the catch-up task ended: {error}"),
        };
        let retry_at = Instant::now() + self.backoff.next_wait();
        self.want_by(retry_at);
        // Shown over the mailbox's own state (it may well stream) until the
        // next catch-up starts.
        self.shared
            .status
            .begin(&self.mailbox.address, MailboxState::Failed { reason })
            .await;
        true
    }
}

/// The permit `turn` waits for; never resolves without a turn.
async fn wait_turn(turn: &mut Option<Turn>) -> Result<OwnedSemaphorePermit, AcquireError> {
    match turn {
        Some(turn) => turn.await,
        None => std::future::pending().await,
    }
}

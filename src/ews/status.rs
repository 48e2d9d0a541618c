//! What each mailbox is doing, for the logs and for `herald ews status`.
//!
//! Every change of a mailbox's state is logged with structured fields and
//! written to the state database, so the status command (another process) can
//! show it while the adapter runs or after it stopped.

use std::{sync::Arc, time::Duration};

use dashmap::DashMap;
use tracing::{info, warn};

use super::store::StateStore;

/// The life of one mailbox in the adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailboxState {
    /// Creating (or recreating) its subscription.
    Subscribing,
    /// Running SyncFolderItems to close a gap (or to take the first baseline).
    CatchingUp,
    /// Subscribed, waiting for its stream to open.
    Subscribed,
    /// Its GetStreamingEvents connection is open.
    Streaming,
    /// Polling with GetEvents.
    Polling,
    /// Waiting for Exchange to push notifications.
    Listening,
    /// Waiting before a retry.
    BackingOff { wait: Duration, reason: String },
    /// Gave up for now; retried after a back-off.
    Failed { reason: String },
    /// The adapter stopped.
    Stopped,
}

impl MailboxState {
    pub fn name(&self) -> &'static str {
        match self {
            MailboxState::Subscribing => "subscribing",
            MailboxState::CatchingUp => "catching up",
            MailboxState::Subscribed => "subscribed",
            MailboxState::Streaming => "streaming",
            MailboxState::Polling => "polling",
            MailboxState::Listening => "listening",
            MailboxState::BackingOff { .. } => "backing off",
            MailboxState::Failed { .. } => "failed",
            MailboxState::Stopped => "stopped",
        }
    }

    pub fn detail(&self) -> String {
        match self {
            MailboxState::BackingOff { wait, reason } => format!("retry in {wait:?}: {reason}"),
            MailboxState::Failed { reason } => reason.clone(),
            _ => String::new(),
        }
    }
}

/// A mailbox's state in two layers. The task that owns the mailbox (its
/// group, poller or listener) keeps `base` current: what it does now.
/// `activity` is a passing thing done on top of that (a catch-up, a wait
/// inside a call), shown while it lasts and removed when it ends, so that
/// the mailbox shows its base again rather than whatever it showed before.
#[derive(Debug, Clone)]
struct Layers {
    base: MailboxState,
    activity: Option<MailboxState>,
}

impl Layers {
    fn shown(&self) -> &MailboxState {
        self.activity.as_ref().unwrap_or(&self.base)
    }
}

/// The shared board of mailbox states.
#[derive(Clone)]
pub struct StatusBoard {
    store: StateStore,
    /// The layers of each mailbox; entries are replaced, never held across
    /// an await.
    current: Arc<DashMap<String, Layers>>,
}

impl StatusBoard {
    pub fn new(store: StateStore) -> Self {
        Self {
            store,
            current: Arc::new(DashMap::new()),
        }
    }

    /// Records what the mailbox's own task does now (its base state).
    pub async fn set(&self, mailbox: &str, state: MailboxState) {
        self.change(mailbox, |layers| layers.base = state).await;
    }

    /// Starts an activity on top of the base state (replacing the current
    /// activity, if any); returns the activity it replaced.
    pub async fn begin(&self, mailbox: &str, activity: MailboxState) -> Option<MailboxState> {
        let mut replaced = None;
        self.change(mailbox, |layers| {
            replaced = layers.activity.replace(activity);
        })
        .await;
        replaced
    }

    /// Ends the current activity, putting back `outer` (the activity an
    /// enclosing one that still runs had shown) or, if None, the base.
    pub async fn end(&self, mailbox: &str, outer: Option<MailboxState>) {
        self.change(mailbox, |layers| layers.activity = outer).await;
    }

    /// The adapter stopped: nothing runs for the mailbox any more.
    pub async fn stopped(&self, mailbox: &str) {
        self.change(mailbox, |layers| {
            layers.base = MailboxState::Stopped;
            layers.activity = None;
        })
        .await;
    }

    /// Applies `change` to the mailbox's layers; logs and stores the state
    /// shown if that changed.
    async fn change(&self, mailbox: &str, change: impl FnOnce(&mut Layers)) {
        let mut fresh = false;
        let (before, after) = {
            let mut layers = self.current.entry(mailbox.to_owned()).or_insert_with(|| {
                fresh = true;
                Layers {
                    base: MailboxState::Subscribing,
                    activity: None,
                }
            });
            let before = layers.shown().clone();
            change(&mut layers);
            (before, layers.shown().clone())
        };
        if before == after && !fresh {
            return;
        }
        let detail = after.detail();
        match &after {
            MailboxState::Failed { .. } | MailboxState::BackingOff { .. } => {
                warn!(mailbox, state = after.name(), %detail, "mailbox state")
            }
            _ => info!(mailbox, state = after.name(), "mailbox state"),
        }
        if let Err(error) = self.store.set_status(mailbox, after.name(), &detail).await {
            warn!(mailbox, %error, "cannot store the mailbox state");
        }
    }
}

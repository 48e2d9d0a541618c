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

/// The shared board of mailbox states.
#[derive(Clone)]
pub struct StatusBoard {
    store: StateStore,
    /// The last state of each mailbox; entries are replaced, never held
    /// across an await.
    current: Arc<DashMap<String, MailboxState>>,
}

impl StatusBoard {
    pub fn new(store: StateStore) -> Self {
        Self {
            store,
            current: Arc::new(DashMap::new()),
        }
    }

    /// Records a new state: logs it and stores it if it changed.
    pub async fn set(&self, mailbox: &str, state: MailboxState) {
        let previous = self.current.insert(mailbox.to_owned(), state.clone());
        if previous.as_ref() == Some(&state) {
            return;
        }
        let detail = state.detail();
        match &state {
            MailboxState::Failed { .. } | MailboxState::BackingOff { .. } => {
                warn!(mailbox, state = state.name(), %detail, "mailbox state")
            }
            _ => info!(mailbox, state = state.name(), "mailbox state"),
        }
        if let Err(error) = self.store.set_status(mailbox, state.name(), &detail).await {
            warn!(mailbox, %error, "cannot store the mailbox state");
        }
    }

    pub fn get(&self, mailbox: &str) -> Option<MailboxState> {
        self.current.get(mailbox).map(|s| s.clone())
    }
}

//! A fake Exchange server speaking the EWS wire format of PROTOCOL.md, for the
//! tests, the benchmark and for trying the adapter without an Exchange.
//!
//! It keeps mailboxes with folders and items, an event log per mailbox
//! (sequence numbers are the watermarks), and subscriptions of the three kinds,
//! and answers Subscribe, GetStreamingEvents (chunked, several envelopes,
//! keep-alives, a final Closed envelope), GetEvents (batches, MoreEvents,
//! StatusEvent), Unsubscribe, GetItem, SyncFolderItems (consistent with the
//! events: same ids and change keys), FindFolder, and pushes SendNotification
//! to push subscribers. It enforces X-AnchorMailbox and the
//! X-BackEndOverrideCookie affinity of two simulated backends, and lets a test
//! inject failures: ErrorServerBusy (fault or in-response), 503, 401, garbage,
//! truncated or hanging answers, streams that split, pack, drop, stall or
//! reset, lost subscriptions, missed events and expired watermarks.
//!
//! State sits behind one std mutex that is never held across an await.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    fmt::Write,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{ConnectInfo, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    messages::EventKind as Kind,
    xml::{self, Element, MESSAGES, SOAP, TYPES, escape},
};

/// Frames waiting to be written to one stream.
const STREAM_BUFFER: usize = 64;
const WATERMARK_PREFIX: &str = "AQAAAA";
const SYNC_PREFIX: &str = "H4sIAAAAfake";
/// Folders every fake mailbox has.
const FOLDERS: [&str; 5] = ["inbox", "deleteditems", "sentitems", "calendar", "drafts"];
const BACKENDS: [&str; 2] = ["MBX01.fake.example", "MBX02.fake.example"];
const VERSIONS_ACCEPTED: [&str; 6] = [
    "Exchange2010_SP1",
    "Exchange2010_SP2",
    "Exchange2013",
    "Exchange2013_SP1",
    "Exchange2016",
    "V2017_07_11",
];

/// How the fake authenticates requests.
#[derive(Debug, Clone, Default)]
pub enum FakeAuth {
    /// Anything goes.
    #[default]
    None,
    Basic {
        username: String,
        password: String,
    },
    /// One fixed bearer token.
    Bearer {
        token: String,
    },
    /// Bearer tokens issued by `POST /token` (client credentials).
    OAuth {
        client_id: String,
        client_secret: String,
    },
}

/// Timing and shape of the fake's behaviour.
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// Idle time between keep-alive envelopes (Exchange: about 45 s).
    pub keepalive: Duration,
    /// How long one "minute" of ConnectionTimeout, Timeout and
    /// StatusFrequency lasts, so tests can run them in milliseconds.
    pub minute: Duration,
    /// Events per GetEvents batch before MoreEvents.
    pub pull_batch: usize,
    /// Timestamps with milliseconds (real Exchange sends whole seconds); the
    /// benchmark uses them to measure latency.
    pub precise_timestamps: bool,
    /// The account's own mailbox (used when a request impersonates nobody).
    pub own_mailbox: String,
    pub auth: FakeAuth,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            keepalive: Duration::from_secs(45),
            minute: Duration::from_secs(60),
            pull_batch: 50,
            precise_timestamps: false,
            own_mailbox: "owner@fake.example".to_owned(),
            auth: FakeAuth::None,
        }
    }
}

/// A failure the next matching request (or every one, see
/// [`FakeExchange::fail_mailbox`]) gets instead of its answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// HTTP 500 SOAP fault ErrorServerBusy with BackOffMilliseconds.
    ServerBusyFault(u64),
    /// HTTP 200, ResponseClass Error, ErrorServerBusy with BackOffMilliseconds.
    ServerBusyResponse(u64),
    /// HTTP 503 with Retry-After seconds.
    Unavailable(u64),
    Unauthorized,
    /// HTTP 200 whose body is not XML.
    Garbage,
    /// HTTP 200 whose body stops in the middle of the envelope.
    Truncated,
    /// Never answers (until the client gives up).
    Hang,
}

/// What the next GetStreamingEvents connection does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamFault {
    #[default]
    None,
    /// End the body after this many envelopes without a Closed envelope.
    DropAfter(usize),
    /// Go silent (no keep-alives) after this many envelopes.
    StallAfter(usize),
    /// Send bytes that are not XML after this many envelopes, then end.
    GarbageAfter(usize),
    /// Send half an envelope after this many envelopes, then end.
    TruncateAfter(usize),
    /// Abort the connection after this many envelopes.
    ResetAfter(usize),
}

/// How envelopes are cut into HTTP chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Chunking {
    /// One chunk per write, all notifications of a round in one envelope.
    #[default]
    Whole,
    /// Every write cut into chunks of this many bytes.
    Split(usize),
    /// One envelope per subscription, several envelopes in one chunk.
    Pack,
}

/// One request as the fake saw it, for assertions.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub operation: String,
    /// The impersonated mailbox, or the own mailbox.
    pub mailbox: String,
    /// True when the request carried ExchangeImpersonation.
    pub impersonated: bool,
    pub anchor: Option<String>,
    pub prefer_server_affinity: bool,
    pub cookie: Option<String>,
    pub peer: SocketAddr,
    /// Subscription ids named by the request (GetStreamingEvents, GetEvents, Unsubscribe).
    pub subscription_ids: Vec<String>,
    /// The backend cookie set in the answer, if any.
    pub set_cookie: Option<String>,
    /// The watermark a Subscribe or GetEvents request carried.
    pub watermark: Option<String>,
    pub at: Instant,
}

#[derive(Debug, Clone)]
enum LogTarget {
    Item { id: String, change_key: String },
    Folder { name: String, unread: Option<u32> },
}

#[derive(Debug, Clone)]
struct LogEvent {
    seq: u64,
    kind: Kind,
    timestamp: String,
    target: LogTarget,
    parent: String,
    old_item: Option<String>,
    old_parent: Option<String>,
}

impl LogEvent {
    fn touches(&self, folders: &Option<Vec<String>>) -> bool {
        match folders {
            None => true,
            Some(folders) => {
                let about_folder = matches!(&self.target, LogTarget::Folder { name, .. } if folders.contains(name));
                about_folder
                    || folders.contains(&self.parent)
                    || self
                        .old_parent
                        .as_ref()
                        .is_some_and(|p| folders.contains(p))
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Item {
    id: String,
    change_key: String,
    folder: String,
    subject: String,
    from_name: String,
    from_address: String,
    received: String,
    read: bool,
    created_seq: u64,
    modified_seq: u64,
    /// The last change other than of the read flag (SyncFolderItems
    /// reports an Update after it, a ReadFlagChange after only the flag).
    content_seq: u64,
    deleted_seq: Option<u64>,
    /// GetItem answers ErrorItemNotFound (like free/busy temporary items).
    gone: bool,
}

#[derive(Debug, Default)]
struct MailboxData {
    log: Vec<LogEvent>,
    items: BTreeMap<String, Item>,
    /// Watermarks of an older epoch are "older than 30 days".
    epoch: u32,
    next_item: u64,
}

impl MailboxData {
    fn seq(&self) -> u64 {
        self.log.last().map(|e| e.seq).unwrap_or(0)
    }

    /// Logs an event; `old` is the (item id, folder) a move or copy came from.
    fn push(
        &mut self,
        kind: Kind,
        timestamp: &str,
        target: LogTarget,
        parent: &str,
        old: Option<(String, String)>,
    ) {
        let seq = self.seq() + 1;
        let (old_item, old_parent) = old.unzip();
        self.log.push(LogEvent {
            seq,
            kind,
            timestamp: timestamp.to_owned(),
            target,
            parent: parent.to_owned(),
            old_item,
            old_parent,
        });
    }
}

impl Item {
    fn target(&self) -> LogTarget {
        LogTarget::Item {
            id: self.id.clone(),
            change_key: self.change_key.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum SubKind {
    Streaming,
    Pull {
        timeout_minutes: u32,
        last_used: Instant,
    },
    Push {
        url: String,
        frequency_minutes: u32,
    },
}

#[derive(Debug, Clone)]
struct Subscription {
    mailbox: String,
    kind: SubKind,
    /// None = every folder.
    folders: Option<Vec<String>>,
    types: Vec<Kind>,
    /// Last event sequence delivered.
    cursor: u64,
    backend: &'static str,
    /// The stream currently serving it.
    stream: Option<u64>,
    /// Lost on the server side (mailbox move, restart…).
    lost: bool,
    /// Report ErrorMissedNotificationEvents on its stream.
    missed: bool,
    /// Push: send nothing at all (not even StatusEvents).
    paused: bool,
}

#[derive(Default)]
struct FakeState {
    options: FakeOptions,
    mailboxes: HashMap<String, MailboxData>,
    subscriptions: HashMap<String, Subscription>,
    next_id: u64,
    next_stream: u64,
    tokens: HashSet<String>,
    tokens_issued: usize,
    once: VecDeque<(Option<String>, Fault)>,
    /// Faults of every request about a mailbox (of one operation, if named).
    per_mailbox: HashMap<String, (Option<String>, Fault)>,
    stream_faults: VecDeque<StreamFault>,
    chunking: Chunking,
    requests: Vec<Recorded>,
    open_streams: usize,
    /// The most Notification elements written in one streaming envelope.
    most_notifications: usize,
    pushes_answered: Vec<(String, String)>,
    /// Streams write nothing (events and errors pile up) until resumed.
    streams_held: bool,
    /// Mailboxes whose new subscriptions are lost at once.
    losing: HashSet<String>,
    /// Mailboxes whose subscriptions every stream reports as taken over by
    /// another stream (ErrorNewEventStreamConnectionOpened).
    taking_over: HashSet<String>,
}

/// A running fake Exchange on 127.0.0.1; stops when dropped.
pub struct FakeExchange {
    state: Arc<Mutex<FakeState>>,
    changed: watch::Sender<u64>,
    addr: SocketAddr,
    cancel: CancellationToken,
    server: Option<JoinHandle<()>>,
    http: reqwest::Client,
}

#[derive(Clone)]
struct Shared {
    state: Arc<Mutex<FakeState>>,
    changed: watch::Sender<u64>,
    cancel: CancellationToken,
    http: reqwest::Client,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, FakeState> {
        // A panicking test thread may poison the lock; the state is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}

impl FakeExchange {
    /// Starts the fake on 127.0.0.1 with an ephemeral port.
    pub async fn start(options: FakeOptions) -> std::io::Result<Self> {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await?, options).await
    }

    pub async fn start_on(listener: TcpListener, options: FakeOptions) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let (changed, _) = watch::channel(0);
        let shared = Shared {
            state: Arc::new(Mutex::new(FakeState {
                options,
                ..FakeState::default()
            })),
            changed: changed.clone(),
            cancel: CancellationToken::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(std::io::Error::other)?,
        };
        let app = Router::new()
            .route("/EWS/Exchange.asmx", post(ews))
            .route("/token", post(token))
            .with_state(shared.clone());
        let cancel = shared.cancel.clone();
        let server = tokio::spawn(async move {
            let _ = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await;
        });
        Ok(Self {
            state: shared.state,
            changed,
            addr,
            cancel: shared.cancel,
            server: Some(server),
            http: shared.http,
        })
    }

    fn shared(&self) -> Shared {
        Shared {
            state: self.state.clone(),
            changed: self.changed.clone(),
            cancel: self.cancel.clone(),
            http: self.http.clone(),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The EWS endpoint URL.
    pub fn url(&self) -> String {
        format!("http://{}/EWS/Exchange.asmx", self.addr)
    }

    /// The OAuth2 token endpoint URL.
    pub fn token_url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// Stops the server and every stream.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    // --- mailbox content -------------------------------------------------

    /// Runs `change` on a mailbox's data with the current timestamp, then
    /// wakes the streams and pushers.
    fn change<R>(&self, mailbox: &str, change: impl FnOnce(&mut MailboxData, &str) -> R) -> R {
        let result = {
            let mut state = self.lock();
            let now = timestamp(state.options.precise_timestamps);
            let data = state.mailboxes.entry(mailbox.to_owned()).or_default();
            change(data, &now)
        };
        self.shared().bump();
        result
    }

    /// New mail in the inbox: Created + NewMail + folder Modified (UnreadCount),
    /// as Exchange reports it. Returns the item id.
    pub fn deliver_mail(&self, mailbox: &str, subject: &str, from: &str) -> String {
        self.deliver(mailbox, subject, from, false)
    }

    /// New mail whose GetItem fails with ErrorItemNotFound (like the free/busy
    /// temporary items Exchange creates and deletes at once).
    pub fn deliver_vanishing_mail(&self, mailbox: &str, subject: &str) -> String {
        self.deliver(mailbox, subject, "nobody@fake.example", true)
    }

    fn deliver(&self, mailbox: &str, subject: &str, from: &str, gone: bool) -> String {
        self.change(mailbox, |data, now| {
            data.next_item += 1;
            let id = item_id(mailbox, data.next_item);
            let seq = data.seq() + 1;
            let item = Item {
                id: id.clone(),
                change_key: change_key(seq),
                folder: "inbox".into(),
                subject: subject.to_owned(),
                from_name: from.split('@').next().unwrap_or(from).to_owned(),
                from_address: from.to_owned(),
                received: now.to_owned(),
                read: false,
                created_seq: seq,
                modified_seq: seq,
                content_seq: seq,
                deleted_seq: None,
                gone,
            };
            let target = item.target();
            data.items.insert(id.clone(), item);
            let unread = data
                .items
                .values()
                .filter(|i| i.folder == "inbox" && i.deleted_seq.is_none() && !i.read)
                .count() as u32;
            data.push(Kind::Created, now, target.clone(), "inbox", None);
            data.push(Kind::NewMail, now, target, "inbox", None);
            let folder = LogTarget::Folder {
                name: "inbox".into(),
                unread: Some(unread),
            };
            data.push(Kind::Modified, now, folder, "msgfolderroot", None);
            id
        })
    }

    /// Changes an item (new change key): ModifiedEvent.
    pub fn modify_item(&self, mailbox: &str, id: &str) {
        self.touch(mailbox, id, true);
    }

    /// Marks an item read: a ModifiedEvent (with a new change key) that
    /// SyncFolderItems reports as a ReadFlagChange.
    pub fn mark_read(&self, mailbox: &str, id: &str) {
        self.touch(mailbox, id, false);
    }

    /// A new change key, the item read, and a ModifiedEvent; `content`
    /// says whether more than the read flag changed.
    fn touch(&self, mailbox: &str, id: &str, content: bool) {
        self.change(mailbox, |data, now| {
            let seq = data.seq() + 1;
            let Some(item) = data.items.get_mut(id) else {
                return;
            };
            item.change_key = change_key(seq);
            item.modified_seq = seq;
            if content {
                item.content_seq = seq;
            }
            item.read = true;
            let (target, folder) = (item.target(), item.folder.clone());
            data.push(Kind::Modified, now, target, &folder, None);
        })
    }

    /// Deletes an item the way Outlook does: a MovedEvent to Deleted Items.
    /// Returns the new id.
    pub fn delete_item(&self, mailbox: &str, id: &str) -> Option<String> {
        self.relocate(mailbox, id, "deleteditems", Kind::Moved)
    }

    /// Copies an item into another folder: CopiedEvent. Returns the new id.
    pub fn copy_item(&self, mailbox: &str, id: &str, folder: &str) -> Option<String> {
        self.relocate(mailbox, id, folder, Kind::Copied)
    }

    fn relocate(&self, mailbox: &str, id: &str, to: &str, kind: Kind) -> Option<String> {
        self.change(mailbox, |data, now| {
            let seq = data.seq() + 1;
            data.next_item += 1;
            let new_id = item_id(mailbox, data.next_item);
            let item = data.items.get_mut(id).filter(|i| i.deleted_seq.is_none())?;
            let from = item.folder.clone();
            if kind == Kind::Moved {
                item.deleted_seq = Some(seq);
            }
            let copy = Item {
                id: new_id.clone(),
                folder: to.to_owned(),
                change_key: change_key(seq),
                created_seq: seq,
                modified_seq: seq,
                content_seq: seq,
                deleted_seq: None,
                ..item.clone()
            };
            let target = copy.target();
            data.items.insert(new_id.clone(), copy);
            data.push(kind, now, target, to, Some((id.to_owned(), from)));
            Some(new_id)
        })
    }

    /// Hard delete: DeletedEvent.
    pub fn hard_delete(&self, mailbox: &str, id: &str) {
        self.change(mailbox, |data, now| {
            let seq = data.seq() + 1;
            let Some(item) = data.items.get_mut(id).filter(|i| i.deleted_seq.is_none()) else {
                return;
            };
            item.deleted_seq = Some(seq);
            let (target, folder) = (item.target(), item.folder.clone());
            data.push(Kind::Deleted, now, target, &folder, None);
        })
    }

    /// A calendar change: FreeBusyChangedEvent on an item of the calendar.
    pub fn free_busy_changed(&self, mailbox: &str) {
        self.change(mailbox, |data, now| {
            data.next_item += 1;
            let target = LogTarget::Item {
                id: item_id(mailbox, data.next_item),
                change_key: change_key(data.seq() + 1),
            };
            data.push(Kind::FreeBusyChanged, now, target, "calendar", None);
        })
    }

    /// Live items of a folder (not deleted).
    pub fn items(&self, mailbox: &str, folder: &str) -> Vec<String> {
        let state = self.lock();
        state
            .mailboxes
            .get(mailbox)
            .map(|d| {
                d.items
                    .values()
                    .filter(|i| i.folder == folder && i.deleted_seq.is_none())
                    .map(|i| i.id.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The change key of an item.
    pub fn change_key(&self, mailbox: &str, id: &str) -> Option<String> {
        let state = self.lock();
        state
            .mailboxes
            .get(mailbox)?
            .items
            .get(id)
            .map(|i| i.change_key.clone())
    }

    // --- subscriptions and failures -----------------------------------------

    /// Runs `change` on every subscription of `mailbox` with the mailbox's
    /// current sequence number, then wakes the streams and pushers.
    fn change_subscriptions(&self, mailbox: &str, mut change: impl FnMut(&mut Subscription, u64)) {
        {
            let mut state = self.lock();
            let seq = state
                .mailboxes
                .get(mailbox)
                .map(MailboxData::seq)
                .unwrap_or(0);
            for sub in state
                .subscriptions
                .values_mut()
                .filter(|s| s.mailbox == mailbox)
            {
                change(sub, seq);
            }
        }
        self.shared().bump();
    }

    /// The server forgets every subscription of `mailbox` (a mailbox move or a
    /// server restart): ErrorSubscriptionNotFound from now on.
    pub fn lose_subscriptions(&self, mailbox: &str) {
        self.change_subscriptions(mailbox, |sub, _| sub.lost = true);
    }

    /// Every subscription made for `mailbox` from now on is lost at once (a
    /// mailbox stuck in a move), until [`Self::heal_mailbox`].
    pub fn lose_new_subscriptions(&self, mailbox: &str) {
        self.lock().losing.insert(mailbox.to_owned());
    }

    /// Every stream reports the subscriptions of `mailbox` as taken over by
    /// another stream (ErrorNewEventStreamConnectionOpened, then Closed when
    /// nothing else is left), as when two clients fight over them, until
    /// [`Self::heal_mailbox`].
    pub fn take_over_streams(&self, mailbox: &str) {
        self.lock().taking_over.insert(mailbox.to_owned());
        self.shared().bump();
    }

    /// The subscriptions of `mailbox` miss their pending events and report
    /// ErrorMissedNotificationEvents on their stream.
    pub fn miss_events(&self, mailbox: &str) {
        self.change_subscriptions(mailbox, |sub, seq| {
            sub.cursor = seq;
            sub.missed = true;
        });
    }

    /// Every watermark of `mailbox` issued so far becomes too old
    /// (ErrorInvalidWatermark), as after 30 days.
    pub fn expire_watermarks(&self, mailbox: &str) {
        self.change(mailbox, |data, _| data.epoch += 1);
    }

    /// Push: stop sending anything for `mailbox` (not even StatusEvents).
    pub fn pause_push(&self, mailbox: &str) {
        self.change_subscriptions(mailbox, |sub, _| sub.paused = true);
    }

    /// Push: send again after [`Self::pause_push`].
    pub fn resume_push(&self, mailbox: &str) {
        self.change_subscriptions(mailbox, |sub, _| sub.paused = false);
    }

    /// Push: the events pending now for `mailbox` are never sent, so the next
    /// notification's PreviousWatermark does not continue the last one.
    pub fn skip_push_events(&self, mailbox: &str) {
        self.change_subscriptions(mailbox, |sub, seq| sub.cursor = seq);
    }

    /// The next request of `operation` (any operation if `None`) fails.
    pub fn fail_next(&self, operation: Option<&str>, fault: Fault) {
        self.lock()
            .once
            .push_back((operation.map(str::to_owned), fault));
    }

    /// Every request about `mailbox` fails until [`Self::heal_mailbox`].
    pub fn fail_mailbox(&self, mailbox: &str, fault: Fault) {
        self.fail_mailbox_on(mailbox, None, fault);
    }

    /// Every request of `operation` (any if `None`) about `mailbox` fails
    /// until [`Self::heal_mailbox`].
    pub fn fail_mailbox_on(&self, mailbox: &str, operation: Option<&str>, fault: Fault) {
        self.lock()
            .per_mailbox
            .insert(mailbox.to_owned(), (operation.map(str::to_owned), fault));
    }

    /// Ends the failures set for `mailbox` with `fail_mailbox*`,
    /// `lose_new_subscriptions` and `take_over_streams`.
    pub fn heal_mailbox(&self, mailbox: &str) {
        let mut state = self.lock();
        state.per_mailbox.remove(mailbox);
        state.losing.remove(mailbox);
        state.taking_over.remove(mailbox);
    }

    /// What the next GetStreamingEvents connection does.
    pub fn next_stream(&self, fault: StreamFault) {
        self.lock().stream_faults.push_back(fault);
    }

    /// Streams write nothing until [`Self::release_streams`], which then
    /// writes what piled up in one round (errors before notifications, as
    /// always): lets a test put several things in one round.
    pub fn hold_streams(&self) {
        self.lock().streams_held = true;
    }

    pub fn release_streams(&self) {
        self.lock().streams_held = false;
        self.shared().bump();
    }

    pub fn set_chunking(&self, chunking: Chunking) {
        self.lock().chunking = chunking;
    }

    /// Makes every issued OAuth token invalid (401 until refreshed).
    pub fn revoke_tokens(&self) {
        self.lock().tokens.clear();
    }

    // --- observation ---------------------------------------------------------

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// How many requests of `operation` arrived.
    pub fn count(&self, operation: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.operation == operation)
            .count()
    }

    /// The most subscriptions' notifications sent in one streaming envelope.
    pub fn most_notifications_per_envelope(&self) -> usize {
        self.lock().most_notifications
    }

    /// OAuth tokens issued by `POST /token`.
    pub fn tokens_issued(&self) -> usize {
        self.lock().tokens_issued
    }

    pub fn open_streams(&self) -> usize {
        self.lock().open_streams
    }

    /// Subscription ids alive (not lost, not unsubscribed) for `mailbox`.
    pub fn live_subscriptions(&self, mailbox: &str) -> Vec<String> {
        let state = self.lock();
        let mut ids: Vec<String> = state
            .subscriptions
            .iter()
            .filter(|(_, s)| s.mailbox == mailbox && !s.lost)
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Push replies received: (subscription id, "OK" or "Unsubscribe").
    pub fn push_replies(&self) -> Vec<(String, String)> {
        self.lock().pushes_answered.clone()
    }

    /// Waits (up to `patience`) until `done` holds for the fake.
    pub async fn wait_until(
        &self,
        patience: Duration,
        done: impl Fn(&FakeExchange) -> bool,
    ) -> bool {
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            if done(self) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        done(self)
    }
}

impl Drop for FakeExchange {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

fn item_id(mailbox: &str, n: u64) -> String {
    format!("AAMkA{}", B64.encode(format!("{mailbox}/item/{n}")))
}

fn change_key(seq: u64) -> String {
    format!("CQAAAB{}", B64.encode(seq.to_le_bytes()))
}

fn folder_id(mailbox: &str, name: &str) -> String {
    format!("AQMkA{}", B64.encode(format!("{mailbox}/folder/{name}")))
}

fn folder_name(mailbox: &str, id: &str) -> Option<String> {
    FOLDERS
        .iter()
        .chain(["msgfolderroot"].iter())
        .find(|name| folder_id(mailbox, name) == id)
        .map(|n| (*n).to_owned())
}

/// A watermark: the mailbox's epoch and an event sequence number.
fn watermark(epoch: u32, seq: u64) -> String {
    let mut bytes = epoch.to_le_bytes().to_vec();
    bytes.extend_from_slice(&seq.to_le_bytes());
    format!("{WATERMARK_PREFIX}{}", B64.encode(bytes))
}

fn parse_watermark(text: &str) -> Option<(u32, u64)> {
    let bytes = B64
        .decode(text.trim().strip_prefix(WATERMARK_PREFIX)?)
        .ok()?;
    let (epoch, seq) = bytes.split_at_checked(4)?;
    Some((
        u32::from_le_bytes(epoch.try_into().ok()?),
        u64::from_le_bytes(seq.try_into().ok()?),
    ))
}

fn sync_state(seq: u64) -> String {
    format!("{SYNC_PREFIX}{}", B64.encode(seq.to_le_bytes()))
}

fn parse_sync_state(text: &str) -> Option<u64> {
    let bytes = B64.decode(text.trim().strip_prefix(SYNC_PREFIX)?).ok()?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

fn timestamp(precise: bool) -> String {
    let mut now = prost_types::Timestamp::from(SystemTime::now());
    now.nanos = if precise {
        now.nanos / 1_000_000 * 1_000_000
    } else {
        0
    };
    now.to_string()
}

/// A subscription id shaped like Exchange's: length-prefixed backend FQDN,
/// then a GUID-sized counter.
fn subscription_id(backend: &str, n: u64) -> String {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&(backend.len() as u16).to_le_bytes());
    bytes.extend_from_slice(backend.as_bytes());
    bytes.extend_from_slice(&16u32.to_le_bytes());
    bytes.extend_from_slice(&n.to_le_bytes());
    bytes.extend_from_slice(&rand::random::<u64>().to_le_bytes());
    B64.encode(bytes)
}

fn backend_of(mailbox: &str) -> &'static str {
    let sum: u32 = mailbox.bytes().map(u32::from).sum();
    BACKENDS[(sum % 2) as usize]
}

// --- wire writing ------------------------------------------------------------

fn normal_envelope(operation: &str, messages: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP}"><s:Header><h:ServerVersionInfo MajorVersion="15" MinorVersion="1" MajorBuildNumber="2507" MinorBuildNumber="6" Version="V2017_07_11" xmlns:h="{TYPES}" xmlns="{TYPES}"/></s:Header><s:Body><m:{operation}Response xmlns:m="{MESSAGES}" xmlns:t="{TYPES}"><m:ResponseMessages>{messages}</m:ResponseMessages></m:{operation}Response></s:Body></s:Envelope>"#
    )
}

fn success(operation: &str, payload: &str) -> String {
    format!(
        r#"<m:{operation}ResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode>{payload}</m:{operation}ResponseMessage>"#
    )
}

fn error_message(operation: &str, code: &str, text: &str, extra: &str) -> String {
    format!(
        r#"<m:{operation}ResponseMessage ResponseClass="Error"><m:MessageText>{}</m:MessageText><m:ResponseCode>{code}</m:ResponseCode><m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>{extra}</m:{operation}ResponseMessage>"#,
        escape(text)
    )
}

/// A normal answer whose only message is an error.
fn fail(op: &str, code: &str, text: &str) -> Response {
    xml_response(
        StatusCode::OK,
        normal_envelope(op, &error_message(op, code, text, "")),
    )
}

fn busy_xml(ms: u64) -> String {
    format!(r#"<m:MessageXml><t:Value Name="BackOffMilliseconds">{ms}</t:Value></m:MessageXml>"#)
}

fn soap_fault(code: &str, text: &str, back_off: Option<u64>) -> String {
    let message_xml = back_off
        .map(|ms| format!(r#"<t:MessageXml xmlns:t="{TYPES}"><t:Value Name="BackOffMilliseconds">{ms}</t:Value></t:MessageXml>"#))
        .unwrap_or_default();
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP}"><s:Body><s:Fault><faultcode xmlns:a="{TYPES}">a:{code}</faultcode><faultstring xml:lang="en-US">{text}</faultstring><detail><e:ResponseCode xmlns:e="http://schemas.microsoft.com/exchange/services/2006/errors">
          {code}
        </e:ResponseCode><e:Message xmlns:e="http://schemas.microsoft.com/exchange/services/2006/errors">{text}</e:Message>{message_xml}</detail></s:Fault></s:Body></s:Envelope>"#
    )
}

fn xml_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
        body,
    )
        .into_response()
}

/// An event element; with the mailbox's epoch, it carries a watermark
/// (pull and push), without one it does not (streaming).
fn event_xml(out: &mut String, mailbox: &str, event: &LogEvent, epoch: Option<u32>) {
    let name = event.kind.element();
    let _ = write!(out, "<t:{name}>");
    if let Some(epoch) = epoch {
        let _ = write!(
            out,
            "<t:Watermark>{}</t:Watermark>",
            watermark(epoch, event.seq)
        );
    }
    let _ = write!(out, "<t:TimeStamp>{}</t:TimeStamp>", event.timestamp);
    match &event.target {
        LogTarget::Item { id, change_key } => {
            let _ = write!(out, r#"<t:ItemId Id="{id}" ChangeKey="{change_key}"/>"#);
        }
        LogTarget::Folder { name, .. } => {
            let _ = write!(
                out,
                r#"<t:FolderId Id="{}" ChangeKey="AgAAAA=="/>"#,
                folder_id(mailbox, name)
            );
        }
    }
    let _ = write!(
        out,
        r#"<t:ParentFolderId Id="{}" ChangeKey="AQAAAA=="/>"#,
        folder_id(mailbox, &event.parent)
    );
    if let Some(old) = &event.old_item {
        let _ = write!(out, r#"<t:OldItemId Id="{old}"/>"#);
    }
    if let Some(old) = &event.old_parent {
        let _ = write!(
            out,
            r#"<t:OldParentFolderId Id="{}"/>"#,
            folder_id(mailbox, old)
        );
    }
    if let LogTarget::Folder {
        unread: Some(n), ..
    } = &event.target
    {
        let _ = write!(out, "<t:UnreadCount>{n}</t:UnreadCount>");
    }
    let _ = write!(out, "</t:{name}>");
}

/// Events of `sub` after `after`, at most `limit`.
fn pending(
    state: &FakeState,
    sub: &Subscription,
    after: u64,
    limit: usize,
) -> (Vec<LogEvent>, bool) {
    let Some(data) = state.mailboxes.get(&sub.mailbox) else {
        return (Vec::new(), false);
    };
    let start = data.log.partition_point(|e| e.seq <= after);
    let mut events = Vec::new();
    for event in &data.log[start..] {
        if sub.types.contains(&event.kind) && event.touches(&sub.folders) {
            if events.len() == limit {
                return (events, true);
            }
            events.push(event.clone());
        }
    }
    (events, false)
}

// --- request handling ----------------------------------------------------------

struct Request {
    operation: Element,
    mailbox: String,
    impersonated: bool,
}

/// The request's operation and mailbox, or the SOAP fault to answer with.
fn parse_request(body: &[u8], own: &str) -> Result<Request, String> {
    let root =
        xml::parse(body).map_err(|e| soap_fault("ErrorSchemaValidation", &e.to_string(), None))?;
    if root.name == "Envelope" && root.ns != SOAP {
        return Err(soap_fault(
            "ErrorSchemaValidation",
            &format!("the SOAP namespace must be {SOAP}"),
            None,
        ));
    }
    if !root.is(SOAP, "Envelope") {
        return Err(soap_fault(
            "ErrorSchemaValidation",
            "not a SOAP envelope",
            None,
        ));
    }
    let header = root.child_ns(SOAP, "Header");
    let version = header
        .and_then(|h| h.child("RequestServerVersion"))
        .and_then(|v| v.attribute("Version"));
    match version {
        Some(v) if VERSIONS_ACCEPTED.contains(&v) => {}
        other => {
            return Err(soap_fault(
                "ErrorInvalidServerVersion",
                &format!("the request's RequestServerVersion {other:?} is not supported"),
                None,
            ));
        }
    }
    let impersonated = header
        .and_then(|h| h.child("ExchangeImpersonation"))
        .and_then(|i| i.child("ConnectingSID"))
        .and_then(|s| {
            s.child_text("SmtpAddress")
                .or_else(|| s.child_text("PrimarySmtpAddress"))
        })
        .map(str::to_ascii_lowercase);
    let operation = root
        .child_ns(SOAP, "Body")
        .and_then(|b| b.children.first())
        .cloned()
        .ok_or_else(|| soap_fault("ErrorSchemaValidation", "empty SOAP Body", None))?;
    Ok(Request {
        operation,
        impersonated: impersonated.is_some(),
        mailbox: impersonated.unwrap_or_else(|| own.to_owned()),
    })
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn request_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            v.split(';').find_map(|pair| {
                let (name, value) = pair.trim().split_once('=')?;
                (name == "X-BackEndOverrideCookie").then(|| value.to_owned())
            })
        })
}

fn authorized(state: &FakeState, headers: &HeaderMap) -> bool {
    let given = header_text(headers, "authorization").unwrap_or_default();
    match &state.options.auth {
        FakeAuth::None => true,
        FakeAuth::Basic { username, password } => {
            given == format!("Basic {}", B64.encode(format!("{username}:{password}")))
        }
        FakeAuth::Bearer { token } => given == format!("Bearer {token}"),
        FakeAuth::OAuth { .. } => given
            .strip_prefix("Bearer ")
            .is_some_and(|t| state.tokens.contains(t)),
    }
}

async fn token(State(fake): State<Shared>, body: Bytes) -> Response {
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let mut state = fake.lock();
    let FakeAuth::OAuth {
        client_id,
        client_secret,
    } = state.options.auth.clone()
    else {
        return (StatusCode::NOT_FOUND, "no OAuth here").into_response();
    };
    if form.get("grant_type").map(String::as_str) != Some("client_credentials")
        || form.get("client_id") != Some(&client_id)
        || form.get("client_secret") != Some(&client_secret)
    {
        return (StatusCode::UNAUTHORIZED, r#"{"error":"invalid_client"}"#).into_response();
    }
    state.next_id += 1;
    let token = format!("token-{}", state.next_id);
    state.tokens.insert(token.clone());
    state.tokens_issued += 1;
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        format!(r#"{{"token_type":"Bearer","expires_in":3599,"access_token":"{token}"}}"#),
    )
        .into_response()
}

async fn ews(
    State(fake): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let own = fake.lock().options.own_mailbox.clone();
    let request = match parse_request(&body, &own) {
        Ok(request) => request,
        Err(fault) => return xml_response(StatusCode::INTERNAL_SERVER_ERROR, fault),
    };
    let operation = request.operation.name.clone();
    let anchor = header_text(&headers, "x-anchormailbox");
    let prefer = header_text(&headers, "x-preferserveraffinity")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let cookie = request_cookie(&headers);
    let ids: Vec<String> = collect_ids(&request.operation);
    let fault = {
        let mut state = fake.lock();
        state.requests.push(Recorded {
            operation: operation.clone(),
            mailbox: request.mailbox.clone(),
            impersonated: request.impersonated,
            anchor: anchor.clone(),
            prefer_server_affinity: prefer,
            cookie: cookie.clone(),
            peer,
            subscription_ids: ids.clone(),
            set_cookie: None,
            watermark: request
                .operation
                .child_text("Watermark")
                .or_else(|| {
                    request
                        .operation
                        .children
                        .first()
                        .and_then(|r| r.child_text("Watermark"))
                })
                .map(str::to_owned),
            at: Instant::now(),
        });
        if !authorized(&state, &headers) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "",
            )
                .into_response();
        }
        let position = state
            .once
            .iter()
            .position(|(op, _)| op.as_deref().is_none_or(|op| op == operation));
        match position.and_then(|p| state.once.remove(p)) {
            Some((_, fault)) => Some(fault),
            None => state
                .per_mailbox
                .get(&request.mailbox)
                .filter(|(op, _)| op.as_deref().is_none_or(|op| op == operation))
                .map(|(_, fault)| fault.clone()),
        }
    };
    if anchor.is_none() {
        return (StatusCode::BAD_REQUEST, "X-AnchorMailbox is required").into_response();
    }
    if let Some(fault) = fault {
        return inject(fault, &operation, &fake).await;
    }
    // Routing: the override cookie wins when affinity is preferred,
    // otherwise the anchor mailbox decides the backend.
    let backend = match (&cookie, prefer) {
        (Some(cookie), true) => BACKENDS
            .iter()
            .copied()
            .find(|b| cookie.starts_with(b))
            .unwrap_or(BACKENDS[0]),
        _ => backend_of(anchor.as_deref().unwrap_or_default()),
    };
    match operation.as_str() {
        "Subscribe" => subscribe(&fake, &request, backend, prefer && cookie.is_none()),
        "GetStreamingEvents" => get_streaming_events(&fake, &request, backend, ids),
        "GetEvents" => get_events(&fake, &request),
        "Unsubscribe" => unsubscribe(&fake, backend, ids),
        "GetItem" => get_item(&fake, &request),
        "SyncFolderItems" => sync_folder_items(&fake, &request),
        "FindFolder" => find_folder(&request),
        other => xml_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            soap_fault(
                "ErrorInvalidRequest",
                &format!("the fake does not implement {other}"),
                None,
            ),
        ),
    }
}

fn collect_ids(operation: &Element) -> Vec<String> {
    let mut ids = Vec::new();
    if let Some(id) = operation.child_text("SubscriptionId") {
        ids.push(id.to_owned());
    }
    if let Some(list) = operation.child("SubscriptionIds") {
        ids.extend(
            list.children_named("SubscriptionId")
                .map(|id| id.text.trim().to_owned()),
        );
    }
    ids
}

async fn inject(fault: Fault, operation: &str, fake: &Shared) -> Response {
    match fault {
        Fault::ServerBusyFault(ms) => xml_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            soap_fault(
                "ErrorServerBusy",
                "The server cannot service this request right now. Try again later.",
                Some(ms),
            ),
        ),
        Fault::ServerBusyResponse(ms) => xml_response(
            StatusCode::OK,
            normal_envelope(
                operation,
                &error_message(
                    operation,
                    "ErrorServerBusy",
                    "The server cannot service this request right now.",
                    &busy_xml(ms),
                ),
            ),
        ),
        Fault::Unavailable(seconds) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, seconds.to_string())],
            "Service Unavailable",
        )
            .into_response(),
        Fault::Unauthorized => (StatusCode::UNAUTHORIZED, "").into_response(),
        Fault::Garbage => xml_response(
            StatusCode::OK,
            "\u{0}\u{1}this is not XML <<<>>>".to_owned(),
        ),
        Fault::Truncated => {
            let full = normal_envelope(operation, &success(operation, ""));
            xml_response(StatusCode::OK, full[..full.len() / 2].to_owned())
        }
        Fault::Hang => {
            fake.cancel.cancelled().await;
            (StatusCode::SERVICE_UNAVAILABLE, "stopped").into_response()
        }
    }
}

fn folder_list(request: &Element, mailbox: &str) -> Result<Option<Vec<String>>, String> {
    if request.attribute("SubscribeToAllFolders") == Some("true") {
        return Ok(None);
    }
    let mut folders = Vec::new();
    for folder in request
        .child("FolderIds")
        .map(|f| f.children.as_slice())
        .unwrap_or_default()
    {
        let id = folder.attribute("Id").unwrap_or_default();
        let name = if folder.name == "DistinguishedFolderId" {
            Some(id.to_owned()).filter(|n| FOLDERS.contains(&n.as_str()))
        } else {
            folder_name(mailbox, id)
        };
        folders.push(name.ok_or_else(|| format!("unknown folder {id}"))?);
    }
    if folders.is_empty() {
        return Err("no FolderIds".into());
    }
    Ok(Some(folders))
}

fn subscribe(
    fake: &Shared,
    request: &Request,
    backend: &'static str,
    issue_cookie: bool,
) -> Response {
    let op = "Subscribe";
    let Some(inner) = request.operation.children.first() else {
        return fail(op, "ErrorInvalidSubscriptionRequest", "empty Subscribe");
    };
    let folders = match folder_list(inner, &request.mailbox) {
        Ok(folders) => folders,
        Err(text) => {
            return fail(op, "ErrorInvalidSubscriptionRequest", &text);
        }
    };
    let types: Vec<Kind> = inner
        .child("EventTypes")
        .map(|t| {
            t.children_named("EventType")
                .filter_map(|e| Kind::from_element(e.text.trim()).filter(|k| *k != Kind::Status))
                .collect()
        })
        .unwrap_or_default();
    let mut state = fake.lock();
    let minute = state.options.minute;
    let data = state.mailboxes.entry(request.mailbox.clone()).or_default();
    let current = data.seq();
    let epoch = data.epoch;
    let (kind, start) = match inner.name.as_str() {
        "StreamingSubscriptionRequest" => (SubKind::Streaming, current),
        name @ ("PullSubscriptionRequest" | "PushSubscriptionRequest") => {
            let start = match inner.child_text("Watermark") {
                None => current,
                Some(text) => match parse_watermark(text) {
                    Some((e, seq)) if e == epoch && seq <= current => seq,
                    _ => {
                        return fail(
                            op,
                            "ErrorInvalidWatermark",
                            "The watermark is invalid or older than 30 days.",
                        );
                    }
                },
            };
            if name == "PullSubscriptionRequest" {
                let timeout_minutes = inner
                    .child_text("Timeout")
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(30);
                (
                    SubKind::Pull {
                        timeout_minutes,
                        last_used: Instant::now(),
                    },
                    start,
                )
            } else {
                let url = inner.child_text("URL").unwrap_or_default().to_owned();
                let frequency_minutes = inner
                    .child_text("StatusFrequency")
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(30);
                (
                    SubKind::Push {
                        url,
                        frequency_minutes,
                    },
                    start,
                )
            }
        }
        _ => {
            return fail(op, "ErrorInvalidSubscriptionRequest", "unknown request");
        }
    };
    state.next_id += 1;
    let id = subscription_id(backend, state.next_id);
    let is_push = matches!(kind, SubKind::Push { .. });
    let is_streaming = kind == SubKind::Streaming;
    let lost = state.losing.contains(&request.mailbox);
    state.subscriptions.insert(
        id.clone(),
        Subscription {
            mailbox: request.mailbox.clone(),
            kind,
            folders,
            types,
            cursor: start,
            backend,
            stream: None,
            lost,
            missed: false,
            paused: false,
        },
    );
    let cookie = issue_cookie.then(|| format!("{backend}~{}", rand::random::<u32>()));
    if let Some(last) = state.requests.last_mut() {
        last.set_cookie = cookie.clone();
    }
    drop(state);
    let mut payload = format!("<m:SubscriptionId>{id}</m:SubscriptionId>");
    if !is_streaming {
        let _ = write!(
            payload,
            "<m:Watermark>{}</m:Watermark>",
            watermark(epoch, start)
        );
    }
    if is_push {
        tokio::spawn(pusher(fake.clone(), id.clone(), minute));
    }
    let mut response = xml_response(StatusCode::OK, normal_envelope(op, &success(op, &payload)));
    if let Some(cookie) = cookie
        && let Ok(value) =
            format!("X-BackEndOverrideCookie={cookie}; path=/; secure; HttpOnly").parse()
    {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

fn unsubscribe(fake: &Shared, backend: &'static str, ids: Vec<String>) -> Response {
    let op = "Unsubscribe";
    let mut state = fake.lock();
    let id = ids.first().cloned().unwrap_or_default();
    let message = match state.subscriptions.get(&id) {
        Some(sub)
            if !sub.lost && sub.backend == backend && !matches!(sub.kind, SubKind::Push { .. }) =>
        {
            state.subscriptions.remove(&id);
            success(op, "")
        }
        Some(sub) if matches!(sub.kind, SubKind::Push { .. }) => error_message(
            op,
            "ErrorInvalidPullSubscriptionId",
            "Push subscriptions cannot be unsubscribed.",
            "",
        ),
        _ => error_message(
            op,
            "ErrorSubscriptionNotFound",
            "The specified subscription was not found.",
            "",
        ),
    };
    drop(state);
    fake.bump();
    xml_response(StatusCode::OK, normal_envelope(op, &message))
}

fn get_events(fake: &Shared, request: &Request) -> Response {
    let op = "GetEvents";
    let id = request
        .operation
        .child_text("SubscriptionId")
        .unwrap_or_default()
        .to_owned();
    let requested = request
        .operation
        .child_text("Watermark")
        .map(parse_watermark);
    let mut state = fake.lock();
    let minute = state.options.minute;
    let batch = state.options.pull_batch;
    let error = |code: &str, text: &str| {
        xml_response(
            StatusCode::OK,
            normal_envelope(op, &error_message(op, code, text, "")),
        )
    };
    let Some(sub) = state.subscriptions.get(&id).cloned() else {
        return error(
            "ErrorSubscriptionNotFound",
            "The specified subscription was not found.",
        );
    };
    let SubKind::Pull {
        timeout_minutes,
        last_used,
    } = sub.kind
    else {
        return error(
            "ErrorInvalidPullSubscriptionId",
            "The subscription is not a pull subscription.",
        );
    };
    if sub.lost {
        return error(
            "ErrorSubscriptionNotFound",
            "The specified subscription was not found.",
        );
    }
    if last_used.elapsed() > minute * timeout_minutes {
        state.subscriptions.remove(&id);
        return error("ErrorExpiredSubscription", "The subscription has expired.");
    }
    let data = state.mailboxes.entry(sub.mailbox.clone()).or_default();
    let current = data.seq();
    let epoch = data.epoch;
    let after = match requested {
        Some(Some((e, seq))) if e == epoch && seq <= current => seq,
        Some(_) => {
            return error(
                "ErrorInvalidWatermark",
                "The watermark is invalid or older than 30 days.",
            );
        }
        None => sub.cursor,
    };
    let (events, more) = pending(&state, &sub, after, batch);
    let mut body = format!(
        "<m:Notification><t:SubscriptionId>{id}</t:SubscriptionId><t:PreviousWatermark>{}</t:PreviousWatermark><t:MoreEvents>{more}</t:MoreEvents>",
        watermark(epoch, after)
    );
    let last = events.last().map(|e| e.seq);
    if events.is_empty() {
        let _ = write!(
            body,
            "<t:StatusEvent><t:Watermark>{}</t:Watermark></t:StatusEvent>",
            watermark(epoch, current)
        );
    }
    for event in &events {
        event_xml(&mut body, &sub.mailbox, event, Some(epoch));
    }
    body.push_str("</m:Notification>");
    if let Some(sub) = state.subscriptions.get_mut(&id) {
        sub.cursor = last.unwrap_or(current);
        sub.kind = SubKind::Pull {
            timeout_minutes,
            last_used: Instant::now(),
        };
    }
    xml_response(StatusCode::OK, normal_envelope(op, &success(op, &body)))
}

fn get_item(fake: &Shared, request: &Request) -> Response {
    let op = "GetItem";
    let state = fake.lock();
    let data = state.mailboxes.get(&request.mailbox);
    let mut messages = String::new();
    for id in request
        .operation
        .child("ItemIds")
        .map(|i| i.children.as_slice())
        .unwrap_or_default()
    {
        let id = id.attribute("Id").unwrap_or_default();
        match data
            .and_then(|d| d.items.get(id))
            .filter(|i| i.deleted_seq.is_none() && !i.gone)
        {
            Some(item) => {
                let payload = format!(
                    r#"<m:Items><t:Message><t:ItemId Id="{}" ChangeKey="{}"/><t:Subject>{}</t:Subject><t:DateTimeReceived>{}</t:DateTimeReceived><t:From><t:Mailbox><t:Name>{}</t:Name><t:EmailAddress>{}</t:EmailAddress><t:RoutingType>SMTP</t:RoutingType></t:Mailbox></t:From></t:Message></m:Items>"#,
                    item.id,
                    item.change_key,
                    escape(&item.subject),
                    item.received,
                    escape(&item.from_name),
                    escape(&item.from_address)
                );
                messages.push_str(&success(op, &payload));
            }
            None => messages.push_str(&error_message(
                op,
                "ErrorItemNotFound",
                "The specified object was not found in the store.",
                "<m:Items/>",
            )),
        }
    }
    xml_response(StatusCode::OK, normal_envelope(op, &messages))
}

fn sync_folder_items(fake: &Shared, request: &Request) -> Response {
    let op = "SyncFolderItems";
    let state = fake.lock();
    let operation = &request.operation;
    let folder = operation
        .child("SyncFolderId")
        .and_then(|f| f.children.first())
        .and_then(|f| {
            let id = f.attribute("Id")?;
            if f.name == "DistinguishedFolderId" {
                Some(id.to_owned())
            } else {
                folder_name(&request.mailbox, id)
            }
        });
    let Some(folder) = folder.filter(|f| FOLDERS.contains(&f.as_str())) else {
        return fail(
            op,
            "ErrorFolderNotFound",
            "The specified folder could not be found in the store.",
        );
    };
    let since = match operation.child_text("SyncState") {
        None => 0,
        Some(text) => match parse_sync_state(text) {
            Some(seq) => seq,
            None => {
                return fail(op, "ErrorInvalidSyncStateData", "Invalid sync state data.");
            }
        },
    };
    let max = operation
        .child_text("MaxChangesReturned")
        .and_then(|m| m.parse().ok())
        .unwrap_or(512usize);
    // Properties beyond the ids only when the ItemShape asks for them.
    let wanted: HashSet<String> = operation
        .child("ItemShape")
        .and_then(|shape| shape.child("AdditionalProperties"))
        .map(|props| {
            props
                .children
                .iter()
                .filter_map(|p| p.attribute("FieldURI"))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let empty = MailboxData::default();
    let data = state.mailboxes.get(&request.mailbox).unwrap_or(&empty);
    // (seq, xml) of every change of this folder after `since`.
    let mut changes: Vec<(u64, String)> = Vec::new();
    for item in data.items.values().filter(|i| i.folder == folder) {
        let item_xml = |tag: &str| {
            let mut xml = format!(
                r#"<t:{tag}><t:Message><t:ItemId Id="{}" ChangeKey="{}"/><t:ParentFolderId Id="{}" ChangeKey="AQAAAA=="/>"#,
                item.id,
                item.change_key,
                folder_id(&request.mailbox, &folder)
            );
            if wanted.contains("item:Subject") {
                let _ = write!(xml, "<t:Subject>{}</t:Subject>", escape(&item.subject));
            }
            if wanted.contains("item:DateTimeReceived") {
                let _ = write!(
                    xml,
                    "<t:DateTimeReceived>{}</t:DateTimeReceived>",
                    item.received
                );
            }
            if wanted.contains("message:From") {
                let _ = write!(
                    xml,
                    "<t:From><t:Mailbox><t:Name>{}</t:Name><t:EmailAddress>{}</t:EmailAddress></t:Mailbox></t:From>",
                    escape(&item.from_name),
                    escape(&item.from_address)
                );
            }
            let _ = write!(xml, "</t:Message></t:{tag}>");
            xml
        };
        match item.deleted_seq {
            Some(deleted) if item.created_seq <= since && deleted > since => {
                changes.push((
                    deleted,
                    format!(
                        r#"<t:Delete><t:ItemId Id="{}" ChangeKey="{}"/></t:Delete>"#,
                        item.id, item.change_key
                    ),
                ));
            }
            Some(_) => {}
            None if item.created_seq > since => {
                changes.push((item.created_seq, item_xml("Create")))
            }
            None if item.content_seq > since => {
                changes.push((item.modified_seq, item_xml("Update")))
            }
            None if item.modified_seq > since => changes.push((
                item.modified_seq,
                format!(
                    r#"<t:ReadFlagChange><t:ItemId Id="{}" ChangeKey="{}"/><t:IsRead>{}</t:IsRead></t:ReadFlagChange>"#,
                    item.id, item.change_key, item.read
                ),
            )),
            None => {}
        }
    }
    changes.sort_by_key(|(seq, _)| *seq);
    let all = changes.len() <= max;
    changes.truncate(max);
    let state_seq = if all {
        data.seq()
    } else {
        changes.last().map(|(s, _)| *s).unwrap_or(since)
    };
    let mut payload = format!(
        "<m:SyncState>{}</m:SyncState><m:IncludesLastItemInRange>{all}</m:IncludesLastItemInRange><m:Changes>",
        sync_state(state_seq)
    );
    for (_, change) in changes {
        payload.push_str(&change);
    }
    payload.push_str("</m:Changes>");
    xml_response(StatusCode::OK, normal_envelope(op, &success(op, &payload)))
}

fn find_folder(request: &Request) -> Response {
    let op = "FindFolder";
    let mut folders = String::new();
    for name in FOLDERS {
        let _ = write!(
            folders,
            r#"<t:Folder><t:FolderId Id="{}" ChangeKey="AQAAAA=="/></t:Folder>"#,
            folder_id(&request.mailbox, name)
        );
    }
    let payload = format!(
        r#"<m:RootFolder TotalItemsInView="{}" IncludesLastItemInRange="true"><t:Folders>{folders}</t:Folders></m:RootFolder>"#,
        FOLDERS.len()
    );
    xml_response(StatusCode::OK, normal_envelope(op, &success(op, &payload)))
}

// --- streaming -------------------------------------------------------------------

fn streaming_envelope(message: &str) -> String {
    format!(
        r#"<Envelope xmlns="{SOAP}"><soap11:Header xmlns:soap11="{SOAP}"><ServerVersionInfo xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" MajorVersion="15" MinorVersion="1" MajorBuildNumber="2507" MinorBuildNumber="6" Version="V2017_07_11" xmlns="{TYPES}"/></soap11:Header><soap11:Body xmlns:soap11="{SOAP}"><m:GetStreamingEventsResponse xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:t="{TYPES}" xmlns:m="{MESSAGES}"><m:ResponseMessages>{message}</m:ResponseMessages></m:GetStreamingEventsResponse></soap11:Body></Envelope>"#
    )
}

fn streaming_ok(notifications: &str, status: &str) -> String {
    let notifications = if notifications.is_empty() {
        String::new()
    } else {
        format!("<m:Notifications>{notifications}</m:Notifications>")
    };
    streaming_envelope(&format!(
        r#"<m:GetStreamingEventsResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode>{notifications}<m:ConnectionStatus>{status}</m:ConnectionStatus></m:GetStreamingEventsResponseMessage>"#
    ))
}

fn streaming_error(code: &str, ids: &[String], status: &str) -> String {
    let ids: String = ids
        .iter()
        .map(|id| format!("<m:SubscriptionId>{id}</m:SubscriptionId>"))
        .collect();
    streaming_envelope(&error_message(
        "GetStreamingEvents",
        code,
        "The subscription is no longer valid.",
        &format!(
            "<m:ErrorSubscriptionIds>{ids}</m:ErrorSubscriptionIds><m:ConnectionStatus>{status}</m:ConnectionStatus>"
        ),
    ))
}

type Frame = Result<Bytes, std::io::Error>;

fn get_streaming_events(
    fake: &Shared,
    request: &Request,
    backend: &'static str,
    ids: Vec<String>,
) -> Response {
    let op = "GetStreamingEvents";
    let minutes: u32 = request
        .operation
        .child_text("ConnectionTimeout")
        .and_then(|t| t.parse().ok())
        .unwrap_or(30);
    if !(1..=30).contains(&minutes) || ids.is_empty() {
        return fail(
            op,
            "ErrorInvalidRequest",
            "ConnectionTimeout must be 1-30 and ids given.",
        );
    }
    let mut state = fake.lock();
    state.next_stream += 1;
    let stream = state.next_stream;
    // Ids this backend does not hold (a missing affinity cookie) or that are gone.
    let mut unknown = Vec::new();
    let mut superseded = Vec::new();
    for id in &ids {
        match state.subscriptions.get_mut(id) {
            Some(sub) if sub.backend == backend && !sub.lost && sub.kind == SubKind::Streaming => {
                if let Some(old) = sub.stream.replace(stream) {
                    superseded.push(old);
                }
            }
            _ => unknown.push(id.clone()),
        }
    }
    if unknown.len() == ids.len() {
        return fail(
            op,
            "ErrorSubscriptionNotFound",
            "The specified subscription was not found.",
        );
    }
    let fault = state.stream_faults.pop_front().unwrap_or_default();
    let minute = state.options.minute;
    let keepalive = state.options.keepalive;
    state.open_streams += 1;
    drop(state);
    let (frames, body) = tokio::sync::mpsc::channel::<Frame>(STREAM_BUFFER);
    let deadline = Instant::now() + minute * minutes;
    tokio::spawn(run_stream(
        fake.clone(),
        stream,
        ids,
        unknown,
        fault,
        deadline,
        keepalive,
        frames,
    ));
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(body));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/xml; charset=utf-8")
        .header("X-NoBuffering", "1")
        .header(header::CONNECTION, "close")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Writes one round of envelopes; false when the client has gone.
async fn write(
    frames: &tokio::sync::mpsc::Sender<Frame>,
    envelopes: Vec<String>,
    chunking: Chunking,
) -> bool {
    let pieces: Vec<Bytes> = match chunking {
        Chunking::Whole => envelopes.into_iter().map(Bytes::from).collect(),
        Chunking::Pack => vec![Bytes::from(envelopes.concat())],
        Chunking::Split(n) => {
            let all = Bytes::from(envelopes.concat());
            (0..all.len())
                .step_by(n.max(1))
                .map(|i| all.slice(i..(i + n.max(1)).min(all.len())))
                .collect()
        }
    };
    for piece in pieces {
        if frames.send(Ok(piece)).await.is_err() {
            return false;
        }
    }
    true
}

#[allow(clippy::too_many_arguments)]
async fn run_stream(
    fake: Shared,
    stream: u64,
    ids: Vec<String>,
    unknown: Vec<String>,
    fault: StreamFault,
    deadline: Instant,
    keepalive: Duration,
    frames: tokio::sync::mpsc::Sender<Frame>,
) {
    let mut changed = fake.changed.subscribe();
    let mut written = 0usize;
    let mut first = true;
    let mut last_write = Instant::now();
    loop {
        // Faults that trigger after `n` envelopes.
        let trigger = match fault {
            StreamFault::DropAfter(n)
            | StreamFault::StallAfter(n)
            | StreamFault::GarbageAfter(n)
            | StreamFault::TruncateAfter(n)
            | StreamFault::ResetAfter(n) => written >= n,
            StreamFault::None => false,
        };
        if trigger {
            match fault {
                StreamFault::StallAfter(_) => {
                    tokio::select! {
                        () = frames.closed() => {}
                        () = fake.cancel.cancelled() => {}
                    }
                }
                StreamFault::GarbageAfter(_) => {
                    let _ = frames
                        .send(Ok(Bytes::from_static(b"\x00\x01garbage that is not XML")))
                        .await;
                }
                StreamFault::TruncateAfter(_) => {
                    let envelope = streaming_ok("", "OK");
                    let _ = frames
                        .send(Ok(Bytes::from(envelope[..envelope.len() / 2].to_owned())))
                        .await;
                }
                StreamFault::ResetAfter(_) => {
                    let _ = frames
                        .send(Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionReset,
                            "reset by the fake",
                        )))
                        .await;
                }
                StreamFault::DropAfter(_) | StreamFault::None => {}
            }
            break;
        }
        let held = fake.lock().streams_held;
        if held {
            tokio::select! {
                _ = changed.changed() => continue,
                () = frames.closed() => break,
                () = fake.cancel.cancelled() => break,
            }
        }
        let (envelopes, closing, chunking) = {
            let mut state = fake.lock();
            let chunking = state.chunking;
            let mut envelopes = Vec::new();
            let mut notifications = Vec::new();
            let mut lost = Vec::new();
            let mut missed = Vec::new();
            let mut taken_over = Vec::new();
            if first && !unknown.is_empty() {
                envelopes.push(streaming_error("ErrorSubscriptionNotFound", &unknown, "OK"));
            }
            for id in &ids {
                let Some(sub) = state.subscriptions.get(id).cloned() else {
                    if !unknown.contains(id) {
                        lost.push(id.clone());
                    }
                    continue;
                };
                if sub.stream != Some(stream) || state.taking_over.contains(&sub.mailbox) {
                    if !unknown.contains(id) {
                        taken_over.push(id.clone());
                    }
                    continue;
                }
                if sub.lost {
                    lost.push(id.clone());
                    continue;
                }
                if sub.missed {
                    missed.push(id.clone());
                }
                let (events, _) = pending(&state, &sub, sub.cursor, usize::MAX);
                if let Some(last) = events.last().map(|e| e.seq) {
                    let mut xml =
                        format!("<m:Notification><t:SubscriptionId>{id}</t:SubscriptionId>");
                    for event in &events {
                        event_xml(&mut xml, &sub.mailbox, event, None);
                    }
                    xml.push_str("</m:Notification>");
                    notifications.push(xml);
                    if let Some(sub) = state.subscriptions.get_mut(id) {
                        sub.cursor = last;
                    }
                }
                if let Some(sub) = state.subscriptions.get_mut(id) {
                    sub.missed = false;
                }
            }
            // Lost subscriptions are reported once, then forgotten.
            for id in &lost {
                state.subscriptions.remove(id);
            }
            let all_gone = lost.len() + taken_over.len() + unknown.len() >= ids.len();
            if !missed.is_empty() {
                envelopes.push(streaming_error(
                    "ErrorMissedNotificationEvents",
                    &missed,
                    "OK",
                ));
            }
            if !taken_over.is_empty() {
                envelopes.push(streaming_error(
                    "ErrorNewEventStreamConnectionOpened",
                    &taken_over,
                    if all_gone { "Closed" } else { "OK" },
                ));
            }
            if !lost.is_empty() {
                envelopes.push(streaming_error(
                    "ErrorSubscriptionNotFound",
                    &lost,
                    if all_gone { "Closed" } else { "OK" },
                ));
            }
            if !notifications.is_empty() {
                if chunking != Chunking::Pack {
                    state.most_notifications = state.most_notifications.max(notifications.len());
                }
                if chunking == Chunking::Pack {
                    envelopes.extend(notifications.iter().map(|n| streaming_ok(n, "OK")));
                } else {
                    envelopes.push(streaming_ok(&notifications.concat(), "OK"));
                }
            }
            let now = Instant::now();
            let closing = now >= deadline || all_gone;
            if closing && !all_gone {
                envelopes.push(streaming_ok("", "Closed"));
            } else if envelopes.is_empty() && (first || now >= last_write + keepalive) {
                envelopes.push(streaming_ok("", "OK"));
            }
            (envelopes, closing, chunking)
        };
        first = false;
        if !envelopes.is_empty() {
            written += envelopes.len();
            last_write = Instant::now();
            if !write(&frames, envelopes, chunking).await {
                break;
            }
        }
        if closing {
            break;
        }
        let wake = (last_write + keepalive).min(deadline);
        tokio::select! {
            _ = changed.changed() => {}
            () = tokio::time::sleep_until(wake) => {}
            () = frames.closed() => break,
            () = fake.cancel.cancelled() => break,
        }
    }
    let mut state = fake.lock();
    state.open_streams = state.open_streams.saturating_sub(1);
    for id in &ids {
        if let Some(sub) = state.subscriptions.get_mut(id)
            && sub.stream == Some(stream)
        {
            sub.stream = None;
        }
    }
}

// --- push ----------------------------------------------------------------------------

fn send_notification(id: &str, previous: String, more: bool, events: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?><soap11:Envelope xmlns:soap11="{SOAP}"><soap11:Header><t:RequestServerVersion xmlns:m="{MESSAGES}" Version="Exchange2010" xmlns:t="{TYPES}" /></soap11:Header><soap11:Body><m:SendNotification xmlns:t="{TYPES}" xmlns:m="{MESSAGES}"><m:ResponseMessages><m:SendNotificationResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode><m:Notification><t:SubscriptionId>{id}</t:SubscriptionId><t:PreviousWatermark>{}</t:PreviousWatermark><t:MoreEvents>{more}</t:MoreEvents>{events}</m:Notification></m:SendNotificationResponseMessage></m:ResponseMessages></m:SendNotification></soap11:Body></soap11:Envelope>"#,
        previous
    )
}

/// Pushes one push subscription's notifications until it ends: an initial
/// StatusEvent, events as they happen, StatusEvents every StatusFrequency
/// when idle; retries a failed POST and drops the subscription when it kept
/// failing for StatusFrequency; stops on an Unsubscribe answer.
async fn pusher(fake: Shared, id: String, minute: Duration) {
    let mut changed = fake.changed.subscribe();
    let mut status_due = Instant::now();
    let mut failing_since: Option<Instant> = None;
    let retry = (minute / 2).max(Duration::from_millis(50));
    loop {
        let (request, url, next_cursor, frequency) = {
            let state = fake.lock();
            let Some(sub) = state.subscriptions.get(&id).cloned() else {
                return;
            };
            let SubKind::Push {
                url,
                frequency_minutes,
            } = sub.kind.clone()
            else {
                return;
            };
            let frequency = minute * frequency_minutes;
            if sub.lost {
                return;
            }
            let (events, more) = pending(&state, &sub, sub.cursor, state.options.pull_batch);
            let epoch = state
                .mailboxes
                .get(&sub.mailbox)
                .map(|d| d.epoch)
                .unwrap_or(0);
            let previous = watermark(epoch, sub.cursor);
            let now = Instant::now();
            if sub.paused || (events.is_empty() && now < status_due) {
                (None, url, sub.cursor, frequency)
            } else if events.is_empty() {
                let current = state
                    .mailboxes
                    .get(&sub.mailbox)
                    .map(MailboxData::seq)
                    .unwrap_or(sub.cursor);
                let body = format!(
                    "<t:StatusEvent><t:Watermark>{}</t:Watermark></t:StatusEvent>",
                    watermark(epoch, current)
                );
                (
                    Some(send_notification(&id, previous, false, &body)),
                    url,
                    current,
                    frequency,
                )
            } else {
                let mut body = String::new();
                for event in &events {
                    event_xml(&mut body, &sub.mailbox, event, Some(epoch));
                }
                let last = events.last().map(|e| e.seq).unwrap_or(sub.cursor);
                (
                    Some(send_notification(&id, previous, more, &body)),
                    url,
                    last,
                    frequency,
                )
            }
        };
        if let Some(request) = request {
            let answer = fake
                .http
                .post(&url)
                .header(header::CONTENT_TYPE, "text/xml; charset=utf-8")
                .header(
                    "SOAPAction",
                    "http://schemas.microsoft.com/exchange/services/2006/messages/SendNotification",
                )
                .body(request)
                .send()
                .await;
            let reply = match answer {
                Ok(response) if response.status() == StatusCode::OK => {
                    response.bytes().await.ok().and_then(|b| {
                        let body = super::messages::body(&b).ok()?;
                        body.child_text("SubscriptionStatus").map(str::to_owned)
                    })
                }
                _ => None,
            };
            let mut state = fake.lock();
            match reply.as_deref() {
                Some("OK") => {
                    state.pushes_answered.push((id.clone(), "OK".into()));
                    if let Some(sub) = state.subscriptions.get_mut(&id) {
                        sub.cursor = sub.cursor.max(next_cursor);
                    }
                    failing_since = None;
                    status_due = Instant::now() + frequency;
                }
                Some(_) => {
                    state
                        .pushes_answered
                        .push((id.clone(), "Unsubscribe".into()));
                    state.subscriptions.remove(&id);
                    return;
                }
                None => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= frequency {
                        state.subscriptions.remove(&id);
                        return;
                    }
                    drop(state);
                    tokio::select! {
                        () = tokio::time::sleep(retry) => {}
                        () = fake.cancel.cancelled() => return,
                    }
                    continue;
                }
            }
            continue;
        }
        tokio::select! {
            _ = changed.changed() => {}
            () = tokio::time::sleep_until(status_due.max(Instant::now() + Duration::from_millis(1))) => {}
            () = fake.cancel.cancelled() => return,
        }
    }
}

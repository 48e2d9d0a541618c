//! The EWS adapter end to end: the fake Exchange (a real HTTP server on
//! 127.0.0.1) → the adapter → a real broker → a transient subscriber that
//! receives the MailboxEvents.

mod auth;
mod mapping;
mod postgres;
mod process;
mod pull;
mod push;
mod recovery;
mod status;
mod streaming;
mod throttling;

use std::time::Duration;

use herald::{
    ews::{
        self, AdapterError,
        config::EwsConfig,
        fake::{FakeExchange, FakeOptions},
        store::{StateStore, StatusRow},
    },
    pb::{ews::MailboxEvent, v1::Event},
};
use prost::Message;
use tempfile::TempDir;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle, time::Instant};

use crate::support::{PATIENCE, TestBroker, TestSubscriber};

pub const CONTRACT: &str = "herald.ews.v1.MailboxEvents";
pub const ALICE: &str = "alice@fake.example";
pub const BOB: &str = "bob@fake.example";
pub const CAROL: &str = "carol@fake.example";

/// Fake Exchange timings short enough for tests.
pub fn fast_fake() -> FakeOptions {
    FakeOptions {
        keepalive: Duration::from_millis(300),
        ..FakeOptions::default()
    }
}

/// The adapter's task and what stops it.
type Running = (oneshot::Sender<()>, JoinHandle<Result<(), AdapterError>>);

/// A broker, a fake Exchange, a state directory, and (once started) the adapter.
pub struct Ews {
    pub broker: TestBroker,
    pub fake: FakeExchange,
    pub dir: TempDir,
    adapter: Option<Running>,
    /// Environment variables the config may name, instead of the process's.
    pub secrets: Vec<(String, String)>,
    /// Applied to the parsed config before the adapter starts, for settings
    /// the file cannot make short enough for a test (e.g. the resync interval).
    pub tweak: fn(&mut EwsConfig),
    config: Option<EwsConfig>,
}

impl Ews {
    pub async fn start() -> Self {
        Self::with_fake(fast_fake()).await
    }

    pub async fn with_fake(options: FakeOptions) -> Self {
        Self {
            broker: TestBroker::start().await,
            fake: FakeExchange::start(options)
                .await
                .expect("start the fake Exchange"),
            dir: tempfile::tempdir().expect("a temporary directory"),
            adapter: None,
            config: None,
            secrets: Vec::new(),
            tweak: |_| {},
        }
    }

    /// A broker, a fake with `options`, a subscriber to MailboxEvents, and
    /// the adapter for `mailboxes` (with `extra` config), baseline taken.
    pub async fn running(
        options: FakeOptions,
        mailboxes: &[&str],
        extra: &str,
    ) -> (Self, TestSubscriber) {
        let mut ews = Self::with_fake(options).await;
        let subscriber = ews.subscriber().await;
        ews.start_adapter(mailboxes, extra).await;
        ews.wait_ready(mailboxes).await;
        (ews, subscriber)
    }

    /// The requests of one operation the fake received, in order.
    pub fn requests_of(&self, operation: &str) -> Vec<herald::ews::fake::Recorded> {
        self.fake
            .requests()
            .into_iter()
            .filter(|r| r.operation == operation)
            .collect()
    }

    /// A config with test timings for `mailboxes`, plus `extra` TOML lines
    /// (top-level keys first, then tables).
    pub fn config_text(&self, mailboxes: &[&str], extra: &str) -> String {
        let list: Vec<String> = mailboxes.iter().map(|m| format!("\"{m}\"")).collect();
        // Top-level keys must come before the first table.
        let table_at = extra
            .match_indices('\n')
            .map(|(i, _)| i + 1)
            .chain([0])
            .filter(|&i| extra[i..].starts_with('['))
            .min()
            .unwrap_or(extra.len());
        let (top, tables) = extra.split_at(table_at);
        format!(
            "url = \"{}\"\nbroker = \"{}\"\nmailboxes = [{}]\n{}{top}\n[retry]\ninitial_backoff_ms = 50\nmax_backoff_seconds = 1\n{}\n",
            self.fake.url(),
            self.broker.url(),
            list.join(", "),
            if top.contains("request_timeout_seconds") {
                ""
            } else {
                "request_timeout_seconds = 3\n"
            },
            if tables.contains("[streaming]") {
                tables.to_owned()
            } else {
                format!("[streaming]\nsilence_seconds = 2\n{tables}")
            }
        )
    }

    /// Writes `ews.toml` into the state directory and parses it.
    pub fn write_config(&self, text: &str) -> std::path::PathBuf {
        let path = self.dir.path().join("ews.toml");
        std::fs::write(&path, text).expect("write the config");
        path
    }

    /// Starts the adapter in this process.
    pub async fn start_adapter(&mut self, mailboxes: &[&str], extra: &str) {
        let text = self.config_text(mailboxes, extra);
        self.start_adapter_with(&text, None).await;
    }

    pub async fn start_adapter_with(&mut self, text: &str, push: Option<TcpListener>) {
        let path = self.write_config(text);
        let secrets = self.secrets.clone();
        let mut config = EwsConfig::parse(&path, text, |name| {
            secrets
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        })
        .expect("a valid config");
        (self.tweak)(&mut config);
        self.config = Some(config.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(ews::run(config, push, async {
            let _ = stopped.await;
        }));
        self.adapter = Some((stop, task));
    }

    /// Stops the adapter gracefully and fails the test if it failed.
    pub async fn stop_adapter(&mut self) {
        if let Some((stop, task)) = self.adapter.take() {
            let _ = stop.send(());
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("the adapter stops in time")
                .expect("the adapter task did not panic")
                .expect("the adapter ended without error");
        }
    }

    /// The adapter's state database.
    pub async fn store(&self) -> StateStore {
        let config = self.config.as_ref().expect("the adapter was configured");
        StateStore::open(&config.state)
            .await
            .expect("open the state database")
    }

    /// A transient subscriber to every MailboxEvents operation.
    pub async fn subscriber(&self) -> TestSubscriber {
        let mut subscriber = self.broker.subscriber().await;
        subscriber
            .subscribe(CONTRACT, "")
            .await
            .expect("subscribe to MailboxEvents");
        subscriber
    }

    /// Waits until `n` mailboxes took their baseline (or caught up) and have
    /// at least one open stream (streaming) or subscription.
    pub async fn wait_ready(&self, mailboxes: &[&str]) {
        let ready = self
            .fake
            .wait_until(PATIENCE, |f| {
                let synced: std::collections::HashSet<String> = f
                    .requests()
                    .into_iter()
                    .filter(|r| r.operation == "SyncFolderItems")
                    .map(|r| r.mailbox)
                    .collect();
                mailboxes.iter().all(|m| synced.contains(*m))
            })
            .await;
        assert!(
            ready,
            "the adapter never took its baseline: {:?}",
            self.fake
                .requests()
                .iter()
                .map(|r| &r.operation)
                .collect::<Vec<_>>()
        );
        // The SyncState is stored right after the answer.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Drop for Ews {
    fn drop(&mut self) {
        if let Some((stop, task)) = self.adapter.take() {
            let _ = stop.send(());
            task.abort();
        }
    }
}

/// The MailboxEvent inside a broker event.
pub fn mailbox_event(event: &Event) -> MailboxEvent {
    MailboxEvent::decode(event.payload.as_ref()).expect("the payload is a MailboxEvent")
}

/// Reads events until `n` arrived; returns (operation, payload) pairs.
pub async fn receive(subscriber: &mut TestSubscriber, n: usize) -> Vec<(String, MailboxEvent)> {
    let mut events = Vec::new();
    while events.len() < n {
        let event = subscriber.next_event().await;
        assert_eq!(event.contract, CONTRACT);
        events.push((event.operation.clone(), mailbox_event(&event)));
    }
    events
}

/// Collects events until `done` holds for what arrived (or the patience runs out).
pub async fn receive_until(
    subscriber: &mut TestSubscriber,
    done: impl Fn(&[(String, MailboxEvent)]) -> bool,
) -> Vec<(String, MailboxEvent)> {
    receive_within(subscriber, PATIENCE, done).await
}

/// Collects events until `done` holds for what arrived; fails the test if
/// that takes longer than `patience`.
pub async fn receive_within(
    subscriber: &mut TestSubscriber,
    patience: Duration,
    done: impl Fn(&[(String, MailboxEvent)]) -> bool,
) -> Vec<(String, MailboxEvent)> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut events = Vec::new();
    while !done(&events) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match subscriber.next_within(left).await {
            Some(herald::pb::v1::subscription_message::Message::Event(event)) => {
                events.push((event.operation.clone(), mailbox_event(&event)));
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => panic!("timed out; received so far: {:?}", summary(&events)),
        }
    }
    events
}

/// Every event that arrives until `quiet` passes without one.
pub async fn drain(
    subscriber: &mut TestSubscriber,
    quiet: Duration,
) -> Vec<(String, MailboxEvent)> {
    let mut events = Vec::new();
    while let Some(message) = subscriber.next_within(quiet).await {
        match message {
            herald::pb::v1::subscription_message::Message::Event(event) => {
                events.push((event.operation.clone(), mailbox_event(&event)));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    events
}

/// (operation, mailbox, item or folder id, recovered) of each event, for messages.
pub fn summary(events: &[(String, MailboxEvent)]) -> Vec<(String, String, String, bool)> {
    events
        .iter()
        .map(|(op, e)| {
            let id = if e.item_id.is_empty() {
                e.folder_id.clone()
            } else {
                e.item_id.clone()
            };
            (op.clone(), e.mailbox.clone(), id, e.recovered)
        })
        .collect()
}

/// True when an event `operation` about `item` arrived.
pub fn has(events: &[(String, MailboxEvent)], operation: &str, item: &str) -> bool {
    events
        .iter()
        .any(|(op, e)| op == operation && e.item_id == item)
}

/// Waits for six requests of `operation` about `mailbox` after the first
/// `before`, each made after the adapter's recovery from a failure that
/// repeats without any event in between: the first recovery comes at once,
/// then after back-offs of at least 25, 50, 100, 200 and 400 ms (half of
/// each step of the test config's 50 ms initial back-off).
pub async fn assert_recoveries_slow_down(ews: &Ews, operation: &str, mailbox: &str, before: usize) {
    let times = || -> Vec<Instant> {
        ews.fake
            .requests()
            .into_iter()
            .filter(|r| r.operation == operation && r.mailbox == mailbox)
            .skip(before)
            .map(|r| r.at)
            .collect()
    };
    assert!(
        ews.fake.wait_until(PATIENCE, |_| times().len() >= 6).await,
        "{operation} was retried"
    );
    let times = times();
    assert!(
        times[5] - times[4] >= Duration::from_millis(400),
        "backed off: {:?}",
        times.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>()
    );
    assert!(times[5] - times[0] >= Duration::from_millis(775));
}

pub fn requests_about(ews: &Ews, operation: &str, mailbox: &str) -> usize {
    ews.fake
        .requests()
        .iter()
        .filter(|r| r.operation == operation && r.mailbox == mailbox)
        .count()
}

/// Waits until the stored state of `mailbox` (what `herald ews status`
/// shows) is `state` and returns it; fails the test with the last one seen
/// otherwise.
pub async fn wait_for_state(ews: &Ews, mailbox: &str, state: &str) -> StatusRow {
    let store = ews.store().await;
    let deadline = Instant::now() + PATIENCE;
    let row = loop {
        let rows = store.statuses().await.expect("read the mailbox states");
        let row = rows.into_iter().find(|r| r.mailbox == mailbox);
        if let Some(row) = row.as_ref().filter(|r| r.state == state) {
            break row.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{mailbox} never became {state}: {row:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    store.close().await;
    row
}

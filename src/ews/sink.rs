//! Where notifications and gaps end up: fetch the properties `fetch` asks for
//! (one GetItem per notification), drop what was already published, fire the
//! rest into the broker, and remember what was fired. Catch-up closes a gap
//! with SyncFolderItems from the stored SyncState of each watched folder;
//! the very first run takes a baseline without publishing.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
};

use tracing::{debug, info, warn};

use super::{
    Shared,
    backoff::{self, Backoff},
    client::{Affinity, EwsError},
    config::{Mailbox, Mode},
    messages::{
        self, ChangeKind, EventKind, EwsEvent, FolderRef, Id, ItemProps, Notification,
        SubscribeKind, SubscriptionScope, Target,
    },
    publish::{self, Outgoing, PublishError},
    status::MailboxState,
    store::{PublishedKey, StoreError, StoredSubscription, now_ms},
    xml,
};

/// Most changes asked for per SyncFolderItems page (Exchange allows 1–512).
const SYNC_PAGE_SIZE: u32 = 512;
/// Pages per folder and catch-up; a folder with more changes than this
/// continues at the next catch-up (the SyncState is stored after each page).
const MAX_SYNC_PAGES: usize = 1000;
/// Item ids per GetItem when checking which published items are gone.
const GET_ITEM_BATCH: usize = 100;
/// Failed attempts of a transient error before giving up on one call.
const MAX_TRANSIENT_RETRIES: u32 = 4;
/// ErrorServerBusy answers honoured in a row before giving up on one call.
const MAX_BUSY_RETRIES: u32 = 10;
/// Published-event records are kept this much longer than strictly needed,
/// for notifications still in flight when a catch-up started.
const PRUNE_MARGIN_MS: i64 = 5 * 60 * 1000;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Ews(#[from] EwsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

impl SinkError {
    pub fn is_cancelled(&self) -> bool {
        matches!(
            self,
            SinkError::Ews(EwsError::Cancelled) | SinkError::Publish(PublishError::Cancelled)
        )
    }
}

/// Runs one EWS call, waiting out ErrorServerBusy (BackOffMilliseconds) and
/// HTTP 503 (Retry-After), and retrying transient failures with back-off.
pub async fn with_retry<T, F, Fut>(
    shared: &Shared,
    mailbox: &str,
    mut call: F,
) -> Result<T, EwsError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, EwsError>>,
{
    let mut backoff = Backoff::new(shared.config.retry);
    let mut busy = 0;
    loop {
        let error = tokio::select! {
            result = call() => match result {
                Ok(value) => return Ok(value),
                Err(error) => error,
            },
            () = shared.cancel.cancelled() => return Err(EwsError::Cancelled),
        };
        let wait = match &error {
            EwsError::Busy(wait) if busy < MAX_BUSY_RETRIES => {
                busy += 1;
                *wait
            }
            error
                if error.is_transient()
                    && !matches!(error, EwsError::Busy(_))
                    && backoff.attempts() < MAX_TRANSIENT_RETRIES =>
            {
                backoff.next_wait()
            }
            _ => return Err(error),
        };
        // Shown while waiting only; then whatever an enclosing activity
        // (a catch-up) showed, or the mailbox's own state, shows again.
        let outer = shared
            .status
            .begin(
                mailbox,
                MailboxState::BackingOff {
                    wait,
                    reason: error.to_string(),
                },
            )
            .await;
        let waited = backoff::sleep(wait, &shared.cancel).await;
        shared.status.end(mailbox, outer).await;
        if !waited {
            return Err(EwsError::Cancelled);
        }
    }
}

/// GetItem's answer: per item, its properties or why not.
type ItemResults = Vec<Result<(Id, ItemProps), messages::Status>>;

/// GetItem's per-item results; ErrorServerBusy on any item throttles the call.
fn get_item_results(body: &xml::Element) -> Result<ItemResults, EwsError> {
    let results = messages::parse_get_item(body);
    let busy = results
        .iter()
        .find_map(|r| r.as_ref().err().filter(|s| s.code == "ErrorServerBusy"));
    match busy {
        Some(status) => Err(EwsError::from_status(status.clone())),
        None => Ok(results),
    }
}

/// The affinity of an ordinary call about one mailbox.
pub fn own_affinity(mailbox: &Mailbox) -> Affinity {
    Affinity {
        anchor: Some(mailbox.address.clone()),
        prefer_server_affinity: false,
        cookie: None,
    }
}

/// Publishes the events of one notification of `mailbox`; returns how many.
pub async fn deliver(
    shared: &Shared,
    mailbox: &Mailbox,
    notification: &Notification,
) -> Result<usize, SinkError> {
    let mut outgoing = Vec::new();
    let events: Vec<&EwsEvent> = notification
        .events
        .iter()
        .filter(|e| e.kind != EventKind::Status && shared.config.event_types.contains(&e.kind))
        .collect();
    if events.is_empty() {
        return Ok(0);
    }
    let props = if shared.config.fetch.is_empty() {
        HashMap::new()
    } else {
        fetch(shared, mailbox, &events).await
    };
    for event in events {
        let item_props = match &event.target {
            Some(Target::Item(id)) => props.get(&id.id),
            _ => None,
        };
        let Some(out) = publish::from_notification(&mailbox.address, event, item_props) else {
            continue;
        };
        if let Some(key) = out.key()
            && shared.store.was_published(&key).await?
        {
            debug!(mailbox = %mailbox.address, item = %key.item_id, operation = %key.operation, "already published");
            continue;
        }
        outgoing.push(out);
    }
    publish_and_record(shared, &outgoing).await?;
    Ok(outgoing.len())
}

async fn publish_and_record(shared: &Shared, outgoing: &[Outgoing]) -> Result<(), SinkError> {
    if outgoing.is_empty() {
        return Ok(());
    }
    shared.publisher.publish(outgoing, &shared.cancel).await?;
    let keys: Vec<PublishedKey> = outgoing.iter().flat_map(Outgoing::keys).collect();
    shared.store.record_published(&keys).await?;
    Ok(())
}

/// One GetItem for the items of a notification. Items that are gone are
/// simply missing from the map (their events are published without
/// properties); a failed call is logged and publishing goes on.
async fn fetch(
    shared: &Shared,
    mailbox: &Mailbox,
    events: &[&EwsEvent],
) -> HashMap<String, ItemProps> {
    let mut ids: Vec<Id> = Vec::new();
    for event in events {
        if event.kind == EventKind::Deleted {
            continue;
        }
        if let Some(Target::Item(id)) = &event.target
            && !ids.iter().any(|known| known.id == id.id)
        {
            ids.push(id.clone());
        }
    }
    let mut found = HashMap::new();
    if ids.is_empty() {
        return found;
    }
    let body = messages::get_item(&ids, &shared.config.fetch);
    let affinity = own_affinity(mailbox);
    let result = with_retry(shared, &mailbox.address, || async {
        let answer = shared
            .ews
            .call(mailbox.impersonation(), &affinity, &body)
            .await?;
        get_item_results(&answer.body)
    })
    .await;
    match result {
        Ok(results) => {
            for (id, result) in ids.iter().zip(results) {
                match result {
                    Ok((_, props)) => {
                        found.insert(id.id.clone(), props);
                    }
                    Err(status) if status.code == "ErrorItemNotFound" => {
                        debug!(mailbox = %mailbox.address, item = %id.id, "item already gone; publishing without properties");
                    }
                    Err(status) => {
                        warn!(mailbox = %mailbox.address, item = %id.id, code = %status.code, "cannot fetch item properties");
                    }
                }
            }
        }
        Err(error) => {
            warn!(mailbox = %mailbox.address, %error, "GetItem failed; publishing without properties");
        }
    }
    found
}

/// The folders a catch-up synchronises.
async fn watched_folders(shared: &Shared, mailbox: &Mailbox) -> Result<Vec<FolderRef>, EwsError> {
    if !shared.config.all_folders {
        return Ok(shared.config.folders.clone());
    }
    let body = messages::find_all_folders();
    let affinity = own_affinity(mailbox);
    let ids = with_retry(shared, &mailbox.address, || async {
        let answer = shared
            .ews
            .call(mailbox.impersonation(), &affinity, &body)
            .await?;
        messages::parse_find_folder(&answer.body)?.map_err(EwsError::from_status)
    })
    .await?;
    Ok(ids.into_iter().map(FolderRef::Id).collect())
}

/// Closes a gap for one mailbox: publishes what changed since each folder's
/// stored SyncState (marked recovered, minus what was already published), or
/// takes a baseline of a folder that has none. Returns the events published.
pub async fn catch_up(shared: &Shared, mailbox: &Mailbox) -> Result<usize, SinkError> {
    // An activity over the mailbox's own state, which shows again after.
    shared
        .status
        .begin(&mailbox.address, MailboxState::CatchingUp)
        .await;
    let result = synchronise(shared, mailbox).await;
    shared.status.end(&mailbox.address, None).await;
    result
}

async fn synchronise(shared: &Shared, mailbox: &Mailbox) -> Result<usize, SinkError> {
    let started = now_ms();
    let mut published = 0;
    let mut seen = HashSet::new();
    for folder in watched_folders(shared, mailbox).await? {
        published += sync_folder(shared, mailbox, &folder, &mut seen).await?;
    }
    if shared.config.event_types.contains(&EventKind::Deleted) {
        published += publish_vanished(shared, mailbox, &seen).await?;
    }
    let pruned = shared
        .store
        .prune_published(&mailbox.address, started - PRUNE_MARGIN_MS)
        .await?;
    info!(mailbox = %mailbox.address, published, pruned, "caught up");
    Ok(published)
}

/// Synchronises one folder; `seen` collects the item ids SyncFolderItems
/// reported.
/// Items published since the stored SyncState that SyncFolderItems did not
/// report may have been created and deleted within the window (it reports
/// nothing for those), and their deletion would be lost. GetItem tells: an
/// item that is gone is published as Deleted (recovered).
async fn publish_vanished(
    shared: &Shared,
    mailbox: &Mailbox,
    seen: &HashSet<String>,
) -> Result<usize, SinkError> {
    let candidates: Vec<Id> = shared
        .store
        .published_items(&mailbox.address)
        .await?
        .into_iter()
        .filter(|id| !seen.contains(id))
        .map(|id| Id {
            id,
            change_key: String::new(),
        })
        .collect();
    let affinity = own_affinity(mailbox);
    let mut published = 0;
    for chunk in candidates.chunks(GET_ITEM_BATCH) {
        let body = messages::get_item(chunk, &[]);
        let results = with_retry(shared, &mailbox.address, || async {
            let answer = shared
                .ews
                .call(mailbox.impersonation(), &affinity, &body)
                .await?;
            get_item_results(&answer.body)
        })
        .await?;
        let outgoing: Vec<Outgoing> = chunk
            .iter()
            .zip(results)
            .filter(
                |(_, result)| matches!(result, Err(status) if status.code == "ErrorItemNotFound"),
            )
            .map(|(id, _)| publish::vanished(&mailbox.address, &id.id))
            .collect();
        publish_and_record(shared, &outgoing).await?;
        published += outgoing.len();
    }
    Ok(published)
}

async fn sync_folder(
    shared: &Shared,
    mailbox: &Mailbox,
    folder: &FolderRef,
    seen: &mut HashSet<String>,
) -> Result<usize, SinkError> {
    let mut state = shared
        .store
        .sync_state(&mailbox.address, folder.key())
        .await?;
    let mut baseline = state.is_none();
    if baseline {
        info!(mailbox = %mailbox.address, folder = folder.key(), "first run: taking a baseline without publishing");
    }
    let affinity = own_affinity(mailbox);
    let mut published = 0;
    for _ in 0..MAX_SYNC_PAGES {
        let body = messages::sync_folder_items(
            folder,
            state.as_deref(),
            SYNC_PAGE_SIZE,
            &shared.config.fetch,
        );
        let page = with_retry(shared, &mailbox.address, || async {
            let answer = shared
                .ews
                .call(mailbox.impersonation(), &affinity, &body)
                .await?;
            // Busy is for with_retry to wait out; other errors are handled
            // below.
            match messages::parse_sync_folder_items(&answer.body)? {
                Err(status) if status.code == "ErrorServerBusy" => {
                    Err(EwsError::from_status(status))
                }
                page => Ok(page),
            }
        })
        .await?;
        let page = match page {
            Ok(page) => page,
            Err(status) if status.code == "ErrorInvalidSyncStateData" && state.is_some() => {
                warn!(mailbox = %mailbox.address, folder = folder.key(), "Exchange rejected the stored SyncState; taking a new baseline");
                state = None;
                baseline = true;
                continue;
            }
            Err(status) => return Err(EwsError::from_status(status).into()),
        };
        if !baseline {
            let mut outgoing = Vec::new();
            for change in &page.changes {
                seen.insert(change.item.id.clone());
                let store = &shared.store;
                let (already, known) = match change.kind {
                    ChangeKind::Delete => (
                        store
                            .was_published(&publish::gone_key(&mailbox.address, &change.item.id))
                            .await?,
                        true,
                    ),
                    // A read flag change streams as a Modified with a new
                    // change key, so that version may be known like the
                    // others. `known` only matters for a Create.
                    ChangeKind::Create | ChangeKind::Update | ChangeKind::ReadFlagChange => (
                        store
                            .version_published(
                                &mailbox.address,
                                &change.item.id,
                                &change.item.change_key,
                            )
                            .await?,
                        change.kind != ChangeKind::Create
                            || store
                                .item_published(&mailbox.address, &change.item.id)
                                .await?,
                    ),
                };
                if already {
                    continue;
                }
                // An item whose creation was already published and that
                // changed since is reported as Modified, not Created again.
                let out = publish::from_change(&mailbox.address, folder.key(), change, known);
                if shared.config.event_types.contains(&out.kind) {
                    outgoing.push(out);
                }
            }
            publish_and_record(shared, &outgoing).await?;
            published += outgoing.len();
        }
        shared
            .store
            .save_sync_state(&mailbox.address, folder.key(), &page.sync_state)
            .await?;
        state = Some(page.sync_state);
        if page.includes_last {
            break;
        }
    }
    Ok(published)
}

/// Subscribes one mailbox for pull or push notifications (with the watermark
/// inside `kind`, if any) and stores the subscription. Returns its id and the
/// watermark to continue from.
pub async fn subscribe_mailbox(
    shared: &Shared,
    mailbox: &Mailbox,
    mode: Mode,
    kind: SubscribeKind,
) -> Result<(String, Option<String>), EwsError> {
    let address = mailbox.address.as_str();
    shared.status.set(address, MailboxState::Subscribing).await;
    let watermark = match &kind {
        SubscribeKind::Pull { watermark, .. } | SubscribeKind::Push { watermark, .. } => {
            watermark.clone()
        }
        SubscribeKind::Streaming => None,
    };
    let body = messages::subscribe(&scope(shared), &kind);
    let affinity = own_affinity(mailbox);
    let subscribed = with_retry(shared, address, || async {
        let answer = shared
            .ews
            .call(mailbox.impersonation(), &affinity, &body)
            .await?;
        messages::parse_subscribe(&answer.body)?.map_err(EwsError::from_status)
    })
    .await?;
    let start = watermark.or(subscribed.watermark.clone());
    let stored = StoredSubscription {
        mode: mode.name().to_owned(),
        subscription_id: subscribed.subscription_id.clone(),
        watermark: start.clone(),
        cookie: None,
        anchor: Some(address.to_owned()),
    };
    if let Err(error) = shared.store.save_subscription(address, &stored).await {
        warn!(mailbox = address, %error, "cannot store the subscription");
    }
    info!(mailbox = address, subscription = %subscribed.subscription_id, mode = mode.name(), "subscribed");
    Ok((subscribed.subscription_id, start))
}

/// What every subscription of this adapter watches.
pub fn scope(shared: &Shared) -> SubscriptionScope {
    SubscriptionScope {
        folders: shared.config.folders.clone(),
        all_folders: shared.config.all_folders,
        event_types: shared.config.event_types.clone(),
    }
}

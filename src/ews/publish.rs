//! From Exchange events to broker events: mapping an EWS event (or a change
//! found by SyncFolderItems) to a `herald.ews.v1.MailboxEvent`, and firing it
//! on `herald.ews.v1.MailboxEvents` with the operation named after its type.

use std::{collections::BTreeMap, str::FromStr, time::Duration};

use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::Channel};
use tracing::warn;

use super::{
    backoff::{self, Backoff},
    config::RetryConfig,
    messages::{ChangeKind, EventKind, EwsEvent, ItemProps, SyncChange, Target},
    store::PublishedKey,
};
use crate::pb::{
    ews::{EventType, MailboxEvent},
    v1::{Event, FireEventRequest, publish_service_client::PublishServiceClient},
};

/// The contract every adapter event is fired on.
pub const CONTRACT: &str = "herald.ews.v1.MailboxEvents";

/// The dedup operation name for "this item id is gone from its folder".
const GONE: &str = "Gone";

/// One event ready to fire, with the keys that remember it.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub kind: EventKind,
    pub event: MailboxEvent,
}

impl Outgoing {
    /// The exact key of this event (item events only).
    pub fn key(&self) -> Option<PublishedKey> {
        (!self.event.item_id.is_empty()).then(|| PublishedKey {
            mailbox: self.event.mailbox.clone(),
            item_id: self.event.item_id.clone(),
            change_key: self.event.change_key.clone(),
            operation: self.kind.operation().to_owned(),
        })
    }

    /// Every key to remember once this event is published: its own, and a
    /// "gone" marker for the id a delete or move removed from its folder.
    pub fn keys(&self) -> Vec<PublishedKey> {
        let mut keys: Vec<PublishedKey> = self.key().into_iter().collect();
        let gone = match self.kind {
            EventKind::Deleted => Some(&self.event.item_id),
            EventKind::Moved => Some(&self.event.old_item_id),
            _ => None,
        };
        if let Some(id) = gone.filter(|id| !id.is_empty()) {
            keys.push(gone_key(&self.event.mailbox, id));
        }
        keys
    }
}

pub fn gone_key(mailbox: &str, item_id: &str) -> PublishedKey {
    PublishedKey {
        mailbox: mailbox.to_owned(),
        item_id: item_id.to_owned(),
        change_key: String::new(),
        operation: GONE.to_owned(),
    }
}

fn event_type(kind: EventKind) -> EventType {
    match kind {
        EventKind::NewMail => EventType::NewMail,
        EventKind::Created => EventType::Created,
        EventKind::Deleted => EventType::Deleted,
        EventKind::Modified => EventType::Modified,
        EventKind::Moved => EventType::Moved,
        EventKind::Copied => EventType::Copied,
        EventKind::FreeBusyChanged => EventType::FreeBusyChanged,
        EventKind::Status => EventType::Unspecified,
    }
}

fn timestamp(text: Option<&str>) -> Option<prost_types::Timestamp> {
    text.and_then(|t| prost_types::Timestamp::from_str(t.trim()).ok())
}

fn now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(std::time::SystemTime::now())
}

fn apply_props(event: &mut MailboxEvent, props: &ItemProps) {
    event.subject = props.subject.clone();
    event.sender_name = props.sender_name.clone();
    event.sender_address = props.sender_address.clone();
    event.received_time = timestamp(props.received.as_deref());
}

/// Maps a notification event. `None` for StatusEvent, which is not published.
pub fn from_notification(
    mailbox: &str,
    event: &EwsEvent,
    props: Option<&ItemProps>,
) -> Option<Outgoing> {
    if event.kind == EventKind::Status {
        return None;
    }
    let mut out = MailboxEvent {
        mailbox: mailbox.to_owned(),
        event_type: event_type(event.kind) as i32,
        timestamp: timestamp(event.timestamp.as_deref()).or_else(|| Some(now())),
        watermark: event.watermark.clone().unwrap_or_default(),
        parent_folder_id: event
            .parent_folder
            .as_ref()
            .map(|f| f.id.clone())
            .unwrap_or_default(),
        old_parent_folder_id: event
            .old_parent_folder
            .as_ref()
            .map(|f| f.id.clone())
            .unwrap_or_default(),
        unread_count: event.unread_count,
        ..MailboxEvent::default()
    };
    match &event.target {
        Some(Target::Item(id)) => {
            out.item_id = id.id.clone();
            out.change_key = id.change_key.clone();
        }
        Some(Target::Folder(id)) => {
            out.folder_id = id.id.clone();
            out.change_key = id.change_key.clone();
        }
        None => {}
    }
    match &event.old_target {
        Some(Target::Item(id)) => out.old_item_id = id.id.clone(),
        Some(Target::Folder(id)) => out.old_folder_id = id.id.clone(),
        None => {}
    }
    if let Some(props) = props {
        apply_props(&mut out, props);
    }
    Some(Outgoing {
        kind: event.kind,
        event: out,
    })
}

/// Maps a change SyncFolderItems found after a gap (marked `recovered`).
/// `known` says the item's creation was already published, so a Create is
/// reported as Modified.
pub fn from_change(mailbox: &str, folder_id: &str, change: &SyncChange, known: bool) -> Outgoing {
    let kind = match change.kind {
        ChangeKind::Create if !known => EventKind::Created,
        ChangeKind::Create | ChangeKind::Update | ChangeKind::ReadFlagChange => EventKind::Modified,
        ChangeKind::Delete => EventKind::Deleted,
    };
    let mut event = MailboxEvent {
        mailbox: mailbox.to_owned(),
        event_type: event_type(kind) as i32,
        item_id: change.item.id.clone(),
        change_key: change.item.change_key.clone(),
        parent_folder_id: change
            .parent_folder
            .as_ref()
            .map(|f| f.id.clone())
            .unwrap_or_else(|| folder_id.to_owned()),
        recovered: true,
        ..MailboxEvent::default()
    };
    apply_props(&mut event, &change.props);
    event.timestamp = event.received_time.or_else(|| Some(now()));
    Outgoing { kind, event }
}

/// A published item found gone after a gap: Deleted (recovered).
pub fn vanished(mailbox: &str, item_id: &str) -> Outgoing {
    Outgoing {
        kind: EventKind::Deleted,
        event: MailboxEvent {
            mailbox: mailbox.to_owned(),
            event_type: EventType::Deleted as i32,
            item_id: item_id.to_owned(),
            timestamp: Some(now()),
            recovered: true,
            ..MailboxEvent::default()
        },
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the broker refused the events: {code:?}: {message}")]
    Refused { code: Code, message: String },
    #[error("'{0}' is not a valid broker URL")]
    BadUrl(String),
    #[error("stopped before the events were published")]
    Cancelled,
}

/// Fires events into the broker over one multiplexed HTTP/2 channel.
#[derive(Clone)]
pub struct Publisher {
    client: PublishServiceClient<Channel>,
    source: String,
    retry: RetryConfig,
}

impl Publisher {
    /// Connects lazily: the adapter starts even while the broker is down, and
    /// publishing waits for it.
    pub fn new(url: &str, source: &str, retry: RetryConfig) -> Result<Self, PublishError> {
        let channel = Channel::from_shared(url.to_owned())
            .map_err(|_| PublishError::BadUrl(url.to_owned()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            client: PublishServiceClient::new(channel),
            source: source.to_owned(),
            retry,
        })
    }

    /// Fires `events` in order on one FireEvents call, retrying while the
    /// broker is unreachable (events are never dropped for that) until
    /// `cancel`. A refusal (an invalid event) is returned as an error.
    pub async fn publish(
        &self,
        events: &[Outgoing],
        cancel: &CancellationToken,
    ) -> Result<(), PublishError> {
        if events.is_empty() {
            return Ok(());
        }
        let requests: Vec<FireEventRequest> = events.iter().map(|e| self.request(e)).collect();
        let mut backoff = Backoff::new(self.retry);
        loop {
            let mut client = self.client.clone();
            let call = client.fire_events(tokio_stream::iter(requests.clone()));
            let result = tokio::select! {
                result = call => result,
                () = cancel.cancelled() => return Err(PublishError::Cancelled),
            };
            match result {
                Ok(_) => return Ok(()),
                Err(status)
                    if matches!(
                        status.code(),
                        Code::Unavailable
                            | Code::Unknown
                            | Code::DeadlineExceeded
                            | Code::ResourceExhausted
                            | Code::Internal
                            | Code::Cancelled
                    ) =>
                {
                    let wait = backoff.next_wait();
                    warn!(code = ?status.code(), message = status.message(), ?wait, "cannot publish to the broker; retrying");
                    if !backoff::sleep(wait, cancel).await {
                        return Err(PublishError::Cancelled);
                    }
                }
                Err(status) => {
                    return Err(PublishError::Refused {
                        code: status.code(),
                        message: status.message().to_owned(),
                    });
                }
            }
        }
    }

    fn request(&self, outgoing: &Outgoing) -> FireEventRequest {
        let mut attributes = BTreeMap::new();
        attributes.insert("mailbox".to_owned(), outgoing.event.mailbox.clone());
        if outgoing.event.recovered {
            attributes.insert("recovered".to_owned(), "true".to_owned());
        }
        FireEventRequest {
            event: Some(Event {
                id: String::new(),
                contract: CONTRACT.to_owned(),
                operation: outgoing.kind.operation().to_owned(),
                payload: outgoing.event.encode_to_vec().into(),
                time: outgoing.event.timestamp,
                attributes,
                source: self.source.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ews::messages::Id;

    #[test]
    fn maps_a_moved_item_event() {
        let event = EwsEvent {
            kind: EventKind::Moved,
            watermark: Some("W".into()),
            timestamp: Some("2024-01-02T03:04:05Z".into()),
            target: Some(Target::Item(Id {
                id: "new".into(),
                change_key: "ck".into(),
            })),
            parent_folder: Some(Id {
                id: "deleted".into(),
                change_key: String::new(),
            }),
            old_target: Some(Target::Item(Id {
                id: "old".into(),
                change_key: String::new(),
            })),
            old_parent_folder: Some(Id {
                id: "inbox".into(),
                change_key: String::new(),
            }),
            unread_count: None,
        };
        let out = from_notification("a@x", &event, None).unwrap();
        assert_eq!(out.kind.operation(), "Moved");
        assert_eq!(out.event.event_type, EventType::Moved as i32);
        assert_eq!(out.event.old_item_id, "old");
        assert_eq!(out.event.old_parent_folder_id, "inbox");
        assert_eq!(out.event.watermark, "W");
        assert_eq!(out.event.timestamp.unwrap().seconds, 1_704_164_645);
        let keys = out.keys();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[1], gone_key("a@x", "old"));
        let status = EwsEvent {
            kind: EventKind::Status,
            ..event
        };
        assert!(from_notification("a@x", &status, None).is_none());
    }
}

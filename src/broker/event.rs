//! The event as the core sees it: what a publisher fired, after validation,
//! shared by reference with every subscriber that receives it.

use std::{collections::BTreeMap, sync::OnceLock, time::SystemTime};

use bytes::Bytes;

/// What a publisher asks the broker to fire, before validation and defaults.
#[derive(Debug, Clone, Default)]
pub struct EventDraft {
    /// Publisher-chosen id; the broker assigns a UUIDv7 when it is `None`.
    pub id: Option<String>,
    pub contract: String,
    pub operation: String,
    /// The operation's request message, protobuf-encoded.
    pub payload: Bytes,
    /// When the event happened; the broker uses the time of firing when `None`.
    pub time: Option<SystemTime>,
    pub attributes: BTreeMap<String, String>,
    pub source: String,
}

/// A validated event with its id and time assigned.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: String,
    pub contract: String,
    pub operation: String,
    pub payload: Bytes,
    pub time: SystemTime,
    pub attributes: BTreeMap<String, String>,
    pub source: String,
}

/// A fired event as handed to subscribers: the event plus its wire encoding,
/// computed once by whichever subscriber stream needs it first and then shared
/// by all of them. The core never encodes; the API layer supplies the encoder.
#[derive(Debug)]
pub struct SharedEvent {
    event: Event,
    wire: OnceLock<Bytes>,
}

impl SharedEvent {
    pub fn new(event: Event) -> Self {
        Self {
            event,
            wire: OnceLock::new(),
        }
    }

    pub fn event(&self) -> &Event {
        &self.event
    }

    /// The wire encoding of this event, produced by `encode` on first use only.
    pub fn wire_or_encode(&self, encode: impl FnOnce(&Event) -> Bytes) -> Bytes {
        self.wire.get_or_init(|| encode(&self.event)).clone()
    }
}

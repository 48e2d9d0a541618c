//! Translation between wire messages and core types, in one place.

use std::time::SystemTime;

use tonic::{Code, Status};

use crate::{
    broker::{BrokerError, Event, EventDraft},
    pb::v1 as pb,
};

impl From<BrokerError> for Status {
    fn from(error: BrokerError) -> Self {
        let code = match &error {
            BrokerError::UnknownContract { .. } | BrokerError::UnknownOperation { .. } => {
                Code::NotFound
            }
            BrokerError::PayloadTooLarge { .. } => Code::ResourceExhausted,
            BrokerError::InvalidPayload { .. } | BrokerError::InvalidEvent(_) => {
                Code::InvalidArgument
            }
            BrokerError::Store(_) | BrokerError::ShuttingDown => Code::Unavailable,
        };
        Status::new(code, error.to_string())
    }
}

/// A publisher's event as the core's draft. Invalid timestamps are refused.
pub fn draft_from_wire(event: pb::Event) -> Result<EventDraft, Status> {
    let time = event.time.map(timestamp_to_system_time).transpose()?;
    Ok(EventDraft {
        id: Some(event.id).filter(|id| !id.is_empty()),
        contract: event.contract,
        operation: event.operation,
        payload: event.payload,
        time,
        attributes: event.attributes.into_iter().collect(),
        source: event.source,
    })
}

pub fn event_to_wire(event: &Event) -> pb::Event {
    pb::Event {
        id: event.id.clone(),
        contract: event.contract.clone(),
        operation: event.operation.clone(),
        payload: event.payload.clone(),
        time: Some(event.time.into()),
        attributes: event.attributes.clone().into_iter().collect(),
        source: event.source.clone(),
    }
}

/// The range google.protobuf.Timestamp allows: 0001-01-01T00:00:00Z to
/// 9999-12-31T23:59:59.999999999Z, with nanos in [0, 10^9).
const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

fn timestamp_to_system_time(ts: prost_types::Timestamp) -> Result<SystemTime, Status> {
    let valid = (MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&ts.seconds)
        && (0..1_000_000_000).contains(&ts.nanos);
    if !valid {
        return Err(Status::invalid_argument(format!(
            "event time {{seconds: {}, nanos: {}}} is not a valid timestamp: seconds must be \
             within years 1 to 9999 and nanos within 0..999999999",
            ts.seconds, ts.nanos
        )));
    }
    SystemTime::try_from(ts)
        .map_err(|e| Status::invalid_argument(format!("event time is not representable here: {e}")))
}

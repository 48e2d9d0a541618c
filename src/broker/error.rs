//! Errors the core reports to whoever called it. Messages are written for the
//! person who sent the bad input: they say what exists or what is accepted.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum BrokerError {
    #[error("unknown contract '{contract}'; registered contracts: {}", list(known))]
    UnknownContract {
        contract: String,
        known: Vec<String>,
    },

    #[error(
        "contract '{contract}' has no operation '{operation}'; its operations: {}",
        list(known)
    )]
    UnknownOperation {
        contract: String,
        operation: String,
        known: Vec<String>,
    },

    #[error(
        "payload is {size} bytes, over the limit of {limit} bytes (configure with --max-payload-bytes)"
    )]
    PayloadTooLarge { size: usize, limit: usize },

    #[error(
        "payload does not decode as {message_type} (the request type of {contract}/{operation}): {reason}"
    )]
    InvalidPayload {
        contract: String,
        operation: String,
        message_type: String,
        reason: String,
    },

    #[error("invalid event: {0}")]
    InvalidEvent(String),

    #[error("the persistent subscription store failed: {0}")]
    Store(String),

    #[error("the broker is shutting down")]
    ShuttingDown,
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "(none)".to_owned()
    } else {
        names.join(", ")
    }
}

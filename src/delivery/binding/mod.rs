//! Bindings: how the broker calls a persistent subscriber, chosen by the
//! scheme of its address. gRPC bindings call `/<contract>/<operation>` with the
//! payload as fired; the webhook binding POSTs a signed CloudEvents body.

mod grpc;
mod webhook;

use std::{path::PathBuf, sync::Arc, time::Duration};

use thiserror::Error;

pub use webhook::{SecretError, parse_secret, sign};

use super::address::Address;
use crate::{broker::ContractRegistry, store::ClaimedDelivery};

/// Metadata (gRPC) carrying the event's identity to subscribers.
pub const EVENT_ID_HEADER: &str = "herald-event-id";
pub const EVENT_TIME_HEADER: &str = "herald-event-time";
pub const SOURCE_HEADER: &str = "herald-source";

/// What a call to a subscriber achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallOutcome {
    Delivered,
    /// The subscriber said it is gone for good (HTTP 410): stop calling it.
    Gone(String),
    /// Worth trying again later.
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct BindingOptions {
    /// Deadline of one call, connection included.
    pub call_timeout: Duration,
    pub connect_timeout: Duration,
    /// PEM file of extra root certificates trusted for grpcs:// and https://
    /// (for private CAs), besides the system's.
    pub extra_roots: Option<PathBuf>,
}

impl Default for BindingOptions {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            extra_roots: None,
        }
    }
}

#[derive(Debug, Error)]
pub enum BindingError {
    #[error("cannot read the extra root certificates {path}: {source}")]
    ReadRoots {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the extra root certificates are not valid PEM: {0}")]
    BadRoots(String),
    #[error("cannot build the webhook HTTP client: {0}")]
    HttpClient(String),
}

/// Makes aws-lc-rs the process's TLS crypto provider (idempotent). rustls
/// picks one by itself only when exactly one is compiled in; being explicit
/// keeps TLS working whatever another dependency enables.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Every binding, sharing connections across deliveries.
pub struct Bindings {
    grpc: grpc::GrpcBinding,
    webhook: webhook::WebhookBinding,
    call_timeout: Duration,
}

impl Bindings {
    pub fn new(
        registry: Arc<ContractRegistry>,
        options: &BindingOptions,
    ) -> Result<Self, BindingError> {
        let roots = match &options.extra_roots {
            Some(path) => Some(
                std::fs::read(path).map_err(|source| BindingError::ReadRoots {
                    path: path.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        Ok(Self {
            grpc: grpc::GrpcBinding::new(options, roots.as_deref()),
            webhook: webhook::WebhookBinding::new(registry, options, roots.as_deref())?,
            call_timeout: options.call_timeout,
        })
    }

    /// Calls the subscriber of `delivery` once, within the call deadline.
    pub async fn deliver(&self, delivery: &ClaimedDelivery) -> CallOutcome {
        let address = match Address::parse(&delivery.address) {
            Ok(address) => address,
            Err(error) => return CallOutcome::Failed(error.to_string()),
        };
        let call = async {
            match &address {
                Address::Webhook { url } => self.webhook.deliver(url, delivery).await,
                other => self.grpc.deliver(other, delivery).await,
            }
        };
        match tokio::time::timeout(self.call_timeout, call).await {
            Ok(outcome) => outcome,
            Err(_) => CallOutcome::Failed(format!(
                "no answer within {:?} (the call timeout)",
                self.call_timeout
            )),
        }
    }

    /// Forgets the cached connection of an address (it is gone).
    pub fn forget(&self, address: &str) {
        self.grpc.forget(address);
    }
}

/// The chain of causes under an error, as `: cause: cause`, skipping causes
/// whose text the previous one already includes.
pub(crate) fn causes(error: &dyn std::error::Error) -> String {
    let mut text = String::new();
    let mut last = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !last.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        last = message;
        source = cause.source();
    }
    text
}

//! Managing persistent subscriptions: validate what a client asks for, change
//! the store, and bring the in-memory index up to date before answering, so
//! that the next fire sees the change. Also the delivery admin queries.

use std::sync::Arc;

use thiserror::Error;
use tokio::sync::Notify;

use super::{
    address::{Address, AddressError},
    binding::{SecretError, parse_secret},
    index::SubscriptionIndex,
};
use crate::{
    broker::{BrokerError, ContractRegistry},
    store::{AddressStats, Store, StoreError, SubscribeRequest, Subscription, now_micros},
};

#[derive(Debug, Error)]
pub enum AdminError {
    #[error(transparent)]
    Unknown(#[from] BrokerError),
    #[error(transparent)]
    InvalidAddress(#[from] AddressError),
    #[error(transparent)]
    InvalidSecret(#[from] SecretError),
    #[error(
        "a secret signs webhook deliveries; address '{0}' is not a webhook (http:// or https://)"
    )]
    SecretNotForBinding(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Which subscriptions to list (the four queries of the WCF interface).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionQuery {
    All,
    Contract(String),
    /// Subscriptions reaching one operation (including every-operation ones).
    ContractOperation(String, String),
    Address(String),
}

/// A cheap, cloneable handle for the API layer.
#[derive(Clone)]
pub struct Admin {
    pub(super) store: Arc<dyn Store>,
    pub(super) index: Arc<SubscriptionIndex>,
    pub(super) registry: Arc<ContractRegistry>,
    pub(super) wake_dispatcher: Arc<Notify>,
}

impl Admin {
    pub async fn subscribe(
        &self,
        address: &str,
        contract: &str,
        operation: &str,
        secret: Option<&str>,
    ) -> Result<(), AdminError> {
        let address = Address::parse(address.trim())?;
        self.registry.check_filter(contract, operation)?;
        let secret = secret.filter(|s| !s.is_empty());
        if let Some(secret) = secret {
            if !address.is_webhook() {
                return Err(AdminError::SecretNotForBinding(address.to_string()));
            }
            parse_secret(secret)?;
        }
        self.store
            .subscribe(&SubscribeRequest {
                address: address.to_string(),
                contract: contract.to_owned(),
                operation: operation.to_owned(),
                secret: secret.map(str::to_owned),
            })
            .await?;
        self.index.reload(self.store.as_ref()).await?;
        Ok(())
    }

    pub async fn unsubscribe(
        &self,
        address: &str,
        contract: &str,
        operation: &str,
    ) -> Result<(), AdminError> {
        let address = Address::parse(address.trim())?;
        self.registry.check_filter(contract, operation)?;
        self.store
            .unsubscribe(&address.to_string(), contract, operation)
            .await?;
        self.index.reload(self.store.as_ref()).await?;
        Ok(())
    }

    pub async fn subscriptions(
        &self,
        query: &SubscriptionQuery,
    ) -> Result<Vec<Subscription>, AdminError> {
        let address = match query {
            SubscriptionQuery::Contract(contract) => {
                self.registry.contract(contract)?;
                None
            }
            SubscriptionQuery::ContractOperation(contract, operation) => {
                self.registry.operation(contract, operation)?;
                None
            }
            SubscriptionQuery::Address(address) => {
                Some(Address::parse(address.trim())?.to_string())
            }
            SubscriptionQuery::All => None,
        };
        let all = self.store.subscriptions().await?;
        Ok(all
            .into_iter()
            .filter(|s| match query {
                SubscriptionQuery::All => true,
                SubscriptionQuery::Contract(contract) => &s.contract == contract,
                SubscriptionQuery::ContractOperation(contract, operation) => {
                    &s.contract == contract && s.matches(operation)
                }
                SubscriptionQuery::Address(_) => Some(&s.address) == address.as_ref(),
            })
            .collect())
    }

    pub async fn delivery_stats(&self) -> Result<Vec<AddressStats>, AdminError> {
        Ok(self.store.delivery_stats().await?)
    }

    /// Makes dead deliveries pending again (of one address, or all).
    pub async fn retry_dead(&self, address: Option<&str>) -> Result<u64, AdminError> {
        let address = match address.filter(|a| !a.trim().is_empty()) {
            Some(address) => Some(Address::parse(address.trim())?.to_string()),
            None => None,
        };
        let revived = self
            .store
            .retry_dead(address.as_deref(), now_micros())
            .await?;
        self.wake_dispatcher.notify_one();
        Ok(revived)
    }
}

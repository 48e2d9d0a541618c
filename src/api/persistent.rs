//! `PersistentSubscriptionService`: translates between the wire and the
//! persistent-delivery admin.

use tonic::{Request, Response, Status};

use crate::{
    delivery::{Admin, AdminError, SubscriptionQuery},
    pb::v1::{
        AddressDeliveryStats, DeliveryStats, GetAllSubscribersFromAddressRequest,
        GetAllSubscribersRequest, GetDeliveryStatsRequest,
        GetSubscribersToContractEventTypeRequest, GetSubscribersToContractRequest,
        PersistSubscribeRequest, PersistSubscribeResponse, PersistUnsubscribeRequest,
        PersistUnsubscribeResponse, PersistentSubscription, PersistentSubscriptions,
        RetryDeadDeliveriesRequest, RetryDeadDeliveriesResponse,
        persistent_subscription_service_server::PersistentSubscriptionService,
    },
    store::{Subscription, micros_to_system_time},
};

impl From<AdminError> for Status {
    fn from(error: AdminError) -> Self {
        match error {
            AdminError::Unknown(error) => Status::from(error),
            AdminError::InvalidAddress(_)
            | AdminError::InvalidSecret(_)
            | AdminError::SecretNotForBinding(_) => Status::invalid_argument(error.to_string()),
            AdminError::Store(_) => Status::unavailable(error.to_string()),
        }
    }
}

pub struct PersistentApi {
    admin: Admin,
}

impl PersistentApi {
    pub fn new(admin: Admin) -> Self {
        Self { admin }
    }

    async fn list(
        &self,
        query: SubscriptionQuery,
    ) -> Result<Response<PersistentSubscriptions>, Status> {
        let subscriptions = self.admin.subscriptions(&query).await?;
        Ok(Response::new(PersistentSubscriptions {
            subscriptions: subscriptions.into_iter().map(to_wire).collect(),
        }))
    }
}

fn to_wire(subscription: Subscription) -> PersistentSubscription {
    PersistentSubscription {
        address: subscription.address,
        contract: subscription.contract,
        operation: subscription.operation,
        excluded_operations: subscription.excluded_operations,
        signed: subscription.secret.is_some(),
        created_at: Some(micros_to_system_time(subscription.created_at).into()),
    }
}

#[tonic::async_trait]
impl PersistentSubscriptionService for PersistentApi {
    async fn persist_subscribe(
        &self,
        request: Request<PersistSubscribeRequest>,
    ) -> Result<Response<PersistSubscribeResponse>, Status> {
        let request = request.into_inner();
        self.admin
            .subscribe(
                &request.address,
                &request.contract,
                &request.operation,
                Some(request.secret.as_str()),
            )
            .await?;
        Ok(Response::new(PersistSubscribeResponse {}))
    }

    async fn persist_unsubscribe(
        &self,
        request: Request<PersistUnsubscribeRequest>,
    ) -> Result<Response<PersistUnsubscribeResponse>, Status> {
        let request = request.into_inner();
        self.admin
            .unsubscribe(&request.address, &request.contract, &request.operation)
            .await?;
        Ok(Response::new(PersistUnsubscribeResponse {}))
    }

    async fn get_all_subscribers(
        &self,
        _request: Request<GetAllSubscribersRequest>,
    ) -> Result<Response<PersistentSubscriptions>, Status> {
        self.list(SubscriptionQuery::All).await
    }

    async fn get_subscribers_to_contract(
        &self,
        request: Request<GetSubscribersToContractRequest>,
    ) -> Result<Response<PersistentSubscriptions>, Status> {
        self.list(SubscriptionQuery::Contract(request.into_inner().contract))
            .await
    }

    async fn get_subscribers_to_contract_event_type(
        &self,
        request: Request<GetSubscribersToContractEventTypeRequest>,
    ) -> Result<Response<PersistentSubscriptions>, Status> {
        let request = request.into_inner();
        self.list(SubscriptionQuery::ContractOperation(
            request.contract,
            request.operation,
        ))
        .await
    }

    async fn get_all_subscribers_from_address(
        &self,
        request: Request<GetAllSubscribersFromAddressRequest>,
    ) -> Result<Response<PersistentSubscriptions>, Status> {
        self.list(SubscriptionQuery::Address(request.into_inner().address))
            .await
    }

    async fn get_delivery_stats(
        &self,
        _request: Request<GetDeliveryStatsRequest>,
    ) -> Result<Response<DeliveryStats>, Status> {
        let stats = self.admin.delivery_stats().await?;
        Ok(Response::new(DeliveryStats {
            addresses: stats
                .into_iter()
                .map(|s| AddressDeliveryStats {
                    address: s.address,
                    pending: s.pending,
                    in_flight: s.inflight,
                    dead: s.dead,
                    oldest_undelivered: s
                        .oldest_undelivered
                        .map(|t| micros_to_system_time(t).into()),
                    last_error: s.last_error.unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn retry_dead_deliveries(
        &self,
        request: Request<RetryDeadDeliveriesRequest>,
    ) -> Result<Response<RetryDeadDeliveriesResponse>, Status> {
        let address = request.into_inner().address;
        let retried = self
            .admin
            .retry_dead(Some(address.as_str()).filter(|a| !a.is_empty()))
            .await?;
        Ok(Response::new(RetryDeadDeliveriesResponse { retried }))
    }
}

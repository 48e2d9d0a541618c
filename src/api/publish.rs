//! `PublishService`: FireEvent for one event, FireEvents for a stream of them.

use futures::{StreamExt, stream::FuturesOrdered};
use tonic::{Request, Response, Status, Streaming};

use super::convert::draft_from_wire;
use crate::{
    broker::{Broker, BrokerError, FireOutcome, PendingFire},
    pb::v1::{
        FireEventRequest, FireEventResponse, FireEventsResponse,
        publish_service_server::PublishService,
    },
};

/// Fires from one FireEvents call whose durability is awaited concurrently.
/// Bounds the memory one publisher can pin while the store commits.
pub const MAX_PIPELINED_FIRES: usize = 512;

pub struct PublishApi {
    broker: Broker,
}

impl PublishApi {
    pub fn new(broker: Broker) -> Self {
        Self { broker }
    }

    fn start(&self, request: FireEventRequest) -> Result<PendingFire, Status> {
        let event = request
            .event
            .ok_or_else(|| Status::invalid_argument("`event` is required"))?;
        Ok(self.broker.start_fire(draft_from_wire(event)?)?)
    }
}

#[derive(Default)]
struct Totals {
    events: u64,
    transient: u64,
    persistent: u64,
}

impl Totals {
    fn settle(&mut self, done: Result<FireOutcome, BrokerError>) -> Result<(), Status> {
        let outcome = done?;
        self.events += 1;
        self.transient += u64::from(outcome.transient);
        self.persistent += u64::from(outcome.persistent);
        Ok(())
    }
}

#[tonic::async_trait]
impl PublishService for PublishApi {
    async fn fire_event(
        &self,
        request: Request<FireEventRequest>,
    ) -> Result<Response<FireEventResponse>, Status> {
        let outcome = self.start(request.into_inner())?.finish().await?;
        Ok(Response::new(FireEventResponse {
            event_id: outcome.event_id,
            transient_subscribers: outcome.transient,
            persistent_subscribers: outcome.persistent,
        }))
    }

    async fn fire_events(
        &self,
        request: Request<Streaming<FireEventRequest>>,
    ) -> Result<Response<FireEventsResponse>, Status> {
        let mut requests = request.into_inner();
        let mut pending = FuturesOrdered::new();
        let mut totals = Totals::default();
        let mut submitted: u64 = 0;
        let outcome: Result<(), Status> = async {
            loop {
                while pending.len() >= MAX_PIPELINED_FIRES {
                    if let Some(done) = pending.next().await {
                        totals.settle(done)?;
                    }
                }
                tokio::select! {
                    biased;
                    Some(done) = pending.next(), if !pending.is_empty() => totals.settle(done)?,
                    request = requests.message() => {
                        let Some(request) = request? else { return Ok(()) };
                        let fire = self.start(request).map_err(|status| {
                            Status::new(
                                status.code(),
                                format!("event #{submitted} was rejected: {}", status.message()),
                            )
                        })?;
                        submitted += 1;
                        pending.push_back(fire.finish());
                    }
                }
            }
        }
        .await;
        // Whatever was accepted before a failure is still made durable.
        let mut failure = outcome.err();
        while let Some(done) = pending.next().await {
            if let Err(status) = totals.settle(done) {
                failure.get_or_insert(status);
            }
        }
        match failure {
            Some(status) => Err(Status::new(
                status.code(),
                format!(
                    "{} ({} earlier events were published)",
                    status.message(),
                    totals.events
                ),
            )),
            None => Ok(Response::new(FireEventsResponse {
                events: totals.events,
                transient_deliveries: totals.transient,
                persistent_deliveries: totals.persistent,
            })),
        }
    }
}

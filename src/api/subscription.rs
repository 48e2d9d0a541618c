//! `SubscriptionService.Subscribe`: one bidirectional stream per transient
//! subscriber. The stream answers each command with an ack, forwards events from
//! the subscriber's queue (reporting `lagged` first when some were dropped), and
//! removes every subscription when it ends, whatever the reason.

use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};

use super::{codec::Outbound, convert::event_to_wire};
use crate::{
    broker::{Broker, BrokerError, Delivery, Subscriber},
    pb::v1::{
        Ack, AckError, AckOk, Lagged, SubscriptionCommand, SubscriptionMessage, ack,
        subscription_command::Command, subscription_message,
    },
};

#[allow(clippy::all, missing_docs)]
mod generated {
    include!(concat!(
        env!("OUT_DIR"),
        "/manual/herald.v1.SubscriptionService.rs"
    ));
}

pub use generated::subscription_service_server::{SubscriptionService, SubscriptionServiceServer};

/// The message sent to subscribers whose stream the broker ends on shutdown.
pub const SHUTTING_DOWN: &str = "the broker is shutting down";

pub struct SubscriptionApi {
    broker: Broker,
    /// Cancelled when the broker starts shutting down: every stream then ends
    /// with UNAVAILABLE so clients know to reconnect elsewhere.
    stopping: CancellationToken,
}

impl SubscriptionApi {
    pub fn new(broker: Broker, stopping: CancellationToken) -> Self {
        Self { broker, stopping }
    }
}

/// The outbound half of one subscriber's stream.
pub type SubscribeStream = Pin<Box<dyn Stream<Item = Result<Outbound, Status>> + Send>>;

#[tonic::async_trait]
impl SubscriptionService for SubscriptionApi {
    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscriptionCommand>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let commands = request.into_inner();
        let (subscriber, queue) = self.broker.connect();
        let session = Session {
            broker: self.broker.clone(),
            subscriber,
        };
        Ok(Response::new(Box::pin(session.run(
            commands,
            queue,
            self.stopping.clone(),
        ))))
    }
}

/// One subscriber's state for the life of its stream. Dropping it (the stream
/// ended, the client reset, or the connection died) drops the [`Subscriber`],
/// which removes all of its subscriptions at once.
struct Session {
    broker: Broker,
    subscriber: Subscriber,
}

impl Session {
    fn run(
        mut self,
        mut commands: Streaming<SubscriptionCommand>,
        mut queue: mpsc::Receiver<Delivery>,
        stopping: CancellationToken,
    ) -> impl Stream<Item = Result<Outbound, Status>> + Send {
        async_stream::stream! {
            // The client may half-close its command stream and keep listening.
            let mut commands_open = true;
            loop {
                tokio::select! {
                    biased;
                    () = stopping.cancelled() => {
                        yield Err(Status::unavailable(SHUTTING_DOWN));
                        break;
                    }
                    command = commands.message(), if commands_open => match command {
                        Ok(Some(command)) => yield Ok(Outbound::Own(self.handle(command))),
                        Ok(None) => commands_open = false,
                        // The client reset the stream or sent bytes that are not a
                        // command; either way nothing more can be read from it.
                        Err(status) => {
                            if status.code() != Code::Cancelled {
                                yield Err(status);
                            }
                            break;
                        }
                    },
                    delivery = queue.recv() => {
                        // The sender lives in our own Subscriber, so the queue
                        // cannot close while this loop runs.
                        let Some(delivery) = delivery else { break };
                        if delivery.missed_before > 0 {
                            yield Ok(Outbound::Own(lagged(delivery.missed_before)));
                        }
                        yield Ok(Outbound::Shared(delivery.event.wire_or_encode(|event| {
                            Bytes::from(SubscriptionMessage {
                                message: Some(subscription_message::Message::Event(event_to_wire(event))),
                            }.encode_to_vec())
                        })));
                    }
                }
            }
        }
    }

    fn handle(&mut self, command: SubscriptionCommand) -> SubscriptionMessage {
        let outcome = match command.command {
            Some(Command::Subscribe(filter)) => self
                .broker
                .subscribe(&mut self.subscriber, &filter.contract, &filter.operation)
                .map_err(ack_error),
            Some(Command::Unsubscribe(filter)) => self
                .broker
                .unsubscribe(&mut self.subscriber, &filter.contract, &filter.operation)
                .map_err(ack_error),
            None => Err(AckError {
                code: Code::InvalidArgument as i32,
                message: "the command is empty: set `subscribe` or `unsubscribe`".to_owned(),
            }),
        };
        let result = match outcome {
            Ok(()) => ack::Result::Ok(AckOk {}),
            Err(error) => ack::Result::Error(error),
        };
        SubscriptionMessage {
            message: Some(subscription_message::Message::Ack(Ack {
                request_id: command.request_id,
                result: Some(result),
            })),
        }
    }
}

fn ack_error(error: BrokerError) -> AckError {
    let status = Status::from(error);
    AckError {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}

fn lagged(missed: u64) -> SubscriptionMessage {
    SubscriptionMessage {
        message: Some(subscription_message::Message::Lagged(Lagged { missed })),
    }
}

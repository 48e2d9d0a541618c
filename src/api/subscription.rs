//! `SubscriptionService.Subscribe`: one bidirectional stream per transient
//! subscriber. The stream answers each command with an ack, forwards events from
//! the subscriber's queue (reporting `lagged` first when some were dropped), and
//! removes every subscription when it ends, whatever the reason.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures::Stream;
use prost::Message;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{Code, Request, Response, Status, Streaming};

use super::{codec::Outbound, convert::event_to_wire};
use crate::{
    broker::{Broker, BrokerError, Delivery, Inbox, Subscriber},
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

#[tonic::async_trait]
impl SubscriptionService for SubscriptionApi {
    type SubscribeStream = SubscriberStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscriptionCommand>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let (subscriber, queue) = self.broker.connect();
        Ok(Response::new(SubscriberStream {
            session: Session {
                broker: self.broker.clone(),
                subscriber,
            },
            commands: Some(request.into_inner()),
            queue,
            ready: Vec::new(),
            stopping: Box::pin(self.stopping.clone().cancelled_owned()),
            ended: false,
        }))
    }
}

/// Deliveries taken from a subscriber's queue in one go: the queue's permits
/// are handed back once per batch, not once per event.
const DELIVERY_BATCH: usize = 32;

/// The outbound half of one subscriber's stream, polled by tonic's encoder.
///
/// Each poll answers, in this order: the rest of the current batch of
/// deliveries (a `lagged` notice goes before the event it precedes); then, only
/// between batches, shutdown and the client's commands; then the next batch
/// from the queue. Checking shutdown and commands once per batch keeps their
/// cost off every event while still answering within one batch.
pub struct SubscriberStream {
    session: Session,
    /// `None` once the client half-closed its commands; it may keep listening.
    commands: Option<Streaming<SubscriptionCommand>>,
    /// The subscriber's queue. Its sender lives in `session`, so it never closes
    /// while this stream exists.
    queue: Inbox,
    /// The current batch, in reverse order: the next delivery is the last.
    ready: Vec<Delivery>,
    /// Resolves when the broker starts shutting down.
    stopping: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The stream has yielded its last item.
    ended: bool,
}

impl Stream for SubscriberStream {
    type Item = Result<Outbound, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if let Some(delivery) = this.ready.pop() {
            return Poll::Ready(Some(Ok(this.outbound(delivery))));
        }
        if this.stopping.as_mut().poll(cx).is_ready() {
            this.ended = true;
            return Poll::Ready(Some(Err(Status::unavailable(SHUTTING_DOWN))));
        }
        if let Some(commands) = this.commands.as_mut() {
            match Pin::new(commands).poll_next(cx) {
                Poll::Ready(Some(Ok(command))) => {
                    return Poll::Ready(Some(Ok(Outbound::Own(this.session.handle(command)))));
                }
                Poll::Ready(None) => this.commands = None,
                // The client reset the stream or sent bytes that are not a
                // command; either way nothing more can be read from it.
                Poll::Ready(Some(Err(status))) => {
                    this.ended = true;
                    return Poll::Ready((status.code() != Code::Cancelled).then_some(Err(status)));
                }
                Poll::Pending => {}
            }
        }
        match this
            .queue
            .poll_recv_many(cx, &mut this.ready, DELIVERY_BATCH)
        {
            Poll::Pending => Poll::Pending,
            // Unreachable while `session` holds the sender; end rather than spin.
            Poll::Ready(0) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(_) => {
                this.ready.reverse();
                match this.ready.pop() {
                    Some(delivery) => Poll::Ready(Some(Ok(this.outbound(delivery)))),
                    None => Poll::Pending,
                }
            }
        }
    }
}

impl SubscriberStream {
    /// What to send for a delivery: the event, or first a `lagged` notice (the
    /// event then waits at the head of the batch).
    fn outbound(&mut self, mut delivery: Delivery) -> Outbound {
        if delivery.missed_before > 0 {
            let missed = std::mem::take(&mut delivery.missed_before);
            self.ready.push(delivery);
            return Outbound::Own(lagged(missed));
        }
        Outbound::Shared(delivery.event.wire_or_encode(|event| {
            Bytes::from(
                SubscriptionMessage {
                    message: Some(subscription_message::Message::Event(event_to_wire(event))),
                }
                .encode_to_vec(),
            )
        }))
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

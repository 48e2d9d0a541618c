//! A transient subscriber for tests: send commands, await their acks, and read
//! events with a deadline.

use std::{collections::VecDeque, time::Duration};

use herald::pb::v1::{
    Ack, AckError, Event, EventFilter, Lagged, SubscriptionCommand, SubscriptionMessage, ack,
    subscription_command::Command, subscription_message::Message,
    subscription_service_client::SubscriptionServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming, transport::Channel};

use super::PATIENCE;

pub struct TestSubscriber {
    commands: mpsc::Sender<SubscriptionCommand>,
    messages: Streaming<SubscriptionMessage>,
    /// Events and lagged notices that arrived while waiting for an ack.
    pending: VecDeque<Message>,
    next_request: u64,
}

impl TestSubscriber {
    pub async fn connect(channel: Channel) -> Self {
        let (commands, rx) = mpsc::channel(16);
        let messages = SubscriptionServiceClient::new(channel)
            .subscribe(ReceiverStream::new(rx))
            .await
            .expect("open the subscription stream")
            .into_inner();
        Self {
            commands,
            messages,
            pending: VecDeque::new(),
            next_request: 0,
        }
    }

    /// Subscribes and returns the ack's result (Ok, or the error ack).
    pub async fn subscribe(&mut self, contract: &str, operation: &str) -> Result<(), AckError> {
        self.command(Command::Subscribe(EventFilter {
            contract: contract.to_owned(),
            operation: operation.to_owned(),
        }))
        .await
    }

    pub async fn unsubscribe(&mut self, contract: &str, operation: &str) -> Result<(), AckError> {
        self.command(Command::Unsubscribe(EventFilter {
            contract: contract.to_owned(),
            operation: operation.to_owned(),
        }))
        .await
    }

    /// Sends a raw command (or none) and waits for its ack.
    pub async fn command_raw(&mut self, command: Option<Command>) -> Result<(), AckError> {
        self.next_request += 1;
        let request_id = format!("r{}", self.next_request);
        self.commands
            .send(SubscriptionCommand {
                request_id: request_id.clone(),
                command,
            })
            .await
            .expect("the command stream is open");
        loop {
            match self.read().await.expect("the stream stays open") {
                Message::Ack(Ack {
                    request_id: id,
                    result,
                }) => {
                    assert_eq!(id, request_id, "acks come in command order");
                    return match result.expect("an ack has a result") {
                        ack::Result::Ok(_) => Ok(()),
                        ack::Result::Error(error) => Err(error),
                    };
                }
                other => self.pending.push_back(other),
            }
        }
    }

    async fn command(&mut self, command: Command) -> Result<(), AckError> {
        self.command_raw(Some(command)).await
    }

    /// The next event or lagged notice.
    pub async fn next(&mut self) -> Result<Message, Status> {
        if let Some(message) = self.pending.pop_front() {
            return Ok(message);
        }
        self.read().await
    }

    /// The next message, which must be an event.
    pub async fn next_event(&mut self) -> Event {
        match self.next().await.expect("the stream stays open") {
            Message::Event(event) => event,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    /// The next event or lagged notice, or `None` if nothing arrives for `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Message> {
        if let Some(message) = self.pending.pop_front() {
            return Some(message);
        }
        let message = tokio::time::timeout(wait, self.messages.message())
            .await
            .ok()?;
        Some(
            message
                .expect("the stream stays open")
                .expect("the stream has not ended")
                .message
                .expect("a message has a body"),
        )
    }

    /// Asserts that nothing arrives for `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        assert!(self.pending.is_empty(), "unexpected {:?}", self.pending);
        if let Ok(message) = tokio::time::timeout(wait, self.messages.message()).await {
            panic!("expected silence, got {message:?}");
        }
    }

    /// Closes the command stream (the server keeps the subscription alive).
    pub fn close_commands(&mut self) {
        let (dead, _) = mpsc::channel(1);
        self.commands = dead;
    }

    async fn read(&mut self) -> Result<Message, Status> {
        let message = tokio::time::timeout(PATIENCE, self.messages.message())
            .await
            .expect("a message arrives in time")?
            .ok_or_else(|| Status::unknown("the stream ended"))?;
        Ok(message.message.expect("a message has a body"))
    }
}

/// A lagged notice's count, or a panic.
pub fn lagged(message: Message) -> u64 {
    match message {
        Message::Lagged(Lagged { missed }) => missed,
        other => panic!("expected lagged, got {other:?}"),
    }
}

//! `herald listen`: subscribe as a transient subscriber and print each event
//! as one JSON line, with the payload transcoded to JSON.

use std::io::Write;

use anyhow::{Context, bail};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::client::{RemoteContract, connect, status_error};
use crate::{
    broker::transcode,
    pb::v1::{
        EventFilter, SubscriptionCommand, ack, subscription_command::Command,
        subscription_message::Message, subscription_service_client::SubscriptionServiceClient,
    },
};

#[derive(Debug, clap::Args)]
pub struct ListenArgs {
    /// Event contract, e.g. herald.ews.v1.MailboxEvents.
    #[arg(long)]
    pub contract: String,
    /// One operation of the contract; every operation when omitted.
    #[arg(long, default_value = "")]
    pub operation: String,
    /// The broker's URL.
    #[arg(long, default_value = crate::config::DEFAULT_SERVER_URL, env = "HERALD_SERVER")]
    pub server: String,
    /// Exit after this many events.
    #[arg(long)]
    pub count: Option<u64>,
}

pub async fn run(args: ListenArgs) -> anyhow::Result<()> {
    let channel = connect(&args.server).await?;
    let contract = RemoteContract::fetch(channel.clone(), &args.contract).await?;
    if !args.operation.is_empty() {
        contract.payload_type(&args.operation)?;
    }
    let (commands, command_stream) = mpsc::channel(1);
    commands
        .send(SubscriptionCommand {
            request_id: "listen".to_owned(),
            command: Some(Command::Subscribe(EventFilter {
                contract: args.contract.clone(),
                operation: args.operation.clone(),
            })),
        })
        .await
        .context("the subscription stream closed before it opened")?;
    let mut messages = SubscriptionServiceClient::new(channel)
        .subscribe(ReceiverStream::new(command_stream))
        .await
        .map_err(|s| status_error("subscribe failed", s))?
        .into_inner();

    let mut stdout = std::io::stdout().lock();
    let mut seen = 0u64;
    loop {
        if args.count.is_some_and(|count| seen >= count) {
            return Ok(());
        }
        let message = match messages.message().await {
            Ok(Some(message)) => message,
            Ok(None) => bail!("the broker closed the subscription"),
            Err(status) => return Err(status_error("the subscription ended", status)),
        };
        match message.message {
            Some(Message::Ack(reply)) => {
                if let Some(ack::Result::Error(error)) = reply.result {
                    bail!("subscribe refused: {}", error.message);
                }
            }
            Some(Message::Lagged(lagged)) => {
                tracing::warn!(
                    missed = lagged.missed,
                    "this listener was too slow and missed events"
                );
            }
            Some(Message::Event(event)) => {
                let payload = contract
                    .payload_type(&event.operation)
                    .map_err(|e| e.to_string())
                    .and_then(|descriptor| transcode::payload_to_json(&descriptor, &event.payload));
                let mut line = json!({
                    "id": event.id,
                    "contract": event.contract,
                    "operation": event.operation,
                    "time": event.time.map(|t| t.to_string()),
                    "source": event.source,
                    "attributes": event.attributes,
                });
                match payload {
                    Ok(payload) => line["payload"] = payload,
                    Err(error) => line["payload_error"] = json!(error),
                }
                writeln!(stdout, "{line}").context("writing to stdout")?;
                stdout.flush().context("writing to stdout")?;
                seen += 1;
            }
            None => {}
        }
    }
}

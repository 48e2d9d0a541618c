//! NATS core as a peer under the same workload: each subscriber its own client
//! connection subscribed to one subject, the publisher one more connection.
//! The subject is unique to this run, so runs by others on the same server
//! never mix with ours.

use async_nats::{Client, ConnectOptions};
use futures::StreamExt;

use super::{
    BenchError, CONNECT_TIMEOUT,
    measure::{Arrival, Arrivals, Measurement, drive, open_subscribers, unique_topic},
    workload::{Clock, Workload, sent_nanos},
};

/// The address NATS is looked for at by default.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:4222";

/// Runs the workload against the NATS server at `address`.
pub async fn run(
    workload: &Workload,
    clock: Clock,
    address: &str,
) -> Result<Measurement, BenchError> {
    let publisher = connect(address).await?;
    let subject = unique_topic(clock);
    let subscribers =
        open_subscribers(workload.subscribers, |_| subscriber(address, &subject)).await?;
    drive(workload, clock, subscribers, |mut ticks| async move {
        while let Some(payload) = ticks.next().await {
            publisher
                .publish(subject.clone(), payload)
                .await
                .map_err(|e| BenchError::System(format!("NATS publish failed: {e}")))?;
        }
        publisher
            .flush()
            .await
            .map_err(|e| BenchError::System(format!("NATS flush failed: {e}")))
    })
    .await
}

async fn connect(address: &str) -> Result<Client, BenchError> {
    ConnectOptions::new()
        .connection_timeout(CONNECT_TIMEOUT)
        .connect(address)
        .await
        .map_err(|e| BenchError::Unreachable {
            address: address.to_owned(),
            reason: e.to_string(),
        })
}

/// One subscriber on its own connection; ready once the server has its SUB.
async fn subscriber(address: &str, subject: &str) -> Result<Arrivals, BenchError> {
    let client = connect(address).await?;
    let subscription = client
        .subscribe(subject.to_owned())
        .await
        .map_err(|e| BenchError::System(format!("NATS subscribe failed: {e}")))?;
    // A round trip after SUB: the server has registered the subscription.
    client
        .flush()
        .await
        .map_err(|e| BenchError::System(format!("NATS flush failed: {e}")))?;
    Ok(subscription
        .map(move |message| {
            // The connection lives as long as its subscriber's stream.
            let _client = &client;
            match sent_nanos(&message.payload) {
                Some(sent_nanos) => Arrival::Tick { sent_nanos },
                None => Arrival::Unreadable,
            }
        })
        .boxed())
}

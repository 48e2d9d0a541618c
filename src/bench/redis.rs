//! Redis pub/sub as a peer under the same workload: each subscriber its own
//! connection in subscribe mode on one channel, the publisher a multiplexed
//! connection that pipelines PUBLISH commands (Redis answers each one, so one
//! at a time would measure round trips, not pub/sub). The channel name is
//! unique to this run.

use std::future::Future;

use futures::StreamExt;
use redis::{Client, aio::MultiplexedConnection};

use super::{
    BenchError, CONNECT_TIMEOUT,
    measure::{Arrival, Arrivals, Measurement, drive, open_subscribers, unique_topic},
    workload::{Clock, Workload, sent_nanos},
};

/// The address Redis is looked for at by default.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:6379";

/// PUBLISH commands sent in one pipeline when the publisher has that many ready
/// (in paced mode it rarely has more than one).
const PIPELINE_DEPTH: usize = 64;

/// Runs the workload against the Redis server at `address`.
pub async fn run(
    workload: &Workload,
    clock: Clock,
    address: &str,
) -> Result<Measurement, BenchError> {
    let unreachable = |reason: String| BenchError::Unreachable {
        address: address.to_owned(),
        reason,
    };
    let client =
        Client::open(format!("redis://{address}/")).map_err(|e| unreachable(e.to_string()))?;
    let mut publisher: MultiplexedConnection =
        within_connect_timeout(address, client.get_multiplexed_async_connection()).await?;
    let channel = unique_topic(clock);
    let subscribers = open_subscribers(workload.subscribers, |_| {
        subscriber(&client, address, &channel)
    })
    .await?;
    drive(workload, clock, subscribers, |ticks| async move {
        let mut batches = ticks.ready_chunks(PIPELINE_DEPTH);
        while let Some(batch) = batches.next().await {
            let mut pipeline = redis::pipe();
            for payload in &batch {
                pipeline
                    .cmd("PUBLISH")
                    .arg(&channel)
                    .arg(payload.as_ref())
                    .ignore();
            }
            pipeline
                .exec_async(&mut publisher)
                .await
                .map_err(|e| BenchError::System(format!("Redis PUBLISH failed: {e}")))?;
        }
        Ok(())
    })
    .await
}

async fn within_connect_timeout<T>(
    address: &str,
    connecting: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, BenchError> {
    let unreachable = |reason: String| BenchError::Unreachable {
        address: address.to_owned(),
        reason,
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| unreachable(format!("no connection within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| unreachable(e.to_string()))
}

/// One subscriber on its own connection; ready once Redis confirmed SUBSCRIBE.
async fn subscriber(client: &Client, address: &str, channel: &str) -> Result<Arrivals, BenchError> {
    let mut pubsub = within_connect_timeout(address, client.get_async_pubsub()).await?;
    pubsub
        .subscribe(channel)
        .await
        .map_err(|e| BenchError::System(format!("Redis SUBSCRIBE failed: {e}")))?;
    Ok(pubsub
        .into_on_message()
        .map(|message| match sent_nanos(message.get_payload_bytes()) {
            Some(sent_nanos) => Arrival::Tick { sent_nanos },
            None => Arrival::Unreadable,
        })
        .boxed())
}

//! `herald bench idle`: the broker's resident memory per idle subscriber. It
//! starts `herald serve` as a child process, reads its VmRSS, opens many
//! subscriber streams spread over many HTTP/2 connections (each stream
//! subscribed to one contract, its command stream left open as a real client
//! does), reads VmRSS again, then closes them and reads it once more. Opening
//! them all a second time tells memory the allocator kept for reuse (the
//! figure stays flat) from memory that leaked (it grows again).

use std::time::Duration;

use futures::{StreamExt, TryStreamExt, stream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Streaming, transport::Channel};

use super::{
    BenchError,
    child::ChildBroker,
    herald::{await_ack, connect, subscribe_command},
    measure::within_setup_timeout,
};
use crate::{
    broker::registry::MAILBOX_EVENTS,
    pb::v1::{
        SubscriptionCommand, SubscriptionMessage,
        subscription_service_client::SubscriptionServiceClient,
    },
};

/// Streams opened at the same time while setting up.
const SETUP_CONCURRENCY: usize = 256;

/// Commands a stream's client side may queue; the benchmark sends one.
const COMMAND_QUEUE: usize = 1;

/// How long the broker is left alone before its memory is read, so that
/// allocations freed on the way (setup, acks) are settled.
const SETTLE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
pub struct IdlePlan {
    pub subscribers: usize,
    /// Streams that share one HTTP/2 connection (the broker allows 200).
    pub streams_per_connection: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct IdleReport {
    pub subscribers: usize,
    pub connections: usize,
    pub before_kib: u64,
    pub loaded_kib: u64,
    pub after_close_kib: u64,
    /// With the same number of streams opened again after closing the first.
    pub reopened_kib: u64,
}

impl IdleReport {
    /// The broker's growth divided by the streams that caused it.
    pub fn per_subscriber_kib(&self) -> f64 {
        if self.subscribers == 0 {
            return 0.0;
        }
        self.loaded_kib.saturating_sub(self.before_kib) as f64 / self.subscribers as f64
    }
}

/// One idle subscriber, held open for as long as it lives.
struct IdleStream {
    _commands: mpsc::Sender<SubscriptionCommand>,
    _messages: Streaming<SubscriptionMessage>,
}

pub async fn run(plan: IdlePlan) -> Result<IdleReport, BenchError> {
    let broker = ChildBroker::spawn(&["serve", "--listen", "127.0.0.1:0"]).await?;
    let result = measure(&broker, plan).await;
    broker.stop().await?;
    result
}

async fn measure(broker: &ChildBroker, plan: IdlePlan) -> Result<IdleReport, BenchError> {
    tokio::time::sleep(SETTLE).await;
    let before_kib = broker.rss_kib()?;
    let (connections, streams) = open_all(&broker.url(), plan).await?;
    tokio::time::sleep(SETTLE).await;
    let loaded_kib = broker.rss_kib()?;

    drop(streams);
    tokio::time::sleep(SETTLE * 2).await;
    let after_close_kib = broker.rss_kib()?;

    let (_, streams) = open_all(&broker.url(), plan).await?;
    tokio::time::sleep(SETTLE).await;
    let reopened_kib = broker.rss_kib()?;
    drop(streams);
    Ok(IdleReport {
        subscribers: plan.subscribers,
        connections,
        before_kib,
        loaded_kib,
        after_close_kib,
        reopened_kib,
    })
}

/// Opens the plan's streams over fresh connections; closing the returned
/// streams closes their connections too.
async fn open_all(url: &str, plan: IdlePlan) -> Result<(usize, Vec<IdleStream>), BenchError> {
    let per_connection = plan.streams_per_connection.max(1);
    let connections = plan.subscribers.div_ceil(per_connection);
    let channels: Vec<Channel> = stream::iter(0..connections)
        .map(|_| connect(url))
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;
    let streams = stream::iter(0..plan.subscribers)
        .map(|i| within_setup_timeout(open(channels[i / per_connection].clone())))
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;
    Ok((connections, streams))
}

/// Opens one subscriber stream on `channel` and waits for its subscription's ack.
async fn open(channel: Channel) -> Result<IdleStream, BenchError> {
    let (commands, queued) = mpsc::channel(COMMAND_QUEUE);
    commands
        .send(subscribe_command(MAILBOX_EVENTS, ""))
        .await
        .map_err(|_| BenchError::Task("the command queue closed".to_owned()))?;
    let mut messages = SubscriptionServiceClient::new(channel)
        .subscribe(ReceiverStream::new(queued))
        .await
        .map_err(|status| BenchError::System(format!("Subscribe failed: {status}")))?
        .into_inner();
    await_ack(&mut messages).await?;
    Ok(IdleStream {
        _commands: commands,
        _messages: messages,
    })
}

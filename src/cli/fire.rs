//! `herald fire`: encode JSON as an operation's payload and fire it.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail};
use serde_json::json;

use super::client::{RemoteContract, connect, status_error};
use crate::{
    broker::transcode,
    pb::v1::{Event, FireEventRequest, publish_service_client::PublishServiceClient},
};

#[derive(Debug, clap::Args)]
pub struct FireArgs {
    #[arg(long)]
    pub contract: String,
    #[arg(long)]
    pub operation: String,
    /// The payload as JSON (protobuf JSON mapping), e.g. '{"orderId": "42"}'.
    #[arg(long, default_value = "{}")]
    pub json: String,
    /// The event id; the broker assigns one when omitted.
    #[arg(long)]
    pub id: Option<String>,
    #[arg(long, default_value = "herald-cli")]
    pub source: String,
    /// An attribute as KEY=VALUE; repeatable.
    #[arg(long = "attribute", value_name = "KEY=VALUE")]
    pub attributes: Vec<String>,
    #[arg(long, default_value = crate::config::DEFAULT_SERVER_URL, env = "HERALD_SERVER")]
    pub server: String,
}

pub async fn run(args: FireArgs) -> anyhow::Result<()> {
    let mut attributes = BTreeMap::new();
    for pair in &args.attributes {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("--attribute '{pair}' is not KEY=VALUE");
        };
        attributes.insert(key.to_owned(), value.to_owned());
    }
    let channel = connect(&args.server).await?;
    let contract = RemoteContract::fetch(channel.clone(), &args.contract).await?;
    let descriptor = contract.payload_type(&args.operation)?;
    let payload = transcode::payload_from_json(&descriptor, &args.json)
        .map_err(|e| anyhow!("--json is not a valid {}: {e}", descriptor.full_name()))?;
    let response = PublishServiceClient::new(channel)
        .fire_event(FireEventRequest {
            event: Some(Event {
                id: args.id.unwrap_or_default(),
                contract: args.contract,
                operation: args.operation,
                payload,
                time: None,
                attributes: attributes.into_iter().collect(),
                source: args.source,
            }),
        })
        .await
        .map_err(|s| status_error("the broker refused the event", s))?
        .into_inner();
    outln!(
        "{}",
        json!({
            "event_id": response.event_id,
            "transient_subscribers": response.transient_subscribers,
            "persistent_subscribers": response.persistent_subscribers,
        })
    )?;
    Ok(())
}

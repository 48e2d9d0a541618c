//! `herald admin`: manage persistent subscriptions and the delivery queue of a
//! running broker through PersistentSubscriptionService.

use anyhow::bail;
use base64::{Engine, engine::general_purpose::STANDARD};
use rand::RngCore;
use serde_json::json;
use tonic::transport::Channel;

use super::client::{connect, status_error};
use crate::pb::v1::{
    GetAllSubscribersFromAddressRequest, GetAllSubscribersRequest, GetDeliveryStatsRequest,
    GetSubscribersToContractEventTypeRequest, GetSubscribersToContractRequest,
    PersistSubscribeRequest, PersistUnsubscribeRequest, PersistentSubscription,
    RetryDeadDeliveriesRequest,
    persistent_subscription_service_client::PersistentSubscriptionServiceClient,
};

#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    #[arg(long, global = true, default_value = crate::config::DEFAULT_SERVER_URL, env = "HERALD_SERVER")]
    pub server: String,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum AdminCommand {
    /// Store a persistent subscription (idempotent).
    Subscribe(SubscribeArgs),
    /// Remove one operation, or with no --operation the whole contract, for an address.
    Unsubscribe(TargetArgs),
    /// List persistent subscriptions, all or by contract, operation or address.
    List(ListArgs),
    /// Deliveries per address: pending, in flight, dead, and the last error.
    Deliveries(JsonArg),
    /// Make dead deliveries pending again, for one address or all.
    RetryDead(RetryDeadArgs),
    /// Print a new random webhook secret (whsec_…) to pass to `subscribe --secret`.
    NewSecret,
}

#[derive(Debug, clap::Args)]
pub struct TargetArgs {
    /// grpc://host:port, grpcs://host:port, unix:///path or http(s)://…
    #[arg(long)]
    pub address: String,
    #[arg(long)]
    pub contract: String,
    /// One operation; every operation when omitted.
    #[arg(long, default_value = "")]
    pub operation: String,
}

#[derive(Debug, clap::Args)]
pub struct SubscribeArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Webhooks only: sign deliveries with this whsec_… secret.
    #[arg(long)]
    pub secret: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[arg(long)]
    pub contract: Option<String>,
    /// Needs --contract: the subscriptions that reach this operation.
    #[arg(long)]
    pub operation: Option<String>,
    #[arg(long)]
    pub address: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct JsonArg {
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct RetryDeadArgs {
    #[arg(long)]
    pub address: Option<String>,
}

pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    if let AdminCommand::NewSecret = args.command {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        outln!("whsec_{}", STANDARD.encode(key))?;
        return Ok(());
    }
    let mut client = PersistentSubscriptionServiceClient::new(connect(&args.server).await?);
    match args.command {
        AdminCommand::Subscribe(args) => {
            client
                .persist_subscribe(PersistSubscribeRequest {
                    address: args.target.address.clone(),
                    contract: args.target.contract.clone(),
                    operation: args.target.operation.clone(),
                    secret: args.secret.unwrap_or_default(),
                })
                .await
                .map_err(|s| status_error("subscribe refused", s))?;
            outln!(
                "subscribed {} to {}",
                args.target.address,
                describe(&args.target)
            )?;
        }
        AdminCommand::Unsubscribe(target) => {
            client
                .persist_unsubscribe(PersistUnsubscribeRequest {
                    address: target.address.clone(),
                    contract: target.contract.clone(),
                    operation: target.operation.clone(),
                })
                .await
                .map_err(|s| status_error("unsubscribe refused", s))?;
            outln!("unsubscribed {} from {}", target.address, describe(&target))?;
        }
        AdminCommand::List(args) => list(&mut client, args).await?,
        AdminCommand::Deliveries(args) => deliveries(&mut client, args.json).await?,
        AdminCommand::RetryDead(args) => {
            let retried = client
                .retry_dead_deliveries(RetryDeadDeliveriesRequest {
                    address: args.address.unwrap_or_default(),
                })
                .await
                .map_err(|s| status_error("retry-dead refused", s))?
                .into_inner()
                .retried;
            outln!("{retried} dead deliveries are pending again")?;
        }
        AdminCommand::NewSecret => {}
    }
    Ok(())
}

fn describe(target: &TargetArgs) -> String {
    if target.operation.is_empty() {
        format!("every operation of {}", target.contract)
    } else {
        format!("{}/{}", target.contract, target.operation)
    }
}

async fn list(
    client: &mut PersistentSubscriptionServiceClient<Channel>,
    args: ListArgs,
) -> anyhow::Result<()> {
    let failed = |s| status_error("listing subscriptions failed", s);
    let mut subscriptions = match (&args.address, &args.contract, &args.operation) {
        (Some(address), _, _) => {
            client
                .get_all_subscribers_from_address(GetAllSubscribersFromAddressRequest {
                    address: address.clone(),
                })
                .await
        }
        (None, Some(contract), Some(operation)) => {
            client
                .get_subscribers_to_contract_event_type(GetSubscribersToContractEventTypeRequest {
                    contract: contract.clone(),
                    operation: operation.clone(),
                })
                .await
        }
        (None, Some(contract), None) => {
            client
                .get_subscribers_to_contract(GetSubscribersToContractRequest {
                    contract: contract.clone(),
                })
                .await
        }
        (None, None, Some(_)) => bail!("--operation needs --contract"),
        (None, None, None) => {
            client
                .get_all_subscribers(GetAllSubscribersRequest {})
                .await
        }
    }
    .map_err(failed)?
    .into_inner()
    .subscriptions;
    // With --address, narrow further by contract and operation if given.
    if args.address.is_some() {
        subscriptions.retain(|s| {
            args.contract.as_ref().is_none_or(|c| &s.contract == c)
                && args.operation.as_ref().is_none_or(|o| {
                    (s.operation.is_empty() && !s.excluded_operations.contains(o))
                        || &s.operation == o
                })
        });
    }
    if args.json {
        for s in &subscriptions {
            outln!("{}", subscription_json(s))?;
        }
        return Ok(());
    }
    let rows = subscriptions
        .iter()
        .map(|s| {
            vec![
                s.address.clone(),
                s.contract.clone(),
                operations(s),
                if s.signed { "yes".into() } else { "no".into() },
            ]
        })
        .collect::<Vec<_>>();
    print_table(&["ADDRESS", "CONTRACT", "OPERATION", "SIGNED"], &rows)?;
    Ok(())
}

fn operations(subscription: &PersistentSubscription) -> String {
    match (
        subscription.operation.as_str(),
        subscription.excluded_operations.as_slice(),
    ) {
        ("", []) => "*".to_owned(),
        ("", excluded) => format!("* except {}", excluded.join(", ")),
        (operation, _) => operation.to_owned(),
    }
}

fn subscription_json(s: &PersistentSubscription) -> serde_json::Value {
    json!({
        "address": s.address,
        "contract": s.contract,
        "operation": s.operation,
        "excluded_operations": s.excluded_operations,
        "signed": s.signed,
        "created_at": s.created_at.map(|t| t.to_string()),
    })
}

async fn deliveries(
    client: &mut PersistentSubscriptionServiceClient<Channel>,
    json_out: bool,
) -> anyhow::Result<()> {
    let stats = client
        .get_delivery_stats(GetDeliveryStatsRequest {})
        .await
        .map_err(|s| status_error("delivery stats failed", s))?
        .into_inner()
        .addresses;
    if json_out {
        for s in &stats {
            outln!(
                "{}",
                json!({
                    "address": s.address,
                    "pending": s.pending,
                    "in_flight": s.in_flight,
                    "dead": s.dead,
                    "oldest_undelivered": s.oldest_undelivered.map(|t| t.to_string()),
                    "last_error": s.last_error,
                })
            )?;
        }
        return Ok(());
    }
    let rows = stats
        .iter()
        .map(|s| {
            vec![
                s.address.clone(),
                s.pending.to_string(),
                s.in_flight.to_string(),
                s.dead.to_string(),
                s.oldest_undelivered
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
                s.last_error.clone(),
            ]
        })
        .collect::<Vec<_>>();
    print_table(
        &[
            "ADDRESS",
            "PENDING",
            "IN FLIGHT",
            "DEAD",
            "OLDEST UNDELIVERED",
            "LAST ERROR",
        ],
        &rows,
    )
}

/// Prints rows under headers in columns padded to their widest cell.
fn print_table(headers: &[&str], rows: &[Vec<String>]) -> anyhow::Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    outln!("{}", line(headers.to_vec()))?;
    for row in rows {
        outln!("{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

//! `herald ews bench`: the adapter against the fake Exchange in streaming
//! mode, many mailboxes in grouped connections, measuring what reaches a
//! transient subscriber of the broker: sustained events/s, event-to-subscriber
//! latency (from the event's Exchange timestamp to its arrival; the fake writes
//! millisecond timestamps for this), and the adapter process's memory.
//!
//! The broker, the fake and the subscriber run in this process; the adapter
//! runs as a child process (`herald ews --config …`) so its memory is its own.

use std::{
    process::Stdio,
    time::{Duration, SystemTime},
};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use prost::Message;
use tokio::{net::TcpListener, sync::mpsc, time::Instant};
use tokio_stream::wrappers::ReceiverStream;

use super::fake::{FakeExchange, FakeOptions};
use crate::{
    broker::{Broker, ContractRegistry, Limits},
    pb::{
        ews::MailboxEvent,
        v1::{
            EventFilter, SubscriptionCommand, subscription_command::Command, subscription_message,
            subscription_service_client::SubscriptionServiceClient,
        },
    },
    server::{ServeOptions, serve},
};

/// Each delivered mail produces this many events (Created, NewMail, and the
/// inbox's Modified with its unread count), as Exchange reports new mail.
const EVENTS_PER_MAIL: u64 = 3;
/// How often the generator delivers a batch of mail.
const TICK: Duration = Duration::from_millis(10);
const READY_PATIENCE: Duration = Duration::from_secs(300);
/// Arrivals waiting to be recorded; when full, the subscriber waits (its
/// broker queue absorbs the difference, and a lag would show as a loss).
const ARRIVALS_QUEUE: usize = 65_536;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Mailboxes subscribed (each its own impersonated subscription).
    #[arg(long, default_value_t = 1000, value_parser = crate::cli::bench::at_least_one())]
    pub mailboxes: usize,
    /// Target events per second offered by the fake Exchange.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    pub rate: u64,
    /// Seconds measured (after a warm-up of a tenth of that, at least 2 s).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub seconds: u64,
    /// Subscriptions per GetStreamingEvents connection.
    #[arg(long, default_value_t = 200, value_parser = crate::cli::bench::at_least_one())]
    pub group_size: usize,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    // Removed when dropped, however the run ends.
    let dir = tempfile::tempdir()?;
    // The broker.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let broker_url = format!("http://{}", listener.local_addr()?);
    let broker = Broker::new(ContractRegistry::builder().build(), Limits::default());
    let (stop_broker, broker_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, broker, ServeOptions::default(), async {
        let _ = broker_stopped.await;
    }));
    // The fake Exchange.
    let fake = FakeExchange::start(FakeOptions {
        precise_timestamps: true,
        ..FakeOptions::default()
    })
    .await?;
    let mailboxes: Vec<String> = (0..args.mailboxes)
        .map(|i| format!("bench{i:05}@fake.example"))
        .collect();
    // The subscriber.
    let (events, mut arrivals) = mpsc::channel::<(Instant, SystemTime, i64)>(ARRIVALS_QUEUE);
    let subscriber = tokio::spawn(subscribe(broker_url.clone(), events));
    // The adapter, as its own process.
    let config_path = dir.path().join("bench.toml");
    let quoted: Vec<String> = mailboxes.iter().map(|m| format!("\"{m}\"")).collect();
    std::fs::write(
        &config_path,
        format!(
            "url = \"{}\"\nbroker = \"{broker_url}\"\nmailboxes = [{}]\n[streaming]\ngroup_size = {}\n",
            fake.url(),
            quoted.join(", "),
            args.group_size
        ),
    )?;
    let mut adapter = tokio::process::Command::new(std::env::current_exe()?)
        .args(["ews", "--config"])
        .arg(&config_path)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the adapter process")?;
    let pid = adapter.id().unwrap_or_default();
    let groups = args.mailboxes.div_ceil(args.group_size);
    eprintln!(
        "waiting for {} mailboxes in {groups} streams to be subscribed and baselined…",
        args.mailboxes
    );
    let started = Instant::now();
    let ready = fake
        .wait_until(READY_PATIENCE, |f| {
            f.open_streams() >= groups && f.count("SyncFolderItems") >= args.mailboxes
        })
        .await;
    if !ready {
        bail!("the adapter was not ready after {READY_PATIENCE:?}");
    }
    let ready_after = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let warmup = Duration::from_secs((args.seconds / 10).max(2));
    let window = Duration::from_secs(args.seconds);
    let mails_per_second = (args.rate / EVENTS_PER_MAIL).max(1);
    let generator_end = Instant::now() + warmup + window;
    let measure_from = Instant::now() + warmup;
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut received = 0u64;
    let mut peak_rss = 0u64;
    let mut offered = 0u64;
    let mut next_mailbox = 0usize;
    let mut tick = tokio::time::interval(TICK);
    let mut sample = tokio::time::interval(Duration::from_millis(500));
    let begin = Instant::now();
    while Instant::now() < generator_end {
        tokio::select! {
            _ = tick.tick() => {
                let due = mails_per_second * begin.elapsed().as_millis() as u64 / 1000;
                while offered < due {
                    let mailbox = &mailboxes[next_mailbox % mailboxes.len()];
                    next_mailbox += 1;
                    fake.deliver_mail(mailbox, "bench", "sender@fake.example");
                    offered += 1;
                }
            }
            _ = sample.tick() => peak_rss = peak_rss.max(rss_kib(pid).unwrap_or(0)),
            Some((at, now, sent_ms)) = arrivals.recv() => {
                if at >= measure_from {
                    received += 1;
                    let now_us = now.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
                    histogram.record((now_us - sent_ms * 1000).max(1) as u64).ok();
                }
            }
        }
    }
    // Let what is in flight arrive, without counting it in the rate.
    let drain_until = Instant::now() + Duration::from_secs(5);
    while let Ok(Some(_)) = tokio::time::timeout_at(drain_until, arrivals.recv()).await {}
    let hwm = hwm_kib(pid).unwrap_or(0);
    let _ = adapter.start_kill();
    let _ = adapter.wait().await;
    subscriber.abort();
    fake.stop().await;
    let _ = stop_broker.send(());
    let _ = server.await;

    let rate = received as f64 / window.as_secs_f64();
    println!(
        "| mailboxes | streams | offered events/s | delivered events/s | p50 latency | p99 latency | max latency | adapter RSS peak (VmHWM) | ready after |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {groups} | {} | {rate:.0} | {:.1} ms | {:.1} ms | {:.1} ms | {} MiB ({} MiB) | {:.1} s |",
        args.mailboxes,
        mails_per_second * EVENTS_PER_MAIL,
        histogram.value_at_quantile(0.5) as f64 / 1000.0,
        histogram.value_at_quantile(0.99) as f64 / 1000.0,
        histogram.max() as f64 / 1000.0,
        peak_rss / 1024,
        hwm / 1024,
        ready_after.as_secs_f64(),
    );
    Ok(())
}

/// A transient subscriber to every MailboxEvents operation; sends (arrival,
/// wall clock, event timestamp in ms) for each event.
async fn subscribe(
    url: String,
    events: mpsc::Sender<(Instant, SystemTime, i64)>,
) -> anyhow::Result<()> {
    let mut client = SubscriptionServiceClient::connect(url).await?;
    // One command is ever sent.
    let (commands, rx) = mpsc::channel(1);
    commands
        .send(SubscriptionCommand {
            request_id: "bench".into(),
            command: Some(Command::Subscribe(EventFilter {
                contract: super::publish::CONTRACT.into(),
                operation: String::new(),
            })),
        })
        .await?;
    let mut stream = client
        .subscribe(ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(message) = stream.message().await? {
        if let Some(subscription_message::Message::Event(event)) = message.message {
            let at = Instant::now();
            let now = SystemTime::now();
            let payload = MailboxEvent::decode(event.payload.as_ref())?;
            let sent = payload
                .timestamp
                .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
                .unwrap_or(0);
            if events.send((at, now, sent)).await.is_err() {
                break;
            }
        }
    }
    drop(commands);
    Ok(())
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

fn hwm_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmHWM:")
}

//! `herald bench` runs to completion and reports: behaviour only, never speed.

use std::time::Duration;

use crate::support::process::herald;

/// Benchmarks run several brokers and clients; give them more room than a call.
const BENCH_PATIENCE: Duration = Duration::from_secs(120);

/// A loopback address where nothing listens (a port just released).
async fn closed_port() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    addr.to_string()
}

async fn bench(args: &[&str]) -> (String, String) {
    let output = tokio::time::timeout(BENCH_PATIENCE, herald().arg("bench").args(args).output())
        .await
        .expect("the benchmark finishes by itself")
        .expect("run herald bench");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "bench failed:\n{stdout}\n{stderr}");
    (stdout, stderr)
}

/// The cells of the Markdown table row whose first cell is `label`.
fn row<'a>(table: &'a str, label: &str) -> Vec<&'a str> {
    table
        .lines()
        .filter(|line| line.starts_with('|'))
        .map(|line| {
            line.trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect::<Vec<_>>()
        })
        .find(|cells| cells.first() == Some(&label))
        .unwrap_or_else(|| panic!("no row for {label} in:\n{table}"))
}

#[tokio::test]
async fn fanout_measures_herald_and_reports_peers_that_are_down() {
    let nats = closed_port().await;
    let redis = closed_port().await;
    let (table, _) = bench(&[
        "fanout",
        "--subscribers",
        "2",
        "--events",
        "50",
        "--payload-bytes",
        "64",
        "--nats",
        &nats,
        "--redis",
        &redis,
    ])
    .await;

    let herald = row(&table, "Herald");
    let delivered: u64 = herald[1].replace(',', "").parse().expect("a count");
    assert_eq!(
        delivered, 100,
        "every event reached both subscribers:\n{table}"
    );
    assert!(herald[5].ends_with('s'), "a latency p50:\n{table}");
    for (label, address) in [("NATS core", &nats), ("Redis pub/sub", &redis)] {
        let note = row(&table, label).last().copied().unwrap_or_default();
        assert!(
            note.contains("not reachable") && note.contains(address.as_str()),
            "{label} is reported down:\n{table}"
        );
    }
}

#[tokio::test]
async fn paced_fanout_in_a_child_broker_runs_to_completion() {
    let (table, _) = bench(&[
        "fanout",
        "--subscribers",
        "2",
        "--events",
        "20",
        "--rate",
        "200",
        "--broker",
        "child",
        "--systems",
        "herald",
    ])
    .await;
    let herald = row(&table, "Herald");
    assert_eq!(herald[1], "40", "{table}");
    assert!(
        !table.contains("NATS"),
        "only Herald was asked for:\n{table}"
    );
}

#[tokio::test]
async fn idle_reports_memory_per_subscriber() {
    let (table, _) = bench(&[
        "idle",
        "--subscribers",
        "40",
        "--streams-per-connection",
        "8",
    ])
    .await;
    let cells = row(&table, "40");
    assert_eq!(cells[1], "5", "40 streams over 5 connections:\n{table}");
    assert!(
        cells[4].ends_with("KiB"),
        "a per-subscriber figure:\n{table}"
    );
}

#[tokio::test]
async fn durable_delivers_every_event_on_both_backends() {
    let server = crate::support::postgres::server_url().to_owned();
    let (table, _) = bench(&[
        "durable",
        "--subscribers",
        "2",
        "--events",
        "40",
        "--database-url",
        &server,
    ])
    .await;
    for backend in ["PostgreSQL", "SQLite"] {
        let cells = row(&table, backend);
        assert_eq!(
            cells[1], "80",
            "every event reached both subscribers: {table}"
        );
        assert_eq!(cells[2], "0", "nothing lost: {table}");
    }
}

#[tokio::test]
async fn durable_paced_times_fire_event_calls() {
    let (table, _) = bench(&[
        "durable",
        "--events",
        "30",
        "--rate",
        "200",
        "--backends",
        "sqlite",
    ])
    .await;
    let cells = row(&table, "SQLite");
    assert_eq!(cells[1], "30", "{table}");
    assert!(
        cells[6].ends_with("ms") || cells[6].ends_with("µs"),
        "FireEvent latency reported: {table}"
    );
}

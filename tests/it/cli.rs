//! The `herald` binary end to end: serve, listen and fire as a user runs them.

use std::{process::Stdio, time::Duration};

use tokio::io::AsyncReadExt;

use crate::support::{
    ORDERS, PATIENCE, TestBroker,
    process::{ServeProcess, herald, run, test_proto},
};

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect()
}

/// Fires until the broker reports a transient subscriber (the listener is up).
async fn fire_until_heard(url: &str, json: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let out = run(&[
            "fire",
            "--server",
            url,
            "--contract",
            ORDERS,
            "--operation",
            "Placed",
            "--json",
            json,
        ])
        .await;
        assert!(out.success, "fire failed: {}", out.stderr);
        if json_lines(&out.stdout)[0]["transient_subscribers"] == 1 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener never subscribed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn serve_listen_and_fire_work_together() {
    let server = ServeProcess::start(["--proto", test_proto().as_str()]).await;
    let listener = herald()
        .args([
            "listen",
            "--server",
            &server.url,
            "--contract",
            ORDERS,
            "--operation",
            "Placed",
            "--count",
            "2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn listen");

    fire_until_heard(&server.url, r#"{"orderId": "first", "quantity": 2}"#).await;
    let out = run(&[
        "fire",
        "--server",
        &server.url,
        "--contract",
        ORDERS,
        "--operation",
        "Placed",
        "--json",
        r#"{"orderId": "second", "customer": "ada"}"#,
        "--attribute",
        "region=eu",
        "--id",
        "evt-2",
    ])
    .await;
    assert!(out.success, "{}", out.stderr);
    assert_eq!(json_lines(&out.stdout)[0]["event_id"], "evt-2");

    let output = tokio::time::timeout(PATIENCE, listener.wait_with_output())
        .await
        .expect("listen exits after --count events")
        .expect("listen output");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let events = json_lines(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["payload"]["orderId"], "first");
    assert_eq!(events[0]["payload"]["quantity"], 2);
    assert_eq!(events[1]["id"], "evt-2");
    assert_eq!(events[1]["operation"], "Placed");
    assert_eq!(events[1]["payload"]["customer"], "ada");
    assert_eq!(events[1]["attributes"]["region"], "eu");
    assert!(events[1]["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    server.terminate();
}

#[tokio::test]
async fn client_errors_are_one_line_and_a_non_zero_exit() {
    let server = ServeProcess::start(["--proto", test_proto().as_str()]).await;
    let cases: [(&[&str], &str); 5] = [
        (
            &["--contract", "acme.Nope", "--operation", "X"],
            "unknown contract 'acme.Nope'",
        ),
        (
            &["--contract", ORDERS, "--operation", "Refunded"],
            "no operation 'Refunded'",
        ),
        (
            &[
                "--contract",
                ORDERS,
                "--operation",
                "Placed",
                "--json",
                "{not json",
            ],
            "--json is not a valid herald.test.v1.Order",
        ),
        (
            &[
                "--contract",
                ORDERS,
                "--operation",
                "Placed",
                "--json",
                r#"{"nope": 1}"#,
            ],
            "nope",
        ),
        (
            &[
                "--contract",
                ORDERS,
                "--operation",
                "Placed",
                "--attribute",
                "novalue",
            ],
            "KEY=VALUE",
        ),
    ];
    for (args, expected) in cases {
        let mut full = vec!["fire", "--server", server.url.as_str()];
        full.extend_from_slice(args);
        let out = run(&full).await;
        assert!(!out.success, "{args:?} should fail");
        assert_eq!(
            out.stderr.trim().lines().count(),
            1,
            "one line: {}",
            out.stderr
        );
        assert!(out.stderr.starts_with("error: "), "{}", out.stderr);
        assert!(out.stderr.contains(expected), "{args:?}: {}", out.stderr);
    }
    server.terminate();

    let out = run(&[
        "fire",
        "--server",
        "http://127.0.0.1:9",
        "--contract",
        ORDERS,
        "--operation",
        "Placed",
    ])
    .await;
    assert!(!out.success);
    assert!(
        out.stderr
            .contains("cannot connect to the broker at http://127.0.0.1:9"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);

    let out = run(&["listen", "--server", "not a url", "--contract", ORDERS]).await;
    assert!(!out.success);
    assert!(
        out.stderr.contains("not a valid server URL"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn serve_refuses_a_bad_proto_file_with_its_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("typo.proto");
    std::fs::write(
        &path,
        "syntax = \"proto3\";\nservice S {\n  rpc E(M) returns (M)\n}\n",
    )
    .expect("write");
    let out = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--proto",
        &path.display().to_string(),
    ])
    .await;
    assert!(!out.success);
    assert!(
        out.stderr.contains("typo.proto:4:1: expected ';'"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
}

#[tokio::test]
async fn sigterm_ends_listeners_with_unavailable_and_serve_exits_cleanly() {
    let server = ServeProcess::start(["--proto", test_proto().as_str()]).await;
    let mut listener = herald()
        .args(["listen", "--server", &server.url, "--contract", ORDERS])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn listen");
    fire_until_heard(&server.url, "{}").await;
    server.terminate();
    let mut child = server.child;
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("serve exits in time")
        .expect("wait");
    assert!(status.success(), "serve exits 0 after SIGTERM");

    let status = tokio::time::timeout(PATIENCE, listener.wait())
        .await
        .expect("listen ends")
        .expect("wait");
    assert!(!status.success());
    let mut stderr = String::new();
    listener
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .await
        .expect("read");
    assert!(
        stderr.contains("Unavailable") && stderr.contains("shutting down"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_killed_listener_leaves_no_subscription_behind() {
    let broker = TestBroker::start().await;
    let mut listener = herald()
        .args(["listen", "--server", &broker.url(), "--contract", ORDERS])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn listen");
    broker
        .wait_for_stats(|stats| stats.subscribers == 1 && stats.contracts == 1)
        .await;
    listener.start_kill().expect("SIGKILL");
    listener.wait().await.expect("reaped");
    broker
        .wait_for_stats(|stats| stats.subscribers == 0 && stats.contracts == 0)
        .await;
    broker.stop().await;
}

//! PersistentSubscriptionService's bad inputs and queries, and `herald admin`.

use std::process::Stdio;

use herald::pb::v1::{
    GetAllSubscribersFromAddressRequest, GetAllSubscribersRequest,
    GetSubscribersToContractEventTypeRequest, GetSubscribersToContractRequest,
    PersistSubscribeRequest, PersistUnsubscribeRequest, PersistentSubscription,
};
use tonic::Code;

use crate::support::{
    ORDERS, PATIENCE, TestBroker,
    persistent::{Backend, TestStore, fast_delivery},
};

const MAILBOX: &str = "herald.ews.v1.MailboxEvents";

fn subscribe(
    address: &str,
    contract: &str,
    operation: &str,
    secret: &str,
) -> PersistSubscribeRequest {
    PersistSubscribeRequest {
        address: address.to_owned(),
        contract: contract.to_owned(),
        operation: operation.to_owned(),
        secret: secret.to_owned(),
    }
}

fn keys(subscriptions: &[PersistentSubscription]) -> Vec<(String, String, String)> {
    subscriptions
        .iter()
        .map(|s| (s.address.clone(), s.contract.clone(), s.operation.clone()))
        .collect()
}

fn key(address: &str, contract: &str, operation: &str) -> (String, String, String) {
    (
        address.to_owned(),
        contract.to_owned(),
        operation.to_owned(),
    )
}

#[tokio::test]
async fn bad_subscriptions_are_refused_with_what_is_accepted_and_store_nothing() {
    let store = TestStore::new(Backend::Sqlite).await;
    let broker = TestBroker::start_persistent(&store, fast_delivery("n")).await;
    let mut admin = broker.admin().await;
    let secret = "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let cases = [
        (
            subscribe("grpc://h:1", "acme.Nope", "", ""),
            Code::NotFound,
            "registered contracts",
        ),
        (
            subscribe("grpc://h:1", ORDERS, "Refunded", ""),
            Code::NotFound,
            "Placed, Shipped, Cancelled",
        ),
        (
            subscribe("", ORDERS, "", ""),
            Code::InvalidArgument,
            "accepted",
        ),
        (
            subscribe("h:1", ORDERS, "", ""),
            Code::InvalidArgument,
            "grpc://host:port",
        ),
        (
            subscribe("ftp://h:1", ORDERS, "", ""),
            Code::InvalidArgument,
            "scheme 'ftp'",
        ),
        (
            subscribe("grpc://h", ORDERS, "", ""),
            Code::InvalidArgument,
            "needs a port",
        ),
        (
            subscribe("grpc://h:1/x", ORDERS, "", ""),
            Code::InvalidArgument,
            "no path",
        ),
        (
            subscribe("unix://relative", ORDERS, "", ""),
            Code::InvalidArgument,
            "absolute socket path",
        ),
        (
            subscribe("http://h/hook", ORDERS, "", "hunter2"),
            Code::InvalidArgument,
            "whsec_",
        ),
        (
            subscribe("grpc://h:1", ORDERS, "", secret),
            Code::InvalidArgument,
            "not a webhook",
        ),
    ];
    for (request, code, expected) in cases {
        let status = admin
            .persist_subscribe(request.clone())
            .await
            .expect_err("refused");
        assert_eq!(status.code(), code, "{request:?}: {status:?}");
        assert!(
            status.message().contains(expected),
            "{request:?}: {}",
            status.message()
        );
    }
    let status = admin
        .persist_unsubscribe(PersistUnsubscribeRequest {
            address: "nonsense".to_owned(),
            contract: ORDERS.to_owned(),
            operation: String::new(),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = admin
        .persist_unsubscribe(PersistUnsubscribeRequest {
            address: "grpc://h:1".to_owned(),
            contract: ORDERS.to_owned(),
            operation: "Refunded".to_owned(),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("Placed, Shipped, Cancelled"),
        "{status:?}"
    );
    let status = admin
        .retry_dead_deliveries(herald::pb::v1::RetryDeadDeliveriesRequest {
            address: "ftp://h:1".to_owned(),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("scheme 'ftp'"), "{status:?}");
    let status = admin
        .get_subscribers_to_contract(GetSubscribersToContractRequest {
            contract: "acme.Nope".to_owned(),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::NotFound);
    let status = admin
        .get_subscribers_to_contract_event_type(GetSubscribersToContractEventTypeRequest {
            contract: ORDERS.to_owned(),
            operation: "Nope".to_owned(),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::NotFound);
    let status = admin
        .get_all_subscribers_from_address(GetAllSubscribersFromAddressRequest {
            address: "::".to_owned(),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);

    let all = admin
        .get_all_subscribers(GetAllSubscribersRequest {})
        .await
        .expect("list")
        .into_inner();
    assert!(all.subscriptions.is_empty(), "nothing was stored: {all:?}");
    broker.stop().await;
}

#[tokio::test]
async fn the_four_queries_answer_as_the_wcf_interface_did() {
    let store = TestStore::new(Backend::Postgres).await;
    let broker = TestBroker::start_persistent(&store, fast_delivery("n")).await;
    let mut admin = broker.admin().await;
    let secret = "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    for request in [
        subscribe("grpc://a:1", ORDERS, "Placed", ""),
        subscribe("grpc://a:1", MAILBOX, "", ""),
        subscribe("grpc://b:1/", ORDERS, "", ""),
        subscribe("https://hooks.example.com/x", ORDERS, "Shipped", secret),
        // Idempotent.
        subscribe("grpc://a:1", ORDERS, "Placed", ""),
    ] {
        admin.persist_subscribe(request).await.expect("subscribe");
    }
    admin
        .persist_unsubscribe(PersistUnsubscribeRequest {
            address: "grpc://b:1".to_owned(),
            contract: ORDERS.to_owned(),
            operation: "Cancelled".to_owned(),
        })
        .await
        .expect("exclude");

    let all = admin
        .get_all_subscribers(GetAllSubscribersRequest {})
        .await
        .expect("all")
        .into_inner()
        .subscriptions;
    assert_eq!(
        keys(&all),
        vec![
            key("grpc://a:1", MAILBOX, ""),
            key("grpc://a:1", ORDERS, "Placed"),
            // The address was normalised (no trailing slash).
            key("grpc://b:1", ORDERS, ""),
            key("https://hooks.example.com/x", ORDERS, "Shipped"),
        ]
    );
    assert_eq!(all[2].excluded_operations, vec!["Cancelled".to_owned()]);
    assert!(all[3].signed && !all[0].signed);
    assert!(all.iter().all(|s| s.created_at.is_some()));

    let to_orders = admin
        .get_subscribers_to_contract(GetSubscribersToContractRequest {
            contract: ORDERS.to_owned(),
        })
        .await
        .expect("contract")
        .into_inner()
        .subscriptions;
    assert_eq!(to_orders.len(), 3);

    let to_operation = |operation: &str| GetSubscribersToContractEventTypeRequest {
        contract: ORDERS.to_owned(),
        operation: operation.to_owned(),
    };
    let placed = admin
        .get_subscribers_to_contract_event_type(to_operation("Placed"))
        .await
        .expect("operation")
        .into_inner()
        .subscriptions;
    let addresses: Vec<_> = placed.iter().map(|s| s.address.as_str()).collect();
    assert_eq!(addresses, vec!["grpc://a:1", "grpc://b:1"]);
    let cancelled = admin
        .get_subscribers_to_contract_event_type(to_operation("Cancelled"))
        .await
        .expect("operation")
        .into_inner()
        .subscriptions;
    assert!(cancelled.is_empty(), "b excluded Cancelled: {cancelled:?}");

    let from_a = admin
        .get_all_subscribers_from_address(GetAllSubscribersFromAddressRequest {
            address: "grpc://a:1".to_owned(),
        })
        .await
        .expect("address")
        .into_inner()
        .subscriptions;
    assert_eq!(
        keys(&from_a),
        vec![
            key("grpc://a:1", MAILBOX, ""),
            key("grpc://a:1", ORDERS, "Placed")
        ]
    );

    // Unsubscribing with an empty operation removes the address's whole contract.
    admin
        .persist_unsubscribe(PersistUnsubscribeRequest {
            address: "grpc://a:1".to_owned(),
            contract: ORDERS.to_owned(),
            operation: String::new(),
        })
        .await
        .expect("unsubscribe");
    let from_a = admin
        .get_all_subscribers_from_address(GetAllSubscribersFromAddressRequest {
            address: "grpc://a:1".to_owned(),
        })
        .await
        .expect("address")
        .into_inner()
        .subscriptions;
    assert_eq!(keys(&from_a), vec![key("grpc://a:1", MAILBOX, "")]);
    broker.stop().await;
}

async fn herald(args: &[&str]) -> (bool, String, String) {
    let output = crate::support::process::run(args).await;
    (output.success, output.stdout, output.stderr)
}

#[tokio::test]
async fn the_admin_cli_manages_subscriptions_and_dead_letters() {
    let store = TestStore::new(Backend::Sqlite).await;
    let mut options = fast_delivery("cli-node");
    options.dispatcher.retry.max_attempts = 1;
    let broker = TestBroker::start_persistent(&store, options).await;
    let url = broker.url();
    let admin = |extra: &[&str]| {
        let mut args = vec!["admin", "--server", url.as_str()];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        herald(&refs).await
    };

    let (ok, secret, _) = run(admin(&["new-secret"])).await;
    assert!(ok && secret.trim().starts_with("whsec_"));
    let secret = secret.trim().to_owned();

    // Nothing listens on port 9: deliveries to it fail and, with one attempt
    // allowed, go straight to the dead letters.
    let (ok, out, err) = run(admin(&[
        "subscribe",
        "--address",
        "grpc://127.0.0.1:9",
        "--contract",
        ORDERS,
    ]))
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("every operation of herald.test.v1.Orders"),
        "{out}"
    );
    let (ok, _, err) = run(admin(&[
        "subscribe",
        "--address",
        "http://127.0.0.1:9/hook",
        "--contract",
        ORDERS,
        "--operation",
        "Placed",
        "--secret",
        &secret,
    ]))
    .await;
    assert!(ok, "{err}");

    let (ok, table, _) = run(admin(&["list"])).await;
    assert!(ok);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("ADDRESS") && lines[0].contains("SIGNED"),
        "{table}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("grpc://127.0.0.1:9") && l.contains(" * ")),
        "{table}"
    );
    assert!(
        lines.iter().any(|l| l.contains("http://127.0.0.1:9/hook")
            && l.contains("Placed")
            && l.ends_with("yes")),
        "{table}"
    );

    let (ok, json, _) = run(admin(&[
        "list",
        "--contract",
        ORDERS,
        "--operation",
        "Shipped",
        "--json",
    ]))
    .await;
    assert!(ok);
    let rows: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["address"], "grpc://127.0.0.1:9");

    let (ok, out, err) = herald(&[
        "fire",
        "--server",
        &url,
        "--contract",
        ORDERS,
        "--operation",
        "Placed",
        "--json",
        "{}",
    ])
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("\"persistent_subscribers\":2"), "{out}");

    // Both deliveries die after their one attempt.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let stats = loop {
        let (ok, json, _) = run(admin(&["deliveries", "--json"])).await;
        assert!(ok);
        let rows: Vec<serde_json::Value> = json
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON"))
            .collect();
        if rows.len() == 2 && rows.iter().all(|r| r["dead"] == 1) {
            break rows;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "deliveries never died: {rows:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(
        stats
            .iter()
            .all(|r| !r["last_error"].as_str().unwrap_or_default().is_empty())
    );
    let (ok, table, _) = run(admin(&["deliveries"])).await;
    assert!(
        ok && table.starts_with("ADDRESS") && table.contains("LAST ERROR"),
        "{table}"
    );

    let (ok, out, _) = run(admin(&["retry-dead", "--address", "grpc://127.0.0.1:9"])).await;
    assert!(ok);
    assert_eq!(out.trim(), "1 dead deliveries are pending again");

    let (ok, out, _) = run(admin(&[
        "unsubscribe",
        "--address",
        "grpc://127.0.0.1:9",
        "--contract",
        ORDERS,
    ]))
    .await;
    assert!(ok && out.contains("unsubscribed"), "{out}");

    let (ok, _, err) = run(admin(&[
        "subscribe",
        "--address",
        "gopher://x",
        "--contract",
        ORDERS,
    ]))
    .await;
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: subscribe refused: InvalidArgument"),
        "{err}"
    );
    let (ok, _, err) = run(admin(&["list", "--operation", "Placed"])).await;
    assert!(!ok && err.contains("--operation needs --contract"), "{err}");
    broker.stop().await;
}

/// `herald admin list | head -0`: the reader is gone before the table is written.
#[tokio::test]
async fn the_admin_cli_exits_quietly_when_its_reader_goes_away() {
    let store = TestStore::new(Backend::Sqlite).await;
    let broker = TestBroker::start_persistent(&store, fast_delivery("pipe-node")).await;
    for i in 0..50 {
        broker
            .persist(&format!("grpc://127.0.0.1:{}", 10_000 + i), ORDERS, "")
            .await;
    }
    let mut child = crate::support::process::herald()
        .args(["admin", "--server", broker.url().as_str(), "list"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run herald");
    drop(child.stdout.take());
    let output = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .expect("the command finishes in time")
        .expect("wait for herald");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    broker.stop().await;
}

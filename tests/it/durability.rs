//! What survives: pending deliveries across a restart, a broker killed with
//! SIGKILL while publishers fire, and two broker nodes sharing one PostgreSQL.

use std::{
    collections::HashSet,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::support::{
    ORDERS, PATIENCE, TestBroker, fire, order, order_event,
    persistent::{Backend, TestStore, fast_delivery},
    process::{ServeProcess, test_proto},
    receivers::Receiver,
};
use herald::pb::v1::{
    Event, FireEventRequest, PersistSubscribeRequest, PersistUnsubscribeRequest,
    persistent_subscription_service_client::PersistentSubscriptionServiceClient,
    publish_service_client::PublishServiceClient,
};
use prost::Message;

async fn pending_deliveries_survive_a_restart(backend: Backend) {
    let store = TestStore::new(backend).await;
    let reserved = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = reserved.local_addr().expect("addr");
    drop(reserved);

    let first = TestBroker::start_persistent(&store, fast_delivery("node-1")).await;
    first.persist(&format!("grpc://{addr}"), ORDERS, "").await;
    let mut publisher = first.publisher().await;
    let mut fired = Vec::new();
    for i in 0..10 {
        fired.push(
            fire(&mut publisher, "Placed", &order(&i.to_string(), 1))
                .await
                .event_id,
        );
    }
    first.stop().await;

    let receiver = Receiver::grpc_on(
        tokio::net::TcpListener::bind(addr).await.expect("rebind"),
        None,
    )
    .await;
    let second = TestBroker::start_persistent(&store, fast_delivery("node-1")).await;
    let received: HashSet<String> = receiver
        .wait_for(10)
        .await
        .into_iter()
        .map(|r| r.event_id)
        .collect();
    assert_eq!(received, fired.into_iter().collect());
    second.stop().await;
}

/// Two `herald serve` processes on one PostgreSQL. The subscriber is down while
/// both fire, so every delivery fails and goes back to the shared queue, where
/// both dispatchers compete for it; when the subscriber comes back each event
/// arrives exactly once. A subscription change made through one node reaches the
/// other by notification.
#[tokio::test]
async fn two_broker_processes_on_one_postgres_share_subscriptions_and_the_queue() {
    let store = TestStore::new(Backend::Postgres).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("herald.toml");
    std::fs::write(
        &config,
        "[delivery]\nretry_base_seconds = 1\nretry_max_seconds = 1\ncall_timeout_seconds = 2\n",
    )
    .expect("write config");
    let a = broker_process(&store.url(), "node-a", Some(&config)).await;
    let b = broker_process(&store.url(), "node-b", Some(&config)).await;

    // The subscriber's port, reserved and closed: it is down for now.
    let reserved = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = reserved.local_addr().expect("addr").port();
    drop(reserved);
    let address = format!("grpc://127.0.0.1:{port}");
    PersistentSubscriptionServiceClient::new(a.channel().await)
        .persist_subscribe(PersistSubscribeRequest {
            address: address.clone(),
            contract: ORDERS.to_owned(),
            operation: String::new(),
            secret: String::new(),
        })
        .await
        .expect("subscribe through A");

    // B learns of A's subscription by notification, long before its periodic
    // refresh: fire through B until it reports the persistent subscriber.
    let mut via_a = PublishServiceClient::new(a.channel().await);
    let mut via_b = PublishServiceClient::new(b.channel().await);
    let mut expected = HashSet::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let answer = fire(&mut via_b, "Placed", &order("probe", 1)).await;
        if answer.persistent_subscribers == 1 {
            expected.insert(answer.event_id);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node B never saw node A's subscription"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..200 {
        let publisher = if i % 2 == 0 { &mut via_a } else { &mut via_b };
        let answer = fire(publisher, "Shipped", &order(&i.to_string(), 1)).await;
        assert_eq!(answer.persistent_subscribers, 1);
        expected.insert(answer.event_id);
    }
    // Let both nodes fail their first attempts and put the deliveries back.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("the subscriber comes back on its port");
    let receiver = Receiver::grpc_on(listener, None).await;
    receiver.wait_for(expected.len()).await;
    // Give a duplicate, if any, the time to arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ids: Vec<String> = receiver.received_ids();
    let unique: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(unique, expected);
    assert_eq!(ids.len(), unique.len(), "no event was delivered twice");

    // A change made through B reaches A the same way.
    PersistentSubscriptionServiceClient::new(b.channel().await)
        .persist_unsubscribe(PersistUnsubscribeRequest {
            address,
            contract: ORDERS.to_owned(),
            operation: String::new(),
        })
        .await
        .expect("unsubscribe through B");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while fire(&mut via_a, "Placed", &order("after", 1))
        .await
        .persistent_subscribers
        != 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node A never saw node B's change"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `herald serve` process with persistent delivery on `database`, named
/// `node`, with an optional config file.
async fn broker_process(database: &str, node: &str, config: Option<&Path>) -> ServeProcess {
    let mut args = vec![
        "--node-id".into(),
        node.into(),
        "--proto".into(),
        test_proto(),
        "--database-url".into(),
        database.to_owned(),
    ];
    if let Some(config) = config {
        args.extend(["--config".to_owned(), config.display().to_string()]);
    }
    ServeProcess::start(args).await
}

async fn every_acknowledged_event_survives_sigkill(backend: Backend) {
    let store = TestStore::new(backend).await;
    let receiver = Receiver::grpc().await;
    let mut broker = broker_process(&store.url(), "crash-test-node", None).await;
    PersistentSubscriptionServiceClient::new(broker.channel().await)
        .persist_subscribe(PersistSubscribeRequest {
            address: receiver.address.clone(),
            contract: ORDERS.to_owned(),
            operation: String::new(),
            secret: String::new(),
        })
        .await
        .expect("subscribe");

    // Four publishers fire as fast as they can; each keeps the ids the broker
    // acknowledged. The broker is killed while they are at it.
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let mut publishers = Vec::new();
    for p in 0..4 {
        let channel = broker.channel().await;
        let acknowledged = Arc::clone(&acknowledged);
        publishers.push(tokio::spawn(async move {
            let mut client = PublishServiceClient::new(channel);
            for i in 0.. {
                let mut request = order_event("Placed", &order(&format!("{p}-{i}"), 1));
                let id = format!("crash-{p}-{i}");
                request.event.as_mut().expect("event").id = id.clone();
                match client.fire_event(request).await {
                    Ok(_) => acknowledged.lock().expect("lock").push(id),
                    Err(_) => return,
                }
            }
        }));
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while acknowledged.lock().expect("lock").len() < 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishers too slow"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    broker.child.start_kill().expect("SIGKILL");
    broker.child.wait().await.expect("reaped");
    for publisher in publishers {
        tokio::time::timeout(PATIENCE, publisher)
            .await
            .expect("publishers notice the broker died")
            .expect("publisher task");
    }
    let acknowledged: HashSet<String> =
        acknowledged.lock().expect("lock").iter().cloned().collect();

    let restarted = broker_process(&store.url(), "crash-test-node", None).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let received: HashSet<String> = receiver.received_ids().into_iter().collect();
        let missing: Vec<_> = acknowledged.difference(&received).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} acknowledged events never arrived, e.g. {:?}",
            missing.len(),
            acknowledged.len(),
            missing.iter().take(3).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(restarted);
}

#[tokio::test]
async fn fire_answers_unavailable_when_the_store_is_gone() {
    // A PostgreSQL database dropped under a running broker: firing to a
    // persistent subscriber fails loudly instead of losing the event.
    let store = TestStore::new(Backend::Postgres).await;
    let broker = TestBroker::start_persistent(&store, fast_delivery("n")).await;
    let receiver = Receiver::grpc().await;
    broker.persist(&receiver.address, ORDERS, "").await;
    let herald::store::StoreLocation::Postgres(url) = &store.location else {
        unreachable!()
    };
    let mut admin_url = reqwest::Url::parse(url).expect("url");
    let name = admin_url.path().trim_start_matches('/').to_owned();
    admin_url.set_path("postgres");
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(admin_url.as_str())
        .await
        .expect("admin connection");
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .expect("drop the broker's database");
    let status = broker
        .publisher()
        .await
        .fire_event(FireEventRequest {
            event: Some(Event {
                contract: ORDERS.to_owned(),
                operation: "Placed".to_owned(),
                payload: order("lost?", 1).encode_to_vec().into(),
                ..Event::default()
            }),
        })
        .await
        .expect_err("no durable store, no acknowledgement");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("store"), "{}", status.message());
    broker.stop().await;
}

on_both_backends!(
    pending_deliveries_survive_a_restart,
    every_acknowledged_event_survives_sigkill
);

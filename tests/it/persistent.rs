//! Persistent subscribers end to end: a real broker with a real store calls
//! real subscribers through each binding, retries, dead-letters, and keeps
//! slow subscribers from delaying the others.

use std::{sync::Arc, time::Duration};

use herald::{
    delivery::DeliveryOptions,
    pb::v1::{
        GetDeliveryStatsRequest, GetSubscribersToContractEventTypeRequest, PersistSubscribeRequest,
        PersistUnsubscribeRequest, RetryDeadDeliveriesRequest,
    },
};

use crate::support::{
    ORDERS, PATIENCE, TestBroker, fire, order, order_event,
    persistent::{Backend, TestStore, fast_delivery},
    receivers::{Behaviour, Receiver, localhost_certificate},
};

async fn broker_on(backend: Backend) -> (TestStore, TestBroker) {
    broker_with(backend, fast_delivery("test-node")).await
}

async fn broker_with(backend: Backend, options: DeliveryOptions) -> (TestStore, TestBroker) {
    let store = TestStore::new(backend).await;
    let broker = TestBroker::start_persistent(&store, options).await;
    (store, broker)
}

/// Waits until the broker's delivery stats satisfy `done`.
async fn wait_for_stats(
    broker: &TestBroker,
    done: impl Fn(&[herald::pb::v1::AddressDeliveryStats]) -> bool,
) -> Vec<herald::pb::v1::AddressDeliveryStats> {
    let mut admin = broker.admin().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let stats = admin
            .get_delivery_stats(GetDeliveryStatsRequest {})
            .await
            .expect("stats")
            .into_inner()
            .addresses;
        if done(&stats) {
            return stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "delivery stats never got there: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn grpc_binding_delivers_payload_and_event_metadata(backend: Backend) {
    let (_store, broker) = broker_on(backend).await;
    let receiver = Receiver::grpc().await;
    broker.persist(&receiver.address, ORDERS, "").await;

    let mut request = order_event("Placed", &order("p-1", 3));
    let event = request.event.as_mut().expect("event");
    event.source = "shop".to_owned();
    let answer = broker
        .publisher()
        .await
        .fire_event(request)
        .await
        .expect("fire")
        .into_inner();
    assert_eq!(answer.persistent_subscribers, 1);

    let received = receiver.wait_for(1).await;
    assert_eq!(received[0].operation, "Placed");
    assert_eq!(received[0].order, Some(order("p-1", 3)));
    assert_eq!(received[0].event_id, answer.event_id);
    let header = |name: &str| {
        received[0]
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(header("herald-source"), "shop");
    let time: prost_types::Timestamp = header("herald-event-time").parse().expect("RFC 3339 time");
    assert!(time.seconds > 1_700_000_000);
    wait_for_stats(&broker, <[_]>::is_empty).await;
    broker.stop().await;
}

async fn unix_binding_delivers(backend: Backend) {
    let (_store, broker) = broker_on(backend).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let receiver = Receiver::unix(&dir.path().join("orders.sock")).await;
    broker.persist(&receiver.address, ORDERS, "Shipped").await;
    fire(
        &mut broker.publisher().await,
        "Placed",
        &order("not-this", 1),
    )
    .await;
    fire(&mut broker.publisher().await, "Shipped", &order("u-1", 1)).await;
    let received = receiver.wait_for(1).await;
    assert_eq!(received[0].order, Some(order("u-1", 1)));
    broker.stop().await;
}

async fn grpcs_binding_verifies_the_subscriber_certificate(backend: Backend) {
    let (certificate, key) = localhost_certificate();
    let dir = tempfile::tempdir().expect("temp dir");
    let roots = dir.path().join("roots.pem");
    std::fs::write(&roots, &certificate).expect("write roots");
    let mut options = fast_delivery("tls-node");
    options.bindings.extra_roots = Some(roots);
    let (_store, broker) = broker_with(backend, options).await;

    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(&certificate, &key));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let receiver = Receiver::grpc_on(listener, Some(tls)).await;
    assert!(receiver.address.starts_with("grpcs://localhost:"));
    broker.persist(&receiver.address, ORDERS, "").await;
    fire(&mut broker.publisher().await, "Cancelled", &order("t-1", 1)).await;
    assert_eq!(receiver.wait_for(1).await[0].order, Some(order("t-1", 1)));
    broker.stop().await;
}

async fn untrusted_grpcs_subscribers_are_retried_not_called(backend: Backend) {
    // No extra roots: the self-signed certificate is not trusted.
    let (_store, broker) = broker_on(backend).await;
    let (certificate, key) = localhost_certificate();
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(&certificate, &key));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let receiver = Receiver::grpc_on(listener, Some(tls)).await;
    broker.persist(&receiver.address, ORDERS, "").await;
    fire(&mut broker.publisher().await, "Placed", &order("x", 1)).await;
    wait_for_stats(&broker, |s| s.len() == 1 && !s[0].last_error.is_empty()).await;
    assert!(receiver.received().is_empty());
    broker.stop().await;
}

async fn webhooks_get_signed_cloud_events(backend: Backend) {
    let (_store, broker) = broker_on(backend).await;
    let secret = format!("whsec_{}", base64_of(&[9u8; 32]));
    let receiver = Receiver::webhook(Some(&secret)).await;
    broker
        .admin()
        .await
        .persist_subscribe(PersistSubscribeRequest {
            address: receiver.address.clone(),
            contract: ORDERS.to_owned(),
            operation: String::new(),
            secret: secret.clone(),
        })
        .await
        .expect("subscribe");
    let mut request = order_event("Shipped", &order("w-1", 2));
    let event = request.event.as_mut().expect("event");
    event
        .attributes
        .insert("region".to_owned(), "eu".to_owned());
    event
        .attributes
        .insert("Not-An-Extension".to_owned(), "x".to_owned());
    let answer = broker
        .publisher()
        .await
        .fire_event(request)
        .await
        .expect("fire")
        .into_inner();
    let received = receiver.wait_for(1).await;
    let cloud_event = received[0].cloud_event.clone().expect("JSON body");
    assert_eq!(cloud_event["specversion"], "1.0");
    assert_eq!(cloud_event["id"], answer.event_id.as_str());
    assert_eq!(cloud_event["type"], "herald.test.v1.Orders.Shipped");
    assert_eq!(cloud_event["datacontenttype"], "application/json");
    assert_eq!(cloud_event["data"]["orderId"], "w-1");
    assert_eq!(cloud_event["data"]["quantity"], 2);
    assert_eq!(cloud_event["region"], "eu");
    assert!(cloud_event.get("Not-An-Extension").is_none());
    assert!(
        cloud_event["time"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    assert_eq!(received[0].event_id, answer.event_id);
    broker.stop().await;
}

async fn a_wrongly_signed_webhook_is_refused_and_retried(backend: Backend) {
    let (_store, broker) = broker_on(backend).await;
    let receiver_secret = format!("whsec_{}", base64_of(&[1u8; 32]));
    let other_secret = format!("whsec_{}", base64_of(&[2u8; 32]));
    let receiver = Receiver::webhook(Some(&receiver_secret)).await;
    broker
        .admin()
        .await
        .persist_subscribe(PersistSubscribeRequest {
            address: receiver.address.clone(),
            contract: ORDERS.to_owned(),
            operation: String::new(),
            secret: other_secret,
        })
        .await
        .expect("subscribe");
    fire(&mut broker.publisher().await, "Placed", &order("x", 1)).await;
    let stats = wait_for_stats(&broker, |s| s.len() == 1 && s[0].last_error.contains("401")).await;
    assert_eq!(stats[0].dead, 0);
    assert!(receiver.received().is_empty());
    broker.stop().await;
}

async fn https_webhooks_trust_the_configured_roots(backend: Backend) {
    let (certificate, key) = localhost_certificate();
    let dir = tempfile::tempdir().expect("temp dir");
    let roots = dir.path().join("roots.pem");
    std::fs::write(&roots, &certificate).expect("write roots");
    let mut options = fast_delivery("https-node");
    options.bindings.extra_roots = Some(roots);
    let (_store, broker) = broker_with(backend, options).await;

    let certs = vec![rustls_pki_cert(&certificate)];
    let key = rustls_pki_key(&key);
    let config = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    let receiver = Receiver::webhook_tls(Arc::new(config)).await;
    broker.persist(&receiver.address, ORDERS, "").await;
    fire(&mut broker.publisher().await, "Placed", &order("s-1", 1)).await;
    let received = receiver.wait_for(1).await;
    assert_eq!(
        received[0].cloud_event.as_ref().expect("body")["data"]["orderId"],
        "s-1"
    );
    broker.stop().await;
}

async fn a_gone_webhook_loses_its_subscriptions(backend: Backend) {
    let (_store, broker) = broker_on(backend).await;
    let receiver = Receiver::webhook(None).await;
    receiver.behave(Behaviour::Gone);
    broker.persist(&receiver.address, ORDERS, "").await;
    broker
        .persist(&receiver.address, "herald.ews.v1.MailboxEvents", "NewMail")
        .await;
    let mut publisher = broker.publisher().await;
    fire(&mut publisher, "Placed", &order("g", 1)).await;
    receiver.wait_for_calls(1).await;
    let mut admin = broker.admin().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !admin
        .get_all_subscribers(herald::pb::v1::GetAllSubscribersRequest {})
        .await
        .expect("list")
        .into_inner()
        .subscriptions
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gone address is still subscribed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for_stats(&broker, <[_]>::is_empty).await;
    assert_eq!(
        fire(&mut publisher, "Placed", &order("g2", 1))
            .await
            .persistent_subscribers,
        0
    );
    broker.stop().await;
}

async fn a_redirecting_webhook_is_retried_not_followed(backend: Backend) {
    // Following a 303 would send a bodiless GET whose 200 looks like a delivery.
    let (_store, broker) = broker_on(backend).await;
    let receiver = Receiver::webhook(None).await;
    receiver.behave(Behaviour::Redirect);
    broker.persist(&receiver.address, ORDERS, "").await;
    fire(&mut broker.publisher().await, "Placed", &order("r-1", 1)).await;
    let stats = wait_for_stats(&broker, |s| {
        s.len() == 1 && s[0].last_error.contains("redirects are not followed")
    })
    .await;
    assert!(stats[0].last_error.contains("/hooks/moved"), "{stats:?}");
    assert_eq!(stats[0].dead, 0);
    receiver.behave(Behaviour::Accept);
    let received = receiver.wait_for(1).await;
    assert_eq!(
        received[0].cloud_event.as_ref().expect("body")["data"]["orderId"],
        "r-1"
    );
    wait_for_stats(&broker, <[_]>::is_empty).await;
    broker.stop().await;
}

async fn a_subscriber_that_is_down_gets_everything_when_it_comes_back(backend: Backend) {
    let (_store, broker) = broker_on(backend).await;
    // Reserve a port, then close it: the subscriber is down.
    let reserved = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = reserved.local_addr().expect("addr");
    drop(reserved);
    let address = format!("grpc://{addr}");
    broker.persist(&address, ORDERS, "").await;
    let mut publisher = broker.publisher().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            fire(&mut publisher, "Placed", &order(&i.to_string(), 1))
                .await
                .event_id,
        );
    }
    let stats = wait_for_stats(&broker, |s| s.len() == 1 && !s[0].last_error.is_empty()).await;
    assert_eq!(stats[0].pending + stats[0].in_flight, 5);

    let receiver = Receiver::grpc_on(
        tokio::net::TcpListener::bind(addr).await.expect("rebind"),
        None,
    )
    .await;
    let mut received = receiver
        .wait_for(5)
        .await
        .into_iter()
        .map(|r| r.event_id)
        .collect::<Vec<_>>();
    received.sort();
    ids.sort();
    assert_eq!(received, ids);
    wait_for_stats(&broker, <[_]>::is_empty).await;
    broker.stop().await;
}

async fn a_hanging_subscriber_does_not_delay_the_others(backend: Backend) {
    // Calls time out after 8 s; everything the healthy subscriber needs happens
    // long before that, so it cannot have waited for a hung call.
    let mut options = fast_delivery("hang-node");
    options.bindings.call_timeout = Duration::from_secs(8);
    options.dispatcher.lease = Duration::from_secs(20);
    let limit = options.dispatcher.per_address_in_flight;
    let (_store, broker) = broker_with(backend, options).await;
    let hanging = Receiver::grpc().await;
    hanging.behave(Behaviour::Hang);
    let healthy = Receiver::grpc().await;
    broker.persist(&hanging.address, ORDERS, "").await;
    broker.persist(&healthy.address, ORDERS, "").await;
    let mut publisher = broker.publisher().await;
    let events = 5 * limit;
    for i in 0..events {
        fire(&mut publisher, "Placed", &order(&i.to_string(), 1)).await;
    }
    // The healthy one gets everything while the hanging one holds its calls,
    // no more of them than the per-address limit, none timed out yet.
    healthy.wait_for(events).await;
    hanging.wait_for_calls(limit as u64).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        hanging.calls(),
        limit as u64,
        "calls beyond the per-address limit"
    );
    let stats = wait_for_stats(&broker, |s| s.iter().any(|a| a.address == hanging.address)).await;
    let hung = stats
        .iter()
        .find(|a| a.address == hanging.address)
        .expect("stats");
    assert!(
        hung.last_error.is_empty(),
        "the healthy deliveries waited for a hung call to time out: {hung:?}"
    );
    assert!(hanging.received().is_empty());
    // Each hung call times out and is retried.
    let stats = wait_for_stats(&broker, |s| {
        s.iter()
            .any(|a| a.address == hanging.address && a.last_error.contains("call timeout"))
    })
    .await;
    assert!(
        stats
            .iter()
            .all(|a| a.address == hanging.address && a.dead == 0)
    );
    hanging.behave(Behaviour::Accept);
    hanging.wait_for(events).await;
    wait_for_stats(&broker, <[_]>::is_empty).await;
    broker.stop().await;
}

async fn a_slow_subscriber_gets_each_event_once_though_its_backlog_outlasts_the_lease(
    backend: Backend,
) {
    // One call at a time, 250 ms each, 24 events: the last waits about 6 s,
    // longer than the 5 s claim. Claims that wait too long go back to the queue
    // instead of expiring under the dispatcher, which would deliver them twice.
    let mut options = fast_delivery("slow-node");
    options.dispatcher.per_address_in_flight = 1;
    let (_store, broker) = broker_with(backend, options).await;
    let receiver = Receiver::grpc().await;
    receiver.behave(Behaviour::Slow(Duration::from_millis(250)));
    broker.persist(&receiver.address, ORDERS, "").await;
    let requests: Vec<_> = (0..24)
        .map(|i| order_event("Placed", &order(&i.to_string(), 1)))
        .collect();
    broker
        .publisher()
        .await
        .fire_events(tokio_stream::iter(requests))
        .await
        .expect("fire");
    receiver.wait_for(24).await;
    wait_for_stats(&broker, <[_]>::is_empty).await;
    // A second copy would be claimed already and arrive within a few calls.
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.stop().await;
    let ids = receiver.received_ids();
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), 24);
    assert_eq!(ids.len(), 24, "an event was delivered twice");
}

async fn an_address_subscribed_twice_over_gets_one_delivery(backend: Backend) {
    // All operations, plus Placed on its own, plus another address in between.
    let (_store, broker) = broker_on(backend).await;
    let receiver = Receiver::grpc().await;
    let other = Receiver::grpc().await;
    broker.persist(&receiver.address, ORDERS, "").await;
    broker.persist(&other.address, ORDERS, "Placed").await;
    broker.persist(&receiver.address, ORDERS, "Placed").await;
    let answer = fire(&mut broker.publisher().await, "Placed", &order("once", 1)).await;
    assert_eq!(answer.persistent_subscribers, 2);
    receiver.wait_for(1).await;
    other.wait_for(1).await;
    wait_for_stats(&broker, <[_]>::is_empty).await;
    assert_eq!(receiver.received().len(), 1);
    broker.stop().await;
}

async fn failing_deliveries_are_dead_lettered_and_can_be_retried(backend: Backend) {
    let mut options = fast_delivery("dead-node");
    options.dispatcher.retry.max_attempts = 3;
    let (_store, broker) = broker_with(backend, options).await;
    let receiver = Receiver::grpc().await;
    receiver.behave(Behaviour::Fail);
    broker.persist(&receiver.address, ORDERS, "").await;
    fire(&mut broker.publisher().await, "Placed", &order("d-1", 1)).await;
    let stats = wait_for_stats(&broker, |s| s.len() == 1 && s[0].dead == 1).await;
    assert!(
        stats[0].last_error.contains("Unavailable"),
        "{:?}",
        stats[0]
    );
    assert_eq!(receiver.calls(), 3, "three attempts, then the dead letter");

    receiver.behave(Behaviour::Accept);
    let retried = broker
        .admin()
        .await
        .retry_dead_deliveries(RetryDeadDeliveriesRequest {
            address: receiver.address.clone(),
        })
        .await
        .expect("retry dead")
        .into_inner()
        .retried;
    assert_eq!(retried, 1);
    assert_eq!(receiver.wait_for(1).await[0].order, Some(order("d-1", 1)));
    wait_for_stats(&broker, <[_]>::is_empty).await;
    broker.stop().await;
}

async fn transient_and_persistent_subscribers_are_both_reached(backend: Backend) {
    let (_store, broker) = broker_on(backend).await;
    let receiver = Receiver::grpc().await;
    broker.persist(&receiver.address, ORDERS, "Placed").await;
    let mut live = broker.subscriber().await;
    live.subscribe(ORDERS, "Placed").await.expect("ack");
    let answer = fire(&mut broker.publisher().await, "Placed", &order("both", 1)).await;
    assert_eq!(
        (answer.transient_subscribers, answer.persistent_subscribers),
        (1, 1)
    );
    assert_eq!(live.next_event().await.id, answer.event_id);
    assert_eq!(receiver.wait_for(1).await[0].event_id, answer.event_id);
    broker.stop().await;
}

async fn every_operation_but_the_excluded_ones_reaches_the_subscriber(backend: Backend) {
    let (_store, broker) = broker_on(backend).await;
    let receiver = Receiver::grpc().await;
    broker.persist(&receiver.address, ORDERS, "").await;
    let mut admin = broker.admin().await;
    admin
        .persist_unsubscribe(PersistUnsubscribeRequest {
            address: receiver.address.clone(),
            contract: ORDERS.to_owned(),
            operation: "Shipped".to_owned(),
        })
        .await
        .expect("unsubscribe one");
    let subscribers = |operation: &str| GetSubscribersToContractEventTypeRequest {
        contract: ORDERS.to_owned(),
        operation: operation.to_owned(),
    };
    let to_shipped = admin
        .get_subscribers_to_contract_event_type(subscribers("Shipped"))
        .await
        .expect("query")
        .into_inner();
    assert!(to_shipped.subscriptions.is_empty());
    let to_placed = admin
        .get_subscribers_to_contract_event_type(subscribers("Placed"))
        .await
        .expect("query")
        .into_inner();
    assert_eq!(to_placed.subscriptions.len(), 1);
    assert_eq!(
        to_placed.subscriptions[0].excluded_operations,
        vec!["Shipped".to_owned()]
    );

    let mut publisher = broker.publisher().await;
    assert_eq!(
        fire(&mut publisher, "Shipped", &order("s", 1))
            .await
            .persistent_subscribers,
        0
    );
    assert_eq!(
        fire(&mut publisher, "Placed", &order("p", 1))
            .await
            .persistent_subscribers,
        1
    );
    assert_eq!(
        fire(&mut publisher, "Cancelled", &order("c", 1))
            .await
            .persistent_subscribers,
        1
    );
    let received = receiver.wait_for(2).await;
    let operations: Vec<_> = received.iter().map(|r| r.operation.as_str()).collect();
    assert!(operations.contains(&"Placed") && operations.contains(&"Cancelled"));
    broker.stop().await;
}

async fn a_full_dispatcher_leaves_deliveries_to_the_queue(backend: Backend) {
    // Room for two deliveries at a time: most fires are stored pending and
    // claimed later instead of being handed over in memory.
    let mut options = fast_delivery("small-node");
    options.dispatcher.max_in_flight = 2;
    options.dispatcher.per_address_in_flight = 1;
    let (_store, broker) = broker_with(backend, options).await;
    let receiver = Receiver::grpc().await;
    broker.persist(&receiver.address, ORDERS, "").await;
    let requests: Vec<_> = (0..50)
        .map(|i| order_event("Placed", &order(&i.to_string(), 1)))
        .collect();
    let summary = broker
        .publisher()
        .await
        .fire_events(tokio_stream::iter(requests))
        .await
        .expect("fire")
        .into_inner();
    assert_eq!(summary.persistent_deliveries, 50);
    let received: std::collections::HashSet<String> = receiver
        .wait_for(50)
        .await
        .into_iter()
        .map(|r| r.event_id)
        .collect();
    assert_eq!(received.len(), 50);
    wait_for_stats(&broker, <[_]>::is_empty).await;
    broker.stop().await;
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn rustls_pki_cert(pem: &str) -> tokio_rustls::rustls::pki_types::CertificateDer<'static> {
    use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("certificate PEM")
}

fn rustls_pki_key(pem: &str) -> tokio_rustls::rustls::pki_types::PrivateKeyDer<'static> {
    use tokio_rustls::rustls::pki_types::{PrivateKeyDer, pem::PemObject};
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("key PEM")
}

on_both_backends!(
    grpc_binding_delivers_payload_and_event_metadata,
    unix_binding_delivers,
    grpcs_binding_verifies_the_subscriber_certificate,
    untrusted_grpcs_subscribers_are_retried_not_called,
    webhooks_get_signed_cloud_events,
    a_wrongly_signed_webhook_is_refused_and_retried,
    https_webhooks_trust_the_configured_roots,
    a_gone_webhook_loses_its_subscriptions,
    a_redirecting_webhook_is_retried_not_followed,
    an_address_subscribed_twice_over_gets_one_delivery,
    a_slow_subscriber_gets_each_event_once_though_its_backlog_outlasts_the_lease,
    a_subscriber_that_is_down_gets_everything_when_it_comes_back,
    a_hanging_subscriber_does_not_delay_the_others,
    failing_deliveries_are_dead_lettered_and_can_be_retried,
    transient_and_persistent_subscribers_are_both_reached,
    every_operation_but_the_excluded_ones_reaches_the_subscriber,
    a_full_dispatcher_leaves_deliveries_to_the_queue,
);

/// A real refusal by PostgreSQL (a trigger rejecting one event id) while many
/// publishers fire at once, so that their events share commits: only the refused
/// event's publisher gets an error, and every other event is delivered.
#[tokio::test]
async fn an_event_the_database_refuses_fails_only_its_own_publisher() {
    let (store, broker) = broker_on(Backend::Postgres).await;
    let receiver = Receiver::grpc().await;
    broker.persist(&receiver.address, ORDERS, "").await;
    let pool = sqlx::PgPool::connect(&store.url()).await.expect("connect");
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.id = 'poison' THEN RAISE EXCEPTION 'this event is refused'; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_poison BEFORE INSERT ON events
             FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
    )
    .execute(&pool)
    .await
    .expect("trigger");
    pool.close().await;

    let publisher = broker.publisher().await;
    let calls = (0..200).map(|i| {
        let mut publisher = publisher.clone();
        let mut request = order_event("Placed", &order(&i.to_string(), 1));
        request.event.as_mut().expect("event").id = if i == 100 {
            "poison".to_owned()
        } else {
            format!("event-{i}")
        };
        async move { (i, publisher.fire_event(request).await) }
    });
    let mut accepted = std::collections::HashSet::new();
    for (i, result) in futures::future::join_all(calls).await {
        match result {
            Ok(_) => {
                assert_ne!(i, 100, "the refused event was acknowledged");
                accepted.insert(format!("event-{i}"));
            }
            Err(status) => {
                assert_eq!(i, 100, "event {i} failed with the refused one: {status}");
                assert_eq!(status.code(), tonic::Code::Unavailable);
                assert!(status.message().contains("refused"), "{status}");
            }
        }
    }
    assert_eq!(accepted.len(), 199);
    let received: std::collections::HashSet<String> = receiver
        .wait_for(199)
        .await
        .into_iter()
        .map(|r| r.event_id)
        .collect();
    assert_eq!(received, accepted);
    broker.stop().await;
}

/// A subscription removed behind the broker's back (here by hand, as another
/// node's unsubscribe can be before its notification arrives) is skipped, and
/// FireEvent counts only the deliveries it stored.
#[tokio::test]
async fn fire_counts_only_the_deliveries_it_stored() {
    let (store, broker) = broker_on(Backend::Postgres).await;
    let kept = Receiver::grpc().await;
    let removed = Receiver::grpc().await;
    broker.persist(&kept.address, ORDERS, "").await;
    broker.persist(&removed.address, ORDERS, "").await;
    let pool = sqlx::PgPool::connect(&store.url()).await.expect("connect");
    sqlx::query("DELETE FROM subscriptions WHERE address = $1")
        .bind(&removed.address)
        .execute(&pool)
        .await
        .expect("delete");
    pool.close().await;
    let answer = fire(&mut broker.publisher().await, "Placed", &order("c", 1)).await;
    assert_eq!(answer.persistent_subscribers, 1);
    assert_eq!(kept.wait_for(1).await[0].event_id, answer.event_id);
    wait_for_stats(&broker, <[_]>::is_empty).await;
    assert!(removed.received().is_empty());
    broker.stop().await;
}

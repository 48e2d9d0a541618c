//! The store conformance suite: every test runs against PostgreSQL and SQLite,
//! through the one `Store` trait the broker uses.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

use herald::{
    broker::{Event, SharedEvent},
    store::{
        Claim, EnqueueItem, EnqueueOptions, Settlement, Store, SubscribeRequest, Subscription,
        Target, now_micros,
    },
};

use crate::support::persistent::{Backend, TestStore};

const SECOND: i64 = 1_000_000;

async fn open(backend: Backend) -> (TestStore, Arc<dyn Store>) {
    let test_store = TestStore::new(backend).await;
    let store = herald::store::open(&test_store.location)
        .await
        .expect("open");
    (test_store, store)
}

fn request(address: &str, contract: &str, operation: &str) -> SubscribeRequest {
    SubscribeRequest {
        address: address.to_owned(),
        contract: contract.to_owned(),
        operation: operation.to_owned(),
        secret: None,
    }
}

fn summary(subscriptions: &[Subscription]) -> Vec<(String, String, String, Vec<String>)> {
    subscriptions
        .iter()
        .map(|s| {
            (
                s.address.clone(),
                s.contract.clone(),
                s.operation.clone(),
                s.excluded_operations.clone(),
            )
        })
        .collect()
}

fn row(
    address: &str,
    contract: &str,
    operation: &str,
    excluded: &[&str],
) -> (String, String, String, Vec<String>) {
    (
        address.to_owned(),
        contract.to_owned(),
        operation.to_owned(),
        excluded.iter().map(|s| s.to_string()).collect(),
    )
}

fn event(id: &str, operation: &str) -> Arc<SharedEvent> {
    Arc::new(SharedEvent::new(Event {
        id: id.to_owned(),
        contract: "c".to_owned(),
        operation: operation.to_owned(),
        payload: vec![1, 2, 3].into(),
        time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        attributes: BTreeMap::from([("k".to_owned(), "v".to_owned())]),
        source: "test".to_owned(),
    }))
}

/// Subscribes `address` to every operation of "c" and queues `ids` for it.
async fn queue(store: &dyn Store, address: &str, ids: &[&str]) -> i64 {
    store
        .subscribe(&request(address, "c", ""))
        .await
        .expect("subscribe");
    let subscription = store
        .subscriptions()
        .await
        .expect("list")
        .into_iter()
        .find(|s| s.address == address)
        .expect("subscribed");
    let batch: Vec<_> = ids
        .iter()
        .map(|id| EnqueueItem {
            event: event(id, "Op"),
            targets: vec![Target {
                subscription_id: subscription.id,
                address: address.to_owned(),
                secret: None,
            }],
            claimed: false,
        })
        .collect();
    store.enqueue(&batch, &options("n")).await.expect("enqueue");
    subscription.id
}

fn options(node: &str) -> EnqueueOptions {
    EnqueueOptions {
        now: now_micros(),
        node: node.to_owned(),
        lease: Duration::from_secs(10),
    }
}

fn claim(node: &str, limit: usize, now: i64) -> Claim {
    Claim {
        node: node.to_owned(),
        limit,
        now,
        lease: Duration::from_secs(10),
        skip_addresses: Vec::new(),
    }
}

async fn subscribing_is_idempotent_and_lists_in_order(store: Arc<dyn Store>) {
    store
        .subscribe(&request("b", "c", "X"))
        .await
        .expect("subscribe");
    store
        .subscribe(&request("a", "c", "Y"))
        .await
        .expect("subscribe");
    store
        .subscribe(&request("a", "c", "Y"))
        .await
        .expect("subscribe again");
    store
        .subscribe(&request("a", "d", ""))
        .await
        .expect("subscribe");
    let all = store.subscriptions().await.expect("list");
    assert_eq!(
        summary(&all),
        vec![
            row("a", "c", "Y", &[]),
            row("a", "d", "", &[]),
            row("b", "c", "X", &[])
        ]
    );
    assert!(all.iter().all(|s| s.id > 0 && s.created_at > 0));
}

async fn every_operation_with_exclusions(store: Arc<dyn Store>) {
    store.subscribe(&request("a", "c", "")).await.expect("all");
    store.unsubscribe("a", "c", "X").await.expect("exclude X");
    store.unsubscribe("a", "c", "Y").await.expect("exclude Y");
    let all = store.subscriptions().await.expect("list");
    assert_eq!(summary(&all), vec![row("a", "c", "", &["X", "Y"])]);
    assert!(!all[0].matches("X") && all[0].matches("Z"));

    store
        .subscribe(&request("a", "c", "X"))
        .await
        .expect("lift X");
    assert_eq!(
        summary(&store.subscriptions().await.expect("list")),
        vec![row("a", "c", "", &["Y"])]
    );

    store
        .subscribe(&request("a", "c", ""))
        .await
        .expect("all again lifts every exclusion");
    assert_eq!(
        summary(&store.subscriptions().await.expect("list")),
        vec![row("a", "c", "", &[])]
    );

    store
        .subscribe(&request("a", "c", "Z"))
        .await
        .expect("explicit under all");
    store
        .unsubscribe("a", "c", "")
        .await
        .expect("remove the contract");
    assert!(store.subscriptions().await.expect("list").is_empty());

    // Unsubscribing from what is not subscribed changes nothing.
    store.unsubscribe("a", "c", "X").await.expect("no-op");
    assert!(store.subscriptions().await.expect("list").is_empty());
}

async fn secrets_are_kept_and_replaced(store: Arc<dyn Store>) {
    let mut with_secret = request("http://h/", "c", "");
    with_secret.secret = Some("whsec_one".to_owned());
    store.subscribe(&with_secret).await.expect("subscribe");
    store
        .subscribe(&request("http://h/", "c", ""))
        .await
        .expect("again without a secret");
    let secret = |all: Vec<Subscription>| all[0].secret.clone();
    assert_eq!(
        secret(store.subscriptions().await.expect("list")),
        Some("whsec_one".into())
    );
    with_secret.secret = Some("whsec_two".to_owned());
    store.subscribe(&with_secret).await.expect("replace");
    assert_eq!(
        secret(store.subscriptions().await.expect("list")),
        Some("whsec_two".into())
    );
}

async fn queued_events_are_claimed_with_their_payload_once(store: Arc<dyn Store>) {
    queue(store.as_ref(), "grpc://a:1", &["e1", "e2", "e3"]).await;
    let now = now_micros() + SECOND;
    let first = store.claim(&claim("n1", 2, now)).await.expect("claim");
    assert_eq!(first.len(), 2);
    assert_eq!(first[0].event.event().id, "e1");
    assert_eq!(first[0].event.event().payload.as_ref(), &[1, 2, 3]);
    assert_eq!(
        first[0]
            .event
            .event()
            .attributes
            .get("k")
            .map(String::as_str),
        Some("v")
    );
    assert_eq!(
        first[0].event.event().time,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    );
    assert_eq!(first[0].event.event().source, "test");
    assert_eq!(first[0].attempts, 1);
    assert_eq!(first[0].address, "grpc://a:1");
    let second = store.claim(&claim("n2", 10, now)).await.expect("claim");
    assert_eq!(second.len(), 1, "claimed rows are not claimed again");
    assert_eq!(second[0].event.event().id, "e3");
    assert!(
        store
            .claim(&claim("n2", 10, now))
            .await
            .expect("claim")
            .is_empty()
    );

    // Once the lease ends, another node may take the rows over.
    let later = now + 11 * SECOND;
    let taken_over = store.claim(&claim("n2", 10, later)).await.expect("claim");
    assert_eq!(taken_over.len(), 3);
    assert!(taken_over.iter().all(|d| d.attempts == 2));
}

async fn settlements_delete_reschedule_and_dead_letter(store: Arc<dyn Store>) {
    queue(store.as_ref(), "grpc://a:1", &["e1", "e2", "e3", "e4"]).await;
    let now = now_micros() + SECOND;
    let claimed = store.claim(&claim("n", 10, now)).await.expect("claim");
    let ids: Vec<i64> = claimed.iter().map(|d| d.id).collect();
    store
        .settle(&[
            Settlement::Delivered { id: ids[0] },
            Settlement::Retry {
                id: ids[1],
                at: now + 60 * SECOND,
                error: "refused".into(),
            },
            Settlement::Dead {
                id: ids[2],
                error: "gave up".into(),
            },
            Settlement::Release {
                id: ids[3],
                at: now,
            },
        ])
        .await
        .expect("settle");
    let stats = store.delivery_stats().await.expect("stats");
    assert_eq!(stats.len(), 1);
    assert_eq!(
        (stats[0].pending, stats[0].inflight, stats[0].dead),
        (2, 0, 1)
    );
    assert!(stats[0].last_error.is_some());
    assert!(stats[0].oldest_undelivered.is_some());

    // The released one is due now and its attempt was not counted; the retried
    // one is not due before its time.
    let due = store.claim(&claim("n", 10, now)).await.expect("claim");
    assert_eq!(due.len(), 1);
    assert_eq!(
        (due[0].event.event().id.as_str(), due[0].attempts),
        ("e4", 1)
    );
    store
        .settle(&[Settlement::Delivered { id: due[0].id }])
        .await
        .expect("settle");
    let retried = store
        .claim(&claim("n", 10, now + 61 * SECOND))
        .await
        .expect("claim");
    assert_eq!(
        (
            retried.len(),
            retried[0].event.event().id.as_str(),
            retried[0].attempts
        ),
        (1, "e2", 2)
    );
    store
        .settle(&[Settlement::Delivered { id: retried[0].id }])
        .await
        .expect("settle");

    // Dead letters come back on request, with their attempts reset and their age
    // counted from the retry, so that one that died of age gets a full new round.
    let later = now + 48 * 3600 * SECOND;
    assert_eq!(
        store
            .retry_dead(Some("grpc://other:1"), later)
            .await
            .expect("retry"),
        0
    );
    assert_eq!(
        store
            .retry_dead(Some("grpc://a:1"), later)
            .await
            .expect("retry"),
        1
    );
    let revived = store
        .claim(&claim("n", 10, later + SECOND))
        .await
        .expect("claim");
    assert_eq!(
        (
            revived.len(),
            revived[0].event.event().id.as_str(),
            revived[0].attempts,
            revived[0].created_at
        ),
        (1, "e3", 1, later)
    );
}

async fn delivered_events_are_purged(store: Arc<dyn Store>) {
    queue(store.as_ref(), "grpc://a:1", &["e1", "e2"]).await;
    let now = now_micros() + SECOND;
    let claimed = store.claim(&claim("n", 1, now)).await.expect("claim");
    store
        .settle(&[Settlement::Delivered { id: claimed[0].id }])
        .await
        .expect("settle");
    assert_eq!(store.purge_delivered_events().await.expect("purge"), 1);
    assert_eq!(store.purge_delivered_events().await.expect("purge"), 0);
    assert_eq!(
        store.claim(&claim("n", 10, now)).await.expect("claim")[0]
            .event
            .event()
            .id,
        "e2"
    );
}

async fn a_restarted_node_takes_its_claims_back(store: Arc<dyn Store>) {
    queue(store.as_ref(), "grpc://a:1", &["e1", "e2"]).await;
    let now = now_micros() + SECOND;
    assert_eq!(
        store
            .claim(&claim("crashed", 1, now))
            .await
            .expect("claim")
            .len(),
        1
    );
    assert_eq!(
        store
            .claim(&claim("other", 1, now))
            .await
            .expect("claim")
            .len(),
        1
    );
    assert_eq!(store.release_claims("crashed").await.expect("release"), 1);
    let again = store
        .claim(&claim("crashed", 10, now))
        .await
        .expect("claim");
    assert_eq!(again.len(), 1, "only the crashed node's claim came back");
}

async fn busy_addresses_are_skipped(store: Arc<dyn Store>) {
    queue(store.as_ref(), "grpc://busy:1", &["b1"]).await;
    queue(store.as_ref(), "grpc://free:1", &["f1"]).await;
    let mut request = claim("n", 10, now_micros() + SECOND);
    request.skip_addresses = vec!["grpc://busy:1".to_owned()];
    let claimed = store.claim(&request).await.expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].address, "grpc://free:1");
}

async fn unsubscribing_removes_pending_deliveries(store: Arc<dyn Store>) {
    queue(store.as_ref(), "grpc://a:1", &["e1"]).await;
    queue(store.as_ref(), "grpc://b:1", &["e2"]).await;
    store
        .unsubscribe("grpc://a:1", "c", "")
        .await
        .expect("unsubscribe");
    assert_eq!(store.remove_address("grpc://b:1").await.expect("remove"), 1);
    assert!(
        store
            .claim(&claim("n", 10, now_micros() + SECOND))
            .await
            .expect("claim")
            .is_empty()
    );
    assert!(store.delivery_stats().await.expect("stats").is_empty());
}

async fn concurrent_claims_never_share_a_delivery(store: Arc<dyn Store>) {
    let ids: Vec<String> = (0..200).map(|i| format!("e{i}")).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    queue(store.as_ref(), "grpc://a:1", &id_refs).await;
    let now = now_micros() + SECOND;
    let claimers = (0..4).map(|n| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let batch = store
                    .claim(&claim(&format!("n{n}"), 7, now))
                    .await
                    .expect("claim");
                if batch.is_empty() {
                    return mine;
                }
                mine.extend(batch.into_iter().map(|d| d.id));
            }
        })
    });
    let mut seen = HashSet::new();
    for claimer in claimers {
        for id in claimer.await.expect("claimer") {
            assert!(seen.insert(id), "delivery {id} was claimed twice");
        }
    }
    assert_eq!(seen.len(), 200);
}

async fn a_subscription_removed_meanwhile_gets_no_delivery_and_fails_nothing(
    store: Arc<dyn Store>,
) {
    let stale = queue(store.as_ref(), "grpc://gone:1", &[]).await;
    let live = queue(store.as_ref(), "grpc://live:1", &[]).await;
    store
        .unsubscribe("grpc://gone:1", "c", "")
        .await
        .expect("unsubscribe");
    // An index that has not heard of the unsubscribe still targets it.
    let targets = vec![
        Target {
            subscription_id: stale,
            address: "grpc://gone:1".to_owned(),
            secret: None,
        },
        Target {
            subscription_id: live,
            address: "grpc://live:1".to_owned(),
            secret: None,
        },
    ];
    let ids = store
        .enqueue(
            &[EnqueueItem {
                event: event("e1", "Op"),
                targets,
                claimed: false,
            }],
            &options("n"),
        )
        .await
        .expect("the batch still commits");
    assert!(ids[0][0].is_none() && ids[0][1].is_some(), "{ids:?}");
    let claimed = store
        .claim(&claim("n", 10, now_micros() + SECOND))
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].address, "grpc://live:1");
}

async fn deliveries_can_be_stored_claimed_by_the_enqueuing_node(store: Arc<dyn Store>) {
    let pending = queue(store.as_ref(), "grpc://a:1", &[]).await;
    let subscription = Target {
        subscription_id: pending,
        address: "grpc://a:1".to_owned(),
        secret: None,
    };
    let item = |id: &str, claimed| EnqueueItem {
        event: event(id, "Op"),
        targets: vec![subscription.clone()],
        claimed,
    };
    let enqueued = options("writer");
    let ids = store
        .enqueue(&[item("mine", true), item("anyone", false)], &enqueued)
        .await
        .expect("enqueue");
    assert_eq!(ids.len(), 2);
    let mine = ids[0][0].expect("stored");
    // Only the pending one can be claimed; the claimed one is in flight.
    let now = now_micros() + SECOND;
    let claimed = store.claim(&claim("other", 10, now)).await.expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].event.event().id, "anyone");
    let stats = store.delivery_stats().await.expect("stats");
    assert_eq!((stats[0].pending, stats[0].inflight), (0, 2));
    // Its lease runs out like any claim's, and it counts as one attempt.
    let later = enqueued.now + 11 * SECOND;
    let taken_over = store
        .claim(&claim("other", 10, later))
        .await
        .expect("claim");
    let taken = taken_over
        .iter()
        .find(|d| d.id == mine)
        .expect("taken over");
    assert_eq!(taken.attempts, 2);
    // And a restarted writer node takes it back at once.
    let ids = store
        .enqueue(&[item("again", true)], &options("writer"))
        .await
        .expect("enqueue");
    assert_eq!(store.release_claims("writer").await.expect("release"), 1);
    let released = store
        .claim(&claim("other", 10, now_micros() + SECOND))
        .await
        .expect("claim");
    assert!(released.iter().any(|d| Some(d.id) == ids[0][0]));
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    let (_guard, store) = super::open(super::Backend::Postgres).await;
                    super::$test(store.clone()).await;
                    store.close().await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    let (_guard, store) = super::open(super::Backend::Sqlite).await;
                    super::$test(store.clone()).await;
                    store.close().await;
                }
            )*
        }
    };
}

conformance!(
    subscribing_is_idempotent_and_lists_in_order,
    every_operation_with_exclusions,
    secrets_are_kept_and_replaced,
    queued_events_are_claimed_with_their_payload_once,
    settlements_delete_reschedule_and_dead_letter,
    delivered_events_are_purged,
    a_restarted_node_takes_its_claims_back,
    busy_addresses_are_skipped,
    unsubscribing_removes_pending_deliveries,
    concurrent_claims_never_share_a_delivery,
    a_subscription_removed_meanwhile_gets_no_delivery_and_fails_nothing,
    deliveries_can_be_stored_claimed_by_the_enqueuing_node,
);

#[tokio::test]
async fn postgres_nodes_hear_of_each_others_subscription_changes() {
    use futures::StreamExt;
    let (guard, first) = open(Backend::Postgres).await;
    let second = herald::store::open(&guard.location)
        .await
        .expect("open again");
    let mut changes = second
        .changes()
        .await
        .expect("listen")
        .expect("postgres has a change feed");
    first
        .subscribe(&request("a", "c", ""))
        .await
        .expect("subscribe");
    let heard = tokio::time::timeout(Duration::from_secs(10), changes.next()).await;
    assert!(matches!(heard, Ok(Some(Ok(())))), "{heard:?}");
    first.close().await;
    second.close().await;
}

#[tokio::test]
async fn sqlite_has_no_change_feed() {
    let (_guard, store) = open(Backend::Sqlite).await;
    assert!(store.changes().await.expect("changes").is_none());
    store.close().await;
}

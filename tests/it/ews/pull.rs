//! Issue point 4: pull notifications. GetEvents with the last watermark,
//! looping at once while MoreEvents is true, the watermark stored after every
//! batch; expired or lost subscriptions resubscribe with the last watermark;
//! an invalid watermark resubscribes without one and resyncs.

use std::time::Duration;

use herald::ews::fake::FakeOptions;

use super::{
    ALICE, Ews, assert_recoveries_slow_down, drain, fast_fake, has, receive_until, requests_about,
};
use crate::support::PATIENCE;

/// Pull mode, polling every second.
const PULL_EVERY_SECOND: &str = "mode = \"pull\"\n[pull]\ninterval_seconds = 1\n";

fn batches_of_two() -> FakeOptions {
    FakeOptions {
        pull_batch: 2,
        ..fast_fake()
    }
}

#[tokio::test]
async fn more_events_are_read_at_once_and_the_watermark_is_stored() {
    let mut ews = Ews::with_fake(batches_of_two()).await;
    let mut subscriber = ews.subscriber().await;
    // An hour between polls: only the MoreEvents loop can read the backlog.
    let config = "mode = \"pull\"\n[pull]\ninterval_seconds = 3600\n";
    ews.start_adapter(&[ALICE], config).await;
    ews.wait_ready(&[ALICE]).await;
    assert!(
        ews.fake
            .wait_until(PATIENCE, |f| f.count("GetEvents") >= 1)
            .await
    );
    ews.stop_adapter().await;
    let stored = ews
        .store()
        .await
        .subscription(ALICE)
        .await
        .unwrap()
        .expect("a stored subscription");
    let watermark = stored.watermark.expect("a stored watermark");

    let mails: Vec<String> = (0..3)
        .map(|i| {
            ews.fake
                .deliver_mail(ALICE, &format!("m{i}"), "x@y.example")
        })
        .collect();
    ews.start_adapter(&[ALICE], config).await;
    let events = receive_until(&mut subscriber, |e| {
        mails.iter().all(|m| has(e, "NewMail", m))
    })
    .await;
    let resubscribe = ews.requests_of("Subscribe").into_iter().nth(1).unwrap();
    assert_eq!(
        resubscribe.watermark.as_deref(),
        Some(watermark.as_str()),
        "resubscribed from the stored watermark"
    );
    let new_mail = events.iter().filter(|(op, _)| op == "NewMail");
    assert!(
        new_mail
            .clone()
            .all(|(_, e)| !e.watermark.is_empty() && !e.recovered),
        "pull events carry their watermark"
    );
    // 9 events in batches of 2: at least 5 GetEvents without waiting an hour.
    assert!(
        ews.fake
            .wait_until(PATIENCE, |f| f.count("GetEvents") > 5)
            .await
    );
    let events = [
        events,
        drain(&mut subscriber, Duration::from_millis(300)).await,
    ]
    .concat();
    let last = events
        .iter()
        .rfind(|(_, e)| !e.watermark.is_empty())
        .unwrap()
        .1
        .watermark
        .clone();
    let stored = ews
        .store()
        .await
        .subscription(ALICE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.watermark.as_deref(),
        Some(last.as_str()),
        "the last batch's watermark is stored"
    );
    ews.stop_adapter().await;
}

#[tokio::test]
async fn idle_polls_publish_nothing() {
    let (mut ews, mut subscriber) = Ews::running(fast_fake(), &[ALICE], PULL_EVERY_SECOND).await;
    assert!(
        ews.fake
            .wait_until(PATIENCE, |f| f.count("GetEvents") >= 2)
            .await
    );
    // Each idle GetEvents answered a StatusEvent; none is published.
    subscriber.expect_silence(Duration::from_millis(300)).await;
    ews.stop_adapter().await;
}

#[tokio::test]
async fn an_expired_subscription_is_renewed_from_the_last_watermark() {
    // Timeout = 1 "minute" of 300 ms, polls every second: every poll finds
    // the subscription expired.
    let mut ews = Ews::with_fake(FakeOptions {
        minute: Duration::from_millis(300),
        ..fast_fake()
    })
    .await;
    let mut subscriber = ews.subscriber().await;
    ews.start_adapter(
        &[ALICE],
        "mode = \"pull\"\n[pull]\ninterval_seconds = 1\ntimeout_minutes = 1\n",
    )
    .await;
    ews.wait_ready(&[ALICE]).await;
    let item = ews
        .fake
        .deliver_mail(ALICE, "across an expiry", "x@y.example");
    receive_until(&mut subscriber, |e| has(e, "NewMail", &item)).await;
    assert!(
        ews.fake
            .wait_until(PATIENCE, |f| f.count("Subscribe") >= 2)
            .await,
        "renewed after ErrorExpiredSubscription"
    );
    let renewals: Vec<_> = ews.requests_of("Subscribe").into_iter().skip(1).collect();
    assert!(
        renewals.iter().all(|r| r.watermark.is_some()),
        "every renewal carries the last watermark"
    );
    ews.stop_adapter().await;
}

#[tokio::test]
async fn an_invalid_watermark_resubscribes_without_one_and_resyncs() {
    let (mut ews, mut subscriber) = Ews::running(fast_fake(), &[ALICE], PULL_EVERY_SECOND).await;
    ews.fake.expire_watermarks(ALICE);
    let item = ews
        .fake
        .deliver_mail(ALICE, "behind an expired watermark", "x@y.example");
    let events = receive_until(&mut subscriber, |e| has(e, "Created", &item)).await;
    let created = events
        .iter()
        .find(|(op, e)| op == "Created" && e.item_id == item)
        .unwrap();
    assert!(created.1.recovered, "found by the resync");
    let subscribes: Vec<_> = ews.requests_of("Subscribe").into_iter().collect();
    assert!(subscribes.len() >= 2);
    assert_eq!(
        subscribes.last().unwrap().watermark,
        None,
        "resubscribed without a watermark"
    );
    ews.stop_adapter().await;
}

#[tokio::test]
async fn subscriptions_lost_again_and_again_are_recreated_ever_more_slowly() {
    let (mut ews, _subscriber) = Ews::running(fast_fake(), &[ALICE], PULL_EVERY_SECOND).await;
    let before = requests_about(&ews, "Subscribe", ALICE);
    ews.fake.lose_new_subscriptions(ALICE);
    ews.fake.lose_subscriptions(ALICE);
    assert_recoveries_slow_down(&ews, "Subscribe", ALICE, before).await;
    ews.stop_adapter().await;
}

#[tokio::test]
async fn a_lost_subscription_is_recreated_from_the_last_watermark() {
    let (mut ews, mut subscriber) = Ews::running(fast_fake(), &[ALICE], PULL_EVERY_SECOND).await;
    assert!(
        ews.fake
            .wait_until(PATIENCE, |f| f.count("GetEvents") >= 1)
            .await
    );
    // ErrorSubscriptionNotFound from the next GetEvents on.
    ews.fake.lose_subscriptions(ALICE);
    let item = ews
        .fake
        .deliver_mail(ALICE, "while the subscription was lost", "x@y.example");
    let events = receive_until(&mut subscriber, |e| has(e, "NewMail", &item)).await;
    assert!(
        events
            .iter()
            .any(|(op, e)| op == "NewMail" && e.item_id == item && !e.recovered),
        "replayed from the watermark, not only recovered: {events:?}"
    );
    let subscribes = ews.requests_of("Subscribe");
    assert!(subscribes.len() >= 2, "resubscribed");
    assert!(subscribes[1].watermark.is_some(), "with the last watermark");
    ews.stop_adapter().await;
}

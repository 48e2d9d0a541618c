//! Issue point 3: grouped streaming subscriptions with Exchange's affinity
//! rules, an incremental parser for the chunked multi-envelope body, and the
//! reconnect rules (Closed, broken connection, silence, lost subscriptions,
//! missed events).

use std::time::Duration;

use herald::ews::fake::{Chunking, FakeOptions, StreamFault};

use super::{
    ALICE, BOB, CAROL, Ews, assert_recoveries_slow_down, fast_fake, has, receive_until,
    requests_about,
};
use crate::support::PATIENCE;

#[tokio::test]
async fn groups_share_an_anchor_the_affinity_cookie_and_one_connection() {
    let mut ews = Ews::start().await;
    let mut subscriber = ews.subscriber().await;
    ews.start_adapter(
        &[CAROL, ALICE, BOB],
        "[streaming]\ngroup_size = 2\nsilence_seconds = 2\n",
    )
    .await;
    ews.wait_ready(&[ALICE, BOB, CAROL]).await;
    assert!(
        ews.fake
            .wait_until(PATIENCE, |f| f.open_streams() == 2)
            .await,
        "two groups, two streams"
    );

    let requests = ews.fake.requests();
    let subscribes: Vec<_> = requests
        .iter()
        .filter(|r| r.operation == "Subscribe")
        .collect();
    assert_eq!(subscribes.len(), 3);
    // Group 1 = alice (anchor, alphabetically first) and bob; group 2 = carol.
    let alice = subscribes.iter().find(|r| r.mailbox == ALICE).unwrap();
    let bob = subscribes.iter().find(|r| r.mailbox == BOB).unwrap();
    assert_eq!(alice.anchor.as_deref(), Some(ALICE));
    assert_eq!(
        bob.anchor.as_deref(),
        Some(ALICE),
        "members use the group's anchor"
    );
    assert!(alice.prefer_server_affinity && bob.prefer_server_affinity);
    assert_eq!(
        alice.cookie, None,
        "the anchor subscribes first, without a cookie"
    );
    let cookie = alice
        .set_cookie
        .clone()
        .expect("the anchor's Subscribe sets X-BackEndOverrideCookie");
    assert_eq!(
        bob.cookie.as_deref(),
        Some(cookie.as_str()),
        "later Subscribes echo the cookie"
    );

    let streams: Vec<_> = requests
        .iter()
        .filter(|r| r.operation == "GetStreamingEvents")
        .collect();
    let group1 = streams
        .iter()
        .find(|r| r.anchor.as_deref() == Some(ALICE))
        .expect("a stream for alice's group");
    assert_eq!(group1.subscription_ids.len(), 2);
    assert!(group1.prefer_server_affinity);
    assert_eq!(
        group1.cookie.as_deref(),
        Some(cookie.as_str()),
        "the stream echoes the cookie"
    );
    let group2 = streams
        .iter()
        .find(|r| r.anchor.as_deref() == Some(CAROL))
        .expect("a stream for carol's group");
    assert_eq!(group2.subscription_ids.len(), 1);
    // A stream never shares its connection with ordinary calls.
    for stream in &streams {
        assert!(
            requests
                .iter()
                .filter(|r| r.operation != "GetStreamingEvents")
                .all(|r| r.peer != stream.peer),
            "a stream reused a connection of an ordinary call"
        );
    }

    let a = ews.fake.deliver_mail(ALICE, "a", "x@y.example");
    let b = ews.fake.deliver_mail(BOB, "b", "x@y.example");
    let c = ews.fake.deliver_mail(CAROL, "c", "x@y.example");
    let events = receive_until(&mut subscriber, |e| {
        has(e, "NewMail", &a) && has(e, "NewMail", &b) && has(e, "NewMail", &c)
    })
    .await;
    for (_, event) in &events {
        let owner = if event.item_id == a {
            ALICE
        } else if event.item_id == b {
            BOB
        } else if event.item_id == c {
            CAROL
        } else {
            continue;
        };
        assert_eq!(event.mailbox, owner);
    }
    assert_eq!(
        ews.fake.most_notifications_per_envelope(),
        2,
        "alice's and bob's notifications shared an envelope"
    );
    ews.stop_adapter().await;
    // A graceful stop unsubscribes.
    assert_eq!(ews.fake.count("Unsubscribe"), 3);
}

#[tokio::test]
async fn closed_reopens_at_once_with_the_same_ids_and_no_catch_up() {
    let mut ews = Ews::with_fake(FakeOptions {
        minute: Duration::from_millis(400),
        ..fast_fake()
    })
    .await;
    let mut subscriber = ews.subscriber().await;
    ews.start_adapter(
        &[ALICE],
        "[streaming]\nconnection_timeout_minutes = 1\nsilence_seconds = 2\n",
    )
    .await;
    ews.wait_ready(&[ALICE]).await;
    assert!(
        ews.fake
            .wait_until(PATIENCE, |f| f.count("GetStreamingEvents") >= 3)
            .await
    );

    let requests = ews.fake.requests();
    let streams: Vec<_> = requests
        .iter()
        .filter(|r| r.operation == "GetStreamingEvents")
        .collect();
    assert!(
        streams
            .windows(2)
            .all(|w| w[0].subscription_ids == w[1].subscription_ids),
        "the same ids every time"
    );
    assert_eq!(
        ews.fake.count("Subscribe"),
        1,
        "Closed does not resubscribe"
    );
    assert_eq!(
        ews.fake.count("SyncFolderItems"),
        1,
        "Closed is not a gap: only the baseline ran"
    );

    let item = ews
        .fake
        .deliver_mail(ALICE, "after reconnects", "x@y.example");
    receive_until(&mut subscriber, |e| has(e, "NewMail", &item)).await;
    ews.stop_adapter().await;
}

#[tokio::test]
async fn envelopes_split_into_single_bytes_or_packed_together_are_parsed() {
    for chunking in [Chunking::Split(1), Chunking::Split(7), Chunking::Pack] {
        let mut ews = Ews::start().await;
        ews.fake.set_chunking(chunking);
        let mut subscriber = ews.subscriber().await;
        ews.start_adapter(&[ALICE, BOB], "").await;
        ews.wait_ready(&[ALICE, BOB]).await;
        let a = ews.fake.deliver_mail(ALICE, "split", "x@y.example");
        let b = ews.fake.deliver_mail(BOB, "split", "x@y.example");
        let events = receive_until(&mut subscriber, |e| {
            has(e, "NewMail", &a) && has(e, "NewMail", &b)
        })
        .await;
        assert!(
            events.iter().all(|(_, e)| !e.recovered),
            "{chunking:?}: nothing needed recovering"
        );
        ews.stop_adapter().await;
        assert_eq!(
            ews.fake.count("GetStreamingEvents"),
            1,
            "{chunking:?}: one stream was enough"
        );
    }
}

#[tokio::test]
async fn a_silent_stream_is_abandoned_and_what_happened_meanwhile_arrives_once() {
    let mut ews = Ews::start().await;
    ews.fake.next_stream(StreamFault::StallAfter(1));
    let mut subscriber = ews.subscriber().await;
    ews.start_adapter(&[ALICE], "[streaming]\nsilence_seconds = 1\n")
        .await;
    ews.wait_ready(&[ALICE]).await;

    // Delivered while the first stream is stalled (no keep-alives either).
    let item = ews
        .fake
        .deliver_mail(ALICE, "during the stall", "x@y.example");
    let mut events = receive_until(&mut subscriber, |e| {
        has(e, "NewMail", &item)
            && has(e, "Created", &item)
            && e.iter()
                .any(|(op, ev)| op == "Modified" && !ev.folder_id.is_empty())
    })
    .await;
    assert!(
        ews.fake.count("GetStreamingEvents") >= 2,
        "the adapter reconnected"
    );
    assert!(
        ews.fake
            .wait_until(PATIENCE, |f| f.count("SyncFolderItems") >= 2)
            .await,
        "a reconnect after an error is a gap: it catches up"
    );
    while let Some(herald::pb::v1::subscription_message::Message::Event(event)) =
        subscriber.next_within(Duration::from_millis(500)).await
    {
        events.push((event.operation.clone(), super::mailbox_event(&event)));
    }
    let created = events
        .iter()
        .filter(|(op, e)| op == "Created" && e.item_id == item)
        .count();
    assert_eq!(
        created, 1,
        "published once, whether by the stream or the catch-up: {events:?}"
    );
    ews.stop_adapter().await;
}

#[tokio::test]
async fn garbage_truncated_and_reset_streams_are_survived() {
    let mut ews = Ews::start().await;
    ews.fake.next_stream(StreamFault::GarbageAfter(1));
    ews.fake.next_stream(StreamFault::TruncateAfter(1));
    ews.fake.next_stream(StreamFault::ResetAfter(1));
    ews.fake.next_stream(StreamFault::DropAfter(1));
    let mut subscriber = ews.subscriber().await;
    ews.start_adapter(&[ALICE], "").await;
    ews.wait_ready(&[ALICE]).await;
    assert!(
        ews.fake
            .wait_until(PATIENCE, |f| f.count("GetStreamingEvents") >= 5)
            .await,
        "reconnected after each fault"
    );
    let item = ews
        .fake
        .deliver_mail(ALICE, "after the faults", "x@y.example");
    receive_until(&mut subscriber, |e| has(e, "NewMail", &item)).await;
    ews.stop_adapter().await;
}

#[tokio::test]
async fn a_lost_subscription_is_recreated_and_its_gap_recovered() {
    let (mut ews, mut subscriber) = Ews::running(fast_fake(), &[ALICE, BOB], "").await;
    let old = ews.fake.live_subscriptions(ALICE);

    ews.fake.lose_subscriptions(ALICE);
    let lost = ews
        .fake
        .deliver_mail(ALICE, "while the subscription was lost", "x@y.example");
    let events = receive_until(&mut subscriber, |e| {
        e.iter()
            .any(|(op, ev)| op == "Created" && ev.item_id == lost && ev.recovered)
    })
    .await;
    assert!(
        !events
            .iter()
            .any(|(op, e)| op == "NewMail" && e.item_id == lost),
        "the lost subscription delivered nothing"
    );
    let new = ews.fake.live_subscriptions(ALICE);
    assert_eq!(new.len(), 1);
    assert_ne!(new, old, "a new subscription");
    assert_eq!(
        ews.fake
            .requests()
            .iter()
            .filter(|r| r.operation == "Subscribe" && r.mailbox == BOB)
            .count(),
        1,
        "bob kept his"
    );

    let after = ews.fake.deliver_mail(ALICE, "after", "x@y.example");
    let from_bob = ews.fake.deliver_mail(BOB, "bob", "x@y.example");
    receive_until(&mut subscriber, |e| {
        has(e, "NewMail", &after) && has(e, "NewMail", &from_bob)
    })
    .await;
    ews.stop_adapter().await;
}

#[tokio::test]
async fn missed_events_keep_the_subscription_and_resync() {
    let (mut ews, mut subscriber) = Ews::running(fast_fake(), &[ALICE], "").await;

    let missed = ews
        .fake
        .deliver_mail(ALICE, "missed by the subscription", "x@y.example");
    ews.fake.miss_events(ALICE);
    let events = receive_until(&mut subscriber, |e| {
        e.iter()
            .any(|(op, ev)| op == "Created" && ev.item_id == missed)
    })
    .await;
    let created = events
        .iter()
        .find(|(op, e)| op == "Created" && e.item_id == missed)
        .unwrap();
    assert!(
        created.1.recovered,
        "found by SyncFolderItems, marked recovered"
    );
    assert_eq!(created.1.subject.as_deref(), None);
    assert_eq!(
        ews.fake.count("Subscribe"),
        1,
        "ErrorMissedNotificationEvents keeps the subscription"
    );
    ews.stop_adapter().await;
}

#[tokio::test]
async fn a_stream_closed_by_the_adapter_is_a_gap_for_every_member() {
    let (mut ews, mut subscriber) = Ews::running(fast_fake(), &[ALICE, BOB], "").await;
    // One round: alice's subscription is reported lost (ConnectionStatus OK)
    // ahead of bob's notification. The adapter closes the stream to
    // resubscribe alice, and bob's notification, sent but not read, is gone.
    ews.fake.hold_streams();
    ews.fake.lose_subscriptions(ALICE);
    let item = ews
        .fake
        .deliver_mail(BOB, "behind alice's error", "x@y.example");
    ews.fake.release_streams();
    let events = receive_until(&mut subscriber, |e| has(e, "Created", &item)).await;
    assert!(
        events
            .iter()
            .any(|(op, e)| op == "Created" && e.item_id == item && e.recovered),
        "recovered by bob's catch-up: {events:?}"
    );
    ews.stop_adapter().await;
}

#[tokio::test]
async fn subscriptions_lost_again_and_again_are_recreated_ever_more_slowly() {
    // Alone, the whole GetStreamingEvents request fails; beside bob, only
    // alice's id does, and bob goes on.
    for group in [&[ALICE][..], &[ALICE, BOB]] {
        let (mut ews, mut subscriber) = Ews::running(fast_fake(), group, "").await;
        let before = requests_about(&ews, "Subscribe", ALICE);
        ews.fake.lose_new_subscriptions(ALICE);
        ews.fake.lose_subscriptions(ALICE);
        assert_recoveries_slow_down(&ews, "Subscribe", ALICE, before).await;
        if group.contains(&BOB) {
            let item = ews.fake.deliver_mail(BOB, "bob goes on", "x@y.example");
            receive_until(&mut subscriber, |e| has(e, "NewMail", &item)).await;
        }
        ews.stop_adapter().await;
    }
}

#[tokio::test]
async fn streams_taken_over_again_and_again_are_reopened_ever_more_slowly() {
    let (mut ews, _subscriber) = Ews::running(fast_fake(), &[ALICE], "").await;
    assert!(
        ews.fake
            .wait_until(PATIENCE, |f| f.open_streams() == 1)
            .await
    );
    let before = requests_about(&ews, "GetStreamingEvents", ALICE);
    ews.fake.take_over_streams(ALICE);
    assert_recoveries_slow_down(&ews, "GetStreamingEvents", ALICE, before).await;
    ews.stop_adapter().await;
}

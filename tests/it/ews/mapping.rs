//! Issue point 2: every EWS event becomes one FireEvent named after its type,
//! with the payload fields filled in; fetched properties come from one
//! batched GetItem per notification; a vanished item is published without them.

use herald::pb::ews::EventType;

use super::{ALICE, Ews, drain, fast_fake, has, receive, receive_until};

#[tokio::test]
async fn new_mail_is_three_events_with_fetched_properties() {
    let mut ews = Ews::start().await;
    let mut subscriber = ews.subscriber().await;
    ews.start_adapter(
        &[ALICE],
        "fetch = [\"Subject\", \"From\", \"DateTimeReceived\"]",
    )
    .await;
    ews.wait_ready(&[ALICE]).await;
    let get_items_before = ews.fake.count("GetItem");

    let item = ews
        .fake
        .deliver_mail(ALICE, "Quarterly <report> & more", "ada@lovelace.example");
    let events = receive(&mut subscriber, 3).await;
    let operations: Vec<&str> = events.iter().map(|(op, _)| op.as_str()).collect();
    assert_eq!(operations, ["Created", "NewMail", "Modified"]);

    let (_, new_mail) = &events[1];
    assert_eq!(new_mail.mailbox, ALICE);
    assert_eq!(new_mail.event_type, EventType::NewMail as i32);
    assert_eq!(new_mail.item_id, item);
    assert_eq!(
        Some(new_mail.change_key.clone()),
        ews.fake.change_key(ALICE, &item)
    );
    assert!(!new_mail.parent_folder_id.is_empty());
    assert!(new_mail.timestamp.is_some());
    assert_eq!(
        new_mail.watermark, "",
        "streaming events carry no watermark"
    );
    assert_eq!(
        new_mail.subject.as_deref(),
        Some("Quarterly <report> & more")
    );
    assert_eq!(
        new_mail.sender_address.as_deref(),
        Some("ada@lovelace.example")
    );
    assert_eq!(new_mail.sender_name.as_deref(), Some("ada"));
    assert!(new_mail.received_time.is_some());
    assert!(!new_mail.recovered);

    let (_, folder) = &events[2];
    assert!(folder.item_id.is_empty() && !folder.folder_id.is_empty());
    assert_eq!(folder.unread_count, Some(1));

    // Created and NewMail of one notification: one GetItem, not one per event.
    assert_eq!(ews.fake.count("GetItem") - get_items_before, 1);
    let get_item = ews
        .fake
        .requests()
        .into_iter()
        .rfind(|r| r.operation == "GetItem")
        .unwrap();
    assert_eq!(get_item.mailbox, ALICE, "GetItem impersonates the mailbox");
    assert_eq!(get_item.anchor.as_deref(), Some(ALICE));
    ews.stop_adapter().await;
}

#[tokio::test]
async fn a_vanished_item_is_published_without_properties() {
    let (mut ews, mut subscriber) =
        Ews::running(fast_fake(), &[ALICE], "fetch = [\"Subject\"]").await;

    let item = ews.fake.deliver_vanishing_mail(ALICE, "free/busy temp");
    let events = receive(&mut subscriber, 3).await;
    assert!(has(&events, "NewMail", &item));
    for (_, event) in &events {
        assert_eq!(
            event.subject, None,
            "no properties for an item that is gone"
        );
    }
    ews.stop_adapter().await;
}

#[tokio::test]
async fn moves_copies_deletes_and_free_busy_are_mapped() {
    let mut ews = Ews::start().await;
    let mut subscriber = ews.subscriber().await;
    ews.start_adapter(
        &[ALICE],
        "folders = [\"inbox\", \"deleteditems\", \"drafts\", \"calendar\"]",
    )
    .await;
    ews.wait_ready(&[ALICE]).await;

    let item = ews.fake.deliver_mail(ALICE, "to be moved", "x@y.example");
    receive(&mut subscriber, 3).await;
    let copy = ews.fake.copy_item(ALICE, &item, "drafts").unwrap();
    let moved = ews.fake.delete_item(ALICE, &item).unwrap();
    ews.fake.hard_delete(ALICE, &copy);
    ews.fake.free_busy_changed(ALICE);

    let events = receive_until(&mut subscriber, |e| {
        e.iter().any(|(op, _)| op == "FreeBusyChanged")
    })
    .await;
    let copied = events
        .iter()
        .find(|(op, _)| op == "Copied")
        .expect("a Copied event")
        .1
        .clone();
    assert_eq!(copied.item_id, copy);
    assert_eq!(copied.old_item_id, item);
    assert!(
        !copied.old_parent_folder_id.is_empty()
            && copied.old_parent_folder_id != copied.parent_folder_id
    );
    let move_event = events
        .iter()
        .find(|(op, _)| op == "Moved")
        .expect("a Moved event")
        .1
        .clone();
    assert_eq!(move_event.item_id, moved);
    assert_eq!(move_event.old_item_id, item);
    assert_eq!(move_event.event_type, EventType::Moved as i32);
    assert!(has(&events, "Deleted", &copy));
    ews.stop_adapter().await;
}

#[tokio::test]
async fn event_types_limit_what_is_published() {
    let (mut ews, mut subscriber) =
        Ews::running(fast_fake(), &[ALICE], "event_types = [\"NewMail\"]").await;
    let subscribe = ews
        .fake
        .requests()
        .into_iter()
        .find(|r| r.operation == "Subscribe")
        .unwrap();
    assert_eq!(subscribe.mailbox, ALICE);

    let first = ews.fake.deliver_mail(ALICE, "one", "x@y.example");
    let second = ews.fake.deliver_mail(ALICE, "two", "x@y.example");
    let events = receive(&mut subscriber, 2).await;
    assert!(events.iter().all(|(op, _)| op == "NewMail"), "{events:?}");
    assert!(has(&events, "NewMail", &first) && has(&events, "NewMail", &second));
    subscriber
        .expect_silence(std::time::Duration::from_millis(300))
        .await;
    ews.stop_adapter().await;
}

#[tokio::test]
async fn all_folders_subscribes_to_every_folder_and_catches_each_up() {
    let (mut ews, mut subscriber) = Ews::running(fast_fake(), &[ALICE], "all_folders = true").await;
    assert!(
        ews.fake.count("FindFolder") >= 1,
        "the folders to sync come from FindFolder"
    );
    let item = ews.fake.deliver_mail(ALICE, "anywhere", "x@y.example");
    let copy = ews.fake.copy_item(ALICE, &item, "drafts").unwrap();
    receive_until(&mut subscriber, |e| has(e, "Copied", &copy)).await;
    drain(&mut subscriber, std::time::Duration::from_millis(300)).await;
    ews.stop_adapter().await;

    // A gap in a folder other than the inbox is recovered too.
    let second = ews.fake.copy_item(ALICE, &item, "sentitems").unwrap();
    ews.start_adapter(&[ALICE], "all_folders = true").await;
    let events = receive_until(&mut subscriber, |e| has(e, "Created", &second)).await;
    assert!(events.iter().all(|(_, e)| e.recovered), "{events:?}");
    ews.stop_adapter().await;
}

#[tokio::test]
async fn the_accounts_own_mailbox_is_watched_without_impersonation() {
    let own = "owner@fake.example";
    let mut ews = Ews::start().await;
    let mut subscriber = ews.subscriber().await;
    let text = ews.config_text(&[], &format!("account = \"{own}\""));
    ews.start_adapter_with(&text, None).await;
    ews.wait_ready(&[own]).await;
    let item = ews.fake.deliver_mail(own, "to myself", "x@y.example");
    let events = receive_until(&mut subscriber, |e| has(e, "NewMail", &item)).await;
    assert!(events.iter().all(|(_, e)| e.mailbox == own));
    let subscribe = ews.requests_of("Subscribe").remove(0);
    assert_eq!(subscribe.anchor.as_deref(), Some(own));
    assert!(
        ews.fake.requests().iter().all(|r| !r.impersonated),
        "no ExchangeImpersonation header"
    );
    ews.stop_adapter().await;
}

//! The `herald ews` binary: SIGKILL and restart loses nothing (issue point
//! 6), `herald ews status` shows each mailbox (point 8), and a bad config is
//! one clear error (point 1).

use std::{process::Stdio, time::Duration};

use tokio::process::Child;

use super::{ALICE, BOB, Ews, drain, has, receive_until};
use crate::support::{
    PATIENCE,
    process::{ServeProcess, herald, signal},
};

fn spawn_adapter(config: &std::path::Path) -> Child {
    herald()
        .args(["ews", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn herald ews")
}

async fn status_output(config: &std::path::Path) -> String {
    let output = tokio::time::timeout(
        PATIENCE,
        herald()
            .args(["ews", "status", "--config"])
            .arg(config)
            .output(),
    )
    .await
    .expect("status answers in time")
    .expect("run herald ews status");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn sigkill_and_restart_publishes_every_change_made_while_down() {
    let ews = Ews::start().await;
    let mut subscriber = ews.subscriber().await;
    let config = ews.write_config(&ews.config_text(&[ALICE, BOB], ""));
    let mut adapter = spawn_adapter(&config);
    ews.wait_ready(&[ALICE, BOB]).await;
    let before = ews
        .fake
        .deliver_mail(ALICE, "before the crash", "x@y.example");
    receive_until(&mut subscriber, |e| has(e, "NewMail", &before)).await;
    drain(&mut subscriber, Duration::from_millis(300)).await;
    let stale = ews.fake.live_subscriptions(ALICE);

    signal(&adapter, "-KILL");
    let _ = adapter.wait().await;
    let created = ews.fake.deliver_mail(ALICE, "while dead", "x@y.example");
    let for_bob = ews.fake.deliver_mail(BOB, "while dead", "x@y.example");
    ews.fake.modify_item(ALICE, &before);

    let mut adapter = spawn_adapter(&config);
    let events = receive_until(&mut subscriber, |e| {
        has(e, "Created", &created) && has(e, "Created", &for_bob) && has(e, "Modified", &before)
    })
    .await;
    assert!(events.iter().all(|(_, e)| e.recovered), "{events:?}");
    assert!(
        !has(&events, "Created", &before),
        "published before the crash: not again"
    );
    let unsubscribed = ews
        .fake
        .wait_until(PATIENCE, |f| {
            f.requests()
                .iter()
                .any(|r| r.operation == "Unsubscribe" && r.subscription_ids == stale)
        })
        .await;
    assert!(
        unsubscribed,
        "the crashed run's subscription is unsubscribed at start"
    );

    // After the catch-up, live events flow again.
    let after = ews
        .fake
        .deliver_mail(ALICE, "after the restart", "x@y.example");
    receive_until(&mut subscriber, |e| has(e, "NewMail", &after)).await;
    let shown = status_output(&config).await;
    for mailbox in [ALICE, BOB] {
        let line = shown
            .lines()
            .find(|l| l.starts_with(mailbox))
            .unwrap_or_else(|| panic!("{mailbox} in {shown}"));
        assert!(line.contains("streaming"), "{line}");
    }

    signal(&adapter, "-TERM");
    let status = tokio::time::timeout(PATIENCE, adapter.wait())
        .await
        .expect("stops on SIGTERM")
        .unwrap();
    assert!(status.success());
    let shown = status_output(&config).await;
    assert!(
        shown
            .lines()
            .filter(|l| l.contains("@"))
            .all(|l| l.contains("stopped")),
        "{shown}"
    );
}

/// Runs `herald ews` on each config and checks that it fails at once with
/// one line containing the expected text.
async fn assert_config_errors(ews: &Ews, cases: &[(String, &str)]) {
    for (text, expected) in cases {
        let config = ews.write_config(text);
        let output = tokio::time::timeout(
            PATIENCE,
            herald().args(["ews", "--config"]).arg(&config).output(),
        )
        .await
        .expect("fails fast")
        .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
}

#[tokio::test]
async fn a_bad_config_is_one_clear_error() {
    let ews = Ews::start().await;
    let cases = [
        (
            ews.config_text(&[ALICE], "mode = \"stream\""),
            "expected one of `streaming`, `pull`, `push`",
        ),
        (ews.config_text(&[ALICE], "colour = \"blue\""), "colour"),
        (
            ews.config_text(&[ALICE], "[streaming]\ngroup_size = 500\n"),
            "streaming.group_size",
        ),
        (ews.config_text(&["not-an-address"], ""), "mailboxes"),
    ];
    assert_config_errors(&ews, &cases).await;
}

#[tokio::test]
async fn a_misspelt_folder_or_a_bad_token_url_is_one_clear_error() {
    let ews = Ews::start().await;
    let oauth = |token_url: &str| {
        ews.config_text(
            &[ALICE],
            &format!(
                "[auth]\nkind = \"oauth2\"\ntoken_url = \"{token_url}\"\nclient_id = \"herald\"\nclient_secret_env = \"EWS_SECRET\"\n"
            ),
        )
    };
    let cases = [
        (
            ews.config_text(&[ALICE], "folders = [\"inbox\", \"sent items\"]"),
            "`folders` 'sent items' is not a distinguished folder id; allowed: calendar, contacts, deleteditems, drafts, inbox,",
        ),
        (
            oauth("login.example.com/token"),
            "`auth.token_url` must be an http:// or https:// URL",
        ),
        (
            oauth("https://"),
            "`auth.token_url` must be an http:// or https:// URL",
        ),
    ];
    assert_config_errors(&ews, &cases).await;
}

#[tokio::test]
async fn herald_serve_runs_the_adapter_named_in_its_config() {
    let ews = Ews::start().await;
    ews.write_config(&ews.config_text(&[ALICE], ""));
    let serve_config = ews.dir.path().join("serve.toml");
    std::fs::write(&serve_config, "ews = \"ews.toml\"\n").unwrap();
    let mut serve =
        ServeProcess::start([std::ffi::OsStr::new("--config"), serve_config.as_os_str()]).await;
    let channel = serve.channel().await;
    let mut subscriber = crate::support::TestSubscriber::connect(channel).await;
    subscriber
        .subscribe(super::CONTRACT, "")
        .await
        .expect("subscribe");

    ews.wait_ready(&[ALICE]).await;
    let item = ews
        .fake
        .deliver_mail(ALICE, "through herald serve", "x@y.example");
    receive_until(&mut subscriber, |e| has(e, "NewMail", &item)).await;

    serve.terminate();
    let status = tokio::time::timeout(PATIENCE, serve.child.wait())
        .await
        .expect("stops on SIGTERM")
        .unwrap();
    assert!(status.success());
    assert!(
        ews.fake.count("Unsubscribe") >= 1,
        "the adapter stopped gracefully with the broker"
    );
}

#[tokio::test]
async fn herald_serve_refuses_a_bad_adapter_config_before_it_listens() {
    let ews = Ews::start().await;
    ews.write_config(&ews.config_text(&[ALICE], "mode = \"stream\""));
    let serve_config = ews.dir.path().join("serve.toml");
    std::fs::write(&serve_config, "ews = \"ews.toml\"\n").unwrap();
    let database = ews.dir.path().join("herald.db");
    let output = crate::support::process::run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--config",
        &serve_config.display().to_string(),
        "--database-url",
        &database.display().to_string(),
    ])
    .await;
    assert!(!output.success);
    assert!(!output.stdout.contains("listening"), "{}", output.stdout);
    assert!(output.stderr.contains("streaming"), "{}", output.stderr);
    assert!(
        !database.exists(),
        "the store was opened for a broker that cannot start"
    );
}

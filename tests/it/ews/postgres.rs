//! The adapter's state in PostgreSQL (`state = "postgres://…"`): a private
//! server started from the local PostgreSQL binaries (installed by .ci/run),
//! stopped when the test ends.

use std::{path::PathBuf, process::Stdio, time::Duration};

use herald::ews::store::{PublishedKey, StateStore, StoredSubscription};
use tempfile::TempDir;
use tokio::process::{Child, Command};

use super::{ALICE, Ews, drain, fast_fake, has, receive_until};

/// A throwaway PostgreSQL server on 127.0.0.1.
struct PrivatePostgres {
    server: Child,
    url: String,
    _dir: TempDir,
}

/// The directory of `initdb` and `postgres`.
fn postgres_bin() -> PathBuf {
    let found = std::process::Command::new("sh")
        .args([
            "-c",
            "command -v initdb || ls /usr/lib/postgresql/*/bin/initdb",
        ])
        .output()
        .expect("run sh");
    let path = String::from_utf8_lossy(&found.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    assert!(
        !path.is_empty(),
        "PostgreSQL's server binaries are needed (apt-get install postgresql; .ci/run does it)"
    );
    std::fs::canonicalize(path)
        .expect("initdb resolves")
        .parent()
        .expect("a bin directory")
        .to_path_buf()
}

/// Runs `program` as the postgres user when we are root (PostgreSQL refuses
/// to run as root); `setpriv` execs, so killing the child kills the server.
fn as_postgres(program: PathBuf) -> Command {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if root {
        let mut command = Command::new("setpriv");
        command
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--clear-groups",
                "--",
            ])
            .arg(program);
        command
    } else {
        Command::new(program)
    }
}

impl PrivatePostgres {
    async fn start() -> Self {
        let bin = postgres_bin();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let _ = std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status();
        let data = dir.path().join("data");
        let init = as_postgres(bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .await
            .expect("run initdb");
        assert!(
            init.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            probe.local_addr().expect("its address").port()
        };
        let server = as_postgres(bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args([
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-k",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start postgres");
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if sqlx::postgres::PgPool::connect(&url).await.is_ok() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "postgres did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self {
            server,
            url,
            _dir: dir,
        }
    }

    /// A fast shutdown, so no server process outlives the test.
    async fn stop(mut self) {
        if let Some(pid) = self.server.id() {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.server.wait()).await;
    }
}

#[tokio::test]
async fn the_state_store_works_on_postgresql() {
    let postgres = PrivatePostgres::start().await;
    let store = StateStore::open(&postgres.url)
        .await
        .expect("open and migrate");
    let subscription = StoredSubscription {
        mode: "streaming".into(),
        subscription_id: "S1".into(),
        watermark: None,
        cookie: Some("MBX01~1".into()),
        anchor: Some(ALICE.into()),
    };
    store.save_subscription(ALICE, &subscription).await.unwrap();
    store.save_watermark(ALICE, "W").await.unwrap();
    let stored = store.subscription(ALICE).await.unwrap().unwrap();
    assert_eq!(stored.watermark.as_deref(), Some("W"));
    assert_eq!(stored.cookie.as_deref(), Some("MBX01~1"));
    store.save_sync_state(ALICE, "inbox", "A").await.unwrap();
    store.save_sync_state(ALICE, "inbox", "B").await.unwrap();
    assert_eq!(
        store.sync_state(ALICE, "inbox").await.unwrap().as_deref(),
        Some("B")
    );
    let key = PublishedKey {
        mailbox: ALICE.into(),
        item_id: "I".into(),
        change_key: "C".into(),
        operation: "Created".into(),
    };
    store
        .record_published(&[key.clone(), key.clone()])
        .await
        .unwrap();
    assert!(store.was_published(&key).await.unwrap());
    assert!(store.item_published(ALICE, "I").await.unwrap());
    assert_eq!(
        store.published_items(ALICE).await.unwrap(),
        vec!["I".to_owned()]
    );
    store.set_status(ALICE, "streaming", "").await.unwrap();
    assert_eq!(store.statuses().await.unwrap()[0].state, "streaming");
    store.close().await;
    // Migrating again is a no-op.
    StateStore::open(&postgres.url)
        .await
        .expect("reopen")
        .close()
        .await;
    postgres.stop().await;
}

#[tokio::test]
async fn an_adapter_with_postgresql_state_recovers_after_a_restart() {
    let postgres = PrivatePostgres::start().await;
    let extra = format!("state = \"{}\"", postgres.url);
    let (mut ews, mut subscriber) = Ews::running(fast_fake(), &[ALICE], &extra).await;
    let before = ews.fake.deliver_mail(ALICE, "before", "x@y.example");
    receive_until(&mut subscriber, |e| has(e, "NewMail", &before)).await;
    drain(&mut subscriber, Duration::from_millis(300)).await;
    ews.stop_adapter().await;
    let during = ews.fake.deliver_mail(ALICE, "while stopped", "x@y.example");
    ews.start_adapter(&[ALICE], &extra).await;
    let events = receive_until(&mut subscriber, |e| has(e, "Created", &during)).await;
    assert!(
        events
            .iter()
            .all(|(_, e)| e.recovered && e.item_id != before),
        "{events:?}"
    );
    ews.stop_adapter().await;
    postgres.stop().await;
}

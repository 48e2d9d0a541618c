//! `herald serve` settings: what a config file or the flags may say, and the
//! clear error for what they may not.

use herald::{
    config::{ConfigError, ServeFile, ServeOverrides, ServeSettings},
    store::StoreLocation,
};

fn resolve(toml: &str, flags: ServeOverrides) -> Result<ServeSettings, ConfigError> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("herald.toml");
    std::fs::write(&path, toml).expect("write config");
    ServeSettings::resolve(ServeFile::load(&path)?, flags)
}

fn error(toml: &str, flags: ServeOverrides) -> String {
    resolve(toml, flags)
        .map(|_| ())
        .expect_err("refused")
        .to_string()
}

#[test]
fn a_lease_shorter_than_twice_the_longest_call_is_refused() {
    let message = error(
        "[delivery]\nlease_seconds = 20\ncall_timeout_seconds = 10\n",
        ServeOverrides::default(),
    );
    assert!(message.contains("delivery.lease_seconds (20)"), "{message}");
    assert!(message.contains("call_timeout_seconds"), "{message}");
    let settings = resolve(
        "[delivery]\nlease_seconds = 31\ncall_timeout_seconds = 10\n",
        ServeOverrides::default(),
    )
    .expect("a lease over twice 10 s is fine");
    assert_eq!(settings.delivery.dispatcher.lease.as_secs(), 31);
}

#[test]
fn a_database_url_of_another_kind_is_refused_not_taken_for_a_file() {
    for url in ["postgress://db/herald", "mysql://db/herald"] {
        let message = error(
            "",
            ServeOverrides {
                database: Some(url.to_owned()),
                ..ServeOverrides::default()
            },
        );
        assert!(message.contains("postgres://"), "{message}");
        assert!(
            message.contains(url.split_once(':').expect("scheme").0),
            "{message}"
        );
    }
    for (text, expected) in [
        (
            "postgresql://db/herald",
            StoreLocation::Postgres("postgresql://db/herald".into()),
        ),
        (
            "sqlite:///var/lib/herald.db",
            StoreLocation::Sqlite("/var/lib/herald.db".into()),
        ),
        (
            "data/herald.db",
            StoreLocation::Sqlite("data/herald.db".into()),
        ),
    ] {
        assert_eq!(StoreLocation::parse(text).expect("accepted"), expected);
    }
}

#[test]
fn nodes_on_port_zero_get_distinct_default_ids() {
    let on = |listen: &str| {
        resolve(
            "",
            ServeOverrides {
                listen: Some(listen.parse().expect("address")),
                ..ServeOverrides::default()
            },
        )
        .expect("resolves")
        .delivery
        .dispatcher
        .node
    };
    assert!(on("127.0.0.1:50051").ends_with(":50051"));
    let ephemeral = on("127.0.0.1:0");
    assert!(
        ephemeral.ends_with(&format!(":pid{}", std::process::id())),
        "{ephemeral}"
    );
}

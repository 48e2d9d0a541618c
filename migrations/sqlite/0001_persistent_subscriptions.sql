-- Persistent subscriptions and the durable delivery queue (embedded SQLite).
-- Same shape as the PostgreSQL schema; times are Unix microseconds.

CREATE TABLE subscriptions (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    address    TEXT    NOT NULL,
    contract   TEXT    NOT NULL,
    -- '' means every operation of the contract, including ones added later.
    operation  TEXT    NOT NULL,
    secret     TEXT,
    created_at INTEGER NOT NULL,
    UNIQUE (address, contract, operation)
);

CREATE TABLE subscription_exclusions (
    address   TEXT NOT NULL,
    contract  TEXT NOT NULL,
    operation TEXT NOT NULL,
    PRIMARY KEY (address, contract, operation)
);

CREATE TABLE events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT    NOT NULL,
    contract   TEXT    NOT NULL,
    operation  TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    time       INTEGER NOT NULL,
    attributes TEXT    NOT NULL,
    source     TEXT    NOT NULL,
    fired_at   INTEGER NOT NULL
);

CREATE TABLE deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    event_seq       INTEGER NOT NULL REFERENCES events (seq) ON DELETE CASCADE,
    subscription_id INTEGER NOT NULL REFERENCES subscriptions (id) ON DELETE CASCADE,
    address         TEXT    NOT NULL,
    state           TEXT    NOT NULL CHECK (state IN ('pending', 'inflight', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_until     INTEGER,
    claimed_by      TEXT,
    last_error      TEXT,
    created_at      INTEGER NOT NULL
);

CREATE INDEX deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX deliveries_by_address ON deliveries (address, state);
CREATE INDEX deliveries_by_event ON deliveries (event_seq);
CREATE INDEX deliveries_by_subscription ON deliveries (subscription_id);

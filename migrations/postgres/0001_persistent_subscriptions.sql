-- Persistent subscriptions and the durable delivery queue (PostgreSQL).
-- Times are Unix microseconds (BIGINT) in both backends, so that the SQL and
-- the code that reads it stay the same on PostgreSQL and SQLite.

CREATE TABLE subscriptions (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    address    TEXT   NOT NULL,
    contract   TEXT   NOT NULL,
    -- '' means every operation of the contract, including ones added later.
    operation  TEXT   NOT NULL,
    -- whsec_<base64>: signs webhook deliveries (Standard Webhooks).
    secret     TEXT,
    created_at BIGINT NOT NULL,
    UNIQUE (address, contract, operation)
);

-- Operations an address unsubscribed from after subscribing to all of them.
CREATE TABLE subscription_exclusions (
    address   TEXT NOT NULL,
    contract  TEXT NOT NULL,
    operation TEXT NOT NULL,
    PRIMARY KEY (address, contract, operation)
);

CREATE TABLE events (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id         TEXT   NOT NULL,
    contract   TEXT   NOT NULL,
    operation  TEXT   NOT NULL,
    payload    BYTEA  NOT NULL,
    time       BIGINT NOT NULL,
    -- JSON object of string attributes.
    attributes TEXT   NOT NULL,
    source     TEXT   NOT NULL,
    fired_at   BIGINT NOT NULL
);

-- One row per (event, persistent subscriber) still to deliver, or dead.
-- Delivered rows are deleted.
CREATE TABLE deliveries (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_seq       BIGINT NOT NULL REFERENCES events (seq) ON DELETE CASCADE,
    subscription_id BIGINT NOT NULL REFERENCES subscriptions (id) ON DELETE CASCADE,
    address         TEXT   NOT NULL,
    state           TEXT   NOT NULL CHECK (state IN ('pending', 'inflight', 'dead')),
    attempts        INT    NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_until     BIGINT,
    claimed_by      TEXT,
    last_error      TEXT,
    created_at      BIGINT NOT NULL
);

CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX deliveries_leased ON deliveries (lease_until) WHERE state = 'inflight';
CREATE INDEX deliveries_by_address ON deliveries (address, state);
CREATE INDEX deliveries_by_event ON deliveries (event_seq);
CREATE INDEX deliveries_by_subscription ON deliveries (subscription_id);

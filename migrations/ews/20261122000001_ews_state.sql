-- The EWS adapter's durable state. Plain SQL that SQLite and PostgreSQL both
-- accept; times are milliseconds since the Unix epoch.

-- The live subscription of each mailbox (so a restart can clean it up) and,
-- for pull and push, the last watermark processed.
CREATE TABLE ews_subscription (
    mailbox TEXT PRIMARY KEY,
    mode TEXT NOT NULL,
    subscription_id TEXT NOT NULL,
    watermark TEXT,
    cookie TEXT,
    anchor TEXT,
    updated_at BIGINT NOT NULL
);

-- SyncFolderItems state per watched folder: where the next catch-up starts.
CREATE TABLE ews_sync_state (
    mailbox TEXT NOT NULL,
    folder TEXT NOT NULL,
    sync_state TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (mailbox, folder)
);

-- Item events already published, so a catch-up does not publish them again.
CREATE TABLE ews_published (
    mailbox TEXT NOT NULL,
    item_id TEXT NOT NULL,
    change_key TEXT NOT NULL,
    operation TEXT NOT NULL,
    published_at BIGINT NOT NULL,
    PRIMARY KEY (mailbox, item_id, change_key, operation)
);

CREATE INDEX ews_published_by_time ON ews_published (mailbox, published_at);

-- What each mailbox is doing, for `herald ews status`.
CREATE TABLE ews_mailbox_status (
    mailbox TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    detail TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

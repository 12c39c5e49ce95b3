-- The SQL-table broker's tables (SQLite). Writers take the write lock up
-- front (BEGIN IMMEDIATE), so seq order is commit order; xid stays 0.
-- Times are Unix seconds (REAL) from the database clock.

CREATE TABLE IF NOT EXISTS broker_topics (
    topic      TEXT PRIMARY KEY,
    partitions INTEGER NOT NULL CHECK (partitions > 0)
);

CREATE TABLE IF NOT EXISTS broker_events (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    xid           INTEGER NOT NULL DEFAULT 0,
    topic         TEXT NOT NULL,
    partition     INTEGER NOT NULL,
    partition_key TEXT,
    event_id      TEXT NOT NULL,
    payload       BLOB NOT NULL,
    published_at  REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
    dlq_reason    TEXT,
    origin_topic  TEXT,
    origin_seq    INTEGER
);
CREATE INDEX IF NOT EXISTS broker_events_read
    ON broker_events (topic, partition, seq);
CREATE UNIQUE INDEX IF NOT EXISTS broker_events_dead_letter
    ON broker_events (origin_topic, origin_seq) WHERE origin_seq IS NOT NULL;

CREATE TABLE IF NOT EXISTS broker_members (
    grp        TEXT NOT NULL,
    topic      TEXT NOT NULL,
    member     TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (grp, topic, member)
);

CREATE TABLE IF NOT EXISTS broker_partitions (
    grp              TEXT NOT NULL,
    topic            TEXT NOT NULL,
    partition        INTEGER NOT NULL,
    cursor_xid       INTEGER NOT NULL,
    cursor_seq       INTEGER NOT NULL,
    settled          TEXT NOT NULL DEFAULT '',
    owner            TEXT,
    lease_expires_at REAL,
    PRIMARY KEY (grp, topic, partition)
);

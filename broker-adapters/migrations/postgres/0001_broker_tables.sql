-- The SQL-table broker's tables (PostgreSQL).

-- One row per topic: its partition count, fixed when the topic is first used.
CREATE TABLE IF NOT EXISTS broker_topics (
    topic      TEXT PRIMARY KEY,
    partitions INTEGER NOT NULL CHECK (partitions > 0)
);

-- The log. Rows are read in commit order: ordered by (xid, seq), and only
-- once no transaction older than xid is still running.
CREATE TABLE IF NOT EXISTS broker_events (
    seq           BIGSERIAL PRIMARY KEY,
    -- pg_current_xact_id() of the inserting transaction, as a bigint.
    xid           BIGINT NOT NULL,
    topic         TEXT NOT NULL,
    partition     INTEGER NOT NULL,
    partition_key TEXT,
    event_id      TEXT NOT NULL,
    -- The event in CloudEvents structured JSON.
    payload       BYTEA NOT NULL,
    published_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Dead letters: why, and where the original row is.
    dlq_reason    TEXT,
    origin_topic  TEXT,
    origin_seq    BIGINT
);
CREATE INDEX IF NOT EXISTS broker_events_read
    ON broker_events (topic, partition, xid, seq);
CREATE UNIQUE INDEX IF NOT EXISTS broker_events_dead_letter
    ON broker_events (origin_topic, origin_seq) WHERE origin_seq IS NOT NULL;

-- Live members of each consumer group on each topic.
CREATE TABLE IF NOT EXISTS broker_members (
    grp        TEXT NOT NULL,
    topic      TEXT NOT NULL,
    member     TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (grp, topic, member)
);

-- Per (group, topic, partition): the committed cursor, the positions past it
-- already settled, and the lease of the member that owns the partition.
CREATE TABLE IF NOT EXISTS broker_partitions (
    grp              TEXT NOT NULL,
    topic            TEXT NOT NULL,
    partition        INTEGER NOT NULL,
    cursor_xid       BIGINT NOT NULL,
    cursor_seq       BIGINT NOT NULL,
    settled          TEXT NOT NULL DEFAULT '',
    owner            TEXT,
    lease_expires_at TIMESTAMPTZ,
    PRIMARY KEY (grp, topic, partition)
);

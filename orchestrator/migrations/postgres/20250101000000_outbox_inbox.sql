-- Transactional outbox: rows written in the business transaction, published by relays.
create table if not exists orchestrator_outbox (
    id bigserial primary key,
    event_id text not null,
    topic text not null,
    partition_key text,
    part integer not null,
    payload text not null,
    created_ms bigint not null,
    published_ms bigint,
    -- Set when the relay parked the row: the broker refused it for good.
    failed_ms bigint,
    last_error text
);

-- Pending rows of a partition, oldest first: what a relay reads.
create index if not exists orchestrator_outbox_pending
    on orchestrator_outbox (part, id) where published_ms is null and failed_ms is null;

-- Published rows kept for a while: what the retention purge reads.
create index if not exists orchestrator_outbox_published
    on orchestrator_outbox (published_ms) where published_ms is not null;

-- One row per outbox partition; a relay owns a partition while its lease is unexpired.
create table if not exists orchestrator_outbox_leases (
    part integer primary key,
    owner text,
    expires_ms bigint not null default 0
);

-- Relays that are alive (heartbeat unexpired): the partitions are shared among them.
create table if not exists orchestrator_outbox_relays (
    relay_id text primary key,
    expires_ms bigint not null
);

-- Inbox: one row per (consumer, event id) handled, committed with the handler's effects.
create table if not exists orchestrator_inbox (
    consumer text not null,
    event_id text not null,
    processed_ms bigint not null,
    primary key (consumer, event_id)
);

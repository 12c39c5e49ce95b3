-- Sagas: one row per saga, its state (JSON), status and single durable timer.
create table if not exists orchestrator_sagas (
    saga_id text primary key,
    saga_type text not null,
    version bigint not null,
    status text not null,
    state text not null,
    -- The due time of the saga's timer (reply timeout or backoff end), database clock.
    wake_ms bigint,
    -- A coordinator claimed the due timer until this time (database clock).
    claim_ms bigint not null default 0,
    -- The number of transitions so far (the last history row).
    seq bigint not null default 0,
    created_ms bigint not null,
    updated_ms bigint not null
);

-- Due timers, earliest first: what the coordinators poll.
create index if not exists orchestrator_sagas_wake
    on orchestrator_sagas (wake_ms) where wake_ms is not null;

-- Every transition of every saga, in order.
create table if not exists orchestrator_saga_history (
    saga_id text not null,
    seq bigint not null,
    at_ms bigint not null,
    status text not null,
    note text not null,
    primary key (saga_id, seq)
);

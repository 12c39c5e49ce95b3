-- Inbox records oldest first: what a purge reads, so that it takes the
-- oldest records without reading and sorting the whole inbox.
create index if not exists orchestrator_inbox_processed
    on orchestrator_inbox (processed_ms);

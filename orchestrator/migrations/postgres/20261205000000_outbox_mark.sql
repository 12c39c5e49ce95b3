-- Marks the published outbox rows whose ids are `ids`: deletes them, or
-- (`keep`) stamps them with the publish time. Returns how many it marked.
--
-- A function so that its plan always finds the rows through the primary
-- key. The outbox is a queue table: its dead rows pile up between vacuums,
-- and a plan cached while the table was small (a new table, or one just
-- truncated by a vacuum) scans the whole heap on every mark as it grows,
-- since nothing tells the planner so until the next vacuum or analyze.
create or replace function orchestrator_outbox_mark(ids bigint[], keep boolean) returns bigint
language plpgsql
set enable_seqscan = off
as $$
declare
    marked bigint;
begin
    if keep then
        update orchestrator_outbox
        set published_ms = (extract(epoch from clock_timestamp()) * 1000)::bigint
        where id = any(ids);
    else
        delete from orchestrator_outbox where id = any(ids);
    end if;
    get diagnostics marked = row_count;
    return marked;
end
$$;

//! The outbox, relay and inbox of `orchestrator` on both stores, PostgreSQL
//! and SQLite, in one process with the in-memory broker. Every scenario runs
//! once per backend; PostgreSQL tests each get their own schema.
//!
//! `source tests/harness/up.sh && cargo test -p e2e --test outbox`

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use broker_adapters::cloudevents::AttributesReader;
use broker_adapters::{MemoryBroker, Topic};
use orchestrator::{
    ErrorKind, OutboxConfig, Poison, Processed, RelayConfig, Retention, partition_of,
};
use support::{
    Backend, Db, FlakyPublisher, GatedPublisher, RefusingPublisher, Sink, SlowPublisher,
    UnevenPublisher, check_order, event,
};

macro_rules! both {
    ($($scenario:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() -> anyhow::Result<()> {
                    super::$scenario(super::Backend::Postgres).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() -> anyhow::Result<()> {
                    super::$scenario(super::Backend::Sqlite).await
                }
            )*
        }
    };
}

both!(
    rolled_back_event_is_never_published,
    committed_events_are_published_in_order_per_key,
    a_backlog_goes_out_in_order_while_partitions_finish_unevenly,
    oversized_event_fails_before_commit,
    partition_count_mismatch_is_refused,
    two_relays_share_partitions_without_duplicates_and_hand_over,
    broker_down_loses_nothing_with_bounded_retries,
    long_open_transaction_does_not_block_other_partitions,
    published_rows_are_kept_then_purged,
    inbox_skips_a_duplicate_delivery,
    relay_crash_between_ack_and_mark_republishes_the_same_ids,
    refused_marks_republish_the_same_ids_and_lose_nothing,
    graceful_shutdown_finishes_the_in_flight_batch,
    graceful_shutdown_abandons_a_hung_batch_after_the_grace_time,
    poison_row_blocks_its_partition_by_default_and_is_parked_on_request,
    enqueue_wakes_an_idle_relay_without_polling,
    a_late_commit_wakes_the_relay_at_once,
);

/// On the test's own thread (a current-thread runtime), so that the CPU the
/// test measures is its relay's and not another test's.
mod lingering {
    #[tokio::test]
    async fn postgres() -> anyhow::Result<()> {
        super::a_publish_that_outlives_its_timeout_is_not_sent_again_beside_it(
            super::Backend::Postgres,
        )
        .await
    }

    #[tokio::test]
    async fn sqlite() -> anyhow::Result<()> {
        super::a_publish_that_outlives_its_timeout_is_not_sent_again_beside_it(
            super::Backend::Sqlite,
        )
        .await
    }
}

const WAIT: Duration = Duration::from_secs(30);

/// The relay's marks on PostgreSQL commit without waiting for the WAL
/// flush; that setting stays within their own statement: every pooled
/// connection still commits synchronously afterwards (the business
/// transactions that share the pool).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_marks_leave_the_pool_committing_synchronously() -> anyhow::Result<()> {
    let db = Db::open(Backend::Postgres, OutboxConfig::new()).await?;
    let Db::Pg { pool, .. } = &db else {
        bail!("a PostgreSQL database");
    };
    let broker = Arc::new(MemoryBroker::new());
    let topic = Topic::from_static("orders");
    let sink = Sink::start(&broker, &topic).await?;
    let relay = db.relay(broker.clone(), fast_relay("r1"))?.spawn();
    for n in 0..40 {
        db.enqueue(&topic, &[event(&format!("k{n}"), n)?], true)
            .await?;
    }
    sink.wait_for(40, WAIT).await?;
    db.wait_all_marked(WAIT).await?;
    relay.shutdown().await?;
    let mut held = Vec::new();
    for _ in 0..pool.options().get_max_connections() {
        let mut conn = pool.acquire().await?;
        let setting: String = sqlx::query_scalar("show synchronous_commit")
            .fetch_one(&mut *conn)
            .await?;
        ensure!(
            setting == "on",
            "a pooled connection commits with synchronous_commit = {setting}"
        );
        held.push(conn);
    }
    drop(held);
    db.close().await
}

/// A relay's mark on PostgreSQL finds its rows through the primary key
/// whatever plan the connection has cached: with generic plans forced (as a
/// cached plan made while the table was small is used after it grew), a
/// mark of some rows, deleted or kept, makes no sequential scan of the
/// outbox. Such a scan reads every dead row the queue table has piled up
/// since its last vacuum, on every mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_marks_never_scan_the_whole_outbox() -> anyhow::Result<()> {
    let db = Db::open(Backend::Postgres, OutboxConfig::new()).await?;
    let Db::Pg { pool, .. } = &db else {
        bail!("a PostgreSQL database");
    };
    let topic = Topic::from_static("orders");
    for n in 0..20 {
        db.enqueue(&topic, &[event(&format!("k{n}"), n)?], true)
            .await?;
    }
    let ids: Vec<i64> = sqlx::query_scalar("select id from orchestrator_outbox order by id")
        .fetch_all(pool)
        .await?;
    let mut conn = pool.acquire().await?;
    sqlx::query("set plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await?;
    // A scan of the outbox on this connection before the marks (counted,
    // perhaps not yet reported), which the marks must not be charged with.
    let _: i64 = sqlx::query_scalar("select count(*) from orchestrator_outbox")
        .fetch_one(&mut *conn)
        .await?;
    // The sequential scans of the outbox this connection has counted and not
    // yet reported, its earlier transactions' included; read before and
    // after the mark within one transaction, so the difference is the mark's.
    const SEQ_SCANS: &str = "select seq_scan from pg_stat_xact_user_tables \
                             where relid = 'orchestrator_outbox'::regclass";
    for (keep, marked) in [(true, &ids[..5]), (false, &ids[5..10])] {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let before: i64 = sqlx::query_scalar(SEQ_SCANS).fetch_one(&mut *tx).await?;
        let n: i64 = sqlx::query_scalar("select orchestrator_outbox_mark($1, $2)")
            .bind(marked)
            .bind(keep)
            .fetch_one(&mut *tx)
            .await?;
        ensure!(n == 5, "marked {n} rows of 5 (keep: {keep})");
        let after: i64 = sqlx::query_scalar(SEQ_SCANS).fetch_one(&mut *tx).await?;
        ensure!(
            after == before,
            "a mark (keep: {keep}) scanned the whole outbox {} time(s)",
            after - before
        );
        tx.commit().await?;
    }
    sqlx::query("reset plan_cache_mode")
        .execute(&mut *conn)
        .await?;
    drop(conn);
    let (pending, published, left): (i64, i64, i64) = sqlx::query_as(
        "select count(*) filter (where published_ms is null), count(published_ms), count(*) \
         from orchestrator_outbox",
    )
    .fetch_one(pool)
    .await?;
    ensure!(
        (pending, published, left) == (10, 5, 15),
        "after the marks: {pending} pending, {published} kept as published, {left} rows"
    );
    db.close().await
}

/// What most scenarios start from: a fresh outbox with the default
/// configuration, the in-memory broker, the topic `orders` and a sink on it.
async fn start(backend: Backend) -> anyhow::Result<(Db, Arc<MemoryBroker>, Topic, Sink)> {
    let db = Db::open(backend, OutboxConfig::new()).await?;
    let broker = Arc::new(MemoryBroker::new());
    let topic = Topic::from_static("orders");
    let sink = Sink::start(&broker, &topic).await?;
    Ok((db, broker, topic, sink))
}

fn fast_relay(id: &str) -> RelayConfig {
    RelayConfig::new()
        .relay_id(id)
        .batch_size(16)
        .lease_ttl(Duration::from_millis(1500))
        .poll_interval(Duration::from_millis(200))
        .backoff(Duration::from_millis(50), Duration::from_millis(400))
}

async fn rolled_back_event_is_never_published(backend: Backend) -> anyhow::Result<()> {
    let (db, broker, topic, sink) = start(backend).await?;
    let relay = db.relay(broker.clone(), fast_relay("r1"))?.spawn();

    let lost = event("k", 0)?;
    db.enqueue(&topic, std::slice::from_ref(&lost), false)
        .await?;
    let kept = event("k", 1)?;
    db.enqueue(&topic, std::slice::from_ref(&kept), true)
        .await?;

    let got = sink.wait_for(1, WAIT).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got_after = sink.events();
    ensure!(
        got.len() == 1 && got_after.len() == 1,
        "exactly one event published"
    );
    ensure!(
        got_after[0].id() == kept.id(),
        "the committed event, not the rolled-back one"
    );
    db.wait_all_marked(WAIT).await?;
    let report = relay.shutdown().await?;
    ensure!(report.published == 1, "{report:?}");
    db.close().await
}

async fn committed_events_are_published_in_order_per_key(backend: Backend) -> anyhow::Result<()> {
    let (db, broker, topic, sink) = start(backend).await?;
    let relay = db.relay(broker.clone(), fast_relay("r1"))?.spawn();

    // 20 transactions of 10 events over 7 keys, enqueued while the relay runs.
    let all = db.commit_numbered(&topic, 20, 10, 7).await?;
    let got = sink.wait_for(all.len(), WAIT).await?;
    check_order(&all, &got, true)?;
    let report = relay.shutdown().await?;
    ensure!(report.published == 200, "{report:?}");
    ensure!(db.pending().await? == 0);
    db.close().await
}

/// A backlog of 1,600 rows over 40 keys, many batches of 16 rows a
/// partition, published through a broker that holds each batch for a time
/// set by its key, so that partitions published at once finish in no
/// particular order and overtake one another: every event once, in order
/// per key.
async fn a_backlog_goes_out_in_order_while_partitions_finish_unevenly(
    backend: Backend,
) -> anyhow::Result<()> {
    let (db, broker, topic, sink) = start(backend).await?;
    let all = db.commit_numbered(&topic, 16, 100, 40).await?;
    let publisher = Arc::new(UnevenPublisher::new(broker.clone()));
    let relay = db.relay(publisher, fast_relay("r1"))?.spawn();
    let got = sink.wait_for(all.len(), WAIT).await?;
    check_order(&all, &got, true)?;
    let report = relay.shutdown().await?;
    ensure!(report.published == 1600, "{report:?}");
    ensure!(db.pending().await? == 0);
    db.close().await
}

async fn oversized_event_fails_before_commit(backend: Backend) -> anyhow::Result<()> {
    let db = Db::open(backend, OutboxConfig::new().max_event_bytes(1024)).await?;
    let topic = Topic::from_static("orders");
    let big = broker_adapters::CloudEventBuilder::new("t.big", "/test")
        .partition_key("k")
        .json_data(&"x".repeat(2048))
        .build()?;
    let err = db
        .enqueue(&topic, &[event("k", 0)?, big], true)
        .await
        .expect_err("an oversized event must fail");
    let err = err
        .downcast::<orchestrator::Error>()
        .context("an orchestrator error")?;
    match err.kind() {
        ErrorKind::EventTooLarge { size, limit, .. } => {
            ensure!(*limit == 1024 && *size > 2048, "{err}");
        }
        other => bail!("expected EventTooLarge, got {other:?}"),
    }
    ensure!(!err.is_retryable());
    // The whole transaction rolled back: no row at all, not even the small event.
    ensure!(db.total_rows().await? == 0, "nothing committed");
    db.close().await
}

async fn partition_count_mismatch_is_refused(backend: Backend) -> anyhow::Result<()> {
    let db = Db::open(backend, OutboxConfig::new()).await?;
    let err = db
        .reopen(OutboxConfig::new().partitions(8))
        .await
        .expect_err("8 partitions on a 16-partition database");
    let err = err.downcast::<orchestrator::Error>()?;
    ensure!(
        matches!(
            err.kind(),
            ErrorKind::Config {
                key: "partitions",
                ..
            }
        ),
        "{err}"
    );
    let err = db
        .reopen(OutboxConfig::new().partitions(0))
        .await
        .expect_err("zero partitions");
    ensure!(err.to_string().contains("partitions"), "{err}");
    db.close().await
}

async fn two_relays_share_partitions_without_duplicates_and_hand_over(
    backend: Backend,
) -> anyhow::Result<()> {
    let (db, broker, topic, sink) = start(backend).await?;
    let ttl = Duration::from_millis(1500);
    let a = db.relay(broker.clone(), fast_relay("a"))?.spawn();
    let b = db.relay(broker.clone(), fast_relay("b"))?.spawn();

    // Both settle on a fair share of the 16 partitions.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (na, nb) = (db.owned("a").await?, db.owned("b").await?);
        if na == 8 && nb == 8 {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "relays did not share the partitions: a={na} b={nb}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut all = db.commit_numbered(&topic, 30, 10, 31).await?;
    let got = sink.wait_for(all.len(), WAIT).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    check_order(&all, &sink.events(), true).context("no duplicate publish")?;
    ensure!(got.len() == all.len());

    // b crashes (no release): a takes all partitions once b's leases expire.
    let crashed = tokio::time::Instant::now();
    b.abort();
    loop {
        if db.owned("a").await? == 16 {
            break;
        }
        ensure!(
            crashed.elapsed() < ttl * 2 + Duration::from_secs(2),
            "a did not take over b's partitions within the lease time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let handover = crashed.elapsed();
    ensure!(
        handover <= ttl + ttl / 3 + Duration::from_millis(700),
        "handover took {handover:?} with a lease of {ttl:?}"
    );
    let more = (300..340)
        .map(|n| event(&format!("k{}", n % 31), n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    db.enqueue(&topic, &more, true).await?;
    all.extend(more);
    sink.wait_for(all.len(), WAIT).await?;
    check_order(&all, &sink.events(), true)?;

    // A graceful stop releases at once.
    let report = a.shutdown().await?;
    ensure!(db.owned("a").await? == 0, "leases released on shutdown");
    ensure!(report.published >= 40, "{report:?}");
    println!("handover after a crash: {handover:?}");
    db.close().await
}

async fn broker_down_loses_nothing_with_bounded_retries(backend: Backend) -> anyhow::Result<()> {
    let (db, broker, topic, sink) = start(backend).await?;
    let flaky = Arc::new(FlakyPublisher::new(broker.clone()));
    flaky.down.store(true, Ordering::SeqCst);
    let relay = db.relay(flaky.clone(), fast_relay("r1"))?.spawn();

    let all = (0..60)
        .map(|n| event(&format!("k{}", n % 5), n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    db.enqueue(&topic, &all, true).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let attempts = flaky.attempts.load(Ordering::SeqCst);
    // 5 keys use at most 5 partitions; each backs off 50, 100, 200, 400, 400 ms…
    ensure!(attempts >= 5, "the relay kept trying ({attempts})");
    ensure!(
        attempts <= 5 * 12,
        "retries are bounded by the backoff: {attempts} attempts in 2 s"
    );
    ensure!(sink.events().is_empty());
    ensure!(
        db.pending().await? == 60,
        "nothing lost while the broker is down"
    );

    flaky.down.store(false, Ordering::SeqCst);
    let got = sink.wait_for(all.len(), WAIT).await?;
    check_order(&all, &got, true)?;
    let report = relay.shutdown().await?;
    ensure!(report.failures > 0 && report.published == 60, "{report:?}");
    ensure!(db.pending().await? == 0);
    db.close().await
}

/// A publish that outlives the relay's publish timeout may still be
/// delivered by the publisher (a Kafka producer holds queued records until
/// its own delivery timeout): the relay does not send the partition's rows
/// again until it has ended, so a broker that is down holds one attempt per
/// partition, not one per retry.
async fn a_publish_that_outlives_its_timeout_is_not_sent_again_beside_it(
    backend: Backend,
) -> anyhow::Result<()> {
    let (db, broker, topic, sink) = start(backend).await?;
    let slow = Arc::new(SlowPublisher::new(
        broker.clone(),
        Duration::from_millis(700),
    ));
    slow.slow.store(true, Ordering::SeqCst);
    let config = fast_relay("r1").publish_timeout(Duration::from_millis(150));
    let relay = db.relay(slow.clone(), config)?.spawn();

    // One key: one partition.
    let all = (0..40)
        .map(|n| event("k", n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    db.enqueue(&topic, &all, true).await?;
    let cpu_before = thread_cpu()?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu = thread_cpu()? - cpu_before;
    let attempts = slow.attempts.load(Ordering::SeqCst);
    let most = slow.most_held.load(Ordering::SeqCst);
    // Waiting for a publish still running is a sleep, not a loop of looks
    // (20-40 ms of CPU here; 420-610 ms when it was such a loop).
    ensure!(
        cpu < Duration::from_millis(200),
        "the relay's thread used {cpu:?} of CPU in 3 s while it waited"
    );
    ensure!(attempts >= 2, "the relay kept trying ({attempts} attempts)");
    ensure!(
        most == 1,
        "{most} attempts of one partition held by the publisher at once ({attempts} attempts)"
    );

    slow.slow.store(false, Ordering::SeqCst);
    let got = sink.wait_for(all.len(), WAIT).await?;
    check_order(&all, &got, true)?;
    let report = relay.shutdown().await?;
    ensure!(report.failures >= 2 && report.published == 40, "{report:?}");
    ensure!(db.pending().await? == 0);
    db.close().await
}

/// The CPU time the calling thread has used so far (user and system),
/// from `/proc/thread-self/stat`.
fn thread_cpu() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat")?;
    // The fields after the command name, which is in parentheses.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("no command name in /proc/thread-self/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after it.
    let ticks: u64 = fields
        .get(11..13)
        .context("a short /proc/thread-self/stat")?
        .iter()
        .map(|f| f.parse::<u64>())
        .sum::<Result<u64, _>>()?;
    // Clock ticks are 100 a second on Linux.
    Ok(Duration::from_millis(ticks * 10))
}

async fn long_open_transaction_does_not_block_other_partitions(
    backend: Backend,
) -> anyhow::Result<()> {
    let (db, broker, topic, sink) = start(backend).await?;
    let relay = db.relay(broker.clone(), fast_relay("r1"))?.spawn();

    let slow_part = partition_of("slow", 16);
    let mut others: Vec<_> = (0..40)
        .map(|n| format!("k{n}"))
        .filter(|k| partition_of(k, 16) != slow_part)
        .take(10)
        .enumerate()
        .map(|(n, k)| event(&k, n))
        .collect::<anyhow::Result<_>>()?;
    let slow = event("slow", 1000)?;

    if backend == Backend::Sqlite {
        // SQLite has one writer: an open write transaction holds the file
        // lock, so the other rows must commit before it starts writing.
        db.enqueue(&topic, &others, true).await?;
    }
    let open = db.begin_open(&topic, &slow).await?;
    if backend == Backend::Postgres {
        db.enqueue(&topic, &others, true).await?;
        // Same partition as the open row, committed after it was written:
        // not held back by it either.
        let peer = (0..1000)
            .map(|i| format!("peer{i}"))
            .find(|k| partition_of(k, 16) == slow_part)
            .context("a key in the same partition")?;
        let same = event(&peer, 2000)?;
        db.enqueue(&topic, std::slice::from_ref(&same), true)
            .await?;
        others.push(same);
    }
    if backend == Backend::Postgres {
        // The others go out while the long transaction stays open.
        sink.wait_for(others.len(), Duration::from_secs(8))
            .await
            .context("other partitions blocked by an open transaction")?;
    } else {
        // SQLite: the open write transaction holds the database's single
        // write lock, so the relay can publish a batch but not mark it until
        // the transaction ends (it waits up to the busy timeout). Nothing is
        // lost or published twice; it only stalls.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    ensure!(
        !sink.events().iter().any(|e| e.id() == slow.id()),
        "an uncommitted row was published"
    );
    open.commit().await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !sink.events().iter().any(|e| e.id() == slow.id()) {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the long transaction's row never went out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut expected = others.clone();
    expected.push(slow.clone());
    check_order(&expected, &sink.wait_for(expected.len(), WAIT).await?, true)?;
    relay.shutdown().await?;
    ensure!(db.pending().await? == 0);
    db.close().await
}

async fn published_rows_are_kept_then_purged(backend: Backend) -> anyhow::Result<()> {
    let (db, broker, topic, sink) = start(backend).await?;
    let config = fast_relay("r1")
        .retention(Retention::Keep(Duration::from_secs(2)))
        .purge(7, Duration::from_millis(200));
    let relay = db.relay(broker.clone(), config)?.spawn();
    let all = (0..30)
        .map(|n| event(&format!("k{}", n % 3), n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    db.enqueue(&topic, &all, true).await?;
    sink.wait_for(30, WAIT).await?;
    db.wait_all_marked(WAIT).await?;
    ensure!(db.total_rows().await? == 30, "kept for the retention time");
    let deadline = tokio::time::Instant::now() + WAIT;
    while db.total_rows().await? > 0 {
        ensure!(tokio::time::Instant::now() < deadline, "never purged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check_order(&all, &sink.events(), true)?;
    relay.shutdown().await?;
    db.close().await
}

async fn inbox_skips_a_duplicate_delivery(backend: Backend) -> anyhow::Result<()> {
    let db = Db::open(backend, OutboxConfig::new()).await?;
    let e = event("k", 1)?;
    ensure!(db.handle("billing", &e, false).await? == Processed::Handled(()));
    ensure!(db.handle("billing", &e, false).await? == Processed::Duplicate);
    // Another consumer handles it on its own.
    ensure!(db.handle("shipping", &e, false).await? == Processed::Handled(()));
    ensure!(db.effects("billing").await? == 1, "no duplicate effect");
    ensure!(db.effects("shipping").await? == 1);

    // A failing handler commits nothing, not even the inbox record.
    let f = event("k", 2)?;
    let err = db
        .handle("billing", &f, true)
        .await
        .expect_err("the handler fails");
    let err = err.downcast::<orchestrator::Error>()?;
    ensure!(matches!(err.kind(), ErrorKind::Handler { .. }), "{err}");
    ensure!(db.effects("billing").await? == 1);
    ensure!(db.handle("billing", &f, false).await? == Processed::Handled(()));
    ensure!(db.effects("billing").await? == 2);

    // Concurrent deliveries of one event: exactly one effect.
    let g = event("k", 3)?;
    let (x, y) = tokio::join!(
        db.handle("billing", &g, false),
        db.handle("billing", &g, false)
    );
    let outcomes = [x?, y?];
    ensure!(
        outcomes.iter().filter(|o| o.is_duplicate()).count() == 1,
        "{outcomes:?}"
    );
    ensure!(db.effects("billing").await? == 3);
    ensure!(db.inbox_contains("billing", e.id()).await?);
    ensure!(!db.inbox_contains("billing", "nope").await?);

    // Purged in bounded batches; an event whose record is gone runs again.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut purged = 0;
    loop {
        let n = db.purge_inbox().await?;
        ensure!(n <= 2, "a purge batch is bounded");
        if n == 0 {
            break;
        }
        purged += n;
    }
    ensure!(purged == 4, "{purged} records purged");
    ensure!(!db.inbox_contains("billing", e.id()).await?);
    ensure!(db.handle("billing", &e, false).await? == Processed::Handled(()));
    db.close().await
}

/// The database refuses the relay's marks (a trigger aborts every delete
/// from the outbox): the published rows stay, their partition backs off,
/// and they go out again with the same ids, in order, until the marks are
/// let through; only marked rows count as published.
async fn refused_marks_republish_the_same_ids_and_lose_nothing(
    backend: Backend,
) -> anyhow::Result<()> {
    let db = Db::open(backend, OutboxConfig::new()).await?;
    let (refuse, allow): (&[&'static str], &[&'static str]) = match backend {
        Backend::Postgres => (
            &[
                "create function refuse_mark() returns trigger language plpgsql as $$ \
                 begin raise exception 'marks refused by the test'; end $$",
                "create trigger refuse_mark before delete on orchestrator_outbox \
                 for each row execute function refuse_mark()",
            ],
            &["drop trigger refuse_mark on orchestrator_outbox"],
        ),
        Backend::Sqlite => (
            &[
                "create trigger refuse_mark before delete on orchestrator_outbox \
               begin select raise(abort, 'marks refused by the test'); end",
            ],
            &["drop trigger refuse_mark"],
        ),
    };
    for sql in refuse {
        db.execute(sql).await?;
    }
    let broker = Arc::new(MemoryBroker::new());
    let topic = Topic::from_static("orders");
    let sink = Sink::start(&broker, &topic).await?;
    let relay = db.relay(broker.clone(), fast_relay("r1"))?.spawn();
    let all = (0..5)
        .map(|n| event("k", n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    db.enqueue(&topic, &all, true).await?;
    // Published, refused, published again after the partition's backoff.
    let twice = sink.wait_for(10, WAIT).await?;
    check_order(&all, &twice[..5], true)?;
    check_order(&all, &twice[5..10], true)?;
    ensure!(db.pending().await? == 5, "refused marks left the rows");

    for sql in allow {
        db.execute(sql).await?;
    }
    db.wait_all_marked(WAIT).await?;
    let report = relay.shutdown().await?;
    let got = sink.events();
    ensure!(got.len() % 5 == 0, "whole passes only: {}", got.len());
    for pass in got.chunks(5) {
        check_order(&all, pass, true)?;
    }
    ensure!(
        report.published == 5 && report.failures > 0,
        "only the marked rows count as published: {report:?}"
    );
    db.close().await
}

async fn relay_crash_between_ack_and_mark_republishes_the_same_ids(
    backend: Backend,
) -> anyhow::Result<()> {
    let (db, broker, topic, sink) = start(backend).await?;
    // The broker acknowledges the batch, then the relay stalls before
    // marking the rows: it is killed in that window.
    let gated = Arc::new(GatedPublisher::new(
        broker.clone(),
        Duration::ZERO,
        Duration::from_secs(60),
    ));
    let all = (0..5)
        .map(|n| event("k", n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let acked = gated.acked.notified();
    let first = db
        .relay(
            gated.clone(),
            fast_relay("r1").publish_timeout(Duration::from_millis(700)),
        )?
        .spawn();
    db.enqueue(&topic, &all, true).await?;
    tokio::time::timeout(WAIT, acked)
        .await
        .context("the first batch was never acknowledged")?;
    first.abort();
    ensure!(sink.wait_for(5, WAIT).await?.len() == 5);
    ensure!(db.pending().await? == 5, "acknowledged but never marked");

    // Another relay takes the partition over once the dead relay's lease
    // expires, and publishes the same events again, with the same ids.
    let second = db.relay(broker.clone(), fast_relay("r2"))?.spawn();
    let got = sink.wait_for(10, WAIT).await?;
    check_order(&all, &got[..5], true)?;
    check_order(&all, &got[5..], true)?;
    // The sink sees the events before the relay marks their rows: a
    // graceful shutdown finishes that batch, marks included.
    second.shutdown().await?;
    ensure!(db.pending().await? == 0);

    // Through the inbox, the redelivered events have no second effect.
    let mut duplicates = 0;
    for e in &got {
        if db.handle("billing", e, false).await?.is_duplicate() {
            duplicates += 1;
        }
    }
    ensure!(duplicates == 5 && db.effects("billing").await? == 5);
    db.close().await
}

async fn graceful_shutdown_finishes_the_in_flight_batch(backend: Backend) -> anyhow::Result<()> {
    let (db, broker, topic, sink) = start(backend).await?;
    let gated = Arc::new(GatedPublisher::new(
        broker.clone(),
        Duration::from_millis(300),
        Duration::ZERO,
    ));
    let started = gated.started.notified();
    let relay = db
        .relay(
            gated.clone(),
            fast_relay("r1").shutdown_grace(Duration::from_secs(5)),
        )?
        .spawn();
    let all = (0..5)
        .map(|n| event("k", n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    db.enqueue(&topic, &all, true).await?;
    tokio::time::timeout(WAIT, started)
        .await
        .context("no batch started")?;
    let report = relay.shutdown().await?;
    ensure!(
        report.published == 5,
        "the in-flight batch finished: {report:?}"
    );
    ensure!(db.pending().await? == 0);
    ensure!(db.owned("r1").await? == 0, "leases released");
    check_order(&all, &sink.wait_for(5, WAIT).await?, true)?;
    db.close().await
}

async fn graceful_shutdown_abandons_a_hung_batch_after_the_grace_time(
    backend: Backend,
) -> anyhow::Result<()> {
    let db = Db::open(backend, OutboxConfig::new()).await?;
    let broker = Arc::new(MemoryBroker::new());
    let topic = Topic::from_static("orders");
    let gated = Arc::new(GatedPublisher::new(
        broker.clone(),
        Duration::from_secs(600),
        Duration::ZERO,
    ));
    let started = gated.started.notified();
    let config = fast_relay("r1")
        .lease_ttl(Duration::from_secs(60))
        .publish_timeout(Duration::from_secs(30))
        .shutdown_grace(Duration::from_millis(200));
    let relay = db.relay(gated.clone(), config)?.spawn();
    let all = (0..5)
        .map(|n| event("k", n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    db.enqueue(&topic, &all, true).await?;
    tokio::time::timeout(WAIT, started)
        .await
        .context("no batch started")?;
    let asked = tokio::time::Instant::now();
    let report = tokio::time::timeout(Duration::from_secs(10), relay.shutdown())
        .await
        .context("shutdown hung")??;
    ensure!(
        asked.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        asked.elapsed()
    );
    ensure!(report.published == 0, "{report:?}");
    ensure!(
        db.pending().await? == 5,
        "abandoned rows stay for the next relay"
    );
    ensure!(db.owned("r1").await? == 0, "leases released");
    db.close().await
}

async fn poison_row_blocks_its_partition_by_default_and_is_parked_on_request(
    backend: Backend,
) -> anyhow::Result<()> {
    let (db, broker, topic, sink) = start(backend).await?;
    let refusing = Arc::new(RefusingPublisher::new(broker.clone()));

    let other = (0..100)
        .map(|i| format!("other{i}"))
        .find(|k| partition_of(k, 16) != partition_of("k", 16))
        .context("a key in another partition")?;
    let poison = broker_adapters::CloudEventBuilder::new("t.poison", "/test")
        .partition_key("k")
        .subject("1")
        .json_data(&1)
        .build()?;
    let batch = vec![
        event("k", 0)?,
        poison.clone(),
        event("k", 2)?,
        event(&other, 3)?,
    ];
    db.enqueue(&topic, &batch, true).await?;

    // Block (the default): the partition waits at the refused row; the
    // others flow.
    let relay = db.relay(refusing.clone(), fast_relay("r1"))?.spawn();
    let got = sink.wait_for(2, WAIT).await?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let got_later = sink.events();
    ensure!(
        got.len() == 2 && got_later.len() == 2,
        "{} published",
        got_later.len()
    );
    ensure!(
        db.pending().await? == 2,
        "the refused row and the one after it wait"
    );
    let report = relay.shutdown().await?;
    ensure!(report.failures > 0 && report.parked == 0, "{report:?}");

    // Park: the refused row is set aside and its partition goes on.
    let relay = db
        .relay(refusing.clone(), fast_relay("r1").poison(Poison::Park))?
        .spawn();
    sink.wait_for(3, WAIT).await?;
    let report = relay.shutdown().await?;
    ensure!(report.parked == 1, "{report:?}");
    ensure!(db.pending().await? == 0 && db.parked().await? == 1);
    let mut expected = batch.clone();
    expected.retain(|e| e.id() != poison.id());
    check_order(&expected, &sink.events(), true)?;

    // Once the cause is fixed, the parked row is put back and goes out.
    refusing.refusing.store(false, Ordering::SeqCst);
    ensure!(db.requeue_parked().await? == 1);
    let relay = db.relay(refusing.clone(), fast_relay("r1"))?.spawn();
    let got = sink.wait_for(4, WAIT).await?;
    ensure!(got[3].id() == poison.id());
    relay.shutdown().await?;
    ensure!(db.pending().await? == 0 && db.parked().await? == 0);
    db.close().await
}

/// A relay holding every partition, whose poll and lease renewal do not
/// come within a test, and a sink on `topic`.
async fn idle_relay(db: &Db, topic: &Topic) -> anyhow::Result<(Sink, orchestrator::RelayHandle)> {
    let broker = Arc::new(MemoryBroker::new());
    let sink = Sink::start(&broker, topic).await?;
    let config = fast_relay("r1")
        .lease_ttl(Duration::from_secs(120))
        .poll_interval(Duration::from_secs(120));
    let relay = db.relay(broker, config)?.spawn();
    let deadline = tokio::time::Instant::now() + WAIT;
    while db.owned("r1").await? < 16 {
        ensure!(tokio::time::Instant::now() < deadline, "no leases");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((sink, relay))
}

async fn enqueue_wakes_an_idle_relay_without_polling(backend: Backend) -> anyhow::Result<()> {
    let db = Db::open(backend, OutboxConfig::new()).await?;
    let topic = Topic::from_static("orders");
    let (sink, relay) = idle_relay(&db, &topic).await?;
    // Let the relay go idle, then wake it three times.
    for n in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let e = event("k", n)?;
        let enqueued = tokio::time::Instant::now();
        db.enqueue(&topic, std::slice::from_ref(&e), true).await?;
        sink.wait_for(n + 1, Duration::from_secs(3))
            .await
            .context("the relay was not woken by the commit")?;
        println!(
            "{backend:?}: woken and published in {:?}",
            enqueued.elapsed()
        );
    }
    relay.shutdown().await?;
    db.close().await
}

/// A transaction that commits long after its `enqueue` (past the relay's
/// short looks after the in-process signal) is still published at once:
/// PostgreSQL's `NOTIFY` comes with the commit, and on SQLite the caller
/// says `Outbox::committed`. Without either, the relay would wait for its
/// two-minute poll.
async fn a_late_commit_wakes_the_relay_at_once(backend: Backend) -> anyhow::Result<()> {
    let db = Db::open(backend, OutboxConfig::new()).await?;
    let topic = Topic::from_static("orders");
    let (sink, relay) = idle_relay(&db, &topic).await?;
    for n in 0..2 {
        let tx = db.begin_open(&topic, &event("k", n)?).await?;
        // The relay's looks after the signal end 255 ms after it.
        tokio::time::sleep(Duration::from_millis(600)).await;
        ensure!(sink.events().len() == n, "published before its commit");
        let committed = tokio::time::Instant::now();
        tx.commit().await?;
        db.committed();
        sink.wait_for(n + 1, Duration::from_secs(3))
            .await
            .context("the relay was not woken by the late commit")?;
        println!(
            "{backend:?}: published {:?} after the commit",
            committed.elapsed()
        );
    }
    relay.shutdown().await?;
    db.close().await
}

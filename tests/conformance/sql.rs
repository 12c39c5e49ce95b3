//! The SQL-table broker against the shared conformance suite, twice: on the
//! real PostgreSQL the harness runs (each test in a schema of its own) and
//! on SQLite (a fresh database file per test). Plus SQL-specific tests:
//! rows of transactions that commit out of sequence order are neither
//! skipped nor passed by the cursor, a long-running transaction's rows are
//! delivered once it commits, undecodable rows are dead-lettered without
//! stalling their partition, and group members share partitions and take
//! over those of a member that vanished, within the lease.
//!
//! `source tests/harness/up.sh && cargo test -p e2e --test conformance_sql`
//!
//! Test schemas are named `sqlb_<pid>_<nanos>_<n>`; the first PostgreSQL
//! test of a run drops those older than ten minutes.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use broker_adapters::cloudevents::AttributesReader;
use broker_adapters::conformance::{Capabilities, Target};
use broker_adapters::sql::{EVENTS_TABLE, SqlBroker, SqlConfig};
use broker_adapters::{
    CloudEventBuilder, Delivery, Event, EventExt, Publisher, Result, SubscribeOptions, Subscriber,
    Subscription, Topic,
};
use e2e::Server;
use futures_util::StreamExt;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Row as _};

/// The wait for an expected delivery.
const RECEIVE: Duration = Duration::from_secs(10);

/// The lease of the test members: short, so takeovers are quick.
const LEASE: Duration = Duration::from_secs(2);

/// The prefix of every test schema.
const SCHEMA_PREFIX: &str = "sqlb";

/// Test schemas older than this are dropped by a later run.
const OLD_SCHEMA: Duration = Duration::from_secs(600);

/// A database for one test: a PostgreSQL schema or a SQLite file.
#[derive(Debug)]
enum Db {
    Postgres { url: String, schema: String },
    Sqlite { path: PathBuf },
}

impl Db {
    async fn postgres() -> Self {
        let url = e2e::require(Server::Postgres).unwrap_or_else(|e| panic!("{e:#}"));
        sweep_old_schemas(&url).await;
        Self::Postgres {
            url,
            schema: e2e::unique_name(SCHEMA_PREFIX),
        }
    }

    fn sqlite() -> Self {
        // A directory of its own: removing it also keeps connections that
        // close after the test from creating the file again.
        let dir = std::env::temp_dir().join(e2e::unique_name("sqlb"));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        Self::Sqlite {
            path: dir.join("broker.db"),
        }
    }

    fn config(&self) -> SqlConfig {
        let config = match self {
            Self::Postgres { url, schema } => SqlConfig::builder().url(url).schema(schema),
            Self::Sqlite { path } => {
                SqlConfig::builder().url(format!("sqlite://{}", path.display()))
            }
        };
        config
            .lease(LEASE)
            .heartbeat(Duration::from_millis(200))
            .poll_interval(Duration::from_millis(200))
            .commit_interval(Duration::from_millis(100))
            .max_connections(4)
    }

    async fn broker(&self, config: SqlConfig) -> SqlBroker {
        SqlBroker::connect(config)
            .await
            .unwrap_or_else(|e| match self {
                Self::Postgres { .. } => panic!("{:#}", Server::Postgres.unreachable(e)),
                Self::Sqlite { path } => panic!("SQLite at {}: {e}", path.display()),
            })
    }

    /// A raw PostgreSQL pool on the test schema.
    async fn pg_pool(&self) -> PgPool {
        let Self::Postgres { url, schema } = self else {
            panic!("not a PostgreSQL test database");
        };
        let options: PgConnectOptions = url.parse().expect("a PostgreSQL URL");
        PgPoolOptions::new()
            .max_connections(3)
            .connect_with(options.options([("search_path", schema.as_str())]))
            .await
            .unwrap_or_else(|e| panic!("{:#}", Server::Postgres.unreachable(e)))
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Self::Sqlite { path } = self
            && let Some(dir) = path.parent()
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Drops test schemas older than [`OLD_SCHEMA`], once per run.
async fn sweep_old_schemas(url: &str) {
    static SWEPT: AtomicBool = AtomicBool::new(false);
    if SWEPT.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(pool) = PgPoolOptions::new().max_connections(1).connect(url).await else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let names: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'sqlb\\_%'")
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
    for name in names {
        let nanos = name
            .split('_')
            .nth(2)
            .and_then(|n| n.parse::<u128>().ok())
            .unwrap_or(u128::MAX);
        if now.saturating_sub(nanos) > OLD_SCHEMA.as_nanos() && nanos != u128::MAX {
            let _ = sqlx::query(AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS \"{name}\" CASCADE"
            )))
            .execute(&pool)
            .await;
        }
    }
    pool.close().await;
}

#[derive(Debug)]
struct Sql {
    db: Db,
    publisher: SqlBroker,
}

impl Sql {
    async fn new(db: Db) -> Self {
        let publisher = db.broker(db.config()).await;
        Self { db, publisher }
    }
}

#[async_trait]
impl Target for Sql {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .ack_deadline(true)
            .max_event_bytes(self.publisher.max_event_bytes())
            .receive_timeout(RECEIVE)
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(Arc::new(self.publisher.clone()))
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        // A pool of its own, so dropping it behaves like a crashed process.
        Ok(Arc::new(SqlBroker::connect(self.db.config()).await?))
    }

    async fn topic(&self, name: &str) -> Result<Topic> {
        let topic = Topic::try_from(name)?;
        self.publisher.partitions(&topic).await?;
        Ok(topic)
    }
}

mod postgres {
    broker_adapters::conformance_suite!(async {
        super::Sql::new(super::Db::postgres().await).await
    });
}

mod sqlite {
    broker_adapters::conformance_suite!(async { super::Sql::new(super::Db::sqlite()).await });
}

async fn recv(sub: &mut Subscription, what: &str) -> Delivery {
    match tokio::time::timeout(RECEIVE, sub.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(Some(Err(e))) => panic!("the subscription failed while waiting for {what}: {e}"),
        Ok(None) => panic!("the subscription ended while waiting for {what}"),
        Err(_) => panic!("{what} was not delivered within {RECEIVE:?}"),
    }
}

async fn nothing_within(sub: &mut Subscription, wait: Duration, what: &str) {
    if let Ok(next) = tokio::time::timeout(wait, sub.next()).await {
        let shown = next.map(|d| d.map(|d| d.event().id().to_owned()));
        panic!("{what}: got {shown:?}");
    }
}

fn event(n: usize) -> Event {
    CloudEventBuilder::new("dev.backbone.test", "/sql")
        .subject(n.to_string())
        .json_data(&n)
        .build()
        .expect("valid event")
}

fn topic(prefix: &str) -> Topic {
    Topic::try_from(e2e::unique_name(prefix)).expect("a valid topic name")
}

fn options(group: &str) -> SubscribeOptions {
    SubscribeOptions::new(group).expect("a valid group")
}

/// Inserts `event` the way a publisher does, in an open transaction.
async fn insert_raw(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    topic: &Topic,
    event: &Event,
) -> (i64, i64) {
    let row = sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {EVENTS_TABLE} (xid, topic, partition, event_id, payload) \
         VALUES (pg_current_xact_id()::text::bigint, $1, 0, $2, $3) RETURNING xid, seq"
    )))
    .bind(topic.as_str())
    .bind(event.id())
    .bind(serde_json::to_vec(event).expect("encodes"))
    .fetch_one(&mut **tx)
    .await
    .expect("inserted");
    (row.get("xid"), row.get("seq"))
}

/// The committed cursor of the group's only partition.
async fn cursor(pool: &PgPool, group: &str, topic: &Topic) -> (i64, i64) {
    let row = sqlx::query(
        "SELECT cursor_xid, cursor_seq FROM broker_partitions \
         WHERE grp = $1 AND topic = $2 AND partition = 0",
    )
    .bind(group)
    .bind(topic.as_str())
    .fetch_one(pool)
    .await
    .expect("the group's partition row");
    (row.get("cursor_xid"), row.get("cursor_seq"))
}

/// Two transactions insert; the one holding the later sequence number
/// commits first. A reader ordering by sequence number alone would deliver
/// it, move its cursor past the other one's row, and skip that row when it
/// commits. Here nothing of either is delivered, and the cursor does not
/// move, until the earlier transaction commits; then both arrive, the
/// earlier transaction's first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rows_committed_out_of_sequence_are_never_skipped() {
    let db = Db::postgres().await;
    let broker = db.broker(db.config().partitions(1)).await;
    let pool = db.pg_pool().await;
    let topic = topic("sql_commit_order");
    broker.partitions(&topic).await.expect("topic created");
    let group = "g";
    let mut sub = broker
        .subscribe(&topic, options(group))
        .await
        .expect("subscribed");
    let start = cursor(&pool, group, &topic).await;

    let (early, late) = (event(1), event(2));
    let mut first = pool.begin().await.expect("begin");
    let early_pos = insert_raw(&mut first, &topic, &early).await;
    let mut second = pool.begin().await.expect("begin");
    let late_pos = insert_raw(&mut second, &topic, &late).await;
    assert!(
        late_pos.1 > early_pos.1,
        "the later insert has the later seq"
    );
    second
        .commit()
        .await
        .expect("the later-seq transaction commits first");

    nothing_within(
        &mut sub,
        Duration::from_millis(1200),
        "a row was delivered while an older transaction was still open",
    )
    .await;
    let held = cursor(&pool, group, &topic).await;
    assert!(
        held < early_pos,
        "the cursor {held:?} passed the uncommitted row {early_pos:?} (start {start:?})"
    );

    first
        .commit()
        .await
        .expect("the earlier transaction commits");
    let mut a = recv(&mut sub, "the earlier transaction's event").await;
    assert_eq!(a.event().id(), early.id());
    a.ack().await.expect("acked");
    let mut b = recv(&mut sub, "the later transaction's event").await;
    assert_eq!(b.event().id(), late.id());
    b.ack().await.expect("acked");
    sub.close().await.expect("closed");
    assert!(cursor(&pool, group, &topic).await >= late_pos.max(early_pos));
    pool.close().await;
}

/// A transaction that stays open while the broker publishes more events
/// loses nothing: once it commits, its row is delivered with the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_long_running_transaction_rows_arrive_after_commit() {
    let db = Db::postgres().await;
    let broker = db.broker(db.config().partitions(1)).await;
    let pool = db.pg_pool().await;
    let topic = topic("sql_long_tx");
    let mut sub = broker
        .subscribe(&topic, options("g"))
        .await
        .expect("subscribed");

    let slow = event(0);
    let mut tx = pool.begin().await.expect("begin");
    insert_raw(&mut tx, &topic, &slow).await;
    let quick: Vec<Event> = (1..=3).map(event).collect();
    for e in &quick {
        broker.publish(&topic, e.clone()).await.expect("published");
    }
    // Several poll rounds and heartbeats pass with the transaction open.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tx.commit().await.expect("the long transaction commits");

    let mut got = Vec::new();
    for _ in 0..4 {
        let mut d = recv(&mut sub, "the events after the long transaction").await;
        got.push(d.event().id().to_owned());
        d.ack().await.expect("acked");
    }
    let mut want = vec![slow.id().to_owned()];
    want.extend(quick.iter().map(|e| e.id().to_owned()));
    assert_eq!(got, want, "the long transaction's row first, nothing lost");
    nothing_within(&mut sub, Duration::from_millis(500), "nothing else").await;
    sub.close().await.expect("closed");
    pool.close().await;
}

/// Inserts an undecodable row into partition 0; returns its seq.
async fn insert_garbage(db: &Db, topic: &Topic, payload: &[u8]) -> i64 {
    let sql = format!(
        "INSERT INTO {EVENTS_TABLE} (xid, topic, partition, event_id, payload) \
         VALUES ({}, $1, 0, 'garbage', $2) RETURNING seq",
        match db {
            Db::Postgres { .. } => "pg_current_xact_id()::text::bigint",
            Db::Sqlite { .. } => "0",
        }
    );
    match db {
        Db::Postgres { .. } => {
            let pool = db.pg_pool().await;
            let seq = sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(topic.as_str())
                .bind(payload)
                .fetch_one(&pool)
                .await
                .expect("garbage inserted");
            pool.close().await;
            seq
        }
        Db::Sqlite { path } => {
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(1)
                .connect(&format!("sqlite://{}", path.display()))
                .await
                .expect("sqlite opens");
            let seq = sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(topic.as_str())
                .bind(payload)
                .fetch_one(&pool)
                .await
                .expect("garbage inserted");
            pool.close().await;
            seq
        }
    }
}

/// The dead letters of `topic`: (payload, reason, origin topic, origin seq).
async fn dead_letters(db: &Db, topic: &Topic) -> Vec<(Vec<u8>, String, String, i64)> {
    let dlq = SqlBroker::dead_letter_topic(topic).expect("valid");
    let sql = format!(
        "SELECT payload, dlq_reason, origin_topic, origin_seq FROM {EVENTS_TABLE} \
         WHERE topic = $1 ORDER BY seq"
    );
    macro_rules! read {
        ($pool:expr) => {
            sqlx::query(AssertSqlSafe(sql))
                .bind(dlq.as_str())
                .fetch_all(&$pool)
                .await
                .expect("dead letters read")
                .into_iter()
                .map(|r| {
                    (
                        r.get("payload"),
                        r.get("dlq_reason"),
                        r.get("origin_topic"),
                        r.get("origin_seq"),
                    )
                })
                .collect()
        };
    }
    match db {
        Db::Postgres { .. } => {
            let pool = db.pg_pool().await;
            read!(pool)
        }
        Db::Sqlite { path } => {
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(1)
                .connect(&format!("sqlite://{}", path.display()))
                .await
                .expect("sqlite opens");
            read!(pool)
        }
    }
}

async fn undecodable_rows_are_dead_lettered(db: Db) {
    let broker = db.broker(db.config().partitions(1)).await;
    let topic = topic("sql_garbage");
    broker.partitions(&topic).await.expect("topic created");
    let garbage = b"not a cloudevent \x00\xff".to_vec();
    let broken = b"{\"specversion\":\"1.0\",\"id\":".to_vec();
    let first = insert_garbage(&db, &topic, &garbage).await;
    let second = insert_garbage(&db, &topic, &broken).await;
    let valid = event(7);
    broker
        .publish(&topic, valid.clone())
        .await
        .expect("published");

    let mut sub = broker
        .subscribe(&topic, options("g"))
        .await
        .expect("subscribed");
    let mut d = recv(&mut sub, "the valid event after the bad rows").await;
    assert_eq!(d.event().id(), valid.id(), "only the valid event");
    d.ack().await.expect("acked");
    nothing_within(
        &mut sub,
        Duration::from_millis(500),
        "nothing else is delivered",
    )
    .await;
    sub.close().await.expect("closed");

    let letters = dead_letters(&db, &topic).await;
    assert_eq!(letters.len(), 2, "one dead letter per bad row: {letters:?}");
    assert_eq!(letters[0].0, garbage, "payload unchanged");
    assert_eq!(letters[1].0, broken, "payload unchanged");
    for (letter, seq) in letters.iter().zip([first, second]) {
        assert!(
            letter.1.contains("could not decode"),
            "reason: {}",
            letter.1
        );
        assert_eq!(letter.2, topic.as_str());
        assert_eq!(letter.3, seq);
    }

    // Another group dead-letters nothing twice, and a new member of the
    // first group sees nothing again.
    let mut other = broker
        .subscribe(&topic, options("other"))
        .await
        .expect("subscribed");
    let mut d = recv(&mut other, "the valid event, to another group").await;
    assert_eq!(d.event().id(), valid.id());
    d.ack().await.expect("acked");
    other.close().await.expect("closed");
    assert_eq!(
        dead_letters(&db, &topic).await.len(),
        2,
        "dead letters are not duplicated"
    );
    let mut again = broker
        .subscribe(&topic, options("g"))
        .await
        .expect("subscribed");
    nothing_within(
        &mut again,
        Duration::from_millis(800),
        "nothing is redelivered",
    )
    .await;
    again.close().await.expect("closed");
}

/// Undecodable rows go to `<topic>.dlq` unchanged, with the reason and
/// their origin, once; the partition goes on (PostgreSQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_undecodable_rows_are_dead_lettered_without_stalling() {
    undecodable_rows_are_dead_lettered(Db::postgres().await).await;
}

/// As above, on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_undecodable_rows_are_dead_lettered_without_stalling() {
    undecodable_rows_are_dead_lettered(Db::sqlite()).await;
}

async fn members_share_and_take_over(db: Db) {
    let publisher = db.broker(db.config()).await;
    let topic = topic("sql_takeover");
    let group = "g";
    let a_broker = db.broker(db.config()).await;
    let b_broker = db.broker(db.config()).await;
    let mut a = a_broker
        .subscribe(&topic, options(group))
        .await
        .expect("a subscribed");
    let mut b = b_broker
        .subscribe(&topic, options(group))
        .await
        .expect("b subscribed");

    // 32 keys over 8 partitions: both members get some, each event once.
    let total = 32;
    let events: Vec<Event> = (0..total)
        .map(|n| {
            CloudEventBuilder::new("dev.backbone.test", "/sql")
                .partition_key(format!("key-{n}"))
                .json_data(&n)
                .build()
                .expect("valid")
        })
        .collect();
    publisher
        .publish_batch(&topic, events)
        .await
        .expect("published");
    let mut seen = std::collections::BTreeMap::new();
    let deadline = tokio::time::Instant::now() + RECEIVE;
    while seen.len() < total {
        let (member, next) = tokio::select! {
            next = a.next() => ('a', next),
            next = b.next() => ('b', next),
            () = tokio::time::sleep_until(deadline) => panic!("only {} of {total} delivered", seen.len()),
        };
        let mut d = next.expect("open").expect("delivery");
        let n: usize = d.event().data_as().expect("n");
        d.ack().await.expect("acked");
        assert!(
            seen.insert(n, member).is_none(),
            "event {n} delivered twice"
        );
    }
    assert!(
        seen.values().any(|m| *m == 'a') && seen.values().any(|m| *m == 'b'),
        "both members took part: {seen:?}"
    );

    // Member a vanishes without leaving: its connections go, its leases stay
    // until they expire. Its partitions must reach b within the lease.
    Subscriber::close(&a_broker).await.expect("a's pool closed");
    let vanished = tokio::time::Instant::now();
    let events: Vec<Event> = (total..total * 2)
        .map(|n| {
            CloudEventBuilder::new("dev.backbone.test", "/sql")
                .partition_key(format!("key-{n}"))
                .json_data(&n)
                .build()
                .expect("valid")
        })
        .collect();
    publisher
        .publish_batch(&topic, events)
        .await
        .expect("published");
    let mut rest = std::collections::BTreeSet::new();
    while rest.len() < total {
        let mut d = recv(&mut b, "the events of the vanished member's partitions").await;
        let n: usize = d.event().data_as().expect("n");
        d.ack().await.expect("acked");
        if n < total {
            // At least once: a acked it, but vanished before committing.
            assert_eq!(seen.get(&n), Some(&'a'), "event {n} was b's and acked");
        } else {
            rest.insert(n);
        }
    }
    let took = vanished.elapsed();
    assert_eq!(
        rest,
        (total..total * 2).collect(),
        "b got every later event"
    );
    assert!(
        took < LEASE * 3,
        "b took over after {took:?}, more than the {LEASE:?} lease allows"
    );
    drop(a);
    b.close().await.expect("closed");
}

/// Two members share a topic's partitions; when one vanishes without
/// leaving, the other takes its partitions over once the lease expires
/// (PostgreSQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_members_share_partitions_and_take_over_within_the_lease() {
    members_share_and_take_over(Db::postgres().await).await;
}

/// As above, on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_members_share_partitions_and_take_over_within_the_lease() {
    members_share_and_take_over(Db::sqlite()).await;
}

/// Bad configuration and unreachable or unusable databases are clear
/// errors, never panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_are_clear_errors() {
    for (url, needle) in [
        ("mysql://localhost/db", "url"),
        ("sqlite::memory:", "in-memory"),
        ("postgres://postgres@127.0.0.1:1/none", "could not reach"),
    ] {
        let config = SqlConfig::builder()
            .url(url)
            .max_connections(2)
            .connect_timeout(Duration::from_secs(2))
            .lease(LEASE);
        let err = tokio::time::timeout(RECEIVE * 4, SqlBroker::connect(config))
            .await
            .expect("fails in time")
            .expect_err(url);
        assert!(err.to_string().contains(needle), "{url}: {err}");
    }
}

async fn latest_skips_what_is_there(db: Db) {
    // PostgreSQL: an older transaction still open while the group is created
    // keeps the snapshot's xmin below the events already there (as other
    // tests' transactions may); they are skipped all the same.
    let older = match &db {
        Db::Postgres { .. } => {
            let mut older = db.pg_pool().await.begin().await.expect("begin");
            sqlx::query("SELECT pg_current_xact_id()")
                .execute(&mut *older)
                .await
                .expect("an xid for the older transaction");
            Some(older)
        }
        Db::Sqlite { .. } => None,
    };
    let broker = db.broker(db.config()).await;
    let topic = topic("sql_latest");
    let old: Vec<Event> = (0..3).map(event).collect();
    broker.publish_batch(&topic, old).await.expect("published");
    let options = options("late").start_from(broker_adapters::StartFrom::Latest);
    let mut sub = broker.subscribe(&topic, options).await.expect("subscribed");
    if let Some(older) = older {
        older.rollback().await.expect("rolled back");
    }
    let new = event(3);
    broker
        .publish(&topic, new.clone())
        .await
        .expect("published");
    let mut d = recv(&mut sub, "the event published after the group was created").await;
    assert_eq!(d.event().id(), new.id(), "an older event was delivered");
    d.ack().await.expect("acked");
    nothing_within(&mut sub, Duration::from_millis(500), "nothing older").await;
    sub.close().await.expect("closed");
}

/// A new group starting from `Latest` sees only what is published after it
/// was created (PostgreSQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_latest_skips_existing_events() {
    latest_skips_what_is_there(Db::postgres().await).await;
}

/// As above, on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_latest_skips_existing_events() {
    latest_skips_what_is_there(Db::sqlite()).await;
}

async fn concurrent_publishers_lose_nothing(db: Db) {
    let config = db.config().partitions(2);
    let reader = db.broker(config.clone()).await;
    let topic = topic("sql_concurrent");
    let mut sub = reader
        .subscribe(&topic, options("g"))
        .await
        .expect("subscribed");
    let (writers, each) = (4, 50);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let broker = db.broker(config.clone()).await;
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..each {
                broker
                    .publish(&topic, event(w * each + n))
                    .await
                    .expect("published");
            }
        }));
    }
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < writers * each {
        let mut d = recv(&mut sub, "the concurrently published events").await;
        let n: usize = d.event().data_as().expect("n");
        d.ack().await.expect("acked");
        assert!(seen.insert(n), "event {n} delivered twice");
    }
    for task in tasks {
        task.await.expect("publisher task");
    }
    nothing_within(&mut sub, Duration::from_millis(500), "nothing else").await;
    sub.close().await.expect("closed");
}

/// Publishers on separate connections race while a member reads: every
/// event arrives once (PostgreSQL: transactions commit out of sequence order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_publishers_lose_nothing() {
    concurrent_publishers_lose_nothing(Db::postgres().await).await;
}

/// As above, on SQLite: writers queue for the write lock, none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_concurrent_publishers_lose_nothing() {
    concurrent_publishers_lose_nothing(Db::sqlite()).await;
}

/// Subscriptions share the broker's one `LISTEN` connection: more
/// subscriptions than pooled connections all get their events promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_many_subscriptions_share_one_listen_connection() {
    let db = Db::postgres().await;
    let broker = db.broker(db.config().max_connections(2)).await;
    let mut subs = Vec::new();
    for n in 0..5 {
        let topic = topic(&format!("sql_many_{n}"));
        let sub = broker
            .subscribe(&topic, options("g"))
            .await
            .expect("subscribed");
        subs.push((topic, sub));
    }
    for (n, (topic, _)) in subs.iter().enumerate() {
        broker.publish(topic, event(n)).await.expect("published");
    }
    for (n, (_, sub)) in subs.iter_mut().enumerate() {
        let mut d = recv(sub, "each topic's event").await;
        assert_eq!(d.event().data_as::<usize>().expect("n"), n);
        d.ack().await.expect("acked");
    }
    for (_, sub) in subs {
        sub.close().await.expect("closed");
    }
}

async fn closing_the_broker_ends_its_subscriptions(db: Db) {
    let broker = db.broker(db.config()).await;
    let topic = topic("sql_close");
    let mut sub = broker
        .subscribe(&topic, options("g"))
        .await
        .expect("subscribed");
    Subscriber::close(&broker).await.expect("closed");
    let err = broker
        .publish(&topic, event(0))
        .await
        .expect_err("publishing after close fails");
    assert!(
        matches!(err.kind(), broker_adapters::ErrorKind::Closed { .. }),
        "{err}"
    );
    let deadline = tokio::time::Instant::now() + RECEIVE;
    loop {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(None) => break,
            Ok(Some(Err(e))) => assert!(
                matches!(e.kind(), broker_adapters::ErrorKind::Closed { .. }),
                "{e}"
            ),
            Ok(Some(Ok(d))) => panic!("a delivery after close: {:?}", d.event().id()),
            Err(_) => panic!("the subscription did not end after the broker closed"),
        }
    }
}

/// Closing the broker fails later publishes and ends open subscriptions
/// (PostgreSQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_closing_the_broker_ends_its_subscriptions() {
    closing_the_broker_ends_its_subscriptions(Db::postgres().await).await;
}

/// As above, on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_closing_the_broker_ends_its_subscriptions() {
    closing_the_broker_ends_its_subscriptions(Db::sqlite()).await;
}

/// Brokers opening one new SQLite file at once all come up: the migration
/// race has one winner and the others find the tables in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_brokers_opening_a_new_file_at_once_all_connect() {
    let db = Db::sqlite();
    let config = db.config();
    let brokers =
        futures_util::future::join_all((0..4).map(|_| SqlBroker::connect(config.clone()))).await;
    for broker in brokers {
        let broker = broker.expect("connected and migrated");
        let topic = topic("sql_race");
        broker.publish(&topic, event(0)).await.expect("published");
    }
}

async fn prune_keeps_what_a_group_still_needs(db: Db) {
    let broker = db.broker(db.config().partitions(1)).await;
    let topic = topic("sql_prune");
    let mut fast = broker
        .subscribe(&topic, options("fast"))
        .await
        .expect("subscribed");
    let mut slow = broker
        .subscribe(&topic, options("slow"))
        .await
        .expect("subscribed");
    let events: Vec<Event> = (0..4).map(event).collect();
    broker
        .publish_batch(&topic, events)
        .await
        .expect("published");
    for _ in 0..4 {
        let mut d = recv(&mut fast, "the fast group's events").await;
        d.ack().await.expect("acked");
    }
    fast.close().await.expect("closed");
    for n in 0..2 {
        let mut d = recv(&mut slow, "the slow group's first events").await;
        assert_eq!(d.event().data_as::<usize>().expect("n"), n);
        d.ack().await.expect("acked");
    }
    // Let the slow group commit its two acks.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pruned = broker.prune(Duration::ZERO).await.expect("pruned");
    assert_eq!(pruned, 2, "only what both groups consumed is deleted");
    for n in 2..4 {
        let mut d = recv(&mut slow, "the slow group's remaining events").await;
        assert_eq!(d.event().data_as::<usize>().expect("n"), n);
        d.ack().await.expect("acked");
    }
    slow.close().await.expect("closed");
    assert_eq!(broker.prune(Duration::ZERO).await.expect("pruned"), 2);
    assert_eq!(
        broker
            .prune(Duration::from_secs(3600))
            .await
            .expect("pruned"),
        0,
        "nothing is an hour old"
    );
}

/// Pruning deletes only events every group has committed past (PostgreSQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_prune_keeps_what_a_group_still_needs() {
    prune_keeps_what_a_group_still_needs(Db::postgres().await).await;
}

/// As above, on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_prune_keeps_what_a_group_still_needs() {
    prune_keeps_what_a_group_still_needs(Db::sqlite()).await;
}

//! The saga engine of `orchestrator` on both stores, PostgreSQL and SQLite,
//! with the in-memory broker and scripted participants. Every scenario runs
//! once per backend; PostgreSQL scenarios each get their own schema.
//!
//! `source tests/harness/up.sh && cargo test -p e2e --test saga`

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use broker_adapters::cloudevents::{AttributesReader, AttributesWriter, Event};
use broker_adapters::prelude::*;
use futures_util::StreamExt;
use orchestrator::ErrorKind;
use orchestrator::saga::protocol::command_id;
use orchestrator::saga::{Definitions, Handled, Phase, SagaCommand};
use support::{Act, Backend, Bed, Script, all_settled, order_saga, settled};

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
    saga_completes_its_steps_in_order,
    failure_compensates_completed_steps_in_reverse,
    timeout_retries_with_deterministic_command_ids,
    compensation_that_cannot_succeed_ends_visible,
    duplicate_unknown_and_malformed_replies_change_nothing,
    one_reply_racing_itself_and_a_cancel_applies_once,
    running_saga_keeps_its_definition_version,
    participant_down_then_up,
    two_coordinators_share_the_database_and_hand_over,
    commands_and_replies_match_the_published_schemas,
    replies_waiting_together_are_applied_as_one_by_one,
    sagas_started_together_run_as_if_started_alone,
    cancel_and_retry_by_request,
);

const WAIT: Duration = Duration::from_secs(30);

fn defs(timeout_ms: u64, attempts: u32) -> anyhow::Result<Definitions> {
    Ok(Definitions::new().with(order_saga(1, Duration::from_millis(timeout_ms), attempts)?)?)
}

fn script(f: impl Fn(&SagaCommand) -> Act + Send + Sync + 'static) -> Script {
    Arc::new(f)
}

fn up() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(true))
}

fn data() -> serde_json::Value {
    serde_json::json!({ "sku": "sku-1", "amount": 42 })
}

/// A bed with succeeding participants and no reply loop: the replies are
/// read from the returned subscription and fed by hand.
async fn fed_by_hand(backend: Backend) -> anyhow::Result<(Bed, Subscription)> {
    let mut bed = Bed::new(backend).await?;
    bed.participants(script(|_| Act::Succeed), up()).await?;
    let replies = bed
        .broker
        .subscribe(
            &Topic::from_static(support::REPLIES),
            SubscribeOptions::new("manual")?,
        )
        .await?;
    Ok((bed, replies))
}

/// The next reply on `replies`, acked.
async fn next_reply(replies: &mut Subscription) -> anyhow::Result<Event> {
    let mut d = tokio::time::timeout(WAIT, replies.next())
        .await?
        .context("reply")??;
    let event = d.event().clone();
    d.ack().await?;
    Ok(event)
}

/// The saga's three forward effects were recorded, in order, once each.
async fn ensure_forward_in_order(db: &support::Db, saga_id: &str) -> anyhow::Result<()> {
    let effects = db.effects(saga_id).await?;
    ensure!(
        pairs(&effects)
            == [
                ("reserve", "forward"),
                ("charge", "forward"),
                ("ship", "forward")
            ],
        "{effects:?}"
    );
    Ok(())
}

fn pairs(effects: &[(String, String)]) -> Vec<(&str, &str)> {
    effects
        .iter()
        .map(|(s, p)| (s.as_str(), p.as_str()))
        .collect()
}

async fn saga_completes_its_steps_in_order(backend: Backend) -> anyhow::Result<()> {
    let mut bed = Bed::new(backend).await?;
    bed.participants(script(|_| Act::Succeed), up()).await?;
    let c = bed.coordinator(defs(5_000, 3)?).await?;
    c.start("order", "o-1", data()).await?;
    ensure!(settled(&c, "o-1", WAIT).await? == "completed");
    ensure_forward_in_order(&bed.db, "o-1").await?;
    let saga = c.saga("o-1").await?.context("saga")?;
    ensure!(saga.version == 1 && saga.saga_type == "order");
    ensure!(
        saga.state.data["results"]["charge"]["by"] == "charge",
        "{:?}",
        saga.state.data
    );
    let history = c.history("o-1").await?;
    ensure!(history.len() == 4, "{history:?}");
    ensure!(history.iter().map(|h| h.seq).collect::<Vec<_>>() == [1, 2, 3, 4]);
    ensure!(history[3].status == "completed");
    let again = c.start("order", "o-1", data()).await.expect_err("same id");
    ensure!(matches!(again.kind(), ErrorKind::SagaExists { .. }));
    let unknown = c
        .start("nope", "o-2", data())
        .await
        .expect_err("unknown type");
    ensure!(
        matches!(unknown.kind(), ErrorKind::UnknownSaga { .. }),
        "{unknown}"
    );
    bed.finish().await;
    Ok(())
}

async fn failure_compensates_completed_steps_in_reverse(backend: Backend) -> anyhow::Result<()> {
    let mut bed = Bed::new(backend).await?;
    bed.participants(
        script(|cmd| {
            if cmd.saga.step == "ship" {
                Act::Fail { retryable: false }
            } else {
                Act::Succeed
            }
        }),
        up(),
    )
    .await?;
    let c = bed.coordinator(defs(5_000, 3)?).await?;
    c.start("order", "o-1", data()).await?;
    ensure!(settled(&c, "o-1", WAIT).await? == "compensated");
    let effects = bed.db.effects("o-1").await?;
    ensure!(
        pairs(&effects)
            == [
                ("reserve", "forward"),
                ("charge", "forward"),
                ("charge", "compensate"),
                ("reserve", "compensate")
            ],
        "{effects:?}"
    );
    let saga = c.saga("o-1").await?.context("saga")?;
    ensure!(saga.state.failure.as_ref().map(|f| f.code.as_str()) == Some("refused"));
    bed.finish().await;
    Ok(())
}

async fn timeout_retries_with_deterministic_command_ids(backend: Backend) -> anyhow::Result<()> {
    let mut bed = Bed::new(backend).await?;
    let mut tap = bed
        .broker
        .subscribe(
            &Topic::from_static("payment"),
            SubscribeOptions::new("tap")?,
        )
        .await?;
    // The first attempt of `charge` goes unanswered.
    bed.participants(
        script(|cmd| {
            if cmd.saga.step == "charge" && cmd.saga.attempt == 1 {
                Act::Ignore
            } else {
                Act::Succeed
            }
        }),
        up(),
    )
    .await?;
    let c = bed.coordinator(defs(300, 3)?).await?;
    c.start("order", "o-1", data()).await?;
    ensure!(settled(&c, "o-1", WAIT).await? == "completed");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut d = tokio::time::timeout(WAIT, tap.next())
            .await?
            .context("tap")??;
        ids.push((
            d.event().id().to_owned(),
            d.event().extension("sagaattempt").map(|v| v.to_string()),
        ));
        d.ack().await?;
    }
    ensure!(
        ids[0].0 == command_id("o-1", "charge", Phase::Forward, 1).to_string(),
        "{ids:?}"
    );
    ensure!(
        ids[1].0 == command_id("o-1", "charge", Phase::Forward, 2).to_string(),
        "{ids:?}"
    );
    let history = c.history("o-1").await?;
    ensure!(
        history
            .iter()
            .any(|h| h.note.contains("timed out (attempt 1)")),
        "{history:?}"
    );
    ensure!(bed.db.double_effects().await? == 0);
    bed.finish().await;
    Ok(())
}

/// A person cancels a saga whose step never answers, the compensation of
/// that step is refused until the cause is fixed, and a retry finishes it.
async fn cancel_and_retry_by_request(backend: Backend) -> anyhow::Result<()> {
    let mut bed = Bed::new(backend).await?;
    let refuse = Arc::new(AtomicBool::new(true));
    let refusing = refuse.clone();
    bed.participants(
        script(move |cmd| match (cmd.saga.step.as_str(), cmd.saga.phase) {
            ("charge", Phase::Forward) if cmd.saga.saga_id == "o-1" => Act::Ignore,
            ("charge", Phase::Compensate) if refusing.load(Ordering::SeqCst) => {
                Act::Fail { retryable: false }
            }
            _ => Act::Succeed,
        }),
        up(),
    )
    .await?;
    let c = bed.coordinator(defs(60_000, 3)?).await?;
    c.start("order", "o-1", data()).await?;
    c.start("order", "o-2", data()).await?;
    ensure!(settled(&c, "o-2", WAIT).await? == "completed");
    // o-1 waits for `charge`, whose reply never comes.
    let deadline = tokio::time::Instant::now() + WAIT;
    while c.history("o-1").await?.len() < 2 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "o-1 did not reach `charge`"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        matches!(c.retry("o-1").await?, Handled::Ignored(_)),
        "retry of a running saga"
    );
    ensure!(
        matches!(c.cancel("nope", "x").await?, Handled::Ignored(why) if why.contains("unknown saga"))
    );
    let cancelled = c.cancel("o-1", "customer withdrew").await?;
    ensure!(
        matches!(&cancelled, Handled::Applied(n) if n.contains("cancelled at step `charge`")),
        "{cancelled:?}"
    );
    ensure!(settled(&c, "o-1", WAIT).await? == "compensation_failed");
    let saga = c.saga("o-1").await?.context("saga")?;
    ensure!(
        saga.state.failure.as_ref().map(|f| f.code.as_str()) == Some("refused"),
        "{saga:?}"
    );
    ensure!(
        matches!(c.cancel("o-1", "again").await?, Handled::Ignored(_)),
        "cancel after the end"
    );

    // The cause is fixed: a retry compensates `charge`, then `reserve`.
    refuse.store(false, Ordering::SeqCst);
    ensure!(matches!(c.retry("o-1").await?, Handled::Applied(_)));
    ensure!(settled(&c, "o-1", WAIT).await? == "compensated");
    let effects = bed.db.effects("o-1").await?;
    ensure!(
        pairs(&effects)
            == [
                ("reserve", "forward"),
                ("charge", "compensate"),
                ("reserve", "compensate")
            ],
        "{effects:?}"
    );
    // Past every attempt the policy allows a compensation (20).
    let history = c.history("o-1").await?;
    ensure!(
        history
            .iter()
            .any(|h| h.note.contains("retried by request (attempt 21)")),
        "{history:?}"
    );

    // Listing: by status, and page by page.
    let compensated = c.list(Some("compensated"), "", 10).await?;
    ensure!(
        compensated
            .iter()
            .map(|s| s.saga_id.as_str())
            .collect::<Vec<_>>()
            == ["o-1"],
        "{compensated:?}"
    );
    let first = c.list(None, "", 1).await?;
    ensure!(first.len() == 1 && first[0].saga_id == "o-1", "{first:?}");
    let next = c.list(None, &first[0].saga_id, 10).await?;
    ensure!(
        next.len() == 1 && next[0].saga_id == "o-2" && next[0].status == "completed",
        "{next:?}"
    );
    ensure!(bed.db.double_effects().await? == 0);
    bed.finish().await;
    Ok(())
}

async fn compensation_that_cannot_succeed_ends_visible(backend: Backend) -> anyhow::Result<()> {
    let mut bed = Bed::new(backend).await?;
    bed.participants(
        script(|cmd| match (cmd.saga.step.as_str(), cmd.saga.phase) {
            ("ship", _) => Act::Fail { retryable: false },
            ("charge", Phase::Compensate) => Act::Fail { retryable: false },
            _ => Act::Succeed,
        }),
        up(),
    )
    .await?;
    let c = bed.coordinator(defs(5_000, 3)?).await?;
    c.start("order", "o-1", data()).await?;
    ensure!(settled(&c, "o-1", WAIT).await? == "compensation_failed");
    let counts = c.counts().await?;
    ensure!(
        counts == [("compensation_failed".to_owned(), 1)],
        "{counts:?}"
    );
    let history = c.history("o-1").await?;
    ensure!(
        history
            .last()
            .is_some_and(|h| h.note.contains("compensation of step `charge` failed")),
        "{history:?}"
    );
    // `reserve` was not compensated: its compensation waits for a person.
    let effects = bed.db.effects("o-1").await?;
    ensure!(
        !pairs(&effects).contains(&("reserve", "compensate")),
        "{effects:?}"
    );
    bed.finish().await;
    Ok(())
}

async fn duplicate_unknown_and_malformed_replies_change_nothing(
    backend: Backend,
) -> anyhow::Result<()> {
    let (bed, mut replies) = fed_by_hand(backend).await?;
    let c = bed.db.coordinator(defs(5_000, 3)?, Bed::config());
    c.start("order", "o-1", data()).await?;
    let mut seen = 0;
    while seen < 3 {
        let event = next_reply(&mut replies).await?;
        ensure!(matches!(c.handle_reply(&event).await?, Handled::Applied(_)));
        ensure!(c.handle_reply(&event).await? == Handled::Duplicate);
        // The same reply under a new id (a participant re-sending) is stale.
        let mut copy = event.clone();
        copy.set_id(uuid::Uuid::now_v7().to_string());
        ensure!(matches!(c.handle_reply(&copy).await?, Handled::Ignored(_)));
        seen += 1;
    }
    ensure!(c.saga("o-1").await?.context("saga")?.state.status.name() == "completed");
    let before = c.history("o-1").await?.len();

    let base = |id: &str| {
        CloudEventBuilder::new("payment.charge.done", "/test")
            .saga(id, "charge", 1)
            .extension("sagaphase", "forward")
    };
    let unknown = base("o-404").build()?;
    ensure!(matches!(
        c.handle_reply(&unknown).await?,
        Handled::Ignored(_)
    ));
    let late = base("o-1").build()?;
    ensure!(matches!(c.handle_reply(&late).await?, Handled::Ignored(_)));
    let wrong_type = CloudEventBuilder::new("something.else", "/test")
        .saga("o-1", "charge", 1)
        .extension("sagaphase", "forward")
        .build()?;
    ensure!(matches!(
        c.handle_reply(&wrong_type).await?,
        Handled::Ignored(_)
    ));
    let no_step = CloudEventBuilder::new("payment.charge.done", "/test").build()?;
    let err = c
        .handle_reply(&no_step)
        .await
        .expect_err("not a saga reply");
    ensure!(
        matches!(err.kind(), ErrorKind::Protocol { .. }) && !err.is_retryable(),
        "{err}"
    );
    let bad_phase = CloudEventBuilder::new("payment.charge.done", "/test")
        .saga("o-1", "charge", 1)
        .extension("sagaphase", "sideways")
        .build()?;
    ensure!(c.handle_reply(&bad_phase).await.is_err());
    ensure!(
        c.history("o-1").await?.len() == before,
        "an ignored reply changed the history"
    );
    bed.finish().await;
    Ok(())
}

/// The same reply handled at once by two coordinators, eight times over,
/// is applied once; a reply racing a cancel of its saga leaves one
/// history, numbered without gaps, and the saga still ends compensated.
async fn one_reply_racing_itself_and_a_cancel_applies_once(backend: Backend) -> anyhow::Result<()> {
    let (bed, mut replies) = fed_by_hand(backend).await?;
    let a = bed.db.coordinator(defs(5_000, 3)?, Bed::config());
    let b = bed.db.coordinator(defs(5_000, 3)?, Bed::config());
    a.start("order", "o-1", data()).await?;
    a.start("order", "o-2", data()).await?;
    let mut first = std::collections::HashMap::new();
    while first.len() < 2 {
        let event = next_reply(&mut replies).await?;
        let saga = orchestrator::saga::protocol::reply_ref(&event)?.saga_id;
        first.insert(saga, event);
    }

    let one = first.get("o-1").context("o-1's reply")?;
    let handled = futures_util::future::join_all((0..8).map(|i| {
        let c = if i % 2 == 0 { &a } else { &b };
        c.handle_reply(one)
    }))
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    let applied = handled
        .iter()
        .filter(|h| matches!(h, Handled::Applied(_)))
        .count();
    let duplicates = handled.iter().filter(|h| **h == Handled::Duplicate).count();
    ensure!(applied == 1 && duplicates == 7, "{handled:?}");
    ensure!(a.history("o-1").await?.len() == 2, "one start, one step");

    let two = first.get("o-2").context("o-2's reply")?;
    let (reply, cancel) = tokio::join!(b.handle_reply(two), a.cancel("o-2", "race"));
    reply?;
    ensure!(matches!(cancel?, Handled::Applied(_)));
    // The compensation's replies come back; the saga ends compensated.
    let deadline = std::time::Instant::now() + WAIT;
    while a.saga("o-2").await?.context("o-2")?.state.status.name() == "compensating" {
        ensure!(std::time::Instant::now() < deadline, "o-2 did not settle");
        let event = next_reply(&mut replies).await?;
        a.handle_reply(&event).await?;
    }
    ensure!(a.saga("o-2").await?.context("o-2")?.state.status.name() == "compensated");
    let seqs: Vec<i64> = a.history("o-2").await?.iter().map(|h| h.seq).collect();
    ensure!(
        seqs == (1..=i64::try_from(seqs.len())?).collect::<Vec<_>>(),
        "{seqs:?}"
    );
    bed.finish().await;
    Ok(())
}

/// On PostgreSQL a reply is first written without a lock: one statement,
/// its own transaction, that writes only if no other transition of the
/// saga committed since the read. Here every such write loses (a trigger
/// skips the saga row's update in that statement, as if another
/// transition had just committed), so each
/// reply is applied, once, by the locked transaction the store falls back
/// to; the saga still completes in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_reply_losing_every_unlocked_race_is_applied_under_the_lock() -> anyhow::Result<()>
{
    let (bed, mut replies) = fed_by_hand(Backend::Postgres).await?;
    let support::Db::Pg { pool, .. } = &bed.db else {
        anyhow::bail!("a PostgreSQL bed");
    };
    // The unlocked write records the reply in the inbox in the same
    // statement as the saga row's update; the locked transaction recorded
    // it in an earlier statement, with the row's `select ... for update`.
    for ddl in [
        "create table lost_races (saga_id text not null, seq bigint not null)",
        "create function lose_race() returns trigger language plpgsql as $$ \
         begin \
           if new.seq <> old.seq and current_query() ilike '%insert into orchestrator_inbox%' then \
             insert into lost_races values (new.saga_id, new.seq); \
             return null; \
           end if; \
           return new; \
         end $$",
        "create trigger lose_race before update on orchestrator_sagas \
         for each row execute function lose_race()",
    ] {
        sqlx::query(ddl).execute(pool).await?;
    }
    let c = bed.db.coordinator(defs(5_000, 3)?, Bed::config());
    c.start("order", "o-1", data()).await?;
    let mut handled = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while c.saga("o-1").await?.context("o-1")?.state.status.name() == "running" {
        ensure!(std::time::Instant::now() < deadline, "o-1 did not settle");
        let event = next_reply(&mut replies).await?;
        handled.push(c.handle_reply(&event).await?);
        // Handled again: the inbox knows it, whichever path recorded it.
        ensure!(c.handle_reply(&event).await? == Handled::Duplicate);
    }
    ensure!(c.saga("o-1").await?.context("o-1")?.state.status.name() == "completed");
    ensure!(
        handled.len() == 3 && handled.iter().all(|h| matches!(h, Handled::Applied(_))),
        "{handled:?}"
    );
    // Every reply's unlocked write was tried, and lost, before the lock.
    let lost: Vec<i64> = sqlx::query_scalar("select distinct seq from lost_races order by seq")
        .fetch_all(pool)
        .await?;
    ensure!(lost == [2, 3, 4], "unlocked writes lost at seq {lost:?}");
    let seqs: Vec<i64> = c.history("o-1").await?.iter().map(|h| h.seq).collect();
    ensure!(seqs == [1, 2, 3, 4], "{seqs:?}");
    ensure_forward_in_order(&bed.db, "o-1").await?;
    bed.finish().await;
    Ok(())
}

async fn running_saga_keeps_its_definition_version(backend: Backend) -> anyhow::Result<()> {
    let mut bed = Bed::new(backend).await?;
    let gate = Arc::new(AtomicBool::new(false));
    bed.participants(script(|_| Act::Succeed), gate.clone())
        .await?;
    // Started under version 1 only.
    let old = bed.db.coordinator(defs(5_000, 3)?, Bed::config());
    old.start("order", "o-1", data()).await?;
    // Version 2 drops the shipping step; the running saga keeps version 1.
    let v2 = support::order_saga(2, Duration::from_secs(5), 3)?;
    let v2 = orchestrator::saga::SagaDefinition {
        steps: v2.steps[..2].to_vec(),
        ..v2
    };
    let both = defs(5_000, 3)?.with(v2)?;
    let c = bed.coordinator(both).await?;
    c.start("order", "o-2", data()).await?;
    gate.store(true, Ordering::SeqCst);
    ensure!(settled(&c, "o-1", WAIT).await? == "completed");
    ensure!(settled(&c, "o-2", WAIT).await? == "completed");
    ensure!(c.saga("o-1").await?.context("o-1")?.version == 1);
    ensure!(c.saga("o-2").await?.context("o-2")?.version == 2);
    ensure!(bed.db.effects("o-1").await?.len() == 3);
    ensure!(bed.db.effects("o-2").await?.len() == 2);
    bed.finish().await;
    Ok(())
}

async fn participant_down_then_up(backend: Backend) -> anyhow::Result<()> {
    let mut bed = Bed::new(backend).await?;
    let gate = Arc::new(AtomicBool::new(false));
    bed.participants(script(|_| Act::Succeed), gate.clone())
        .await?;
    let c = bed.coordinator(defs(200, 20)?).await?;
    for i in 0..20 {
        c.start("order", &format!("o-{i}"), data()).await?;
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let history = c.history("o-0").await?;
    ensure!(
        history.iter().any(|h| h.note.contains("timed out")),
        "{history:?}"
    );
    gate.store(true, Ordering::SeqCst);
    let counts = all_settled(&c, WAIT).await?;
    ensure!(counts == [("completed".to_owned(), 20)], "{counts:?}");
    ensure!(bed.db.double_effects().await? == 0);
    bed.finish().await;
    Ok(())
}

async fn two_coordinators_share_the_database_and_hand_over(backend: Backend) -> anyhow::Result<()> {
    let mut bed = Bed::new(backend).await?;
    bed.participants(
        script(|cmd| {
            let n: u32 = cmd
                .saga
                .saga_id
                .trim_start_matches("o-")
                .parse()
                .unwrap_or(0);
            if cmd.saga.step == "ship" && n.is_multiple_of(5) {
                Act::Fail { retryable: false }
            } else if cmd.saga.attempt == 1 && n.is_multiple_of(7) {
                Act::Ignore
            } else {
                Act::Succeed
            }
        }),
        up(),
    )
    .await?;
    let a = bed.coordinator(defs(3_000, 5)?).await?;
    let b = bed.coordinator(defs(3_000, 5)?).await?;
    for i in 0..200 {
        let c = if i % 2 == 0 { &a } else { &b };
        c.start("order", &format!("o-{i}"), data()).await?;
    }
    // One coordinator dies (its task is aborted mid-flight).
    tokio::time::sleep(Duration::from_millis(150)).await;
    let first = bed.coordinators.remove(0);
    first.abort();
    let counts: HashMap<String, i64> = all_settled(&b, 2 * WAIT).await?.into_iter().collect();
    ensure!(counts.get("completed") == Some(&160), "{counts:?}");
    ensure!(counts.get("compensated") == Some(&40), "{counts:?}");
    ensure!(bed.db.double_effects().await? == 0);
    for i in (0..200).step_by(5) {
        let effects = bed.db.effects(&format!("o-{i}")).await?;
        ensure!(
            pairs(&effects)
                == [
                    ("reserve", "forward"),
                    ("charge", "forward"),
                    ("charge", "compensate"),
                    ("reserve", "compensate")
                ],
            "o-{i}: {effects:?}"
        );
    }
    bed.finish().await;
    Ok(())
}

fn validator(name: &str) -> anyhow::Result<jsonschema::Validator> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../schemas/contracts/saga")
        .join(name);
    let schema: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    jsonschema::validator_for(&schema).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn check(v: &jsonschema::Validator, event: &Event) -> anyhow::Result<()> {
    let json = serde_json::to_value(event)?;
    let errors: Vec<String> = v.iter_errors(&json).map(|e| e.to_string()).collect();
    ensure!(errors.is_empty(), "{json}: {errors:?}");
    Ok(())
}

async fn commands_and_replies_match_the_published_schemas(backend: Backend) -> anyhow::Result<()> {
    let command = validator("command.schema.json")?;
    let reply = validator("reply.schema.json")?;
    let mut bed = Bed::new(backend).await?;
    let mut taps = Vec::new();
    for topic in ["inventory", "payment", "shipping", support::REPLIES] {
        taps.push(
            bed.broker
                .subscribe(
                    &Topic::try_from(topic)?,
                    SubscribeOptions::new("schema-tap")?,
                )
                .await?,
        );
    }
    bed.participants(
        script(|cmd| {
            if cmd.saga.step == "ship" {
                Act::Fail { retryable: false }
            } else {
                Act::Succeed
            }
        }),
        up(),
    )
    .await?;
    let c = bed.coordinator(defs(5_000, 3)?).await?;
    c.start("order", "o-1", data()).await?;
    ensure!(settled(&c, "o-1", WAIT).await? == "compensated");
    // 5 commands (3 forward, 2 compensations) and their 5 replies.
    let mut commands = 0;
    let mut replies = 0;
    for (i, tap) in taps.iter_mut().enumerate() {
        while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(300), tap.next()).await {
            let mut d = d?;
            if i == 3 {
                check(&reply, d.event())?;
                replies += 1;
            } else {
                check(&command, d.event())?;
                commands += 1;
            }
            d.ack().await?;
        }
    }
    ensure!(
        commands == 5 && replies == 5,
        "{commands} commands, {replies} replies"
    );
    // The schemas do reject what breaks the protocol.
    let bad = CloudEventBuilder::new("payment.charge", "/sagas/order")
        .json_data(&1)
        .build()?;
    ensure!(!command.is_valid(&serde_json::to_value(&bad)?));
    let failure = CloudEventBuilder::new("x.failed", "/p")
        .saga("o-1", "charge", 1)
        .extension("sagaphase", "forward")
        .causation_id("c")
        .json_data(&serde_json::json!({ "error": { "message": "no code" } }))
        .build()?;
    ensure!(!reply.is_valid(&serde_json::to_value(&failure)?));
    bed.finish().await;
    Ok(())
}

/// Replies waiting together (applied in one transaction on SQLite) come out
/// as they would one by one: fresh ones applied, a repeated one a
/// duplicate, an unknown saga's ignored, and one whose saga's definition
/// version this coordinator lacks refused without keeping its inbox record,
/// so a coordinator that has the version applies it later.
async fn replies_waiting_together_are_applied_as_one_by_one(
    backend: Backend,
) -> anyhow::Result<()> {
    let (mut bed, mut replies) = fed_by_hand(backend).await?;
    let c = bed.db.coordinator(defs(5_000, 3)?, Bed::config());
    for i in 0..5 {
        c.start("order", &format!("o-{i}"), data()).await?;
    }
    let v3 = Definitions::new().with(support::order_saga(3, Duration::from_secs(5), 3)?)?;
    let c3 = bed.db.coordinator(v3, Bed::config());
    c3.start("order", "o-5", data()).await?;
    let mut first: HashMap<String, Event> = HashMap::new();
    while first.len() < 6 {
        let mut d = tokio::time::timeout(WAIT, replies.next())
            .await?
            .context("reply")??;
        let saga = d.event().extension("sagaid").context("sagaid")?.to_string();
        first.insert(saga, d.event().clone());
        d.ack().await?;
    }
    let reply = |saga: &str| first.get(saga).cloned().context("no reply");
    ensure!(matches!(
        c.handle_reply(&reply("o-0")?).await?,
        Handled::Applied(_)
    ));
    let o0 = c.history("o-0").await?.len();
    let unknown = CloudEventBuilder::new("inventory.reserve.done", "/test")
        .saga("o-404", "reserve", 1)
        .extension("sagaphase", "forward")
        .build()?;

    // All of them wait on a topic before its coordinator (version 1 only)
    // starts reading.
    let topic = Topic::from_static("together.replies");
    let sub = bed
        .broker
        .subscribe(&topic, SubscribeOptions::new("coordinators")?)
        .await?;
    let mut waiting = vec![reply("o-0")?, unknown];
    for saga in ["o-1", "o-2", "o-3", "o-4", "o-5"] {
        waiting.push(reply(saga)?);
    }
    bed.broker.publish_batch(&topic, waiting).await?;
    let tested = bed.db.coordinator(
        defs(5_000, 3)?,
        orchestrator::saga::CoordinatorConfig::new(topic.clone())
            .poll_interval(Duration::from_millis(20)),
    );
    bed.coordinators.push(tested.clone().spawn(sub));

    for saga in ["o-1", "o-2", "o-3", "o-4"] {
        ensure!(settled(&tested, saga, WAIT).await? == "completed", "{saga}");
    }
    ensure!(
        c.history("o-0").await?.len() == o0,
        "the repeated reply changed o-0"
    );
    ensure!(c.saga("o-404").await?.is_none());
    let o5 = c3.saga("o-5").await?.context("o-5")?;
    ensure!(o5.version == 3 && c3.history("o-5").await?.len() == 1);
    ensure!(
        matches!(c3.handle_reply(&reply("o-5")?).await?, Handled::Applied(_)),
        "the refused reply's inbox record was kept"
    );
    bed.finish().await;
    Ok(())
}

/// `start_many` starts each saga as `start` would: an id taken before or
/// earlier in the call, bad data and a bad id fail alone, and the others
/// run to completion.
async fn sagas_started_together_run_as_if_started_alone(backend: Backend) -> anyhow::Result<()> {
    let mut bed = Bed::new(backend).await?;
    bed.participants(script(|_| Act::Succeed), up()).await?;
    let c = bed.coordinator(defs(5_000, 3)?).await?;
    c.start("order", "o-0", data()).await?;
    let unknown = c
        .start_many("nope", [("o-1", data())])
        .await
        .expect_err("unknown type");
    ensure!(
        matches!(unknown.kind(), ErrorKind::UnknownSaga { .. }),
        "{unknown}"
    );
    ensure!(
        c.start_many("order", Vec::<(String, _)>::new())
            .await?
            .is_empty()
    );

    let mut sagas = vec![
        ("o-0".to_owned(), data()),
        ("o-1".to_owned(), data()),
        ("o-1".to_owned(), data()),
        ("o-2".to_owned(), serde_json::json!(5)),
        ("a/b".to_owned(), data()),
    ];
    let started: Vec<String> = std::iter::once("o-1".to_owned())
        .chain((3..40).map(|i| format!("o-{i}")))
        .collect();
    sagas.extend(started.iter().skip(1).map(|id| (id.clone(), data())));
    let outcomes = c.start_many("order", sagas).await?;
    let kinds: Vec<&str> = outcomes
        .iter()
        .map(|o| match o.as_ref().map_err(orchestrator::Error::kind) {
            Ok(()) => "started",
            Err(ErrorKind::SagaExists { .. }) => "exists",
            Err(ErrorKind::InvalidEvent { .. }) => "invalid",
            Err(_) => "other",
        })
        .collect();
    ensure!(
        kinds[..5] == ["exists", "started", "exists", "invalid", "invalid"],
        "{outcomes:?}"
    );
    ensure!(kinds[5..].iter().all(|k| *k == "started"), "{outcomes:?}");
    for id in &started {
        ensure!(settled(&c, id, WAIT).await? == "completed", "{id}");
        ensure!(c.history(id).await?.len() == 4, "{id}");
        ensure!(bed.db.effects(id).await?.len() == 3, "{id}");
    }
    ensure!(c.saga("o-2").await?.is_none());
    ensure!(settled(&c, "o-0", WAIT).await? == "completed");
    ensure!(c.history("o-0").await?.len() == 4, "o-0 started once");
    bed.finish().await;
    Ok(())
}

//! SQL-table consumer-group subscriptions.
//!
//! One task (the pump) per subscription: every heartbeat it renews the
//! member's registration and partition leases, gives up partitions that now
//! belong to another member and claims the ones that belong to it; between
//! heartbeats it reads new rows of its partitions into the subscription's
//! [`Dispatcher`] and commits settled positions. Deliveries are pulled from
//! the dispatcher, so per-key order, nack delays and ack deadlines work as on
//! the other brokers.
//!
//! A partition's committed cursor moves only up to its oldest unsettled
//! row; the positions past it that were settled are committed with it, so
//! the next owner skips them.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use cloudevents::Event;
use futures_util::stream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::config::SqlConfig;
use super::{DeadLetter, Membership, Pos, Store, StoredRow, Wake, partition_of};
use crate::dispatch::Dispatcher;
use crate::dispatch::buffered::{self, Buffered, Member};
use crate::error::{Error, ErrorKind, Result};
use crate::event::EventExt;
use crate::subscriber::{SubscribeOptions, Subscription};
use crate::topic::Topic;

/// At most this many settled positions past a cursor are committed; beyond
/// that, the oldest unsettled event is very old and the rest are delivered
/// again after a takeover (at least once).
pub(super) const MAX_SETTLED_LIST: usize = 10_000;

/// A decoded row waiting in the dispatcher.
#[derive(Debug)]
struct Record {
    partition: i32,
    pos: Pos,
    event: Arc<Event>,
}

#[derive(Debug)]
struct Partition {
    /// The last position read.
    fetched: Pos,
    /// Positions read and not yet acked or terminated.
    pending: BTreeSet<Pos>,
    /// Positions settled (acked, terminated, dead-lettered, or settled by a
    /// previous owner) that may lie past the commit point.
    settled: BTreeSet<Pos>,
    /// The last committed cursor and settled list.
    committed: (Pos, String),
}

impl Partition {
    fn claimed(cursor: Pos, settled: &str) -> Self {
        Self {
            fetched: cursor,
            pending: BTreeSet::new(),
            settled: parse_settled(settled)
                .into_iter()
                .filter(|p| *p > cursor)
                .collect(),
            committed: (cursor, settled.to_owned()),
        }
    }

    /// The cursor to commit (everything up to it is settled) and the settled
    /// positions past it.
    fn commit_point(&mut self) -> (Pos, String) {
        let cursor = match self.pending.first() {
            Some(oldest) => oldest.before(),
            None => self.fetched,
        };
        self.settled = self.settled.split_off(&cursor);
        self.settled.remove(&cursor);
        let list = self
            .settled
            .iter()
            .take(MAX_SETTLED_LIST)
            .map(|p| format!("{}:{}", p.xid, p.seq))
            .collect::<Vec<_>>()
            .join(",");
        (cursor, list)
    }
}

/// Parses `xid:seq,xid:seq`; malformed entries are ignored (those rows are
/// then delivered again, never lost).
fn parse_settled(list: &str) -> Vec<Pos> {
    list.split(',')
        .filter_map(|entry| {
            let (xid, seq) = entry.trim().split_once(':')?;
            Some(Pos {
                xid: xid.parse().ok()?,
                seq: seq.parse().ok()?,
            })
        })
        .collect()
}

#[derive(Debug, Default)]
struct State {
    dispatcher: Dispatcher<Record>,
    partitions: HashMap<i32, Partition>,
    joined: bool,
    done: bool,
    failure: Option<Error>,
}

impl State {
    /// Forgets the partition and its buffered events; returns its commit point.
    fn take_partition(&mut self, partition: i32) -> Option<(Pos, String)> {
        let point = self
            .partitions
            .remove(&partition)
            .map(|mut p| p.commit_point());
        self.dispatcher
            .retain(|r| r.partition != partition, Instant::now());
        point
    }

    fn drop_partition(&mut self, partition: i32) {
        let _ = self.take_partition(partition);
    }
}

type Shared = buffered::Shared<State>;

impl Buffered for State {
    type Record = Record;
    const SYSTEM: &'static str = "sql";
    const STALE_ACK: &'static str = "ack (the partition moved to another member or the ack deadline passed; the event will be delivered again)";
    const STALE_IN_PROGRESS: &'static str =
        "in-progress (the event was already redelivered or moved to another member)";

    fn dispatcher(&mut self) -> &mut Dispatcher<Record> {
        &mut self.dispatcher
    }

    fn take_failure(&mut self) -> Option<Error> {
        self.failure.take()
    }

    fn done(&self) -> bool {
        self.done
    }

    fn event(record: &Record) -> &Arc<Event> {
        &record.event
    }

    fn settled(&mut self, record: Record) {
        if let Some(p) = self.partitions.get_mut(&record.partition) {
            p.pending.remove(&record.pos);
            p.settled.insert(record.pos);
        }
    }
}

pub(super) async fn subscribe(
    store: Arc<dyn Store>,
    config: &SqlConfig,
    topic: &Topic,
    partitions: u32,
    dead_letter: String,
    dead_letter_partitions: u32,
    options: SubscribeOptions,
) -> Result<Subscription> {
    store
        .init_partitions(
            options.group().as_str(),
            topic.as_str(),
            partitions,
            options.start(),
        )
        .await?;
    let wake = store.wake(topic.as_str()).await?;
    let shared = Arc::new(Shared::default());
    let stop = CancellationToken::new();
    let pump = Pump {
        store,
        shared: Arc::clone(&shared),
        topic: topic.clone(),
        group: options.group().as_str().to_owned(),
        member: Uuid::now_v7().to_string(),
        partitions: i32::try_from(partitions).unwrap_or(i32::MAX),
        dead_letter,
        dead_letter_partitions,
        wake,
        lease: config.lease,
        heartbeat: config.heartbeat_interval(),
        poll_interval: config.poll_interval,
        commit_interval: config.commit_interval,
        max_buffered: config.max_buffered,
        fetch_batch: config.fetch_batch,
    };
    let pump = tokio::spawn(pump.run(stop.clone()));

    // Return once the member owns its share of the partitions, so events
    // published from now on are seen by the group.
    let join_wait = config.lease * 2 + Duration::from_secs(10);
    let member_shared = Arc::clone(&shared);
    crate::dispatch::join_then_subscribe(
        &shared.changed,
        join_wait,
        || {
            let mut state = shared.lock();
            if let Some(e) = state.failure.take() {
                return Some(Err(e));
            }
            if state.done {
                return Some(Err(Error::closed("sql subscription")));
            }
            state.joined.then_some(Ok(()))
        },
        stop,
        pump,
        "sql subscription",
        |stop| {
            let member = Member::new(member_shared, topic.clone(), options, stop);
            stream::unfold(member, |member| async move {
                let next = member.next_delivery().await?;
                Some((next, member))
            })
        },
    )
    .await
}

/// Reads rows, holds leases, commits.
struct Pump {
    store: Arc<dyn Store>,
    shared: Arc<Shared>,
    topic: Topic,
    group: String,
    member: String,
    partitions: i32,
    dead_letter: String,
    dead_letter_partitions: u32,
    wake: Wake,
    lease: Duration,
    heartbeat: Duration,
    poll_interval: Duration,
    commit_interval: Duration,
    max_buffered: usize,
    fetch_batch: u32,
}

/// A row read: its position and, unless a previous owner already settled
/// it, its key and event.
type ReadRow = (Pos, Option<(Option<String>, Event)>);

/// What one read of a partition found.
enum Fetched {
    /// Nothing new, or the buffer is full.
    Idle,
    /// A full batch: there may be more.
    More,
}

impl Pump {
    fn who(&self) -> Membership<'_> {
        Membership {
            group: &self.group,
            topic: self.topic.as_str(),
            member: &self.member,
        }
    }

    async fn run(self, stop: CancellationToken) -> Result<()> {
        let mut next_heartbeat = Instant::now();
        let mut next_commit = Instant::now() + self.commit_interval;
        let mut next_poll = Instant::now();
        let mut fetch_due = true;
        let mut failures = 0u32;
        loop {
            if stop.is_cancelled() {
                break;
            }
            let woken = self.wake.notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let drained = self.shared.changed.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();

            let now = Instant::now();
            let mut step = Ok(false);
            if now >= next_heartbeat {
                step = self.rebalance().await.map(|claimed| {
                    fetch_due |= claimed;
                    false
                });
                let joined = self.shared.lock().joined;
                // While joining, look again soon: the partitions' previous
                // owner gives them up at its next heartbeat.
                let wait = if joined {
                    self.heartbeat
                } else {
                    self.heartbeat.min(Duration::from_millis(100))
                };
                next_heartbeat = Instant::now() + wait;
            }
            if step.is_ok() && Instant::now() >= next_commit {
                step = self.commit_all().await.map(|()| false);
                next_commit = Instant::now() + self.commit_interval;
            }
            if step.is_ok() && (fetch_due || Instant::now() >= next_poll) {
                step = self.fetch_all(&stop).await;
                fetch_due = false;
                next_poll = Instant::now() + self.poll_interval;
            }
            let more = match step {
                Ok(more) => {
                    failures = 0;
                    more
                }
                Err(e) if matches!(e.kind(), ErrorKind::Closed { .. }) => {
                    self.shared.lock().failure = Some(e);
                    self.shared.changed.notify_waiters();
                    break;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, topic = %self.topic, group = %self.group, "sql subscription step failed; retrying");
                    false
                }
            };
            if more && failures == 0 {
                fetch_due = true;
                continue;
            }
            let until = if failures == 0 {
                next_poll
            } else {
                let backoff = Duration::from_millis(100 * u64::from(failures.min(50)));
                let retry = Instant::now() + self.poll_interval.max(backoff);
                next_poll = retry;
                retry
            };
            let until = until.min(next_heartbeat).min(next_commit);
            let full = self.is_full();
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep_until(until) => {}
                () = &mut woken, if failures == 0 => fetch_due = true,
                () = &mut drained, if failures == 0 && full => fetch_due = true,
            }
        }
        let result = self.leave().await;
        {
            let mut state = self.shared.lock();
            state.done = true;
        }
        self.shared.changed.notify_waiters();
        result
    }

    fn is_full(&self) -> bool {
        self.shared.lock().dispatcher.len() >= self.max_buffered
    }

    /// Commits everything settled, gives up every partition, leaves the group.
    async fn leave(&self) -> Result<()> {
        // Settlements from here on fail instead of being lost.
        let points: Vec<(i32, Option<(Pos, String)>)> = {
            let mut state = self.shared.lock();
            let owned: Vec<i32> = state.partitions.keys().copied().collect();
            owned
                .into_iter()
                .map(|p| (p, state.take_partition(p)))
                .collect()
        };
        let mut committed = Ok(());
        for (partition, point) in points {
            let Some((cursor, settled)) = point else {
                continue;
            };
            if let Err(e) = self
                .store
                .commit(self.who(), partition, cursor, &settled, true)
                .await
            {
                committed = Err(e);
                break;
            }
        }
        let left = self.store.leave(self.who()).await;
        if let Err(e) = &committed {
            tracing::warn!(error = %e, topic = %self.topic, group = %self.group, "final commit failed; settled events may be delivered again");
        }
        if let Err(e) = &left {
            tracing::warn!(error = %e, topic = %self.topic, group = %self.group, "leaving the group failed; its partitions move once their leases expire");
        }
        committed.and(left)
    }

    /// Renews the membership and leases, gives up partitions that belong to
    /// another member now, and claims the member's own; `true` if it claimed
    /// one.
    async fn rebalance(&self) -> Result<bool> {
        let who = self.who();
        let members = self.store.heartbeat(who, self.lease).await?;
        let still_owned: BTreeSet<i32> = self
            .store
            .renew(who, self.lease)
            .await?
            .into_iter()
            .collect();
        let lost: Vec<i32> = {
            let state = self.shared.lock();
            state
                .partitions
                .keys()
                .filter(|p| !still_owned.contains(p))
                .copied()
                .collect()
        };
        if !lost.is_empty() {
            tracing::warn!(topic = %self.topic, group = %self.group, ?lost, "partition leases lost; their unsettled events go to the new owner");
            let mut state = self.shared.lock();
            for partition in lost {
                state.drop_partition(partition);
            }
        }
        let Some(index) = members.iter().position(|m| *m == self.member) else {
            // Expired between the two statements: try again next heartbeat.
            return Ok(false);
        };
        let count = i32::try_from(members.len()).unwrap_or(i32::MAX).max(1);
        let index = i32::try_from(index).unwrap_or(0);
        let assigned: BTreeSet<i32> = (0..self.partitions)
            .filter(|p| p % count == index)
            .collect();

        // Give up what is no longer ours, committing what was settled.
        let revoked: Vec<i32> = {
            let state = self.shared.lock();
            state
                .partitions
                .keys()
                .filter(|p| !assigned.contains(p))
                .copied()
                .collect()
        };
        for partition in revoked {
            // Stop taking settlements first, so that none is acknowledged
            // to a handler and then missed by the final commit.
            let point = self.shared.lock().take_partition(partition);
            if let Some((cursor, settled)) = point {
                self.store
                    .commit(who, partition, cursor, &settled, true)
                    .await?;
            }
            tracing::debug!(topic = %self.topic, group = %self.group, partition, "partition handed over");
        }

        // Claim ours.
        let missing: Vec<i32> = {
            let state = self.shared.lock();
            assigned
                .iter()
                .filter(|p| !state.partitions.contains_key(p))
                .copied()
                .collect()
        };
        let mut all_owned = true;
        let mut claimed_any = false;
        for partition in missing {
            match self.store.claim(who, partition, self.lease).await? {
                Some(claimed) => {
                    claimed_any = true;
                    self.shared.lock().partitions.insert(
                        partition,
                        Partition::claimed(claimed.cursor, &claimed.settled),
                    );
                    tracing::debug!(topic = %self.topic, group = %self.group, partition, "partition claimed");
                }
                None => all_owned = false,
            }
        }
        let mut state = self.shared.lock();
        if all_owned && !state.joined {
            state.joined = true;
            drop(state);
            self.shared.changed.notify_waiters();
        }
        Ok(claimed_any)
    }

    /// Commits the partitions whose commit point moved.
    async fn commit_all(&self) -> Result<()> {
        let due: Vec<(i32, Pos, String)> = {
            let mut state = self.shared.lock();
            state
                .partitions
                .iter_mut()
                .filter_map(|(partition, p)| {
                    let point = p.commit_point();
                    (point != p.committed).then_some((*partition, point.0, point.1))
                })
                .collect()
        };
        for (partition, cursor, settled) in due {
            let owner = self
                .store
                .commit(self.who(), partition, cursor, &settled, false)
                .await?;
            let mut state = self.shared.lock();
            if owner {
                if let Some(p) = state.partitions.get_mut(&partition) {
                    p.committed = (cursor, settled);
                }
            } else {
                tracing::warn!(topic = %self.topic, group = %self.group, partition, "partition lost before commit; its settled events may be delivered again");
                state.drop_partition(partition);
            }
        }
        Ok(())
    }

    /// Reads every owned partition once; `true` if one had more rows.
    async fn fetch_all(&self, stop: &CancellationToken) -> Result<bool> {
        let owned: Vec<(i32, Pos)> = {
            let state = self.shared.lock();
            let mut owned: Vec<_> = state
                .partitions
                .iter()
                .map(|(partition, p)| (*partition, p.fetched))
                .collect();
            owned.sort_unstable();
            owned
        };
        let mut more = false;
        for (partition, after) in owned {
            if self.is_full() || stop.is_cancelled() {
                return Ok(false);
            }
            if let Fetched::More = self.fetch(partition, after, stop).await? {
                more = true;
            }
        }
        Ok(more)
    }

    async fn fetch(&self, partition: i32, after: Pos, stop: &CancellationToken) -> Result<Fetched> {
        let rows = self
            .store
            .fetch(self.topic.as_str(), partition, after, self.fetch_batch)
            .await?;
        let full_batch = rows.len() >= usize::try_from(self.fetch_batch).unwrap_or(usize::MAX);
        if rows.is_empty() {
            return Ok(Fetched::Idle);
        }
        let mut batch = Vec::with_capacity(rows.len());
        for row in rows {
            let skip = self
                .shared
                .lock()
                .partitions
                .get(&partition)
                .is_some_and(|p| p.settled.contains(&row.pos));
            if skip {
                batch.push((row.pos, None));
                continue;
            }
            match self.decode(&row) {
                Ok(event) => batch.push((row.pos, Some((row.key, event)))),
                Err(reason) => {
                    // Keep what came before, then move the bad row aside.
                    self.accept(partition, after, &mut batch);
                    if !self.dead_letter_row(&row, &reason, stop).await {
                        return Ok(Fetched::Idle);
                    }
                    let mut state = self.shared.lock();
                    if let Some(p) = state.partitions.get_mut(&partition) {
                        p.settled.insert(row.pos);
                        p.fetched = p.fetched.max(row.pos);
                    }
                }
            }
        }
        self.accept(partition, after, &mut batch);
        self.shared.changed.notify_waiters();
        Ok(if full_batch {
            Fetched::More
        } else {
            Fetched::Idle
        })
    }

    /// Hands decoded rows of `partition` to the dispatcher, if the partition
    /// is still ours and was not read meanwhile by a newer claim.
    fn accept(&self, partition: i32, after: Pos, batch: &mut Vec<ReadRow>) {
        let now = Instant::now();
        let mut state = self.shared.lock();
        let State {
            dispatcher,
            partitions,
            ..
        } = &mut *state;
        // Gone, or given up and claimed again since the read: stale rows.
        let Some(p) = partitions
            .get_mut(&partition)
            .filter(|p| p.fetched >= after)
        else {
            batch.clear();
            return;
        };
        for (pos, decoded) in batch.drain(..) {
            if pos <= p.fetched {
                continue;
            }
            p.fetched = pos;
            if let Some((key, event)) = decoded {
                let key = key
                    .or_else(|| event.partition_key().map(str::to_owned))
                    .map(Arc::from);
                p.pending.insert(pos);
                dispatcher.push(
                    key,
                    Record {
                        partition,
                        pos,
                        event: Arc::new(event),
                    },
                    now,
                );
            }
        }
    }

    fn decode(&self, row: &StoredRow) -> Result<Event> {
        crate::event::from_json_slice(&row.payload).map_err(|e| {
            Error::with_source(
                ErrorKind::Decode {
                    what: "a stored row as a CloudEvent",
                },
                e,
            )
        })
    }

    /// Copies a row that cannot be delivered to the dead-letter topic,
    /// retrying until the database has it; `false` if stopped first.
    async fn dead_letter_row(
        &self,
        row: &StoredRow,
        reason: &Error,
        stop: &CancellationToken,
    ) -> bool {
        tracing::error!(
            topic = %self.topic,
            partition = row.partition,
            seq = row.pos.seq,
            error = %reason,
            dead_letter_topic = %self.dead_letter,
            "undeliverable row moved to the dead-letter topic"
        );
        let reason = reason.to_string();
        let partition = row.key.as_deref().map_or_else(
            || {
                row.pos
                    .seq
                    .rem_euclid(i64::from(self.dead_letter_partitions.max(1)))
            },
            |k| i64::from(partition_of(k, self.dead_letter_partitions)),
        );
        let letter = || DeadLetter {
            topic: &self.dead_letter,
            partition: i32::try_from(partition).unwrap_or(0),
            origin_topic: self.topic.as_str(),
            reason: &reason,
            row,
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.store.dead_letter(letter()).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(error = %e, dead_letter_topic = %self.dead_letter, "dead-lettering failed; retrying");
                    if matches!(e.kind(), ErrorKind::Closed { .. }) {
                        return false;
                    }
                    tokio::select! {
                        () = stop.cancelled() => return false,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_point_stops_at_the_oldest_unsettled_and_lists_the_rest() {
        let pos = |seq| Pos { xid: 7, seq };
        let mut p = Partition::claimed(Pos::default(), "");
        p.fetched = pos(5);
        p.pending.extend([pos(2), pos(4)]);
        p.settled.extend([pos(1), pos(3), pos(5)]);
        let (cursor, list) = p.commit_point();
        assert_eq!(cursor, pos(1), "just before the oldest unsettled");
        assert_eq!(list, "7:3,7:5");
        p.pending.clear();
        assert_eq!(p.commit_point(), (pos(5), String::new()));
    }

    #[test]
    fn settled_lists_parse_leniently() {
        assert_eq!(
            parse_settled("1:2, 3:4,bad,5:x,"),
            vec![Pos { xid: 1, seq: 2 }, Pos { xid: 3, seq: 4 }]
        );
        let claimed = Partition::claimed(Pos { xid: 1, seq: 3 }, "1:2,1:4");
        assert_eq!(
            claimed.settled.len(),
            1,
            "positions at or before the cursor drop"
        );
    }
}

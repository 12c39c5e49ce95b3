//! Per-key ordering within one subscription, without I/O: messages fetched
//! from JetStream wait here until no earlier event with the same
//! `partitionkey` is in flight, nacked and due back, or still waiting itself.
//!
//! JetStream hands a pull consumer the next messages whatever their key, and
//! redelivers a nacked message later while the messages after it flow on. The
//! gate restores per-key order for one member of a consumer group: it yields
//! at most one event per key at a time, in stream order, and after a nack it
//! holds the key until the nacked message comes back.
//!
//! Callers pass `now`, so the logic is tested deterministically.
//!
//! The keys whose next message may go now are indexed by that message's
//! sequence, so a hand-out finds the earliest without looking at every key,
//! and nothing is scanned for nacked messages while none is awaited.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use foldhash::HashMap;
use tokio::time::Instant;

/// The shortest interval between progress acks of a held message.
const MIN_REFRESH: Duration = Duration::from_millis(100);

/// How long past its nack delay and ack deadline a key waits for a nacked
/// message before giving up on it (it went to another member).
const GRACE: Duration = Duration::from_secs(1);

/// Messages fetched but not yet handed out, per key.
#[derive(Debug)]
pub(crate) struct Gate<T> {
    keys: HashMap<Arc<str>, KeyState<T>>,
    /// Messages without a partition key: nothing holds them back.
    free: BTreeMap<u64, Held<T>>,
    /// Each key whose next message may be handed out now, by that message's
    /// sequence (a stream sequence is one message, of one key): every key's
    /// [`KeyState::deliverable`], kept up to date by [`reindex`] after each
    /// change to the key.
    ready: BTreeMap<u64, Arc<str>>,
    /// How many nacked messages all keys await.
    awaited: usize,
    len: usize,
    next_token: u64,
    refresh_every: Duration,
    give_up_after: Duration,
}

#[derive(Debug)]
struct Held<T> {
    item: T,
    /// When the broker must next hear that the message is still wanted.
    refresh_at: Instant,
}

#[derive(Debug)]
struct KeyState<T> {
    /// Fetched messages with this key, by stream sequence.
    held: BTreeMap<u64, Held<T>>,
    /// The message of this key handed out and not yet settled: (sequence, token).
    in_flight: Option<(u64, u64)>,
    /// Nacked messages expected back.
    awaiting: BTreeMap<u64, Awaited>,
    /// The sequence this key is indexed under in [`Gate::ready`], if any.
    ready_at: Option<u64>,
}

/// A nacked message a key waits for.
#[derive(Debug, Clone, Copy)]
struct Awaited {
    /// When the broker may redeliver it: set once the nack was sent.
    due: Option<Instant>,
    /// When to stop waiting for it.
    until: Instant,
}

impl<T> Default for KeyState<T> {
    fn default() -> Self {
        Self {
            held: BTreeMap::new(),
            in_flight: None,
            awaiting: BTreeMap::new(),
            ready_at: None,
        }
    }
}

impl<T> KeyState<T> {
    fn is_idle(&self) -> bool {
        self.held.is_empty() && self.in_flight.is_none() && self.awaiting.is_empty()
    }

    /// The sequence this key may hand out now, if any.
    fn deliverable(&self) -> Option<u64> {
        if self.in_flight.is_some() {
            return None;
        }
        let head = *self.held.first_key_value()?.0;
        match self.awaiting.first_key_value() {
            Some((&nacked, _)) if nacked < head => None,
            _ => Some(head),
        }
    }
}

/// Brings `key`'s entry in `ready` up to date after a change to its state.
fn reindex<T>(ready: &mut BTreeMap<u64, Arc<str>>, key: &Arc<str>, state: &mut KeyState<T>) {
    let deliverable = state.deliverable();
    if state.ready_at == deliverable {
        return;
    }
    if let Some(seq) = state.ready_at {
        ready.remove(&seq);
    }
    if let Some(seq) = deliverable {
        ready.insert(seq, Arc::clone(key));
    }
    state.ready_at = deliverable;
}

/// A message handed out by [`Gate::pop`].
#[derive(Debug)]
pub(crate) struct Popped<T> {
    /// Its stream sequence.
    pub(crate) seq: u64,
    /// Identifies this hand-out, so a stale settlement is ignored.
    pub(crate) token: u64,
    /// Its partition key.
    pub(crate) key: Option<Arc<str>>,
    /// The message.
    pub(crate) item: T,
}

/// How a handed-out message was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Acked or terminated: the key moves on.
    Done,
    /// Nacked (or dropped): the broker redelivers it after `delay`, and the
    /// key waits for it.
    Redeliver {
        /// The nack delay.
        delay: Duration,
    },
}

impl<T> Gate<T> {
    /// A gate for a consumer whose unsettled messages are redelivered after `ack_wait`.
    pub(crate) fn new(ack_wait: Duration) -> Self {
        Self {
            keys: HashMap::default(),
            free: BTreeMap::new(),
            ready: BTreeMap::new(),
            awaited: 0,
            len: 0,
            next_token: 0,
            refresh_every: (ack_wait / 2).max(MIN_REFRESH),
            give_up_after: ack_wait.saturating_add(GRACE),
        }
    }

    /// How many messages wait in the gate.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Adds a fetched message. A message already held with the same
    /// sequence (the broker redelivered it) is replaced by the newer copy.
    pub(crate) fn insert(&mut self, key: Option<Arc<str>>, seq: u64, item: T, now: Instant) {
        let held = Held {
            item,
            refresh_at: now + self.refresh_every,
        };
        let replaced = match key {
            None => self.free.insert(seq, held),
            Some(key) => {
                let state = self.keys.entry(Arc::clone(&key)).or_default();
                if state.awaiting.remove(&seq).is_some() {
                    self.awaited -= 1;
                }
                if state.in_flight.is_some_and(|(s, _)| s == seq) {
                    // The broker redelivered the message in flight: its ack
                    // deadline passed. The new copy replaces the old hand-out,
                    // whose settlement is now stale.
                    state.in_flight = None;
                }
                let replaced = state.held.insert(seq, held);
                reindex(&mut self.ready, &key, state);
                replaced
            }
        };
        if replaced.is_none() {
            self.len += 1;
        }
        self.check();
    }

    /// Hands out the deliverable message with the lowest stream sequence:
    /// one without a key, or the first of a key with nothing in flight and no
    /// earlier message due back.
    pub(crate) fn pop(&mut self, now: Instant) -> Option<Popped<T>> {
        self.expire(now);
        let free = self.free.first_key_value().map(|(&seq, _)| seq);
        let (seq, key) = match (free, self.ready.first_key_value()) {
            (Some(free), Some((keyed, _))) if free < *keyed => (free, None),
            (_, Some((keyed, key))) => (*keyed, Some(Arc::clone(key))),
            (Some(free), None) => (free, None),
            (None, None) => return None,
        };
        let token = self.next_token;
        self.next_token += 1;
        let held = match &key {
            None => self.free.remove(&seq)?,
            Some(key) => {
                let state = self.keys.get_mut(key)?;
                let held = state.held.remove(&seq)?;
                state.in_flight = Some((seq, token));
                reindex(&mut self.ready, key, state);
                held
            }
        };
        self.len -= 1;
        self.check();
        Some(Popped {
            seq,
            token,
            key,
            item: held.item,
        })
    }

    /// Records how hand-out `token` of message `seq` was settled. Returns
    /// whether that may let another message through; a stale token (the
    /// message was redelivered since) changes nothing.
    pub(crate) fn settle(
        &mut self,
        key: Option<&Arc<str>>,
        seq: u64,
        token: u64,
        settled: Settled,
        now: Instant,
    ) -> bool {
        let Some(key) = key else { return false };
        let Some(state) = self.keys.get_mut(key) else {
            return false;
        };
        if state.in_flight != Some((seq, token)) {
            return false;
        }
        state.in_flight = None;
        if let Settled::Redeliver { delay } = settled {
            let awaited = Awaited {
                due: None,
                until: now + delay.saturating_add(self.give_up_after),
            };
            if state.awaiting.insert(seq, awaited).is_none() {
                self.awaited += 1;
            }
        }
        reindex(&mut self.ready, key, state);
        if state.is_idle() {
            self.keys.remove(key);
        }
        self.check();
        true
    }

    /// Records that the nack of message `seq`, which its key waits for, was
    /// sent: the broker may redeliver it from `now + delay` on.
    pub(crate) fn nack_sent(&mut self, key: &Arc<str>, seq: u64, delay: Duration, now: Instant) {
        let give_up_after = self.give_up_after;
        if let Some(awaited) = self
            .keys
            .get_mut(key)
            .and_then(|s| s.awaiting.get_mut(&seq))
        {
            let due = now + delay;
            awaited.due = Some(due);
            awaited.until = awaited.until.max(due + give_up_after);
        }
    }

    /// Whether `key` still waits for nacked message `seq` (`None`: no), and
    /// if so whether its nack was sent and its delay has passed by `now`.
    pub(crate) fn awaits(&self, key: &Arc<str>, seq: u64, now: Instant) -> Option<bool> {
        let awaited = self.keys.get(key)?.awaiting.get(&seq)?;
        Some(awaited.due.is_some_and(|due| due <= now))
    }

    fn awaited(&self) -> impl Iterator<Item = &Awaited> {
        // Most of the time nothing is awaited: no key is looked at then.
        let keys = if self.awaited == 0 {
            None
        } else {
            Some(self.keys.values())
        };
        keys.into_iter().flatten().flat_map(|s| s.awaiting.values())
    }

    /// How many awaited redeliveries the broker may send by `now`. Each
    /// needs room in a pull request beyond the prefetch, or the keys waiting
    /// for them could hold the whole prefetch window and stall.
    pub(crate) fn redeliveries_due(&self, now: Instant) -> usize {
        self.awaited()
            .filter(|a| a.due.is_some_and(|due| due <= now))
            .count()
    }

    /// When the next awaited redelivery the broker may not send yet becomes due.
    pub(crate) fn next_redelivery_due(&self, now: Instant) -> Option<Instant> {
        self.awaited()
            .filter_map(|a| a.due)
            .filter(|&due| due > now)
            .min()
    }

    /// When [`pop`](Self::pop) may next find something without a new message
    /// or settlement: when a key stops waiting for a nacked message.
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        self.awaited().map(|a| a.until).min()
    }

    /// When the next held message needs a progress ack.
    pub(crate) fn next_refresh(&self) -> Option<Instant> {
        self.held().map(|h| h.refresh_at).min()
    }

    /// Calls `f` on every held message due for a progress ack, and schedules
    /// its next one.
    pub(crate) fn refresh_due(&mut self, now: Instant, mut f: impl FnMut(&T)) {
        let next = now + self.refresh_every;
        let held = self
            .free
            .values_mut()
            .chain(self.keys.values_mut().flat_map(|s| s.held.values_mut()));
        for h in held.filter(|h| h.refresh_at <= now) {
            f(&h.item);
            h.refresh_at = next;
        }
    }

    /// Removes and returns every held message, by stream sequence.
    pub(crate) fn drain(&mut self) -> Vec<(u64, T)> {
        let mut all: Vec<(u64, T)> = std::mem::take(&mut self.free)
            .into_iter()
            .map(|(seq, h)| (seq, h.item))
            .collect();
        for (key, state) in &mut self.keys {
            all.extend(
                std::mem::take(&mut state.held)
                    .into_iter()
                    .map(|(seq, h)| (seq, h.item)),
            );
            reindex(&mut self.ready, key, state);
        }
        self.keys.retain(|_, s| !s.is_idle());
        self.len = 0;
        self.check();
        all.sort_by_key(|(seq, _)| *seq);
        all
    }

    fn held(&self) -> impl Iterator<Item = &Held<T>> {
        self.free
            .values()
            .chain(self.keys.values().flat_map(|s| s.held.values()))
    }

    /// Stops waiting for nacked messages that did not come back in time:
    /// another member of the group got them.
    fn expire(&mut self, now: Instant) {
        if self.awaited == 0 {
            return;
        }
        let (ready, count) = (&mut self.ready, &mut self.awaited);
        self.keys.retain(|key, state| {
            state.awaiting.retain(|seq, awaited| {
                let keep = awaited.until > now;
                if !keep {
                    *count -= 1;
                    tracing::warn!(
                        partition.key = %key,
                        stream.sequence = seq,
                        "a nacked event was not redelivered to this subscription in time; \
                         later events of its key are released"
                    );
                }
                keep
            });
            reindex(ready, key, state);
            !state.is_idle()
        });
        self.check();
    }

    /// In debug builds, checks [`consistent`](Self::consistent).
    fn check(&self) {
        debug_assert!(
            self.consistent(),
            "the gate's ready index or awaited count is stale"
        );
    }

    /// Whether the ready index and the awaited count agree with the keys,
    /// and no idle key is kept.
    fn consistent(&self) -> bool {
        let ready: BTreeMap<u64, Arc<str>> = self
            .keys
            .iter()
            .filter_map(|(key, state)| Some((state.deliverable()?, Arc::clone(key))))
            .collect();
        let awaited: usize = self.keys.values().map(|s| s.awaiting.len()).sum();
        self.ready == ready && self.awaited == awaited && self.keys.values().all(|s| !s.is_idle())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(30);

    fn key(k: &str) -> Option<Arc<str>> {
        Some(Arc::from(k))
    }

    fn seqs(gate: &mut Gate<&'static str>, now: Instant) -> Vec<u64> {
        std::iter::from_fn(|| gate.pop(now))
            .map(|p| p.seq)
            .collect()
    }

    #[test]
    fn one_event_per_key_in_flight_in_stream_order() {
        let now = Instant::now();
        let mut gate = Gate::new(WAIT);
        gate.insert(key("a"), 1, "a1", now);
        gate.insert(key("a"), 2, "a2", now);
        gate.insert(key("b"), 3, "b3", now);
        gate.insert(None, 4, "free", now);
        assert_eq!(gate.len(), 4);
        let a1 = gate.pop(now).expect("a1");
        assert_eq!((a1.seq, a1.item), (1, "a1"));
        assert_eq!(seqs(&mut gate, now), vec![3, 4], "a2 waits for a1");
        assert!(gate.settle(a1.key.as_ref(), 1, a1.token, Settled::Done, now));
        assert_eq!(seqs(&mut gate, now), vec![2]);
        assert_eq!(gate.len(), 0);
    }

    #[test]
    fn a_nacked_event_comes_back_before_later_ones_of_its_key() {
        let now = Instant::now();
        let mut gate = Gate::new(WAIT);
        for seq in 1..=3 {
            gate.insert(key("k"), seq, "k", now);
        }
        let first = gate.pop(now).expect("1");
        let delay = Duration::from_millis(300);
        gate.settle(
            first.key.as_ref(),
            1,
            first.token,
            Settled::Redeliver { delay },
            now,
        );
        assert!(gate.pop(now).is_none(), "2 and 3 wait for 1");
        assert!(gate.wake_at().is_some_and(|t| t > now + delay));
        gate.insert(key("k"), 1, "again", now + delay);
        let again = gate.pop(now + delay).expect("1 again");
        assert_eq!((again.seq, again.item), (1, "again"));
        gate.settle(again.key.as_ref(), 1, again.token, Settled::Done, now);
        assert_eq!(gate.pop(now).expect("2").seq, 2);
    }

    #[test]
    fn a_key_stops_waiting_for_a_nacked_event_another_member_took() {
        let now = Instant::now();
        let mut gate = Gate::new(WAIT);
        gate.insert(key("k"), 1, "1", now);
        gate.insert(key("k"), 2, "2", now);
        let first = gate.pop(now).expect("1");
        gate.settle(
            first.key.as_ref(),
            1,
            first.token,
            Settled::Redeliver {
                delay: Duration::ZERO,
            },
            now,
        );
        assert!(gate.pop(now + WAIT).is_none());
        let later = gate.wake_at().expect("a deadline");
        assert_eq!(gate.pop(later).expect("given up on 1").seq, 2);
    }

    #[test]
    fn a_nacked_event_needs_a_pull_once_its_nack_is_sent_and_due() {
        let now = Instant::now();
        let mut gate = Gate::new(WAIT);
        gate.insert(key("k"), 1, "1", now);
        gate.insert(key("k"), 2, "2", now);
        let first = gate.pop(now).expect("1");
        let delay = Duration::from_millis(300);
        gate.settle(
            first.key.as_ref(),
            1,
            first.token,
            Settled::Redeliver { delay },
            now,
        );
        assert_eq!(
            gate.redeliveries_due(now + WAIT),
            0,
            "the nack is not sent yet"
        );
        assert_eq!(gate.next_redelivery_due(now), None);
        let k: Arc<str> = Arc::from("k");
        gate.nack_sent(&k, 1, delay, now);
        assert_eq!(gate.redeliveries_due(now), 0, "not before its delay");
        assert_eq!(gate.next_redelivery_due(now), Some(now + delay));
        assert_eq!(gate.redeliveries_due(now + delay), 1);
        gate.insert(key("k"), 1, "1 again", now + delay);
        assert_eq!(gate.redeliveries_due(now + delay), 0, "it came back");
        assert_eq!(gate.pop(now + delay).expect("1 again").item, "1 again");
    }

    #[test]
    fn redelivery_after_the_ack_deadline_replaces_the_stale_hand_out() {
        let now = Instant::now();
        let mut gate = Gate::new(WAIT);
        gate.insert(key("k"), 1, "old", now);
        gate.insert(key("k"), 2, "2", now);
        let stale = gate.pop(now).expect("1");
        gate.insert(key("k"), 1, "new", now + WAIT);
        let fresh = gate.pop(now + WAIT).expect("1 redelivered");
        assert_eq!(fresh.item, "new");
        assert!(
            !gate.settle(stale.key.as_ref(), 1, stale.token, Settled::Done, now),
            "the stale hand-out settles nothing"
        );
        assert!(
            gate.pop(now + WAIT).is_none(),
            "2 still waits for the fresh 1"
        );
        assert!(gate.settle(fresh.key.as_ref(), 1, fresh.token, Settled::Done, now));
        assert_eq!(gate.pop(now + WAIT).expect("2").seq, 2);
    }

    #[test]
    fn duplicates_replace_and_held_messages_are_refreshed_and_drained_in_order() {
        let now = Instant::now();
        let mut gate = Gate::new(Duration::from_secs(2));
        gate.insert(key("k"), 5, "5", now);
        gate.insert(None, 3, "3", now);
        gate.insert(key("k"), 5, "5 again", now);
        assert_eq!(gate.len(), 2);
        assert_eq!(gate.next_refresh(), Some(now + Duration::from_secs(1)));
        let mut refreshed = Vec::new();
        gate.refresh_due(now + Duration::from_secs(1), |item| refreshed.push(*item));
        refreshed.sort_unstable();
        assert_eq!(refreshed, vec!["3", "5 again"]);
        assert_eq!(gate.next_refresh(), Some(now + Duration::from_secs(2)));
        assert_eq!(gate.drain(), vec![(3, "3"), (5, "5 again")]);
        assert_eq!(gate.len(), 0);
        assert!(gate.pop(now).is_none());
    }

    /// One step of a random workload.
    #[derive(Debug, Clone)]
    enum Op {
        /// A message fetched (again, if its sequence was seen).
        Fetch(u64),
        Pop,
        /// Settles the hand-out at this index of those outstanding.
        Settle(usize, bool),
        /// Sends the nack of the message at this sequence, if awaited.
        NackSent(u64),
        Advance(u64),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0_u64..40).prop_map(Op::Fetch),
            4 => Just(Op::Pop),
            3 => (any::<usize>(), any::<bool>()).prop_map(|(i, r)| Op::Settle(i, r)),
            1 => (0_u64..40).prop_map(Op::NackSent),
            1 => (0_u64..3_000).prop_map(Op::Advance),
        ]
    }

    /// A message's key is fixed by its sequence; every fifth has none.
    fn key_of(seq: u64) -> Option<Arc<str>> {
        (!seq.is_multiple_of(5)).then(|| Arc::from(format!("k{}", seq % 3)))
    }

    proptest::proptest! {
        /// Whatever the order of fetches, hand-outs, acks, nacks and time,
        /// the ready index and the awaited count agree with the keys, a key
        /// never has two hand-outs settling at once, and a key's messages
        /// go out in stream order unless one was nacked.
        #[test]
        fn the_index_follows_every_change(ops in proptest::collection::vec(op(), 1..120)) {
            let delay = Duration::from_millis(500);
            let mut now = Instant::now();
            let mut gate = Gate::new(Duration::from_secs(2));
            let mut out: Vec<Popped<u64>> = Vec::new();
            for op in ops {
                match op {
                    Op::Fetch(seq) => gate.insert(key_of(seq), seq, seq, now),
                    Op::Pop => {
                        if let Some(p) = gate.pop(now) {
                            proptest::prop_assert_eq!(p.item, p.seq);
                            // Another live hand-out of its key would be a
                            // second message of the key in flight.
                            let live = |q: &&Popped<u64>| {
                                q.key.is_some() && q.key == p.key && q.seq != p.seq
                                    && gate.keys.get(q.key.as_ref().expect("key"))
                                        .is_some_and(|s| s.in_flight == Some((q.seq, q.token)))
                            };
                            proptest::prop_assert!(out.iter().find(live).is_none());
                            out.push(p);
                        }
                    }
                    Op::Settle(i, redeliver) if !out.is_empty() => {
                        let p = out.remove(i % out.len());
                        let settled = if redeliver { Settled::Redeliver { delay } } else { Settled::Done };
                        gate.settle(p.key.as_ref(), p.seq, p.token, settled, now);
                    }
                    Op::Settle(..) => {}
                    Op::NackSent(seq) => {
                        if let Some(key) = key_of(seq) {
                            gate.nack_sent(&key, seq, delay, now);
                        }
                    }
                    Op::Advance(ms) => now += Duration::from_millis(ms),
                }
                proptest::prop_assert!(gate.consistent(), "stale after {:?}", gate);
            }
            // Everything fetched still goes out once all is settled.
            for p in out.drain(..) {
                gate.settle(p.key.as_ref(), p.seq, p.token, Settled::Done, now);
            }
            let later = now + Duration::from_secs(60);
            while let Some(p) = gate.pop(later) {
                gate.settle(p.key.as_ref(), p.seq, p.token, Settled::Done, later);
            }
            proptest::prop_assert_eq!(gate.len(), 0);
            proptest::prop_assert!(gate.consistent());
        }
    }
}

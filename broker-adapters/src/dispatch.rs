//! Per-key dispatch for adapters whose broker hands over messages faster than
//! handlers settle them: which buffered message may be delivered next so
//! that events with one partition key are handled in order, nacked ones come
//! back after their delay, and unsettled ones come back after their ack
//! deadline — without blocking other keys.
//!
//! No I/O and no clock of its own: callers pass `now`.

pub(crate) mod buffered;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use foldhash::HashMap;
use tokio::time::Instant;

use crate::subscriber::AckKind;

#[derive(Debug)]
struct Entry<M> {
    key: Option<Arc<str>>,
    msg: M,
}

#[derive(Debug, Clone, Copy)]
struct Ready {
    /// Deliveries so far.
    attempts: u32,
    not_before: Instant,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    token: u64,
    attempt: u32,
    deadline: Instant,
}

/// A message handed out for delivery.
#[derive(Debug)]
pub(crate) struct Pulled<'a, M> {
    /// Its place in arrival order.
    pub(crate) seq: u64,
    /// Identifies this delivery among redeliveries of the same message.
    pub(crate) token: u64,
    /// 1 for the first delivery.
    pub(crate) attempt: u32,
    pub(crate) msg: &'a M,
}

/// The buffered messages of one subscription, in arrival order.
#[derive(Debug)]
pub(crate) struct Dispatcher<M> {
    /// Buffered messages by sequence number: `entries[seq - base]`, `None`
    /// once settled. Sequence numbers only grow, so this is a queue.
    entries: VecDeque<Option<Entry<M>>>,
    base: u64,
    len: usize,
    ready: BTreeMap<u64, Ready>,
    in_flight: HashMap<u64, InFlight>,
    /// No delivery in flight has an earlier ack deadline (`None`: none in
    /// flight since the last look). Kept low, not exact, as deliveries are
    /// settled, so a hand-out looks for expired deliveries only once this
    /// has passed.
    expiry_bound: Option<Instant>,
    /// A key is present while one of its messages is ready or in flight; the
    /// queue holds its later messages, in order.
    held: HashMap<Arc<str>, VecDeque<u64>>,
    next_seq: u64,
    next_token: u64,
}

impl<M> Default for Dispatcher<M> {
    fn default() -> Self {
        Self {
            entries: VecDeque::new(),
            base: 0,
            len: 0,
            ready: BTreeMap::new(),
            in_flight: HashMap::default(),
            expiry_bound: None,
            held: HashMap::default(),
            next_seq: 0,
            next_token: 0,
        }
    }
}

impl<M> Dispatcher<M> {
    /// Buffers a message that arrived; returns its sequence number.
    pub(crate) fn push(&mut self, key: Option<Arc<str>>, msg: M, now: Instant) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        match &key {
            Some(k) => match self.held.get_mut(k) {
                Some(queue) => queue.push_back(seq),
                None => {
                    self.held.insert(Arc::clone(k), VecDeque::new());
                    self.ready.insert(
                        seq,
                        Ready {
                            attempts: 0,
                            not_before: now,
                        },
                    );
                }
            },
            None => {
                self.ready.insert(
                    seq,
                    Ready {
                        attempts: 0,
                        not_before: now,
                    },
                );
            }
        }
        self.entries.push_back(Some(Entry { key, msg }));
        self.len += 1;
        seq
    }

    fn remove(&mut self, seq: u64) -> Option<Entry<M>> {
        let index = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        let entry = self.entries.get_mut(index)?.take()?;
        self.len -= 1;
        while matches!(self.entries.front(), Some(None)) {
            self.entries.pop_front();
            self.base += 1;
        }
        Some(entry)
    }

    /// How many messages are buffered, in flight included.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Hands out the oldest deliverable message, or says when to look again
    /// (`None`: only after a push or a settle).
    pub(crate) fn pull(
        &mut self,
        now: Instant,
        ack_wait: Duration,
    ) -> Result<Pulled<'_, M>, Option<Instant>> {
        self.expire(now);
        let due = self
            .ready
            .iter()
            .find(|(_, r)| r.not_before <= now)
            .map(|(seq, r)| (*seq, r.attempts));
        let Some((seq, attempts)) = due else {
            return Err(self.wake_at());
        };
        self.ready.remove(&seq);
        self.next_token += 1;
        let token = self.next_token;
        let attempt = attempts.saturating_add(1);
        let deadline = now + ack_wait;
        self.lower_expiry_bound(deadline);
        self.in_flight.insert(
            seq,
            InFlight {
                token,
                attempt,
                deadline,
            },
        );
        let index = seq
            .checked_sub(self.base)
            .and_then(|i| usize::try_from(i).ok())
            .unwrap_or(usize::MAX);
        match self.entries.get(index).and_then(Option::as_ref) {
            Some(entry) => Ok(Pulled {
                seq,
                token,
                attempt,
                msg: &entry.msg,
            }),
            // Every ready seq has an entry; stay safe if that ever breaks.
            None => {
                self.in_flight.remove(&seq);
                Err(None)
            }
        }
    }

    /// Records a settlement. An ack or term removes the message whoever holds
    /// it now and returns it; a nack applies only to the delivery `token`
    /// names, so a stale handle cannot disturb a newer delivery.
    pub(crate) fn settle(
        &mut self,
        seq: u64,
        token: u64,
        kind: AckKind,
        now: Instant,
    ) -> Settled<M> {
        match kind {
            AckKind::Nack(delay) => match self.in_flight.get(&seq) {
                Some(f) if f.token == token => {
                    let attempts = f.attempt;
                    self.in_flight.remove(&seq);
                    self.ready.insert(
                        seq,
                        Ready {
                            attempts,
                            not_before: now + delay.unwrap_or_default(),
                        },
                    );
                    Settled::Requeued
                }
                _ => Settled::Stale,
            },
            AckKind::Ack | AckKind::Term => {
                let pending =
                    self.in_flight.remove(&seq).is_some() || self.ready.remove(&seq).is_some();
                if !pending {
                    return Settled::Stale;
                }
                match self.remove(seq) {
                    Some(entry) => {
                        self.release(entry.key.as_ref(), now);
                        Settled::Done(entry.msg)
                    }
                    None => Settled::Stale,
                }
            }
        }
    }

    /// Resets the ack deadline of the delivery `token` names.
    pub(crate) fn touch(&mut self, seq: u64, token: u64, deadline: Instant) -> bool {
        match self.in_flight.get_mut(&seq) {
            Some(f) if f.token == token => {
                f.deadline = deadline;
                self.lower_expiry_bound(deadline);
                true
            }
            _ => false,
        }
    }

    /// Drops every message for which `keep` is false (e.g. of partitions this
    /// member no longer owns), letting later messages of their keys through.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&M) -> bool, now: Instant) {
        let dropped: Vec<u64> = self
            .entries
            .iter()
            .zip(self.base..)
            .filter_map(|(e, seq)| e.as_ref().filter(|e| !keep(&e.msg)).map(|_| seq))
            .collect();
        for seq in dropped {
            let was_head =
                self.in_flight.remove(&seq).is_some() || self.ready.remove(&seq).is_some();
            let Some(entry) = self.remove(seq) else {
                continue;
            };
            if was_head {
                self.release(entry.key.as_ref(), now);
            } else if let Some(queue) = entry.key.as_ref().and_then(|k| self.held.get_mut(k)) {
                queue.retain(|s| *s != seq);
            }
        }
    }

    fn lower_expiry_bound(&mut self, deadline: Instant) {
        self.expiry_bound = Some(self.expiry_bound.map_or(deadline, |b| b.min(deadline)));
    }

    /// Makes the deliveries whose ack deadline passed ready again, and the
    /// expiry bound exact.
    fn expire(&mut self, now: Instant) {
        if self.expiry_bound.is_none_or(|bound| bound > now) {
            return;
        }
        let mut expired = Vec::new();
        let mut earliest = None::<Instant>;
        for (seq, f) in &self.in_flight {
            if f.deadline <= now {
                expired.push((*seq, f.attempt));
            } else {
                earliest = Some(earliest.map_or(f.deadline, |e| e.min(f.deadline)));
            }
        }
        self.expiry_bound = earliest;
        for (seq, attempts) in expired {
            self.in_flight.remove(&seq);
            self.ready.insert(
                seq,
                Ready {
                    attempts,
                    not_before: now,
                },
            );
        }
    }

    fn release(&mut self, key: Option<&Arc<str>>, now: Instant) {
        let Some(key) = key else { return };
        match self.held.get_mut(key).and_then(VecDeque::pop_front) {
            Some(next) => {
                self.ready.insert(
                    next,
                    Ready {
                        attempts: 0,
                        not_before: now,
                    },
                );
            }
            None => {
                self.held.remove(key);
            }
        }
    }

    /// When something may next be due: a delayed redelivery, or an ack
    /// deadline (at the bound, so possibly early, never late).
    fn wake_at(&self) -> Option<Instant> {
        let ready = self.ready.values().map(|r| r.not_before);
        ready.chain(self.expiry_bound).min()
    }
}

/// Waits for what a dispatcher-backed subscription yields next. `try_next`
/// returns it (`Ok`), or when to look again (`Err`; `None`: only once
/// `changed` is notified, after a push or a settle).
pub(crate) async fn next_when_ready<T>(
    changed: &tokio::sync::Notify,
    mut try_next: impl FnMut() -> Result<T, Option<Instant>>,
) -> T {
    // The common case, something buffered, needs no waiter registration.
    if let Ok(found) = try_next() {
        return found;
    }
    loop {
        // Registered before looking, so a change in between is not missed.
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let wake_at = match try_next() {
            Ok(found) => return found,
            Err(wake_at) => wake_at,
        };
        match wake_at {
            Some(at) => {
                tokio::select! {
                    () = &mut notified => {}
                    () = tokio::time::sleep_until(at) => {}
                }
            }
            None => notified.await,
        }
    }
}

/// Finishes subscribing a member whose pump task is running: waits at most
/// `join_wait` until `joined` says the member holds its partitions
/// (`Some(Ok(()))`) or cannot (`Some(Err(_))`; `None`: not yet, look again
/// once `changed` is notified). A member that does not join stops its pump
/// and fails; one that does yields `deliveries`, built with the guard that
/// stops the pump when the subscription is dropped. Closing the
/// subscription stops the pump and waits for it (its last commit).
pub(crate) async fn join_then_subscribe<D>(
    changed: &tokio::sync::Notify,
    join_wait: Duration,
    mut joined: impl FnMut() -> Option<crate::Result<()>>,
    stop: tokio_util::sync::CancellationToken,
    pump: tokio::task::JoinHandle<crate::Result<()>>,
    what: &'static str,
    deliveries: impl FnOnce(tokio_util::sync::DropGuard) -> D,
) -> crate::Result<crate::Subscription>
where
    D: futures_util::Stream<Item = crate::Result<crate::Delivery>> + Send + 'static,
{
    use crate::error::{Error, ErrorKind};
    let outcome =
        tokio::time::timeout(join_wait, next_when_ready(changed, || joined().ok_or(None)))
            .await
            .unwrap_or_else(|_| {
                Err(Error::new(ErrorKind::Timeout {
                    operation: "joining the consumer group",
                    after: join_wait,
                }))
            });
    if let Err(e) = outcome {
        stop.cancel();
        let _ = pump.await;
        return Err(e);
    }
    let deliveries = deliveries(stop.clone().drop_guard());
    Ok(
        crate::Subscription::new(Box::pin(deliveries)).with_close(move || {
            Box::pin(async move {
                stop.cancel();
                pump.await
                    .map_err(|e| Error::with_source(ErrorKind::Closed { what }, e))?
            })
        }),
    )
}

/// The outcome of [`Dispatcher::settle`].
#[derive(Debug)]
pub(crate) enum Settled<M> {
    /// Acked or terminated: removed from the buffer.
    Done(M),
    /// Nacked: it will be delivered again.
    Requeued,
    /// Nothing changed: already settled, or a stale handle.
    Stale,
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(30);

    fn key(k: &str) -> Option<Arc<str>> {
        Some(Arc::from(k))
    }

    #[test]
    fn keys_are_held_back_others_flow_and_nack_keeps_order() {
        let now = Instant::now();
        let mut d = Dispatcher::default();
        d.push(key("a"), "a1", now);
        d.push(key("a"), "a2", now);
        d.push(key("b"), "b1", now);
        d.push(None, "n1", now);
        let a1 = d.pull(now, WAIT).map(|p| (p.seq, p.token)).expect("a1");
        assert_eq!(*d.pull(now, WAIT).expect("b1").msg, "b1");
        assert_eq!(*d.pull(now, WAIT).expect("n1").msg, "n1");
        assert!(d.pull(now, WAIT).is_err(), "a2 waits");
        let delay = Duration::from_millis(10);
        assert!(matches!(
            d.settle(a1.0, a1.1, AckKind::Nack(Some(delay)), now),
            Settled::Requeued
        ));
        assert_eq!(d.pull(now, WAIT).err(), Some(Some(now + delay)));
        let again = d.pull(now + delay, WAIT).expect("a1 again");
        assert_eq!((*again.msg, again.attempt), ("a1", 2));
        let (seq, token) = (again.seq, again.token);
        assert!(matches!(
            d.settle(seq, token, AckKind::Ack, now),
            Settled::Done("a1")
        ));
        assert_eq!(*d.pull(now, WAIT).expect("a2").msg, "a2");
    }

    #[test]
    fn ack_deadline_redelivers_and_stale_nacks_are_ignored() {
        let now = Instant::now();
        let mut d = Dispatcher::default();
        d.push(None, 1, now);
        let first = d.pull(now, WAIT).map(|p| (p.seq, p.token)).expect("first");
        let later = now + WAIT;
        let second = d
            .pull(later, WAIT)
            .map(|p| (p.seq, p.token, p.attempt))
            .expect("again");
        assert_eq!(second.2, 2);
        assert!(matches!(
            d.settle(first.0, first.1, AckKind::Nack(None), later),
            Settled::Stale
        ));
        assert!(!d.touch(first.0, first.1, later));
        assert!(d.touch(second.0, second.1, later + WAIT));
        assert!(matches!(
            d.settle(second.0, second.1, AckKind::Term, later),
            Settled::Done(1)
        ));
        assert!(matches!(
            d.settle(second.0, second.1, AckKind::Ack, later),
            Settled::Stale
        ));
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn retain_drops_messages_and_unblocks_their_keys() {
        let now = Instant::now();
        let mut d = Dispatcher::default();
        d.push(key("a"), (0, "a1"), now);
        d.push(key("a"), (1, "a2"), now);
        d.push(key("a"), (0, "a3"), now);
        let _ = d.pull(now, WAIT).expect("a1");
        // Partition 0 revoked: a1 (in flight) and a3 (held) go, a2 moves up.
        d.retain(|(partition, _)| *partition != 0, now);
        assert_eq!(d.len(), 1);
        assert_eq!(d.pull(now, WAIT).expect("a2").msg.1, "a2");
        assert!(d.pull(now, WAIT).is_err());
    }

    mod model {
        //! The dispatcher beside a naive model of it: every message's state
        //! in a list, every rule applied by a scan.

        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone, Copy, PartialEq)]
        enum St {
            Held,
            Ready {
                attempts: u32,
                not_before: Instant,
            },
            InFlight {
                token: u64,
                attempt: u32,
                deadline: Instant,
            },
            Gone,
        }

        #[derive(Default)]
        struct Model {
            msgs: Vec<(Option<u8>, St)>,
            next_token: u64,
        }

        impl Model {
            fn active(&self, key: u8) -> bool {
                self.msgs.iter().any(|(k, st)| {
                    *k == Some(key) && matches!(st, St::Ready { .. } | St::InFlight { .. })
                })
            }

            fn promote(&mut self, key: Option<u8>, now: Instant) {
                let Some(key) = key else { return };
                if self.active(key) {
                    return;
                }
                if let Some((_, st)) = self
                    .msgs
                    .iter_mut()
                    .find(|(k, st)| *k == Some(key) && *st == St::Held)
                {
                    *st = St::Ready {
                        attempts: 0,
                        not_before: now,
                    };
                }
            }

            fn push(&mut self, key: Option<u8>, now: Instant) {
                let held = key.is_some_and(|k| {
                    self.msgs
                        .iter()
                        .any(|(m, st)| *m == Some(k) && *st != St::Gone)
                });
                let st = if held {
                    St::Held
                } else {
                    St::Ready {
                        attempts: 0,
                        not_before: now,
                    }
                };
                self.msgs.push((key, st));
            }

            fn pull(
                &mut self,
                now: Instant,
                wait: Duration,
            ) -> Result<(u64, u64, u32), Option<Instant>> {
                for (_, st) in &mut self.msgs {
                    if let St::InFlight {
                        attempt, deadline, ..
                    } = *st
                        && deadline <= now
                    {
                        *st = St::Ready {
                            attempts: attempt,
                            not_before: now,
                        };
                    }
                }
                let due = self.msgs.iter().position(
                    |(_, st)| matches!(st, St::Ready { not_before, .. } if *not_before <= now),
                );
                let Some(seq) = due else {
                    return Err(self
                        .msgs
                        .iter()
                        .filter_map(|(_, st)| match st {
                            St::Ready { not_before, .. } => Some(*not_before),
                            St::InFlight { deadline, .. } => Some(*deadline),
                            _ => None,
                        })
                        .min());
                };
                let St::Ready { attempts, .. } = self.msgs[seq].1 else {
                    unreachable!("found ready");
                };
                self.next_token += 1;
                let attempt = attempts + 1;
                self.msgs[seq].1 = St::InFlight {
                    token: self.next_token,
                    attempt,
                    deadline: now + wait,
                };
                Ok((seq as u64, self.next_token, attempt))
            }

            fn settle(
                &mut self,
                seq: u64,
                token: u64,
                kind: AckKind,
                now: Instant,
            ) -> Settled<u64> {
                let Some((key, st)) = self.msgs.get(seq as usize).copied() else {
                    return Settled::Stale;
                };
                match kind {
                    AckKind::Nack(delay) => match st {
                        St::InFlight {
                            token: t, attempt, ..
                        } if t == token => {
                            self.msgs[seq as usize].1 = St::Ready {
                                attempts: attempt,
                                not_before: now + delay.unwrap_or_default(),
                            };
                            Settled::Requeued
                        }
                        _ => Settled::Stale,
                    },
                    AckKind::Ack | AckKind::Term => match st {
                        St::Ready { .. } | St::InFlight { .. } => {
                            self.msgs[seq as usize].1 = St::Gone;
                            self.promote(key, now);
                            Settled::Done(seq)
                        }
                        _ => Settled::Stale,
                    },
                }
            }

            fn touch(&mut self, seq: u64, token: u64, to: Instant) -> bool {
                match self.msgs.get_mut(seq as usize) {
                    Some((
                        _,
                        St::InFlight {
                            token: t, deadline, ..
                        },
                    )) if *t == token => {
                        *deadline = to;
                        true
                    }
                    _ => false,
                }
            }

            fn retain(&mut self, keep: impl Fn(u64) -> bool, now: Instant) {
                for seq in 0..self.msgs.len() {
                    let (key, st) = self.msgs[seq];
                    if st == St::Gone || keep(seq as u64) {
                        continue;
                    }
                    self.msgs[seq].1 = St::Gone;
                    if st != St::Held {
                        self.promote(key, now);
                    }
                }
            }

            fn len(&self) -> usize {
                self.msgs.iter().filter(|(_, st)| *st != St::Gone).count()
            }
        }

        #[derive(Debug, Clone)]
        enum Op {
            Push(Option<u8>),
            Pull(u64),
            Settle(usize, u8),
            Touch(usize, u64),
            Advance(u64),
            Retain(u64),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => proptest::option::weighted(0.8, 0..4u8).prop_map(Op::Push),
                4 => (1..4u64).prop_map(Op::Pull),
                4 => (any::<usize>(), 0..4u8).prop_map(|(i, k)| Op::Settle(i, k)),
                1 => (any::<usize>(), 0..6u64).prop_map(|(i, s)| Op::Touch(i, s)),
                2 => (0..4u64).prop_map(Op::Advance),
                1 => (0..5u64).prop_map(Op::Retain),
            ]
        }

        proptest! {
            /// Hand-outs, settlements and wake-up times agree with the
            /// model; a wake-up may come early (the expiry bound), never
            /// late.
            #[test]
            fn the_dispatcher_behaves_as_the_model(ops in proptest::collection::vec(op(), 1..120)) {
                let start = Instant::now();
                let mut now = start;
                let mut d = Dispatcher::default();
                let mut m = Model::default();
                let mut handed: Vec<(u64, u64)> = Vec::new();
                let mut pushed = 0u64;
                for op in ops {
                    match op {
                        Op::Push(key) => {
                            d.push(key.map(|k| Arc::from(k.to_string())), pushed, now);
                            m.push(key, now);
                            pushed += 1;
                        }
                        Op::Pull(wait) => {
                            let wait = Duration::from_secs(wait);
                            let got = d.pull(now, wait).map(|p| {
                                prop_assert_eq!(*p.msg, p.seq);
                                Ok((p.seq, p.token, p.attempt))
                            });
                            let want = m.pull(now, wait);
                            match (got, want) {
                                (Ok(got), Ok(want)) => {
                                    let got = got?;
                                    prop_assert_eq!(got, want);
                                    handed.push((got.0, got.1));
                                }
                                (Err(got), Err(want)) => match (got, want) {
                                    (Some(got), Some(want)) => prop_assert!(got <= want && got > now),
                                    (got, None) => prop_assert!(got.is_none_or(|g| g > now)),
                                    (None, Some(want)) => prop_assert!(false, "no wake-up, one due at {want:?}"),
                                },
                                (got, want) => prop_assert!(false, "{:?} against {want:?}", got.map(|_| ())),
                            }
                        }
                        Op::Settle(i, kind) => {
                            if handed.is_empty() { continue; }
                            let (seq, token) = handed[i % handed.len()];
                            let kind = match kind {
                                0 => AckKind::Ack,
                                1 => AckKind::Term,
                                2 => AckKind::Nack(None),
                                _ => AckKind::Nack(Some(Duration::from_secs(2))),
                            };
                            let got = d.settle(seq, token, kind, now);
                            let want = m.settle(seq, token, kind, now);
                            let same = match (&got, &want) {
                                (Settled::Done(a), Settled::Done(b)) => a == b,
                                (Settled::Requeued, Settled::Requeued) | (Settled::Stale, Settled::Stale) => true,
                                _ => false,
                            };
                            prop_assert!(same, "settle {seq}/{token} {kind:?}");
                        }
                        Op::Touch(i, secs) => {
                            if handed.is_empty() { continue; }
                            let (seq, token) = handed[i % handed.len()];
                            let to = now + Duration::from_secs(secs);
                            prop_assert_eq!(d.touch(seq, token, to), m.touch(seq, token, to));
                        }
                        Op::Advance(secs) => now += Duration::from_secs(secs),
                        Op::Retain(r) => {
                            d.retain(|msg| msg % 5 != r, now);
                            m.retain(|seq| seq % 5 != r, now);
                        }
                    }
                    prop_assert_eq!(d.len(), m.len());
                }
            }
        }
    }
}

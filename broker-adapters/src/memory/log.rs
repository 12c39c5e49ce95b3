//! The in-process broker's state: one append-only log per topic and, per
//! consumer group, which offsets are ready, in flight or held back behind an
//! earlier event with the same partition key. No I/O and no clocks of its
//! own: callers pass `now`, so the logic is tested deterministically.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use cloudevents::Event;
use tokio::time::Instant;

use crate::subscriber::{AckKind, ConsumerGroup, StartFrom};

#[derive(Debug)]
struct Entry {
    /// Shared with the deliveries of every group.
    event: Arc<Event>,
    key: Option<Arc<str>>,
}

/// One topic: its log and its consumer groups.
#[derive(Debug, Default)]
pub(crate) struct TopicLog {
    /// Offset of `entries[0]`.
    base: u64,
    entries: VecDeque<Entry>,
    groups: HashMap<ConsumerGroup, Group>,
}

/// Why an append was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Full;

/// An event handed to a group member.
#[derive(Debug)]
pub(crate) struct Pulled {
    pub(crate) offset: u64,
    pub(crate) token: u64,
    pub(crate) attempt: u32,
    pub(crate) event: Arc<Event>,
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

#[derive(Debug, Default)]
struct Group {
    /// The first offset this group has not looked at yet.
    next: u64,
    ready: BTreeMap<u64, Ready>,
    in_flight: HashMap<u64, InFlight>,
    /// A key is present while an event with it is ready or in flight; the
    /// queue holds the later offsets with that key, in order.
    held: HashMap<Arc<str>, VecDeque<u64>>,
    next_token: u64,
}

impl TopicLog {
    /// The offset the next append gets.
    fn end(&self) -> u64 {
        self.base + self.entries.len() as u64
    }

    /// Appends `events` atomically: all of them, or none if the log would hold
    /// more than `limit` events even after dropping what every group settled.
    pub(crate) fn append(&mut self, events: Vec<Event>, limit: usize) -> Result<(), Full> {
        if self.entries.len() + events.len() > limit {
            self.trim();
            if self.entries.len() + events.len() > limit {
                return Err(Full);
            }
        }
        for event in events {
            let key = crate::event::EventExt::partition_key(&event).map(Arc::from);
            self.entries.push_back(Entry {
                event: Arc::new(event),
                key,
            });
        }
        Ok(())
    }

    /// Drops the entries every group has settled.
    fn trim(&mut self) {
        let low = self
            .groups
            .values()
            .map(Group::low_watermark)
            .min()
            .unwrap_or_else(|| self.end());
        while self.base < low && self.entries.pop_front().is_some() {
            self.base += 1;
        }
    }

    /// Creates the group if it does not exist yet.
    pub(crate) fn join(&mut self, group: &ConsumerGroup, start: StartFrom) {
        let next = match start {
            StartFrom::Earliest => self.base,
            StartFrom::Latest => self.end(),
        };
        self.groups.entry(group.clone()).or_insert_with(|| Group {
            next,
            ..Group::default()
        });
    }

    /// Hands the next deliverable event to a member of `group`, or says when
    /// to look again (`None`: when something is published or settled).
    pub(crate) fn pull(
        &mut self,
        group: &ConsumerGroup,
        now: Instant,
        ack_wait: Duration,
    ) -> Result<Pulled, Option<Instant>> {
        let end = self.end();
        let Self {
            base,
            entries,
            groups,
        } = self;
        let Some(g) = groups.get_mut(group) else {
            return Err(None);
        };
        g.expire(now);
        let due = g
            .ready
            .iter()
            .find(|(_, r)| r.not_before <= now)
            .map(|(offset, r)| (*offset, *r));
        let (offset, attempts) = if let Some((offset, ready)) = due {
            g.ready.remove(&offset);
            (offset, ready.attempts)
        } else {
            let mut found = None;
            while g.next < end {
                let offset = g.next;
                g.next += 1;
                let entry = &entries[(offset - *base) as usize];
                match &entry.key {
                    Some(key) => match g.held.get_mut(key) {
                        Some(queue) => queue.push_back(offset),
                        None => {
                            g.held.insert(Arc::clone(key), VecDeque::new());
                            found = Some(offset);
                            break;
                        }
                    },
                    None => {
                        found = Some(offset);
                        break;
                    }
                }
            }
            match found {
                Some(offset) => (offset, 0),
                None => return Err(g.wake_at()),
            }
        };
        g.next_token += 1;
        let token = g.next_token;
        let attempt = attempts.saturating_add(1);
        g.in_flight.insert(
            offset,
            InFlight {
                token,
                attempt,
                deadline: now + ack_wait,
            },
        );
        Ok(Pulled {
            offset,
            token,
            attempt,
            event: Arc::clone(&entries[(offset - *base) as usize].event),
        })
    }

    /// Records how a delivery was settled. Returns whether anything changed.
    ///
    /// An ack or term settles the offset whoever holds it now; a nack, or a
    /// drop (a nack without delay), only applies to the delivery `token`
    /// names, so a stale handle cannot disturb a newer delivery.
    pub(crate) fn settle(
        &mut self,
        group: &ConsumerGroup,
        offset: u64,
        token: u64,
        kind: AckKind,
        now: Instant,
    ) -> bool {
        let Some(key) = self.key_of(offset) else {
            return false;
        };
        let Some(g) = self.groups.get_mut(group) else {
            return false;
        };
        match kind {
            AckKind::Nack(delay) => match g.in_flight.get(&offset) {
                Some(f) if f.token == token => {
                    let attempts = f.attempt;
                    g.in_flight.remove(&offset);
                    g.ready.insert(
                        offset,
                        Ready {
                            attempts,
                            not_before: now + delay.unwrap_or_default(),
                        },
                    );
                    true
                }
                _ => false,
            },
            AckKind::Ack | AckKind::Term => {
                let was_pending =
                    g.in_flight.remove(&offset).is_some() || g.ready.remove(&offset).is_some();
                if was_pending {
                    g.release(key.as_ref(), now);
                }
                was_pending
            }
        }
    }

    /// Resets the ack deadline of the delivery `token` names.
    pub(crate) fn touch(
        &mut self,
        group: &ConsumerGroup,
        offset: u64,
        token: u64,
        deadline: Instant,
    ) -> bool {
        match self
            .groups
            .get_mut(group)
            .and_then(|g| g.in_flight.get_mut(&offset))
        {
            Some(f) if f.token == token => {
                f.deadline = deadline;
                true
            }
            _ => false,
        }
    }

    /// `Some(key)` if the offset is in the log, the key being `None` for
    /// events without a partition key.
    fn key_of(&self, offset: u64) -> Option<Option<Arc<str>>> {
        let index = offset.checked_sub(self.base)?;
        self.entries
            .get(usize::try_from(index).ok()?)
            .map(|e| e.key.clone())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

impl Group {
    /// Moves deliveries whose ack deadline passed back to ready.
    fn expire(&mut self, now: Instant) {
        let expired: Vec<(u64, InFlight)> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.deadline <= now)
            .map(|(o, f)| (*o, *f))
            .collect();
        for (offset, f) in expired {
            self.in_flight.remove(&offset);
            self.ready.insert(
                offset,
                Ready {
                    attempts: f.attempt,
                    not_before: now,
                },
            );
        }
    }

    /// Lets the next event with `key` through, now that the previous one is settled.
    fn release(&mut self, key: Option<&Arc<str>>, now: Instant) {
        let Some(key) = key else { return };
        let next = self.held.get_mut(key).and_then(VecDeque::pop_front);
        match next {
            Some(offset) => {
                self.ready.insert(
                    offset,
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

    /// The earliest moment something becomes deliverable without a publish or settle.
    fn wake_at(&self) -> Option<Instant> {
        let ready = self.ready.values().map(|r| r.not_before);
        let deadlines = self.in_flight.values().map(|f| f.deadline);
        ready.chain(deadlines).min()
    }

    /// The lowest offset this group may still need.
    fn low_watermark(&self) -> u64 {
        let ready = self.ready.keys().copied();
        let in_flight = self.in_flight.keys().copied();
        let held = self.held.values().filter_map(|q| q.front().copied());
        ready.chain(in_flight).chain(held).fold(self.next, u64::min)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::CloudEventBuilder;
    use cloudevents::AttributesReader;

    const WAIT: Duration = Duration::from_secs(30);

    fn group(name: &str) -> ConsumerGroup {
        ConsumerGroup::try_from(name).expect("valid")
    }

    fn event(key: Option<&str>, n: u32) -> Event {
        let b = CloudEventBuilder::new("t", "/s").subject(n.to_string());
        match key {
            Some(k) => b.partition_key(k),
            None => b,
        }
        .build()
        .expect("valid")
    }

    fn subject(p: &Pulled) -> String {
        p.event.subject().expect("has subject").to_owned()
    }

    #[test]
    fn same_key_is_held_back_until_settled_other_keys_flow() {
        let now = Instant::now();
        let g = group("g");
        let mut log = TopicLog::default();
        log.join(&g, StartFrom::Earliest);
        let events = vec![
            event(Some("a"), 1),
            event(Some("a"), 2),
            event(Some("b"), 3),
        ];
        log.append(events, 10).expect("room");
        let first = log.pull(&g, now, WAIT).expect("a1");
        assert_eq!(subject(&first), "1");
        let second = log.pull(&g, now, WAIT).expect("b3 overtakes held a2");
        assert_eq!(subject(&second), "3");
        assert!(log.pull(&g, now, WAIT).is_err(), "a2 waits for a1");
        log.settle(&g, first.offset, first.token, AckKind::Ack, now);
        assert_eq!(subject(&log.pull(&g, now, WAIT).expect("a2")), "2");
    }

    #[test]
    fn nack_redelivers_after_the_delay_and_keeps_key_order() {
        let now = Instant::now();
        let g = group("g");
        let mut log = TopicLog::default();
        log.join(&g, StartFrom::Earliest);
        log.append(vec![event(Some("a"), 1), event(Some("a"), 2)], 10)
            .expect("room");
        let p = log.pull(&g, now, WAIT).expect("a1");
        let delay = Duration::from_millis(100);
        assert!(log.settle(&g, p.offset, p.token, AckKind::Nack(Some(delay)), now));
        assert_eq!(log.pull(&g, now, WAIT).err(), Some(Some(now + delay)));
        let again = log.pull(&g, now + delay, WAIT).expect("a1 again");
        assert_eq!((subject(&again), again.attempt), ("1".into(), 2));
    }

    #[test]
    fn stale_handles_cannot_nack_a_newer_delivery() {
        let now = Instant::now();
        let g = group("g");
        let mut log = TopicLog::default();
        log.join(&g, StartFrom::Earliest);
        log.append(vec![event(None, 1)], 10).expect("room");
        let old = log.pull(&g, now, WAIT).expect("first");
        let later = now + WAIT;
        let new = log
            .pull(&g, later, WAIT)
            .expect("redelivered after deadline");
        assert_eq!(new.attempt, 2);
        assert!(!log.settle(&g, old.offset, old.token, AckKind::Nack(None), later));
        assert!(!log.touch(&g, old.offset, old.token, later + WAIT));
        assert!(log.settle(&g, old.offset, old.token, AckKind::Ack, later));
        assert!(!log.settle(&g, new.offset, new.token, AckKind::Ack, later));
    }

    #[test]
    fn groups_are_independent_and_latest_skips_history() {
        let now = Instant::now();
        let (a, b, c) = (group("a"), group("b"), group("c"));
        let mut log = TopicLog::default();
        log.join(&a, StartFrom::Earliest);
        log.append(vec![event(None, 1)], 10).expect("room");
        log.join(&b, StartFrom::Earliest);
        log.join(&c, StartFrom::Latest);
        assert!(log.pull(&a, now, WAIT).is_ok());
        assert!(log.pull(&b, now, WAIT).is_ok());
        assert!(log.pull(&c, now, WAIT).is_err());
    }

    #[test]
    fn full_log_trims_settled_events_and_refuses_rather_than_drops() {
        let now = Instant::now();
        let g = group("g");
        let mut log = TopicLog::default();
        log.join(&g, StartFrom::Earliest);
        log.append(vec![event(None, 1), event(None, 2)], 2)
            .expect("room");
        assert_eq!(log.append(vec![event(None, 3)], 2), Err(Full));
        let p = log.pull(&g, now, WAIT).expect("1");
        log.settle(&g, p.offset, p.token, AckKind::Ack, now);
        log.append(vec![event(None, 3)], 2).expect("1 was settled");
        assert_eq!(log.len(), 2);
        assert_eq!(subject(&log.pull(&g, now, WAIT).expect("2")), "2");
    }
}

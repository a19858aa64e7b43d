//! One push session's buffer: the last messages routed to it, numbered, bounded in
//! count and bytes, and readable from any point a client says it got to.
//!
//! Plain data under the session's lock. The buffer keeps messages whether or not they
//! were delivered, so a client that lost its stream mid-way can ask again from the
//! last id it saw (`Last-Event-ID`). When what it asks for is no longer here (it was
//! pushed out by newer messages), the read says so with a gap instead of skipping
//! silently.

use crate::budget::{Budgets, Charge};
use bytes::Bytes;
use std::collections::VecDeque;

/// What a session receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A JSON-RPC message as the upstream wrote it (a subscription's id already
    /// rewritten to the one the client holds).
    Message(Bytes),
    /// Messages were lost: `reason` says why, `missed` how many when known.
    Gap {
        reason: &'static str,
        missed: Option<u64>,
    },
}

impl Event {
    fn bytes(&self) -> usize {
        match self {
            Event::Message(m) => m.len(),
            // Never refused for its size: a gap must not itself be lost. The count
            // limit still bounds them.
            Event::Gap { .. } => 0,
        }
    }
}

/// A numbered event; ids start at 1 and increase by one per event of the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub id: u64,
    pub event: Event,
}

/// What a read found after the point asked for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Read {
    /// Events the client asked for that are gone: announce before `items`.
    pub missed: Option<u64>,
    pub items: Vec<Item>,
}

#[derive(Debug)]
pub struct Mailbox {
    items: VecDeque<Item>,
    next_id: u64,
    max_items: usize,
    /// Bytes of `items`, charged to the session's and the gateway's budgets.
    charge: Charge,
    /// Messages dropped because the gateway's budget had no room, not yet announced.
    refused: u64,
}

impl Mailbox {
    /// A buffer of `max_items` messages, within `budgets` (the session's bytes limit
    /// inside the gateway's memory budget).
    pub fn new(max_items: usize, budgets: &Budgets) -> Mailbox {
        Mailbox {
            items: VecDeque::new(),
            next_id: 1,
            max_items: max_items.max(1),
            charge: budgets.empty(),
            refused: 0,
        }
    }

    /// The id the last event got (0: none yet).
    pub fn last_id(&self) -> u64 {
        self.next_id - 1
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Adds `event`, pushing out the oldest events past the count or byte limit.
    /// Returns how many were pushed out, and whether `event` itself was refused
    /// (larger than the whole session budget, or the gateway's budget is full).
    pub fn push(&mut self, event: Event) -> (usize, bool) {
        let size = event.bytes();
        let mut evicted = 0;
        while self.items.len() >= self.max_items {
            self.evict();
            evicted += 1;
        }
        while !self.charge.grow(size) {
            if self.items.is_empty() {
                // Too large for the session, or the gateway has no room at all: lost,
                // and the next event the client gets says so.
                self.refused += 1;
                return (evicted, true);
            }
            self.evict();
            evicted += 1;
        }
        if self.refused > 0 {
            let gap = Event::Gap {
                reason: "memory",
                missed: Some(self.refused),
            };
            self.refused = 0;
            if self.charge.grow(gap.bytes()) {
                self.append(gap);
            }
        }
        self.append(event);
        (evicted, false)
    }

    fn append(&mut self, event: Event) {
        self.items.push_back(Item {
            id: self.next_id,
            event,
        });
        self.next_id += 1;
    }

    fn evict(&mut self) {
        if let Some(old) = self.items.pop_front() {
            self.charge.shrink(old.event.bytes());
        }
    }

    /// Events after `after` (all of them for `None`), at most `max`. A client at
    /// `after` that should next get an event no longer here is told how many it missed.
    pub fn read(&self, after: Option<u64>, max: usize) -> Read {
        let first = self.items.front().map_or(self.next_id, |i| i.id);
        let from = match after {
            None => first,
            // An id from the future (another session's, or before a restart): start
            // from what there is rather than wait forever.
            Some(after) if after >= self.next_id => first,
            Some(after) => after + 1,
        };
        let missed = match after {
            Some(_) if from < first => Some(first - from),
            _ => None,
        };
        let skip = from.saturating_sub(first) as usize;
        Read {
            missed,
            items: self.items.iter().skip(skip).take(max).cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::Budget;

    fn msg(text: &str) -> Event {
        Event::Message(Bytes::from(text.to_string()))
    }

    fn ids(read: &Read) -> Vec<u64> {
        read.items.iter().map(|i| i.id).collect()
    }

    fn budgets(session: usize, gateway: usize) -> Budgets {
        Budgets::for_connection(&Budget::new(gateway), session)
    }

    #[test]
    fn ids_start_at_one_and_reads_resume_after_the_last_seen() {
        let mut m = Mailbox::new(10, &budgets(1 << 20, 1 << 20));
        for t in ["a", "b", "c"] {
            m.push(msg(t));
        }
        assert_eq!(ids(&m.read(None, 100)), [1, 2, 3]);
        assert_eq!(ids(&m.read(Some(1), 100)), [2, 3]);
        assert_eq!(m.read(Some(3), 100), Read::default());
        assert_eq!(ids(&m.read(Some(0), 2)), [1, 2], "at most max");
    }

    #[test]
    fn the_oldest_go_first_and_a_late_reader_is_told_what_it_missed() {
        let mut m = Mailbox::new(3, &budgets(1 << 20, 1 << 20));
        for t in ["1", "2", "3", "4", "5"] {
            m.push(msg(t));
        }
        assert_eq!(ids(&m.read(None, 100)), [3, 4, 5]);
        assert_eq!(m.read(None, 100).missed, None, "no point given: no gap");
        let late = m.read(Some(1), 100);
        assert_eq!((late.missed, ids(&late)), (Some(1), vec![3, 4, 5]));
        let later = m.read(Some(0), 100);
        assert_eq!(later.missed, Some(2));
    }

    #[test]
    fn bytes_are_bounded_and_given_back() {
        let b = budgets(10, 1 << 20);
        let mut m = Mailbox::new(100, &b);
        m.push(msg("aaaa"));
        m.push(msg("bbbb"));
        assert_eq!(b.connection.used(), 8);
        m.push(msg("cccc"));
        assert_eq!(
            ids(&m.read(None, 10)),
            [2, 3],
            "the first went to make room"
        );
        assert_eq!(b.connection.used(), 8);
        let (_, refused) = m.push(msg(&"x".repeat(11)));
        assert!(refused, "larger than the whole session budget");
        m.push(msg("d"));
        let read = m.read(Some(3), 10);
        assert!(
            matches!(
                read.items[0].event,
                Event::Gap {
                    reason: "memory",
                    missed: Some(1)
                }
            ),
            "{read:?}"
        );
        drop(m);
        assert_eq!(b.gateway.used(), 0);
    }

    #[test]
    fn an_id_from_the_future_reads_from_the_start() {
        let mut m = Mailbox::new(10, &budgets(1 << 20, 1 << 20));
        m.push(msg("a"));
        assert_eq!(ids(&m.read(Some(99), 10)), [1]);
    }
}

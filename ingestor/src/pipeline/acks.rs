//! The reorder buffer: acknowledgements in arrival order, per connection.
//!
//! Batches commit concurrently and finish in any order, but a broker's
//! PUBACKs must follow the order of the messages (MQTT 3.1.1 §4.6, and a
//! persistent session's redelivery relies on it), and a message is acked
//! only once what it carries is committed. So every message takes a place
//! here on arrival, in order, tagged with the connection generation it came
//! on; its batch's commit marks it done; acks are released from the front
//! only, up to the first message not yet done.
//!
//! A message of an older generation is never acked: the connection that
//! delivered it is gone, and its packet id means nothing (or something else)
//! on the new one. It is dropped from the front instead; the broker
//! redelivers it on the new connection (persistent session) and the database
//! absorbs the duplicate.
//!
//! Messages are numbered from 1 in arrival order over the life of the
//! subscriber, across connections; the buffer only stores the number of its
//! front entry, the others follow from their place.

use std::collections::VecDeque;

use rumqttc::QoS;

/// What the broker needs to acknowledge one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    pub pkid: u16,
    pub qos: QoS,
}

#[derive(Debug)]
struct Entry {
    generation: u64,
    ack: Ack,
    done: bool,
}

/// Messages waiting for their ack, in arrival order.
#[derive(Debug)]
pub struct AckQueue {
    entries: VecDeque<Entry>,
    /// The number of `entries[0]` (of the next message when empty).
    front_no: u64,
}

impl Default for AckQueue {
    fn default() -> Self {
        Self {
            entries: VecDeque::new(),
            front_no: 1,
        }
    }
}

impl AckQueue {
    /// Takes a place for a message received on connection `generation`;
    /// `done` when there is nothing to commit for it. Returns its number.
    pub fn push(&mut self, generation: u64, ack: Ack, done: bool) -> u64 {
        debug_assert!(
            self.entries.back().is_none_or(|e| e.generation <= generation),
            "generations only grow"
        );
        let no = self.front_no + self.entries.len() as u64;
        self.entries.push_back(Entry { generation, ack, done });
        no
    }

    /// Marks these messages committed. Numbers already released or dropped
    /// are ignored (a batch of a lost connection committing late).
    pub fn complete(&mut self, numbers: &[u64]) {
        for &no in numbers {
            if no >= self.front_no {
                if let Some(e) = self.entries.get_mut((no - self.front_no) as usize) {
                    e.done = true;
                }
            }
        }
    }

    /// Releases acks from the front for connection `generation`: drops the
    /// entries of older connections, stops at the first message not yet
    /// done, or at once while `connected` is false. `send` queues one PUBACK
    /// and returns `false` when it cannot now (the entry stays, and the next
    /// call tries it again); a QoS 0 message needs none and just leaves.
    /// Returns how many acks were sent.
    pub fn release(&mut self, generation: u64, connected: bool, mut send: impl FnMut(Ack) -> bool) -> usize {
        let mut sent = 0;
        while let Some(front) = self.entries.front() {
            if front.generation != generation {
                self.pop();
                continue;
            }
            if !front.done || !connected {
                break;
            }
            if front.ack.qos != QoS::AtMostOnce {
                if !send(front.ack) {
                    break;
                }
                sent += 1;
            }
            self.pop();
        }
        sent
    }

    /// Whether a message of connection `generation` still waits for its ack.
    pub fn holds(&self, generation: u64) -> bool {
        // Generations only grow along the queue: the newest is at the back.
        self.entries.back().is_some_and(|e| e.generation == generation)
    }

    /// Messages waiting (of any connection).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no message waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn pop(&mut self) {
        self.entries.pop_front();
        self.front_no += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(pkid: u16) -> Ack {
        Ack {
            pkid,
            qos: QoS::AtLeastOnce,
        }
    }

    /// Releases with a sender that always succeeds; returns the pkids sent.
    fn release(q: &mut AckQueue, generation: u64, connected: bool) -> Vec<u16> {
        let mut sent = Vec::new();
        let n = q.release(generation, connected, |a| {
            sent.push(a.pkid);
            true
        });
        assert_eq!(n, sent.len());
        sent
    }

    #[test]
    fn numbers_follow_arrival_across_releases() {
        let mut q = AckQueue::default();
        assert_eq!(q.push(0, ack(10), false), 1);
        assert_eq!(q.push(0, ack(11), false), 2);
        q.complete(&[1]);
        assert_eq!(release(&mut q, 0, true), [10]);
        assert_eq!(q.push(0, ack(12), false), 3);
        q.complete(&[2, 3]);
        assert_eq!(release(&mut q, 0, true), [11, 12]);
        assert!(q.is_empty());
        assert_eq!(q.push(0, ack(13), false), 4);
    }

    #[test]
    fn an_ack_waits_for_every_earlier_message() {
        let mut q = AckQueue::default();
        for pkid in 1..=4 {
            q.push(0, ack(pkid), false);
        }
        q.complete(&[2, 4]);
        assert_eq!(release(&mut q, 0, true), Vec::<u16>::new(), "1 is not committed");
        assert_eq!(q.len(), 4);
        q.complete(&[1]);
        assert_eq!(release(&mut q, 0, true), [1, 2], "3 holds 4 back");
        q.complete(&[3]);
        assert_eq!(release(&mut q, 0, true), [3, 4]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_message_with_nothing_to_commit_is_acked_in_its_turn() {
        let mut q = AckQueue::default();
        q.push(0, ack(1), false);
        q.push(0, ack(2), true);
        assert_eq!(release(&mut q, 0, true), Vec::<u16>::new(), "behind 1");
        q.complete(&[1]);
        assert_eq!(release(&mut q, 0, true), [1, 2]);
        q.push(0, ack(3), true);
        assert_eq!(release(&mut q, 0, true), [3], "alone: at once");
    }

    #[test]
    fn an_older_connections_messages_are_dropped_never_acked() {
        let mut q = AckQueue::default();
        q.push(0, ack(1), true);
        q.push(0, ack(2), false);
        // Connection 0 is lost before anything was released; connection 1
        // reuses packet id 1 for another message.
        q.push(1, ack(1), false);
        assert!(q.holds(1) && !q.holds(0));
        q.complete(&[2]);
        assert_eq!(
            release(&mut q, 1, true),
            Vec::<u16>::new(),
            "gen 0 dropped, gen 1 not done"
        );
        assert_eq!(q.len(), 1);
        q.complete(&[3]);
        assert_eq!(release(&mut q, 1, true), [1]);
        assert!(q.is_empty() && !q.holds(1));
    }

    #[test]
    fn a_lost_connection_drops_even_what_is_still_committing() {
        let mut q = AckQueue::default();
        q.push(0, ack(1), false);
        q.push(0, ack(2), false);
        assert_eq!(release(&mut q, 1, false), Vec::<u16>::new());
        assert!(q.is_empty());
        // The batch commits after the reconnect: nothing to ack, nothing
        // else marked.
        q.complete(&[1, 2]);
        assert_eq!(q.push(1, ack(1), false), 3);
        assert_eq!(release(&mut q, 1, true), Vec::<u16>::new());
    }

    #[test]
    fn nothing_is_released_while_disconnected() {
        let mut q = AckQueue::default();
        q.push(0, ack(1), true);
        assert_eq!(release(&mut q, 0, false), Vec::<u16>::new());
        assert_eq!(release(&mut q, 0, true), [1]);
    }

    #[test]
    fn a_refused_ack_stays_first_and_is_retried() {
        let mut q = AckQueue::default();
        q.push(0, ack(1), true);
        q.push(0, ack(2), true);
        assert_eq!(q.release(0, true, |_| false), 0);
        assert_eq!(q.len(), 2);
        let mut once = true;
        let mut sent = Vec::new();
        q.release(0, true, |a| {
            if std::mem::take(&mut once) {
                sent.push(a.pkid);
                true
            } else {
                false
            }
        });
        assert_eq!(sent, [1]);
        assert_eq!(release(&mut q, 0, true), [2]);
    }

    #[test]
    fn qos_0_messages_take_their_turn_without_an_ack() {
        let mut q = AckQueue::default();
        q.push(
            0,
            Ack {
                pkid: 0,
                qos: QoS::AtMostOnce,
            },
            true,
        );
        q.push(0, ack(7), true);
        assert_eq!(release(&mut q, 0, true), [7]);
        assert!(q.is_empty());
    }

    #[test]
    fn late_and_unknown_numbers_are_ignored() {
        let mut q = AckQueue::default();
        q.push(0, ack(1), true);
        assert_eq!(release(&mut q, 0, true), [1]);
        q.push(0, ack(2), false);
        q.complete(&[1, 99]);
        assert_eq!(release(&mut q, 0, true), Vec::<u16>::new());
        q.complete(&[2]);
        assert_eq!(release(&mut q, 0, true), [2]);
    }
}

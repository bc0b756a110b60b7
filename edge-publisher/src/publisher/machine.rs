//! The publisher's decisions, as a state machine with no I/O: events in,
//! actions out. [`super::Publisher::run`] turns what happens (a ConnAck, a
//! tick, a batch published, a requeue done) into [`Event`]s, executes the
//! [`Action`]s they return, and asks [`Machine::next`] at the top of every
//! turn whether to publish a batch now or how long to sleep. Everything
//! about *when* to publish and *what to resend* is here, so it is tested
//! without a broker; receipts themselves are applied by the outbox
//! ([`super::Publisher::apply_receipt`]), which reports a batch it settled
//! whole as [`Event::BatchSettled`].

use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

/// How long a stalled publisher waits before claiming again.
const STALL_RETRY: Duration = Duration::from_secs(1);
/// How long the publisher sleeps when nothing can become due by itself (an
/// event wakes it: a ConnAck, a receipt, rows appended, a tick).
const IDLE_SLEEP: Duration = Duration::from_secs(3600);
/// How long to wait after publishing failed (the MQTT client's queue closed).
pub(super) const PUBLISH_RETRY: Duration = Duration::from_millis(200);

/// What bounds the publishing (from [`crate::Settings`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// A partial batch is published this long after its first row was seen.
    pub batch_delay: Duration,
    /// A batch without a receipt for this long goes back to pending.
    pub receipt_timeout: Duration,
    /// Most batches awaiting a receipt at once.
    pub max_inflight_batches: usize,
    /// A batch of this many rows is due at once.
    pub batch_max_impressions: usize,
}

/// Where the publisher is, named. Derived by [`Machine::state`] from the
/// session, the gate, the batches in flight and the unsent rows; the first
/// that applies, in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// Shutting down: the offline status and the disconnect are sent, no
    /// event is handled any more.
    Draining,
    /// A claim came back empty although the counters said rows were unsent
    /// (a counter briefly ahead of the file): wait a second, claim again.
    Stalled,
    /// No broker session: nothing is published. Batches in flight keep
    /// their place until the next ConnAck says whether the broker kept them.
    Disconnected,
    /// Connected, but the [`super::PublishGate`] is closed.
    Held,
    /// Connected; `max_inflight_batches` batches await their receipts: the
    /// next batch waits for a receipt or a receipt timeout.
    Saturated,
    /// Connected, nothing unsent.
    Idle,
    /// Connected, rows unsent, but less than a batch and not yet due: sleep
    /// until `due_at` (`batch_delay` after the first of them was seen).
    Waiting { due_at: Instant },
    /// Connected, and a batch is due (a full batch's worth of rows unsent,
    /// or `due_at` passed): publish one now.
    Publishing,
}

/// What happened, as the machine needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// The broker accepted the connection; `session_present = false` means
    /// it forgot our session and with it whatever we published unconfirmed.
    ConnAck { session_present: bool },
    /// The connection dropped (the I/O task reconnects by itself).
    Disconnected,
    /// Stop: shutdown was requested or the I/O task ended.
    Shutdown,
    /// The gate changed (`open = true` also when it was dropped).
    Gate { open: bool },
    /// A batch was published under `batch_id` with `count` rows.
    Published { batch_id: Uuid, count: usize },
    /// A claim for a due batch came back empty.
    ClaimedNothing,
    /// Publishing failed (the batch went back to pending).
    PublishFailed,
    /// A receipt settled its batch whole: it no longer counts in flight.
    BatchSettled(Uuid),
    /// A requeue put `rows` back to pending.
    Requeued { rows: u64 },
    /// [`crate::Outbox::refresh`] answered: whether another process
    /// committed, and how many rows are unsent now.
    Refreshed { found: bool, unsent: u64 },
    /// Time to republish the status.
    StatusTick,
    /// Time to look for batches whose receipt is overdue.
    CheckTick,
}

/// What to do, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// (Re)subscribe to the receipts topic (every ConnAck).
    Subscribe,
    /// Every in-flight row back to pending: the broker lost our session.
    /// The outcome comes back as [`Event::Requeued`].
    RequeueAll,
    /// A batch whose receipt did not come in time back to pending (`count`
    /// rows were published in it). The outcome comes back as
    /// [`Event::Requeued`].
    RequeueBatch { batch_id: Uuid, count: usize },
    /// Publish the retained status message.
    PublishStatus { online: bool },
    /// Disconnect cleanly (the will does not fire).
    Disconnect,
    /// Wait this long before the next turn.
    Pause(Duration),
}

/// What [`Machine::next`] decided for this turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Claim and publish one batch, report it ([`Event::Published`],
    /// [`Event::ClaimedNothing`], [`Event::PublishFailed`]), and turn again.
    Publish,
    /// Wait for an event, or until this instant.
    Sleep(Instant),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Session {
    Disconnected,
    Connected,
    Draining,
}

/// A batch published and awaiting its receipt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sent {
    /// When it was published, or when a ConnAck with our session present
    /// restarted its wait (the broker delivers it again from then on).
    published: Instant,
    count: usize,
}

/// The publisher's state; see [`State`] for its names.
#[derive(Debug)]
pub(crate) struct Machine {
    limits: Limits,
    session: Session,
    /// The gate is closed.
    held: bool,
    inflight: HashMap<Uuid, Sent>,
    /// When a partial batch is due: `batch_delay` after the first unsent
    /// row was seen. Rows found at start (stored before this process, or
    /// requeued at open) and rows requeued later (session lost, receipt
    /// timeout) or appended by another process have waited long enough
    /// already: they are due at once.
    due_at: Option<Instant>,
    stalled: bool,
}

impl Machine {
    /// A machine before the first connection: `unsent` rows found at start
    /// are due at once; `held` when a closed gate holds publishing back.
    pub fn new(limits: Limits, held: bool, unsent: u64, now: Instant) -> Self {
        Self {
            limits,
            session: Session::Disconnected,
            held,
            inflight: HashMap::new(),
            due_at: (unsent > 0).then_some(now),
            stalled: false,
        }
    }

    /// Connected to the broker (and not shutting down).
    pub fn connected(&self) -> bool {
        self.session == Session::Connected
    }

    /// The gate holds publishing back.
    pub fn held(&self) -> bool {
        self.held
    }

    /// How many batches await their receipt.
    #[cfg(test)]
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// The named state, given `unsent` rows at `now`.
    pub fn state(&self, unsent: u64, now: Instant) -> State {
        match self.session {
            Session::Draining => State::Draining,
            _ if self.stalled => State::Stalled,
            Session::Disconnected => State::Disconnected,
            Session::Connected if self.held => State::Held,
            Session::Connected if self.inflight.len() >= self.limits.max_inflight_batches => State::Saturated,
            Session::Connected if unsent == 0 => State::Idle,
            Session::Connected => {
                let full = unsent >= self.limits.batch_max_impressions as u64;
                match self.due_at {
                    _ if full => State::Publishing,
                    Some(d) if now >= d => State::Publishing,
                    Some(due_at) => State::Waiting { due_at },
                    // Not reached after `next`, which sets `due_at` when rows are unsent.
                    None => State::Waiting {
                        due_at: now + self.limits.batch_delay,
                    },
                }
            }
        }
    }

    /// The decision at the top of every turn, with `unsent` rows at `now`:
    /// starts the batch delay when rows appear (forgets it when none are
    /// left), then publishes if a batch is due or says how long to sleep.
    /// A stall lasts one turn.
    pub fn next(&mut self, unsent: u64, now: Instant) -> Next {
        if unsent == 0 {
            self.due_at = None;
        } else if self.due_at.is_none() {
            self.due_at = Some(now + self.limits.batch_delay);
        }
        let state = self.state(unsent, now);
        self.stalled = false;
        match state {
            State::Publishing => Next::Publish,
            State::Waiting { due_at } => Next::Sleep(due_at),
            State::Stalled => Next::Sleep(now + STALL_RETRY),
            State::Draining | State::Disconnected | State::Held | State::Saturated | State::Idle => {
                Next::Sleep(now + IDLE_SLEEP)
            }
        }
    }

    /// Applies `event` (at `now`) and returns what to do, in order.
    pub fn on(&mut self, event: Event, now: Instant) -> Vec<Action> {
        if self.session == Session::Draining {
            return Vec::new();
        }
        match event {
            Event::ConnAck { session_present } => {
                self.session = Session::Connected;
                let mut actions = vec![Action::Subscribe];
                if session_present {
                    // The broker still holds what we published: each batch
                    // gets a full timeout from now to be answered.
                    for b in self.inflight.values_mut() {
                        b.published = now;
                    }
                } else {
                    // Whatever we published unconfirmed is gone with the session.
                    self.inflight.clear();
                    actions.push(Action::RequeueAll);
                }
                actions.push(Action::PublishStatus { online: true });
                actions
            }
            Event::Disconnected => {
                self.session = Session::Disconnected;
                Vec::new()
            }
            Event::Shutdown => {
                let was_connected = self.connected();
                self.session = Session::Draining;
                if was_connected {
                    // The will fires only on an unclean disconnect.
                    vec![Action::PublishStatus { online: false }, Action::Disconnect]
                } else {
                    Vec::new()
                }
            }
            Event::Gate { open } => {
                self.held = !open;
                Vec::new()
            }
            Event::Published { batch_id, count } => {
                self.inflight.insert(batch_id, Sent { published: now, count });
                Vec::new()
            }
            Event::ClaimedNothing => {
                self.stalled = true;
                Vec::new()
            }
            Event::PublishFailed => vec![Action::Pause(PUBLISH_RETRY)],
            Event::BatchSettled(batch_id) => {
                self.inflight.remove(&batch_id);
                Vec::new()
            }
            Event::Requeued { rows } => {
                if rows > 0 {
                    self.due_at = Some(now);
                }
                Vec::new()
            }
            Event::Refreshed { found, unsent } => {
                if found && unsent > 0 {
                    self.due_at = Some(now);
                }
                Vec::new()
            }
            Event::StatusTick if self.connected() => vec![Action::PublishStatus { online: true }],
            Event::CheckTick if self.connected() => {
                let timeout = self.limits.receipt_timeout;
                let expired: Vec<Uuid> = self
                    .inflight
                    .iter()
                    .filter(|(_, b)| now.duration_since(b.published) >= timeout)
                    .map(|(id, _)| *id)
                    .collect();
                expired
                    .into_iter()
                    .map(|batch_id| {
                        let count = self.inflight.remove(&batch_id).map_or(0, |b| b.count);
                        Action::RequeueBatch { batch_id, count }
                    })
                    .collect()
            }
            Event::StatusTick | Event::CheckTick => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELAY: Duration = Duration::from_millis(2000);
    const TIMEOUT: Duration = Duration::from_secs(30);

    fn limits() -> Limits {
        Limits {
            batch_delay: DELAY,
            receipt_timeout: TIMEOUT,
            max_inflight_batches: 2,
            batch_max_impressions: 100,
        }
    }

    /// A machine connected with its session present (no requeue), at `t0`.
    fn connected(unsent: u64, t0: Instant) -> Machine {
        let mut m = Machine::new(limits(), false, unsent, t0);
        m.on(Event::ConnAck { session_present: true }, t0);
        m
    }

    fn publish(m: &mut Machine, now: Instant) -> Uuid {
        let batch_id = Uuid::now_v7();
        assert_eq!(m.on(Event::Published { batch_id, count: 10 }, now), vec![]);
        batch_id
    }

    #[test]
    fn nothing_is_published_before_the_first_connack_and_rows_found_at_start_are_due_at_once() {
        let t0 = Instant::now();
        let mut m = Machine::new(limits(), false, 5, t0);
        assert_eq!(m.state(5, t0), State::Disconnected);
        assert_eq!(m.next(5, t0), Next::Sleep(t0 + IDLE_SLEEP));
        let actions = m.on(Event::ConnAck { session_present: true }, t0);
        assert_eq!(actions, vec![Action::Subscribe, Action::PublishStatus { online: true }]);
        assert_eq!(m.state(5, t0), State::Publishing, "found at start: no batch delay");
        assert_eq!(m.next(5, t0), Next::Publish);
    }

    #[test]
    fn a_connack_without_our_session_requeues_everything_in_flight() {
        let t0 = Instant::now();
        let mut m = connected(0, t0);
        publish(&mut m, t0);
        publish(&mut m, t0);
        assert_eq!(m.inflight(), 2);
        assert_eq!(m.on(Event::Disconnected, t0), vec![]);
        assert_eq!(m.state(0, t0), State::Disconnected);
        let t1 = t0 + Duration::from_secs(5);
        let actions = m.on(Event::ConnAck { session_present: false }, t1);
        assert_eq!(
            actions,
            vec![
                Action::Subscribe,
                Action::RequeueAll,
                Action::PublishStatus { online: true }
            ]
        );
        assert_eq!(m.inflight(), 0, "nothing the broker forgot counts as in flight");
        // The requeued rows are due at once, without the batch delay.
        assert_eq!(m.on(Event::Requeued { rows: 20 }, t1), vec![]);
        assert_eq!(m.next(20, t1), Next::Publish);
    }

    #[test]
    fn a_connack_with_our_session_keeps_the_batches_and_restarts_their_timeout() {
        let t0 = Instant::now();
        let mut m = connected(0, t0);
        let b = publish(&mut m, t0);
        m.on(Event::Disconnected, t0 + Duration::from_secs(1));
        // Disconnected: no receipt timeout runs (the broker may still deliver).
        assert_eq!(m.on(Event::CheckTick, t0 + TIMEOUT * 2), vec![]);
        let t1 = t0 + TIMEOUT * 2;
        let actions = m.on(Event::ConnAck { session_present: true }, t1);
        assert_eq!(actions, vec![Action::Subscribe, Action::PublishStatus { online: true }]);
        assert_eq!(m.inflight(), 1);
        // A full timeout from the ConnAck, not from the publish.
        assert_eq!(m.on(Event::CheckTick, t1 + TIMEOUT - Duration::from_millis(1)), vec![]);
        assert_eq!(
            m.on(Event::CheckTick, t1 + TIMEOUT),
            vec![Action::RequeueBatch { batch_id: b, count: 10 }]
        );
    }

    #[test]
    fn a_receipt_timeout_requeues_that_batch_only_and_its_rows_are_due_at_once() {
        let t0 = Instant::now();
        let mut m = connected(0, t0);
        let old = publish(&mut m, t0);
        let t1 = t0 + Duration::from_secs(10);
        let young = publish(&mut m, t1);
        assert_eq!(m.on(Event::CheckTick, t0 + TIMEOUT - Duration::from_millis(1)), vec![]);
        let t2 = t0 + TIMEOUT;
        assert_eq!(
            m.on(Event::CheckTick, t2),
            vec![Action::RequeueBatch {
                batch_id: old,
                count: 10
            }]
        );
        assert_eq!(m.inflight(), 1);
        // Its receipt now is for a batch no longer in flight (the outbox ignores it);
        // the young batch's settles it.
        m.on(Event::BatchSettled(young), t2);
        assert_eq!(m.inflight(), 0);
        m.on(Event::Requeued { rows: 10 }, t2);
        assert_eq!(m.next(10, t2), Next::Publish, "republished without the batch delay");
        // A requeue that found nothing (already settled) makes nothing due.
        let mut m = connected(0, t0);
        m.on(Event::Requeued { rows: 0 }, t0);
        assert_eq!(m.next(3, t0), Next::Sleep(t0 + DELAY));
    }

    #[test]
    fn a_batch_is_due_by_count_at_once_and_by_delay_otherwise() {
        let t0 = Instant::now();
        let mut m = connected(0, t0);
        assert_eq!(m.next(0, t0), Next::Sleep(t0 + IDLE_SLEEP));
        assert_eq!(m.state(0, t0), State::Idle);
        // A few rows: due `batch_delay` after they were first seen.
        let t1 = t0 + Duration::from_millis(300);
        assert_eq!(m.next(3, t1), Next::Sleep(t1 + DELAY));
        assert_eq!(m.state(3, t1), State::Waiting { due_at: t1 + DELAY });
        // More rows do not push the deadline back.
        let t2 = t1 + Duration::from_millis(500);
        assert_eq!(m.next(50, t2), Next::Sleep(t1 + DELAY));
        assert_eq!(m.next(50, t1 + DELAY), Next::Publish);
        // A full batch's worth is due at once.
        let mut m = connected(0, t0);
        assert_eq!(m.next(3, t0), Next::Sleep(t0 + DELAY));
        assert_eq!(m.next(100, t0 + Duration::from_millis(1)), Next::Publish);
        // Once nothing is unsent the deadline is forgotten: new rows wait a whole delay.
        let mut m = connected(0, t0);
        m.next(3, t0);
        m.next(0, t0 + Duration::from_millis(10));
        let t3 = t0 + DELAY;
        assert_eq!(m.next(3, t3), Next::Sleep(t3 + DELAY));
    }

    #[test]
    fn the_inflight_bound_holds_the_next_batch_until_a_receipt_or_a_timeout() {
        let t0 = Instant::now();
        let mut m = connected(500, t0);
        assert_eq!(m.next(500, t0), Next::Publish);
        let b1 = publish(&mut m, t0);
        assert_eq!(m.next(490, t0), Next::Publish);
        publish(&mut m, t0);
        assert_eq!(m.state(480, t0), State::Saturated);
        assert_eq!(m.next(480, t0), Next::Sleep(t0 + IDLE_SLEEP));
        // A receipt frees a place.
        m.on(Event::BatchSettled(b1), t0);
        assert_eq!(m.next(480, t0), Next::Publish);
        publish(&mut m, t0);
        assert_eq!(m.next(470, t0), Next::Sleep(t0 + IDLE_SLEEP));
        // So does a timeout.
        let actions = m.on(Event::CheckTick, t0 + TIMEOUT);
        assert_eq!(actions.len(), 2);
        assert_eq!(m.next(470, t0 + TIMEOUT), Next::Publish);
    }

    #[test]
    fn a_closed_gate_holds_publishing_until_it_opens() {
        let t0 = Instant::now();
        let mut m = Machine::new(limits(), true, 200, t0);
        m.on(Event::ConnAck { session_present: true }, t0);
        assert_eq!(m.state(200, t0), State::Held);
        assert_eq!(m.next(200, t0), Next::Sleep(t0 + IDLE_SLEEP));
        // Connected and held: the status is published, receipts are handled.
        assert_eq!(
            m.on(Event::StatusTick, t0),
            vec![Action::PublishStatus { online: true }]
        );
        m.on(Event::Gate { open: true }, t0);
        assert_eq!(m.next(200, t0), Next::Publish);
    }

    #[test]
    fn an_empty_claim_stalls_one_turn_then_claims_again() {
        let t0 = Instant::now();
        let mut m = connected(5, t0);
        assert_eq!(m.next(5, t0), Next::Publish);
        assert_eq!(m.on(Event::ClaimedNothing, t0), vec![]);
        assert_eq!(m.state(5, t0), State::Stalled);
        assert_eq!(m.next(5, t0), Next::Sleep(t0 + STALL_RETRY));
        assert_eq!(m.next(5, t0), Next::Publish, "a stall lasts one turn");
    }

    #[test]
    fn a_failed_publish_pauses_before_the_next_turn() {
        let t0 = Instant::now();
        let mut m = connected(5, t0);
        assert_eq!(m.on(Event::PublishFailed, t0), vec![Action::Pause(PUBLISH_RETRY)]);
        assert_eq!(m.inflight(), 0);
        assert_eq!(m.next(5, t0), Next::Publish);
    }

    #[test]
    fn rows_another_process_appended_are_due_at_once() {
        let t0 = Instant::now();
        let mut m = connected(0, t0);
        m.on(Event::Refreshed { found: true, unsent: 7 }, t0);
        assert_eq!(m.next(7, t0), Next::Publish);
        // Found nothing, or nothing unsent: the delay applies as usual.
        let mut m = connected(0, t0);
        m.on(
            Event::Refreshed {
                found: false,
                unsent: 7,
            },
            t0,
        );
        assert_eq!(m.next(7, t0), Next::Sleep(t0 + DELAY));
        let mut m = connected(0, t0);
        m.on(Event::Refreshed { found: true, unsent: 0 }, t0);
        assert_eq!(m.next(7, t0), Next::Sleep(t0 + DELAY));
    }

    #[test]
    fn ticks_do_nothing_while_disconnected() {
        let t0 = Instant::now();
        let mut m = connected(0, t0);
        publish(&mut m, t0);
        m.on(Event::Disconnected, t0);
        assert_eq!(m.on(Event::StatusTick, t0), vec![]);
        assert_eq!(m.on(Event::CheckTick, t0 + TIMEOUT), vec![]);
        assert_eq!(m.inflight(), 1);
    }

    #[test]
    fn shutdown_publishes_the_offline_status_and_disconnects_when_connected() {
        let t0 = Instant::now();
        let mut m = connected(3, t0);
        assert_eq!(
            m.on(Event::Shutdown, t0),
            vec![Action::PublishStatus { online: false }, Action::Disconnect]
        );
        assert_eq!(m.state(3, t0), State::Draining);
        assert!(!m.connected());
        assert_eq!(m.next(3, t0), Next::Sleep(t0 + IDLE_SLEEP));
        // Draining: nothing is handled any more.
        assert_eq!(m.on(Event::ConnAck { session_present: false }, t0), vec![]);
        assert_eq!(m.on(Event::StatusTick, t0), vec![]);
        // Not connected: nothing to say, nobody to say it to.
        let mut m = Machine::new(limits(), false, 0, t0);
        assert_eq!(m.on(Event::Shutdown, t0), vec![]);
        assert_eq!(m.state(0, t0), State::Draining);
    }
}

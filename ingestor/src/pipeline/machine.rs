//! The subscriber's decisions, as a state machine without I/O.
//!
//! Why: what the subscriber decides (when a batch is sealed, when a writer
//! takes it, which acks may go out, when the drain is over) is what the
//! delivery guarantee rests on, and it is easy to get subtly wrong. Here it
//! is one synchronous, deterministic function, [`Machine::handle`]: an
//! [`Event`] and the time in, [`Effects`] out, no clock, task, socket or
//! database of its own; so each decision is tested alone, in
//! microseconds. The async loop in [`super`] only turns what rumqttc, the
//! writers and the timers report into events, and carries the effects out.
//!
//! ## States
//!
//! The [`Phase`] of the subscriber:
//!
//! * [`Phase::Running`]: messages are taken, batched, committed and acked;
//! * [`Phase::Draining`] (after [`Event::Shutdown`]): no new message is taken
//!   (what arrives stays unacked and is redelivered to the next session);
//!   the open batch is sealed at the next free writer; ends when everything
//!   taken is committed, receipted and acked, by queueing a DISCONNECT;
//! * [`Phase::Disconnecting`]: DISCONNECT queued; the connection is still
//!   read until the broker closes it (closing our side with unread input
//!   would send a TCP RST, and the broker could discard our last acks), for
//!   at most [`LINGER`] once the DISCONNECT is written.
//!
//! Both of the last two end at their deadline ([`Event::Deadline`]): what
//! is not acked then is redelivered.
//!
//! Beside the phase: the connection (up or down, and its *generation*,
//! bumped on every loss), the open batch, the sealed batches waiting for a
//! writer, how many batches are committing, the receipts not yet handed
//! over, and the messages waiting for their acks ([`AckQueue`]).
//!
//! ## Decisions, taken after every event, in this order
//!
//! 1. *Seal* the open batch when it is full (messages or rows), whether or
//!    not a writer is free: batches stay bounded, so the writers alternate
//!    on similar sizes and the last one of a burst is small. Or, when a
//!    writer is free, when it is old (`batch_max_age`), the pipeline idle (no
//!    batch committing, `seal_when_idle`: no added latency at low load), or
//!    the subscriber draining. Sealed batches wait in arrival order.
//! 2. *Start commits*: up to `writers` batches commit at once.
//! 3. *Publish receipts*: those of committed batches, before their acks
//!    (a receipt follows its COMMIT); a full receipts queue keeps them for
//!    the next event, a closed one drops them (edges resend).
//! 4. *Release acks* in arrival order (see [`AckQueue`]); those of an
//!    earlier connection are dropped, never acked on this one.
//! 5. *Finish the drain*: queue the DISCONNECT once nothing taken is left.
//!
//! A write that fails is retried inside its writer until it commits
//! ([`super::commit_with_retry`]): to the machine that batch is simply still
//! committing, and its messages and every later one stay unacked.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::acks::{Ack, AckQueue};
use crate::receipts::EncodedReceipt;
use crate::settings::Settings;

/// How long the connection is still read after the DISCONNECT is written.
pub const LINGER: Duration = Duration::from_secs(3);

/// The settings the decisions depend on.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Seal at this many messages (`batch_max_messages`).
    pub max_messages: usize,
    /// ... or this many rows (`batch_max_rows`).
    pub max_rows: usize,
    /// ... or, with a writer free, this old (`batch_max_age_ms`).
    pub max_age: Duration,
    /// ... or, with no batch committing, at once (`seal_when_idle`).
    pub seal_when_idle: bool,
    /// Batches committing at once (`writers`).
    pub writers: usize,
    /// Time allowed for the drain (`drain_deadline_secs`).
    pub drain: Duration,
}

impl Limits {
    pub fn new(s: &Settings) -> Self {
        Self {
            max_messages: s.batch_max_messages,
            max_rows: s.batch_max_rows,
            max_age: Duration::from_millis(s.batch_max_age_ms),
            seal_when_idle: s.seal_when_idle,
            writers: s.writers,
            drain: Duration::from_secs(s.drain_deadline_secs),
        }
    }
}

/// A batch of messages, committed in one transaction.
#[derive(Debug)]
pub struct Batch<M> {
    /// The messages, in arrival order.
    pub msgs: Vec<M>,
    /// Their numbers (see [`AckQueue`]), for [`Committed::msg_nos`].
    pub msg_nos: Vec<u64>,
    rows: usize,
    opened: Instant,
}

impl<M> Batch<M> {
    fn new(opened: Instant) -> Self {
        Self {
            msgs: Vec::new(),
            msg_nos: Vec::new(),
            rows: 0,
            opened,
        }
    }
}

/// A batch committed, back from its writer.
#[derive(Debug)]
pub struct Committed {
    /// The numbers of its messages ([`Batch::msg_nos`]).
    pub msg_nos: Vec<u64>,
    /// Its receipts, to publish before the acks.
    pub receipts: Vec<EncodedReceipt>,
}

/// What a received message asks of the machine.
#[derive(Debug)]
pub enum Work<M> {
    /// Nothing to write (a topic of another subscription): done at once,
    /// acked in its turn.
    Nothing,
    /// Rows, dead letters, or both, to commit (`rows`: how many
    /// impressions, for the batch's row limit).
    Write { msg: M, rows: usize },
}

/// What happened.
#[derive(Debug)]
pub enum Event<M> {
    /// CONNACK: the connection is up.
    Connected { session_present: bool },
    /// The connection is lost (or could not be made).
    ConnectionLost,
    /// A message arrived (decoded: [`Machine::takes_messages`] says whether
    /// it is worth decoding).
    Message { ack: Ack, work: Work<M> },
    /// A writer committed a batch.
    Committed(Committed),
    /// The open batch reached its age ([`Machine::seal_at`]).
    BatchAged,
    /// The connection moved (a packet in or out) with nothing for the
    /// machine: only its decisions are taken again (an ack or a DISCONNECT
    /// the client refused before is retried).
    Progress,
    /// Shutdown asked: drain.
    Shutdown,
    /// Our DISCONNECT was written to the socket.
    DisconnectWritten,
    /// [`Machine::deadline`] passed.
    Deadline,
}

/// A receipt the receipts queue did not take.
#[derive(Debug)]
pub enum Unsent {
    /// Full: kept for the next event.
    Busy(EncodedReceipt),
    /// Gone: receipts are dropped (edges resend what has none).
    Closed,
}

/// The effects, carried out by the executor.
pub trait Effects<M> {
    /// Queue the subscription.
    fn subscribe(&mut self);
    /// Hand a sealed batch to a writer.
    fn commit(&mut self, batch: Batch<M>);
    /// Hand a receipt to the receipts connection.
    fn publish(&mut self, receipt: EncodedReceipt) -> Result<(), Unsent>;
    /// Queue a PUBACK; `false` when the client cannot take it now.
    fn ack(&mut self, ack: Ack) -> bool;
    /// Queue a DISCONNECT; `false` when the client cannot take it now.
    fn disconnect(&mut self) -> bool;
}

/// Where the subscriber is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Running,
    Draining { deadline: Instant },
    Disconnecting { deadline: Instant },
}

/// Whether the executor goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Control {
    Continue,
    /// Return: drained and disconnected, or the deadline passed.
    Stop,
}

/// The subscriber's state; `M` is a decoded message.
#[derive(Debug)]
pub struct Machine<M> {
    limits: Limits,
    phase: Phase,
    generation: u64,
    connected: bool,
    subscribed_once: bool,
    acks: AckQueue,
    open: Option<Batch<M>>,
    sealed: VecDeque<Batch<M>>,
    in_flight: usize,
    receipts: VecDeque<EncodedReceipt>,
}

impl<M> Machine<M> {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            phase: Phase::Running,
            generation: 0,
            connected: false,
            subscribed_once: false,
            acks: AckQueue::default(),
            open: None,
            sealed: VecDeque::new(),
            in_flight: 0,
            receipts: VecDeque::new(),
        }
    }

    /// Applies `event` at `now`, then takes the decisions (module doc).
    pub fn handle(&mut self, event: Event<M>, now: Instant, fx: &mut impl Effects<M>) -> Control {
        match event {
            Event::Connected { session_present } => {
                self.connected = true;
                if !session_present || !self.subscribed_once {
                    fx.subscribe();
                    self.subscribed_once = true;
                }
            }
            Event::ConnectionLost => {
                if matches!(self.phase, Phase::Disconnecting { .. }) {
                    return Control::Stop;
                }
                // What this connection delivered is never acked on the next.
                self.connected = false;
                self.generation += 1;
            }
            Event::Message { ack, work } => {
                if self.takes_messages() {
                    self.take(ack, work, now);
                }
            }
            Event::Committed(done) => {
                self.in_flight -= 1;
                self.receipts.extend(done.receipts);
                self.acks.complete(&done.msg_nos);
            }
            Event::BatchAged | Event::Progress => {}
            Event::Shutdown => {
                if self.phase == Phase::Running {
                    self.phase = Phase::Draining {
                        deadline: now + self.limits.drain,
                    };
                    tracing::info!(
                        open_messages = self.open.as_ref().map_or(0, |b| b.msgs.len()),
                        in_flight = self.in_flight,
                        "draining: no new messages taken"
                    );
                }
            }
            Event::DisconnectWritten => {
                let linger = now + LINGER;
                if let Phase::Draining { deadline } | Phase::Disconnecting { deadline } = &mut self.phase {
                    *deadline = (*deadline).min(linger);
                }
            }
            Event::Deadline => match self.phase {
                Phase::Running => {}
                Phase::Draining { .. } => {
                    tracing::error!("drain deadline passed; unacked messages will be redelivered");
                    return Control::Stop;
                }
                Phase::Disconnecting { .. } => return Control::Stop,
            },
        }
        self.decide(now, fx)
    }

    fn take(&mut self, ack: Ack, work: Work<M>, now: Instant) {
        match work {
            Work::Nothing => {
                self.acks.push(self.generation, ack, true);
            }
            Work::Write { msg, rows } => {
                let no = self.acks.push(self.generation, ack, false);
                let b = self.open.get_or_insert_with(|| Batch::new(now));
                b.msgs.push(msg);
                b.msg_nos.push(no);
                b.rows += rows;
            }
        }
    }

    fn decide(&mut self, now: Instant, fx: &mut impl Effects<M>) -> Control {
        // 1. Seal.
        if let Some(b) = &self.open {
            let full = b.msgs.len() >= self.limits.max_messages || b.rows >= self.limits.max_rows;
            let free = self.writer_free();
            let old = now.saturating_duration_since(b.opened) >= self.limits.max_age;
            let idle = self.in_flight == 0 && self.limits.seal_when_idle;
            let draining = self.phase != Phase::Running;
            if full || (free && (old || idle || draining)) {
                self.sealed.extend(self.open.take());
            }
        }
        // 2. Start commits.
        while self.in_flight < self.limits.writers {
            let Some(b) = self.sealed.pop_front() else { break };
            self.in_flight += 1;
            fx.commit(b);
        }
        // 3. Receipts; 4. acks. Neither waits for the other.
        while let Some(r) = self.receipts.pop_front() {
            match fx.publish(r) {
                Ok(()) => {}
                Err(Unsent::Busy(r)) => {
                    self.receipts.push_front(r);
                    break;
                }
                Err(Unsent::Closed) => {
                    self.receipts.clear();
                    break;
                }
            }
        }
        self.acks.release(self.generation, self.connected, |a| fx.ack(a));
        // 5. Finish the drain.
        if let Phase::Draining { deadline } = self.phase {
            if self.open.is_none()
                && self.sealed.is_empty()
                && self.in_flight == 0
                && !self.acks.holds(self.generation)
                && self.receipts.is_empty()
            {
                tracing::info!("drained; disconnecting");
                if fx.disconnect() {
                    self.phase = Phase::Disconnecting { deadline };
                }
                if !self.connected {
                    return Control::Stop;
                }
            }
        }
        Control::Continue
    }

    fn writer_free(&self) -> bool {
        self.in_flight + self.sealed.len() < self.limits.writers
    }

    /// Whether a message arriving now is taken (not while draining).
    pub fn takes_messages(&self) -> bool {
        self.phase == Phase::Running
    }

    /// When the open batch comes of age, if a writer is free to take it
    /// then ([`Event::BatchAged`]).
    pub fn seal_at(&self) -> Option<Instant> {
        let b = self.open.as_ref()?;
        self.writer_free().then(|| b.opened + self.limits.max_age)
    }

    /// When the drain gives up ([`Event::Deadline`]).
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Running => None,
            Phase::Draining { deadline } | Phase::Disconnecting { deadline } => Some(deadline),
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the connection is up.
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// The connection's generation: 0 for the first, bumped on each loss.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Batches committing.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Messages in the open batch.
    pub fn open_messages(&self) -> usize {
        self.open.as_ref().map_or(0, |b| b.msgs.len())
    }

    /// Sealed batches waiting for a writer.
    pub fn sealed_batches(&self) -> usize {
        self.sealed.len()
    }

    /// Messages waiting for their ack (of any connection).
    pub fn unacked(&self) -> usize {
        self.acks.len()
    }
}

#[cfg(test)]
mod tests {
    use rumqttc::QoS;

    use super::*;

    /// What the machine asked for, in order.
    #[derive(Debug, PartialEq, Eq)]
    enum Did {
        Subscribe,
        /// A batch to a writer: its messages.
        Commit(Vec<&'static str>),
        Publish(String),
        Ack(u16),
        Disconnect,
    }

    /// The executor of the tests: records, and refuses on request.
    #[derive(Default)]
    struct Fx {
        did: Vec<Did>,
        /// Batches handed to writers, not yet committed.
        writers: VecDeque<Batch<&'static str>>,
        acks_busy: bool,
        receipts_busy: bool,
        receipts_closed: bool,
        disconnect_busy: bool,
    }

    impl Fx {
        fn take(&mut self) -> Vec<Did> {
            std::mem::take(&mut self.did)
        }
        /// The writer of the batch holding `first` commits it, with one
        /// receipt per message (named after it).
        fn committed(&mut self, first: &str) -> Event<&'static str> {
            let i = self
                .writers
                .iter()
                .position(|b| b.msgs.first() == Some(&first))
                .unwrap_or_else(|| panic!("no batch starting with {first} is committing"));
            let b = self.writers.remove(i).expect("found");
            Event::Committed(Committed {
                receipts: b.msgs.iter().map(|m| (format!("r/{m}"), Vec::new())).collect(),
                msg_nos: b.msg_nos,
            })
        }
    }

    impl Effects<&'static str> for Fx {
        fn subscribe(&mut self) {
            self.did.push(Did::Subscribe);
        }
        fn commit(&mut self, batch: Batch<&'static str>) {
            self.did.push(Did::Commit(batch.msgs.clone()));
            self.writers.push_back(batch);
        }
        fn publish(&mut self, receipt: EncodedReceipt) -> Result<(), Unsent> {
            if self.receipts_closed {
                return Err(Unsent::Closed);
            }
            if self.receipts_busy {
                return Err(Unsent::Busy(receipt));
            }
            self.did.push(Did::Publish(receipt.0));
            Ok(())
        }
        fn ack(&mut self, ack: Ack) -> bool {
            if self.acks_busy {
                return false;
            }
            self.did.push(Did::Ack(ack.pkid));
            true
        }
        fn disconnect(&mut self) -> bool {
            if self.disconnect_busy {
                return false;
            }
            self.did.push(Did::Disconnect);
            true
        }
    }

    fn limits() -> Limits {
        Limits {
            max_messages: 3,
            max_rows: 100,
            max_age: Duration::from_millis(50),
            seal_when_idle: false,
            writers: 2,
            drain: Duration::from_secs(20),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A machine connected at `t0`, its subscription asked.
    fn connected(limits: Limits, t0: Instant) -> (Machine<&'static str>, Fx) {
        let mut m = Machine::new(limits);
        let mut fx = Fx::default();
        assert_eq!(
            m.handle(Event::Connected { session_present: false }, t0, &mut fx),
            Control::Continue
        );
        assert_eq!(fx.take(), [Did::Subscribe]);
        (m, fx)
    }

    fn msg(pkid: u16, name: &'static str, rows: usize) -> Event<&'static str> {
        Event::Message {
            ack: Ack {
                pkid,
                qos: QoS::AtLeastOnce,
            },
            work: Work::Write { msg: name, rows },
        }
    }

    fn unusable(pkid: u16) -> Event<&'static str> {
        Event::Message {
            ack: Ack {
                pkid,
                qos: QoS::AtLeastOnce,
            },
            work: Work::Nothing,
        }
    }

    fn commit(names: &[&'static str]) -> Did {
        Did::Commit(names.to_vec())
    }

    fn publish(name: &str) -> Did {
        Did::Publish(format!("r/{name}"))
    }

    #[test]
    fn a_batch_is_sealed_at_its_message_count() {
        let t0 = Instant::now();
        let (mut m, mut fx) = connected(limits(), t0);
        let _ = m.handle(msg(1, "a", 1), t0, &mut fx);
        let _ = m.handle(msg(2, "b", 1), t0, &mut fx);
        assert_eq!(fx.take(), []);
        assert_eq!(m.open_messages(), 2);
        let _ = m.handle(msg(3, "c", 1), t0, &mut fx);
        assert_eq!(fx.take(), [commit(&["a", "b", "c"])]);
        assert_eq!((m.open_messages(), m.in_flight()), (0, 1));
    }

    #[test]
    fn a_batch_is_sealed_at_its_row_count() {
        let t0 = Instant::now();
        let (mut m, mut fx) = connected(limits(), t0);
        let _ = m.handle(msg(1, "a", 60), t0, &mut fx);
        assert_eq!(fx.take(), []);
        let _ = m.handle(msg(2, "b", 40), t0, &mut fx);
        assert_eq!(fx.take(), [commit(&["a", "b"])], "60 + 40 rows reach the limit of 100");
        // One message above the limit is a batch of its own.
        let _ = m.handle(msg(3, "c", 500), t0, &mut fx);
        assert_eq!(fx.take(), [commit(&["c"])]);
    }

    #[test]
    fn a_full_batch_is_sealed_while_every_writer_is_busy_and_waits_its_turn() {
        let t0 = Instant::now();
        let (mut m, mut fx) = connected(limits(), t0);
        for (pkid, name) in [(1, "a"), (2, "b"), (3, "c"), (4, "d"), (5, "e"), (6, "f")] {
            let _ = m.handle(msg(pkid, name, 1), t0, &mut fx);
        }
        assert_eq!(fx.take(), [commit(&["a", "b", "c"]), commit(&["d", "e", "f"])]);
        for (pkid, name) in [(7, "g"), (8, "h"), (9, "i")] {
            let _ = m.handle(msg(pkid, name, 1), t0, &mut fx);
        }
        assert_eq!(fx.take(), [], "both writers busy");
        assert_eq!((m.sealed_batches(), m.in_flight(), m.open_messages()), (1, 2, 0));
        assert_eq!(m.seal_at(), None, "no age timer without a free writer");
        // A later message opens a new batch behind the sealed one.
        let _ = m.handle(msg(10, "j", 1), t0, &mut fx);
        let _ = m.handle(Event::Progress, t0 + ms(100), &mut fx);
        assert_eq!(fx.take(), [], "j is old, but no writer is free");
        let ev = fx.committed("d");
        let _ = m.handle(ev, t0 + ms(101), &mut fx);
        assert_eq!(
            fx.take(),
            [commit(&["g", "h", "i"]), publish("d"), publish("e"), publish("f")],
            "the sealed batch takes the freed writer; d..f wait for a..c to be acked"
        );
        assert_eq!(m.open_messages(), 1);
    }

    #[test]
    fn a_batch_is_sealed_at_its_age_when_a_writer_is_free() {
        let t0 = Instant::now();
        let (mut m, mut fx) = connected(limits(), t0);
        let _ = m.handle(msg(1, "a", 1), t0, &mut fx);
        assert_eq!(m.seal_at(), Some(t0 + ms(50)));
        let _ = m.handle(Event::Progress, t0 + ms(49), &mut fx);
        assert_eq!(fx.take(), []);
        let _ = m.handle(msg(2, "b", 1), t0 + ms(49), &mut fx);
        assert_eq!(m.seal_at(), Some(t0 + ms(50)), "the age is the oldest message's");
        let _ = m.handle(Event::BatchAged, t0 + ms(50), &mut fx);
        assert_eq!(fx.take(), [commit(&["a", "b"])]);
        assert_eq!(m.seal_at(), None);
    }

    #[test]
    fn an_idle_pipeline_seals_at_once_a_busy_one_waits() {
        let t0 = Instant::now();
        let (mut m, mut fx) = connected(
            Limits {
                seal_when_idle: true,
                ..limits()
            },
            t0,
        );
        let _ = m.handle(msg(1, "a", 1), t0, &mut fx);
        assert_eq!(fx.take(), [commit(&["a"])], "nothing committing: no added latency");
        let _ = m.handle(msg(2, "b", 1), t0, &mut fx);
        assert_eq!(fx.take(), [], "a batch is committing: b waits for more, or its age");
        let ev = fx.committed("a");
        let _ = m.handle(ev, t0 + ms(5), &mut fx);
        assert_eq!(
            fx.take(),
            [commit(&["b"]), publish("a"), Did::Ack(1)],
            "idle again: b is sealed; a's receipt, then its ack"
        );
    }

    #[test]
    fn acks_wait_until_every_earlier_message_of_the_connection_is_committed() {
        let t0 = Instant::now();
        let (mut m, mut fx) = connected(
            Limits {
                max_messages: 1,
                ..limits()
            },
            t0,
        );
        let _ = m.handle(msg(1, "a", 1), t0, &mut fx);
        let _ = m.handle(msg(2, "b", 1), t0, &mut fx);
        let _ = m.handle(msg(3, "c", 1), t0, &mut fx);
        assert_eq!(fx.take(), [commit(&["a"]), commit(&["b"])]);
        assert_eq!(m.sealed_batches(), 1);
        // b commits first: its receipt goes out, its ack waits for a.
        let ev = fx.committed("b");
        let _ = m.handle(ev, t0, &mut fx);
        assert_eq!(fx.take(), [commit(&["c"]), publish("b")]);
        let ev = fx.committed("c");
        let _ = m.handle(ev, t0, &mut fx);
        assert_eq!(fx.take(), [publish("c")], "a still committing: no ack");
        assert_eq!(m.unacked(), 3);
        let ev = fx.committed("a");
        let _ = m.handle(ev, t0, &mut fx);
        assert_eq!(fx.take(), [publish("a"), Did::Ack(1), Did::Ack(2), Did::Ack(3)]);
        assert_eq!(m.unacked(), 0);
    }

    #[test]
    fn a_reconnect_drops_the_old_connections_acks_never_sent_on_the_new_one() {
        let t0 = Instant::now();
        let (mut m, mut fx) = connected(
            Limits {
                max_messages: 1,
                ..limits()
            },
            t0,
        );
        let _ = m.handle(msg(1, "a", 1), t0, &mut fx);
        let _ = m.handle(msg(2, "b", 1), t0, &mut fx);
        assert_eq!(fx.take(), [commit(&["a"]), commit(&["b"])]);
        let ev = fx.committed("b");
        let _ = m.handle(ev, t0, &mut fx);
        assert_eq!(fx.take(), [publish("b")], "b waits for a");

        let _ = m.handle(Event::ConnectionLost, t0, &mut fx);
        assert_eq!((m.connected(), m.generation(), m.unacked()), (false, 1, 0));
        // The broker kept the session: no new subscription.
        let _ = m.handle(Event::Connected { session_present: true }, t0, &mut fx);
        assert_eq!(fx.take(), []);
        // The redelivery of a and b; packet ids are the new connection's (1
        // again). a' takes the second writer, b' waits for one.
        let _ = m.handle(msg(1, "a'", 1), t0, &mut fx);
        let _ = m.handle(msg(2, "b'", 1), t0, &mut fx);
        assert_eq!(fx.take(), [commit(&["a'"])]);
        let ev = fx.committed("a");
        let _ = m.handle(ev, t0, &mut fx);
        assert_eq!(
            fx.take(),
            [commit(&["b'"]), publish("a")],
            "the old a is receipted, never acked on the new connection"
        );
        let ev = fx.committed("a'");
        let _ = m.handle(ev, t0, &mut fx);
        assert_eq!(fx.take(), [publish("a'"), Did::Ack(1)]);
        let ev = fx.committed("b'");
        let _ = m.handle(ev, t0, &mut fx);
        assert_eq!(fx.take(), [publish("b'"), Did::Ack(2)]);
        assert_eq!(m.unacked(), 0);
    }

    #[test]
    fn a_new_connection_without_the_session_subscribes_again() {
        let t0 = Instant::now();
        let (mut m, mut fx) = connected(limits(), t0);
        let _ = m.handle(Event::ConnectionLost, t0, &mut fx);
        let _ = m.handle(Event::Connected { session_present: true }, t0, &mut fx);
        assert_eq!(fx.take(), []);
        let _ = m.handle(Event::ConnectionLost, t0, &mut fx);
        let _ = m.handle(Event::Connected { session_present: false }, t0, &mut fx);
        assert_eq!(fx.take(), [Did::Subscribe]);
        // The first connection of the process subscribes even when the
        // broker still has a session.
        let mut m = Machine::<&'static str>::new(limits());
        let _ = m.handle(Event::Connected { session_present: true }, t0, &mut fx);
        assert_eq!(fx.take(), [Did::Subscribe]);
    }

    #[test]
    fn an_unusable_message_is_acked_in_its_turn() {
        let t0 = Instant::now();
        let (mut m, mut fx) = connected(limits(), t0);
        let _ = m.handle(unusable(1), t0, &mut fx);
        assert_eq!(
            fx.take(),
            [Did::Ack(1)],
            "nothing before it: acked at once, without a batch"
        );
        let _ = m.handle(msg(2, "a", 1), t0, &mut fx);
        let _ = m.handle(unusable(3), t0, &mut fx);
        // A dead-lettered message is a batch member (its dead letter is
        // committed), with no row.
        let _ = m.handle(msg(4, "garbage", 0), t0, &mut fx);
        assert_eq!(fx.take(), []);
        assert_eq!(m.open_messages(), 2);
        let _ = m.handle(Event::BatchAged, t0 + ms(50), &mut fx);
        assert_eq!(fx.take(), [commit(&["a", "garbage"])]);
        let _ = m.handle(unusable(5), t0 + ms(51), &mut fx);
        assert_eq!(fx.take(), [], "3 and 5 wait behind 2");
        let ev = fx.committed("a");
        let _ = m.handle(ev, t0 + ms(60), &mut fx);
        assert_eq!(
            fx.take(),
            [
                publish("a"),
                publish("garbage"),
                Did::Ack(2),
                Did::Ack(3),
                Did::Ack(4),
                Did::Ack(5)
            ]
        );
    }

    #[test]
    fn the_drain_commits_what_was_taken_acks_it_and_disconnects() {
        let t0 = Instant::now();
        let (mut m, mut fx) = connected(
            Limits {
                max_messages: 2,
                writers: 1,
                ..limits()
            },
            t0,
        );
        let _ = m.handle(msg(1, "a", 1), t0, &mut fx);
        let _ = m.handle(msg(2, "b", 1), t0, &mut fx);
        let _ = m.handle(msg(3, "c", 1), t0, &mut fx);
        assert_eq!(fx.take(), [commit(&["a", "b"])]);
        let _ = m.handle(Event::Shutdown, t0 + ms(1), &mut fx);
        assert_eq!(
            m.phase(),
            Phase::Draining {
                deadline: t0 + ms(1) + Duration::from_secs(20)
            }
        );
        assert_eq!(fx.take(), [], "c waits for the writer");
        // A message arriving now is not taken: unacked, redelivered later.
        assert!(!m.takes_messages());
        let _ = m.handle(msg(4, "d", 1), t0 + ms(2), &mut fx);
        assert_eq!(m.unacked(), 3);
        let ev = fx.committed("a");
        let _ = m.handle(ev, t0 + ms(3), &mut fx);
        assert_eq!(
            fx.take(),
            [commit(&["c"]), publish("a"), publish("b"), Did::Ack(1), Did::Ack(2)],
            "draining seals the open batch at the free writer, young as it is"
        );
        let ev = fx.committed("c");
        let _ = m.handle(ev, t0 + ms(4), &mut fx);
        assert_eq!(fx.take(), [publish("c"), Did::Ack(3), Did::Disconnect]);
        assert!(matches!(m.phase(), Phase::Disconnecting { .. }));
        // DISCONNECT written: read on until the broker closes, briefly.
        let _ = m.handle(Event::DisconnectWritten, t0 + ms(5), &mut fx);
        assert_eq!(m.deadline(), Some(t0 + ms(5) + LINGER));
        assert_eq!(m.handle(Event::Progress, t0 + ms(6), &mut fx), Control::Continue);
        assert_eq!(m.handle(Event::ConnectionLost, t0 + ms(7), &mut fx), Control::Stop);
        assert_eq!(fx.take(), []);
    }

    #[test]
    fn the_drain_ends_at_its_deadline_with_what_is_unacked_left_to_redelivery() {
        let t0 = Instant::now();
        let (mut m, mut fx) = connected(limits(), t0);
        let _ = m.handle(msg(1, "a", 1), t0, &mut fx);
        let _ = m.handle(Event::Shutdown, t0, &mut fx);
        assert_eq!(fx.take(), [commit(&["a"])]);
        let deadline = m.deadline().expect("draining");
        assert_eq!(deadline, t0 + Duration::from_secs(20));
        // The write keeps failing (retried in its writer): nothing is acked.
        assert_eq!(m.handle(Event::Progress, deadline - ms(1), &mut fx), Control::Continue);
        assert_eq!(m.handle(Event::Deadline, deadline, &mut fx), Control::Stop);
        assert_eq!(fx.take(), []);
        assert_eq!(m.unacked(), 1);
    }

    #[test]
    fn a_drain_with_nothing_taken_disconnects_at_once_and_a_lost_connection_stops_it() {
        let t0 = Instant::now();
        let (mut m, mut fx) = connected(limits(), t0);
        assert_eq!(m.handle(Event::Shutdown, t0, &mut fx), Control::Continue);
        assert_eq!(fx.take(), [Did::Disconnect]);
        // The deadline of a DISCONNECT never written is the drain's.
        assert_eq!(m.deadline(), Some(t0 + Duration::from_secs(20)));
        assert_eq!(
            m.handle(Event::Deadline, t0 + Duration::from_secs(20), &mut fx),
            Control::Stop
        );

        // Never connected: nothing to wait for.
        let mut m = Machine::<&'static str>::new(limits());
        assert_eq!(m.handle(Event::Shutdown, t0, &mut fx), Control::Stop);
        assert_eq!(fx.take(), [Did::Disconnect]);
    }

    #[test]
    fn a_connection_lost_while_draining_drops_its_acks_and_ends_the_drain_once_committed() {
        let t0 = Instant::now();
        let (mut m, mut fx) = connected(limits(), t0);
        let _ = m.handle(msg(1, "a", 1), t0, &mut fx);
        let _ = m.handle(Event::Shutdown, t0, &mut fx);
        assert_eq!(fx.take(), [commit(&["a"])]);
        assert_eq!(
            m.handle(Event::ConnectionLost, t0, &mut fx),
            Control::Continue,
            "a is committing"
        );
        let ev = fx.committed("a");
        assert_eq!(m.handle(ev, t0, &mut fx), Control::Stop);
        assert_eq!(fx.take(), [publish("a"), Did::Disconnect], "receipted, never acked");
    }

    #[test]
    fn a_refused_disconnect_is_retried_at_the_next_event() {
        let t0 = Instant::now();
        let (mut m, mut fx) = connected(limits(), t0);
        fx.disconnect_busy = true;
        let _ = m.handle(Event::Shutdown, t0, &mut fx);
        assert!(matches!(m.phase(), Phase::Draining { .. }));
        fx.disconnect_busy = false;
        let _ = m.handle(Event::Progress, t0, &mut fx);
        assert_eq!(fx.take(), [Did::Disconnect]);
        assert!(matches!(m.phase(), Phase::Disconnecting { .. }));
    }

    #[test]
    fn the_drain_waits_for_the_receipts_and_acks_the_client_refused() {
        let t0 = Instant::now();
        // A receipt refused: the ack goes out (neither waits for the other),
        // the DISCONNECT waits for the receipt.
        let (mut m, mut fx) = connected(limits(), t0);
        let _ = m.handle(msg(1, "a", 1), t0, &mut fx);
        let _ = m.handle(Event::Shutdown, t0, &mut fx);
        assert_eq!(fx.take(), [commit(&["a"])]);
        fx.receipts_busy = true;
        let ev = fx.committed("a");
        let _ = m.handle(ev, t0, &mut fx);
        assert_eq!(fx.take(), [Did::Ack(1)]);
        assert!(matches!(m.phase(), Phase::Draining { .. }));
        fx.receipts_busy = false;
        let _ = m.handle(Event::Progress, t0, &mut fx);
        assert_eq!(fx.take(), [publish("a"), Did::Disconnect]);

        // An ack refused: the DISCONNECT waits for it.
        let (mut m, mut fx) = connected(limits(), t0);
        let _ = m.handle(msg(1, "a", 1), t0, &mut fx);
        let _ = m.handle(Event::Shutdown, t0, &mut fx);
        assert_eq!(fx.take(), [commit(&["a"])]);
        fx.acks_busy = true;
        let ev = fx.committed("a");
        let _ = m.handle(ev, t0, &mut fx);
        assert_eq!(fx.take(), [publish("a")]);
        assert!(matches!(m.phase(), Phase::Draining { .. }));
        fx.acks_busy = false;
        let _ = m.handle(Event::Progress, t0, &mut fx);
        assert_eq!(fx.take(), [Did::Ack(1), Did::Disconnect]);
    }

    #[test]
    fn refused_acks_and_receipts_are_retried_in_order_at_the_next_event() {
        let t0 = Instant::now();
        let (mut m, mut fx) = connected(limits(), t0);
        let _ = m.handle(msg(1, "a", 1), t0, &mut fx);
        let _ = m.handle(Event::BatchAged, t0 + ms(50), &mut fx);
        assert_eq!(fx.take(), [commit(&["a"])]);
        fx.acks_busy = true;
        fx.receipts_busy = true;
        let ev = fx.committed("a");
        let _ = m.handle(ev, t0 + ms(51), &mut fx);
        assert_eq!(fx.take(), []);
        assert_eq!(m.unacked(), 1);
        fx.receipts_busy = false;
        let _ = m.handle(Event::Progress, t0 + ms(52), &mut fx);
        assert_eq!(fx.take(), [publish("a")]);
        fx.acks_busy = false;
        let _ = m.handle(Event::Progress, t0 + ms(53), &mut fx);
        assert_eq!(fx.take(), [Did::Ack(1)]);
    }

    #[test]
    fn a_closed_receipts_queue_drops_receipts_and_acks_still_flow() {
        let t0 = Instant::now();
        let (mut m, mut fx) = connected(limits(), t0);
        let _ = m.handle(msg(1, "a", 1), t0, &mut fx);
        let _ = m.handle(msg(2, "b", 1), t0, &mut fx);
        let _ = m.handle(Event::BatchAged, t0 + ms(50), &mut fx);
        assert_eq!(fx.take(), [commit(&["a", "b"])]);
        fx.receipts_closed = true;
        let ev = fx.committed("a");
        let _ = m.handle(ev, t0 + ms(51), &mut fx);
        assert_eq!(fx.take(), [Did::Ack(1), Did::Ack(2)]);
        // Both receipts are gone, not kept for later, and the drain is not
        // held by them.
        fx.receipts_closed = false;
        let _ = m.handle(Event::Shutdown, t0 + ms(52), &mut fx);
        assert_eq!(fx.take(), [Did::Disconnect]);
    }
}

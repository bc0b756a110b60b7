//! What the edge tells about its broker session (the stats endpoint's
//! `broker` object, `/metrics`), and the labels of what it ignored.

use chrono::{Datelike, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// Why a message on the receipts subscription was ignored (the `reason`
/// label of `edge_receipts_ignored_total`; the module doc has the table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    Retained,
    WrongTopic,
    Oversized,
    Unreadable,
    OtherSite,
    OtherOutbox,
    UnknownBatch,
    OutsideBatch,
}

impl Ignored {
    pub const fn as_str(self) -> &'static str {
        match self {
            Ignored::Retained => "retained",
            Ignored::WrongTopic => "wrong_topic",
            Ignored::Oversized => "oversized",
            Ignored::Unreadable => "unreadable",
            Ignored::OtherSite => "other_site",
            Ignored::OtherOutbox => "other_outbox",
            Ignored::UnknownBatch => "unknown_batch",
            Ignored::OutsideBatch => "outside_batch",
        }
    }
}

/// Broker-side state, shared with the HTTP stats endpoint.
#[derive(Debug, Default)]
pub struct BrokerHealth {
    connected: AtomicBool,
    /// The broker acknowledged the receipts subscription on the current
    /// connection (a receipt for anything published from now on reaches us).
    pub(super) subscribed: AtomicBool,
    pub(super) connects: AtomicU64,
    pub(super) sessions_lost: AtomicU64,
    pub(super) last_receipt_ms: AtomicI64,
    last_change_ms: AtomicI64,
    pub(super) last_error: Mutex<Option<String>>,
    pub(super) published_batches: AtomicU64,
    pub(super) republished_batches: AtomicU64,
    pub(super) receipts: AtomicU64,
    /// Messages ignored on the receipts subscription, by reason.
    ignored: Mutex<BTreeMap<&'static str, u64>>,
}

/// A snapshot of [`BrokerHealth`] for the stats endpoint.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BrokerSnapshot {
    pub connected: bool,
    pub url: String,
    pub connects: u64,
    pub sessions_lost: u64,
    pub since: Option<chrono::DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_receipt_at: Option<chrono::DateTime<Utc>>,
    pub published_batches: u64,
    pub republished_batches: u64,
    pub receipts: u64,
    /// Messages on the receipts subscription ignored since start, by
    /// reason (`edge_receipts_ignored_total{reason}` of this edge).
    pub receipts_ignored: BTreeMap<String, u64>,
}

impl BrokerHealth {
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Connected, and the receipts subscription of this connection is
    /// acknowledged: a session ready to publish and be answered.
    pub fn ready(&self) -> bool {
        self.connected() && self.subscribed.load(Ordering::Acquire)
    }

    pub fn snapshot(&self, url: String) -> BrokerSnapshot {
        let ms = |a: &AtomicI64| {
            let v = a.load(Ordering::Acquire);
            (v > 0)
                .then(|| chrono::TimeZone::timestamp_millis_opt(&Utc, v).single())
                .flatten()
        };
        BrokerSnapshot {
            connected: self.connected(),
            url,
            connects: self.connects.load(Ordering::Acquire),
            sessions_lost: self.sessions_lost.load(Ordering::Acquire),
            since: ms(&self.last_change_ms),
            last_error: self.last_error.lock().ok().and_then(|g| g.clone()),
            last_receipt_at: ms(&self.last_receipt_ms),
            published_batches: self.published_batches.load(Ordering::Acquire),
            republished_batches: self.republished_batches.load(Ordering::Acquire),
            receipts: self.receipts.load(Ordering::Acquire),
            receipts_ignored: self
                .ignored
                .lock()
                .map(|m| m.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect())
                .unwrap_or_default(),
        }
    }

    /// How many messages were ignored for `reason` since start.
    pub fn ignored(&self, reason: Ignored) -> u64 {
        self.ignored
            .lock()
            .map(|m| m.get(reason.as_str()).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    pub(super) fn count_ignored(&self, reason: Ignored) {
        metrics::counter!("edge_receipts_ignored_total", "reason" => reason.as_str()).increment(1);
        if let Ok(mut m) = self.ignored.lock() {
            *m.entry(reason.as_str()).or_default() += 1;
        }
    }

    pub(super) fn set_connected(&self, c: bool) {
        if !c {
            self.subscribed.store(false, Ordering::Release);
        }
        self.connected.store(c, Ordering::Release);
        self.last_change_ms
            .store(Utc::now().timestamp_millis(), Ordering::Release);
    }
}

/// Whether the system clock can be trusted for `played_at`: a Pi has no RTC
/// and boots in the past until NTP syncs. Honest and simple: the year must be
/// at least 2020, and when systemd-timesyncd is in use
/// (`/run/systemd/timesync` exists) its `synchronized` flag file must exist.
pub fn clock_synced() -> bool {
    let year_ok = Utc::now().year() >= 2020;
    let dir = std::path::Path::new("/run/systemd/timesync");
    if dir.is_dir() {
        year_ok && dir.join("synchronized").exists()
    } else {
        year_ok
    }
}

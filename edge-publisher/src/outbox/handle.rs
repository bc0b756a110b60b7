//! The async handle: what the rest of the box holds. Each call is a command
//! sent to the writer thread over a channel, answered once the group it
//! joined has committed; the counters are read from memory the writer keeps
//! exact (module doc, invariant 7).

use schema::{Impression, SeqRange};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Notify};
use uuid::Uuid;

use super::{
    file, fill, writer, AppendOutcome, Claimed, Counts, FileStats, OutboxConfig, OutboxError, RefusedRecord, Settled,
};

/// A command to the writer thread, with the channel its answer goes back on.
pub(super) enum Cmd {
    Append(Vec<Impression>, oneshot::Sender<Result<AppendOutcome, OutboxError>>),
    Claim {
        max_count: usize,
        max_bytes: usize,
        batch_id: Uuid,
        reply: oneshot::Sender<Result<Claimed, OutboxError>>,
    },
    Requeue(Option<Uuid>, oneshot::Sender<Result<u64, OutboxError>>),
    SettleBatch {
        batch_id: Uuid,
        proposed: Vec<SeqRange>,
        reply: oneshot::Sender<Result<Settled, OutboxError>>,
    },
    Refresh(oneshot::Sender<Result<bool, OutboxError>>),
    Refused(Vec<RefusedRecord>, oneshot::Sender<Result<u64, OutboxError>>),
    Stats(oneshot::Sender<Result<FileStats, OutboxError>>),
    Close(oneshot::Sender<()>),
}

/// What the handle and the writer thread share: the identity, and the
/// counters only the writer stores into.
pub(super) struct Shared {
    pub(super) site_id: String,
    pub(super) outbox_id: Uuid,
    pub(super) cfg: OutboxConfig,
    pub(super) unconfirmed: AtomicU64,
    pub(super) unsent: AtomicU64,
    pub(super) bytes: AtomicU64,
    pub(super) near_full: AtomicBool,
    /// Signalled when rows become pending (new, or requeued).
    pub(super) pending: Notify,
    /// How many times the writer compared `PRAGMA data_version` (every
    /// group does): [`Outbox::refresh`] skips its round trip when the
    /// writer looked since the last call.
    pub(super) version_checks: AtomicU64,
    /// `version_checks` at the last [`Outbox::refresh`].
    pub(super) version_checks_seen: AtomicU64,
    /// Another process committed and no [`Outbox::refresh`] has said so yet.
    pub(super) external_commits: AtomicBool,
}

/// Handle to an open outbox; cheap to clone, usable from any task.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Cmd>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("site_id", &self.shared.site_id)
            .field("outbox_id", &self.shared.outbox_id)
            .field("counts", &self.counts())
            .finish()
    }
}

impl Outbox {
    /// Opens the outbox of `site_id` in `cfg.data_dir` (created if missing)
    /// and starts the writer thread. Every row starts pending (in-flight
    /// state lives in the writer's memory). Another process may hold the
    /// same file open and append to it (module doc, "Other writers").
    pub fn open(cfg: OutboxConfig, site_id: &str) -> Result<Outbox, OutboxError> {
        let opened = file::open_for_writer(&cfg, site_id)?;
        tracing::info!(
            path = %cfg.path().display(), site_id = %opened.site_id, outbox_id = %opened.outbox_id,
            unconfirmed = opened.rows, next_seq = opened.next_seq,
            "outbox open"
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            site_id: opened.site_id,
            outbox_id: opened.outbox_id,
            cfg,
            unconfirmed: AtomicU64::new(opened.rows as u64),
            unsent: AtomicU64::new(opened.rows as u64),
            bytes: AtomicU64::new(opened.bytes as u64),
            near_full: AtomicBool::new(false),
            pending: Notify::new(),
            version_checks: AtomicU64::new(0),
            version_checks_seen: AtomicU64::new(0),
            external_commits: AtomicBool::new(false),
        });
        writer::spawn(opened.conn, shared.clone(), opened.data_version, rx)?;
        Ok(Outbox { shared, tx })
    }

    pub fn site_id(&self) -> &str {
        &self.shared.site_id
    }

    pub fn outbox_id(&self) -> Uuid {
        self.shared.outbox_id
    }

    pub fn config(&self) -> &OutboxConfig {
        &self.shared.cfg
    }

    /// Current counts, from memory (no I/O).
    pub fn counts(&self) -> Counts {
        Counts {
            unconfirmed: self.shared.unconfirmed.load(Ordering::Acquire),
            unsent: self.shared.unsent.load(Ordering::Acquire),
            bytes: self.shared.bytes.load(Ordering::Acquire),
        }
    }

    /// Fill ratio against the tighter of the two limits.
    pub fn fill_ratio(&self) -> f64 {
        let c = self.counts();
        fill(&self.shared.cfg, c.unconfirmed, c.bytes)
    }

    /// Whether the outbox is above the warning threshold.
    pub fn near_full(&self) -> bool {
        self.shared.near_full.load(Ordering::Acquire)
    }

    /// Resolves when rows may have become pending since the last call.
    pub async fn pending_notified(&self) {
        self.shared.pending.notified().await;
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, OutboxError>>) -> Cmd,
    ) -> Result<T, OutboxError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Stores impressions (their `site_id` must be this outbox's; any `seq`
    /// they carry is replaced). Resolves once they are durable on disk.
    pub async fn append(&self, impressions: Vec<Impression>) -> Result<AppendOutcome, OutboxError> {
        if let Some(bad) = impressions.iter().find(|i| i.site_id != self.shared.site_id) {
            return Err(OutboxError::Storage(format!(
                "impression {} is of site '{}', this outbox is '{}'",
                bad.impression_id, bad.site_id, self.shared.site_id
            )));
        }
        if impressions.is_empty() {
            return Ok(AppendOutcome {
                queued: self.counts().unconfirmed,
                ..Default::default()
            });
        }
        self.call(|tx| Cmd::Append(impressions, tx)).await
    }

    /// Marks up to `max_count` pending rows (lowest seq first, at most
    /// `max_bytes` of JSON, at least one) as published in `batch_id`.
    pub async fn claim(&self, max_count: usize, max_bytes: usize, batch_id: Uuid) -> Result<Claimed, OutboxError> {
        self.call(|reply| Cmd::Claim {
            max_count,
            max_bytes,
            batch_id,
            reply,
        })
        .await
    }

    /// Puts the still-unconfirmed rows of `batch_id` (or of every batch) back to pending.
    pub async fn requeue(&self, batch_id: Option<Uuid>) -> Result<u64, OutboxError> {
        self.call(|tx| Cmd::Requeue(batch_id, tx)).await
    }

    /// Applies a receipt for `batch_id`: deletes the rows whose seqs it
    /// proposes *and* that are in flight in that batch (claimed by this
    /// process under `batch_id`, neither settled nor requeued since).
    /// Anything else it names is ignored and reported in [`Settled`]; a
    /// batch that is not in flight settles nothing. So whatever arrives on
    /// the network, a receipt can only remove rows this outbox published
    /// in the batch it answers.
    pub async fn settle_batch(&self, batch_id: Uuid, proposed: Vec<SeqRange>) -> Result<Settled, OutboxError> {
        self.call(|reply| Cmd::SettleBatch {
            batch_id,
            proposed,
            reply,
        })
        .await
    }

    /// Looks for commits another process made to the file (an `import`
    /// while the service runs): when there are, recounts the counters from
    /// the file and wakes [`Outbox::pending_notified`] if rows are pending.
    /// Cheap when nothing changed: one `PRAGMA data_version`, and not even
    /// that when the writer ran a group since the last call (every group
    /// looks itself), so a busy box pays nothing. Returns whether another
    /// process's commit was found since the last call; a commit made just
    /// after the writer's last look is found by the next call (or the next
    /// command), so a caller polling at an interval finds it within two.
    pub async fn refresh(&self) -> Result<bool, OutboxError> {
        let s = &self.shared;
        let found = s.external_commits.swap(false, Ordering::AcqRel);
        let checks = s.version_checks.load(Ordering::Acquire);
        let looked = s.version_checks_seen.swap(checks, Ordering::AcqRel) != checks;
        if found || looked {
            return Ok(found);
        }
        self.call(Cmd::Refresh).await
    }

    /// Keeps refused records for the operator.
    pub async fn store_refused(&self, records: Vec<RefusedRecord>) -> Result<u64, OutboxError> {
        self.call(|tx| Cmd::Refused(records, tx)).await
    }

    /// Statistics read from the file through the writer.
    pub async fn stats(&self) -> Result<FileStats, OutboxError> {
        self.call(Cmd::Stats).await
    }

    /// Finishes queued commands, checkpoints the WAL and stops the writer.
    /// Later calls on any clone fail with [`OutboxError::Closed`].
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

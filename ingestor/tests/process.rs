//! The real `neopro-ingestor` binary, killed with SIGKILL mid-stream and
//! restarted under the same client id: every impression lands exactly once.

#[macro_use]
mod common;

use std::process::{Child, Command, Stdio};

use common::*;
use sqlx::PgPool;
use uuid::Uuid;

const ROWS: &str = "SELECT count(*) FROM sponsor_impressions";

on_both_brokers!(killed_with_sigkill_mid_stream_and_restarted_every_impression_lands_once);

/// The child process, SIGKILLed when dropped (also when a test panics).
struct Proc(Child);

impl Proc {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(db_url: &str, broker: &str, prefix: &str, client_id: &str, log: &std::path::Path) -> Proc {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_neopro-ingestor"))
        .env("DATABASE_URL", db_url)
        .env("NEOPRO_MQTT_URL", broker)
        .env("NEOPRO_HTTP_ADDR", "127.0.0.1:0")
        .env("NEOPRO_TOPIC_PREFIX", prefix)
        .env("NEOPRO_INGESTOR_CLIENT_ID", client_id)
        // Small batches so that a kill lands between commits of one stream.
        .env("NEOPRO_INGESTOR_BATCH_MAX_MESSAGES", "4")
        .env("NEOPRO_INGESTOR_WRITERS", "2")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .map(Proc)
        .expect("spawn neopro-ingestor")
}

async fn killed_with_sigkill_mid_stream_and_restarted_every_impression_lands_once(pool: PgPool, broker: String) {
    let topics = unique_topics();
    let cid = unique_client_id();
    let url = db_url(&pool).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ingestor.log");
    let mut edge = Edge::connect(&broker, &topics).await;

    // The ingestor's session exists before the stream starts (as in
    // production), so nothing published while it starts or restarts is lost.
    ensure_session(&broker, &cid, &topics).await;
    let mut child = spawn(&url, &broker, topics.prefix(), &cid, &log);
    // 300 envelopes x 20 impressions: the first 100, then kill -9 as soon as
    // a commit of theirs is visible (the rest of them still in flight), then
    // the other 200 while no ingestor runs (queued in its session).
    let envs: Vec<_> = (0..300i64)
        .map(|k| envelope(&format!("club-{}", k % 10), Uuid::now_v7(), 1 + (k / 10) * 20, 20))
        .collect();
    for env in &envs[..100] {
        edge.publish(env).await;
    }
    wait_count(&pool, ROWS, 1).await;
    child.kill(); // SIGKILL
    for env in &envs[100..] {
        edge.publish(env).await;
    }
    let at_kill = count(&pool, ROWS).await;
    assert!(at_kill < 6000, "the kill must happen mid-stream (had {at_kill} rows)");

    // Restart under the same client id: the broker redelivers what was not acked.
    let mut child = spawn(&url, &broker, topics.prefix(), &cid, &log);
    let n = wait_count(&pool, ROWS, 6000).await;
    // Every envelope answered (some twice: before the kill and after). A
    // receipt still in the killed process's socket is lost by design; the
    // edge's resend after its timeout gets it (the duplicate is absorbed).
    let _ = edge.receipts_resending(&envs).await;
    child.kill();
    end_foreign_backends(&pool).await;
    if n != 6000 {
        eprintln!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    assert_eq!(n, 6000, "every impression exactly once after a SIGKILL");
    assert_eq!(count(&pool, ROWS).await, 6000);
    assert_rollup_matches(&pool).await;
    forget_session(&broker, &cid).await;
    end_foreign_backends(&pool).await;
}

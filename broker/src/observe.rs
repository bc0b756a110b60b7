//! What the router tells us, turned into Prometheus metrics and loud logs.
//!
//! rumqttd pushes, every second (see `embedded::build_config`), the meters
//! (current connections; publishes and failed publishes since the last push)
//! and the alerts it collected (`cursor_jump`: a subscriber fell behind the
//! in-memory log and lost messages; `bad_publish`). A thread forwards them:
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `neopro_broker_connections` | gauge | MQTT connections (updated while traffic flows; rumqttd reports nothing in an idle second) |
//! | `neopro_broker_publishes_total` | counter | PUBLISH packets received |
//! | `neopro_broker_failed_publishes_total` | counter | publishes rumqttd could not append (the client is disconnected) |
//! | `neopro_broker_alerts_total{kind}` | counter | router alerts: `cursor_jump` (log overflow, slow consumer: messages lost for that subscriber), `bad_publish` |
//! | `neopro_broker_log_capacity_bytes{log}` | gauge | configured ring size: `ingestor` filter, `other` filters |
//! | `neopro_broker_auth_failures_total{reason}` | counter | refused CONNECTs (`auth.rs`) |
//! | `neopro_broker_auth_success_total` | counter | accepted CONNECTs |
//! | `neopro_broker_accounts` | gauge | accounts in the credentials file in force |
//! | `neopro_broker_credentials_reloads_total{result}` | counter | reloads, `ok` / `error` |
//! | `neopro_broker_acl_denied_total{reason}` | counter | packets the topic ACL refused (`acl.rs`): `publish_topic`, `publish_retain`, `publish_size`, `subscribe`, `will` |
//!
//! A cursor jump is logged at ERROR: it is the one event where the broker
//! dropped messages a subscriber had not received. Nothing is lost for the
//! pipeline (the edge resends until a receipt arrives), but the operator
//! should enlarge `log.outage_messages` or fix the slow subscriber.

use crate::settings::BrokerSettings;
use rumqttd::alerts::AlertsLink;
use rumqttd::meters::MetersLink;
use rumqttd::{Alert, Meter};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Counters kept in-process as well (tests and `/healthz` read them without
/// parsing Prometheus text).
#[derive(Debug, Default)]
pub struct Observer {
    pub connections: AtomicU64,
    pub publishes: AtomicU64,
    pub failed_publishes: AtomicU64,
    pub cursor_jumps: AtomicU64,
    pub bad_publishes: AtomicU64,
    /// Refusals of the topic ACL, by reason (counted by `acl.rs`).
    pub acl_denied: Arc<crate::acl::Denials>,
}

impl Observer {
    pub fn new(settings: &BrokerSettings) -> Arc<Self> {
        metrics::gauge!("neopro_broker_log_capacity_bytes", "log" => "ingestor")
            .set(settings.log.ingestor_plan().capacity_bytes() as f64);
        metrics::gauge!("neopro_broker_log_capacity_bytes", "log" => "other")
            .set(settings.log.other_plan().capacity_bytes() as f64);
        Arc::new(Self::default())
    }

    fn meters(&self, meters: Vec<Meter>) {
        for m in meters {
            if let Meter::Router(_, r) = m {
                self.connections.store(r.total_connections as u64, Ordering::Relaxed);
                self.publishes.fetch_add(r.total_publishes as u64, Ordering::Relaxed);
                self.failed_publishes
                    .fetch_add(r.failed_publishes as u64, Ordering::Relaxed);
                metrics::gauge!("neopro_broker_connections").set(r.total_connections as f64);
                metrics::counter!("neopro_broker_publishes_total").increment(r.total_publishes as u64);
                metrics::counter!("neopro_broker_failed_publishes_total").increment(r.failed_publishes as u64);
                if r.failed_publishes > 0 {
                    tracing::warn!(
                        failed = r.failed_publishes,
                        "rumqttd refused publishes (publishers were disconnected)"
                    );
                }
            }
        }
    }

    fn alerts(&self, alerts: Vec<Alert>) {
        // A subscriber that falls behind jumps its cursor once per read of
        // the log, often dozens of times in one second: one line per
        // (client, filter) and batch of alerts, with the count, not dozens.
        let mut jumps: Vec<(String, String, u64)> = Vec::new();
        for a in alerts {
            let kind = a.kind.name();
            metrics::counter!("neopro_broker_alerts_total", "kind" => kind.clone()).increment(1);
            if kind == "cursor_jump" {
                self.cursor_jumps.fetch_add(1, Ordering::Relaxed);
                let filter = jump_filter(&a.kind.description());
                match jumps.iter_mut().find(|(c, f, _)| *c == a.client_id && *f == filter) {
                    Some(j) => j.2 += 1,
                    None => jumps.push((a.client_id, filter, 1)),
                }
            } else {
                self.bad_publishes.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(client_id = %a.client_id, kind, detail = %a.kind.description(), "broker alert");
            }
        }
        for (client_id, filter, n) in jumps {
            tracing::error!(
                client_id = %client_id,
                filter = %filter,
                jumps = n,
                "LOG OVERFLOW: subscriber fell behind the broker's in-memory log and lost messages \
                 (slow or absent consumer; rumqttd does not count them). Edges will resend what has no \
                 receipt; enlarge log.outage_messages if this recurs"
            );
        }
    }
}

/// The filter named in a cursor-jump alert's description (`Filter: <f>,
/// Lost: 0`; rumqttd always reports 0 lost, so only the filter is kept).
fn jump_filter(description: &str) -> String {
    let d = description.strip_prefix("Filter: ").unwrap_or(description);
    d.rsplit_once(", Lost:").map_or(d, |(f, _)| f).to_owned()
}

/// Starts the thread that drains both links.
pub fn spawn(observer: Arc<Observer>, meters: MetersLink, alerts: AlertsLink) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("rumqttd-observe".into())
        .spawn(move || loop {
            while let Ok(a) = alerts.recv() {
                observer.alerts(a);
            }
            while let Ok(m) = meters.recv() {
                observer.meters(m);
            }
            std::thread::sleep(Duration::from_millis(250));
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::jump_filter;

    #[test]
    fn the_filter_is_read_from_the_alert_and_the_meaningless_count_dropped() {
        assert_eq!(
            jump_filter("Filter: neopro/sites/+/impressions, Lost: 0"),
            "neopro/sites/+/impressions"
        );
        assert_eq!(jump_filter("something else"), "something else");
    }
}

//! The task that only polls the rumqttc event loop (it must never block:
//! the client's keep-alive and acks run there) and hands what matters to
//! the publishing task over a channel.

use rumqttc::{Event, EventLoop, Outgoing, Packet, Publish};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::BrokerHealth;

/// What the event loop saw, for the publishing task.
pub(super) enum IoEvent {
    ConnAck { session_present: bool },
    Message(Publish),
    Disconnected,
}

/// Polls `eventloop` until `stop`, reconnecting with a backoff between `min` and `max`.
pub(super) async fn io_loop(
    mut eventloop: EventLoop,
    tx: mpsc::UnboundedSender<IoEvent>,
    stop: CancellationToken,
    min: Duration,
    max: Duration,
    health: Arc<BrokerHealth>,
    url: String,
) {
    let mut backoff = runtime::backoff(min, max);
    let mut was_connected = false;
    loop {
        let ev = tokio::select! {
            () = stop.cancelled() => return,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(c))) => {
                backoff = runtime::backoff(min, max);
                health.set_connected(true);
                health.connects.fetch_add(1, Ordering::AcqRel);
                metrics::gauge!("edge_broker_connected").set(1.0);
                tracing::info!(broker = %url, session_present = c.session_present, "connected to the broker");
                was_connected = true;
                let _ = tx.send(IoEvent::ConnAck {
                    session_present: c.session_present,
                });
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let _ = tx.send(IoEvent::Message(p));
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                // The receipts topic is this client's only subscription.
                health.subscribed.store(true, Ordering::Release);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                health.set_connected(false);
                let _ = tx.send(IoEvent::Disconnected);
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let msg = e.to_string();
                if was_connected {
                    tracing::warn!(broker = %url, error = %msg, "broker connection lost");
                } else {
                    tracing::debug!(broker = %url, error = %msg, "broker connection failed");
                }
                was_connected = false;
                health.set_connected(false);
                metrics::gauge!("edge_broker_connected").set(0.0);
                if let Ok(mut g) = health.last_error.lock() {
                    *g = Some(msg.clone());
                }
                let _ = tx.send(IoEvent::Disconnected);
                let wait = backoff.next().unwrap_or(max);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

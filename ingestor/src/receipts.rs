//! Receipts go out on their own MQTT connection.
//!
//! Why not on the subscribing connection: rumqttc stops reading its request
//! channel while its outgoing inflight window is full or a packet id
//! collides, and the manual PUBACKs of received messages travel through that
//! same channel. Receipts queued ahead of acks could then hold the acks back;
//! the broker, whose window towards us stays full of unacked messages, delays
//! its own traffic to us; neither side moves (seen with rumqttd under
//! load: "Timeout while waiting to resolve collision", then a stall). With
//! receipts on a second connection (client id `{client_id}:receipts`, which
//! the embedded broker's client-id rule and a username-based Mosquitto ACL
//! both accept), acks never wait for a receipt.
//!
//! Its account: by default the subscribing connection's (`mqtt_url`). A
//! Mosquitto that binds client ids to usernames (`use_username_as_clientid`)
//! gives both connections of one account the same client id, so each would
//! take the other's session; there the receipts connection gets an account of
//! its own with `receipts_mqtt_url` (client id `{username}:receipts`).
//!
//! Losing a receipt is safe: the edge republishes what stays unconfirmed
//! after its timeout, the database absorbs the duplicate, and a new receipt
//! is sent. So this connection uses a clean session and no disk.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{Event, Outgoing, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::settings::Settings;

/// A receipt to publish: (topic, encoded payload).
pub type EncodedReceipt = (String, Vec<u8>);

/// Queue of receipts to publish.
pub type ReceiptTx = mpsc::Sender<EncodedReceipt>;

/// The running publisher; [`ReceiptPublisher::finish`] flushes it.
pub struct ReceiptPublisher {
    tx: ReceiptTx,
    task: JoinHandle<()>,
}

impl ReceiptPublisher {
    /// Connects (in the background, with backoff) and starts publishing.
    pub fn start(settings: &Settings) -> anyhow::Result<Self> {
        let (url, client_id) = connection(settings);
        tracing::info!(broker = %url, %client_id, "receipts connection starting");
        let mut copts = runtime::mqtt::ClientOptions::new(client_id);
        copts.clean_session = true;
        copts.keep_alive = Duration::from_secs(settings.mqtt_keep_alive_secs.max(5));
        copts.request_channel_capacity = 1024;
        let (client, mut eventloop) = runtime::mqtt::client(url, &copts, |_| {})?;
        let (tx, mut rx) = mpsc::channel::<EncodedReceipt>(100_000);
        let closing = Arc::new(AtomicBool::new(false));

        let closing_poll = closing.clone();
        let poller = tokio::spawn(async move {
            let mut backoff = runtime::backoff(Duration::from_millis(200), Duration::from_secs(10));
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(Event::Incoming(rumqttc::Incoming::ConnAck(_))) => {
                        backoff = runtime::backoff(Duration::from_millis(200), Duration::from_secs(10));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if closing_poll.load(Ordering::Relaxed) {
                            break;
                        }
                        tracing::warn!(error = %e, "receipt connection lost; unsent receipts are recovered by edge resends");
                        tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(1))).await;
                    }
                }
            }
        });

        let task = tokio::spawn(async move {
            while let Some((topic, payload)) = rx.recv().await {
                if client.publish(topic, QoS::AtLeastOnce, false, payload).await.is_err() {
                    break;
                }
                metrics::counter!("ingestor_receipts_published_total").increment(1);
            }
            closing.store(true, Ordering::Relaxed);
            let _ = client.disconnect().await;
            // The event loop writes what is queued, then the DISCONNECT.
            let _ = tokio::time::timeout(Duration::from_secs(5), poller).await;
        });
        Ok(Self { tx, task })
    }

    /// The queue to hand receipts to.
    pub fn sender(&self) -> ReceiptTx {
        self.tx.clone()
    }

    /// Publishes what is queued, disconnects, within `deadline`.
    pub async fn finish(self, deadline: Duration) {
        drop(self.tx);
        if tokio::time::timeout(deadline, self.task).await.is_err() {
            tracing::warn!("receipts still queued at the deadline; edges will resend and get new ones");
        }
    }
}

/// The broker URL and client id of the receipts connection.
pub fn connection(settings: &Settings) -> (&runtime::mqtt::MqttUrl, String) {
    match &settings.receipts_mqtt_url {
        Some(url) => {
            let owner = url.username.as_deref().unwrap_or(&settings.client_id);
            (url, format!("{owner}:receipts"))
        }
        None => (&settings.mqtt_url, format!("{}:receipts", settings.client_id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_use_the_main_account_unless_given_their_own() {
        let mut s = Settings {
            mqtt_url: "mqtt://ingestor:pw@broker:1883".parse().unwrap(),
            ..Default::default()
        };
        let (url, id) = connection(&s);
        assert_eq!(
            (url.username.as_deref(), id.as_str()),
            (Some("ingestor"), "ingestor:receipts")
        );

        s.receipts_mqtt_url = Some("mqtt://ingestor-receipts:pw2@broker:1883".parse().unwrap());
        let (url, id) = connection(&s);
        assert_eq!(
            (url.username.as_deref(), id.as_str()),
            (Some("ingestor-receipts"), "ingestor-receipts:receipts")
        );

        s.receipts_mqtt_url = Some("mqtt://broker:1883".parse().unwrap());
        assert_eq!(connection(&s).1, "ingestor:receipts");
    }
}

//! NeoPro patch 4: the router enforces a connection's `ConnectionAcl`.
//! Real router thread, local links (the same `LinkBuilder` a remote link
//! uses), packets as a client sends them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::local::{LinkBuilder, LinkRx, LinkTx};
use crate::protocol::{
    Filter, Packet, Publish, QoS, RetainForwardRule, Subscribe, SubscribeReasonCode,
};
use crate::router::{Ack, Event, Notification};
use crate::{ConnectionAcl, ConnectionId, Denied, Router, RouterConfig};

/// Publishes only the topics listed (retain only on those marked), and
/// subscribes only to filters starting with `sub_prefix`. Records what it
/// was asked.
#[derive(Debug, Default)]
struct TestAcl {
    publish: Vec<(&'static str, bool)>,
    sub_prefix: &'static str,
    asked: Mutex<Vec<String>>,
}

impl ConnectionAcl for TestAcl {
    fn publish(&self, topic: &str, retain: bool, len: usize) -> Result<(), Denied> {
        self.asked.lock().unwrap().push(format!("publish {topic} {retain} {len}"));
        match self.publish.iter().find(|(t, _)| *t == topic) {
            None => Err(Denied { reason: "topic" }),
            Some((_, false)) if retain => Err(Denied { reason: "retain" }),
            Some(_) => Ok(()),
        }
    }

    fn subscribe(&self, filter: &str) -> Result<(), Denied> {
        self.asked.lock().unwrap().push(format!("subscribe {filter}"));
        if filter.starts_with(self.sub_prefix) {
            Ok(())
        } else {
            Err(Denied { reason: "filter" })
        }
    }
}

fn router() -> flume::Sender<(ConnectionId, Event)> {
    let config = RouterConfig {
        max_connections: 16,
        max_outgoing_packet_count: 200,
        max_segment_size: 1024 * 1024,
        max_segment_count: 4,
        ..RouterConfig::default()
    };
    Router::new(0, config).spawn()
}

fn link(
    router_tx: &flume::Sender<(ConnectionId, Event)>,
    client_id: &str,
    clean: bool,
    acl: Option<Arc<dyn ConnectionAcl>>,
) -> (LinkTx, LinkRx) {
    let (tx, rx, _connack) = LinkBuilder::new(client_id, router_tx.clone())
        .clean_session(clean)
        .dynamic_filters(true)
        .acl(acl)
        .build()
        .unwrap();
    (tx, rx)
}

fn publish(topic: &str, payload: &'static [u8], qos: QoS, pkid: u16, retain: bool) -> Packet {
    Packet::Publish(
        Publish {
            dup: false,
            qos,
            pkid,
            retain,
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            payload: Bytes::from_static(payload),
        },
        None,
    )
}

fn subscribe(pkid: u16, filters: &[&str]) -> Packet {
    let filters = filters
        .iter()
        .map(|f| Filter {
            path: (*f).to_owned(),
            qos: QoS::AtLeastOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        })
        .collect();
    Packet::Subscribe(Subscribe { pkid, filters }, None)
}

/// Everything the router sends this link within `wait` (asks for more when
/// the router unschedules it).
fn drain(rx: &mut LinkRx, wait: Duration) -> Vec<Notification> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    while let Ok(n) = rx.recv_deadline(deadline) {
        match n {
            Some(Notification::Unschedule) => rx.ready().unwrap(),
            Some(n) => got.push(n),
            None => {}
        }
    }
    got
}

/// (topic, payload) of the publishes forwarded.
fn forwarded(ns: &[Notification]) -> Vec<(String, String)> {
    ns.iter()
        .filter_map(|n| match n {
            Notification::Forward(f) => Some((
                String::from_utf8_lossy(&f.publish.topic).into_owned(),
                String::from_utf8_lossy(&f.publish.payload).into_owned(),
            )),
            _ => None,
        })
        .collect()
}

fn pubacks(ns: &[Notification]) -> Vec<u16> {
    ns.iter()
        .filter_map(|n| match n {
            Notification::DeviceAck(Ack::PubAck(a)) => Some(a.pkid),
            _ => None,
        })
        .collect()
}

fn subacks(ns: &[Notification]) -> Vec<Vec<SubscribeReasonCode>> {
    ns.iter()
        .filter_map(|n| match n {
            Notification::DeviceAck(Ack::SubAck(a)) => Some(a.return_codes.clone()),
            _ => None,
        })
        .collect()
}

const WAIT: Duration = Duration::from_millis(300);

fn pair(t: &str, p: &str) -> (String, String) {
    (t.to_owned(), p.to_owned())
}

#[tokio::test]
async fn refused_publishes_are_acked_in_order_dropped_and_never_retained() {
    let router_tx = router();
    let (mut wtx, mut wrx) = link(&router_tx, "watcher", true, None);
    wtx.subscribe("a/+").unwrap();
    wtx.subscribe("b/+").unwrap();
    assert_eq!(subacks(&drain(&mut wrx, WAIT)).len(), 2);
    // A retained message someone allowed to keep it published.
    wtx.send(publish("b/keep", b"kept", QoS::AtMostOnce, 0, true))
        .await
        .unwrap();
    assert_eq!(forwarded(&drain(&mut wrx, WAIT)), vec![pair("b/keep", "kept")]);

    let acl = Arc::new(TestAcl {
        publish: vec![("a/ok", true), ("a/plain", false)],
        sub_prefix: "a/",
        ..TestAcl::default()
    });
    let (mut btx, mut brx) = link(&router_tx, "box", true, Some(acl.clone()));
    for p in [
        publish("b/x", b"forged", QoS::AtLeastOnce, 1, true),
        publish("a/ok", b"genuine", QoS::AtLeastOnce, 2, true),
        // An empty payload would clear the retained message on b/keep.
        publish("b/keep", b"", QoS::AtLeastOnce, 3, false),
        publish("a/plain", b"retained-refused", QoS::AtLeastOnce, 4, true),
        publish("b/y", b"qos0-forged", QoS::AtMostOnce, 0, false),
        publish("a/plain", b"plain", QoS::AtLeastOnce, 5, false),
    ] {
        btx.send(p).await.unwrap();
    }
    assert_eq!(
        pubacks(&drain(&mut brx, WAIT)),
        vec![1, 2, 3, 4, 5],
        "every QoS 1 publish acknowledged, in arrival order"
    );
    assert_eq!(
        forwarded(&drain(&mut wrx, WAIT)),
        vec![pair("a/ok", "genuine"), pair("a/plain", "plain")],
        "only the allowed publishes were routed"
    );
    assert_eq!(
        acl.asked.lock().unwrap()[..2],
        ["publish b/x true 6".to_owned(), "publish a/ok true 7".to_owned()],
        "the ACL sees topic, retain flag and payload length"
    );

    // The connection is still up and its allowed traffic flows.
    btx.send(publish("a/ok", b"after", QoS::AtLeastOnce, 6, false))
        .await
        .unwrap();
    assert_eq!(pubacks(&drain(&mut brx, WAIT)), vec![6]);
    assert_eq!(forwarded(&drain(&mut wrx, WAIT)), vec![pair("a/ok", "after")]);

    // A later subscriber gets the allowed retained message and the one the
    // refused empty publish did not clear; nothing refused was stored.
    let (mut ltx, mut lrx) = link(&router_tx, "late", true, None);
    ltx.subscribe("a/+").unwrap();
    ltx.subscribe("b/+").unwrap();
    let mut retained = forwarded(&drain(&mut lrx, WAIT));
    retained.sort();
    assert_eq!(retained, vec![pair("a/ok", "genuine"), pair("b/keep", "kept")]);
}

#[tokio::test]
async fn refused_filters_get_the_failure_code_and_no_data() {
    let router_tx = router();
    let acl = Arc::new(TestAcl {
        sub_prefix: "a/",
        ..TestAcl::default()
    });
    let (mut btx, mut brx) = link(&router_tx, "box", true, Some(acl.clone()));
    btx.send(subscribe(7, &["a/in", "b/out", "#", "$SYS/#", "$share/g/b/out"]))
        .await
        .unwrap();
    assert_eq!(
        subacks(&drain(&mut brx, WAIT)),
        vec![vec![
            SubscribeReasonCode::QoS1,
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
        ]],
        "one SUBACK, refused filters 0x80, the allowed one granted; no disconnect for `$SYS`"
    );

    let (mut wtx, _wrx) = link(&router_tx, "watcher", true, None);
    wtx.publish("b/out", "secret").unwrap();
    wtx.publish("a/in", "for-box").unwrap();
    assert_eq!(forwarded(&drain(&mut brx, WAIT)), vec![pair("a/in", "for-box")]);
}

#[tokio::test]
async fn a_restored_session_keeps_only_the_subscriptions_the_acl_allows() {
    let router_tx = router();
    // First session, unrestricted, persistent: subscribes to both.
    let (mut btx, mut brx) = link(&router_tx, "box", false, None);
    btx.send(subscribe(1, &["a/in", "b/out"])).await.unwrap();
    assert_eq!(subacks(&drain(&mut brx, WAIT)).len(), 1);
    let id = brx.id();
    router_tx.send((id, Event::Disconnect)).unwrap();
    drop((btx, brx));

    // Same client id, now under an ACL that refuses `b/out`.
    let acl = Arc::new(TestAcl {
        sub_prefix: "a/",
        ..TestAcl::default()
    });
    let (_btx, mut brx) = link(&router_tx, "box", false, Some(acl));
    let (mut wtx, _wrx) = link(&router_tx, "watcher", true, None);
    wtx.publish("b/out", "secret").unwrap();
    wtx.publish("a/in", "for-box").unwrap();
    assert_eq!(forwarded(&drain(&mut brx, WAIT)), vec![pair("a/in", "for-box")]);
}

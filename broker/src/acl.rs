//! Topic isolation on the embedded broker: who may publish and subscribe
//! to what, enforced by rumqttd's router for every packet (vendored patch
//! 4, `vendor/rumqttd/PATCHES.md`).
//!
//! Why: a site account is trusted for its own site only. Without these
//! rules `club-a` could read every club's envelopes (`neopro/#`), forge
//! `club-b`'s receipts (making club-b's box delete plays the centre never
//! stored) or its plays, fill the broker's memory with retained messages,
//! or leave a last will on another site's status topic.
//!
//! With prefix `p` and an authenticated user `u` (the rules
//! `mosquitto.rs` writes for the hosted path are the same):
//!
//! | role | may publish | may subscribe |
//! |---|---|---|
//! | `site` | `p/sites/u/impressions` (not retained), `p/sites/u/status` (retained allowed, at most [`STATUS_MAX_BYTES`]) | `p/sites/u/receipts` |
//! | `ingestor` | `p/sites/+/receipts` (any one site, not retained, at most [`RECEIPT_MAX_BYTES`]) | `p/sites/+/impressions`, `p/sites/+/status`, any narrower filter, also behind `$share/{group}/` |
//! | `observer` | nothing | any filter under `p/` (`p/#` included) |
//!
//! Everything else is refused: topics outside the prefix, retained
//! messages outside status topics, wildcard filters for sites, `#`, `$SYS`,
//! topic names holding wildcards, malformed filters. A filter is allowed
//! when every topic it can match is allowed ([`filter_within`]). The last
//! will is a publish like any other. An account missing from the
//! credentials when its connection is set up (removed by a reload between
//! the password check and this lookup) may do nothing.
//!
//! Refusals follow MQTT 3.1.1 (see the patch): a refused filter gets SUBACK
//! 0x80, a refused publish is acknowledged and dropped (the connection
//! stays up, so a buggy box is never wedged in a reconnect loop), a refused
//! will refuses the CONNECT (return code 5). Each refusal is counted in
//! `neopro_broker_acl_denied_total{reason}` and in [`Denials`], and logged
//! at WARN with client id, username and topic: the first of each
//! connection, then every [`LOG_EVERY`]th, so a looping client cannot fill
//! the logs.
//!
//! These checks run on rumqttd's router thread for every publish: plain
//! string comparisons against topics computed once per connection, no
//! allocation, no lock.

use rumqttd::{ConnectionAcl, Denied};
use runtime::credentials::Role;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Largest retained status a site may publish. A box's status (and its
/// offline will) is a few hundred bytes of JSON; every retained status
/// stays in the broker's memory for as long as it runs.
pub const STATUS_MAX_BYTES: usize = 4096;

/// Largest receipt the ingestor may publish: the contract's packet limit,
/// which every one of our clients accepts (their incoming limit is far
/// above it, `runtime::mqtt::MAX_INCOMING_PACKET_BYTES`) and which the
/// ingestor's own client cannot exceed anyway. Not lower: a legitimate
/// receipt of a refused envelope may name up to 5,000 seqs one by one
/// (`ingestor::decode::MAX_RECEIPT_SEQS`, ~50 bytes each, ~250 KB), and a
/// receipt dropped here would make the box resend that envelope forever.
pub const RECEIPT_MAX_BYTES: usize = schema::mqtt::MAX_PACKET_BYTES;

/// After the first refusal of a connection, one log line per this many.
pub const LOG_EVERY: u64 = 1000;

/// Why a packet was refused (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A publish on a topic the account may not publish on.
    PublishTopic,
    /// A retained publish where only non-retained ones are allowed.
    PublishRetain,
    /// A publish larger than its topic allows.
    PublishSize,
    /// A SUBSCRIBE filter the account may not read.
    Subscribe,
    /// A CONNECT whose last will the account may not publish.
    Will,
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Reason::PublishTopic,
        Reason::PublishRetain,
        Reason::PublishSize,
        Reason::Subscribe,
        Reason::Will,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::PublishTopic => "publish_topic",
            Reason::PublishRetain => "publish_retain",
            Reason::PublishSize => "publish_size",
            Reason::Subscribe => "subscribe",
            Reason::Will => "will",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// Refusals of one broker, by reason (tests and operators read them
/// without parsing Prometheus text; the same counts go to
/// `neopro_broker_acl_denied_total{reason}`).
#[derive(Debug, Default)]
pub struct Denials {
    counts: [AtomicU64; 5],
}

impl Denials {
    fn record(&self, reason: Reason) {
        self.counts[reason.index()].fetch_add(1, Ordering::Relaxed);
        metrics::counter!("neopro_broker_acl_denied_total", "reason" => reason.as_str()).increment(1);
    }

    /// Refusals for `reason` since the broker started.
    pub fn get(&self, reason: Reason) -> u64 {
        self.counts[reason.index()].load(Ordering::Relaxed)
    }

    /// Every refusal since the broker started.
    pub fn total(&self) -> u64 {
        Reason::ALL.iter().map(|r| self.get(*r)).sum()
    }
}

/// The broker-wide part of the rules: the prefix and the size limits.
#[derive(Debug)]
pub struct Policy {
    prefix: String,
    impressions_max_bytes: usize,
    denials: Arc<Denials>,
}

impl Policy {
    /// `impressions_max_bytes`: the broker's own packet limit
    /// (`limits.max_payload_size`), which no envelope can exceed anyway.
    pub fn new(prefix: &schema::mqtt::Topics, impressions_max_bytes: usize, denials: Arc<Denials>) -> Self {
        Self {
            prefix: prefix.prefix().to_owned(),
            impressions_max_bytes,
            denials,
        }
    }

    /// What `username` may do in `role` (`None`: the account is not in the
    /// credentials in force, so nothing).
    pub fn rules(&self, username: &str, role: Option<Role>) -> Rules {
        let p = &self.prefix;
        Rules {
            role,
            sites: format!("{p}/sites/"),
            under_prefix: format!("{p}/#"),
            own_impressions: format!("{p}/sites/{username}/impressions"),
            own_status: format!("{p}/sites/{username}/status"),
            own_receipts: format!("{p}/sites/{username}/receipts"),
            all_impressions: format!("{p}/sites/+/impressions"),
            all_status: format!("{p}/sites/+/status"),
            impressions_max_bytes: self.impressions_max_bytes,
        }
    }

    /// The ACL of one connection, counting and logging its refusals.
    pub fn connection(&self, client_id: &str, username: &str, role: Option<Role>) -> AccountAcl {
        AccountAcl {
            client_id: client_id.to_owned(),
            username: username.to_owned(),
            rules: self.rules(username, role),
            denials: Arc::clone(&self.denials),
            refused: AtomicU64::new(0),
        }
    }
}

/// What one account may do: pure decisions, no counting.
#[derive(Clone, Debug)]
pub struct Rules {
    role: Option<Role>,
    sites: String,
    under_prefix: String,
    own_impressions: String,
    own_status: String,
    own_receipts: String,
    all_impressions: String,
    all_status: String,
    impressions_max_bytes: usize,
}

impl Rules {
    /// May this account publish `len` payload bytes on `topic`?
    pub fn publish(&self, topic: &str, retain: bool, len: usize) -> Result<(), Reason> {
        if topic.contains(['+', '#']) {
            // Not a topic name (MQTT 3.1.1 §4.7.1); rumqttd would route it.
            return Err(Reason::PublishTopic);
        }
        let (retain_ok, max) = match self.role {
            Some(Role::Site) if topic == self.own_impressions => (false, self.impressions_max_bytes),
            Some(Role::Site) if topic == self.own_status => (true, STATUS_MAX_BYTES),
            Some(Role::Ingestor) if self.is_receipts_topic(topic) => (false, RECEIPT_MAX_BYTES),
            _ => return Err(Reason::PublishTopic),
        };
        if retain && !retain_ok {
            return Err(Reason::PublishRetain);
        }
        if len > max {
            return Err(Reason::PublishSize);
        }
        Ok(())
    }

    /// May this account subscribe to `filter` (as sent)?
    pub fn subscribe(&self, filter: &str) -> Result<(), Reason> {
        let allowed = match self.role {
            Some(Role::Site) => filter_within(filter, &self.own_receipts),
            Some(Role::Ingestor) => {
                let f = strip_share(filter).unwrap_or(Some(filter));
                f.is_some_and(|f| filter_within(f, &self.all_impressions) || filter_within(f, &self.all_status))
            }
            Some(Role::Observer) => filter_within(filter, &self.under_prefix),
            None => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(Reason::Subscribe)
        }
    }

    /// `{p}/sites/{one non-empty level}/receipts`.
    fn is_receipts_topic(&self, topic: &str) -> bool {
        topic
            .strip_prefix(self.sites.as_str())
            .and_then(|rest| rest.strip_suffix("/receipts"))
            .is_some_and(|site| !site.is_empty() && !site.contains('/'))
    }
}

/// `$share/{group}/{filter}` → `Some(Some(filter))`; a malformed shared
/// subscription (no group, no filter) → `Some(None)`; anything else → `None`.
fn strip_share(filter: &str) -> Option<Option<&str>> {
    let rest = filter.strip_prefix("$share/")?;
    Some(
        rest.split_once('/')
            .filter(|(group, f)| !group.is_empty() && !group.contains(['+', '#']) && !f.is_empty())
            .map(|(_, f)| f),
    )
}

/// Whether `filter` is a well-formed MQTT filter: `+` and `#` only as
/// whole levels, `#` only last, not empty.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(l) = levels.next() {
        match l {
            "#" if levels.peek().is_some() => return false,
            "#" | "+" => {}
            l if l.contains(['+', '#']) => return false,
            _ => {}
        }
    }
    true
}

/// Whether every topic `filter` can match is matched by `allowed` (both
/// well-formed filters), compared level by level: `#` in `allowed` covers
/// the rest (including the parent level itself, as MQTT's `a/#` matches
/// `a`); `+` in `allowed` covers one level, a literal or `+`, but not a `#`
/// of `filter`; literals must be equal. A malformed `filter` is within
/// nothing.
pub fn filter_within(filter: &str, allowed: &str) -> bool {
    if !valid_filter(filter) || !valid_filter(allowed) {
        return false;
    }
    let mut f = filter.split('/');
    for a in allowed.split('/') {
        if a == "#" {
            return true;
        }
        match f.next() {
            // `filter` stops where `allowed` needs another level.
            None => return false,
            Some("#") => return false,
            Some(l) if a == "+" || a == l => {}
            Some(_) => return false,
        }
    }
    f.next().is_none()
}

/// One connection's ACL: [`Rules`] plus counting and rate-limited logging.
#[derive(Debug)]
pub struct AccountAcl {
    client_id: String,
    username: String,
    rules: Rules,
    denials: Arc<Denials>,
    refused: AtomicU64,
}

impl AccountAcl {
    fn refuse(&self, reason: Reason, topic: &str, detail: &'static str) -> Denied {
        self.denials.record(reason);
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if n == 1 || n % LOG_EVERY == 0 {
            tracing::warn!(
                client_id = %self.client_id,
                username = %self.username,
                role = self.rules.role.map_or("none", Role::as_str),
                topic = %schema::validate::truncate(topic, 200),
                reason = reason.as_str(),
                refusals_on_this_connection = n,
                "ACL: {detail}"
            );
        }
        Denied {
            reason: reason.as_str(),
        }
    }
}

impl ConnectionAcl for AccountAcl {
    fn publish(&self, topic: &str, retain: bool, len: usize) -> Result<(), Denied> {
        self.rules
            .publish(topic, retain, len)
            .map_err(|r| self.refuse(r, topic, "publish acknowledged and dropped"))
    }

    fn subscribe(&self, filter: &str) -> Result<(), Denied> {
        self.rules
            .subscribe(filter)
            .map_err(|r| self.refuse(r, filter, "subscription refused (SUBACK 0x80)"))
    }

    fn will(&self, topic: &str, retain: bool, len: usize) -> Result<(), Denied> {
        self.rules
            .publish(topic, retain, len)
            .map_err(|_| self.refuse(Reason::Will, topic, "CONNECT refused: last will not authorized"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        let topics = schema::mqtt::Topics::new("neopro").unwrap();
        Policy::new(&topics, 1 << 20, Arc::default())
    }

    /// MQTT's matching, written plainly, as the reference for the model
    /// check below (topics here never start with `$`).
    fn matches(filter: &str, topic: &str) -> bool {
        let mut t = topic.split('/');
        for f in filter.split('/') {
            match (f, t.next()) {
                ("#", _) => return true,
                (_, None) => return false,
                ("+", Some(_)) => {}
                (l, Some(x)) if l == x => {}
                _ => return false,
            }
        }
        t.next().is_none()
    }

    fn strings(alphabet: &[&str], max_levels: usize) -> Vec<String> {
        let mut all: Vec<String> = alphabet.iter().map(|s| (*s).to_owned()).collect();
        let mut last = all.clone();
        for _ in 1..max_levels {
            last = last
                .iter()
                .flat_map(|p| alphabet.iter().map(move |l| format!("{p}/{l}")))
                .collect();
            all.extend(last.iter().cloned());
        }
        all
    }

    /// Exhaustive model check: for every pair of well-formed filters of up
    /// to 3 levels over {a, b, +, #}, `filter_within` equals "every topic of
    /// up to 4 levels over {a, b, c} that the filter matches, the allowed
    /// filter matches" (`c` stands for any other level; one level more than
    /// the filters have is enough to tell any two apart).
    #[test]
    fn filter_within_is_set_inclusion_of_matched_topics() {
        let filters: Vec<String> = strings(&["a", "b", "+", "#"], 3)
            .into_iter()
            .filter(|f| valid_filter(f))
            .collect();
        // 4 of one level, 3 × 4 of two, 3 × 3 × 4 of three (`#` only last).
        assert_eq!(filters.len(), 52);
        let topics = strings(&["a", "b", "c"], 4);
        for f in &filters {
            for a in &filters {
                let mut model = topics.iter().all(|t| !matches(f, t) || matches(a, t));
                // The one place the rule is stricter than set inclusion: at
                // the root, `+/#` matches every topic `#` does (a topic has
                // at least one level), but `+` does not cover a `#`.
                if f == "#" && a == "+/#" {
                    assert!(model);
                    model = false;
                }
                assert_eq!(filter_within(f, a), model, "filter {f} within {a}");
            }
        }
    }

    #[test]
    fn filter_within_table() {
        for (filter, allowed, within) in [
            ("neopro/sites/+/impressions", "neopro/sites/+/impressions", true),
            ("neopro/sites/club-a/impressions", "neopro/sites/+/impressions", true),
            ("neopro/sites/#", "neopro/sites/+/impressions", false),
            ("neopro/#", "neopro/#", true),
            ("neopro", "neopro/#", true),
            ("neopro/sites/+/+", "neopro/#", true),
            ("#", "neopro/#", false),
            ("+/sites/x/impressions", "neopro/#", false),
            ("neopro/sites/club-a/receipts", "neopro/sites/club-a/receipts", true),
            ("neopro/sites/+/receipts", "neopro/sites/club-a/receipts", false),
            ("neopro/sites/club-a/receipts/#", "neopro/sites/club-a/receipts", false),
            ("neopro/sites/club-a", "neopro/sites/club-a/receipts", false),
            ("neopro/sites/club-a/recei+", "neopro/#", false),
            ("neopro/#/x", "neopro/#", false),
            ("", "neopro/#", false),
            ("neopro//x", "neopro/+/x", true),
        ] {
            assert_eq!(filter_within(filter, allowed), within, "{filter} within {allowed}");
        }
    }

    #[test]
    fn site_rules() {
        let r = policy().rules("club-a", Some(Role::Site));
        assert_eq!(r.publish("neopro/sites/club-a/impressions", false, 1 << 20), Ok(()));
        assert_eq!(
            r.publish("neopro/sites/club-a/impressions", false, (1 << 20) + 1),
            Err(Reason::PublishSize)
        );
        assert_eq!(
            r.publish("neopro/sites/club-a/impressions", true, 10),
            Err(Reason::PublishRetain)
        );
        assert_eq!(r.publish("neopro/sites/club-a/status", true, STATUS_MAX_BYTES), Ok(()));
        assert_eq!(
            r.publish("neopro/sites/club-a/status", true, 0),
            Ok(()),
            "clearing its own status"
        );
        assert_eq!(
            r.publish("neopro/sites/club-a/status", false, STATUS_MAX_BYTES + 1),
            Err(Reason::PublishSize)
        );
        for forbidden in [
            "neopro/sites/club-a/receipts",
            "neopro/sites/club-b/impressions",
            "neopro/sites/club-b/status",
            "neopro/sites/club-b/receipts",
            "neopro/sites/club-ab/impressions",
            "neopro/sites/club-a/impressions/x",
            "neopro/sites/+/impressions",
            "other/x",
            "$SYS/x",
        ] {
            assert_eq!(
                r.publish(forbidden, false, 10),
                Err(Reason::PublishTopic),
                "{forbidden}"
            );
        }
        assert_eq!(r.subscribe("neopro/sites/club-a/receipts"), Ok(()));
        for forbidden in [
            "neopro/#",
            "#",
            "neopro/sites/+/impressions",
            "neopro/sites/+/receipts",
            "neopro/sites/club-b/receipts",
            "neopro/sites/club-a/status",
            "neopro/sites/club-a/#",
            "$SYS/#",
            "$share/g/neopro/sites/club-a/receipts",
        ] {
            assert_eq!(r.subscribe(forbidden), Err(Reason::Subscribe), "{forbidden}");
        }
    }

    #[test]
    fn ingestor_rules() {
        let r = policy().rules("ingestor", Some(Role::Ingestor));
        assert_eq!(
            r.publish("neopro/sites/club-b/receipts", false, RECEIPT_MAX_BYTES),
            Ok(())
        );
        assert_eq!(
            r.publish("neopro/sites/club-b/receipts", false, RECEIPT_MAX_BYTES + 1),
            Err(Reason::PublishSize)
        );
        assert_eq!(
            r.publish("neopro/sites/club-b/receipts", true, 10),
            Err(Reason::PublishRetain)
        );
        for forbidden in [
            "neopro/sites/+/receipts",
            "neopro/sites//receipts",
            "neopro/sites/a/b/receipts",
            "neopro/sites/club-b/impressions",
            "neopro/sites/club-b/status",
            "other/sites/club-b/receipts",
        ] {
            assert_eq!(
                r.publish(forbidden, false, 10),
                Err(Reason::PublishTopic),
                "{forbidden}"
            );
        }
        for allowed in [
            "neopro/sites/+/impressions",
            "neopro/sites/+/status",
            "neopro/sites/club-a/impressions",
            "$share/ingestors/neopro/sites/+/impressions",
            "$share/ingestors/neopro/sites/club-a/status",
        ] {
            assert_eq!(r.subscribe(allowed), Ok(()), "{allowed}");
        }
        for forbidden in [
            "neopro/#",
            "neopro/sites/+/receipts",
            "neopro/sites/+/+",
            "#",
            "$share//neopro/sites/+/impressions",
            "$share/g",
            "$share/g/neopro/#",
            "$SYS/#",
        ] {
            assert_eq!(r.subscribe(forbidden), Err(Reason::Subscribe), "{forbidden}");
        }
    }

    #[test]
    fn observer_and_unknown_rules() {
        let r = policy().rules("ops", Some(Role::Observer));
        for allowed in ["neopro/#", "neopro/sites/+/receipts", "neopro/sites/club-a/impressions"] {
            assert_eq!(r.subscribe(allowed), Ok(()), "{allowed}");
        }
        for forbidden in ["#", "+/#", "$SYS/#", "other/#", "neoprox/#"] {
            assert_eq!(r.subscribe(forbidden), Err(Reason::Subscribe), "{forbidden}");
        }
        for t in ["neopro/sites/ops/status", "neopro/sites/club-a/receipts", "neopro/x"] {
            assert_eq!(r.publish(t, false, 1), Err(Reason::PublishTopic));
        }
        let none = policy().rules("gone", None);
        assert_eq!(
            none.publish("neopro/sites/gone/impressions", false, 1),
            Err(Reason::PublishTopic)
        );
        assert_eq!(none.subscribe("neopro/sites/gone/receipts"), Err(Reason::Subscribe));
    }

    #[test]
    fn refusals_are_counted_by_reason() {
        let p = policy();
        let acl = p.connection("club-a", "club-a", Some(Role::Site));
        assert!(acl.publish("neopro/sites/club-b/receipts", false, 1).is_err());
        assert!(acl.publish("neopro/sites/club-a/impressions", true, 1).is_err());
        assert!(acl
            .publish("neopro/sites/club-a/status", true, STATUS_MAX_BYTES + 1)
            .is_err());
        assert!(acl.subscribe("#").is_err());
        assert!(acl.will("neopro/sites/club-b/status", true, 10).is_err());
        assert!(acl.will("neopro/sites/club-a/status", true, 10).is_ok());
        assert!(acl.publish("neopro/sites/club-a/impressions", false, 1).is_ok());
        for r in Reason::ALL {
            assert_eq!(p.denials.get(r), 1, "{r:?}");
        }
        assert_eq!(p.denials.total(), 5);
    }
}

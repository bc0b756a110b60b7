//! The hosted-broker path: a Mosquitto 2.0 configuration generated from our
//! credentials file, so that the same accounts work on either broker and
//! Mosquitto enforces the same trust boundary as `neopro-broker`: a site
//! account acts for its own site only.
//!
//! `neopro-broker mosquitto-config --credentials FILE --out DIR` writes:
//!
//! * `DIR/passwd`: `username:$7$…` lines (the Mosquitto hash stored next to
//!   the argon2 one by `neopro-broker passwd`; no plaintext needed). A hash
//!   with fewer than [`MOSQUITTO_ITERATIONS`] PBKDF2 iterations (written by
//!   `mosquitto_passwd`, or by an old `passwd`) is refused: a leaked file of
//!   such hashes is cheap to brute-force.
//! * `DIR/acl`: one block per account, by [`Role`] (prefix `p`, user `u`):
//!   a site may write `{p}/sites/{u}/impressions` and `…/status` and read
//!   `{p}/sites/{u}/receipts`; an ingestor reads `{p}/sites/+/impressions`
//!   and `…/+/status` and writes `{p}/sites/+/receipts`; an observer reads
//!   `{p}/#`. Nothing else: Mosquitto denies what no line grants. Per-user
//!   blocks, not `pattern … %u` lines, because patterns apply to every
//!   account: they would let the ingestor or an observer publish as a site
//!   named after itself.
//! * `DIR/mosquitto.conf`: no anonymous clients, `use_username_as_clientid`
//!   on every listener (Mosquitto cannot check "client id = username or
//!   `username:…`" as `neopro-broker` does; replacing the client id by the
//!   username means no account can take over another's session, and each
//!   account has exactly one session), the plain listener on loopback only
//!   when TLS is configured, persistence on, queue limits sized for an
//!   ingestor outage, the packet limit matching ours.
//!
//! One session per account has a consequence for the ingestor, which keeps
//! two connections (impressions, and receipts on a second connection, see
//! `ingestor/src/receipts.rs`): its receipts connection needs an account of
//! its own (`ingestor-receipts`, role `ingestor`); under one account the two
//! would take each other's session over in a loop.
//!
//! What Mosquitto's ACL cannot express, and the embedded broker enforces:
//! retain per topic (a site may retain on its own topics), payload size per
//! topic (only the global `max_packet_size`).
//!
//! Files are written with mode 0600 (the password file holds hashes).

use crate::credentials::{parse_mosquitto_hash, Credentials, Role, MOSQUITTO_ITERATIONS};
use anyhow::Context;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// Mosquitto's plain MQTT port.
pub const PLAIN_PORT: u16 = 1883;

/// The conventional account of the ingestor's receipts connection.
pub const INGESTOR_RECEIPTS_USER: &str = "ingestor-receipts";

/// What the generated configuration depends on besides the accounts.
#[derive(Clone, Debug)]
pub struct MosquittoOptions {
    /// Plain listener. `None`: `0.0.0.0:1883`, or `127.0.0.1:1883` when TLS
    /// is configured; with TLS, an address that is not loopback is refused
    /// (passwords would cross the network in clear).
    pub listen: Option<SocketAddr>,
    /// Optional TLS listener with certificate and key (PEM).
    pub tls: Option<(SocketAddr, PathBuf, PathBuf)>,
    pub topic_prefix: String,
    /// The account that consumes impressions (must exist, role `ingestor`).
    pub ingestor_user: String,
    /// The account of the ingestor's receipts connection (role `ingestor`;
    /// a warning when it is missing).
    pub ingestor_receipts_user: String,
    /// Generate even when some Mosquitto hashes have fewer than
    /// [`MOSQUITTO_ITERATIONS`] iterations (a warning names them).
    pub allow_weak_hashes: bool,
    /// Where Mosquitto keeps `mosquitto.db`.
    pub persistence_dir: PathBuf,
    /// Messages queued per offline persistent client (the ingestor's queue
    /// must hold an outage's worth of envelopes). Mosquitto's default is
    /// 1000, then it drops.
    pub max_queued_messages: u64,
    /// QoS 1 messages in flight per client (Mosquitto's default: 20). The
    /// ingestor acks an envelope only after its commit, so its rate is at
    /// most this many envelopes per commit latency: 100 capped a fleet of
    /// 10,000 boxes sending small envelopes at 6,237 rows/s, 1000 reached
    /// 22,280 (simulator README).
    pub max_inflight_messages: u32,
    /// How often the in-memory state is saved to `persistence_dir`.
    pub autosave_interval_secs: u64,
    /// A persistent session unused this long is discarded (a decommissioned
    /// box must not hold queued receipts forever).
    pub persistent_client_expiration: String,
    /// `user` Mosquitto drops privileges to when started as root.
    pub run_as: String,
    /// Where the log goes (`stderr`, `syslog`, `file /path`).
    pub log_dest: String,
}

impl Default for MosquittoOptions {
    fn default() -> Self {
        Self {
            listen: None,
            tls: None,
            topic_prefix: schema::mqtt::DEFAULT_PREFIX.to_owned(),
            ingestor_user: crate::credentials::INGESTOR_USER.to_owned(),
            ingestor_receipts_user: INGESTOR_RECEIPTS_USER.to_owned(),
            allow_weak_hashes: false,
            persistence_dir: "/var/lib/mosquitto".into(),
            max_queued_messages: crate::settings::LogSettings::default().outage_messages,
            max_inflight_messages: 1000,
            autosave_interval_secs: 60,
            persistent_client_expiration: "30d".to_owned(),
            run_as: "mosquitto".to_owned(),
            log_dest: "stderr".to_owned(),
        }
    }
}

impl MosquittoOptions {
    /// The plain listener's address (see [`MosquittoOptions::listen`]).
    pub fn plain_listener(&self) -> anyhow::Result<SocketAddr> {
        match (self.listen, &self.tls) {
            (None, None) => Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), PLAIN_PORT)),
            (None, Some(_)) => Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), PLAIN_PORT)),
            (Some(a), None) => Ok(a),
            (Some(a), Some(_)) => {
                anyhow::ensure!(
                    a.ip().is_loopback(),
                    "with TLS configured the plain listener must be on loopback (e.g. 127.0.0.1:{}), not {a}: \
                     passwords would cross the network in clear",
                    a.port()
                );
                Ok(a)
            }
        }
    }
}

/// What [`write_config`] wrote.
#[derive(Debug)]
pub struct Generated {
    /// `DIR/mosquitto.conf`.
    pub conf: PathBuf,
    /// Problems that do not stop the generation (print them to the operator).
    pub warnings: Vec<String>,
}

/// Largest packet Mosquitto accepts: our payload limit plus the fixed
/// header, topic and packet id.
pub fn max_packet_size() -> usize {
    schema::mqtt::MAX_PACKET_BYTES + 64 * 1024
}

/// Accounts whose Mosquitto hash has fewer than [`MOSQUITTO_ITERATIONS`]
/// PBKDF2 iterations, with their count.
pub fn weak_hashes(creds: &Credentials) -> Vec<(&str, u32)> {
    creds
        .entries()
        .filter_map(|e| {
            let (iterations, _, _) = parse_mosquitto_hash(e.mosquitto.as_deref()?).ok()?;
            (iterations < MOSQUITTO_ITERATIONS).then_some((e.username.as_str(), iterations))
        })
        .collect()
}

fn weak_hashes_message(weak: &[(&str, u32)]) -> String {
    let list: Vec<String> = weak.iter().map(|(u, it)| format!("{u} ({it})")).collect();
    format!(
        "Mosquitto hashes with fewer than {MOSQUITTO_ITERATIONS} PBKDF2 iterations: {}; \
         set these passwords again with `neopro-broker passwd FILE USER` (it writes {MOSQUITTO_ITERATIONS})",
        list.join(", ")
    )
}

/// The password file text. Fails listing the accounts that have no
/// Mosquitto hash (run `passwd` again) or a weak one (see
/// [`weak_hashes`]; [`write_config`] can downgrade that to a warning).
pub fn password_file(creds: &Credentials) -> anyhow::Result<String> {
    let weak = weak_hashes(creds);
    anyhow::ensure!(weak.is_empty(), "{}", weak_hashes_message(&weak));
    password_file_unchecked_strength(creds)
}

fn password_file_unchecked_strength(creds: &Credentials) -> anyhow::Result<String> {
    let missing: Vec<&str> = creds
        .entries()
        .filter(|e| e.mosquitto.is_none())
        .map(|e| e.username.as_str())
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "no Mosquitto hash for {}: set their passwords again with `neopro-broker passwd`",
        missing.join(", ")
    );
    let mut s = String::new();
    for e in creds.entries() {
        let _ = writeln!(s, "{}:{}", e.username, e.mosquitto.as_deref().unwrap_or_default());
    }
    Ok(s)
}

/// The ACL file text: one `user` block per account, by role.
pub fn acl_file(creds: &Credentials, o: &MosquittoOptions) -> String {
    let p = &o.topic_prefix;
    let mut s = String::from(
        "# Generated by `neopro-broker mosquitto-config`. Mosquitto denies whatever is not granted.\n\
         # One block per account (no `pattern` lines: they would apply to every account).\n\
         # Mosquitto grants every SUBSCRIBE and applies `read` to each message it would deliver;\n\
         # for a shared subscription `$share/GROUP/FILTER` that is the message's topic too.\n\
         # Mosquitto cannot restrict retain or payload size per topic (global limits in mosquitto.conf).\n",
    );
    for role in [Role::Ingestor, Role::Observer, Role::Site] {
        let users: Vec<&str> = creds
            .entries()
            .filter(|e| e.role == role)
            .map(|e| e.username.as_str())
            .collect();
        if users.is_empty() {
            continue;
        }
        s.push('\n');
        s.push_str(match role {
            Role::Ingestor => "# Role ingestor: every site's impressions and status in, receipts out.\n",
            Role::Observer => "# Role observer: reads everything under the prefix, publishes nothing.\n",
            Role::Site => "# Role site (username = site id): its own site's topics only.\n",
        });
        for (i, u) in users.into_iter().enumerate() {
            if i > 0 {
                s.push('\n');
            }
            let _ = writeln!(s, "user {u}");
            match role {
                Role::Ingestor => {
                    let _ = writeln!(s, "topic read {p}/sites/+/impressions");
                    let _ = writeln!(s, "topic read {p}/sites/+/status");
                    let _ = writeln!(s, "topic write {p}/sites/+/receipts");
                }
                Role::Observer => {
                    let _ = writeln!(s, "topic read {p}/#");
                }
                Role::Site => {
                    let _ = writeln!(s, "topic write {p}/sites/{u}/impressions");
                    let _ = writeln!(s, "topic write {p}/sites/{u}/status");
                    let _ = writeln!(s, "topic read {p}/sites/{u}/receipts");
                }
            }
        }
    }
    s
}

/// The `mosquitto.conf` text for files in `dir`.
pub fn conf_file(o: &MosquittoOptions, dir: &Path) -> anyhow::Result<String> {
    let plain = o.plain_listener()?;
    let mut s = String::new();
    let _ = write!(
        s,
        "# Generated by `neopro-broker mosquitto-config` for Mosquitto 2.0.\n\
         # Regenerate after changing accounts, then `systemctl reload mosquitto`\n\
         # (SIGHUP re-reads the password and ACL files).\n\
         \n\
         per_listener_settings false\n\
         allow_anonymous false\n\
         password_file {pw}\n\
         acl_file {acl}\n\
         \n\
         # Sessions and queued messages survive a restart (saved every\n\
         # autosave_interval seconds and at shutdown).\n\
         persistence true\n\
         persistence_location {pers}/\n\
         autosave_interval {autosave}\n\
         persistent_client_expiration {exp}\n\
         \n\
         # Queue for an offline persistent client, e.g. the ingestor during an\n\
         # outage (Mosquitto's default of 1000 would drop the rest). 0 bytes = no\n\
         # byte limit; the message count bounds memory.\n\
         max_queued_messages {queued}\n\
         max_queued_bytes 0\n\
         max_inflight_messages {inflight}\n\
         # Our packet limit ({mpb} bytes of payload) plus headers and topic; larger\n\
         # packets disconnect the client (the ACL cannot limit size per topic).\n\
         max_packet_size {mps}\n\
         # Boxes publish their status retained (with an offline last will); the ACL\n\
         # cannot limit retain per topic, so it stays on. A retained message is\n\
         # delivered only while its publisher may still write its topic.\n\
         retain_available true\n\
         check_retain_source true\n\
         \n\
         user {user}\n\
         log_dest {log}\n\
         log_type error\n\
         log_type warning\n\
         log_type notice\n\
         connection_messages true\n\
         set_tcp_nodelay true\n\
         \n\
         # Every listener replaces the client id by the username: no account can\n\
         # take over another's session, and each account has one session.\n",
        pw = conf_path(&dir.join("passwd"))?,
        acl = conf_path(&dir.join("acl"))?,
        pers = conf_path(&o.persistence_dir)?.trim_end_matches('/'),
        autosave = o.autosave_interval_secs,
        exp = conf_value("persistent_client_expiration", &o.persistent_client_expiration)?,
        queued = o.max_queued_messages,
        inflight = o.max_inflight_messages,
        mpb = schema::mqtt::MAX_PACKET_BYTES,
        mps = max_packet_size(),
        user = conf_value("run_as", &o.run_as)?,
        log = conf_value("log_dest", &o.log_dest)?,
    );
    if o.tls.is_some() {
        s.push_str("# Plain MQTT for local tools only; clients connect over TLS.\n");
    }
    let _ = write!(
        s,
        "listener {} {}\nprotocol mqtt\nuse_username_as_clientid true\n",
        plain.port(),
        plain.ip()
    );
    if let Some((addr, cert, key)) = &o.tls {
        let _ = write!(
            s,
            "\nlistener {} {}\nprotocol mqtt\nuse_username_as_clientid true\ncertfile {}\nkeyfile {}\n",
            addr.port(),
            addr.ip(),
            conf_path(cert)?,
            conf_path(key)?
        );
    }
    Ok(s)
}

/// A value written into the configuration: one line, no control character
/// (a newline would start a directive of its own).
fn conf_value<'a>(what: &str, v: &'a str) -> anyhow::Result<&'a str> {
    anyhow::ensure!(
        !v.is_empty() && !v.chars().any(char::is_control),
        "{what} '{}' must be one non-empty line",
        v.escape_debug()
    );
    Ok(v)
}

fn conf_path(p: &Path) -> anyhow::Result<String> {
    let s = p
        .to_str()
        .with_context(|| format!("path {} is not UTF-8", p.display()))?;
    conf_value("path", s)?;
    Ok(s.to_owned())
}

/// The accounts the ingestor needs: `ingestor_user` must exist with role
/// `ingestor`; `ingestor_receipts_user` should (a warning otherwise).
fn check_ingestor_accounts(creds: &Credentials, o: &MosquittoOptions) -> anyhow::Result<Vec<String>> {
    let mut warnings = Vec::new();
    crate::credentials::validate_username(&o.ingestor_user)?;
    crate::credentials::validate_username(&o.ingestor_receipts_user)?;
    let Some(main) = creds.get(&o.ingestor_user) else {
        anyhow::bail!(
            "the credentials file has no '{u}' account (the ingestor's); add it with \
             `neopro-broker passwd FILE {u} --role ingestor`",
            u = o.ingestor_user
        );
    };
    anyhow::ensure!(
        main.role == Role::Ingestor,
        "the ingestor's account '{}' has role {}, not ingestor: it could not read impressions",
        main.username,
        main.role
    );
    match creds.get(&o.ingestor_receipts_user) {
        Some(e) => anyhow::ensure!(
            e.role == Role::Ingestor,
            "the ingestor's receipts account '{}' has role {}, not ingestor: every receipt would be dropped; \
             set it with `neopro-broker passwd FILE {} --role ingestor`",
            e.username,
            e.role,
            e.username
        ),
        None => warnings.push(format!(
            "no '{r}' account: Mosquitto binds each client id to its username, so the ingestor's \
             receipts connection needs an account of its own (under '{i}' its two connections take each \
             other's session over in a loop). Add it with `neopro-broker passwd FILE {r} --role ingestor` \
             and give the ingestor its URL (NEOPRO_RECEIPTS_MQTT_URL=mqtt://{r}:PASSWORD@HOST:PORT)",
            r = o.ingestor_receipts_user,
            i = o.ingestor_user
        )),
    }
    Ok(warnings)
}

/// Writes `passwd`, `acl` and `mosquitto.conf` into `dir` (created if
/// needed). Nothing is written when a check fails.
pub fn write_config(creds: &Credentials, o: &MosquittoOptions, dir: &Path) -> anyhow::Result<Generated> {
    let topics = schema::mqtt::Topics::new(o.topic_prefix.clone()).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        !topics.prefix().chars().any(|c| c.is_whitespace() || c.is_control()),
        "topic prefix '{}' must not contain spaces or control characters",
        topics.prefix().escape_debug()
    );
    let mut warnings = check_ingestor_accounts(creds, o)?;
    let weak = weak_hashes(creds);
    if !weak.is_empty() {
        anyhow::ensure!(
            o.allow_weak_hashes,
            "{} (or pass --allow-weak-hashes to generate anyway)",
            weak_hashes_message(&weak)
        );
        warnings.push(weak_hashes_message(&weak));
    }
    let passwd = password_file_unchecked_strength(creds)?;
    let acl = acl_file(creds, o);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let conf_text = conf_file(o, &dir)?;
    write_private(&dir.join("passwd"), &passwd)?;
    write_private(&dir.join("acl"), &acl)?;
    let conf = dir.join("mosquitto.conf");
    write_private(&conf, &conf_text)?;
    Ok(Generated { conf, warnings })
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, text.as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::{argon2_hash, mosquitto_hash_with};

    /// Accounts without the cost of real hashing: one argon2 and one
    /// Mosquitto hash shared by every line.
    fn creds(lines: &[(&str, Role)], iterations: u32) -> Credentials {
        let a = argon2_hash("pw").unwrap();
        let m = mosquitto_hash_with("pw", b"saltsaltsalt", iterations);
        let text: String = lines.iter().map(|(u, r)| format!("{u}:{a}:{m}:{r}\n")).collect();
        Credentials::parse(&text).unwrap()
    }

    fn fleet() -> Credentials {
        creds(
            &[
                ("club-a", Role::Site),
                ("ingestor", Role::Ingestor),
                ("ingestor-receipts", Role::Ingestor),
                ("ops", Role::Observer),
            ],
            MOSQUITTO_ITERATIONS,
        )
    }

    #[test]
    fn acl_blocks_per_role() {
        let acl = acl_file(&fleet(), &MosquittoOptions::default());
        for block in [
            "user club-a\ntopic write neopro/sites/club-a/impressions\ntopic write neopro/sites/club-a/status\n\
             topic read neopro/sites/club-a/receipts\n",
            "user ingestor\ntopic read neopro/sites/+/impressions\ntopic read neopro/sites/+/status\n\
             topic write neopro/sites/+/receipts\n",
            "user ingestor-receipts\ntopic read neopro/sites/+/impressions\n",
            "user ops\ntopic read neopro/#\n",
        ] {
            assert!(acl.contains(block), "{block} in\n{acl}");
        }
        assert!(
            !acl.lines().any(|l| l.starts_with("pattern")),
            "no line applies to every account"
        );
        let granting: Vec<&str> = acl.lines().filter(|l| l.starts_with("topic ")).collect();
        assert_eq!(granting.len(), 3 + 3 + 3 + 1, "nothing else is granted:\n{acl}");
        assert!(
            acl.lines().find(|l| !l.starts_with('#') && !l.is_empty()) == Some("user ingestor"),
            "no topic line before the first user (those would apply to anonymous clients)"
        );
    }

    #[test]
    fn conf_shape() {
        let o = MosquittoOptions::default();
        let conf = conf_file(&o, Path::new("/etc/mosquitto/neopro")).unwrap();
        assert!(conf.contains("allow_anonymous false\n"));
        assert!(conf.contains("persistence true\n"));
        assert!(conf.contains("max_queued_messages 200000\n"));
        assert!(conf.contains("password_file /etc/mosquitto/neopro/passwd\n"));
        assert!(conf.contains("listener 1883 0.0.0.0\nprotocol mqtt\nuse_username_as_clientid true\n"));
        assert_eq!(conf.lines().filter(|l| l.starts_with("listener ")).count(), 1);
    }

    #[test]
    fn tls_keeps_the_plain_listener_on_loopback() {
        let mut o = MosquittoOptions {
            tls: Some((
                "0.0.0.0:8883".parse().unwrap(),
                "/c/cert.pem".into(),
                "/c/key.pem".into(),
            )),
            ..MosquittoOptions::default()
        };
        let conf = conf_file(&o, Path::new("/etc/mosquitto/neopro")).unwrap();
        let listeners: Vec<&str> = conf.lines().filter(|l| l.starts_with("listener ")).collect();
        assert_eq!(listeners, ["listener 1883 127.0.0.1", "listener 8883 0.0.0.0"]);
        assert_eq!(
            conf.matches("use_username_as_clientid true\n").count(),
            2,
            "on every listener"
        );
        assert!(conf.contains("certfile /c/cert.pem\nkeyfile /c/key.pem\n"));
        o.listen = Some("0.0.0.0:1883".parse().unwrap());
        let e = conf_file(&o, Path::new("/x")).unwrap_err();
        assert!(e.to_string().contains("must be on loopback"), "{e}");
        o.listen = Some("[::1]:1884".parse().unwrap());
        assert!(conf_file(&o, Path::new("/x")).unwrap().contains("listener 1884 ::1\n"));
    }

    #[test]
    fn refuses_missing_hash_or_ingestor() {
        let dir = tempfile::tempdir().unwrap();
        let c = creds(&[("club-1", Role::Site)], MOSQUITTO_ITERATIONS);
        let e = write_config(&c, &MosquittoOptions::default(), dir.path()).unwrap_err();
        assert!(e.to_string().contains("'ingestor'"), "{e}");
        let c = creds(&[("ingestor", Role::Site)], MOSQUITTO_ITERATIONS);
        let e = write_config(&c, &MosquittoOptions::default(), dir.path()).unwrap_err();
        assert!(e.to_string().contains("role site"), "{e}");
        let c = creds(
            &[("ingestor", Role::Ingestor), ("ingestor-receipts", Role::Site)],
            MOSQUITTO_ITERATIONS,
        );
        let e = write_config(&c, &MosquittoOptions::default(), dir.path()).unwrap_err();
        assert!(e.to_string().contains("'ingestor-receipts' has role site"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing written");

        let text = fleet().render();
        let stripped: String = text
            .lines()
            .map(|l| match l.strip_prefix("club-a:") {
                Some(rest) => format!("club-a:{}\n", rest.split(':').next().unwrap()),
                None => format!("{l}\n"),
            })
            .collect();
        let c = Credentials::parse(&stripped).unwrap();
        assert!(password_file(&c).unwrap_err().to_string().contains("club-a"));
    }

    #[test]
    fn warns_without_a_receipts_account() {
        let dir = tempfile::tempdir().unwrap();
        let c = creds(&[("ingestor", Role::Ingestor)], MOSQUITTO_ITERATIONS);
        let g = write_config(&c, &MosquittoOptions::default(), dir.path()).unwrap();
        assert_eq!(g.warnings.len(), 1);
        assert!(
            g.warnings[0].contains("no 'ingestor-receipts' account"),
            "{}",
            g.warnings[0]
        );
        assert!(write_config(&fleet(), &MosquittoOptions::default(), dir.path())
            .unwrap()
            .warnings
            .is_empty());
    }

    #[test]
    fn weak_hashes_are_refused_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let c = creds(
            &[("ingestor", Role::Ingestor), ("ingestor-receipts", Role::Ingestor)],
            101,
        );
        let e = write_config(&c, &MosquittoOptions::default(), dir.path()).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("ingestor (101), ingestor-receipts (101)"), "{e}");
        assert!(e.contains("neopro-broker passwd"), "{e}");
        assert!(password_file(&c).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing written");
        let o = MosquittoOptions {
            allow_weak_hashes: true,
            ..MosquittoOptions::default()
        };
        let g = write_config(&c, &o, dir.path()).unwrap();
        assert!(
            g.warnings.iter().any(|w| w.contains("fewer than 100000")),
            "{:?}",
            g.warnings
        );
        assert!(std::fs::read_to_string(dir.path().join("passwd"))
            .unwrap()
            .contains("$7$101$"));
    }

    #[test]
    fn refuses_values_that_would_inject_directives() {
        let dir = tempfile::tempdir().unwrap();
        for o in [
            MosquittoOptions {
                topic_prefix: "neopro\ntopic readwrite #".into(),
                ..MosquittoOptions::default()
            },
            MosquittoOptions {
                topic_prefix: "neo pro".into(),
                ..MosquittoOptions::default()
            },
            MosquittoOptions {
                log_dest: "stderr\nallow_anonymous true".into(),
                ..MosquittoOptions::default()
            },
        ] {
            assert!(write_config(&fleet(), &o, dir.path()).is_err(), "{o:?}");
        }
    }
}

//! Where the simulated boxes live: in this process, or spread over child
//! processes (`neopro-sim box-host`) when one process cannot hold them.
//!
//! # Why child processes
//!
//! A box costs about four file descriptors (its MQTT socket and its SQLite
//! database, WAL and shared-memory files), and the embedded broker one more
//! per connection. This machine's hard limit is 20,000 per process and cannot
//! be raised without `CAP_SYS_RESOURCE`, so 10,000 connected boxes do not fit
//! in one process. [`Boxes::open`] keeps them in-process while they fit (the
//! fastest and simplest case), and otherwise spawns as many hosts as needed,
//! each holding a contiguous range of sites. The broker and the ingestor stay
//! in the parent; the hosts only run real `edge_publisher` Apps, exactly as
//! in-process boxes do.
//!
//! # Protocol (one line per message, on the child's stdin and stdout)
//!
//! * parent → host, first line: the [`HostConfig`] as JSON (on stdin, not in
//!   the arguments, so that broker credentials never show in `ps`; with the
//!   broker's ACL on it holds the run's password secret, from which each box
//!   derives its own account's password, [`crate::credentials`]). The host
//!   generates the plays of its sites (seeded: the same as the parent's),
//!   opens and fills their outboxes, then answers `ready`;
//! * `start` → every box connects and publishes; answer `started`;
//! * `connect` → every box connects and subscribes, publishing nothing; answer
//!   `connected` once every session is up (`release` follows);
//! * `release` → every connected box starts publishing; answer `released`;
//! * `count` → answer `unconfirmed <n>`: impressions still in its outboxes,
//!   plus those of appends received but not yet committed (so that a zero is
//!   never read before an append landed);
//! * `append <site index> <JSON array of impressions>` → appended to that
//!   site's outbox (a TV frontend's POST); no answer;
//! * `stop` → every box stops cleanly; answer `stopped`, then exit 0.
//!
//! Anything unexpected ends the host with a non-zero status and a message on
//! stderr (inherited), and the parent's next read fails with its context.

use anyhow::Context;
use chrono::NaiveDate;
use futures::StreamExt;
use runtime::mqtt::MqttUrl;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::catalogue::Catalogue;
use crate::credentials::Accounts;
use crate::fleet::{self, Edge, EdgeTuning};
use crate::plays::{generate_site, FleetSpec, SitePlays};

/// How long a host waits for its boxes' sessions (`connect`).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Rows per append while filling (one outbox transaction each).
pub const FILL_CHUNK: usize = 500;
/// Descriptors one in-process box needs, its broker-side socket included.
const FDS_PER_LOCAL_BOX: u64 = 5;
/// Descriptors one box needs in a host process.
const FDS_PER_HOSTED_BOX: u64 = 4;
/// Descriptors kept free for everything else (database pool, logs, HTTP).
const FD_RESERVE: u64 = 1_000;

/// How many host processes `n` boxes need under an open-file limit of
/// `nofile` (0: they fit in this process).
pub fn processes_needed(n: usize, nofile: u64) -> usize {
    let n = n as u64;
    let budget = nofile.saturating_sub(FD_RESERVE);
    if n * FDS_PER_LOCAL_BOX <= budget {
        return 0;
    }
    let per_host = (budget / FDS_PER_HOSTED_BOX).max(1);
    n.div_ceil(per_host) as usize
}

/// What a host needs to build its boxes (the first line it reads).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostConfig {
    /// Full broker URL, credentials included (hence stdin, not argv).
    pub broker_url: String,
    /// With the broker's ACL on: the run's password secret; each box then
    /// connects as its own site's account instead of with `broker_url`'s.
    #[serde(default)]
    pub password_secret: Option<String>,
    pub topic_prefix: String,
    /// Parent directory of the boxes' data directories.
    pub dir: PathBuf,
    pub sites: usize,
    pub plays_per_site: usize,
    pub seed: u64,
    pub end_day: NaiveDate,
    pub site_prefix: String,
    /// This host's sites: indexes `from..to` of the fleet.
    pub from: usize,
    pub to: usize,
    pub batch_delay_ms: u64,
    pub batch_max_impressions: usize,
    pub max_inflight_batches: usize,
    pub receipt_timeout_ms: u64,
    pub sqlite_cache_kib: u32,
}

impl HostConfig {
    fn spec(&self) -> FleetSpec {
        FleetSpec {
            sites: self.sites,
            plays_per_site: self.plays_per_site,
            seed: self.seed,
            end_day: self.end_day,
            site_prefix: self.site_prefix.clone(),
        }
    }

    fn tuning(&self) -> EdgeTuning {
        EdgeTuning {
            batch_delay_ms: self.batch_delay_ms,
            batch_max_impressions: self.batch_max_impressions,
            max_inflight_batches: self.max_inflight_batches,
            receipt_timeout_ms: self.receipt_timeout_ms,
            sqlite_cache_kib: self.sqlite_cache_kib,
        }
    }
}

/// `url` with its credentials (its `Display` masks the password).
pub fn full_url(u: &MqttUrl) -> String {
    let scheme = if u.tls { "mqtts" } else { "mqtt" };
    let host = if u.host.contains(':') {
        format!("[{}]", u.host)
    } else {
        u.host.clone()
    };
    let mut url = url::Url::parse(&format!("{scheme}://{host}:{}", u.port)).expect("host and port form a URL");
    if let Some(name) = &u.username {
        let _ = url.set_username(name);
    }
    if let Some(p) = &u.password {
        let _ = url.set_password(Some(p));
    }
    if let Some(ca) = &u.ca_file {
        url.query_pairs_mut().append_pair("ca", &ca.to_string_lossy());
    }
    url.to_string()
}

/// Opens the outboxes of `sites` (indexes `from..`) under `dir` and fills
/// each with its plays, 64 outboxes at a time. With `accounts`, each box
/// connects as its site's account.
async fn open_and_fill(
    sites: &[SitePlays],
    dir: &Path,
    broker: &MqttUrl,
    accounts: Option<&Accounts>,
    prefix: &str,
    tuning: &EdgeTuning,
) -> anyhow::Result<Vec<Edge>> {
    let mut edges = Vec::with_capacity(sites.len());
    for s in sites {
        let url = accounts.map_or_else(|| broker.clone(), |a| a.url(broker, &s.site_id));
        edges.push(Edge::open(&s.site_id, dir.join(&s.site_id), &url, prefix, tuning).await?);
    }
    let fills = futures::stream::iter(sites.iter().zip(&edges).map(|(s, e)| async move {
        for c in s.plays.chunks(FILL_CHUNK) {
            e.outbox.append(c.to_vec()).await?;
        }
        anyhow::Ok(())
    }))
    .buffer_unordered(64)
    .collect::<Vec<_>>()
    .await;
    for r in fills {
        r.context("filling an outbox")?;
    }
    Ok(edges)
}

/// Appends in flight at once per process, at most: a few TV frontends
/// posting at the same time, each waiting for its answer before the next
/// POST. The bound makes the steady load closed-loop: when the boxes or the
/// broker fall behind, the offered rate drops (and the bench prints the rate
/// it achieved) instead of a queue growing without end.
const APPENDS_IN_FLIGHT: usize = 4;

/// Appends handed to outboxes without waiting for their commits, counted
/// until they are durable.
#[derive(Default)]
pub struct Appender {
    in_transit: Arc<AtomicU64>,
    tasks: tokio::task::JoinSet<anyhow::Result<()>>,
}

impl Appender {
    async fn spawn(&mut self, outbox: edge_publisher::Outbox, plays: Vec<schema::Impression>) -> anyhow::Result<()> {
        // Surface a failed append at once rather than as a count that never
        // reaches zero.
        while let Some(r) = self.tasks.try_join_next() {
            r.context("append task")??;
        }
        while self.tasks.len() >= APPENDS_IN_FLIGHT {
            if let Some(r) = self.tasks.join_next().await {
                r.context("append task")??;
            }
        }
        let n = plays.len() as u64;
        self.in_transit.fetch_add(n, Ordering::AcqRel);
        let counter = self.in_transit.clone();
        self.tasks.spawn(async move {
            let r = outbox.append(plays).await;
            counter.fetch_sub(n, Ordering::AcqRel);
            r.map(|_| ()).context("appending to an outbox")
        });
        Ok(())
    }

    /// Impressions handed over but not yet committed.
    fn in_transit(&self) -> u64 {
        self.in_transit.load(Ordering::Acquire)
    }

    async fn finish(&mut self) -> anyhow::Result<()> {
        while let Some(r) = self.tasks.join_next().await {
            r.context("append task")??;
        }
        Ok(())
    }
}

/// One child process holding a range of boxes.
pub struct Host {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    from: usize,
    to: usize,
}

impl Host {
    async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.write_all(b"\n").await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn expect(&mut self, what: &str) -> anyhow::Result<String> {
        let line = self
            .lines
            .next_line()
            .await?
            .with_context(|| format!("box host {}..{} ended while we waited for '{what}'", self.from, self.to))?;
        anyhow::ensure!(
            line.starts_with(what),
            "box host {}..{} answered '{line}' instead of '{what}'",
            self.from,
            self.to
        );
        Ok(line)
    }
}

/// Sends `cmd` to every host, then reads each one's answer starting with
/// `answer` (the hosts work on it concurrently).
async fn broadcast(hosts: &mut [Host], cmd: &str, answer: &str) -> anyhow::Result<Vec<String>> {
    for h in hosts.iter_mut() {
        h.send(cmd).await?;
    }
    let mut lines = Vec::with_capacity(hosts.len());
    for h in hosts.iter_mut() {
        lines.push(h.expect(answer).await?);
    }
    Ok(lines)
}

/// The fleet's boxes, wherever they live.
pub enum Boxes {
    Local(Vec<Edge>, Appender),
    Hosted(Vec<Host>),
}

impl std::fmt::Debug for Boxes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Boxes::Local(e, _) => write!(f, "Boxes::Local({} boxes)", e.len()),
            Boxes::Hosted(h) => write!(f, "Boxes::Hosted({} processes)", h.len()),
        }
    }
}

/// Where and how to open a fleet's boxes.
#[derive(Clone, Debug)]
pub struct Placement {
    pub spec: FleetSpec,
    pub tuning: EdgeTuning,
    pub broker: MqttUrl,
    /// The run's accounts when the broker checks them (each box its own).
    pub accounts: Option<Accounts>,
    pub prefix: String,
    pub dir: PathBuf,
    /// Host processes (0: every box in this process).
    pub processes: usize,
    /// The `neopro-sim` executable for the hosts.
    pub exe: PathBuf,
}

impl Boxes {
    /// Opens every box of `sites` (the whole fleet of `place.spec`, in
    /// order) and fills its outbox with its plays; nothing is published yet.
    pub async fn open(place: &Placement, sites: &[SitePlays]) -> anyhow::Result<Self> {
        if place.processes == 0 {
            let edges = open_and_fill(
                sites,
                &place.dir,
                &place.broker,
                place.accounts.as_ref(),
                &place.prefix,
                &place.tuning,
            )
            .await?;
            return Ok(Boxes::Local(edges, Appender::default()));
        }
        let n = sites.len();
        let per = n.div_ceil(place.processes);
        let mut hosts = Vec::new();
        for from in (0..n).step_by(per.max(1)) {
            let to = (from + per).min(n);
            let cfg = HostConfig {
                broker_url: full_url(&place.broker),
                password_secret: place.accounts.as_ref().map(|a| a.secret().to_owned()),
                topic_prefix: place.prefix.clone(),
                dir: place.dir.clone(),
                sites: place.spec.sites,
                plays_per_site: place.spec.plays_per_site,
                seed: place.spec.seed,
                end_day: place.spec.end_day,
                site_prefix: place.spec.site_prefix.clone(),
                from,
                to,
                batch_delay_ms: place.tuning.batch_delay_ms,
                batch_max_impressions: place.tuning.batch_max_impressions,
                max_inflight_batches: place.tuning.max_inflight_batches,
                receipt_timeout_ms: place.tuning.receipt_timeout_ms,
                sqlite_cache_kib: place.tuning.sqlite_cache_kib,
            };
            let mut child = tokio::process::Command::new(&place.exe)
                .arg("box-host")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("spawning {} box-host", place.exe.display()))?;
            let stdin = child.stdin.take().context("host stdin")?;
            let stdout = child.stdout.take().context("host stdout")?;
            let mut host = Host {
                child,
                stdin,
                lines: BufReader::new(stdout).lines(),
                from,
                to,
            };
            host.send(&serde_json::to_string(&cfg)?).await?;
            hosts.push(host);
        }
        // The hosts fill their outboxes concurrently.
        for h in &mut hosts {
            h.expect("ready").await?;
        }
        Ok(Boxes::Hosted(hosts))
    }

    /// Every box connects to the broker and starts publishing.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        match self {
            Boxes::Local(edges, _) => {
                for e in edges {
                    e.start().await?;
                }
            }
            Boxes::Hosted(hosts) => {
                broadcast(hosts, "start", "started").await?;
            }
        }
        Ok(())
    }

    /// Every box connects and subscribes but publishes nothing until
    /// [`Boxes::release`]; returns once every session is up (or fails after
    /// `timeout`). The benchmark times only what follows.
    pub async fn connect(&mut self, timeout: std::time::Duration) -> anyhow::Result<()> {
        match self {
            Boxes::Local(edges, _) => {
                for e in edges.iter_mut() {
                    e.connect_held().await?;
                }
                let deadline = tokio::time::Instant::now() + timeout;
                loop {
                    let waiting = edges.iter().filter(|e| !e.ready()).count();
                    if waiting == 0 {
                        return Ok(());
                    }
                    anyhow::ensure!(
                        tokio::time::Instant::now() < deadline,
                        "{waiting} of {} boxes not connected after {} s",
                        edges.len(),
                        timeout.as_secs()
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
            Boxes::Hosted(hosts) => {
                broadcast(hosts, "connect", "connected").await?;
                Ok(())
            }
        }
    }

    /// Lets every box connected by [`Boxes::connect`] publish.
    pub async fn release(&mut self) -> anyhow::Result<()> {
        match self {
            Boxes::Local(edges, _) => {
                for e in edges.iter_mut() {
                    e.release();
                }
            }
            Boxes::Hosted(hosts) => {
                broadcast(hosts, "release", "released").await?;
            }
        }
        Ok(())
    }

    /// Impressions still unconfirmed in every outbox.
    pub async fn unconfirmed(&mut self) -> anyhow::Result<u64> {
        match self {
            Boxes::Local(edges, appender) => Ok(fleet::unconfirmed_total(edges) + appender.in_transit()),
            Boxes::Hosted(hosts) => {
                let mut total = 0;
                for line in broadcast(hosts, "count", "unconfirmed ").await? {
                    total += line["unconfirmed ".len()..]
                        .trim()
                        .parse::<u64>()
                        .with_context(|| format!("bad count line '{line}'"))?;
                }
                Ok(total)
            }
        }
    }

    /// Hands `plays` to the outbox of site `index` (a TV frontend's POST)
    /// without waiting for its commit, but waiting while
    /// `APPENDS_IN_FLIGHT` appends of this process (or host) are pending;
    /// [`Boxes::unconfirmed`] counts them from now on.
    pub async fn append(&mut self, index: usize, plays: Vec<schema::Impression>) -> anyhow::Result<()> {
        match self {
            Boxes::Local(edges, appender) => {
                appender.spawn(edges[index].outbox.clone(), plays).await?;
            }
            Boxes::Hosted(hosts) => {
                let h = hosts
                    .iter_mut()
                    .find(|h| (h.from..h.to).contains(&index))
                    .context("no host holds this site")?;
                let line = format!("append {index} {}", serde_json::to_string(&plays)?);
                h.send(&line).await?;
            }
        }
        Ok(())
    }

    /// Every box stops cleanly; hosts exit.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        match self {
            Boxes::Local(edges, appender) => {
                appender.finish().await?;
                for e in edges {
                    e.stop().await?;
                }
            }
            Boxes::Hosted(hosts) => {
                broadcast(hosts, "stop", "stopped").await?;
                for h in hosts.iter_mut() {
                    let status = h.child.wait().await?;
                    anyhow::ensure!(status.success(), "box host {}..{} exited with {status}", h.from, h.to);
                }
            }
        }
        Ok(())
    }

    /// Host processes in use (0: in-process).
    pub fn processes(&self) -> usize {
        match self {
            Boxes::Local(..) => 0,
            Boxes::Hosted(h) => h.len(),
        }
    }
}

/// `neopro-sim box-host`: the child side of the protocol (module doc).
pub async fn serve() -> anyhow::Result<()> {
    fleet::raise_fd_limit();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    let first = lines.next_line().await?.context("no configuration line on stdin")?;
    let cfg: HostConfig = serde_json::from_str(&first).context("configuration line")?;
    let broker: MqttUrl = cfg.broker_url.parse().map_err(anyhow::Error::msg)?;
    let accounts = cfg.password_secret.clone().map(Accounts::from_secret);
    let spec = cfg.spec();
    let catalogue = Catalogue::standard();
    let sites: Vec<SitePlays> = (cfg.from..cfg.to)
        .map(|i| generate_site(&spec, &catalogue, i))
        .collect();
    // The host's boxes are in-process boxes of this process: the same
    // methods serve both placements.
    let mut boxes = Boxes::Local(
        open_and_fill(
            &sites,
            &cfg.dir,
            &broker,
            accounts.as_ref(),
            &cfg.topic_prefix,
            &cfg.tuning(),
        )
        .await?,
        Appender::default(),
    );
    drop(sites);
    say(&mut out, "ready").await?;
    while let Some(line) = lines.next_line().await? {
        let (cmd, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match cmd {
            "start" => {
                boxes.start().await?;
                say(&mut out, "started").await?;
            }
            "connect" => {
                boxes.connect(CONNECT_TIMEOUT).await?;
                say(&mut out, "connected").await?;
            }
            "release" => {
                boxes.release().await?;
                say(&mut out, "released").await?;
            }
            "count" => {
                let n = boxes.unconfirmed().await?;
                say(&mut out, &format!("unconfirmed {n}")).await?;
            }
            "append" => {
                let (index, json) = rest.split_once(' ').context("append: no plays")?;
                let index: usize = index.parse().context("append: site index")?;
                anyhow::ensure!(
                    (cfg.from..cfg.to).contains(&index),
                    "append: site {index} is not on this host"
                );
                let plays: Vec<schema::Impression> = serde_json::from_str(json).context("append: plays")?;
                boxes.append(index - cfg.from, plays).await?;
            }
            "stop" => {
                boxes.stop().await?;
                say(&mut out, "stopped").await?;
                return Ok(());
            }
            other => anyhow::bail!("unknown command '{other}'"),
        }
    }
    anyhow::bail!("stdin closed without 'stop'")
}

async fn say(out: &mut tokio::io::Stdout, line: &str) -> anyhow::Result<()> {
    out.write_all(line.as_bytes()).await?;
    out.write_all(b"\n").await?;
    out.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_stay_in_process_while_their_descriptors_fit() {
        assert_eq!(processes_needed(1_000, 20_000), 0);
        assert_eq!(processes_needed(3_800, 20_000), 0);
        // 19,000 usable / 4 per hosted box = 4,750 boxes per host.
        assert_eq!(processes_needed(10_000, 20_000), 3);
        // 24 usable / 4 = 6 boxes per host.
        assert_eq!(processes_needed(10_000, 1_024), 1_667);
    }

    #[test]
    fn full_url_keeps_the_credentials_that_display_masks() {
        let u: MqttUrl = "mqtts://edge:p%40ss@broker.example:8883?ca=/etc/ca.pem"
            .parse()
            .unwrap();
        let back: MqttUrl = full_url(&u).parse().unwrap();
        assert_eq!(back, u);
        assert_eq!(back.password.as_deref(), Some("p@ss"));
    }
}

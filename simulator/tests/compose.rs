//! compose.yaml and the Dockerfile checked against the binaries the workspace
//! really builds (there is no Docker engine on CI to try them).
//!
//! * every service of ours runs a binary the workspace builds (from
//!   `cargo metadata`), with a subcommand that binary has;
//! * every environment variable given to it is one the binary reads (its
//!   clap `--help` lists `[env: NAME=…]`), or a documented `PREFIX__KEY`
//!   settings override, or `RUST_LOG`;
//! * every published container port is one the service listens on (its
//!   listen-address variables, or the defaults its `--help` documents);
//! * every URL pointing at another service uses a port that service listens on;
//! * `depends_on` names exist; the required services are there (PostgreSQL,
//!   broker, ingestor, analytics, Mosquitto under a profile, a simulated box
//!   and its feeder);
//! * the Dockerfile builds and copies every binary the compose file runs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use yaml_rust2::{Yaml, YamlLoader};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// binary name -> package name, for every bin target of the workspace.
fn workspace_binaries() -> BTreeMap<String, String> {
    let out = Command::new(cargo())
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(repo_root())
        .output()
        .expect("cargo metadata");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut bins = BTreeMap::new();
    for p in v["packages"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            if t["kind"].as_array().unwrap().iter().any(|k| k == "bin") {
                bins.insert(
                    t["name"].as_str().unwrap().to_owned(),
                    p["name"].as_str().unwrap().to_owned(),
                );
            }
        }
    }
    bins
}

/// `target/<profile>` of this test binary (`target/<profile>/deps/compose-…`).
fn profile_dir() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The `--help` text of `bin` (and of `bin sub` when given), building the
/// binary first if this profile has not.
fn help(bin: &str, package: &str, sub: Option<&str>) -> String {
    let dir = profile_dir();
    let path = dir.join(bin);
    if !path.exists() {
        let mut c = Command::new(cargo());
        c.args(["build", "-p", package, "--bin", bin]).current_dir(repo_root());
        if dir.file_name().and_then(|s| s.to_str()) == Some("release") {
            c.arg("--release");
        }
        let st = c.status().expect("cargo build");
        assert!(st.success(), "building {bin}");
    }
    let mut text = String::new();
    let mut args = vec!["--help"];
    let sub_args;
    let mut runs = vec![args.clone()];
    if let Some(s) = sub {
        sub_args = vec![s, "--help"];
        runs.push(sub_args);
    }
    for a in runs.drain(..) {
        let out = Command::new(&path).args(&a).output().expect("running --help");
        assert!(
            out.status.success(),
            "{bin} {a:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    args.clear();
    text
}

/// Env names a help text documents (`[env: NAME=` or `[env: NAME]`).
fn env_names(help: &str) -> BTreeSet<String> {
    help.split("[env: ")
        .skip(1)
        .map(|s| {
            s.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

/// Ports of the `0.0.0.0:NNNN` defaults a help text documents.
fn default_ports(help: &str) -> BTreeSet<u16> {
    help.split("0.0.0.0:")
        .skip(1)
        .filter_map(|s| {
            s.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .ok()
        })
        .collect()
}

/// Compose's `${VAR:-default}` and `$$` with every variable unset.
fn interpolate(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let r = &rest[i..];
        if let Some(stripped) = r.strip_prefix("$$") {
            out.push('$');
            rest = stripped;
        } else if r.starts_with("${") {
            let end = r.find('}').expect("closed ${");
            let inner = &r[2..end];
            if let Some((_, d)) = inner.split_once(":-") {
                out.push_str(d);
            }
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = &r[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Resolves YAML merge keys (`<<: *anchor`), which yaml-rust2 leaves as keys.
fn merge(y: Yaml) -> Yaml {
    match y {
        Yaml::Hash(h) => {
            let mut out = yaml_rust2::yaml::Hash::new();
            let mut merged: Vec<Yaml> = Vec::new();
            for (k, v) in h {
                if k.as_str() == Some("<<") {
                    match v {
                        Yaml::Array(a) => merged.extend(a),
                        other => merged.push(other),
                    }
                } else {
                    out.insert(k, merge(v));
                }
            }
            for m in merged {
                if let Yaml::Hash(mh) = merge(m) {
                    for (k, v) in mh {
                        out.entry(k).or_insert(v);
                    }
                }
            }
            Yaml::Hash(out)
        }
        Yaml::Array(a) => Yaml::Array(a.into_iter().map(merge).collect()),
        other => other,
    }
}

fn scalar(y: &Yaml) -> String {
    match y {
        Yaml::String(s) | Yaml::Real(s) => interpolate(s),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

#[derive(Debug, Default)]
struct Service {
    name: String,
    image: Option<String>,
    built: bool,
    command: Vec<String>,
    env: BTreeMap<String, String>,
    /// (published, container) ports.
    ports: Vec<(u16, u16)>,
    depends_on: Vec<String>,
    profiles: Vec<String>,
}

fn load() -> BTreeMap<String, Service> {
    let text = std::fs::read_to_string(repo_root().join("compose.yaml")).expect("compose.yaml");
    let doc = merge(YamlLoader::load_from_str(&text).expect("valid YAML").remove(0));
    let mut out = BTreeMap::new();
    let services = doc["services"].as_hash().expect("services");
    for (k, v) in services {
        let name = k.as_str().unwrap().to_owned();
        let mut s = Service {
            name: name.clone(),
            image: v["image"].as_str().map(str::to_owned),
            built: !v["build"].is_badvalue(),
            ..Default::default()
        };
        match &v["command"] {
            Yaml::Array(a) => s.command = a.iter().map(scalar).collect(),
            Yaml::String(c) => s.command = interpolate(c).split_whitespace().map(str::to_owned).collect(),
            Yaml::BadValue => {}
            other => panic!("{name}: command {other:?}"),
        }
        if let Some(env) = v["environment"].as_hash() {
            for (ek, ev) in env {
                s.env.insert(ek.as_str().unwrap().to_owned(), scalar(ev));
            }
        }
        if let Some(ports) = v["ports"].as_vec() {
            for p in ports {
                let p = scalar(p);
                let parts: Vec<&str> = p.split(':').collect();
                let container: u16 = parts.last().unwrap().parse().unwrap();
                let published: u16 = parts[parts.len() - 2].parse().unwrap();
                s.ports.push((published, container));
            }
        }
        match &v["depends_on"] {
            Yaml::Array(a) => s.depends_on = a.iter().map(scalar).collect(),
            Yaml::Hash(h) => s.depends_on = h.keys().map(scalar).collect(),
            _ => {}
        }
        if let Some(p) = v["profiles"].as_vec() {
            s.profiles = p.iter().map(scalar).collect();
        }
        out.insert(name, s);
    }
    out
}

/// Ports a listen-address value names (`0.0.0.0:8080`).
fn listen_port(v: &str) -> Option<u16> {
    let (host, port) = v.rsplit_once(':')?;
    if host.contains('/') {
        return None;
    }
    port.parse().ok()
}

#[test]
fn compose_matches_the_binaries() {
    let services = load();
    let bins = workspace_binaries();
    for required in [
        "neopro-broker",
        "neopro-ingestor",
        "neopro-edge",
        "neopro-analytics",
        "neopro-sim",
    ] {
        assert!(
            bins.contains_key(required),
            "the workspace builds no {required}: {bins:?}"
        );
    }

    // The services the issue asks for.
    assert_eq!(services["postgres"].image.as_deref(), Some("postgres:15"));
    fn runs<'a>(services: &'a BTreeMap<String, Service>, bin: &'a str) -> impl Iterator<Item = &'a Service> + 'a {
        services
            .values()
            .filter(move |s| s.command.first().map(String::as_str) == Some(bin))
    }
    let runs = |bin: &'static str| runs(&services, bin);
    assert!(runs("neopro-broker").count() >= 1, "a neopro-broker service");
    assert!(runs("neopro-ingestor").count() >= 1, "a neopro-ingestor service");
    assert!(runs("neopro-analytics").count() >= 1, "a neopro-analytics service");
    assert!(runs("neopro-edge").count() >= 1, "a simulated box (neopro-edge)");
    assert!(
        runs("neopro-sim").any(|s| s.command.get(1).map(String::as_str) == Some("feed")),
        "the box's feeder"
    );
    let mosquitto = services
        .values()
        .find(|s| s.image.as_deref().is_some_and(|i| i.starts_with("eclipse-mosquitto")))
        .expect("a Mosquitto service");
    assert_eq!(mosquitto.profiles, vec!["mosquitto".to_owned()]);

    // Ports each service listens on inside its container.
    let mut listens: HashMap<String, BTreeSet<u16>> = HashMap::new();
    let mut helps: HashMap<String, String> = HashMap::new();
    for s in services.values() {
        let mut ports: BTreeSet<u16> = s.ports.iter().map(|p| p.1).collect();
        if s.name == "postgres" {
            ports.insert(5432);
        }
        if let Some(bin) = s.command.first().filter(|b| bins.contains_key(*b)) {
            let sub = s.command.get(1).filter(|a| !a.starts_with('-')).map(String::as_str);
            let h = help(bin, &bins[bin], sub);
            let envs = env_names(&h);
            for (k, v) in &s.env {
                let documented = envs.contains(k)
                    || k == "RUST_LOG"
                    || [
                        "NEOPRO_INGESTOR__",
                        "NEOPRO_EDGE__",
                        "NEOPRO_BROKER__",
                        "NEOPRO_ANALYTICS__",
                    ]
                    .iter()
                    .any(|p| k.starts_with(p));
                assert!(
                    documented,
                    "{}: {bin} does not read {k} (its --help lists {envs:?})",
                    s.name
                );
                if k.ends_with("_ADDR") || k.ends_with("_LISTEN") {
                    if let Some(p) = listen_port(v) {
                        ports.insert(p);
                    }
                }
            }
            // Published ports must be ones the binary listens on: set by a
            // listen variable above, or its documented default.
            let defaults = default_ports(&h);
            let from_env: BTreeSet<u16> = s
                .env
                .iter()
                .filter(|(k, _)| k.ends_with("_ADDR") || k.ends_with("_LISTEN"))
                .filter_map(|(_, v)| listen_port(v))
                .collect();
            for (_, container) in &s.ports {
                assert!(
                    from_env.contains(container) || defaults.contains(container),
                    "{}: publishes container port {container} but {bin} listens on {from_env:?} (defaults {defaults:?})",
                    s.name
                );
            }
            if let Some(sub) = sub {
                assert!(
                    h.contains(&format!("  {sub}")),
                    "{}: {bin} has no subcommand '{sub}'",
                    s.name
                );
            }
            helps.insert(s.name.clone(), h);
        } else if s.built {
            // A shell step of ours: every neopro binary it calls must exist,
            // and every variable given to it must be used.
            assert_eq!(
                s.command.first().map(String::as_str),
                Some("sh"),
                "{}: {:?}",
                s.name,
                s.command
            );
            let script = s.command.join(" ");
            let called: Vec<&str> = script
                .split(|c: char| c.is_whitespace() || c == '|' || c == ';')
                .filter(|w| w.starts_with("neopro-"))
                .collect();
            assert!(!called.is_empty(), "{}: calls no neopro binary", s.name);
            for b in &called {
                assert!(
                    bins.contains_key(*b),
                    "{}: calls {b}, which the workspace does not build",
                    s.name
                );
            }
            for k in s.env.keys() {
                assert!(script.contains(&format!("${k}")), "{}: {k} is set but not used", s.name);
            }
            let broker_help = help("neopro-broker", &bins["neopro-broker"], None);
            for sub in ["passwd", "mosquitto-config"] {
                if script.contains(&format!("neopro-broker {sub}")) {
                    assert!(
                        broker_help.contains(&format!("  {sub}")),
                        "neopro-broker has no '{sub}'"
                    );
                }
            }
        }
        listens.insert(s.name.clone(), ports);
    }

    // URLs that point at a service use a port it listens on; depends_on exist.
    for s in services.values() {
        for d in &s.depends_on {
            assert!(services.contains_key(d), "{}: depends on unknown service {d}", s.name);
        }
        for (k, v) in &s.env {
            let Ok(u) = url::Url::parse(v) else { continue };
            let Some(host) = u.host_str() else { continue };
            if let Some(ports) = listens.get(host) {
                let port = u.port_or_known_default().or(match u.scheme() {
                    "mqtt" => Some(1883),
                    "postgres" => Some(5432),
                    _ => None,
                });
                let port = port.unwrap_or_else(|| panic!("{}: {k} has no port", s.name));
                assert!(
                    ports.contains(&port),
                    "{}: {k} points at {host}:{port}, but {host} listens on {ports:?}",
                    s.name
                );
            }
        }
    }
    // The broker host is a variable: the Mosquitto alternative must fit too.
    assert!(listens[&mosquitto.name].contains(&1883));
    assert!(!helps.is_empty());

    // The Dockerfile builds and ships every binary the compose file runs.
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).expect("Dockerfile");
    assert!(dockerfile.contains("FROM debian:bookworm-slim"), "slim runtime stage");
    assert!(dockerfile.contains(" AS builder"), "multi-stage build");
    for s in services.values().filter(|s| s.built) {
        for w in s
            .command
            .iter()
            .flat_map(|c| c.split_whitespace())
            .filter(|w| w.starts_with("neopro-"))
        {
            assert!(
                dockerfile.contains(&format!("target/release/{w}")),
                "the Dockerfile does not ship {w}"
            );
            assert!(
                dockerfile.contains(&format!("-p {}", bins[w])),
                "the Dockerfile does not build {}",
                bins[w]
            );
        }
    }
}

#[test]
fn interpolation_and_help_parsing() {
    assert_eq!(interpolate("a${X:-b}c$$D${Y}"), "abc$D");
    assert_eq!(
        env_names("  --x <X>  [env: DATABASE_URL=]\n --y [env: NEOPRO_HTTP_ADDR]"),
        BTreeSet::from(["DATABASE_URL".to_owned(), "NEOPRO_HTTP_ADDR".to_owned()])
    );
    assert_eq!(
        default_ports("[default: 0.0.0.0:8080] (default 0.0.0.0:3000)"),
        BTreeSet::from([8080, 3000])
    );
    assert_eq!(listen_port("0.0.0.0:9883"), Some(9883));
    assert_eq!(listen_port("/var/lib/x"), None);
}

//! The `neopro-broker` binary as operators run it: `passwd` from stdin,
//! `mosquitto_pub`/`mosquitto_sub` through it (the documented debugging
//! recipe), `/healthz` and `/metrics`, credentials reload on SIGHUP, a
//! clean exit (code 0) on SIGTERM, and `mosquitto-config` producing a
//! configuration the real Mosquitto runs. A missing tool fails the test.

use broker::credentials::{mosquitto_hash_with, Credentials, Role};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_neopro-broker");
const CEILING: Duration = Duration::from_secs(60);

/// A tool the test needs, from `PATH` or the Debian locations; panics with
/// what to install when it is missing.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not installed (apt-get install mosquitto mosquitto-clients)"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn passwd(file: &Path, user: &str, password: &str) {
    let mut child = Command::new(BIN)
        .args(["passwd"])
        .arg(file)
        .arg(user)
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    assert!(child.wait().unwrap().success(), "passwd {user}");
}

struct Killer(Child);
impl Drop for Killer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success());
}

fn mosquitto_pub(port: u16, user: &str, pass: &str, client_id: &str, topic: &str, msg: &str) -> bool {
    Command::new(tool("mosquitto_pub"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-u",
            user,
            "-P",
            pass,
            "-i",
            client_id,
            "-q",
            "1",
        ])
        .args(["-t", topic, "-m", msg])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn poll_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + CEILING;
    while !f() {
        assert!(Instant::now() < deadline, "gave up waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, buf))
}

#[test]
fn operator_workflow() {
    let mosquitto_sub = tool("mosquitto_sub");
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    passwd(&creds, "club-x", "pw-x");
    passwd(&creds, "ingestor", "pw-ing");
    let text = std::fs::read_to_string(&creds).unwrap();
    assert!(!text.contains("pw-x") && text.contains("$argon2id$") && text.contains("$7$100000$"));
    // The live-debugging account: an observer (reads everything, writes nothing).
    let mut c = Credentials::load(&creds).unwrap();
    c.set_password_with_role("ops", "pw-ops", Role::Observer).unwrap();
    c.save(&creds).unwrap();

    let (mqtt, http) = (free_port(), free_port());
    let child = Command::new(BIN)
        .args([
            "--listen",
            &format!("127.0.0.1:{mqtt}"),
            "--http-addr",
            &format!("127.0.0.1:{http}"),
        ])
        .arg("--credentials")
        .arg(&creds)
        // Only SIGHUP reloads in this test (no file watch).
        .env("NEOPRO_BROKER__CREDENTIALS_POLL_SECS", "0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut broker = Killer(child);
    let pid = broker.0.id();
    poll_until("/healthz", || {
        http_get(http, "/healthz").is_some_and(|(c, b)| c == 200 && b.ends_with("ok"))
    });

    // The debugging recipe: mosquitto_sub -h HOST -p PORT -u USER -P PASS -t 'neopro/#' -v
    let mut sub = Killer(
        Command::new(&mosquitto_sub)
            .args(["-h", "127.0.0.1", "-p", &mqtt.to_string(), "-u", "ops", "-P", "pw-ops"])
            .args(["-t", "neopro/#", "-v", "-C", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let out = sub.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    // mosquitto_sub subscribes asynchronously: publish until it prints.
    let mut line = None;
    poll_until("mosquitto_sub output", || {
        assert!(mosquitto_pub(
            mqtt,
            "club-x",
            "pw-x",
            "club-x",
            "neopro/sites/club-x/impressions",
            "hello"
        ));
        line = rx.recv_timeout(Duration::from_millis(300)).ok();
        line.is_some()
    });
    assert_eq!(line.unwrap().trim_end(), "neopro/sites/club-x/impressions hello");

    // Refusals, seen by the CLI client too.
    assert!(
        !mosquitto_pub(mqtt, "club-x", "wrong", "club-x", "neopro/sites/club-x/status", "x"),
        "wrong password"
    );
    assert!(
        !mosquitto_pub(mqtt, "club-x", "pw-x", "club-y", "neopro/sites/club-x/status", "x"),
        "takeover"
    );

    // A new account works after SIGHUP, without restart.
    passwd(&creds, "club-y", "pw-y");
    assert!(
        !mosquitto_pub(mqtt, "club-y", "pw-y", "club-y", "neopro/sites/club-y/status", "x"),
        "before reload"
    );
    signal(pid, "HUP");
    poll_until("club-y accepted after SIGHUP", || {
        mosquitto_pub(mqtt, "club-y", "pw-y", "club-y", "neopro/sites/club-y/status", "up")
    });

    // Metrics: refusals by reason, and router meters once traffic flowed.
    poll_until("metrics", || {
        http_get(http, "/metrics").is_some_and(|(c, b)| {
            c == 200
                && b.contains("neopro_broker_auth_failures_total{reason=\"bad_password\"}")
                && b.contains("neopro_broker_auth_failures_total{reason=\"client_id\"}")
                && b.contains("neopro_broker_publishes_total")
                && b.contains("neopro_broker_accounts 4")
        })
    });

    // SIGTERM: exits by itself with status 0.
    signal(pid, "TERM");
    let deadline = Instant::now() + CEILING;
    let status = loop {
        if let Some(s) = broker.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
}

fn mosquitto_config(args: &[&str]) -> std::process::Output {
    Command::new(BIN).arg("mosquitto-config").args(args).output().unwrap()
}

fn whoami() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// `neopro-broker mosquitto-config` as an operator runs it: the files, their
/// mode, the refusals and warnings it prints, and a Mosquitto started on the
/// result that carries a `mosquitto_pub` to a `mosquitto_sub`.
#[test]
fn mosquitto_config_subcommand() {
    let (mosquitto, mosquitto_sub) = (tool("mosquitto"), tool("mosquitto_sub"));
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    passwd(&creds, "club-x", "pw-x");
    passwd(&creds, "ingestor", "pw-ing");
    let creds_s = creds.to_str().unwrap();
    let out = dir.path().join("mosquitto");
    let out_s = out.to_str().unwrap();
    let pers = dir.path().join("data");
    std::fs::create_dir_all(&pers).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let user = whoami();
    let base = [
        "--credentials",
        creds_s,
        "--out",
        out_s,
        "--listen",
        &listen,
        "--persistence-dir",
        pers.to_str().unwrap(),
        "--run-as",
        &user,
    ];

    // Without the receipts account: written, with a warning that says what to add.
    let o = mosquitto_config(&base);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: no 'ingestor-receipts' account")
            && stderr.contains("passwd FILE ingestor-receipts --role ingestor")
            && stderr.contains("NEOPRO_RECEIPTS_MQTT_URL"),
        "{stderr}"
    );

    let mut c = Credentials::load(&creds).unwrap();
    c.set_password_with_role("ingestor-receipts", "pw-ing-r", Role::Ingestor)
        .unwrap();
    c.save(&creds).unwrap();
    let o = mosquitto_config(&base);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && !stderr.contains("warning"), "{stderr}");
    let conf = out.canonicalize().unwrap().join("mosquitto.conf");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim_end(),
        format!(
            "wrote {} (3 accounts); run: mosquitto -c {}",
            conf.display(),
            conf.display()
        )
    );
    for f in ["passwd", "acl", "mosquitto.conf"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let pw = std::fs::read_to_string(out.join("passwd")).unwrap();
    assert_eq!(pw.lines().count(), 3);
    assert!(pw.lines().all(|l| l.contains(":$7$100000$")), "{pw}");

    // The configuration runs: a site's publish reaches the ingestor's filter.
    let log = std::fs::File::create(dir.path().join("mosquitto.log")).unwrap();
    let _broker = Killer(
        Command::new(mosquitto)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    poll_until("mosquitto listening", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let mut sub = Killer(
        Command::new(&mosquitto_sub)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-u",
                "ingestor",
                "-P",
                "pw-ing",
            ])
            .args(["-t", "neopro/sites/+/impressions", "-v", "-C", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = sub.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let mut line = None;
    poll_until("mosquitto_sub output", || {
        assert!(mosquitto_pub(
            port,
            "club-x",
            "pw-x",
            "club-x",
            "neopro/sites/club-x/impressions",
            "hello"
        ));
        line = rx.recv_timeout(Duration::from_millis(300)).ok();
        line.is_some()
    });
    assert_eq!(line.unwrap().trim_end(), "neopro/sites/club-x/impressions hello");

    // With TLS, a plain listener off loopback is refused.
    let tls_args = [
        "--tls-cert",
        "/nonexistent/cert.pem",
        "--tls-key",
        "/nonexistent/key.pem",
    ];
    let o = mosquitto_config(&[&base[..4], &["--listen", "0.0.0.0:1883"], &tls_args[..]].concat());
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("must be on loopback"));
    // Without --listen it is 127.0.0.1:1883.
    let o = mosquitto_config(&[&base[..4], &tls_args[..]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(out.join("mosquitto.conf")).unwrap();
    assert!(
        text.contains("\nlistener 1883 127.0.0.1\n") && text.contains("\nlistener 8883 0.0.0.0\n"),
        "{text}"
    );

    // An old file's weak hash (mosquitto_passwd writes 101 iterations) is
    // refused, naming the account and the fix; --allow-weak-hashes warns.
    let weak = Credentials::parse(&format!(
        "{}club-old:{}:{}\n",
        c.render(),
        c.get("club-x").unwrap().argon2,
        mosquitto_hash_with("pw-old", b"012345678901", 101)
    ))
    .unwrap();
    weak.save(&creds).unwrap();
    let o = mosquitto_config(&base);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(
        stderr.contains("club-old (101)") && stderr.contains("neopro-broker passwd FILE USER"),
        "{stderr}"
    );
    let o = mosquitto_config(&[&base[..], &["--allow-weak-hashes"]].concat());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && stderr.contains("warning: ") && stderr.contains("club-old (101)"),
        "{stderr}"
    );
}

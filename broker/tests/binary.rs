//! The `neopro-broker` binary as operators run it: `passwd` from stdin,
//! `mosquitto_pub`/`mosquitto_sub` through it (the documented debugging
//! recipe), `/healthz` and `/metrics`, credentials reload on SIGHUP, and a
//! clean exit (code 0) on SIGTERM.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_neopro-broker");
const CEILING: Duration = Duration::from_secs(60);

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
    Command::new("/usr/bin/mosquitto_pub")
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
    if !Path::new("/usr/bin/mosquitto_pub").exists() || !Path::new("/usr/bin/mosquitto_sub").exists() {
        eprintln!("mosquitto clients not installed; skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    passwd(&creds, "club-x", "pw-x");
    passwd(&creds, "ingestor", "pw-ing");
    let text = std::fs::read_to_string(&creds).unwrap();
    assert!(!text.contains("pw-x") && text.contains("$argon2id$") && text.contains("$7$101$"));

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
        Command::new("/usr/bin/mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &mqtt.to_string(),
                "-u",
                "ingestor",
                "-P",
                "pw-ing",
            ])
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
                && b.contains("neopro_broker_accounts 3")
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

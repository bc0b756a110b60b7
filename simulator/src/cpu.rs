//! CPU accounting of a benchmark phase, from `/proc` (Linux).
//!
//! Why: `neopro-sim bench` compares the whole chain, run on one machine,
//! with a single `COPY` stream. A ratio alone does not say where the
//! difference goes; the CPU time each side used per row does. A [`Snapshot`]
//! taken before and after a phase gives, as a [`Usage`]:
//!
//! * the machine's busy and total CPU time (`/proc/stat`): whether the phase
//!   was bound by CPU at all;
//! * this process and its children (the in-process broker, ingestor and
//!   boxes, plus the box-host processes when boxes are spread over children);
//! * the PostgreSQL server's processes, when the server runs on this machine
//!   (`comm` = `postgres`; a process's own time plus that of the children it
//!   reaped, so that a backend that exits during the phase still counts,
//!   through the postmaster). Everything the server does in the phase is
//!   counted, other clients' work included: run benchmarks on a quiet server.
//!
//! Reading `/proc` never fails the benchmark: what cannot be read is `None`
//! and printed as `n/a` (everything, on a system without `/proc`).

/// Cumulative CPU times at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot {
    at: std::time::Instant,
    ticks: Ticks,
}

/// CPU used between two snapshots, in seconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// Wall-clock time between the two snapshots.
    pub wall_s: f64,
    pub machine_busy_s: Option<f64>,
    pub machine_total_s: Option<f64>,
    /// This process alone (with the children it has reaped).
    pub own_s: Option<f64>,
    /// Its live children (the box-host processes of the bench).
    pub children_s: Option<f64>,
    pub postgres_s: Option<f64>,
}

impl Snapshot {
    /// Reads the counters now. `postgres_local`: whether the database server
    /// runs on this machine (otherwise its processes are not ours to read).
    pub fn take(postgres_local: bool) -> Snapshot {
        Snapshot {
            at: std::time::Instant::now(),
            ticks: read(postgres_local),
        }
    }

    /// What was used from `self` (earlier) to `later`.
    pub fn until(&self, later: &Snapshot) -> Usage {
        let hz = ticks_per_second().max(1) as f64;
        let d = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / hz),
            _ => None,
        };
        let (a, b) = (&self.ticks, &later.ticks);
        Usage {
            wall_s: later.at.duration_since(self.at).as_secs_f64(),
            machine_busy_s: d(a.machine.map(|m| m.0), b.machine.map(|m| m.0)),
            machine_total_s: d(a.machine.map(|m| m.1), b.machine.map(|m| m.1)),
            own_s: d(a.own, b.own),
            children_s: d(a.children, b.children),
            postgres_s: d(a.postgres, b.postgres),
        }
    }
}

/// Raw counters, in clock ticks.
#[derive(Clone, Copy, Debug, Default)]
struct Ticks {
    /// (busy, busy + idle) of the whole machine.
    machine: Option<(u64, u64)>,
    own: Option<u64>,
    children: Option<u64>,
    postgres: Option<u64>,
}

#[cfg(target_os = "linux")]
fn read(postgres_local: bool) -> Ticks {
    use procfs::process::{all_processes, Process};
    use procfs::CurrentSI;

    let machine = procfs::KernelStats::current().ok().map(|k| {
        let t = &k.total;
        let idle = t.idle + t.iowait.unwrap_or(0);
        let busy = t.user + t.nice + t.system + t.irq.unwrap_or(0) + t.softirq.unwrap_or(0) + t.steal.unwrap_or(0);
        (busy, busy + idle)
    });
    let me = std::process::id() as i32;
    let own = Process::myself()
        .and_then(|p| p.stat())
        .ok()
        .map(|s| s.utime + s.stime + non_negative(s.cutime) + non_negative(s.cstime));
    let mut postgres = postgres_local.then_some(0u64);
    let mut children = None;
    if let Ok(procs) = all_processes() {
        children = Some(0u64);
        for p in procs.flatten() {
            let Ok(s) = p.stat() else { continue };
            let total = s.utime + s.stime + non_negative(s.cutime) + non_negative(s.cstime);
            if s.ppid == me {
                children = children.map(|c| c + total);
            }
            if s.comm == "postgres" {
                postgres = postgres.map(|g| g + total);
            }
        }
    } else {
        postgres = None;
    }
    Ticks {
        machine,
        own,
        children,
        postgres,
    }
}

#[cfg(not(target_os = "linux"))]
fn read(_postgres_local: bool) -> Ticks {
    Ticks::default()
}

#[cfg(target_os = "linux")]
fn ticks_per_second() -> u64 {
    procfs::ticks_per_second()
}

#[cfg(not(target_os = "linux"))]
fn ticks_per_second() -> u64 {
    100
}

#[cfg(target_os = "linux")]
fn non_negative(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Usage {
    /// This process and its live children.
    pub fn ours_s(&self) -> Option<f64> {
        Some(self.own_s? + self.children_s.unwrap_or(0.0))
    }

    /// CPU microseconds per row of `seconds` (`n/a` when unknown).
    pub fn per_row(seconds: Option<f64>, rows: u64) -> String {
        match seconds {
            Some(s) if rows > 0 => format!("{:.1}", s * 1e6 / rows as f64),
            _ => "n/a".to_owned(),
        }
    }

    /// Cores busy on average between the snapshots, out of the machine's.
    pub fn busy_cores(&self) -> String {
        let wall_s = self.wall_s;
        match (self.machine_busy_s, self.machine_total_s) {
            (Some(b), Some(t)) if wall_s > 0.0 && t > 0.0 => {
                format!("{:.2} of {:.0} cores busy", b / wall_s, t / wall_s)
            }
            _ => "machine load n/a".to_owned(),
        }
    }
}

/// Whether a PostgreSQL URL points at this machine (loopback or a socket).
pub fn is_local_server(url: &str) -> bool {
    match url::Url::parse(url) {
        Ok(u) => match u.host_str() {
            None | Some("") => true,
            Some(h) => {
                let h = h.trim_start_matches('[').trim_end_matches(']');
                h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
            }
        },
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_socket_urls_are_local_others_are_not() {
        assert!(is_local_server("postgres://postgres@127.0.0.1:5432/x"));
        assert!(is_local_server("postgres://postgres@localhost/x"));
        assert!(is_local_server("postgres://postgres@[::1]:5432/x"));
        assert!(!is_local_server("postgres://postgres@db.example.com:5432/x"));
        assert!(!is_local_server("postgres://postgres@10.0.0.7/x"));
        assert!(!is_local_server("not a url"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_burning_cpu_shows_in_its_own_usage_and_the_machines() {
        let before = Snapshot::take(false);
        // Spin until /proc reports 50 ms of our CPU (ticks are 10 ms); the
        // deadline only guards against a counter that never moves.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut x = 0u64;
        let used = loop {
            for _ in 0..1_000_000 {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            }
            let used = before.until(&Snapshot::take(false));
            if used.ours_s().expect("own /proc entry is readable") >= 0.05 || std::time::Instant::now() > deadline {
                break used;
            }
        };
        std::hint::black_box(x);
        let ours = used.ours_s().expect("own /proc entry is readable");
        assert!(ours >= 0.05, "our CPU time never moved: {used:?}");
        assert!(used.postgres_s.is_none(), "not asked for");
        let busy = used.machine_busy_s.expect("/proc/stat is readable");
        assert!(
            busy >= ours * 0.5,
            "the machine was less busy than this process: {used:?}"
        );
        assert!(used.machine_total_s.expect("/proc/stat is readable") >= busy);
    }
}

//! Widens the listen backlog of rumqttd's listeners.
//!
//! ## Why
//! rumqttd binds with `tokio::net::TcpListener::bind`, which (as the standard
//! library does) asks the kernel for a backlog of **128** half-accepted
//! connections, and its accept loop runs on one single-threaded runtime that
//! also drives every connection's I/O, sleeping a timer tick after each
//! accept. When a fleet (re)connects at once (a broker restart, a benchmark
//! starting 1,000 boxes) the accept queue fills in a few milliseconds, and
//! the kernel drops every further SYN; each dropped client retransmits after
//! 1 s, then 3 s, 7 s, 15 s. Measured here with 1,000 boxes starting
//! together: 3 s to connect them all on the embedded broker, with about
//! 3,000 dropped SYNs (`netstat -s`: "times the listen queue of a socket
//! overflowed"), against 0.6 s on Mosquitto, which asks for `SOMAXCONN`.
//! rumqttd has no setting for it.
//!
//! ## How
//! On Linux, `listen(2)` on a socket that already listens only changes its
//! backlog. The socket is rumqttd's, in this process: its inode is found in
//! `/proc/net/tcp{,6}` (the LISTEN line of the port), the descriptor holding
//! it in `/proc/self/fd` (`socket:[inode]`), a duplicate of that descriptor
//! is taken with `pidfd_getfd(2)` (safe: a new descriptor of the same socket),
//! `listen(dup, n)` is called on it, and the duplicate is closed. Only a
//! socket descriptor whose inode matches is ever duplicated, so no other file
//! of the process is touched (closing a duplicate of a regular file would
//! release the process's POSIX locks on it, SQLite's included). The kernel
//! caps `n` at `net.core.somaxconn`.
//!
//! Elsewhere, or when any step fails (an old kernel without `pidfd_getfd`,
//! no `/proc`), the backlog stays 128: slower reconnect storms, nothing else.

use std::net::SocketAddr;

/// What [`widen`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Widened {
    /// The listener of this port now has this backlog (before the kernel's
    /// `somaxconn` cap).
    To(i32),
    /// Nothing changed, and why.
    Unchanged(String),
}

/// Asks for a backlog of `backlog` on the socket listening on `addr`'s port.
pub fn widen(addr: SocketAddr, backlog: i32) -> Widened {
    match imp::widen(addr.port(), backlog) {
        Ok(()) => Widened::To(backlog),
        Err(why) => Widened::Unchanged(why),
    }
}

/// The backlog our own listeners ask for (the kernel caps it at
/// `net.core.somaxconn`).
pub const OWN_BACKLOG: i32 = 4096;

/// Asks for a backlog of `backlog` on a listener of our own (the standard
/// library bound it with 128). Best effort, as [`widen`].
pub fn widen_own(listener: &std::net::TcpListener, backlog: i32) {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::net::listen(listener, backlog) {
        tracing::warn!(error = %e, "could not widen a listen backlog");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (listener, backlog);
}

/// Inodes of the sockets in LISTEN state on `port` (any address), read from
/// `/proc/net/tcp{,6}`; `None` where those files do not exist.
pub(crate) fn listening_inodes(port: u16) -> Option<Vec<u64>> {
    let hex = format!(":{port:04X}");
    let mut out = Vec::new();
    let mut read_any = false;
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(f) else { continue };
        read_any = true;
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if cols.len() > 9 && cols[3] == "0A" && cols[1].ends_with(&hex) {
                if let Ok(inode) = cols[9].parse::<u64>() {
                    out.push(inode);
                }
            }
        }
    }
    read_any.then_some(out)
}

#[cfg(target_os = "linux")]
mod imp {
    use rustix::process::{getpid, pidfd_getfd, pidfd_open, PidfdFlags, PidfdGetfdFlags};

    pub fn widen(port: u16, backlog: i32) -> Result<(), String> {
        let inodes = super::listening_inodes(port).ok_or("/proc/net/tcp is not readable")?;
        if inodes.is_empty() {
            return Err(format!("no socket listens on port {port}"));
        }
        let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
        let mut fds = Vec::new();
        let dir = std::fs::read_dir("/proc/self/fd").map_err(|e| format!("/proc/self/fd: {e}"))?;
        for entry in dir.flatten() {
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            if wanted.iter().any(|w| target.as_os_str() == w.as_str()) {
                if let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) {
                    fds.push(fd);
                }
            }
        }
        if fds.is_empty() {
            return Err(format!("the socket listening on port {port} is not this process's"));
        }
        let pidfd = pidfd_open(getpid(), PidfdFlags::empty()).map_err(|e| format!("pidfd_open: {e}"))?;
        for fd in fds {
            let dup = pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()).map_err(|e| format!("pidfd_getfd: {e}"))?;
            if !rustix::net::sockopt::socket_acceptconn(&dup).map_err(|e| format!("SO_ACCEPTCONN: {e}"))? {
                return Err(format!("descriptor {fd} does not listen"));
            }
            rustix::net::listen(&dup, backlog).map_err(|e| format!("listen: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    pub fn widen(_port: u16, _backlog: i32) -> Result<(), String> {
        Err("only done on Linux".into())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// The backlog cannot be read back from a socket, so the test shows its
    /// effect: 300 connects complete without a single accept, where a
    /// backlog of 128 would leave the later ones' SYNs dropped (timed out).
    #[test]
    fn widens_a_listener_of_this_process() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(widen(addr, 1024), Widened::To(1024));
        // 300 connects complete in the kernel's accept queue without a single
        // accept: with the default backlog of 128 most would time out.
        let mut held = Vec::new();
        for _ in 0..300 {
            let s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(500))
                .expect("connect completes in the widened accept queue");
            held.push(s);
        }
        let mut accepted = 0;
        listener.set_nonblocking(true).unwrap();
        while listener.accept().is_ok() {
            accepted += 1;
        }
        assert_eq!(accepted, 300);
    }

    #[test]
    fn a_port_nobody_listens_on_is_reported() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        assert!(matches!(widen(addr, 1024), Widened::Unchanged(_)));
    }
}

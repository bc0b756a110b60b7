//! Authentication of MQTT CONNECTs against the credentials file, plugged
//! into rumqttd with `set_auth_handler` (which hands us client id, username
//! and password, and refuses the connection when we answer `false`; the
//! client sees the connection closed without a CONNACK).
//!
//! argon2 is slow on purpose (~20 ms, 19 MiB per check), and rumqttd runs
//! each listener on a single-threaded runtime, so checks run on the blocking
//! pool, at most one per CPU at a time. A reconnect storm of 10,000 boxes
//! would still cost minutes of CPU, so a successful check is remembered in
//! memory as SHA-256(process-random key ‖ password) next to the argon2 hash it
//! was checked against: a later CONNECT with the same password costs one
//! SHA-256. The cache never leaves the process, is bound to the hash (a
//! `passwd` change invalidates it), and a reload drops it.
//!
//! The file is re-read on SIGHUP (the broker's `app.rs`) and when its
//! content changes: each poll hashes the file (SHA-256), so two edits within
//! one tick of the file system's modification time are not missed. A file
//! that fails to parse is refused and the previous accounts stay in force.

use crate::credentials::{argon2_verify, client_id_allowed, Credentials, Role};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use subtle_eq::ct_eq;

/// Why a CONNECT was refused (the `reason` label of
/// `neopro_broker_auth_failures_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    UnknownUser,
    BadPassword,
    /// The client id is neither the username nor `<username>:…`.
    ClientId,
    /// No username (anonymous) while credentials are required.
    NoUsername,
}

impl AuthFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::UnknownUser => "unknown_user",
            AuthFailure::BadPassword => "bad_password",
            AuthFailure::ClientId => "client_id",
            AuthFailure::NoUsername => "no_username",
        }
    }
}

/// The accounts in force, reloadable.
pub struct Authenticator {
    path: PathBuf,
    accounts: RwLock<Arc<Credentials>>,

    /// SHA-256 of the file's bytes at the last (re)load attempt.
    content: Mutex<Option<[u8; 32]>>,
    cache_key: [u8; 32],
    /// username → (argon2 hash checked against, SHA-256(key ‖ password)).
    cache: Mutex<HashMap<String, (String, [u8; 32])>>,
    slow_checks: tokio::sync::Semaphore,
    /// Checked for unknown users so that their refusal takes as long as a
    /// wrong password (no username probing by timing).
    dummy_hash: String,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("path", &self.path)
            .field("accounts", &self.len())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Loads `path` (must exist and parse).
    pub fn load(path: &Path) -> anyhow::Result<Arc<Self>> {
        let creds = Credentials::load(path)?;
        let content = content_hash(path);
        let mut cache_key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut cache_key);
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
        let me = Arc::new(Self {
            path: path.to_owned(),
            accounts: RwLock::new(Arc::new(creds)),
            content: Mutex::new(content),
            cache_key,
            cache: Mutex::new(HashMap::new()),
            slow_checks: tokio::sync::Semaphore::new(parallel),
            dummy_hash: crate::credentials::argon2_hash("neopro-broker dummy password")?,
        });
        me.publish_gauge();
        tracing::info!(file = %path.display(), accounts = me.len(), "credentials loaded");
        Ok(me)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.accounts.read().expect("accounts lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn publish_gauge(&self) {
        metrics::gauge!("neopro_broker_accounts").set(self.len() as f64);
    }

    /// Re-reads the file. On error the accounts in force are kept.
    pub fn reload(&self) -> anyhow::Result<usize> {
        let content = content_hash(&self.path);
        match Credentials::load(&self.path) {
            Ok(c) => {
                let n = c.len();
                *self.accounts.write().expect("accounts lock") = Arc::new(c);
                *self.content.lock().expect("content lock") = content;
                self.cache.lock().expect("cache lock").clear();
                self.publish_gauge();
                metrics::counter!("neopro_broker_credentials_reloads_total", "result" => "ok").increment(1);
                tracing::info!(file = %self.path.display(), accounts = n, "credentials reloaded");
                Ok(n)
            }
            Err(e) => {
                *self.content.lock().expect("content lock") = content;
                metrics::counter!("neopro_broker_credentials_reloads_total", "result" => "error").increment(1);
                tracing::error!(file = %self.path.display(), error = format!("{e:#}"), "credentials reload refused; previous accounts stay in force");
                Err(e)
            }
        }
    }

    /// The role of `username`, if the account exists.
    pub fn role(&self, username: &str) -> Option<Role> {
        self.accounts
            .read()
            .expect("accounts lock")
            .get(username)
            .map(|e| e.role)
    }

    /// The accounts in force.
    pub fn accounts(&self) -> Arc<Credentials> {
        Arc::clone(&self.accounts.read().expect("accounts lock"))
    }

    /// Reloads when the file's content changed since the last (re)load.
    /// Returns whether a reload was attempted.
    pub fn reload_if_changed(&self) -> bool {
        let now = content_hash(&self.path);
        let changed = *self.content.lock().expect("content lock") != now;
        if changed {
            let _ = self.reload();
        }
        changed
    }

    fn fingerprint(&self, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.cache_key);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// Decides one CONNECT (or one HTTP Basic request): the account's role
    /// when the password and the client-id rule hold. Never logs the password.
    pub async fn check(
        self: Arc<Self>,
        client_id: String,
        username: String,
        password: String,
    ) -> Result<Role, AuthFailure> {
        if username.is_empty() {
            return Err(AuthFailure::NoUsername);
        }
        let entry = self.accounts.read().expect("accounts lock").get(&username).cloned();
        let hash = entry
            .as_ref()
            .map_or_else(|| self.dummy_hash.clone(), |e| e.argon2.clone());
        let fp = self.fingerprint(&password);
        let cached = entry.is_some()
            && self
                .cache
                .lock()
                .expect("cache lock")
                .get(&username)
                .is_some_and(|(h, f)| *h == hash && ct_eq(f, &fp));
        let password_ok = if cached {
            true
        } else {
            let _permit = self.slow_checks.acquire().await.map_err(|_| AuthFailure::BadPassword)?;
            let h = hash.clone();
            let ok = tokio::task::spawn_blocking(move || argon2_verify(&h, &password))
                .await
                .unwrap_or(false);
            if ok && entry.is_some() {
                self.cache
                    .lock()
                    .expect("cache lock")
                    .insert(username.clone(), (hash, fp));
            }
            ok
        };
        if entry.is_none() {
            return Err(AuthFailure::UnknownUser);
        }
        if !password_ok {
            return Err(AuthFailure::BadPassword);
        }
        if !client_id_allowed(&username, &client_id) {
            return Err(AuthFailure::ClientId);
        }
        Ok(entry.map_or(Role::Site, |e| e.role))
    }

    /// The rumqttd auth handler: logs and counts every refusal.
    pub fn handler(
        self: &Arc<Self>,
    ) -> impl Fn(String, String, String) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>
           + Send
           + Sync
           + 'static {
        let me = Arc::clone(self);
        move |client_id: String, username: String, password: String| {
            let me = Arc::clone(&me);
            Box::pin(async move {
                let cid = client_id.clone();
                let user = username.clone();
                match me.check(client_id, username, password).await {
                    Ok(_) => {
                        metrics::counter!("neopro_broker_auth_success_total").increment(1);
                        tracing::debug!(client_id = %cid, username = %user, "client authenticated");
                        true
                    }
                    Err(f) => {
                        metrics::counter!("neopro_broker_auth_failures_total", "reason" => f.as_str()).increment(1);
                        tracing::warn!(client_id = %cid, username = %user, reason = f.as_str(), "connection refused");
                        false
                    }
                }
            })
        }
    }
}

/// Re-reads the credentials file on SIGHUP, and when its content changed
/// (checked every `poll_secs`; 0: only on SIGHUP), until `shutdown`. A file
/// that fails to parse leaves the accounts in force.
pub async fn watch_credentials(
    accounts: Arc<Authenticator>,
    poll_secs: u64,
    shutdown: tokio_util::sync::CancellationToken,
) {
    #[cfg(unix)]
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; relying on the file watch");
            None
        }
    };
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(poll_secs.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let hup_recv = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hup_recv = std::future::pending::<Option<()>>();
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = hup_recv => {
                tracing::info!("SIGHUP: reloading credentials");
                let a = Arc::clone(&accounts);
                let _ = tokio::task::spawn_blocking(move || a.reload()).await;
            }
            _ = tick.tick(), if poll_secs > 0 => {
                let a = Arc::clone(&accounts);
                let _ = tokio::task::spawn_blocking(move || a.reload_if_changed()).await;
            }
        }
    }
}

/// SHA-256 of the file's bytes, `None` when it cannot be read.
fn content_hash(path: &Path) -> Option<[u8; 32]> {
    std::fs::read(path).ok().map(|b| Sha256::digest(&b).into())
}

/// Constant-time comparison of two fingerprints.
mod subtle_eq {
    pub fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn check_rules_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("creds");
        let mut c = Credentials::default();
        c.set_password("club-1", "pw1").unwrap();
        c.save(&f).unwrap();
        let a = Authenticator::load(&f).unwrap();
        let chk = |cid: &str, u: &str, p: &str| Arc::clone(&a).check(cid.into(), u.into(), p.into());
        assert_eq!(chk("club-1", "club-1", "pw1").await, Ok(Role::Site));
        assert_eq!(chk("club-1:tool", "club-1", "pw1").await, Ok(Role::Site), "cached path");
        assert_eq!(chk("club-1", "club-1", "nope").await, Err(AuthFailure::BadPassword));
        assert_eq!(chk("club-2", "club-1", "pw1").await, Err(AuthFailure::ClientId));
        assert_eq!(chk("club-2", "club-2", "pw1").await, Err(AuthFailure::UnknownUser));
        assert_eq!(chk("x", "", "").await, Err(AuthFailure::NoUsername));

        c.set_password("club-1", "pw1-new").unwrap();
        c.set_password("club-2", "pw2").unwrap();
        c.save(&f).unwrap();
        a.reload().unwrap();
        assert_eq!(
            chk("club-1", "club-1", "pw1").await,
            Err(AuthFailure::BadPassword),
            "cache dropped"
        );
        assert_eq!(chk("club-2", "club-2", "pw2").await, Ok(Role::Site));

        // Two edits that keep the modification time (same tick, or a tool
        // that restores it) are still seen: the content is compared.
        let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        c.set_password("club-3", "pw3").unwrap();
        c.save(&f).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert!(a.reload_if_changed(), "content changed under the same mtime");
        assert_eq!(chk("club-3", "club-3", "pw3").await, Ok(Role::Site));
        assert!(!a.reload_if_changed(), "nothing changed since");

        std::fs::write(&f, "garbage line").unwrap();
        assert!(a.reload().is_err());
        assert_eq!(
            chk("club-2", "club-2", "pw2").await,
            Ok(Role::Site),
            "old accounts kept"
        );
    }
}

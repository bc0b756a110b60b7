//! Broker accounts for a simulated fleet: one account per box, the
//! ingestor's, and whatever else a run needs (an attacker, an observer).
//!
//! # Why this exists beside `runtime::credentials`
//!
//! The broker's topic ACL is keyed on the account, so a fleet that is to run
//! with the ACL on needs a credentials file with an account per box. The
//! production file is hashed with argon2id at its default (OWASP) cost, about
//! 20 ms and 19 MiB per password, and Mosquitto's `$7$` hash at 100,000
//! PBKDF2 iterations: a thousand boxes would cost a minute before the first
//! play. The PHC string and the `$7$` hash both carry their parameters, and
//! both brokers verify with the parameters they read, so this module writes
//! the same file format with parameters chosen for a test (one argon2 pass
//! over 1 MiB, 1,000 iterations): the broker's code path is the production
//! one, only its cost differs. Never for a real deployment.
//!
//! # Passwords
//!
//! A run draws one random secret; each account's password is derived from
//! it and the username (SHA-256, hex). The bench's box hosts get the secret
//! on stdin (never in the arguments, which `ps` shows) and derive their
//! boxes' passwords themselves, so 10,000 passwords never travel.

use anyhow::Context;
use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rand::RngCore;
use runtime::credentials::{mosquitto_hash_with, Credentials, Role, MOSQUITTO_SALT_LEN};
use runtime::mqtt::MqttUrl;
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::path::Path;

/// argon2id memory (KiB), passes and lanes of the accounts written here.
const ARGON2_M_KIB: u32 = 1024;
const ARGON2_T: u32 = 1;
const ARGON2_P: u32 = 1;
/// PBKDF2 iterations of the Mosquitto hashes written here.
const MOSQUITTO_TEST_ITERATIONS: u32 = 1_000;

/// The accounts of one run: a secret from which every password derives.
#[derive(Clone)]
pub struct Accounts {
    secret: String,
}

/// The secret is a credential: never printed.
impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts").finish_non_exhaustive()
    }
}

impl Accounts {
    /// A fresh random secret (32 bytes).
    pub fn random() -> Self {
        let mut b = [0u8; 32];
        rand::rng().fill_bytes(&mut b);
        Self { secret: hex(&b) }
    }

    /// The accounts of a secret handed over by [`Accounts::secret`].
    pub fn from_secret(secret: impl Into<String>) -> Self {
        Self { secret: secret.into() }
    }

    /// The secret, to hand to a child process (on stdin).
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// `username`'s password: SHA-256(secret, NUL, username), hex, 32 characters.
    pub fn password(&self, username: &str) -> String {
        let mut h = Sha256::new();
        h.update(self.secret.as_bytes());
        h.update([0u8]);
        h.update(username.as_bytes());
        hex(&h.finalize())[..32].to_owned()
    }

    /// `base` with `username` and its password.
    pub fn url(&self, base: &MqttUrl, username: &str) -> MqttUrl {
        MqttUrl {
            username: Some(username.to_owned()),
            password: Some(self.password(username)),
            ..base.clone()
        }
    }

    /// Writes the credentials file for `accounts` (username, role) at `path`
    /// (mode 0600, replaced atomically), hashed with the test parameters on
    /// every core; with `mosquitto`, each line also carries the `$7$` hash
    /// that `neopro-broker mosquitto-config` copies into Mosquitto's password
    /// file. The file is read back with the production parser.
    pub fn write_file(&self, path: &Path, accounts: &[(String, Role)], mosquitto: bool) -> anyhow::Result<Credentials> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let per = accounts.len().div_ceil(threads).max(1);
        let lines: Vec<anyhow::Result<String>> = std::thread::scope(|s| {
            let handles: Vec<_> = accounts
                .chunks(per)
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|(u, r)| self.line(u, *r, mosquitto))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join()
                        .unwrap_or_else(|_| vec![Err(anyhow::anyhow!("hashing thread panicked"))])
                })
                .collect()
        });
        let mut text = String::from("# neopro-sim: accounts of one run, hashed with test parameters\n");
        for l in lines {
            text.push_str(&l?);
            text.push('\n');
        }
        let creds = Credentials::parse(&text).context("the credentials written for the run")?;
        anyhow::ensure!(
            creds.len() == accounts.len(),
            "duplicate usernames among the run's accounts"
        );
        // Written through the production writer (0600, atomic rename).
        creds.save(path)?;
        Ok(creds)
    }

    fn line(&self, username: &str, role: Role, mosquitto: bool) -> anyhow::Result<String> {
        let password = self.password(username);
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
        let params =
            Params::new(ARGON2_M_KIB, ARGON2_T, ARGON2_P, None).map_err(|e| anyhow::anyhow!("argon2 params: {e}"))?;
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(password.as_bytes(), &salt)
            .map_err(|e| anyhow::anyhow!("argon2: {e}"))?
            .to_string();
        let mut line = format!("{username}:{argon2}:");
        if mosquitto {
            let mut salt = [0u8; MOSQUITTO_SALT_LEN];
            rand::rng().fill_bytes(&mut salt);
            line.push_str(&mosquitto_hash_with(&password, &salt, MOSQUITTO_TEST_ITERATIONS));
        }
        let _ = write!(line, ":{role}");
        Ok(line)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_derive_from_the_secret_and_verify_with_the_production_check() {
        let a = Accounts::random();
        let b = Accounts::from_secret(a.secret());
        assert_eq!(a.password("club-1"), b.password("club-1"), "same secret, same password");
        assert_ne!(a.password("club-1"), a.password("club-2"));
        assert_ne!(a.password("club-1"), Accounts::random().password("club-1"));
        assert!(!format!("{a:?}").contains(a.secret()), "Debug hides the secret");

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("creds");
        let accounts = vec![
            ("club-1".to_owned(), Role::Site),
            ("ingestor".to_owned(), Role::Ingestor),
            ("ops".to_owned(), Role::Observer),
        ];
        let c = a.write_file(&f, &accounts, true).unwrap();
        assert_eq!(Credentials::load(&f).unwrap(), c);
        assert_eq!(c.get("ops").unwrap().role, Role::Observer);
        assert_eq!(c.get("ingestor").unwrap().role, Role::Ingestor);
        let e = c.get("club-1").unwrap();
        assert_eq!(e.role, Role::Site);
        assert!(runtime::credentials::argon2_verify(&e.argon2, &a.password("club-1")));
        assert!(!runtime::credentials::argon2_verify(&e.argon2, &a.password("club-2")));
        let m = e.mosquitto.as_deref().unwrap();
        let (it, salt, _) = runtime::credentials::parse_mosquitto_hash(m).unwrap();
        assert_eq!(mosquitto_hash_with(&a.password("club-1"), &salt, it), m);

        let u: MqttUrl = "mqtt://127.0.0.1:1883".parse().unwrap();
        let with = a.url(&u, "club-1");
        assert_eq!(with.username.as_deref(), Some("club-1"));
        assert_eq!(with.password, Some(a.password("club-1")));
        assert_eq!(with.port, 1883);
    }
}

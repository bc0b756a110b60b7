//! The credentials file: who may connect, and with which client ids.
//!
//! # On-disk format
//!
//! UTF-8 text, one account per line, `#` comments and blank lines ignored:
//!
//! ```text
//! # username:argon2id-PHC-string[:mosquitto-$7$-hash[:role]]
//! club-042:$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>:$7$100000$<salt b64>$<hash b64>
//! ingestor:$argon2id$v=19$...:$7$100000$...:ingestor
//! debug-ops:$argon2id$v=19$...:$7$100000$...:observer
//! ```
//!
//! * `username`: a site id (`A-Z a-z 0-9 _ -`, at most 64 characters; no
//!   `:` so that the line splits unambiguously, no `/ + #` so that it can
//!   be used in topics and in Mosquitto's `%u` ACL patterns). The ingestor's
//!   account is named `ingestor`.
//! * the argon2id hash (PHC string) that `neopro-broker` verifies;
//! * optionally, the same password hashed in Mosquitto 2.0's own format
//!   (`$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512>`, what
//!   `mosquitto_passwd` writes). Mosquitto cannot verify argon2, and the
//!   plaintext is never stored, so `neopro-broker passwd` computes both
//!   hashes from the one password it is given; `mosquitto-config` copies
//!   the second field into Mosquitto's password file.
//! * optionally, the account's [`Role`]: `site` (the default: a line without
//!   a role is a site, as in files written before roles existed), `ingestor`
//!   or `observer`. The account named `ingestor` without a role keeps the
//!   ingestor role it always had.
//!
//! Invariants: usernames are unique (a later line replaces an earlier one
//! when reading; `passwd` rewrites the file without duplicates), no
//! plaintext is ever written, the file is replaced atomically (write to a
//! temporary file in the same directory, fsync, rename) with mode 0600.
//!
//! # Client ids
//!
//! A client may only use a client id equal to its username or starting with
//! `<username>:` (edges use their site id, tools may use `club-042:debug`),
//! or is empty (clean session only; the broker assigns a random id).
//! `:` cannot appear in a username, so no account can take another's
//! session (rumqttd replaces a session on a duplicate client id).

use anyhow::Context;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine as _;
use rand::RngCore;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// PBKDF2 iterations of the Mosquitto hashes we write. `mosquitto_passwd`
/// writes 101, which makes a leaked password file cheap to brute-force; we
/// write 100,000 (Mosquitto reads the count from each hash, so any count
/// verifies).
pub const MOSQUITTO_ITERATIONS: u32 = 100_000;
/// Mosquitto 2.0's `mosquitto_passwd` salt length (password_mosq.c).
pub const MOSQUITTO_SALT_LEN: usize = 12;

/// What an account may do on the broker (and on the ingestor's HTTP
/// endpoint). The topic rules themselves are in `broker::acl`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Role {
    /// A club's box: its own site's topics only; the username is the site id.
    #[default]
    Site,
    /// The centre: every site's impressions and status, publishes receipts.
    Ingestor,
    /// Read-only live debugging: subscribes to anything under the prefix,
    /// publishes nothing.
    Observer,
}

impl Role {
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Site => "site",
            Role::Ingestor => "ingestor",
            Role::Observer => "observer",
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "site" => Ok(Role::Site),
            "ingestor" => Ok(Role::Ingestor),
            "observer" => Ok(Role::Observer),
            other => Err(format!("unknown role '{other}' (site, ingestor or observer)")),
        }
    }

    /// The role of a line that names none: `site`, except for the account
    /// named `ingestor`, which had that role before roles were written.
    pub fn default_for(username: &str) -> Self {
        if username == INGESTOR_USER {
            Role::Ingestor
        } else {
            Role::Site
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The ingestor's conventional account name.
pub const INGESTOR_USER: &str = "ingestor";

/// One account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub username: String,
    /// argon2id PHC string.
    pub argon2: String,
    /// Mosquitto `$7$` hash of the same password, when known.
    pub mosquitto: Option<String>,
    /// What the account may do.
    pub role: Role,
}

/// Why a credentials file or an entry is refused.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("invalid username '{0}': {1}")]
    Username(String, String),
}

/// A parsed credentials file (sorted by username).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credentials {
    entries: BTreeMap<String, Entry>,
}

/// Checks that `u` can be a username (a site id, or `ingestor`).
pub fn validate_username(u: &str) -> Result<(), CredentialsError> {
    schema::validate::site_id(u).map_err(|e| CredentialsError::Username(u.to_owned(), e))
}

/// The client-id rule: `client_id == username`, or `client_id` starts with
/// `username:`, or it is empty (MQTT 3.1.1 allows that only with a clean
/// session, and rumqttd then assigns a random `rumqtt-<uuid>` id; this is
/// what `mosquitto_sub`/`mosquitto_pub` send by default, and a random id can
/// take over no one's session).
pub fn client_id_allowed(username: &str, client_id: &str) -> bool {
    client_id.is_empty()
        || client_id == username
        || client_id
            .strip_prefix(username)
            .is_some_and(|rest| rest.starts_with(':'))
}

impl Credentials {
    pub fn parse(text: &str) -> Result<Self, CredentialsError> {
        let mut entries = BTreeMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |reason: String| CredentialsError::Line { line: i + 1, reason };
            let mut parts = line.split(':');
            let username = parts.next().unwrap_or_default();
            validate_username(username).map_err(|e| err(e.to_string()))?;
            let argon2 = parts
                .next()
                .ok_or_else(|| err("missing password hash (expected username:argon2-hash[:mosquitto-hash])".into()))?;
            PasswordHash::new(argon2).map_err(|e| err(format!("'{username}': invalid argon2 hash: {e}")))?;
            if !argon2.starts_with("$argon2") {
                return Err(err(format!("'{username}': the hash is not an argon2 PHC string")));
            }
            let mosquitto = match parts.next() {
                None | Some("") => None,
                Some(h) => {
                    parse_mosquitto_hash(h).map_err(|e| err(format!("'{username}': {e}")))?;
                    Some(h.to_owned())
                }
            };
            let role = match parts.next() {
                None | Some("") => Role::default_for(username),
                Some(r) => Role::parse(r).map_err(|e| err(format!("'{username}': {e}")))?,
            };
            if parts.next().is_some() {
                return Err(err("too many ':'-separated fields".into()));
            }
            entries.insert(
                username.to_owned(),
                Entry {
                    username: username.to_owned(),
                    argon2: argon2.to_owned(),
                    mosquitto,
                    role,
                },
            );
        }
        Ok(Self { entries })
    }

    /// Reads a file; a missing file is an error (a typo must not silently
    /// lock every client out, nor let anyone in).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading credentials file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("parsing credentials file {}", path.display()))
    }

    /// Reads a file, or an empty set when it does not exist yet (`passwd`
    /// creating the first account).
    pub fn load_or_empty(path: &Path) -> anyhow::Result<Self> {
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            _ => Self::load(path),
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::from(
            "# neopro-broker credentials: username:argon2id-hash:mosquitto-$7$-hash[:role]\n\
             # Managed by `neopro-broker passwd FILE USER [--role ROLE]`; never holds plaintext.\n",
        );
        for e in self.entries.values() {
            let _ = write!(s, "{}:{}", e.username, e.argon2);
            let explicit_role = e.role != Role::default_for(&e.username) || e.role != Role::Site;
            match (&e.mosquitto, explicit_role) {
                (Some(m), false) => {
                    let _ = write!(s, ":{m}");
                }
                (Some(m), true) => {
                    let _ = write!(s, ":{m}:{}", e.role);
                }
                (None, true) => {
                    let _ = write!(s, "::{}", e.role);
                }
                (None, false) => {}
            }
            s.push('\n');
        }
        s
    }

    /// Writes atomically with mode 0600.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // NamedTempFile is created with mode 0600 and renamed over `path`.
        let mut tmp =
            tempfile::NamedTempFile::new_in(dir).with_context(|| format!("creating a file in {}", dir.display()))?;
        {
            use std::io::Write;
            tmp.write_all(self.render().as_bytes())?;
            tmp.as_file().sync_all()?;
        }
        // Keep an existing file's mode and owner (e.g. root:neopro-broker
        // 0640, so the service can still read it after a `passwd`).
        #[cfg(unix)]
        if let Ok(old) = std::fs::metadata(path) {
            use std::os::unix::fs::MetadataExt;
            std::fs::set_permissions(tmp.path(), old.permissions())?;
            if let Err(e) = std::os::unix::fs::chown(tmp.path(), Some(old.uid()), Some(old.gid())) {
                eprintln!(
                    "warning: could not keep the owner of {} ({e}); check that the broker can still read it",
                    path.display()
                );
            }
        }
        tmp.persist(path)
            .with_context(|| format!("replacing {}", path.display()))?;
        Ok(())
    }

    pub fn get(&self, username: &str) -> Option<&Entry> {
        self.entries.get(username)
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds or replaces `username`'s password (both hashes), keeping its
    /// role (a new account gets [`Role::default_for`]). Returns whether the
    /// account existed.
    pub fn set_password(&mut self, username: &str, password: &str) -> anyhow::Result<bool> {
        let role = self
            .entries
            .get(username)
            .map_or_else(|| Role::default_for(username), |e| e.role);
        self.set_password_with_role(username, password, role)
    }

    /// Adds or replaces `username`'s password and sets its role.
    pub fn set_password_with_role(&mut self, username: &str, password: &str, role: Role) -> anyhow::Result<bool> {
        validate_username(username)?;
        anyhow::ensure!(!password.is_empty(), "empty password refused");
        anyhow::ensure!(
            !password.contains(['\n', '\r', '\0']),
            "password must not contain line breaks or NUL"
        );
        let entry = Entry {
            username: username.to_owned(),
            argon2: argon2_hash(password)?,
            mosquitto: Some(mosquitto_hash(password)),
            role,
        };
        Ok(self.entries.insert(username.to_owned(), entry).is_some())
    }

    pub fn remove(&mut self, username: &str) -> bool {
        self.entries.remove(username).is_some()
    }
}

/// argon2id with the crate's default (OWASP) parameters.
pub fn argon2_hash(password: &str) -> anyhow::Result<String> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("argon2: {e}"))?
        .to_string())
}

/// Verifies `password` against an argon2 PHC string (slow on purpose: run it
/// off the async threads).
pub fn argon2_verify(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
        .unwrap_or(false)
}

/// Mosquitto 2.0's `$7$` hash with a fresh 12-byte salt and
/// [`MOSQUITTO_ITERATIONS`] iterations.
pub fn mosquitto_hash(password: &str) -> String {
    let mut salt = [0u8; MOSQUITTO_SALT_LEN];
    rand::rng().fill_bytes(&mut salt);
    mosquitto_hash_with(password, &salt, MOSQUITTO_ITERATIONS)
}

/// `$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512(password, salt, 64 bytes)>`
/// (standard base64 with padding, as OpenSSL's BIO writes it).
pub fn mosquitto_hash_with(password: &str, salt: &[u8], iterations: u32) -> String {
    let mut out = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password.as_bytes(), salt, iterations, &mut out);
    let b64 = base64::engine::general_purpose::STANDARD;
    format!("$7${iterations}${}${}", b64.encode(salt), b64.encode(out))
}

/// Splits a `$7$` hash into (iterations, salt, hash).
pub fn parse_mosquitto_hash(h: &str) -> Result<(u32, Vec<u8>, Vec<u8>), String> {
    let rest = h
        .strip_prefix("$7$")
        .ok_or_else(|| "Mosquitto hash must start with $7$".to_owned())?;
    let mut p = rest.split('$');
    let (Some(it), Some(salt), Some(hash), None) = (p.next(), p.next(), p.next(), p.next()) else {
        return Err("Mosquitto hash must be $7$iterations$salt$hash".into());
    };
    let it: u32 = it.parse().map_err(|_| format!("bad iteration count '{it}'"))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let salt = b64.decode(salt).map_err(|e| format!("bad salt: {e}"))?;
    let hash = b64.decode(hash).map_err(|e| format!("bad hash: {e}"))?;
    if hash.len() != 64 {
        return Err(format!("hash is {} bytes, expected 64 (SHA-512)", hash.len()));
    }
    Ok((it, salt, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_rule() {
        assert!(client_id_allowed("club-1", "club-1"));
        assert!(client_id_allowed("club-1", "club-1:debug"));
        assert!(!client_id_allowed("club-1", "club-10"));
        assert!(!client_id_allowed("club-1", "club-2"));
        assert!(client_id_allowed("club-1", ""), "broker-assigned random id");
        assert!(!client_id_allowed("club", "club-1"));
    }

    #[test]
    fn roundtrip_and_verify() {
        let mut c = Credentials::default();
        assert!(!c.set_password("club-1", "pw-one").unwrap());
        assert!(!c.set_password("ingestor", "pw-ing").unwrap());
        assert!(c.set_password("club-1", "pw-one-b").unwrap());
        assert!(c.set_password("a:b", "x").is_err());
        assert!(c.set_password("a/b", "x").is_err());
        let text = c.render();
        assert!(!text.contains("pw-one"));
        let back = Credentials::parse(&text).unwrap();
        assert_eq!(back, c);
        let e = back.get("club-1").unwrap();
        assert!(argon2_verify(&e.argon2, "pw-one-b"));
        assert!(!argon2_verify(&e.argon2, "pw-one"));
        let (it, salt, hash) = parse_mosquitto_hash(e.mosquitto.as_deref().unwrap()).unwrap();
        assert_eq!((it, salt.len()), (MOSQUITTO_ITERATIONS, MOSQUITTO_SALT_LEN));
        assert_eq!(
            mosquitto_hash_with("pw-one-b", &salt, it),
            *e.mosquitto.as_ref().unwrap()
        );
        assert_ne!(mosquitto_hash_with("pw-one", &salt, it).as_bytes()[..], hash[..]);
    }

    #[test]
    fn roles_default_to_site_and_round_trip() {
        let h = argon2_hash("pw").unwrap();
        let text = format!("club-1:{h}\ningestor:{h}\nops:{h}::observer\ncentre-2:{h}::ingestor\nclub-2:{h}::site\n");
        let c = Credentials::parse(&text).unwrap();
        let role = |u: &str| c.get(u).unwrap().role;
        assert_eq!(role("club-1"), Role::Site, "a line without a role is a site");
        assert_eq!(role("ingestor"), Role::Ingestor, "the ingestor account keeps its role");
        assert_eq!(role("ops"), Role::Observer);
        assert_eq!(role("centre-2"), Role::Ingestor);
        assert_eq!(role("club-2"), Role::Site);
        assert_eq!(Credentials::parse(&c.render()).unwrap(), c);
        assert!(Credentials::parse(&format!("x:{h}::admin")).is_err());
        let mut c = c;
        c.set_password("ops", "new").unwrap();
        assert_eq!(
            c.get("ops").unwrap().role,
            Role::Observer,
            "a password change keeps the role"
        );
        c.set_password_with_role("club-1", "pw", Role::Observer).unwrap();
        assert_eq!(
            Credentials::parse(&c.render()).unwrap().get("club-1").unwrap().role,
            Role::Observer
        );
    }

    #[test]
    fn refuses_bad_lines() {
        for bad in [
            "club-1",
            "club-1:plaintext",
            "a/b:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA",
        ] {
            let e = Credentials::parse(bad).unwrap_err();
            assert!(e.to_string().starts_with("line 1"), "{e}");
        }
        assert!(Credentials::parse("# only a comment\n\n").unwrap().is_empty());
    }

    #[test]
    fn save_is_private_and_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("creds");
        let mut c = Credentials::load_or_empty(&f).unwrap();
        c.set_password("club-1", "pw").unwrap();
        c.save(&f).unwrap();
        assert_eq!(Credentials::load(&f).unwrap(), c);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
            c.set_password("club-2", "pw2").unwrap();
            c.save(&f).unwrap();
            assert_eq!(
                std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
                0o640,
                "an operator's mode is kept"
            );
        }
    }
}

//! Configuration: defaults < config file < environment < command-line flags.
//!
//! Each binary declares a `Settings` struct (serde, with defaults) and a clap
//! `Cli`. Flags that have an environment name (`--database-url` /
//! `DATABASE_URL`) are read by clap (`#[arg(long, env = "...")]`) so `--help`
//! documents both, then applied as overrides here. Every other key can come
//! from the file or from `PREFIX__KEY` environment variables (e.g.
//! `NEOPRO_INGESTOR__BATCH_MAX_MESSAGES=500`).

use anyhow::Context;
use serde::de::DeserializeOwned;
use std::path::Path;

/// Loads `T` from an optional TOML file, `{env_prefix}__*` variables and the
/// given overrides (`None` values are skipped).
///
/// A file named explicitly must exist; `default_file` (e.g.
/// `/etc/neopro/edge.toml`) is read only when present.
pub fn load<T: DeserializeOwned>(
    file: Option<&Path>,
    default_file: Option<&Path>,
    env_prefix: &str,
    overrides: &[(&str, Option<String>)],
) -> anyhow::Result<T> {
    let mut b = config::Config::builder();
    match (file, default_file) {
        (Some(f), _) => {
            b = b.add_source(config::File::from(f).format(config::FileFormat::Toml).required(true));
        }
        (None, Some(f)) => {
            b = b.add_source(config::File::from(f).format(config::FileFormat::Toml).required(false));
        }
        (None, None) => {}
    }
    b = b.add_source(
        config::Environment::with_prefix(env_prefix)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("api_tokens"),
    );
    for (key, value) in overrides {
        if let Some(v) = value {
            b = b
                .set_override(*key, v.as_str())
                .with_context(|| format!("setting {key}"))?;
        }
    }
    let cfg = b.build().context("reading configuration")?;
    cfg.try_deserialize().context("invalid configuration")
}

/// Formats a secret for logs: whether it is set, never its value.
pub fn redact(secret: &Option<String>) -> &'static str {
    if secret.as_deref().is_some_and(|s| !s.is_empty()) {
        "<set>"
    } else {
        "<unset>"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct S {
        #[serde(default = "d")]
        a: String,
        #[serde(default)]
        n: u32,
        #[serde(default)]
        b: Option<String>,
    }
    fn d() -> String {
        "default".into()
    }

    #[test]
    fn precedence_file_then_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "a = \"file\"\nn = 3\n").unwrap();
        let s: S = load(Some(&f), None, "NEOPRO_TEST_SETTINGS_X", &[]).unwrap();
        assert_eq!((s.a.as_str(), s.n), ("file", 3));
        let s: S = load(
            Some(&f),
            None,
            "NEOPRO_TEST_SETTINGS_X",
            &[("a", Some("flag".into())), ("b", None)],
        )
        .unwrap();
        assert_eq!((s.a.as_str(), s.b), ("flag", None));
        let s: S = load(
            None,
            Some(&dir.path().join("missing.toml")),
            "NEOPRO_TEST_SETTINGS_X",
            &[],
        )
        .unwrap();
        assert_eq!(s.a, "default");
        assert!(load::<S>(
            Some(&dir.path().join("missing.toml")),
            None,
            "NEOPRO_TEST_SETTINGS_X",
            &[]
        )
        .is_err());
    }
}

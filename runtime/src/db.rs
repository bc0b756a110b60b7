//! PostgreSQL: connection pool, database creation, the embedded migrations,
//! and the classification of errors into transient (retry) and permanent
//! (dead-letter, don't loop).

use anyhow::Context;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};
use std::str::FromStr;
use std::time::Duration;

/// The schema crate's migrations, embedded at compile time.
pub static MIGRATOR: Migrator = sqlx::migrate!("../schema/migrations");

/// Default database for a fresh machine of our kind (trust auth, user postgres).
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/neopro";

/// `name` as a PostgreSQL identifier (double-quoted, inner quotes doubled),
/// so any database name is one name in a statement.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A connection to the `postgres` maintenance database of the server of
/// `opts` (DROP and CREATE DATABASE cannot run inside the database itself).
async fn connect_maintenance(opts: &PgConnectOptions) -> anyhow::Result<sqlx::PgConnection> {
    opts.clone()
        .database("postgres")
        // DROP … WITH (FORCE) waits for the terminated sessions: not "slow".
        .log_slow_statements(tracing::log::LevelFilter::Debug, Duration::from_secs(30))
        .connect()
        .await
        .context("connecting to the postgres database")
}

/// Creates the database named in `url` if it does not exist (connecting to the
/// `postgres` maintenance database of the same server).
pub async fn create_database_if_missing(url: &str) -> anyhow::Result<()> {
    let opts = PgConnectOptions::from_str(url).context("invalid database URL")?;
    let name = opts.get_database().unwrap_or("postgres").to_owned();
    let mut admin = connect_maintenance(&opts).await?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&mut admin)
        .await?;
    if !exists {
        let q = format!("CREATE DATABASE {}", quote_ident(&name));
        match sqlx::query(&q).execute(&mut admin).await {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Lost a race with another creator: fine.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e).context("creating database"),
        }
    }
    admin.close().await.ok();
    Ok(())
}

/// Drops the database named in `url` if it exists, terminating its sessions
/// first (`WITH (FORCE)`): the throw-away databases of benchmarks, demos and
/// tests, whose counts must start from nothing. Refuses the server's own
/// databases (`postgres`, `template0`, `template1`) and a URL naming none.
pub async fn drop_database(url: &str) -> anyhow::Result<()> {
    let opts = PgConnectOptions::from_str(url).context("invalid database URL")?;
    let name = opts
        .get_database()
        .context("the database URL names no database")?
        .to_owned();
    anyhow::ensure!(
        !matches!(name.as_str(), "postgres" | "template0" | "template1"),
        "refusing to drop the maintenance database '{name}'"
    );
    let mut admin = connect_maintenance(&opts).await?;
    let q = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(&name));
    sqlx::query(&q)
        .execute(&mut admin)
        .await
        .with_context(|| format!("dropping database {name}"))?;
    admin.close().await.ok();
    Ok(())
}

/// Drops (see [`drop_database`]) and creates again the database named in
/// `url`, empty: no migrations applied.
pub async fn recreate_database(url: &str) -> anyhow::Result<()> {
    drop_database(url).await?;
    create_database_if_missing(url).await
}

/// A pool with sane timeouts: acquiring never hangs forever, and broken
/// connections are tested before use so a PostgreSQL restart heals itself.
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let opts = PgConnectOptions::from_str(url)
        .context("invalid database URL")?
        .application_name("neopro")
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(5));
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(true)
        .connect_with(opts)
        .await
        .context("connecting to PostgreSQL")
}

/// A pool that does not connect until first used (a service can start while
/// PostgreSQL is down and become ready when it comes up).
pub fn connect_lazy(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let opts = PgConnectOptions::from_str(url)
        .context("invalid database URL")?
        .application_name("neopro");
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(true)
        .connect_lazy_with(opts))
}

/// Applies pending migrations.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("applying migrations")
}

/// Whether an error may go away by itself (retry with backoff) or will
/// recur every time for the same input (dead-letter it, don't loop).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    Transient,
    Permanent,
}

/// Classifies a sqlx error. Connection loss, admin shutdown (57P01, which
/// Vector took as permanent and lost 3,000 rows on), serialization failures,
/// deadlocks, resource exhaustion and pool timeouts are transient. Data errors
/// (22xxx), integrity violations other than the ones we absorb (23xxx) and
/// syntax/undefined-object errors (42xxx) are permanent for that input.
pub fn classify(e: &sqlx::Error) -> ErrorClass {
    match e {
        sqlx::Error::Database(db) => classify_sqlstate(db.code().as_deref().unwrap_or("")),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => ErrorClass::Transient,
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::TypeNotFound { .. } => {
            ErrorClass::Permanent
        }
        _ => ErrorClass::Transient,
    }
}

/// Classifies a PostgreSQL SQLSTATE code.
pub fn classify_sqlstate(code: &str) -> ErrorClass {
    match code.get(..2).unwrap_or("") {
        // connection exception, insufficient resources, operator intervention
        // (admin shutdown, crash shutdown, cannot connect now), system error,
        // transaction rollback (serialization failure, deadlock).
        "08" | "53" | "57" | "58" | "40" => ErrorClass::Transient,
        // Lock not available / object in use (e.g. a partition being attached).
        "55" => ErrorClass::Transient,
        // Data exception, integrity violation, syntax/access rule.
        "22" | "23" | "42" => ErrorClass::Permanent,
        // XX000 internal error and anything unknown: retry rather than lose.
        _ => ErrorClass::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates() {
        assert_eq!(
            classify_sqlstate("57P01"),
            ErrorClass::Transient,
            "admin shutdown must be retried"
        );
        assert_eq!(classify_sqlstate("08006"), ErrorClass::Transient);
        assert_eq!(classify_sqlstate("40P01"), ErrorClass::Transient);
        assert_eq!(classify_sqlstate("22P02"), ErrorClass::Permanent);
        assert_eq!(classify_sqlstate("23514"), ErrorClass::Permanent);
        assert_eq!(classify_sqlstate("XX000"), ErrorClass::Transient);
    }

    fn server() -> String {
        std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
    }

    fn named(name: &str) -> String {
        let mut u = url::Url::parse(&server()).expect("DATABASE_URL");
        u.set_path(&format!("/{name}"));
        u.to_string()
    }

    async fn exists(name: &str) -> bool {
        let opts = PgConnectOptions::from_str(&server()).expect("DATABASE_URL");
        let mut admin = connect_maintenance(&opts).await.expect("PostgreSQL is running");
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut admin)
            .await
            .expect("pg_database")
    }

    /// A re-created database is empty even while a session holds it open,
    /// and a name that needs quoting is one name.
    #[tokio::test]
    async fn recreate_empties_a_database_in_use_and_drop_removes_it() {
        let name = format!("neopro_db_test_{}\"x", std::process::id());
        let url = named(&name);
        recreate_database(&url).await.expect("first creation");
        let mut held = PgConnectOptions::from_str(&url).unwrap().connect().await.unwrap();
        sqlx::query("CREATE TABLE left_over (x int)")
            .execute(&mut held)
            .await
            .unwrap();

        recreate_database(&url).await.expect("re-creation with a session open");
        let pool = connect(&url, 1).await.unwrap();
        let left: Option<String> = sqlx::query_scalar("SELECT to_regclass('left_over')::text")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(left, None, "the re-created database is empty");
        pool.close().await;

        drop_database(&url).await.expect("drop");
        assert!(!exists(&name).await, "{name} dropped");
        drop_database(&url).await.expect("dropping a missing database is fine");
    }

    #[tokio::test]
    async fn drop_refuses_the_servers_own_databases() {
        for name in ["postgres", "template0", "template1"] {
            let e = drop_database(&named(name)).await.expect_err(name);
            assert!(e.to_string().contains("refusing"), "{name}: {e}");
            assert!(exists(name).await, "{name} still there");
        }
    }
}

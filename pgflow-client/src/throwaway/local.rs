//! Where an example or a test connects: `DATABASE_URL`, or else a throwaway server.

use std::fmt;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::{ThrowawayServer, shared_server};
use crate::Result;

/// `DATABASE_URL`, when it is set and not blank: the server the user chose over a throwaway one.
///
/// ```
/// let chosen = pgflow_client::throwaway::database_url_from_env();
/// println!("{}", chosen.as_deref().unwrap_or("no DATABASE_URL: a throwaway server"));
/// ```
pub fn database_url_from_env() -> Option<String> {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|url| !url.trim().is_empty())
}

/// Where to connect: `DATABASE_URL` when set, else a database on the shared throwaway server.
///
/// Returns the URL of an administrative database (one in which `CREATE DATABASE` may be run).
///
/// # Errors
///
/// Without `DATABASE_URL`, as [`shared_server`].
pub fn database_url() -> Result<String> {
    match database_url_from_env() {
        Some(url) => Ok(url),
        None => Ok(shared_server()?.url("postgres")),
    }
}

/// A database for an example or a local run: the one `DATABASE_URL` names, or else the
/// `postgres` database of a throwaway server that lives as long as this value.
///
/// ```no_run
/// # async fn demo() -> pgflow_client::Result<()> {
/// let db = pgflow_client::throwaway::LocalDatabase::connect().await?;
/// let client = pgflow_client::Client::new(db.pool().clone());
/// client.install().await?;
/// // ...
/// db.close().await; // closes the pool, then stops the throwaway server if there is one
/// # Ok(()) }
/// ```
pub struct LocalDatabase {
    pool: PgPool,
    url: String,
    server: Option<ThrowawayServer>,
}

impl fmt::Debug for LocalDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalDatabase")
            .field("url", &self.url)
            .field("throwaway", &self.server.is_some())
            .finish_non_exhaustive()
    }
}

impl LocalDatabase {
    /// Connects to `DATABASE_URL`, or starts a throwaway server when it is not set.
    ///
    /// # Errors
    ///
    /// [`Error::Throwaway`](crate::Error::Throwaway) when the throwaway server does not start
    /// (as [`ThrowawayServer::start`]), [`Error::Database`](crate::Error::Database) when the
    /// database cannot be connected to.
    pub async fn connect() -> Result<Self> {
        let (url, server) = match database_url_from_env() {
            Some(url) => (url, None),
            None => {
                let server = ThrowawayServer::start()?;
                tracing::info!(
                    port = server.port(),
                    "started a throwaway PostgreSQL (DATABASE_URL is not set)"
                );
                (server.url("postgres"), Some(server))
            }
        };
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect(&url)
            .await?;
        Ok(Self { pool, url, server })
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The connection URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Closes the pool, then stops the throwaway server if one was started.
    pub async fn close(self) {
        self.pool.close().await;
        // `close` returns once no connection is idle or waited for, which can be before one
        // that is being handed back (and pinged on the way) is closed: stopping the server
        // under it makes sqlx warn of a terminated connection. Wait for the last one.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.pool.size() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(self.server);
    }
}

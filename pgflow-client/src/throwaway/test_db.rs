//! Fresh test databases, cloned from a template that already holds pgmq and the engine schema.

use std::fmt;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use super::database_url;
use crate::Result;

/// A fresh database with pgmq and the engine schema installed, for one test.
///
/// Each one is a clone of a template database that is built once per server and schema version,
/// so creating one costs a file copy, and tests running in parallel never see each other's data.
/// It is dropped when the value drops, unless the thread is panicking: a failed test leaves its
/// database behind for inspection (on a throwaway server it disappears with the server anyway).
pub struct TestDatabase {
    name: String,
    url: String,
    admin_url: String,
    pool: PgPool,
}

impl fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDatabase")
            .field("name", &self.name)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl TestDatabase {
    /// Creates a fresh database holding pgmq and the pgflow schema, on the server `DATABASE_URL`
    /// names or else on the shared throwaway server ([`shared_server`](super::shared_server)).
    ///
    /// # Errors
    ///
    /// [`Error::Throwaway`](crate::Error::Throwaway) when no `DATABASE_URL` is set and the
    /// throwaway server does not start; [`Error::Database`](crate::Error::Database) when the
    /// database cannot be created or connected to; the errors of [`install`](crate::install)
    /// when the template's schema cannot be installed.
    pub async fn new() -> Result<Self> {
        Self::create_default(true).await
    }

    /// Creates a fresh, empty database (no pgmq, no schema), for testing installation itself.
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new), save for installation.
    pub async fn empty() -> Result<Self> {
        Self::create_default(false).await
    }

    /// Like [`new`](Self::new), on the server that `admin_url` connects to: the URL of a
    /// database in which `CREATE DATABASE` may be run.
    ///
    /// ```no_run
    /// # async fn demo() -> pgflow_client::Result<()> {
    /// use pgflow_client::throwaway::{TestDatabase, ThrowawayServer};
    ///
    /// let server = ThrowawayServer::start_durable()?;
    /// let db = TestDatabase::new_in(&server.url("postgres")).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) when `admin_url` is not a valid URL or the
    /// database cannot be created or connected to; the errors of [`install`](crate::install)
    /// when the template's schema cannot be installed.
    pub async fn new_in(admin_url: &str) -> Result<Self> {
        Self::create(admin_url.to_owned(), true).await
    }

    /// Like [`empty`](Self::empty), on the server that `admin_url` connects to: for a database
    /// that gets another engine ([`UpstreamSchema::apply`](super::UpstreamSchema::apply),
    /// [`apply_migrations_up_to`](super::apply_migrations_up_to)).
    ///
    /// # Errors
    ///
    /// As [`new_in`](Self::new_in), save for installation.
    pub async fn empty_in(admin_url: &str) -> Result<Self> {
        Self::create(admin_url.to_owned(), false).await
    }

    async fn create_default(with_schema: bool) -> Result<Self> {
        Self::create(database_url()?, with_schema).await
    }

    async fn create(admin_url: String, with_schema: bool) -> Result<Self> {
        let name = format!("pgflow_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url).await?;
        if with_schema {
            let template = template_database(&admin_url).await?;
            let strategy = if server_version(&mut admin).await? >= 150_000 {
                // FILE_COPY skips WAL-logging every page of the copy: much faster for a test.
                " STRATEGY = FILE_COPY"
            } else {
                ""
            };
            sqlx::query(&format!(
                "CREATE DATABASE {} TEMPLATE {}{strategy}",
                quote_ident(&name),
                quote_ident(&template)
            ))
            .execute(&mut admin)
            .await?;
        } else {
            sqlx::query(&format!("CREATE DATABASE {}", quote_ident(&name)))
                .execute(&mut admin)
                .await?;
        }
        admin.close().await?;
        let url = replace_database(&admin_url, &name)?;
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect(&url)
            .await?;
        Ok(Self {
            name,
            url,
            admin_url,
            pool,
        })
    }

    /// A pool connected to this database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The connection URL of this database, for other processes (CLI, workers) and tools.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("pgflow: keeping test database {} for inspection", self.url);
            return;
        }
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop cannot await, and the test's runtime may be shutting down: use a runtime of our
        // own on a plain thread. The pool is not closed from there (its connections belong to
        // the blocked runtime); FORCE ends them.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                let mut admin = PgConnection::connect(&admin_url).await.ok()?;
                sqlx::query(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    quote_ident(&name)
                ))
                .execute(&mut admin)
                .await
                .ok()?;
                admin.close().await.ok()
            })
        });
        let _ = dropped.join();
    }
}

/// Builds (once per server, schema version and process) the template every test database clones.
async fn template_database(admin_url: &str) -> Result<String> {
    static TEMPLATES: tokio::sync::Mutex<Vec<(String, String)>> =
        tokio::sync::Mutex::const_new(Vec::new());
    let mut known = TEMPLATES.lock().await;
    if let Some((_, name)) = known.iter().find(|(url, _)| url == admin_url) {
        return Ok(name.clone());
    }
    let fingerprint = pgflow_core::schema::fingerprint();
    let name = format!("pgflow_template_{}", &fingerprint[..12]);

    let mut admin = PgConnection::connect(admin_url).await?;
    // Other processes (test binaries sharing one DATABASE_URL) may build the same template.
    sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
        .bind(&name)
        .execute(&mut admin)
        .await?;
    let result = build_template(&mut admin, admin_url, &name).await;
    sqlx::query("SELECT pg_advisory_unlock(hashtext($1))")
        .bind(&name)
        .execute(&mut admin)
        .await?;
    admin.close().await?;
    result?;
    known.push((admin_url.to_string(), name.clone()));
    Ok(name)
}

async fn build_template(admin: &mut PgConnection, admin_url: &str, name: &str) -> Result<()> {
    let ready: Option<bool> =
        sqlx::query_scalar("SELECT datistemplate FROM pg_database WHERE datname = $1")
            .bind(name)
            .fetch_optional(&mut *admin)
            .await?;
    match ready {
        Some(true) => return Ok(()),
        // A build that died half-way: start over.
        Some(false) => {
            sqlx::query(&format!("DROP DATABASE {} WITH (FORCE)", quote_ident(name)))
                .execute(&mut *admin)
                .await?;
        }
        None => {}
    }
    sqlx::query(&format!("CREATE DATABASE {}", quote_ident(name)))
        .execute(&mut *admin)
        .await?;
    let url = replace_database(admin_url, name)?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await?;
    crate::install::install(&pool).await?;
    pool.close().await;
    sqlx::query(&format!(
        "ALTER DATABASE {} WITH IS_TEMPLATE true",
        quote_ident(name)
    ))
    .execute(&mut *admin)
    .await?;
    Ok(())
}

async fn server_version(conn: &mut PgConnection) -> Result<i32> {
    let text: String = sqlx::query_scalar("SHOW server_version_num")
        .fetch_one(conn)
        .await?;
    Ok(text.trim().parse().unwrap_or(0))
}

/// The same URL with another database name, keeping host, credentials and parameters.
fn replace_database(url: &str, database: &str) -> Result<String> {
    let options: PgConnectOptions = url.parse()?;
    let current = options.get_database().unwrap_or_default().to_string();
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let base = match base.rsplit_once('/') {
        // `scheme://host/db`: the last segment is the database unless it is the authority.
        Some((head, tail)) if !head.ends_with('/') && (tail == current || current.is_empty()) => {
            format!("{head}/{database}")
        }
        _ => format!("{}/{database}", base.trim_end_matches('/')),
    };
    Ok(match query {
        Some(query) => format!("{base}?{query}"),
        None => base,
    })
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(
            replace_database("postgres://u:p@h:5432/postgres", "t1").unwrap(),
            "postgres://u:p@h:5432/t1"
        );
        assert_eq!(
            replace_database("postgres://u@h/postgres?sslmode=disable", "t1").unwrap(),
            "postgres://u@h/t1?sslmode=disable"
        );
        assert_eq!(
            replace_database("postgres://u@h:5432", "t1").unwrap(),
            "postgres://u@h:5432/t1"
        );
    }

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
    }
}

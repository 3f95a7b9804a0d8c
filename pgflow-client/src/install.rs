//! Installing pgmq and the engine schema into a database.

use pgflow_core::schema::{BOOKKEEPING_SQL, BOOKKEEPING_TABLE, MIGRATIONS, SCHEMA_VERSION};
use sqlx::{Connection, PgPool};

use crate::{Error, Result};

/// The key of the session advisory lock that serialises installs on one database.
const INSTALL_LOCK: i64 = 0x7067_666c_6f77; // "pgflow"

/// What [`install`] did.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> pgflow_client::Result<()> {
/// let report = pgflow_client::install(&pool).await?;
/// println!(
///     "pgmq: {}; applied {:?}; schema version {}",
///     report.pgmq, report.applied, report.schema_version
/// );
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InstallReport {
    /// How pgmq is present: `"extension"`, `"sql"` (the SQL-only install), or `"existing"`.
    pub pgmq: &'static str,
    /// The versions of the engine schema applied by this call (empty when already up to date).
    pub applied: Vec<i32>,
    /// The schema version now installed.
    pub schema_version: i32,
}

/// Installs pgmq (when absent) and the engine schema (missing migrations), idempotently.
///
/// pgmq comes from `CREATE EXTENSION pgmq` where the server offers the extension, else from the
/// SQL-only installation embedded in the `pgmq` crate. Concurrent installs on one database wait
/// for each other.
///
/// Safe to call at every start-up of every process: a database that is up to date is left alone.
///
/// ```no_run
/// # async fn demo() -> pgflow_client::Result<()> {
/// let pool = sqlx::PgPool::connect("postgres://admin@localhost/app").await?;
/// pgflow_client::install(&pool).await?;
/// # Ok(()) }
/// ```
pub async fn install(pool: &PgPool) -> Result<InstallReport> {
    let mut lock = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(INSTALL_LOCK)
        .execute(&mut *lock)
        .await?;
    let result = install_locked(pool).await;
    // The lock is per session; a pooled connection outlives this call, so release it.
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(INSTALL_LOCK)
        .execute(&mut *lock)
        .await?;
    result
}

async fn install_locked(pool: &PgPool) -> Result<InstallReport> {
    let pgmq = install_pgmq(pool).await?;
    let applied = install_schema(pool).await?;
    Ok(InstallReport {
        pgmq,
        applied,
        schema_version: SCHEMA_VERSION,
    })
}

/// Makes sure schema `pgmq` holds pgmq, choosing the extension where it is available.
///
/// Returns how pgmq is present, as [`InstallReport::pgmq`] does; useful where only the queues are
/// wanted, without the engine.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> pgflow_client::Result<()> {
/// let how = pgflow_client::install_pgmq(&pool).await?;
/// assert!(["extension", "sql", "existing"].contains(&how));
/// # Ok(()) }
/// ```
pub async fn install_pgmq(pool: &PgPool) -> Result<&'static str> {
    let present: bool = sqlx::query_scalar(
        "SELECT to_regprocedure('pgmq.read_with_poll(text,integer,integer,integer,integer,jsonb)') IS NOT NULL",
    )
    .fetch_one(pool)
    .await?;
    if present {
        return Ok("existing");
    }
    let available: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq')",
    )
    .fetch_one(pool)
    .await?;
    if available {
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pgmq")
            .execute(pool)
            .await?;
        tracing::info!("installed pgmq as an extension");
        return Ok("extension");
    }
    pgmq::install::install_sql_from_embedded(pool)
        .await
        .map_err(Error::Pgmq)?;
    tracing::info!("installed pgmq from its embedded SQL");
    Ok("sql")
}

/// Applies the engine migrations this database lacks, each in its own transaction.
async fn install_schema(pool: &PgPool) -> Result<Vec<i32>> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    let has_pgflow: bool = sqlx::query_scalar("SELECT to_regnamespace('pgflow') IS NOT NULL")
        .fetch_one(&mut *tx)
        .await?;
    sqlx::raw_sql(BOOKKEEPING_SQL).execute(&mut *tx).await?;
    let recorded: Vec<(i32, String, String)> = sqlx::query_as(&format!(
        "SELECT version, name, checksum FROM {BOOKKEEPING_TABLE} ORDER BY version"
    ))
    .fetch_all(&mut *tx)
    .await?;
    if has_pgflow && recorded.is_empty() {
        return Err(Error::ForeignSchema);
    }
    if !has_pgflow && !recorded.is_empty() {
        return Err(Error::SchemaMissing {
            recorded: recorded.iter().map(|(version, _, _)| *version).collect(),
        });
    }
    if let Some((found, _, _)) = recorded.last()
        && *found > SCHEMA_VERSION
    {
        return Err(Error::SchemaTooNew {
            found: *found,
            known: SCHEMA_VERSION,
        });
    }
    for (version, name, checksum) in &recorded {
        if let Some(ours) = MIGRATIONS.iter().find(|m| m.version == *version)
            && ours.checksum() != *checksum
        {
            return Err(Error::MigrationChanged {
                version: *version,
                name: name.clone(),
                applied: checksum.clone(),
                expected: ours.checksum(),
            });
        }
    }
    let mut applied = Vec::new();
    for migration in MIGRATIONS {
        if recorded
            .iter()
            .any(|(version, _, _)| *version == migration.version)
        {
            continue;
        }
        sqlx::raw_sql(migration.sql).execute(&mut *tx).await?;
        sqlx::query(&format!(
            "INSERT INTO {BOOKKEEPING_TABLE} (version, name, checksum) VALUES ($1, $2, $3)"
        ))
        .bind(migration.version)
        .bind(migration.name)
        .bind(migration.checksum())
        .execute(&mut *tx)
        .await?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applied pgflow migration"
        );
        applied.push(migration.version);
    }
    tx.commit().await?;
    Ok(applied)
}

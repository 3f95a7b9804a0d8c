//! Databases holding an engine other than this build's: upstream pgflow 0.8.1's, from its own
//! npm package, or this engine as an earlier migration left it. Tests compare behaviour against
//! them and the benchmark compares speed, side by side on one server.

use std::path::{Path, PathBuf};
use std::process::Command;

use sqlx::PgPool;

use super::{ThrowawayError, ThrowawayErrorKind};
use crate::{Result, install_pgmq};

/// The npm package whose SQL migrations are upstream's engine.
pub const UPSTREAM_PACKAGE: &str = "@pgflow/core@0.8.1";
const TARBALL: &str = "pgflow-core-0.8.1.tgz";
const UNPACKED: &str = "pgflow-core-0.8.1";

/// Upstream pgflow 0.8.1's SQL migrations, fetched with `npm pack` from the npm registry (they
/// are upstream's, not this project's to ship) into a cache directory, once.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> pgflow_client::Result<()> {
/// use pgflow_client::throwaway::UpstreamSchema;
///
/// let upstream = UpstreamSchema::fetch(std::path::Path::new("target/upstream"))?;
/// upstream.apply(&pool).await?; // pool: an empty database
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct UpstreamSchema {
    migrations: Vec<(String, String)>,
}

impl UpstreamSchema {
    /// Reads the migrations from `cache_dir`, fetching and unpacking the package there first
    /// when it is not there yet. The unpacked package appears whole or not at all, so an
    /// interrupted fetch, or another process fetching at the same time, leaves no partial copy.
    /// Blocking: it runs `npm` and `tar`.
    ///
    /// # Errors
    ///
    /// [`Error::Throwaway`](crate::Error::Throwaway) of kind [`ThrowawayErrorKind::Upstream`]
    /// when `npm` cannot run or fails (no Node.js, no registry), the package cannot be
    /// unpacked, or it holds no migrations.
    pub fn fetch(cache_dir: &Path) -> Result<Self> {
        let package = cache_dir.join(UNPACKED);
        let dir = package.join("package/dist/supabase/migrations");
        if !dir.is_dir() {
            fetch_package(cache_dir, &package)?;
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|err| upstream_io(format!("cannot list {}", dir.display()), err))?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "sql"))
            .collect();
        // Upstream names them by timestamp: name order is the order to apply them in.
        files.sort();
        if files.is_empty() {
            return Err(upstream(format!(
                "{UPSTREAM_PACKAGE} holds no SQL migrations in {}",
                dir.display()
            )));
        }
        let migrations = files
            .into_iter()
            .map(|path| {
                let name = path
                    .file_name()
                    .map(|name| name.to_string_lossy().into_owned())
                    .unwrap_or_default();
                std::fs::read_to_string(&path)
                    .map(|sql| (name, sql))
                    .map_err(|err| upstream_io(format!("cannot read {}", path.display()), err))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { migrations })
    }

    /// The migrations, oldest first: (file name, SQL).
    pub fn migrations(&self) -> &[(String, String)] {
        &self.migrations
    }

    /// Installs pgmq and upstream's schema into `pool`'s database, which must hold neither, the
    /// way `supabase db push` applies the migrations: nothing of this engine is installed.
    ///
    /// Upstream targets Supabase. Its broadcasting functions written in SQL are checked when
    /// created, so `realtime.send` must exist: a stand-in that drops the broadcast is created
    /// when the database has none. And it creates pgmq as an extension, which a server without
    /// the extension's files cannot do: pgmq's SQL install stands in for it then.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) when a migration fails.
    pub async fn apply(&self, pool: &PgPool) -> Result<()> {
        let pgmq = install_pgmq(pool).await?;
        sqlx::raw_sql(
            "DO $$ BEGIN
               IF to_regnamespace('realtime') IS NULL THEN
                 CREATE SCHEMA realtime;
                 CREATE FUNCTION realtime.send(payload jsonb, event text, topic text,
                                               private boolean DEFAULT true)
                 RETURNS void LANGUAGE sql AS '';
               END IF;
             END $$;",
        )
        .execute(pool)
        .await?;
        for (_, sql) in &self.migrations {
            let sql = if pgmq == "extension" {
                sql.clone()
            } else {
                sql.replace(
                    "CREATE EXTENSION IF NOT EXISTS \"pgmq\" WITH SCHEMA \"pgmq\";",
                    "",
                )
            };
            sqlx::raw_sql(&sql).execute(pool).await?;
        }
        Ok(())
    }
}

/// Installs pgmq and this engine's migrations up to `version` (and none after) into `pool`'s
/// empty database, without the install bookkeeping: the engine as that migration left it, for
/// before/after comparisons. [`Client::install`](crate::Client::install) would refuse to run
/// on top of it (it is not recorded as ours).
///
/// # Errors
///
/// [`Error::Database`](crate::Error::Database) when a migration fails.
pub async fn apply_migrations_up_to(pool: &PgPool, version: i32) -> Result<()> {
    install_pgmq(pool).await?;
    for migration in pgflow_core::schema::MIGRATIONS
        .iter()
        .filter(|m| m.version <= version)
    {
        let mut tx = pool.begin().await?;
        sqlx::raw_sql(migration.sql).execute(&mut *tx).await?;
        tx.commit().await?;
    }
    Ok(())
}

fn fetch_package(cache_dir: &Path, package: &Path) -> Result<()> {
    let staging = cache_dir.join(format!("{UNPACKED}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)
        .map_err(|err| upstream_io(format!("cannot create {}", staging.display()), err))?;
    let pack = Command::new("npm")
        .args(["pack", UPSTREAM_PACKAGE])
        .current_dir(&staging)
        .output()
        .map_err(|err| {
            upstream_io(
                format!(
                    "cannot run `npm pack {UPSTREAM_PACKAGE}`: install Node.js and npm, with \
                     access to the npm registry"
                ),
                err,
            )
        })?;
    if !pack.status.success() {
        return Err(upstream(format!(
            "`npm pack {UPSTREAM_PACKAGE}` failed ({}): {}",
            pack.status,
            String::from_utf8_lossy(&pack.stderr).trim()
        )));
    }
    let unpack = Command::new("tar")
        .args(["-xzf", TARBALL])
        .current_dir(&staging)
        .status()
        .map_err(|err| upstream_io(format!("cannot run tar to unpack {TARBALL}"), err))?;
    if !unpack.success() {
        return Err(upstream(format!("cannot unpack {TARBALL}: tar {unpack}")));
    }
    match std::fs::rename(&staging, package) {
        Ok(()) => Ok(()),
        // Another process got there first, with the same files.
        Err(_) if package.is_dir() => {
            let _ = std::fs::remove_dir_all(&staging);
            Ok(())
        }
        Err(err) => Err(upstream_io(
            format!("cannot move {} into place", staging.display()),
            err,
        )),
    }
}

fn upstream(detail: String) -> crate::Error {
    ThrowawayError::new(ThrowawayErrorKind::Upstream { detail }).into()
}

fn upstream_io(detail: String, err: std::io::Error) -> crate::Error {
    ThrowawayError::io(ThrowawayErrorKind::Upstream { detail }, err).into()
}

//! The one error type of this crate.

/// Everything that can go wrong while talking to the database or running a worker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database or the connection to it failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),

    /// pgmq could not be installed.
    #[error("cannot install pgmq")]
    Pgmq(#[source] pgmq::PgmqError),

    /// Schema `pgflow` exists but holds no record of our migrations: another pgflow installation
    /// (e.g. the TypeScript one's migrations) owns it, and we refuse to touch it.
    #[error(
        "schema `pgflow` already exists but was not installed by pgflow for Rust (no rows in \
         pgflow_meta.schema_migrations); refusing to change it. If it is pgflow 0.8.1's schema you \
         can use it as it is; otherwise drop it or install into another database"
    )]
    ForeignSchema,

    /// The database holds a newer schema version than this build knows.
    #[error(
        "the database has pgflow schema version {found}, newer than version {known} that this build \
         knows; upgrade the pgflow crate"
    )]
    SchemaTooNew {
        /// The newest version recorded in the database.
        found: i32,
        /// The newest version this build carries.
        known: i32,
    },

    /// A migration that was applied earlier differs from the one this build carries.
    #[error(
        "migration {version} ({name}) was applied with checksum {applied}, but this build carries \
         checksum {expected}: the schema history was edited"
    )]
    MigrationChanged {
        /// The migration's version.
        version: i32,
        /// The migration's name.
        name: String,
        /// The checksum recorded in the database.
        applied: String,
        /// The checksum of this build's migration.
        expected: String,
    },

    /// No PostgreSQL server binaries to start a throwaway server with.
    #[error(
        "no PostgreSQL server binaries found (searched {searched}). Install them \
         (Debian/Ubuntu: `apt-get install postgresql`; Fedora: `dnf install postgresql-server`; \
         macOS: `brew install postgresql`), or set PGFLOW_PG_BIN to the directory holding `initdb` \
         and `postgres`, or set DATABASE_URL to use a server you already have"
    )]
    NoPostgres {
        /// Where we looked.
        searched: String,
    },

    /// The throwaway server could not be started.
    #[error("throwaway PostgreSQL: {0}")]
    Throwaway(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

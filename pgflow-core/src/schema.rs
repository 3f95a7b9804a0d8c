//! The engine's SQL schema, as ordered migrations embedded at compile time.
//!
//! Each migration is applied once, in order, by `pgflow_client::Client::install`; the applied
//! versions and checksums are recorded outside schema `pgflow`, so the seven tables of the
//! engine stay exactly those of pgflow 0.8.1.

/// One versioned step of the engine's schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// Position in the history, starting at 1; never reused.
    pub version: i32,
    /// Short description, taken from the file name.
    pub name: &'static str,
    /// The SQL text, applied in one transaction.
    pub sql: &'static str,
}

impl Migration {
    /// A stable checksum of the SQL text (FNV-1a, 64 bit, hex), recorded at install time so that
    /// an edited migration that was already applied is detected rather than silently skipped.
    pub fn checksum(&self) -> String {
        format!("{:016x}", fnv1a(self.sql.as_bytes()))
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A fingerprint of the whole migration history: changes whenever any migration does. Used to
/// name cached template databases in tests.
pub fn fingerprint() -> String {
    let all: String = MIGRATIONS.iter().map(Migration::checksum).collect();
    format!("{:016x}", fnv1a(all.as_bytes()))
}

/// The schema (outside `pgflow`, which holds exactly the engine's seven tables) and table where
/// applied migrations are recorded.
pub const BOOKKEEPING_TABLE: &str = "pgflow_meta.schema_migrations";

/// Creates the bookkeeping table if it is missing.
pub const BOOKKEEPING_SQL: &str = "CREATE SCHEMA IF NOT EXISTS pgflow_meta;
CREATE TABLE IF NOT EXISTS pgflow_meta.schema_migrations (
    version int PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
";

/// Every migration of the engine, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "engine",
        sql: include_str!("../migrations/0001_engine.sql"),
    },
    Migration {
        version: 2,
        name: "current_attempt",
        sql: include_str!("../migrations/0002_current_attempt.sql"),
    },
    Migration {
        version: 3,
        name: "definition_limits",
        sql: include_str!("../migrations/0003_definition_limits.sql"),
    },
    Migration {
        version: 4,
        name: "roles",
        sql: include_str!("../migrations/0004_roles.sql"),
    },
];

/// The schema version this build of pgflow installs: the last migration's version.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// The complete install SQL (pgmq excluded): every migration in order, for users who keep the
/// schema in their own migration files and apply it with `psql --single-transaction -f`. It
/// records what it applied, so a later `Client::install` recognises the schema as its own.
pub fn install_sql() -> String {
    let mut out = String::from(BOOKKEEPING_SQL);
    for migration in MIGRATIONS {
        out.push_str(&format!(
            "\n-- pgflow migration {:04}: {}\n",
            migration.version, migration.name
        ));
        out.push_str(migration.sql);
        if !migration.sql.ends_with('\n') {
            out.push('\n');
        }
        // Recorded like `Client::install` records it, so that a later install recognises
        // this schema as ours instead of refusing it as foreign.
        out.push_str(&format!(
            "INSERT INTO {BOOKKEEPING_TABLE} (version, name, checksum) VALUES ({}, '{}', '{}');\n",
            migration.version,
            migration.name,
            migration.checksum()
        ));
    }
    out
}

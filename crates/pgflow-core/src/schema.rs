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
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.sql.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{hash:016x}")
    }
}

/// Every migration of the engine, oldest first.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "engine",
    sql: include_str!("../migrations/0001_engine.sql"),
}];

/// The schema version this build of pgflow installs: the last migration's version.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// The complete install SQL (pgmq excluded): every migration in order, for users who keep the
/// schema in their own migration files and apply it with `psql -f`.
pub fn install_sql() -> String {
    let mut out = String::new();
    for migration in MIGRATIONS {
        out.push_str(&format!(
            "-- pgflow migration {:04}: {}\n",
            migration.version, migration.name
        ));
        out.push_str(migration.sql);
        if !migration.sql.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

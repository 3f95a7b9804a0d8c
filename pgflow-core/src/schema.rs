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
        // Too long for one file, so one file per section, joined byte for byte: the text (and
        // so the checksum that installed databases recorded) is the single file it was before.
        // The parts are as frozen as any applied migration; the test below pins the checksum.
        sql: concat!(
            include_str!("../migrations/0001_engine/00_header.sql"),
            include_str!("../migrations/0001_engine/01_pure_helpers.sql"),
            include_str!("../migrations/0001_engine/02_definition_tables.sql"),
            include_str!("../migrations/0001_engine/03_workers.sql"),
            include_str!("../migrations/0001_engine/04_runtime_state.sql"),
            include_str!("../migrations/0001_engine/05_internal_helpers.sql"),
            include_str!("../migrations/0001_engine/06_definitions_api.sql"),
            include_str!("../migrations/0001_engine/07_queue_helper.sql"),
            include_str!("../migrations/0001_engine/08_run_progression.sql"),
            include_str!("../migrations/0001_engine/09_starting_runs.sql"),
            include_str!("../migrations/0001_engine/10_worker_protocol.sql"),
            include_str!("../migrations/0001_engine/11_reading.sql"),
            include_str!("../migrations/0001_engine/12_privileges.sql"),
        ),
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
    Migration {
        version: 5,
        name: "events",
        sql: include_str!("../migrations/0005_events.sql"),
    },
    Migration {
        version: 6,
        name: "attempt_history",
        sql: include_str!("../migrations/0006_attempt_history.sql"),
    },
    Migration {
        version: 7,
        name: "run_control",
        sql: include_str!("../migrations/0007_run_control.sql"),
    },
    Migration {
        version: 8,
        name: "retention",
        sql: include_str!("../migrations/0008_retention.sql"),
    },
    Migration {
        version: 9,
        name: "schedules",
        sql: include_str!("../migrations/0009_schedules.sql"),
    },
    Migration {
        version: 10,
        name: "conditions",
        sql: include_str!("../migrations/0010_conditions.sql"),
    },
    Migration {
        version: 11,
        name: "flow_shapes",
        sql: include_str!("../migrations/0011_flow_shapes.sql"),
    },
    Migration {
        version: 12,
        name: "trace_context",
        sql: include_str!("../migrations/0012_trace_context.sql"),
    },
    Migration {
        version: 13,
        name: "dashboard",
        sql: include_str!("../migrations/0013_dashboard.sql"),
    },
    Migration {
        version: 14,
        name: "concurrency_limits",
        sql: include_str!("../migrations/0014_concurrency_limits.sql"),
    },
    Migration {
        version: 15,
        name: "priority",
        sql: include_str!("../migrations/0015_priority.sql"),
    },
    Migration {
        version: 16,
        name: "subflows",
        sql: include_str!("../migrations/0016_subflows.sql"),
    },
    Migration {
        version: 17,
        name: "queue_probe",
        sql: include_str!("../migrations/0017_queue_probe.sql"),
    },
    Migration {
        version: 18,
        name: "start_tasks_by_key",
        sql: include_str!("../migrations/0018_start_tasks_by_key.sql"),
    },
    Migration {
        version: 19,
        name: "caller_checks_cached",
        sql: include_str!("../migrations/0019_caller_checks_cached.sql"),
    },
    Migration {
        version: 20,
        name: "complete_tasks_one_check",
        sql: include_str!("../migrations/0020_complete_tasks_one_check.sql"),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Databases record this checksum when they apply migration 1, and `Client::install` refuses
    /// a recorded migration whose checksum changed: an edit of any of its parts, reordering them
    /// included, would break every installed database. Fixes go in a new migration instead.
    #[test]
    fn migration_1_keeps_the_checksum_installed_databases_recorded() {
        assert_eq!(MIGRATIONS[0].version, 1);
        assert_eq!(MIGRATIONS[0].checksum(), "edc6eaa7aae30831");
    }
}

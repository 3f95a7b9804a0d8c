//! The worker's start-up check of the database: without it, a worker pointed at a database that
//! lacks the engine (or holds pgflow's SQL without this engine's additions, as pgflow's
//! TypeScript migrations install it) would retry a function that is not there for ever.

use pgflow_core::schema::{BOOKKEEPING_TABLE, MIGRATIONS, SCHEMA_VERSION};
use sqlx::PgPool;

use crate::Error;

/// Engine functions the worker calls, in schema `pgflow`. All but `fail_task` are this engine's
/// additions to pgflow 0.8.1. By name only: their arguments change from one migration to the
/// next, and an older schema of ours is caught by its recorded version instead.
const NEEDED: &[&str] = &[
    "_read_and_start",
    "complete_tasks",
    "fail_task",
    "queue_probe",
];

/// What the database lacks for this worker, if anything; `Err` when the check itself could not
/// run (worth retrying: the database may be unreachable for a while).
///
/// The first query reads only the catalogs, which every role may read: the roles of
/// docs/security.md get nothing on `pgflow_meta`, and their workers must pass the check as long
/// as the functions are there. The recorded version is compared only where it is readable.
pub(crate) async fn check(pool: &PgPool) -> sqlx::Result<Option<Error>> {
    let (schema_exists, missing, bookkeeping_readable): (bool, Vec<String>, Option<bool>) =
        sqlx::query_as(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname = 'pgflow'), \
                    ARRAY(SELECT needed FROM unnest($1::text[]) WITH ORDINALITY AS w(needed, i) \
                           WHERE NOT EXISTS ( \
                                 SELECT FROM pg_catalog.pg_proc p \
                                   JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
                                  WHERE n.nspname = 'pgflow' AND p.proname = w.needed) \
                           ORDER BY w.i), \
                    (SELECT pg_catalog.has_schema_privilege(n.oid, 'USAGE') \
                            AND pg_catalog.has_table_privilege(c.oid, 'SELECT') \
                       FROM pg_catalog.pg_class c \
                       JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                      WHERE n.nspname = 'pgflow_meta' AND c.relname = 'schema_migrations')",
        )
        .bind(NEEDED)
        .fetch_one(pool)
        .await?;

    let mut recorded = None;
    if bookkeeping_readable == Some(true) {
        let history: Vec<(i32, String, String)> = sqlx::query_as(&format!(
            "SELECT version, name, checksum FROM {BOOKKEEPING_TABLE} ORDER BY version"
        ))
        .fetch_all(pool)
        .await?;
        // The same refusals as `install`: a newer schema may have changed what the worker
        // calls, and an edited history means the functions are not the ones this build knows.
        if let Some((found, _, _)) = history.last()
            && *found > SCHEMA_VERSION
        {
            return Ok(Some(Error::SchemaTooNew {
                found: *found,
                known: SCHEMA_VERSION,
            }));
        }
        for (version, name, checksum) in &history {
            if let Some(ours) = MIGRATIONS.iter().find(|m| m.version == *version)
                && ours.checksum() != *checksum
            {
                return Ok(Some(Error::MigrationChanged {
                    version: *version,
                    name: name.clone(),
                    applied: checksum.clone(),
                    expected: ours.checksum(),
                }));
            }
        }
        recorded = history.last().map(|(version, _, _)| *version);
    }

    let outdated = recorded.is_some_and(|version| version < SCHEMA_VERSION);
    if !schema_exists || !missing.is_empty() || outdated {
        return Ok(Some(Error::IncompatibleSchema {
            schema_exists,
            recorded,
            known: SCHEMA_VERSION,
            missing: missing
                .into_iter()
                .map(|function| format!("pgflow.{function}"))
                .collect(),
        }));
    }
    Ok(None)
}

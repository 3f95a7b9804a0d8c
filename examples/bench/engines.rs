//! Which engine a row's database holds: this build's, this engine as an earlier migration left
//! it (before/after comparisons), or upstream pgflow 0.8.1's own SQL from its npm package. Only
//! the SQL-only driver runs on the others: it calls 0.8.1's functions alone, as a TypeScript
//! worker does.

use std::fmt;
use std::path::Path;

use pgflow_client::Client;
use pgflow_client::throwaway::{TestDatabase, UpstreamSchema, apply_migrations_up_to};
use pgflow_core::Flow;

use crate::measure::BoxResult;

/// An engine to measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Engine {
    /// This build's schema, every migration.
    Current,
    /// This engine's migrations up to this version, and none after.
    UpTo(i32),
    /// Upstream pgflow 0.8.1, applied from `@pgflow/core@0.8.1`'s migrations.
    Upstream,
}

impl Engine {
    /// Parses `current`, a migration number (`9`, `0009`) or `upstream-0.8.1`.
    pub(crate) fn parse(name: &str) -> BoxResult<Self> {
        let name = name.trim();
        if name == "current" {
            return Ok(Self::Current);
        }
        if name == "upstream-0.8.1" || name == "upstream" {
            return Ok(Self::Upstream);
        }
        let last = pgflow_core::schema::SCHEMA_VERSION;
        match name.parse::<i32>() {
            Ok(version) if (1..last).contains(&version) => Ok(Self::UpTo(version)),
            Ok(version) if version == last => Ok(Self::Current),
            _ => Err(format!(
                "unknown engine `{name}`: current, upstream-0.8.1, or a migration number from 1 \
                 to {last} (this engine as that migration left it)"
            )
            .into()),
        }
    }

    /// A fresh database on the server `admin_url` names, holding this engine and `flow`.
    pub(crate) async fn prepare(
        &self,
        admin_url: &str,
        cache: &Path,
        flow: &Flow<u64>,
    ) -> BoxResult<TestDatabase> {
        let db = match self {
            Self::Current => {
                let db = TestDatabase::new_in(admin_url).await?;
                Client::new(db.pool().clone()).compile(flow).await?;
                return Ok(db);
            }
            Self::UpTo(version) => {
                let db = TestDatabase::empty_in(admin_url).await?;
                apply_migrations_up_to(db.pool(), *version).await?;
                db
            }
            Self::Upstream => {
                let cache = cache.to_owned();
                let upstream =
                    tokio::task::spawn_blocking(move || UpstreamSchema::fetch(&cache)).await??;
                let db = TestDatabase::empty_in(admin_url).await?;
                upstream.apply(db.pool()).await?;
                db
            }
        };
        // What `npx pgflow compile` gives upstream: the DSL prints the same SQL.
        sqlx::raw_sql(&flow.to_sql()?).execute(db.pool()).await?;
        Ok(db)
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Current => f.write_str("current"),
            Self::UpTo(version) => write!(f, "up to {version:04}"),
            Self::Upstream => f.write_str("upstream 0.8.1"),
        }
    }
}

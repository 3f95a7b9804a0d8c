//! The one error type of this crate.

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::definition::Difference;
use crate::run::RunFailure;
use crate::status::RunStatus;

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
         pgflow_meta.schema_migrations); refusing to change it. Rust workers cannot run on it (a \
         schema from pgflow's TypeScript migrations lacks the functions they call): drop it \
         (`DROP SCHEMA pgflow CASCADE`, after its runs finish) and install again, or install \
         into another database"
    )]
    ForeignSchema,

    /// `pgflow_meta.schema_migrations` records migrations but schema `pgflow` is gone (dropped
    /// by hand): installing again would apply nothing and report the engine up to date.
    #[error(
        "schema `pgflow` is missing, but pgflow_meta.schema_migrations records migrations {recorded:?}: \
         the engine was dropped by hand. To install it afresh, drop what it left behind first \
         (`DROP SCHEMA IF EXISTS pgflow_private, pgflow_ext CASCADE; DROP SCHEMA pgflow_meta \
         CASCADE;`), then install again; its flows and runs went with schema `pgflow`"
    )]
    SchemaMissing {
        /// The versions recorded as applied.
        recorded: Vec<i32>,
    },

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

    /// A throwaway server could not be found, started or restarted; its
    /// [`kind`](crate::throwaway::ThrowawayError::kind) says why.
    #[cfg(all(unix, feature = "throwaway"))]
    #[error(transparent)]
    Throwaway(Box<crate::throwaway::ThrowawayError>),

    /// The flow definition is invalid (slugs, duplicate steps, option ranges); nothing was sent
    /// to the database.
    #[error(transparent)]
    Flow(#[from] pgflow_core::Error),

    /// The database holds a different definition of this flow.
    #[error(
        "flow `{flow}` in the database differs from the one being compiled:\n{}\nchange the flow's \
         slug for a new version, or compile with a Replace mode",
        differences.iter().map(|d| format!("  - {d}")).collect::<Vec<_>>().join("\n")
    )]
    FlowDrift {
        /// The flow.
        flow: String,
        /// Each difference, in plain words when displayed.
        differences: Vec<Difference>,
    },

    /// Another flow's slug differs from this one's only in case. pgmq lowercases queue names,
    /// so the two flows would share one queue: replacing either would purge the other's
    /// messages, and workers of each would read the other's.
    #[error(
        "flow `{flow}` collides with flow `{existing}`: their slugs differ only in case, and pgmq \
         lowercases queue names, so both would share queue pgmq.q_{queue}; give the new flow \
         another slug",
        queue = .flow.to_ascii_lowercase()
    )]
    FlowSlugCollision {
        /// The flow being compiled.
        flow: String,
        /// The flow already in the database.
        existing: String,
    },

    /// Replacing a definition was refused because the flow has runs.
    #[error(
        "flow `{flow}` has {runs} run(s); its definition is only replaced with \
         Replace::DeletingRuns, which deletes them"
    )]
    FlowHasRuns {
        /// The flow.
        flow: String,
        /// How many runs it has.
        runs: u64,
    },

    /// No flow of that slug is in the database.
    #[error(
        "flow `{flow}` is not in the database (compile it first); flows there: [{}]",
        flows.join(", ")
    )]
    UnknownFlow {
        /// The slug asked for.
        flow: String,
        /// The flows that do exist.
        flows: Vec<String>,
    },

    /// The engine refused to start a run with this input (e.g. a root map over a non-array).
    #[error("cannot start flow `{flow}`: {message}")]
    InvalidInput {
        /// The flow.
        flow: String,
        /// The engine's message.
        message: String,
    },

    /// The input could not be turned into JSON.
    #[error("the flow input cannot be serialized to JSON")]
    InputNotSerializable(#[source] serde_json::Error),

    /// No run has this id.
    #[error("there is no run {0}")]
    UnknownRun(Uuid),

    /// A caller-chosen run id is already used by a run of another flow.
    #[error("run id {run_id} is already used by a run of flow `{flow}`, not `{requested}`")]
    RunIdTaken {
        /// The run id.
        run_id: Uuid,
        /// The flow of the existing run.
        flow: String,
        /// The flow that was asked for.
        requested: String,
    },

    /// The run failed.
    #[error("{0}")]
    RunFailed(Box<RunFailure>),

    /// The run was cancelled ([`Client::cancel`](crate::Client::cancel)): what waiting for it
    /// ends with. A retry ([`Client::retry`](crate::Client::retry)) can start it again.
    #[error("run {run_id} of flow `{flow_slug}` was cancelled")]
    RunCancelled {
        /// The run.
        run_id: Uuid,
        /// Its flow.
        flow_slug: String,
        /// When it was cancelled.
        cancelled_at: Option<DateTime<Utc>>,
    },

    /// [`Client::retry`](crate::Client::retry) refused the run: only a failed or cancelled run
    /// can be retried. A run that is `started` may just have been retried by another caller.
    /// Nothing changed.
    #[error("run {run_id} is {status}: only a failed or cancelled run can be retried")]
    NotRetryable {
        /// The run.
        run_id: Uuid,
        /// Its status when the retry was refused: started or completed.
        status: RunStatus,
    },

    /// Waiting for a run gave up; the run itself goes on.
    #[error("run {run_id} did not finish within {waited:?}")]
    WaitTimedOut {
        /// The run.
        run_id: Uuid,
        /// How long we waited.
        waited: Duration,
    },

    /// A completed run has no output for that step.
    #[error("no output for step `{step}`; steps with outputs: [{}]", steps.join(", "))]
    NoSuchOutput {
        /// The step asked for.
        step: String,
        /// The steps that have outputs.
        steps: Vec<String>,
    },

    /// A step's output does not deserialize into the type asked for.
    #[error("the output of step `{step}` does not have the expected type")]
    OutputType {
        /// The step.
        step: String,
        /// Why deserialization failed.
        #[source]
        source: serde_json::Error,
    },

    /// A worker setting is out of range ([`WorkerBuilder::spawn`](crate::WorkerBuilder::spawn)).
    #[error("worker setting `{setting}` is {value}, but it {requirement}")]
    WorkerSetting {
        /// The builder method that set it, e.g. `concurrency`.
        setting: &'static str,
        /// The value given.
        value: String,
        /// The rule it breaks.
        requirement: &'static str,
    },

    /// A worker was given a handler under an invalid flow or step slug.
    #[error(
        "worker handler for flow `{flow}`{}: invalid slug: {problem}",
        step.as_ref().map(|step| format!(", step `{step}`")).unwrap_or_default()
    )]
    WorkerSlug {
        /// The flow slug as given.
        flow: String,
        /// The step slug as given, when it is the invalid one.
        step: Option<String>,
        /// What is wrong with the slug.
        problem: pgflow_core::SlugProblem,
    },

    /// A worker's start-up check found that the database lacks the engine it calls: no `pgflow`
    /// schema, pgflow's SQL without this engine's additions (as pgflow's TypeScript migrations
    /// install it), or an older version of this engine's schema. The worker stopped before
    /// touching the database.
    #[error("{}", incompatible_schema(*schema_exists, *recorded, *known, missing))]
    IncompatibleSchema {
        /// Whether schema `pgflow` exists.
        schema_exists: bool,
        /// The newest version recorded in `pgflow_meta.schema_migrations`; `None` when nothing
        /// is recorded or the worker's role may not read it.
        recorded: Option<i32>,
        /// The version this build carries.
        known: i32,
        /// The engine functions the worker calls that the database lacks, e.g.
        /// `pgflow._read_and_start`.
        missing: Vec<String>,
    },

    /// A worker was spawned outside a Tokio runtime.
    #[error("a pgflow worker must be spawned from within a Tokio runtime")]
    NoRuntime,

    /// The worker's own task panicked (a bug: panics in handlers are caught and fail their task).
    #[error("the worker's task panicked: {0}")]
    WorkerPanicked(String),

    /// A [`Schedule`](crate::Schedule) that cannot run: an invalid cron expression or time zone,
    /// an invalid or duplicate name, an input that cannot be serialized. Found by
    /// [`WorkerBuilder::spawn`](crate::WorkerBuilder::spawn) and [`Schedule::check`](crate::Schedule::check),
    /// before anything runs.
    #[error("schedule `{schedule}`: {problem}")]
    Schedule {
        /// The schedule's name.
        schedule: String,
        /// What is wrong with it.
        problem: String,
    },

    /// No schedule of that name is in the database.
    #[error("there is no schedule `{0}`")]
    UnknownSchedule(String),
}

impl Error {
    /// Maps an error of `pgflow.start_flow`: the engine's own exceptions (SQLSTATE P0001) are
    /// refused input; anything else is a database error.
    pub(crate) fn from_start(flow: &str, err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::Database(db) if db.code().as_deref() == Some("P0001") => {
                Self::InvalidInput {
                    flow: flow.to_string(),
                    message: db.message().to_string(),
                }
            }
            _ => Self::Database(err),
        }
    }
}

impl Error {
    /// Maps an error of `pgflow.cancel_run` or `pgflow.retry_run` on run `run_id`: SQLSTATE
    /// P0002 is no such run; 55000 is a run that cannot be retried, its status read from the
    /// engine's message (`run <id> is <status>: only a failed or cancelled run can be retried`).
    pub(crate) fn from_run_control(run_id: Uuid, err: sqlx::Error) -> Self {
        let sqlx::Error::Database(db) = &err else {
            return Self::Database(err);
        };
        match db.code().as_deref() {
            Some("P0002") => Self::UnknownRun(run_id),
            Some("55000") => match status_in_message(db.message()) {
                Some(status) => Self::NotRetryable { run_id, status },
                None => Self::Database(err),
            },
            _ => Self::Database(err),
        }
    }
}

/// The status in the engine's message `run <id> is <status>: ...`.
fn status_in_message(message: &str) -> Option<RunStatus> {
    let (_, rest) = message.split_once(" is ")?;
    let (status, _) = rest.split_once(':')?;
    status.trim().parse().ok()
}

/// The message of [`Error::IncompatibleSchema`]: what is wrong, and what to run about it.
fn incompatible_schema(
    schema_exists: bool,
    recorded: Option<i32>,
    known: i32,
    missing: &[String],
) -> String {
    let missing = missing.join(", ");
    match recorded {
        _ if !schema_exists => "schema `pgflow` is not in this database: install the engine with \
             `pgflow install` (the CLI) or `Client::install` before starting workers"
            .to_string(),
        // Readable history but functions gone: someone changed the schema after installing it.
        Some(version) if version >= known => format!(
            "pgflow schema version {version} is recorded, but engine functions the worker calls \
             are missing ({missing}): the schema was changed after it was installed. Reinstall \
             it: `DROP SCHEMA pgflow CASCADE`, delete the rows of \
             pgflow_meta.schema_migrations, then `pgflow install` or `Client::install`, and \
             compile the flows again"
        ),
        Some(version) => format!(
            "the database has pgflow schema version {version}, older than version {known} that \
             this build needs: run `pgflow install` or `Client::install`, which applies the \
             missing migrations in place"
        ),
        None => format!(
            "schema `pgflow` holds pgflow's SQL without the Rust engine's additions (missing: \
             {missing}), as pgflow's TypeScript migrations install it. `pgflow install` and \
             `Client::install` do not adopt such a schema: they refuse to change a `pgflow` \
             schema they did not install (Error::ForeignSchema). To run Rust workers on this \
             database: let the runs in progress finish; `DROP SCHEMA pgflow CASCADE` (its flows, \
             runs and worker rows go with it) and empty each flow's queue \
             (`SELECT pgmq.purge_queue('<flow slug>')`); run `pgflow install` or \
             `Client::install`, which installs pgflow 0.8.1's tables and functions with the Rust \
             engine's additions (TypeScript workers keep working on it); compile the flows again"
        ),
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_is_read_from_the_engines_refusal() {
        let message = "run 0190b8a4-5e0c-7a8e-9d4f-1c2b3a4d5e6f is started: only a failed or \
                       cancelled run can be retried";
        assert_eq!(status_in_message(message), Some(RunStatus::Started));
        let message = "run 0190b8a4-5e0c-7a8e-9d4f-1c2b3a4d5e6f is completed: only ...";
        assert_eq!(status_in_message(message), Some(RunStatus::Completed));
        assert_eq!(status_in_message("something else"), None);
    }
}

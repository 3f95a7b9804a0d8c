//! Helpers every group of tests shares, each written once: databases, compiling and starting
//! flows, waiting for runs, and reading what the engine recorded.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgflow_client::Client;
use pgflow_client::throwaway::TestDatabase;
use pgflow_core::Flow;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// A fresh database with pgmq and the engine.
pub async fn database() -> TestDatabase {
    TestDatabase::new().await.expect("test database")
}

/// A fresh database and a client on it.
pub async fn client() -> (TestDatabase, Client) {
    let db = database().await;
    let client = Client::new(db.pool().clone());
    (db, client)
}

/// Compiles `flow` into the database with its SQL statements alone: no drift check, so a test
/// can compile where the client would refuse to.
pub async fn compile<I>(pool: &PgPool, flow: &Flow<I>) {
    for statement in flow.statements().expect("valid flow") {
        sqlx::raw_sql(&statement)
            .execute(pool)
            .await
            .expect("flow compiles");
    }
}

/// Sets options of flow `flow` straight in the engine's tables: on the flow's row when `step`
/// is `None` (its steps inherit them), else on that step's. `options` are `(name, value)`
/// pairs, names as in SQL (`base_delay`, `timeout`, ...).
///
/// Why: tests retry without backoff (`base_delay` 0) and lose tasks within a second or two
/// (`timeout` 1 or 2) to run fast, values below the lower bounds the Rust builder shares with
/// pgflow's TypeScript DSL, which the engine itself accepts. Use it only where no second
/// [`Client::compile`] of the flow follows: the client's drift check compares options, and
/// would report these as a changed flow.
pub async fn set_engine_options(
    pool: &PgPool,
    flow: &str,
    step: Option<&str>,
    options: &[(&str, i32)],
) {
    for &(option, value) in options {
        assert!(
            ["max_attempts", "base_delay", "timeout", "start_delay"].contains(&option),
            "no option {option}"
        );
        let (table, which) = match step {
            None => ("flows", "$3::text IS NULL"),
            Some(_) => ("steps", "step_slug = $3"),
        };
        let updated = sqlx::query(&format!(
            "UPDATE pgflow.{table} SET opt_{option} = $1 WHERE flow_slug = $2 AND {which}"
        ))
        .bind(value)
        .bind(flow)
        .bind(step)
        .execute(pool)
        .await
        .expect("option set")
        .rows_affected();
        assert_eq!(updated, 1, "{flow} {step:?} {option}");
    }
}

/// Starts a run of flow `slug` through the SQL API.
pub async fn start(pool: &PgPool, slug: &str, input: Value) -> Uuid {
    sqlx::query_scalar("SELECT run_id FROM pgflow.start_flow($1, $2)")
        .bind(slug)
        .bind(input)
        .fetch_one(pool)
        .await
        .expect("run starts")
}

/// `(status, output)` of a run.
pub async fn run(pool: &PgPool, run_id: Uuid) -> (String, Option<Value>) {
    sqlx::query_as("SELECT status, output FROM pgflow.runs WHERE run_id = $1")
        .bind(run_id)
        .fetch_one(pool)
        .await
        .expect("run row")
}

/// Waits until the run is no longer `started`; returns its status and output.
pub async fn finished(pool: &PgPool, run_id: Uuid, within: Duration) -> (String, Option<Value>) {
    finished_all(pool, &[run_id], within).await.remove(0)
}

/// Waits until every run of `runs` is no longer `started`, tolerating a database that comes
/// and goes meanwhile; returns each run's status and output, in order.
pub async fn finished_all(
    pool: &PgPool,
    runs: &[Uuid],
    within: Duration,
) -> Vec<(String, Option<Value>)> {
    let deadline = Instant::now() + within;
    loop {
        let rows: Result<Vec<(Uuid, String, Option<Value>)>, _> =
            sqlx::query_as("SELECT run_id, status, output FROM pgflow.runs WHERE run_id = ANY($1)")
                .bind(runs)
                .fetch_all(pool)
                .await;
        if let Ok(rows) = rows
            && rows.len() == runs.len()
            && rows.iter().all(|(_, status, _)| status != "started")
        {
            let by_id: HashMap<Uuid, (String, Option<Value>)> = rows
                .into_iter()
                .map(|(id, status, output)| (id, (status, output)))
                .collect();
            return runs.iter().map(|id| by_id[id].clone()).collect();
        }
        if Instant::now() > deadline {
            let counts: Vec<(String, String, i64)> = sqlx::query_as(
                "SELECT step_slug, status, count(*) FROM pgflow.step_tasks \
                  WHERE run_id = ANY($1) GROUP BY 1, 2 ORDER BY 1, 2",
            )
            .bind(runs)
            .fetch_all(pool)
            .await
            .unwrap_or_default();
            panic!("runs still started after {within:?}; tasks by step and status: {counts:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `condition` every few milliseconds until it holds.
pub async fn eventually(what: &str, within: Duration, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The columns of `pgflow.step_tasks` the tests look at.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TaskRow {
    pub run_id: Uuid,
    pub step_slug: String,
    pub task_index: i32,
    pub status: String,
    pub attempts_count: i32,
    pub error_message: Option<String>,
    pub output: Option<Value>,
    pub message_id: Option<i64>,
}

impl TaskRow {
    /// The select list that reads a [`TaskRow`] from `pgflow.step_tasks` or from a function
    /// returning its rows.
    pub const COLUMNS: &str = "run_id, step_slug, task_index, status, attempts_count, \
                               error_message, output, message_id";
}

/// The tasks of a run, by step and index.
pub async fn tasks(pool: &PgPool, run_id: Uuid) -> Vec<TaskRow> {
    tasks_of(pool, &[run_id]).await
}

/// Every task of the given runs, by run, step and index.
pub async fn tasks_of(pool: &PgPool, runs: &[Uuid]) -> Vec<TaskRow> {
    sqlx::query_as(&format!(
        "SELECT {} FROM pgflow.step_tasks WHERE run_id = ANY($1) \
          ORDER BY run_id, step_slug, task_index",
        TaskRow::COLUMNS
    ))
    .bind(runs)
    .fetch_all(pool)
    .await
    .expect("tasks")
}

/// How many tasks of the database have `status`.
pub async fn count_tasks(pool: &PgPool, status: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM pgflow.step_tasks WHERE status = $1")
        .bind(status)
        .fetch_one(pool)
        .await
}

/// The error message recorded on a step of a run, if any.
pub async fn step_error(pool: &PgPool, run_id: Uuid, step: &str) -> Option<String> {
    sqlx::query_scalar(
        "SELECT error_message FROM pgflow.step_states WHERE run_id = $1 AND step_slug = $2",
    )
    .bind(run_id)
    .bind(step)
    .fetch_one(pool)
    .await
    .expect("step state")
}

/// Whether the worker row `worker_id` is marked deprecated.
pub async fn deprecated(pool: &PgPool, worker_id: Uuid) -> bool {
    sqlx::query_scalar("SELECT deprecated_at IS NOT NULL FROM pgflow.workers WHERE worker_id = $1")
        .bind(worker_id)
        .fetch_one(pool)
        .await
        .expect("worker row")
}

/// The invariant checker finds nothing.
pub async fn assert_consistent(pool: &PgPool) {
    let violations = pgflow_client::check(pool).await.expect("check runs");
    assert!(
        violations.is_empty(),
        "invariants broken:\n{}",
        violations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

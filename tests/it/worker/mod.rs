//! The worker against a real database: flows end to end, the concurrency limit, failures,
//! timeouts, shutdown, untyped handlers, and dispatch latency.

mod concurrency;
mod end_to_end;
mod failures;
mod foreign_schema;
mod latency;
mod shutdown;
mod untyped;

use std::time::{Duration, Instant};

use pgflow::Flow;
use pgflow_client::throwaway::TestDatabase;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// A fresh database with pgmq and the engine.
pub async fn database() -> TestDatabase {
    TestDatabase::new().await.expect("test database")
}

/// Compiles `flow` into the database.
pub async fn apply<I>(pool: &PgPool, flow: &Flow<I>) {
    for statement in flow.statements().expect("valid flow") {
        sqlx::raw_sql(&statement)
            .execute(pool)
            .await
            .expect("flow compiles");
    }
}

/// Starts a run of flow `slug`.
pub async fn start(pool: &PgPool, slug: &str, input: Value) -> Uuid {
    sqlx::query_scalar("SELECT run_id FROM pgflow.start_flow($1, $2)")
        .bind(slug)
        .bind(input)
        .fetch_one(pool)
        .await
        .expect("run starts")
}

/// Waits until the run is no longer `started`; returns its status and output.
pub async fn finished(pool: &PgPool, run_id: Uuid, within: Duration) -> (String, Option<Value>) {
    let deadline = Instant::now() + within;
    loop {
        let (status, output): (String, Option<Value>) =
            sqlx::query_as("SELECT status, output FROM pgflow.runs WHERE run_id = $1")
                .bind(run_id)
                .fetch_one(pool)
                .await
                .expect("run row");
        if status != "started" {
            return (status, output);
        }
        assert!(
            Instant::now() < deadline,
            "run {run_id} still started after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The tasks of a run: (step, index, status, attempts, error).
pub async fn tasks(pool: &PgPool, run_id: Uuid) -> Vec<(String, i32, String, i32, Option<String>)> {
    sqlx::query_as(
        "SELECT step_slug, task_index, status, attempts_count, error_message \
           FROM pgflow.step_tasks WHERE run_id = $1 ORDER BY step_slug, task_index",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await
    .expect("tasks")
}

/// How many tasks of the database are `started`.
pub async fn started_tasks(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pgflow.step_tasks WHERE status = 'started'")
        .fetch_one(pool)
        .await
        .expect("count")
}

/// Polls `condition` every few milliseconds until it holds.
pub async fn eventually(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

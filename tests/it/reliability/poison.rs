//! One bad task never fails another: an input the worker cannot decode (nested deeper than the
//! JSON decoder goes, or a number no `f64` holds), an output it could not read back, and error
//! messages PostgreSQL cannot store (a NUL character) each fail only their own task, at once and
//! with the reason, while the rest of the batch runs and the worker keeps serving.

use std::time::Duration;

use pgflow_core::{Flow, StepContext, StepError, step_fn};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use super::worker;
use crate::support::{
    assert_consistent, client, finished_all, set_engine_options, start, tasks_of,
};

/// Set in the engine for the flows here, below the builder's bounds: no backoff, and short
/// timeouts, so that a task whose worker lost it would show as such within the test's
/// patience instead of hanging it.
const FAST: &[(&str, i32)] = &[("base_delay", 0), ("timeout", 2)];

/// `levels` arrays, one inside the other, around a 0.
fn nested(levels: usize) -> Value {
    let mut value = json!(0);
    for _ in 0..levels {
        value = Value::Array(vec![value]);
    }
    value
}

/// Starts a run whose input is the JSON text `input`, parsed by PostgreSQL: some valid jsonb
/// (`1e400`) has no `serde_json::Value` to bind.
async fn start_text(pool: &PgPool, slug: &str, input: &str) -> Uuid {
    sqlx::query_scalar("SELECT run_id FROM pgflow.start_flow($1, $2::jsonb)")
        .bind(slug)
        .bind(input)
        .fetch_one(pool)
        .await
        .expect("run starts")
}

/// A flow of one step that takes any input. Compiled with [`FAST`] timing.
fn any_input(slug: &str) -> Flow<Value> {
    let take = step_fn("take")
        .handler(|_input: Value, _ctx: StepContext| async move { Ok::<_, StepError>(1_u32) });
    Flow::new(slug).max_attempts(3).step(take).build()
}

/// Checks that `bad` failed on its own: its one task failed on its first attempt with an error
/// containing `reason`, while every task of `good` completed on its first attempt.
async fn only_the_bad_run_failed(pool: &PgPool, good: &[Uuid], bad: Uuid, reason: &str) {
    let mut runs = good.to_vec();
    runs.push(bad);
    let results = finished_all(pool, &runs, Duration::from_secs(20)).await;
    let statuses: Vec<&str> = results.iter().map(|(status, _)| status.as_str()).collect();
    let mut expected = vec!["completed"; good.len()];
    expected.push("failed");
    assert_eq!(statuses, expected);
    for task in tasks_of(pool, &runs).await {
        let (run, step, index) = (task.run_id, &task.step_slug, task.task_index);
        let attempts = task.attempts_count;
        if run == bad && task.status == "failed" {
            let error = task.error_message.unwrap_or_default();
            assert!(error.contains(reason), "{step}/{index}: {error}");
            assert_eq!(attempts, 1, "{step}/{index} was not retried: {error}");
        } else if run != bad {
            assert_eq!(task.status, "completed", "{run} {step}/{index}");
            assert_eq!(attempts, 1, "{run} {step}/{index}");
        }
    }
}

/// Nine good runs and one whose input is `bad_input`, all queued before a worker reads any, so
/// that they share its batches; the bad one fails with `reason`, and the worker serves on.
async fn one_bad_input_among_ten(slug: &str, bad_input: &str, reason: &str) {
    let (db, client) = client().await;
    let pool = db.pool();
    let flow = any_input(slug);
    client.compile(&flow).await.expect("compile");
    set_engine_options(pool, slug, None, FAST).await;
    let mut good = Vec::new();
    for n in 0..5 {
        good.push(start(pool, slug, json!(n)).await);
    }
    // In the middle of the batch, not at an end of it.
    let bad = start_text(pool, slug, bad_input).await;
    for n in 5..9 {
        good.push(start(pool, slug, json!(n)).await);
    }
    let worker = worker(pool, &flow, 10);
    only_the_bad_run_failed(pool, &good, bad, reason).await;

    let after = start(pool, slug, json!("after")).await;
    let results = finished_all(pool, &[after], Duration::from_secs(10)).await;
    assert_eq!(results[0].0, "completed", "the worker still serves");
    assert_consistent(pool).await;
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_nested_too_deep_to_decode_fails_only_its_own_task() {
    let deep = format!("{}0{}", "[".repeat(130), "]".repeat(130));
    one_bad_input_among_ten("deep_input", &deep, "recursion limit exceeded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_out_of_f64_range_fails_only_its_own_task() {
    one_bad_input_among_ten("huge_number", "1e400", "number out of range").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_too_deep_to_read_back_fails_its_own_task_not_the_readers() {
    let (db, client) = client().await;
    let pool = db.pool();
    let make = step_fn("make").handler(|n: u64, _ctx: StepContext| async move {
        Ok::<_, StepError>(if n == 5 { nested(200) } else { json!(n) })
    });
    let read = step_fn("read")
        .depends_on(&make)
        .handler(|n: u64, _made: Value, _ctx: StepContext| async move { Ok::<_, StepError>(n) });
    let flow: Flow<u64> = Flow::new("deep_output")
        .max_attempts(3)
        .step(make)
        .step(read)
        .build();
    client.compile(&flow).await.expect("compile");
    set_engine_options(pool, "deep_output", None, FAST).await;
    let mut good = Vec::new();
    for n in 0..10 {
        good.push(start(pool, "deep_output", json!(n)).await);
    }
    let bad = good.remove(5);
    let worker = worker(pool, &flow, 10);
    only_the_bad_run_failed(pool, &good, bad, "nested deeper than").await;
    let made: Option<String> = sqlx::query_scalar(
        "SELECT status FROM pgflow.step_tasks WHERE run_id = $1 AND step_slug = 'make'",
    )
    .bind(bad)
    .fetch_one(pool)
    .await
    .expect("task");
    assert_eq!(
        made.as_deref(),
        Some("failed"),
        "the step that made it fails"
    );

    let after = start(pool, "deep_output", json!(11)).await;
    let results = finished_all(pool, &[after], Duration::from_secs(10)).await;
    assert_eq!(
        results[0],
        ("completed".to_owned(), Some(json!({"read": 11}))),
        "the worker still serves"
    );
    assert_consistent(pool).await;
    worker.shutdown().await.expect("shutdown");
}

/// A flow whose one step fails through `fail`, on its only attempt, with a step timeout long
/// enough that a failure PostgreSQL refused to record would show as a run still started.
fn failing(slug: &str, fail: fn() -> StepError) -> Flow<u32> {
    let fails = step_fn("fails")
        .timeout(30)
        .max_attempts(1)
        .handler(move |_n: u32, _ctx: StepContext| async move { Err::<u32, _>(fail()) });
    Flow::new(slug).step(fails).build()
}

/// Runs a flow of [`failing`] and returns the error its task recorded, within a few seconds.
async fn recorded_error(slug: &str, fail: fn() -> StepError) -> String {
    let (db, client) = client().await;
    let pool = db.pool();
    let flow = failing(slug, fail);
    client.compile(&flow).await.expect("compile");
    let worker = worker(pool, &flow, 2);
    let run = start(pool, slug, json!(1)).await;
    let results = finished_all(pool, &[run], Duration::from_secs(5)).await;
    assert_eq!(results[0].0, "failed");
    let tasks = tasks_of(pool, &[run]).await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0].status, "failed");
    assert_consistent(pool).await;
    worker.shutdown().await.expect("shutdown");
    tasks[0].error_message.clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_message_with_a_nul_fails_the_run_at_once_with_the_rest_of_it() {
    let error = recorded_error("nul_error", || {
        StepError::new("card declined\0 by the bank: code 51")
    })
    .await;
    assert!(
        error.starts_with("card declined") && error.contains(" by the bank: code 51"),
        "{error}"
    );
    assert!(!error.contains('\0'), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_message_with_a_nul_fails_the_run_at_once_with_the_rest_of_it() {
    let error = recorded_error("nul_panic", || {
        panic!("index out\0 of range: {}", 51);
    })
    .await;
    assert!(
        error.starts_with("handler panicked: index out") && error.contains(" of range: 51"),
        "{error}"
    );
    assert!(!error.contains('\0'), "{error:?}");
}

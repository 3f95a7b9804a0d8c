//! Handler errors, panics, `no_retry` and timeouts become failed attempts, retried per the
//! step's options.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use pgflow::{Flow, StepContext, StepError, step_fn};
use pgflow_client::{Client, Worker};
use serde_json::json;

use crate::support::{
    compile, database, eventually, finished, set_engine_options, start, step_error, tasks,
};

/// Retries at once: set in the engine, below the builder's bound, for tests that retry.
const NO_BACKOFF: &[(&str, i32)] = &[("base_delay", 0)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_retried_then_fails_the_run_with_the_panic_message() {
    let db = database().await;
    let pool = db.pool();
    let calls = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&calls);
    let explode = step_fn("explode")
        .max_attempts(2)
        .handler(move |n: u32, _ctx: StepContext| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if n > 0 {
                    panic!("boom {n}");
                }
                Ok::<_, StepError>(n)
            }
        });
    let flow: Flow<u32> = Flow::new("panics").step(explode).build();
    compile(pool, &flow).await;
    set_engine_options(pool, "panics", None, NO_BACKOFF).await;
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .spawn()
        .expect("worker");

    let run = start(pool, "panics", json!(42)).await;
    let (status, _) = finished(pool, run, Duration::from_secs(30)).await;
    assert_eq!(status, "failed");
    assert_eq!(calls.load(Ordering::SeqCst), 2, "max_attempts = 2");
    let error = step_error(pool, run, "explode")
        .await
        .expect("an error message");
    assert!(error.contains("handler panicked: boom 42"), "{error}");
    let tasks = tasks(pool, run).await;
    assert_eq!(tasks[0].status, "failed");
    assert_eq!(tasks[0].attempts_count, 2);

    // The worker is still fine: a good run completes.
    let run = start(pool, "panics", json!(0)).await;
    assert_eq!(
        finished(pool, run, Duration::from_secs(30)).await.0,
        "completed"
    );
    // Counted once the report returns, just after the run's row changed.
    eventually("the counters", Duration::from_secs(5), async || {
        let stats = worker.stats();
        (stats.completed, stats.failed, stats.in_flight) == (1, 2, 0)
    })
    .await;
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_is_retried_and_the_next_attempt_can_succeed() {
    let db = database().await;
    let pool = db.pool();
    let flaky = step_fn("flaky")
        .max_attempts(3)
        .handler(|n: u32, ctx: StepContext| async move {
            if ctx.attempt() < 2 {
                return Err(StepError::new(format!("attempt {} failed", ctx.attempt())));
            }
            Ok(n + ctx.attempt())
        });
    let flow: Flow<u32> = Flow::new("flaky").step(flaky).build();
    compile(pool, &flow).await;
    set_engine_options(pool, "flaky", None, NO_BACKOFF).await;
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .spawn()
        .expect("worker");

    let run = start(pool, "flaky", json!(40)).await;
    let (status, output) = finished(pool, run, Duration::from_secs(30)).await;
    assert_eq!(
        (status.as_str(), output),
        ("completed", Some(json!({"flaky": 42})))
    );
    let tasks = tasks(pool, run).await;
    assert_eq!(tasks[0].attempts_count, 2, "two attempts");
    assert_eq!(tasks[0].error_message.as_deref(), Some("attempt 1 failed"));
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_retry_error_fails_the_run_at_once() {
    let db = database().await;
    let pool = db.pool();
    let calls = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&calls);
    let refuse = step_fn("refuse")
        .max_attempts(5)
        .handler(move |_n: u32, _ctx: StepContext| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move { Err::<u32, _>(StepError::new("invalid order").no_retry()) }
        });
    let flow: Flow<u32> = Flow::new("refusals").step(refuse).build();
    compile(pool, &flow).await;
    set_engine_options(pool, "refusals", None, NO_BACKOFF).await;
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .spawn()
        .expect("worker");

    let run = start(pool, "refusals", json!(1)).await;
    let (status, _) = finished(pool, run, Duration::from_secs(30)).await;
    assert_eq!(status, "failed");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "not retried");
    let error = step_error(pool, run, "refuse")
        .await
        .expect("an error message");
    assert!(error.starts_with("invalid order (not retried"), "{error}");
    // One attempt was made, and the task says so (not the step's 5).
    let attempts: i32 = sqlx::query_scalar(
        "SELECT attempts_count FROM pgflow.step_tasks WHERE run_id = $1 AND step_slug = 'refuse'",
    )
    .bind(run)
    .fetch_one(pool)
    .await
    .expect("task");
    assert_eq!(attempts, 1);
    worker.shutdown().await.expect("shutdown");
}

/// `no_retry` is a flag the worker passes to `fail_task`, not an attempts count pushed to the
/// step's maximum: the run's failure tells the one attempt that ran (issue 19).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_retry_failure_says_one_attempt_ran_not_the_steps_maximum() {
    let db = database().await;
    let pool = db.pool();
    let refuse =
        step_fn("refuse")
            .max_attempts(5)
            .handler(|_n: u32, _ctx: StepContext| async move {
                Err::<u32, _>(StepError::new("invalid order").no_retry())
            });
    let flow: Flow<u32> = Flow::new("refused_once").step(refuse).build();
    let client = Client::new(pool.clone());
    client.compile(&flow).await.expect("compiled");
    let worker = Worker::builder(pool.clone())
        .flow(flow.clone())
        .spawn()
        .expect("worker");

    let run = client.start(&flow, &1).await.expect("started");
    let outcome = tokio::time::timeout(Duration::from_secs(30), run.wait())
        .await
        .expect("the run ends");
    let Err(pgflow_client::Error::RunFailed(failure)) = outcome else {
        panic!("the run did not fail: {outcome:?}");
    };
    assert_eq!(failure.step_slug, "refuse");
    assert_eq!(failure.task_index, Some(0));
    assert_eq!(failure.attempts, 1, "{failure}");
    let text = failure.to_string();
    assert!(text.contains(" after 1 attempt: invalid order"), "{text}");
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_outliving_its_timeout_is_cancelled_and_failed() {
    let db = database().await;
    let pool = db.pool();
    let cancelled = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&cancelled);
    let slow = step_fn("slow")
        .max_attempts(1)
        .handler(move |_n: u32, ctx: StepContext| {
            let seen = Arc::clone(&seen);
            async move {
                let token = ctx.cancellation_token().clone();
                // Observe the token from outside the handler's future, which is dropped.
                tokio::spawn(async move {
                    token.cancelled().await;
                    seen.store(true, Ordering::SeqCst);
                });
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok::<_, StepError>(0_u32)
            }
        });
    let flow: Flow<u32> = Flow::new("timeouts").step(slow).build();
    compile(pool, &flow).await;
    set_engine_options(pool, "timeouts", None, &[("timeout", 1)]).await;
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .spawn()
        .expect("worker");

    let began = std::time::Instant::now();
    let run = start(pool, "timeouts", json!(1)).await;
    let (status, _) = finished(pool, run, Duration::from_secs(20)).await;
    assert_eq!(status, "failed");
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    let error = step_error(pool, run, "slow")
        .await
        .expect("an error message");
    assert!(
        error.contains("timed out") && error.contains("timeout of 1 s"),
        "{error}"
    );
    eventually("the token to fire", Duration::from_secs(5), async || {
        cancelled.load(Ordering::SeqCst)
    })
    .await;
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_the_database_refuses_fails_only_its_own_task() {
    let db = database().await;
    let pool = db.pool();
    // jsonb has no place for \u0000: storing this output fails, the other elements' do not.
    // Two attempts, so that the run fails only after the others were reported (completing a
    // task of a failed run changes nothing).
    let echo = step_fn("echo").map_over_input().max_attempts(2).handler(
        |text: String, _ctx: StepContext| async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, StepError>(text.replace("NUL", "\0"))
        },
    );
    let flow: Flow<Vec<String>> = Flow::new("nul_bytes").step(echo).build();
    compile(pool, &flow).await;
    set_engine_options(pool, "nul_bytes", None, NO_BACKOFF).await;
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .spawn()
        .expect("worker");

    let run = start(pool, "nul_bytes", json!(["a", "b", "cNUL", "d"])).await;
    let (status, _) = finished(pool, run, Duration::from_secs(30)).await;
    assert_eq!(status, "failed");
    let tasks = tasks(pool, run).await;
    let statuses: Vec<&str> = tasks.iter().map(|task| task.status.as_str()).collect();
    assert_eq!(
        statuses,
        ["completed", "completed", "failed", "completed"],
        "{tasks:?}"
    );
    assert_eq!(tasks[2].attempts_count, 2, "retried once");
    let error = tasks[2].error_message.as_deref().unwrap_or_default();
    assert!(error.contains("could not be stored"), "{error}");
    worker.shutdown().await.expect("shutdown");
}

//! Load: many runs through several workers at once, some of whose tasks fail once and are
//! retried; then every run is checked and the invariants hold. The short form runs in CI; the
//! long form is `#[ignore]`d and sized by `PGFLOW_SOAK_RUNS`.

use std::time::{Duration, Instant};

use pgflow_client::Client;
use pgflow_core::{Flow, StepContext, StepError, step_fn};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;

use super::{Executions, env_size, worker};
use crate::support::{assert_consistent, database, finished_all, set_engine_options, tasks_of};

/// `n` → `[0..n % 5)` → each doubled (a map; an element divisible by 7 fails its first attempt)
/// → their sum, plus `n`.
fn soak_flow(executions: &Executions) -> Flow<u64> {
    let seen = executions.clone();
    let spread = step_fn("spread").handler(move |n: u64, ctx: StepContext| {
        seen.record(&ctx);
        async move { Ok::<_, StepError>((0..n % 5).map(|i| n + i).collect::<Vec<u64>>()) }
    });
    let seen = executions.clone();
    let double = step_fn("double")
        .map_over(&spread)
        .handler(move |x: u64, ctx: StepContext| {
            seen.record(&ctx);
            async move {
                if x.is_multiple_of(7) && ctx.attempt() == 1 {
                    return Err(StepError::new(format!("{x} fails once")));
                }
                Ok::<_, StepError>(x * 2)
            }
        });
    let seen = executions.clone();
    let total = step_fn("total").depends_on(&double).handler(
        move |n: u64, doubled: Vec<u64>, ctx: StepContext| {
            seen.record(&ctx);
            async move { Ok::<_, StepError>(n + doubled.iter().sum::<u64>()) }
        },
    );
    Flow::new("soak")
        .max_attempts(3)
        .step(spread)
        .step(double)
        .step(total)
        .build()
}

fn expected_total(n: u64) -> u64 {
    n + (0..n % 5).map(|i| (n + i) * 2).sum::<u64>()
}

async fn soak(runs: usize, workers: usize) {
    let began = Instant::now();
    let db = database().await;
    let pool = db.pool();
    let executions = Executions::default();
    let flow = soak_flow(&executions);
    let client = Client::new(pool.clone());
    client.compile(&flow).await.expect("compile");
    // Retried at once: set in the engine, below the builder's bound.
    set_engine_options(pool, "soak", Some("double"), &[("base_delay", 0)]).await;
    let mut handles = Vec::new();
    for _ in 0..workers {
        let own = PgPoolOptions::new()
            .max_connections(6)
            .connect(db.url())
            .await
            .expect("worker pool");
        handles.push((worker(&own, &flow, 10), own));
    }

    let inputs: Vec<u64> = (0..runs)
        .map(|i| u64::try_from(i).unwrap_or_default())
        .collect();
    let mut ids = Vec::with_capacity(runs);
    for chunk in inputs.chunks(50) {
        let started =
            futures_util::future::join_all(chunk.iter().map(|n| client.start(&flow, n))).await;
        ids.extend(started.into_iter().map(|run| run.expect("start").id()));
    }
    let within = Duration::from_secs(60 + u64::try_from(runs / 20).unwrap_or(0));
    let results = finished_all(pool, &ids, within).await;
    for ((id, n), (status, output)) in ids.iter().zip(&inputs).zip(&results) {
        assert_eq!(status, "completed", "run {id}");
        assert_eq!(
            output.as_ref(),
            Some(&json!({"total": expected_total(*n)})),
            "run {id}"
        );
    }

    // Every task completed once, retried exactly when its handler failed, and ran no more
    // often than its attempts.
    let tasks = tasks_of(pool, &ids).await;
    let expected_tasks: u64 = inputs.iter().map(|n| n % 5 + 2).sum();
    assert_eq!(
        u64::try_from(tasks.len()).unwrap_or_default(),
        expected_tasks
    );
    let mut retried = 0;
    for task in &tasks {
        let (run, step, index) = (task.run_id, &task.step_slug, task.task_index);
        let attempts = task.attempts_count;
        assert_eq!(task.status, "completed");
        let ran = executions.of(run, step, u32::try_from(index).unwrap_or_default());
        assert!(
            ran >= 1 && i64::from(ran) <= i64::from(attempts),
            "{run} {step}/{index}: ran {ran} times in {attempts} attempts"
        );
        retried += usize::from(attempts > 1);
    }
    assert!(retried > 0, "some tasks were retried");
    let mut reported = 0;
    for (worker, own) in handles {
        let stats = worker.stats();
        reported += stats.completed;
        worker.shutdown().await.expect("shutdown");
        own.close().await;
    }
    assert_eq!(reported, expected_tasks, "each completion reported once");
    assert_consistent(pool).await;
    eprintln!(
        "soak: {runs} runs, {expected_tasks} tasks through {workers} workers in {:?}",
        began.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_runs_through_three_workers_keep_the_invariants() {
    soak(200, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long form: PGFLOW_SOAK_RUNS runs (default 5000) through PGFLOW_SOAK_WORKERS workers"]
async fn many_runs_through_three_workers_keep_the_invariants_long() {
    soak(
        env_size("PGFLOW_SOAK_RUNS", 5000),
        env_size("PGFLOW_SOAK_WORKERS", 3),
    )
    .await;
}

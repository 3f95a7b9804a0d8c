//! Two worker *processes* on one flow: every task attempt runs in exactly one of them.
//!
//! Both workers are this test binary re-executed to run only [`process_worker`], an ignored
//! test that serves the flow on the database named by `PGFLOW_PROCESS_WORKER_DB` (and does
//! nothing without it). Each handler records which process ran which attempt of which task.

use std::time::Duration;

use pgflow_client::{Client, StepContextExt, Worker};
use pgflow_core::{Flow, StepContext, StepError, step_fn};
use serde_json::json;

use super::{ChildProcess, serve_in_child};
use crate::support::{assert_consistent, database, finished_all, start};

const PROCESS_DB: &str = "PGFLOW_PROCESS_WORKER_DB";
const RUNS: usize = 10;
const ITEMS: u64 = 30;

/// `n` → `[0, n)` → each doubled (a map step) → their sum; every handler records itself.
fn shared_flow() -> Flow<u64> {
    let items = step_fn("items").handler(|n: u64, ctx: StepContext| async move {
        record(&ctx).await?;
        Ok::<_, StepError>((0..n).collect::<Vec<u64>>())
    });
    let double =
        step_fn("double")
            .map_over(&items)
            .handler(|x: u64, ctx: StepContext| async move {
                record(&ctx).await?;
                // A little work, so that both processes get some.
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok::<_, StepError>(x * 2)
            });
    let total = step_fn("total").depends_on(&double).handler(
        |_n: u64, doubled: Vec<u64>, ctx: StepContext| async move {
            record(&ctx).await?;
            Ok::<_, StepError>(doubled.iter().sum::<u64>())
        },
    );
    Flow::new("shared")
        .step(items)
        .step(double)
        .step(total)
        .build()
}

async fn record(ctx: &StepContext) -> Result<(), StepError> {
    sqlx::query(
        "INSERT INTO public.executions (run_id, step_slug, task_index, attempt, pid)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(ctx.run_id())
    .bind(ctx.step_slug())
    .bind(i32::try_from(ctx.task_index()).unwrap_or(i32::MAX))
    .bind(i32::try_from(ctx.attempt()).unwrap_or(i32::MAX))
    .bind(i64::from(std::process::id()))
    .execute(ctx.pool())
    .await?;
    Ok(())
}

/// A worker process's body: serves [`shared_flow`] until killed (or a minute has passed).
#[test]
#[ignore = "the worker of a child process started by the two-process test"]
fn process_worker() {
    let Some(url) = std::env::var_os(PROCESS_DB) else {
        return;
    };
    serve_in_child(&url.to_string_lossy(), |pool| {
        Worker::builder(pool).flow(shared_flow()).concurrency(8)
    });
}

/// A worker process serving [`shared_flow`] on `url`.
fn spawn_worker(url: &str) -> ChildProcess {
    ChildProcess::spawn(
        "reliability::processes::process_worker",
        &[(PROCESS_DB, url.to_owned())],
    )
}

#[tokio::test]
async fn two_worker_processes_never_run_the_same_task_attempt_twice() {
    let db = database().await;
    let pool = db.pool();
    sqlx::query(
        "CREATE TABLE public.executions
           (run_id uuid, step_slug text, task_index int, attempt int, pid bigint)",
    )
    .execute(pool)
    .await
    .expect("executions table");
    Client::new(pool.clone())
        .compile(&shared_flow())
        .await
        .expect("compile");

    let workers = [spawn_worker(db.url()), spawn_worker(db.url())];
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        runs.push(start(pool, "shared", json!(ITEMS)).await);
    }
    let finished = finished_all(pool, &runs, Duration::from_secs(90)).await;
    drop(workers);

    let expected = (0..ITEMS).map(|x| x * 2).sum::<u64>();
    for (status, output) in &finished {
        assert_eq!(status, "completed");
        assert_eq!(output.as_ref(), Some(&json!({ "total": expected })));
    }
    let duplicates: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM public.executions
                                GROUP BY run_id, step_slug, task_index, attempt
                               HAVING count(*) > 1) d",
    )
    .fetch_one(pool)
    .await
    .expect("duplicates");
    assert_eq!(duplicates, 0, "a task attempt ran twice");
    let tasks = usize::try_from(RUNS as u64 * (ITEMS + 2)).expect("small");
    let executions: i64 = sqlx::query_scalar("SELECT count(*) FROM public.executions")
        .fetch_one(pool)
        .await
        .expect("executions");
    assert_eq!(usize::try_from(executions).expect("count"), tasks);
    let processes: i64 = sqlx::query_scalar("SELECT count(DISTINCT pid) FROM public.executions")
        .fetch_one(pool)
        .await
        .expect("processes");
    assert_eq!(processes, 2, "both processes took tasks");
    assert_consistent(pool).await;
}

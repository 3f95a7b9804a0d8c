//! A worker *process* killed with SIGKILL in the middle of a task.
//!
//! The worker runs in a child process: this test binary itself, re-executed to run only
//! [`child_worker`], an ignored test that serves a flow on the database named by
//! `PGFLOW_CHILD_WORKER_DB` (and does nothing without it). The parent waits until the child has
//! started the slow step's task, kills it outright, and lets a worker of its own finish the run
//! once the task's message reappears.

use std::time::{Duration, Instant};

use pgflow_client::throwaway::TestDatabase;
use pgflow_client::{Client, StepContextExt, Worker};
use pgflow_core::{Flow, StepContext, StepError, step_fn};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::{ChildProcess, serve_in_child};
use crate::support::{
    assert_consistent, database, finished_all, set_engine_options, start, tasks_of,
};

/// The database the child worker serves.
const CHILD_DB: &str = "PGFLOW_CHILD_WORKER_DB";
/// The `max_attempts` of the slow step in the child's flow.
const CHILD_ATTEMPTS: &str = "PGFLOW_CHILD_WORKER_ATTEMPTS";
/// How long the slow step may run before its attempt is over (and its message reappears 2 s
/// later): set in the engine, below the builder's bound.
const TIMEOUT: i32 = 2;

/// `n` → `n + 1` → `× 10` (slow in the child: it hangs until killed) → `+ 1`.
///
/// Every handler writes a row to `executions` first: which process ran which attempt.
fn crash_flow(slow_attempts: u32) -> Flow<u64> {
    let first = step_fn("first").handler(|n: u64, ctx: StepContext| async move {
        record(&ctx).await?;
        Ok::<_, StepError>(n + 1)
    });
    let slow = step_fn("slow")
        .depends_on(&first)
        .max_attempts(slow_attempts)
        .handler(|_n: u64, first: u64, ctx: StepContext| async move {
            record(&ctx).await?;
            if std::env::var_os(CHILD_DB).is_some() {
                // The child never finishes this: it is killed first.
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Ok::<_, StepError>(first * 10)
        });
    let last = step_fn("last").depends_on(&slow).handler(
        |_n: u64, slow: u64, ctx: StepContext| async move {
            record(&ctx).await?;
            Ok::<_, StepError>(slow + 1)
        },
    );
    Flow::new("crash").step(first).step(slow).step(last).build()
}

async fn record(ctx: &StepContext) -> Result<(), StepError> {
    sqlx::query(
        "INSERT INTO public.executions (run_id, step_slug, attempt, pid) VALUES ($1, $2, $3, $4)",
    )
    .bind(ctx.run_id())
    .bind(ctx.step_slug())
    .bind(i32::try_from(ctx.attempt()).unwrap_or(i32::MAX))
    .bind(i64::from(std::process::id()))
    .execute(ctx.pool())
    .await?;
    Ok(())
}

/// The child process's body: a worker for [`crash_flow`] on `PGFLOW_CHILD_WORKER_DB`, until it
/// is killed (or a minute has passed, should the parent be gone).
#[test]
#[ignore = "the worker of a child process started by the crash tests"]
fn child_worker() {
    let Some(url) = std::env::var_os(CHILD_DB) else {
        return;
    };
    let attempts = std::env::var(CHILD_ATTEMPTS)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(3);
    serve_in_child(&url.to_string_lossy(), |pool| {
        Worker::builder(pool)
            .flow(crash_flow(attempts))
            .poll_interval(Duration::from_millis(50))
    });
}

/// The child worker process serving [`crash_flow`] on `url`.
fn spawn_child(url: &str, slow_attempts: u32) -> ChildProcess {
    ChildProcess::spawn(
        "reliability::crash::child_worker",
        &[
            (CHILD_DB, url.to_owned()),
            (CHILD_ATTEMPTS, slow_attempts.to_string()),
        ],
    )
}

/// A database with the flow compiled and the `executions` table; starts a run of `n`.
async fn prepare(slow_attempts: u32) -> (TestDatabase, Uuid) {
    let db = database().await;
    let pool = db.pool();
    sqlx::query(
        "CREATE TABLE public.executions (run_id uuid, step_slug text, attempt int, pid bigint)",
    )
    .execute(pool)
    .await
    .expect("executions table");
    Client::new(pool.clone())
        .compile(&crash_flow(slow_attempts))
        .await
        .expect("compile");
    let timing = [("timeout", TIMEOUT), ("base_delay", 0)];
    set_engine_options(pool, "crash", Some("slow"), &timing).await;
    let run = start(pool, "crash", json!(4)).await;
    (db, run)
}

/// Waits until the child's handler of the slow task is running; returns its worker id.
async fn until_slow_started(pool: &PgPool, run: Uuid, child: &mut ChildProcess) -> Uuid {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let started: Option<(Uuid, i32)> = sqlx::query_as(
            "SELECT last_worker_id, attempts_count FROM pgflow.step_tasks t \
              WHERE run_id = $1 AND step_slug = 'slow' AND status = 'started' \
                AND EXISTS (SELECT 1 FROM public.executions e \
                             WHERE e.run_id = t.run_id AND e.step_slug = 'slow')",
        )
        .bind(run)
        .fetch_optional(pool)
        .await
        .expect("slow task");
        if let Some((worker, attempts)) = started {
            assert_eq!(attempts, 1);
            return worker;
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("the child worker exited early: {status:?}");
        }
        assert!(
            Instant::now() < deadline,
            "the child never started the slow task"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// (step, attempt, pid) of every handler execution of the run.
async fn executions(pool: &PgPool, run: Uuid) -> Vec<(String, i32, i64)> {
    sqlx::query_as(
        "SELECT step_slug, attempt, pid FROM public.executions WHERE run_id = $1 \
          ORDER BY step_slug, attempt",
    )
    .bind(run)
    .fetch_all(pool)
    .await
    .expect("executions")
}

/// Kills the child while its handler of `slow` runs; returns the child's pid and worker id.
async fn kill_mid_task(db: &TestDatabase, run: Uuid, slow_attempts: u32) -> (i64, Uuid) {
    let pool = db.pool();
    let mut child = spawn_child(db.url(), slow_attempts);
    let child_worker = until_slow_started(pool, run, &mut child).await;
    child.kill();
    let pid = child.pid();
    // Dead mid-task: the task is still `started` by the child, on its first attempt.
    let (status, attempts, worker): (String, i32, Uuid) = sqlx::query_as(
        "SELECT status, attempts_count, last_worker_id FROM pgflow.step_tasks \
          WHERE run_id = $1 AND step_slug = 'slow'",
    )
    .bind(run)
    .fetch_one(pool)
    .await
    .expect("slow task");
    assert_eq!(
        (status.as_str(), attempts, worker),
        ("started", 1, child_worker)
    );
    (pid, child_worker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_killed_mid_task_is_replaced_and_the_attempt_counted() {
    let (db, run) = prepare(3).await;
    let pool = db.pool();
    let (child_pid, _) = kill_mid_task(&db, run, 3).await;

    // A second worker picks the task up once its message reappears (timeout + 2 s).
    let began = Instant::now();
    let worker = Worker::builder(pool.clone())
        .flow(crash_flow(3))
        .spawn()
        .expect("worker");
    let results = finished_all(pool, &[run], Duration::from_secs(30)).await;
    assert_eq!(
        results[0],
        ("completed".to_owned(), Some(json!({"last": 51})))
    );
    assert!(began.elapsed() < Duration::from_secs(15), "{began:?}");

    let tasks = tasks_of(pool, &[run]).await;
    let attempts: Vec<(&str, &str, i32, Option<&str>)> = tasks
        .iter()
        .map(|task| {
            (
                task.step_slug.as_str(),
                task.status.as_str(),
                task.attempts_count,
                task.error_message.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        attempts,
        [
            ("first", "completed", 1, None),
            ("last", "completed", 1, None),
            ("slow", "completed", 2, None),
        ],
        "the lost attempt is counted, and nothing was failed on its behalf"
    );
    // At least once: the slow handler ran twice, once in each process.
    let me = i64::from(std::process::id());
    assert_eq!(
        executions(pool, run).await,
        [
            ("first".to_owned(), 1, child_pid),
            ("last".to_owned(), 1, me),
            ("slow".to_owned(), 1, child_pid),
            ("slow".to_owned(), 2, me),
        ]
    );
    assert_consistent(pool).await;
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_killed_on_the_last_attempt_fails_the_run_with_a_clear_message() {
    let (db, run) = prepare(1).await;
    let pool = db.pool();
    let (child_pid, _) = kill_mid_task(&db, run, 1).await;

    let worker = Worker::builder(pool.clone())
        .flow(crash_flow(1))
        .spawn()
        .expect("worker");
    let results = finished_all(pool, &[run], Duration::from_secs(30)).await;
    assert_eq!(results[0], ("failed".to_owned(), None));
    let error: Option<String> = sqlx::query_scalar(
        "SELECT error_message FROM pgflow.step_states WHERE run_id = $1 AND step_slug = 'slow'",
    )
    .bind(run)
    .fetch_one(pool)
    .await
    .expect("step state");
    assert_eq!(
        error.as_deref(),
        Some(
            "Task did not finish within its timeout of 2 seconds on attempt 1 (its worker was lost)"
        )
    );
    let tasks = tasks_of(pool, &[run]).await;
    let slow = tasks
        .iter()
        .find(|task| task.step_slug == "slow")
        .expect("slow");
    assert_eq!((slow.status.as_str(), slow.attempts_count), ("failed", 1));
    // The slow handler ran once, in the killed process; `last` never ran.
    assert_eq!(
        executions(pool, run).await,
        [
            ("first".to_owned(), 1, child_pid),
            ("slow".to_owned(), 1, child_pid)
        ]
    );
    assert_consistent(pool).await;
    worker.shutdown().await.expect("shutdown");
}

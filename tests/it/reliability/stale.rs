//! A report from an earlier attempt never changes a later one.
//!
//! Two worker processes serve one flow: this test binary re-executed to run only
//! [`child_worker`]. The first takes the task's first attempt and then goes quiet past the
//! step's timeout, either stopped by SIGSTOP or with its handler blocking its thread; the
//! second starts the task's second attempt when its message reappears. While that attempt
//! still runs, the first worker wakes up and reports its attempt's failure. The failure must
//! change nothing: the second attempt completes the run.

use std::time::{Duration, Instant};

use pgflow_client::{Client, StepContextExt, Worker};
use pgflow_core::{Flow, StepContext, StepError, step_fn};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::{ChildProcess, serve_in_child};
use crate::support::{assert_consistent, database, finished_all, set_engine_options, start};

/// The database the child worker serves.
const CHILD_DB: &str = "PGFLOW_STALE_WORKER_DB";
/// How the first attempt goes quiet and how it fails: a [`Quiet`] and an [`ErrorKind`].
const CHILD_MODE: &str = "PGFLOW_STALE_WORKER_MODE";
/// A file the test creates once the second attempt runs: a blocked handler waits for it.
const CHILD_GO: &str = "PGFLOW_STALE_WORKER_GO";
/// The step's timeout: its message reappears for another worker `TIMEOUT + 2` s after a start.
/// Set in the engine, below the builder's bound.
const TIMEOUT: i32 = 2;
/// How long the second attempt runs: long enough for the first worker's late report to
/// arrive while it is still the task's current attempt, short of the step's timeout.
const SECOND_ATTEMPT: Duration = Duration::from_millis(1500);

/// How the first attempt outlives its timeout.
#[derive(Clone, Copy, Debug)]
enum Quiet {
    /// Its process is stopped (SIGSTOP) by the test, then continued (SIGCONT).
    Paused,
    /// Its handler blocks the thread it runs on until the second attempt runs (the test
    /// creates the file [`CHILD_GO`] names).
    BlockedThread,
}

/// How the first attempt fails.
#[derive(Clone, Copy, Debug)]
enum ErrorKind {
    Retryable,
    Permanent,
}

fn mode(quiet: Quiet, error: ErrorKind) -> String {
    format!("{quiet:?}/{error:?}")
}

/// One step, `work`: the first attempt fails after going quiet, any later one succeeds after
/// [`SECOND_ATTEMPT`]. Two attempts at most: before the fix, a late failure landing on the
/// second attempt failed the run (exhausted, or permanent).
fn stale_flow(quiet: Quiet, error: ErrorKind, go: Option<std::path::PathBuf>) -> Flow<u64> {
    let work = step_fn("work")
        .max_attempts(2)
        .handler(move |n: u64, ctx: StepContext| {
            let go = go.clone();
            async move {
                record(&ctx).await?;
                if ctx.attempt() > 1 {
                    tokio::time::sleep(SECOND_ATTEMPT).await;
                    return Ok::<_, StepError>(n * 10);
                }
                match quiet {
                    // Stopped by the test meanwhile: this sleep ends as soon as it is continued.
                    Quiet::Paused => tokio::time::sleep(Duration::from_secs(1)).await,
                    // Deliberately blocking its thread, as a careless handler does.
                    Quiet::BlockedThread => {
                        let deadline = Instant::now() + Duration::from_secs(30);
                        while go.as_ref().is_some_and(|go| !go.exists())
                            && Instant::now() < deadline
                        {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
                Err(match error {
                    ErrorKind::Retryable => StepError::new("first attempt failed late"),
                    ErrorKind::Permanent => StepError::new("first attempt failed late").no_retry(),
                })
            }
        });
    Flow::new("stale").step(work).build()
}

async fn record(ctx: &StepContext) -> Result<(), StepError> {
    sqlx::query("INSERT INTO public.executions (attempt, pid) VALUES ($1, $2)")
        .bind(i32::try_from(ctx.attempt()).unwrap_or(i32::MAX))
        .bind(i64::from(std::process::id()))
        .execute(ctx.pool())
        .await?;
    Ok(())
}

/// The child process's body: a worker for [`stale_flow`] on `PGFLOW_STALE_WORKER_DB`.
#[test]
#[ignore = "the worker of a child process started by the stale-report tests"]
fn child_worker() {
    let Some(url) = std::env::var_os(CHILD_DB) else {
        return;
    };
    let mode = std::env::var(CHILD_MODE).unwrap_or_default();
    let quiet = if mode.starts_with("Paused") {
        Quiet::Paused
    } else {
        Quiet::BlockedThread
    };
    let error = if mode.ends_with("Permanent") {
        ErrorKind::Permanent
    } else {
        ErrorKind::Retryable
    };
    let go = std::env::var_os(CHILD_GO).map(std::path::PathBuf::from);
    // One task at a time: a worker whose only handler is blocked cannot take attempt 2 itself.
    serve_in_child(&url.to_string_lossy(), |pool| {
        Worker::builder(pool)
            .flow(stale_flow(quiet, error, go))
            .concurrency(1)
            .poll_interval(Duration::from_millis(50))
    });
}

/// The task's (status, attempts_count, last_worker_id).
async fn task(pool: &PgPool, run: Uuid) -> (String, i32, Option<Uuid>) {
    sqlx::query_as(
        "SELECT status, attempts_count, last_worker_id FROM pgflow.step_tasks WHERE run_id = $1",
    )
    .bind(run)
    .fetch_one(pool)
    .await
    .expect("task")
}

/// Waits until the task is `started` on attempt `attempt` with its handler running.
async fn until_attempt_runs(pool: &PgPool, run: Uuid, attempt: i32) -> Uuid {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, attempts, worker) = task(pool, run).await;
        let ran: i64 =
            sqlx::query_scalar("SELECT count(*) FROM public.executions WHERE attempt = $1")
                .bind(attempt)
                .fetch_one(pool)
                .await
                .expect("executions");
        if status == "started" && attempts == attempt && ran > 0 {
            return worker.expect("a started task names its worker");
        }
        assert!(
            Instant::now() < deadline,
            "attempt {attempt} never ran: {status}, {attempts} attempts"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn signal(child: &ChildProcess, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &child.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {signal}");
}

async fn late_report_changes_nothing(quiet: Quiet, error: ErrorKind) {
    let db = database().await;
    let pool = db.pool();
    sqlx::query("CREATE TABLE public.executions (attempt int, pid bigint)")
        .execute(pool)
        .await
        .expect("executions table");
    Client::new(pool.clone())
        .compile(&stale_flow(quiet, error, None))
        .await
        .expect("compile");
    let timing = [("timeout", TIMEOUT), ("base_delay", 0)];
    set_engine_options(pool, "stale", Some("work"), &timing).await;
    let run = start(pool, "stale", json!(4)).await;
    let go = std::env::temp_dir().join(format!("pgflow-stale-go-{}", Uuid::new_v4()));
    let env = |()| {
        [
            (CHILD_DB, db.url().to_owned()),
            (CHILD_MODE, mode(quiet, error)),
            (CHILD_GO, go.to_string_lossy().into_owned()),
        ]
    };

    let first = ChildProcess::spawn("reliability::stale::child_worker", &env(()));
    let first_worker = until_attempt_runs(pool, run, 1).await;
    if let Quiet::Paused = quiet {
        signal(&first, "-STOP");
    }
    let second = ChildProcess::spawn("reliability::stale::child_worker", &env(()));
    let second_worker = until_attempt_runs(pool, run, 2).await;
    assert_ne!(
        first_worker, second_worker,
        "another process took attempt 2"
    );
    match quiet {
        Quiet::Paused => signal(&first, "-CONT"),
        Quiet::BlockedThread => std::fs::write(&go, b"go").expect("go file"),
    }

    // The first worker reports its failure while attempt 2 still runs; then attempt 2 ends.
    let results = finished_all(pool, &[run], Duration::from_secs(30)).await;
    assert_eq!(
        results[0],
        ("completed".to_owned(), Some(json!({"work": 40}))),
        "{quiet:?}/{error:?}: the late failure of attempt 1 must not touch attempt 2"
    );
    let (status, attempts, worker) = task(pool, run).await;
    assert_eq!(
        (status.as_str(), attempts, worker),
        ("completed", 2, Some(second_worker))
    );
    let executions: Vec<(i32, i64)> =
        sqlx::query_as("SELECT attempt, pid FROM public.executions ORDER BY attempt")
            .fetch_all(pool)
            .await
            .expect("executions");
    assert_eq!(
        executions,
        vec![(1, first.pid()), (2, second.pid())],
        "one execution per attempt, one in each process"
    );
    let _ = std::fs::remove_file(&go);
    assert_consistent(pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_s_late_retryable_failure_does_not_touch_the_next_attempt() {
    late_report_changes_nothing(Quiet::Paused, ErrorKind::Retryable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_s_late_permanent_failure_does_not_touch_the_next_attempt() {
    late_report_changes_nothing(Quiet::Paused, ErrorKind::Permanent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_handler_s_late_retryable_failure_does_not_touch_the_next_attempt() {
    late_report_changes_nothing(Quiet::BlockedThread, ErrorKind::Retryable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_handler_s_late_permanent_failure_does_not_touch_the_next_attempt() {
    late_report_changes_nothing(Quiet::BlockedThread, ErrorKind::Permanent).await;
}

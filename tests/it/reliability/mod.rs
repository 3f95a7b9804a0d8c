//! Reliability: faults injected for real (a worker process killed with SIGKILL, the database
//! server restarted, connections cut while results are reported), random flows checked against
//! a reference model of the spec, load, and bad input. After every scenario the invariant
//! checker must find nothing. `docs/guarantees.md` names these tests line by line.
//!
//! Everything here runs in a bounded short form; the longer variants are `#[ignore]`d and sized
//! by environment variables (`PGFLOW_SOAK_RUNS`, `PGFLOW_MODEL_CASES`).

mod bad_input;
mod conditions_model;
mod connection;
mod crash;
mod model;
mod poison;
mod processes;
mod restart;
mod run_control_model;
mod soak;
mod stale;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgflow_client::{Client, Worker, WorkerBuilder, WorkerHandle};
use pgflow_core::{Flow, StepContext, StepError, step_fn};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{assert_consistent, count_tasks, finished_all, set_engine_options, tasks_of};

/// A task: (run, step, task index).
type TaskKey = (Uuid, String, u32);

/// Counts handler executions per task: how many times a handler ran for it.
#[derive(Clone, Default)]
pub struct Executions(Arc<Mutex<HashMap<TaskKey, u32>>>);

impl Executions {
    pub fn record(&self, ctx: &StepContext) {
        let key = (ctx.run_id(), ctx.step_slug().to_owned(), ctx.task_index());
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default() += 1;
    }

    pub fn of(&self, run_id: Uuid, step: &str, index: u32) -> u32 {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(run_id, step.to_owned(), index))
            .copied()
            .unwrap_or(0)
    }
}

/// `n` → `[0, 1, .., n-1]` → each squared after `delay` (a map step) → their sum. Compile it
/// with [`compile_squares`], which gives it its timing.
pub fn squares(slug: &str, delay: Duration, executions: &Executions) -> Flow<u64> {
    let seen = executions.clone();
    let range = step_fn("range").handler(move |n: u64, ctx: StepContext| {
        seen.record(&ctx);
        async move { Ok::<_, StepError>((0..n).collect::<Vec<u64>>()) }
    });
    let seen = executions.clone();
    let square = step_fn("square")
        .map_over(&range)
        .handler(move |x: u64, ctx: StepContext| {
            seen.record(&ctx);
            async move {
                tokio::time::sleep(delay).await;
                Ok::<_, StepError>(x * x)
            }
        });
    let seen = executions.clone();
    let sum = step_fn("sum").depends_on(&square).handler(
        move |_n: u64, squares: Vec<u64>, ctx: StepContext| {
            seen.record(&ctx);
            async move { Ok::<_, StepError>(squares.iter().sum::<u64>()) }
        },
    );
    Flow::new(slug)
        .max_attempts(5)
        .step(range)
        .step(square)
        .step(sum)
        .build()
}

/// Compiles a flow of [`squares`] and sets its timing in the engine: no backoff, and step
/// timeouts of 2 s, so that a task whose worker was lost reappears 4 s after it started.
pub async fn compile_squares(pool: &PgPool, flow: &Flow<u64>) {
    Client::new(pool.clone())
        .compile(flow)
        .await
        .expect("compile");
    set_engine_options(
        pool,
        flow.slug(),
        None,
        &[("base_delay", 0), ("timeout", 2)],
    )
    .await;
}

/// The sum of the squares below `n`: what a run of [`squares`] outputs under `sum`.
pub fn sum_of_squares(n: u64) -> u64 {
    (0..n).map(|x| x * x).sum()
}

/// Checks runs of [`squares`] with inputs `inputs` after faults: every run completed with the
/// right output, every task completed exactly once (its step and run agree, see the checker),
/// and no task's handler ran more often than the engine counted attempts (at least once each).
pub async fn assert_squares_completed(
    pool: &PgPool,
    runs: &[Uuid],
    inputs: &[u64],
    executions: &Executions,
    within: Duration,
) {
    let results = finished_all(pool, runs, within).await;
    for ((run, n), (status, output)) in runs.iter().zip(inputs).zip(&results) {
        assert_eq!(status, "completed", "run {run}");
        assert_eq!(
            output.as_ref(),
            Some(&json!({"sum": sum_of_squares(*n)})),
            "run {run}"
        );
    }
    let tasks = tasks_of(pool, runs).await;
    let expected: u64 = inputs.iter().map(|n| n + 2).sum();
    assert_eq!(
        u64::try_from(tasks.len()).unwrap_or_default(),
        expected,
        "one row per task"
    );
    for task in &tasks {
        let (run, step, index) = (task.run_id, &task.step_slug, task.task_index);
        assert_eq!(task.status, "completed", "{run} {step} {index}");
        let ran = executions.of(run, step, u32::try_from(index).unwrap_or_default());
        let attempts = task.attempts_count;
        assert!(
            ran >= 1 && i64::from(ran) <= i64::from(attempts),
            "{run} {step}/{index}: handler ran {ran} times for {attempts} attempts"
        );
    }
    assert_consistent(pool).await;
}

/// Spawns a worker for `flow` on `pool`, polling often while notifications are down.
pub fn worker<I>(pool: &PgPool, flow: &Flow<I>, concurrency: usize) -> WorkerHandle {
    Worker::builder(pool.clone())
        .flow(flow.clone())
        .concurrency(concurrency)
        .poll_interval(Duration::from_millis(50))
        .max_poll_wait(Duration::from_secs(1))
        .shutdown_timeout(Duration::from_secs(10))
        .spawn()
        .expect("worker")
}

/// Waits until `at_least` tasks are completed, tolerating a database that comes and goes.
pub async fn until_completed(pool: &PgPool, at_least: i64, within: Duration) {
    let deadline = Instant::now() + within;
    while count_tasks(pool, "completed").await.unwrap_or(0) < at_least {
        assert!(
            Instant::now() < deadline,
            "fewer than {at_least} tasks completed after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A size from the environment, or `default`.
pub fn env_size(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(default)
}

/// A worker in a child process: this test binary re-executed to run only the ignored test
/// `test`, with `env` set; killed and reaped when dropped, so a failing test leaves none behind.
pub struct ChildProcess(pub Child);

impl ChildProcess {
    pub fn spawn(test: &str, env: &[(&str, String)]) -> Self {
        let exe = std::env::current_exe().expect("the test binary");
        let child = Command::new(exe)
            .args(["--exact", test, "--include-ignored", "--test-threads=1"])
            .envs(env.iter().map(|(key, value)| (*key, value.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("child process starts");
        Self(child)
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        self.0.kill().expect("SIGKILL");
        let status = self.0.wait().expect("child reaped");
        assert!(!status.success(), "killed, not exited: {status:?}");
    }

    pub fn pid(&self) -> i64 {
        i64::from(self.0.id())
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The body of a child worker process: the worker `configure` builds on a pool of `url`,
/// served until the process is killed (or a minute has passed, should the parent be gone).
pub fn serve_in_child(url: &str, configure: impl FnOnce(PgPool) -> WorkerBuilder) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let pool = PgPool::connect(url).await.expect("child connects");
        let _worker = configure(pool).spawn().expect("child worker");
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
}

//! The baseline: a minimal SQL-only driver, one connection per client.
//!
//! Each client loops `pgmq.read_with_poll` (up to `batch` messages) → `pgflow.start_tasks` →
//! for each task: the step's handler, then `pgflow.complete_task` (one call, one transaction per
//! task). It is what pgflow's original measurements used, and shows the cost of the engine
//! alone; the worker rows add batching, notifications and concurrency on top.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use pgflow_core::{Flow, StepContext};
use serde_json::Value;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::measure::{BoxResult, Percentiles};

/// How the driver polls: `read_with_poll(queue, vt, batch, max_poll_seconds, poll_interval_ms)`.
pub(crate) const POLL_INTERVAL_MS: i32 = 10;
const MAX_POLL_SECONDS: i32 = 1;
const VISIBILITY_TIMEOUT: i32 = 30;

/// Client-side durations of each kind of SQL call, in microseconds.
#[derive(Debug, Default)]
pub(crate) struct CallTimes {
    /// `read_with_poll` calls that returned messages.
    pub(crate) read: Vec<f64>,
    pub(crate) start_tasks: Vec<f64>,
    pub(crate) complete_task: Vec<f64>,
    pub(crate) handler: Vec<f64>,
}

impl CallTimes {
    pub(crate) fn merge(&mut self, other: Self) {
        self.read.extend(other.read);
        self.start_tasks.extend(other.start_tasks);
        self.complete_task.extend(other.complete_task);
        self.handler.extend(other.handler);
    }

    /// (call, percentiles in microseconds) for the report.
    pub(crate) fn summary(&self) -> Vec<(&'static str, Percentiles)> {
        vec![
            (
                "read_with_poll (non-empty)",
                Percentiles::of(self.read.clone()),
            ),
            ("start_tasks", Percentiles::of(self.start_tasks.clone())),
            ("complete_task", Percentiles::of(self.complete_task.clone())),
            ("handler", Percentiles::of(self.handler.clone())),
        ]
    }
}

/// A running driver: `clients` connections draining `flow`'s queue until stopped.
#[derive(Debug)]
pub(crate) struct Driver {
    stop: Arc<AtomicBool>,
    /// Whether the clients keep their call times: off during a row's warm-up.
    recording: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<BoxResult<CallTimes>>>,
}

impl Driver {
    pub(crate) async fn start(
        url: &str,
        flow: &Flow<u64>,
        clients: usize,
        batch: i32,
    ) -> BoxResult<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let recording = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for _ in 0..clients {
            let mut conn = PgConnection::connect(url).await?;
            let worker_id = Uuid::new_v4();
            sqlx::query(
                "INSERT INTO pgflow.workers (worker_id, queue_name, function_name)
                 VALUES ($1, $2, 'bench-driver')",
            )
            .bind(worker_id)
            .bind(flow.slug())
            .execute(&mut conn)
            .await?;
            let flow = flow.clone();
            let stop = Arc::clone(&stop);
            let recording = Arc::clone(&recording);
            handles.push(tokio::spawn(async move {
                let times =
                    client_loop(&mut conn, &flow, worker_id, batch, &stop, &recording).await;
                conn.close().await?;
                times
            }));
        }
        Ok(Self {
            stop,
            recording,
            clients: handles,
        })
    }

    /// Keeps the call times of the polls that begin from now on (none are kept before).
    pub(crate) fn record_from_now(&self) {
        self.recording.store(true, Ordering::Relaxed);
    }

    /// Stops the clients (each after its current poll, at most a second) and returns their
    /// call timings.
    pub(crate) async fn stop(self) -> BoxResult<CallTimes> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = CallTimes::default();
        for client in self.clients {
            all.merge(client.await??);
        }
        Ok(all)
    }
}

async fn client_loop(
    conn: &mut PgConnection,
    flow: &Flow<u64>,
    worker_id: Uuid,
    batch: i32,
    stop: &AtomicBool,
    recording: &AtomicBool,
) -> BoxResult<CallTimes> {
    let mut all = CallTimes::default();
    let mut warm_up = CallTimes::default();
    let slug = flow.slug().to_owned();
    while !stop.load(Ordering::Relaxed) {
        let times = if recording.load(Ordering::Relaxed) {
            &mut all
        } else {
            &mut warm_up
        };
        let began = Instant::now();
        let msg_ids: Vec<i64> =
            sqlx::query_scalar("SELECT msg_id FROM pgmq.read_with_poll($1, $2, $3, $4, $5)")
                .bind(&slug)
                .bind(VISIBILITY_TIMEOUT)
                .bind(batch)
                .bind(MAX_POLL_SECONDS)
                .bind(POLL_INTERVAL_MS)
                .fetch_all(&mut *conn)
                .await?;
        if msg_ids.is_empty() {
            continue;
        }
        times.read.push(micros(began));

        let began = Instant::now();
        let tasks: Vec<(Uuid, String, i32, Value)> = sqlx::query_as(
            "SELECT run_id, step_slug, task_index, input FROM pgflow.start_tasks($1, $2, $3)",
        )
        .bind(&slug)
        .bind(&msg_ids)
        .bind(worker_id)
        .fetch_all(&mut *conn)
        .await?;
        times.start_tasks.push(micros(began));

        for (run_id, step_slug, task_index, input) in tasks {
            let began = Instant::now();
            let step = flow
                .find_step(&step_slug)
                .ok_or_else(|| format!("no step {step_slug} in {slug}"))?;
            let ctx = StepContext::builder(run_id, slug.as_str(), step_slug.as_str())
                .task_index(u32::try_from(task_index)?)
                .build();
            let output = step
                .call(input, ctx)
                .await
                .map_err(|error| format!("handler {slug}.{step_slug} failed: {error}"))?;
            times.handler.push(micros(began));

            let began = Instant::now();
            sqlx::query("SELECT 1 FROM pgflow.complete_task($1, $2, $3, $4)")
                .bind(run_id)
                .bind(&step_slug)
                .bind(task_index)
                .bind(&output)
                .fetch_all(&mut *conn)
                .await?;
            times.complete_task.push(micros(began));
        }
    }
    Ok(all)
}

fn micros(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e6
}

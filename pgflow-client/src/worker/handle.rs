//! A running worker's handle, and the counters it reads: [`WorkerHandle`], [`WorkerStats`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{Error, Result};

/// The live counters behind [`WorkerStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) started: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) stall_sweeps: AtomicU64,
    pub(crate) requeued: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> WorkerStats {
        WorkerStats {
            started: self.started.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
            stall_sweeps: self.stall_sweeps.load(Ordering::Relaxed),
            requeued: self.requeued.load(Ordering::Relaxed),
        }
    }
}

/// A snapshot of a worker's counters, from [`WorkerHandle::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Tasks this worker started (every attempt counts).
    pub started: u64,
    /// Tasks whose completion this worker reported.
    pub completed: u64,
    /// Failed attempts this worker reported (handler errors, panics, timeouts, handlers
    /// cancelled by a shutdown); the engine retries most of them.
    pub failed: u64,
    /// Tasks started and not yet reported (nor cancelled).
    pub in_flight: u64,
    /// Tasks whose run was cancelled while this worker ran them: their handlers saw their
    /// cancellation tokens fire (and were dropped if still running), and nothing was reported
    /// for them, since the engine had already marked them cancelled.
    pub cancelled: u64,
    /// Stalled-task sweeps this worker ran
    /// ([`requeue_stalled_every`](super::WorkerBuilder::requeue_stalled_every)). One worker of
    /// the cluster sweeps each period: the others' turns count nowhere.
    pub stall_sweeps: u64,
    /// Tasks those sweeps requeued: started tasks whose worker was lost and whose message
    /// would not come back, sent back to their queue for their next attempt (any worker may
    /// run it).
    pub requeued: u64,
}

/// A running worker, returned by [`WorkerBuilder::spawn`].
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
/// let worker = pgflow_client::Worker::builder(pool).flow(flow).spawn()?;
/// let stats = worker.stats();
/// println!("{} started, {} in flight", stats.started, stats.in_flight);
/// worker.shutdown().await?;
/// # Ok(()) }
/// ```
///
/// [`WorkerBuilder::spawn`]: super::WorkerBuilder::spawn
#[derive(Debug)]
pub struct WorkerHandle {
    shutdown: CancellationToken,
    counters: Arc<Counters>,
    worker_ids: Vec<(String, Uuid)>,
    join: JoinHandle<Result<()>>,
}

impl WorkerHandle {
    /// The handle over the worker task `join`, which [`WorkerBuilder::spawn`] has just started.
    ///
    /// [`WorkerBuilder::spawn`]: super::WorkerBuilder::spawn
    pub(crate) fn new(
        shutdown: CancellationToken,
        counters: Arc<Counters>,
        worker_ids: Vec<(String, Uuid)>,
        join: JoinHandle<Result<()>>,
    ) -> Self {
        Self {
            shutdown,
            counters,
            worker_ids,
            join,
        }
    }

    /// The worker's shutdown token: cancelling it starts a graceful shutdown, and it fires when
    /// one starts for any reason. A child of the
    /// [shutdown token](super::WorkerBuilder::shutdown_token) given to the builder, if any.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
    /// let worker = pgflow_client::Worker::builder(pool)
    ///     .flow(flow)
    ///     .shutdown_on_signal()
    ///     .spawn()?;
    /// // The rest of the application stops with the worker, whatever stopped it.
    /// let stopping = worker.cancellation_token().clone();
    /// tokio::spawn(async move {
    ///     stopping.cancelled().await;
    ///     tracing::info!("worker shutting down: closing the HTTP server");
    /// });
    /// worker.wait().await?;
    /// # Ok(()) }
    /// ```
    pub fn cancellation_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// The worker's counters now.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
    /// let worker = pgflow_client::Worker::builder(pool).flow(flow).spawn()?;
    /// let stats = worker.stats();
    /// println!(
    ///     "{} completed, {} failed, {} running",
    ///     stats.completed, stats.failed, stats.in_flight
    /// );
    /// # Ok(()) }
    /// ```
    pub fn stats(&self) -> WorkerStats {
        self.counters.snapshot()
    }

    /// The `worker_id` of this worker's `pgflow.workers` row for `flow_slug`.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
    /// let worker = pgflow_client::Worker::builder(pool.clone()).flow(flow).spawn()?;
    /// if let Some(worker_id) = worker.worker_id("order_processing") {
    ///     let sql = "SELECT last_heartbeat_at FROM pgflow.workers WHERE worker_id = $1";
    ///     let last_heartbeat: Option<chrono::DateTime<chrono::Utc>> =
    ///         sqlx::query_scalar(sql).bind(worker_id).fetch_one(&pool).await?;
    ///     println!("{worker_id} last beat at {last_heartbeat:?}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn worker_id(&self, flow_slug: &str) -> Option<Uuid> {
        self.worker_ids
            .iter()
            .find(|(slug, _)| slug == flow_slug)
            .map(|(_, id)| *id)
    }

    /// Whether the worker has stopped.
    ///
    /// ```no_run
    /// use pgflow_client::WorkerHandle;
    ///
    /// // A health check: a worker stops on its own when the database fails its check or all its
    /// // rows are marked deprecated.
    /// fn healthy(worker: &WorkerHandle) -> bool {
    ///     !worker.is_finished()
    /// }
    /// ```
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }

    /// Shuts the worker down gracefully and waits until it has: no new tasks are read, running
    /// handlers finish (or are cancelled at the
    /// [shutdown timeout](super::WorkerBuilder::shutdown_timeout) and their attempts failed),
    /// results are reported, and the worker's rows get `deprecated_at`.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
    /// let worker = pgflow_client::Worker::builder(pool).flow(flow).spawn()?;
    /// // ... the application stops:
    /// worker.shutdown().await?; // running handlers have finished, their results are stored
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// The error that stopped the worker at start-up, if the database failed its check (see
    /// [`WorkerBuilder::spawn`]); [`Error::WorkerPanicked`] if the worker's own task panicked (a
    /// bug: handler panics are caught and fail their task).
    ///
    /// [`WorkerBuilder::spawn`]: super::WorkerBuilder::spawn
    pub async fn shutdown(self) -> Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the worker stops on its own: the shutdown token was cancelled, a signal came
    /// ([`shutdown_on_signal`](super::WorkerBuilder::shutdown_on_signal)), or all its rows were
    /// marked deprecated.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
    /// let worker = pgflow_client::Worker::builder(pool).flow(flow).spawn()?;
    /// // Nothing here stops the worker: it runs until all its rows in pgflow.workers are marked
    /// // deprecated, or stops at once if the database fails its check.
    /// match worker.wait().await {
    ///     Ok(()) => println!("deprecated: the worker has shut down"),
    ///     Err(error) => eprintln!("the worker could not run: {error}"),
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`shutdown`](Self::shutdown).
    pub async fn wait(self) -> Result<()> {
        match self.join.await {
            Ok(result) => result,
            Err(error) => Err(Error::WorkerPanicked(error.to_string())),
        }
    }
}

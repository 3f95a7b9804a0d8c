//! The worker: runs the handlers of one or more flows inside the application's Tokio runtime.
//!
//! A [`Worker`] is built over a [`PgPool`] with [`Worker::builder`], given flows (typed, with
//! their handlers) and untyped handlers (by flow slug and step slug, for flows compiled
//! elsewhere), and [spawned](WorkerBuilder::spawn) onto the current runtime. The returned
//! [`WorkerHandle`] reads counters and shuts the worker down gracefully.
//!
//! # How it works
//!
//! For each flow the worker keeps one row in `pgflow.workers` (`queue_name` = the flow slug,
//! `function_name` = `rust:<flow slug>`) and one polling loop. A loop takes as many permits of the
//! worker-wide concurrency limit as are free (at most the batch size), then reads that many
//! messages from the flow's queue and starts their tasks, in one call and one round trip
//! (`pgflow._read_and_start`: what `pgmq.read` then `pgflow.start_tasks` do, with each message
//! hidden for its step's timeout at once). Each task's handler runs in its own
//! Tokio task, holding one permit, so no more than [`concurrency`](WorkerBuilder::concurrency)
//! handlers ever run at once across all flows.
//!
//! Results go to a reporter that completes finished tasks in batches with the engine's
//! `pgflow.complete_tasks` (one call and one transaction for every task finished while the
//! previous report was in flight: no timer, so a lone task is reported at once) and fails
//! tasks one by one with `pgflow.fail_task`.
//!
//! An idle loop sleeps until something can be there: the engine's notification that it queued
//! tasks of its flow (channel `pgflow_tasks`, payload the flow slug), the moment the next delayed message of its queue
//! becomes visible (retry backoff, `start_delay`), or at the latest after
//! [`max_poll_wait`](WorkerBuilder::max_poll_wait). While notifications are unavailable it
//! polls every [`poll_interval`](WorkerBuilder::poll_interval) instead.
//!
//! # Failures
//!
//! - A handler's [`StepError`], or a panic (its payload becomes the message), fails the attempt
//!   with `pgflow.fail_task`; the engine retries it per the step's `max_attempts` and
//!   `base_delay`. A [`StepError::no_retry`] error fails the task at once: the worker raises the
//!   task's `attempts_count` to the step's `max_attempts` before calling `fail_task`, so the
//!   engine sees the attempts exhausted, then puts back the attempts actually made, all in one
//!   transaction. The error message says so.
//! - A handler still running after the step's timeout (`coalesce(step timeout, flow timeout)`,
//!   60 s when neither is set) has its cancellation token fired, is dropped, and its attempt fails.
//! - Lost connections are retried with capped, jittered exponential backoff. A report whose
//!   outcome is unknown (the connection broke mid-call) is retried only for tasks still
//!   `started` by this worker with the same attempt, so no result is ever applied twice.
//!
//! # Shutdown
//!
//! On [`WorkerHandle::shutdown`], the [shutdown token](WorkerBuilder::shutdown_token), SIGINT or
//! SIGTERM ([`shutdown_on_signal`](WorkerBuilder::shutdown_on_signal)), or when every one of its
//! `pgflow.workers` rows has been marked deprecated by someone else: the worker stops reading,
//! lets running handlers finish for up to [`shutdown_timeout`](WorkerBuilder::shutdown_timeout),
//! reports them, then cancels the ones still running and fails their attempts (so the engine
//! retries them), and finally sets `deprecated_at` on its rows. A single deprecated row only
//! stops that flow's loop.

mod backoff;
mod dispatch;
mod heartbeat;
mod listen;
mod poll;
mod registry;
mod report;
mod schema_check;
mod supervisor;

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use pgflow_core::{ErasedHandler, Flow, StepContext, StepError, check_slug};
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{Error, Result};

/// Runs the handlers of flows: the entry point is [`Worker::builder`].
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
/// use pgflow_client::Worker;
///
/// let worker = Worker::builder(pool).flow(flow).concurrency(20).spawn()?;
/// // ... the application runs ...
/// worker.shutdown().await?; // stops reading, finishes in-flight tasks
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Worker {
    _private: (),
}

impl Worker {
    /// Starts configuring a worker that talks to the database through `pool`.
    ///
    /// The worker takes a few connections of its own from the pool (one per flow while reading,
    /// one while reporting results, one for heartbeats), plus whatever the handlers use through
    /// [`StepContextExt::pool`]; size the pool for both. Notifications use one dedicated
    /// connection opened with the pool's connect options, outside the pool.
    pub fn builder(pool: PgPool) -> WorkerBuilder {
        WorkerBuilder {
            pool,
            flows: BTreeMap::new(),
            settings: Settings::default(),
            state: None,
        }
    }
}

/// The worker's settings, with their defaults.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) concurrency: usize,
    pub(crate) batch_size: usize,
    pub(crate) visibility_timeout: Duration,
    pub(crate) max_poll_wait: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) notifications: bool,
    pub(crate) shutdown_on_signal: bool,
    pub(crate) shutdown_token: Option<CancellationToken>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            concurrency: 10,
            batch_size: 10,
            visibility_timeout: Duration::from_secs(2),
            max_poll_wait: Duration::from_secs(5),
            poll_interval: Duration::from_millis(100),
            heartbeat_interval: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(30),
            notifications: true,
            shutdown_on_signal: false,
            shutdown_token: None,
        }
    }
}

/// Configures and spawns a worker; created by [`Worker::builder`].
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> pgflow_client::Result<()> {
/// use std::time::Duration;
/// use pgflow_client::Worker;
/// use serde_json::{Value, json};
///
/// let worker = Worker::builder(pool)
///     // a flow compiled elsewhere (e.g. by the TypeScript DSL): handlers on JSON
///     .handler("greet", "hello", |input: Value, _ctx| async move {
///         Ok(json!(format!("hello, {}", input["run"]["name"])))
///     })
///     .concurrency(4)
///     .shutdown_timeout(Duration::from_secs(10))
///     .shutdown_on_signal()
///     .spawn()?;
/// worker.wait().await?; // until SIGINT / SIGTERM, then a graceful shutdown
/// # Ok(()) }
/// ```
pub struct WorkerBuilder {
    pool: PgPool,
    /// flow slug → step slug → handler; the last registration of a step wins.
    flows: BTreeMap<String, BTreeMap<String, Arc<dyn ErasedHandler>>>,
    settings: Settings,
    state: Option<Arc<dyn Any + Send + Sync>>,
}

impl fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flows: BTreeMap<_, Vec<_>> = self
            .flows
            .iter()
            .map(|(flow, steps)| (flow, steps.keys().collect()))
            .collect();
        f.debug_struct("WorkerBuilder")
            .field("flows", &flows)
            .field("settings", &self.settings)
            .field("state", &self.state.is_some())
            .finish_non_exhaustive()
    }
}

impl WorkerBuilder {
    /// Runs the tasks of `flow`, with the handlers its steps carry.
    ///
    /// The flow must already be compiled into the database (its queue must exist); until it is,
    /// the worker logs a warning and keeps retrying. Registering a step again (another flow value
    /// with the same slug, or [`handler`](Self::handler)) replaces its handler.
    #[must_use]
    #[allow(
        clippy::needless_pass_by_value,
        reason = "`.flow(order_processing())` reads as what it does; a Flow is an Arc inside"
    )]
    pub fn flow<I>(mut self, flow: Flow<I>) -> Self {
        let steps = self.flows.entry(flow.slug().to_owned()).or_default();
        for step in flow.steps() {
            steps.insert(step.slug().to_owned(), Arc::clone(step.handler()));
        }
        self
    }

    /// Runs tasks of step `step_slug` of flow `flow_slug` with an untyped handler: it receives the
    /// task input as JSON (`{"run": <flow input>, "<dependency>": <its output>, ...}` for a single
    /// step, one array element for a map step) and returns the step output as JSON.
    ///
    /// This is the door for flows defined elsewhere, such as by pgflow's TypeScript DSL. Give
    /// every step of such a flow a handler: a task of a step without one fails with a message
    /// saying so.
    ///
    /// ```no_run
    /// # fn demo(pool: sqlx::PgPool) -> pgflow_client::Result<()> {
    /// use pgflow_client::Worker;
    /// use pgflow_core::StepError;
    /// use serde_json::{Value, json};
    ///
    /// let worker = Worker::builder(pool)
    ///     .handler("analyze", "word_count", |input: Value, ctx| async move {
    ///         let text = input["run"]["text"]
    ///             .as_str()
    ///             .ok_or_else(|| StepError::new("input.text is not a string").no_retry())?;
    ///         tracing::debug!(run_id = %ctx.run_id(), "counting");
    ///         Ok(json!(text.split_whitespace().count()))
    ///     })
    ///     .spawn()?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn handler<F, Fut>(
        mut self,
        flow_slug: impl Into<String>,
        step_slug: impl Into<String>,
        handler: F,
    ) -> Self
    where
        F: Fn(Value, StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Value, StepError>> + Send + 'static,
    {
        let handler: Arc<dyn ErasedHandler> = Arc::new(handler);
        self.flows
            .entry(flow_slug.into())
            .or_default()
            .insert(step_slug.into(), handler);
        self
    }

    /// The most handlers that run at the same time, across all flows of this worker (default 10,
    /// at least 1).
    #[must_use]
    pub fn concurrency(mut self, tasks: usize) -> Self {
        self.settings.concurrency = tasks;
        self
    }

    /// The most messages read from a queue in one call (default 10, at least 1). A read never
    /// asks for more tasks than the concurrency limit has room for.
    #[must_use]
    pub fn batch_size(mut self, messages: usize) -> Self {
        self.settings.batch_size = messages;
        self
    }

    /// How long a message read from the queue stays invisible to other workers before its task
    /// is started (default 2 s; whole seconds, rounded up). Starting a task then makes the
    /// message invisible for the step's timeout plus 2 seconds.
    #[must_use]
    pub fn visibility_timeout(mut self, timeout: Duration) -> Self {
        self.settings.visibility_timeout = timeout;
        self
    }

    /// The longest an idle flow waits between two reads of its queue while notifications work
    /// (default 5 s): a safety net for missed notifications.
    #[must_use]
    pub fn max_poll_wait(mut self, wait: Duration) -> Self {
        self.settings.max_poll_wait = wait;
        self
    }

    /// How often an idle flow reads its queue while notifications are unavailable (default
    /// 100 ms), for instance while the listening connection reconnects.
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.settings.poll_interval = interval;
        self
    }

    /// How often the worker updates `last_heartbeat_at` of its `pgflow.workers` rows and checks
    /// whether they were marked deprecated (default 5 s).
    #[must_use]
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.settings.heartbeat_interval = interval;
        self
    }

    /// How long a shutdown waits for running handlers before cancelling them and failing their
    /// attempts (default 30 s).
    #[must_use]
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.settings.shutdown_timeout = timeout;
        self
    }

    /// Whether to wake on the engine's notifications (`LISTEN pgflow`, default `true`). Turn
    /// this off where `LISTEN` does not work, such as behind a transaction-pooling proxy; the
    /// worker then polls every [`poll_interval`](Self::poll_interval).
    #[must_use]
    pub fn notifications(mut self, enabled: bool) -> Self {
        self.settings.notifications = enabled;
        self
    }

    /// Shuts the worker down gracefully on SIGINT (Ctrl-C) or SIGTERM. Off by default: a library
    /// installs no signal handlers unless asked.
    #[must_use]
    pub fn shutdown_on_signal(mut self) -> Self {
        self.settings.shutdown_on_signal = true;
        self
    }

    /// Shuts the worker down gracefully when `token` is cancelled: hand it the application's own
    /// shutdown token. [`WorkerHandle::cancellation_token`] is a child of it.
    #[must_use]
    pub fn shutdown_token(mut self, token: CancellationToken) -> Self {
        self.settings.shutdown_token = Some(token);
        self
    }

    /// Shares a value with every handler, reachable with [`StepContext::state`]: an HTTP
    /// client, a configuration, a struct holding several of them.
    ///
    /// ```no_run
    /// # fn demo(pool: sqlx::PgPool) -> pgflow_client::Result<()> {
    /// use pgflow_client::{StepContextExt, Worker};
    /// use pgflow_core::StepError;
    /// use serde_json::{Value, json};
    ///
    /// struct Config { greeting: String }
    ///
    /// let worker = Worker::builder(pool)
    ///     .state(Config { greeting: "hello".into() })
    ///     .handler("greet", "hello", |_input: Value, ctx| async move {
    ///         let config = ctx.state::<Config>().ok_or_else(|| StepError::new("no config"))?;
    ///         Ok(json!(config.greeting))
    ///     })
    ///     .spawn()?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn state<T: Any + Send + Sync>(mut self, state: T) -> Self {
        self.state = Some(Arc::new(state));
        self
    }

    /// Checks the settings and slugs, then starts the worker on the current Tokio runtime.
    ///
    /// Returns at once: checking the database, registering in `pgflow.workers` and polling
    /// happen in the background (retried with backoff while the database is unreachable).
    /// Dropping the handle does not stop the worker; use [`WorkerHandle::shutdown`]. The runtime
    /// needs its time and I/O drivers, as `#[tokio::main]` and `#[tokio::test]` set it up.
    ///
    /// Before registering, a worker with flows checks once that the database holds the engine
    /// functions it calls and, where its role may read `pgflow_meta.schema_migrations`, the
    /// schema version this build knows. If not, it stops without touching the database, logs
    /// the error, and [`WorkerHandle::wait`] returns it: [`Error::IncompatibleSchema`] (no engine,
    /// pgflow's SQL without this engine's additions as pgflow's TypeScript migrations install it,
    /// or an older schema: the message says what to run), [`Error::SchemaTooNew`] or
    /// [`Error::MigrationChanged`].
    ///
    /// # Errors
    ///
    /// [`Error::WorkerSetting`] for a setting out of range, [`Error::WorkerSlug`] for an invalid
    /// flow or step slug, [`Error::NoRuntime`] outside a Tokio runtime.
    pub fn spawn(self) -> Result<WorkerHandle> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let settings = self.settings;
        check_settings(&settings)?;
        for (flow, steps) in &self.flows {
            check_slug(flow).map_err(|problem| Error::WorkerSlug {
                flow: flow.clone(),
                step: None,
                problem,
            })?;
            for step in steps.keys() {
                check_slug(step).map_err(|problem| Error::WorkerSlug {
                    flow: flow.clone(),
                    step: Some(step.clone()),
                    problem,
                })?;
            }
        }

        let shutdown = settings
            .shutdown_token
            .as_ref()
            .map_or_else(CancellationToken::new, CancellationToken::child_token);
        let flows: Vec<Arc<registry::FlowEntry>> = self
            .flows
            .into_iter()
            .map(|(slug, steps)| Arc::new(registry::FlowEntry::new(slug, steps, &shutdown)))
            .collect();
        let worker_ids = flows
            .iter()
            .map(|flow| (flow.slug.to_string(), flow.worker_id))
            .collect();
        let extension: Arc<dyn Any + Send + Sync> = Arc::new(WorkerPool(self.pool.clone()));
        let shared = Arc::new(Shared {
            pool: self.pool,
            semaphore: Arc::new(Semaphore::new(settings.concurrency)),
            settings,
            counters: Arc::new(Counters::default()),
            listening: AtomicBool::new(false),
            hard_stop: CancellationToken::new(),
            abandon: CancellationToken::new(),
            state: self.state,
            extension,
        });
        let counters = Arc::clone(&shared.counters);
        let join = runtime.spawn(supervisor::run(shared, flows, shutdown.clone()));
        Ok(WorkerHandle {
            shutdown,
            counters,
            worker_ids,
            join,
        })
    }
}

fn check_settings(settings: &Settings) -> Result<()> {
    let setting = |setting: &'static str, value: String, requirement: &'static str| {
        Err(Error::WorkerSetting {
            setting,
            value,
            requirement,
        })
    };
    // Permits and read sizes end up as PostgreSQL integers and tokio semaphore counts.
    const MAX_TASKS: usize = 1 << 20;
    if settings.concurrency == 0 || settings.concurrency > MAX_TASKS {
        return setting(
            "concurrency",
            settings.concurrency.to_string(),
            "must be between 1 and 1048576",
        );
    }
    if settings.batch_size == 0 || settings.batch_size > MAX_TASKS {
        return setting(
            "batch_size",
            settings.batch_size.to_string(),
            "must be between 1 and 1048576",
        );
    }
    let positive = [
        ("visibility_timeout", settings.visibility_timeout),
        ("max_poll_wait", settings.max_poll_wait),
        ("poll_interval", settings.poll_interval),
        ("heartbeat_interval", settings.heartbeat_interval),
    ];
    for (name, value) in positive {
        if value.is_zero() {
            return setting(name, format!("{value:?}"), "must be greater than zero");
        }
    }
    if settings.visibility_timeout > Duration::from_secs(86_400) {
        return setting(
            "visibility_timeout",
            format!("{:?}", settings.visibility_timeout),
            "must be at most one day",
        );
    }
    Ok(())
}

/// What the worker's parts share.
pub(crate) struct Shared {
    pub(crate) pool: PgPool,
    pub(crate) settings: Settings,
    /// One permit per running handler (and per result waiting to be handed to the reporter).
    pub(crate) semaphore: Arc<Semaphore>,
    pub(crate) counters: Arc<Counters>,
    /// Whether the notification listener is connected and listening.
    pub(crate) listening: AtomicBool,
    /// Fires at the shutdown deadline: running handlers are cancelled.
    pub(crate) hard_stop: CancellationToken,
    /// Fires when the shutdown stops waiting for reports to reach the database.
    pub(crate) abandon: CancellationToken,
    /// The application's state, for [`StepContext::state`].
    pub(crate) state: Option<Arc<dyn Any + Send + Sync>>,
    /// What [`StepContextExt`] reads: an `Arc<WorkerPool>`.
    pub(crate) extension: Arc<dyn Any + Send + Sync>,
}

/// The worker's pool, as a task's [`StepContext`] carries it for [`StepContextExt`].
struct WorkerPool(PgPool);

/// The live counters behind [`WorkerStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) started: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) in_flight: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> WorkerStats {
        WorkerStats {
            started: self.started.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
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
    /// Failed attempts this worker reported (handler errors, panics, timeouts, cancellations);
    /// the engine retries most of them.
    pub failed: u64,
    /// Tasks started and not yet reported.
    pub in_flight: u64,
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
#[derive(Debug)]
pub struct WorkerHandle {
    shutdown: CancellationToken,
    counters: Arc<Counters>,
    worker_ids: Vec<(String, Uuid)>,
    join: JoinHandle<Result<()>>,
}

impl WorkerHandle {
    /// The worker's shutdown token: cancelling it starts a graceful shutdown, and it fires when
    /// one starts for any reason. A child of the [shutdown token](WorkerBuilder::shutdown_token)
    /// given to the builder, if any.
    pub fn cancellation_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// The worker's counters now.
    pub fn stats(&self) -> WorkerStats {
        self.counters.snapshot()
    }

    /// The `worker_id` of this worker's `pgflow.workers` row for `flow_slug`.
    pub fn worker_id(&self, flow_slug: &str) -> Option<Uuid> {
        self.worker_ids
            .iter()
            .find(|(slug, _)| slug == flow_slug)
            .map(|(_, id)| *id)
    }

    /// Whether the worker has stopped.
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }

    /// Shuts the worker down gracefully and waits until it has: no new tasks are read, running
    /// handlers finish (or are cancelled at the [shutdown timeout](WorkerBuilder::shutdown_timeout)
    /// and their attempts failed), results are reported, and the worker's rows get
    /// `deprecated_at`.
    ///
    /// # Errors
    ///
    /// The error that stopped the worker at start-up, if the database failed its check (see
    /// [`WorkerBuilder::spawn`]); [`Error::WorkerPanicked`] if the worker's own task panicked (a
    /// bug: handler panics are caught and fail their task).
    pub async fn shutdown(self) -> Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the worker stops on its own: the shutdown token was cancelled, a signal came
    /// ([`shutdown_on_signal`](WorkerBuilder::shutdown_on_signal)), or all its rows were marked
    /// deprecated.
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

mod sealed {
    pub trait Sealed {}
    impl Sealed for pgflow_core::StepContext {}
}

/// What a handler reaches through its [`StepContext`] when a [`Worker`] runs it: the worker's
/// pool. (The application state given to [`WorkerBuilder::state`] is [`StepContext::state`].)
///
/// ```no_run
/// use pgflow_client::StepContextExt;
/// use pgflow_core::{StepContext, StepError};
///
/// async fn audit(ctx: &StepContext) -> Result<(), StepError> {
///     sqlx::query("INSERT INTO audit (run_id, step) VALUES ($1, $2)")
///         .bind(ctx.run_id())
///         .bind(ctx.step_slug())
///         .execute(ctx.pool())
///         .await?;
///     Ok(())
/// }
/// ```
pub trait StepContextExt: sealed::Sealed {
    /// The worker's pool, for the handler's own queries.
    ///
    /// # Panics
    ///
    /// If the context was not built by a [`Worker`] (for example [`StepContext::for_test`]); use
    /// [`try_pool`](Self::try_pool) where that can happen. In a handler run by a worker the
    /// panic would fail the attempt with this message.
    fn pool(&self) -> &PgPool;

    /// The worker's pool, or `None` if the context was not built by a [`Worker`].
    fn try_pool(&self) -> Option<&PgPool>;
}

impl StepContextExt for StepContext {
    fn pool(&self) -> &PgPool {
        match self.try_pool() {
            Some(pool) => pool,
            None => panic!(
                "StepContextExt::pool: this StepContext was not built by a pgflow worker, so it \
                 carries no pool (use try_pool in code that also runs outside a worker)"
            ),
        }
    }

    fn try_pool(&self) -> Option<&PgPool> {
        self.extension::<WorkerPool>().map(|pool| &pool.0)
    }
}

//! Configuring a worker: [`WorkerBuilder`], its flows and handlers, its settings, and
//! [`spawn`](WorkerBuilder::spawn), which checks them and starts the worker.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use pgflow_core::{ErasedHandler, Flow, StepContext, StepError, check_slug};
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use super::handle::{Counters, WorkerHandle};
use super::probe::ProbeRequests;
use super::prune::{self, PrunePolicy};
use super::registry::FlowEntry;
use super::settings::{Settings, check_settings};
use super::shared::Shared;
use super::{context, scheduler, supervisor};
use crate::{Error, Result, Schedule};

/// Configures and spawns a worker; created by [`Worker::builder`](super::Worker::builder).
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
    /// The schedules this worker fires ([`add_schedule`](Self::add_schedule)).
    schedules: Vec<Schedule>,
    /// The periodic prune, when asked for ([`prune_every`](Self::prune_every)).
    prune: Option<PrunePolicy>,
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
            .field("schedules", &self.schedules)
            .finish_non_exhaustive()
    }
}

impl WorkerBuilder {
    /// A builder with no flows, the default settings and no state; see
    /// [`Worker::builder`](super::Worker::builder).
    pub(crate) fn new(pool: PgPool) -> Self {
        Self {
            pool,
            flows: BTreeMap::new(),
            settings: Settings::default(),
            state: None,
            schedules: Vec::new(),
            prune: None,
        }
    }

    /// Runs the tasks of `flow`, with the handlers its steps carry.
    ///
    /// The flow must already be compiled into the database (its queue must exist); until it is,
    /// the worker logs a warning and keeps retrying. Registering a step again (another flow value
    /// with the same slug, or [`handler`](Self::handler)) replaces its handler.
    ///
    /// ```no_run
    /// # fn demo(
    /// #     pool: sqlx::PgPool,
    /// #     orders: pgflow_core::Flow<u64>,
    /// #     invoices: pgflow_core::Flow<String>,
    /// # ) -> pgflow_client::Result<()> {
    /// use pgflow_client::Worker;
    ///
    /// // One worker for both flows: their handlers share its concurrency limit.
    /// let worker = Worker::builder(pool).flow(orders).flow(invoices).spawn()?;
    /// # Ok(()) }
    /// ```
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
    ///
    /// ```no_run
    /// # fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
    /// use pgflow_client::Worker;
    ///
    /// // Handlers that mostly wait on HTTP calls: many at once cost little.
    /// let worker = Worker::builder(pool).flow(flow).concurrency(50).spawn()?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn concurrency(mut self, tasks: usize) -> Self {
        self.settings.concurrency = tasks;
        self
    }

    /// The most messages read from a queue in one call (default 10, at least 1). A read never
    /// asks for more tasks than the concurrency limit has room for.
    ///
    /// ```no_run
    /// # fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
    /// use pgflow_client::Worker;
    ///
    /// // While the queue is busy, four reads fill the worker.
    /// let worker = Worker::builder(pool)
    ///     .flow(flow)
    ///     .concurrency(100)
    ///     .batch_size(25)
    ///     .spawn()?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn batch_size(mut self, messages: usize) -> Self {
        self.settings.batch_size = messages;
        self
    }

    /// How long a message read from the queue stays invisible to other workers before its task
    /// is started (default 2 s; whole seconds, rounded up). Starting a task then makes the
    /// message invisible for the step's timeout plus 2 seconds.
    ///
    /// ```no_run
    /// # fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
    /// use std::time::Duration;
    /// use pgflow_client::Worker;
    ///
    /// let worker = Worker::builder(pool)
    ///     .flow(flow)
    ///     .visibility_timeout(Duration::from_millis(1500)) // 2 s: whole seconds, rounded up
    ///     .spawn()?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn visibility_timeout(mut self, timeout: Duration) -> Self {
        self.settings.visibility_timeout = timeout;
        self
    }

    /// The longest an idle worker waits between two looks at its queues while notifications
    /// work (default 5 s): a safety net for missed notifications. One look is one statement
    /// over all the worker's queues (`pgflow.queue_probe`); only flows with a visible message
    /// read theirs.
    ///
    /// ```no_run
    /// # fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
    /// use std::time::Duration;
    /// use pgflow_client::Worker;
    ///
    /// // A missed notification delays a task by 30 s at the most.
    /// let worker = Worker::builder(pool)
    ///     .flow(flow)
    ///     .max_poll_wait(Duration::from_secs(30))
    ///     .spawn()?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn max_poll_wait(mut self, wait: Duration) -> Self {
        self.settings.max_poll_wait = wait;
        self
    }

    /// How often an idle worker looks at its queues while notifications are unavailable
    /// (default 100 ms), for instance while the listening connection reconnects: one statement
    /// over all its queues, then a read of each queue with a visible message.
    ///
    /// ```no_run
    /// # fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
    /// use std::time::Duration;
    /// use pgflow_client::Worker;
    ///
    /// // Fewer reads of idle queues while the listener is down; new tasks wait up to 1 s.
    /// let worker = Worker::builder(pool)
    ///     .flow(flow)
    ///     .poll_interval(Duration::from_secs(1))
    ///     .spawn()?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.settings.poll_interval = interval;
        self
    }

    /// How often the worker updates `last_heartbeat_at` of its `pgflow.workers` rows and checks
    /// whether they were marked deprecated (default 5 s).
    ///
    /// ```no_run
    /// # fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
    /// use std::time::Duration;
    /// use pgflow_client::Worker;
    ///
    /// // Hundreds of workers on one database: fewer writes to pgflow.workers.
    /// let worker = Worker::builder(pool)
    ///     .flow(flow)
    ///     .heartbeat_interval(Duration::from_secs(15))
    ///     .spawn()?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.settings.heartbeat_interval = interval;
        self
    }

    /// How long a shutdown waits for running handlers before cancelling them and failing their
    /// attempts (default 30 s).
    ///
    /// ```no_run
    /// # fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
    /// use std::time::Duration;
    /// use pgflow_client::Worker;
    ///
    /// // Handlers that upload large files get two minutes to finish when the worker stops.
    /// let worker = Worker::builder(pool)
    ///     .flow(flow)
    ///     .shutdown_timeout(Duration::from_secs(120))
    ///     .spawn()?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.settings.shutdown_timeout = timeout;
        self
    }

    /// Whether to wake on the engine's notifications (`LISTEN pgflow`, default `true`). Turn
    /// this off where `LISTEN` does not work, such as behind a transaction-pooling proxy; the
    /// worker then polls every [`poll_interval`](Self::poll_interval).
    ///
    /// ```no_run
    /// # fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
    /// use std::time::Duration;
    /// use pgflow_client::Worker;
    ///
    /// // Behind PgBouncer in transaction mode: no LISTEN, read idle queues every 250 ms instead.
    /// let worker = Worker::builder(pool)
    ///     .flow(flow)
    ///     .notifications(false)
    ///     .poll_interval(Duration::from_millis(250))
    ///     .spawn()?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn notifications(mut self, enabled: bool) -> Self {
        self.settings.notifications = enabled;
        self
    }

    /// How often the worker calls the stalled-task sweep (default 15 s, between 1 s and one
    /// day). A sweep requeues started tasks whose worker was lost: started longer ago than
    /// their step's timeout plus 30 s, whose message will not come back to a reader (it was
    /// archived, or nobody reads the queue). The lost attempt counts as an attempt; a task
    /// with none left fails (or is skipped, per its step's `when_exhausted`), and a task
    /// requeued three times already is marked permanently stalled for an operator
    /// (`pgflow check` reports it).
    ///
    /// Every worker has the timer, and the engine runs at most one sweep per period for the
    /// whole cluster (`pgflow.requeue_stalled_tasks_due`): more workers do not sweep more
    /// often. The first call comes once the worker has registered. Sweeps this worker ran and
    /// what they requeued are in [`WorkerStats::stall_sweeps`] and
    /// [`WorkerStats::requeued`], and logged (INFO when tasks were requeued). A role that may
    /// not call the function gets one warning and no more calls (docs/security.md has the
    /// grant). docs/operating.md, "Stalled tasks", has the whole story.
    ///
    /// ```no_run
    /// # fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
    /// use std::time::Duration;
    /// use pgflow_client::Worker;
    ///
    /// // Long-running steps: a lost task waits for its timeout anyway, a minute is plenty.
    /// let worker = Worker::builder(pool)
    ///     .flow(flow)
    ///     .requeue_stalled_every(Duration::from_secs(60))
    ///     .spawn()?;
    /// # Ok(()) }
    /// ```
    ///
    /// [`WorkerStats::stall_sweeps`]: super::WorkerStats::stall_sweeps
    /// [`WorkerStats::requeued`]: super::WorkerStats::requeued
    #[must_use]
    pub fn requeue_stalled_every(mut self, interval: Duration) -> Self {
        self.settings.requeue_every = interval;
        self
    }

    /// Whether this worker runs the stalled-task timer of
    /// [`requeue_stalled_every`](Self::requeue_stalled_every) (default `true`). Turn it off
    /// where another process sweeps (a pg_cron job calling `pgflow.requeue_stalled_tasks()`),
    /// or where the worker's role is not granted the sweep.
    ///
    /// ```no_run
    /// # fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
    /// use pgflow_client::Worker;
    ///
    /// // pg_cron sweeps: `SELECT cron.schedule('requeue', '15 seconds',
    /// //                  'SELECT pgflow.requeue_stalled_tasks()')`.
    /// let worker = Worker::builder(pool).flow(flow).requeue_stalled(false).spawn()?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn requeue_stalled(mut self, enabled: bool) -> Self {
        self.settings.requeue_stalled = enabled;
        self
    }

    /// Shuts the worker down gracefully on SIGINT (Ctrl-C) or SIGTERM. Off by default: a library
    /// installs no signal handlers unless asked.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
    /// use pgflow_client::Worker;
    ///
    /// let worker = Worker::builder(pool).flow(flow).shutdown_on_signal().spawn()?;
    /// worker.wait().await?; // returns once Ctrl-C or SIGTERM has shut the worker down
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn shutdown_on_signal(mut self) -> Self {
        self.settings.shutdown_on_signal = true;
        self
    }

    /// Shuts the worker down gracefully when `token` is cancelled: hand it the application's own
    /// shutdown token. [`WorkerHandle::cancellation_token`] is a child of it.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
    /// use pgflow_client::Worker;
    /// use tokio_util::sync::CancellationToken;
    ///
    /// let app_shutdown = CancellationToken::new();
    /// let worker = Worker::builder(pool)
    ///     .flow(flow)
    ///     .shutdown_token(app_shutdown.clone())
    ///     .spawn()?;
    /// // ... when the application stops, it stops the worker with everything else:
    /// app_shutdown.cancel();
    /// worker.wait().await?;
    /// # Ok(()) }
    /// ```
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

    /// Starts a run of `flow` with `input` at each tick of `cron`: a [`Schedule`] named after
    /// the flow, in UTC, skipping missed ticks. [`add_schedule`](Self::add_schedule) takes one
    /// with a name, a time zone, an input computed per tick or a missed-tick policy.
    ///
    /// Every worker carrying the schedule writes it to the database when it starts; one of them
    /// at a time fires it, and each tick starts exactly one run (docs/operating.md,
    /// "Schedules"). The cron expression is checked by [`spawn`](Self::spawn). The worker
    /// starts runs: its role needs the grants of docs/security.md for schedules.
    ///
    /// ```no_run
    /// # fn demo(pool: sqlx::PgPool, cleanup: pgflow_core::Flow<serde_json::Value>) -> pgflow_client::Result<()> {
    /// use pgflow_client::Worker;
    ///
    /// // Every five minutes (seconds first: six fields).
    /// let worker = Worker::builder(pool)
    ///     .flow(cleanup.clone())
    ///     .schedule("0 */5 * * * *", &cleanup, &serde_json::json!({"older_than": "1h"}))
    ///     .spawn()?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn schedule<I: serde::Serialize>(self, cron: &str, flow: &Flow<I>, input: &I) -> Self {
        self.add_schedule(Schedule::new(cron, flow, input))
    }

    /// Fires `schedule` from this worker (and every other worker that carries it): see
    /// [`schedule`](Self::schedule) and [`Schedule`].
    ///
    /// ```no_run
    /// # #[derive(serde::Serialize)]
    /// # struct Digest { since: chrono::DateTime<chrono::Utc> }
    /// # fn demo(pool: sqlx::PgPool, digest: pgflow_core::Flow<Digest>) -> pgflow_client::Result<()> {
    /// use pgflow_client::{Missed, Schedule, Worker};
    ///
    /// let weekly = Schedule::with_input_fn("0 8 * * MON", &digest, |tick| Digest {
    ///     since: tick - chrono::Duration::weeks(1),
    /// })
    /// .name("weekly-digest")
    /// .timezone("Europe/Paris")
    /// .missed(Missed::CatchUp(1));
    /// let worker = Worker::builder(pool).flow(digest).add_schedule(weekly).spawn()?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn add_schedule(mut self, schedule: Schedule) -> Self {
        self.schedules.push(schedule);
        self
    }

    /// Prunes every `interval`: deletes the runs that ended more than `older_than` ago with
    /// everything they left behind, and the workers silent as long, as
    /// [`Client::prune`](crate::Client::prune) does (in batches, so the workers keep their
    /// throughput). Off by default.
    ///
    /// However many workers ask for it, one at a time prunes: each turn takes the advisory lock
    /// [`PRUNE_LOCK_KEY`](crate::PRUNE_LOCK_KEY) with `pg_try_advisory_xact_lock`, and a worker
    /// that finds it taken skips its turn. A turn after another worker's prune finds little left
    /// to delete. The first prune comes one `interval` after [`spawn`](Self::spawn); a failed one
    /// is logged at WARN and tried again at the next turn. A prune holds two connections of the
    /// pool while it runs (the lock's and the batches'): size the pool for them. The worker's
    /// role needs EXECUTE on `pgflow.prune_runs` and `pgflow.prune_workers` (docs/security.md).
    ///
    /// ```no_run
    /// # fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
    /// use std::time::Duration;
    /// use pgflow_client::Worker;
    ///
    /// // Every hour, delete what ended more than 30 days ago.
    /// let worker = Worker::builder(pool)
    ///     .flow(flow)
    ///     .prune_every(Duration::from_secs(3600), Duration::from_secs(30 * 86_400))
    ///     .spawn()?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn prune_every(mut self, interval: Duration, older_than: Duration) -> Self {
        self.prune = Some(PrunePolicy {
            every: interval,
            older_than,
        });
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
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
    /// use pgflow_client::Worker;
    ///
    /// // Settings and slugs are checked here, before anything runs: a concurrency of 0 from the
    /// // environment is an Error::WorkerSetting.
    /// let concurrency = std::env::var("WORKER_CONCURRENCY").ok().and_then(|n| n.parse().ok());
    /// let worker = Worker::builder(pool)
    ///     .flow(flow)
    ///     .concurrency(concurrency.unwrap_or(10))
    ///     .spawn()?;
    /// // ... the database is checked in the background while the application goes on.
    /// worker.shutdown().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::WorkerSetting`] for a setting out of range, [`Error::WorkerSlug`] for an invalid
    /// flow or step slug, [`Error::Schedule`] for an invalid schedule (cron expression, time
    /// zone, name, input) or two of the same name, [`Error::NoRuntime`] outside a Tokio runtime.
    pub fn spawn(self) -> Result<WorkerHandle> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let settings = self.settings;
        check_settings(&settings)?;
        if let Some(policy) = self.prune
            && policy.every.is_zero()
        {
            return Err(Error::WorkerSetting {
                setting: "prune_every",
                value: format!("{:?}", policy.every),
                requirement: "must be longer than zero",
            });
        }
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

        let schedules = scheduler::prepare(self.schedules)?;

        let shutdown = settings
            .shutdown_token
            .as_ref()
            .map_or_else(CancellationToken::new, CancellationToken::child_token);
        let flows: Vec<Arc<FlowEntry>> = self
            .flows
            .into_iter()
            .map(|(slug, steps)| Arc::new(FlowEntry::new(slug, steps, &shutdown)))
            .collect();
        let worker_ids = flows
            .iter()
            .map(|flow| (flow.slug.to_string(), flow.worker_id))
            .collect();
        let extension = context::extension(self.pool.clone());
        if let Some(policy) = self.prune {
            runtime.spawn(prune::run(self.pool.clone(), policy, shutdown.clone()));
        }
        let shared = Arc::new(Shared {
            pool: self.pool,
            semaphore: Arc::new(Semaphore::new(settings.concurrency)),
            settings,
            counters: Arc::new(Counters::default()),
            running: Arc::default(),
            listening: AtomicBool::new(false),
            probe: ProbeRequests::new(flows.len()),
            hard_stop: CancellationToken::new(),
            abandon: CancellationToken::new(),
            reports_failing: watch::Sender::new(false),
            state: self.state,
            extension,
        });
        let counters = Arc::clone(&shared.counters);
        let scheduler = (!schedules.is_empty()).then(|| {
            runtime.spawn(scheduler::run(
                shared.pool.clone(),
                schedules,
                shutdown.clone(),
            ))
        });
        let supervised = supervisor::run(shared, flows, shutdown.clone());
        let join = runtime.spawn(async move {
            let outcome = supervised.await;
            // The supervisor returns once the worker is shut down (or refused to start, which
            // cancels the token too): the scheduler stops with it.
            if let Some(scheduler) = scheduler {
                let _ = scheduler.await;
            }
            outcome
        });
        Ok(WorkerHandle::new(shutdown, counters, worker_ids, join))
    }
}

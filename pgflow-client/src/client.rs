//! The client: install the engine, compile flows into the database, start runs.

use chrono::{DateTime, Utc};
use pgflow_core::{Flow, FlowShape};
use serde::Serialize;
use serde_json::Value;
use sqlx::{Acquire, PgConnection, PgPool, Postgres};
use uuid::Uuid;

use crate::definition::{self, Compiled, Replace};
use crate::events::Subscription;
use crate::run::{Cancelled, RunHandle, RunRetry, RunState, RunSummary};
use crate::start_options::StartOptions;
use crate::status::RunStatus;
use crate::trace_context::TraceHeaders;
use crate::{Error, InstallReport, Result};

/// How many runs [`Client::cancel_all`] cancels per call of `pgflow.cancel_runs` (its default).
pub const CANCEL_BATCH: i32 = 1000;

/// How many runs [`Client::retry_all`] retries per call of `pgflow.retry_runs`, each call a
/// transaction of its own (the function's default).
pub const RETRY_BATCH: i32 = 100;

/// The application's door to the engine. Cheap to clone: it holds a pool.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<serde_json::Value>) -> pgflow_client::Result<()> {
/// use pgflow_client::Client;
///
/// let client = Client::new(pool);
/// client.install().await?; // pgmq + the pgflow schema, idempotent
/// client.compile(&flow).await?; // create_flow + add_step, idempotent, drift detected
/// let run = client.start(&flow, &serde_json::json!({"order_id": 1})).await?;
/// let output = run.wait().await?;
/// println!("{}", output.output());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    pool: PgPool,
}

impl Client {
    /// A client over `pool`.
    ///
    /// ```no_run
    /// # async fn demo() -> pgflow_client::Result<()> {
    /// let pool = sqlx::PgPool::connect("postgres://app@localhost/app").await?;
    /// let client = pgflow_client::Client::new(pool);
    /// # Ok(()) }
    /// ```
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool this client uses.
    ///
    /// For queries of your own beside the engine's, on the same connections:
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// let running: i64 =
    ///     sqlx::query_scalar("SELECT count(*) FROM pgflow.runs WHERE status = 'started'")
    ///         .fetch_one(client.pool())
    ///         .await?;
    /// println!("{running} runs in progress");
    /// # Ok(()) }
    /// ```
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Installs pgmq (when absent) and the engine schema; see [`crate::install`].
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// let report = client.install().await?;
    /// if !report.applied.is_empty() {
    ///     println!("applied {:?}; schema version {}", report.applied, report.schema_version);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn install(&self) -> Result<InstallReport> {
        crate::install(&self.pool).await
    }

    /// Puts a flow's definition into the database, in one transaction.
    ///
    /// An absent flow is created; an identical one is left alone ([`Compiled::Unchanged`]); a
    /// different one is [`Error::FlowDrift`], listing each difference. Validation (slugs,
    /// duplicate steps, option ranges) happens before any SQL is sent.
    ///
    /// Whether the structure differs (steps, their order, kinds, dependencies, conditions and
    /// skip modes) is the database's verdict, `pgflow._compare_flow_shapes` on the flow's
    /// [`shape_json`](crate::shape_json), the one a TypeScript worker's
    /// `pgflow.ensure_flow_compiled` reaches on the same database. Options, which upstream
    /// leaves out of a shape, are compared here too: a changed option is drift as well.
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client, flow: pgflow_core::Flow<serde_json::Value>) -> pgflow_client::Result<()> {
    /// use pgflow_client::{Compiled, Error};
    ///
    /// match client.compile(&flow).await {
    ///     Ok(Compiled::Created) => println!("created flow {}", flow.slug()),
    ///     Ok(_) => {}
    ///     Err(Error::FlowDrift { differences, .. }) => {
    ///         differences.iter().for_each(|difference| eprintln!("drift: {difference}"));
    ///     }
    ///     Err(err) => return Err(err),
    /// }
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(skip_all, fields(flow_slug = flow.slug()), err)]
    pub async fn compile<I>(&self, flow: &Flow<I>) -> Result<Compiled> {
        flow.validate()?;
        self.compile_shape(flow.shape(), None).await
    }

    /// Like [`Client::compile`], but a stored definition that differs is replaced: only when the
    /// flow has no runs ([`Replace::IfNoRuns`]), or deleting its runs
    /// ([`Replace::DeletingRuns`]).
    ///
    /// In development, where the runs of an edited flow do not matter:
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client, flow: pgflow_core::Flow<serde_json::Value>) -> pgflow_client::Result<()> {
    /// use pgflow_client::{Compiled, Replace};
    ///
    /// if let Compiled::Replaced { deleted_runs } =
    ///     client.compile_replacing(&flow, Replace::DeletingRuns).await?
    /// {
    ///     println!("flow {} replaced; {deleted_runs} old runs deleted", flow.slug());
    /// }
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(skip_all, fields(flow_slug = flow.slug()), err)]
    pub async fn compile_replacing<I>(&self, flow: &Flow<I>, mode: Replace) -> Result<Compiled> {
        flow.validate()?;
        self.compile_shape(flow.shape(), Some(mode)).await
    }

    /// Compiles a flow given by its shape (e.g. one deserialized from JSON).
    ///
    /// `replace` is `None` to refuse a differing stored flow, as [`Client::compile`] does.
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// use pgflow_core::FlowShape;
    ///
    /// let shape: FlowShape = serde_json::from_str(
    ///     r#"{"slug": "crawl", "steps": [
    ///         {"slug": "urls"},
    ///         {"slug": "fetch", "kind": "map", "dependencies": ["urls"]}
    ///     ]}"#,
    /// )?;
    /// client.compile_shape(&shape, None).await?;
    /// # Ok(()) }
    /// ```
    pub async fn compile_shape(
        &self,
        shape: &FlowShape,
        replace: Option<Replace>,
    ) -> Result<Compiled> {
        shape.validate()?;
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        // Workers of several processes compile the same flow at start-up, in Rust or in
        // TypeScript (pgflow.ensure_flow_compiled): one at a time, under create_flow's lock.
        sqlx::query("SELECT pgflow._lock_flow_definition($1)")
            .bind(&shape.slug)
            .execute(&mut *tx)
            .await?;
        let outcome = match definition::stored_shape(&mut tx, &shape.slug).await? {
            None => {
                definition::create(&mut tx, shape).await?;
                Compiled::Created
            }
            Some(stored) => {
                let differences = definition::drift(&mut tx, &stored, shape).await?;
                if differences.is_empty() {
                    Compiled::Unchanged
                } else {
                    let Some(mode) = replace else {
                        return Err(Error::FlowDrift {
                            flow: shape.slug.clone(),
                            differences,
                        });
                    };
                    let deleted_runs =
                        definition::delete(&mut tx, &shape.slug, mode == Replace::DeletingRuns)
                            .await?;
                    definition::create(&mut tx, shape).await?;
                    Compiled::Replaced { deleted_runs }
                }
            }
        };
        definition::sync_limits(&mut tx, shape).await?;
        tx.commit().await?;
        tracing::debug!(?outcome, "compiled flow");
        Ok(outcome)
    }

    /// What [`Client::compile`] would say of `shape`, changing nothing: `None` when the
    /// database has no such flow (compile would create it), else the differences it would
    /// refuse as [`Error::FlowDrift`] (none: unchanged). The structure's verdict is the
    /// database's, as in `compile`.
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client, flow: pgflow_core::Flow<serde_json::Value>) -> pgflow_client::Result<()> {
    /// match client.drift(flow.shape()).await? {
    ///     None => println!("flow {} is not compiled yet", flow.slug()),
    ///     Some(differences) => differences.iter().for_each(|d| println!("would change: {d}")),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn drift(&self, shape: &FlowShape) -> Result<Option<Vec<crate::Difference>>> {
        shape.validate()?;
        let mut conn = self.pool.acquire().await?;
        let Some(stored) = definition::stored_shape(&mut conn, &shape.slug).await? else {
            return Ok(None);
        };
        definition::drift(&mut conn, &stored, shape).await.map(Some)
    }

    /// The stored shape of a flow, or `None` when the database has no such flow.
    ///
    /// With [`differences`](crate::differences), this client's own comparison, what a deployment
    /// would change, without failing ([`Client::drift`] asks the database about the structure,
    /// as `compile` does):
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client, flow: pgflow_core::Flow<serde_json::Value>) -> pgflow_client::Result<()> {
    /// if let Some(stored) = client.flow_shape(flow.slug()).await? {
    ///     for difference in pgflow_client::differences(&stored, flow.shape()) {
    ///         println!("{difference}");
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn flow_shape(&self, flow_slug: &str) -> Result<Option<FlowShape>> {
        let mut conn = self.pool.acquire().await?;
        definition::stored_shape(&mut conn, flow_slug).await
    }

    /// Every stored flow's shape, by slug.
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// for shape in client.flows().await? {
    ///     println!("{}: {} steps", shape.slug, shape.steps.len());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn flows(&self) -> Result<Vec<FlowShape>> {
        let mut conn = self.pool.acquire().await?;
        let slugs: Vec<String> =
            sqlx::query_scalar("SELECT flow_slug FROM pgflow.flows ORDER BY flow_slug")
                .fetch_all(&mut *conn)
                .await?;
        let mut shapes = Vec::with_capacity(slugs.len());
        for slug in slugs {
            if let Some(shape) = definition::stored_shape(&mut conn, &slug).await? {
                shapes.push(shape);
            }
        }
        Ok(shapes)
    }

    /// Starts a run of `flow` with a typed input.
    ///
    /// ```no_run
    /// # #[derive(serde::Serialize)]
    /// # struct Order { order_id: u64 }
    /// # async fn demo(client: pgflow_client::Client, flow: pgflow_core::Flow<Order>) -> pgflow_client::Result<()> {
    /// let run = client.start(&flow, &Order { order_id: 42 }).await?;
    /// println!("started run {}", run.id());
    /// # Ok(()) }
    /// ```
    pub async fn start<I: Serialize>(&self, flow: &Flow<I>, input: &I) -> Result<RunHandle> {
        self.start_json(flow.slug(), encode(input)?, None).await
    }

    /// Starts a run of `flow` inside the caller's transaction: the run, its first tasks and
    /// their queue messages are written by `conn`, so they commit or roll back with the rest of
    /// the caller's work (an order row and the run that processes it, say). Workers see the run
    /// once the transaction commits; a rolled-back transaction leaves no run, no task and no
    /// message, and the returned handle then names a run that does not exist.
    ///
    /// `conn` is anything that gives a connection: `&mut *tx` (or `&mut tx`) for a
    /// transaction of yours, a `&mut PgConnection`, or a pool. An error from the engine (e.g.
    /// [`Error::InvalidInput`]) aborts the caller's transaction, as any failed statement does;
    /// an unknown flow ([`Error::UnknownFlow`]) is found before anything is written and does
    /// not.
    ///
    /// ```no_run
    /// # #[derive(serde::Serialize)]
    /// # struct Order { order_id: i64 }
    /// # async fn demo(client: pgflow_client::Client, flow: pgflow_core::Flow<Order>) -> pgflow_client::Result<()> {
    /// let mut tx = client.pool().begin().await?;
    /// sqlx::query("INSERT INTO orders (order_id) VALUES (42)").execute(&mut *tx).await?;
    /// let run = client.start_in(&mut *tx, &flow, &Order { order_id: 42 }).await?;
    /// sqlx::query("UPDATE orders SET run_id = $1 WHERE order_id = 42")
    ///     .bind(run.id())
    ///     .execute(&mut *tx)
    ///     .await?;
    /// tx.commit().await?; // the order and its run, or neither
    /// # Ok(()) }
    /// ```
    pub async fn start_in<'c, A, I>(&self, conn: A, flow: &Flow<I>, input: &I) -> Result<RunHandle>
    where
        A: Acquire<'c, Database = Postgres>,
        I: Serialize,
    {
        // The caller's trace context, taken before this call's own span is entered.
        let trace = crate::trace_context::caller();
        self.start_in_traced(conn, flow, input, StartOptions::new(), trace)
            .await
    }

    /// [`Client::start_in`] with [`StartOptions`]: the run, with its priority, commits or rolls
    /// back with the caller's transaction. A run id already taken is not looked up first (the
    /// caller's transaction may not see it yet): it fails the statement with the engine's
    /// unique violation on `runs_pkey`, which aborts the caller's transaction.
    ///
    /// ```no_run
    /// # #[derive(serde::Serialize)]
    /// # struct Order { order_id: i64 }
    /// # async fn demo(client: pgflow_client::Client, flow: pgflow_core::Flow<Order>) -> pgflow_client::Result<()> {
    /// use pgflow_client::StartOptions;
    ///
    /// let mut tx = client.pool().begin().await?;
    /// sqlx::query("INSERT INTO orders (order_id, express) VALUES (42, true)")
    ///     .execute(&mut *tx)
    ///     .await?;
    /// let express = StartOptions::new().priority(10);
    /// client.start_in_with(&mut *tx, &flow, &Order { order_id: 42 }, express).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn start_in_with<'c, A, I>(
        &self,
        conn: A,
        flow: &Flow<I>,
        input: &I,
        options: StartOptions,
    ) -> Result<RunHandle>
    where
        A: Acquire<'c, Database = Postgres>,
        I: Serialize,
    {
        let trace = crate::trace_context::caller();
        self.start_in_traced(conn, flow, input, options, trace)
            .await
    }

    #[tracing::instrument(name = "start_in", skip_all, fields(flow_slug = flow.slug()), err)]
    async fn start_in_traced<'c, A, I>(
        &self,
        conn: A,
        flow: &Flow<I>,
        input: &I,
        options: StartOptions,
        trace: Option<TraceHeaders>,
    ) -> Result<RunHandle>
    where
        A: Acquire<'c, Database = Postgres>,
        I: Serialize,
    {
        let input = encode(input)?;
        let mut conn = conn.acquire().await?;
        let run_id = start_on(
            &mut conn,
            flow.slug(),
            &input,
            options.get_run_id(),
            options.get_priority(),
            trace,
        )
        .await?;
        Ok(RunHandle::new(self.pool.clone(), run_id))
    }

    /// Starts a run of `flow` whose root steps start at `at`: the run exists at once (listed,
    /// readable, cancellable with [`Client::cancel`]; `pgflow.runs.scheduled_for` holds `at`
    /// and its `run:started` event carries it) but no task of it runs before `at`. A time not
    /// in the future starts it at once, as [`Client::start`] does. (`pgflow.start_flow_at`.)
    ///
    /// ```no_run
    /// # #[derive(serde::Serialize)]
    /// # struct Reminder { user_id: u64 }
    /// # async fn demo(client: pgflow_client::Client, flow: pgflow_core::Flow<Reminder>) -> pgflow_client::Result<()> {
    /// let tomorrow_nine = "2026-06-02T09:00:00Z".parse().expect("a time");
    /// let run = client.start_at(tomorrow_nine, &flow, &Reminder { user_id: 7 }).await?;
    /// // Changed our mind: nothing of it ever runs.
    /// client.cancel(run.id()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn start_at<I: Serialize>(
        &self,
        at: DateTime<Utc>,
        flow: &Flow<I>,
        input: &I,
    ) -> Result<RunHandle> {
        let trace = crate::trace_context::caller();
        let at = crate::schedule::StartAt::At(at);
        self.start_delayed(flow.slug(), encode(input)?, at, trace)
            .await
    }

    /// Starts a run of `flow` whose root steps start after `delay`, counted on the database
    /// server's clock; otherwise as [`Client::start_at`].
    ///
    /// ```no_run
    /// # #[derive(serde::Serialize)]
    /// # struct Followup { order_id: u64 }
    /// # async fn demo(client: pgflow_client::Client, flow: pgflow_core::Flow<Followup>) -> pgflow_client::Result<()> {
    /// use std::time::Duration;
    ///
    /// // Ask for a review three days after delivery.
    /// let delay = Duration::from_secs(3 * 86_400);
    /// let run = client.start_after(delay, &flow, &Followup { order_id: 42 }).await?;
    /// println!("run {} scheduled", run.id());
    /// # Ok(()) }
    /// ```
    pub async fn start_after<I: Serialize>(
        &self,
        delay: std::time::Duration,
        flow: &Flow<I>,
        input: &I,
    ) -> Result<RunHandle> {
        let trace = crate::trace_context::caller();
        let at = crate::schedule::StartAt::After(delay);
        self.start_delayed(flow.slug(), encode(input)?, at, trace)
            .await
    }

    /// For [`Client::start_at`] and [`Client::start_after`], with the caller's trace context
    /// taken before this span is entered.
    #[tracing::instrument(skip(self, input, trace), err)]
    async fn start_delayed(
        &self,
        flow_slug: &str,
        input: Value,
        at: crate::schedule::StartAt,
        trace: Option<TraceHeaders>,
    ) -> Result<RunHandle> {
        let mut conn = self.pool.acquire().await?;
        known_flow(&mut conn, flow_slug).await?;
        let run_id =
            crate::schedule::start_delayed(&mut conn, flow_slug, &input, at, None, trace).await?;
        Ok(RunHandle::new(self.pool.clone(), run_id))
    }

    /// Starts a run with a run id of the caller's choosing. Starting again with the same id
    /// returns the existing run instead of a second one, so a retried request is harmless.
    ///
    /// ```no_run
    /// # #[derive(serde::Serialize)]
    /// # struct Order { order_id: u64 }
    /// # async fn demo(client: pgflow_client::Client, flow: pgflow_core::Flow<Order>) -> pgflow_client::Result<()> {
    /// // E.g. the idempotency key of the request that asks for the run.
    /// let run_id = uuid::Uuid::new_v4();
    /// let run = client.start_with_id(&flow, &Order { order_id: 42 }, run_id).await?;
    /// let retried = client.start_with_id(&flow, &Order { order_id: 42 }, run_id).await?;
    /// assert_eq!(run.id(), retried.id());
    /// # Ok(()) }
    /// ```
    pub async fn start_with_id<I: Serialize>(
        &self,
        flow: &Flow<I>,
        input: &I,
        run_id: Uuid,
    ) -> Result<RunHandle> {
        self.start_json(flow.slug(), encode(input)?, Some(run_id))
            .await
    }

    /// Starts a run of the flow named `flow_slug` with a JSON input, for flows compiled
    /// elsewhere. `run_id` behaves as in [`Client::start_with_id`].
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// use pgflow_client::Error;
    ///
    /// let input = serde_json::json!({"order_id": 42});
    /// match client.start_json("order_processing", input, None).await {
    ///     Ok(run) => println!("started run {}", run.id()),
    ///     Err(Error::UnknownFlow { flows, .. }) => eprintln!("not compiled; flows: {flows:?}"),
    ///     Err(err) => return Err(err),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn start_json(
        &self,
        flow_slug: &str,
        input: Value,
        run_id: Option<Uuid>,
    ) -> Result<RunHandle> {
        // The caller's trace context, taken before this call's own span is entered.
        let trace = crate::trace_context::caller();
        self.start_json_traced(flow_slug, input, run_id, 0, trace)
            .await
    }

    /// Starts a run of `flow` with [`StartOptions`]: a priority, a run id of the caller's
    /// choosing. With the defaults it is [`Client::start`]; with a run id it behaves as
    /// [`Client::start_with_id`].
    ///
    /// ```no_run
    /// # #[derive(serde::Serialize)]
    /// # struct Order { order_id: u64 }
    /// # async fn demo(client: pgflow_client::Client, flow: pgflow_core::Flow<Order>) -> pgflow_client::Result<()> {
    /// use pgflow_client::StartOptions;
    ///
    /// let run = client
    ///     .start_with(&flow, &Order { order_id: 42 }, StartOptions::new().priority(10))
    ///     .await?;
    /// assert_eq!(client.run_priority(run.id()).await?, 10);
    /// # Ok(()) }
    /// ```
    pub async fn start_with<I: Serialize>(
        &self,
        flow: &Flow<I>,
        input: &I,
        options: StartOptions,
    ) -> Result<RunHandle> {
        self.start_json_with(flow.slug(), encode(input)?, options)
            .await
    }

    /// [`Client::start_with`] for a flow named by its slug, with a JSON input, as
    /// [`Client::start_json`].
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// use pgflow_client::StartOptions;
    ///
    /// let input = serde_json::json!({"order_id": 42});
    /// let options = StartOptions::new().priority(-1);
    /// let run = client.start_json_with("order_processing", input, options).await?;
    /// println!("started run {} behind the others", run.id());
    /// # Ok(()) }
    /// ```
    pub async fn start_json_with(
        &self,
        flow_slug: &str,
        input: Value,
        options: StartOptions,
    ) -> Result<RunHandle> {
        let trace = crate::trace_context::caller();
        self.start_json_traced(
            flow_slug,
            input,
            options.get_run_id(),
            options.get_priority(),
            trace,
        )
        .await
    }

    /// The priority of run `run_id` (`pgflow.run_priority`): 0 for a run started without
    /// one, and for a run that does not exist.
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client, run_id: uuid::Uuid) -> pgflow_client::Result<()> {
    /// println!("run {run_id} has priority {}", client.run_priority(run_id).await?);
    /// # Ok(()) }
    /// ```
    pub async fn run_priority(&self, run_id: Uuid) -> Result<i16> {
        Ok(sqlx::query_scalar("SELECT pgflow.run_priority($1)")
            .bind(run_id)
            .fetch_one(&self.pool)
            .await?)
    }

    #[tracing::instrument(name = "start_json", skip(self, input, trace), err)]
    async fn start_json_traced(
        &self,
        flow_slug: &str,
        input: Value,
        run_id: Option<Uuid>,
        priority: i16,
        trace: Option<TraceHeaders>,
    ) -> Result<RunHandle> {
        if let Some(run_id) = run_id
            && let Some(handle) = self.existing_run(flow_slug, run_id).await?
        {
            return Ok(handle);
        }
        let started = {
            let mut conn = self.pool.acquire().await?;
            start_on(&mut conn, flow_slug, &input, run_id, priority, trace).await
        };
        match started {
            Ok(id) => Ok(RunHandle::new(self.pool.clone(), id)),
            // Two callers raced with the same run id: the loser returns the winner's run.
            Err(Error::Database(sqlx::Error::Database(db)))
                if db.is_unique_violation() && run_id.is_some() =>
            {
                let run_id = run_id.unwrap_or_default();
                self.existing_run(flow_slug, run_id)
                    .await?
                    .ok_or(Error::UnknownRun(run_id))
            }
            Err(err) => Err(err),
        }
    }

    async fn existing_run(&self, flow_slug: &str, run_id: Uuid) -> Result<Option<RunHandle>> {
        let existing: Option<String> =
            sqlx::query_scalar("SELECT flow_slug FROM pgflow.runs WHERE run_id = $1")
                .bind(run_id)
                .fetch_optional(&self.pool)
                .await?;
        match existing {
            None => Ok(None),
            Some(flow) if flow == flow_slug => Ok(Some(RunHandle::new(self.pool.clone(), run_id))),
            Some(flow) => Err(Error::RunIdTaken {
                run_id,
                flow,
                requested: flow_slug.to_string(),
            }),
        }
    }

    /// A handle to an existing run.
    ///
    /// No query is made: use it for a run started elsewhere, e.g. by another process.
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client, run_id: uuid::Uuid) -> pgflow_client::Result<()> {
    /// let output = client.run(run_id).wait().await?;
    /// println!("{}", output.output());
    /// # Ok(()) }
    /// ```
    pub fn run(&self, run_id: Uuid) -> RunHandle {
        RunHandle::new(self.pool.clone(), run_id)
    }

    /// Reads a run's full state.
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client, run_id: uuid::Uuid) -> pgflow_client::Result<()> {
    /// let state = client.run_state(run_id).await?;
    /// println!("run of {} is {}", state.run.flow_slug, state.run.status);
    /// for step in &state.steps {
    ///     println!("  {} {}", step.step_slug, step.status);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn run_state(&self, run_id: Uuid) -> Result<RunState> {
        RunState::read(&self.pool, run_id).await
    }

    /// The most recent runs (newest first), optionally of one flow and/or one status.
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// use pgflow_client::RunStatus;
    ///
    /// let failed = client
    ///     .recent_runs(Some("order_processing"), Some(RunStatus::Failed), 20)
    ///     .await?;
    /// for run in failed {
    ///     println!("{} started {} ended {:?}", run.run_id, run.started_at, run.ended_at);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn recent_runs(
        &self,
        flow_slug: Option<&str>,
        status: Option<RunStatus>,
        limit: u32,
    ) -> Result<Vec<RunSummary>> {
        RunSummary::recent(&self.pool, flow_slug, status, i64::from(limit)).await
    }

    /// How many runs each flow has in each status.
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// for (flow, status, count) in client.run_counts().await? {
    ///     println!("{flow} {status}: {count}");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn run_counts(&self) -> Result<Vec<(String, RunStatus, i64)>> {
        Ok(sqlx::query_as(
            "SELECT flow_slug, status, count(*) FROM pgflow.runs
              GROUP BY flow_slug, status ORDER BY flow_slug, status",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Cancels a started run: its queued and started tasks are cancelled and their messages
    /// archived, its started steps are cancelled, and the run ends in status `cancelled`
    /// (events `step:cancelled` and `run:cancelled`). Workers running one of its tasks are told
    /// at once and fire the handler's cancellation token; what a handler reports afterwards
    /// changes nothing. Completed steps keep their outputs, and [`Client::retry`] can start the
    /// run again from them.
    ///
    /// Idempotent: a run that has already ended (completed, failed or cancelled) is left as it
    /// is, and the answer says so ([`Cancelled::AlreadyEnded`]). No such run:
    /// [`Error::UnknownRun`].
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client, run_id: uuid::Uuid) -> pgflow_client::Result<()> {
    /// use pgflow_client::Cancelled;
    ///
    /// match client.cancel(run_id).await? {
    ///     Cancelled::Now => println!("cancelled run {run_id}"),
    ///     Cancelled::AlreadyEnded(status) => println!("run {run_id} had already ended: {status}"),
    ///     _ => {}
    /// }
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(skip(self), err)]
    pub async fn cancel(&self, run_id: Uuid) -> Result<Cancelled> {
        let mut tx = self.pool.begin().await?;
        let cancelled: bool = sqlx::query_scalar("SELECT pgflow.cancel_run($1)")
            .bind(run_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(|err| Error::from_run_control(run_id, err))?;
        // The same transaction still holds the run's row: the status is the one cancel_run saw.
        let status: RunStatus =
            sqlx::query_scalar("SELECT status FROM pgflow.runs WHERE run_id = $1")
                .bind(run_id)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        let outcome = if cancelled {
            Cancelled::Now
        } else {
            Cancelled::AlreadyEnded(status)
        };
        tracing::debug!(?outcome, "cancel");
        Ok(outcome)
    }

    /// Cancels every started run of a flow, or those started before `started_before`, as
    /// [`Client::cancel`] does each; returns how many it cancelled.
    ///
    /// Works in batches of [`CANCEL_BATCH`] runs, oldest first, each a transaction of its own,
    /// so a flow with many runs does not hold one long transaction. Without `started_before`
    /// it takes the server's time when the call begins: runs started after that are left
    /// alone. A flow not in the database is [`Error::UnknownFlow`].
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// // Every run of the flow started more than an hour ago.
    /// let hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    /// let cancelled = client.cancel_all("order_processing", Some(hour_ago)).await?;
    /// println!("cancelled {cancelled} runs");
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(skip(self), err)]
    pub async fn cancel_all(
        &self,
        flow_slug: &str,
        started_before: Option<DateTime<Utc>>,
    ) -> Result<u64> {
        let started_before = {
            let mut conn = self.pool.acquire().await?;
            known_flow(&mut conn, flow_slug).await?;
            match started_before {
                Some(at) => at,
                None => server_now(&mut conn).await?,
            }
        };
        let mut total = 0;
        loop {
            let cancelled: i32 = sqlx::query_scalar("SELECT pgflow.cancel_runs($1, $2, $3)")
                .bind(flow_slug)
                .bind(started_before)
                .bind(CANCEL_BATCH)
                .fetch_one(&self.pool)
                .await?;
            total += u64::try_from(cancelled).unwrap_or_default();
            tracing::debug!(batch = cancelled, total, "cancelled a batch of runs");
            // Until a batch finds nothing: a run retried meanwhile may be started again.
            if cancelled <= 0 {
                return Ok(total);
            }
        }
    }

    /// Takes a failed or cancelled run back to `started`, resuming it from its completed work;
    /// returns the run's new retry count (1 after its first retry).
    ///
    /// Every step that had failed, was cancelled or was still started starts again: its tasks
    /// that did not complete are queued anew with fresh attempts (a map step resumes only
    /// those of its tasks); completed tasks keep their outputs and do not run again. Steps
    /// still waiting for dependencies wait as before. The engine emits `run:retried` and a
    /// `step:started` for each step that starts again. How the run ended before each retry is
    /// kept: [`Client::retry_history`].
    ///
    /// A run that is started or completed is refused with [`Error::NotRetryable`], nothing
    /// changed; of two callers retrying one run at once, one wins and the other gets that
    /// error with status `started`. No such run: [`Error::UnknownRun`].
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client, run_id: uuid::Uuid) -> pgflow_client::Result<()> {
    /// use pgflow_client::Error;
    ///
    /// match client.retry(run_id).await {
    ///     Ok(count) => println!("run {run_id} started again (retry {count})"),
    ///     Err(Error::NotRetryable { status, .. }) => println!("run {run_id} is {status}"),
    ///     Err(err) => return Err(err),
    /// }
    /// let output = client.run(run_id).wait().await?;
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(skip(self), err)]
    pub async fn retry(&self, run_id: Uuid) -> Result<u32> {
        let count: i32 = sqlx::query_scalar("SELECT pgflow.retry_run($1)")
            .bind(run_id)
            .fetch_one(&self.pool)
            .await
            .map_err(|err| Error::from_run_control(run_id, err))?;
        tracing::debug!(retry_count = count, "retried the run");
        Ok(u32::try_from(count).unwrap_or_default())
    }

    /// Retries every failed run of a flow, or those that failed since `failed_since`, as
    /// [`Client::retry`] does each; returns how many it retried. Cancelled runs are left alone
    /// (retry them one by one).
    ///
    /// Safe while workers run: it works in batches of [`RETRY_BATCH`] runs, oldest failure
    /// first, each batch a transaction of its own, and takes only runs that failed before the
    /// call began (the server's time, read once), so a run that fails again meanwhile is not
    /// retried twice. A run retried by another caller meanwhile is passed over. A flow not in
    /// the database is [`Error::UnknownFlow`].
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// // After fixing the bug that failed last night's runs:
    /// let since = chrono::Utc::now() - chrono::Duration::hours(12);
    /// let retried = client.retry_all("order_processing", Some(since)).await?;
    /// println!("retried {retried} runs");
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(skip(self), err)]
    pub async fn retry_all(
        &self,
        flow_slug: &str,
        failed_since: Option<DateTime<Utc>>,
    ) -> Result<u64> {
        let failed_before = {
            let mut conn = self.pool.acquire().await?;
            known_flow(&mut conn, flow_slug).await?;
            server_now(&mut conn).await?
        };
        let mut total = 0;
        loop {
            let mut tx = self.pool.begin().await?;
            let retried: i32 = sqlx::query_scalar("SELECT pgflow.retry_runs($1, $2, $3, $4)")
                .bind(flow_slug)
                .bind(failed_since)
                .bind(failed_before)
                .bind(RETRY_BATCH)
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            total += u64::try_from(retried).unwrap_or_default();
            tracing::debug!(batch = retried, total, "retried a batch of runs");
            // Until a batch finds nothing: a batch that passed over runs retried by another
            // caller returns fewer than it took, and more may be left.
            if retried <= 0 {
                return Ok(total);
            }
        }
    }

    /// How a run ended before each of its retries, oldest first (empty for a run never
    /// retried), from `pgflow_ext.run_retries`. No such run: [`Error::UnknownRun`].
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client, run_id: uuid::Uuid) -> pgflow_client::Result<()> {
    /// for retry in client.retry_history(run_id).await? {
    ///     println!(
    ///         "before retry {}: {} in step {:?}: {:?}",
    ///         retry.retry_number, retry.previous_status, retry.failed_step_slug, retry.error_message
    ///     );
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn retry_history(&self, run_id: Uuid) -> Result<Vec<RunRetry>> {
        RunRetry::of(&self.pool, run_id).await
    }

    /// Deletes the runs that ended (completed, failed or cancelled) more than `older_than` ago,
    /// with their step states, tasks, attempt history, queue messages and archive rows, and the
    /// workers whose last heartbeat is that old; returns what it deleted. Never a started run.
    /// In batches of [`PRUNE_BATCH`](crate::PRUNE_BATCH) runs, each a transaction of its own;
    /// see [`crate::prune`].
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// use std::time::Duration;
    ///
    /// let report = client.prune(Duration::from_secs(30 * 86_400)).await?;
    /// println!("deleted {} runs, {} tasks, {} messages", report.runs, report.tasks, report.messages);
    /// # Ok(()) }
    /// ```
    pub async fn prune(&self, older_than: std::time::Duration) -> Result<crate::PruneReport> {
        crate::prune(
            &self.pool,
            older_than,
            crate::PRUNE_BATCH,
            std::time::Duration::ZERO,
        )
        .await
    }

    /// Counts what [`Client::prune`] would delete, deleting nothing; see
    /// [`crate::prune_preview`].
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// use std::time::Duration;
    ///
    /// let would = client.prune_preview(Duration::from_secs(30 * 86_400)).await?;
    /// println!("a prune would delete {} runs", would.runs);
    /// # Ok(()) }
    /// ```
    pub async fn prune_preview(
        &self,
        older_than: std::time::Duration,
    ) -> Result<crate::PruneReport> {
        crate::prune_preview(&self.pool, older_than).await
    }

    /// Every schedule in the database (written by the workers that carry them), by name: its
    /// definition, whether it is paused, its last tick fired, and whether a worker fires it
    /// right now ([`ScheduleRow::firing`](crate::ScheduleRow::firing)).
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// let now = chrono::Utc::now();
    /// for schedule in client.schedules().await? {
    ///     println!(
    ///         "{} ({}, {} {}): next {:?}, paused {}",
    ///         schedule.schedule_name, schedule.flow_slug, schedule.cron, schedule.timezone,
    ///         schedule.next_tick(now), schedule.paused
    ///     );
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn schedules(&self) -> Result<Vec<crate::ScheduleRow>> {
        crate::schedule::list(&self.pool).await
    }

    /// Pauses a schedule: no tick fires until [`Client::resume_schedule`], and ticks that fall
    /// meanwhile never fire. Returns `true` when this call paused it, `false` when it was
    /// paused already. No such schedule: [`Error::UnknownSchedule`].
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// client.pause_schedule("nightly-report").await?; // during the maintenance
    /// client.resume_schedule("nightly-report").await?;
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(skip(self), err)]
    pub async fn pause_schedule(&self, name: &str) -> Result<bool> {
        crate::schedule::set_paused(&self.pool, name, true).await
    }

    /// Resumes a paused schedule from its next tick. Returns `true` when this call resumed it,
    /// `false` when it was not paused. No such schedule: [`Error::UnknownSchedule`].
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// if !client.resume_schedule("nightly-report").await? {
    ///     println!("it was not paused");
    /// }
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(skip(self), err)]
    pub async fn resume_schedule(&self, name: &str) -> Result<bool> {
        crate::schedule::set_paused(&self.pool, name, false).await
    }

    /// Deletes a schedule from the database (its runs stay). A worker that still carries it
    /// writes it again when it next starts: remove it from the code first. Returns whether
    /// there was one.
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// client.delete_schedule("old-report").await?;
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(skip(self), err)]
    pub async fn delete_schedule(&self, name: &str) -> Result<bool> {
        crate::schedule::delete(&self.pool, name).await
    }

    /// Finds the inconsistent runs and the stuck ones; see [`crate::check`].
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// for finding in client.check().await? {
    ///     eprintln!("{finding}");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn check(&self) -> Result<Vec<crate::Finding>> {
        crate::check(&self.pool).await
    }

    /// Subscribes to the engine's events (of every run); see [`Subscription`].
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// use pgflow_client::EventKind;
    ///
    /// let mut subscription = client.subscribe().await?;
    /// loop {
    ///     let event = subscription.next_event().await?;
    ///     if event.kind == EventKind::RunFailed {
    ///         eprintln!("run {} failed: {:?}", event.run_id, event.error_message);
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn subscribe(&self) -> Result<Subscription> {
        Subscription::listen(&self.pool).await
    }
}

fn encode<I: Serialize>(input: &I) -> Result<Value> {
    serde_json::to_value(input).map_err(Error::InputNotSerializable)
}

/// Starts a run on `conn`: the one place of the SQL that starts runs, for [`Client::start_json`]
/// on the client's pool and [`Client::start_in`] on the caller's connection. A trace context
/// (feature `otel`) goes with the run, in the same statement. Priority 0 is 0.8.1's
/// `start_flow`, so a flow whose runs never have another priority never meets
/// `start_flow_with_priority`.
async fn start_on(
    conn: &mut PgConnection,
    flow_slug: &str,
    input: &Value,
    run_id: Option<Uuid>,
    priority: i16,
    trace: Option<TraceHeaders>,
) -> Result<Uuid> {
    const START: &str = "SELECT run_id FROM pgflow.start_flow($1, $2, $3)";
    const START_WITH_PRIORITY: &str =
        "SELECT run_id FROM pgflow.start_flow_with_priority($1, $2, $4::integer, $3)";
    known_flow(conn, flow_slug).await?;
    if priority != 0 {
        return start_with_priority(
            conn,
            START_WITH_PRIORITY,
            flow_slug,
            input,
            run_id,
            priority,
            trace,
        )
        .await;
    }
    let Some(trace) = trace else {
        return sqlx::query_scalar(START)
            .bind(flow_slug)
            .bind(input)
            .bind(run_id)
            .fetch_one(&mut *conn)
            .await
            .map_err(|err| Error::from_start(flow_slug, err));
    };
    let (run_id, _stored): (Uuid, bool) = sqlx::query_as(&crate::trace_context::storing(START, 3))
        .bind(flow_slug)
        .bind(input)
        .bind(run_id)
        .bind(trace.traceparent)
        .bind(trace.tracestate)
        .fetch_one(&mut *conn)
        .await
        .map_err(|err| Error::from_start(flow_slug, err))?;
    Ok(run_id)
}

/// [`start_on`]'s statement for a run with a priority other than 0, with the trace context
/// stored in it when there is one.
async fn start_with_priority(
    conn: &mut PgConnection,
    sql: &str,
    flow_slug: &str,
    input: &Value,
    run_id: Option<Uuid>,
    priority: i16,
    trace: Option<TraceHeaders>,
) -> Result<Uuid> {
    let Some(trace) = trace else {
        return sqlx::query_scalar(sql)
            .bind(flow_slug)
            .bind(input)
            .bind(run_id)
            .bind(i32::from(priority))
            .fetch_one(&mut *conn)
            .await
            .map_err(|err| Error::from_start(flow_slug, err));
    };
    let (run_id, _stored): (Uuid, bool) = sqlx::query_as(&crate::trace_context::storing(sql, 4))
        .bind(flow_slug)
        .bind(input)
        .bind(run_id)
        .bind(i32::from(priority))
        .bind(trace.traceparent)
        .bind(trace.tracestate)
        .fetch_one(&mut *conn)
        .await
        .map_err(|err| Error::from_start(flow_slug, err))?;
    Ok(run_id)
}

/// `Ok` when the flow is in the database, else [`Error::UnknownFlow`] listing those that are.
async fn known_flow(conn: &mut PgConnection, flow_slug: &str) -> Result<()> {
    let known: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pgflow.flows WHERE flow_slug = $1)")
            .bind(flow_slug)
            .fetch_one(&mut *conn)
            .await?;
    if known {
        return Ok(());
    }
    let flows = sqlx::query_scalar("SELECT flow_slug FROM pgflow.flows ORDER BY flow_slug")
        .fetch_all(&mut *conn)
        .await?;
    Err(Error::UnknownFlow {
        flow: flow_slug.to_string(),
        flows,
    })
}

/// The server's time: bulk operations compare it with the times the server stored.
async fn server_now(conn: &mut PgConnection) -> Result<DateTime<Utc>> {
    Ok(sqlx::query_scalar("SELECT now()").fetch_one(conn).await?)
}

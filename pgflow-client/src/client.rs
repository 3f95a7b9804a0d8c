//! The client: install the engine, compile flows into the database, start runs.

use pgflow_core::{Flow, FlowShape};
use serde::Serialize;
use serde_json::Value;
use sqlx::{Connection, PgPool};
use uuid::Uuid;

use crate::definition::{self, Compiled, Replace};
use crate::events::Subscription;
use crate::run::{RunHandle, RunState, RunSummary};
use crate::status::RunStatus;
use crate::{Error, InstallReport, Result};

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
        // Workers of several processes compile the same flow at start-up; one at a time.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('pgflow.compile'), hashtext($1))")
            .bind(&shape.slug)
            .execute(&mut *tx)
            .await?;
        let outcome = match definition::stored_shape(&mut tx, &shape.slug).await? {
            None => {
                definition::create(&mut tx, shape).await?;
                Compiled::Created
            }
            Some(stored) => {
                let differences = definition::differences(&stored, shape);
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
        tx.commit().await?;
        tracing::debug!(?outcome, "compiled flow");
        Ok(outcome)
    }

    /// The stored shape of a flow, or `None` when the database has no such flow.
    ///
    /// With [`differences`](crate::differences), what a deployment would change, without failing:
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
    #[tracing::instrument(skip(self, input), err)]
    pub async fn start_json(
        &self,
        flow_slug: &str,
        input: Value,
        run_id: Option<Uuid>,
    ) -> Result<RunHandle> {
        if let Some(run_id) = run_id
            && let Some(handle) = self.existing_run(flow_slug, run_id).await?
        {
            return Ok(handle);
        }
        let known: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pgflow.flows WHERE flow_slug = $1)")
                .bind(flow_slug)
                .fetch_one(&self.pool)
                .await?;
        if !known {
            let flows = sqlx::query_scalar("SELECT flow_slug FROM pgflow.flows ORDER BY flow_slug")
                .fetch_all(&self.pool)
                .await?;
            return Err(Error::UnknownFlow {
                flow: flow_slug.to_string(),
                flows,
            });
        }
        let started: std::result::Result<Uuid, sqlx::Error> =
            sqlx::query_scalar("SELECT run_id FROM pgflow.start_flow($1, $2, $3)")
                .bind(flow_slug)
                .bind(&input)
                .bind(run_id)
                .fetch_one(&self.pool)
                .await;
        match started {
            Ok(id) => Ok(RunHandle::new(self.pool.clone(), id)),
            // Two callers raced with the same run id: the loser returns the winner's run.
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() && run_id.is_some() => {
                let run_id = run_id.unwrap_or_default();
                self.existing_run(flow_slug, run_id)
                    .await?
                    .ok_or(Error::UnknownRun(run_id))
            }
            Err(err) => Err(Error::from_start(flow_slug, err)),
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

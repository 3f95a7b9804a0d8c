//! The SQL engine, driven through its SQL API alone, one test per rule of the contract
//! (`shared/spec/sql-api.md`). Each test gets its own database with pgmq and the schema.

mod attempt_history;
mod attempts;
mod concurrency;
mod conditions;
mod definitions;
mod events;
mod flow_shapes;
mod limits;
mod maps;
mod plans;
mod retries;
mod run_control;
mod runs;

use pgflow_client::throwaway::TestDatabase;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{self, TaskRow};

/// The worker every helper starts tasks as.
pub const WORKER: Uuid = Uuid::from_u128(0x0000_0000_0000_0000_0000_0000_0000_0001);

/// One row of `pgflow.start_tasks`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Task {
    pub flow_slug: String,
    pub run_id: Uuid,
    pub step_slug: String,
    pub input: Value,
    pub msg_id: i64,
    pub task_index: i32,
}

/// A fresh database plus the few moves every test makes.
pub struct Engine {
    db: TestDatabase,
}

impl Engine {
    pub async fn new() -> Self {
        let db = support::database().await;
        let engine = Self { db };
        sqlx::query(
            "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) \
             VALUES ($1, 'tests', 'tests') ON CONFLICT (worker_id) DO NOTHING",
        )
        .bind(WORKER)
        .execute(engine.pool())
        .await
        .unwrap();
        engine
    }

    pub fn pool(&self) -> &PgPool {
        self.db.pool()
    }

    pub fn url(&self) -> &str {
        self.db.url()
    }

    /// Runs SQL text (one or more statements, no parameters).
    pub async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sql)
            .execute(self.pool())
            .await
            .unwrap_or_else(|err| panic!("{sql}: {err}"));
    }

    /// The error message of SQL that must fail.
    pub async fn error(&self, sql: &str) -> String {
        match sqlx::raw_sql(sql).execute(self.pool()).await {
            Ok(_) => panic!("expected an error from {sql}"),
            Err(err) => err
                .as_database_error()
                .map(|db| db.message().to_string())
                .unwrap_or_else(|| err.to_string()),
        }
    }

    /// The SQLSTATE of SQL that must fail.
    pub async fn error_code(&self, sql: &str) -> String {
        match sqlx::raw_sql(sql).execute(self.pool()).await {
            Ok(_) => panic!("expected an error from {sql}"),
            Err(err) => err
                .as_database_error()
                .and_then(|db| db.code().map(|c| c.to_string()))
                .unwrap_or_default(),
        }
    }

    pub async fn scalar<T>(&self, sql: &str) -> T
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
    {
        sqlx::query_scalar(sql)
            .fetch_one(self.pool())
            .await
            .unwrap_or_else(|err| panic!("{sql}: {err}"))
    }

    /// Creates a flow and its steps: `(slug, deps, step_type)`.
    pub async fn flow(&self, flow: &str, steps: &[(&str, &[&str], &str)]) {
        sqlx::query("SELECT pgflow.create_flow($1)")
            .bind(flow)
            .execute(self.pool())
            .await
            .unwrap();
        for (slug, deps, step_type) in steps {
            let deps: Vec<String> = deps.iter().map(|d| d.to_string()).collect();
            sqlx::query("SELECT pgflow.add_step($1, $2, $3, step_type => $4)")
                .bind(flow)
                .bind(slug)
                .bind(&deps)
                .bind(step_type)
                .execute(self.pool())
                .await
                .unwrap();
        }
    }

    pub async fn start(&self, flow: &str, input: Value) -> Uuid {
        support::start(self.pool(), flow, input).await
    }

    /// Reads every visible message of the flow's queue and starts their tasks: phase one and
    /// two of a worker's poll.
    pub async fn poll(&self, flow: &str) -> Vec<Task> {
        let msg_ids: Vec<i64> =
            sqlx::query_scalar("SELECT msg_id FROM pgmq.read($1, 30, 1000) ORDER BY msg_id")
                .bind(flow)
                .fetch_all(self.pool())
                .await
                .unwrap();
        self.start_tasks(flow, &msg_ids).await
    }

    pub async fn start_tasks(&self, flow: &str, msg_ids: &[i64]) -> Vec<Task> {
        let mut tasks: Vec<Task> = sqlx::query_as("SELECT * FROM pgflow.start_tasks($1, $2, $3)")
            .bind(flow)
            .bind(msg_ids)
            .bind(WORKER)
            .fetch_all(self.pool())
            .await
            .unwrap();
        tasks.sort_by(|a, b| (&a.step_slug, a.task_index).cmp(&(&b.step_slug, b.task_index)));
        tasks
    }

    pub async fn complete(&self, task: &Task, output: Value) -> Vec<TaskRow> {
        self.complete_at(task.run_id, &task.step_slug, task.task_index, output)
            .await
    }

    pub async fn complete_at(
        &self,
        run_id: Uuid,
        step: &str,
        task_index: i32,
        output: Value,
    ) -> Vec<TaskRow> {
        sqlx::query_as(&format!(
            "SELECT {} FROM pgflow.complete_task($1, $2, $3, $4)",
            TaskRow::COLUMNS
        ))
        .bind(run_id)
        .bind(step)
        .bind(task_index)
        .bind(output)
        .fetch_all(self.pool())
        .await
        .unwrap()
    }

    pub async fn fail(&self, task: &Task, error: &str) -> Vec<TaskRow> {
        self.fail_at(task.run_id, &task.step_slug, task.task_index, error)
            .await
    }

    pub async fn fail_at(
        &self,
        run_id: Uuid,
        step: &str,
        task_index: i32,
        error: &str,
    ) -> Vec<TaskRow> {
        sqlx::query_as(&format!(
            "SELECT {} FROM pgflow.fail_task($1, $2, $3, $4)",
            TaskRow::COLUMNS
        ))
        .bind(run_id)
        .bind(step)
        .bind(task_index)
        .bind(error)
        .fetch_all(self.pool())
        .await
        .unwrap()
    }

    /// Polls and completes with `handler` until no task is left visible; returns every task
    /// handled, in order.
    pub async fn drain(&self, flow: &str, handler: impl Fn(&Task) -> Value) -> Vec<Task> {
        let mut handled = Vec::new();
        loop {
            let tasks = self.poll(flow).await;
            if tasks.is_empty() {
                return handled;
            }
            for task in tasks {
                let output = handler(&task);
                self.complete(&task, output).await;
                handled.push(task);
            }
        }
    }

    /// `(status, output)` of a run.
    pub async fn run(&self, run_id: Uuid) -> (String, Option<Value>) {
        support::run(self.pool(), run_id).await
    }

    /// `(status, remaining_tasks, initial_tasks, remaining_deps)` of a step state.
    pub async fn step(&self, run_id: Uuid, step: &str) -> (String, Option<i32>, Option<i32>, i32) {
        sqlx::query_as(
            "SELECT status, remaining_tasks, initial_tasks, remaining_deps \
             FROM pgflow.step_states WHERE run_id = $1 AND step_slug = $2",
        )
        .bind(run_id)
        .bind(step)
        .fetch_one(self.pool())
        .await
        .unwrap()
    }

    pub async fn tasks(&self, run_id: Uuid) -> Vec<TaskRow> {
        support::tasks(self.pool(), run_id).await
    }

    /// Messages in the flow's queue and in its archive.
    pub async fn queue_counts(&self, flow: &str) -> (i64, i64) {
        let queued = self
            .scalar::<i64>(&format!("SELECT count(*) FROM pgmq.q_{flow}"))
            .await;
        let archived = self
            .scalar::<i64>(&format!("SELECT count(*) FROM pgmq.a_{flow}"))
            .await;
        (queued, archived)
    }

    /// Seconds until message `msg_id` becomes visible again (rounded).
    pub async fn visible_in(&self, flow: &str, msg_id: i64) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT round(extract(epoch FROM vt - clock_timestamp()))::bigint \
             FROM pgmq.q_{flow} WHERE msg_id = $1"
        ))
        .bind(msg_id)
        .fetch_one(self.pool())
        .await
        .unwrap()
    }

    /// Makes every message of the queue visible now (skips retry and start delays).
    pub async fn make_visible(&self, flow: &str) {
        self.exec(&format!("UPDATE pgmq.q_{flow} SET vt = clock_timestamp()"))
            .await;
    }
}

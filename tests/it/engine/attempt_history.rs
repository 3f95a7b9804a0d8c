//! Every failed attempt is kept (migration 0006): `pgflow_ext.step_task_attempts` gets a row for
//! each failure of a started task, whichever way it is reported, and none for starts and
//! completions.

use chrono::{DateTime, Utc};
use serde_json::json;
use uuid::Uuid;

use super::{Engine, WORKER};

/// `(task_index, attempt, error_message, last_worker_id)` of a step's recorded attempts.
type Attempt = (i32, i32, String, Option<Uuid>);

impl Engine {
    async fn attempts(&self, run_id: Uuid) -> Vec<Attempt> {
        sqlx::query_as(
            "SELECT task_index, attempt, error_message, last_worker_id \
               FROM pgflow_ext.step_task_attempts WHERE run_id = $1 \
              ORDER BY step_slug, task_index, attempt",
        )
        .bind(run_id)
        .fetch_all(self.pool())
        .await
        .unwrap()
    }

    /// A flow `h` with one step `work` of `max_attempts` attempts and no backoff.
    async fn history_flow(&self, max_attempts: i32) {
        self.exec(&format!(
            "SELECT pgflow.create_flow('h', max_attempts => {max_attempts}, base_delay => 0)"
        ))
        .await;
        self.exec("SELECT pgflow.add_step('h', 'work')").await;
    }

    /// Takes the run's one task again once its retry is due.
    async fn retake(&self) -> super::Task {
        self.make_visible("h").await;
        let mut tasks = self.poll("h").await;
        assert_eq!(tasks.len(), 1);
        tasks.remove(0)
    }
}

#[tokio::test]
async fn a_task_failing_twice_then_completing_leaves_its_two_failures() {
    let engine = Engine::new().await;
    engine.history_flow(3).await;
    let run = engine.start("h", json!({})).await;
    let task = engine.poll("h").await.remove(0);
    engine.fail(&task, "connection reset").await;
    let task = engine.retake().await;
    engine.fail(&task, "HTTP 503\nretry later").await;
    let task = engine.retake().await;
    engine.complete(&task, json!("done")).await;

    assert_eq!(engine.run(run).await.0, "completed");
    assert_eq!(
        engine.attempts(run).await,
        [
            (0, 1, "connection reset".to_owned(), Some(WORKER)),
            (0, 2, "HTTP 503\nretry later".to_owned(), Some(WORKER)),
        ]
    );
    // A retry has no failed_at in step_tasks; the attempt row has the time all the same.
    let stamped: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT failed_at FROM pgflow_ext.step_task_attempts WHERE run_id = $1 ORDER BY attempt",
    )
    .bind(run)
    .fetch_all(engine.pool())
    .await
    .unwrap();
    assert_eq!(stamped.len(), 2);
    assert!(stamped[0] <= stamped[1]);
}

#[tokio::test]
async fn the_same_message_twice_is_two_attempts() {
    let engine = Engine::new().await;
    engine.history_flow(2).await;
    let run = engine.start("h", json!({})).await;
    let task = engine.poll("h").await.remove(0);
    engine.fail(&task, "timeout").await;
    let task = engine.retake().await;
    engine.fail(&task, "timeout").await;

    assert_eq!(engine.run(run).await.0, "failed");
    let attempts = engine.attempts(run).await;
    assert_eq!(
        attempts
            .iter()
            .map(|a| (a.1, a.2.as_str()))
            .collect::<Vec<_>>(),
        [(1, "timeout"), (2, "timeout")]
    );
}

#[tokio::test]
async fn a_permanent_failure_leaves_one_attempt_and_later_reports_add_none() {
    let engine = Engine::new().await;
    engine.history_flow(5).await;
    let run = engine.start("h", json!({})).await;
    engine.poll("h").await;
    engine
        .exec(&format!(
            "SELECT pgflow.fail_task('{run}', 'work', 0, 'invalid card', 1, '{WORKER}', true)"
        ))
        .await;
    assert_eq!(engine.run(run).await.0, "failed");
    // Reports that change nothing on the failed task record nothing either.
    engine
        .exec(&format!(
            "SELECT pgflow.fail_task('{run}', 'work', 0, 'again')"
        ))
        .await;
    engine
        .exec(&format!(
            "SELECT pgflow.complete_task('{run}', 'work', 0, '\"late\"')"
        ))
        .await;

    assert_eq!(
        engine.attempts(run).await,
        [(0, 1, "invalid card".to_owned(), Some(WORKER))]
    );
}

#[tokio::test]
async fn a_type_violation_is_recorded_as_the_failed_attempt() {
    let engine = Engine::new().await;
    engine
        .flow("t", &[("list", &[], "single"), ("each", &["list"], "map")])
        .await;
    let run = engine.start("t", json!({})).await;
    let task = engine.poll("t").await.remove(0);
    engine.complete(&task, json!("not an array")).await;

    assert_eq!(engine.run(run).await.0, "failed");
    let attempts = engine.attempts(run).await;
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0].1, 1);
    assert!(
        attempts[0].2.starts_with("[TYPE_VIOLATION] "),
        "{attempts:?}"
    );
}

#[tokio::test]
async fn deleting_a_run_deletes_its_attempts() {
    let engine = Engine::new().await;
    engine.history_flow(2).await;
    let run = engine.start("h", json!({})).await;
    let other = engine.start("h", json!({})).await;
    for task in engine.poll("h").await {
        engine.fail(&task, "boom").await;
    }
    assert_eq!(engine.attempts(run).await.len(), 1);

    engine
        .exec(&format!(
            "DELETE FROM pgflow.step_tasks WHERE run_id = '{run}'; \
             DELETE FROM pgflow.step_states WHERE run_id = '{run}'; \
             DELETE FROM pgflow.runs WHERE run_id = '{run}'"
        ))
        .await;
    assert!(engine.attempts(run).await.is_empty());
    assert_eq!(
        engine.attempts(other).await.len(),
        1,
        "other runs keep theirs"
    );
}

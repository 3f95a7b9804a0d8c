//! The attempt-carrying reports (migration 0002): `complete_tasks`, `complete_task` and
//! `fail_task` with the attempt that ran apply only while that attempt is the task's current
//! one; the 0.8.1 forms keep their meaning.

use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use super::{Engine, WORKER};
use crate::support::{TaskRow, eventually};

impl Engine {
    /// `pgflow.complete_task` with the attempt (and worker) that ran.
    async fn complete_attempt(
        &self,
        run_id: Uuid,
        attempt: i32,
        worker: Option<Uuid>,
    ) -> Vec<TaskRow> {
        sqlx::query_as(&format!(
            "SELECT {} FROM pgflow.complete_task($1, 'work', 0, '\"done\"', $2, $3)",
            TaskRow::COLUMNS
        ))
        .bind(run_id)
        .bind(attempt)
        .bind(worker)
        .fetch_all(self.pool())
        .await
        .unwrap()
    }

    /// `pgflow.fail_task` with the attempt that ran.
    async fn fail_attempt(&self, run_id: Uuid, attempt: i32, permanent: bool) -> Vec<TaskRow> {
        sqlx::query_as(&format!(
            "SELECT {} FROM pgflow.fail_task($1, 'work', 0, 'late', $2, $3, $4)",
            TaskRow::COLUMNS
        ))
        .bind(run_id)
        .bind(attempt)
        .bind(WORKER)
        .bind(permanent)
        .fetch_all(self.pool())
        .await
        .unwrap()
    }

    /// The one task's (status, attempts_count).
    async fn work_task(&self, run_id: Uuid) -> (String, i32) {
        let tasks = self.tasks(run_id).await;
        (tasks[0].status.clone(), tasks[0].attempts_count)
    }
}

/// A flow `attempts` with one step `work`, three attempts, no backoff; a run of it whose task
/// is started on its second attempt (the first failed).
async fn on_second_attempt() -> (Engine, Uuid) {
    let engine = Engine::new().await;
    engine
        .exec("SELECT pgflow.create_flow('attempts', max_attempts => 3, base_delay => 0)")
        .await;
    engine
        .exec("SELECT pgflow.add_step('attempts', 'work')")
        .await;
    let run = engine.start("attempts", json!({})).await;
    let tasks = engine.poll("attempts").await;
    engine.fail(&tasks[0], "first").await;
    engine.make_visible("attempts").await;
    assert_eq!(engine.poll("attempts").await.len(), 1);
    assert_eq!(engine.work_task(run).await, ("started".to_owned(), 2));
    (engine, run)
}

#[tokio::test]
async fn a_completion_of_an_earlier_attempt_changes_nothing() {
    let (engine, run) = on_second_attempt().await;
    assert!(engine.complete_attempt(run, 1, None).await.is_empty());
    assert_eq!(engine.work_task(run).await, ("started".to_owned(), 2));
    assert_eq!(engine.run(run).await.0, "started");

    let rows = engine.complete_attempt(run, 2, Some(WORKER)).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        engine.run(run).await,
        ("completed".to_owned(), Some(json!({"work": "done"})))
    );
}

#[tokio::test]
async fn a_completion_from_another_worker_changes_nothing() {
    let (engine, run) = on_second_attempt().await;
    assert!(
        engine
            .complete_attempt(run, 2, Some(Uuid::new_v4()))
            .await
            .is_empty()
    );
    assert_eq!(engine.work_task(run).await, ("started".to_owned(), 2));
}

#[tokio::test]
async fn a_failure_of_an_earlier_attempt_changes_nothing() {
    let (engine, run) = on_second_attempt().await;
    for permanent in [false, true] {
        assert!(engine.fail_attempt(run, 1, permanent).await.is_empty());
        assert_eq!(engine.work_task(run).await, ("started".to_owned(), 2));
        assert_eq!(engine.run(run).await.0, "started");
    }
    // The current attempt's failure is retried as 0.8.1's fail_task would.
    let rows = engine.fail_attempt(run, 2, false).await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].attempts_count),
        ("queued", 2)
    );
    // A report for an attempt that is over (the task is queued again) changes nothing either.
    assert!(engine.fail_attempt(run, 2, false).await.is_empty());
    assert!(engine.complete_attempt(run, 2, None).await.is_empty());
    assert_eq!(engine.work_task(run).await, ("queued".to_owned(), 2));
}

#[tokio::test]
async fn a_permanent_failure_fails_the_run_with_the_attempts_actually_made() {
    let (engine, run) = on_second_attempt().await;
    let rows = engine.fail_attempt(run, 2, true).await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].attempts_count),
        ("failed", 2),
        "attempts left, but permanent: failed, attempts_count untouched"
    );
    assert_eq!(engine.run(run).await.0, "failed");
    let (queued, archived) = engine.queue_counts("attempts").await;
    assert_eq!((queued, archived), (0, 1));
}

#[tokio::test]
async fn the_four_argument_forms_still_apply_to_any_started_attempt() {
    let (engine, run) = on_second_attempt().await;
    let rows = engine.fail_at(run, "work", 0, "0.8.1 form").await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].attempts_count),
        ("queued", 2)
    );
    engine.make_visible("attempts").await;
    engine.poll("attempts").await;
    let rows = engine.complete_at(run, "work", 0, json!("done")).await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].attempts_count),
        ("completed", 3)
    );
}

#[tokio::test]
async fn complete_tasks_with_attempts_skips_only_the_stale_entries() {
    let engine = Engine::new().await;
    engine.flow("pair", &[("work", &[], "map")]).await;
    let run = engine.start("pair", json!([1, 2])).await;
    let tasks = engine.poll("pair").await;
    assert_eq!(tasks.len(), 2);
    // Task 0 reported for attempt 1 (current), task 1 for attempt 7 (not current).
    let rows: Vec<(String, i32, String)> = sqlx::query_as(
        "SELECT step_slug, task_index, status FROM pgflow.complete_tasks( \
            ARRAY[$1, $1]::uuid[], ARRAY['work', 'work'], ARRAY[0, 1], \
            ARRAY['10', '20']::jsonb[], ARRAY[1, 7], ARRAY[$2, $2]::uuid[])",
    )
    .bind(run)
    .bind(WORKER)
    .fetch_all(engine.pool())
    .await
    .unwrap();
    assert_eq!(rows, vec![("work".to_owned(), 0, "completed".to_owned())]);
    let statuses: Vec<String> = engine
        .tasks(run)
        .await
        .into_iter()
        .map(|t| t.status)
        .collect();
    assert_eq!(statuses, ["completed", "started"]);

    let error = engine
        .error(
            "SELECT * FROM pgflow.complete_tasks(ARRAY[gen_random_uuid()], ARRAY['work'], \
             ARRAY[0], ARRAY['1'::jsonb], ARRAY[1, 2])",
        )
        .await;
    assert!(error.contains("must have the same length"), "{error}");
}

/// Waits until one backend of this database waits on a row lock in a `complete_tasks` report.
async fn a_report_waits_on_a_lock(engine: &Engine) {
    eventually(
        "a report to wait on the task's lock",
        Duration::from_secs(5),
        async || {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
              WHERE datname = current_database() AND pid <> pg_backend_pid() \
                AND wait_event_type = 'Lock' AND query LIKE '%complete_tasks%'",
            )
            .fetch_one(engine.pool())
            .await
            .unwrap();
            waiting == 1
        },
    )
    .await;
}

/// The batched report checks the attempt of the task version it locks (migration 0020): a
/// report that waits on a task being retried meanwhile finds attempt 2 failed and changes
/// nothing; once the holder lets go of the task unchanged, the same report completes it.
#[tokio::test]
async fn a_report_waiting_on_its_task_checks_the_version_it_gets() {
    for retried in [true, false] {
        let (engine, run) = on_second_attempt().await;
        let mut holder = engine.pool().begin().await.unwrap();
        sqlx::query("SELECT 1 FROM pgflow.step_tasks WHERE run_id = $1 FOR NO KEY UPDATE")
            .bind(run)
            .execute(&mut *holder)
            .await
            .unwrap();
        let report = tokio::spawn({
            let pool = engine.pool().clone();
            async move {
                let rows: Vec<(String,)> = sqlx::query_as(
                    "SELECT status FROM pgflow.complete_tasks(ARRAY[$1]::uuid[], \
                     ARRAY['work'], ARRAY[0], ARRAY['\"done\"'::jsonb], ARRAY[2], NULL)",
                )
                .bind(run)
                .fetch_all(&pool)
                .await
                .unwrap();
                rows
            }
        });
        a_report_waits_on_a_lock(&engine).await;
        if retried {
            sqlx::query("SELECT * FROM pgflow.fail_task($1, 'work', 0, 'meanwhile', 2, NULL)")
                .bind(run)
                .execute(&mut *holder)
                .await
                .unwrap();
        }
        holder.commit().await.unwrap();
        let rows = report.await.unwrap();
        if retried {
            assert!(rows.is_empty(), "a stale report completed: {rows:?}");
            assert_eq!(engine.work_task(run).await, ("queued".to_owned(), 2));
        } else {
            assert_eq!(rows, vec![("completed".to_owned(),)]);
            assert_eq!(engine.work_task(run).await, ("completed".to_owned(), 2));
        }
    }
}

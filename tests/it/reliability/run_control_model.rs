//! Model-based tests of run control: the random DAGs of [`super::model`], played through the
//! SQL API by a worker that holds some tasks back and reports them late, while the run is
//! cancelled and retried at random moments. Whatever the interleaving, the reference model
//! predicts the end: the run completes (planned failures happen only before its first retry)
//! with the model's outputs, every delivered task has the model's input, no completed task is
//! delivered again, a report from before a cancel or a retry changes nothing, and the run's
//! retry count and history match the retries made.

use std::collections::HashSet;

use pgflow_client::throwaway::TestDatabase;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::model::{Dag, FLOW, RawStep, case, compile, model, output};

/// A task a worker started and has not reported yet.
#[derive(Debug)]
struct Held {
    step: usize,
    task_index: i32,
    attempt: i32,
    /// Cancels and retries of the run when it was started: a report is stale once it moved.
    epoch: u32,
}

fn fail(message: String) -> TestCaseError {
    TestCaseError::fail(message)
}

/// What the handler does: the planned failures, but only before the run's first retry (the
/// fix an operator deploys before retrying), so every case can end completed.
fn handle(dag: &Dag, held: &Held, life: i32, input: &Value) -> Result<Value, String> {
    let step = &dag.steps[held.step];
    if life == 0 && u32::try_from(held.attempt).unwrap_or(0) <= step.fails {
        return Err(format!("planned failure on attempt {}", held.attempt));
    }
    Ok(output(step, held.task_index, input))
}

/// Reports `held`; returns the task's status after the report, `None` when the engine
/// ignored the report as one of an attempt the task no longer has.
async fn report(
    pool: &PgPool,
    run: Uuid,
    worker: Uuid,
    dag: &Dag,
    held: &Held,
    result: Result<Value, String>,
) -> Result<Option<String>, sqlx::Error> {
    let slug = &dag.steps[held.step].slug;
    let rows: Vec<String> = match result {
        Ok(output) => {
            sqlx::query_scalar("SELECT status FROM pgflow.complete_task($1, $2, $3, $4, $5, $6)")
                .bind(run)
                .bind(slug)
                .bind(held.task_index)
                .bind(output)
                .bind(held.attempt)
                .bind(worker)
                .fetch_all(pool)
                .await?
        }
        Err(message) => {
            sqlx::query_scalar(
                "SELECT status FROM pgflow.fail_task($1, $2, $3, $4, $5, $6, false, NULL::integer)",
            )
            .bind(run)
            .bind(slug)
            .bind(held.task_index)
            .bind(message)
            .bind(held.attempt)
            .bind(worker)
            .fetch_all(pool)
            .await?
        }
    };
    Ok(rows.into_iter().next())
}

async fn run_case(dag: &Dag, ops: &[u8]) -> Result<(), TestCaseError> {
    let db = TestDatabase::new()
        .await
        .map_err(|e| fail(format!("db: {e}")))?;
    let pool = db.pool();
    let db_error = |e: sqlx::Error| fail(format!("database: {e}"));
    compile(pool, dag).await.map_err(db_error)?;
    // Every planned failure is gone after the first retry: the model of the same flow
    // without failures says how the run ends.
    let mut clean = dag.clone();
    for step in &mut clean.steps {
        step.fails = 0;
    }
    let expected = model(&clean);
    let worker = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) VALUES ($1, $2, 'model')",
    )
    .bind(worker)
    .bind(FLOW)
    .execute(pool)
    .await
    .map_err(db_error)?;
    let run: Uuid = sqlx::query_scalar("SELECT run_id FROM pgflow.start_flow($1, $2)")
        .bind(FLOW)
        .bind(&dag.input)
        .fetch_one(pool)
        .await
        .map_err(db_error)?;

    let mut op = ops.iter().copied().cycle();
    let mut life = 0_i32;
    let mut epoch = 0_u32;
    let mut cancels = 0;
    let mut held: Vec<Held> = Vec::new();
    let mut completed: HashSet<(usize, i32)> = HashSet::new();
    let mut idle = 0;
    for _round in 0..2000 {
        let status: String = sqlx::query_scalar("SELECT status FROM pgflow.runs WHERE run_id = $1")
            .bind(run)
            .fetch_one(pool)
            .await
            .map_err(db_error)?;
        match status.as_str() {
            "completed" => break,
            "failed" | "cancelled" => {
                let count: i32 = sqlx::query_scalar("SELECT pgflow.retry_run($1)")
                    .bind(run)
                    .fetch_one(pool)
                    .await
                    .map_err(db_error)?;
                life += 1;
                epoch += 1;
                prop_assert_eq!(count, life, "retry count");
                continue;
            }
            _ => {}
        }

        let byte = op.next().unwrap_or(0);
        let tasks: Vec<(String, i32, Value, i32)> = sqlx::query_as(
            "SELECT step_slug, task_index, input, attempt \
               FROM pgflow._read_and_start($1, $2, 30, $3)",
        )
        .bind(FLOW)
        .bind(i32::from(byte % 4) + 1)
        .bind(worker)
        .fetch_all(pool)
        .await
        .map_err(db_error)?;
        let delivered = !tasks.is_empty();
        let mut now = Vec::new();
        for (slug, task_index, input, attempt) in tasks {
            let step = dag
                .index(&slug)
                .ok_or_else(|| fail(format!("unknown step {slug}")))?;
            let want = expected.inputs.get(&(step, task_index)).ok_or_else(|| {
                fail(format!(
                    "{slug}/{task_index} delivered; the model never reaches it"
                ))
            })?;
            prop_assert_eq!(&input, want, "input of {}/{}", slug, task_index);
            prop_assert!(
                !completed.contains(&(step, task_index)),
                "{}/{} completed once and was delivered again",
                slug,
                task_index
            );
            // The worker runs the task again: an older execution of it that it still holds
            // is stale, and the Rust worker drops such a one unreported. A report of it now
            // would name the same attempt number and worker as the new start (attempts
            // count from 1 again after a retry), which the engine cannot tell apart.
            held.retain(|h| (h.step, h.task_index) != (step, task_index));
            let task = Held {
                step,
                task_index,
                attempt,
                epoch,
            };
            if op.next().unwrap_or(0) % 4 == 0 {
                held.push(task);
            } else {
                now.push((task, input));
            }
        }
        for (task, input) in now {
            let result = handle(dag, &task, life, &input);
            let after = report(pool, run, worker, dag, &task, result)
                .await
                .map_err(db_error)?;
            if after.is_none() {
                // Since migration 0010 a run's failure cancels its other tasks (pgflow
                // 0.15.1), so a report that comes after it names an attempt the task no
                // longer has: that is the one report that may be refused.
                let (run_status, task_status): (String, String) = sqlx::query_as(
                    "SELECT r.status, t.status FROM pgflow.runs r JOIN pgflow.step_tasks t
                        ON t.run_id = r.run_id
                     WHERE r.run_id = $1 AND t.step_slug = $2 AND t.task_index = $3",
                )
                .bind(run)
                .bind(&dag.steps[task.step].slug)
                .bind(task.task_index)
                .fetch_one(pool)
                .await
                .map_err(db_error)?;
                prop_assert_eq!(
                    (run_status.as_str(), task_status.as_str()),
                    ("failed", "cancelled"),
                    "a current report is taken unless its run failed"
                );
            }
            if after.as_deref() == Some("completed") {
                completed.insert((task.step, task.task_index));
            }
        }

        // Now and then: cancel the run (at most three times a case).
        if byte % 7 == 3 && cancels < 3 {
            let cancelled: bool = sqlx::query_scalar("SELECT pgflow.cancel_run($1)")
                .bind(run)
                .fetch_one(pool)
                .await
                .map_err(db_error)?;
            if cancelled {
                cancels += 1;
                epoch += 1;
            }
        }

        // Now and then: report what was held back, perhaps across a cancel or a retry.
        // (Always when nothing else was delivered: a worker does finish its tasks.)
        if byte % 5 == 1 || held.len() > 6 || !delivered {
            for task in std::mem::take(&mut held) {
                let input = expected.inputs[&(task.step, task.task_index)].clone();
                let result = handle(dag, &task, life, &input);
                let after = report(pool, run, worker, dag, &task, result)
                    .await
                    .map_err(db_error)?;
                // A current report is refused only when its run failed meanwhile and
                // cancelled the task (0010, as for the reports above).
                let failed_meanwhile = after.is_none() && task.epoch == epoch && {
                    let (run_status, task_status): (String, String) = sqlx::query_as(
                        "SELECT r.status, t.status FROM pgflow.runs r JOIN pgflow.step_tasks t
                            ON t.run_id = r.run_id
                         WHERE r.run_id = $1 AND t.step_slug = $2 AND t.task_index = $3",
                    )
                    .bind(run)
                    .bind(&dag.steps[task.step].slug)
                    .bind(task.task_index)
                    .fetch_one(pool)
                    .await
                    .map_err(db_error)?;
                    run_status == "failed" && task_status == "cancelled"
                };
                prop_assert_eq!(
                    after.is_some() || failed_meanwhile,
                    task.epoch == epoch,
                    "a report of {}/{} (epoch {} now {}) applied",
                    &dag.steps[task.step].slug,
                    task.task_index,
                    task.epoch,
                    epoch
                );
                if after.as_deref() == Some("completed") {
                    completed.insert((task.step, task.task_index));
                }
            }
        }

        if !delivered && held.is_empty() {
            idle += 1;
            prop_assert!(
                idle < 200,
                "run {run} is started but no task can be started"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        } else {
            idle = 0;
        }
    }

    let (status, run_output, retry_count): (String, Option<Value>, i32) =
        sqlx::query_as("SELECT status, output, retry_count FROM pgflow.runs WHERE run_id = $1")
            .bind(run)
            .fetch_one(pool)
            .await
            .map_err(db_error)?;
    prop_assert_eq!(status.as_str(), "completed");
    prop_assert_eq!(run_output.as_ref(), expected.run_output.as_ref());
    prop_assert_eq!(retry_count, life);
    let history: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pgflow_ext.run_retries WHERE run_id = $1")
            .bind(run)
            .fetch_one(pool)
            .await
            .map_err(db_error)?;
    prop_assert_eq!(history, i64::from(life));
    let outputs: Vec<(String, Value)> = sqlx::query_as(
        "SELECT ss.step_slug, pgflow._step_output(ss.run_id, ss.step_slug, s.step_type) \
           FROM pgflow.step_states ss JOIN pgflow.steps s USING (flow_slug, step_slug) \
          WHERE ss.run_id = $1",
    )
    .bind(run)
    .fetch_all(pool)
    .await
    .map_err(db_error)?;
    for (slug, value) in outputs {
        let i = dag.index(&slug).unwrap_or_default();
        prop_assert_eq!(
            Some(&value),
            expected.outputs[i].as_ref(),
            "output of {}",
            slug
        );
    }
    let violations = pgflow_client::check(pool)
        .await
        .map_err(|e| fail(format!("check: {e}")))?;
    prop_assert!(violations.is_empty(), "{:?}", violations);
    Ok(())
}

fn run_model(cases: u32) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut runner = TestRunner::new(Config {
        cases,
        max_shrink_iters: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (case(), prop::collection::vec(any::<u8>(), 1..64));
    let result = runner.run(&strategy, |((raw, input_len), ops)| {
        // Type violations fail a run on every retry: not what this model is about.
        let raw: Vec<RawStep> = raw
            .into_iter()
            .map(|step| RawStep {
                non_array: false,
                ..step
            })
            .collect();
        let dag = Dag::new(&raw, input_len);
        runtime.block_on(run_case(&dag, &ops))
    });
    if let Err(error) = result {
        panic!("{error}");
    }
}

#[test]
fn random_cancels_and_retries_end_as_the_reference_model_predicts() {
    run_model(16);
}

#[test]
#[ignore = "long form: PGFLOW_MODEL_CASES cases (default 500)"]
fn random_cancels_and_retries_end_as_the_reference_model_predicts_long() {
    run_model(u32::try_from(super::env_size("PGFLOW_MODEL_CASES", 500)).unwrap_or(500));
}

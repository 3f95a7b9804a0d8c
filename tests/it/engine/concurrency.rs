//! Workers racing on the same runs: no deadlock, no lost update, nothing completed twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use super::{Engine, Task, WORKER};

type Seen = Arc<Mutex<HashMap<(Uuid, String, i32), u32>>>;

/// A worker loop until every run of the flow has finished. Reads with a zero visibility
/// timeout so that both workers see the same messages and race on start_tasks; reports
/// results one by one, in batches (in reverse order) and sometimes twice; fails now and then.
async fn worker(pool: PgPool, flow: &'static str, seed: u64, seen: Seen) {
    let mut rng = seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    loop {
        let unfinished: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pgflow.runs WHERE flow_slug = $1 AND status = 'started'",
        )
        .bind(flow)
        .fetch_one(&pool)
        .await
        .unwrap();
        if unfinished == 0 {
            return;
        }
        let qty = (next() % 6 + 1) as i32;
        let msg_ids: Vec<i64> = sqlx::query_scalar("SELECT msg_id FROM pgmq.read($1, 0, $2)")
            .bind(flow)
            .bind(qty)
            .fetch_all(&pool)
            .await
            .unwrap();
        if msg_ids.is_empty() {
            // Retried tasks come back after their (zero) backoff.
            sqlx::query(&format!("UPDATE pgmq.q_{flow} SET vt = clock_timestamp() WHERE vt > clock_timestamp() + interval '5 seconds'"))
                .execute(&pool)
                .await
                .unwrap();
            tokio::task::yield_now().await;
            continue;
        }
        let tasks: Vec<Task> = sqlx::query_as("SELECT * FROM pgflow.start_tasks($1, $2, $3)")
            .bind(flow)
            .bind(&msg_ids)
            .bind(WORKER)
            .fetch_all(&pool)
            .await
            .unwrap();
        let mut batch: Vec<(Uuid, String, i32, Value)> = Vec::new();
        for task in tasks {
            *seen
                .lock()
                .unwrap()
                .entry((task.run_id, task.step_slug.clone(), task.task_index))
                .or_default() += 1;
            let output = match task.step_slug.as_str() {
                "fan" => json!(task.input.as_i64().unwrap() * 10),
                "list" => json!((0..8).collect::<Vec<i64>>()),
                "each" => json!(task.input.as_i64().unwrap() + 100),
                _ => json!(task.step_slug.clone()),
            };
            match next() % 10 {
                0 => {
                    sqlx::query("SELECT * FROM pgflow.fail_task($1, $2, $3, 'flaky')")
                        .bind(task.run_id)
                        .bind(&task.step_slug)
                        .bind(task.task_index)
                        .execute(&pool)
                        .await
                        .unwrap();
                }
                1..=4 => {
                    let repeats = if next() % 5 == 0 { 2 } else { 1 };
                    for _ in 0..repeats {
                        sqlx::query("SELECT * FROM pgflow.complete_task($1, $2, $3, $4)")
                            .bind(task.run_id)
                            .bind(&task.step_slug)
                            .bind(task.task_index)
                            .bind(&output)
                            .execute(&pool)
                            .await
                            .unwrap();
                    }
                }
                _ => batch.push((task.run_id, task.step_slug.clone(), task.task_index, output)),
            }
        }
        if !batch.is_empty() {
            batch.reverse();
            let run_ids: Vec<Uuid> = batch.iter().map(|b| b.0).collect();
            let steps: Vec<String> = batch.iter().map(|b| b.1.clone()).collect();
            let indexes: Vec<i32> = batch.iter().map(|b| b.2).collect();
            let outputs: Vec<Value> = batch.iter().map(|b| b.3.clone()).collect();
            sqlx::query("SELECT * FROM pgflow.complete_tasks($1, $2, $3, $4)")
                .bind(&run_ids)
                .bind(&steps)
                .bind(&indexes)
                .bind(&outputs)
                .execute(&pool)
                .await
                .unwrap();
        }
    }
}

async fn race(workers: u64, runs: usize) {
    let engine = Engine::new().await;
    engine
        .exec("SELECT pgflow.create_flow('race', max_attempts => 50, base_delay => 0)")
        .await;
    for sql in [
        "SELECT pgflow.add_step('race', 'fan', step_type => 'map')",
        "SELECT pgflow.add_step('race', 'list')",
        "SELECT pgflow.add_step('race', 'each', ARRAY['list'], step_type => 'map')",
        "SELECT pgflow.add_step('race', 'left', ARRAY['list'])",
        "SELECT pgflow.add_step('race', 'join', ARRAY['fan', 'each', 'left'])",
    ] {
        engine.exec(sql).await;
    }
    let input: Vec<i64> = (0..12).collect();
    let mut run_ids = Vec::new();
    for _ in 0..runs {
        run_ids.push(engine.start("race", json!(input)).await);
    }

    let seen: Seen = Arc::default();
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            tokio::spawn(worker(
                engine.pool().clone(),
                "race",
                0x9E37_79B9_7F4A_7C15 ^ (w + 1),
                seen.clone(),
            ))
        })
        .collect();
    let all = futures_util::future::join_all(handles);
    tokio::time::timeout(std::time::Duration::from_secs(240), all)
        .await
        .expect("workers finished")
        .into_iter()
        .for_each(|r| r.expect("no worker failed (a deadlock would be an error)"));

    // Every run completed with the right output.
    let expected_fan: Vec<i64> = input.iter().map(|i| i * 10).collect();
    let expected_each: Vec<i64> = (0..8).map(|i| i + 100).collect();
    for run in &run_ids {
        let (status, output) = engine.run(*run).await;
        assert_eq!(status, "completed", "run {run}");
        assert_eq!(output, Some(json!({"join": "join"})));
        let join_input: Value = sqlx::query_scalar(
            "SELECT jsonb_build_object('fan', pgflow._step_output($1, 'fan', 'map'), 'each', pgflow._step_output($1, 'each', 'map'))",
        )
        .bind(run)
        .fetch_one(engine.pool())
        .await
        .unwrap();
        assert_eq!(
            join_input,
            json!({"fan": expected_fan, "each": expected_each})
        );
    }

    // Each start of a task was one attempt: nothing started twice at once, nothing lost.
    let rows: Vec<(Uuid, String, i32, String, i32)> = sqlx::query_as(
        "SELECT run_id, step_slug, task_index, status, attempts_count FROM pgflow.step_tasks",
    )
    .fetch_all(engine.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), runs * (12 + 1 + 8 + 1 + 1));
    let seen = seen.lock().unwrap().clone();
    for (run, step, index, status, attempts) in rows {
        assert_eq!(status, "completed");
        assert_eq!(
            seen.get(&(run, step.clone(), index)).copied().unwrap_or(0),
            u32::try_from(attempts).unwrap(),
            "{run} {step} {index}"
        );
    }
    // Counters all came down to zero and every message was archived.
    let leftovers: (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pgflow.step_states WHERE status <> 'completed' OR remaining_tasks <> 0 OR remaining_deps <> 0), \
                (SELECT count(*) FROM pgflow.runs WHERE remaining_steps <> 0), \
                (SELECT count(*) FROM pgmq.q_race)",
    )
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!(leftovers, (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_race_on_the_same_runs_without_deadlock_or_double_completion() {
    race(2, 12).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_workers_race_on_many_runs() {
    race(4, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completions_racing_a_run_failure_never_advance_the_failed_run() {
    for _ in 0..10 {
        let engine = Engine::new().await;
        engine
            .exec("SELECT pgflow.create_flow('f', max_attempts => 1)")
            .await;
        engine
            .exec("SELECT pgflow.add_step('f', 'm', step_type => 'map')")
            .await;
        engine
            .exec("SELECT pgflow.add_step('f', 'after', ARRAY['m'])")
            .await;
        let run = engine
            .start("f", json!((0..40).collect::<Vec<i64>>()))
            .await;
        let tasks = engine.poll("f").await;
        let (fail, rest) = tasks.split_at(1);
        let pool = engine.pool().clone();
        let failing = {
            let task = fail[0].clone();
            let pool = pool.clone();
            tokio::spawn(async move {
                sqlx::query("SELECT * FROM pgflow.fail_task($1, $2, $3, 'fatal')")
                    .bind(task.run_id)
                    .bind(&task.step_slug)
                    .bind(task.task_index)
                    .execute(&pool)
                    .await
                    .unwrap();
            })
        };
        let completing: Vec<_> = rest
            .chunks(7)
            .map(|chunk| {
                let pool = pool.clone();
                let chunk = chunk.to_vec();
                tokio::spawn(async move {
                    let run_ids: Vec<Uuid> = chunk.iter().map(|t| t.run_id).collect();
                    let steps: Vec<String> = chunk.iter().map(|t| t.step_slug.clone()).collect();
                    let indexes: Vec<i32> = chunk.iter().map(|t| t.task_index).collect();
                    let outputs: Vec<Value> = chunk.iter().map(|_| json!(1)).collect();
                    sqlx::query("SELECT * FROM pgflow.complete_tasks($1, $2, $3, $4)")
                        .bind(&run_ids)
                        .bind(&steps)
                        .bind(&indexes)
                        .bind(&outputs)
                        .execute(&pool)
                        .await
                        .unwrap();
                })
            })
            .collect();
        failing.await.unwrap();
        for handle in completing {
            handle.await.unwrap();
        }
        assert_eq!(engine.run(run).await.0, "failed");
        assert_eq!(engine.step(run, "m").await.0, "failed");
        assert_eq!(engine.step(run, "after").await.0, "created");
        assert_eq!(
            engine
                .scalar::<i64>("SELECT count(*) FROM pgflow.step_tasks WHERE step_slug = 'after'")
                .await,
            0
        );
        assert_eq!(engine.queue_counts("f").await.0, 0);
    }
}

//! Subflows (issue 22): a step that runs another flow as a child run, with real workers on a
//! real PostgreSQL. What the parent step receives, failure and cancel in both directions,
//! retry, the stalled-task sweep, and the definitions the engine refuses.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use pgflow_client::Worker;
use pgflow_core::{Flow, StepContext, StepError, step_fn};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{assert_consistent, client, finished, run, start};

/// A child run of `parent` as the engine linked it: `(child run, child flow, status, step,
/// task index, attempt, depth)`.
type Child = (Uuid, String, String, String, i32, i32, i32);

async fn children(pool: &PgPool, parent: Uuid) -> Vec<Child> {
    sqlx::query_as(
        "SELECT child_run_id, child_flow_slug, status, step_slug, task_index, attempt, depth
           FROM pgflow.run_children($1)",
    )
    .bind(parent)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_subflow_step_completes_with_its_child_output_and_its_dependents_run() {
    let (db, client) = client().await;
    let pool = db.pool();
    let double = step_fn("double")
        .handler(|n: u32, _: StepContext| async move { Ok::<_, StepError>(n * 2) });
    let child: Flow<u32> = Flow::new("doubling").step(&double).build();
    let parse = step_fn("parse").handler(|text: String, _: StepContext| async move {
        Ok::<_, StepError>(text.trim().parse::<u32>()?)
    });
    let doubled = step_fn("doubled")
        .depends_on(&parse)
        .subflow(&child, double);
    let say = step_fn("say").depends_on(&doubled).handler(
        |text: String, doubled: u32, _: StepContext| async move {
            Ok::<_, StepError>(format!("{text} doubled is {doubled}"))
        },
    );
    let parent: Flow<String> = Flow::new("parent")
        .step(parse)
        .step(doubled)
        .step(say)
        .build();
    client.compile(&child).await.unwrap();
    client.compile(&parent).await.unwrap();
    // Compiling again finds the stored subflow step unchanged.
    assert_eq!(
        client.compile(&parent).await.unwrap(),
        pgflow_client::Compiled::Unchanged
    );

    let worker = Worker::builder(pool.clone())
        .flow(parent.clone())
        .flow(child.clone())
        .spawn()
        .unwrap();
    let run_id = client.start(&parent, &"21".to_owned()).await.unwrap().id();
    let (status, output) = finished(pool, run_id, Duration::from_secs(30)).await;
    assert_eq!(status, "completed");
    assert_eq!(output, Some(json!({"say": "21 doubled is 42"})));

    let kids = children(pool, run_id).await;
    assert_eq!(kids.len(), 1, "{kids:?}");
    let (child_run, flow, status, step, index, attempt, depth) = kids[0].clone();
    assert_eq!(
        (
            flow.as_str(),
            status.as_str(),
            step.as_str(),
            index,
            attempt,
            depth
        ),
        ("doubling", "completed", "doubled", 0, 1, 1)
    );
    // The child took the dependency's output as its input.
    let input: Value = sqlx::query_scalar("SELECT input FROM pgflow.runs WHERE run_id = $1")
        .bind(child_run)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(input, json!(21));
    // The subflow task never had a worker or a message.
    let (worker_id, message_id): (Option<Uuid>, Option<i64>) = sqlx::query_as(
        "SELECT last_worker_id, message_id FROM pgflow.step_tasks
          WHERE run_id = $1 AND step_slug = 'doubled'",
    )
    .bind(run_id)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((worker_id, message_id), (None, None));
    worker.shutdown().await.unwrap();
    assert_consistent(pool).await;
}

#[tokio::test]
async fn a_map_of_100_child_runs_completes_with_their_outputs_in_order() {
    let (db, client) = client().await;
    let pool = db.pool();
    let square = step_fn("square")
        .handler(|n: u64, _: StepContext| async move { Ok::<_, StepError>(n * n) });
    let squaring: Flow<u64> = Flow::new("squaring").step(&square).build();
    let numbers = step_fn("numbers").handler(|n: u64, _: StepContext| async move {
        Ok::<_, StepError>((0..n).collect::<Vec<u64>>())
    });
    let squares = step_fn("squares")
        .map_over(&numbers)
        .subflow(&squaring, &square);
    let parent: Flow<u64> = Flow::new("squares_of").step(numbers).step(squares).build();
    client.compile(&squaring).await.unwrap();
    client.compile(&parent).await.unwrap();

    let worker = Worker::builder(pool.clone())
        .flow(parent.clone())
        .flow(squaring.clone())
        .spawn()
        .unwrap();
    let run_id = client.start(&parent, &100).await.unwrap().id();
    let (status, output) = finished(pool, run_id, Duration::from_secs(60)).await;
    assert_eq!(status, "completed");
    let expected: Vec<u64> = (0..100).map(|n| n * n).collect();
    assert_eq!(output, Some(json!({ "squares": expected })));

    let kids = children(pool, run_id).await;
    assert_eq!(kids.len(), 100);
    assert!(kids.iter().all(|k| k.2 == "completed"), "{kids:?}");
    let mut indexes: Vec<i32> = kids.iter().map(|k| k.4).collect();
    indexes.sort_unstable();
    assert_eq!(indexes, (0..100).collect::<Vec<i32>>());
    // Each child took its own element.
    let inputs: Vec<(i32, Value)> = sqlx::query_as(
        "SELECT c.task_index, r.input FROM pgflow.run_children($1) c
           JOIN pgflow.runs r ON r.run_id = c.child_run_id ORDER BY c.task_index",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(inputs.iter().all(|(i, input)| *input == json!(i)));
    worker.shutdown().await.unwrap();
    assert_consistent(pool).await;
}

#[tokio::test]
async fn a_failing_child_is_retried_as_a_new_child_then_fails_the_parent_step_and_run() {
    let (db, client) = client().await;
    let pool = db.pool();
    let calls = Arc::new(AtomicUsize::new(0));
    let refuse = step_fn("refuse").max_attempts(1).handler({
        let calls = Arc::clone(&calls);
        move |n: u32, _: StepContext| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { Err::<u32, _>(StepError::new(format!("no {n}"))) }
        }
    });
    let refusing: Flow<u32> = Flow::new("refusing").step(&refuse).build();
    let ask = step_fn("ask")
        .max_attempts(2)
        .base_delay(1)
        .subflow(&refusing, &refuse);
    let parent: Flow<u32> = Flow::new("asking").step(ask).build();
    client.compile(&refusing).await.unwrap();
    client.compile(&parent).await.unwrap();
    let worker = Worker::builder(pool.clone())
        .flow(parent.clone())
        .flow(refusing.clone())
        .spawn()
        .unwrap();
    let run_id = client.start(&parent, &7).await.unwrap().id();
    let (status, _) = finished(pool, run_id, Duration::from_secs(30)).await;
    assert_eq!(status, "failed");
    let kids = children(pool, run_id).await;
    assert_eq!(kids.len(), 2, "one child per attempt: {kids:?}");
    assert!(kids.iter().all(|k| k.2 == "failed"));
    assert_eq!(kids.iter().map(|k| k.5).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let error = crate::support::step_error(pool, run_id, "ask")
        .await
        .unwrap();
    assert!(
        error.contains(&format!(
            "child run {} of flow refusing failed at step refuse: no 7",
            kids[1].0
        )),
        "{error}"
    );
    worker.shutdown().await.unwrap();
    assert_consistent(pool).await;
}

/// `holding`: a child whose one step no worker serves in these tests, so its run stays started.
async fn held_parent(pool: &PgPool, client: &pgflow_client::Client, attempts: u32) -> Flow<u32> {
    let hold =
        step_fn("hold").handler(|n: u32, _: StepContext| async move { Ok::<_, StepError>(n) });
    let holding: Flow<u32> = Flow::new("holding").step(&hold).build();
    let wait = step_fn("wait")
        .max_attempts(attempts)
        .subflow(&holding, &hold);
    let parent: Flow<u32> = Flow::new("waiting").step(wait).build();
    client.compile(&holding).await.unwrap();
    client.compile(&parent).await.unwrap();
    let _ = pool;
    parent
}

#[tokio::test]
async fn cancelling_the_parent_cancels_its_running_child() {
    let (db, client) = client().await;
    let pool = db.pool();
    held_parent(pool, &client, 3).await;
    let run_id = start(pool, "waiting", json!(5)).await;
    let kids = children(pool, run_id).await;
    assert_eq!(kids.len(), 1);
    assert_eq!(kids[0].2, "started");
    client.cancel(run_id).await.unwrap();
    assert_eq!(run(pool, run_id).await.0, "cancelled");
    assert_eq!(run(pool, kids[0].0).await.0, "cancelled");
    // The child's queued task was cancelled with it: no worker will ever run it.
    let queued: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgflow.step_tasks WHERE run_id = $1 AND status IN ('queued', 'started')",
    )
    .bind(kids[0].0)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(queued, 0);
    assert_consistent(pool).await;
}

#[tokio::test]
async fn an_operator_cancelling_a_child_fails_the_parent_step_at_once() {
    let (db, client) = client().await;
    let pool = db.pool();
    held_parent(pool, &client, 3).await;
    let run_id = start(pool, "waiting", json!(5)).await;
    let child = children(pool, run_id).await[0].0;
    client.cancel(child).await.unwrap();
    assert_eq!(run(pool, run_id).await.0, "failed");
    let error = crate::support::step_error(pool, run_id, "wait")
        .await
        .unwrap();
    assert_eq!(
        error,
        format!("child run {child} of flow holding was cancelled")
    );
    // Not retried, though the step has attempts left: the cancel was someone's decision.
    assert_eq!(children(pool, run_id).await.len(), 1);
    assert_consistent(pool).await;
}

#[tokio::test]
async fn the_stalled_task_sweep_never_touches_a_subflow_task() {
    let (db, client) = client().await;
    let pool = db.pool();
    held_parent(pool, &client, 1).await;
    let run_id = start(pool, "waiting", json!(5)).await;
    // Started an hour ago, far past its timeout: a worker's task would be requeued or failed.
    sqlx::query(
        "UPDATE pgflow.step_tasks
            SET queued_at = now() - interval '2 hours', started_at = now() - interval '1 hour'
          WHERE run_id = $1",
    )
    .bind(run_id)
    .execute(pool)
    .await
    .unwrap();
    let requeued: i32 = sqlx::query_scalar("SELECT pgflow.requeue_stalled_tasks()")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(requeued, 0);
    let status: String = sqlx::query_scalar(
        "SELECT status FROM pgflow.step_tasks WHERE run_id = $1 AND step_slug = 'wait'",
    )
    .bind(run_id)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(status, "started");
    assert_eq!(run(pool, run_id).await.0, "started");
}

#[tokio::test]
async fn retrying_a_failed_parent_starts_a_new_child_and_keeps_the_failed_one() {
    let (db, client) = client().await;
    let pool = db.pool();
    let fail = Arc::new(AtomicBool::new(true));
    let flaky = step_fn("flaky").max_attempts(1).handler({
        let fail = Arc::clone(&fail);
        move |n: u32, _: StepContext| {
            let fail = fail.load(Ordering::SeqCst);
            async move {
                if fail {
                    Err(StepError::new("down"))
                } else {
                    Ok::<_, StepError>(n + 1)
                }
            }
        }
    });
    let child: Flow<u32> = Flow::new("flaky_child").step(&flaky).build();
    let call = step_fn("call").max_attempts(1).subflow(&child, &flaky);
    let parent: Flow<u32> = Flow::new("caller").step(call).build();
    client.compile(&child).await.unwrap();
    client.compile(&parent).await.unwrap();
    let worker = Worker::builder(pool.clone())
        .flow(parent.clone())
        .flow(child.clone())
        .spawn()
        .unwrap();
    let run_id = client.start(&parent, &1).await.unwrap().id();
    assert_eq!(
        finished(pool, run_id, Duration::from_secs(30)).await.0,
        "failed"
    );
    fail.store(false, Ordering::SeqCst);
    client.retry(run_id).await.unwrap();
    let (status, output) = finished(pool, run_id, Duration::from_secs(30)).await;
    assert_eq!(status, "completed");
    assert_eq!(output, Some(json!({"call": 2})));
    let kids = children(pool, run_id).await;
    assert_eq!(
        kids.iter().map(|k| k.2.as_str()).collect::<Vec<_>>(),
        ["failed", "completed"]
    );
    worker.shutdown().await.unwrap();
    assert_consistent(pool).await;
}

/// Slugs are case-sensitive names, while pgmq folds a queue's name to lower case: a slug that
/// differs from a defined one only in case names nothing, for `set_subflow` and the limits
/// alike, and is refused with the slug as given; nothing is stored.
#[tokio::test]
async fn slugs_that_differ_only_in_case_name_nothing_for_subflows_and_limits() {
    let db = crate::support::database().await;
    let pool = db.pool();
    let exec = |sql: &'static str| async move { sqlx::raw_sql(sql).execute(pool).await };
    exec(
        "SELECT pgflow.create_flow('Child'); SELECT pgflow.add_step('Child', 'a');
         SELECT pgflow.create_flow('Par'); SELECT pgflow.add_step('Par', 's');",
    )
    .await
    .unwrap();
    // A flow whose slug folds to an existing queue's name is refused outright.
    let error = exec("SELECT pgflow.create_flow('child')")
        .await
        .unwrap_err();
    assert!(error.to_string().contains("collides"), "{error}");

    for (sql, message) in [
        (
            "SELECT pgflow.set_subflow('Par', 's', 'child')",
            "child flow child of subflow step Par.s does not exist",
        ),
        (
            "SELECT pgflow.set_subflow('par', 's', 'Child')",
            "step s of flow par not found",
        ),
        (
            "SELECT pgflow.set_subflow('Par', 'S', 'Child')",
            "step S of flow Par not found",
        ),
        (
            "SELECT pgflow.set_concurrency_limit('PAR', 's', 2)",
            "step s of flow PAR not found",
        ),
        (
            "SELECT pgflow.set_rate_limit('Par', 'S', 2, '1 second')",
            "step S of flow Par not found",
        ),
    ] {
        let error = exec(sql).await.unwrap_err();
        assert!(error.to_string().contains(message), "{sql}: {error}");
    }
    let stored: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pgflow_ext.subflow_steps)
              + (SELECT count(*) FROM pgflow_ext.step_limits)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(stored, 0);

    // The exact slugs work.
    exec("SELECT pgflow.set_subflow('Par', 's', 'Child')")
        .await
        .unwrap();
    let child: String = sqlx::query_scalar(
        "SELECT child_flow_slug FROM pgflow_ext.subflow_steps WHERE flow_slug = 'Par'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(child, "Child");
}

#[tokio::test]
async fn the_engine_refuses_cycles_deep_chains_and_missing_or_deleted_children() {
    let db = crate::support::database().await;
    let pool = db.pool();
    let exec = |sql: String| async move { sqlx::raw_sql(&sql).execute(pool).await };
    for i in 0..18 {
        exec(format!(
            "SELECT pgflow.create_flow('f{i}'); SELECT pgflow.add_step('f{i}', 's');"
        ))
        .await
        .unwrap();
    }
    let error = exec("SELECT pgflow.set_subflow('f0', 's', 'nope')".into())
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("child flow nope of subflow step f0.s does not exist: define it before the flows that run it"),
        "{error}"
    );
    let error = exec("SELECT pgflow.set_subflow('f0', 's', 'f0')".into())
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("would close a cycle of flows running each other: f0 -> f0"),
        "{error}"
    );

    // f0 -> f1 -> ... -> f16 is 16 levels of child runs: allowed; one more is refused.
    for i in 0..16 {
        exec(format!(
            "SELECT pgflow.set_subflow('f{i}', 's', 'f{}')",
            i + 1
        ))
        .await
        .unwrap();
    }
    let error = exec("SELECT pgflow.set_subflow('f16', 's', 'f17')".into())
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("would nest runs 17 deep"),
        "{error}"
    );
    let error = exec("SELECT pgflow.set_subflow('f5', 's', 'f2')".into())
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains(
            "would close a cycle of flows running each other: f5 -> f2 -> f3 -> f4 -> f5"
        ),
        "{error}"
    );

    // The child of a subflow step cannot be deleted for good.
    let error = exec("SELECT pgflow.delete_flow_and_data('f16')".into())
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("subflow_steps_child_flow_fkey"),
        "{error}"
    );
    // A flow no subflow step runs is deleted as before, and its subflow steps with it.
    exec("SELECT pgflow.delete_flow_and_data('f0')".into())
        .await
        .unwrap();
    exec("SELECT pgflow.delete_flow_and_data('f1')".into())
        .await
        .unwrap();
}

/// `pgflow run` shows the tree of child runs under a run (and a child's parent): three
/// levels, with no worker so that every run stays where the engine put it.
#[cfg(feature = "cli")]
#[tokio::test]
async fn pgflow_run_shows_the_tree_of_child_runs() {
    use crate::cli::{pgflow, stdout};

    let (db, client) = client().await;
    let pool = db.pool();
    let hold =
        step_fn("hold").handler(|n: u32, _: StepContext| async move { Ok::<_, StepError>(n) });
    let leaf: Flow<u32> = Flow::new("leaf").step(&hold).build();
    let wait = step_fn("wait").subflow(&leaf, &hold);
    let middle: Flow<u32> = Flow::new("middle").step(&wait).build();
    let each = step_fn("each").map_over_input().subflow(&middle, &wait);
    let top: Flow<Vec<u32>> = Flow::new("top").step(each).build();
    for shape in [leaf.shape(), middle.shape(), top.shape()] {
        client.compile_shape(shape, None).await.unwrap();
    }
    let run_id = client.start(&top, &(0..25).collect()).await.unwrap().id();

    let text = stdout(&pgflow(db.url(), &["run", &run_id.to_string()]));
    let tree = &text[text.find("children:\n").expect("a children section")..];
    let lines: Vec<&str> = tree.lines().collect();
    // 20 middle runs listed, each with its leaf run under it, then the 5 others summed up.
    assert_eq!(lines.len(), 1 + 20 * 2 + 1, "{tree}");
    let kids = children(pool, run_id).await;
    let first_grandchild = children(pool, kids[0].0).await[0].0;
    assert_eq!(
        lines[1],
        format!(
            "  each[{}] attempt 1 -> run {} of flow middle: started",
            kids[0].4, kids[0].0
        )
    );
    assert_eq!(
        lines[2],
        format!("    wait[0] attempt 1 -> run {first_grandchild} of flow leaf: started")
    );
    assert_eq!(lines[41], "  ... and 5 more (5 started)");

    // The grandchild names its parent; the leaf run has no children of its own.
    let text = stdout(&pgflow(db.url(), &["run", &first_grandchild.to_string()]));
    assert!(
        text.contains(&format!(
            "parent: run {} (step wait[0], attempt 1; this run is at depth 2)",
            kids[0].0
        )),
        "{text}"
    );
    assert!(!text.contains("children:"), "{text}");

    // `run --json` lists every direct child (not only the first 20) and the parent.
    let json: serde_json::Value = serde_json::from_str(&stdout(&pgflow(
        db.url(),
        &["--json", "run", &run_id.to_string()],
    )))
    .unwrap();
    assert_eq!(json["parent"], serde_json::Value::Null);
    let listed = json["children"].as_array().expect("a children array");
    assert_eq!(listed.len(), 25, "{json}");
    assert_eq!(listed[0]["run_id"], kids[0].0.to_string());
    assert_eq!(listed[0]["flow_slug"], "middle");
    assert_eq!(listed[0]["step_slug"], "each");
    assert_eq!(listed[0]["status"], "started");
    assert_eq!(listed[0]["depth"], 1);
    let json: serde_json::Value = serde_json::from_str(&stdout(&pgflow(
        db.url(),
        &["--json", "run", &first_grandchild.to_string()],
    )))
    .unwrap();
    assert_eq!(json["parent"]["run_id"], kids[0].0.to_string());
    assert_eq!(json["parent"]["step_slug"], "wait");
    assert_eq!(json["parent"]["depth"], 2);
    assert_eq!(json["children"], serde_json::json!([]));
    assert_eq!(json["run"]["flow_slug"], "leaf");

    // Cancelling the top run cancels all 50 runs under it.
    client.cancel(run_id).await.unwrap();
    let started: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pgflow.runs WHERE status = 'started'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(started, 0);
    let cancelled: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pgflow.runs WHERE status = 'cancelled'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(cancelled, 51);
}

/// Hostile timing: parents cancelled at random moments while a worker completes their
/// children. Cancel and completion lock in opposite orders (child then parent, parent then
/// child); whichever the deadlock detector aborts is retried, and in the end no child of an
/// ended parent is left running and every completed parent has all its outputs.
#[tokio::test]
async fn parents_cancelled_while_their_children_complete_leave_nothing_running() {
    let (db, client) = client().await;
    let pool = db.pool();
    let work = step_fn("work").handler(|n: u64, _: StepContext| async move {
        tokio::time::sleep(Duration::from_millis(n % 7 * 3)).await;
        Ok::<_, StepError>(n)
    });
    let working: Flow<u64> = Flow::new("working").step(&work).build();
    let each = step_fn("each").map_over_input().subflow(&working, &work);
    let fan: Flow<Vec<u64>> = Flow::new("fan").step(each).build();
    client.compile(&working).await.unwrap();
    client.compile(&fan).await.unwrap();
    let worker = Worker::builder(pool.clone())
        .flow(fan.clone())
        .flow(working.clone())
        .spawn()
        .unwrap();

    let mut parents = Vec::new();
    for i in 0..20_u64 {
        let input: Vec<u64> = (i * 10..i * 10 + 10).collect();
        parents.push(client.start(&fan, &input).await.unwrap().id());
    }
    let cancels: Vec<_> = parents
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(i, &run)| {
            let client = client.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(i as u64 * 7)).await;
                client.cancel(run).await.unwrap();
            })
        })
        .collect();
    for cancel in cancels {
        cancel.await.unwrap();
    }
    let ends = crate::support::finished_all(pool, &parents, Duration::from_secs(60)).await;
    for (i, (status, output)) in ends.iter().enumerate() {
        match status.as_str() {
            "completed" => {
                let expected: Vec<u64> = (i as u64 * 10..i as u64 * 10 + 10).collect();
                assert_eq!(output, &Some(json!({ "each": expected })));
            }
            "cancelled" => assert_eq!(i % 2, 0, "only even parents were cancelled"),
            other => panic!("parent {i} ended {other}"),
        }
    }
    // Nothing under an ended parent runs on.
    let running: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pgflow.runs WHERE status = 'started'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(running, 0);
    worker.shutdown().await.unwrap();
    assert_consistent(pool).await;
}

/// A parent run failed by another step cancels the running child of its subflow step.
#[tokio::test]
async fn a_parent_failed_by_another_step_cancels_its_running_child() {
    let (db, client) = client().await;
    let pool = db.pool();
    let hold =
        step_fn("hold").handler(|n: u32, _: StepContext| async move { Ok::<_, StepError>(n) });
    let holding: Flow<u32> = Flow::new("holding").step(&hold).build();
    let wait = step_fn("wait").subflow(&holding, &hold);
    let broken = step_fn("broken")
        .max_attempts(1)
        .handler(|_: u32, _: StepContext| async move { Err::<u32, _>(StepError::new("broken")) });
    let parent: Flow<u32> = Flow::new("half_broken").step(wait).step(broken).build();
    client.compile(&holding).await.unwrap();
    client.compile(&parent).await.unwrap();
    // Only the parent is served: the child stays started until the parent fails.
    let worker = Worker::builder(pool.clone())
        .flow(parent.clone())
        .spawn()
        .unwrap();
    let run_id = client.start(&parent, &3).await.unwrap().id();
    assert_eq!(
        finished(pool, run_id, Duration::from_secs(30)).await.0,
        "failed"
    );
    let kids = children(pool, run_id).await;
    assert_eq!(kids.len(), 1);
    assert_eq!(run(pool, kids[0].0).await.0, "cancelled");
    worker.shutdown().await.unwrap();
    assert_consistent(pool).await;
}

/// Two definitions made at once, `fa -> fb` and `fb -> fa`: the second waits for the first
/// to commit, then sees it and is refused as a cycle (each alone passes the check).
#[tokio::test]
async fn concurrent_definitions_cannot_close_a_cycle_together() {
    let db = crate::support::database().await;
    let pool = db.pool().clone();
    sqlx::raw_sql(
        "SELECT pgflow.create_flow('fa'); SELECT pgflow.add_step('fa', 's');
         SELECT pgflow.create_flow('fb'); SELECT pgflow.add_step('fb', 's');",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut first = pool.begin().await.unwrap();
    sqlx::query("SELECT pgflow.set_subflow('fa', 's', 'fb')")
        .execute(&mut *first)
        .await
        .unwrap();
    let second = tokio::spawn({
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            sqlx::query("SELECT pgflow.set_subflow('fb', 's', 'fa')")
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !second.is_finished(),
        "the second definition did not wait for the first: {:?}",
        second.await
    );
    first.commit().await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(20), second)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("would close a cycle of flows running each other: fb -> fa -> fb"),
        "{error}"
    );
    let links: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow_ext.subflow_steps")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(links, 1);
}

/// A cycle written around set_subflow (by the owner, straight into the table) stops at the
/// depth limit at run time: 16 child runs, each level failed for good, not retried at every
/// level (3 attempts a level would start 3^16 children).
#[tokio::test]
async fn the_run_time_depth_limit_fails_every_level_for_good() {
    let db = crate::support::database().await;
    let pool = db.pool();
    sqlx::raw_sql(
        "SELECT pgflow.create_flow('loop', 3); SELECT pgflow.add_step('loop', 's');
         INSERT INTO pgflow_ext.subflow_steps (flow_slug, step_slug, child_flow_slug)
         VALUES ('loop', 's', 'loop');",
    )
    .execute(pool)
    .await
    .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET statement_timeout = '30s'")
        .execute(&mut *conn)
        .await
        .unwrap();
    let root: Uuid = sqlx::query_scalar("SELECT run_id FROM pgflow.start_flow('loop', '1'::jsonb)")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    assert_eq!(run(pool, root).await.0, "failed");
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.runs")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(runs, 17, "the root and 16 levels of children, one each");
    let error = crate::support::step_error(pool, root, "s").await.unwrap();
    assert!(error.contains("subflow depth limit: "), "{error}");
}

/// Replacing the child flow (deleted and created again in one transaction) while a parent
/// waits for its running child: the parent task fails for good, naming the deleted child,
/// rather than waiting forever for a child that is gone.
#[tokio::test]
async fn replacing_the_child_flow_fails_the_parent_task_waiting_for_it() {
    let (db, client) = client().await;
    let pool = db.pool();
    held_parent(pool, &client, 3).await;
    let run_id = start(pool, "waiting", json!(5)).await;
    assert_eq!(children(pool, run_id).await.len(), 1);
    sqlx::raw_sql(
        "BEGIN;
         SELECT pgflow.delete_flow_and_data('holding');
         SELECT pgflow.create_flow('holding');
         SELECT pgflow.add_step('holding', 'hold');
         COMMIT;",
    )
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(run(pool, run_id).await.0, "failed");
    let error = crate::support::step_error(pool, run_id, "wait")
        .await
        .unwrap();
    assert_eq!(error, "its child run of flow holding was deleted");
    // Not retried: no new child of the replaced flow.
    assert!(children(pool, run_id).await.is_empty());
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.runs")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(runs, 1);
    assert_consistent(pool).await;
}

/// Limits on a subflow step would be ignored (its children start from a trigger): the
/// engine refuses them, whichever comes first.
#[tokio::test]
async fn a_subflow_step_cannot_have_concurrency_or_rate_limits() {
    let (db, client) = client().await;
    let pool = db.pool();
    held_parent(pool, &client, 3).await;
    for sql in [
        "SELECT pgflow.set_concurrency_limit('waiting', 'wait', 2)",
        "SELECT pgflow.set_rate_limit('waiting', 'wait', 2, interval '1 second')",
    ] {
        let error = sqlx::query(sql).execute(pool).await.unwrap_err();
        let db_error = error.as_database_error().unwrap();
        assert_eq!(db_error.code().as_deref(), Some("22023"), "{error}");
        assert!(
            db_error.message().contains(
                "step waiting.wait is a subflow step: it cannot have concurrency or rate limits (limit the child flow's steps instead)"
            ),
            "{error}"
        );
    }
    sqlx::raw_sql(
        "SELECT pgflow.create_flow('limited'); SELECT pgflow.add_step('limited', 's');
         SELECT pgflow.set_concurrency_limit('limited', 's', 1);",
    )
    .execute(pool)
    .await
    .unwrap();
    // The Rust builder refuses it before any SQL.
    let hold =
        step_fn("hold").handler(|n: u32, _: StepContext| async move { Ok::<_, StepError>(n) });
    let holding: Flow<u32> = Flow::new("holding").step(&hold).build();
    let Err(error) = Flow::<u32>::new("limited_rust")
        .step(step_fn("wait").concurrency(2).subflow(&holding, &hold))
        .try_build()
    else {
        panic!("a limited subflow step is refused");
    };
    assert!(
        error
            .to_string()
            .contains("a subflow step cannot be limited"),
        "{error}"
    );
    let error = sqlx::query("SELECT pgflow.set_subflow('limited', 's', 'holding')")
        .execute(pool)
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("step limited.s has concurrency or rate limits"),
        "{error}"
    );
}

/// A stale or hostile report of a subflow task (no worker ever has one): a forged
/// completion cancels the running child; a forged failure with attempts left cancels the
/// running child before the retry starts the next, so never two children at once.
#[tokio::test]
async fn a_forged_report_of_a_subflow_task_cancels_its_running_child() {
    let (db, client) = client().await;
    let pool = db.pool();
    held_parent(pool, &client, 3).await;

    let completed = start(pool, "waiting", json!(5)).await;
    let child = children(pool, completed).await[0].0;
    sqlx::query("SELECT pgflow.complete_task($1, 'wait', 0, '\"forged\"'::jsonb)")
        .bind(completed)
        .execute(pool)
        .await
        .unwrap();
    assert_eq!(run(pool, completed).await.0, "completed");
    assert_eq!(run(pool, child).await.0, "cancelled");

    let failed = start(pool, "waiting", json!(6)).await;
    let first = children(pool, failed).await[0].0;
    sqlx::query("SELECT pgflow.fail_task($1, 'wait', 0, 'forged')")
        .bind(failed)
        .execute(pool)
        .await
        .unwrap();
    let kids = children(pool, failed).await;
    assert_eq!(kids.len(), 2, "{kids:?}");
    assert_eq!((kids[0].0, kids[0].2.as_str()), (first, "cancelled"));
    assert_eq!(kids[1].2, "started");
    assert_eq!(run(pool, failed).await.0, "started");
    let running: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgflow.runs WHERE flow_slug = 'holding' AND status = 'started'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(running, 1);
    client.cancel(failed).await.unwrap();
    assert_eq!(run(pool, kids[1].0).await.0, "cancelled");
    assert_consistent(pool).await;
}

/// The child flow replaced under a map step waiting for three children: the first deleted
/// child fails the parent, whose cancel reaches the other two children, deleted by the same
/// statement; the replacement still commits, and the parent failed once.
#[tokio::test]
async fn replacing_the_child_flow_under_a_map_of_children_fails_the_parent_once() {
    let (db, client) = client().await;
    let pool = db.pool();
    let hold =
        step_fn("hold").handler(|n: u32, _: StepContext| async move { Ok::<_, StepError>(n) });
    let holding: Flow<u32> = Flow::new("holding").step(&hold).build();
    let each = step_fn("each").map_over_input().subflow(&holding, &hold);
    let parent: Flow<Vec<u32>> = Flow::new("waiting_map").step(each).build();
    client.compile(&holding).await.unwrap();
    client.compile(&parent).await.unwrap();
    let run_id = start(pool, "waiting_map", json!([1, 2, 3])).await;
    assert_eq!(children(pool, run_id).await.len(), 3);
    sqlx::raw_sql(
        "BEGIN;
         SELECT pgflow.delete_flow_and_data('holding');
         SELECT pgflow.create_flow('holding');
         SELECT pgflow.add_step('holding', 'hold');
         COMMIT;",
    )
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(run(pool, run_id).await.0, "failed");
    let error = crate::support::step_error(pool, run_id, "each")
        .await
        .unwrap();
    assert_eq!(error, "its child run of flow holding was deleted");
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.runs")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(runs, 1);
    assert_consistent(pool).await;
}

//! Map steps: fan-out over arrays, map over map, empty arrays, the type violation, and the
//! batched completion extension.

use serde_json::{Value, json};
use uuid::Uuid;

use super::{Engine, Task};

#[tokio::test]
async fn a_root_map_fans_out_over_the_input_array() {
    let engine = Engine::new().await;
    engine
        .flow(
            "f",
            &[("double", &[], "map"), ("sum", &["double"], "single")],
        )
        .await;
    let run = engine.start("f", json!([1, 2, 3])).await;
    assert_eq!(
        engine.step(run, "double").await,
        ("started".into(), Some(3), Some(3), 0)
    );

    let tasks = engine.poll("f").await;
    assert_eq!(
        tasks
            .iter()
            .map(|t| (t.task_index, t.input.clone()))
            .collect::<Vec<_>>(),
        vec![(0, json!(1)), (1, json!(2)), (2, json!(3))]
    );
    // Completed out of order: the map's output still follows task_index.
    for task in tasks.iter().rev() {
        engine
            .complete(task, json!(task.input.as_i64().unwrap() * 2))
            .await;
        let remaining = engine.step(run, "double").await.1;
        assert!(remaining.unwrap() < 3);
    }
    assert_eq!(
        engine.step(run, "double").await,
        ("completed".into(), Some(0), Some(3), 0)
    );
    let sum = engine.poll("f").await;
    assert_eq!(sum[0].input, json!({"run": [1, 2, 3], "double": [2, 4, 6]}));
    engine.complete(&sum[0], json!(12)).await;
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"sum": 12})))
    );
}

#[tokio::test]
async fn a_dependent_map_takes_the_elements_of_a_single_steps_array() {
    let engine = Engine::new().await;
    engine
        .flow("f", &[("list", &[], "single"), ("each", &["list"], "map")])
        .await;
    let run = engine.start("f", json!({})).await;
    let list = engine.poll("f").await;
    assert_eq!(
        engine.step(run, "each").await.2,
        None,
        "unknown until the parent completes"
    );
    engine.complete(&list[0], json!(["a", "b", {"c": 1}])).await;
    assert_eq!(
        engine.step(run, "each").await,
        ("started".into(), Some(3), Some(3), 0)
    );
    let each = engine.poll("f").await;
    assert_eq!(
        each.iter().map(|t| t.input.clone()).collect::<Vec<_>>(),
        vec![json!("a"), json!("b"), json!({"c": 1})]
    );
    for task in &each {
        engine.complete(task, json!([task.task_index])).await;
    }
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"each": [[0], [1], [2]]})))
    );
}

#[tokio::test]
async fn a_map_over_a_map_takes_the_parent_tasks_outputs_one_by_one() {
    let engine = Engine::new().await;
    engine
        .flow(
            "f",
            &[
                ("m1", &[], "map"),
                ("m2", &["m1"], "map"),
                ("total", &["m2"], "single"),
            ],
        )
        .await;
    let run = engine.start("f", json!([10, 20])).await;
    let m1 = engine.poll("f").await;
    engine.complete(&m1[1], json!({"v": 21})).await;
    assert_eq!(engine.step(run, "m2").await.0, "created");
    engine.complete(&m1[0], json!({"v": 11})).await;
    assert_eq!(
        engine.step(run, "m2").await,
        ("started".into(), Some(2), Some(2), 0)
    );
    let m2 = engine.poll("f").await;
    assert_eq!(
        m2.iter()
            .map(|t| (t.task_index, t.input.clone()))
            .collect::<Vec<_>>(),
        vec![(0, json!({"v": 11})), (1, json!({"v": 21}))]
    );
    for task in &m2 {
        engine
            .complete(task, json!(task.input["v"].as_i64().unwrap() + 1))
            .await;
    }
    let total = engine.poll("f").await;
    assert_eq!(total[0].input, json!({"run": [10, 20], "m2": [12, 22]}));
    engine.complete(&total[0], json!(34)).await;
    assert_eq!(engine.run(run).await.0, "completed");
}

#[tokio::test]
async fn empty_arrays_complete_at_once_and_cascade() {
    let engine = Engine::new().await;
    engine
        .flow(
            "f",
            &[
                ("m1", &[], "map"),
                ("m2", &["m1"], "map"),
                ("after", &["m2"], "single"),
            ],
        )
        .await;
    let run = engine.start("f", json!([])).await;
    assert_eq!(
        engine.step(run, "m1").await,
        ("completed".into(), Some(0), Some(0), 0)
    );
    assert_eq!(
        engine.step(run, "m2").await,
        ("completed".into(), Some(0), Some(0), 0)
    );
    assert_eq!(
        engine.step(run, "after").await,
        ("started".into(), Some(1), Some(1), 0)
    );
    assert_eq!(
        engine
            .scalar::<i32>(&format!(
                "SELECT remaining_steps FROM pgflow.runs WHERE run_id = '{run}'"
            ))
            .await,
        1
    );
    let after = engine.poll("f").await;
    assert_eq!(after[0].input, json!({"run": [], "m2": []}));
    engine.complete(&after[0], json!("done")).await;
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"after": "done"})))
    );
}

#[tokio::test]
async fn a_flow_of_only_empty_maps_completes_inside_start_flow() {
    let engine = Engine::new().await;
    engine
        .flow("f", &[("m1", &[], "map"), ("m2", &["m1"], "map")])
        .await;
    let (status, output, remaining): (String, Option<Value>, i32) =
        sqlx::query_as("SELECT status, output, remaining_steps FROM pgflow.start_flow('f', '[]')")
            .fetch_one(engine.pool())
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), output, remaining),
        ("completed", Some(json!({"m2": []})), 0)
    );
    assert_eq!(engine.queue_counts("f").await, (0, 0));
}

#[tokio::test]
async fn a_single_step_returning_an_empty_array_completes_its_map_child_at_once() {
    let engine = Engine::new().await;
    engine
        .flow(
            "f",
            &[
                ("list", &[], "single"),
                ("each", &["list"], "map"),
                ("fin", &["each"], "single"),
            ],
        )
        .await;
    let run = engine.start("f", json!({})).await;
    let list = engine.poll("f").await;
    engine.complete(&list[0], json!([])).await;
    assert_eq!(
        engine.step(run, "each").await,
        ("completed".into(), Some(0), Some(0), 0)
    );
    let fin = engine.poll("f").await;
    assert_eq!(fin[0].input, json!({"run": {}, "each": []}));
}

/// One finished step releases an empty map and a step with a task at once: the run goes
/// through the cascade, and every step with tasks starts exactly once, with one message.
#[tokio::test]
async fn an_empty_map_released_beside_a_step_with_tasks_starts_each_step_once() {
    let engine = Engine::new().await;
    engine
        .flow(
            "f",
            &[
                ("list", &[], "single"),
                ("each", &["list"], "map"),
                ("other", &["list"], "single"),
                ("fin", &["each"], "single"),
            ],
        )
        .await;
    let run = engine.start("f", json!({})).await;
    let list = engine.poll("f").await;
    engine.complete(&list[0], json!([])).await;

    assert_eq!(
        engine.step(run, "each").await,
        ("completed".into(), Some(0), Some(0), 0)
    );
    assert_eq!(
        engine.step(run, "other").await,
        ("started".into(), Some(1), Some(1), 0)
    );
    assert_eq!(
        engine.step(run, "fin").await,
        ("started".into(), Some(1), Some(1), 0)
    );
    let mut next: Vec<(String, Value)> = engine
        .poll("f")
        .await
        .into_iter()
        .map(|t| (t.step_slug, t.input))
        .collect();
    next.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        next,
        vec![
            ("fin".to_string(), json!({"run": {}, "each": []})),
            ("other".to_string(), json!({"run": {}, "list": []})),
        ]
    );
    // The finished list's message is archived; one message each for other and fin.
    assert_eq!(engine.queue_counts("f").await, (2, 1));
}

#[tokio::test]
async fn cascade_complete_taskless_steps_counts_what_it_completes() {
    let engine = Engine::new().await;
    engine
        .flow(
            "f",
            &[
                ("a", &[], "single"),
                ("m", &["a"], "map"),
                ("n", &["m"], "map"),
            ],
        )
        .await;
    let run = engine.start("f", json!({})).await;
    // An operator's repair: the dependent map learns it has nothing to do.
    engine
        .exec(&format!(
            "UPDATE pgflow.step_states SET initial_tasks = 0, remaining_deps = 0 WHERE run_id = '{run}' AND step_slug = 'm'"
        ))
        .await;
    let completed: i32 = sqlx::query_scalar("SELECT pgflow.cascade_complete_taskless_steps($1)")
        .bind(run)
        .fetch_one(engine.pool())
        .await
        .unwrap();
    assert_eq!(completed, 2);
    assert_eq!(
        engine.step(run, "n").await,
        ("completed".into(), Some(0), Some(0), 0)
    );
    let again: i32 = sqlx::query_scalar("SELECT pgflow.cascade_complete_taskless_steps($1)")
        .bind(run)
        .fetch_one(engine.pool())
        .await
        .unwrap();
    assert_eq!(again, 0);
}

#[tokio::test]
async fn the_cascade_stops_past_its_safety_limit_and_rolls_back() {
    let engine = Engine::new().await;
    let mut steps: Vec<(String, Vec<String>)> = vec![("m0".into(), vec![])];
    for i in 1..=55 {
        steps.push((format!("m{i}"), vec![format!("m{}", i - 1)]));
    }
    let step_refs: Vec<(&str, Vec<&str>)> = steps
        .iter()
        .map(|(s, d)| (s.as_str(), d.iter().map(String::as_str).collect()))
        .collect();
    let defs: Vec<(&str, &[&str], &str)> = step_refs
        .iter()
        .map(|(s, d)| (*s, d.as_slice(), "map"))
        .collect();
    engine.flow("deep", &defs).await;
    assert_eq!(
        engine.error("SELECT pgflow.start_flow('deep', '[]')").await,
        "Cascade loop exceeded safety limit of 50 iterations"
    );
    assert_eq!(
        engine
            .scalar::<i64>("SELECT count(*) FROM pgflow.runs")
            .await,
        0
    );
    assert_eq!(
        engine
            .scalar::<i64>("SELECT count(*) FROM pgflow.step_states")
            .await,
        0
    );
}

#[tokio::test]
async fn a_non_array_for_a_waiting_map_is_a_type_violation_that_fails_the_run() {
    let engine = Engine::new().await;
    engine
        .flow(
            "f",
            &[
                ("a", &[], "single"),
                ("side", &[], "single"),
                ("m", &["a"], "map"),
            ],
        )
        .await;
    let run = engine.start("f", json!({})).await;
    let tasks = engine.poll("f").await;
    let a = tasks.iter().find(|t| t.step_slug == "a").unwrap();
    let returned = engine.complete(a, json!({"not": "an array"})).await;
    assert!(returned.is_empty(), "the violating task is not returned");

    let (status, failed): (String, bool) =
        sqlx::query_as("SELECT status, failed_at IS NOT NULL FROM pgflow.runs WHERE run_id = $1")
            .bind(run)
            .fetch_one(engine.pool())
            .await
            .unwrap();
    assert_eq!((status.as_str(), failed), ("failed", true));
    let task = &engine.tasks(run).await[0];
    assert_eq!(task.step_slug, "a");
    assert_eq!(task.status, "failed");
    assert_eq!(task.output, Some(json!({"not": "an array"})));
    assert_eq!(
        task.error_message.as_deref(),
        Some("[TYPE_VIOLATION] Produced object instead of array")
    );
    let state_error: Option<String> = sqlx::query_scalar(
        "SELECT error_message FROM pgflow.step_states WHERE run_id = $1 AND step_slug = 'a' AND status = 'failed'",
    )
    .bind(run)
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!(
        state_error.as_deref(),
        Some("[TYPE_VIOLATION] Map step m expects array input but dependency a produced object")
    );
    // Every message of the run is archived, the still-running side task's included.
    assert_eq!(engine.queue_counts("f").await, (0, 2));
    // The other worker's late result changes nothing but its task, cancelled.
    let side = tasks.iter().find(|t| t.step_slug == "side").unwrap();
    let rows = engine.complete(side, json!(1)).await;
    assert_eq!(rows[0].status, "cancelled");
    assert_eq!(engine.step(run, "side").await.0, "started");
}

#[tokio::test]
async fn a_null_output_for_a_waiting_map_is_reported_as_null() {
    let engine = Engine::new().await;
    engine
        .flow("f", &[("a", &[], "single"), ("m", &["a"], "map")])
        .await;
    let run = engine.start("f", json!({})).await;
    let a = engine.poll("f").await.remove(0);
    engine.complete(&a, Value::Null).await;
    assert_eq!(
        engine.tasks(run).await[0].error_message.as_deref(),
        Some("[TYPE_VIOLATION] Produced null instead of array")
    );
    assert_eq!(engine.run(run).await.0, "failed");
}

#[tokio::test]
async fn a_non_array_without_a_waiting_map_is_fine() {
    let engine = Engine::new().await;
    engine
        .flow("f", &[("a", &[], "single"), ("b", &["a"], "single")])
        .await;
    let run = engine.start("f", json!({})).await;
    engine.drain("f", |_| json!("scalar")).await;
    assert_eq!(engine.run(run).await.0, "completed");
}

#[tokio::test]
async fn complete_tasks_completes_a_batch_across_runs_and_steps_like_complete_task() {
    let engine = Engine::new().await;
    engine
        .flow(
            "f",
            &[
                ("m", &[], "map"),
                ("s", &[], "single"),
                ("after", &["m", "s"], "single"),
            ],
        )
        .await;
    let run1 = engine.start("f", json!([1, 2, 3])).await;
    let run2 = engine.start("f", json!([4])).await;
    let tasks = engine.poll("f").await;
    assert_eq!(tasks.len(), 6);

    // The whole batch, in an arbitrary order, one task listed twice.
    let mut batch: Vec<(Uuid, String, i32, Value)> = tasks
        .iter()
        .rev()
        .map(|t| {
            (
                t.run_id,
                t.step_slug.clone(),
                t.task_index,
                json!({"from": t.input.clone()}),
            )
        })
        .collect();
    batch.push((
        tasks[0].run_id,
        tasks[0].step_slug.clone(),
        tasks[0].task_index,
        json!("ignored"),
    ));
    let run_ids: Vec<Uuid> = batch.iter().map(|b| b.0).collect();
    let steps: Vec<String> = batch.iter().map(|b| b.1.clone()).collect();
    let indexes: Vec<i32> = batch.iter().map(|b| b.2).collect();
    let outputs: Vec<Value> = batch.iter().map(|b| b.3.clone()).collect();
    let rows: Vec<(Uuid, String, i32, String)> = sqlx::query_as(
        "SELECT run_id, step_slug, task_index, status FROM pgflow.complete_tasks($1, $2, $3, $4)",
    )
    .bind(&run_ids)
    .bind(&steps)
    .bind(&indexes)
    .bind(&outputs)
    .fetch_all(engine.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), 6);
    assert!(rows.iter().all(|r| r.3 == "completed"));
    let mut sorted = rows.clone();
    sorted.sort();
    assert_eq!(rows, sorted, "rows come back in key order");

    // Both runs moved on exactly as with one call per task.
    let after = engine.poll("f").await;
    assert_eq!(after.len(), 2);
    let of_run1 = after.iter().find(|t| t.run_id == run1).unwrap();
    assert_eq!(
        of_run1.input,
        json!({"run": [1, 2, 3], "m": [{"from": 1}, {"from": 2}, {"from": 3}], "s": {"from": {"run": [1, 2, 3]}}})
    );
    assert!(after.iter().any(|t| t.run_id == run2));
    assert_eq!(engine.queue_counts("f").await.1, 6);

    // Mismatched arrays are refused; empty ones do nothing.
    assert!(
        engine
            .error("SELECT pgflow.complete_tasks(ARRAY[gen_random_uuid()], ARRAY['a', 'b'], ARRAY[0], ARRAY['1'::jsonb])")
            .await
            .contains("must have the same length")
    );
    assert_eq!(
        engine
            .scalar::<i64>("SELECT count(*) FROM pgflow.complete_tasks('{}', '{}', '{}', '{}')")
            .await,
        0
    );
}

#[tokio::test]
async fn one_complete_tasks_batch_advances_runs_of_two_flows_and_a_cascade() {
    let engine = Engine::new().await;
    // Flow "one": a list feeding a map, then a reducer. Flow "two": a single-step flow.
    engine
        .flow(
            "one",
            &[
                ("list", &[], "single"),
                ("each", &["list"], "map"),
                ("sum", &["each"], "single"),
            ],
        )
        .await;
    engine.flow("two", &[("only", &[], "single")]).await;
    let fills = engine.start("one", json!("fills")).await;
    let empties = engine.start("one", json!("empties")).await;
    let finishes = engine.start("two", json!({})).await;
    let mut tasks = engine.poll("one").await;
    tasks.extend(engine.poll("two").await);
    assert_eq!(tasks.len(), 3);

    // One batch: `list` of the first run releases a map over two elements, `list` of the
    // second releases an empty map (completed by the cascade, which starts `sum`), and the
    // only step of the run of "two" finishes its run.
    let output = |t: &Task| {
        if t.run_id == fills {
            json!([10, 20])
        } else if t.run_id == empties {
            json!([])
        } else {
            json!("done")
        }
    };
    let run_ids: Vec<Uuid> = tasks.iter().map(|t| t.run_id).collect();
    let steps: Vec<String> = tasks.iter().map(|t| t.step_slug.clone()).collect();
    let indexes: Vec<i32> = tasks.iter().map(|t| t.task_index).collect();
    let outputs: Vec<Value> = tasks.iter().map(output).collect();
    let completed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pgflow.complete_tasks($1, $2, $3, $4)")
            .bind(&run_ids)
            .bind(&steps)
            .bind(&indexes)
            .bind(&outputs)
            .fetch_one(engine.pool())
            .await
            .unwrap();
    assert_eq!(completed, 3);

    // Every message of the batch is archived, in its own flow's queue.
    assert_eq!(engine.queue_counts("two").await, (0, 1));
    assert_eq!(
        engine.run(finishes).await,
        ("completed".into(), Some(json!({"only": "done"})))
    );

    assert_eq!(
        engine.step(fills, "each").await,
        ("started".into(), Some(2), Some(2), 0)
    );
    assert_eq!(
        engine.step(empties, "each").await,
        ("completed".into(), Some(0), Some(0), 0)
    );
    assert_eq!(engine.step(empties, "sum").await.0, "started");
    let next = engine.poll("one").await;
    let mut got: Vec<(bool, String, Value)> = next
        .iter()
        .map(|t| (t.run_id == fills, t.step_slug.clone(), t.input.clone()))
        .collect();
    got.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    assert_eq!(
        got,
        vec![
            (
                false,
                "sum".to_string(),
                json!({"run": "empties", "each": []})
            ),
            (true, "each".to_string(), json!(10)),
            (true, "each".to_string(), json!(20)),
        ]
    );
}

/// How fast it starts is the benchmark's to measure (the spec's floor, `examples/bench`);
/// this checks what it builds.
#[tokio::test]
async fn a_big_root_map_starts_in_one_call_and_its_tasks_read_single_elements() {
    let engine = Engine::new().await;
    engine.flow("big", &[("m", &[], "map")]).await;
    let input: Vec<i64> = (0..10_000).collect();
    let run = engine.start("big", json!(input)).await;
    assert_eq!(engine.step(run, "m").await.2, Some(10_000));
    assert_eq!(engine.queue_counts("big").await.0, 10_000);

    let msg_ids: Vec<i64> = sqlx::query_scalar(
        "SELECT message_id FROM pgflow.step_tasks WHERE run_id = $1 AND task_index IN (0, 4242, 9999) ORDER BY task_index",
    )
    .bind(run)
    .fetch_all(engine.pool())
    .await
    .unwrap();
    let tasks = engine.start_tasks("big", &msg_ids).await;
    let mut got: Vec<(i32, Value)> = tasks
        .iter()
        .map(|t| (t.task_index, t.input.clone()))
        .collect();
    got.sort_by_key(|g| g.0);
    assert_eq!(
        got,
        vec![(0, json!(0)), (4242, json!(4242)), (9999, json!(9999))]
    );
}

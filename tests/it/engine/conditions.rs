//! Conditions and skip modes, stored step outputs, cancelled tasks of failed runs and
//! stalled tasks (migration 0010; upstream pgflow 0.13-0.15), driven through SQL alone.

use serde_json::{Value, json};
use uuid::Uuid;

use super::Engine;

/// `(status, skip_reason, error_message, output)` of a step state, and whether its
/// skipped_at is set.
#[derive(Debug, PartialEq, sqlx::FromRow)]
struct StepRow {
    status: String,
    skip_reason: Option<String>,
    error_message: Option<String>,
    output: Option<Value>,
    skipped: bool,
}

async fn step_row(engine: &Engine, run: Uuid, step: &str) -> StepRow {
    sqlx::query_as(
        "SELECT status, skip_reason, error_message, output, skipped_at IS NOT NULL AS skipped \
           FROM pgflow.step_states WHERE run_id = $1 AND step_slug = $2",
    )
    .bind(run)
    .bind(step)
    .fetch_one(engine.pool())
    .await
    .unwrap()
}

/// `(step, status, skip_reason)` of every step of a run, by step_index.
async fn steps(engine: &Engine, run: Uuid) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as(
        "SELECT ss.step_slug, ss.status, ss.skip_reason \
           FROM pgflow.step_states ss \
           JOIN pgflow.steps s ON s.flow_slug = ss.flow_slug AND s.step_slug = ss.step_slug \
          WHERE ss.run_id = $1 ORDER BY s.step_index",
    )
    .bind(run)
    .fetch_all(engine.pool())
    .await
    .unwrap()
}

fn row(step: &str, status: &str, reason: Option<&str>) -> (String, String, Option<String>) {
    (step.into(), status.into(), reason.map(str::to_string))
}

fn skipped(step: &str, reason: &str) -> (String, String, Option<String>) {
    row(step, "skipped", Some(reason))
}

async fn remaining_steps(engine: &Engine, run: Uuid) -> i32 {
    sqlx::query_scalar("SELECT remaining_steps FROM pgflow.runs WHERE run_id = $1")
        .bind(run)
        .fetch_one(engine.pool())
        .await
        .unwrap()
}

/// Steps whose tasks were handed to a worker, in order.
fn slugs(tasks: &[super::Task]) -> Vec<&str> {
    tasks.iter().map(|t| t.step_slug.as_str()).collect()
}

// ---------------------------------------------------------------------------------------
// when_unmet
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_root_with_an_unmet_condition_and_when_unmet_fail_fails_the_run_at_start() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f'); \
             SELECT pgflow.add_step('f', 'gate', required_input_pattern => '{\"go\": true}', \
                                    when_unmet => 'fail'); \
             SELECT pgflow.add_step('f', 'other'); \
             SELECT pgflow.add_step('f', 'after', ARRAY['gate']);",
        )
        .await;
    let run = engine.start("f", json!({"go": false})).await;
    assert_eq!(engine.run(run).await.0, "failed");
    let gate = step_row(&engine, run, "gate").await;
    assert_eq!(
        (gate.status.as_str(), gate.error_message.as_deref()),
        ("failed", Some("Condition not met"))
    );
    // Nothing was queued: the condition is decided before any root starts.
    assert!(engine.tasks(run).await.is_empty());
    assert_eq!(engine.queue_counts("f").await, (0, 0));

    // Met, the same flow runs as any other.
    let run = engine.start("f", json!({"go": true})).await;
    let roots = engine.poll("f").await;
    assert_eq!(slugs(&roots), vec!["gate", "other"]);
    for t in &roots {
        engine.complete(t, json!(t.step_slug)).await;
    }
    engine.drain("f", |t| json!(t.step_slug)).await;
    assert_eq!(engine.run(run).await.0, "completed");
}

#[tokio::test]
async fn a_root_skipped_by_its_condition_releases_its_dependents_without_its_key() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f'); \
             SELECT pgflow.add_step('f', 'gate', forbidden_input_pattern => '{\"dry\": true}'); \
             SELECT pgflow.add_step('f', 'other'); \
             SELECT pgflow.add_step('f', 'after', ARRAY['gate', 'other']);",
        )
        .await;
    // when_unmet defaults to 'skip' (upstream's default).
    let run = engine.start("f", json!({"dry": true, "n": 1})).await;
    let gate = step_row(&engine, run, "gate").await;
    assert_eq!(
        gate,
        StepRow {
            status: "skipped".into(),
            skip_reason: Some("condition_unmet".into()),
            error_message: None,
            output: None,
            skipped: true,
        }
    );
    let tasks = engine.poll("f").await;
    assert_eq!(slugs(&tasks), vec!["other"]);
    engine.complete(&tasks[0], json!("o")).await;
    let after = engine.poll("f").await;
    assert_eq!(slugs(&after), vec!["after"]);
    assert_eq!(
        after[0].input,
        json!({"run": {"dry": true, "n": 1}, "other": "o"})
    );
    engine.complete(&after[0], json!("done")).await;
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"after": "done"})))
    );
}

#[tokio::test]
async fn skip_cascade_skips_every_level_below_and_the_run_completes_with_the_other_leaves() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f'); \
             SELECT pgflow.add_step('f', 'a'); \
             SELECT pgflow.add_step('f', 'b', ARRAY['a'], \
                                    required_input_pattern => '{\"a\": {\"ok\": true}}', \
                                    when_unmet => 'skip-cascade'); \
             SELECT pgflow.add_step('f', 'c', ARRAY['b']); \
             SELECT pgflow.add_step('f', 'm', ARRAY['c'], step_type => 'map'); \
             SELECT pgflow.add_step('f', 'd', ARRAY['m', 'a']); \
             SELECT pgflow.add_step('f', 'side', ARRAY['a']);",
        )
        .await;
    let run = engine.start("f", json!({})).await;
    let a = engine.poll("f").await.remove(0);
    engine.complete(&a, json!({"ok": false})).await;
    assert_eq!(
        steps(&engine, run).await,
        vec![
            row("a", "completed", None),
            skipped("b", "condition_unmet"),
            skipped("c", "dependency_skipped"),
            skipped("m", "dependency_skipped"),
            skipped("d", "dependency_skipped"),
            row("side", "started", None),
        ]
    );
    assert_eq!(remaining_steps(&engine, run).await, 1);
    // No task was ever made for a skipped step.
    let side = engine.poll("f").await;
    assert_eq!(slugs(&side), vec!["side"]);
    assert_eq!(side[0].input, json!({"run": {}, "a": {"ok": false}}));
    engine.complete(&side[0], json!(7)).await;
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"side": 7})))
    );
    assert_eq!(engine.tasks(run).await.len(), 2);

    // The same flow with the condition met runs every step.
    let run = engine.start("f", json!({})).await;
    engine
        .drain("f", |t| match t.step_slug.as_str() {
            "a" => json!({"ok": true}),
            "c" => json!([1, 2]),
            _ => json!(t.step_slug),
        })
        .await;
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"d": "d", "side": "side"})))
    );
}

#[tokio::test]
async fn a_dependent_with_an_unmet_condition_and_when_unmet_fail_fails_the_run_and_cancels_its_tasks()
 {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f'); \
             SELECT pgflow.add_step('f', 'a'); \
             SELECT pgflow.add_step('f', 'slow'); \
             SELECT pgflow.add_step('f', 'b', ARRAY['a'], \
                                    required_input_pattern => '{\"a\": \"yes\"}', \
                                    when_unmet => 'fail');",
        )
        .await;
    let run = engine.start("f", json!({})).await;
    let tasks = engine.poll("f").await;
    engine.complete(&tasks[0], json!("no")).await;
    assert_eq!(engine.run(run).await.0, "failed");
    assert_eq!(
        step_row(&engine, run, "b").await.error_message.as_deref(),
        Some("Condition not met")
    );
    let rows = engine.tasks(run).await;
    let states: Vec<(&str, &str)> = rows
        .iter()
        .map(|t| (t.step_slug.as_str(), t.status.as_str()))
        .collect();
    assert_eq!(states, vec![("a", "completed"), ("slow", "cancelled")]);
    assert_eq!(engine.queue_counts("f").await, (0, 2));
    // The slow worker's late report changes nothing.
    let late = engine.complete(&tasks[1], json!("late")).await;
    assert_eq!(late[0].status, "cancelled");
    assert_eq!(late[0].output, None);
}

#[tokio::test]
async fn conditions_on_maps_root_and_dependent() {
    let engine = Engine::new().await;
    // A root map's input is an array and a pattern an object: a required pattern is never
    // met there, a forbidden one never violated (upstream's containment rule).
    engine
        .exec(
            "SELECT pgflow.create_flow('roots'); \
             SELECT pgflow.add_step('roots', 'never', step_type => 'map', \
                                    required_input_pattern => '{\"x\": 1}'); \
             SELECT pgflow.add_step('roots', 'always', step_type => 'map', \
                                    forbidden_input_pattern => '{\"x\": 1}');",
        )
        .await;
    let run = engine.start("roots", json!([1, 2])).await;
    assert_eq!(
        steps(&engine, run).await,
        vec![
            skipped("never", "condition_unmet"),
            row("always", "started", None)
        ]
    );
    let tasks = engine.poll("roots").await;
    assert_eq!(slugs(&tasks), vec!["always", "always"]);
    for t in &tasks {
        engine.complete(t, json!(t.task_index)).await;
    }
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"always": [0, 1]})))
    );

    // A dependent map decides on its parent's array: mapped when it contains 2.
    engine
        .exec(
            "SELECT pgflow.create_flow('deps'); \
             SELECT pgflow.add_step('deps', 'list'); \
             SELECT pgflow.add_step('deps', 'each', ARRAY['list'], step_type => 'map', \
                                    required_input_pattern => '{\"list\": [2]}'); \
             SELECT pgflow.add_step('deps', 'fin', ARRAY['each']);",
        )
        .await;
    for (list, mapped) in [(json!([1, 2, 3]), 3), (json!([1, 3]), 0)] {
        let run = engine.start("deps", json!({})).await;
        let list_task = engine.poll("deps").await.remove(0);
        engine.complete(&list_task, list.clone()).await;
        let (each, mut fin): (Vec<_>, Vec<_>) = engine
            .poll("deps")
            .await
            .into_iter()
            .partition(|t| t.step_slug == "each");
        assert_eq!(each.len(), mapped, "{list}");
        for t in &each {
            engine
                .complete(t, json!(t.input.as_i64().unwrap() * 10))
                .await;
        }
        fin.extend(engine.poll("deps").await);
        assert_eq!(slugs(&fin), vec!["fin"]);
        let fin = fin.remove(0);
        if mapped == 0 {
            assert_eq!(
                step_row(&engine, run, "each").await.skip_reason.as_deref(),
                Some("condition_unmet")
            );
            assert_eq!(fin.input, json!({"run": {}}));
        } else {
            assert_eq!(fin.input, json!({"run": {}, "each": [10, 20, 30]}));
        }
        engine.complete(&fin, json!("ok")).await;
        assert_eq!(engine.run(run).await.0, "completed");
    }
}

#[tokio::test]
async fn a_map_over_a_skipped_dependency_has_no_tasks_and_outputs_an_empty_array() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f'); \
             SELECT pgflow.add_step('f', 'list', required_input_pattern => '{\"go\": true}'); \
             SELECT pgflow.add_step('f', 'each', ARRAY['list'], step_type => 'map'); \
             SELECT pgflow.add_step('f', 'again', ARRAY['each'], step_type => 'map'); \
             SELECT pgflow.add_step('f', 'fin', ARRAY['again']);",
        )
        .await;
    let run = engine.start("f", json!({"go": false})).await;
    assert_eq!(
        steps(&engine, run).await,
        vec![
            skipped("list", "condition_unmet"),
            row("each", "completed", None),
            row("again", "completed", None),
            row("fin", "started", None),
        ]
    );
    assert_eq!(step_row(&engine, run, "each").await.output, Some(json!([])));
    assert_eq!(
        engine.step(run, "again").await,
        ("completed".into(), Some(0), Some(0), 0)
    );
    let fin = engine.poll("f").await;
    assert_eq!(slugs(&fin), vec!["fin"]);
    assert_eq!(fin[0].input, json!({"run": {"go": false}, "again": []}));
    engine.complete(&fin[0], json!(1)).await;
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"fin": 1})))
    );
}

#[tokio::test]
async fn a_run_whose_only_leaves_are_skipped_completes_with_an_empty_output() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f'); \
             SELECT pgflow.add_step('f', 'a'); \
             SELECT pgflow.add_step('f', 'b', ARRAY['a'], required_input_pattern => '{\"a\": 1}'); \
             SELECT pgflow.add_step('f', 'c', ARRAY['a'], forbidden_input_pattern => '{\"a\": 2}');",
        )
        .await;
    let run = engine.start("f", json!({})).await;
    let a = engine.poll("f").await.remove(0);
    engine.complete(&a, json!(2)).await;
    assert_eq!(engine.run(run).await, ("completed".into(), Some(json!({}))));
    assert_eq!(remaining_steps(&engine, run).await, 0);

    // Only one leaf skipped: the output holds the other.
    let run = engine.start("f", json!({})).await;
    let a = engine.poll("f").await.remove(0);
    engine.complete(&a, json!(3)).await;
    let c = engine.poll("f").await;
    assert_eq!(slugs(&c), vec!["c"]);
    engine.complete(&c[0], json!("c")).await;
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"c": "c"})))
    );

    // A flow whose every step is skipped at start completes at start.
    engine
        .exec(
            "SELECT pgflow.create_flow('g'); \
             SELECT pgflow.add_step('g', 'x', required_input_pattern => '{\"x\": 1}', \
                                    when_unmet => 'skip-cascade'); \
             SELECT pgflow.add_step('g', 'y', ARRAY['x']);",
        )
        .await;
    let run = engine.start("g", json!({})).await;
    assert_eq!(engine.run(run).await, ("completed".into(), Some(json!({}))));
    assert_eq!(
        steps(&engine, run).await,
        vec![
            skipped("x", "condition_unmet"),
            skipped("y", "dependency_skipped")
        ]
    );
}

#[tokio::test]
async fn conditions_on_nested_json_use_containment_for_required_and_forbidden_at_once() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f'); \
             SELECT pgflow.add_step('f', 'pro', \
               required_input_pattern => '{\"user\": {\"plan\": \"pro\", \"flags\": [\"beta\"]}}', \
               forbidden_input_pattern => '{\"user\": {\"banned\": true}}');",
        )
        .await;
    let cases = [
        (
            json!({"user": {"plan": "pro", "flags": ["alpha", "beta"], "age": 3}}),
            true,
        ),
        (
            json!({"user": {"plan": "pro", "flags": ["beta"], "banned": false}}),
            true,
        ),
        (
            json!({"user": {"plan": "pro", "flags": ["beta"], "banned": true}}),
            false,
        ),
        (json!({"user": {"plan": "pro", "flags": ["alpha"]}}), false),
        (json!({"user": {"plan": "free", "flags": ["beta"]}}), false),
        (json!({"plan": "pro", "flags": ["beta"]}), false),
        (json!({"user": {"plan": ["pro"], "flags": ["beta"]}}), false),
        (json!({}), false),
        (json!(null), false),
        (json!([{"user": {"plan": "pro", "flags": ["beta"]}}]), false),
    ];
    for (input, met) in cases {
        let run = engine.start("f", input.clone()).await;
        let state = step_row(&engine, run, "pro").await;
        if met {
            assert_eq!(state.status, "started", "{input}");
        } else {
            assert_eq!(
                (state.status.as_str(), state.skip_reason.as_deref()),
                ("skipped", Some("condition_unmet")),
                "{input}"
            );
            assert_eq!(
                engine.run(run).await,
                ("completed".into(), Some(json!({}))),
                "{input}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// when_exhausted
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn when_exhausted_skip_skips_the_step_after_its_retries_and_the_run_goes_on() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f', max_attempts => 2, base_delay => 0); \
             SELECT pgflow.add_step('f', 'a', when_exhausted => 'skip'); \
             SELECT pgflow.add_step('f', 'b', ARRAY['a']);",
        )
        .await;
    let run = engine.start("f", json!({"k": 1})).await;
    let first = engine.poll("f").await.remove(0);
    assert_eq!(engine.fail(&first, "boom 1").await[0].status, "queued");
    engine.make_visible("f").await;
    let second = engine.poll("f").await.remove(0);
    let rows = engine.fail(&second, "boom 2").await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].attempts_count),
        ("failed", 2)
    );
    assert_eq!(
        step_row(&engine, run, "a").await,
        StepRow {
            status: "skipped".into(),
            skip_reason: Some("handler_failed".into()),
            error_message: Some("boom 2".into()),
            output: None,
            skipped: true,
        }
    );
    assert_eq!(engine.run(run).await.0, "started");
    let b = engine.poll("f").await.remove(0);
    assert_eq!(b.input, json!({"run": {"k": 1}}));
    engine.complete(&b, json!("b")).await;
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"b": "b"})))
    );
    assert_eq!(engine.queue_counts("f").await, (0, 2));
}

#[tokio::test]
async fn when_exhausted_skip_cascade_on_a_map_cancels_its_siblings_and_skips_downstream() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f', max_attempts => 1); \
             SELECT pgflow.add_step('f', 'm', step_type => 'map', when_exhausted => 'skip-cascade'); \
             SELECT pgflow.add_step('f', 'n', ARRAY['m']); \
             SELECT pgflow.add_step('f', 'o', ARRAY['n'], step_type => 'map'); \
             SELECT pgflow.add_step('f', 'p', ARRAY['m'], step_type => 'map');",
        )
        .await;
    let run = engine.start("f", json!([1, 2, 3, 4])).await;
    // Three of the four tasks started; the fourth stays queued.
    let msg_ids: Vec<i64> = sqlx::query_scalar(
        "SELECT message_id FROM pgflow.step_tasks WHERE run_id = $1 AND task_index < 3 \
          ORDER BY task_index",
    )
    .bind(run)
    .fetch_all(engine.pool())
    .await
    .unwrap();
    let started = engine.start_tasks("f", &msg_ids).await;
    engine.complete(&started[1], json!("done")).await;
    let rows = engine.fail(&started[0], "bad element").await;
    assert_eq!(rows[0].status, "failed");
    assert_eq!(
        steps(&engine, run).await,
        vec![
            skipped("m", "handler_failed"),
            skipped("n", "dependency_skipped"),
            skipped("o", "dependency_skipped"),
            skipped("p", "dependency_skipped"),
        ]
    );
    assert_eq!(
        step_row(&engine, run, "m").await.error_message.as_deref(),
        Some("bad element")
    );
    let statuses: Vec<String> = engine
        .tasks(run)
        .await
        .into_iter()
        .map(|t| t.status)
        .collect();
    assert_eq!(
        statuses,
        vec!["failed", "completed", "cancelled", "cancelled"]
    );
    // Every message is gone from the queue: none is left for a worker to read.
    assert_eq!(engine.queue_counts("f").await, (0, 4));
    assert_eq!(engine.run(run).await, ("completed".into(), Some(json!({}))));
    // The third task's worker reports late: it is cancelled, nothing else changes.
    let late = engine.complete(&started[2], json!("late")).await;
    assert_eq!(
        (late[0].status.as_str(), &late[0].output),
        ("cancelled", &None)
    );
    let late = engine.fail(&started[2], "late too").await;
    assert_eq!(late[0].status, "cancelled");
    assert_eq!(engine.run(run).await, ("completed".into(), Some(json!({}))));
}

#[tokio::test]
async fn when_exhausted_skip_of_a_dependent_map_lets_the_other_branch_finish() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f', max_attempts => 1); \
             SELECT pgflow.add_step('f', 'list'); \
             SELECT pgflow.add_step('f', 'each', ARRAY['list'], step_type => 'map', \
                                    when_exhausted => 'skip'); \
             SELECT pgflow.add_step('f', 'sum', ARRAY['each', 'list']);",
        )
        .await;
    let run = engine.start("f", json!({})).await;
    let list = engine.poll("f").await.remove(0);
    engine.complete(&list, json!([1, 2])).await;
    let each = engine.poll("f").await;
    engine.fail(&each[1], "no").await;
    let sum = engine.poll("f").await;
    assert_eq!(slugs(&sum), vec!["sum"]);
    assert_eq!(sum[0].input, json!({"run": {}, "list": [1, 2]}));
    assert_eq!(
        engine.complete(&each[0], json!(1)).await[0].status,
        "cancelled"
    );
    engine.complete(&sum[0], json!(3)).await;
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"sum": 3})))
    );
}

/// A sibling's completion and another task's exhaustion race on one map step, in both
/// orders: whichever commits first, the step ends skipped, the completed sibling stays
/// completed, the rest are cancelled, and the run goes on.
#[tokio::test]
async fn a_sibling_completion_racing_an_exhaustion_skip_loses_nothing() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f', max_attempts => 1); \
             SELECT pgflow.add_step('f', 'm', step_type => 'map', when_exhausted => 'skip'); \
             SELECT pgflow.add_step('f', 'after', ARRAY['m']);",
        )
        .await;
    for completion_first in [true, false] {
        let run = engine.start("f", json!([1, 2, 3])).await;
        let tasks: Vec<_> = engine
            .poll("f")
            .await
            .into_iter()
            .filter(|t| t.run_id == run)
            .collect();
        let (first, mut second) = (
            engine.pool().begin().await.unwrap(),
            engine.pool().begin().await.unwrap(),
        );
        let complete = "SELECT status FROM pgflow.complete_task($1, 'm', 1, '\"one\"')";
        let fail = "SELECT status FROM pgflow.fail_task($1, 'm', 0, 'zero failed')";
        let (early, late) = if completion_first {
            (complete, fail)
        } else {
            (fail, complete)
        };
        let mut first = first;
        let early_status: String = sqlx::query_scalar(early)
            .bind(run)
            .fetch_one(&mut *first)
            .await
            .unwrap();
        let late_call = tokio::spawn(async move {
            let status: String = sqlx::query_scalar(late)
                .bind(run)
                .fetch_one(&mut *second)
                .await
                .unwrap();
            second.commit().await.unwrap();
            status
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(
            !late_call.is_finished(),
            "the late call waits for the locks"
        );
        first.commit().await.unwrap();
        let late_status = late_call.await.unwrap();
        if completion_first {
            assert_eq!(
                (early_status.as_str(), late_status.as_str()),
                ("completed", "failed")
            );
        } else {
            assert_eq!(
                (early_status.as_str(), late_status.as_str()),
                ("failed", "cancelled")
            );
        }
        let statuses: Vec<String> = engine
            .tasks(run)
            .await
            .into_iter()
            .filter(|t| t.step_slug == "m")
            .map(|t| t.status)
            .collect();
        let one = if completion_first {
            "completed"
        } else {
            "cancelled"
        };
        assert_eq!(statuses, vec!["failed", one, "cancelled"]);
        assert_eq!(
            step_row(&engine, run, "m").await.skip_reason.as_deref(),
            Some("handler_failed")
        );
        let after = engine.poll("f").await;
        assert_eq!(slugs(&after), vec!["after"]);
        assert_eq!(after[0].input, json!({"run": [1, 2, 3]}));
        engine.complete(&after[0], json!("a")).await;
        assert_eq!(engine.run(run).await.0, "completed");
        let _ = tasks;
    }
}

// ---------------------------------------------------------------------------------------
// Stored outputs
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn completed_steps_store_their_output_and_dependents_and_the_run_read_it() {
    let engine = Engine::new().await;
    engine
        .flow(
            "f",
            &[
                ("list", &[], "single"),
                ("each", &["list"], "map"),
                ("twice", &["each"], "map"),
                ("fin", &["twice", "list"], "single"),
            ],
        )
        .await;
    let run = engine.start("f", json!({})).await;
    let list = engine.poll("f").await.remove(0);
    engine.complete(&list, json!([1, 2, 3])).await;
    assert_eq!(
        step_row(&engine, run, "list").await.output,
        Some(json!([1, 2, 3]))
    );
    // Tasks complete out of order; the stored array is in task_index order.
    let mut each = engine.poll("f").await;
    each.reverse();
    for t in &each {
        assert_eq!(step_row(&engine, run, "each").await.output, None);
        engine
            .complete(t, json!(t.input.as_i64().unwrap() * 10))
            .await;
    }
    assert_eq!(
        step_row(&engine, run, "each").await.output,
        Some(json!([10, 20, 30]))
    );
    let twice = engine.poll("f").await;
    for t in &twice {
        engine
            .complete(t, json!(t.input.as_i64().unwrap() + 1))
            .await;
    }
    assert_eq!(
        step_row(&engine, run, "twice").await.output,
        Some(json!([11, 21, 31]))
    );

    // Dependents read what is stored, not the task rows: a stored output changed behind the
    // engine's back is what the next step gets, and what the run's output holds.
    engine
        .exec(&format!(
            "UPDATE pgflow.step_states SET output = '[\"stored\"]' \
              WHERE run_id = '{run}' AND step_slug = 'twice'"
        ))
        .await;
    let fin = engine.poll("f").await.remove(0);
    assert_eq!(
        fin.input,
        json!({"run": {}, "list": [1, 2, 3], "twice": ["stored"]})
    );
    engine.complete(&fin, json!({"fin": true})).await;
    assert_eq!(
        step_row(&engine, run, "fin").await.output,
        Some(json!({"fin": true}))
    );
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"fin": {"fin": true}})))
    );

    // A leaf map's stored array is the run's output for it.
    engine.flow("g", &[("m", &[], "map")]).await;
    let run = engine.start("g", json!(["x", "y"])).await;
    engine.drain("g", |t| json!(t.task_index)).await;
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"m": [0, 1]})))
    );
}

#[tokio::test]
async fn an_output_is_stored_only_on_a_completed_step() {
    let engine = Engine::new().await;
    engine.flow("f", &[("a", &[], "single")]).await;
    let run = engine.start("f", json!({})).await;
    let message = engine
        .error(&format!(
            "UPDATE pgflow.step_states SET output = '1' WHERE run_id = '{run}'"
        ))
        .await;
    assert!(message.contains("output_only_when_completed"), "{message}");
    let message = engine
        .error(&format!(
            "UPDATE pgflow.step_states SET status = 'skipped', remaining_tasks = NULL \
              WHERE run_id = '{run}'"
        ))
        .await;
    assert!(message.contains("skip_reason_matches_status"), "{message}");
    let message = engine
        .error(&format!(
            "UPDATE pgflow.step_states SET status = 'skipped', skip_reason = 'bored', remaining_tasks = NULL, \
                    skipped_at = now() WHERE run_id = '{run}'"
        ))
        .await;
    assert!(message.contains("skip_reason_is_valid"), "{message}");
}

// ---------------------------------------------------------------------------------------
// Failed runs
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_failed_runs_queued_and_started_tasks_are_cancelled_and_their_messages_archived() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f', max_attempts => 1); \
             SELECT pgflow.add_step('f', 'bad'); \
             SELECT pgflow.add_step('f', 'busy'); \
             SELECT pgflow.add_step('f', 'done'); \
             SELECT pgflow.add_step('f', 'waiting'); \
             SELECT pgflow.add_step('f', 'never', ARRAY['done']);",
        )
        .await;
    let run = engine.start("f", json!({})).await;
    let other = engine.start("f", json!({})).await;
    let msg_ids: Vec<i64> = sqlx::query_scalar(
        "SELECT message_id FROM pgflow.step_tasks WHERE run_id = $1 AND step_slug <> 'waiting'",
    )
    .bind(run)
    .fetch_all(engine.pool())
    .await
    .unwrap();
    let started = engine.start_tasks("f", &msg_ids).await;
    let by = |slug: &str| started.iter().find(|t| t.step_slug == slug).unwrap();
    engine.complete(by("done"), json!(1)).await;
    // done released never: its task is queued too.
    engine.fail(by("bad"), "fatal").await;
    assert_eq!(engine.run(run).await.0, "failed");
    let states: Vec<(String, String)> = engine
        .tasks(run)
        .await
        .into_iter()
        .map(|t| (t.step_slug, t.status))
        .collect();
    assert_eq!(
        states,
        vec![
            ("bad".into(), "failed".into()),
            ("busy".into(), "cancelled".into()),
            ("done".into(), "completed".into()),
            ("never".into(), "cancelled".into()),
            ("waiting".into(), "cancelled".into()),
        ]
    );
    let run_msgs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgmq.q_f q JOIN pgflow.step_tasks t ON t.message_id = q.msg_id \
          WHERE t.run_id = $1",
    )
    .bind(run)
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!(run_msgs, 0, "no message of the failed run is left to read");
    // The other run is untouched and finishes.
    engine.drain("f", |_| json!(0)).await;
    assert_eq!(engine.run(other).await.0, "completed");
    // The busy worker's late report is refused by cancelling, not completing.
    let late = engine.complete(by("busy"), json!("late")).await;
    assert_eq!(late[0].status, "cancelled");
}

// ---------------------------------------------------------------------------------------
// Stalled tasks
// ---------------------------------------------------------------------------------------

/// Moves a run's started tasks' start `secs` seconds back, as if that much time had passed.
async fn age(engine: &Engine, run: Uuid, secs: i64) {
    engine
        .exec(&format!(
            "UPDATE pgflow.step_tasks SET started_at = started_at - interval '{secs} seconds', \
                    queued_at = queued_at - interval '{secs} seconds' \
              WHERE run_id = '{run}' AND status = 'started'"
        ))
        .await;
}

async fn requeue(engine: &Engine) -> i32 {
    engine.scalar("SELECT pgflow.requeue_stalled_tasks()").await
}

#[derive(Debug, sqlx::FromRow)]
struct Stall {
    status: String,
    attempts_count: i32,
    requeued_count: i32,
    requeued: bool,
    permanently_stalled: bool,
    message_id: Option<i64>,
    error_message: Option<String>,
}

async fn stall(engine: &Engine, run: Uuid) -> Stall {
    sqlx::query_as(
        "SELECT status, attempts_count, requeued_count, last_requeued_at IS NOT NULL AS requeued, \
                permanently_stalled_at IS NOT NULL AS permanently_stalled, message_id, \
                error_message \
           FROM pgflow.step_tasks WHERE run_id = $1",
    )
    .bind(run)
    .fetch_one(engine.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn a_stalled_task_is_requeued_three_times_then_marked_permanently_stalled() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f', max_attempts => 10, timeout => 5); \
             SELECT pgflow.add_step('f', 'a');",
        )
        .await;
    let run = engine.start("f", json!({})).await;
    let msg_id = engine.poll("f").await.remove(0).msg_id;
    for round in 1..=3 {
        // Within timeout + 30 s the task is left to its worker.
        age(&engine, run, 34).await;
        assert_eq!(requeue(&engine).await, 0, "round {round}");
        age(&engine, run, 2).await;
        assert_eq!(requeue(&engine).await, 1, "round {round}");
        let s = stall(&engine, run).await;
        assert_eq!(
            (
                s.status.as_str(),
                s.requeued_count,
                s.attempts_count,
                s.requeued
            ),
            ("queued", round, round, true)
        );
        assert_eq!(
            s.error_message.as_deref(),
            Some(
                format!(
                    "Task did not finish within its timeout of 5 seconds on attempt {round} \
                     (its worker was lost)"
                )
                .as_str()
            )
        );
        // Its message is visible again now, and the next start is the next attempt.
        let again = engine.poll("f").await;
        assert_eq!(again.len(), 1, "round {round}");
        assert_eq!(again[0].msg_id, msg_id);
        assert_eq!(stall(&engine, run).await.attempts_count, round + 1);
    }
    age(&engine, run, 36).await;
    assert_eq!(requeue(&engine).await, 0);
    let s = stall(&engine, run).await;
    assert_eq!(
        (s.status.as_str(), s.requeued_count, s.permanently_stalled),
        ("started", 3, true)
    );
    // Its message is archived: no reader starts it again behind the operator's back.
    assert_eq!(engine.queue_counts("f").await, (0, 1));
    assert!(engine.poll("f").await.is_empty());
    // Later sweeps leave it as it is; the run stays started for an operator.
    age(&engine, run, 100).await;
    assert_eq!(requeue(&engine).await, 0);
    assert_eq!(stall(&engine, run).await.requeued_count, 3);
    assert_eq!(engine.run(run).await.0, "started");
    // A late report of its attempt still completes it.
    engine.complete_at(run, "a", 0, json!("late")).await;
    assert_eq!(engine.run(run).await.0, "completed");
}

#[tokio::test]
async fn a_retried_run_starts_its_stalled_tasks_stall_count_afresh() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f', max_attempts => 10, timeout => 5); \
             SELECT pgflow.add_step('f', 'a');",
        )
        .await;
    let run = engine.start("f", json!({})).await;
    engine.poll("f").await;
    for _ in 0..3 {
        age(&engine, run, 36).await;
        assert_eq!(requeue(&engine).await, 1);
        engine.poll("f").await;
    }
    age(&engine, run, 36).await;
    requeue(&engine).await;
    assert!(stall(&engine, run).await.permanently_stalled);

    // The operator's way out: cancel, then retry. The task starts from nothing again,
    // its stall count included, so its next stall is requeued, not given up on.
    engine
        .exec(&format!("SELECT pgflow.cancel_run('{run}')"))
        .await;
    engine
        .exec(&format!("SELECT pgflow.retry_run('{run}')"))
        .await;
    let s = stall(&engine, run).await;
    assert_eq!(
        (
            s.status.as_str(),
            s.attempts_count,
            s.requeued_count,
            s.requeued,
            s.permanently_stalled
        ),
        ("queued", 0, 0, false, false)
    );
    assert_eq!(engine.poll("f").await.len(), 1);
    age(&engine, run, 36).await;
    assert_eq!(requeue(&engine).await, 1);
    let s = stall(&engine, run).await;
    assert_eq!((s.status.as_str(), s.requeued_count), ("queued", 1));
}

#[tokio::test]
async fn a_requeued_lost_attempt_counts_and_with_none_left_the_task_fails() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f', max_attempts => 2, timeout => 5); \
             SELECT pgflow.add_step('f', 'a');",
        )
        .await;
    let run = engine.start("f", json!({})).await;
    engine.poll("f").await;
    age(&engine, run, 40).await;
    assert_eq!(requeue(&engine).await, 1);
    let second = engine.poll("f").await.remove(0);
    assert_eq!(stall(&engine, run).await.attempts_count, 2);
    age(&engine, run, 40).await;
    // No attempt left: not requeued, failed as a lost attempt, the run with it.
    assert_eq!(requeue(&engine).await, 0);
    let s = stall(&engine, run).await;
    assert_eq!((s.status.as_str(), s.requeued_count), ("failed", 1));
    assert_eq!(
        s.error_message.as_deref(),
        Some(
            "Task did not finish within its timeout of 5 seconds on attempt 2 (its worker was lost)"
        )
    );
    assert_eq!(engine.run(run).await.0, "failed");
    assert_eq!(engine.queue_counts("f").await, (0, 1));
    // The lost worker comes back: its report is ignored.
    assert_eq!(
        engine.complete(&second, json!("late")).await[0].status,
        "failed"
    );
}

#[tokio::test]
async fn a_lost_attempt_with_none_left_skips_a_step_with_when_exhausted_skip() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f', max_attempts => 1, timeout => 5); \
             SELECT pgflow.add_step('f', 'a', when_exhausted => 'skip'); \
             SELECT pgflow.add_step('f', 'b', ARRAY['a']);",
        )
        .await;
    let run = engine.start("f", json!({})).await;
    engine.poll("f").await;
    age(&engine, run, 40).await;
    assert_eq!(requeue(&engine).await, 0);
    assert_eq!(
        step_row(&engine, run, "a").await.skip_reason.as_deref(),
        Some("handler_failed")
    );
    let b = engine.poll("f").await;
    assert_eq!(slugs(&b), vec!["b"]);
    engine.complete(&b[0], json!(1)).await;
    assert_eq!(engine.run(run).await.0, "completed");
}

#[tokio::test]
async fn a_stalled_task_whose_message_was_archived_is_sent_again() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f', timeout => 5); \
             SELECT pgflow.add_step('f', 'a');",
        )
        .await;
    let run = engine.start("f", json!({"n": 1})).await;
    let first = engine.poll("f").await.remove(0);
    engine
        .exec(&format!("SELECT pgmq.archive('f', {})", first.msg_id))
        .await;
    age(&engine, run, 40).await;
    assert_eq!(requeue(&engine).await, 1);
    let s = stall(&engine, run).await;
    assert_ne!(s.message_id, Some(first.msg_id));
    let again = engine.poll("f").await;
    assert_eq!(again.len(), 1);
    assert_eq!(Some(again[0].msg_id), s.message_id);
    assert_eq!(again[0].input, json!({"run": {"n": 1}}));
    engine.complete(&again[0], json!("ok")).await;
    assert_eq!(engine.run(run).await.0, "completed");
}

#[tokio::test]
async fn stalled_tasks_of_ended_runs_and_fresh_tasks_are_left_alone() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f', timeout => 5); \
             SELECT pgflow.add_step('f', 'a'); \
             SELECT pgflow.add_step('f', 'b', timeout => 100);",
        )
        .await;
    let run = engine.start("f", json!({})).await;
    engine.poll("f").await;
    // b's own timeout (100 s) is the one that counts: 40 s is not stalled for it.
    age(&engine, run, 40).await;
    assert_eq!(requeue(&engine).await, 1);
    assert_eq!(engine.step(run, "b").await.0, "started");
    let b_status: String = sqlx::query_scalar(
        "SELECT status FROM pgflow.step_tasks WHERE run_id = $1 AND step_slug = 'b'",
    )
    .bind(run)
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!(b_status, "started");
    // A cancelled run's tasks are not requeued, however old.
    engine
        .exec(&format!("SELECT pgflow.cancel_run('{run}')"))
        .await;
    age(&engine, run, 1000).await;
    assert_eq!(requeue(&engine).await, 0);
}

#[tokio::test]
async fn requeue_stalled_tasks_due_sweeps_once_per_period_across_connections() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f', timeout => 5); \
             SELECT pgflow.add_step('f', 'a');",
        )
        .await;
    let run = engine.start("f", json!({})).await;
    engine.poll("f").await;
    age(&engine, run, 40).await;

    let mut first = engine.pool().begin().await.unwrap();
    let mut second = engine.pool().begin().await.unwrap();
    let swept: Option<i32> =
        sqlx::query_scalar("SELECT pgflow.requeue_stalled_tasks_due(interval '60 seconds')")
            .fetch_one(&mut *first)
            .await
            .unwrap();
    assert_eq!(swept, Some(1));
    let waiting = tokio::spawn(async move {
        let swept: Option<i32> =
            sqlx::query_scalar("SELECT pgflow.requeue_stalled_tasks_due(interval '60 seconds')")
                .fetch_one(&mut *second)
                .await
                .unwrap();
        second.commit().await.unwrap();
        swept
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished(),
        "the second caller waits for the first"
    );
    first.commit().await.unwrap();
    assert_eq!(waiting.await.unwrap(), None, "the period was taken");
    assert_eq!(
        engine
            .scalar::<Option<i32>>("SELECT pgflow.requeue_stalled_tasks_due(interval '60 seconds')")
            .await,
        None
    );
    // A period later (moved back rather than waited for), the next caller sweeps.
    engine
        .exec("UPDATE pgflow_ext.sweeps SET last_at = last_at - interval '61 seconds'")
        .await;
    assert_eq!(
        engine
            .scalar::<Option<i32>>("SELECT pgflow.requeue_stalled_tasks_due(interval '60 seconds')")
            .await,
        Some(0)
    );
    assert_eq!(stall(&engine, run).await.requeued_count, 1);
    // A deleted record is "never swept", not "never sweep again".
    engine.exec("DELETE FROM pgflow_ext.sweeps").await;
    assert_eq!(
        engine
            .scalar::<Option<i32>>("SELECT pgflow.requeue_stalled_tasks_due(interval '60 seconds')")
            .await,
        Some(0)
    );
    assert_eq!(
        engine
            .scalar::<Option<i32>>("SELECT pgflow.requeue_stalled_tasks_due(interval '60 seconds')")
            .await,
        None,
        "the recreated record holds the period"
    );
}

// ---------------------------------------------------------------------------------------
// Bad input at the SQL door
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn bad_conditions_and_modes_are_refused_by_name_and_change_nothing() {
    let engine = Engine::new().await;
    engine.exec("SELECT pgflow.create_flow('f')").await;
    let cases = [
        (
            "required_input_pattern => '[1]'",
            "required_input_pattern_is_object",
        ),
        (
            "required_input_pattern => '\"x\"'",
            "required_input_pattern_is_object",
        ),
        (
            "forbidden_input_pattern => 'null'",
            "forbidden_input_pattern_is_object",
        ),
        (
            "forbidden_input_pattern => '3'",
            "forbidden_input_pattern_is_object",
        ),
        ("when_unmet => 'maybe'", "when_unmet_is_valid"),
        ("when_unmet => 'SKIP'", "when_unmet_is_valid"),
        ("when_unmet => NULL", "when_unmet"),
        ("when_exhausted => 'retry'", "when_exhausted_is_valid"),
        ("when_exhausted => NULL", "when_exhausted"),
    ];
    for (args, named) in cases {
        let message = engine
            .error(&format!("SELECT pgflow.add_step('f', 's', {args})"))
            .await;
        assert!(message.contains(named), "{args}: {message}");
    }
    assert_eq!(
        engine
            .scalar::<i64>("SELECT count(*) FROM pgflow.steps WHERE flow_slug = 'f'")
            .await,
        0
    );
    // A SQL NULL pattern is no condition; an empty object one that every object meets.
    engine
        .exec(
            "SELECT pgflow.add_step('f', 'n', required_input_pattern => NULL); \
             SELECT pgflow.add_step('f', 'e', required_input_pattern => '{}');",
        )
        .await;
    let run = engine.start("f", json!({"a": 1})).await;
    assert_eq!(slugs(&engine.poll("f").await), vec!["e", "n"]);
    let _ = run;

    for every in [
        "interval '999 milliseconds'",
        "interval '0'",
        "interval '-1 hour'",
        "NULL",
    ] {
        let message = engine
            .error(&format!("SELECT pgflow.requeue_stalled_tasks_due({every})"))
            .await;
        assert!(
            message.starts_with("p_every must be at least 1 second"),
            "{every}: {message}"
        );
        assert_eq!(
            engine
                .error_code(&format!("SELECT pgflow.requeue_stalled_tasks_due({every})"))
                .await,
            "22023"
        );
    }
    // The refused calls took no period.
    assert_eq!(
        engine
            .scalar::<Option<i32>>("SELECT pgflow.requeue_stalled_tasks_due(interval '1 second')")
            .await,
        Some(0)
    );
}

/// 0.8.1 calls with eight positional arguments keep their meaning, and a step with no
/// condition gets upstream's defaults.
#[tokio::test]
async fn add_step_keeps_its_eight_positional_arguments_and_upstreams_defaults() {
    let engine = Engine::new().await;
    engine.exec("SELECT pgflow.create_flow('f')").await;
    engine
        .exec("SELECT pgflow.add_step('f', 'a', '{}', 4, 5, 6, 7, 'map')")
        .await;
    let row: (
        i32,
        i32,
        i32,
        i32,
        String,
        Option<Value>,
        Option<Value>,
        String,
        String,
    ) = sqlx::query_as(
        "SELECT opt_max_attempts, opt_base_delay, opt_timeout, opt_start_delay, step_type, \
                    required_input_pattern, forbidden_input_pattern, when_unmet, when_exhausted \
               FROM pgflow.steps WHERE flow_slug = 'f'",
    )
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!(
        row,
        (
            4,
            5,
            6,
            7,
            "map".into(),
            None,
            None,
            "skip".into(),
            "fail".into()
        )
    );
}

// ---------------------------------------------------------------------------------------
// Run control with skips
// ---------------------------------------------------------------------------------------

/// A skipped step stays skipped when its failed run is retried: its task is not run again
/// and the retried run completes without it.
#[tokio::test]
async fn retry_run_keeps_skipped_steps_skipped_and_completes() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f', max_attempts => 1); \
             SELECT pgflow.add_step('f', 'optional', when_exhausted => 'skip'); \
             SELECT pgflow.add_step('f', 'gated', required_input_pattern => '{\"on\": true}'); \
             SELECT pgflow.add_step('f', 'needed'); \
             SELECT pgflow.add_step('f', 'fin', ARRAY['optional', 'gated', 'needed']);",
        )
        .await;
    let run = engine.start("f", json!({})).await;
    let tasks = engine.poll("f").await;
    engine.fail(&tasks[1], "optional broke").await;
    engine.fail(&tasks[0], "needed broke").await;
    assert_eq!(engine.run(run).await.0, "failed");

    engine
        .exec(&format!("SELECT pgflow.retry_run('{run}')"))
        .await;
    assert_eq!(
        steps(&engine, run).await,
        vec![
            skipped("optional", "handler_failed"),
            skipped("gated", "condition_unmet"),
            row("needed", "started", None),
            row("fin", "created", None),
        ]
    );
    assert_eq!(remaining_steps(&engine, run).await, 2);
    let again = engine.poll("f").await;
    assert_eq!(
        slugs(&again),
        vec!["needed"],
        "the skipped step's task stays ended"
    );
    engine.complete(&again[0], json!("n")).await;
    let fin = engine.poll("f").await.remove(0);
    assert_eq!(fin.input, json!({"run": {}, "needed": "n"}));
    engine.complete(&fin, json!("f")).await;
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"fin": "f"})))
    );
    let optional: (String, Option<String>) = sqlx::query_as(
        "SELECT status, error_message FROM pgflow.step_tasks \
          WHERE run_id = $1 AND step_slug = 'optional'",
    )
    .bind(run)
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!(optional, ("failed".into(), Some("optional broke".into())));
}

/// A run failed by an unmet condition (when_unmet 'fail') is retried by deciding the
/// condition again: its input is the same, so it fails again, at once and clearly, with the
/// retry recorded.
#[tokio::test]
async fn retry_run_of_a_run_failed_by_its_condition_decides_it_again() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f'); \
             SELECT pgflow.add_step('f', 'a'); \
             SELECT pgflow.add_step('f', 'b', ARRAY['a'], \
                                    required_input_pattern => '{\"a\": 1}', when_unmet => 'fail'); \
             SELECT pgflow.add_step('f', 'side');",
        )
        .await;
    let run = engine.start("f", json!({})).await;
    let tasks = engine.poll("f").await;
    engine.complete(&tasks[0], json!(2)).await;
    assert_eq!(engine.run(run).await.0, "failed");

    let retries: i32 = engine
        .scalar(&format!("SELECT pgflow.retry_run('{run}')"))
        .await;
    assert_eq!(retries, 1);
    assert_eq!(engine.run(run).await.0, "failed");
    let b = step_row(&engine, run, "b").await;
    assert_eq!(
        (b.status.as_str(), b.error_message.as_deref()),
        ("failed", Some("Condition not met"))
    );
    // a stays completed; side's task ran again, then was cancelled by the new failure.
    let states: Vec<(String, String)> = engine
        .tasks(run)
        .await
        .into_iter()
        .map(|t| (t.step_slug, t.status))
        .collect();
    assert_eq!(
        states,
        vec![
            ("a".into(), "completed".into()),
            ("side".into(), "cancelled".into())
        ]
    );
    let run_msgs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgmq.q_f q JOIN pgflow.step_tasks t ON t.message_id = q.msg_id \
          WHERE t.run_id = $1",
    )
    .bind(run)
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!(run_msgs, 0);
    // A second retry does the same, and counts.
    let retries: i32 = engine
        .scalar(&format!("SELECT pgflow.retry_run('{run}')"))
        .await;
    assert_eq!(retries, 2);
    assert_eq!(engine.run(run).await.0, "failed");
}

#[tokio::test]
async fn cancel_run_leaves_skipped_steps_skipped() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f'); \
             SELECT pgflow.add_step('f', 'gated', required_input_pattern => '{\"on\": true}', \
                                    when_unmet => 'skip-cascade'); \
             SELECT pgflow.add_step('f', 'below', ARRAY['gated']); \
             SELECT pgflow.add_step('f', 'work');",
        )
        .await;
    let run = engine.start("f", json!({})).await;
    let work = engine.poll("f").await.remove(0);
    engine
        .exec(&format!("SELECT pgflow.cancel_run('{run}')"))
        .await;
    assert_eq!(engine.run(run).await.0, "cancelled");
    assert_eq!(
        steps(&engine, run).await,
        vec![
            skipped("gated", "condition_unmet"),
            skipped("below", "dependency_skipped"),
            row("work", "cancelled", None),
        ]
    );
    // Resumed, it completes without the skipped ones.
    engine
        .exec(&format!("SELECT pgflow.retry_run('{run}')"))
        .await;
    assert_eq!(remaining_steps(&engine, run).await, 1);
    let again = engine.poll("f").await;
    assert_eq!(slugs(&again), vec!["work"]);
    engine.complete(&again[0], json!(1)).await;
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"work": 1})))
    );
    let _ = work;
}

/// A reader starting a sibling task while another task's exhaustion skips the step: the skip
/// cannot wait for the reader's row lock (lock order), so the sibling it held is started
/// after the skip. Its report cancels it; a worker that never reports leaves nothing that the
/// checker calls inconsistent once the run has completed.
#[tokio::test]
async fn a_sibling_started_by_a_reader_during_an_exhaustion_skip_is_cancelled_by_its_report() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f', max_attempts => 1); \
             SELECT pgflow.add_step('f', 'm', step_type => 'map', when_exhausted => 'skip'); \
             SELECT pgflow.add_step('f', 'after', ARRAY['m']);",
        )
        .await;
    for reports in [true, false] {
        let run = engine.start("f", json!([1, 2])).await;
        let msgs: Vec<i64> = sqlx::query_scalar(
            "SELECT message_id FROM pgflow.step_tasks WHERE run_id = $1 ORDER BY task_index",
        )
        .bind(run)
        .fetch_all(engine.pool())
        .await
        .unwrap();
        engine.start_tasks("f", &msgs[..1]).await;
        let mut reader = engine.pool().begin().await.unwrap();
        let started: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pgflow.start_tasks('f', $1, $2)")
                .bind(&msgs[1..])
                .bind(super::WORKER)
                .fetch_one(&mut *reader)
                .await
                .unwrap();
        assert_eq!(started, 1);
        let pool = engine.pool().clone();
        let skip = tokio::spawn(async move {
            sqlx::query("SELECT pgflow.fail_task($1, 'm', 0, 'zero failed')")
                .bind(run)
                .execute(&pool)
                .await
                .unwrap();
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        reader.commit().await.unwrap();
        skip.await.unwrap();
        assert_eq!(
            step_row(&engine, run, "m").await.skip_reason.as_deref(),
            Some("handler_failed")
        );
        let after = engine.poll("f").await;
        assert_eq!(slugs(&after), vec!["after"]);
        engine.complete(&after[0], json!(1)).await;
        assert_eq!(engine.run(run).await.0, "completed");
        if reports {
            let late = engine.complete_at(run, "m", 1, json!("late")).await;
            assert_eq!(late[0].status, "cancelled");
        }
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pgflow.step_tasks WHERE run_id = $1 AND status IN ('queued', 'started')",
        )
        .bind(run)
        .fetch_one(engine.pool())
        .await
        .unwrap();
        assert_eq!(open, if reports { 0 } else { 1 });
        crate::support::assert_consistent(engine.pool()).await;
    }
}

/// The same race, the reader's worker lost: the sweep cancels the task of a step that is
/// over instead of requeueing it (which would run its handler again for nothing).
#[tokio::test]
async fn a_stalled_task_of_a_skipped_step_is_cancelled_not_requeued() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f', max_attempts => 3, timeout => 5); \
             SELECT pgflow.add_step('f', 'm', step_type => 'map', max_attempts => 2, \
                                    when_exhausted => 'skip'); \
             SELECT pgflow.add_step('f', 'other');",
        )
        .await;
    let run = engine.start("f", json!([1, 2])).await;
    let msgs: Vec<i64> = sqlx::query_scalar(
        "SELECT message_id FROM pgflow.step_tasks WHERE run_id = $1 AND step_slug = 'm' \
          ORDER BY task_index",
    )
    .bind(run)
    .fetch_all(engine.pool())
    .await
    .unwrap();
    engine.start_tasks("f", &msgs[..1]).await;
    let mut reader = engine.pool().begin().await.unwrap();
    sqlx::query("SELECT count(*) FROM pgflow.start_tasks('f', $1, $2)")
        .bind(&msgs[1..])
        .bind(super::WORKER)
        .fetch_one(&mut *reader)
        .await
        .unwrap();
    let pool = engine.pool().clone();
    let skip = tokio::spawn(async move {
        // A permanent failure: m/1 keeps an attempt left, so only the step's end stops it.
        sqlx::query("SELECT pgflow.fail_task($1, 'm', 0, 'zero failed', 1, NULL, true)")
            .bind(run)
            .execute(&pool)
            .await
            .unwrap();
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    reader.commit().await.unwrap();
    skip.await.unwrap();
    let left: String = sqlx::query_scalar(
        "SELECT status FROM pgflow.step_tasks WHERE run_id = $1 AND step_slug = 'm' AND task_index = 1",
    )
    .bind(run)
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!(left, "started", "the reader started it after the skip");

    // The reader's worker is lost; the run is still started (its other step runs).
    age(&engine, run, 60).await;
    assert_eq!(requeue(&engine).await, 0);
    let rows = engine.tasks(run).await;
    let m1 = rows
        .iter()
        .find(|t| t.step_slug == "m" && t.task_index == 1)
        .unwrap();
    assert_eq!(m1.status, "cancelled");
    let delivered = engine.poll("f").await;
    assert!(
        delivered.iter().all(|t| t.step_slug != "m"),
        "{delivered:?}"
    );
    let other = engine.complete_at(run, "other", 0, json!("o")).await;
    assert_eq!(other[0].status, "completed");
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"other": "o"})))
    );
    crate::support::assert_consistent(engine.pool()).await;
}

/// A worker's read holds a message before it locks its task (`_read_and_start`), the
/// opposite of the engine's lock order. A run's failure or a step's skip cancels that task
/// meanwhile and must not wait for the message (a deadlock the detector would break by
/// aborting one side): the reader finds the task cancelled, and the next read archives the
/// message.
#[tokio::test]
async fn a_skip_or_failure_never_waits_for_a_message_a_reader_holds() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f', max_attempts => 1); \
             SELECT pgflow.add_step('f', 'm', step_type => 'map', when_exhausted => 'skip'); \
             SELECT pgflow.add_step('f', 'other');",
        )
        .await;
    // skip: m/0 exhausts while a reader holds m/1's message; fail: other's failure fails
    // the run while a reader holds m/1's message.
    for (failing, when) in [("m", "skip"), ("other", "fail")] {
        let run = engine.start("f", json!([1, 2])).await;
        let msg = |step: &'static str, index: i32| {
            let pool = engine.pool().clone();
            async move {
                sqlx::query_scalar::<_, i64>(
                    "SELECT message_id FROM pgflow.step_tasks \
                      WHERE run_id = $1 AND step_slug = $2 AND task_index = $3",
                )
                .bind(run)
                .bind(step)
                .bind(index)
                .fetch_one(&pool)
                .await
                .unwrap()
            }
        };
        let (m0, m1, other) = (msg("m", 0).await, msg("m", 1).await, msg("other", 0).await);
        engine
            .start_tasks("f", &[if failing == "m" { m0 } else { other }])
            .await;
        let mut reader = engine.pool().begin().await.unwrap();
        // What a read does first: the message, locked and hidden.
        sqlx::query(
            "UPDATE pgmq.q_f SET vt = clock_timestamp() + interval '30 seconds' WHERE msg_id = $1",
        )
        .bind(m1)
        .execute(&mut *reader)
        .await
        .unwrap();
        let failure = engine.fail_at(run, failing, 0, "broke");
        let failure = tokio::time::timeout(std::time::Duration::from_secs(5), failure)
            .await
            .unwrap_or_else(|_| panic!("{when}: the failure waits for the reader's message"));
        assert_eq!(failure[0].status, "failed", "{when}");
        // Then the reader starts its task: cancelled, nothing starts.
        let started: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pgflow.start_tasks('f', $1, $2)")
                .bind(vec![m1])
                .bind(super::WORKER)
                .fetch_one(&mut *reader)
                .await
                .unwrap();
        assert_eq!(started, 0, "{when}");
        reader.commit().await.unwrap();
        let m1_status: String = sqlx::query_scalar(
            "SELECT status FROM pgflow.step_tasks WHERE run_id = $1 AND step_slug = 'm' AND task_index = 1",
        )
        .bind(run)
        .fetch_one(engine.pool())
        .await
        .unwrap();
        assert_eq!(m1_status, "cancelled", "{when}");
        // The message the reader held is archived by the next read that sees it.
        engine.make_visible("f").await;
        let read: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pgflow._read_and_start('f', 10, 30, $1)")
                .bind(super::WORKER)
                .fetch_one(engine.pool())
                .await
                .unwrap();
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pgmq.q_f WHERE msg_id = $1")
            .bind(m1)
            .fetch_one(engine.pool())
            .await
            .unwrap();
        assert_eq!(left, 0, "{when}");
        if when == "skip" {
            // other is what is left to run.
            assert_eq!(read, 1);
        } else {
            assert_eq!(read, 0);
            assert_eq!(engine.run(run).await.0, "failed");
        }
        engine.exec("DELETE FROM pgmq.q_f").await;
    }
}

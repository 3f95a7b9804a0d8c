//! Model-based tests: random small DAGs of single and map steps, with handlers that fail on
//! chosen attempts, executed by the real engine through its SQL API and compared with a small
//! in-memory reference model of the spec (`shared/spec/sql-api.md`): the run's final status,
//! every task's input, every step's output, the run output (the leaf steps' outputs) and the
//! attempts counted. The invariant checker runs after each case.

use std::collections::{BTreeMap, HashMap};

use pgflow_client::throwaway::TestDatabase;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use super::env_size;

/// One step of a generated flow, as drawn (normalised into a valid DAG by [`Dag::new`]).
#[derive(Debug, Clone)]
pub(super) struct RawStep {
    pub(super) map: bool,
    pub(super) root: bool,
    pub(super) parent_pick: usize,
    pub(super) dep_mask: u8,
    pub(super) array_len: usize,
    pub(super) max_attempts: u32,
    pub(super) fails: u32,
    pub(super) non_array: bool,
}

pub(super) fn raw_step() -> impl Strategy<Value = RawStep> {
    (
        any::<bool>(),
        prop::bool::weighted(0.3),
        0..6_usize,
        any::<u8>(),
        0..=3_usize,
        1..=3_u32,
        prop_oneof![3 => Just(0_u32), 1 => 1..=3_u32],
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(map, root, parent_pick, dep_mask, array_len, max_attempts, fails, non_array)| {
                RawStep {
                    map,
                    root,
                    parent_pick,
                    dep_mask,
                    array_len,
                    max_attempts,
                    fails,
                    non_array,
                }
            },
        )
}

/// A case: the steps and the run input's length (the input is always an array of numbers, so
/// root maps have something to map over).
pub(super) fn case() -> impl Strategy<Value = (Vec<RawStep>, usize)> {
    (prop::collection::vec(raw_step(), 2..=6), 0..=3_usize)
}

/// A step of a valid flow.
#[derive(Debug, Clone)]
pub(super) struct Step {
    pub(super) slug: String,
    pub(super) map: bool,
    pub(super) deps: Vec<usize>,
    /// A single step that a map depends on outputs an array of this length.
    pub(super) array_len: usize,
    /// A single step that a map depends on outputs an object instead (a type violation).
    pub(super) non_array: bool,
    pub(super) feeds_map: bool,
    pub(super) max_attempts: u32,
    /// Every task of the step fails on attempts `1..=fails`.
    pub(super) fails: u32,
}

#[derive(Debug, Clone)]
pub(super) struct Dag {
    pub(super) steps: Vec<Step>,
    pub(super) input: Value,
}

impl Dag {
    /// Deps only on earlier steps; a map has no dependency (a root map) or exactly one.
    pub(super) fn new(raw: &[RawStep], input_len: usize) -> Self {
        let mut steps: Vec<Step> = Vec::new();
        for (i, r) in raw.iter().enumerate() {
            let deps = if r.map {
                if r.root || i == 0 {
                    vec![]
                } else {
                    vec![r.parent_pick % i]
                }
            } else {
                (0..i.min(8))
                    .filter(|j| r.dep_mask & (1 << j) != 0)
                    .collect()
            };
            if r.map
                && let Some(&parent) = deps.first()
            {
                steps[parent].feeds_map = true;
            }
            steps.push(Step {
                slug: format!("s{i}"),
                map: r.map,
                deps,
                array_len: r.array_len,
                non_array: r.non_array,
                feeds_map: false,
                max_attempts: r.max_attempts,
                fails: r.fails,
            });
        }
        let input = Value::Array((0..input_len).map(|i| json!(i * 10)).collect());
        Self { steps, input }
    }

    pub(super) fn index(&self, slug: &str) -> Option<usize> {
        self.steps.iter().position(|step| step.slug == slug)
    }
}

/// What a handler does: fail on the planned attempts, else compute the output from the input.
fn handle(step: &Step, task_index: i32, attempt: i32, input: &Value) -> Result<Value, String> {
    if u32::try_from(attempt).unwrap_or(0) <= step.fails {
        return Err(format!(
            "planned failure of {}/{task_index} on attempt {attempt}",
            step.slug
        ));
    }
    Ok(output(step, task_index, input))
}

pub(super) fn output(step: &Step, task_index: i32, input: &Value) -> Value {
    if step.map {
        json!({"from": step.slug, "i": task_index, "el": input})
    } else if step.feeds_map && !step.non_array {
        Value::Array(
            (0..step.array_len)
                .map(|i| json!({"from": step.slug, "i": i, "in": input}))
                .collect(),
        )
    } else {
        json!({"from": step.slug, "in": input})
    }
}

/// The reference model's verdict on a case.
#[derive(Debug)]
pub(super) struct Expected {
    /// Each reached step's output; `None` for steps never reached or doomed.
    pub(super) outputs: Vec<Option<Value>>,
    /// The input of every task the engine may deliver: (step, task index) → input.
    pub(super) inputs: HashMap<(usize, i32), Value>,
    /// Steps that fail the run when they run (retries exhausted, or a type violation).
    pub(super) doomed: Vec<usize>,
    /// The run output, when the run completes.
    pub(super) run_output: Option<Value>,
}

/// The spec, in memory: steps in order of definition (deps come earlier), each reached when all
/// its deps completed; a single step has one task, a map one per element of its array (the run
/// input for a root map, its dependency's output otherwise), completing at once with `[]` when
/// empty; a task fails for good after `max_attempts` failed attempts, and then so does the run.
pub(super) fn model(dag: &Dag) -> Expected {
    let mut outputs: Vec<Option<Value>> = vec![None; dag.steps.len()];
    let mut inputs = HashMap::new();
    let mut doomed = Vec::new();
    for (i, step) in dag.steps.iter().enumerate() {
        if step.deps.iter().any(|&d| outputs[d].is_none()) {
            continue;
        }
        let task_inputs: Vec<Value> = if step.map {
            let array = match step.deps.first() {
                None => dag.input.clone(),
                Some(&d) => outputs[d].clone().unwrap_or(Value::Null),
            };
            array.as_array().cloned().unwrap_or_default()
        } else {
            let mut object = serde_json::Map::new();
            object.insert("run".into(), dag.input.clone());
            for &d in &step.deps {
                object.insert(
                    dag.steps[d].slug.clone(),
                    outputs[d].clone().unwrap_or(Value::Null),
                );
            }
            vec![Value::Object(object)]
        };
        for (index, input) in task_inputs.iter().enumerate() {
            inputs.insert((i, i32::try_from(index).unwrap_or(0)), input.clone());
        }
        let runs_out = !task_inputs.is_empty() && step.fails >= step.max_attempts;
        let violates = !step.map && step.feeds_map && step.non_array;
        if runs_out || violates {
            doomed.push(i);
            continue;
        }
        let out: Vec<Value> = task_inputs
            .iter()
            .enumerate()
            .map(|(index, input)| output(step, i32::try_from(index).unwrap_or(0), input))
            .collect();
        outputs[i] = Some(if step.map {
            Value::Array(out)
        } else {
            out.into_iter().next().unwrap_or(Value::Null)
        });
    }
    let run_output = doomed.is_empty().then(|| {
        let leaves: serde_json::Map<String, Value> = dag
            .steps
            .iter()
            .enumerate()
            .filter(|(i, _)| !dag.steps.iter().any(|other| other.deps.contains(i)))
            .map(|(i, step)| (step.slug.clone(), outputs[i].clone().unwrap_or(Value::Null)))
            .collect();
        Value::Object(leaves)
    });
    Expected {
        outputs,
        inputs,
        doomed,
        run_output,
    }
}

pub(super) const FLOW: &str = "model";

pub(super) async fn compile(pool: &PgPool, dag: &Dag) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pgflow.create_flow($1, max_attempts => 3, base_delay => 0)")
        .bind(FLOW)
        .execute(pool)
        .await?;
    for step in &dag.steps {
        let deps: Vec<&str> = step
            .deps
            .iter()
            .map(|&d| dag.steps[d].slug.as_str())
            .collect();
        sqlx::query(
            "SELECT pgflow.add_step($1, $2, $3, max_attempts => $4, base_delay => 0, \
                                    step_type => $5)",
        )
        .bind(FLOW)
        .bind(&step.slug)
        .bind(&deps)
        .bind(i32::try_from(step.max_attempts).unwrap_or(1))
        .bind(if step.map { "map" } else { "single" })
        .execute(pool)
        .await?;
    }
    Ok(())
}

fn fail(message: String) -> TestCaseError {
    TestCaseError::fail(message)
}

/// Runs one case on a fresh database: plays worker through the SQL API until the run ends,
/// checking every delivered input against the model, then compares the end state.
async fn run_case(dag: &Dag) -> Result<(), TestCaseError> {
    let db = TestDatabase::new()
        .await
        .map_err(|e| fail(format!("db: {e}")))?;
    let pool = db.pool();
    let db_error = |e: sqlx::Error| fail(format!("database: {e}"));
    compile(pool, dag).await.map_err(db_error)?;
    let expected = model(dag);
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

    let mut idle = 0;
    loop {
        let status: String = sqlx::query_scalar("SELECT status FROM pgflow.runs WHERE run_id = $1")
            .bind(run)
            .fetch_one(pool)
            .await
            .map_err(db_error)?;
        if status != "started" {
            break;
        }
        let tasks: Vec<(String, i32, Value, i32)> = sqlx::query_as(
            "SELECT t.step_slug, t.task_index, t.input, st.attempts_count + 1 \
               FROM pgflow.start_tasks($1, ARRAY(SELECT msg_id FROM pgmq.read($1, 30, 100)), $2) t \
               JOIN pgflow.step_tasks st USING (run_id, step_slug, task_index)",
        )
        .bind(FLOW)
        .bind(worker)
        .fetch_all(pool)
        .await
        .map_err(db_error)?;
        if tasks.is_empty() {
            idle += 1;
            prop_assert!(idle < 50, "run {run} is started but no task can be started");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        }
        idle = 0;
        for (slug, index, input, attempt) in tasks {
            let i = dag
                .index(&slug)
                .ok_or_else(|| fail(format!("unknown step {slug}")))?;
            let want = expected.inputs.get(&(i, index)).ok_or_else(|| {
                fail(format!(
                    "task {slug}/{index} was delivered but the model never reaches it"
                ))
            })?;
            prop_assert_eq!(&input, want, "input of {}/{}", slug, index);
            match handle(&dag.steps[i], index, attempt, &input) {
                Ok(output) => {
                    sqlx::query("SELECT pgflow.complete_task($1, $2, $3, $4)")
                        .bind(run)
                        .bind(&slug)
                        .bind(index)
                        .bind(output)
                        .execute(pool)
                        .await
                        .map_err(db_error)?;
                }
                Err(message) => {
                    sqlx::query("SELECT pgflow.fail_task($1, $2, $3, $4)")
                        .bind(run)
                        .bind(&slug)
                        .bind(index)
                        .bind(message)
                        .execute(pool)
                        .await
                        .map_err(db_error)?;
                }
            }
        }
    }

    compare(pool, dag, &expected, run).await?;
    let violations = pgflow_client::check(pool)
        .await
        .map_err(|e| fail(format!("check: {e}")))?;
    prop_assert!(violations.is_empty(), "{:?}", violations);
    Ok(())
}

/// Compares the end state of `run` with the model's verdict.
async fn compare(
    pool: &PgPool,
    dag: &Dag,
    expected: &Expected,
    run: Uuid,
) -> Result<(), TestCaseError> {
    let db_error = |e: sqlx::Error| fail(format!("database: {e}"));
    let (status, output): (String, Option<Value>) =
        sqlx::query_as("SELECT status, output FROM pgflow.runs WHERE run_id = $1")
            .bind(run)
            .fetch_one(pool)
            .await
            .map_err(db_error)?;
    let states: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT step_slug, status, error_message FROM pgflow.step_states WHERE run_id = $1",
    )
    .bind(run)
    .fetch_all(pool)
    .await
    .map_err(db_error)?;
    let step_outputs: BTreeMap<String, Value> = sqlx::query_as::<_, (String, Value)>(
        "SELECT ss.step_slug, pgflow._step_output(ss.run_id, ss.step_slug, s.step_type) \
           FROM pgflow.step_states ss \
           JOIN pgflow.steps s USING (flow_slug, step_slug) \
          WHERE ss.run_id = $1 AND ss.status = 'completed'",
    )
    .bind(run)
    .fetch_all(pool)
    .await
    .map_err(db_error)?
    .into_iter()
    .collect();
    let attempts: Vec<(String, String, i32)> = sqlx::query_as(
        "SELECT step_slug, status, attempts_count FROM pgflow.step_tasks WHERE run_id = $1",
    )
    .bind(run)
    .fetch_all(pool)
    .await
    .map_err(db_error)?;

    // Every completed step has the model's output; completed tasks took fails + 1 attempts.
    for (slug, value) in &step_outputs {
        let i = dag.index(slug).unwrap_or_default();
        prop_assert_eq!(
            Some(value),
            expected.outputs[i].as_ref(),
            "output of {}",
            slug
        );
    }
    for (slug, task_status, count) in &attempts {
        let step = &dag.steps[dag.index(slug).unwrap_or_default()];
        if task_status == "completed" {
            prop_assert_eq!(
                u32::try_from(*count).unwrap_or(0),
                step.fails + 1,
                "attempts of a task of {}",
                slug
            );
        }
    }
    if expected.doomed.is_empty() {
        prop_assert_eq!(status.as_str(), "completed");
        prop_assert_eq!(output.as_ref(), expected.run_output.as_ref());
        prop_assert_eq!(step_outputs.len(), dag.steps.len(), "every step completed");
    } else {
        prop_assert_eq!(status.as_str(), "failed");
        prop_assert_eq!(output, None);
        let failed: Vec<&(String, String, Option<String>)> = states
            .iter()
            .filter(|(_, status, _)| status == "failed")
            .collect();
        prop_assert!(!failed.is_empty(), "a failed run has a failed step");
        for (slug, _, error) in failed {
            let i = dag.index(slug).unwrap_or_default();
            prop_assert!(
                expected.doomed.contains(&i),
                "step {} failed, model dooms {:?}",
                slug,
                expected.doomed
            );
            let step = &dag.steps[i];
            let error = error.as_deref().unwrap_or_default();
            if step.fails >= step.max_attempts {
                let planned = format!("planned failure of {}/", step.slug);
                let last = format!("on attempt {}", step.max_attempts);
                prop_assert!(
                    error.starts_with(&planned) && error.ends_with(&last),
                    "{}",
                    error
                );
            } else {
                prop_assert!(error.starts_with("[TYPE_VIOLATION]"), "{}", error);
            }
        }
    }
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
    let result = runner.run(&case(), |(raw, input_len)| {
        let dag = Dag::new(&raw, input_len);
        runtime.block_on(run_case(&dag))
    });
    if let Err(error) = result {
        panic!("{error}");
    }
}

#[test]
fn random_flows_behave_as_the_reference_model() {
    run_model(20);
}

#[test]
#[ignore = "long form: PGFLOW_MODEL_CASES cases (default 500)"]
fn random_flows_behave_as_the_reference_model_long() {
    run_model(u32::try_from(env_size("PGFLOW_MODEL_CASES", 500)).unwrap_or(500));
}

#[test]
fn the_model_itself_follows_the_spec_on_a_known_case() {
    // s0 root single → s1 map over s0 (2 elements) → s2 single on s1; s3 root map on the
    // input; s2 and s3 are the leaves.
    let raw = |map, root, parent_pick, dep_mask, array_len| RawStep {
        map,
        root,
        parent_pick,
        dep_mask,
        array_len,
        max_attempts: 1,
        fails: 0,
        non_array: false,
    };
    let dag = Dag::new(
        &[
            raw(false, false, 0, 0, 2),
            raw(true, false, 0, 0, 0),
            raw(false, false, 0, 0b10, 0),
            raw(true, true, 0, 0, 0),
        ],
        1,
    );
    let expected = model(&dag);
    let s0 = json!([{"from": "s0", "i": 0, "in": {"run": [0]}}, {"from": "s0", "i": 1, "in": {"run": [0]}}]);
    assert_eq!(expected.outputs[0], Some(s0.clone()));
    let s1 = json!([
        {"from": "s1", "i": 0, "el": s0[0]},
        {"from": "s1", "i": 1, "el": s0[1]},
    ]);
    assert_eq!(expected.outputs[1], Some(s1.clone()));
    let s2 = json!({"from": "s2", "in": {"run": [0], "s1": s1}});
    let s3 = json!([{"from": "s3", "i": 0, "el": 0}]);
    assert_eq!(expected.run_output, Some(json!({"s2": s2, "s3": s3})));
    assert!(expected.doomed.is_empty());
}

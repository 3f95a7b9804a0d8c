//! The retry policy of issue 19 (`max_delay`, `jitter`), end to end: a flow compiled by the
//! client, then its tasks failed through SQL (`pgflow.fail_task`), each delay read from its
//! message's visibility time in `pgmq.q_<flow>`; and the drift check on a changed policy.
//!
//! The engine's delay after failed attempt *n* is `base_delay` × 2^*n* (pgflow 0.8.1's
//! `calculate_retry_delay`), at most `max_delay`; with jitter, any whole number of seconds in
//! [⌈*d*/2⌉, *d*].

use std::collections::{BTreeMap, BTreeSet};

use pgflow_client::{Client, Compiled, Difference, Error, Replace};
use pgflow_core::{Flow, StepContext, StepError, step_fn};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{self, client};

/// The worker the tests start tasks as.
const WORKER: Uuid = Uuid::from_u128(0x19);

/// Registers [`WORKER`] for `flow`.
async fn register_worker(pool: &PgPool, flow: &str) {
    sqlx::query(
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) VALUES ($1, $2, 'tests') \
         ON CONFLICT (worker_id) DO NOTHING",
    )
    .bind(WORKER)
    .bind(flow)
    .execute(pool)
    .await
    .unwrap();
}

/// One task as `start_tasks` hands it out.
#[derive(Debug, sqlx::FromRow)]
struct Task {
    run_id: Uuid,
    step_slug: String,
    task_index: i32,
    msg_id: i64,
}

/// Makes every message of the flow visible, reads them and starts their tasks, as a worker's
/// poll does.
async fn poll(pool: &PgPool, flow: &str) -> Vec<Task> {
    sqlx::raw_sql(&format!("UPDATE pgmq.q_{flow} SET vt = clock_timestamp()"))
        .execute(pool)
        .await
        .unwrap();
    let msg_ids: Vec<i64> =
        sqlx::query_scalar("SELECT msg_id FROM pgmq.read($1, 30, 1000) ORDER BY msg_id")
            .bind(flow)
            .fetch_all(pool)
            .await
            .unwrap();
    let mut tasks: Vec<Task> = sqlx::query_as(
        "SELECT run_id, step_slug, task_index, msg_id FROM pgflow.start_tasks($1, $2, $3)",
    )
    .bind(flow)
    .bind(&msg_ids)
    .bind(WORKER)
    .fetch_all(pool)
    .await
    .unwrap();
    tasks.sort_by(|a, b| (&a.step_slug, a.task_index).cmp(&(&b.step_slug, b.task_index)));
    tasks
}

/// Fails `task` through SQL, as a worker reports an error; returns the task's status after it
/// (none for a task of a run that failed meanwhile) and the seconds until its message is
/// visible again (its retry delay, when `queued`).
async fn fail(pool: &PgPool, flow: &str, task: &Task) -> (Option<String>, i64) {
    let status: Option<String> = sqlx::query_scalar(
        "SELECT status FROM pgflow.fail_task($1, $2, $3, 'boom') WHERE step_slug = $2 AND task_index = $3",
    )
    .bind(task.run_id)
    .bind(&task.step_slug)
    .bind(task.task_index)
    .fetch_optional(pool)
    .await
    .unwrap();
    // Read at once: milliseconds after fail_task set it, so rounding gives the whole delay.
    let delay: Option<i64> = sqlx::query_scalar(&format!(
        "SELECT round(extract(epoch FROM vt - clock_timestamp()))::bigint \
           FROM pgmq.q_{flow} WHERE msg_id = $1"
    ))
    .bind(task.msg_id)
    .fetch_optional(pool)
    .await
    .unwrap();
    (status, delay.unwrap_or(-1))
}

/// Fails every task of the flow's one run, round after round, until none is left queued;
/// returns each task's delays, in the order of the attempts. The run fails with the first task
/// that runs out of attempts, which ends the others: a test gives its tasks as many attempts
/// as each other.
async fn fail_until_exhausted(pool: &PgPool, flow: &str) -> BTreeMap<(String, i32), Vec<i64>> {
    let mut delays: BTreeMap<(String, i32), Vec<i64>> = BTreeMap::new();
    loop {
        let tasks = poll(pool, flow).await;
        if tasks.is_empty() {
            return delays;
        }
        for task in tasks {
            let (status, delay) = fail(pool, flow, &task).await;
            if status.as_deref() == Some("queued") {
                delays
                    .entry((task.step_slug.clone(), task.task_index))
                    .or_default()
                    .push(delay);
            }
        }
    }
}

/// The step of `builder` with a handler that is never called: the tests fail its tasks
/// through SQL.
macro_rules! never_called {
    ($builder:expr) => {
        $builder.handler(|_: Value, _: StepContext| async move { Ok::<_, StepError>(0) })
    };
}

/// `pgflow.calculate_retry_delay(base_delay, n)` for attempts 1 to `attempts` - 1: pgflow
/// 0.8.1's delays.
async fn engine_backoff(pool: &PgPool, base_delay: i32, attempts: i32) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT pgflow.calculate_retry_delay($1, n)::bigint FROM generate_series(1, $2 - 1) n ORDER BY n",
    )
    .bind(base_delay)
    .bind(attempts)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn start(client: &Client, flow: &str, input: Value) -> Uuid {
    register_worker(client.pool(), flow).await;
    support::start(client.pool(), flow, input).await
}

#[tokio::test]
async fn max_delay_caps_the_backoff_at_flow_and_step_level() {
    let (_db, client) = client().await;
    let flow: Flow<Value> = Flow::new("capped")
        .base_delay(1)
        .max_delay(2)
        .max_attempts(6)
        .step(never_called!(step_fn("inherits")))
        .step(never_called!(step_fn("own").max_delay(5)))
        .build();
    assert_eq!(client.compile(&flow).await.unwrap(), Compiled::Created);
    let run = start(&client, "capped", json!({})).await;

    let delays = fail_until_exhausted(client.pool(), "capped").await;
    // Uncapped: 2, 4, 8, 16, 32 (the sixth attempt fails the task).
    assert_eq!(engine_backoff(client.pool(), 1, 6).await, [2, 4, 8, 16, 32]);
    assert_eq!(delays[&("inherits".into(), 0)], [2, 2, 2, 2, 2]);
    assert_eq!(delays[&("own".into(), 0)], [2, 4, 5, 5, 5]);
    assert_eq!(support::run(client.pool(), run).await.0, "failed");
}

#[tokio::test]
async fn a_cap_below_the_first_delay_makes_the_delay_constant() {
    let (_db, client) = client().await;
    let flow: Flow<Value> = Flow::new("steady")
        .max_attempts(4)
        .step(never_called!(step_fn("s").base_delay(30).max_delay(7)))
        .build();
    client.compile(&flow).await.unwrap();
    start(&client, "steady", json!({})).await;
    let delays = fail_until_exhausted(client.pool(), "steady").await;
    assert_eq!(delays[&("s".into(), 0)], [7, 7, 7]);
}

#[tokio::test]
async fn without_a_policy_the_delays_are_0_8_1s() {
    let (_db, client) = client().await;
    let flow: Flow<Value> = Flow::new("plain")
        .base_delay(1)
        .max_attempts(8)
        .step(never_called!(step_fn("a")))
        .step(never_called!(step_fn("b").base_delay(3)))
        .build();
    let sql = flow.to_sql().unwrap();
    assert!(!sql.contains("set_retry_policy"), "{sql}");
    client.compile(&flow).await.unwrap();
    let stored: (Option<i32>, bool) = sqlx::query_as(
        "SELECT opt_max_delay, opt_jitter FROM pgflow.flows WHERE flow_slug = 'plain'",
    )
    .fetch_one(client.pool())
    .await
    .unwrap();
    assert_eq!(stored, (None, false));
    let steps: Vec<(Option<i32>, Option<bool>)> = sqlx::query_as(
        "SELECT opt_max_delay, opt_jitter FROM pgflow.steps WHERE flow_slug = 'plain'",
    )
    .fetch_all(client.pool())
    .await
    .unwrap();
    assert_eq!(steps, [(None, None), (None, None)]);

    start(&client, "plain", json!({})).await;
    let delays = fail_until_exhausted(client.pool(), "plain").await;
    assert_eq!(delays[&("a".into(), 0)], [2, 4, 8, 16, 32, 64, 128]);
    assert_eq!(
        delays[&("a".into(), 0)],
        engine_backoff(client.pool(), 1, 8).await
    );
    assert_eq!(delays[&("b".into(), 0)], [6, 12, 24, 48, 96, 192, 384]);
}

#[tokio::test]
async fn jitter_draws_each_delay_from_its_upper_half() {
    const TASKS: usize = 40;
    let (_db, client) = client().await;
    let flow: Flow<Vec<u32>> = Flow::new("spread")
        .base_delay(1)
        .max_delay(16)
        .jitter(true)
        .max_attempts(6)
        .step(
            step_fn("each")
                .map_over_input()
                .handler(|n: u32, _: StepContext| async move { Ok::<_, StepError>(n) }),
        )
        .step(
            step_fn("exact")
                .jitter(false)
                .handler(|_: Vec<u32>, _: StepContext| async move { Ok::<_, StepError>(0) }),
        )
        .build();
    client.compile(&flow).await.unwrap();
    let elements: Vec<u32> = (0..u32::try_from(TASKS).unwrap()).collect();
    start(&client, "spread", json!(elements)).await;

    let delays = fail_until_exhausted(client.pool(), "spread").await;
    // Without jitter: 2, 4, 8, 16, 16 (capped).
    let backoff = [2, 4, 8, 16, 16];
    assert_eq!(delays[&("exact".into(), 0)], backoff);
    let mut seen: BTreeMap<i64, BTreeSet<i64>> = BTreeMap::new();
    let mut samples = 0;
    for task in 0..TASKS {
        let drawn = &delays[&("each".into(), i32::try_from(task).unwrap())];
        assert_eq!(drawn.len(), backoff.len(), "task {task}: {drawn:?}");
        for (&d, &jittered) in backoff.iter().zip(drawn) {
            assert!(
                (d + 1) / 2 <= jittered && jittered <= d,
                "task {task}: delay {jittered} outside [ceil({d}/2), {d}]: {drawn:?}"
            );
            seen.entry(d).or_default().insert(jittered);
            samples += 1;
        }
    }
    assert_eq!(samples, TASKS * backoff.len());
    // Spread indeed: over 80 draws from [8, 16] and 40 from [4, 8], more than one value each
    // (all the same by chance: less than 1 in 10^30).
    for d in [8, 16] {
        assert!(seen[&d].len() > 1, "no spread for {d}: {seen:?}");
    }
}

#[tokio::test]
async fn the_client_and_the_sql_text_store_the_same_policy() {
    let flow = || -> Flow<Value> {
        Flow::new("same")
            .max_delay(60)
            .step(never_called!(step_fn("a").jitter(true)))
            .step(never_called!(step_fn("b").max_delay(10).jitter(false)))
            .step(never_called!(step_fn("c")))
            .build()
    };
    let (_db, client) = client().await;
    // Applied as SQL text (a migration file), then compiled by the client: nothing differs.
    support::compile(client.pool(), &flow()).await;
    assert_eq!(client.compile(&flow()).await.unwrap(), Compiled::Unchanged);
    let stored = client.flow_shape("same").await.unwrap().unwrap();
    assert_eq!(
        (stored.options.max_delay, stored.options.jitter),
        (Some(60), None)
    );
    let steps: Vec<_> = stored
        .steps
        .iter()
        .map(|s| (s.options.max_delay, s.options.jitter))
        .collect();
    assert_eq!(
        steps,
        [(None, Some(true)), (Some(10), Some(false)), (None, None)]
    );
    assert!(pgflow_client::differences(&stored, flow().shape()).is_empty());
}

#[tokio::test]
async fn a_changed_retry_policy_is_drift() {
    let (_db, client) = client().await;
    let flow = |cap: u32, jitter: bool| -> Flow<Value> {
        Flow::new("drift")
            .max_delay(cap)
            .step(never_called!(step_fn("s").jitter(jitter)))
            .build()
    };
    assert_eq!(
        client.compile(&flow(2, true)).await.unwrap(),
        Compiled::Created
    );
    assert_eq!(
        client.compile(&flow(2, true)).await.unwrap(),
        Compiled::Unchanged
    );

    let Err(Error::FlowDrift { differences, .. }) = client.compile(&flow(3, false)).await else {
        panic!("a changed policy must be drift");
    };
    assert_eq!(
        differences,
        [
            Difference::OptionChanged {
                step: None,
                option: "max_delay",
                stored: Some(2),
                compiled: Some(3),
            },
            Difference::FlagChanged {
                step: Some("s".into()),
                option: "jitter",
                stored: Some(true),
                compiled: Some(false),
            },
        ]
    );

    // Turning the flow's jitter on, and dropping the cap, is drift too.
    let on: Flow<Value> = Flow::new("drift")
        .jitter(true)
        .step(never_called!(step_fn("s").jitter(true)))
        .build();
    let Err(Error::FlowDrift { differences, .. }) = client.compile(&on).await else {
        panic!("a changed policy must be drift");
    };
    let text: Vec<String> = differences.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "flow option max_delay is unset instead of 2",
            "flow option jitter is true instead of false",
        ]
    );

    // Replaced, the new policy is the stored one.
    assert_eq!(
        client
            .compile_replacing(&flow(3, false), Replace::IfNoRuns)
            .await
            .unwrap(),
        Compiled::Replaced { deleted_runs: 0 }
    );
    let stored: (Option<i32>, bool, Option<bool>) = sqlx::query_as(
        "SELECT f.opt_max_delay, f.opt_jitter, s.opt_jitter FROM pgflow.flows f \
           JOIN pgflow.steps s USING (flow_slug) WHERE flow_slug = 'drift'",
    )
    .fetch_one(client.pool())
    .await
    .unwrap();
    assert_eq!(stored, (Some(3), false, Some(false)));
    assert_eq!(
        client.compile(&flow(3, false)).await.unwrap(),
        Compiled::Unchanged
    );
}

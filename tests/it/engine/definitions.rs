//! Definitions: slugs, create_flow, add_step, the shape of the schema.

use serde_json::json;

use super::Engine;

#[tokio::test]
async fn is_valid_slug_follows_the_rules() {
    let engine = Engine::new().await;
    let cases = [
        ("ok_slug", true),
        ("_x9", true),
        ("CamelCase", true),
        ("", false),
        ("1starts_with_digit", false),
        ("has-dash", false),
        ("has space", false),
        ("run", false),
        ("Run", true),
    ];
    for (slug, expected) in cases {
        let valid: bool = sqlx::query_scalar("SELECT pgflow.is_valid_slug($1)")
            .bind(slug)
            .fetch_one(engine.pool())
            .await
            .unwrap();
        assert_eq!(valid, expected, "is_valid_slug({slug:?})");
    }
    assert!(
        !engine
            .scalar::<bool>("SELECT pgflow.is_valid_slug(NULL)")
            .await
    );
    assert!(
        engine
            .scalar::<bool>(&format!(
                "SELECT pgflow.is_valid_slug('{}')",
                "a".repeat(128)
            ))
            .await
    );
    assert!(
        !engine
            .scalar::<bool>(&format!(
                "SELECT pgflow.is_valid_slug('{}')",
                "a".repeat(129)
            ))
            .await
    );
}

#[tokio::test]
async fn calculate_retry_delay_doubles_per_attempt() {
    let engine = Engine::new().await;
    let delays: Vec<i32> = sqlx::query_scalar(
        "SELECT pgflow.calculate_retry_delay(base_delay => 5, attempts_count => n) FROM generate_series(0, 4) n",
    )
    .fetch_all(engine.pool())
    .await
    .unwrap();
    assert_eq!(delays, vec![5, 10, 20, 40, 80]);
    assert_eq!(
        engine
            .scalar::<i32>("SELECT pgflow.calculate_retry_delay(1.5, 1)")
            .await,
        3
    );
    assert_eq!(
        engine
            .scalar::<i32>("SELECT pgflow.calculate_retry_delay(0.7, 0)")
            .await,
        0
    );
}

#[tokio::test]
async fn create_flow_uses_its_defaults_creates_the_queue_and_is_idempotent() {
    let engine = Engine::new().await;
    let first: (String, i32, i32, i32) = sqlx::query_as(
        "SELECT flow_slug, opt_max_attempts, opt_base_delay, opt_timeout FROM pgflow.create_flow('orders')",
    )
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!(first, ("orders".into(), 3, 5, 60));
    assert!(
        engine
            .scalar::<bool>("SELECT to_regclass('pgmq.q_orders') IS NOT NULL")
            .await
    );
    assert!(
        engine
            .scalar::<bool>("SELECT to_regclass('pgmq.a_orders') IS NOT NULL")
            .await
    );

    // A second call with other options returns the existing row unchanged.
    let again: (String, i32, i32, i32) = sqlx::query_as(
        "SELECT flow_slug, opt_max_attempts, opt_base_delay, opt_timeout \
         FROM pgflow.create_flow(flow_slug => 'orders', max_attempts => 9, base_delay => 9, timeout => 9)",
    )
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!(again, first);
    assert_eq!(
        engine
            .scalar::<i64>("SELECT count(*) FROM pgflow.flows")
            .await,
        1
    );
    assert_eq!(
        engine
            .scalar::<i64>("SELECT count(*) FROM pgmq.list_queues() WHERE queue_name = 'orders'")
            .await,
        1
    );

    // The table's own defaults differ from create_flow's (base delay 1).
    engine
        .exec("INSERT INTO pgflow.flows (flow_slug) VALUES ('raw')")
        .await;
    let raw: (i32, i32, i32) = sqlx::query_as(
        "SELECT opt_max_attempts, opt_base_delay, opt_timeout FROM pgflow.flows WHERE flow_slug = 'raw'",
    )
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!(raw, (3, 1, 60));
}

#[tokio::test]
async fn create_flow_rejects_invalid_slugs_and_options_by_constraint_name() {
    let engine = Engine::new().await;
    assert!(
        engine
            .error("SELECT pgflow.create_flow('bad-slug')")
            .await
            .contains("slug_is_valid")
    );
    assert!(
        engine
            .error("SELECT pgflow.create_flow('run')")
            .await
            .contains("slug_is_valid")
    );
    assert!(
        engine
            .error("SELECT pgflow.create_flow('f', max_attempts => -1)")
            .await
            .contains("opt_max_attempts_is_nonnegative")
    );
    assert!(
        engine
            .error("SELECT pgflow.create_flow('f', base_delay => -1)")
            .await
            .contains("opt_base_delay_is_nonnegative")
    );
    assert!(
        engine
            .error("SELECT pgflow.create_flow('f', timeout => 0)")
            .await
            .contains("opt_timeout_is_positive")
    );
    assert_eq!(
        engine
            .scalar::<i64>("SELECT count(*) FROM pgflow.flows")
            .await,
        0
    );
}

#[tokio::test]
async fn add_step_numbers_steps_counts_deps_and_is_idempotent() {
    let engine = Engine::new().await;
    engine.exec("SELECT pgflow.create_flow('f')").await;
    // The eight arguments, positionally, in the documented order.
    type StepRow = (
        String,
        String,
        i32,
        i32,
        Option<i32>,
        Option<i32>,
        Option<i32>,
        Option<i32>,
    );
    let step: StepRow = sqlx::query_as(
        "SELECT step_slug, step_type, step_index, deps_count, opt_max_attempts, opt_base_delay, opt_timeout, opt_start_delay \
         FROM pgflow.add_step('f', 'first', '{}', 1, 2, 3, 4, 'single')",
    )
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!(
        step,
        (
            "first".into(),
            "single".into(),
            0,
            0,
            Some(1),
            Some(2),
            Some(3),
            Some(4)
        )
    );
    engine.exec("SELECT pgflow.add_step('f', 'second')").await;
    let third: (i32, i32) = sqlx::query_as(
        "SELECT step_index, deps_count FROM pgflow.add_step('f', 'third', ARRAY['first', 'second'])",
    )
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!(third, (2, 2));
    let map: (String, i32, i32) = sqlx::query_as(
        "SELECT step_type, step_index, deps_count FROM pgflow.add_step('f', 'each', ARRAY['third'], step_type => 'map')",
    )
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!(map, ("map".into(), 3, 1));

    // Again, with other arguments: the existing row, nothing added.
    let again: (i32, i32, Option<i32>) = sqlx::query_as(
        "SELECT step_index, deps_count, opt_max_attempts FROM pgflow.add_step('f', 'third', ARRAY['first'], 9)",
    )
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!(again, (2, 2, None));
    assert_eq!(
        engine
            .scalar::<i64>("SELECT count(*) FROM pgflow.steps")
            .await,
        4
    );
    assert_eq!(
        engine
            .scalar::<i64>("SELECT count(*) FROM pgflow.deps")
            .await,
        3
    );
    let deps: Vec<(String, String)> =
        sqlx::query_as("SELECT dep_slug, step_slug FROM pgflow.deps ORDER BY 1, 2")
            .fetch_all(engine.pool())
            .await
            .unwrap();
    assert_eq!(
        deps,
        vec![
            ("first".into(), "third".into()),
            ("second".into(), "third".into()),
            ("third".into(), "each".into())
        ]
    );
}

#[tokio::test]
async fn a_map_step_with_two_deps_is_refused() {
    let engine = Engine::new().await;
    engine
        .flow("f", &[("a", &[], "single"), ("b", &[], "single")])
        .await;
    let message = engine
        .error("SELECT pgflow.add_step('f', 'm', ARRAY['a', 'b'], step_type => 'map')")
        .await;
    assert_eq!(
        message,
        r#"Map step "m" can have at most one dependency, but 2 were provided: a, b"#
    );
    assert_eq!(
        engine
            .scalar::<i64>("SELECT count(*) FROM pgflow.steps")
            .await,
        2
    );
}

#[tokio::test]
async fn add_step_rejects_unknown_flows_unknown_deps_bad_slugs_and_options() {
    let engine = Engine::new().await;
    engine.flow("f", &[("a", &[], "single")]).await;
    let cases = [
        (
            "SELECT pgflow.add_step('nope', 'x')",
            "steps_flow_slug_fkey",
        ),
        (
            "SELECT pgflow.add_step('f', 'x', ARRAY['missing'])",
            "deps_flow_slug_dep_slug_fkey",
        ),
        (
            "SELECT pgflow.add_step('f', 'bad-slug')",
            "steps_step_slug_check",
        ),
        (
            "SELECT pgflow.add_step('f', 'run')",
            "steps_step_slug_check",
        ),
        (
            "SELECT pgflow.add_step('f', 'x', step_type => 'loop')",
            "steps_step_type_check",
        ),
        (
            "SELECT pgflow.add_step('f', 'x', max_attempts => -1)",
            "opt_max_attempts_is_nonnegative",
        ),
        (
            "SELECT pgflow.add_step('f', 'x', base_delay => -1)",
            "opt_base_delay_is_nonnegative",
        ),
        (
            "SELECT pgflow.add_step('f', 'x', timeout => 0)",
            "opt_timeout_is_positive",
        ),
        (
            "SELECT pgflow.add_step('f', 'x', start_delay => -1)",
            "opt_start_delay_is_nonnegative",
        ),
        (
            "INSERT INTO pgflow.steps (flow_slug, step_slug, step_index) VALUES ('f', 'dup', 0)",
            "steps_flow_slug_step_index_key",
        ),
        (
            "INSERT INTO pgflow.deps (flow_slug, dep_slug, step_slug) VALUES ('f', 'a', 'a')",
            "deps_check",
        ),
    ];
    for (sql, constraint) in cases {
        let message = engine.error(sql).await;
        assert!(message.contains(constraint), "{sql}: {message}");
    }
    assert_eq!(
        engine
            .scalar::<i64>("SELECT count(*) FROM pgflow.steps")
            .await,
        1
    );
}

#[tokio::test]
async fn step_state_constraints_have_their_names() {
    let engine = Engine::new().await;
    engine.flow("f", &[("a", &[], "single")]).await;
    let run = engine.start("f", json!({})).await;
    let started_without_tasks = engine
        .error(&format!(
            "UPDATE pgflow.step_states SET initial_tasks = NULL WHERE run_id = '{run}'"
        ))
        .await;
    assert!(started_without_tasks.contains("initial_tasks_known_when_started"));

    engine
        .flow("g", &[("a", &[], "single"), ("b", &["a"], "single")])
        .await;
    let run = engine.start("g", json!({})).await;
    let created_with_tasks = engine
        .error(&format!(
            "UPDATE pgflow.step_states SET remaining_tasks = 1 WHERE run_id = '{run}' AND step_slug = 'b'"
        ))
        .await;
    assert!(created_with_tasks.contains("remaining_tasks_state_consistency"));
}

#[tokio::test]
async fn the_schema_has_seven_tables_and_the_setup_guide_queries_work() {
    let engine = Engine::new().await;
    assert_eq!(
        engine
            .scalar::<i64>("SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'pgflow'")
            .await,
        7
    );
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'pgflow' ORDER BY 1",
    )
    .fetch_all(engine.pool())
    .await
    .unwrap();
    assert_eq!(
        tables,
        [
            "deps",
            "flows",
            "runs",
            "step_states",
            "step_tasks",
            "steps",
            "workers"
        ]
    );
    assert!(
        engine
            .scalar::<i64>(
                "SELECT COUNT(*) FROM pg_proc p JOIN pg_namespace n ON p.pronamespace = n.oid \
                 WHERE n.nspname = 'pgflow'"
            )
            .await
            >= 14
    );

    // One completed run, one failed, one still going.
    engine
        .exec("SELECT pgflow.create_flow('f', max_attempts => 0)")
        .await;
    engine.exec("SELECT pgflow.add_step('f', 'a')").await;
    let done = engine.start("f", json!(1)).await;
    let failed = engine.start("f", json!(2)).await;
    let _running = engine.start("f", json!(3)).await;
    for task in engine.poll("f").await {
        if task.run_id == done {
            engine.complete(&task, json!("ok")).await;
        } else if task.run_id == failed {
            engine.fail(&task, "broken").await;
        }
    }

    let started: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT flow_slug, status, COUNT(*) FROM pgflow.runs WHERE status = 'started' GROUP BY flow_slug, status",
    )
    .fetch_all(engine.pool())
    .await
    .unwrap();
    assert_eq!(started, vec![("f".into(), "started".into(), 1)]);

    let failures: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT r.flow_slug, ss.step_slug, st.error_message FROM pgflow.step_tasks st \
           JOIN pgflow.runs r ON st.run_id = r.run_id \
           JOIN pgflow.step_states ss ON st.run_id = ss.run_id AND st.step_slug = ss.step_slug \
          WHERE st.status = 'failed'",
    )
    .fetch_all(engine.pool())
    .await
    .unwrap();
    assert_eq!(
        failures,
        vec![("f".into(), "a".into(), Some("broken".into()))]
    );

    let durations: Vec<(String, Option<f64>)> = sqlx::query_as(
        "SELECT flow_slug, AVG(EXTRACT(EPOCH FROM (completed_at - started_at)))::float8 FROM pgflow.runs \
          WHERE status = 'completed' GROUP BY flow_slug",
    )
    .fetch_all(engine.pool())
    .await
    .unwrap();
    assert_eq!(durations.len(), 1);
    assert_eq!(durations[0].0, "f");
    assert!(durations[0].1.unwrap() >= 0.0);
}

#[tokio::test]
async fn the_schema_is_closed_to_public_and_functions_pin_their_search_path() {
    let engine = Engine::new().await;
    assert!(
        !engine
            .scalar::<bool>("SELECT has_schema_privilege('public', 'pgflow', 'USAGE')")
            .await
    );
    let executable_by_public: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
          WHERE n.nspname = 'pgflow' AND has_function_privilege('public', p.oid, 'EXECUTE') \
          ORDER BY 1",
    )
    .fetch_all(engine.pool())
    .await
    .unwrap();
    assert_eq!(executable_by_public, Vec::<String>::new());
    let unpinned: Vec<String> = sqlx::query_scalar(
        "SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
          WHERE n.nspname = 'pgflow' \
            AND NOT coalesce('search_path=\"\"' = ANY(p.proconfig), false)",
    )
    .fetch_all(engine.pool())
    .await
    .unwrap();
    assert_eq!(unpinned, Vec::<String>::new());
}

#[tokio::test]
async fn workers_can_register_with_on_conflict_and_heartbeat() {
    let engine = Engine::new().await;
    let id = uuid::Uuid::new_v4();
    for _ in 0..2 {
        sqlx::query(
            "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) VALUES ($1, 'q', 'fn') \
             ON CONFLICT (worker_id) DO UPDATE SET last_heartbeat_at = now()",
        )
        .bind(id)
        .execute(engine.pool())
        .await
        .unwrap();
    }
    let (deprecated, fresh): (bool, bool) = sqlx::query_as(
        "SELECT deprecated_at IS NULL, started_at <= last_heartbeat_at FROM pgflow.workers WHERE worker_id = $1",
    )
    .bind(id)
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert!(deprecated && fresh);
}

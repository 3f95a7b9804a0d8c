//! Flow shapes (migration 0011, upstream pgflow 0.10-0.14): `_get_flow_shape`,
//! `_compare_flow_shapes`, `_create_flow_from_shape`, `ensure_flow_compiled` and
//! `delete_flow_and_data`, through SQL alone.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

use super::Engine;

/// A flow with a root step, a conditional step that cascades, a step with two dependencies
/// that skips when its attempts run out, and a map with a forbidden pattern.
async fn conditional_flow(engine: &Engine, slug: &str) {
    engine
        .exec(&format!(
            "SELECT pgflow.create_flow('{slug}', timeout => 30);
             SELECT pgflow.add_step('{slug}', 'fetch');
             SELECT pgflow.add_step('{slug}', 'check', ARRAY['fetch'],
                                    required_input_pattern => '{{\"fetch\": {{\"ok\": true}}}}',
                                    when_unmet => 'skip-cascade');
             SELECT pgflow.add_step('{slug}', 'merge', ARRAY['fetch', 'check'],
                                    max_attempts => 2, when_exhausted => 'skip');
             SELECT pgflow.add_step('{slug}', 'each', ARRAY['fetch'], step_type => 'map',
                                    forbidden_input_pattern => '{{\"x\": 1}}');"
        ))
        .await;
}

fn unset() -> Value {
    json!({"defined": false})
}

/// The shape of [`conditional_flow`], as upstream's `_get_flow_shape` writes it.
fn conditional_shape() -> Value {
    json!({"steps": [
        {"slug": "fetch", "stepType": "single", "dependencies": [],
         "whenUnmet": "skip", "whenExhausted": "fail",
         "requiredInputPattern": unset(), "forbiddenInputPattern": unset()},
        {"slug": "check", "stepType": "single", "dependencies": ["fetch"],
         "whenUnmet": "skip-cascade", "whenExhausted": "fail",
         "requiredInputPattern": {"defined": true, "value": {"fetch": {"ok": true}}},
         "forbiddenInputPattern": unset()},
        {"slug": "merge", "stepType": "single", "dependencies": ["check", "fetch"],
         "whenUnmet": "skip", "whenExhausted": "skip",
         "requiredInputPattern": unset(), "forbiddenInputPattern": unset()},
        {"slug": "each", "stepType": "map", "dependencies": ["fetch"],
         "whenUnmet": "skip", "whenExhausted": "fail",
         "requiredInputPattern": unset(),
         "forbiddenInputPattern": {"defined": true, "value": {"x": 1}}},
    ]})
}

async fn shape_of(engine: &Engine, slug: &str) -> Value {
    sqlx::query_scalar("SELECT pgflow._get_flow_shape($1)")
        .bind(slug)
        .fetch_one(engine.pool())
        .await
        .unwrap()
}

async fn compare(engine: &Engine, local: &Value, db: &Value) -> Vec<String> {
    sqlx::query_scalar("SELECT pgflow._compare_flow_shapes($1, $2)")
        .bind(local)
        .bind(db)
        .fetch_one(engine.pool())
        .await
        .unwrap()
}

/// `(SQLSTATE, message)` of a call with one JSON argument that must fail.
async fn refused_with(engine: &Engine, sql: &str, arg: &Value) -> (String, String) {
    let err = sqlx::query(sql)
        .bind(arg)
        .execute(engine.pool())
        .await
        .expect_err(sql);
    let db = err.as_database_error().expect("a database error");
    (
        db.code().unwrap_or_default().to_string(),
        db.message().to_string(),
    )
}

async fn ensure(engine: &Engine, slug: &str, shape: &Value, allow_data_loss: bool) -> Value {
    sqlx::query_scalar("SELECT pgflow.ensure_flow_compiled($1, $2, allow_data_loss => $3)")
        .bind(slug)
        .bind(shape)
        .bind(allow_data_loss)
        .fetch_one(engine.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_flows_shape_has_upstreams_keys_with_conditions_and_maps() {
    let engine = Engine::new().await;
    conditional_flow(&engine, "shaped").await;
    assert_eq!(shape_of(&engine, "shaped").await, conditional_shape());
    // No flow, no steps (upstream's answer too), and a slug differing in case is another flow.
    assert_eq!(shape_of(&engine, "nothing").await, json!({"steps": []}));
    assert_eq!(shape_of(&engine, "SHAPED").await, json!({"steps": []}));
}

#[tokio::test]
async fn the_functions_have_upstreams_signatures() {
    let engine = Engine::new().await;
    let signatures: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT s.sig, pg_get_function_identity_arguments(to_regprocedure(s.sig)),
                pg_get_function_result(to_regprocedure(s.sig))
           FROM unnest(ARRAY['pgflow._get_flow_shape(text)',
                             'pgflow._compare_flow_shapes(jsonb, jsonb)',
                             'pgflow._create_flow_from_shape(text, jsonb)',
                             'pgflow.ensure_flow_compiled(text, jsonb)',
                             'pgflow.ensure_flow_compiled(text, jsonb, boolean)',
                             'pgflow.delete_flow_and_data(text)']) WITH ORDINALITY AS s(sig, n)
          ORDER BY s.n",
    )
    .fetch_all(engine.pool())
    .await
    .unwrap();
    let got: Vec<(&str, &str)> = signatures
        .iter()
        .map(|(_, args, result)| (args.as_str(), result.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("p_flow_slug text", "jsonb"),
            ("p_local jsonb, p_db jsonb", "text[]"),
            ("p_flow_slug text, p_shape jsonb", "void"),
            ("flow_slug text, shape jsonb", "jsonb"),
            (
                "flow_slug text, shape jsonb, allow_data_loss boolean",
                "jsonb"
            ),
            ("p_flow_slug text", "void"),
        ]
    );
}

#[tokio::test]
async fn comparing_shapes_names_each_difference_in_upstreams_words() {
    let engine = Engine::new().await;
    conditional_flow(&engine, "shaped").await;
    let db = shape_of(&engine, "shaped").await;
    assert!(compare(&engine, &db, &db).await.is_empty());

    let changed = |edit: &dyn Fn(&mut Value)| {
        let mut local = db.clone();
        edit(&mut local);
        local
    };
    let cases: Vec<(Value, Vec<&str>)> = vec![
        (
            changed(&|s| {
                s["steps"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"slug": "extra"}))
            }),
            vec![
                "Step count differs: 5 vs 4",
                "Step at index 4: missing in second shape (first has 'extra')",
            ],
        ),
        (
            changed(&|s| {
                s["steps"].as_array_mut().unwrap().truncate(3);
            }),
            vec![
                "Step count differs: 3 vs 4",
                "Step at index 3: missing in first shape (second has 'each')",
            ],
        ),
        (
            changed(&|s| s["steps"][0]["slug"] = json!("download")),
            vec!["Step at index 0: slug differs 'download' vs 'fetch'"],
        ),
        (
            changed(&|s| s["steps"][3]["stepType"] = json!("single")),
            vec!["Step at index 3: type differs 'single' vs 'map'"],
        ),
        (
            changed(&|s| s["steps"][2]["dependencies"] = json!(["fetch"])),
            vec!["Step at index 2: dependencies differ [fetch] vs [check, fetch]"],
        ),
        (
            changed(&|s| s["steps"][1]["whenUnmet"] = json!("fail")),
            vec!["Step at index 1: whenUnmet differs 'fail' vs 'skip-cascade'"],
        ),
        (
            changed(&|s| s["steps"][2]["whenExhausted"] = json!("skip-cascade")),
            vec!["Step at index 2: whenExhausted differs 'skip-cascade' vs 'skip'"],
        ),
        (
            changed(&|s| s["steps"][1]["requiredInputPattern"] = unset()),
            vec![
                "Step at index 1: requiredInputPattern differs '{\"defined\": false}' vs \
                 '{\"value\": {\"fetch\": {\"ok\": true}}, \"defined\": true}'",
            ],
        ),
        (
            changed(&|s| {
                s["steps"][3]["forbiddenInputPattern"] = json!({"defined": true, "value": {"x": 2}})
            }),
            vec![
                "Step at index 3: forbiddenInputPattern differs \
                 '{\"value\": {\"x\": 2}, \"defined\": true}' vs \
                 '{\"value\": {\"x\": 1}, \"defined\": true}'",
            ],
        ),
    ];
    for (local, expected) in cases {
        assert_eq!(compare(&engine, &local, &db).await, expected, "{local}");
    }

    // Not differences: dependencies in another order, options (tunable in place), keys left
    // out (a worker older than conditions) where the flow has their defaults, and a value
    // beside "defined": false.
    let same = changed(&|s| {
        s["steps"][2]["dependencies"] = json!(["fetch", "check"]);
        s["options"] = json!({"timeout": 5});
        s["steps"][0] = json!({"slug": "fetch", "options": {"maxAttempts": 9}});
        s["steps"][2]["requiredInputPattern"] = json!({"defined": false, "value": {"y": 1}});
    });
    assert!(compare(&engine, &same, &db).await.is_empty());
    // A flow without conditions matches the shape of a worker that never heard of them.
    engine
        .exec("SELECT pgflow.create_flow('plain'); SELECT pgflow.add_step('plain', 'a');")
        .await;
    let old_worker = json!({"steps": [{"slug": "a", "stepType": "single", "dependencies": []}]});
    assert!(
        compare(&engine, &old_worker, &shape_of(&engine, "plain").await)
            .await
            .is_empty()
    );

    // What is not a shape is refused, naming where.
    for (shape, says) in [
        (json!([]), "the first shape must be a JSON object"),
        (json!({"steps": {}}), "\"steps\" must be an array"),
        (
            json!({"steps": [{"stepType": "map"}]}),
            "step at index 0 of the first shape must be an object with a string \"slug\"",
        ),
        (
            json!({"steps": [{"slug": "a", "dependencies": "b"}]}),
            "\"dependencies\" must be an array of step slugs",
        ),
        (
            json!({"steps": [{"slug": "a", "whenUnmet": 1}]}),
            "\"whenUnmet\" must be a string",
        ),
        (
            json!({"steps": [{"slug": "a", "requiredInputPattern": {"value": {}}}]}),
            "must be {\"defined\": false} or {\"defined\": true, \"value\": {...}}",
        ),
        (
            json!({"steps": [{"slug": "a", "forbiddenInputPattern": {"defined": true}}]}),
            "is defined, so its \"value\" must be a JSON object",
        ),
    ] {
        let (code, message) = refused_with(
            &engine,
            "SELECT pgflow._compare_flow_shapes($1, '{\"steps\": []}')",
            &shape,
        )
        .await;
        assert_eq!(code, "22023", "{message}");
        assert!(message.contains(says), "{message}; expected: {says}");
    }
}

#[tokio::test]
async fn a_shape_creates_the_flow_it_describes() {
    let engine = Engine::new().await;
    let mut shape = conditional_shape();
    shape["options"] = json!({"maxAttempts": 4, "timeout": 45, "maxDelay": 600, "jitter": true});
    shape["steps"][2]["options"] =
        json!({"maxAttempts": 2, "baseDelay": 3, "timeout": 9, "startDelay": 4, "jitter": false});
    sqlx::query("SELECT pgflow._create_flow_from_shape('copy', $1)")
        .bind(&shape)
        .execute(engine.pool())
        .await
        .unwrap();

    // The same shape back, options aside; the flow from SQL statements has it too.
    assert_eq!(shape_of(&engine, "copy").await, conditional_shape());
    conditional_flow(&engine, "original").await;
    assert!(
        compare(&engine, &shape, &shape_of(&engine, "original").await)
            .await
            .is_empty()
    );

    // Options as given, create_flow's default where left out, the retry policy applied.
    let flow: (i32, i32, i32, Option<i32>, bool) = sqlx::query_as(
        "SELECT opt_max_attempts, opt_base_delay, opt_timeout, opt_max_delay, opt_jitter \
           FROM pgflow.flows WHERE flow_slug = 'copy'",
    )
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!(flow, (4, 5, 45, Some(600), true));
    type StepOptions = (
        Option<i32>,
        Option<i32>,
        Option<i32>,
        Option<i32>,
        Option<bool>,
    );
    let steps: Vec<(String, StepOptions)> = sqlx::query_as::<_, (String, Option<i32>, Option<i32>, Option<i32>, Option<i32>, Option<bool>)>(
        "SELECT step_slug, opt_max_attempts, opt_base_delay, opt_timeout, opt_start_delay, opt_jitter \
           FROM pgflow.steps WHERE flow_slug = 'copy' ORDER BY step_index",
    )
    .fetch_all(engine.pool())
    .await
    .unwrap()
    .into_iter()
    .map(|(slug, a, b, c, d, e)| (slug, (a, b, c, d, e)))
    .collect();
    assert_eq!(steps[0], ("fetch".into(), (None, None, None, None, None)));
    assert_eq!(
        steps[2],
        (
            "merge".into(),
            (Some(2), Some(3), Some(9), Some(4), Some(false))
        )
    );
    // It runs: the queue and its functions exist.
    let queue: bool = engine
        .scalar("SELECT EXISTS (SELECT 1 FROM pgmq.list_queues() WHERE queue_name = 'copy')")
        .await;
    assert!(queue);

    // A bad shape is refused whole, before anything is written.
    for (bad, says) in [
        (
            json!({"steps": [{"slug": "a"}, {"slug": "b", "stepType": "loop"}]}),
            "\"stepType\" must be \"single\" or \"map\", got \"loop\"",
        ),
        (
            json!({"steps": [{"slug": "a", "whenExhausted": "retry"}]}),
            "\"whenExhausted\" must be \"fail\", \"skip\" or \"skip-cascade\", got \"retry\"",
        ),
        (
            json!({"steps": [], "options": {"timout": 5}}),
            "unknown option(s) timout",
        ),
        (
            json!({"steps": [{"slug": "a", "options": {"timeout": 2.5}}]}),
            "option \"timeout\" must be a whole number",
        ),
        (
            json!({"steps": [{"slug": "a", "options": {"jitter": "yes"}}]}),
            "option \"jitter\" must be true or false",
        ),
        (
            json!({"steps": [], "options": {"startDelay": 1}}),
            "unknown option(s) startDelay",
        ),
    ] {
        let (code, message) = refused_with(
            &engine,
            "SELECT pgflow._create_flow_from_shape('bad', $1)",
            &bad,
        )
        .await;
        assert_eq!(code, "22023", "{message}");
        assert!(message.contains(says), "{message}; expected: {says}");
        let flows: i64 = engine
            .scalar("SELECT count(*) FROM pgflow.flows WHERE flow_slug = 'bad'")
            .await;
        assert_eq!(flows, 0, "{bad}");
    }
    // The engine's own bounds still hold.
    let (_, message) = refused_with(
        &engine,
        "SELECT pgflow._create_flow_from_shape('bad', $1)",
        &json!({"steps": [{"slug": "a", "options": {"maxAttempts": 1000}}]}),
    )
    .await;
    assert!(
        message.contains("Option max_attempts of step \"a\" of flow \"bad\" is 1000"),
        "{message}"
    );
}

#[tokio::test]
async fn ensure_flow_compiled_compiles_verifies_reports_a_mismatch_and_recompiles_on_request() {
    let engine = Engine::new().await;
    let mut shape = conditional_shape();
    shape["options"] = json!({"timeout": 45});
    assert_eq!(
        ensure(&engine, "deploy", &shape, false).await,
        json!({"status": "compiled", "differences": []})
    );
    assert_eq!(shape_of(&engine, "deploy").await, conditional_shape());
    // Options are not compared: tuned in place, the flow is still verified.
    engine
        .exec("UPDATE pgflow.flows SET opt_timeout = 99 WHERE flow_slug = 'deploy'")
        .await;
    assert_eq!(
        ensure(&engine, "deploy", &conditional_shape(), false).await,
        json!({"status": "verified", "differences": []})
    );

    // A changed flow with runs: upstream's two arguments report it and change nothing.
    let run = engine.start("deploy", json!({"id": 1})).await;
    engine
        .exec(&format!(
            "CREATE ROLE deploy_worker_{0}; SELECT pgflow.grant_flow_to_worker('deploy', 'deploy_worker_{0}');
             SELECT pgflow.define_schedule('nightly_{0}', 'deploy', '0 3 * * *');",
            run.simple()
        ))
        .await;
    let mut changed = conditional_shape();
    changed["steps"][3]["stepType"] = json!("single");
    let two_args: Value = sqlx::query_scalar("SELECT pgflow.ensure_flow_compiled($1, $2)")
        .bind("deploy")
        .bind(&changed)
        .fetch_one(engine.pool())
        .await
        .unwrap();
    assert_eq!(
        two_args,
        json!({"status": "mismatch",
               "differences": ["Step at index 3: type differs 'single' vs 'map'"]})
    );
    assert_eq!(engine.run(run).await.0, "started");
    assert_eq!(shape_of(&engine, "deploy").await, conditional_shape());

    // Allowed to lose data: the flow is created again from the shape, its runs are gone,
    // and its queue (emptied, with the worker role's grant) and schedule stay.
    assert_eq!(
        ensure(&engine, "deploy", &changed, true).await,
        json!({"status": "recompiled",
               "differences": ["Step at index 3: type differs 'single' vs 'map'"]})
    );
    assert_eq!(shape_of(&engine, "deploy").await, changed);
    let runs: i64 = engine.scalar("SELECT count(*) FROM pgflow.runs").await;
    assert_eq!(runs, 0);
    assert_eq!(engine.queue_counts("deploy").await.0, 0);
    let granted: bool = engine
        .scalar(&format!(
            "SELECT has_table_privilege('deploy_worker_{}', 'pgmq.q_deploy', 'UPDATE')",
            run.simple()
        ))
        .await;
    assert!(granted, "the worker role still serves the flow");
    let schedules: i64 = engine
        .scalar("SELECT count(*) FROM pgflow_ext.schedules WHERE flow_slug = 'deploy'")
        .await;
    assert_eq!(schedules, 1);
    // And it runs on its new definition.
    let again = engine.start("deploy", json!({"id": 2})).await;
    assert_eq!(engine.run(again).await.0, "started");
    engine
        .exec(&format!(
            "SELECT pgflow.revoke_flow_from_worker('deploy', 'deploy_worker_{0}'); DROP ROLE deploy_worker_{0};",
            run.simple()
        ))
        .await;

    // A shape that is not one is refused before anything happens.
    let (code, _) = refused_with(
        &engine,
        "SELECT pgflow.ensure_flow_compiled('other', $1)",
        &json!("steps"),
    )
    .await;
    assert_eq!(code, "22023");
    // A slug differing only in case from a flow's is refused by create_flow (0003).
    let (code, message) = refused_with(
        &engine,
        "SELECT pgflow.ensure_flow_compiled('Deploy', $1)",
        &json!({"steps": []}),
    )
    .await;
    assert_eq!(code, "42710", "{message}");
    assert!(
        message.contains("collides with existing flow \"deploy\""),
        "{message}"
    );
}

/// Row counts of one flow in every table of the engine's schemas that has a `flow_slug`,
/// `queue_name` or `run_id` column (a `run_id` counted for the flow's runs, `runs_of`), found
/// in the catalog so that a table added later is counted too.
async fn rows_of(engine: &Engine, flow: &str, runs_of: &[uuid::Uuid]) -> BTreeMap<String, i64> {
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT format('%I.%I', c.table_schema, c.table_name), c.column_name
           FROM information_schema.columns c
           JOIN information_schema.tables t USING (table_schema, table_name)
          WHERE c.table_schema IN ('pgflow', 'pgflow_ext') AND t.table_type = 'BASE TABLE'
            AND c.column_name IN ('flow_slug', 'queue_name', 'run_id')
          ORDER BY 1, 2",
    )
    .fetch_all(engine.pool())
    .await
    .unwrap();
    let mut counts = BTreeMap::new();
    for (table, column) in columns {
        let count: i64 = if column == "run_id" {
            sqlx::query_scalar(&format!(
                "SELECT count(*) FROM {table} WHERE run_id = ANY($1)"
            ))
            .bind(runs_of)
            .fetch_one(engine.pool())
            .await
            .unwrap()
        } else {
            sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE {column} = $1"))
                .bind(flow)
                .fetch_one(engine.pool())
                .await
                .unwrap()
        };
        counts.insert(format!("{table}.{column}"), count);
    }
    counts
}

/// A flow `slug` of two steps with rows in every table: two runs, one of them with a failed
/// attempt, cancelled and retried; a worker row; a schedule. Returns its runs.
async fn busy_flow(engine: &Engine, slug: &str) -> Vec<uuid::Uuid> {
    engine
        .exec(&format!(
            "SELECT pgflow.create_flow('{slug}', max_attempts => 3, base_delay => 0);
             SELECT pgflow.add_step('{slug}', 'a');
             SELECT pgflow.add_step('{slug}', 'b', ARRAY['a']);
             INSERT INTO pgflow.workers (worker_id, queue_name, function_name)
             VALUES (gen_random_uuid(), '{slug}', 'tests');
             SELECT pgflow.define_schedule('{slug}_hourly', '{slug}', '0 * * * *');"
        ))
        .await;
    let first = engine.start(slug, json!({"n": 1})).await;
    let second = engine.start(slug, json!({"n": 2})).await;
    let tasks = engine.poll(slug).await;
    let of_first = tasks.iter().find(|t| t.run_id == first).unwrap();
    engine.fail(of_first, "boom").await;
    let of_second = tasks.iter().find(|t| t.run_id == second).unwrap();
    engine.complete(of_second, json!("a done")).await;
    engine
        .exec(&format!(
            "SELECT pgflow.cancel_run('{first}'); SELECT pgflow.retry_run('{first}');"
        ))
        .await;
    vec![first, second]
}

#[tokio::test]
async fn delete_flow_and_data_removes_every_row_and_the_queue_of_that_flow_alone() {
    let engine = Engine::new().await;
    let doomed = busy_flow(&engine, "doomed").await;
    let kept = busy_flow(&engine, "kept").await;
    let before = rows_of(&engine, "doomed", &doomed).await;
    for table in [
        "pgflow.runs.flow_slug",
        "pgflow.step_tasks.run_id",
        "pgflow.workers.queue_name",
        "pgflow_ext.step_task_attempts.run_id",
        "pgflow_ext.run_retries.run_id",
        "pgflow_ext.schedules.flow_slug",
    ] {
        assert!(
            before[table] > 0,
            "the test makes rows in {table}: {before:?}"
        );
    }
    let kept_before = rows_of(&engine, "kept", &kept).await;
    let kept_queue = engine.queue_counts("kept").await;

    engine
        .exec("SELECT pgflow.delete_flow_and_data('doomed')")
        .await;

    let after = rows_of(&engine, "doomed", &doomed).await;
    assert!(after.values().all(|&n| n == 0), "left behind: {after:?}");
    let leftovers: Vec<String> = sqlx::query_scalar(
        "SELECT q.queue_name FROM pgmq.list_queues() q WHERE lower(q.queue_name) = 'doomed'
         UNION ALL
         SELECT c.relname::text FROM pg_class c
          WHERE c.relnamespace = 'pgmq'::regnamespace AND c.relname IN ('q_doomed', 'a_doomed')
         UNION ALL
         SELECT p.proname::text FROM pg_proc p
          WHERE p.pronamespace = 'pgflow'::regnamespace AND p.proname LIKE '%\\_doomed'",
    )
    .fetch_all(engine.pool())
    .await
    .unwrap();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The other flow is whole, and runs on.
    assert_eq!(rows_of(&engine, "kept", &kept).await, kept_before);
    assert_eq!(engine.queue_counts("kept").await, kept_queue);
    let tasks = engine.poll("kept").await;
    assert!(!tasks.is_empty());

    // Gone is gone: again, it is a notice; and the slug can be compiled anew.
    engine
        .exec("SELECT pgflow.delete_flow_and_data('doomed')")
        .await;
    engine
        .exec("SELECT pgflow.create_flow('doomed'); SELECT pgflow.add_step('doomed', 'x');")
        .await;
    let fresh = engine.start("doomed", json!({})).await;
    assert_eq!(engine.poll("doomed").await[0].run_id, fresh);
}

#[tokio::test]
async fn deleting_one_of_two_case_twins_leaves_the_other_and_their_shared_queue() {
    let engine = Engine::new().await;
    let twin = busy_flow(&engine, "twin").await;
    // A twin made before migration 0003 refused them: its rows written directly, sharing
    // queue pgmq.q_twin (and its functions) with `twin`.
    engine
        .exec(
            "INSERT INTO pgflow.flows (flow_slug) VALUES ('Twin');
             SELECT pgflow.add_step('Twin', 'only');",
        )
        .await;
    let legacy = engine.start("Twin", json!({"legacy": true})).await;
    let (queued_before, _) = engine.queue_counts("twin").await;
    let twin_before = rows_of(&engine, "twin", &twin).await;

    engine
        .exec("SELECT pgflow.delete_flow_and_data('Twin')")
        .await;

    assert!(
        rows_of(&engine, "Twin", &[legacy])
            .await
            .values()
            .all(|&n| n == 0)
    );
    assert_eq!(rows_of(&engine, "twin", &twin).await, twin_before);
    // The shared queue stays, holding the other flow's messages alone.
    let (queued_after, _) = engine.queue_counts("twin").await;
    assert_eq!(queued_after, queued_before - 1);
    let foreign: i64 = engine
        .scalar("SELECT count(*) FROM pgmq.q_twin WHERE message->>'flow_slug' <> 'twin'")
        .await;
    assert_eq!(foreign, 0);
    let tasks = engine.poll("twin").await;
    assert!(tasks.iter().all(|t| twin.contains(&t.run_id)));
}

#[tokio::test]
async fn only_the_owner_compiles_and_deletes_flows() {
    let engine = Engine::new().await;
    engine
        .exec("SELECT pgflow.create_flow('guarded'); SELECT pgflow.add_step('guarded', 'a');")
        .await;
    let db: String = engine.scalar("SELECT current_database()").await;
    let role = format!("shapes_{}", db.trim_start_matches("pgflow_test_"));
    engine
        .exec(&format!(
            "CREATE ROLE {role} NOLOGIN; GRANT USAGE ON SCHEMA pgflow TO {role};
             GRANT SELECT ON ALL TABLES IN SCHEMA pgflow TO {role};"
        ))
        .await;
    let mut conn = PgConnection::connect(engine.url()).await.unwrap();
    sqlx::raw_sql(&format!("SET ROLE {role}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let refusal = async |conn: &mut PgConnection, sql: &str| {
        let err = sqlx::raw_sql(sql).execute(&mut *conn).await.expect_err(sql);
        let db = err.as_database_error().unwrap();
        (
            db.code().unwrap_or_default().to_string(),
            db.message().to_string(),
        )
    };
    // Not granted: PostgreSQL refuses the call.
    for sql in [
        "SELECT pgflow.delete_flow_and_data('guarded')",
        "SELECT pgflow.ensure_flow_compiled('guarded', '{\"steps\": []}')",
        "SELECT pgflow._create_flow_from_shape('mine', '{\"steps\": []}')",
        "SELECT pgflow._get_flow_shape('guarded')",
    ] {
        let (code, message) = refusal(&mut conn, sql).await;
        assert_eq!(code, "42501", "{sql}: {message}");
    }
    // Granted: ensure_flow_compiled verifies a compiled flow and reports a mismatch for
    // anyone (a TypeScript worker at start-up); compiling, recompiling and deleting are
    // refused to all but the owner, saying so.
    engine
        .exec(&format!(
            "GRANT EXECUTE ON FUNCTION pgflow.delete_flow_and_data(text),
                                       pgflow.ensure_flow_compiled(text, jsonb, boolean),
                                       pgflow.ensure_flow_compiled(text, jsonb) TO {role}"
        ))
        .await;
    // Only a flow the role serves: the differences would show it another flow's definition.
    let (code, message) = refusal(
        &mut conn,
        "SELECT pgflow.ensure_flow_compiled('guarded', '{\"steps\": []}')",
    )
    .await;
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("42501", "permission denied for flow guarded")
    );
    engine
        .exec(&format!(
            "SELECT pgflow.grant_flow_to_worker('guarded', '{role}')"
        ))
        .await;
    let stored = shape_of(&engine, "guarded").await;
    let verified: Value = sqlx::query_scalar("SELECT pgflow.ensure_flow_compiled('guarded', $1)")
        .bind(&stored)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(verified["status"], "verified");
    let mismatch: Value =
        sqlx::query_scalar("SELECT pgflow.ensure_flow_compiled('guarded', '{\"steps\": []}')")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(mismatch["status"], "mismatch");
    for (sql, what) in [
        (
            "SELECT pgflow.delete_flow_and_data('guarded')",
            "delete_flow_and_data".to_string(),
        ),
        (
            "SELECT pgflow.ensure_flow_compiled('guarded', '{\"steps\": []}', true)",
            "recompiling flow \"guarded\" (ensure_flow_compiled)".to_string(),
        ),
        (
            "SELECT pgflow.ensure_flow_compiled('mine', '{\"steps\": []}')",
            "compiling flow \"mine\" (ensure_flow_compiled)".to_string(),
        ),
    ] {
        let (code, message) = refusal(&mut conn, sql).await;
        assert_eq!(code, "42501", "{sql}: {message}");
        assert_eq!(
            message,
            format!("permission denied: {what} is for the owner of schema pgflow, not role {role}")
        );
    }
    drop(conn);
    let steps: i64 = engine
        .scalar("SELECT count(*) FROM pgflow.steps WHERE flow_slug = 'guarded'")
        .await;
    assert_eq!(steps, 1, "nothing was deleted");
    let flows: i64 = engine.scalar("SELECT count(*) FROM pgflow.flows").await;
    assert_eq!(flows, 1, "nothing was created");
    engine
        .exec(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .await;
}

#[tokio::test]
async fn concurrent_compilations_of_a_new_flow_make_one_flow() {
    let engine = Engine::new().await;
    let shape = conditional_shape();
    // The first holds its transaction open after compiling; the second must wait for it,
    // then find the flow, not create it a second time.
    let mut first = PgConnection::connect(engine.url()).await.unwrap();
    let mut tx = first.begin().await.unwrap();
    let compiled: Value = sqlx::query_scalar("SELECT pgflow.ensure_flow_compiled('race', $1)")
        .bind(&shape)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(compiled["status"], "compiled");
    let url = engine.url().to_string();
    let second_shape = shape.clone();
    let second = tokio::spawn(async move {
        let mut conn = PgConnection::connect(&url).await.unwrap();
        let verdict: Value = sqlx::query_scalar("SELECT pgflow.ensure_flow_compiled('race', $1)")
            .bind(&second_shape)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        verdict
    });
    // A case twin of it waits on the same lock, and is then refused.
    let url = engine.url().to_string();
    let twin_shape = shape.clone();
    let twin = tokio::spawn(async move {
        let mut conn = PgConnection::connect(&url).await.unwrap();
        sqlx::query_scalar::<_, Value>("SELECT pgflow.ensure_flow_compiled('RACE', $1)")
            .bind(&twin_shape)
            .fetch_one(&mut conn)
            .await
            .map_err(|err| err.as_database_error().unwrap().message().to_string())
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let waiting: i64 = engine
        .scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .await;
    assert_eq!(waiting, 2, "both wait for the first compilation");
    tx.commit().await.unwrap();

    assert_eq!(
        second.await.unwrap(),
        json!({"status": "verified", "differences": []})
    );
    let twin = twin.await.unwrap().unwrap_err();
    assert!(
        twin.contains("collides with existing flow \"race\""),
        "{twin}"
    );
    let flows: i64 = engine.scalar("SELECT count(*) FROM pgflow.flows").await;
    assert_eq!(flows, 1);
    let steps: i64 = engine.scalar("SELECT count(*) FROM pgflow.steps").await;
    assert_eq!(steps, 4);
}

#[tokio::test]
async fn a_run_started_during_a_recompilation_fails_rather_than_mix_definitions() {
    let engine = Engine::new().await;
    let old = json!({"steps": [{"slug": "a"}, {"slug": "b", "dependencies": ["a"]}]});
    ensure(&engine, "moving", &old, false).await;
    let new = json!({"steps": [{"slug": "a"}, {"slug": "c"}, {"slug": "d"}]});
    let mut first = PgConnection::connect(engine.url()).await.unwrap();
    let mut tx = first.begin().await.unwrap();
    let recompiled: Value =
        sqlx::query_scalar("SELECT pgflow.ensure_flow_compiled('moving', $1, true)")
            .bind(&new)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    assert_eq!(recompiled["status"], "recompiled");
    let url = engine.url().to_string();
    let start = tokio::spawn(async move {
        let mut conn = PgConnection::connect(&url).await.unwrap();
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT run_id FROM pgflow.start_flow('moving', '{}')")
            .fetch_one(&mut conn)
            .await
            .map_err(|err| err.as_database_error().unwrap().message().to_string())
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !start.is_finished(),
        "the start waits for the recompilation"
    );
    tx.commit().await.unwrap();
    let refused = start.await.unwrap().unwrap_err();
    assert!(refused.contains("runs_flow_slug_fkey"), "{refused}");
    let runs: i64 = engine.scalar("SELECT count(*) FROM pgflow.runs").await;
    assert_eq!(
        runs, 0,
        "no run of half the old and half the new definition"
    );
    // Started again, it runs the new definition.
    let run = engine.start("moving", json!({})).await;
    let steps: i64 = engine
        .scalar(&format!(
            "SELECT count(*) FROM pgflow.step_states WHERE run_id = '{run}'"
        ))
        .await;
    assert_eq!(steps, 3);
}

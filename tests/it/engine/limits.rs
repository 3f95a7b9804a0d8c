//! Definitions the engine could not run are refused when they are made (migration 0003): flow
//! slugs that share a queue or do not fit one, option values past their bounds; and the retry
//! delay cannot overflow whatever is stored.

use serde_json::json;

use super::Engine;

#[tokio::test]
async fn a_flow_slug_differing_only_in_case_is_refused_and_takes_nothing() {
    let engine = Engine::new().await;
    engine.flow("Twin", &[("work", &[], "single")]).await;
    engine.start("Twin", json!({})).await;
    assert_eq!(engine.queue_counts("Twin").await, (1, 0));

    for twin in ["twin", "TWIN"] {
        let message = engine
            .error(&format!("SELECT pgflow.create_flow('{twin}')"))
            .await;
        assert_eq!(
            message,
            format!(
                "Flow slug \"{twin}\" collides with existing flow \"Twin\": pgmq lowercases queue \
                 names, so both flows would share queue pgmq.q_twin"
            )
        );
        assert_eq!(
            engine
                .error_code(&format!("SELECT pgflow.create_flow('{twin}')"))
                .await,
            "42710"
        );
    }

    // The first flow keeps its row, its queue and its message; the twin left no trace.
    assert_eq!(
        engine
            .scalar::<Vec<String>>("SELECT array_agg(flow_slug) FROM pgflow.flows")
            .await,
        ["Twin"]
    );
    assert_eq!(
        engine
            .scalar::<Vec<String>>("SELECT array_agg(queue_name) FROM pgmq.list_queues()")
            .await,
        ["Twin"]
    );
    assert_eq!(engine.queue_counts("Twin").await, (1, 0));
    // Creating the flow itself again is still the idempotent no-op.
    assert_eq!(
        engine
            .scalar::<String>("SELECT flow_slug FROM pgflow.create_flow('Twin')")
            .await,
        "Twin"
    );
}

#[tokio::test]
async fn a_flow_slug_too_long_for_a_queue_name_is_refused_first() {
    let engine = Engine::new().await;
    let long = "a".repeat(48);
    assert_eq!(
        engine
            .error(&format!("SELECT pgflow.create_flow('{long}')"))
            .await,
        format!(
            "Flow slug \"{long}\" has 48 characters, but a flow slug names its pgmq queue, and \
             pgmq refuses queue names of more than 47 characters"
        )
    );
    assert_eq!(
        engine
            .scalar::<i64>("SELECT count(*) FROM pgflow.flows")
            .await,
        0
    );

    let longest = "a".repeat(47);
    engine.flow(&longest, &[("s", &[], "single")]).await;
    engine.start(&longest, json!({})).await;
    assert_eq!(engine.queue_counts(&longest).await, (1, 0));
    // Step slugs keep is_valid_slug's 128 characters.
    let step = "s".repeat(128);
    engine
        .exec(&format!("SELECT pgflow.add_step('{longest}', '{step}')"))
        .await;
}

#[tokio::test]
async fn option_values_past_their_bounds_are_refused_before_anything_is_written() {
    let engine = Engine::new().await;
    let refusals = [
        (
            "SELECT pgflow.create_flow('f', timeout => 2147483646)",
            "Option timeout of flow \"f\" is 2147483646, but it must be at most 86400 seconds (one day)",
        ),
        (
            "SELECT pgflow.create_flow('f', max_attempts => 101)",
            "Option max_attempts of flow \"f\" is 101, but it must be at most 100 attempts",
        ),
        (
            "SELECT pgflow.create_flow('f', base_delay => 86401)",
            "Option base_delay of flow \"f\" is 86401, but it must be at most 86400 seconds (one day)",
        ),
    ];
    for (sql, expected) in refusals {
        assert_eq!(engine.error(sql).await, expected, "{sql}");
        assert_eq!(engine.error_code(sql).await, "22023", "{sql}");
    }
    assert_eq!(
        engine
            .scalar::<i64>("SELECT count(*) FROM pgflow.flows")
            .await,
        0
    );

    // At the bounds, accepted.
    engine
        .exec("SELECT pgflow.create_flow('f', max_attempts => 100, base_delay => 86400, timeout => 86400)")
        .await;
    let refusals = [
        (
            "SELECT pgflow.add_step('f', 's', timeout => 2147483646)",
            "Option timeout of step \"s\" of flow \"f\" is 2147483646, but it must be at most 86400 seconds (one day)",
        ),
        (
            // Positionally, as pgflow 0.8.1's callers do: deps, max_attempts, base_delay,
            // timeout, start_delay, step_type.
            "SELECT pgflow.add_step('f', 's', '{}', NULL, NULL, NULL, 31536001, 'single')",
            "Option start_delay of step \"s\" of flow \"f\" is 31536001, but it must be at most 31536000 seconds (365 days)",
        ),
    ];
    for (sql, expected) in refusals {
        assert_eq!(engine.error(sql).await, expected, "{sql}");
    }
    assert_eq!(
        engine
            .scalar::<i64>("SELECT count(*) FROM pgflow.steps")
            .await,
        0
    );
    engine
        .exec(
            "SELECT pgflow.add_step('f', 's', max_attempts => 100, base_delay => 86400, \
             timeout => 86400, start_delay => 31536000)",
        )
        .await;

    // The lower bounds are still the tables' check constraints.
    assert_eq!(
        engine
            .error_code("SELECT pgflow.create_flow('g', timeout => 0)")
            .await,
        "23514"
    );
}

#[tokio::test]
async fn calculate_retry_delay_is_capped_at_the_largest_integer() {
    let engine = Engine::new().await;
    let cases: [(&str, Option<i32>); 11] = [
        ("5, 40", Some(2_147_483_647)),
        ("2147483647, 2147483647", Some(2_147_483_647)),
        ("1, 31", Some(2_147_483_647)),
        ("2147483648, 0", Some(2_147_483_647)),
        ("0.49999, 32", Some(2_147_440_698)),
        ("0, 2147483647", Some(0)),
        ("-1, 40", Some(-2_147_483_648)),
        // Where 0.8.1 did not overflow, the same results.
        ("1, 30", Some(1_073_741_824)),
        ("2147483647, 0", Some(2_147_483_647)),
        ("1.5, 1", Some(3)),
        ("5, NULL", None),
    ];
    for (args, expected) in cases {
        let delay: Option<i32> = engine
            .scalar(&format!("SELECT pgflow.calculate_retry_delay({args})"))
            .await;
        assert_eq!(delay, expected, "calculate_retry_delay({args})");
    }
    let delays: Vec<i32> = engine
        .scalar("SELECT array_agg(pgflow.calculate_retry_delay(5, n) ORDER BY n) FROM generate_series(0, 4) n")
        .await;
    assert_eq!(delays, [5, 10, 20, 40, 80]);
}

#[tokio::test]
async fn fail_task_retries_after_the_capped_delay_however_large_the_backoff() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('backoff', max_attempts => 100, base_delay => 86400);
             SELECT pgflow.add_step('backoff', 'late');
             SELECT pgflow.add_step('backoff', 'legacy');",
        )
        .await;
    // A base delay written before migration 0003 bounded it, straight into the table.
    engine
        .exec("UPDATE pgflow.steps SET opt_base_delay = 2147483647 WHERE step_slug = 'legacy'")
        .await;
    let run_id = engine.start("backoff", json!({})).await;
    let tasks = engine.poll("backoff").await;
    assert_eq!(tasks.len(), 2);
    // The 40th attempt of `late`: 86400 × 2^40 seconds.
    engine
        .exec(&format!(
            "UPDATE pgflow.step_tasks SET attempts_count = 40 \
             WHERE run_id = '{run_id}' AND step_slug = 'late'"
        ))
        .await;

    for task in &tasks {
        let rows = engine.fail(task, "boom").await;
        assert_eq!(rows.len(), 1, "{}", task.step_slug);
        assert_eq!(rows[0].status, "queued", "{}", task.step_slug);
        let wait = engine.visible_in("backoff", task.msg_id).await;
        assert!(
            (2_147_483_000..=2_147_483_647).contains(&wait),
            "{}: visible in {wait} s",
            task.step_slug
        );
    }
    assert_eq!(engine.run(run_id).await.0, "started");
}

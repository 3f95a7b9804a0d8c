//! The client and the database's flow-shape functions agree: `Client::compile` takes its
//! structural verdict from `pgflow._compare_flow_shapes`, creates flows as
//! `pgflow.ensure_flow_compiled` does, and a flow compiled either way is unchanged for the other.

use std::time::Duration;

use pgflow_client::{Client, Compiled, Difference, Error, Replace, shape_json};
use pgflow_core::{FlowOptions, FlowShape, SkipMode, StepKind, StepOptions, StepShape};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

use crate::support::client;

/// A flow with options, a retry policy, a condition that cascades and a map.
fn shape(slug: &str) -> FlowShape {
    FlowShape {
        slug: slug.into(),
        options: FlowOptions::new().timeout(45).max_delay(300),
        steps: vec![
            StepShape::new("fetch"),
            StepShape {
                dependencies: vec!["fetch".into()],
                required_input_pattern: Some(json!({"fetch": {"ok": true}})),
                when_unmet: SkipMode::SkipCascade,
                options: StepOptions::new().max_attempts(2).jitter(true),
                ..StepShape::new("check")
            },
            StepShape {
                kind: StepKind::Map,
                dependencies: vec!["fetch".into()],
                forbidden_input_pattern: Some(json!({"fetch": {"x": 1}})),
                when_exhausted: SkipMode::Skip,
                ..StepShape::new("each")
            },
        ],
    }
}

/// `shape_json` without its options, which the database's shape does not hold.
fn structure(shape: &FlowShape) -> Value {
    let mut json = shape_json(shape);
    json.as_object_mut().unwrap().remove("options");
    for step in json["steps"].as_array_mut().unwrap() {
        step.as_object_mut().unwrap().remove("options");
    }
    json
}

async fn ensure(client: &Client, shape: &FlowShape) -> Value {
    sqlx::query_scalar("SELECT pgflow.ensure_flow_compiled($1, $2)")
        .bind(&shape.slug)
        .bind(shape_json(shape))
        .fetch_one(client.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_flow_compiled_by_either_side_is_unchanged_for_the_other() {
    let (_db, client) = client().await;
    let rust = shape("from_rust");
    assert_eq!(
        client.compile_shape(&rust, None).await.unwrap(),
        Compiled::Created
    );
    let stored: Value = sqlx::query_scalar("SELECT pgflow._get_flow_shape('from_rust')")
        .fetch_one(client.pool())
        .await
        .unwrap();
    assert_eq!(stored, structure(&rust));
    assert_eq!(
        ensure(&client, &rust).await,
        json!({"status": "verified", "differences": []})
    );
    assert_eq!(client.drift(&rust).await.unwrap(), Some(vec![]));

    // Created by the database from the JSON, options and retry policy included: the client
    // finds nothing to change.
    let sql = shape("from_sql");
    assert_eq!(ensure(&client, &sql).await["status"], "compiled");
    assert_eq!(
        client.compile_shape(&sql, None).await.unwrap(),
        Compiled::Unchanged
    );
    let stored = client.flow_shape("from_sql").await.unwrap().unwrap();
    assert!(pgflow_client::differences(&stored, &sql).is_empty());
    assert_eq!(stored.steps[1].options.jitter, Some(true));
}

#[tokio::test]
async fn a_structural_change_in_the_database_is_drift_for_both() {
    let (_db, client) = client().await;
    let flow = shape("edited");
    client.compile_shape(&flow, None).await.unwrap();
    sqlx::raw_sql(
        "UPDATE pgflow.steps SET when_unmet = 'fail' WHERE flow_slug = 'edited' AND step_slug = 'check';
         UPDATE pgflow.steps SET forbidden_input_pattern = NULL
          WHERE flow_slug = 'edited' AND step_slug = 'each';",
    )
    .execute(client.pool())
    .await
    .unwrap();

    let err = client.compile_shape(&flow, None).await.unwrap_err();
    let Error::FlowDrift { differences, .. } = &err else {
        panic!("expected drift, got {err}");
    };
    assert_eq!(
        client.drift(&flow).await.unwrap().as_ref(),
        Some(differences)
    );
    assert_eq!(client.drift(&shape("absent")).await.unwrap(), None);
    assert_eq!(
        differences,
        &[
            Difference::ModeChanged {
                step: "check".into(),
                mode: "when_unmet",
                stored: SkipMode::Fail,
                compiled: SkipMode::SkipCascade,
            },
            Difference::ConditionChanged {
                step: "each".into(),
                condition: "forbidden_input_pattern",
                stored: None,
                compiled: Some(json!({"fetch": {"x": 1}})),
            },
        ]
    );
    assert_eq!(
        differences[0].to_string(),
        "step `check` when_unmet is skip-cascade instead of fail"
    );
    assert_eq!(
        ensure(&client, &flow).await,
        json!({"status": "mismatch", "differences": [
            "Step at index 1: whenUnmet differs 'skip-cascade' vs 'fail'",
            "Step at index 2: forbiddenInputPattern differs '{\"value\": {\"fetch\": {\"x\": 1}}, \"defined\": true}' vs '{\"defined\": false}'",
        ]})
    );

    // Options alone are the client's drift, not the database's (upstream tunes them in place).
    let (_db2, client2) = crate::support::client().await;
    client2.compile_shape(&flow, None).await.unwrap();
    sqlx::query("UPDATE pgflow.flows SET opt_timeout = 99 WHERE flow_slug = 'edited'")
        .execute(client2.pool())
        .await
        .unwrap();
    assert_eq!(ensure(&client2, &flow).await["status"], "verified");
    let Err(Error::FlowDrift { differences, .. }) = client2.compile_shape(&flow, None).await else {
        panic!("a changed option is drift for the client");
    };
    assert_eq!(
        differences,
        [Difference::OptionChanged {
            step: None,
            option: "timeout",
            stored: Some(99),
            compiled: Some(45),
        }]
    );
}

#[tokio::test]
async fn replacing_a_flow_keeps_its_queue_grants_and_schedules() {
    let (db, client) = client().await;
    let flow = shape("replaced");
    client.compile_shape(&flow, None).await.unwrap();
    let role = format!("replaced_{}", db.name().trim_start_matches("pgflow_test_"));
    sqlx::raw_sql(&format!(
        "CREATE ROLE {role} NOLOGIN;
         SELECT pgflow.grant_flow_to_worker('replaced', '{role}');
         SELECT pgflow.define_schedule('replaced_{role}', 'replaced', '*/5 * * * *');"
    ))
    .execute(client.pool())
    .await
    .unwrap();
    client
        .start_json("replaced", json!({"n": 1}), None)
        .await
        .unwrap();

    let mut changed = shape("replaced");
    changed.steps.pop();
    assert_eq!(
        client
            .compile_shape(&changed, Some(Replace::DeletingRuns))
            .await
            .unwrap(),
        Compiled::Replaced { deleted_runs: 1 }
    );
    let stored = client.flow_shape("replaced").await.unwrap().unwrap();
    assert_eq!(stored.steps.len(), 2);
    let (granted, schedules, queued): (bool, i64, i64) = sqlx::query_as(&format!(
        "SELECT has_table_privilege('{role}', 'pgmq.q_replaced', 'UPDATE'),
                (SELECT count(*) FROM pgflow_ext.schedules WHERE flow_slug = 'replaced'),
                (SELECT count(*) FROM pgmq.q_replaced)"
    ))
    .fetch_one(client.pool())
    .await
    .unwrap();
    assert!(granted, "the worker role still serves the flow");
    assert_eq!((schedules, queued), (1, 0));
    sqlx::raw_sql(&format!(
        "SELECT pgflow.delete_flow_and_data('replaced'); DROP OWNED BY {role}; DROP ROLE {role};"
    ))
    .execute(client.pool())
    .await
    .unwrap();
}

#[tokio::test]
async fn the_client_waits_for_a_compilation_in_sql_of_the_same_flow() {
    let (db, client) = client().await;
    let flow = shape("racing");
    let mut conn = PgConnection::connect(db.url()).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let compiled: Value = sqlx::query_scalar("SELECT pgflow.ensure_flow_compiled($1, $2)")
        .bind(&flow.slug)
        .bind(shape_json(&flow))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(compiled["status"], "compiled");

    let racing = client.clone();
    let second = tokio::spawn(async move { racing.compile_shape(&shape("racing"), None).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "the client waits for the open compilation"
    );
    tx.commit().await.unwrap();
    assert_eq!(second.await.unwrap().unwrap(), Compiled::Unchanged);
    let flows: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.flows")
        .fetch_one(client.pool())
        .await
        .unwrap();
    assert_eq!(flows, 1);
}

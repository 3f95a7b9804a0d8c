//! The test fixture itself, pgmq, and installing the engine schema.

use pgflow_client::throwaway::TestDatabase;
use pgflow_client::{Error, install};
use serde_json::json;

use crate::support::database;

#[tokio::test]
async fn pgmq_round_trip_through_a_fresh_database() {
    let db = database().await;
    let pool = db.pool();
    sqlx::query("SELECT pgmq.create('round_trip')")
        .execute(pool)
        .await
        .unwrap();
    let sent: i64 = sqlx::query_scalar("SELECT pgmq.send('round_trip', $1)")
        .bind(json!({"hello": "world"}))
        .fetch_one(pool)
        .await
        .unwrap();
    let read: Vec<(i64, serde_json::Value)> = sqlx::query_as(
        "SELECT msg_id, message FROM pgmq.read_with_poll('round_trip', 30, 10, 1, 50)",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(read, vec![(sent, json!({"hello": "world"}))]);
    let archived: bool = sqlx::query_scalar("SELECT pgmq.archive('round_trip', $1)")
        .bind(sent)
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(archived);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pgmq.q_round_trip")
        .fetch_one(pool)
        .await
        .unwrap();
    let in_archive: i64 = sqlx::query_scalar("SELECT count(*) FROM pgmq.a_round_trip")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!((left, in_archive), (0, 1));
}

#[tokio::test]
async fn test_databases_do_not_see_each_other() {
    let (a, b) = tokio::join!(database(), database());
    assert_ne!(a.name(), b.name());
    sqlx::query("SELECT pgmq.create('only_in_a')")
        .execute(a.pool())
        .await
        .unwrap();
    let in_b: bool = sqlx::query_scalar("SELECT to_regclass('pgmq.q_only_in_a') IS NOT NULL")
        .fetch_one(b.pool())
        .await
        .unwrap();
    assert!(!in_b);
}

#[tokio::test]
async fn install_is_idempotent_and_records_its_version() {
    let db = TestDatabase::empty().await.unwrap();
    let first = install(db.pool()).await.unwrap();
    assert_eq!(first.applied, every_version());
    assert_ne!(first.pgmq, "existing");
    let second = install(db.pool()).await.unwrap();
    assert_eq!(second.applied, Vec::<i32>::new());
    assert_eq!(second.pgmq, "existing");
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow_meta.schema_migrations")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(
        usize::try_from(recorded).unwrap(),
        pgflow_core::schema::MIGRATIONS.len()
    );
}

#[tokio::test]
async fn concurrent_installs_wait_for_each_other() {
    let db = TestDatabase::empty().await.unwrap();
    let (a, b) = tokio::join!(install(db.pool()), install(db.pool()));
    let mut applied = [a.unwrap().applied, b.unwrap().applied];
    applied.sort();
    assert_eq!(applied, [vec![], every_version()]);
}

#[tokio::test]
async fn a_foreign_pgflow_schema_is_left_alone() {
    let db = TestDatabase::empty().await.unwrap();
    sqlx::raw_sql("CREATE SCHEMA pgflow; CREATE TABLE pgflow.flows (flow_slug text PRIMARY KEY)")
        .execute(db.pool())
        .await
        .unwrap();
    let err = install(db.pool()).await.unwrap_err();
    assert!(matches!(err, Error::ForeignSchema), "{err}");
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'pgflow'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(tables, 1, "the foreign schema must be untouched");
}

#[tokio::test]
async fn a_dropped_engine_is_not_reported_up_to_date_and_installs_again_after_the_cleanup() {
    let db = database().await;
    sqlx::raw_sql("DROP SCHEMA pgflow CASCADE")
        .execute(db.pool())
        .await
        .unwrap();
    let err = install(db.pool()).await.unwrap_err();
    match &err {
        Error::SchemaMissing { recorded } => assert_eq!(*recorded, every_version()),
        other => panic!("expected SchemaMissing, got {other}"),
    }
    // The message's cleanup is enough for a fresh install.
    let text = err.to_string();
    let cleanup = text
        .split('`')
        .find(|part| part.starts_with("DROP SCHEMA IF EXISTS"))
        .expect("the cleanup statement is quoted in the message");
    sqlx::raw_sql(cleanup).execute(db.pool()).await.unwrap();
    let report = install(db.pool()).await.unwrap();
    assert_eq!(report.applied, every_version());
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'pgflow'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(tables, 7);
}

#[tokio::test]
async fn a_newer_schema_than_we_know_is_refused() {
    let db = database().await;
    sqlx::query("INSERT INTO pgflow_meta.schema_migrations (version, name, checksum) VALUES (9999, 'future', 'x')")
        .execute(db.pool())
        .await
        .unwrap();
    let err = install(db.pool()).await.unwrap_err();
    assert!(
        matches!(err, Error::SchemaTooNew { found: 9999, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn an_edited_migration_is_refused() {
    let db = database().await;
    sqlx::query("UPDATE pgflow_meta.schema_migrations SET checksum = 'edited' WHERE version = 1")
        .execute(db.pool())
        .await
        .unwrap();
    let err = install(db.pool()).await.unwrap_err();
    assert!(
        matches!(err, Error::MigrationChanged { version: 1, .. }),
        "{err}"
    );
}

/// The version of every migration, oldest first: what an install on an empty database applies.
fn every_version() -> Vec<i32> {
    pgflow_core::schema::MIGRATIONS
        .iter()
        .map(|migration| migration.version)
        .collect()
}

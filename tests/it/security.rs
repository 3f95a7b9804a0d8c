//! Least privilege: the role setup of docs/security.md, applied as written.

use pgflow_client::Client;
use pgflow_client::throwaway::TestDatabase;
use pgflow_core::{Flow, StepContext, StepError, step_fn};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

/// The SQL block of docs/security.md, so the test checks what users are told to run.
fn documented_grants() -> String {
    let doc = include_str!("../../docs/security.md");
    let start = doc.find("```sql\n").expect("a sql block") + "```sql\n".len();
    let end = start + doc[start..].find("```").expect("its end");
    doc[start..end].to_string()
}

/// Connects as `role` through the superuser's session authorization.
async fn connect_as(db: &TestDatabase, role: &str) -> PgConnection {
    let mut conn = PgConnection::connect(db.url()).await.unwrap();
    sqlx::raw_sql(&format!("SET SESSION AUTHORIZATION {role}"))
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

async fn error_of(conn: &mut PgConnection, sql: &str) -> String {
    match sqlx::raw_sql(sql).execute(&mut *conn).await {
        Ok(_) => panic!("{sql} succeeded"),
        Err(err) => err.to_string(),
    }
}

#[tokio::test]
async fn roles_get_exactly_what_the_documented_grants_give() {
    let db = TestDatabase::new().await.unwrap();
    let client = Client::new(db.pool().clone());
    let only =
        step_fn("only").handler(|v: Value, _ctx: StepContext| async move { Ok::<_, StepError>(v) });
    let flow: Flow<Value> = Flow::new("secured").step(only).build();
    client.compile(&flow).await.unwrap();
    let role_suffix = db.name().trim_start_matches("pgflow_test_");
    // Roles are cluster-wide: name them after this database so parallel tests do not collide.
    let grants = documented_grants()
        .replace("pgflow_app", &format!("app_{role_suffix}"))
        .replace("pgflow_reader", &format!("reader_{role_suffix}"));
    sqlx::raw_sql(&grants).execute(db.pool()).await.unwrap();
    sqlx::raw_sql(&format!("CREATE ROLE nobody_{role_suffix} NOLOGIN"))
        .execute(db.pool())
        .await
        .unwrap();

    let mut nobody = connect_as(&db, &format!("nobody_{role_suffix}")).await;
    let denied = error_of(&mut nobody, "SELECT count(*) FROM pgflow.runs").await;
    assert!(
        denied.contains("permission denied for schema pgflow"),
        "{denied}"
    );
    let denied = error_of(
        &mut nobody,
        "SELECT pgflow.start_flow('secured', '{}'::jsonb)",
    )
    .await;
    assert!(denied.contains("permission denied"), "{denied}");

    let mut app = connect_as(&db, &format!("app_{role_suffix}")).await;
    let run_id: uuid::Uuid =
        sqlx::query_scalar("SELECT run_id FROM pgflow.start_flow('secured', $1)")
            .bind(json!({"n": 1}))
            .fetch_one(&mut app)
            .await
            .unwrap();
    let worker = uuid::Uuid::new_v4();
    sqlx::query("INSERT INTO pgflow.workers (worker_id, queue_name, function_name) VALUES ($1, 'secured', 'test')")
        .bind(worker)
        .execute(&mut app)
        .await
        .unwrap();
    let ids: Vec<i64> =
        sqlx::query_scalar("SELECT msg_id FROM pgmq.read_with_poll('secured', 30, 10, 1, 50)")
            .fetch_all(&mut app)
            .await
            .unwrap();
    let started: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pgflow.start_tasks('secured', $1, $2)")
            .bind(&ids)
            .bind(worker)
            .fetch_one(&mut app)
            .await
            .unwrap();
    assert_eq!(started, 1);
    sqlx::query("SELECT pgflow.complete_task($1, 'only', 0, '\"done\"')")
        .bind(run_id)
        .execute(&mut app)
        .await
        .unwrap();

    // A flow compiled after the grants: its queue's own functions get the same EXECUTE
    // grants as the engine functions that call them, so the app runs it through the Rust
    // worker's read as well.
    let later =
        step_fn("only").handler(|v: Value, _ctx: StepContext| async move { Ok::<_, StepError>(v) });
    let later: Flow<Value> = Flow::new("secured_later").step(later).build();
    client.compile(&later).await.unwrap();
    let later_run: uuid::Uuid =
        sqlx::query_scalar("SELECT run_id FROM pgflow.start_flow('secured_later', '{}')")
            .fetch_one(&mut app)
            .await
            .unwrap();
    let started: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgflow._read_and_start('secured_later', 10, 30, $1)",
    )
    .bind(worker)
    .fetch_one(&mut app)
    .await
    .unwrap();
    assert_eq!(started, 1);
    sqlx::query("SELECT pgflow.complete_task($1, 'only', 0, '\"done\"')")
        .bind(later_run)
        .execute(&mut app)
        .await
        .unwrap();

    let mut reader = connect_as(&db, &format!("reader_{role_suffix}")).await;
    let status: String = sqlx::query_scalar("SELECT status FROM pgflow.runs WHERE run_id = $1")
        .bind(run_id)
        .fetch_one(&mut reader)
        .await
        .unwrap();
    assert_eq!(status, "completed");
    let status: String = sqlx::query_scalar("SELECT status FROM pgflow.runs WHERE run_id = $1")
        .bind(later_run)
        .fetch_one(&mut reader)
        .await
        .unwrap();
    assert_eq!(status, "completed");
    let denied = error_of(&mut reader, "UPDATE pgflow.runs SET status = 'failed'").await;
    assert!(
        denied.contains("permission denied for table runs"),
        "{denied}"
    );
    let denied = error_of(
        &mut reader,
        "SELECT pgflow.start_flow('secured', '{}'::jsonb)",
    )
    .await;
    assert!(denied.contains("permission denied"), "{denied}");

    for conn in [nobody, app, reader] {
        conn.close().await.unwrap();
    }
    let script = format!(
        "DROP OWNED BY app_{s}, reader_{s}, nobody_{s}; DROP ROLE app_{s}, reader_{s}, nobody_{s};",
        s = role_suffix
    );
    sqlx::raw_sql(&script).execute(db.pool()).await.unwrap();
}

//! Least privilege: the roles of docs/security.md, set up with its SQL as written, each doing its
//! job and refused everything else.

use std::str::FromStr;
use std::time::Duration;

use pgflow_client::throwaway::TestDatabase;
use pgflow_client::{Client, Worker};
use pgflow_core::{Flow, StepContext, StepError, step_fn};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use crate::support::database;

/// The ```sql blocks of docs/security.md, in order, so the test runs what users are told to run.
fn documented_sql() -> Vec<String> {
    let doc = include_str!("../../docs/security.md");
    let mut blocks = Vec::new();
    let mut rest = doc;
    while let Some(start) = rest.find("```sql\n") {
        let body = &rest[start + "```sql\n".len()..];
        let end = body.find("```").expect("the block's end");
        blocks.push(body[..end].to_string());
        rest = &body[end..];
        rest = &rest[3..];
    }
    blocks
}

/// Roles are cluster-wide: each test names its roles after its own database, so that tests
/// running at the same time on one server do not share them.
struct Roles {
    suffix: String,
}

impl Roles {
    const NAMES: [&'static str; 6] = [
        "pgflow_app",
        "pgflow_worker",
        "pgflow_reader",
        "orders_service",
        "orders_worker",
        "grafana",
    ];

    fn new(db: &TestDatabase) -> Self {
        Self {
            suffix: db.name().trim_start_matches("pgflow_test_").to_string(),
        }
    }

    fn name(&self, role: &str) -> String {
        format!("{role}_{}", self.suffix)
    }

    fn rename(&self, sql: &str) -> String {
        Self::NAMES.iter().fold(sql.to_string(), |sql, role| {
            sql.replace(role, &self.name(role))
        })
    }

    async fn drop(&self, db: &TestDatabase, extra: &[String]) {
        let mut roles: Vec<String> = Self::NAMES.iter().map(|role| self.name(role)).collect();
        roles.extend(extra.iter().cloned());
        let list = roles.join(", ");
        sqlx::raw_sql(&format!("DROP OWNED BY {list}; DROP ROLE {list};"))
            .execute(db.pool())
            .await
            .unwrap();
    }
}

/// A connection of the superuser that acts as `role` through SET ROLE (the engine then sees
/// the role in setting `role`).
async fn set_role(db: &TestDatabase, role: &str) -> PgConnection {
    let mut conn = PgConnection::connect(db.url()).await.unwrap();
    sqlx::raw_sql(&format!("SET ROLE {role}"))
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

/// A pool that logs in as `role` (the engine then sees the role as `session_user`); the test
/// server trusts local logins.
async fn pool_of(db: &TestDatabase, role: &str) -> PgPool {
    let options = PgConnectOptions::from_str(db.url()).unwrap().username(role);
    PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap()
}

/// Runs `sql` expecting a refusal that contains `expected`.
async fn refused(conn: &mut PgConnection, sql: &str, expected: &str) {
    match sqlx::raw_sql(sql).execute(&mut *conn).await {
        Ok(_) => panic!("{sql} succeeded; expected: {expected}"),
        Err(err) => {
            let err = err.to_string();
            assert!(err.contains(expected), "{sql}: {err}; expected: {expected}");
        }
    }
}

async fn scalar<T>(conn: &mut PgConnection, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sql).fetch_one(&mut *conn).await.unwrap()
}

fn echo(slug: &str) -> Flow<Value> {
    let only =
        step_fn("only").handler(|v: Value, _ctx: StepContext| async move { Ok::<_, StepError>(v) });
    Flow::new(slug).step(only).build()
}

/// The grants earlier versions of docs/security.md gave, which the upgrade block takes back.
const EARLIER_GRANTS: &str = "
CREATE ROLE pgflow_app NOLOGIN;
GRANT USAGE ON SCHEMA pgflow, pgmq TO pgflow_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgflow TO pgflow_app;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgflow TO pgflow_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgmq TO pgflow_app;
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA pgmq TO pgflow_app;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgmq TO pgflow_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA pgmq
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO pgflow_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA pgmq
  GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO pgflow_app;
";

/// The database with flows `orders` (which the doc grants to `orders_worker`) and `payroll`,
/// and the documented grants applied (after the earlier ones and the upgrade block when
/// `upgrade`); returns a run and a worker row of `payroll` made by the owner, the targets of
/// the forgeries.
async fn secured(db: &TestDatabase, roles: &Roles, upgrade: bool) -> (Uuid, Uuid) {
    let client = Client::new(db.pool().clone());
    client.compile(&echo("orders")).await.unwrap();
    client.compile(&echo("payroll")).await.unwrap();
    let blocks = documented_sql();
    assert_eq!(
        blocks.len(),
        4,
        "the grant example, the grants, the logins, the upgrade"
    );
    let (grants, logins, take_back) = (blocks[1].as_str(), blocks[2].as_str(), blocks[3].as_str());
    let script = if upgrade {
        vec![EARLIER_GRANTS, take_back, grants, logins]
    } else {
        vec![grants, logins]
    };
    for sql in script {
        sqlx::raw_sql(&roles.rename(sql))
            .execute(db.pool())
            .await
            .unwrap();
    }
    // What the doc shows about the helper is what the logins block does.
    assert!(logins.contains(blocks[0].lines().next().unwrap()));

    let payroll_run: Uuid =
        sqlx::query_scalar("SELECT run_id FROM pgflow.start_flow('payroll', '{}')")
            .fetch_one(db.pool())
            .await
            .unwrap();
    let payroll_worker = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) VALUES ($1, 'payroll', 'owner')",
    )
    .bind(payroll_worker)
    .execute(db.pool())
    .await
    .unwrap();
    (payroll_run, payroll_worker)
}

#[tokio::test]
async fn the_app_starts_and_reads_runs_and_nothing_else() {
    let db = database().await;
    let roles = Roles::new(&db);
    let (payroll_run, payroll_worker) = secured(&db, &roles, true).await;
    let mut app = set_role(&db, &roles.name("orders_service")).await;

    let started: i64 = scalar(
        &mut app,
        "SELECT count(*) FROM pgflow.start_flow('orders', '{\"n\": 1}')",
    )
    .await;
    assert_eq!(started, 1);
    let states: Value = scalar(
        &mut app,
        "SELECT pgflow.start_flow_with_states('orders', '{}') -> 'steps' -> 0 -> 'status'",
    )
    .await;
    assert_eq!(states, json!("started"));
    let runs: i64 = scalar(
        &mut app,
        "SELECT count(*) FROM pgflow.runs r JOIN pgflow.step_states s USING (run_id) \
           JOIN pgflow.step_tasks t USING (run_id)",
    )
    .await;
    assert_eq!(runs, 3);

    for (sql, expected) in [
        (
            "SELECT pgflow.add_step('orders', 'extra')",
            "permission denied for function add_step",
        ),
        (
            "SELECT pgflow.create_flow('orders', 9)",
            "permission denied for function create_flow",
        ),
        (
            "UPDATE pgflow.flows SET opt_max_attempts = 9",
            "permission denied for table flows",
        ),
        (
            "INSERT INTO pgflow.steps (flow_slug, step_slug, step_index) VALUES ('orders', 'x', 9)",
            "permission denied for table steps",
        ),
        (
            "DELETE FROM pgflow.runs",
            "permission denied for table runs",
        ),
        (
            "UPDATE pgflow.step_tasks SET status = 'completed'",
            "permission denied for table step_tasks",
        ),
        (
            "UPDATE pgflow.workers SET deprecated_at = now()",
            "permission denied for table workers",
        ),
        (
            &format!("SELECT pgflow.complete_task('{payroll_run}', 'only', 0, '1')"),
            "permission denied for function complete_task",
        ),
        (
            &format!("SELECT pgflow.fail_task('{payroll_run}', 'only', 0, 'x')"),
            "permission denied for function fail_task",
        ),
        (
            &format!("SELECT pgflow._read_and_start('payroll', 1, 30, '{payroll_worker}')"),
            "permission denied for function _read_and_start",
        ),
        (
            "SELECT pgmq.create('squat')",
            "permission denied for schema pgmq",
        ),
        (
            "SELECT count(*) FROM pgmq.q_orders",
            "permission denied for schema pgmq",
        ),
    ] {
        refused(&mut app, sql, expected).await;
    }
    app.close().await.unwrap();
    roles.drop(&db, &[]).await;
}

#[tokio::test]
async fn a_worker_serves_its_granted_flows_and_touches_nothing_else() {
    let db = database().await;
    let roles = Roles::new(&db);
    let (payroll_run, payroll_worker) = secured(&db, &roles, false).await;
    let mut worker = set_role(&db, &roles.name("orders_worker")).await;

    // A TypeScript worker's start-up: the flow the owner compiled is verified; the worker
    // compiles, recompiles and deletes nothing.
    let verified: Value = sqlx::query_scalar(
        "SELECT pgflow.ensure_flow_compiled('orders', '{\"steps\": [{\"slug\": \"only\"}]}')",
    )
    .fetch_one(&mut worker)
    .await
    .unwrap();
    assert_eq!(verified["status"], "verified", "{verified}");
    for (sql, expected) in [
        (
            "SELECT pgflow.ensure_flow_compiled('orders', '{\"steps\": []}', true)",
            "permission denied for function ensure_flow_compiled",
        ),
        (
            "SELECT pgflow.ensure_flow_compiled('fresh', '{\"steps\": []}')",
            "permission denied: compiling flow \"fresh\" (ensure_flow_compiled) is for the owner",
        ),
        (
            "SELECT pgflow.delete_flow_and_data('orders')",
            "permission denied for function delete_flow_and_data",
        ),
        (
            "SELECT pgflow.ensure_flow_compiled('payroll', '{\"steps\": []}')",
            "permission denied for flow payroll",
        ),
    ] {
        refused(&mut worker, sql, expected).await;
    }

    // The protocol, by hand, on its own flow.
    let orders_run: Uuid =
        sqlx::query_scalar("SELECT run_id FROM pgflow.start_flow('orders', '1')")
            .fetch_one(db.pool())
            .await
            .unwrap();
    let own = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO pgflow.workers AS w (worker_id, queue_name, function_name) \
         VALUES ($1, 'orders', 'by hand') \
         ON CONFLICT (worker_id) DO UPDATE SET last_heartbeat_at = now() RETURNING w.worker_id",
    )
    .bind(own)
    .fetch_one(&mut worker)
    .await
    .unwrap();
    let started: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pgflow._read_and_start('orders', 10, 30, $1)")
            .bind(own)
            .fetch_one(&mut worker)
            .await
            .unwrap();
    assert_eq!(started, 1);
    let completed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgflow.complete_tasks(ARRAY[$1], ARRAY['only'], ARRAY[0], ARRAY['2'::jsonb], ARRAY[1], ARRAY[$2])",
    )
    .bind(orders_run)
    .bind(own)
    .fetch_one(&mut worker)
    .await
    .unwrap();
    assert_eq!(completed, 1);
    let deprecated =
        sqlx::query("UPDATE pgflow.workers SET deprecated_at = now() WHERE worker_id = $1")
            .bind(own)
            .execute(&mut worker)
            .await
            .unwrap();
    assert_eq!(deprecated.rows_affected(), 1);

    let denied = "permission denied for flow payroll";
    for (sql, expected) in [
        (
            format!("SELECT pgflow._read_and_start('payroll', 10, 30, '{payroll_worker}')"),
            denied,
        ),
        (
            format!("SELECT pgflow.start_tasks('payroll', ARRAY[1, 2]::bigint[], '{payroll_worker}')"),
            denied,
        ),
        (
            format!("SELECT pgflow.complete_task('{payroll_run}', 'only', 0, '\"forged\"')"),
            denied,
        ),
        (
            format!("SELECT pgflow.complete_task('{payroll_run}', 'only', 0, '\"forged\"', 1)"),
            denied,
        ),
        (
            format!(
                "SELECT pgflow.complete_tasks(ARRAY['{orders_run}', '{payroll_run}']::uuid[], \
                 ARRAY['only', 'only'], ARRAY[0, 0], ARRAY['1', '1']::jsonb[])"
            ),
            denied,
        ),
        (
            format!(
                "SELECT pgflow.complete_tasks(ARRAY['{payroll_run}']::uuid[], ARRAY['only'], \
                 ARRAY[0], ARRAY['1']::jsonb[], ARRAY[1])"
            ),
            denied,
        ),
        (
            format!("SELECT pgflow.fail_task('{payroll_run}', 'only', 0, 'forged')"),
            denied,
        ),
        (
            format!("SELECT pgflow.fail_task('{payroll_run}', 'only', 0, 'forged', 1, NULL, true)"),
            denied,
        ),
        // Its own flow, but naming another flow's worker row.
        (
            format!("SELECT pgflow._read_and_start('orders', 10, 30, '{payroll_worker}')"),
            "is not registered for flow orders",
        ),
        (
            "SELECT pgflow.start_flow('orders', '{}')".into(),
            "permission denied for function start_flow",
        ),
        (
            "SELECT pgflow.add_step('orders', 'extra')".into(),
            "permission denied for function add_step",
        ),
        (
            "SELECT pgflow.create_flow('orders', 9)".into(),
            "permission denied for function create_flow",
        ),
        (
            "SELECT pgflow.grant_flow_to_worker('payroll', current_user)".into(),
            "permission denied for function grant_flow_to_worker",
        ),
        (
            "DELETE FROM pgflow.runs".into(),
            "permission denied for table runs",
        ),
        (
            "UPDATE pgflow.step_tasks SET status = 'completed'".into(),
            "permission denied for table step_tasks",
        ),
        (
            "SELECT output FROM pgflow.step_tasks".into(),
            "permission denied for table step_tasks",
        ),
        (
            "DELETE FROM pgflow.workers".into(),
            "permission denied for table workers",
        ),
        (
            format!(
                "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) \
                 VALUES ('{}', 'payroll', 'squatter')",
                Uuid::new_v4()
            ),
            "new row violates row-level security policy for table \"workers\"",
        ),
        // A heartbeat on another flow's row.
        (
            format!(
                "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) \
                 VALUES ('{payroll_worker}', 'orders', 'x') \
                 ON CONFLICT (worker_id) DO UPDATE SET deprecated_at = now()"
            ),
            "new row violates row-level security policy (USING expression) for table \"workers\"",
        ),
        (
            "SELECT pgmq.create('squat')".into(),
            "permission denied for function create",
        ),
        (
            "SELECT pgmq.read('orders', 30, 1)".into(),
            "permission denied for function read",
        ),
        (
            "SELECT pgmq.send('orders', '{}')".into(),
            "permission denied for function send",
        ),
        (
            "INSERT INTO pgmq.meta (queue_name, is_partitioned, is_unlogged) VALUES ('squat', false, false)"
                .into(),
            "permission denied for table meta",
        ),
        (
            "SELECT count(*) FROM pgmq.q_payroll".into(),
            "permission denied for table q_payroll",
        ),
        (
            "DELETE FROM pgmq.q_orders".into(),
            "permission denied for table q_orders",
        ),
        (
            "SELECT pgflow._queue_read_orders('orders', 1, 30)".into(),
            "permission denied for function _queue_read_orders",
        ),
    ] {
        refused(&mut worker, &sql, expected).await;
    }
    // Deprecating another flow's worker is no error: its row is simply not one it may change.
    let deprecated = sqlx::query("UPDATE pgflow.workers SET deprecated_at = now()")
        .execute(&mut worker)
        .await
        .unwrap();
    assert_eq!(deprecated.rows_affected(), 1, "its own row only");
    let (payroll_status, payroll_deprecated): (String, bool) = sqlx::query_as(
        "SELECT t.status, w.deprecated_at IS NOT NULL FROM pgflow.step_tasks t, pgflow.workers w \
          WHERE t.run_id = $1 AND w.worker_id = $2",
    )
    .bind(payroll_run)
    .bind(payroll_worker)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(
        (payroll_status.as_str(), payroll_deprecated),
        ("queued", false)
    );

    // Granting takes effect at once, and so does taking the grant back; a plain GRANT is the
    // same as the helper.
    let login = roles.name("orders_worker");
    sqlx::query("SELECT pgflow.grant_flow_to_worker('payroll', $1)")
        .bind(&login)
        .execute(db.pool())
        .await
        .unwrap();
    let seen: i64 = scalar(&mut worker, "SELECT count(*) FROM pgmq.q_payroll").await;
    assert_eq!(seen, 1);
    sqlx::query("SELECT pgflow.revoke_flow_from_worker('payroll', $1)")
        .bind(&login)
        .execute(db.pool())
        .await
        .unwrap();
    refused(
        &mut worker,
        &format!("SELECT pgflow.fail_task('{payroll_run}', 'only', 0, 'forged')"),
        denied,
    )
    .await;
    sqlx::raw_sql(&format!(
        "GRANT SELECT, UPDATE ON pgmq.q_payroll TO {login}"
    ))
    .execute(db.pool())
    .await
    .unwrap();
    let failed: String = scalar(
        &mut worker,
        &format!("SELECT status FROM pgflow.fail_task('{payroll_run}', 'only', 0, 'granted')"),
    )
    .await;
    assert_eq!(
        failed, "queued",
        "allowed; a task that is not started does not change"
    );

    // The helper checks what it is given.
    for (sql, expected) in [
        (
            format!("SELECT pgflow.grant_flow_to_worker('nope', '{login}')"),
            "flow \"nope\" does not exist",
        ),
        (
            "SELECT pgflow.grant_flow_to_worker('orders', 'no_such_role')".to_string(),
            "role \"no_such_role\" does not exist",
        ),
    ] {
        let err = sqlx::raw_sql(&sql)
            .execute(db.pool())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{sql}: {err}");
    }

    worker.close().await.unwrap();
    roles.drop(&db, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_worker_runs_granted_flows_end_to_end_under_the_worker_role() {
    let db = database().await;
    let roles = Roles::new(&db);
    let (payroll_run, _) = secured(&db, &roles, false).await;
    let app = pool_of(&db, &roles.name("orders_service")).await;
    let workers = pool_of(&db, &roles.name("orders_worker")).await;

    let orders = Worker::builder(workers.clone())
        .flow(echo("orders"))
        .poll_interval(Duration::from_millis(50))
        .spawn()
        .unwrap();
    let client = Client::new(app.clone());
    let run = client
        .start(&echo("orders"), &json!({"n": 7}))
        .await
        .unwrap();
    let output = run.wait_timeout(Duration::from_secs(30)).await.unwrap();
    assert_eq!(output.output(), &json!({"only": {"n": 7}}));
    let orders_id = orders.worker_id("orders").unwrap();
    orders.shutdown().await.unwrap();
    let deprecated: bool = sqlx::query_scalar(
        "SELECT deprecated_at IS NOT NULL FROM pgflow.workers WHERE worker_id = $1",
    )
    .bind(orders_id)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert!(deprecated, "its shutdown marks its row");

    // Its failures go through the checked fail_task too.
    let refusing = step_fn("only").handler(|_v: Value, _ctx: StepContext| async move {
        Err::<Value, _>(StepError::new("bad input").no_retry())
    });
    let refusing: Flow<Value> = Flow::new("orders").step(refusing).build();
    let failing = Worker::builder(workers.clone())
        .flow(refusing)
        .poll_interval(Duration::from_millis(50))
        .spawn()
        .unwrap();
    let run = client.start(&echo("orders"), &json!(1)).await.unwrap();
    let failure = run
        .wait_timeout(Duration::from_secs(30))
        .await
        .unwrap_err()
        .to_string();
    assert!(failure.contains("bad input"), "{failure}");
    failing.shutdown().await.unwrap();

    // The same worker role on a flow it was not granted: nothing is taken, nothing registered.
    let payroll = Worker::builder(workers.clone())
        .flow(echo("payroll"))
        .poll_interval(Duration::from_millis(50))
        .spawn()
        .unwrap();
    let payroll_id = payroll.worker_id("payroll").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, rows): (String, i64) = sqlx::query_as(
        "SELECT (SELECT status FROM pgflow.step_tasks WHERE run_id = $1), \
                (SELECT count(*) FROM pgflow.workers WHERE worker_id = $2)",
    )
    .bind(payroll_run)
    .bind(payroll_id)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!((status.as_str(), rows), ("queued", 0));
    assert_eq!(payroll.stats().started, 0);
    let _ = payroll.shutdown().await;

    app.close().await;
    workers.close().await;
    roles.drop(&db, &[]).await;
}

#[tokio::test]
async fn the_reader_checks_and_reads_everything_and_changes_nothing() {
    let db = database().await;
    let roles = Roles::new(&db);
    let (payroll_run, _) = secured(&db, &roles, false).await;
    // A flow compiled after the grants: the reader sees its queue, no worker role serves it,
    // and its queue functions are the owner's alone.
    Client::new(db.pool().clone())
        .compile(&echo("later"))
        .await
        .unwrap();
    sqlx::query("SELECT pgflow.start_flow('later', '{}')")
        .execute(db.pool())
        .await
        .unwrap();
    let granted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_proc p CROSS JOIN LATERAL aclexplode(p.proacl) acl \
          WHERE p.pronamespace = 'pgflow'::regnamespace AND p.proname LIKE '\\_queue\\_%' \
            AND acl.grantee <> p.proowner",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(
        granted, 0,
        "queue functions are executable by the owner alone"
    );

    let reader_pool = pool_of(&db, &roles.name("grafana")).await;
    // Nothing is inconsistent; the run of `later` is stuck, no worker serving it.
    let findings = pgflow_client::check(&reader_pool).await.unwrap();
    let found: Vec<_> = findings
        .iter()
        .map(|f| (f.kind, f.rule, f.flow_slug.as_str()))
        .collect();
    assert_eq!(
        found,
        [(pgflow_client::FindingKind::Stuck, "no_live_worker", "later")]
    );
    let mut reader = set_role(&db, &roles.name("grafana")).await;
    let status: String = sqlx::query_scalar("SELECT status FROM pgflow.runs WHERE run_id = $1")
        .bind(payroll_run)
        .fetch_one(&mut reader)
        .await
        .unwrap();
    assert_eq!(status, "started");
    let visible: i64 = scalar(
        &mut reader,
        "SELECT (SELECT count(*) FROM pgmq.q_later) + (SELECT count(*) FROM pgflow.workers)",
    )
    .await;
    assert_eq!(visible, 2);
    let worker_role = roles.name("orders_worker");
    let mut worker = set_role(&db, &worker_role).await;
    refused(
        &mut worker,
        "SELECT pgflow._read_and_start('later', 1, 30, NULL)",
        "permission denied for flow later",
    )
    .await;
    worker.close().await.unwrap();

    for (sql, expected) in [
        (
            "UPDATE pgflow.runs SET status = 'failed'",
            "permission denied for table runs",
        ),
        (
            "DELETE FROM pgflow.flows",
            "permission denied for table flows",
        ),
        (
            "SELECT pgflow.start_flow('orders', '{}')",
            "permission denied for function start_flow",
        ),
        (
            "SELECT pgflow._read_and_start('orders', 1, 30, NULL)",
            "permission denied for function _read_and_start",
        ),
        (
            "SELECT pgmq.create('squat')",
            "permission denied for function create",
        ),
        (
            "DELETE FROM pgmq.q_orders",
            "permission denied for table q_orders",
        ),
    ] {
        refused(&mut reader, sql, expected).await;
    }

    // A role granted nothing is refused everything.
    let nobody = format!("nobody_{}", roles.suffix);
    sqlx::raw_sql(&format!("CREATE ROLE {nobody} NOLOGIN"))
        .execute(db.pool())
        .await
        .unwrap();
    let mut stranger = set_role(&db, &nobody).await;
    refused(
        &mut stranger,
        "SELECT count(*) FROM pgflow.runs",
        "permission denied for schema pgflow",
    )
    .await;
    refused(
        &mut stranger,
        "SELECT pgflow.start_flow('orders', '{}')",
        "permission denied for schema pgflow",
    )
    .await;

    for conn in [reader, stranger] {
        conn.close().await.unwrap();
    }
    reader_pool.close().await;
    roles.drop(&db, &[nobody]).await;
}

#[tokio::test]
async fn failed_attempts_are_recorded_for_the_worker_role_and_readable_by_the_reader() {
    let db = database().await;
    let roles = Roles::new(&db);
    secured(&db, &roles, false).await;
    let orders_run: Uuid =
        sqlx::query_scalar("SELECT run_id FROM pgflow.start_flow('orders', '1')")
            .fetch_one(db.pool())
            .await
            .unwrap();
    let own = Uuid::new_v4();
    let mut worker = set_role(&db, &roles.name("orders_worker")).await;
    sqlx::query(
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) \
         VALUES ($1, 'orders', 'by hand')",
    )
    .bind(own)
    .execute(&mut worker)
    .await
    .unwrap();
    let started: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pgflow._read_and_start('orders', 10, 30, $1)")
            .bind(own)
            .fetch_one(&mut worker)
            .await
            .unwrap();
    assert_eq!(started, 1);
    // The worker role has no privilege on pgflow_ext; the trigger writes as the owner.
    let failed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgflow.fail_task($1, 'only', 0, 'card declined', 1, $2, true)",
    )
    .bind(orders_run)
    .bind(own)
    .fetch_one(&mut worker)
    .await
    .unwrap();
    assert_eq!(failed, 1);
    refused(
        &mut worker,
        "SELECT count(*) FROM pgflow_ext.step_task_attempts",
        "permission denied for schema pgflow_ext",
    )
    .await;
    worker.close().await.unwrap();

    let mut reader = set_role(&db, &roles.name("grafana")).await;
    let recorded: (i32, String, Option<Uuid>) = sqlx::query_as(
        "SELECT attempt, error_message, last_worker_id \
           FROM pgflow_ext.step_task_attempts WHERE run_id = $1",
    )
    .bind(orders_run)
    .fetch_one(&mut reader)
    .await
    .unwrap();
    assert_eq!(recorded, (1, "card declined".to_owned(), Some(own)));
    refused(
        &mut reader,
        "DELETE FROM pgflow_ext.step_task_attempts",
        "permission denied for table step_task_attempts",
    )
    .await;
    reader.close().await.unwrap();

    // A role that updates step_tasks directly (as the grants before 0004 allowed) needs no
    // privilege on pgflow_ext for its failures to be recorded.
    let legacy = format!("legacy_{}", roles.suffix);
    sqlx::raw_sql(&format!(
        "CREATE ROLE {legacy} NOLOGIN; GRANT USAGE ON SCHEMA pgflow TO {legacy}; \
         GRANT SELECT, UPDATE ON pgflow.step_tasks TO {legacy};"
    ))
    .execute(db.pool())
    .await
    .unwrap();
    let payroll_run: Uuid =
        sqlx::query_scalar("SELECT run_id FROM pgflow.start_flow('payroll', '{}')")
            .fetch_one(db.pool())
            .await
            .unwrap();
    let mut direct = set_role(&db, &legacy).await;
    sqlx::query(
        "UPDATE pgflow.step_tasks SET status = 'started', attempts_count = 1, started_at = now() \
          WHERE run_id = $1",
    )
    .bind(payroll_run)
    .execute(&mut direct)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE pgflow.step_tasks SET status = 'queued', started_at = NULL, \
                error_message = 'by hand' WHERE run_id = $1",
    )
    .bind(payroll_run)
    .execute(&mut direct)
    .await
    .unwrap();
    direct.close().await.unwrap();
    let recorded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgflow_ext.step_task_attempts \
          WHERE run_id = $1 AND error_message = 'by hand'",
    )
    .bind(payroll_run)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(recorded, 1);

    roles.drop(&db, &[legacy]).await;
}

/// A worker under the worker role learns that a run it works on was cancelled, and fails no
/// task meanwhile: without notifications, from the columns of `step_tasks` the role may read
/// (issue 19), and with them, from `pgflow_cancel`, which needs no privilege.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_role_learns_of_cancelled_runs_with_and_without_notifications() {
    let db = database().await;
    let roles = Roles::new(&db);
    secured(&db, &roles, false).await;
    let workers = pool_of(&db, &roles.name("orders_worker")).await;
    let client = Client::new(db.pool().clone());

    for notifications in [false, true] {
        let (entered, fired) = (
            std::sync::Arc::new(tokio::sync::Notify::new()),
            std::sync::Arc::new(tokio::sync::Notify::new()),
        );
        let (on_entry, on_fire) = (entered.clone(), fired.clone());
        let waiting = step_fn("only").handler(move |_v: Value, ctx: StepContext| {
            let (on_entry, on_fire) = (on_entry.clone(), on_fire.clone());
            async move {
                on_entry.notify_one();
                ctx.cancellation_token().cancelled().await;
                on_fire.notify_one();
                Ok::<_, StepError>(Value::Null)
            }
        });
        let waiting: Flow<Value> = Flow::new("orders").step(waiting).build();
        let worker = Worker::builder(workers.clone())
            .flow(waiting)
            .notifications(notifications)
            .heartbeat_interval(Duration::from_millis(300))
            .spawn()
            .unwrap();
        let run = client.start(&echo("orders"), &json!(1)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(20), entered.notified())
            .await
            .expect("the handler runs");
        let cancelled: bool = sqlx::query_scalar("SELECT pgflow.cancel_run($1)")
            .bind(run.id())
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert!(cancelled);
        tokio::time::timeout(Duration::from_secs(3), fired.notified())
            .await
            .unwrap_or_else(|_| panic!("notifications {notifications}: the token never fired"));
        let stats = worker.stats();
        worker.shutdown().await.unwrap();
        assert_eq!((stats.failed, stats.completed), (0, 0), "{stats:?}");
    }

    workers.close().await;
    roles.drop(&db, &[]).await;
}

/// Migration 0012 under the documented grants: the app stores the trace context of the runs it
/// starts (through the function, never by writing the table), the worker reads the telemetry
/// of its own flow's tasks only, and the reader sees the table.
#[tokio::test]
async fn trace_contexts_are_written_by_the_app_and_read_by_the_workers_of_the_flow() {
    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let db = database().await;
    let roles = Roles::new(&db);
    let (payroll_run, payroll_worker) = secured(&db, &roles, false).await;

    let mut app = set_role(&db, &roles.name("orders_service")).await;
    let (run, stored): (Uuid, bool) = sqlx::query_as(&format!(
        "SELECT s.run_id, pgflow.set_run_trace_context(s.run_id, '{TRACEPARENT}', 'a=b') \
           FROM (SELECT run_id FROM pgflow.start_flow('orders', '1')) s"
    ))
    .fetch_one(&mut app)
    .await
    .expect("the app stores its context with the run it starts");
    assert!(stored);
    refused(
        &mut app,
        &format!(
            "INSERT INTO pgflow_ext.run_trace_context (run_id, traceparent) \
             VALUES ('{payroll_run}', '{TRACEPARENT}')"
        ),
        "permission denied",
    )
    .await;
    refused(
        &mut app,
        &format!("SELECT pgflow.started_task_telemetry('orders', NULL, ARRAY['{run}'::uuid], ARRAY['only'], ARRAY[0])"),
        "permission denied for function started_task_telemetry",
    )
    .await;

    let mut worker = set_role(&db, &roles.name("orders_worker")).await;
    let orders_worker = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) VALUES ($1, 'orders', 'w')",
    )
    .bind(orders_worker)
    .execute(&mut worker)
    .await
    .unwrap();
    let read: Vec<(Uuid, String, i32)> = sqlx::query_as(
        "SELECT run_id, step_slug, task_index FROM pgflow._read_and_start('orders', 10, 30, $1)",
    )
    .bind(orders_worker)
    .fetch_all(&mut worker)
    .await
    .unwrap();
    assert_eq!(read.len(), 1, "{read:?}");
    let (ord, traceparent, tracestate): (i64, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT ord, traceparent, tracestate \
           FROM pgflow.started_task_telemetry('orders', $1, ARRAY[$2::uuid], ARRAY['only'], ARRAY[0])",
    )
    .bind(orders_worker)
    .bind(run)
    .fetch_one(&mut worker)
    .await
    .expect("the worker reads its own task's context");
    assert_eq!(ord, 1);
    assert_eq!(traceparent.as_deref(), Some(TRACEPARENT));
    assert_eq!(tracestate.as_deref(), Some("a=b"));
    refused(
        &mut worker,
        &format!(
            "SELECT pgflow.started_task_telemetry('payroll', '{payroll_worker}', \
             ARRAY['{payroll_run}'::uuid], ARRAY['only'], ARRAY[0])"
        ),
        "permission denied for flow payroll",
    )
    .await;
    refused(
        &mut worker,
        &format!("SELECT pgflow.set_run_trace_context('{payroll_run}', '{TRACEPARENT}')"),
        "permission denied for function set_run_trace_context",
    )
    .await;
    refused(
        &mut worker,
        "SELECT count(*) FROM pgflow_ext.run_trace_context",
        "permission denied",
    )
    .await;

    let mut reader = set_role(&db, &roles.name("grafana")).await;
    let rows: i64 = scalar(
        &mut reader,
        "SELECT count(*) FROM pgflow_ext.run_trace_context",
    )
    .await;
    assert_eq!(rows, 1);
    drop((app, worker, reader));
    roles.drop(&db, &[]).await;
}

#[tokio::test]
async fn the_worker_role_sweeps_stalled_tasks_and_the_app_and_reader_cannot() {
    let db = database().await;
    let roles = Roles::new(&db);
    let (payroll_run, _) = secured(&db, &roles, false).await;
    // payroll's task started long ago by a lost worker: the sweep runs as the owner, so a
    // worker role that does not serve payroll still requeues it (the engine's own rule).
    sqlx::raw_sql(&format!(
        "SELECT count(*) FROM pgflow.start_tasks('payroll', \
                  ARRAY(SELECT message_id FROM pgflow.step_tasks WHERE run_id = '{payroll_run}'), \
                  (SELECT worker_id FROM pgflow.workers WHERE queue_name = 'payroll')); \
         UPDATE pgflow.step_tasks SET started_at = started_at - interval '1 hour', \
                                      queued_at = queued_at - interval '1 hour' \
          WHERE run_id = '{payroll_run}';"
    ))
    .execute(db.pool())
    .await
    .unwrap();
    let mut worker = set_role(&db, &roles.name("orders_worker")).await;
    let swept: Option<i32> = scalar(
        &mut worker,
        "SELECT pgflow.requeue_stalled_tasks_due(interval '30 seconds')",
    )
    .await;
    assert_eq!(swept, Some(1));
    let again: i32 = scalar(&mut worker, "SELECT pgflow.requeue_stalled_tasks()").await;
    assert_eq!(again, 0);
    refused(
        &mut worker,
        "UPDATE pgflow_ext.sweeps SET last_at = '-infinity'",
        "permission denied",
    )
    .await;
    // Deciding conditions and skipping steps stay the engine's: no role may skip another
    // flow's steps (or its own) by calling them.
    for (sql, function) in [
        (
            format!("SELECT pgflow.cascade_resolve_conditions('{payroll_run}')"),
            "cascade_resolve_conditions",
        ),
        (
            format!(
                "SELECT pgflow._cascade_force_skip_steps('{payroll_run}', 'only', 'condition_unmet')"
            ),
            "_cascade_force_skip_steps",
        ),
    ] {
        refused(
            &mut worker,
            &sql,
            &format!("permission denied for function {function}"),
        )
        .await;
    }
    let mut app = set_role(&db, &roles.name("orders_service")).await;
    let mut reader = set_role(&db, &roles.name("grafana")).await;
    for conn in [&mut app, &mut reader] {
        refused(
            conn,
            "SELECT pgflow.requeue_stalled_tasks_due(interval '30 seconds')",
            "permission denied for function requeue_stalled_tasks_due",
        )
        .await;
        refused(
            conn,
            "SELECT pgflow.requeue_stalled_tasks()",
            "permission denied for function requeue_stalled_tasks",
        )
        .await;
    }
    drop((app, worker, reader));
    roles.drop(&db, &[]).await;
}

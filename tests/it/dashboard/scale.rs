//! The runs page over many runs reads them through indexes: its plans, not its timing (the
//! timing is measured by `examples/dashboard.rs --scale`).

use serde_json::Value;

use crate::support;

/// Every plan node of `plan`.
fn nodes(plan: &Value, out: &mut Vec<Value>) {
    out.push(plan.clone());
    if let Some(children) = plan.get("Plans").and_then(Value::as_array) {
        for child in children {
            nodes(child, out);
        }
    }
}

#[tokio::test]
async fn the_runs_page_reads_a_few_pages_of_two_hundred_thousand_runs() {
    let db = support::database().await;
    super::shop(db.pool()).await;
    sqlx::raw_sql(
        "SELECT pgflow.create_flow('other');
         SELECT pgflow.add_step('other', 'only');
         -- 200 days of runs, 1000 a day; most completed, some failed, cancelled or started.
         INSERT INTO pgflow.runs (flow_slug, status, input, started_at, completed_at, failed_at,
                                  cancelled_at)
         SELECT CASE WHEN i % 3 = 0 THEN 'other' ELSE 'shop' END, s.status, '{}', s.at,
                CASE WHEN s.status = 'completed' THEN s.at + interval '1 second' END,
                CASE WHEN s.status = 'failed' THEN s.at + interval '1 second' END,
                CASE WHEN s.status = 'cancelled' THEN s.at + interval '1 second' END
           FROM generate_series(1, 200000) AS i,
                LATERAL (SELECT now() - i * interval '86.4 seconds' AS at,
                                CASE WHEN i % 100 = 0 THEN 'failed'
                                     WHEN i % 101 = 0 THEN 'cancelled'
                                     WHEN i < 50 THEN 'started'
                                     ELSE 'completed' END AS status) AS s;",
    )
    .execute(db.pool())
    .await
    .expect("runs inserted");
    // The visibility map as a live table has it, for index-only scans; statistics.
    sqlx::raw_sql("VACUUM ANALYZE pgflow.runs")
        .execute(db.pool())
        .await
        .expect("vacuum");
    let pages: i32 =
        sqlx::query_scalar("SELECT relpages FROM pg_class WHERE oid = 'pgflow.runs'::regclass")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert!(pages > 2_000, "the table is large: {pages} pages");
    let oldest_page: String = sqlx::query_scalar(
        "SELECT to_char((now() - interval '150 days') AT TIME ZONE 'UTC',
                        'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
                || '~ffffffff-ffff-ffff-ffff-ffffffffffff'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    for filter in [
        String::new(),
        "status=failed".to_owned(),
        "flow=other".to_owned(),
        "flow=shop&status=cancelled".to_owned(),
        "since=2020-01-01&until=2100-01-01".to_owned(),
        format!("before={oldest_page}"),
        format!("flow=shop&after={oldest_page}"),
    ] {
        let plans = pgflow::dashboard::runs_page_plans(db.pool(), &filter)
            .await
            .expect("plans");
        assert_eq!(plans.len(), 3);
        for plan in plans {
            let root = &plan[0]["Plan"];
            let mut all = Vec::new();
            nodes(root, &mut all);
            for node in &all {
                assert!(
                    !(node["Node Type"] == "Seq Scan" && node["Relation Name"] == "runs"),
                    "`{filter}`: a sequential scan of the runs:\n{plan:#}"
                );
            }
            let touched = root["Shared Hit Blocks"].as_i64().unwrap_or(0)
                + root["Shared Read Blocks"].as_i64().unwrap_or(0);
            assert!(
                // A page of 51 runs of 4 statuses touches a few hundred pages (index and heap),
                // however many runs there are; reading all runs of a flow, thousands.
                touched < i64::from(pages) / 3,
                "`{filter}` touched {touched} of {pages} pages:\n{plan:#}"
            );
        }
    }
}

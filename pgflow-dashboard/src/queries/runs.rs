//! The runs page: a list paged by key, counts per status and throughput, each query served by
//! an index however many runs there are.

use chrono::{DateTime, Duration, Utc};
use pgflow_client::RunStatus;
use serde_json::Value;
use sqlx::{PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

use crate::Error;
use crate::params::{Cursor, Page, RunsFilter};

/// A line of the runs list.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct RunLine {
    pub(crate) run_id: Uuid,
    pub(crate) flow_slug: String,
    pub(crate) status: String,
    pub(crate) remaining_steps: i32,
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) ended_at: Option<DateTime<Utc>>,
    pub(crate) retry_count: i32,
    pub(crate) scheduled_for: Option<DateTime<Utc>>,
}

impl RunLine {
    pub(crate) fn cursor(&self) -> Cursor {
        Cursor {
            started_at: self.started_at,
            run_id: self.run_id,
        }
    }
}

/// What the runs page shows.
#[derive(Debug)]
pub(crate) struct RunsPage {
    pub(crate) runs: Vec<RunLine>,
    /// Whether runs older than the last line match too, and newer than the first.
    pub(crate) has_older: bool,
    pub(crate) has_newer: bool,
    /// The window the counts and the throughput cover.
    pub(crate) window: (DateTime<Utc>, DateTime<Utc>),
    /// Runs started in the window, by status (every status, zeros included).
    pub(crate) counts: Vec<(String, i64)>,
    /// Runs that ended in each of [`BUCKETS`] equal slices of the window: (completed, failed,
    /// cancelled).
    pub(crate) ended: Vec<[i64; 3]>,
    /// The flows, for the filter's choice.
    pub(crate) flows: Vec<String>,
    /// PostgreSQL's estimate of the number of runs (exact counts of millions of rows cost
    /// seconds); `None` before the table was first analyzed.
    pub(crate) estimated_total: Option<i64>,
}

/// Slices of the throughput chart.
pub(crate) const BUCKETS: i32 = 24;

/// The window counted when the filter gives no `since`: the last day.
const DEFAULT_WINDOW_HOURS: i64 = 24;

/// The statuses the page may list: one branch of the list query per status, each an index
/// range scan on `(status, started_at, run_id)` or `(flow_slug, status, started_at, run_id)`
/// (migration 0013), merged: a status filter of PostgreSQL's own (`status = ANY(...)`) would
/// read every run of the flow to sort them.
fn statuses(filter: &RunsFilter) -> Vec<String> {
    match filter.status {
        Some(status) => vec![status.to_string()],
        None => RunStatus::ALL.iter().map(ToString::to_string).collect(),
    }
}

/// The statuses of an ended run, as migration 0008's partial index `idx_runs_ended_at` names
/// them; spelled as literals, so that the planner can prove a query's predicate implies the
/// index's.
fn ended_statuses_sql() -> String {
    RunStatus::ALL
        .iter()
        .filter(|status| status.is_finished())
        .map(|status| format!("'{status}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The longest window counted: a count reads every run of its window, and a wide one over
/// millions of runs would take seconds (and let any visitor load the database at will).
pub(crate) const MAX_WINDOW_DAYS: i64 = 7;

/// The window of the counts and the throughput: the filter's time range, the last day of it
/// when it has no start, at most its last [`MAX_WINDOW_DAYS`].
fn window(filter: &RunsFilter, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let until = filter.until.unwrap_or(now);
    let since = filter
        .since
        .unwrap_or(until - Duration::hours(DEFAULT_WINDOW_HOURS))
        .max(until - Duration::days(MAX_WINDOW_DAYS));
    (since, until)
}

/// The list query: the page's runs and one more, to know whether there is a next page.
fn list_query(prefix: &str, filter: &RunsFilter) -> QueryBuilder<'static, Postgres> {
    let (compare, order) = match filter.page {
        Page::First | Page::Before(_) => ("<", "DESC"),
        Page::After(_) => (">", "ASC"),
    };
    let mut q = QueryBuilder::new(prefix);
    q.push(
        "SELECT r.run_id, r.flow_slug, r.status, r.remaining_steps, r.started_at, r.ended_at,
                r.retry_count, r.scheduled_for
           FROM unnest(",
    );
    q.push_bind(statuses(filter));
    q.push(
        "::text[]) AS s(status)
          CROSS JOIN LATERAL (
            SELECT r.run_id, r.flow_slug, r.status, r.remaining_steps, r.started_at,
                   coalesce(r.completed_at, r.failed_at, r.cancelled_at) AS ended_at,
                   r.retry_count, r.scheduled_for
              FROM pgflow.runs r
             WHERE r.status = s.status",
    );
    if let Some(flow) = &filter.flow {
        q.push(" AND r.flow_slug = ").push_bind(flow.clone());
    }
    if let Some(since) = filter.since {
        q.push(" AND r.started_at >= ").push_bind(since);
    }
    if let Some(until) = filter.until {
        q.push(" AND r.started_at < ").push_bind(until);
    }
    if let Page::Before(cursor) | Page::After(cursor) = filter.page {
        q.push(format!(" AND (r.started_at, r.run_id) {compare} ("))
            .push_bind(cursor.started_at)
            .push(", ")
            .push_bind(cursor.run_id)
            .push(")");
    }
    q.push(format!(
        " ORDER BY r.started_at {order}, r.run_id {order} LIMIT "
    ))
    .push_bind(filter.limit + 1);
    q.push(format!(
        ") r ORDER BY r.started_at {order}, r.run_id {order} LIMIT "
    ))
    .push_bind(filter.limit + 1);
    q
}

/// Runs started in the window, per status: one count per status, each an index-only range scan.
fn counts_query(
    prefix: &str,
    filter: &RunsFilter,
    window: (DateTime<Utc>, DateTime<Utc>),
) -> QueryBuilder<'static, Postgres> {
    let mut q = QueryBuilder::new(prefix);
    q.push("SELECT s.status, (SELECT count(*) FROM pgflow.runs r WHERE r.status = s.status");
    if let Some(flow) = &filter.flow {
        q.push(" AND r.flow_slug = ").push_bind(flow.clone());
    }
    q.push(" AND r.started_at >= ").push_bind(window.0);
    q.push(" AND r.started_at < ").push_bind(window.1);
    q.push(") FROM unnest(");
    q.push_bind(statuses(filter));
    q.push("::text[]) WITH ORDINALITY AS s(status, n) ORDER BY s.n");
    q
}

/// Runs that ended in the window, per slice and status, through `idx_runs_ended_at`.
fn ended_query(
    prefix: &str,
    filter: &RunsFilter,
    window: (DateTime<Utc>, DateTime<Utc>),
) -> QueryBuilder<'static, Postgres> {
    let ended_at = "coalesce(r.completed_at, r.failed_at, r.cancelled_at)";
    let mut q = QueryBuilder::new(prefix);
    q.push(format!(
        "SELECT width_bucket(extract(epoch FROM {ended_at})::float8, "
    ));
    q.push_bind(window.0.timestamp() as f64)
        .push(", ")
        .push_bind(window.1.timestamp() as f64)
        .push(format!(", {BUCKETS}) AS bucket, r.status, count(*)"));
    q.push(format!(
        " FROM pgflow.runs r WHERE r.status IN ({}) AND {ended_at} >= ",
        ended_statuses_sql()
    ))
    .push_bind(window.0)
    .push(format!(" AND {ended_at} < "))
    .push_bind(window.1);
    if let Some(flow) = &filter.flow {
        q.push(" AND r.flow_slug = ").push_bind(flow.clone());
    }
    q.push(" GROUP BY 1, 2");
    q
}

/// Reads the runs page.
pub(crate) async fn runs_page(pool: &PgPool, filter: &RunsFilter) -> Result<RunsPage, Error> {
    let mut runs: Vec<RunLine> = list_query("", filter)
        .build_query_as()
        .fetch_all(pool)
        .await?;
    let more = runs.len() > usize::try_from(filter.limit).unwrap_or(usize::MAX);
    runs.truncate(usize::try_from(filter.limit).unwrap_or(usize::MAX));
    let (has_older, has_newer) = match filter.page {
        Page::First => (more, false),
        Page::Before(_) => (more, true),
        Page::After(_) => {
            runs.reverse();
            (true, more)
        }
    };
    let window = window(filter, Utc::now());
    let counts: Vec<(String, i64)> = counts_query("", filter, window)
        .build_query_as()
        .fetch_all(pool)
        .await?;
    let rows: Vec<(Option<i32>, String, i64)> = ended_query("", filter, window)
        .build_query_as()
        .fetch_all(pool)
        .await?;
    let mut ended = vec![[0_i64; 3]; usize::try_from(BUCKETS).unwrap_or(0)];
    for (bucket, status, count) in rows {
        let Some(slot) = bucket
            .and_then(|b| usize::try_from(b - 1).ok())
            .and_then(|b| ended.get_mut(b))
        else {
            continue;
        };
        let column = match status.as_str() {
            "completed" => 0,
            "failed" => 1,
            _ => 2,
        };
        slot[column] += count;
    }
    let flows = sqlx::query_scalar("SELECT flow_slug FROM pgflow.flows ORDER BY flow_slug")
        .fetch_all(pool)
        .await?;
    let estimated_total: f32 =
        sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE oid = 'pgflow.runs'::regclass")
            .fetch_one(pool)
            .await?;
    Ok(RunsPage {
        runs,
        has_older,
        has_newer,
        window,
        counts,
        ended,
        flows,
        // -1 until the table's first ANALYZE: no estimate yet.
        estimated_total: (estimated_total >= 0.0).then_some(estimated_total as i64),
    })
}

/// The query plans of the runs page for the filter `query` (a query string as the page takes
/// it, e.g. `flow=orders&status=failed`): `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)` of each
/// of its queries on the runs, in order (the list, the counts per status, the throughput).
///
/// For checking a large installation: every plan should read `pgflow.runs` through an index
/// (no `Seq Scan`), touching a few pages per run listed. The queries run (read-only).
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), pgflow_dashboard::Error> {
/// for plan in pgflow_dashboard::runs_page_plans(&pool, "status=failed").await? {
///     println!("{plan:#}");
/// }
/// # Ok(()) }
/// ```
pub async fn runs_page_plans(pool: &PgPool, query: &str) -> Result<Vec<Value>, Error> {
    let uri: axum::http::Uri = format!("/runs?{query}")
        .parse()
        .map_err(|err| Error::BadRequest(format!("not a query string: {err}")))?;
    let raw = axum::extract::Query::try_from_uri(&uri)
        .map_err(|err| Error::BadRequest(err.body_text()))?
        .0;
    let filter = RunsFilter::parse(raw)?;
    let window = window(&filter, Utc::now());
    let mut plans = Vec::new();
    for mut builder in [
        list_query(EXPLAIN, &filter),
        counts_query(EXPLAIN, &filter, window),
        ended_query(EXPLAIN, &filter, window),
    ] {
        plans.push(
            builder
                .build_query_scalar::<Value>()
                .fetch_one(pool)
                .await?,
        );
    }
    Ok(plans)
}

/// What [`runs_page_plans`] puts before each query.
const EXPLAIN: &str = "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ";

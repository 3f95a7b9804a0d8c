//! The speed floors at the end of the SQL spec, each measured on a database of its own and
//! compared with its limit: starting a run of a large root map, `start_tasks` per task by batch
//! size, and cascades of taskless steps.

use std::time::Instant;

use pgflow_client::throwaway::TestDatabase;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::measure::{BoxResult, round3};

/// The worker id the measurements start tasks as.
const WORKER: Uuid = Uuid::from_u128(0x00be_0c00_0000_0000_0000_0000_0000_0001);

/// One floor: what was measured, and the limit it must stay under.
#[derive(Debug)]
pub(crate) struct Floor {
    pub(crate) name: &'static str,
    pub(crate) measured: f64,
    pub(crate) limit: f64,
    pub(crate) unit: &'static str,
}

impl Floor {
    /// Measured as a fraction of the limit: the margin is how far under 1.0 it is.
    pub(crate) fn ratio(&self) -> f64 {
        self.measured / self.limit
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "measured": round3(self.measured),
            "limit": self.limit,
            "unit": self.unit,
            "ratio": round3(self.ratio()),
        })
    }
}

/// Measures every floor on the server of `admin_url`; `smoke` repeats each measurement once.
pub(crate) async fn measure(admin_url: &str, smoke: bool) -> BoxResult<Vec<Floor>> {
    let db = TestDatabase::new_in(admin_url).await?;
    let pool = db.pool();
    let repeats = if smoke { 1 } else { 5 };
    exec(
        pool,
        &format!(
            "SELECT pgflow.create_flow('floor_map'); \
             SELECT pgflow.add_step('floor_map', 'items', step_type => 'map'); \
             INSERT INTO pgflow.workers (worker_id, queue_name, function_name) \
             VALUES ('{WORKER}', 'floor_map', 'bench');"
        ),
    )
    .await?;

    let mut floors = Vec::new();
    floors.push(Floor {
        name: "start_flow, root map over 1,000 elements",
        measured: median_ms(repeats, || start_map(pool, 1_000)).await?,
        limit: 150.0,
        unit: "ms",
    });
    floors.push(Floor {
        name: "start_flow, root map over 10,000 elements",
        measured: median_ms(repeats.min(3), || start_map(pool, 10_000)).await?,
        limit: 800.0,
        unit: "ms",
    });

    let batch_50 = start_tasks_per_task_ms(pool, 50, 500).await?;
    let batch_10 = start_tasks_per_task_ms(pool, 10, 500).await?;
    let single = start_tasks_per_task_ms(pool, 1, 200).await?;
    floors.push(Floor {
        name: "start_tasks per task, batches of 50",
        measured: batch_50,
        limit: 1.5,
        unit: "ms",
    });
    floors.push(Floor {
        name: "start_tasks per task, batches of 10 ÷ single-task calls",
        measured: batch_10 / single,
        limit: 0.5,
        unit: "ratio",
    });

    floors.push(Floor {
        name: "cascade of taskless steps, per step",
        measured: cascade_ms_per_step(pool, repeats, 30).await?,
        limit: 100.0,
        unit: "ms",
    });
    drop(db);
    Ok(floors)
}

async fn exec(pool: &PgPool, sql: &str) -> BoxResult<()> {
    sqlx::raw_sql(sql).execute(pool).await?;
    Ok(())
}

/// Starts a run of `floor_map` over `n` elements; returns its id.
async fn start_map(pool: &PgPool, n: usize) -> BoxResult<Uuid> {
    let input = Value::Array((0..n).map(|i| json!(i)).collect());
    let run_id: Uuid =
        sqlx::query_scalar("SELECT run_id FROM pgflow.start_flow('floor_map', $1::jsonb)")
            .bind(input)
            .fetch_one(pool)
            .await?;
    Ok(run_id)
}

/// The median wall time of `repeats` calls of `f`, after one untimed call that warms the
/// connection's plans.
async fn median_ms<F, Fut>(repeats: usize, mut f: F) -> BoxResult<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = BoxResult<Uuid>>,
{
    f().await?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let began = Instant::now();
        f().await?;
        times.push(began.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Milliseconds per task of `start_tasks` called with `batch` message ids at a time, over the
/// first `tasks` tasks of a fresh run of `floor_map`.
async fn start_tasks_per_task_ms(pool: &PgPool, batch: usize, tasks: usize) -> BoxResult<f64> {
    let run_id = start_map(pool, tasks).await?;
    let msg_ids: Vec<i64> = sqlx::query_scalar(
        "SELECT message_id FROM pgflow.step_tasks WHERE run_id = $1 ORDER BY task_index",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await?;
    let mut conn = pool.acquire().await?;
    let began = Instant::now();
    let mut started = 0_usize;
    for chunk in msg_ids.chunks(batch) {
        let rows: Vec<Uuid> = sqlx::query_scalar(
            "SELECT run_id FROM pgflow.start_tasks('floor_map', $1::bigint[], $2)",
        )
        .bind(chunk)
        .bind(WORKER)
        .fetch_all(&mut *conn)
        .await?;
        started += rows.len();
    }
    let elapsed = began.elapsed().as_secs_f64() * 1e3;
    if started != msg_ids.len() {
        return Err(format!("start_tasks started {started} of {} tasks", msg_ids.len()).into());
    }
    Ok(elapsed / started.max(1) as f64)
}

/// Milliseconds per step of a run whose `steps` steps all complete by the cascade at start: a
/// root map over `[]` and a chain of maps over it, all empty.
async fn cascade_ms_per_step(pool: &PgPool, repeats: usize, steps: usize) -> BoxResult<f64> {
    let mut sql = String::from(
        "SELECT pgflow.create_flow('floor_cascade'); \
         SELECT pgflow.add_step('floor_cascade', 'm0', step_type => 'map');",
    );
    for i in 1..steps {
        sql.push_str(&format!(
            "SELECT pgflow.add_step('floor_cascade', 'm{i}', ARRAY['m{}'], step_type => 'map');",
            i - 1
        ));
    }
    exec(pool, &sql).await?;
    let ms = median_ms(repeats, || async {
        let (run_id, status): (Uuid, String) = sqlx::query_as(
            "SELECT run_id, status FROM pgflow.start_flow('floor_cascade', '[]'::jsonb)",
        )
        .fetch_one(pool)
        .await?;
        if status != "completed" {
            return Err(format!("the cascade left run {run_id} {status}").into());
        }
        Ok(run_id)
    })
    .await?;
    Ok(ms / steps as f64)
}

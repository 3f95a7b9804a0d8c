//! `--limited-rate N`: the fan-out flow with its map step rate limited to N starts a second
//! (migration 0014, issue 22), served by two worker instances: the starts a second the engine
//! lets through, measured over ten seconds from the tasks' `started_at`, against the
//! configured rate.

use std::time::Duration;

use serde_json::{Value, json};

use crate::engines::Engine;
use crate::flows::Workload;
use crate::measure::BoxResult;
use crate::worker::Workers;
use crate::{Env, prepare};

/// Seconds the rate is measured over, after one second of settling.
const WINDOW_SECS: f64 = 10.0;

/// What one limited row measured.
#[derive(Debug)]
pub(crate) struct Limited {
    rate: u32,
    measured: f64,
    tasks: usize,
}

impl Limited {
    pub(crate) fn render(&self) -> String {
        format!(
            "rate limit {} starts/s on bench_fanout.item, 2 workers: {:.1} starts/s over {WINDOW_SECS} s \
             ({:.3}× the configured rate), map of {} tasks",
            self.rate,
            self.measured,
            self.measured / f64::from(self.rate),
            self.tasks
        )
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "workload": "fanout",
            "step": "item",
            "rate_per_sec": self.rate,
            "window_secs": WINDOW_SECS,
            "measured_per_sec": (self.measured * 10.0).round() / 10.0,
            "ratio_to_rate": (self.measured / f64::from(self.rate) * 1000.0).round() / 1000.0,
            "tasks": self.tasks,
        })
    }
}

/// One run of the fan-out flow wide enough to outlast the window at `rate`.
pub(crate) async fn run(env: &Env, rate: u32) -> BoxResult<Limited> {
    let width = u64::from(rate) * 14;
    let workload = Workload {
        name: "fanout_limited",
        runs: 1,
        width,
    };
    let db = prepare(env, &workload, &Engine::Current).await?;
    let pool = db.pool();
    sqlx::query("SELECT pgflow.set_rate_limit('bench_fanout', 'item', $1, interval '1 second')")
        .bind(i32::try_from(rate)?)
        .execute(pool)
        .await?;
    let workers = Workers::start(
        db.url(),
        &workload.flow(),
        2,
        env.tuning.concurrency,
        env.tuning.batch,
    )
    .await?;
    sqlx::query("SELECT pgflow.start_flow('bench_fanout', to_jsonb($1::bigint))")
        .bind(i64::try_from(width)?)
        .execute(pool)
        .await?;
    tokio::time::sleep(Duration::from_secs_f64(WINDOW_SECS + 2.0)).await;
    workers.stop().await?;
    // From one second after the first start, for ten seconds.
    let measured: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgflow.step_tasks t,
                (SELECT min(started_at) AS t0 FROM pgflow.step_tasks WHERE step_slug = 'item') f
          WHERE t.step_slug = 'item'
            AND t.started_at >= f.t0 + interval '1 second'
            AND t.started_at < f.t0 + make_interval(secs => 1 + $1)",
    )
    .bind(WINDOW_SECS)
    .fetch_one(pool)
    .await?;
    let measured = measured as f64 / WINDOW_SECS;
    Ok(Limited {
        rate,
        measured,
        tasks: usize::try_from(width)?,
    })
}

//! The PostgreSQL server restarted in the middle of many runs: once cleanly (fast shutdown),
//! once as in a crash (immediate shutdown). Workers reconnect by themselves, every run
//! completes, nothing is completed twice.

use std::time::Duration;

use pgflow_client::throwaway::{Shutdown, ThrowawayServer};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;

use super::{
    Executions, assert_squares_completed, compile_squares, squares, until_completed, worker,
};
use crate::support::{count_tasks, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_survive_database_restarts_mid_run() {
    // A server of its own: restarting the shared one would disturb every other test.
    let server = tokio::task::block_in_place(ThrowawayServer::start).expect("server");
    let url = server.url("postgres");
    let pool = PgPoolOptions::new()
        .max_connections(5)
        .connect(&url)
        .await
        .expect("connect");
    pgflow_client::install(&pool).await.expect("install");
    let executions = Executions::default();
    let flow = squares("restarts", Duration::from_millis(40), &executions);
    compile_squares(&pool, &flow).await;

    // Two workers, each with a pool of its own, as two processes would have.
    let mut workers = Vec::new();
    for _ in 0..2 {
        let own = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .expect("worker pool");
        workers.push((worker(&own, &flow, 6), own));
    }
    let inputs: Vec<u64> = (0..40).map(|i| 3 + i % 5).collect();
    let mut runs = Vec::new();
    for n in &inputs {
        runs.push(start(&pool, "restarts", json!(n)).await);
    }
    let total: i64 = inputs
        .iter()
        .map(|n| i64::try_from(n + 2).unwrap_or(0))
        .sum();

    for (share, shutdown) in [(4, Shutdown::Fast), (2, Shutdown::Immediate)] {
        // Restart while tasks are in flight: a fraction of the work done, most still to do.
        until_completed(&pool, total / share / 2, Duration::from_secs(60)).await;
        let done = count_tasks(&pool, "completed").await.unwrap_or(0);
        assert!(
            done < total,
            "restarted after the runs ended ({done} of {total})"
        );
        tokio::task::block_in_place(|| server.restart(shutdown)).expect("restart");
    }

    assert_squares_completed(&pool, &runs, &inputs, &executions, Duration::from_secs(90)).await;
    for (worker, own) in workers {
        assert!(!worker.is_finished(), "the worker kept going by itself");
        worker.shutdown().await.expect("shutdown");
        own.close().await;
    }
    pool.close().await;
    drop(server);
}

//! The full stack: `instances` separate [`Worker`]s in this process, each with its own pool, as
//! separate worker processes would be.

use pgflow_client::{Worker, WorkerHandle};
use pgflow_core::Flow;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::time::{Duration, Instant};

use crate::measure::BoxResult;

/// Connections per worker instance: reading, reporting, heartbeats, and slack.
const POOL_SIZE: u32 = 6;

#[derive(Debug)]
pub(crate) struct Workers {
    instances: Vec<(WorkerHandle, PgPool)>,
}

impl Workers {
    /// Spawns the workers and waits until each has registered in `pgflow.workers`.
    pub(crate) async fn start(
        url: &str,
        flow: &Flow<u64>,
        instances: usize,
        concurrency: usize,
        batch: usize,
    ) -> BoxResult<Self> {
        let mut spawned = Vec::new();
        for _ in 0..instances {
            let pool = PgPoolOptions::new()
                .max_connections(POOL_SIZE)
                .connect(url)
                .await?;
            let handle = Worker::builder(pool.clone())
                .flow(flow.clone())
                .concurrency(concurrency)
                .batch_size(batch)
                .spawn()?;
            spawned.push((handle, pool));
        }
        let workers = Self { instances: spawned };
        let Some((_, pool)) = workers.instances.first() else {
            return Ok(workers);
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let registered: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pgflow.workers WHERE queue_name = $1 AND deprecated_at IS NULL",
            )
            .bind(flow.slug())
            .fetch_one(pool)
            .await?;
            if usize::try_from(registered)? >= instances {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("only {registered} of {instances} workers registered").into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Registration comes before the first poll and LISTEN; give them a moment.
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(workers)
    }

    /// Shuts every worker down gracefully and closes its pool.
    pub(crate) async fn stop(self) -> BoxResult<()> {
        for (handle, pool) in self.instances {
            handle.shutdown().await?;
            pool.close().await;
        }
        Ok(())
    }
}

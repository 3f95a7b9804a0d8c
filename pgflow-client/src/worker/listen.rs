//! Waking flows when the engine queues their tasks, and cancelling the running tasks of
//! cancelled runs: `LISTEN pgflow_tasks` and `LISTEN pgflow_cancel` on one dedicated connection,
//! reconnecting with backoff, and telling the poll loops whether notifications can be relied on.
//!
//! The engine notifies `pgflow_tasks` with the flow slug once per transaction that queues tasks
//! of that flow. Listening to the events on channel `pgflow` instead would make the server send
//! every worker every event, a few per task. pgmq's insert notifications would need a trigger on
//! every queue table, installed by the worker, that updates one throttle row per inserted
//! message: a serialisation point for every producer.
//!
//! `pgflow.cancel_run` notifies `pgflow_cancel` with the run id. Any role that can connect may
//! NOTIFY any channel, so a notification only says where to look: the run's tasks are cancelled
//! here once the database confirms that the run's tasks were cancelled. Notifications sent while
//! the connection was down are lost: on each (re)connection the runs of the running tasks are
//! looked up once, and those found cancelled are cancelled here too.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::backoff::{Backoff, sleep_or_stop};
use super::registry::FlowEntry;
use super::shared::Shared;

/// The channel the engine notifies with a flow slug when it queues tasks of that flow.
const TASKS: &str = "pgflow_tasks";
/// The channel `pgflow.cancel_run` notifies with the run id.
const CANCEL: &str = "pgflow_cancel";

/// Listens until `stop` fires.
pub(crate) async fn run(shared: Arc<Shared>, flows: Vec<Arc<FlowEntry>>, stop: CancellationToken) {
    let by_slug: HashMap<&str, &FlowEntry> =
        flows.iter().map(|flow| (&*flow.slug, &**flow)).collect();
    // A connection of its own, outside the application's pool: it is held for good.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with((*shared.pool.connect_options()).clone());
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

    'connect: while !stop.is_cancelled() {
        let connected = tokio::select! {
            () = stop.cancelled() => break 'connect,
            connected = listen(&pool) => connected,
        };
        let mut listener = match connected {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(
                    %error,
                    "cannot listen for queued tasks and cancelled runs; polling meanwhile"
                );
                if sleep_or_stop(backoff.next_delay(), &stop).await {
                    continue;
                }
                break;
            }
        };
        if backoff.failures() > 0 {
            tracing::info!("listening for queued tasks and cancelled runs again");
        } else {
            tracing::debug!("listening for queued tasks and cancelled runs");
        }
        backoff.reset();
        shared.listening.store(true, Ordering::Release);
        // Anything may have been queued, or cancelled, while nobody listened: the probe looks
        // at every queue at once, and wakes the flows that have something. Apart, so that a
        // slow pool does not hold up the notifications.
        wake_all(&shared, &flows);
        let swept = Arc::clone(&shared);
        tokio::spawn(async move { swept.running.sweep(&swept.pool).await });

        loop {
            let received = tokio::select! {
                () = stop.cancelled() => break 'connect,
                received = listener.try_recv() => received,
            };
            match received {
                Ok(Some(notification)) if notification.channel() == CANCEL => {
                    cancel(&shared, notification.payload());
                }
                Ok(Some(notification)) => wake(&by_slug, notification.payload()),
                Ok(None) => {
                    lost(&shared, &flows, "connection closed");
                    break;
                }
                Err(error) => {
                    lost(&shared, &flows, &error.to_string());
                    break;
                }
            }
        }
        // A fresh listener on the next round: a failed one may hold a broken connection.
        drop(listener);
        if !sleep_or_stop(backoff.next_delay(), &stop).await {
            break;
        }
    }
    shared.listening.store(false, Ordering::Release);
    pool.close().await;
}

async fn listen(pool: &PgPool) -> sqlx::Result<PgListener> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.ignore_pool_close_event(true);
    listener.listen_all([TASKS, CANCEL]).await?;
    Ok(listener)
}

/// Cancels the running tasks of the run whose id is the payload, once the database confirms
/// the cancellation. Apart from the listener, so that a slow pool does not hold it up.
fn cancel(shared: &Arc<Shared>, payload: &str) {
    let Ok(run_id) = payload.parse::<Uuid>() else {
        tracing::debug!(payload, "ignored a notification on {CANCEL}: not a run id");
        return;
    };
    // Tasks read before now belong to the run as it was when cancelled.
    let learnt_at = Instant::now();
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        match super::running::confirmed(&shared.pool, run_id).await {
            Ok(true) => {
                let tasks = shared.running.cancel(run_id, learnt_at);
                tracing::debug!(%run_id, tasks, "run cancelled");
            }
            Ok(false) => tracing::warn!(
                %run_id,
                "ignored a notification on {CANCEL}: the run has no cancelled task (it was \
                 retried since, or the notification did not come from pgflow.cancel_run)"
            ),
            Err(error) => tracing::warn!(
                %run_id,
                %error,
                "cannot confirm a cancellation; the run's handlers here go on (the engine \
                 ignores the reports of a cancelled run's tasks)"
            ),
        }
    });
}

/// Wakes the flow whose slug is the payload.
fn wake(flows: &HashMap<&str, &FlowEntry>, flow_slug: &str) {
    if let Some(flow) = flows.get(flow_slug) {
        tracing::trace!(flow_slug = %flow.slug, "woken: tasks queued");
        flow.wake.notify_one();
    }
}

/// Has every queue looked at: by the probe when the worker has one (a single statement), else
/// by the flow's loop.
fn wake_all(shared: &Shared, flows: &[Arc<FlowEntry>]) {
    if shared.probe.enabled {
        shared.probe.probe_all();
    } else {
        for flow in flows {
            flow.wake.notify_one();
        }
    }
}

fn lost(shared: &Shared, flows: &[Arc<FlowEntry>], error: &str) {
    shared.listening.store(false, Ordering::Release);
    // Polling from now on, starting at once.
    wake_all(shared, flows);
    tracing::warn!(
        %error,
        "lost the connection listening for queued tasks and cancelled runs; reconnecting"
    );
}

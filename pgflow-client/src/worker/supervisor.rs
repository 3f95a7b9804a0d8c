//! The worker's own task: registers, starts the parts, and runs the shutdown in order.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::registry::FlowEntry;
use super::shared::Shared;
use super::{heartbeat, listen, poll, probe, report, requeue, schema_check, telemetry};
use crate::Result;

/// How long a shutdown waits, after the handlers, for their results to reach the database.
const REPORT_GRACE: Duration = Duration::from_secs(10);

/// Runs the worker until `shutdown` fires, then shuts it down gracefully.
pub(crate) async fn run(
    shared: Arc<Shared>,
    flows: Vec<Arc<FlowEntry>>,
    shutdown: CancellationToken,
) -> Result<()> {
    let settings = shared.settings.clone();
    if settings.shutdown_on_signal {
        tokio::spawn(cancel_on_signal(shutdown.clone()));
    }
    if flows.is_empty() {
        tracing::debug!("worker has no flows; idle until shut down");
        shutdown.cancelled().await;
        return Ok(());
    }

    // Before registering: on a database that lacks the engine the worker would otherwise add
    // its rows to someone else's schema, then retry a missing function for ever.
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        match schema_check::check(&shared.pool).await {
            Ok(None) => break,
            Ok(Some(problem)) => {
                // Also logged, as a warning: an application may never await the handle that
                // returns it, and one that does decides how grave it is.
                tracing::warn!(error = %problem, "the worker refuses to start");
                // The handle's token tells watchers the worker is gone, and ends the signal task.
                shutdown.cancel();
                return Err(problem);
            }
            Err(error) => {
                tracing::warn!(%error, "cannot check the database's pgflow schema; retrying");
                if !backoff.wait(&shutdown).await {
                    return Ok(());
                }
            }
        }
    }

    // Register before anything is started: step_tasks.last_worker_id references the rows.
    backoff.reset();
    loop {
        match heartbeat::beat(&shared.pool, &flows).await {
            Ok(deprecated) => {
                heartbeat::apply_deprecations(&flows, &deprecated, &shutdown);
                break;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot register the worker; retrying");
                if !backoff.wait(&shutdown).await {
                    return Ok(());
                }
            }
        }
    }
    tracing::debug!(
        flows = flows.len(),
        concurrency = settings.concurrency,
        "worker started"
    );

    // Counted in the slot gauge until the worker has stopped.
    let _slots = telemetry::WorkerSlots::open(settings.concurrency);
    // Parts that outlive the polling: stopped at the end.
    let background = CancellationToken::new();
    #[cfg(feature = "metrics")]
    let queue_gauges = tokio::spawn(super::queue_gauges::run(
        shared.pool.clone(),
        flows.clone(),
        background.clone(),
    ));
    let listener = settings.notifications.then(|| {
        tokio::spawn(listen::run(
            Arc::clone(&shared),
            flows.clone(),
            background.clone(),
        ))
    });
    let heartbeats = tokio::spawn(heartbeat::run(
        Arc::clone(&shared),
        flows.clone(),
        settings.heartbeat_interval,
        shutdown.clone(),
        background.clone(),
    ));
    // After registering: a sweep may hand a requeued task straight back to this worker.
    let requeuer = settings.requeue_stalled.then(|| {
        tokio::spawn(requeue::run(
            shared.pool.clone(),
            settings.requeue_every,
            Arc::clone(&shared.counters),
            shutdown.clone(),
        ))
    });
    // Room for `report::backlog` results: a handler that finished frees its place while there
    // is room, and the next report carries what the reads meanwhile started. Past that, it waits
    // here holding its permit, and no new task is read until reports go out.
    // Stops with the flows' loops: nothing is left to wake.
    let prober = shared.probe.enabled.then(|| {
        tokio::spawn(probe::run(
            Arc::clone(&shared),
            flows.clone(),
            shutdown.clone(),
        ))
    });
    let (reports, results) = mpsc::channel(report::backlog(settings.concurrency));
    let reporter = tokio::spawn(report::run(Arc::clone(&shared), results));
    let pollers: Vec<_> = flows
        .iter()
        .map(|flow| {
            tokio::spawn(poll::run(
                Arc::clone(&shared),
                Arc::clone(flow),
                reports.clone(),
            ))
        })
        .collect();
    drop(reports);

    shutdown.cancelled().await;
    tracing::debug!("worker shutting down");
    for poller in pollers {
        let _ = poller.await;
    }
    if let Some(prober) = prober {
        let _ = prober.await;
    }

    // Every permit back means every handler is done and its result is with the reporter.
    let all = u32::try_from(settings.concurrency).unwrap_or(u32::MAX);
    let semaphore = &shared.semaphore;
    let drained = tokio::time::timeout(settings.shutdown_timeout, semaphore.acquire_many(all));
    if drained.await.is_err() {
        tracing::warn!(
            running = settings.concurrency.saturating_sub(semaphore.available_permits()),
            timeout = ?settings.shutdown_timeout,
            "handlers still running at the shutdown timeout; cancelling them"
        );
        shared.hard_stop.cancel();
    }
    // Cancelled handlers report at once; what can still hold things up is a database that
    // does not take reports. Give it a grace period, then stop retrying.
    let grace = settings.shutdown_timeout.min(REPORT_GRACE);
    let mut reporter = reporter;
    let reported = tokio::time::timeout(grace, async {
        let _all = semaphore.acquire_many(all).await;
        // The pollers and tasks dropped their senders: the reporter ends once all is reported.
        let _ = (&mut reporter).await;
    });
    if reported.await.is_err() {
        tracing::warn!("results still unreported after the shutdown timeout; giving up on them");
        shared.abandon.cancel();
        let _all = semaphore.acquire_many(all).await;
        let _ = reporter.await;
    }

    background.cancel();
    if let Some(requeuer) = requeuer {
        let _ = requeuer.await;
    }
    let _ = heartbeats.await;
    #[cfg(feature = "metrics")]
    let _ = queue_gauges.await;
    if let Some(listener) = listener {
        let _ = listener.await;
    }
    heartbeat::deprecate(&shared.pool, &flows).await;
    tracing::debug!("worker stopped");
    Ok(())
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received; shutting down the worker"),
        () = terminate => tracing::info!("SIGTERM received; shutting down the worker"),
        () = shutdown.cancelled() => {}
    }
    shutdown.cancel();
}

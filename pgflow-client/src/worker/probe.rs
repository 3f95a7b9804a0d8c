//! The worker's one look at all its queues while they are idle (issue 24).
//!
//! Flows' loops read only when woken: by a notification (the listener), or by this probe. The
//! probe asks every queue at once, in one statement (`pgflow.queue_probe`, migration 0017),
//! when its earliest message is visible, once per [`max_poll_wait`] while notifications are
//! relied on and once per [`poll_interval`] while they are not; it wakes the flows whose
//! queues have a message visible, and sleeps until the earliest one that becomes visible later
//! (a retry's backoff, a `start_delay`, a visibility timeout running out), so those are read
//! when due, as each flow's own wait did before. A worker of 1,000 idle flows sends one
//! statement a period instead of one or two per flow.
//!
//! A flow that goes idle after a read while notifications are relied on asks when its queue's
//! next message is due (a notified step may have been queued with a delay, a failed task
//! retried with a backoff): the probe answers every flow that asked meanwhile in one statement.
//!
//! [`max_poll_wait`]: super::WorkerBuilder::max_poll_wait
//! [`poll_interval`]: super::WorkerBuilder::poll_interval

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::registry::FlowEntry;
use super::shared::Shared;

/// Seconds until each probed queue's earliest message is visible (negative: visible now).
const PROBE_SQL: &str = "\
SELECT p.flow_slug, extract(epoch FROM p.next_vt - clock_timestamp())::float8 \
  FROM pgflow.queue_probe($1) p";

/// What the flows' loops and the listener ask of the probe.
#[derive(Debug, Default)]
pub(crate) struct ProbeRequests {
    /// Whether the worker probes at all: only with several flows. A worker of one flow keeps
    /// its loop's own wait (a read at least once per `max_poll_wait`, its next delayed message
    /// looked up as it goes idle), which costs the same statements for one queue and is the
    /// path the reliability tests hold to.
    pub(crate) enabled: bool,
    /// Woken when something is asked.
    kick: Notify,
    /// Every queue at once: the listener connected (anything may have been queued unheard) or
    /// was lost (the period changes).
    all: AtomicBool,
    /// The flows that went idle and want to know when their queue's next message is due.
    due: Mutex<Vec<Arc<str>>>,
}

impl ProbeRequests {
    /// The requests of a worker serving `flows` flows.
    pub(crate) fn new(flows: usize) -> Self {
        Self {
            enabled: flows > 1,
            ..Self::default()
        }
    }

    /// Asks for every queue to be probed now.
    pub(crate) fn probe_all(&self) {
        self.all.store(true, Ordering::Release);
        self.kick.notify_one();
    }

    /// Asks when the next message of `flow_slug`'s queue is due, to wake its loop then.
    pub(crate) fn probe_flow(&self, flow_slug: &Arc<str>) {
        self.due
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Arc::clone(flow_slug));
        self.kick.notify_one();
    }

    fn take_due(&self) -> Vec<Arc<str>> {
        std::mem::take(
            &mut *self
                .due
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// One flow as the probe sees it.
struct Watched {
    flow: Arc<FlowEntry>,
    /// When to wake the flow's loop: its queue's next message is visible then.
    wake_at: Option<Instant>,
}

/// Probes until `stop` fires.
pub(crate) async fn run(shared: Arc<Shared>, flows: Vec<Arc<FlowEntry>>, stop: CancellationToken) {
    let by_slug: HashMap<Arc<str>, usize> = flows
        .iter()
        .enumerate()
        .map(|(index, flow)| (Arc::clone(&flow.slug), index))
        .collect();
    let mut watched: Vec<Watched> = flows
        .into_iter()
        .map(|flow| Watched {
            flow,
            wake_at: None,
        })
        .collect();
    let settings = &shared.settings;
    // A message visible when a flow that just read asks is held by another reader (or arrived
    // since): look again shortly, not at once, as each flow's loop did.
    let again = settings.poll_interval.min(Duration::from_millis(10));
    // At start, every queue: the loops read nothing until woken.
    let mut next_all = Instant::now();
    let mut failing = false;

    loop {
        let now = Instant::now();
        for entry in &mut watched {
            if entry.wake_at.is_some_and(|at| at <= now) {
                entry.wake_at = None;
                entry.flow.wake.notify_one();
            }
        }
        let next_wake = watched.iter().filter_map(|entry| entry.wake_at).min();
        let deadline = next_wake.map_or(next_all, |at| at.min(next_all));
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = shared.probe.kick.notified() => {}
            () = tokio::time::sleep_until(deadline) => {}
        }

        let all = shared.probe.all.swap(false, Ordering::AcqRel) || Instant::now() >= next_all;
        let asked = shared.probe.take_due();
        let probed: Vec<usize> = if all {
            (0..watched.len())
                .filter(|&index| !watched[index].flow.stop.is_cancelled())
                .collect()
        } else {
            let mut probed: Vec<usize> = asked
                .iter()
                .filter_map(|slug| by_slug.get(slug).copied())
                .collect();
            probed.sort_unstable();
            probed.dedup();
            probed
        };
        let period = if shared.listening.load(Ordering::Acquire) {
            settings.max_poll_wait
        } else {
            settings.poll_interval
        };
        if probed.is_empty() {
            if all {
                // Every flow stopped (deprecated): nothing to look at until the shutdown.
                next_all = Instant::now() + period;
            }
            continue;
        }

        let began = Instant::now();
        // A look that hangs (a pool that cannot connect) must not stop the wake-ups for good:
        // past the period, and at least 10 s (a look at 1,000 queues on a loaded machine may
        // take a second), it counts as failed, and the flows read for themselves.
        let limit = period.max(Duration::from_secs(10));
        let result = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            result = tokio::time::timeout(limit, due_in(&shared.pool, &watched, &probed)) => {
                result.unwrap_or_else(|_| Err(sqlx::Error::PoolTimedOut))
            }
        };
        let now = Instant::now();
        if all {
            let took = if result.is_ok() {
                now - began
            } else {
                Duration::ZERO
            };
            // A look at many queues that takes longer than the period (about 0.1 ms a queue)
            // is not repeated back to back: the probe keeps at most half of one backend busy.
            next_all = now + period.max(took);
        }
        match result {
            Ok(due) => {
                if failing {
                    tracing::info!("probing the queues again");
                    failing = false;
                }
                for &index in &probed {
                    watched[index].wake_at = None;
                }
                for (index, seconds) in due {
                    let after = Duration::try_from_secs_f64(seconds.max(0.0))
                        .unwrap_or(Duration::MAX)
                        .min(settings.max_poll_wait);
                    // A periodic probe wakes a flow with a visible message at once; a flow that
                    // has just read and still sees one waits `again` for it.
                    let after = if all { after } else { after.max(again) };
                    watched[index].wake_at = Some(now + after);
                }
            }
            Err(error) => {
                // A flow whose queue is missing says so itself when it reads.
                let missing_queue = error
                    .as_database_error()
                    .and_then(|db| db.code())
                    .is_some_and(|code| code == "42P01");
                if !failing && !missing_queue {
                    tracing::warn!(%error, "cannot probe the queues; each flow reads its own meanwhile");
                } else {
                    tracing::debug!(%error, "cannot probe the queues");
                }
                failing |= !missing_queue;
                // What each flow's loop did when it could not look: read its queue, at once
                // after a period, after `poll_interval` when it has just read.
                let after = if all {
                    Duration::ZERO
                } else {
                    settings.poll_interval
                };
                for &index in &probed {
                    watched[index].wake_at = Some(now + after);
                }
            }
        }
    }
    tracing::debug!("stopped probing the queues");
}

/// Seconds until the earliest message of each of the `probed` flows' queues is visible, for
/// those whose queue holds one. One flow alone is asked with its own statement, prepared once
/// per connection: a worker of one flow costs the database what it did before the probe.
async fn due_in(
    pool: &PgPool,
    watched: &[Watched],
    probed: &[usize],
) -> sqlx::Result<Vec<(usize, f64)>> {
    if let [index] = probed {
        let seconds: Option<f64> = sqlx::query_scalar(&watched[*index].flow.next_visible_sql)
            .fetch_one(pool)
            .await?;
        return Ok(seconds
            .map(|seconds| (*index, seconds))
            .into_iter()
            .collect());
    }
    let slugs: Vec<&str> = probed
        .iter()
        .map(|&index| &*watched[index].flow.slug)
        .collect();
    let rows: Vec<(String, Option<f64>)> = sqlx::query_as(PROBE_SQL)
        .bind(&slugs)
        .fetch_all(pool)
        .await?;
    let position: HashMap<&str, usize> = slugs
        .iter()
        .zip(probed)
        .map(|(slug, &index)| (*slug, index))
        .collect();
    Ok(rows
        .into_iter()
        .filter_map(|(slug, seconds)| Some((*position.get(slug.as_str())?, seconds?)))
        .collect())
}

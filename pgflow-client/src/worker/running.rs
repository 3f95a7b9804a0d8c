//! The tasks this worker is running, by run: what a run's cancellation reaches.
//!
//! `pgflow.cancel_run` marks the run's tasks cancelled in the database and notifies
//! `pgflow_cancel` with the run id; the listener hands that id to [`Running::cancel`], which fires
//! the tokens of the run's tasks here. A task started before the cancellation committed may reach
//! its dispatcher only after the notification did: the runs cancelled lately are remembered for
//! [`RECENT_FOR`], and such a task is cancelled as it registers.
//!
//! A task this worker starts while an older execution of it still runs here supersedes that
//! one, which is dropped unreported like a cancelled one. That happens when the run was retried:
//! attempts count from 1 again, so the older execution's report would name the same attempt
//! and worker as the new one, and the engine could not tell it apart.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long a cancelled run is remembered: far longer than a read of tasks takes to reach the
/// dispatcher.
const RECENT_FOR: Duration = Duration::from_secs(60);
/// The most cancelled runs remembered: a bulk cancel notifies once per run, for every worker,
/// whichever flows it serves.
const RECENT_MAX: usize = 4096;

/// The running tasks of this worker, by run.
#[derive(Default)]
pub(crate) struct Running {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    runs: HashMap<Uuid, Vec<Entry>>,
    next_id: u64,
    /// Runs cancelled lately, when this worker learnt it, oldest first.
    recent: VecDeque<(Uuid, Instant)>,
}

/// One running task.
struct Entry {
    id: u64,
    step_slug: Arc<str>,
    task_index: i32,
    /// When the read that started the task was sent: a cancellation learnt before then
    /// committed before the task was started, so the task belongs to a later retry of the run.
    read_at: Instant,
    /// The handler's token.
    handler: CancellationToken,
    /// Fires once the run is cancelled (or the task superseded), after `handler`.
    run_cancelled: CancellationToken,
    /// Fires, before the others, when the task was started here again.
    superseded: CancellationToken,
}

impl Entry {
    fn cancel(&self) {
        // The handler's token first: a handler woken by it may be polled (on another thread)
        // before the dispatcher sees `run_cancelled`, and must find its token fired then.
        self.handler.cancel();
        self.run_cancelled.cancel();
    }
}

impl fmt::Debug for Running {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("Running")
            .field("runs", &inner.runs.len())
            .field("recently_cancelled", &inner.recent.len())
            .finish()
    }
}

/// A task's place in [`Running`], removed on drop.
pub(crate) struct Registration {
    running: Arc<Running>,
    run_id: Uuid,
    id: u64,
    run_cancelled: CancellationToken,
    superseded: CancellationToken,
}

impl Registration {
    /// Fires when the task's run has been cancelled, or the task started here again: nothing is
    /// to be reported for this execution.
    pub(crate) fn run_cancelled(&self) -> &CancellationToken {
        &self.run_cancelled
    }

    /// Whether this execution was dropped because the worker started the task again.
    pub(crate) fn superseded(&self) -> bool {
        self.superseded.is_cancelled()
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("run_id", &self.run_id)
            .field("run_cancelled", &self.run_cancelled.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut inner = self.running.lock();
        if let Some(tasks) = inner.runs.get_mut(&self.run_id) {
            tasks.retain(|entry| entry.id != self.id);
            if tasks.is_empty() {
                inner.runs.remove(&self.run_id);
            }
        }
    }
}

impl Running {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock; a poisoned one still holds consistent maps.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers task `task_index` of step `step_slug` of `run_id`, whose handler gets
    /// `handler`, started by a read sent at `read_at`. Cancelled at once if the run was cancelled
    /// since; an older execution of the same task running here is superseded.
    pub(crate) fn register(
        self: &Arc<Self>,
        run_id: Uuid,
        step_slug: Arc<str>,
        task_index: i32,
        read_at: Instant,
        handler: CancellationToken,
    ) -> Registration {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        let entry = Entry {
            id,
            step_slug,
            task_index,
            read_at,
            handler,
            run_cancelled: CancellationToken::new(),
            superseded: CancellationToken::new(),
        };
        if let Some(tasks) = inner.runs.get(&run_id) {
            for older in tasks.iter().filter(|older| {
                older.step_slug == entry.step_slug
                    && older.task_index == entry.task_index
                    && !older.run_cancelled.is_cancelled()
            }) {
                older.superseded.cancel();
                older.cancel();
            }
        }
        let cancelled_since = inner
            .recent
            .iter()
            .any(|(run, learnt_at)| *run == run_id && *learnt_at >= read_at);
        if cancelled_since {
            entry.cancel();
        }
        let run_cancelled = entry.run_cancelled.clone();
        let superseded = entry.superseded.clone();
        inner.runs.entry(run_id).or_default().push(entry);
        Registration {
            running: Arc::clone(self),
            run_id,
            id,
            run_cancelled,
            superseded,
        }
    }

    /// Cancels the running tasks of `run_id` started by reads sent before `learnt_at`, when this
    /// worker learnt that the run was cancelled; returns how many there were.
    pub(crate) fn cancel(&self, run_id: Uuid, learnt_at: Instant) -> usize {
        let mut inner = self.lock();
        while inner.recent.len() >= RECENT_MAX
            || inner
                .recent
                .front()
                .is_some_and(|(_, at)| learnt_at.saturating_duration_since(*at) > RECENT_FOR)
        {
            inner.recent.pop_front();
        }
        inner.recent.push_back((run_id, learnt_at));
        let Some(tasks) = inner.runs.get(&run_id) else {
            return 0;
        };
        let mut cancelled = 0;
        for entry in tasks.iter().filter(|entry| entry.read_at <= learnt_at) {
            if !entry.run_cancelled.is_cancelled() {
                entry.cancel();
                cancelled += 1;
            }
        }
        cancelled
    }

    /// Whether this worker learnt lately that `run_id` was cancelled: to tell why a report
    /// changed nothing.
    pub(crate) fn recently_cancelled(&self, run_id: Uuid) -> bool {
        self.lock().recent.iter().any(|(run, _)| *run == run_id)
    }

    /// The runs with tasks running here, and none of them cancelled yet.
    fn live_runs(&self) -> Vec<Uuid> {
        self.lock()
            .runs
            .iter()
            .filter(|(_, tasks)| {
                tasks
                    .iter()
                    .any(|entry| !entry.run_cancelled.is_cancelled())
            })
            .map(|(run_id, _)| *run_id)
            .collect()
    }

    /// Cancels the tasks of the runs the database says are cancelled: for when notifications
    /// may have been missed (the listener reconnected) or are not used. A failure is logged and
    /// left to the next sweep.
    pub(crate) async fn sweep(&self, pool: &PgPool) {
        match self.try_sweep(pool).await {
            Ok(0) => {}
            Ok(tasks) => tracing::debug!(tasks, "found runs cancelled while not listening"),
            Err(error) => {
                tracing::warn!(%error, "cannot look for cancelled runs among the running tasks");
            }
        }
    }

    async fn try_sweep(&self, pool: &PgPool) -> sqlx::Result<usize> {
        let runs = self.live_runs();
        if runs.is_empty() {
            return Ok(0);
        }
        // Before the query: a task read after it began cannot be of a run it finds cancelled,
        // unless that run was retried since.
        let asked_at = Instant::now();
        // The tasks rather than the runs: cancel_run marks every task of the run it finds
        // queued or started (ours among them) cancelled, a retry leaves none so, and the worker
        // role of docs/security.md may read these columns of step_tasks, not pgflow.runs.
        let cancelled: Vec<Uuid> = sqlx::query_scalar(
            "SELECT DISTINCT run_id FROM pgflow.step_tasks \
              WHERE run_id = ANY($1) AND status = 'cancelled'",
        )
        .bind(&runs)
        .fetch_all(pool)
        .await?;
        Ok(cancelled
            .into_iter()
            .map(|run_id| self.cancel(run_id, asked_at))
            .sum())
    }
}

/// Whether the database shows run `run_id` cancelled: some task of it is. Asked before acting
/// on a notification, which any role may send.
pub(crate) async fn confirmed(pool: &PgPool, run_id: Uuid) -> sqlx::Result<bool> {
    // The tasks rather than the run: the worker role of docs/security.md may read these columns
    // of step_tasks, not pgflow.runs (see `Running::try_sweep`).
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pgflow.step_tasks \
                         WHERE run_id = $1 AND status = 'cancelled')",
    )
    .bind(run_id)
    .fetch_one(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancelling_a_run_fires_its_tasks_tokens_and_no_others() {
        let running = Arc::new(Running::default());
        let (run, other) = (Uuid::new_v4(), Uuid::new_v4());
        let read_at = Instant::now();
        let tokens: Vec<CancellationToken> = (0..3).map(|_| CancellationToken::new()).collect();
        let ours: Vec<Registration> = tokens[..2]
            .iter()
            .zip(0..)
            .map(|(token, index)| {
                running.register(run, Arc::from("s"), index, read_at, token.clone())
            })
            .collect();
        let theirs = running.register(other, Arc::from("s"), 0, read_at, tokens[2].clone());
        assert!(!ours[0].run_cancelled().is_cancelled());

        assert_eq!(running.cancel(run, Instant::now()), 2);
        assert!(tokens[0].is_cancelled() && tokens[1].is_cancelled());
        assert!(ours.iter().all(|task| task.run_cancelled().is_cancelled()));
        assert!(!tokens[2].is_cancelled() && !theirs.run_cancelled().is_cancelled());
        // Once only: a second notification of the same run finds nothing left to cancel.
        assert_eq!(running.cancel(run, Instant::now()), 0);
        assert!(running.recently_cancelled(run));
        assert!(!running.recently_cancelled(other));
        assert_eq!(running.live_runs(), [other]);
    }

    #[test]
    fn registrations_leave_when_dropped() {
        let running = Arc::new(Running::default());
        let run = Uuid::new_v4();
        let first = running.register(
            run,
            Arc::from("s"),
            0,
            Instant::now(),
            CancellationToken::new(),
        );
        let second = running.register(
            run,
            Arc::from("s"),
            1,
            Instant::now(),
            CancellationToken::new(),
        );
        drop(first);
        assert_eq!(running.live_runs(), [run]);
        drop(second);
        assert!(running.live_runs().is_empty());
        assert!(running.lock().runs.is_empty());
        assert_eq!(running.cancel(run, Instant::now()), 0);
    }

    #[test]
    fn a_task_read_before_the_cancellation_was_learnt_is_cancelled_as_it_registers() {
        let running = Arc::new(Running::default());
        let run = Uuid::new_v4();
        let read_at = Instant::now();
        // The notification overtook the read's rows on their way to the dispatcher.
        running.cancel(run, read_at + Duration::from_millis(5));
        let token = CancellationToken::new();
        let late = running.register(run, Arc::from("s"), 0, read_at, token.clone());
        assert!(token.is_cancelled() && late.run_cancelled().is_cancelled());
    }

    #[test]
    fn a_task_read_after_the_cancellation_was_learnt_belongs_to_a_retry() {
        let running = Arc::new(Running::default());
        let run = Uuid::new_v4();
        let learnt_at = Instant::now();
        running.cancel(run, learnt_at);
        let token = CancellationToken::new();
        let retried = running.register(
            run,
            Arc::from("s"),
            0,
            learnt_at + Duration::from_millis(5),
            token.clone(),
        );
        assert!(!token.is_cancelled() && !retried.run_cancelled().is_cancelled());
        // Nor does a late copy of the old notification reach it.
        assert_eq!(running.cancel(run, learnt_at), 0);
        assert!(!token.is_cancelled());
    }

    #[test]
    fn a_task_started_again_here_supersedes_its_older_execution() {
        let running = Arc::new(Running::default());
        let run = Uuid::new_v4();
        let (old_token, new_token, sibling_token) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        let old = running.register(run, Arc::from("s"), 3, Instant::now(), old_token.clone());
        let sibling = running.register(
            run,
            Arc::from("s"),
            4,
            Instant::now(),
            sibling_token.clone(),
        );
        // The run was retried and this worker starts task 3 again.
        let new = running.register(run, Arc::from("s"), 3, Instant::now(), new_token.clone());
        assert!(old_token.is_cancelled() && old.run_cancelled().is_cancelled() && old.superseded());
        assert!(
            !new_token.is_cancelled() && !new.run_cancelled().is_cancelled() && !new.superseded()
        );
        assert!(!sibling_token.is_cancelled() && !sibling.superseded());
        // Another step's task 3 is another task.
        let other_step = running.register(
            run,
            Arc::from("t"),
            3,
            Instant::now(),
            CancellationToken::new(),
        );
        assert!(!new.run_cancelled().is_cancelled() && !other_step.superseded());
    }

    #[test]
    fn the_memory_of_cancelled_runs_is_bounded() {
        let running = Running::default();
        let now = Instant::now();
        for _ in 0..RECENT_MAX + 10 {
            running.cancel(Uuid::new_v4(), now);
        }
        assert_eq!(running.lock().recent.len(), RECENT_MAX);
        running.cancel(Uuid::new_v4(), now + RECENT_FOR + Duration::from_secs(1));
        assert_eq!(running.lock().recent.len(), 1);
    }
}

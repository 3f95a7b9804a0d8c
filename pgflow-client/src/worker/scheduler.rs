//! Firing the worker's schedules: exactly one run per tick, however many workers carry them.
//!
//! The scheduler holds one dedicated connection, outside the application's pool. On it, it
//! writes its schedules (`pgflow.define_schedule`), then tries, every second, the
//! session-level advisory lock of each schedule it does not fire yet
//! (`pg_try_advisory_lock(pgflow.schedule_lock_key(name))`). A schedule whose lock it holds
//! it fires: at each tick it reads the schedule's row (paused? the last tick fired?), works
//! out the due ticks (the grace and the missed-tick policy) and starts each one's run with
//! `pgflow.start_scheduled_run`, whose run id is derived from the schedule and the tick, so a
//! tick fired twice (a lock lost and taken over mid-tick) still makes one run.
//!
//! When the worker dies its connection closes and PostgreSQL releases its locks: another
//! worker takes them within a second or so and fires the ticks missed meanwhile (they are
//! within the grace). A lost connection is re-opened with backoff; on shutdown the connection
//! is closed, releasing the locks at once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::backoff::{Backoff, sleep_or_stop};
use crate::schedule::{self, Cadence, Schedule};
use crate::{Error, Result};

/// How often a worker tries the locks of the schedules it does not fire: the longest a
/// schedule goes unfired after its firing worker died.
pub(crate) const LOCK_RETRY: Duration = Duration::from_secs(1);

/// The most on-time ticks fired in one round per schedule (a per-second schedule with a long
/// grace after an outage): the rest fire in the next rounds.
const MAX_TICKS_PER_ROUND: usize = 100;

/// A schedule with its parsed expression.
pub(crate) struct Entry {
    pub(crate) schedule: Schedule,
    pub(crate) cadence: Cadence,
}

/// Checks `schedules` (each valid, names unique) and parses them.
pub(crate) fn prepare(schedules: Vec<Schedule>) -> Result<Vec<Arc<Entry>>> {
    let mut names = HashSet::new();
    let mut entries = Vec::with_capacity(schedules.len());
    for schedule in schedules {
        let cadence = schedule.cadence()?;
        if !names.insert(schedule.name.clone()) {
            return Err(Error::Schedule {
                schedule: schedule.name,
                problem: "two schedules of this worker have this name: name them apart with \
                          Schedule::name"
                    .to_string(),
            });
        }
        entries.push(Arc::new(Entry { schedule, cadence }));
    }
    Ok(entries)
}

/// Fires `entries` until `stop` fires.
pub(crate) async fn run(pool: PgPool, entries: Vec<Arc<Entry>>, stop: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let options = pool.connect_options();
    while !stop.is_cancelled() {
        let connected = tokio::select! {
            () = stop.cancelled() => return,
            connected = PgConnection::connect_with(&options) => connected,
        };
        let mut conn = match connected {
            Ok(conn) => conn,
            Err(error) => {
                tracing::warn!(%error, "the scheduler cannot connect; retrying");
                if !sleep_or_stop(backoff.next_delay(), &stop).await {
                    return;
                }
                continue;
            }
        };
        let mut session = Session::new(&entries);
        let outcome = session.run(&mut conn, &stop, &mut backoff).await;
        // Closing the connection releases the locks at once; a broken one is gone already.
        let _ = conn.close().await;
        match outcome {
            Ok(()) => return,
            Err(error) => {
                if session.firing() > 0 {
                    tracing::warn!(%error, firing = session.firing(),
                        "the scheduler lost its connection, and the schedules it fired; reconnecting");
                } else {
                    tracing::warn!(%error, "the scheduler lost its connection; reconnecting");
                }
                if !sleep_or_stop(backoff.next_delay(), &stop).await {
                    return;
                }
            }
        }
    }
}

/// One connection's life: the locks it holds and what it has defined.
struct Session<'a> {
    entries: &'a [Arc<Entry>],
    /// Indexes of the entries whose lock this connection holds.
    held: HashSet<usize>,
    /// Indexes of the entries written to the database on this connection.
    defined: HashSet<usize>,
    /// Ticks whose start failed with an engine error: not tried again on this connection.
    refused: HashSet<(usize, DateTime<Utc>)>,
    /// Entries whose writing failed and was logged at WARN: later failures log at DEBUG.
    warned: HashSet<usize>,
}

/// What a round reads of a held schedule's row.
#[derive(sqlx::FromRow)]
struct State {
    schedule_name: String,
    paused: bool,
    /// Ticks at or before it never fire: the last tick fired, the creation, the last resume.
    fired_through: DateTime<Utc>,
    now: DateTime<Utc>,
}

impl<'a> Session<'a> {
    fn new(entries: &'a [Arc<Entry>]) -> Self {
        Self {
            entries,
            held: HashSet::new(),
            defined: HashSet::new(),
            refused: HashSet::new(),
            warned: HashSet::new(),
        }
    }

    fn firing(&self) -> usize {
        self.held.len()
    }

    /// Rounds until `stop` fires (`Ok`) or the connection fails (`Err`).
    async fn run(
        &mut self,
        conn: &mut PgConnection,
        stop: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<()> {
        loop {
            self.define_missing(conn).await?;
            self.take_locks(conn).await?;
            backoff.reset();
            let wait = self.fire_due(conn).await?;
            if !sleep_or_stop(wait, stop).await {
                return Ok(());
            }
        }
    }

    /// Writes the schedules not written yet on this connection. A schedule whose flow is not
    /// compiled yet is tried again next round.
    async fn define_missing(&mut self, conn: &mut PgConnection) -> Result<()> {
        for (index, entry) in self.entries.iter().enumerate() {
            if self.defined.contains(&index) {
                continue;
            }
            match schedule::define(conn, &entry.schedule).await {
                Ok(created) => {
                    tracing::debug!(schedule = %entry.schedule.name, created, "schedule written");
                    self.defined.insert(index);
                }
                Err(Error::Database(sqlx::Error::Database(db))) => {
                    // The engine refused it (its flow is not compiled yet, an old schema):
                    // the connection is fine, try again next round; say so once.
                    if self.warned.insert(index) {
                        tracing::warn!(schedule = %entry.schedule.name, error = %db.message(),
                            "cannot write the schedule; retrying every second");
                    } else {
                        tracing::debug!(schedule = %entry.schedule.name, error = %db.message(),
                            "cannot write the schedule yet");
                    }
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Tries the lock of each written schedule not held yet.
    async fn take_locks(&mut self, conn: &mut PgConnection) -> Result<()> {
        let wanted: Vec<usize> = self
            .defined
            .iter()
            .copied()
            .filter(|index| !self.held.contains(index))
            .collect();
        for index in wanted {
            let entry = &self.entries[index];
            let taken: bool =
                sqlx::query_scalar("SELECT pg_try_advisory_lock(pgflow.schedule_lock_key($1))")
                    .bind(&entry.schedule.name)
                    .fetch_one(&mut *conn)
                    .await?;
            if taken {
                tracing::info!(schedule = %entry.schedule.name, "this worker now fires the schedule");
                self.held.insert(index);
            }
        }
        Ok(())
    }

    /// Fires the due ticks of the held schedules; returns how long to wait before the next
    /// round: until the next tick, at most [`LOCK_RETRY`].
    async fn fire_due(&mut self, conn: &mut PgConnection) -> Result<Duration> {
        if self.held.is_empty() {
            return Ok(LOCK_RETRY);
        }
        let names: Vec<&str> = self
            .held
            .iter()
            .map(|&index| self.entries[index].schedule.name.as_str())
            .collect();
        let states: Vec<State> = sqlx::query_as(
            "SELECT s.schedule_name, s.paused,
                    greatest(s.last_fired_tick, s.created_at, s.resumed_at) AS fired_through,
                    clock_timestamp() AS now
               FROM pgflow_ext.schedules s
              WHERE s.schedule_name = ANY($1)",
        )
        .bind(&names)
        .fetch_all(&mut *conn)
        .await?;
        let by_name: HashMap<&str, &State> = states
            .iter()
            .map(|state| (state.schedule_name.as_str(), state))
            .collect();

        let mut wait = LOCK_RETRY;
        let held: Vec<usize> = self.held.iter().copied().collect();
        for index in held {
            let entry = Arc::clone(&self.entries[index]);
            let Some(state) = by_name.get(entry.schedule.name.as_str()) else {
                // Deleted by an operator while this worker carries it: written again.
                tracing::info!(schedule = %entry.schedule.name,
                    "the schedule was deleted from the database; writing it again");
                self.defined.remove(&index);
                continue;
            };
            if !state.paused {
                let due = entry.cadence.due(
                    state.fired_through,
                    state.now,
                    entry.schedule.grace,
                    entry.schedule.missed,
                    MAX_TICKS_PER_ROUND,
                );
                for tick in due {
                    if self.refused.contains(&(index, tick)) {
                        continue;
                    }
                    if let Err(error) = fire(conn, &entry.schedule, tick).await {
                        match error {
                            Error::Database(sqlx::Error::Database(_)) | Error::Schedule { .. } => {
                                tracing::error!(schedule = %entry.schedule.name, %tick, %error,
                                    "the tick's run could not be started; it is skipped");
                                self.refused.insert((index, tick));
                            }
                            other => return Err(other),
                        }
                    }
                }
            }
            if let Some(next) = entry.cadence.next_after(state.now) {
                let until = (next - state.now).to_std().unwrap_or_default();
                // A few milliseconds past the tick, so that the server's clock has reached it.
                wait = wait.min(until + Duration::from_millis(5));
            }
        }
        Ok(wait)
    }
}

/// Starts the run of `tick` (once: the engine derives its id from the schedule and the tick).
async fn fire(conn: &mut PgConnection, schedule: &Schedule, tick: DateTime<Utc>) -> Result<()> {
    let input = schedule.tick_input(tick)?;
    let (run_id, started): (Option<Uuid>, bool) =
        sqlx::query_as("SELECT run_id, started FROM pgflow.start_scheduled_run($1, $2, $3)")
            .bind(&schedule.name)
            .bind(tick)
            .bind(input)
            .fetch_one(&mut *conn)
            .await?;
    match run_id {
        Some(run_id) if started => {
            tracing::debug!(schedule = %schedule.name, %tick, %run_id, "scheduled run started");
        }
        Some(run_id) => {
            tracing::debug!(schedule = %schedule.name, %tick, %run_id, "tick had fired already");
        }
        None => {
            tracing::debug!(schedule = %schedule.name, %tick, "schedule paused; tick not fired")
        }
    }
    Ok(())
}

//! Schedules and delayed starts: [`Schedule`], the cron-driven starts a worker fires
//! ([`WorkerBuilder::add_schedule`](crate::WorkerBuilder::add_schedule)), the rows operators
//! list and pause ([`ScheduleRow`]), and the SQL behind `Client::start_at`.
//!
//! A cron expression has five fields (minute, hour, day of month, month, day of week), or six
//! with seconds first, optionally a seventh for the year; `L` (last), `#` (nth weekday), `W`
//! (nearest weekday) and the `@daily`-style aliases are understood, as the `croner` crate
//! parses them. It is read in the schedule's time zone (an IANA name, UTC by default).
//!
//! Daylight saving time, as `croner` computes it: a tick whose local time does not exist (the
//! clock jumps forward over it) fires at the first second after the gap when its seconds,
//! minutes and hours are fixed numbers, and is skipped when they hold a wildcard or a step; a
//! local time that happens twice (the clock goes back) fires once, at its first occurrence,
//! when fixed, and on both passes when a wildcard or step matches it.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use pgflow_core::Flow;
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::trace_context::TraceHeaders;
use crate::{Error, Result};

/// What a schedule does with ticks it missed because no worker was running it.
///
/// A tick counts as missed when the worker that fires it sees it more than the schedule's
/// [`grace`](Schedule::grace) after its time (60 s by default): a tick a few seconds late,
/// while another worker takes over, still fires under either policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Missed {
    /// Missed ticks never fire (the default): after an outage the schedule goes on with the
    /// next tick.
    Skip,
    /// The most recent missed ticks fire, at most this many, oldest first, as soon as a worker
    /// runs the schedule again; older ones never fire.
    CatchUp(u32),
}

impl Missed {
    /// The name the database stores: `skip` or `catch_up`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::CatchUp(_) => "catch_up",
        }
    }

    /// How many missed ticks fire: 0 for [`Missed::Skip`].
    pub fn catch_up_max(self) -> u32 {
        match self {
            Self::Skip => 0,
            Self::CatchUp(max) => max,
        }
    }
}

/// The most missed ticks [`Missed::CatchUp`] may fire (the database's limit).
pub const MAX_CATCH_UP: u32 = 10_000;

/// The default [`Schedule::grace`]: a tick seen later than this after its time was missed.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);

type InputFn = dyn Fn(DateTime<Utc>) -> std::result::Result<Value, serde_json::Error> + Send + Sync;

/// The input of a schedule's runs.
#[derive(Clone)]
pub(crate) enum ScheduleInput {
    /// The same for every tick, stored in the schedule's row.
    Fixed(Value),
    /// Computed per tick; the row stores none.
    PerTick(Arc<InputFn>),
    /// The input given could not be serialized: reported by [`Schedule::check`].
    Invalid(String),
}

impl fmt::Debug for ScheduleInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(value) => f.debug_tuple("Fixed").field(value).finish(),
            Self::PerTick(_) => f.write_str("PerTick(..)"),
            Self::Invalid(problem) => f.debug_tuple("Invalid").field(problem).finish(),
        }
    }
}

/// A flow started on a cron schedule by the workers that carry it: give it to
/// [`WorkerBuilder::add_schedule`](crate::WorkerBuilder::add_schedule) (or use the shorthand
/// [`WorkerBuilder::schedule`](crate::WorkerBuilder::schedule)).
///
/// Every worker that carries a schedule writes it to `pgflow_ext.schedules` when it starts;
/// one of them at a time fires it, and each tick starts exactly one run, whose id is derived
/// from the schedule's name and the tick (docs/operating.md, "Schedules").
///
/// ```no_run
/// # #[derive(serde::Serialize)]
/// # struct Report { day: chrono::NaiveDate }
/// # fn demo(pool: sqlx::PgPool, report: pgflow_core::Flow<Report>) -> pgflow_client::Result<()> {
/// use pgflow_client::{Missed, Schedule, Worker};
///
/// // Every day at 03:00 Berlin time, the report of the day before; up to 3 missed days
/// // are caught up after an outage.
/// let nightly = Schedule::with_input_fn("0 3 * * *", &report, |tick| Report {
///     day: tick.date_naive().pred_opt().expect("a day before"),
/// })
/// .name("nightly-report")
/// .timezone("Europe/Berlin")
/// .missed(Missed::CatchUp(3));
/// let worker = Worker::builder(pool).flow(report).add_schedule(nightly).spawn()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Schedule {
    pub(crate) name: String,
    pub(crate) flow_slug: String,
    pub(crate) cron: String,
    pub(crate) timezone: String,
    pub(crate) input: ScheduleInput,
    pub(crate) missed: Missed,
    pub(crate) grace: Duration,
}

impl Schedule {
    /// A schedule of `flow` on `cron` whose runs all get `input`. Its name is the flow's slug
    /// until [`name`](Self::name) gives another (two schedules of one flow need names).
    ///
    /// ```no_run
    /// # fn demo(flow: pgflow_core::Flow<serde_json::Value>) {
    /// use pgflow_client::Schedule;
    ///
    /// // Every five minutes, on the minute.
    /// let schedule = Schedule::new("0 */5 * * * *", &flow, &serde_json::json!({"full": false}));
    /// # }
    /// ```
    pub fn new<I: Serialize>(cron: &str, flow: &Flow<I>, input: &I) -> Self {
        let input = match serde_json::to_value(input) {
            Ok(value) => ScheduleInput::Fixed(value),
            Err(err) => ScheduleInput::Invalid(format!("the input cannot be serialized: {err}")),
        };
        Self::with(cron, flow.slug(), input)
    }

    /// A schedule of the flow named `flow_slug` (compiled elsewhere) whose runs all get the
    /// JSON `input`.
    ///
    /// ```
    /// use pgflow_client::Schedule;
    ///
    /// let schedule = Schedule::json("@hourly", "cleanup", serde_json::json!({}));
    /// assert!(schedule.check().is_ok());
    /// ```
    pub fn json(cron: &str, flow_slug: &str, input: Value) -> Self {
        Self::with(cron, flow_slug, ScheduleInput::Fixed(input))
    }

    /// A schedule of `flow` on `cron` whose run of each tick gets `input(tick)`: the tick's
    /// time (UTC; convert it to the schedule's time zone where the local date matters).
    ///
    /// ```no_run
    /// # #[derive(serde::Serialize)]
    /// # struct Window { from: chrono::DateTime<chrono::Utc>, to: chrono::DateTime<chrono::Utc> }
    /// # fn demo(flow: pgflow_core::Flow<Window>) {
    /// use pgflow_client::Schedule;
    ///
    /// // Every hour, the hour that just ended.
    /// let hourly = Schedule::with_input_fn("0 * * * *", &flow, |tick| Window {
    ///     from: tick - chrono::Duration::hours(1),
    ///     to: tick,
    /// });
    /// # }
    /// ```
    pub fn with_input_fn<I, F>(cron: &str, flow: &Flow<I>, input: F) -> Self
    where
        I: Serialize,
        F: Fn(DateTime<Utc>) -> I + Send + Sync + 'static,
    {
        let input: Arc<InputFn> = Arc::new(move |tick| serde_json::to_value(input(tick)));
        Self::with(cron, flow.slug(), ScheduleInput::PerTick(input))
    }

    fn with(cron: &str, flow_slug: &str, input: ScheduleInput) -> Self {
        Self {
            name: flow_slug.to_string(),
            flow_slug: flow_slug.to_string(),
            cron: cron.trim().to_string(),
            timezone: "UTC".to_string(),
            input,
            missed: Missed::Skip,
            grace: DEFAULT_GRACE,
        }
    }

    /// Names the schedule (1 to 128 characters, no control characters); the name identifies it
    /// in the database, the CLI and its runs' ids.
    ///
    /// ```
    /// # let flow_slug = "report";
    /// let schedule = pgflow_client::Schedule::json("0 3 * * *", flow_slug, serde_json::json!({}))
    ///     .name("nightly-report");
    /// assert_eq!(schedule.schedule_name(), "nightly-report");
    /// ```
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The time zone the cron expression is read in: an IANA name such as `Europe/Berlin`
    /// (default `UTC`).
    ///
    /// ```
    /// let schedule = pgflow_client::Schedule::json("0 9 * * MON-FRI", "standup", serde_json::json!({}))
    ///     .timezone("America/New_York");
    /// assert!(schedule.check().is_ok());
    /// ```
    #[must_use]
    pub fn timezone(mut self, timezone: impl Into<String>) -> Self {
        self.timezone = timezone.into();
        self
    }

    /// What happens to ticks missed while no worker ran the schedule (default
    /// [`Missed::Skip`]).
    ///
    /// ```
    /// use pgflow_client::{Missed, Schedule};
    ///
    /// let schedule = Schedule::json("@daily", "billing", serde_json::json!({}))
    ///     .missed(Missed::CatchUp(7)); // a week of missed days at the most
    /// # assert!(schedule.check().is_ok());
    /// ```
    #[must_use]
    pub fn missed(mut self, missed: Missed) -> Self {
        self.missed = missed;
        self
    }

    /// How late a tick may be seen and still fire as on time (default [`DEFAULT_GRACE`], whole
    /// seconds); ticks later than that follow the [`missed`](Self::missed) policy.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// // A per-second heartbeat: a tick late by more than 5 s is of no use.
    /// let schedule = pgflow_client::Schedule::json("* * * * * *", "ping", serde_json::json!({}))
    ///     .grace(Duration::from_secs(5));
    /// # assert!(schedule.check().is_ok());
    /// ```
    #[must_use]
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The schedule's name.
    pub fn schedule_name(&self) -> &str {
        &self.name
    }

    /// The flow it starts.
    pub fn flow_slug(&self) -> &str {
        &self.flow_slug
    }

    /// Its missed-tick policy.
    ///
    /// ```
    /// use pgflow_client::{Missed, Schedule};
    ///
    /// let schedule = Schedule::json("@daily", "billing", serde_json::json!({}));
    /// assert_eq!(schedule.missed_policy(), Missed::Skip);
    /// ```
    pub fn missed_policy(&self) -> Missed {
        self.missed
    }

    /// Checks the name, the cron expression, the time zone, the policy and the input, as
    /// [`WorkerBuilder::spawn`](crate::WorkerBuilder::spawn) does.
    ///
    /// ```
    /// use pgflow_client::{Error, Schedule};
    ///
    /// let bad = Schedule::json("61 * * * *", "report", serde_json::json!({}));
    /// assert!(matches!(bad.check(), Err(Error::Schedule { .. })));
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Schedule`], saying what is wrong.
    pub fn check(&self) -> Result<()> {
        self.cadence().map(|_| ())
    }

    /// The first `count` ticks after `after`, in UTC.
    ///
    /// ```
    /// use chrono::{TimeZone, Utc};
    ///
    /// let schedule = pgflow_client::Schedule::json("0 30 2 * * *", "report", serde_json::json!({}))
    ///     .timezone("Europe/Berlin");
    /// let after = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    /// let ticks = schedule.next_ticks(after, 2).unwrap();
    /// assert_eq!(ticks[0], Utc.with_ymd_and_hms(2026, 1, 1, 1, 30, 0).unwrap()); // 02:30 CET
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Schedule`] when the schedule is invalid ([`check`](Self::check)).
    pub fn next_ticks(&self, after: DateTime<Utc>, count: usize) -> Result<Vec<DateTime<Utc>>> {
        let cadence = self.cadence()?;
        Ok(cadence.ticks_after(after).take(count).collect())
    }

    /// The parsed cron expression and time zone, after every check.
    pub(crate) fn cadence(&self) -> Result<Cadence> {
        let problem = |problem: String| Error::Schedule {
            schedule: self.name.clone(),
            problem,
        };
        check_name(&self.name).map_err(problem)?;
        if let ScheduleInput::Invalid(invalid) = &self.input {
            return Err(problem(invalid.clone()));
        }
        if self.missed.catch_up_max() > MAX_CATCH_UP {
            return Err(problem(format!(
                "catch_up is {}, but it must be at most {MAX_CATCH_UP}",
                self.missed.catch_up_max()
            )));
        }
        if self.grace > Duration::from_secs(i32::MAX as u64) {
            return Err(problem(format!("grace {:?} is too long", self.grace)));
        }
        Cadence::parse(&self.cron, &self.timezone).map_err(problem)
    }

    /// The grace in whole seconds, rounded up.
    pub(crate) fn grace_seconds(&self) -> i32 {
        let secs = self.grace.as_secs() + u64::from(self.grace.subsec_nanos() > 0);
        i32::try_from(secs).unwrap_or(i32::MAX)
    }

    /// The input stored in the row: the fixed one, or `None` when computed per tick.
    pub(crate) fn stored_input(&self) -> Option<&Value> {
        match &self.input {
            ScheduleInput::Fixed(value) => Some(value),
            _ => None,
        }
    }

    /// The input to pass when firing `tick`: `None` to use the stored one.
    pub(crate) fn tick_input(&self, tick: DateTime<Utc>) -> Result<Option<Value>> {
        match &self.input {
            ScheduleInput::Fixed(_) => Ok(None),
            ScheduleInput::PerTick(input) => input(tick).map(Some).map_err(|err| Error::Schedule {
                schedule: self.name.clone(),
                problem: format!("the input of tick {tick} cannot be serialized: {err}"),
            }),
            ScheduleInput::Invalid(problem) => Err(Error::Schedule {
                schedule: self.name.clone(),
                problem: problem.clone(),
            }),
        }
    }
}

fn check_name(name: &str) -> std::result::Result<(), String> {
    let chars = name.chars().count();
    if chars == 0 || chars > 128 {
        return Err(format!(
            "the name must have 1 to 128 characters (it has {chars})"
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("the name must not hold control characters".to_string());
    }
    Ok(())
}

/// A parsed cron expression in its time zone: computes ticks, as instants.
#[derive(Debug, Clone)]
pub(crate) struct Cadence {
    cron: Cron,
    tz: Tz,
}

impl Cadence {
    /// Parses `cron` (five to seven fields, seconds first when six or more) and `timezone`.
    pub(crate) fn parse(cron: &str, timezone: &str) -> std::result::Result<Self, String> {
        let tz = Tz::from_str(timezone.trim()).map_err(|_| {
            format!("`{timezone}` is not a known time zone (an IANA name such as Europe/Berlin)")
        })?;
        let parsed = Cron::from_str(cron)
            .map_err(|err| format!("invalid cron expression `{cron}`: {err}"))?;
        let cadence = Self { cron: parsed, tz };
        // An expression that never matches (30 February) is as good as a wrong one.
        if cadence.next_after(Utc::now()).is_none() {
            return Err(format!("the cron expression `{cron}` never matches"));
        }
        Ok(cadence)
    }

    /// The first tick strictly after `after`.
    pub(crate) fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&self.tz), false)
            .ok()
            .map(|tick| tick.with_timezone(&Utc))
    }

    /// The ticks strictly after `after`, in order.
    pub(crate) fn ticks_after(
        &self,
        after: DateTime<Utc>,
    ) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        let mut cursor = after.with_timezone(&self.tz);
        std::iter::from_fn(move || {
            // Each search starts from the instant the last returned: croner tells the two
            // passes of a repeated hour apart by it.
            let next = self.cron.find_next_occurrence(&cursor, false).ok()?;
            cursor = next;
            Some(next.with_timezone(&Utc))
        })
    }

    /// The ticks at or before `until`, latest first.
    pub(crate) fn ticks_until(
        &self,
        until: DateTime<Utc>,
    ) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        let mut cursor = until.with_timezone(&self.tz);
        let mut inclusive = true;
        std::iter::from_fn(move || {
            let previous = self
                .cron
                .find_previous_occurrence(&cursor, inclusive)
                .ok()?;
            inclusive = false;
            cursor = previous;
            Some(previous.with_timezone(&Utc))
        })
    }

    /// The ticks to fire now, oldest first: those after `after` that are on time (no more
    /// than `grace` before `now`), preceded under [`Missed::CatchUp`] by the latest missed
    /// ones. At most `limit` on-time ticks.
    pub(crate) fn due(
        &self,
        after: DateTime<Utc>,
        now: DateTime<Utc>,
        grace: Duration,
        missed: Missed,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
        let on_time_since = now.checked_sub_signed(grace).unwrap_or(after).max(after);
        let mut due: Vec<DateTime<Utc>> = match missed {
            Missed::CatchUp(max) if on_time_since > after => {
                let mut late: Vec<_> = self
                    .ticks_until(on_time_since)
                    .take_while(|tick| *tick > after)
                    .take(usize::try_from(max).unwrap_or(usize::MAX))
                    .collect();
                late.reverse();
                late
            }
            _ => Vec::new(),
        };
        let first_on_time = due
            .last()
            .copied()
            .unwrap_or(on_time_since)
            .max(on_time_since);
        due.extend(
            self.ticks_after(first_on_time)
                .take_while(|tick| *tick <= now)
                .take(limit),
        );
        due
    }
}

/// A row of `pgflow_ext.schedules`, as [`Client::schedules`](crate::Client::schedules) lists
/// it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct ScheduleRow {
    /// The schedule's name.
    pub schedule_name: String,
    /// The flow it starts.
    pub flow_slug: String,
    /// Its cron expression.
    pub cron: String,
    /// The time zone the expression is read in.
    pub timezone: String,
    /// The input of every run; `None` when the worker computes it per tick.
    pub input: Option<Value>,
    /// `skip` or `catch_up`.
    pub missed: String,
    /// How many missed ticks fire under `catch_up`.
    pub catch_up_max: i32,
    /// How late a tick may be seen and still fire as on time, in seconds.
    pub grace_seconds: i32,
    /// Whether it is paused.
    pub paused: bool,
    /// When it was paused, while it is.
    pub paused_at: Option<DateTime<Utc>>,
    /// When it was last resumed.
    pub resumed_at: Option<DateTime<Utc>>,
    /// The latest tick that started a run.
    pub last_fired_tick: Option<DateTime<Utc>>,
    /// The run of that tick.
    pub last_run_id: Option<Uuid>,
    /// When it was first written.
    pub created_at: DateTime<Utc>,
    /// When its definition last changed.
    pub updated_at: DateTime<Utc>,
    /// Whether a worker holds its lock, so fires it, right now.
    pub firing: bool,
}

impl ScheduleRow {
    /// The next tick after `after` by this row's cron expression and time zone; `None` when
    /// they do not parse (a row written by hand) or never match again.
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// for schedule in client.schedules().await? {
    ///     println!("{}: next at {:?}", schedule.schedule_name, schedule.next_tick(chrono::Utc::now()));
    /// }
    /// # Ok(()) }
    /// ```
    pub fn next_tick(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        Cadence::parse(&self.cron, &self.timezone)
            .ok()?
            .next_after(after)
    }
}

const SCHEDULE_COLUMNS: &str = "s.schedule_name, s.flow_slug, s.cron, s.timezone, s.input, \
    s.missed, s.catch_up_max, s.grace_seconds, s.paused, s.paused_at, s.resumed_at, \
    s.last_fired_tick, s.last_run_id, s.created_at, s.updated_at";

/// Every schedule, by name, with whether a worker holds its lock.
pub(crate) async fn list(pool: &PgPool) -> Result<Vec<ScheduleRow>> {
    // A session-level pg_advisory_lock(bigint) shows in pg_locks with the key's high half
    // in classid, its low half in objid and objsubid 1.
    Ok(sqlx::query_as(&format!(
        "SELECT {SCHEDULE_COLUMNS}, EXISTS (
                  SELECT 1 FROM pg_catalog.pg_locks l
                   WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                     AND l.database = (SELECT oid FROM pg_catalog.pg_database
                                        WHERE datname = current_database())
                     AND l.classid::bigint = (k.key >> 32) & 4294967295
                     AND l.objid::bigint = k.key & 4294967295) AS firing
           FROM pgflow_ext.schedules s
          CROSS JOIN LATERAL (SELECT pgflow.schedule_lock_key(s.schedule_name) AS key) k
          ORDER BY s.schedule_name"
    ))
    .fetch_all(pool)
    .await?)
}

/// Pauses (`pause`) or resumes a schedule; `true` when this call changed it.
pub(crate) async fn set_paused(pool: &PgPool, name: &str, pause: bool) -> Result<bool> {
    let sql = if pause {
        "SELECT pgflow.pause_schedule($1)"
    } else {
        "SELECT pgflow.resume_schedule($1)"
    };
    let changed: bool = sqlx::query_scalar(sql)
        .bind(name)
        .fetch_one(pool)
        .await
        .map_err(|err| unknown_schedule(name, err))?;
    tracing::debug!(
        schedule = name,
        pause,
        changed,
        "schedule paused or resumed"
    );
    Ok(changed)
}

/// Deletes a schedule; `true` when there was one.
pub(crate) async fn delete(pool: &PgPool, name: &str) -> Result<bool> {
    Ok(sqlx::query_scalar("SELECT pgflow.delete_schedule($1)")
        .bind(name)
        .fetch_one(pool)
        .await?)
}

/// SQLSTATE P0002 (`schedule % not found`) is [`Error::UnknownSchedule`].
fn unknown_schedule(name: &str, err: sqlx::Error) -> Error {
    match &err {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("P0002") => {
            Error::UnknownSchedule(name.to_string())
        }
        _ => Error::Database(err),
    }
}

/// When a delayed run starts: at a time, or after a delay counted on the server's clock.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StartAt {
    At(DateTime<Utc>),
    After(Duration),
}

/// Starts a run of `flow_slug` whose root steps start at `at` (`pgflow.start_flow_at`), on
/// `conn`, storing `trace` with it; returns its id.
pub(crate) async fn start_delayed(
    conn: &mut PgConnection,
    flow_slug: &str,
    input: &Value,
    at: StartAt,
    run_id: Option<Uuid>,
    trace: Option<TraceHeaders>,
) -> Result<Uuid> {
    let (at, after) = match at {
        StartAt::At(at) => (Some(at), None),
        StartAt::After(delay) => (None, Some(delay.as_secs_f64())),
    };
    const START: &str = "SELECT run_id FROM pgflow.start_flow_at(
                  $1, $2, coalesce($3, clock_timestamp() + make_interval(secs => $4)), $5)";
    // A trace context (feature `otel`) goes with the run, in the same statement.
    if let Some(trace) = trace {
        let (run_id, _stored): (Uuid, bool) =
            sqlx::query_as(&crate::trace_context::storing(START, 5))
                .bind(flow_slug)
                .bind(input)
                .bind(at)
                .bind(after)
                .bind(run_id)
                .bind(trace.traceparent)
                .bind(trace.tracestate)
                .fetch_one(&mut *conn)
                .await
                .map_err(|err| Error::from_start(flow_slug, err))?;
        return Ok(run_id);
    }
    sqlx::query_scalar(START)
        .bind(flow_slug)
        .bind(input)
        .bind(at)
        .bind(after)
        .bind(run_id)
        .fetch_one(&mut *conn)
        .await
        .map_err(|err| Error::from_start(flow_slug, err))
}

/// Writes `schedule` to the database (`pgflow.define_schedule`); `true` when it was new.
pub(crate) async fn define(conn: &mut PgConnection, schedule: &Schedule) -> Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT pgflow.define_schedule($1, $2, $3, $4, $5, $6, $7, $8)")
            .bind(&schedule.name)
            .bind(&schedule.flow_slug)
            .bind(&schedule.cron)
            .bind(&schedule.timezone)
            .bind(schedule.stored_input())
            .bind(schedule.missed.as_str())
            .bind(i32::try_from(schedule.missed.catch_up_max()).unwrap_or(i32::MAX))
            .bind(schedule.grace_seconds())
            .fetch_one(&mut *conn)
            .await?,
    )
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    fn cadence(cron: &str, tz: &str) -> Cadence {
        Cadence::parse(cron, tz).expect("valid")
    }

    #[test]
    fn invalid_expressions_and_zones_are_refused_with_the_reason() {
        for (cron, tz, says) in [
            ("61 * * * *", "UTC", "invalid cron expression `61 * * * *`"),
            ("* * *", "UTC", "invalid cron expression"),
            ("0 0 30 2 *", "UTC", "never matches"),
            (
                "0 3 * * *",
                "Europe/Atlantis",
                "`Europe/Atlantis` is not a known time zone",
            ),
        ] {
            let problem = Cadence::parse(cron, tz).expect_err(cron);
            assert!(problem.contains(says), "{cron} {tz}: {problem}");
        }
        let err = Schedule::json("0 3 * * *", "f", Value::Null)
            .name("")
            .check()
            .expect_err("empty name");
        assert!(err.to_string().contains("1 to 128 characters"), "{err}");
    }

    #[test]
    fn seconds_last_day_and_nth_weekday() {
        let every_second = cadence("* * * * * *", "UTC");
        let ticks: Vec<_> = every_second
            .ticks_after(utc(2026, 1, 1, 0, 0, 0))
            .take(2)
            .collect();
        assert_eq!(ticks, [utc(2026, 1, 1, 0, 0, 1), utc(2026, 1, 1, 0, 0, 2)]);
        let last_day = cadence("0 12 L * *", "UTC");
        assert_eq!(
            last_day.next_after(utc(2026, 2, 1, 0, 0, 0)),
            Some(utc(2026, 2, 28, 12, 0, 0))
        );
        // The second Monday (1 is Monday) of March 2026 is the 9th.
        let second_monday = cadence("0 8 * * 1#2", "UTC");
        assert_eq!(
            second_monday.next_after(utc(2026, 3, 1, 0, 0, 0)),
            Some(utc(2026, 3, 9, 8, 0, 0))
        );
    }

    /// Europe/Berlin, 2026-03-29: 02:00 CET jumps to 03:00 CEST, so 02:30 does not exist.
    /// A fixed time in the gap fires at the first second after it (03:00 CEST = 01:00 UTC);
    /// a wildcard schedule has no tick in the gap.
    #[test]
    fn a_local_time_that_does_not_exist() {
        let fixed = cadence("0 30 2 * * *", "Europe/Berlin");
        let ticks: Vec<_> = fixed
            .ticks_after(utc(2026, 3, 27, 12, 0, 0))
            .take(3)
            .collect();
        assert_eq!(
            ticks,
            [
                utc(2026, 3, 28, 1, 30, 0), // 02:30 CET
                utc(2026, 3, 29, 1, 0, 0),  // 03:00 CEST: right after the gap
                utc(2026, 3, 30, 0, 30, 0), // 02:30 CEST
            ]
        );
        let every_quarter = cadence("0 */15 * * * *", "Europe/Berlin");
        let ticks: Vec<_> = every_quarter
            .ticks_after(utc(2026, 3, 29, 0, 30, 0)) // 01:30 CET
            .take(3)
            .collect();
        assert_eq!(
            ticks,
            [
                utc(2026, 3, 29, 0, 45, 0), // 01:45 CET
                utc(2026, 3, 29, 1, 0, 0),  // 03:00 CEST: 02:00 to 02:45 never happen
                utc(2026, 3, 29, 1, 15, 0), // 03:15 CEST
            ]
        );
    }

    /// Europe/Berlin, 2026-10-25: 03:00 CEST goes back to 02:00 CET, so 02:30 happens twice
    /// (00:30 and 01:30 UTC). A fixed time fires once, at the first; a wildcard schedule
    /// fires on both passes, one hour apart.
    #[test]
    fn a_local_time_that_happens_twice() {
        let fixed = cadence("0 30 2 * * *", "Europe/Berlin");
        let ticks: Vec<_> = fixed
            .ticks_after(utc(2026, 10, 24, 12, 0, 0))
            .take(2)
            .collect();
        assert_eq!(
            ticks,
            [
                utc(2026, 10, 25, 0, 30, 0), // 02:30 CEST, the first pass
                utc(2026, 10, 26, 1, 30, 0), // the next day's 02:30 CET
            ]
        );
        let half_hourly = cadence("0 */30 * * * *", "Europe/Berlin");
        let ticks: Vec<_> = half_hourly
            .ticks_after(utc(2026, 10, 24, 23, 45, 0)) // 01:45 CEST
            .take(5)
            .collect();
        assert_eq!(
            ticks,
            [
                utc(2026, 10, 25, 0, 0, 0),  // 02:00 CEST
                utc(2026, 10, 25, 0, 30, 0), // 02:30 CEST
                utc(2026, 10, 25, 1, 0, 0),  // 02:00 CET, the second pass
                utc(2026, 10, 25, 1, 30, 0), // 02:30 CET
                utc(2026, 10, 25, 2, 0, 0),  // 03:00 CET
            ]
        );
        // Backwards over the same night: the same ticks, latest first.
        let back: Vec<_> = half_hourly
            .ticks_until(utc(2026, 10, 25, 2, 0, 0))
            .take(5)
            .collect();
        let mut forward = ticks;
        forward.reverse();
        assert_eq!(back, forward);
    }

    #[test]
    fn due_ticks_follow_the_grace_and_the_missed_policy() {
        let minutely = cadence("0 * * * * *", "UTC");
        let now = utc(2026, 5, 1, 12, 0, 30);
        let grace = Duration::from_secs(120);
        // Caught up to 11:58:00: 11:59 and 12:00 are on time.
        let due = minutely.due(utc(2026, 5, 1, 11, 58, 0), now, grace, Missed::Skip, 100);
        assert_eq!(due, [utc(2026, 5, 1, 11, 59, 0), utc(2026, 5, 1, 12, 0, 0)]);
        // Down since 11:00: under skip only the on-time ticks (after 11:58:30) fire.
        let after = utc(2026, 5, 1, 11, 0, 0);
        let due = minutely.due(after, now, grace, Missed::Skip, 100);
        assert_eq!(due, [utc(2026, 5, 1, 11, 59, 0), utc(2026, 5, 1, 12, 0, 0)]);
        // Under catch_up(3): the three latest missed ticks first, then the on-time ones.
        let due = minutely.due(after, now, grace, Missed::CatchUp(3), 100);
        assert_eq!(
            due,
            [
                utc(2026, 5, 1, 11, 56, 0),
                utc(2026, 5, 1, 11, 57, 0),
                utc(2026, 5, 1, 11, 58, 0),
                utc(2026, 5, 1, 11, 59, 0),
                utc(2026, 5, 1, 12, 0, 0),
            ]
        );
        // Nothing new: nothing due.
        assert!(
            minutely
                .due(
                    utc(2026, 5, 1, 12, 0, 0),
                    now,
                    grace,
                    Missed::CatchUp(3),
                    100
                )
                .is_empty()
        );
        // catch_up never reaches back before the last tick fired.
        let due = minutely.due(
            utc(2026, 5, 1, 11, 57, 0),
            now,
            Duration::ZERO,
            Missed::CatchUp(10),
            100,
        );
        assert_eq!(
            due,
            [
                utc(2026, 5, 1, 11, 58, 0),
                utc(2026, 5, 1, 11, 59, 0),
                utc(2026, 5, 1, 12, 0, 0),
            ]
        );
    }
}

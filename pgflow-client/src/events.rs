//! The engine's events, as a stream: `run:started`, `step:started`, `step:completed`,
//! `step:failed`, `run:completed`, `run:failed`; and those of run control (migration 0007):
//! `step:cancelled`, `run:cancelled`, `run:retried`; and of conditions (migration 0010):
//! `step:skipped`.
//!
//! The engine publishes each event with `pg_notify` on channel [`CHANNEL`], in the transaction
//! that makes the change, so listeners see them in commit order. Payloads carry identifiers,
//! status and timestamps; outputs stay in the tables (NOTIFY payloads are limited to 8000 bytes).

use std::fmt;

use chrono::{DateTime, Utc};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use uuid::Uuid;

use crate::{Result, SkipReason};

/// The `LISTEN` channel of the engine's events.
pub const CHANNEL: &str = "pgflow";

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum EventKind {
    /// `run:started`
    #[serde(rename = "run:started")]
    RunStarted,
    /// `run:completed`
    #[serde(rename = "run:completed")]
    RunCompleted,
    /// `run:failed`
    #[serde(rename = "run:failed")]
    RunFailed,
    /// `step:started`
    #[serde(rename = "step:started")]
    StepStarted,
    /// `step:completed`
    #[serde(rename = "step:completed")]
    StepCompleted,
    /// `step:failed`
    #[serde(rename = "step:failed")]
    StepFailed,
    /// `run:cancelled`: the run was cancelled ([`Client::cancel`](crate::Client::cancel)).
    #[serde(rename = "run:cancelled")]
    RunCancelled,
    /// `run:retried`: a failed or cancelled run was taken back to `started`
    /// ([`Client::retry`](crate::Client::retry)); `step:started` follows for each step that
    /// starts again.
    #[serde(rename = "run:retried")]
    RunRetried,
    /// `step:cancelled`: a started step of a cancelled run; `run:cancelled` follows.
    #[serde(rename = "step:cancelled")]
    StepCancelled,
    /// `step:skipped`: the step will not run (migration 0010); the event carries its
    /// [`skip_reason`](RunEvent::skip_reason).
    #[serde(rename = "step:skipped")]
    StepSkipped,
    /// `step:subflow_started`: a subflow step's task started a child run (migration 0016);
    /// the event carries the [`child_run_id`](RunEvent::child_run_id) and its flow. The
    /// child's own events follow under its id.
    #[serde(rename = "step:subflow_started")]
    StepSubflowStarted,
}

impl EventKind {
    /// The engine's name for it, e.g. `"step:completed"`.
    ///
    /// ```
    /// use pgflow_client::EventKind;
    ///
    /// assert_eq!(EventKind::StepCompleted.as_str(), "step:completed");
    /// assert_eq!(EventKind::RunFailed.to_string(), "run:failed");
    /// ```
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::RunStarted => "run:started",
            Self::RunCompleted => "run:completed",
            Self::RunFailed => "run:failed",
            Self::StepStarted => "step:started",
            Self::StepCompleted => "step:completed",
            Self::StepFailed => "step:failed",
            Self::RunCancelled => "run:cancelled",
            Self::RunRetried => "run:retried",
            Self::StepCancelled => "step:cancelled",
            Self::StepSkipped => "step:skipped",
            Self::StepSubflowStarted => "step:subflow_started",
        }
    }

    /// Whether the run ends with this event: `run:completed`, `run:failed` or `run:cancelled`.
    /// (A failed or cancelled run may be retried later: `run:retried` starts it again.)
    ///
    /// ```
    /// use pgflow_client::EventKind;
    ///
    /// assert!(EventKind::RunCompleted.ends_run());
    /// assert!(EventKind::RunCancelled.ends_run());
    /// assert!(!EventKind::StepFailed.ends_run()); // a retry or the run's failure may follow
    /// assert!(!EventKind::RunRetried.ends_run());
    /// ```
    pub const fn ends_run(self) -> bool {
        matches!(
            self,
            Self::RunCompleted | Self::RunFailed | Self::RunCancelled
        )
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event of a run, as published by the engine.
///
/// It deserializes from the payload the engine sends, and prints as its kind, step and error:
///
/// ```
/// use pgflow_client::{EventKind, RunEvent};
///
/// let payload = r#"{"event_type": "step:failed",
///                   "run_id": "0190b8a4-5e0c-7a8e-9d4f-1c2b3a4d5e6f",
///                   "step_slug": "charge", "status": "failed",
///                   "error_message": "card declined"}"#;
/// let event: RunEvent = serde_json::from_str(payload)?;
/// assert_eq!(event.kind, EventKind::StepFailed);
/// assert_eq!(event.step_slug.as_deref(), Some("charge"));
/// assert_eq!(event.to_string(), "step:failed charge: card declined");
///
/// let payload = r#"{"event_type": "run:retried",
///                   "run_id": "0190b8a4-5e0c-7a8e-9d4f-1c2b3a4d5e6f",
///                   "flow_slug": "orders", "status": "started", "retry_count": 2,
///                   "retried_at": "2026-12-02T05:00:00.123+00:00"}"#;
/// let event: RunEvent = serde_json::from_str(payload)?;
/// assert_eq!(event.kind, EventKind::RunRetried);
/// assert_eq!(event.retry_count, Some(2));
/// assert_eq!(event.to_string(), "run:retried (retry 2)");
///
/// let payload = r#"{"event_type": "step:skipped",
///                   "run_id": "0190b8a4-5e0c-7a8e-9d4f-1c2b3a4d5e6f",
///                   "step_slug": "notify", "status": "skipped",
///                   "skip_reason": "condition_unmet",
///                   "skipped_at": "2026-12-02T05:00:00.123+00:00"}"#;
/// let event: RunEvent = serde_json::from_str(payload)?;
/// assert_eq!(event.skip_reason, Some(pgflow_client::SkipReason::ConditionUnmet));
/// assert_eq!(event.to_string(), "step:skipped notify (condition_unmet)");
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RunEvent {
    /// What happened.
    #[serde(rename = "event_type")]
    pub kind: EventKind,
    /// The run.
    pub run_id: Uuid,
    /// The run's flow.
    #[serde(default)]
    pub flow_slug: Option<String>,
    /// The step, for `step:*` events.
    #[serde(default)]
    pub step_slug: Option<String>,
    /// The new status.
    #[serde(default)]
    pub status: Option<String>,
    /// The error, for `*:failed` events (cut to 1000 characters).
    #[serde(default)]
    pub error_message: Option<String>,
    /// When the run or step started.
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    /// When it completed.
    #[serde(default)]
    pub completed_at: Option<DateTime<Utc>>,
    /// When it failed.
    #[serde(default)]
    pub failed_at: Option<DateTime<Utc>>,
    /// When it was cancelled, for `run:cancelled` and `step:cancelled`.
    #[serde(default)]
    pub cancelled_at: Option<DateTime<Utc>>,
    /// The run's retry count after this retry (1 after the first), for `run:retried`.
    #[serde(default)]
    pub retry_count: Option<u32>,
    /// When the run was retried, for `run:retried`.
    #[serde(default)]
    pub retried_at: Option<DateTime<Utc>>,
    /// Why the step was skipped, for `step:skipped`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_reason: Option<SkipReason>,
    /// When it was skipped, for `step:skipped`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_at: Option<DateTime<Utc>>,
    /// The task, for `step:subflow_started`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_index: Option<u32>,
    /// The child run a subflow step started, for `step:subflow_started`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child_run_id: Option<Uuid>,
    /// The child run's flow, for `step:subflow_started`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child_flow_slug: Option<String>,
}

impl fmt::Display for RunEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(step) = &self.step_slug {
            write!(f, " {step}")?;
        }
        if let (EventKind::RunRetried, Some(count)) = (self.kind, self.retry_count) {
            write!(f, " (retry {count})")?;
        }
        if let Some(reason) = self.skip_reason {
            write!(f, " ({reason})")?;
        }
        if let (Some(child), Some(flow)) = (self.child_run_id, &self.child_flow_slug) {
            write!(f, " -> {flow} run {child}")?;
        }
        if let Some(error) = &self.error_message {
            write!(f, ": {error}")?;
        }
        Ok(())
    }
}

/// A live subscription to the engine's events (a dedicated `LISTEN` connection).
///
/// Subscribe before starting a run to see every one of its events:
///
/// ```no_run
/// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
/// use futures_util::StreamExt;
///
/// let subscription = client.subscribe().await?;
/// let run = client.start_json("order_processing", serde_json::json!({"order_id": 1}), None).await?;
/// let mut events = std::pin::pin!(subscription.run_events(run.id()));
/// while let Some(event) = events.next().await {
///     println!("{}", event?);
/// }
/// # Ok(()) }
/// ```
pub struct Subscription {
    listener: PgListener,
    /// The listener's own one-connection pool: the application's pool is not drained by
    /// long-lived subscriptions, and closing this one waits for the listener's connection.
    pool: PgPool,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl Subscription {
    /// Opens a `LISTEN` connection on the engine's channel: a connection of its own, made with
    /// `pool`'s connect options, outside `pool`.
    ///
    /// The same as [`Client::subscribe`](crate::Client::subscribe), for code that holds only a
    /// pool:
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool) -> pgflow_client::Result<()> {
    /// let mut subscription = pgflow_client::Subscription::listen(&pool).await?;
    /// println!("{}", subscription.next_event().await?);
    /// # Ok(()) }
    /// ```
    pub async fn listen(pool: &PgPool) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .connect_lazy_with((*pool.connect_options()).clone());
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(Self { listener, pool })
    }

    /// Stops listening and closes the connection, waiting until it is closed. Dropping a
    /// subscription also ends it, in the background.
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// let mut subscription = client.subscribe().await?;
    /// let first = subscription.next_event().await?;
    /// subscription.close().await;
    /// println!("first event: {first}");
    /// # Ok(()) }
    /// ```
    pub async fn close(self) {
        let Self { listener, pool } = self;
        drop(listener);
        pool.close().await;
    }

    /// The next event of any run. Payloads that are not events are skipped.
    ///
    /// Events of every run arrive interleaved; keep those you want by run or flow:
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// let mut subscription = client.subscribe().await?;
    /// loop {
    ///     let event = subscription.next_event().await?;
    ///     if event.kind.ends_run() && event.flow_slug.as_deref() == Some("order_processing") {
    ///         println!("order run {}: {}", event.run_id, event.kind);
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn next_event(&mut self) -> Result<RunEvent> {
        loop {
            let notification = self.listener.recv().await?;
            match serde_json::from_str::<RunEvent>(notification.payload()) {
                Ok(event) => return Ok(event),
                Err(err) => tracing::debug!(error = %err, "skipping a payload that is no event"),
            }
        }
    }

    /// The events of one run, in order, ending after the run's `run:completed`, `run:failed` or
    /// `run:cancelled`.
    ///
    /// Being finite, the stream can be collected:
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// use futures_util::TryStreamExt;
    ///
    /// let subscription = client.subscribe().await?; // before the start: no event is missed
    /// let input = serde_json::json!({"url": "https://example.com"});
    /// let run = client.start_json("crawl", input, None).await?;
    /// let events: Vec<_> = subscription.run_events(run.id()).try_collect().await?;
    /// assert!(events.last().is_some_and(|event| event.kind.ends_run()));
    /// # Ok(()) }
    /// ```
    pub fn run_events(self, run_id: Uuid) -> RunEvents {
        RunEvents {
            inner: Box::pin(futures_util::stream::unfold(
                Some(self),
                move |state| async move {
                    let mut subscription = state?;
                    loop {
                        match subscription.next_event().await {
                            Ok(event) if event.run_id == run_id => {
                                if event.kind.ends_run() {
                                    subscription.close().await;
                                    return Some((Ok(event), None));
                                }
                                return Some((Ok(event), Some(subscription)));
                            }
                            Ok(_) => {}
                            Err(err) => return Some((Err(err), None)),
                        }
                    }
                },
            )),
        }
    }
}

/// The stream of one run's events, from [`Subscription::run_events`].
///
/// A [`Stream`]; `StreamExt` and `TryStreamExt` of the `futures` crates read it:
///
/// ```no_run
/// # async fn demo(client: pgflow_client::Client, run_id: uuid::Uuid) -> pgflow_client::Result<()> {
/// use futures_util::TryStreamExt;
///
/// let mut events = client.run(run_id).events().await?;
/// while let Some(event) = events.try_next().await? {
///     if let Some(error) = &event.error_message {
///         eprintln!("{} {:?}: {error}", event.kind, event.step_slug);
///     }
/// }
/// # Ok(()) }
/// ```
pub struct RunEvents {
    inner: std::pin::Pin<Box<dyn Stream<Item = Result<RunEvent>> + Send>>,
}

impl RunEvents {
    /// A stream of just the final event of a run that has already ended.
    pub(crate) fn ended(event: RunEvent) -> Self {
        Self {
            inner: Box::pin(futures_util::stream::iter([Ok(event)])),
        }
    }
}

impl fmt::Debug for RunEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunEvents").finish_non_exhaustive()
    }
}

impl Stream for RunEvents {
    type Item = Result<RunEvent>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

//! What the worker's parts (pollers, dispatcher, reporter, heartbeat, listener) share.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use sqlx::PgPool;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use super::handle::Counters;
use super::probe::ProbeRequests;
use super::running::Running;
use super::settings::Settings;

/// What the worker's parts share.
pub(crate) struct Shared {
    pub(crate) pool: PgPool,
    pub(crate) settings: Settings,
    /// One permit per running handler (and per result waiting to be handed to the reporter).
    pub(crate) semaphore: Arc<Semaphore>,
    pub(crate) counters: Arc<Counters>,
    /// The running tasks by run, for cancellations to reach.
    pub(crate) running: Arc<Running>,
    /// Whether the notification listener is connected and listening.
    pub(crate) listening: AtomicBool,
    /// What the flows' loops and the listener ask of the queue probe.
    pub(crate) probe: ProbeRequests,
    /// Fires at the shutdown deadline: running handlers are cancelled.
    pub(crate) hard_stop: CancellationToken,
    /// Fires when the shutdown stops waiting for reports to reach the database.
    pub(crate) abandon: CancellationToken,
    /// `true` while the reporter is retrying a call that failed: finished handlers then keep
    /// their places, and the worker reads nothing more, until a report goes through.
    pub(crate) reports_failing: watch::Sender<bool>,
    /// The application's state, for [`StepContext::state`](pgflow_core::StepContext::state).
    pub(crate) state: Option<Arc<dyn Any + Send + Sync>>,
    /// What [`StepContextExt`](super::StepContextExt) reads: the pool, wrapped by
    /// [`context::extension`](super::context::extension).
    pub(crate) extension: Arc<dyn Any + Send + Sync>,
}

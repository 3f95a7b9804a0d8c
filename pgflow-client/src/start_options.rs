//! How a run is started beyond its flow and input: [`StartOptions`], for
//! [`Client::start_with`](crate::Client::start_with).

use uuid::Uuid;

/// Options of a run's start: its priority and a run id of the caller's choosing.
///
/// The default is what [`Client::start`](crate::Client::start) does: priority 0 and a
/// generated run id.
///
/// **Priority**: among the ready tasks of one flow, a Rust worker starts those of the
/// higher-priority runs first, and those of one priority in the order they became ready.
/// Every task of the run has it, retries included; a task already running is never
/// interrupted for a higher one. Any `i16` is a priority (`-32768` to `32767`), so no
/// value can be out of range; 0 is the default. A steady stream of higher-priority runs
/// keeps lower ones waiting for as long as it lasts. TypeScript workers read in message
/// order and ignore priorities (docs/concepts.md, "Priority").
///
/// ```no_run
/// # #[derive(serde::Serialize)]
/// # struct Order { order_id: u64 }
/// # async fn demo(client: pgflow_client::Client, flow: pgflow_core::Flow<Order>) -> pgflow_client::Result<()> {
/// use pgflow_client::StartOptions;
///
/// // A customer is waiting for this one: ahead of the nightly batch's runs.
/// let urgent = StartOptions::new().priority(10);
/// let run = client.start_with(&flow, &Order { order_id: 42 }, urgent).await?;
///
/// // The batch: behind everything else, idempotent by run id.
/// let batch = StartOptions::new().priority(-5).run_id(uuid::Uuid::new_v4());
/// client.start_with(&flow, &Order { order_id: 43 }, batch).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartOptions {
    priority: i16,
    run_id: Option<Uuid>,
}

impl StartOptions {
    /// The defaults: priority 0, a generated run id.
    pub fn new() -> Self {
        Self::default()
    }

    /// Higher starts first; 0 is the default (`pgflow.start_flow_with_priority`).
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// A run id of the caller's choosing: starting again with it returns the existing run
    /// instead of a second one, as [`Client::start_with_id`](crate::Client::start_with_id).
    pub fn run_id(mut self, run_id: Uuid) -> Self {
        self.run_id = Some(run_id);
        self
    }

    /// The priority set, 0 by default.
    pub fn get_priority(&self) -> i16 {
        self.priority
    }

    /// The run id set, if any.
    pub fn get_run_id(&self) -> Option<Uuid> {
        self.run_id
    }
}

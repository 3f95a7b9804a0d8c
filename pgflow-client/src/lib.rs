//! Talks to PostgreSQL for pgflow: installs pgmq and the engine schema, applies flows, starts and
//! follows runs, and runs workers inside your Tokio application.
//!
//! | feature | what it adds |
//! |---|---|
//! | `throwaway` | [`throwaway`]: a throwaway PostgreSQL server and fresh test databases (Unix) |
//! | `otel` | a run carries the OpenTelemetry trace context of the code that started it; its tasks' spans are children of it |
//! | `metrics` | worker metrics through the `metrics` facade, named in [`metric_names`] |

#![deny(missing_docs)]

mod check;
mod client;
mod definition;
mod error;
pub mod events;
mod install;
pub mod metric_names;
mod prune;
mod run;
mod schedule;
mod shape_json;
mod start_options;
mod status;
mod subflows;
#[cfg(all(unix, feature = "throwaway"))]
pub mod throwaway;
mod trace_context;
mod worker;

pub use check::{Finding, FindingKind, LIVE_WORKER_WINDOW, check};
pub use client::{CANCEL_BATCH, Client, RETRY_BATCH};
pub use definition::{Compiled, Difference, Replace, differences};
pub use error::{Error, Result};
pub use events::{EventKind, RunEvent, RunEvents, Subscription};
pub use install::{InstallReport, install, install_pgmq};
pub use prune::{PRUNE_BATCH, PruneReport, prune, prune_preview};
pub use run::{
    Cancelled, RunFailure, RunHandle, RunOutput, RunRetry, RunRow, RunState, RunSummary,
    StepStateRow, TaskRow,
};
pub use schedule::{DEFAULT_GRACE, MAX_CATCH_UP, Missed, Schedule, ScheduleRow};
pub use shape_json::shape_json;
pub use start_options::StartOptions;
pub use status::{ParseStatusError, RunStatus, SkipReason, StepStatus, TaskStatus};
pub use subflows::{ChildRun, ParentLink};
pub use worker::{
    PRUNE_LOCK_KEY, StepContextExt, Worker, WorkerBuilder, WorkerHandle, WorkerStats,
};

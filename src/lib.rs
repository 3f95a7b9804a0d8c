//! pgflow: a DAG workflow engine that runs inside PostgreSQL.
//!
//! A flow is a set of steps, each an ordinary `async fn`; a step depends on other steps and
//! receives their outputs. Mistakes in the shape of a flow are compile errors: depending on a
//! step that is not in the flow (yet), taking a dependency's output as the wrong type, mapping
//! over something that is not a `Vec`, returning something that cannot be stored as JSON.
//!
//! ```
//! use pgflow::prelude::*;
//!
//! #[derive(Serialize, Deserialize)]
//! struct Order { order_id: u64, amount: f64 }
//! #[derive(Serialize, Deserialize)]
//! struct Validation { ok: bool }
//! #[derive(Serialize, Deserialize)]
//! struct Receipt { charged: f64 }
//!
//! /// A root step: it takes the flow input.
//! #[step]
//! async fn validate(order: &Order) -> Result<Validation, StepError> {
//!     Ok(Validation { ok: order.amount > 0.0 })
//! }
//!
//! /// Takes the flow input and the output of `validate`, by name.
//! #[step(depends_on = [validate], max_attempts = 5, timeout = 30)]
//! async fn charge(order: &Order, validate: Validation) -> Result<Receipt, StepError> {
//!     if !validate.ok {
//!         return Err(StepError::new("invalid order").no_retry());
//!     }
//!     Ok(Receipt { charged: order.amount })
//! }
//!
//! /// Takes only a dependency's output, and the context.
//! #[step(depends_on = [charge])]
//! async fn fulfill(charge: Receipt, ctx: &StepContext) -> Result<String, StepError> {
//!     Ok(format!("shipped {} (run {})", charge.charged, ctx.run_id()))
//! }
//!
//! fn order_processing() -> Flow<Order> {
//!     Flow::new("order_processing")
//!         .max_attempts(3)
//!         .base_delay(5)
//!         .timeout(60)
//!         .step(validate)
//!         .step(charge) // swapping this line with the next one does not compile
//!         .step(fulfill)
//!         .build()
//! }
//!
//! assert_eq!(
//!     order_processing().to_sql()?,
//!     "SELECT pgflow.create_flow('order_processing', max_attempts => 3, base_delay => 5, timeout => 60);\n\
//!      SELECT pgflow.add_step('order_processing', 'validate');\n\
//!      SELECT pgflow.add_step('order_processing', 'charge', ARRAY['validate'], max_attempts => 5, timeout => 30);\n\
//!      SELECT pgflow.add_step('order_processing', 'fulfill', ARRAY['charge']);\n"
//! );
//! # Ok::<(), pgflow::Error>(())
//! ```
//!
//! # Steps
//!
//! [`step`] is the reference for `#[step]`: its arguments (`depends_on`, `map`, `slug`, the
//! options, `crate`), how parameters receive the flow input, dependency outputs and the
//! [`StepContext`], what a step returns, what the attribute generates and the compile errors it
//! gives. Without the macro, [`step_fn`] wraps a closure.
//!
//! # Conditions
//!
//! A step may run only when its input matches a pattern (`#[step(if_input = .., if_not = ..)]`,
//! or [`pattern!`] with the builder), and may be skipped rather than fail the run
//! (`when_unmet`, `when_exhausted`, [`SkipMode`]). The compiler checks the pattern's field
//! names against the input's type, and makes the output of a step that may be skipped an
//! `Option` for its dependents and in [`RunOutput::output_of`]. See [`step`]'s "Conditions" and
//! `docs/concepts.md`.

#![deny(missing_docs)]

pub use pgflow_core::Flow;
pub use pgflow_core::{
    CancellationToken, Error as FlowError, FlowBuilder, FlowOptions, FlowShape, MAX_OPTION_VALUE,
    MAX_SLUG_LEN, Seconds, SkipMode, SlugProblem, Step, StepContext, StepContextBuilder, StepError,
    StepKind, StepOptions, StepShape, SubflowShape, Uuid, check_slug, is_valid_slug, schema,
    step_fn,
};

/// The type-level machinery that checks a flow's shape at compile time.
///
/// Signatures of [`Flow`], [`FlowBuilder`] and [`step_fn`] name these traits and types, so they
/// are public; a flow's author never writes them. A dependency list is a type-level list
/// ([`Here`](typing::Here), [`There`](typing::There) index into it), a step's input is checked
/// against it ([`FitsInput`](typing::FitsInput), [`TakesInput`](typing::TakesInput),
/// [`MapInput`](typing::MapInput)), and handlers are erased to
/// [`ErasedHandler`](typing::ErasedHandler) for the worker.
pub mod typing {
    pub use pgflow_core::{
        AddedOnce, AlreadyAdded, AnyInput, Append, BoxFuture, CheckedOutput, Contains,
        Dependencies, DependenciesIn, ErasedHandler, FitsInput, FlowStep, FnStep, Here, IntoStep,
        MapDependency, MapInput, MapOver, NotAdded, OutputMatches, Single, StepFnBuilder, StepOf,
        StepOutput, TakesInput, There,
    };
    // Subflows: a step running a child flow whose input is its dependency's output.
    pub use pgflow_core::{ChildInput, SubflowOf};
    // Conditions: whether a step may be skipped, and what its patterns are matched against.
    pub use pgflow_core::{
        AllDependencies, Condition, ConditionState, HasDependency, InputIs, IntoPattern,
        MayBeAbsent, NoDependencies, NoPattern, NotSkippable, OnDependencies, OnInput,
        ParamReceives, PatternFits, PatternTarget, Received, RunOutputOf, Skippability, Skippable,
        Unconditional, Untyped,
    };
}
pub use pgflow_client::{DEFAULT_GRACE, MAX_CATCH_UP, Missed, Schedule, ScheduleRow};
pub use pgflow_core::{Pattern, mode};
pub use pgflow_macros::{pattern, step};

// `step`'s reference lives in pgflow-macros, whose doctests cannot use the macro (it cannot
// depend on this crate): its examples run here instead, from the same file, so that the page
// readers see is the one that is tested. Only doctests read this item: the path leaves the
// package, which `cargo package` would refuse in a build.
#[cfg(doctest)]
#[doc = include_str!("../pgflow-macros/src/step.md")]
pub struct StepReferenceExamples;

// The same for `pattern!`'s reference.
#[cfg(doctest)]
#[doc = include_str!("../pgflow-macros/src/pattern.md")]
pub struct PatternReferenceExamples;

/// The names of the worker's metrics (recorded with feature `metrics`).
pub use pgflow_client::metric_names;
/// The throwaway PostgreSQL server and test databases (feature `throwaway`, off by default;
/// Unix only).
#[cfg(all(unix, feature = "throwaway"))]
pub use pgflow_client::throwaway;
pub use pgflow_client::{
    CANCEL_BATCH, Cancelled, ChildRun, Client, Compiled, Difference, Error, EventKind, Finding,
    FindingKind, InstallReport, LIVE_WORKER_WINDOW, PRUNE_BATCH, PRUNE_LOCK_KEY, ParentLink,
    ParseStatusError, PruneReport, RETRY_BATCH, Replace, Result, RunEvent, RunEvents, RunFailure,
    RunHandle, RunOutput, RunRetry, RunRow, RunState, RunStatus, RunSummary, SkipReason,
    StartOptions, StepContextExt, StepStateRow, StepStatus, Subscription, TaskRow, TaskStatus,
    Worker, WorkerBuilder, WorkerHandle, WorkerStats, check, differences, events, install,
    install_pgmq, prune, prune_preview,
};
pub use sqlx::PgPool;

/// The web dashboard (feature `dashboard`): `pgflow::dashboard::router(pool)` is an axum
/// `Router` to mount behind the app's own authentication; see the crate's documentation.
#[cfg(feature = "dashboard")]
pub use pgflow_dashboard as dashboard;

/// What a module defining flows needs: `use pgflow::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Client, Flow, Step, StepContext, StepContextExt, StepError, Worker, mode, pattern, step,
        step_fn,
    };
    pub use serde::{Deserialize, Serialize};
}

/// What `#[step]`-generated code refers to; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use pgflow_core::__private::*;
}

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
//! # The `#[step]` attribute
//!
//! `#[step]` turns an `async fn` returning `Result<Output, E>` (where `E` converts into
//! [`StepError`], as any `std::error::Error + Send + Sync` does) into a step named like the
//! function: a struct implementing [`Step`] and [`StepOf`](typing::StepOf), and a function of the same name
//! returning it. `.step(name)` adds it to a flow, `depends_on = [name]` names it, and a client
//! reads its output by it. The original function stays callable as `name::call(...)`.
//!
//! A step's dependencies must be at least as visible as the step (a `pub` step cannot depend
//! on a private one).
//!
//! Parameters are matched by convention:
//!
//! - a parameter named like a step in `depends_on` receives that step's output; its type must
//!   be exactly that output type (or a reference to it);
//! - a parameter of type `&StepContext` (or `StepContext`) receives the [`StepContext`];
//! - the remaining parameter, if any (at most one), receives the flow input; the step then
//!   fits only flows with that input type.
//!
//! Arguments: `depends_on = [a, b]`, `map`, `slug = "..."` (default: the function's name; a
//! literal slug is checked at compile time), the options `max_attempts`, `base_delay`,
//! `timeout`, `start_delay` (literals are range-checked at compile time), and
//! `crate = "path"` when `pgflow` is renamed in `Cargo.toml`.
//!
//! ## Map steps
//!
//! `#[step(map, depends_on = [items])]` runs once per element of `items`' `Vec<T>` output and
//! takes one `T`; `#[step(map)]` without a dependency maps over the flow input, which must be a
//! `Vec<T>`. A map step takes exactly that element (and optionally the context), and its
//! dependents receive a `Vec` of its outputs, in element order.
//!
//! ```
//! use pgflow::prelude::*;
//!
//! #[step]
//! async fn urls(site: &String) -> Result<Vec<String>, StepError> {
//!     Ok(vec![format!("{site}/a"), format!("{site}/b")])
//! }
//!
//! #[step(map, depends_on = [urls], max_attempts = 2)]
//! async fn fetch(url: String) -> Result<usize, StepError> {
//!     Ok(url.len())
//! }
//!
//! #[step(depends_on = [fetch])]
//! async fn total(fetch: Vec<usize>) -> Result<usize, StepError> {
//!     Ok(fetch.iter().sum())
//! }
//!
//! let crawl: Flow<String> = Flow::new("crawl").timeout(120).step(urls).step(fetch).step(total).build();
//! assert_eq!(
//!     crawl.statements()?,
//!     [
//!         "SELECT pgflow.create_flow('crawl', timeout => 120);",
//!         "SELECT pgflow.add_step('crawl', 'urls');",
//!         "SELECT pgflow.add_step('crawl', 'fetch', ARRAY['urls'], max_attempts => 2, step_type => 'map');",
//!         "SELECT pgflow.add_step('crawl', 'total', ARRAY['fetch']);",
//!     ]
//! );
//! # Ok::<(), pgflow::Error>(())
//! ```
//!
//! ## Testing a step
//!
//! Call the function directly with `name::call`, or go through the type-erased handler the
//! worker calls, with the task input as JSON:
//!
//! ```
//! use pgflow::prelude::*;
//! use serde_json::json;
//!
//! #[step]
//! async fn double(n: u64) -> Result<u64, StepError> {
//!     Ok(n * 2)
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! assert_eq!(double::call(21).await?, 42);
//!
//! let flow: Flow<u64> = Flow::new("doubling").step(double).build();
//! let double = flow.find_step("double").unwrap();
//! assert_eq!(double.call(json!({"run": 21}), StepContext::for_test()).await?, json!(42));
//! # Ok::<(), StepError>(()) }).unwrap();
//! ```
//!
//! ## Compile-time checks
//!
//! Depending on a step that is not in the flow yet does not compile:
//!
//! ```compile_fail,E0277
//! use pgflow::prelude::*;
//!
//! #[step]
//! async fn first(n: u64) -> Result<u64, StepError> { Ok(n) }
//! #[step(depends_on = [first])]
//! async fn second(first: u64) -> Result<u64, StepError> { Ok(first + 1) }
//!
//! let flow: Flow<u64> = Flow::new("f").step(second).step(first).build();
//! ```
//!
//! Nor does taking a dependency's output as another type:
//!
//! ```compile_fail,E0277
//! use pgflow::prelude::*;
//!
//! #[step]
//! async fn first(n: u64) -> Result<u64, StepError> { Ok(n) }
//! #[step(depends_on = [first])]
//! async fn second(first: String) -> Result<u64, StepError> { Ok(1) }
//! ```
//!
//! # Steps without the macro
//!
//! [`step_fn`] wraps a closure; see its documentation.

#![deny(missing_docs)]

pub use pgflow_core::Flow;
pub use pgflow_core::{
    CancellationToken, Error as FlowError, FlowBuilder, FlowOptions, FlowShape, MAX_OPTION_VALUE,
    MAX_SLUG_LEN, SlugProblem, Step, StepContext, StepContextBuilder, StepError, StepKind,
    StepOptions, StepShape, Uuid, check_slug, is_valid_slug, schema, step_fn,
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
}
pub use pgflow_macros::step;

/// The throwaway PostgreSQL server and test databases (feature `throwaway`, off by default;
/// Unix only).
#[cfg(all(unix, feature = "throwaway"))]
pub use pgflow_client::throwaway;
pub use pgflow_client::{
    Client, Compiled, Difference, Error, EventKind, InstallReport, ParseStatusError, Replace,
    Result, RunEvent, RunEvents, RunFailure, RunHandle, RunOutput, RunRow, RunState, RunStatus,
    RunSummary, StepContextExt, StepStateRow, StepStatus, Subscription, TaskRow, TaskStatus,
    Violation, Worker, WorkerBuilder, WorkerHandle, WorkerStats, check, differences, events,
    install, install_pgmq,
};
pub use sqlx::PgPool;

/// What a module defining flows needs: `use pgflow::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Client, Flow, Step, StepContext, StepContextExt, StepError, Worker, step, step_fn,
    };
    pub use serde::{Deserialize, Serialize};
}

/// What `#[step]`-generated code refers to; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use pgflow_core::__private::*;
}

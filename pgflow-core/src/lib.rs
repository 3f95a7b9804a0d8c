//! The I/O-free heart of pgflow: the typed flow builder, flow shapes, SQL compilation and the
//! engine's schema as embedded text.
//!
//! Most users reach this crate through `pgflow`, whose `#[step]` attribute turns an `async fn`
//! into a step. Without the macro, steps are closures wrapped by [`step_fn`]:
//!
//! ```
//! use pgflow_core::{Flow, StepContext, StepError, step_fn};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Order { order_id: u64, amount: f64 }
//!
//! let validate = step_fn("validate").handler(|order: Order, _ctx: StepContext| async move {
//!     Ok::<_, StepError>(order.amount > 0.0)
//! });
//! let charge = step_fn("charge")
//!     .depends_on(&validate)
//!     .max_attempts(5)
//!     .timeout(30)
//!     .handler(|order: Order, valid: bool, _ctx| async move {
//!         if !valid {
//!             return Err(StepError::new("invalid order").no_retry());
//!         }
//!         Ok(format!("receipt for {}", order.order_id))
//!     });
//!
//! let flow: Flow<Order> = Flow::new("order_processing")
//!     .max_attempts(3)
//!     .step(validate)
//!     .step(charge)
//!     .build();
//! assert_eq!(
//!     flow.to_sql()?,
//!     "SELECT pgflow.create_flow('order_processing', max_attempts => 3);\n\
//!      SELECT pgflow.add_step('order_processing', 'validate');\n\
//!      SELECT pgflow.add_step('order_processing', 'charge', ARRAY['validate'], max_attempts => 5, timeout => 30);\n"
//! );
//! # Ok::<(), pgflow_core::Error>(())
//! ```

#![deny(missing_docs)]

mod condition;
mod context;
mod error;
mod flow;
mod handler;
mod limits;
mod options;
mod pattern;
mod shape;
mod slug;
mod step;
mod step_fn;

pub mod schema;

#[doc(hidden)]
pub mod __private {
    //! Used by `#[step]`-generated code; not a public API.
    pub use crate::private::*;
}
mod private;

pub use condition::{NotSkippable, SkipMode, Skippability, Skippable, mode};
pub use context::{StepContext, StepContextBuilder};
pub use error::{Error, Result, SlugProblem};
pub use flow::{Flow, FlowBuilder, FlowStep};
pub use handler::{BoxFuture, ErasedHandler, StepError};
pub use limits::{ConcurrencyLimit, RateLimit, StepLimits};
pub use options::{FlowOptions, MAX_OPTION_VALUE, Seconds, StepOptions};
pub use pattern::{
    AllDependencies, HasDependency, InputIs, IntoPattern, NoDependencies, NoPattern,
    OnDependencies, OnInput, Pattern, PatternFits, PatternTarget, Untyped,
};
pub use shape::{FlowShape, StepKind, StepShape, SubflowShape};
pub use slug::{MAX_SLUG_LEN, check_slug, is_valid_slug};
pub use step::{
    AddedOnce, AlreadyAdded, CheckedOutput, Contains, Dependencies, DependenciesIn, Here, IntoStep,
    MapOver, MayBeAbsent, NotAdded, OutputMatches, ParamReceives, Received, RunOutputOf, Step,
    StepOf, StepOutput, There,
};
pub use step_fn::{
    AnyInput, Append, ChildInput, Condition, ConditionState, FitsInput, FnStep, MapDependency,
    MapInput, Single, StepFnBuilder, SubflowOf, TakesInput, Unconditional, step_fn,
};

pub use tokio_util::sync::CancellationToken;
pub use uuid::Uuid;

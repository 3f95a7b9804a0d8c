//! Steps as typed values, and the type-level lists that prove, at compile time, that a step's
//! dependencies are in the flow before it.
//!
//! A step is a value whose type knows the step's output and dependencies: the unit struct that
//! `#[step]` generates from an `async fn`, or a [`FnStep`](crate::FnStep) built around a closure
//! with [`step_fn`](crate::step_fn). The flow builder keeps the types of the steps added so far
//! in a list (`(Last, (..., (First, ())))`); adding a step requires each of its dependencies to
//! be [`Contains`]-ed in that list, which the compiler proves by finding its index
//! ([`Here`] or [`There`]).

use std::marker::PhantomData;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::private::Fields;
use crate::{
    ErasedHandler, NotSkippable, Skippability, Skippable, StepError, StepKind, StepOptions,
    StepShape,
};

/// A step of a flow, known by its type: its slug, kind, options, dependencies and output.
///
/// Implemented by the types `#[step]` generates (a struct named like the function, whose value
/// the function of the same name returns) and by [`FnStep`](crate::FnStep); there is rarely a
/// reason to implement it by hand.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a pgflow step",
    label = "not a step",
    note = "steps are `async fn`s marked `#[step]`, or closures wrapped with `step_fn(..)`"
)]
pub trait Step: Send + Sync + 'static {
    /// What dependent steps receive from this step: the handler's output, or `Vec` of it for
    /// a map step.
    type Output: StepOutput;

    /// The steps this one depends on, as a type-level list: `(A, (B, ()))` for `[A, B]`.
    type Deps: Dependencies;

    /// Whether the engine may skip this step ([`Skippable`](crate::Skippable)): it has a
    /// condition whose `when_unmet` skips, or a `when_exhausted` that skips. Its dependents
    /// then receive its output as an `Option`.
    type Skip: Skippability;

    /// Whether this step may be skipped with `skip-cascade`, which skips every step downstream
    /// of it: their outputs may then be missing from the run's, whatever their own modes.
    type Cascade: Skippability;

    /// The step slug.
    fn slug(&self) -> &str;

    /// Single or map.
    fn kind(&self) -> StepKind;

    /// Options set on this step (unset ones are inherited from the flow).
    fn options(&self) -> StepOptions;

    /// The slugs of the dependencies, in the order of [`Step::Deps`].
    fn dependencies(&self) -> Vec<String>;

    /// The step's shape: slug, kind, dependencies, options and condition.
    fn shape(&self) -> StepShape {
        crate::private::base_shape(self)
    }
}

/// A [`Step`] that can run in a flow whose input is `I`: it has a handler for that input.
///
/// A step that takes the flow input is a step of flows with exactly that input type; a step
/// that takes only dependency outputs fits any flow.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a step of a flow whose input is `{I}`",
    label = "this step takes a different flow input",
    note = "a step's flow-input parameter must have the flow's input type `{I}` (or be `&{I}`); a root map step takes one element of it"
)]
pub trait StepOf<I>: Step {
    /// The type-erased handler a worker calls for each task of this step.
    fn handler(&self) -> Arc<dyn ErasedHandler>;
}

/// A type a step may output: stored as JSON by the engine and read back by dependent steps.
///
/// Implemented for every `Serialize + DeserializeOwned + Send + 'static` type.
#[diagnostic::on_unimplemented(
    message = "the step output `{Self}` cannot be stored as JSON",
    label = "`{Self}` must implement `Serialize` and `Deserialize`",
    note = "step outputs are saved as JSON and decoded by the steps that depend on them: add `#[derive(Serialize, Deserialize)]` to the type"
)]
pub trait StepOutput: Serialize + DeserializeOwned + Send + 'static {}

#[diagnostic::do_not_recommend]
impl<T> StepOutput for T where T: Serialize + DeserializeOwned + Send + 'static {}

/// `Self` as a checked [`StepOutput`]: `#[step]` names its output type through this trait, so
/// that an output type that is not serializable yields one error, with this message, rather
/// than one per missing serde trait.
#[diagnostic::on_unimplemented(
    message = "the step output `{Self}` cannot be stored as JSON",
    label = "`{Self}` must implement `Serialize` and `Deserialize`",
    note = "step outputs are saved as JSON and decoded by the steps that depend on them: add `#[derive(Serialize, Deserialize)]` to the type"
)]
pub trait CheckedOutput {
    /// `Self`, known to be a [`StepOutput`].
    type Type: StepOutput;

    /// `self`, as that type.
    fn checked(self) -> Self::Type;
}

#[diagnostic::do_not_recommend]
impl<T: StepOutput> CheckedOutput for T {
    type Type = T;

    fn checked(self) -> T {
        self
    }
}

/// Something that names a step: a `#[step]` function (which returns its step value when
/// called), a [`FnStep`](crate::FnStep), or a reference to one.
///
/// This is what [`FlowBuilder::step`](crate::FlowBuilder::step), `depends_on` and a client's
/// `output_of` take.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a pgflow step",
    label = "expected a step",
    note = "steps are `async fn`s marked `#[step]`, or closures wrapped with `step_fn(..)`"
)]
pub trait IntoStep {
    /// The step named.
    type Step: Step;

    /// The step value.
    fn into_step(self) -> Self::Step;
}

impl<F, S> IntoStep for F
where
    F: FnOnce() -> S,
    S: Step,
{
    type Step = S;

    fn into_step(self) -> S {
        self()
    }
}

/// A step's output type `Self` is the type `Param` a parameter declares for it.
#[diagnostic::on_unimplemented(
    message = "this parameter takes `{Param}`, but the dependency it is named after outputs `{Self}`",
    label = "expected `{Self}` here",
    note = "a parameter named like a dependency receives that step's output, so its type must be the dependency's output type (or a reference to it)"
)]
pub trait OutputMatches<Param> {}

impl<T> OutputMatches<T> for T {}

/// A type-level list of steps: `()` or `(S, Rest)`.
pub trait Dependencies: 'static {
    /// [`Skippable`](crate::Skippable) if a `skip-cascade` upstream of these steps, or of one
    /// of them, may skip them.
    type Cascade: Skippability;
}

impl Dependencies for () {
    type Cascade = NotSkippable;
}

impl<S: Step, Rest: Dependencies> Dependencies for (S, Rest) {
    type Cascade =
        <<S::Cascade as Skippability>::Or<<S::Deps as Dependencies>::Cascade> as Skippability>::Or<
            Rest::Cascade,
        >;
}

/// Whether step `S`'s output may be missing from its run's outputs: it may be skipped itself,
/// or by a `skip-cascade` upstream. A client's `output_of` returns an `Option` for such a step.
pub type MayBeAbsent<S> =
    <<S as Step>::Skip as Skippability>::Or<<<S as Step>::Deps as Dependencies>::Cascade>;

/// How a completed run's outputs hold step `S`'s output: `S::Output`, or `Option` of it when
/// the step [may be absent](MayBeAbsent).
pub type RunOutputOf<S> = <MayBeAbsent<S> as Skippability>::Received<<S as Step>::Output>;

/// How a dependent step receives step `S`'s output: `S::Output`, or `Option` of it when `S`
/// [may be skipped](Step::Skip).
pub type Received<S> = <<S as Step>::Skip as Skippability>::Received<<S as Step>::Output>;

/// A parameter of type `Param` may receive the output `Output` of a dependency whose
/// skippability is `Self`: `Output` itself from a step that is never skipped, `Option<Output>`
/// from one that may be.
#[diagnostic::on_unimplemented(
    message = "this parameter takes `{Param}`, but the dependency it is named after may be skipped: take `Option<{Output}>`",
    label = "expected `Option<{Output}>` here",
    note = "a step with a condition (`if_input`, `if_not`) whose `when_unmet` is `skip` or `skip_cascade`, or whose `when_exhausted` is `skip` or `skip_cascade`, may not run; its output is then absent from its dependents' input, so they receive it as an `Option`, `None` when it was skipped"
)]
pub trait ParamReceives<Output, Param> {
    /// Decodes the parameter from the dependency `slug`'s entry in the task input.
    #[doc(hidden)]
    fn decode(fields: &mut Fields, slug: &str) -> Result<Param, StepError>;
}

impl<Output, Param> ParamReceives<Output, Param> for NotSkippable
where
    Output: OutputMatches<Param>,
    Param: StepOutput,
{
    fn decode(fields: &mut Fields, slug: &str) -> Result<Param, StepError> {
        <Self as Skippability>::decode::<Param>(fields, slug)
    }
}

impl<Output, Param> ParamReceives<Output, Option<Param>> for Skippable
where
    Output: OutputMatches<Param>,
    Param: StepOutput,
{
    fn decode(fields: &mut Fields, slug: &str) -> Result<Option<Param>, StepError> {
        <Self as Skippability>::decode::<Param>(fields, slug)
    }
}

/// Index of a list's head, in a [`Contains`] proof.
#[derive(Debug)]
pub struct Here;

/// Index into a list's tail, in a [`Contains`] proof.
#[derive(Debug)]
pub struct There<Index>(PhantomData<Index>);

/// Proof that the list of steps `Self` holds step `S`, at position `Index` (inferred).
#[diagnostic::on_unimplemented(
    message = "step `{S}` is not in this flow yet",
    label = "a dependency of this step is missing from the flow",
    note = "a step can only depend on steps added to the same flow before it: add `.step({S})` before this line"
)]
pub trait Contains<S, Index> {}

#[diagnostic::do_not_recommend]
impl<S, Rest> Contains<S, Here> for (S, Rest) {}

#[diagnostic::do_not_recommend]
impl<S, Head, Rest, Index> Contains<S, There<Index>> for (Head, Rest) where Rest: Contains<S, Index> {}

/// Marker of [`AddedOnce`]: the step is not in the list yet.
#[derive(Debug)]
pub struct NotAdded;

/// Marker of [`AddedOnce`]: the step is already in the list, at `Index`.
#[derive(Debug)]
pub struct AlreadyAdded<Index>(PhantomData<Index>);

/// Proof that the list of steps `Self` does not hold step `S` yet, so that adding `S` to a
/// flow twice does not compile.
///
/// Stable Rust cannot require that a trait is *not* implemented, so the proof works by
/// ambiguity: [`NotAdded`] fits every list, [`AlreadyAdded`] only a list that [`Contains`]
/// `S`. The caller leaves `Marker` to inference; for a new step exactly one impl fits and
/// inference picks it, for a step added before both fit and the compiler stops with
/// "type annotations needed: multiple impls satisfying `(..): AddedOnce<S, _>`", whose note
/// names the `AlreadyAdded` impl.
pub trait AddedOnce<S, Marker> {}

impl<S, Steps> AddedOnce<S, NotAdded> for Steps {}

impl<S, Steps, Index> AddedOnce<S, AlreadyAdded<Index>> for Steps where Steps: Contains<S, Index> {}

/// Proof that every step of the list `Self` is in the list `Steps`.
pub trait DependenciesIn<Steps, Indices> {}

impl<Steps> DependenciesIn<Steps, ()> for () {}

impl<S, Rest, Steps, Index, Indices> DependenciesIn<Steps, (Index, Indices)> for (S, Rest)
where
    Steps: Contains<S, Index>,
    Rest: DependenciesIn<Steps, Indices>,
{
}

/// What a map step can map over with elements of type `T`: `Vec<T>`.
#[diagnostic::on_unimplemented(
    message = "a map step cannot take `{T}` elements from `{Self}`",
    label = "the map step's parameter must be the element type of its dependency's `Vec` output",
    note = "a map step runs once per element of its dependency's `Vec<T>` output and takes one `T`; `{Self}` is not `Vec<{T}>`"
)]
pub trait MapOver<T> {}

impl<T> MapOver<T> for Vec<T> {}

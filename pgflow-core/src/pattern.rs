//! Condition patterns: the JSON objects a step's input must, or must not, contain for the step
//! to run. A [`Pattern`] knows at the type level what it is matched against (the flow input
//! of a type, or the outputs of some steps), so that a field name or a dependency that does
//! not exist is a compile error rather than a condition that silently never holds.
//!
//! Typed patterns are written with `pgflow::pattern!` (which checks every field name against
//! the type it names); a [`serde_json::Value`] object is the untyped way in.

use std::fmt;
use std::marker::PhantomData;

use serde_json::{Map, Value};

use crate::{NotSkippable, Skippability, Skippable};

/// A condition pattern matched against `On`: [`OnInput<I>`] (the flow input, of type `I`),
/// [`OnDependencies<L>`] (the outputs of the steps of the type-level list `L`, keyed by slug)
/// or [`Untyped`].
///
/// Built by `pgflow::pattern!` (whose reference has runnable examples), which checks the field
/// names at compile time:
///
/// ```text
/// pattern!(Order { plan: "premium", customer: { tier: "gold" } })  // Pattern<OnInput<Order>>
/// pattern!({ charge: { status: "paid" } })                         // Pattern<OnDependencies<(charge, ())>>
/// ```
///
/// and given to a step with `#[step(if_input = ..)]` or
/// [`StepFnBuilder::if_input`](crate::StepFnBuilder::if_input). The step then checks, at
/// compile time, that the pattern fits it: a pattern on the flow input fits a root step taking
/// that input, a pattern on dependencies a step that depends on each of them.
pub struct Pattern<On> {
    object: Map<String, Value>,
    _on: PhantomData<fn() -> On>,
}

impl<On> Pattern<On> {
    /// The pattern as JSON: an object.
    pub fn to_value(&self) -> Value {
        Value::Object(self.object.clone())
    }

    /// The pattern's object.
    pub fn as_object(&self) -> &Map<String, Value> {
        &self.object
    }

    pub(crate) fn new(object: Map<String, Value>) -> Self {
        Self {
            object,
            _on: PhantomData,
        }
    }
}

impl<On> Clone for Pattern<On> {
    fn clone(&self) -> Self {
        Self::new(self.object.clone())
    }
}

impl<On> PartialEq for Pattern<On> {
    fn eq(&self, other: &Self) -> bool {
        self.object == other.object
    }
}

impl<On> fmt::Debug for Pattern<On> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Pattern").field(&self.object).finish()
    }
}

/// [`Pattern`] target: the flow input, of type `I`.
#[derive(Debug)]
pub struct OnInput<I>(PhantomData<fn() -> I>);

/// [`Pattern`] target: the outputs of the steps of the type-level list `L`, keyed by slug.
#[derive(Debug)]
pub struct OnDependencies<L>(PhantomData<fn() -> L>);

/// [`Pattern`] target: unknown (a pattern given as JSON). It fits any step; only its being an
/// object, and for a dependent step its keys' being dependencies, are checked, by
/// [`FlowShape::validate`](crate::FlowShape::validate).
#[derive(Debug)]
pub struct Untyped;

/// The absence of a pattern, in a step builder's type.
#[derive(Debug)]
pub struct NoPattern;

/// What a pattern may be matched against ([`OnInput`], [`OnDependencies`], [`Untyped`]), or
/// [`NoPattern`]: whether there is a pattern, at the type level.
pub trait PatternTarget {
    /// [`Skippable`](crate::Skippable) when there is a pattern, which may be unmet.
    type Present: Skippability;
}

impl PatternTarget for NoPattern {
    type Present = NotSkippable;
}

impl PatternTarget for Untyped {
    type Present = Skippable;
}

impl<I> PatternTarget for OnInput<I> {
    type Present = Skippable;
}

impl<L> PatternTarget for OnDependencies<L> {
    type Present = Skippable;
}

/// Something a step's condition can be made of: a typed [`Pattern`], or a JSON object
/// ([`serde_json::Value`] or [`serde_json::Map`]), which is [`Untyped`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a condition pattern",
    label = "expected a `pattern!(..)` or a `serde_json::Value` object",
    note = "write the pattern with `pattern!(Input {{ field: value }})` (on the flow input) or `pattern!({{ dependency: {{ field: value }} }})` (on dependencies' outputs), so that its field names are checked; `serde_json::json!({{..}})` is the unchecked way"
)]
pub trait IntoPattern {
    /// What the pattern is matched against.
    type On: PatternTarget;

    /// The pattern as JSON.
    fn into_value(self) -> Value;
}

impl<On: PatternTarget> IntoPattern for Pattern<On> {
    type On = On;

    fn into_value(self) -> Value {
        Value::Object(self.object)
    }
}

impl IntoPattern for Value {
    type On = Untyped;

    fn into_value(self) -> Value {
        self
    }
}

impl IntoPattern for Map<String, Value> {
    type On = Untyped;

    fn into_value(self) -> Value {
        Value::Object(self)
    }
}

/// Proof that a pattern matched against `Self` fits a step whose flow input is `I` and whose
/// dependencies are the list `Deps`; `Index` is inferred.
#[diagnostic::on_unimplemented(
    message = "this condition does not fit the step",
    label = "the pattern is matched against something this step does not receive",
    note = "a root step's condition is matched against the flow input (`pattern!(Input {{ .. }})`), a dependent step's against its dependencies' outputs (`pattern!({{ dependency: .. }})`)"
)]
pub trait PatternFits<I, Deps, Index> {}

impl<I, Deps> PatternFits<I, Deps, ()> for NoPattern {}

impl<I, Deps> PatternFits<I, Deps, ()> for Untyped {}

impl<I, J, Deps> PatternFits<I, Deps, ()> for OnInput<J>
where
    Deps: NoDependencies,
    I: InputIs<J>,
{
}

impl<I, Deps, L, Index> PatternFits<I, Deps, Index> for OnDependencies<L> where
    L: AllDependencies<Deps, Index>
{
}

/// An empty list of dependencies: a root step.
#[diagnostic::on_unimplemented(
    message = "a condition on the flow input is set on a step with dependencies",
    label = "this step has dependencies, so its condition sees their outputs, not the flow input",
    note = "the engine matches a dependent step's condition against the object of its dependencies' outputs, keyed by slug: write `pattern!({{ dependency: {{ field: value }} }})`"
)]
pub trait NoDependencies {}

impl NoDependencies for () {}

/// A step's flow input `Self` is the type `J` its condition is on.
#[diagnostic::on_unimplemented(
    message = "this condition is on `{J}`, but the step takes the flow input `{Self}`",
    label = "the pattern names another type than the step's input",
    note = "a root step's condition is matched against the flow input: name the flow input's type in `pattern!({Self} {{ .. }})`"
)]
pub trait InputIs<J> {}

impl<T> InputIs<T> for T {}

/// Proof that every step of the list `Self` is in the list of dependencies `Deps`.
pub trait AllDependencies<Deps, Index> {}

impl<Deps> AllDependencies<Deps, ()> for () {}

impl<S, Rest, Deps, I0, Index> AllDependencies<Deps, (I0, Index)> for (S, Rest)
where
    Deps: HasDependency<S, I0>,
    Rest: AllDependencies<Deps, Index>,
{
}

/// Proof that the list of dependencies `Self` holds step `S`, at `Index` (inferred).
#[diagnostic::on_unimplemented(
    message = "the condition names `{S}`, which is not a dependency of this step",
    label = "a condition on a dependent step sees only its dependencies' outputs",
    note = "the input a dependent step's condition is matched against holds the outputs of its dependencies, keyed by slug; add `{S}` to the step's dependencies, or leave it out of the pattern"
)]
pub trait HasDependency<S, Index> {}

#[diagnostic::do_not_recommend]
impl<S, Rest> HasDependency<S, crate::Here> for (S, Rest) {}

#[diagnostic::do_not_recommend]
impl<S, Head, Rest, Index> HasDependency<S, crate::There<Index>> for (Head, Rest) where
    Rest: HasDependency<S, Index>
{
}

/// The entries of a pattern on dependencies, while `pattern!` builds it: `L` lists the steps.
#[doc(hidden)]
#[derive(Debug)]
pub struct DependencyEntries<L> {
    object: Map<String, Value>,
    _steps: PhantomData<fn() -> L>,
}

/// What `pattern!` expands to; not a public API.
#[doc(hidden)]
pub(crate) mod build {
    use serde::Serialize;

    use super::{DependencyEntries, Map, OnDependencies, OnInput, Pattern, PhantomData, Value};
    use crate::{IntoStep, Step};

    /// A pattern on the flow input `I`. `_fields_exist` is never called: it type-checks only
    /// if each field the pattern names exists on `I`.
    pub fn on_input<I, const N: usize>(
        _fields_exist: impl FnOnce(&I),
        fields: [(&str, Value); N],
    ) -> Pattern<OnInput<I>> {
        Pattern::new(collect(fields))
    }

    /// No dependency entries yet.
    pub fn no_dependencies() -> DependencyEntries<()> {
        DependencyEntries {
            object: Map::new(),
            _steps: PhantomData,
        }
    }

    /// Adds the entry of `step` (under its slug) to `rest`. `_fields_exist` is never called:
    /// it type-checks only if each field named exists on the step's output.
    pub fn dependency<T: IntoStep, Rest>(
        step: T,
        _fields_exist: impl FnOnce(&<T::Step as Step>::Output),
        value: Value,
        mut rest: DependencyEntries<Rest>,
    ) -> DependencyEntries<(T::Step, Rest)> {
        rest.object
            .insert(step.into_step().slug().to_owned(), value);
        DependencyEntries {
            object: rest.object,
            _steps: PhantomData,
        }
    }

    /// The pattern of these entries.
    pub fn on_dependencies<L>(entries: DependencyEntries<L>) -> Pattern<OnDependencies<L>> {
        Pattern::new(entries.object)
    }

    /// A JSON object of these fields.
    pub fn object<const N: usize>(fields: [(&str, Value); N]) -> Value {
        Value::Object(collect(fields))
    }

    /// A leaf value as JSON.
    ///
    /// # Panics
    ///
    /// If `value`'s `Serialize` fails (a map with keys that are not strings, or an
    /// implementation that returns an error), as `serde_json::json!` does: it is a value
    /// written in the pattern's code.
    pub fn leaf<T: Serialize + ?Sized>(value: &T) -> Value {
        match serde_json::to_value(value) {
            Ok(value) => value,
            Err(error) => panic!(
                "a value of a condition pattern cannot be written as JSON ({}): {error}",
                std::any::type_name::<T>()
            ),
        }
    }

    fn collect<const N: usize>(fields: [(&str, Value); N]) -> Map<String, Value> {
        fields
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect()
    }
}

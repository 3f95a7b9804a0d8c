//! What `#[step]`-generated code refers to, through `pgflow::__private`. Not a public API:
//! anything here may change in any release.

use std::any::type_name;
use std::future::Future;

use serde::de::DeserializeOwned;
use serde_json::Map;
pub use serde_json::Value;

pub use std::sync::Arc;
pub use std::vec::Vec;

pub use crate::pattern::build::*;
pub use crate::{
    CheckedOutput, ErasedHandler, IntoStep, MapOver, NotSkippable, OnDependencies, OnInput,
    OutputMatches, ParamReceives, Pattern, PatternFits, SkipMode, Skippability, Skippable, Step,
    StepContext, StepError, StepKind, StepOf, StepOptions, StepOutput, StepShape,
};
pub use crate::{InputIs, mode};

/// The fields of a single step's task input: `run` and the outputs of dependencies.
#[derive(Debug)]
pub struct Fields {
    map: Map<String, Value>,
    /// Keys already taken out of `map`, for error messages.
    taken: Vec<String>,
}

impl Fields {
    /// Splits a single step's task input into its fields.
    pub fn new(input: Value) -> Result<Self, StepError> {
        match input {
            Value::Object(map) => Ok(Self {
                map,
                taken: Vec::new(),
            }),
            other => Err(StepError::new(format!(
                "the task input of a single step must be a JSON object with `run` and the outputs of its dependencies, not {}",
                json_kind(&other)
            ))
            .no_retry()),
        }
    }

    /// Decodes the flow input, under `run`.
    pub fn flow_input<T: DeserializeOwned>(&mut self) -> Result<T, StepError> {
        let value = self.take("run", "the flow input")?;
        serde_json::from_value(value).map_err(|error| {
            StepError::with_source(
                format!(
                    "cannot decode the flow input (`run`) as `{}`",
                    type_name::<T>()
                ),
                error,
            )
            .no_retry()
        })
    }

    /// Decodes the output of dependency `step`, under its slug, as the parameter's type `T`
    /// (which must be the step's output type).
    pub fn dependency<S, T>(&mut self, step: &S) -> Result<T, StepError>
    where
        S: Step,
        S::Skip: ParamReceives<S::Output, T>,
    {
        <S::Skip as ParamReceives<S::Output, T>>::decode(self, step.slug())
    }

    /// Decodes the output of the dependency with this slug, which may have been skipped:
    /// `None` when the input has no entry for it (the engine leaves a skipped dependency out).
    pub(crate) fn optional_dependency<T: StepOutput>(
        &mut self,
        slug: &str,
    ) -> Result<Option<T>, StepError> {
        if self.map.contains_key(slug) {
            self.dependency_by_slug(slug).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Decodes the output of the dependency with this slug.
    pub(crate) fn dependency_by_slug<T: StepOutput>(&mut self, slug: &str) -> Result<T, StepError> {
        let value = self.take(slug, "the output of a dependency")?;
        serde_json::from_value(value).map_err(|error| {
            StepError::with_source(
                format!(
                    "cannot decode the output of dependency `{slug}` as `{}`",
                    type_name::<T>()
                ),
                error,
            )
            .no_retry()
        })
    }

    fn take(&mut self, key: &str, what: &str) -> Result<Value, StepError> {
        if let Some(value) = self.map.remove(key) {
            self.taken.push(key.to_owned());
            return Ok(value);
        }
        Err(StepError::new(format!(
            "the task input has no `{key}` field ({what}); it has: {}",
            self.keys()
        ))
        .no_retry())
    }

    fn keys(&self) -> String {
        let mut keys: Vec<&String> = self.map.keys().chain(&self.taken).collect();
        keys.sort();
        let keys: Vec<String> = keys.into_iter().map(|k| format!("`{k}`")).collect();
        if keys.is_empty() {
            "no fields".to_owned()
        } else {
            keys.join(", ")
        }
    }
}

/// Decodes a map step's task input: one element.
pub fn element<T: DeserializeOwned>(input: Value) -> Result<T, StepError> {
    serde_json::from_value(input).map_err(|error| {
        StepError::with_source(
            format!("cannot decode the map element as `{}`", type_name::<T>()),
            error,
        )
        .no_retry()
    })
}

/// Encodes a single step's output.
pub fn encode<T: StepOutput>(output: T) -> Result<Value, StepError> {
    serde_json::to_value(output).map_err(|error| {
        StepError::with_source(
            format!("cannot serialize the step output `{}`", type_name::<T>()),
            error,
        )
        .no_retry()
    })
}

/// Encodes one output of a map step, whose [`Step::Output`] is `Vec<T>`.
pub fn encode_element<T>(output: T) -> Result<Value, StepError>
where
    Vec<T>: StepOutput,
{
    encode_single_item(vec![output])
}

/// Encodes a one-element sequence (a map step's output wrapped in a `Vec`) and returns that
/// element's JSON. `#[step]` passes the `Vec` through [`CheckedOutput`], so that an output that
/// is not serializable is reported once.
pub fn encode_single_item<V: StepOutput>(items: V) -> Result<Value, StepError> {
    match encode(items)? {
        Value::Array(mut items) if items.len() == 1 => Ok(items.swap_remove(0)),
        other => Err(StepError::new(format!(
            "the map step output `{}` serialized to {} instead of a one-element array",
            type_name::<V>(),
            json_kind(&other)
        ))
        .no_retry()),
    }
}

/// Converts a handler's error into a [`StepError`].
pub fn step_error<E: Into<StepError>>(error: E) -> StepError {
    error.into()
}

/// Boxes a handler.
pub fn erase<F, Fut>(handler: F) -> Arc<dyn ErasedHandler>
where
    F: Fn(Value, StepContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, StepError>> + Send + 'static,
{
    Arc::new(handler)
}

/// The shape of `step` from its parts, for a `#[step]` that adds its condition to it.
pub fn base_shape<S: Step + ?Sized>(step: &S) -> StepShape {
    StepShape {
        kind: step.kind(),
        dependencies: step.dependencies(),
        options: step.options(),
        ..StepShape::new(step.slug())
    }
}

/// Compiles only if the flow input `Input` of a step is the type `Pattern` its condition is
/// on.
pub fn assert_input_is<Input: crate::InputIs<Pattern>, Pattern>() {}

/// A pattern written as an expression in `#[step(if_input = ..)]`: JSON, unchecked.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a JSON pattern",
    label = "expected a `serde_json::Value` object",
    note = "in `#[step(..)]`, write a checked pattern inline, without `pattern!`: `if_input = Input {{ field: value }}` or `if_input = {{ dependency: {{ field: value }} }}`; any other expression must be a `serde_json::Value` object"
)]
pub trait UntypedPattern {
    /// The pattern as JSON.
    fn into_json(self) -> Value;
}

impl UntypedPattern for Value {
    fn into_json(self) -> Value {
        self
    }
}

impl UntypedPattern for Map<String, Value> {
    fn into_json(self) -> Value {
        Value::Object(self)
    }
}

/// The JSON of a pattern given as an expression to `#[step]`.
pub fn untyped_pattern<P: UntypedPattern>(pattern: P) -> Value {
    pattern.into_json()
}

/// Compiles only if a map step over `Source` may take `T` elements.
pub fn assert_map_over<Source: MapOver<T>, T>() {}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

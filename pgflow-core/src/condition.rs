//! Conditions on steps and what happens when a step cannot run: the [`SkipMode`]s of
//! pgflow 0.14's `when_unmet` and `when_exhausted`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::private::Fields;
use crate::{Error, StepError, StepOutput};

/// What the engine does with a step that cannot run: its condition is unmet (`when_unmet`),
/// or a task used up its attempts (`when_exhausted`). The names are the engine's, as
/// `pgflow.add_step` takes them.
///
/// A step that may be skipped (a mode other than [`Fail`](Self::Fail) that can happen) is
/// *skippable*: its dependents receive its output as an `Option`, `None` when it was skipped.
///
/// ```
/// use pgflow_core::SkipMode;
///
/// assert_eq!(SkipMode::SkipCascade.as_str(), "skip-cascade");
/// assert_eq!("skip".parse::<SkipMode>(), Ok(SkipMode::Skip));
/// assert_eq!(serde_json::to_value(SkipMode::Fail)?, serde_json::json!("fail"));
/// assert!("skip_cascade".parse::<SkipMode>().is_err());
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SkipMode {
    /// Fail the step, and with it the run (`'fail'`).
    #[serde(rename = "fail")]
    Fail,
    /// Skip the step (`'skip'`): its dependents no longer wait for it and run without its
    /// output, which is absent from their input; a map step over it gets no tasks and outputs
    /// `[]`.
    #[serde(rename = "skip")]
    Skip,
    /// Skip the step and every step downstream of it (`'skip-cascade'`); the run goes on with
    /// the other branches.
    #[serde(rename = "skip-cascade")]
    SkipCascade,
}

impl SkipMode {
    /// Every mode, in the order above.
    pub const ALL: [Self; 3] = [Self::Fail, Self::Skip, Self::SkipCascade];

    /// The engine's name: `"fail"`, `"skip"` or `"skip-cascade"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Fail => "fail",
            Self::Skip => "skip",
            Self::SkipCascade => "skip-cascade",
        }
    }

    /// Whether the step is skipped rather than failed ([`Skip`](Self::Skip) or
    /// [`SkipCascade`](Self::SkipCascade)).
    ///
    /// ```
    /// use pgflow_core::SkipMode;
    ///
    /// assert!(SkipMode::SkipCascade.skips());
    /// assert!(!SkipMode::Fail.skips());
    /// ```
    pub const fn skips(self) -> bool {
        !matches!(self, Self::Fail)
    }
}

impl fmt::Display for SkipMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SkipMode {
    type Err = Error;

    /// Reads the engine's name of a mode; any other text is [`Error::UnknownSkipMode`].
    fn from_str(text: &str) -> Result<Self, Error> {
        Self::ALL
            .into_iter()
            .find(|mode| mode.as_str() == text)
            .ok_or_else(|| Error::UnknownSkipMode {
                mode: text.to_owned(),
            })
    }
}

/// Whether a step may be absent: its output is then received as an `Option`. A type-level
/// boolean, [`Skippable`] or [`NotSkippable`], computed by the compiler from a step's condition
/// and modes ([`Step::Skip`](crate::Step::Skip)).
///
/// A parameter or closure argument that receives the output `T` of a dependency takes
/// [`Received<T>`](Self::Received): `T` from a step that is never skipped, `Option<T>` from one
/// that may be (`None` when it was).
pub trait Skippability: Send + Sync + 'static {
    /// Whether this is [`Skippable`].
    const SKIPPABLE: bool;

    /// How a dependent receives an output `T`: `T`, or `Option<T>` when the step may be
    /// skipped.
    type Received<T>;

    /// The type-level "or": [`Skippable`] if either is.
    type Or<B: Skippability>: Skippability;

    /// The type-level "and": [`Skippable`] if both are.
    type And<B: Skippability>: Skippability;

    /// `value` as received: `None` (absent) is `Some(None)` from a skippable step and `None`
    /// (an error for the caller to report) from one that is never skipped.
    fn received<T>(value: Option<T>) -> Option<Self::Received<T>>;

    /// Decodes a dependency's output from a task input, where a skipped one is absent.
    #[doc(hidden)]
    fn decode<T: StepOutput>(
        fields: &mut Fields,
        slug: &str,
    ) -> Result<Self::Received<T>, StepError>;
}

/// A step that is never skipped: dependents receive its output as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NotSkippable;

/// A step that may be skipped: dependents receive its output as an `Option`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Skippable;

impl Skippability for NotSkippable {
    const SKIPPABLE: bool = false;
    type Received<T> = T;
    type Or<B: Skippability> = B;
    type And<B: Skippability> = Self;

    fn received<T>(value: Option<T>) -> Option<T> {
        value
    }

    fn decode<T: StepOutput>(fields: &mut Fields, slug: &str) -> Result<T, StepError> {
        fields.dependency_by_slug(slug)
    }
}

impl Skippability for Skippable {
    const SKIPPABLE: bool = true;
    type Received<T> = Option<T>;
    type Or<B: Skippability> = Self;
    type And<B: Skippability> = B;

    fn received<T>(value: Option<T>) -> Option<Option<T>> {
        Some(value)
    }

    fn decode<T: StepOutput>(fields: &mut Fields, slug: &str) -> Result<Option<T>, StepError> {
        fields.optional_dependency(slug)
    }
}

/// The skip modes as types, for [`StepFnBuilder::when_unmet`](crate::StepFnBuilder::when_unmet)
/// and [`when_exhausted`](crate::StepFnBuilder::when_exhausted): the mode decides, at compile
/// time, whether the step's dependents receive its output as an `Option`.
///
/// ```
/// use pgflow_core::{Flow, SkipMode, mode, step_fn};
///
/// // After its attempts, `enrich` is skipped rather than failing the run.
/// let enrich = step_fn("enrich")
///     .max_attempts(2)
///     .when_exhausted(mode::Skip)
///     .handler(|id: u64, _ctx| async move { Ok(format!("profile {id}")) });
/// let flow: Flow<u64> = Flow::new("signup").step(enrich).build();
/// assert_eq!(flow.shape().steps[0].when_exhausted, SkipMode::Skip);
/// ```
pub mod mode {
    use super::{NotSkippable, SkipMode, Skippability, Skippable};

    /// A skip mode as a type: [`Fail`], [`Skip`] or [`SkipCascade`].
    #[diagnostic::on_unimplemented(
        message = "`{Self}` is not a skip mode",
        label = "expected `mode::Fail`, `mode::Skip` or `mode::SkipCascade`",
        note = "the builder takes the mode as a type, `pgflow::mode::Skip`, not as the value `SkipMode::Skip`: whether a step may be skipped decides, at compile time, how its dependents receive its output"
    )]
    pub trait Mode: Send + Sync + 'static {
        /// The mode's value.
        const MODE: SkipMode;
        /// [`Skippable`] unless the mode fails the step.
        type Skips: Skippability;
        /// [`Skippable`] for [`SkipCascade`]: a step skipped with it skips every step
        /// downstream, whose outputs may then be missing from the run's.
        type Cascades: Skippability;
    }

    /// [`SkipMode::Fail`] as a type.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct Fail;

    /// [`SkipMode::Skip`] as a type.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct Skip;

    /// [`SkipMode::SkipCascade`] as a type.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct SkipCascade;

    impl Mode for Fail {
        const MODE: SkipMode = SkipMode::Fail;
        type Skips = NotSkippable;
        type Cascades = NotSkippable;
    }

    impl Mode for Skip {
        const MODE: SkipMode = SkipMode::Skip;
        type Skips = Skippable;
        type Cascades = NotSkippable;
    }

    impl Mode for SkipCascade {
        const MODE: SkipMode = SkipMode::SkipCascade;
        type Skips = Skippable;
        type Cascades = Skippable;
    }
}

//! The one error type of `pgflow-core`: problems found in a flow definition before any SQL is
//! sent.

use std::fmt;

/// A `Result` whose error defaults to this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A problem found when validating a flow definition (see [`Flow::validate`](crate::Flow::validate)).
///
/// Every variant names the flow, the step when there is one, and the offending field, so the
/// message alone tells what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The flow slug breaks the slug rule (see [`is_valid_slug`](crate::is_valid_slug)).
    #[error("invalid flow slug {slug:?}: {problem}")]
    InvalidFlowSlug {
        /// The slug as given.
        slug: String,
        /// What is wrong with it.
        problem: SlugProblem,
    },

    /// A step slug breaks the slug rule (see [`is_valid_slug`](crate::is_valid_slug)).
    #[error("invalid step slug {slug:?} in flow `{flow}`: {problem}")]
    InvalidStepSlug {
        /// The flow the step belongs to.
        flow: String,
        /// The slug as given.
        slug: String,
        /// What is wrong with it.
        problem: SlugProblem,
    },

    /// Two steps of one flow have the same slug.
    #[error("flow `{flow}` has more than one step with slug `{step}`; step slugs must be unique")]
    DuplicateStep {
        /// The flow.
        flow: String,
        /// The slug used twice.
        step: String,
    },

    /// A step depends on a slug that is not a step added before it in the same flow.
    ///
    /// The typed builder rules this out at compile time; it can still happen when a helper
    /// function builds several closure steps of the same type with different slugs.
    #[error(
        "step `{step}` of flow `{flow}` depends on `{dependency}`, which is not a step added before it"
    )]
    UnknownDependency {
        /// The flow.
        flow: String,
        /// The dependent step.
        step: String,
        /// The missing dependency.
        dependency: String,
    },

    /// A step lists the same dependency twice.
    #[error("step `{step}` of flow `{flow}` lists dependency `{dependency}` more than once")]
    DuplicateDependency {
        /// The flow.
        flow: String,
        /// The dependent step.
        step: String,
        /// The repeated dependency.
        dependency: String,
    },

    /// A flow-level option is out of range.
    #[error("option `{option}` of flow `{flow}` is {value}, but it {requirement}")]
    InvalidFlowOption {
        /// The flow.
        flow: String,
        /// The option's name as in SQL: `max_attempts`, `base_delay`, `timeout` or `max_delay`.
        option: &'static str,
        /// The value given.
        value: u32,
        /// The rule it breaks, e.g. "must be at least 3 seconds".
        requirement: &'static str,
    },

    /// A step-level option is out of range.
    #[error("option `{option}` of step `{step}` in flow `{flow}` is {value}, but it {requirement}")]
    InvalidStepOption {
        /// The flow.
        flow: String,
        /// The step.
        step: String,
        /// The option's name as in SQL: `max_attempts`, `base_delay`, `timeout`, `start_delay`
        /// or `max_delay`.
        option: &'static str,
        /// The value given.
        value: u32,
        /// The rule it breaks, e.g. "must be at least 3 seconds".
        requirement: &'static str,
    },

    /// A step's `required_input_pattern` or `forbidden_input_pattern` is not a JSON object.
    /// The engine matches patterns with `@>` against the step's input object, which only an
    /// object can describe, and refuses any other (`steps`' CHECKs).
    #[error(
        "the `{pattern}` of step `{step}` in flow `{flow}` is {found}, but a condition pattern must be a JSON object, as `{{\"field\": value}}`"
    )]
    InvalidInputPattern {
        /// The flow.
        flow: String,
        /// The step.
        step: String,
        /// Which pattern: `required_input_pattern` (the step's `if`) or
        /// `forbidden_input_pattern` (its `if_not`).
        pattern: &'static str,
        /// What it is instead: `null`, `a boolean`, `a number`, `a string`, `an array`.
        found: &'static str,
    },

    /// A pattern of a dependent step names a key that is not one of its dependencies. A
    /// dependent step's condition is matched against the object of its dependencies' outputs,
    /// keyed by slug, which has no other key: such a required pattern never holds, and such a
    /// forbidden one never applies.
    #[error(
        "the `{pattern}` of step `{step}` in flow `{flow}` names `{key}`, which is not one of its dependencies ({dependencies}): a dependent step's condition is matched against its dependencies' outputs, keyed by slug"
    )]
    PatternKeyNotDependency {
        /// The flow.
        flow: String,
        /// The step.
        step: String,
        /// Which pattern: `required_input_pattern` or `forbidden_input_pattern`.
        pattern: &'static str,
        /// The key that is not a dependency's slug.
        key: String,
        /// The step's dependencies, as `` `a`, `b` ``.
        dependencies: String,
    },

    /// A subflow step (issue 22) that the engine would refuse: more than one dependency (its
    /// child's input comes from at most one), a child flow slug that breaks the slug rule, or
    /// a child that is the flow itself.
    #[error("subflow step `{step}` of flow `{flow}` {problem}")]
    InvalidSubflow {
        /// The flow.
        flow: String,
        /// The subflow step.
        step: String,
        /// What is wrong, as the rest of the sentence.
        problem: String,
    },

    /// A step's concurrency or rate limit the engine refuses (issue 22): a limit of 0 or
    /// above [`StepLimits::MAX`](crate::StepLimits::MAX), a period of 0 or above a day, an
    /// empty or overlong key.
    #[error("step `{step}` of flow `{flow}` {problem}")]
    InvalidLimit {
        /// The flow.
        flow: String,
        /// The limited step.
        step: String,
        /// What is wrong, as the rest of the sentence.
        problem: String,
    },

    /// A skip mode's name is none of `fail`, `skip` and `skip-cascade` (see
    /// [`SkipMode`](crate::SkipMode)).
    #[error("unknown skip mode {mode:?}: expected \"fail\", \"skip\" or \"skip-cascade\"")]
    UnknownSkipMode {
        /// The name as given.
        mode: String,
    },
}

/// Why a slug is invalid (see [`check_slug`](crate::check_slug)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlugProblem {
    /// The slug is empty.
    Empty,
    /// The slug has more than [`MAX_SLUG_LEN`](crate::MAX_SLUG_LEN) characters.
    TooLong {
        /// Its length in characters.
        len: usize,
    },
    /// The first character is not an ASCII letter or `_`.
    InvalidStart(char),
    /// A character is not an ASCII letter, digit or `_`.
    InvalidChar(char),
    /// The slug is a reserved word (`run`, the key under which steps receive the flow input).
    Reserved,
    /// A flow slug is longer than a pgmq queue name may be (47 characters): the flow's queue
    /// is named after it.
    FlowTooLong {
        /// Its length in characters.
        len: usize,
    },
}

impl fmt::Display for SlugProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("a slug cannot be empty"),
            Self::TooLong { len } => write!(
                f,
                "a slug has at most {} characters, this one has {len}",
                crate::MAX_SLUG_LEN
            ),
            Self::InvalidStart(c) => {
                write!(f, "a slug starts with an ASCII letter or `_`, not {c:?}")
            }
            Self::InvalidChar(c) => write!(
                f,
                "a slug contains only ASCII letters, digits and `_`, not {c:?}"
            ),
            Self::Reserved => f.write_str(
                "`run` is reserved: it is the key under which steps receive the flow input",
            ),
            Self::FlowTooLong { len } => write!(
                f,
                "a flow slug names its pgmq queue, and pgmq refuses queue names of more than {} \
                 characters; this one has {len}",
                crate::slug::MAX_FLOW_SLUG_LEN
            ),
        }
    }
}

//! Runtime options of flows and steps: retries, backoff, timeouts and delays.

use serde::{Deserialize, Serialize};

/// The largest value an option may take: options are PostgreSQL `integer` columns.
pub const MAX_OPTION_VALUE: u32 = 2_147_483_647;

/// Options of a whole flow; each step inherits them unless it sets its own.
///
/// Options left as `None` are omitted from the SQL, so the engine's defaults apply (3 attempts,
/// 1 second base delay, 60 seconds timeout in pgflow 0.8.1). Values are whole seconds or counts;
/// being unsigned, they cannot be negative.
///
/// ```
/// use pgflow_core::FlowOptions;
///
/// let options = FlowOptions::new().max_attempts(3).timeout(60);
/// assert_eq!(options.max_attempts, Some(3));
/// assert_eq!(options.base_delay, None);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FlowOptions {
    /// How many times a task is attempted before the run fails (`max_attempts`, at least 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Base of the exponential retry backoff, in seconds (`base_delay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_delay: Option<u32>,
    /// Seconds a task may run before it is retried (`timeout`, greater than 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u32>,
}

impl FlowOptions {
    /// No options set: the engine's defaults apply.
    pub const fn new() -> Self {
        Self {
            max_attempts: None,
            base_delay: None,
            timeout: None,
        }
    }

    /// Sets `max_attempts`.
    #[must_use]
    pub const fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// Sets `base_delay`, in seconds.
    #[must_use]
    pub const fn base_delay(mut self, seconds: u32) -> Self {
        self.base_delay = Some(seconds);
        self
    }

    /// Sets `timeout`, in seconds.
    #[must_use]
    pub const fn timeout(mut self, seconds: u32) -> Self {
        self.timeout = Some(seconds);
        self
    }

    /// The options in SQL order, with their names: only those that are set.
    pub(crate) fn named(&self) -> impl Iterator<Item = (&'static str, u32)> {
        named([
            ("max_attempts", self.max_attempts),
            ("base_delay", self.base_delay),
            ("timeout", self.timeout),
        ])
    }
}

/// Options of one step; those left as `None` are inherited from the flow.
///
/// ```
/// use pgflow_core::StepOptions;
///
/// let options = StepOptions::new().max_attempts(5).start_delay(10);
/// assert_eq!(options.start_delay, Some(10));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StepOptions {
    /// How many times a task of this step is attempted (`max_attempts`, at least 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Base of the exponential retry backoff, in seconds (`base_delay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_delay: Option<u32>,
    /// Seconds a task may run before it is retried (`timeout`, greater than 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u32>,
    /// Seconds to wait, once the step is ready, before its tasks are queued (`start_delay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_delay: Option<u32>,
}

impl StepOptions {
    /// No options set: the flow's options apply.
    pub const fn new() -> Self {
        Self {
            max_attempts: None,
            base_delay: None,
            timeout: None,
            start_delay: None,
        }
    }

    /// Sets `max_attempts`.
    #[must_use]
    pub const fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// Sets `base_delay`, in seconds.
    #[must_use]
    pub const fn base_delay(mut self, seconds: u32) -> Self {
        self.base_delay = Some(seconds);
        self
    }

    /// Sets `timeout`, in seconds.
    #[must_use]
    pub const fn timeout(mut self, seconds: u32) -> Self {
        self.timeout = Some(seconds);
        self
    }

    /// Sets `start_delay`, in seconds.
    #[must_use]
    pub const fn start_delay(mut self, seconds: u32) -> Self {
        self.start_delay = Some(seconds);
        self
    }

    /// The options in SQL order, with their names: only those that are set.
    pub(crate) fn named(&self) -> impl Iterator<Item = (&'static str, u32)> {
        named([
            ("max_attempts", self.max_attempts),
            ("base_delay", self.base_delay),
            ("timeout", self.timeout),
            ("start_delay", self.start_delay),
        ])
    }
}

fn named<const N: usize>(
    options: [(&'static str, Option<u32>); N],
) -> impl Iterator<Item = (&'static str, u32)> {
    options
        .into_iter()
        .filter_map(|(name, value)| value.map(|v| (name, v)))
}

/// The rule an option's value breaks, if any.
pub(crate) fn option_problem(name: &str, value: u32) -> Option<&'static str> {
    if value > MAX_OPTION_VALUE {
        Some("must be at most 2147483647 (a PostgreSQL integer)")
    } else if name == "timeout" && value == 0 {
        Some("must be greater than 0")
    } else {
        None
    }
}

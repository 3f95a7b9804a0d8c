//! Runtime options of flows and steps: retries, backoff, timeouts and delays, and the values
//! each of them accepts.
//!
//! The bounds are stated here once for Rust, and checked from here both by
//! [`Flow::validate`](crate::Flow::validate) and, for literal values, by `#[step]` at compile
//! time (its expansion asks [`StepOptions::problem`] in a constant). `pgflow.create_flow` and
//! `pgflow.add_step` refuse the same values in SQL (migration 0003), for definitions that do
//! not come from Rust.

use serde::{Deserialize, Serialize};

/// Declares the upper bounds: each is written once, as one literal that makes both the
/// associated constant and the sentence an out-of-range value is refused with.
macro_rules! upper_bounds {
    ($($(#[$doc:meta])* $bound:ident, $option:literal = $max:literal $unit:literal;)*) => {
        impl StepOptions {
            $($(#[$doc])* pub const $bound: u32 = $max;)*
        }

        /// The sentence refusing `value` as option `option`, when it is above the bound.
        const fn above_bound(option: &str, value: u32) -> Option<&'static str> {
            $(
                if same(option, $option) && value > $max {
                    return Some(concat!("must be at most ", $max, " ", $unit));
                }
            )*
            None
        }
    };
}

upper_bounds! {
    /// The largest `max_attempts`. With any backoff, attempts past the 32nd wait for decades:
    /// the delay before attempt *n* + 1 is `base_delay` × 2^*n* seconds, so from a one second
    /// base the 32nd already waits 68 years, the most `pgflow.calculate_retry_delay` returns.
    /// Without a backoff, a task that fails a hundred times in a row is stuck, not unlucky.
    MAX_ATTEMPTS, "max_attempts" = 100 "attempts";
    /// The largest `base_delay`, in seconds: one day before the first retry, doubling from
    /// there.
    MAX_BASE_DELAY, "base_delay" = 86_400 "seconds (one day)";
    /// The largest `timeout`, in seconds: one day, as for a worker's own visibility timeout. A
    /// task that needs longer belongs in several steps; a lost worker's task waits at most
    /// this long for its retry. The engine hides a task's message for its timeout plus a few
    /// seconds, in 32-bit integer arithmetic, which this bound keeps far from overflowing.
    MAX_TIMEOUT, "timeout" = 86_400 "seconds (one day)";
    /// The largest `start_delay`, in seconds: 365 days. Steps may wait on the calendar (a
    /// reminder a month on), but a run held open for more than a year is likelier a unit
    /// mistake (milliseconds given for seconds) than a plan.
    MAX_START_DELAY, "start_delay" = 31_536_000 "seconds (365 days)";
}

/// The largest value any option accepts; each option has its own bound, the
/// `MAX_*` constants of [`StepOptions`].
pub const MAX_OPTION_VALUE: u32 = larger(
    larger(StepOptions::MAX_ATTEMPTS, StepOptions::MAX_BASE_DELAY),
    larger(StepOptions::MAX_TIMEOUT, StepOptions::MAX_START_DELAY),
);

const fn larger(a: u32, b: u32) -> u32 {
    if a > b { a } else { b }
}

/// String equality usable in `const fn` (`==` on `str` is not).
const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Options of a whole flow; each step inherits them unless it sets its own.
///
/// Options left as `None` are omitted from the SQL, so the engine's defaults apply (3 attempts,
/// 1 second base delay, 60 seconds timeout in pgflow 0.8.1). Values are whole seconds or counts;
/// being unsigned, they cannot be negative. They accept the same values as the step options of
/// the same names (see [`StepOptions::problem`]).
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
    /// How many times a task is attempted before the run fails (`max_attempts`, 0 to
    /// [`StepOptions::MAX_ATTEMPTS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Base of the exponential retry backoff, in seconds (`base_delay`, 0 to
    /// [`StepOptions::MAX_BASE_DELAY`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_delay: Option<u32>,
    /// Seconds a task may run before it is retried (`timeout`, 1 to
    /// [`StepOptions::MAX_TIMEOUT`]).
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
    /// How many times a task of this step is attempted (`max_attempts`, 0 to
    /// [`StepOptions::MAX_ATTEMPTS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Base of the exponential retry backoff, in seconds (`base_delay`, 0 to
    /// [`StepOptions::MAX_BASE_DELAY`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_delay: Option<u32>,
    /// Seconds a task may run before it is retried (`timeout`, 1 to
    /// [`StepOptions::MAX_TIMEOUT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u32>,
    /// Seconds to wait, once the step is ready, before its tasks are queued (`start_delay`, 0
    /// to [`StepOptions::MAX_START_DELAY`]).
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

    /// What is wrong with `value` as option `option` (its SQL name), at flow or step level
    /// alike: the rule it breaks, as [`Error::InvalidStepOption`](crate::Error::InvalidStepOption) states it.
    /// `None` when the value is accepted, or when `option` names no option.
    ///
    /// ```
    /// use pgflow_core::StepOptions;
    ///
    /// assert_eq!(StepOptions::problem("timeout", 30), None);
    /// assert_eq!(StepOptions::problem("timeout", 0), Some("must be greater than 0"));
    /// assert_eq!(
    ///     StepOptions::problem("timeout", StepOptions::MAX_TIMEOUT + 1),
    ///     Some("must be at most 86400 seconds (one day)")
    /// );
    /// ```
    pub const fn problem(option: &str, value: u32) -> Option<&'static str> {
        if same(option, "timeout") && value == 0 {
            return Some("must be greater than 0");
        }
        above_bound(option, value)
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

/// The rule an option's value breaks, if any (see [`StepOptions::problem`]).
pub(crate) fn option_problem(name: &str, value: u32) -> Option<&'static str> {
    StepOptions::problem(name, value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Error, Flow, StepContext, StepError, step_fn};

    const BOUNDS: [(&str, u32); 4] = [
        ("max_attempts", StepOptions::MAX_ATTEMPTS),
        ("base_delay", StepOptions::MAX_BASE_DELAY),
        ("timeout", StepOptions::MAX_TIMEOUT),
        ("start_delay", StepOptions::MAX_START_DELAY),
    ];

    #[test]
    fn each_option_accepts_up_to_its_bound() {
        for (option, max) in BOUNDS {
            assert_eq!(StepOptions::problem(option, max), None, "{option}");
            let problem = StepOptions::problem(option, max + 1).unwrap();
            assert!(
                problem.starts_with(&format!("must be at most {max} ")),
                "{option}: {problem}"
            );
            assert!(StepOptions::problem(option, u32::MAX).is_some(), "{option}");
        }
        assert_eq!(
            MAX_OPTION_VALUE,
            BOUNDS.map(|(_, max)| max).into_iter().max().unwrap()
        );
        assert_eq!(StepOptions::problem("retries", u32::MAX), None);
    }

    #[test]
    fn lower_bounds_are_unchanged() {
        assert_eq!(
            StepOptions::problem("timeout", 0),
            Some("must be greater than 0")
        );
        for option in ["max_attempts", "base_delay", "start_delay"] {
            assert_eq!(StepOptions::problem(option, 0), None, "{option}");
        }
    }

    #[test]
    fn bounds_keep_the_engine_arithmetic_in_postgresql_integers() {
        // The engine hides a started task's message for its timeout + 2 seconds, computed in
        // `integer`; every other option is an `integer` count or delay it uses as it is.
        let int4 = i64::from(i32::MAX);
        assert!(i64::from(StepOptions::MAX_TIMEOUT) + 2 < int4);
        assert!(i64::from(MAX_OPTION_VALUE) < int4);
    }

    #[test]
    fn the_builder_refuses_a_timeout_the_engine_would_overflow_on() {
        let error = Flow::<u8>::new("f")
            .timeout(2_147_483_646)
            .try_build()
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "option `timeout` of flow `f` is 2147483646, but it must be at most 86400 seconds (one day)"
        );

        let step = step_fn("s")
            .timeout(2_147_483_646)
            .handler(|n: u8, _: StepContext| async move { Ok::<_, StepError>(n) });
        let error = Flow::<u8>::new("f").step(step).try_build().unwrap_err();
        assert!(matches!(
            error,
            Error::InvalidStepOption {
                option: "timeout",
                value: 2_147_483_646,
                ..
            }
        ));

        let step = step_fn("s")
            .max_attempts(StepOptions::MAX_ATTEMPTS)
            .base_delay(StepOptions::MAX_BASE_DELAY)
            .timeout(StepOptions::MAX_TIMEOUT)
            .start_delay(StepOptions::MAX_START_DELAY)
            .handler(|n: u8, _: StepContext| async move { Ok::<_, StepError>(n) });
        assert!(Flow::<u8>::new("f").step(step).try_build().is_ok());
    }
}

//! Runtime options of flows and steps: retries, backoff, timeouts and delays, and the values
//! each of them accepts.
//!
//! The bounds are stated here once for Rust, and checked from here both by
//! [`Flow::validate`](crate::Flow::validate) and, for literal values, by `#[step]` at compile
//! time (its expansion asks [`StepOptions::problem`] in a constant). The lower bounds are those
//! of pgflow's TypeScript DSL (0.8.1); `pgflow.create_flow` and `pgflow.add_step` refuse only
//! the values above the upper bounds (migration 0003), and accept the lower ones pgflow 0.8.1's
//! SQL accepts, for definitions that do not come from Rust.
//!
//! The retry policy (`max_delay`, `jitter`) is explained once, in [`FlowOptions`]' docs.
//!
//! # Time
//!
//! The engine counts time in whole seconds. Every time-valued option (`base_delay`,
//! `max_delay`, `timeout`, `start_delay`) takes either a whole number of seconds (`u32`, as in
//! `.timeout(60)`) or a [`Duration`], through [`Seconds`]. A `Duration` is rounded **up** to
//! whole seconds, so that a timeout is never shorter than asked (1.5 s is 2 s), and saturates
//! at `u32::MAX` seconds, so that a duration too long for the engine is refused by the bounds
//! rather than wrapped.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A length of time as an option takes it: whole seconds. A [`Duration`] is rounded **up** to
/// whole seconds (a timeout is never shorter than asked: 1.5 s is 2 s) and saturates at
/// `u32::MAX` seconds, so that a duration too long for the engine is refused by the bounds
/// rather than wrapped.
///
/// ```
/// use std::time::Duration;
/// use pgflow_core::Seconds;
///
/// assert_eq!(30.into_seconds(), 30);
/// assert_eq!(Duration::from_millis(1500).into_seconds(), 2);
/// ```
pub trait Seconds {
    /// The whole seconds the engine is given.
    fn into_seconds(self) -> u32;
}

impl Seconds for u32 {
    fn into_seconds(self) -> u32 {
        self
    }
}

impl Seconds for Duration {
    fn into_seconds(self) -> u32 {
        let whole = self.as_secs();
        let seconds = if self.subsec_nanos() > 0 {
            whole.saturating_add(1)
        } else {
            whole
        };
        u32::try_from(seconds).unwrap_or(u32::MAX)
    }
}

/// Declares one side of the bounds: each is written once, as one literal that makes both the
/// associated constant and the sentence a value past it is refused with.
macro_rules! bounds {
    (
        $check:ident: refuses $past:tt, says $words:literal;
        $($(#[$doc:meta])* $bound:ident, $option:literal = $limit:literal $unit:literal;)*
    ) => {
        impl StepOptions {
            $($(#[$doc])* pub const $bound: u32 = $limit;)*
        }

        /// The sentence refusing `value` as option `option`, when it is past this bound.
        const fn $check(option: &str, value: u32) -> Option<&'static str> {
            $(
                if same(option, $option) && value $past $limit {
                    return Some(concat!("must be ", $words, " ", $limit, " ", $unit));
                }
            )*
            None
        }
    };
}

bounds! {
    below_bound: refuses <, says "at least";
    /// The smallest `max_attempts`, as in pgflow's TypeScript DSL: every task is attempted.
    MIN_ATTEMPTS, "max_attempts" = 1 "attempt";
    /// The smallest `base_delay`, in seconds, as in pgflow's TypeScript DSL: a retry waits.
    MIN_BASE_DELAY, "base_delay" = 1 "second";
    /// The smallest `timeout`, in seconds, as in pgflow's TypeScript DSL.
    MIN_TIMEOUT, "timeout" = 3 "seconds";
    /// The smallest `max_delay`, in seconds: a retry waits, as [`StepOptions::MIN_BASE_DELAY`]
    /// says.
    MIN_MAX_DELAY, "max_delay" = 1 "second";
}

bounds! {
    above_bound: refuses >, says "at most";
    /// The largest `max_attempts`. With any backoff, attempts past the 32nd wait for decades:
    /// the delay before attempt *n* + 1 is `base_delay` × 2^*n* seconds, so from a one second
    /// base the 32nd already waits 68 years, the most `pgflow.calculate_retry_delay` returns.
    /// Without a backoff, a task that fails a hundred times in a row is stuck, not unlucky.
    MAX_ATTEMPTS, "max_attempts" = 100 "attempts";
    /// The largest `base_delay`, in seconds: one day before the first retry, doubling from
    /// there.
    MAX_BASE_DELAY, "base_delay" = 86_400 "seconds (one day)";
    /// The largest `max_delay`, in seconds: one day, as for `base_delay`. A cap is there to
    /// keep retries coming; a task that may wait longer between attempts than a day needs no
    /// cap.
    MAX_MAX_DELAY, "max_delay" = 86_400 "seconds (one day)";
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
    larger(
        StepOptions::MAX_MAX_DELAY,
        larger(StepOptions::MAX_TIMEOUT, StepOptions::MAX_START_DELAY),
    ),
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
/// Options left as `None` are omitted from the SQL, so the engine's defaults apply
/// ([`FlowOptions::DEFAULT_MAX_ATTEMPTS`], [`FlowOptions::DEFAULT_BASE_DELAY`],
/// [`FlowOptions::DEFAULT_TIMEOUT`]: `pgflow.create_flow`'s; no `max_delay` cap, and
/// [`FlowOptions::DEFAULT_JITTER`]). Values are whole seconds or counts; the setters of times
/// also take a [`Duration`] (see [`Seconds`]). They accept the same values as the step options
/// of the same names (see [`StepOptions::problem`]).
///
/// ```
/// use pgflow_core::FlowOptions;
///
/// let options = FlowOptions::new().max_attempts(3).timeout(60);
/// assert_eq!(options.max_attempts, Some(3));
/// assert_eq!(options.base_delay, None);
/// ```
///
/// # Retry policy
///
/// A task that fails is retried after `base_delay` × 2^*n* seconds, *n* being the attempt that
/// failed (1, 2, ...): from a base of 5 seconds, 10, 20, 40, ... as in pgflow 0.8.1. Two options
/// that pgflow 0.8.1 does not have change this, each at flow or step level (a step inherits the
/// flow's):
///
/// - `max_delay` caps each delay at that many seconds: from a base of 1 with a cap of 5,
///   2, 4, 5, 5, ... A cap at or below the first delay (2 × `base_delay`) makes every retry
///   wait `max_delay`: a constant delay, which is accepted as a choice rather than refused.
///   Unset, the backoff is not capped.
/// - `jitter` spreads each delay *d* uniformly over [⌈*d*/2⌉, *d*] seconds ("equal jitter"),
///   so that tasks failing together (a downstream outage) do not all come back at once. A
///   flow's is off unless set ([`FlowOptions::DEFAULT_JITTER`]); a step's unset one is the
///   flow's.
///
/// The engine stores them with `pgflow.set_retry_policy` (migration 0007), which the SQL of a
/// flow calls after its `create_flow` and `add_step`, only when one of them is set: a flow
/// that sets neither compiles to exactly the SQL of pgflow's TypeScript DSL, and retries with
/// exactly pgflow 0.8.1's delays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FlowOptions {
    /// How many times a task is attempted before the run fails (`max_attempts`,
    /// [`StepOptions::MIN_ATTEMPTS`] to [`StepOptions::MAX_ATTEMPTS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Base of the exponential retry backoff, in seconds (`base_delay`,
    /// [`StepOptions::MIN_BASE_DELAY`] to [`StepOptions::MAX_BASE_DELAY`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_delay: Option<u32>,
    /// Seconds a task may run before it is retried (`timeout`, [`StepOptions::MIN_TIMEOUT`] to
    /// [`StepOptions::MAX_TIMEOUT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u32>,
    /// Cap on each retry's delay, in seconds (`max_delay`, [`StepOptions::MIN_MAX_DELAY`] to
    /// [`StepOptions::MAX_MAX_DELAY`]); `None`: no cap, as in pgflow 0.8.1. See
    /// [the retry policy](FlowOptions#retry-policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<u32>,
    /// Whether each retry's delay *d* is drawn from [⌈*d*/2⌉, *d*] (`jitter`); `None` is
    /// [`FlowOptions::DEFAULT_JITTER`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<bool>,
}

impl FlowOptions {
    /// What an unset `max_attempts` becomes: the default of `pgflow.create_flow`'s argument.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
    /// What an unset `base_delay` becomes, in seconds: the default of `pgflow.create_flow`'s
    /// argument (the table's column default, 1, is never used: create_flow always passes one).
    pub const DEFAULT_BASE_DELAY: u32 = 5;
    /// What an unset `timeout` becomes, in seconds: the default of `pgflow.create_flow`'s
    /// argument.
    pub const DEFAULT_TIMEOUT: u32 = 60;
    /// What an unset flow `jitter` is: off, every delay exactly the backoff's, as in pgflow
    /// 0.8.1 (the default of the column `pgflow.flows.opt_jitter`). An unset `max_delay` is no
    /// cap.
    pub const DEFAULT_JITTER: bool = false;

    /// No options set: the engine's defaults apply.
    pub const fn new() -> Self {
        Self {
            max_attempts: None,
            base_delay: None,
            timeout: None,
            max_delay: None,
            jitter: None,
        }
    }

    /// Sets `max_attempts`.
    #[must_use]
    pub const fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// Sets `base_delay`: whole seconds, or a [`Duration`] rounded up to them (see [`Seconds`]).
    #[must_use]
    pub fn base_delay(mut self, time: impl Seconds) -> Self {
        self.base_delay = Some(time.into_seconds());
        self
    }

    /// Sets `timeout`: whole seconds, or a [`Duration`] rounded up to them (see [`Seconds`]).
    #[must_use]
    pub fn timeout(mut self, time: impl Seconds) -> Self {
        self.timeout = Some(time.into_seconds());
        self
    }

    /// Sets `max_delay`, the cap on each retry's delay: whole seconds, or a [`Duration`]
    /// rounded up to them (see [`Seconds`]). Steps inherit it.
    ///
    /// The delay after failed attempt *n* is `base_delay` × 2^*n* seconds, at most
    /// `max_delay`; a cap at or below 2 × `base_delay` makes every delay `max_delay`:
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgflow_core::{Flow, FlowOptions};
    ///
    /// // Retries after 2, 4, 8, 10, 10, ... seconds.
    /// let options = FlowOptions::new().base_delay(1).max_delay(Duration::from_secs(10));
    /// assert_eq!(options.max_delay, Some(10));
    ///
    /// let flow: Flow<()> = Flow::new("capped").base_delay(1).max_delay(10).build();
    /// assert_eq!(
    ///     flow.statements()?,
    ///     [
    ///         "SELECT pgflow.create_flow('capped', base_delay => 1);",
    ///         "SELECT pgflow.set_retry_policy('capped', NULL, 10, false);",
    ///     ]
    /// );
    /// # Ok::<(), pgflow_core::Error>(())
    /// ```
    #[must_use]
    pub fn max_delay(mut self, time: impl Seconds) -> Self {
        self.max_delay = Some(time.into_seconds());
        self
    }

    /// Sets `jitter`: whether each retry's delay *d* is drawn uniformly from [⌈*d*/2⌉, *d*]
    /// seconds, so that tasks that failed together do not all retry at once. Steps inherit it.
    ///
    /// ```
    /// use pgflow_core::{Flow, FlowOptions};
    ///
    /// assert_eq!(FlowOptions::new().jitter(true).jitter, Some(true));
    ///
    /// let flow: Flow<()> = Flow::new("spread").jitter(true).build();
    /// assert_eq!(
    ///     flow.statements()?[1],
    ///     "SELECT pgflow.set_retry_policy('spread', NULL, NULL, true);"
    /// );
    /// # Ok::<(), pgflow_core::Error>(())
    /// ```
    #[must_use]
    pub const fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = Some(jitter);
        self
    }

    /// The options `pgflow.create_flow` takes, in SQL order, with their names: only those that
    /// are set.
    pub(crate) fn named(&self) -> impl Iterator<Item = (&'static str, u32)> {
        named([
            ("max_attempts", self.max_attempts),
            ("base_delay", self.base_delay),
            ("timeout", self.timeout),
        ])
    }

    /// Every bounded option that is set, with its name: those of [`Self::named`], then
    /// `max_delay`.
    pub(crate) fn bounded(&self) -> impl Iterator<Item = (&'static str, u32)> {
        self.named().chain(named([("max_delay", self.max_delay)]))
    }

    /// The `max_delay` and `jitter` arguments of `pgflow.set_retry_policy` for the flow, when
    /// either is set (`None`: the flow needs no such call); an unset `jitter` is
    /// [`Self::DEFAULT_JITTER`], the flow's column having no NULL.
    ///
    /// ```
    /// use pgflow_core::FlowOptions;
    ///
    /// assert_eq!(FlowOptions::new().timeout(30).retry_policy(), None);
    /// assert_eq!(FlowOptions::new().max_delay(60).retry_policy(), Some((Some(60), Some(false))));
    /// ```
    pub fn retry_policy(&self) -> Option<(Option<u32>, Option<bool>)> {
        (self.max_delay.is_some() || self.jitter.is_some()).then(|| {
            (
                self.max_delay,
                Some(self.jitter.unwrap_or(Self::DEFAULT_JITTER)),
            )
        })
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
    /// How many times a task of this step is attempted (`max_attempts`,
    /// [`StepOptions::MIN_ATTEMPTS`] to [`StepOptions::MAX_ATTEMPTS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Base of the exponential retry backoff, in seconds (`base_delay`,
    /// [`StepOptions::MIN_BASE_DELAY`] to [`StepOptions::MAX_BASE_DELAY`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_delay: Option<u32>,
    /// Seconds a task may run before it is retried (`timeout`, [`StepOptions::MIN_TIMEOUT`] to
    /// [`StepOptions::MAX_TIMEOUT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u32>,
    /// Seconds to wait, once the step is ready, before its tasks are queued (`start_delay`, 0
    /// to [`StepOptions::MAX_START_DELAY`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_delay: Option<u32>,
    /// Cap on each retry's delay, in seconds (`max_delay`, [`StepOptions::MIN_MAX_DELAY`] to
    /// [`StepOptions::MAX_MAX_DELAY`]); `None`: the flow's (a step cannot lift the flow's
    /// cap, only set its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<u32>,
    /// Whether each retry's delay *d* is drawn from [⌈*d*/2⌉, *d*] (`jitter`); `None`: the
    /// flow's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<bool>,
}

impl StepOptions {
    /// No options set: the flow's options apply.
    pub const fn new() -> Self {
        Self {
            max_attempts: None,
            base_delay: None,
            timeout: None,
            start_delay: None,
            max_delay: None,
            jitter: None,
        }
    }

    /// Sets `max_attempts`.
    #[must_use]
    pub const fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// Sets `base_delay`: whole seconds, or a [`Duration`] rounded up to them (see [`Seconds`]).
    #[must_use]
    pub fn base_delay(mut self, time: impl Seconds) -> Self {
        self.base_delay = Some(time.into_seconds());
        self
    }

    /// Sets `timeout`: whole seconds, or a [`Duration`] rounded up to them (see [`Seconds`]).
    #[must_use]
    pub fn timeout(mut self, time: impl Seconds) -> Self {
        self.timeout = Some(time.into_seconds());
        self
    }

    /// Sets `start_delay`: whole seconds, or a [`Duration`] rounded up to them (see [`Seconds`]).
    #[must_use]
    pub fn start_delay(mut self, time: impl Seconds) -> Self {
        self.start_delay = Some(time.into_seconds());
        self
    }

    /// Sets `max_delay`, the cap on each retry's delay of this step: whole seconds, or a
    /// [`Duration`] rounded up to them (see [`Seconds`], and [`FlowOptions::max_delay()`]
    /// for the delays it gives).
    ///
    /// ```
    /// use pgflow_core::StepOptions;
    ///
    /// let options = StepOptions::new().base_delay(2).max_delay(30);
    /// assert_eq!(options.max_delay, Some(30));
    /// ```
    #[must_use]
    pub fn max_delay(mut self, time: impl Seconds) -> Self {
        self.max_delay = Some(time.into_seconds());
        self
    }

    /// Sets `jitter` for this step: whether each retry's delay *d* is drawn uniformly from
    /// [⌈*d*/2⌉, *d*] seconds; `false` turns off a flow's jitter for this step.
    ///
    /// ```
    /// use pgflow_core::StepOptions;
    ///
    /// assert_eq!(StepOptions::new().jitter(false).jitter, Some(false));
    /// ```
    #[must_use]
    pub const fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = Some(jitter);
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
    /// assert_eq!(StepOptions::problem("timeout", 2), Some("must be at least 3 seconds"));
    /// assert_eq!(
    ///     StepOptions::problem("timeout", StepOptions::MAX_TIMEOUT + 1),
    ///     Some("must be at most 86400 seconds (one day)")
    /// );
    /// ```
    pub const fn problem(option: &str, value: u32) -> Option<&'static str> {
        match below_bound(option, value) {
            Some(rule) => Some(rule),
            None => above_bound(option, value),
        }
    }

    /// The options `pgflow.add_step` takes, in SQL order, with their names: only those that
    /// are set.
    pub(crate) fn named(&self) -> impl Iterator<Item = (&'static str, u32)> {
        named([
            ("max_attempts", self.max_attempts),
            ("base_delay", self.base_delay),
            ("timeout", self.timeout),
            ("start_delay", self.start_delay),
        ])
    }

    /// Every bounded option that is set, with its name: those of [`Self::named`], then
    /// `max_delay`.
    pub(crate) fn bounded(&self) -> impl Iterator<Item = (&'static str, u32)> {
        self.named().chain(named([("max_delay", self.max_delay)]))
    }

    /// The `max_delay` and `jitter` arguments of `pgflow.set_retry_policy` for the step, when
    /// either is set (`None`: the step needs no such call); `None` in either inherits the
    /// flow's.
    ///
    /// ```
    /// use pgflow_core::StepOptions;
    ///
    /// assert_eq!(StepOptions::new().retry_policy(), None);
    /// assert_eq!(StepOptions::new().jitter(true).retry_policy(), Some((None, Some(true))));
    /// ```
    pub fn retry_policy(&self) -> Option<(Option<u32>, Option<bool>)> {
        (self.max_delay.is_some() || self.jitter.is_some()).then_some((self.max_delay, self.jitter))
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

    const BOUNDS: [(&str, u32); 5] = [
        ("max_attempts", StepOptions::MAX_ATTEMPTS),
        ("base_delay", StepOptions::MAX_BASE_DELAY),
        ("timeout", StepOptions::MAX_TIMEOUT),
        ("start_delay", StepOptions::MAX_START_DELAY),
        ("max_delay", StepOptions::MAX_MAX_DELAY),
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
    fn each_option_accepts_down_to_its_typescript_bound() {
        let lower = [
            ("max_attempts", StepOptions::MIN_ATTEMPTS, "attempt"),
            ("base_delay", StepOptions::MIN_BASE_DELAY, "second"),
            ("timeout", StepOptions::MIN_TIMEOUT, "seconds"),
            ("max_delay", StepOptions::MIN_MAX_DELAY, "second"),
        ];
        assert_eq!(lower.map(|(_, min, _)| min), [1, 1, 3, 1]);
        for (option, min, unit) in lower {
            assert_eq!(StepOptions::problem(option, min), None, "{option}");
            assert_eq!(
                StepOptions::problem(option, min - 1),
                Some(format!("must be at least {min} {unit}").as_str()),
                "{option}"
            );
            assert!(StepOptions::problem(option, 0).is_some(), "{option}");
        }
        assert_eq!(StepOptions::problem("start_delay", 0), None);
    }

    /// The error of a flow whose one step has `timeout`, which must be refused.
    fn step_timeout_refused(timeout: u32) -> Error {
        let step = step_fn("s")
            .timeout(timeout)
            .handler(|n: u8, _: StepContext| async move { Ok::<_, StepError>(n) });
        let error = Flow::<u8>::new("f").step(step).try_build().unwrap_err();
        assert!(
            matches!(
                error,
                Error::InvalidStepOption {
                    option: "timeout",
                    value,
                    ..
                } if value == timeout
            ),
            "{error}"
        );
        error
    }

    #[test]
    fn the_builder_refuses_values_below_the_bounds() {
        let error = Flow::<u8>::new("f").base_delay(0).try_build().unwrap_err();
        assert_eq!(
            error.to_string(),
            "option `base_delay` of flow `f` is 0, but it must be at least 1 second"
        );
        let error = step_timeout_refused(2);
        assert!(
            error.to_string().ends_with("must be at least 3 seconds"),
            "{error}"
        );
    }

    #[test]
    fn durations_are_rounded_up_to_whole_seconds() {
        assert_eq!(Duration::from_millis(1500).into_seconds(), 2);
        assert_eq!(Duration::from_nanos(1).into_seconds(), 1);
        assert_eq!(Duration::from_secs(30).into_seconds(), 30);
        assert_eq!(Duration::ZERO.into_seconds(), 0);
        assert_eq!(Duration::MAX.into_seconds(), u32::MAX);
        let options = StepOptions::new()
            .base_delay(Duration::from_secs(5))
            .timeout(Duration::from_millis(2500))
            .start_delay(Duration::from_secs(60));
        assert_eq!(
            (options.base_delay, options.timeout, options.start_delay),
            (Some(5), Some(3), Some(60))
        );
    }

    #[test]
    fn retry_policy_setters_at_every_level() {
        let flow = FlowOptions::new()
            .max_delay(Duration::from_millis(2500))
            .jitter(true);
        assert_eq!((flow.max_delay, flow.jitter), (Some(3), Some(true)));
        assert_eq!(flow.retry_policy(), Some((Some(3), Some(true))));
        assert_eq!(FlowOptions::new().retry_policy(), None);
        assert_eq!(
            FlowOptions::new().max_delay(9).retry_policy(),
            Some((Some(9), Some(FlowOptions::DEFAULT_JITTER)))
        );
        let step = StepOptions::new().max_delay(7).jitter(false);
        assert_eq!((step.max_delay, step.jitter), (Some(7), Some(false)));
        assert_eq!(StepOptions::new().retry_policy(), None);
        assert_eq!(
            StepOptions::new().jitter(true).retry_policy(),
            Some((None, Some(true)))
        );
        // Bounded values are checked, jitter has none; create_flow and add_step never see
        // either.
        assert_eq!(step.bounded().collect::<Vec<_>>(), [("max_delay", 7)]);
        assert_eq!(step.named().count(), 0);

        let built = step_fn("s")
            .max_delay(40)
            .jitter(true)
            .handler(|n: u8, _: StepContext| async move { Ok::<_, StepError>(n) });
        let flow = Flow::<u8>::new("f")
            .max_delay(Duration::from_secs(60))
            .jitter(false)
            .step(built)
            .build();
        assert_eq!(
            (flow.options().max_delay, flow.options().jitter),
            (Some(60), Some(false))
        );
        let options = flow.find_step("s").unwrap().options();
        assert_eq!((options.max_delay, options.jitter), (Some(40), Some(true)));
    }

    #[test]
    fn an_integer_literal_is_whole_seconds() {
        let options = FlowOptions::new().base_delay(5).timeout(60);
        assert_eq!((options.base_delay, options.timeout), (Some(5), Some(60)));
        let flow = Flow::<u8>::new("f").base_delay(5).timeout(60).build();
        assert_eq!(flow.options().timeout, Some(60));
    }

    #[test]
    fn a_duration_too_long_for_the_engine_is_refused_not_wrapped() {
        // 2^32 + 5 seconds would wrap to 5 in a plain cast.
        let long = Duration::from_secs(u64::from(u32::MAX) + 6);
        let error = Flow::<u8>::new("f").timeout(long).try_build().unwrap_err();
        assert_eq!(
            error.to_string(),
            "option `timeout` of flow `f` is 4294967295, but it must be at most 86400 seconds (one day)"
        );
        let step = step_fn("s")
            .start_delay(Duration::MAX)
            .handler(|n: u8, _: StepContext| async move { Ok::<_, StepError>(n) });
        assert!(Flow::<u8>::new("f").step(step).try_build().is_err());
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

        step_timeout_refused(2_147_483_646);

        let step = step_fn("s")
            .max_attempts(StepOptions::MAX_ATTEMPTS)
            .base_delay(StepOptions::MAX_BASE_DELAY)
            .timeout(StepOptions::MAX_TIMEOUT)
            .start_delay(StepOptions::MAX_START_DELAY)
            .max_delay(StepOptions::MAX_MAX_DELAY)
            .handler(|n: u8, _: StepContext| async move { Ok::<_, StepError>(n) });
        assert!(Flow::<u8>::new("f").step(step).try_build().is_ok());
    }
}

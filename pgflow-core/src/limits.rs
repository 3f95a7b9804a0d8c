//! Concurrency and rate limits of a step (issue 22): how many of its tasks may run at once
//! across every worker, and how many may start per period, each optionally per value of a key
//! of the run input. The engine enforces them where tasks start (migration 0014,
//! `docs/limits.md`); a flow's SQL sets them with `pgflow.set_concurrency_limit` and
//! `pgflow.set_rate_limit`.

use serde::{Deserialize, Serialize};

/// The limits of one step; both unset (the default) for a step started as fast as workers
/// read it.
///
/// ```
/// use pgflow_core::{ConcurrencyLimit, RateLimit, StepLimits};
///
/// let limits = StepLimits {
///     concurrency: Some(ConcurrencyLimit { max: 3, key: Some("tenant".into()) }),
///     rate: Some(RateLimit { max_starts: 100, per_seconds: 60, key: None }),
/// };
/// assert_eq!(limits.problem(), None);
/// assert!(StepLimits::default().is_empty());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepLimits {
    /// At most this many of the step's tasks started at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<ConcurrencyLimit>,
    /// At most this many of the step's tasks started per period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<RateLimit>,
}

/// At most `max` tasks of a step started at once, across every worker; with `key`, at most
/// that many per value of that top-level key of the run input (a run input without it counts
/// as one more value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConcurrencyLimit {
    /// Tasks started at once, 1 to [`StepLimits::MAX`].
    pub max: u32,
    /// The run input's key whose values each get `max` slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// At most `max_starts` tasks of a step start per `per_seconds`, in windows of that length
/// aligned on the clock (a period of one second: each second); with `key`, per value of that
/// top-level key of the run input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    /// Starts per window, 1 to [`StepLimits::MAX`].
    pub max_starts: u32,
    /// The window's length in seconds, 1 to [`StepLimits::MAX_PERIOD`].
    pub per_seconds: u32,
    /// The run input's key whose values each get their own windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl StepLimits {
    /// The largest `max` and `max_starts` the engine accepts.
    pub const MAX: u32 = 1_000_000;
    /// The longest rate period, in seconds: one day.
    pub const MAX_PERIOD: u32 = 86_400;
    /// The longest key name, in bytes.
    pub const MAX_KEY_BYTES: usize = 255;

    /// No limits.
    pub const fn new() -> Self {
        Self {
            concurrency: None,
            rate: None,
        }
    }

    /// Whether neither limit is set.
    pub fn is_empty(&self) -> bool {
        self.concurrency.is_none() && self.rate.is_none()
    }

    /// What is wrong with these limits, as the end of a sentence about the step; `None` when
    /// the engine accepts them.
    ///
    /// ```
    /// use pgflow_core::{ConcurrencyLimit, StepLimits};
    ///
    /// let zero = StepLimits { concurrency: Some(ConcurrencyLimit { max: 0, key: None }), rate: None };
    /// assert_eq!(zero.problem().unwrap(), "has a concurrency limit of 0, but it must be 1 to 1000000");
    /// ```
    pub fn problem(&self) -> Option<String> {
        let key_problem = |key: &Option<String>| {
            key.as_deref()
                .filter(|k| k.is_empty() || k.len() > Self::MAX_KEY_BYTES)
                .map(|k| {
                    format!(
                        "has a limit key of {} bytes, but it must be 1 to {} bytes",
                        k.len(),
                        Self::MAX_KEY_BYTES
                    )
                })
        };
        if let Some(limit) = &self.concurrency {
            if !(1..=Self::MAX).contains(&limit.max) {
                return Some(format!(
                    "has a concurrency limit of {}, but it must be 1 to {}",
                    limit.max,
                    Self::MAX
                ));
            }
            if let Some(problem) = key_problem(&limit.key) {
                return Some(problem);
            }
        }
        if let Some(limit) = &self.rate {
            if !(1..=Self::MAX).contains(&limit.max_starts) {
                return Some(format!(
                    "has a rate limit of {} starts, but it must be 1 to {}",
                    limit.max_starts,
                    Self::MAX
                ));
            }
            if !(1..=Self::MAX_PERIOD).contains(&limit.per_seconds) {
                return Some(format!(
                    "has a rate period of {} seconds, but it must be 1 to {} seconds",
                    limit.per_seconds,
                    Self::MAX_PERIOD
                ));
            }
            if let Some(problem) = key_problem(&limit.key) {
                return Some(problem);
            }
        }
        None
    }

    /// The statements that set these limits on step `step` of flow `flow`: none for a step
    /// without limits. `quote` makes a SQL string literal.
    pub(crate) fn statements(
        &self,
        flow: &str,
        step: &str,
        quote: fn(&str) -> String,
    ) -> Vec<String> {
        let key = |key: &Option<String>| key.as_deref().map_or_else(|| "NULL".to_owned(), quote);
        let mut out = Vec::new();
        if let Some(limit) = &self.concurrency {
            out.push(format!(
                "SELECT pgflow.set_concurrency_limit({}, {}, {}, {});",
                quote(flow),
                quote(step),
                limit.max,
                key(&limit.key)
            ));
        }
        if let Some(limit) = &self.rate {
            out.push(format!(
                "SELECT pgflow.set_rate_limit({}, {}, {}, interval '{} seconds', {});",
                quote(flow),
                quote(step),
                limit.max_starts,
                limit.per_seconds,
                key(&limit.key)
            ));
        }
        out
    }
}

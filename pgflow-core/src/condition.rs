//! Conditions on steps and what happens when a step cannot run: the [`SkipMode`]s of
//! pgflow 0.14's `when_unmet` and `when_exhausted`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

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

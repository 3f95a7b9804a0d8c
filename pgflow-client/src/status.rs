//! The statuses the engine stores, as enums: what `pgflow.runs.status`,
//! `pgflow.step_states.status` and `pgflow.step_tasks.status` may hold.
//!
//! Each reads and writes as the engine's text (`sqlx::Type`), serializes as that text (serde),
//! parses from it (`FromStr`, for command lines and filters) and prints it (`Display`).

use std::fmt;
use std::str::FromStr;

use pgflow_core::StepKind;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef};
use sqlx::{Decode, Encode, Postgres, Type};

/// A text that names no status (or skip reason) of its kind.
///
/// It names the text and the valid ones, e.g. to answer a command line's `--status`:
///
/// ```
/// use pgflow_client::StepStatus;
///
/// let error = "running".parse::<StepStatus>().unwrap_err();
/// assert_eq!(
///     error.to_string(),
///     "`running` is not a step status; valid: created, started, completed, failed, skipped, \
///      cancelled"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseStatusError {
    kind: &'static str,
    value: String,
    valid: &'static [&'static str],
}

impl fmt::Display for ParseStatusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` is not a {}; valid: {}",
            self.value,
            self.kind,
            self.valid.join(", ")
        )
    }
}

impl std::error::Error for ParseStatusError {}

/// Defines a status enum whose variants map to the engine's texts, with everything a status
/// needs; one place, so the three cannot drift apart.
macro_rules! status {
    (
        $(#[$meta:meta])*
        $name:ident, $kind:literal {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(rename_all = "lowercase")]
        #[non_exhaustive]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every status of this kind, in the order a run goes through them.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];
            const TEXTS: &'static [&'static str] = &[$($text),+];

            /// The engine's text for the status.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ParseStatusError;

            fn from_str(text: &str) -> Result<Self, Self::Err> {
                match text {
                    $($text => Ok(Self::$variant),)+
                    _ => Err(ParseStatusError {
                        kind: concat!($kind, " status"),
                        value: text.to_owned(),
                        valid: Self::TEXTS,
                    }),
                }
            }
        }

        impl Type<Postgres> for $name {
            fn type_info() -> PgTypeInfo {
                <&str as Type<Postgres>>::type_info()
            }

            fn compatible(ty: &PgTypeInfo) -> bool {
                <&str as Type<Postgres>>::compatible(ty)
            }
        }

        impl<'r> Decode<'r, Postgres> for $name {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                Ok(<&str as Decode<Postgres>>::decode(value)?.parse()?)
            }
        }

        impl Encode<'_, Postgres> for $name {
            fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
                <&str as Encode<Postgres>>::encode_by_ref(&self.as_str(), buf)
            }
        }
    };
}

status! {
    /// A run's status (`pgflow.runs.status`).
    ///
    /// ```
    /// use pgflow_client::RunStatus;
    ///
    /// assert_eq!("failed".parse::<RunStatus>(), Ok(RunStatus::Failed));
    /// assert_eq!(RunStatus::Completed.to_string(), "completed");
    /// let error = "done".parse::<RunStatus>().unwrap_err();
    /// assert_eq!(
    ///     error.to_string(),
    ///     "`done` is not a run status; valid: started, completed, failed, cancelled"
    /// );
    /// ```
    RunStatus, "run" {
        /// Steps are still to run.
        Started => "started",
        /// Every step completed; the run has its output.
        Completed => "completed",
        /// A step failed for good; nothing more runs until the run is retried
        /// ([`Client::retry`](crate::Client::retry)).
        Failed => "failed",
        /// Cancelled while it was started ([`Client::cancel`](crate::Client::cancel)); nothing
        /// more runs until the run is retried.
        Cancelled => "cancelled",
    }
}

status! {
    /// A step's status within a run (`pgflow.step_states.status`).
    ///
    /// ```
    /// use pgflow_client::StepStatus;
    ///
    /// assert_eq!("created".parse::<StepStatus>(), Ok(StepStatus::Created));
    /// assert_eq!(StepStatus::Started.as_str(), "started");
    /// assert_eq!(StepStatus::ALL.last(), Some(&StepStatus::Cancelled));
    /// ```
    StepStatus, "step" {
        /// Waiting for its dependencies.
        Created => "created",
        /// Its tasks are queued or running.
        Started => "started",
        /// Every task completed.
        Completed => "completed",
        /// A task failed for good.
        Failed => "failed",
        /// It will not run: its condition was unmet, a dependency was skipped with
        /// `skip-cascade`, or its task failed for good with a `when_exhausted` that skips
        /// (migration 0010). [`StepStateRow::skip_reason`](crate::StepStateRow::skip_reason)
        /// says which. Its dependents go on without it.
        Skipped => "skipped",
        /// It was started when its run was cancelled (steps still `created` stay so).
        Cancelled => "cancelled",
    }
}

status! {
    /// A task's status (`pgflow.step_tasks.status`).
    ///
    /// ```
    /// use pgflow_client::TaskStatus;
    ///
    /// assert_eq!("queued".parse::<TaskStatus>(), Ok(TaskStatus::Queued));
    /// assert_eq!(TaskStatus::Completed.to_string(), "completed");
    /// assert_eq!(serde_json::to_value(TaskStatus::Started)?, serde_json::json!("started"));
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    TaskStatus, "task" {
        /// Waiting in its queue (first time, or for a retry).
        Queued => "queued",
        /// A worker runs it.
        Started => "started",
        /// Its output is stored.
        Completed => "completed",
        /// Its last attempt failed and no retry is left.
        Failed => "failed",
        /// It was queued or started when its run was cancelled; a late report of its handler
        /// changes nothing.
        Cancelled => "cancelled",
    }
}

/// Why a step was skipped (`pgflow.step_states.skip_reason`, migration 0010, upstream's texts).
///
/// ```
/// use pgflow_client::SkipReason;
///
/// assert_eq!("condition_unmet".parse::<SkipReason>(), Ok(SkipReason::ConditionUnmet));
/// assert_eq!(SkipReason::DependencySkipped.to_string(), "dependency_skipped");
/// assert_eq!(serde_json::to_value(SkipReason::HandlerFailed)?, serde_json::json!("handler_failed"));
/// assert!("bored".parse::<SkipReason>().is_err());
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SkipReason {
    /// Its condition (`if` / `if_not`) was unmet and its `when_unmet` is `skip` or
    /// `skip-cascade`.
    ConditionUnmet,
    /// A step upstream of it was skipped with `skip-cascade`.
    DependencySkipped,
    /// Its task failed for good and its `when_exhausted` is `skip` or `skip-cascade`.
    HandlerFailed,
}

impl SkipReason {
    /// Every reason the engine writes.
    pub const ALL: &'static [Self] = &[
        Self::ConditionUnmet,
        Self::DependencySkipped,
        Self::HandlerFailed,
    ];

    /// The engine's text for the reason.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ConditionUnmet => "condition_unmet",
            Self::DependencySkipped => "dependency_skipped",
            Self::HandlerFailed => "handler_failed",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SkipReason {
    type Err = ParseStatusError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|reason| reason.as_str() == text)
            .ok_or_else(|| ParseStatusError {
                kind: "skip reason",
                value: text.to_owned(),
                valid: &["condition_unmet", "dependency_skipped", "handler_failed"],
            })
    }
}

impl Type<Postgres> for SkipReason {
    fn type_info() -> PgTypeInfo {
        <&str as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <&str as Type<Postgres>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Postgres> for SkipReason {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(<&str as Decode<Postgres>>::decode(value)?.parse()?)
    }
}

/// `pgflow.steps.step_type` as read from the database: rows decode it into a [`StepKind`]
/// through this (`#[sqlx(try_from = "StepKindText")]`), since `StepKind` lives in pgflow-core,
/// which knows nothing of sqlx.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepKindText(StepKind);

impl From<StepKindText> for StepKind {
    fn from(text: StepKindText) -> Self {
        text.0
    }
}

impl Type<Postgres> for StepKindText {
    fn type_info() -> PgTypeInfo {
        <&str as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <&str as Type<Postgres>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Postgres> for StepKindText {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        let text = <&str as Decode<Postgres>>::decode(value)?;
        [StepKind::Single, StepKind::Map]
            .into_iter()
            .find(|kind| kind.as_str() == text)
            .map(Self)
            .ok_or_else(|| format!("`{text}` is not a step type; valid: single, map").into())
    }
}

impl RunStatus {
    /// Whether the run has ended (completed, failed or cancelled). A failed or cancelled run
    /// may still be started again by a retry ([`RunStatus::is_retryable`]).
    ///
    /// ```
    /// use pgflow_client::RunStatus;
    ///
    /// assert!(!RunStatus::Started.is_finished());
    /// assert!(RunStatus::Completed.is_finished() && RunStatus::Failed.is_finished());
    /// assert!(RunStatus::Cancelled.is_finished());
    /// ```
    pub const fn is_finished(self) -> bool {
        !matches!(self, Self::Started)
    }

    /// Whether [`Client::retry`](crate::Client::retry) takes a run in this status: a failed or
    /// a cancelled one.
    ///
    /// ```
    /// use pgflow_client::RunStatus;
    ///
    /// assert!(RunStatus::Failed.is_retryable() && RunStatus::Cancelled.is_retryable());
    /// assert!(!RunStatus::Started.is_retryable() && !RunStatus::Completed.is_retryable());
    /// ```
    pub const fn is_retryable(self) -> bool {
        matches!(self, Self::Failed | Self::Cancelled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_round_trips_through_its_text() {
        for status in RunStatus::ALL {
            assert_eq!(status.as_str().parse::<RunStatus>(), Ok(*status));
        }
        for status in StepStatus::ALL {
            assert_eq!(status.as_str().parse::<StepStatus>(), Ok(*status));
        }
        for status in TaskStatus::ALL {
            assert_eq!(status.as_str().parse::<TaskStatus>(), Ok(*status));
        }
    }

    #[test]
    fn every_skip_reason_round_trips_and_a_stranger_is_refused() {
        for reason in SkipReason::ALL {
            assert_eq!(reason.as_str().parse::<SkipReason>(), Ok(*reason));
            assert_eq!(
                serde_json::to_value(reason).unwrap(),
                serde_json::json!(reason.as_str())
            );
        }
        assert_eq!(
            "skipped".parse::<SkipReason>().unwrap_err().to_string(),
            "`skipped` is not a skip reason; valid: condition_unmet, dependency_skipped, \
             handler_failed"
        );
    }

    #[test]
    fn unknown_texts_are_refused_with_the_valid_ones() {
        let error = "Started".parse::<TaskStatus>().unwrap_err();
        assert_eq!(
            error.to_string(),
            "`Started` is not a task status; valid: queued, started, completed, failed, cancelled"
        );
    }

    #[test]
    fn serde_uses_the_engine_texts() {
        assert_eq!(
            serde_json::to_value(StepStatus::Created).unwrap(),
            serde_json::json!("created")
        );
        assert_eq!(
            serde_json::from_value::<RunStatus>(serde_json::json!("failed")).unwrap(),
            RunStatus::Failed
        );
    }
}

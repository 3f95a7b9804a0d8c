//! The one boundary where step types are erased: a handler takes the task input as JSON and
//! returns the step output as JSON, or a [`StepError`].

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde_json::Value;

use crate::StepContext;

/// A boxed, sendable future, as returned by [`ErasedHandler::call`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A step handler with its types erased: what a worker calls for each task.
///
/// The input follows the engine's contract: a single step receives
/// `{"run": <flow input>, "<dependency slug>": <its output>, ...}`; a map step receives one
/// element of the array it maps over. A typed step's handler decodes the parameters it declares
/// from that input, and a decoding failure is a [`StepError`] naming the field and type.
///
/// Any `Fn(Value, StepContext) -> impl Future<Output = Result<Value, StepError>>` is an
/// `ErasedHandler`, which is the untyped door for flows defined elsewhere:
///
/// ```
/// use pgflow_core::{ErasedHandler, StepContext, StepError};
/// use serde_json::{Value, json};
///
/// let echo = |input: Value, _ctx: StepContext| async move { Ok::<_, StepError>(input["run"].clone()) };
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let output = echo.call(json!({"run": 42}), StepContext::for_test()).await?;
/// assert_eq!(output, json!(42));
/// # Ok::<(), StepError>(()) }).unwrap();
/// ```
pub trait ErasedHandler: Send + Sync + 'static {
    /// Runs the step for one task.
    fn call(&self, input: Value, ctx: StepContext) -> BoxFuture<'static, Result<Value, StepError>>;
}

impl<F, Fut> ErasedHandler for F
where
    F: Fn(Value, StepContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, StepError>> + Send + 'static,
{
    fn call(&self, input: Value, ctx: StepContext) -> BoxFuture<'static, Result<Value, StepError>> {
        Box::pin(self(input, ctx))
    }
}

/// Why a step's attempt failed: a message, the underlying error if any, whether the engine
/// may retry, and when.
///
/// `?` converts any `std::error::Error + Send + Sync + 'static` into a `StepError` (which is why
/// `StepError` itself does not implement `std::error::Error`, as with `anyhow::Error`); use
/// [`StepError::new`] for a message and [`StepError::with_source`] to add context.
///
/// `Display` prints the message followed by each cause: `"could not charge: connection reset"`.
///
/// ```
/// use pgflow_core::StepError;
///
/// fn parse(text: &str) -> Result<u32, StepError> {
///     let n: u32 = text.parse()?; // ParseIntError -> StepError, retried per the options
///     if n == 0 {
///         return Err(StepError::new("amount is zero").no_retry()); // retrying cannot help
///     }
///     Ok(n)
/// }
///
/// assert_eq!(parse("x").unwrap_err().to_string(), "invalid digit found in string");
/// assert!(!parse("0").unwrap_err().is_retryable());
/// ```
pub struct StepError {
    /// Our own message; `None` when the error is exactly its source.
    context: Option<String>,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
    retryable: bool,
    /// The handler's choice of delay before the next attempt, instead of the step's backoff.
    retry_after: Option<Duration>,
}

impl StepError {
    /// A failure described by a message; retried per the step's options.
    ///
    /// ```
    /// use pgflow_core::StepError;
    ///
    /// let error = StepError::new("the payment provider is unavailable");
    /// assert_eq!(error.to_string(), "the payment provider is unavailable");
    /// assert!(error.is_retryable());
    /// assert!(error.source().is_none());
    /// ```
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            context: Some(message.into()),
            source: None,
            retryable: true,
            retry_after: None,
        }
    }

    /// A failure described by a message, caused by `source`: an error, or a message of its
    /// own (`&str` and `String` convert).
    ///
    /// ```
    /// use pgflow_core::StepError;
    ///
    /// let reset = std::io::Error::other("connection reset");
    /// let error = StepError::with_source("could not charge", reset);
    /// assert_eq!(error.to_string(), "could not charge: connection reset");
    /// assert_eq!(error.message(), "could not charge");
    ///
    /// let error = StepError::with_source("could not charge", "card expired");
    /// assert_eq!(error.to_string(), "could not charge: card expired");
    /// ```
    pub fn with_source(
        message: impl Into<String>,
        source: impl Into<Box<dyn StdError + Send + Sync + 'static>>,
    ) -> Self {
        Self {
            context: Some(message.into()),
            source: Some(source.into()),
            retryable: true,
            retry_after: None,
        }
    }

    /// Asks the worker to fail the task now instead of retrying it: for errors that another
    /// attempt cannot fix, such as invalid input.
    ///
    /// ```
    /// use pgflow_core::StepError;
    ///
    /// fn check_amount(amount: f64) -> Result<f64, StepError> {
    ///     if amount <= 0.0 {
    ///         return Err(StepError::new(format!("invalid amount {amount}")).no_retry());
    ///     }
    ///     Ok(amount)
    /// }
    ///
    /// assert!(!check_amount(-1.0).unwrap_err().is_retryable());
    /// ```
    #[must_use]
    pub fn no_retry(mut self) -> Self {
        self.retryable = false;
        self
    }

    /// Asks the engine to wait `delay` before the next attempt, instead of the step's
    /// exponential backoff: for errors that say when to come back, such as an HTTP 429 or 503
    /// with a `Retry-After` header.
    ///
    /// The delay counts in whole seconds, rounded up (the engine's unit), and is used as it is:
    /// the step's `base_delay` and any cap on its backoff do not apply to it. The attempt still
    /// counts against the step's `max_attempts`: on the last one the task fails all the same.
    /// A [permanent](Self::no_retry) error is not retried, so its delay is ignored.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgflow_core::StepError;
    ///
    /// // A rate limit that says when the next call may go through.
    /// fn rate_limited(retry_after_header: Option<&str>) -> StepError {
    ///     let error = StepError::new("the payment provider is rate limiting us");
    ///     match retry_after_header.and_then(|seconds| seconds.parse().ok()) {
    ///         Some(seconds) => error.retry_after(Duration::from_secs(seconds)),
    ///         None => error, // the step's backoff
    ///     }
    /// }
    ///
    /// assert_eq!(rate_limited(Some("30")).retry_delay(), Some(Duration::from_secs(30)));
    /// assert_eq!(rate_limited(None).retry_delay(), None);
    /// ```
    #[must_use]
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// The delay before the next attempt chosen with [`retry_after`](Self::retry_after), or
    /// `None` when the step's backoff applies. Always `None` for a [permanent](Self::no_retry)
    /// error, which has no next attempt, whichever of the two was asked for first.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgflow_core::StepError;
    ///
    /// let later = StepError::new("busy").retry_after(Duration::from_secs(7));
    /// assert_eq!(later.retry_delay(), Some(Duration::from_secs(7)));
    /// assert_eq!(later.no_retry().retry_delay(), None);
    /// assert_eq!(StepError::new("busy").retry_delay(), None);
    /// ```
    pub fn retry_delay(&self) -> Option<Duration> {
        self.retry_after.filter(|_| self.retryable)
    }

    /// Whether another attempt may succeed (the default) or the task should fail now.
    ///
    /// ```
    /// use pgflow_core::StepError;
    ///
    /// let timeout = std::io::Error::from(std::io::ErrorKind::TimedOut);
    /// assert!(StepError::from(timeout).is_retryable());
    /// assert!(!StepError::new("bad input").no_retry().is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The top-level message, without its causes: the one given to [`new`](Self::new) or
    /// [`with_source`](Self::with_source), or the source's own for an error converted by `?`.
    ///
    /// ```
    /// use pgflow_core::StepError;
    ///
    /// let disk = || std::io::Error::other("disk full");
    /// assert_eq!(StepError::with_source("saving", disk()).message(), "saving");
    /// assert_eq!(StepError::from(disk()).message(), "disk full");
    /// ```
    pub fn message(&self) -> String {
        match (&self.context, &self.source) {
            (Some(context), _) => context.clone(),
            (None, Some(source)) => source.to_string(),
            (None, None) => String::new(),
        }
    }

    /// The underlying error, if any; downcast it to handle a kind of failure.
    ///
    /// ```
    /// use pgflow_core::StepError;
    ///
    /// let error = StepError::with_source("saving", std::io::Error::other("disk full"));
    /// let io = error.source().and_then(|source| source.downcast_ref::<std::io::Error>());
    /// assert_eq!(io.map(|io| io.kind()), Some(std::io::ErrorKind::Other));
    /// ```
    pub fn source(&self) -> Option<&(dyn StdError + Send + Sync + 'static)> {
        self.source.as_deref()
    }

    /// The underlying error, if any, taken out.
    ///
    /// ```
    /// use pgflow_core::StepError;
    ///
    /// let error = StepError::with_source("saving", std::io::Error::other("disk full"));
    /// let io: Box<std::io::Error> = error.into_source().unwrap().downcast().unwrap();
    /// assert_eq!(io.to_string(), "disk full");
    /// ```
    pub fn into_source(self) -> Option<Box<dyn StdError + Send + Sync + 'static>> {
        self.source
    }
}

impl<E> From<E> for StepError
where
    E: StdError + Send + Sync + 'static,
{
    fn from(error: E) -> Self {
        Self {
            context: None,
            source: Some(Box::new(error)),
            retryable: true,
            retry_after: None,
        }
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = self
            .source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static));
        // The head is our message, or the source itself; then every cause not yet printed.
        let mut cause = match (&self.context, source) {
            (Some(context), _) => {
                f.write_str(context)?;
                source
            }
            (None, Some(source)) => {
                write!(f, "{source}")?;
                source.source()
            }
            (None, None) => None,
        };
        while let Some(error) = cause {
            write!(f, ": {error}")?;
            cause = error.source();
        }
        Ok(())
    }
}

impl fmt::Debug for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepError")
            .field("message", &self.message())
            .field("source", &self.source)
            .field("retryable", &self.retryable)
            .field("retry_after", &self.retry_after)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer")
        }
    }
    impl StdError for Outer {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    fn io() -> std::io::Error {
        std::io::Error::other("disk full")
    }

    #[test]
    fn display_prints_each_cause_once() {
        assert_eq!(StepError::new("plain").to_string(), "plain");
        assert_eq!(StepError::from(io()).to_string(), "disk full");
        assert_eq!(StepError::from(Outer(io())).to_string(), "outer: disk full");
        assert_eq!(
            StepError::with_source("saving", Outer(io())).to_string(),
            "saving: outer: disk full"
        );
        assert_eq!(
            StepError::with_source("saving", "why").to_string(),
            "saving: why"
        );
    }

    #[test]
    fn intent_and_parts() {
        let error = StepError::with_source("saving", io());
        assert!(error.is_retryable());
        assert_eq!(error.message(), "saving");
        assert_eq!(error.source().unwrap().to_string(), "disk full");
        let error = error.no_retry();
        assert!(!error.is_retryable());
        assert_eq!(StepError::from(io()).message(), "disk full");
    }

    #[test]
    fn a_permanent_error_has_no_retry_delay_in_either_order() {
        let delay = Duration::from_millis(1500);
        let error = StepError::from(io()).retry_after(delay);
        assert!(error.is_retryable());
        assert_eq!(error.retry_delay(), Some(delay));
        assert_eq!(error.no_retry().retry_delay(), None);
        let error = StepError::new("bad input").no_retry().retry_after(delay);
        assert!(!error.is_retryable());
        assert_eq!(error.retry_delay(), None);
        // The last choice wins.
        let error = StepError::new("busy")
            .retry_after(delay)
            .retry_after(Duration::ZERO);
        assert_eq!(error.retry_delay(), Some(Duration::ZERO));
    }
}

//! What a running task knows about itself: which run, step and attempt it is, a cancellation
//! token, and the state the application shares with its handlers.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The context of one task attempt, passed to handlers that declare a `&StepContext` (or
/// `StepContext`) parameter.
///
/// Cheap to clone. The worker builds one per task with [`StepContext::builder`]; tests use
/// [`StepContext::for_test`].
///
/// ```
/// use pgflow_core::StepContext;
///
/// let ctx = StepContext::builder(uuid::Uuid::nil(), "crawl", "fetch")
///     .task_index(3)
///     .attempt(2)
///     .build();
/// assert_eq!(ctx.step_slug(), "fetch");
/// assert_eq!(ctx.task_index(), 3);
/// assert!(!ctx.is_cancelled());
/// ```
#[derive(Clone)]
pub struct StepContext {
    run_id: Uuid,
    flow_slug: Arc<str>,
    step_slug: Arc<str>,
    task_index: u32,
    attempt: u32,
    cancellation: CancellationToken,
    /// The application's state ([`StepContext::state`]).
    state: Option<Arc<dyn Any + Send + Sync>>,
    /// What a client crate attaches for its own accessors (the worker's pool); kept apart from
    /// `state` so that the application's type never has to be known to the client.
    extension: Option<Arc<dyn Any + Send + Sync>>,
}

impl StepContext {
    /// Starts building the context of a task of `step_slug` in run `run_id` of `flow_slug`.
    /// Unless set, the task index is 0, the attempt 1, the token never fires and there is no
    /// state.
    ///
    /// ```
    /// use pgflow_core::{StepContext, Uuid};
    ///
    /// let run_id = Uuid::new_v4();
    /// let ctx = StepContext::builder(run_id, "crawl", "fetch").build();
    /// assert_eq!((ctx.run_id(), ctx.task_index(), ctx.attempt()), (run_id, 0, 1));
    /// ```
    pub fn builder(
        run_id: Uuid,
        flow_slug: impl Into<Arc<str>>,
        step_slug: impl Into<Arc<str>>,
    ) -> StepContextBuilder {
        StepContextBuilder {
            ctx: Self {
                run_id,
                flow_slug: flow_slug.into(),
                step_slug: step_slug.into(),
                task_index: 0,
                attempt: 1,
                cancellation: CancellationToken::new(),
                state: None,
                extension: None,
            },
        }
    }

    /// A context for calling handlers in tests: a random run id, flow `test`, step `test`,
    /// task 0, attempt 1. Adjust it with [`StepContext::builder`] when a test needs more.
    ///
    /// ```
    /// use pgflow_core::{Flow, StepContext, StepError, step_fn};
    /// use serde_json::json;
    ///
    /// let double = step_fn("double").handler(|n: u64, _ctx| async move { Ok(n * 2) });
    /// let flow: Flow<u64> = Flow::new("doubling").step(double).build();
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let output = flow
    ///     .find_step("double")
    ///     .unwrap()
    ///     .call(json!({"run": 21}), StepContext::for_test())
    ///     .await?;
    /// assert_eq!(output, json!(42));
    /// # Ok::<(), StepError>(()) }).unwrap();
    /// ```
    pub fn for_test() -> Self {
        Self::builder(Uuid::new_v4(), "test", "test").build()
    }

    /// The run this task belongs to: the same for every task of the run, and the one a
    /// client's `start` reports, so a handler can tag what it writes with it.
    ///
    /// ```
    /// use pgflow_core::{StepContext, Uuid};
    ///
    /// let run_id = Uuid::new_v4();
    /// let ctx = StepContext::builder(run_id, "orders", "charge").build();
    /// assert_eq!(ctx.run_id(), run_id);
    /// ```
    pub fn run_id(&self) -> Uuid {
        self.run_id
    }

    /// The flow's slug.
    ///
    /// ```
    /// use pgflow_core::{StepContext, Uuid};
    ///
    /// let ctx = StepContext::builder(Uuid::nil(), "orders", "charge").build();
    /// assert_eq!(ctx.flow_slug(), "orders");
    /// ```
    pub fn flow_slug(&self) -> &str {
        &self.flow_slug
    }

    /// The step's slug, for logs and for handlers shared by several steps.
    ///
    /// ```
    /// use pgflow_core::{StepContext, Uuid};
    ///
    /// let ctx = StepContext::builder(Uuid::nil(), "orders", "charge").build();
    /// assert_eq!(ctx.step_slug(), "charge");
    /// ```
    pub fn step_slug(&self) -> &str {
        &self.step_slug
    }

    /// The task's index: 0 for a single step, the element's position for a map step.
    ///
    /// ```
    /// use pgflow_core::{StepContext, Uuid};
    ///
    /// // The task of a map step that received the fourth element.
    /// let ctx = StepContext::builder(Uuid::nil(), "crawl", "fetch").task_index(3).build();
    /// assert_eq!(ctx.task_index(), 3);
    /// assert_eq!(StepContext::for_test().task_index(), 0);
    /// ```
    pub fn task_index(&self) -> u32 {
        self.task_index
    }

    /// Which attempt this is, starting at 1: a handler may, say, log louder on a retry.
    ///
    /// ```
    /// use pgflow_core::{StepContext, Uuid};
    ///
    /// let retry = StepContext::builder(Uuid::nil(), "orders", "charge").attempt(2).build();
    /// assert_eq!(retry.attempt(), 2);
    /// assert_eq!(StepContext::for_test().attempt(), 1);
    /// ```
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Fires when the task should stop: its run was cancelled (the task is then not retried,
    /// and nothing the handler returns is recorded), it ran past its step's timeout, or the
    /// worker stopped waiting for it at shutdown (the attempt then fails and is retried). Long
    /// handlers should stop early when it does, and hand the token to the work they spawn.
    ///
    /// When a run is cancelled or a shutdown stops waiting, the worker polls the handler once
    /// more after the token fires, so that one waiting on it can return; at the step timeout it
    /// fires the token as it drops the handler. Either way the handler is dropped at the await
    /// it is suspended in: cleanup that must finish belongs in work spawned beforehand or in a
    /// `Drop` guard.
    ///
    /// ```
    /// use pgflow_core::{CancellationToken, StepContext, StepError, Uuid};
    ///
    /// async fn wait_for_payment(ctx: &StepContext) -> Result<bool, StepError> {
    ///     tokio::select! {
    ///         biased;
    ///         () = ctx.cancellation_token().cancelled() => Err(StepError::new("stopped")),
    ///         paid = poll_payment() => Ok(paid),
    ///     }
    /// }
    /// # async fn poll_payment() -> bool { true }
    ///
    /// let token = CancellationToken::new();
    /// let ctx = StepContext::builder(Uuid::nil(), "orders", "pay")
    ///     .cancellation_token(token.clone())
    ///     .build();
    /// token.cancel();
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// assert!(wait_for_payment(&ctx).await.is_err());
    /// # });
    /// ```
    pub fn cancellation_token(&self) -> &CancellationToken {
        &self.cancellation
    }

    /// Whether the [cancellation token](Self::cancellation_token) has fired: a check for
    /// handlers that work in chunks, between them.
    ///
    /// ```
    /// use pgflow_core::{StepContext, StepError};
    ///
    /// async fn resize_all(images: Vec<String>, ctx: &StepContext) -> Result<usize, StepError> {
    ///     for (done, _image) in images.iter().enumerate() {
    ///         if ctx.is_cancelled() {
    ///             return Err(StepError::new(format!("stopped after {done} images")));
    ///         }
    ///         // ... resize `_image` ...
    ///     }
    ///     Ok(images.len())
    /// }
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// assert_eq!(resize_all(vec!["a.png".into()], &StepContext::for_test()).await?, 1);
    /// # Ok::<(), StepError>(()) }).unwrap();
    /// ```
    pub fn is_cancelled(&self) -> bool {
        self.cancellation.is_cancelled()
    }

    /// The application's shared state, if it is a `T`: what was given to the worker's
    /// `WorkerBuilder::state` (or to [`StepContextBuilder::state`]).
    ///
    /// The slot holds one value; to share several, store a struct holding them.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use pgflow_core::StepContext;
    ///
    /// struct Config { greeting: &'static str }
    ///
    /// let ctx = StepContext::builder(uuid::Uuid::nil(), "f", "s")
    ///     .state(Arc::new(Config { greeting: "hi" }))
    ///     .build();
    /// assert_eq!(ctx.state::<Config>().map(|c| c.greeting), Some("hi"));
    /// assert!(ctx.state::<String>().is_none());
    /// ```
    pub fn state<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.state.as_deref()?.downcast_ref::<T>()
    }

    /// What a client crate attached with [`StepContextBuilder::extension`], if it is a `T`.
    #[doc(hidden)]
    pub fn extension<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.extension.as_deref()?.downcast_ref::<T>()
    }
}

impl fmt::Debug for StepContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepContext")
            .field("run_id", &self.run_id)
            .field("flow_slug", &self.flow_slug)
            .field("step_slug", &self.step_slug)
            .field("task_index", &self.task_index)
            .field("attempt", &self.attempt)
            .field("cancelled", &self.is_cancelled())
            .field("state", &self.state.is_some())
            .finish()
    }
}

/// Builds a [`StepContext`]; see [`StepContext::builder`].
#[derive(Debug)]
pub struct StepContextBuilder {
    ctx: StepContext,
}

impl StepContextBuilder {
    /// The task's index within its step (the element's position for a map step).
    #[must_use]
    pub fn task_index(mut self, index: u32) -> Self {
        self.ctx.task_index = index;
        self
    }

    /// The attempt number, starting at 1.
    #[must_use]
    pub fn attempt(mut self, attempt: u32) -> Self {
        self.ctx.attempt = attempt;
        self
    }

    /// The token that fires when the task should stop (usually a child of the worker's).
    #[must_use]
    pub fn cancellation_token(mut self, token: CancellationToken) -> Self {
        self.ctx.cancellation = token;
        self
    }

    /// The application's state, which handlers reach with [`StepContext::state`].
    #[must_use]
    pub fn state(mut self, state: Arc<dyn Any + Send + Sync>) -> Self {
        self.ctx.state = Some(state);
        self
    }

    /// A client crate's own value, for its typed accessors (the worker's pool); not the
    /// application's state.
    #[doc(hidden)]
    #[must_use]
    pub fn extension(mut self, extension: Arc<dyn Any + Send + Sync>) -> Self {
        self.ctx.extension = Some(extension);
        self
    }

    /// The context.
    pub fn build(self) -> StepContext {
        self.ctx
    }
}

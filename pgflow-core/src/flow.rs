//! The flow: a typed builder that checks dependencies at compile time, and the built
//! [`Flow`] that carries the definition and the handlers a worker calls.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use serde_json::Value;

use crate::{
    AddedOnce, BoxFuture, DependenciesIn, ErasedHandler, FlowOptions, FlowShape, IntoStep, Result,
    Step, StepContext, StepError, StepKind, StepOf, StepOptions, StepShape,
};

/// A flow whose input is `I`: its definition (a [`FlowShape`]) and one type-erased handler per
/// step.
///
/// Built with [`Flow::new`]; cheap to clone and shareable across threads (an `Arc` inside).
///
/// # Validation
///
/// [`FlowBuilder::build`] does not fail: what the type system can check (dependencies, their
/// types, map steps, output types) is checked at compile time, and what it cannot (slugs given
/// at run time, duplicate slugs, option ranges) is checked by [`Flow::validate`], which
/// [`Flow::statements`], [`Flow::to_sql`] and the client run before any SQL is sent. Call
/// [`FlowBuilder::try_build`] to get these errors at build time instead.
///
/// ```
/// use pgflow_core::{Flow, StepContext, StepError, step_fn};
///
/// let double = step_fn("double").handler(|n: u64, _ctx: StepContext| async move {
///     Ok::<_, StepError>(n * 2)
/// });
/// let flow: Flow<u64> = Flow::new("doubler").timeout(10).step(double).build();
///
/// assert_eq!(flow.slug(), "doubler");
/// for step in flow.steps() {
///     println!("{} ({}) after {:?}", step.slug(), step.kind(), step.dependencies());
/// }
/// assert_eq!(
///     flow.to_sql()?,
///     "SELECT pgflow.create_flow('doubler', timeout => 10);\n\
///      SELECT pgflow.add_step('doubler', 'double');\n"
/// );
/// # Ok::<(), pgflow_core::Error>(())
/// ```
pub struct Flow<I> {
    inner: Arc<FlowInner>,
    _input: PhantomData<fn() -> I>,
}

struct FlowInner {
    shape: FlowShape,
    handlers: Vec<Arc<dyn ErasedHandler>>,
}

impl<I> Flow<I> {
    /// Starts a flow definition with this slug: add steps with [`FlowBuilder::step`], then
    /// [`build`](FlowBuilder::build) it.
    ///
    /// The flow's input type `I` is usually given by the annotation of the result; it must be
    /// the input type of every step that takes the flow input.
    ///
    /// ```
    /// use pgflow_core::{Flow, step_fn};
    ///
    /// let greet = step_fn("greet").handler(|name: String, _ctx| async move {
    ///     Ok(format!("hello, {name}"))
    /// });
    /// let flow: Flow<String> = Flow::new("greeting").step(greet).build();
    /// assert_eq!(flow.slug(), "greeting");
    /// ```
    #[allow(
        clippy::new_ret_no_self,
        reason = "`Flow::new(..)..build()` reads as the flow it defines"
    )]
    pub fn new(slug: impl Into<String>) -> FlowBuilder<I, ()> {
        FlowBuilder {
            shape: FlowShape {
                slug: slug.into(),
                options: FlowOptions::new(),
                steps: Vec::new(),
            },
            handlers: Vec::new(),
            _types: PhantomData,
        }
    }

    /// The flow slug.
    ///
    /// ```
    /// use pgflow_core::Flow;
    ///
    /// let flow: Flow<()> = Flow::new("nightly_report").build();
    /// assert_eq!(flow.slug(), "nightly_report");
    /// ```
    pub fn slug(&self) -> &str {
        &self.inner.shape.slug
    }

    /// The flow-level options.
    pub fn options(&self) -> &FlowOptions {
        &self.inner.shape.options
    }

    /// The steps, in the order they were added (the order of `add_step` calls).
    ///
    /// ```
    /// use pgflow_core::{Flow, StepKind, step_fn};
    ///
    /// let urls = step_fn("urls").handler(|site: String, _ctx| async move { Ok(vec![site]) });
    /// let fetch = step_fn("fetch")
    ///     .map_over(&urls)
    ///     .handler(|url: String, _ctx| async move { Ok(url.len()) });
    /// let flow: Flow<String> = Flow::new("crawl").step(urls).step(fetch).build();
    ///
    /// let steps: Vec<_> = flow.steps().map(|step| (step.slug(), step.kind())).collect();
    /// assert_eq!(steps, [("urls", StepKind::Single), ("fetch", StepKind::Map)]);
    /// ```
    pub fn steps(&self) -> impl ExactSizeIterator<Item = FlowStep<'_>> + '_ {
        self.inner
            .shape
            .steps
            .iter()
            .zip(&self.inner.handlers)
            .map(|(shape, handler)| FlowStep { shape, handler })
    }

    /// The step with this slug, if any: what a worker looks up for each task.
    ///
    /// ```
    /// use pgflow_core::{Flow, StepContext, StepError, step_fn};
    /// use serde_json::json;
    ///
    /// let double = step_fn("double").handler(|n: u64, _ctx| async move { Ok(n * 2) });
    /// let flow: Flow<u64> = Flow::new("doubling").step(double).build();
    /// assert!(flow.find_step("triple").is_none());
    ///
    /// let double = flow.find_step("double").unwrap();
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// // The task input as the engine sends it: the flow input under `run`.
    /// let output = double.call(json!({"run": 21}), StepContext::for_test()).await?;
    /// assert_eq!(output, json!(42));
    /// # Ok::<(), StepError>(()) }).unwrap();
    /// ```
    pub fn find_step(&self, slug: &str) -> Option<FlowStep<'_>> {
        self.steps().find(|step| step.slug() == slug)
    }

    /// The flow's shape: slugs, kinds, dependencies and options, without the handlers. It is
    /// serializable, to store or compare a definition.
    ///
    /// ```
    /// use pgflow_core::{Flow, step_fn};
    /// use serde_json::json;
    ///
    /// let first = step_fn("first").handler(|n: u8, _ctx| async move { Ok(n) });
    /// let second = step_fn("second")
    ///     .depends_on(&first)
    ///     .handler(|_n: u8, first: u8, _ctx| async move { Ok(first + 1) });
    /// let flow: Flow<u8> = Flow::new("chain").step(first).step(second).build();
    ///
    /// assert_eq!(flow.shape().steps[1].dependencies, ["first"]);
    /// assert_eq!(
    ///     serde_json::to_value(flow.shape())?["steps"][1],
    ///     json!({"slug": "second", "kind": "single", "dependencies": ["first"], "options": {}})
    /// );
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    pub fn shape(&self) -> &FlowShape {
        &self.inner.shape
    }

    /// Checks slugs, duplicate steps and option ranges; see [`FlowShape::validate`].
    ///
    /// What the compiler cannot see is checked here: a slug made at run time, two closure
    /// steps given the same slug, an option value that is not a literal.
    ///
    /// ```
    /// use pgflow_core::{Error, Flow, step_fn};
    ///
    /// let name = String::from("my-flow");
    /// let echo = step_fn("echo").handler(|n: u8, _ctx| async move { Ok(n) });
    /// let flow: Flow<u8> = Flow::new(name).step(echo).build();
    ///
    /// let error = flow.validate().unwrap_err();
    /// assert!(matches!(error, Error::InvalidFlowSlug { .. }));
    /// assert_eq!(
    ///     error.to_string(),
    ///     "invalid flow slug \"my-flow\": a slug contains only ASCII letters, digits and `_`, not '-'"
    /// );
    /// ```
    pub fn validate(&self) -> Result<()> {
        self.inner.shape.validate()
    }

    /// The SQL statements defining this flow, exactly as pgflow 0.8.1's TypeScript DSL writes
    /// them; validates first. See [`FlowShape::statements`].
    ///
    /// ```
    /// use pgflow_core::{Flow, step_fn};
    ///
    /// let validate = step_fn("validate").handler(|amount: f64, _ctx| async move { Ok(amount > 0.0) });
    /// let charge = step_fn("charge")
    ///     .depends_on(&validate)
    ///     .handler(|amount: f64, ok: bool, _ctx| async move { Ok(if ok { amount } else { 0.0 }) });
    /// let flow: Flow<f64> = Flow::new("payment").timeout(30).step(validate).step(charge).build();
    ///
    /// assert_eq!(
    ///     flow.statements()?,
    ///     [
    ///         "SELECT pgflow.create_flow('payment', timeout => 30);",
    ///         "SELECT pgflow.add_step('payment', 'validate');",
    ///         "SELECT pgflow.add_step('payment', 'charge', ARRAY['validate']);",
    ///     ]
    /// );
    /// # Ok::<(), pgflow_core::Error>(())
    /// ```
    pub fn statements(&self) -> Result<Vec<String>> {
        self.inner.shape.statements()
    }

    /// The [`statements`](Self::statements) as one text, one per line; validates first. It is
    /// what a migration file holds, for a database managed by migrations.
    ///
    /// ```
    /// use pgflow_core::{Flow, step_fn};
    ///
    /// let ping = step_fn("ping").handler(|_: (), _ctx| async move { Ok(String::from("pong")) });
    /// let flow: Flow<()> = Flow::new("health").step(ping).build();
    ///
    /// assert_eq!(
    ///     flow.to_sql()?,
    ///     "SELECT pgflow.create_flow('health');\n\
    ///      SELECT pgflow.add_step('health', 'ping');\n"
    /// );
    /// # Ok::<(), pgflow_core::Error>(())
    /// ```
    pub fn to_sql(&self) -> Result<String> {
        self.inner.shape.to_sql()
    }
}

impl<I> Clone for Flow<I> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            _input: PhantomData,
        }
    }
}

impl<I> fmt::Debug for Flow<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flow")
            .field("shape", &self.inner.shape)
            .finish_non_exhaustive()
    }
}

/// One step of a built [`Flow`]: its shape and its handler.
#[derive(Clone, Copy)]
pub struct FlowStep<'a> {
    shape: &'a StepShape,
    handler: &'a Arc<dyn ErasedHandler>,
}

impl<'a> FlowStep<'a> {
    /// The step slug.
    pub fn slug(&self) -> &'a str {
        &self.shape.slug
    }

    /// Single or map.
    pub fn kind(&self) -> StepKind {
        self.shape.kind
    }

    /// The slugs of the steps it depends on, in declaration order.
    pub fn dependencies(&self) -> &'a [String] {
        &self.shape.dependencies
    }

    /// The options set on this step (unset ones are inherited from the flow).
    pub fn options(&self) -> &'a StepOptions {
        &self.shape.options
    }

    /// The step's shape.
    pub fn shape(&self) -> &'a StepShape {
        self.shape
    }

    /// The type-erased handler.
    pub fn handler(&self) -> &'a Arc<dyn ErasedHandler> {
        self.handler
    }

    /// Calls the handler with one task's input; see [`ErasedHandler::call`].
    pub fn call(
        &self,
        input: Value,
        ctx: StepContext,
    ) -> BoxFuture<'static, std::result::Result<Value, StepError>> {
        self.handler.call(input, ctx)
    }
}

impl fmt::Debug for FlowStep<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowStep")
            .field("shape", self.shape)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Flow`] whose input is `I`; `Steps` lists the types of the steps added so far.
///
/// Created by [`Flow::new`]. Each [`step`](Self::step) call checks at compile time that the
/// step's dependencies were added before it, and that the step takes this flow's input.
pub struct FlowBuilder<I, Steps> {
    shape: FlowShape,
    handlers: Vec<Arc<dyn ErasedHandler>>,
    _types: PhantomData<fn() -> (I, Steps)>,
}

impl<I, Steps> FlowBuilder<I, Steps> {
    /// Sets the flow's `max_attempts` (steps inherit it).
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.shape.options.max_attempts = Some(attempts);
        self
    }

    /// Sets the flow's `base_delay` (steps inherit it): whole seconds, or a
    /// [`Duration`](std::time::Duration) rounded up to them (see [`Seconds`](crate::Seconds)).
    #[must_use]
    pub fn base_delay(mut self, time: impl crate::Seconds) -> Self {
        self.shape.options.base_delay = Some(time.into_seconds());
        self
    }

    /// Sets the flow's `timeout` (steps inherit it): whole seconds, or a
    /// [`Duration`](std::time::Duration) rounded up to them (see [`Seconds`](crate::Seconds)).
    #[must_use]
    pub fn timeout(mut self, time: impl crate::Seconds) -> Self {
        self.shape.options.timeout = Some(time.into_seconds());
        self
    }

    /// Sets the flow's `max_delay` (steps inherit it), the cap on each retry's delay: whole
    /// seconds, or a [`Duration`](std::time::Duration) rounded up to them (see
    /// [`Seconds`](crate::Seconds)). See [the retry policy](FlowOptions#retry-policy).
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgflow_core::Flow;
    ///
    /// // Retries after 10, 20, 40, 60, 60, ... seconds.
    /// let flow: Flow<()> = Flow::new("sync")
    ///     .base_delay(5)
    ///     .max_delay(Duration::from_secs(60))
    ///     .max_attempts(8)
    ///     .build();
    /// assert_eq!(flow.options().max_delay, Some(60));
    /// assert_eq!(
    ///     flow.statements()?,
    ///     [
    ///         "SELECT pgflow.create_flow('sync', max_attempts => 8, base_delay => 5);",
    ///         "SELECT pgflow.set_retry_policy('sync', NULL, 60, false);",
    ///     ]
    /// );
    /// # Ok::<(), pgflow_core::Error>(())
    /// ```
    #[must_use]
    pub fn max_delay(mut self, time: impl crate::Seconds) -> Self {
        self.shape.options.max_delay = Some(time.into_seconds());
        self
    }

    /// Sets the flow's `jitter` (steps inherit it): whether each retry's delay *d* is drawn
    /// uniformly from [⌈*d*/2⌉, *d*] seconds. See [the retry policy](FlowOptions#retry-policy).
    ///
    /// ```
    /// use pgflow_core::Flow;
    ///
    /// let flow: Flow<()> = Flow::new("spread").max_delay(300).jitter(true).build();
    /// assert_eq!(
    ///     flow.statements()?[1],
    ///     "SELECT pgflow.set_retry_policy('spread', NULL, 300, true);"
    /// );
    /// # Ok::<(), pgflow_core::Error>(())
    /// ```
    #[must_use]
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.shape.options.jitter = Some(jitter);
        self
    }

    /// Adds a step: a `#[step]` function, or a [`FnStep`](crate::FnStep). It compiles only if
    /// every dependency of `step` was added before, if `step` was not added before, and if
    /// `step` takes this flow's input type (or no flow input).
    ///
    /// A step is added by value; a closure step that another step depends on is named by
    /// reference in [`depends_on`](crate::StepFnBuilder::depends_on) first, then moved here.
    ///
    /// ```
    /// use pgflow_core::{Flow, step_fn};
    ///
    /// let first = step_fn("first").handler(|n: u64, _ctx| async move { Ok(n) });
    /// let second = step_fn("second")
    ///     .depends_on(&first)
    ///     .handler(|_n: u64, first: u64, _ctx| async move { Ok(first + 1) });
    ///
    /// let flow: Flow<u64> = Flow::new("f").step(first).step(second).build();
    /// assert_eq!(flow.steps().len(), 2);
    /// ```
    ///
    /// Adding them the other way round does not compile:
    ///
    /// ```compile_fail,E0277
    /// use pgflow_core::{Flow, StepContext, StepError, step_fn};
    ///
    /// let first = step_fn("first").handler(|n: u64, _: StepContext| async move { Ok::<_, StepError>(n) });
    /// let second = step_fn("second")
    ///     .depends_on(&first)
    ///     .handler(|_: u64, first: u64, _: StepContext| async move { Ok::<_, StepError>(first + 1) });
    ///
    /// // `second` needs `first`, which is not in the flow yet: does not compile.
    /// let flow: Flow<u64> = Flow::new("f").step(second).step(first).build();
    /// ```
    ///
    /// Nor does adding the same step twice (the error is "type annotations needed: multiple
    /// impls satisfying `..: AddedOnce<..>`"; see [`AddedOnce`]):
    ///
    /// ```compile_fail,E0283
    /// use pgflow_core::{Flow, StepContext, StepError, step_fn};
    ///
    /// let once = step_fn("once").handler(|n: u64, _: StepContext| async move { Ok::<_, StepError>(n) });
    /// let flow: Flow<u64> = Flow::new("f").step(&once).step(&once).build();
    /// ```
    #[must_use]
    #[allow(
        clippy::needless_pass_by_value,
        reason = "the flow takes the step, as `.step(charge)` reads"
    )]
    pub fn step<T, Indices, Once>(mut self, step: T) -> FlowBuilder<I, (T::Step, Steps)>
    where
        T: IntoStep,
        T::Step: StepOf<I>,
        <T::Step as Step>::Deps: DependenciesIn<Steps, Indices>,
        Steps: AddedOnce<T::Step, Once>,
    {
        let step = step.into_step();
        self.shape.steps.push(step.shape());
        self.handlers.push(step.handler());
        self.retype()
    }

    /// The flow. Never fails; run-time checks happen in [`Flow::validate`], before SQL is
    /// generated or sent.
    ///
    /// ```
    /// use pgflow_core::{Flow, step_fn};
    ///
    /// let echo = step_fn("echo").handler(|n: u8, _ctx| async move { Ok(n) });
    /// // Builds, though no SQL can be made of it: spaces are not allowed in slugs.
    /// let flow: Flow<u8> = Flow::new("not a slug").step(echo).build();
    /// assert!(flow.validate().is_err());
    /// assert!(flow.to_sql().is_err());
    /// ```
    pub fn build(self) -> Flow<I> {
        Flow {
            inner: Arc::new(FlowInner {
                shape: self.shape,
                handlers: self.handlers,
            }),
            _input: PhantomData,
        }
    }

    /// The flow, validated ([`Flow::validate`]).
    ///
    /// ```
    /// use pgflow_core::{Error, Flow, step_fn};
    ///
    /// // Two closure steps are two types, so the compiler lets both in; their slugs collide.
    /// let first = step_fn("same").handler(|n: u8, _ctx| async move { Ok(n) });
    /// let second = step_fn("same").handler(|n: u8, _ctx| async move { Ok(n + 1) });
    /// let error = Flow::<u8>::new("twins").step(first).step(second).try_build().unwrap_err();
    /// assert_eq!(
    ///     error,
    ///     Error::DuplicateStep { flow: "twins".into(), step: "same".into() }
    /// );
    /// ```
    pub fn try_build(self) -> Result<Flow<I>> {
        let flow = self.build();
        flow.validate()?;
        Ok(flow)
    }

    /// The same builder with another list of step types.
    fn retype<Next>(self) -> FlowBuilder<I, Next> {
        FlowBuilder {
            shape: self.shape,
            handlers: self.handlers,
            _types: PhantomData,
        }
    }
}

impl<I, Steps> fmt::Debug for FlowBuilder<I, Steps> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowBuilder")
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};
    use serde_json::json;

    use super::*;
    use crate::{Error, step_fn};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Order {
        order_id: u64,
        amount: f64,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Receipt {
        charged: f64,
        valid: bool,
    }

    fn order_processing() -> Flow<Order> {
        let validate = step_fn("validate").handler(|order: Order, _: StepContext| async move {
            Ok::<_, StepError>(order.amount > 0.0)
        });
        let charge = step_fn("charge").depends_on(&validate).handler(
            |order: Order, valid: bool, _: StepContext| async move {
                Ok::<_, StepError>(Receipt {
                    charged: order.amount,
                    valid,
                })
            },
        );
        let fulfill = step_fn("fulfill")
            .depends_on(&charge)
            .max_attempts(5)
            .timeout(30)
            .handler(|_: Order, receipt: Receipt, ctx: StepContext| async move {
                Ok::<_, StepError>(format!(
                    "{} shipped in run {}",
                    receipt.charged,
                    ctx.run_id()
                ))
            });
        Flow::new("order_processing")
            .max_attempts(3)
            .base_delay(5)
            .timeout(60)
            .step(validate)
            .step(charge)
            .step(fulfill)
            .build()
    }

    fn crawl() -> Flow<String> {
        let urls = step_fn("urls").handler(|site: String, _: StepContext| async move {
            Ok::<_, StepError>(vec![format!("{site}/a"), format!("{site}/bb")])
        });
        let fetch = step_fn("fetch")
            .map_over(&urls)
            .max_attempts(2)
            .handler(|url: String, _: StepContext| async move { Ok::<_, StepError>(url.len()) });
        let total = step_fn("total").depends_on(&fetch).handler(
            |_: String, sizes: Vec<usize>, _: StepContext| async move {
                Ok::<_, StepError>(sizes.iter().sum::<usize>())
            },
        );
        Flow::new("crawl")
            .timeout(120)
            .step(urls)
            .step(fetch)
            .step(total)
            .build()
    }

    #[test]
    fn compiles_like_the_typescript_dsl() {
        assert_eq!(
            order_processing().to_sql().unwrap(),
            "SELECT pgflow.create_flow('order_processing', max_attempts => 3, base_delay => 5, timeout => 60);\n\
             SELECT pgflow.add_step('order_processing', 'validate');\n\
             SELECT pgflow.add_step('order_processing', 'charge', ARRAY['validate']);\n\
             SELECT pgflow.add_step('order_processing', 'fulfill', ARRAY['charge'], max_attempts => 5, timeout => 30);\n"
        );
        assert_eq!(
            crawl().statements().unwrap(),
            [
                "SELECT pgflow.create_flow('crawl', timeout => 120);",
                "SELECT pgflow.add_step('crawl', 'urls');",
                "SELECT pgflow.add_step('crawl', 'fetch', ARRAY['urls'], max_attempts => 2, step_type => 'map');",
                "SELECT pgflow.add_step('crawl', 'total', ARRAY['fetch']);",
            ]
        );
    }

    #[test]
    fn exposes_steps_and_shape() {
        let flow = crawl();
        let steps: Vec<_> = flow
            .steps()
            .map(|s| (s.slug(), s.kind(), s.dependencies().to_vec()))
            .collect();
        assert_eq!(
            steps,
            [
                ("urls", StepKind::Single, vec![]),
                ("fetch", StepKind::Map, vec!["urls".to_owned()]),
                ("total", StepKind::Single, vec!["fetch".to_owned()]),
            ]
        );
        let fetch = flow.find_step("fetch").unwrap();
        assert_eq!(fetch.options().max_attempts, Some(2));
        assert!(flow.find_step("nope").is_none());
        assert_eq!(flow.shape().steps[1], *fetch.shape());
        assert_eq!(flow.options().timeout, Some(120));
        fn shared<T: Send + Sync + Clone + 'static>(_: &T) {}
        shared(&flow);
    }

    #[tokio::test]
    async fn single_step_with_two_dependencies() {
        let a = step_fn("a").handler(|n: u32, _: StepContext| async move { Ok::<_, StepError>(n) });
        let b = step_fn("b")
            .handler(|_: u32, _: StepContext| async move { Ok::<_, StepError>("b".to_owned()) });
        let c = step_fn("c").depends_on(&b).depends_on(&a).handler(
            |n: u32, b: String, a: u32, ctx: StepContext| async move {
                Ok::<_, StepError>(format!("{n} {b} {a} {}", ctx.step_slug()))
            },
        );
        let flow: Flow<u32> = Flow::new("two").step(a).step(b).step(c).build();
        let c = flow.find_step("c").unwrap();
        assert_eq!(c.dependencies(), ["b", "a"]);
        let ctx = StepContext::builder(uuid::Uuid::nil(), "two", "c").build();
        let output = c
            .call(json!({"run": 1, "a": 2, "b": "x"}), ctx.clone())
            .await
            .unwrap();
        assert_eq!(output, json!("1 x 2 c"));

        let error = c
            .call(json!({"run": 1, "a": "two", "b": "x"}), ctx.clone())
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "cannot decode the output of dependency `a` as `u32`: invalid type: string \"two\", expected u32"
        );
        assert!(!error.is_retryable());

        let error = c
            .call(json!({"run": 1, "b": "x"}), ctx.clone())
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "the task input has no `a` field (the output of a dependency); it has: `b`, `run`"
        );

        let error = c
            .call(json!({"a": 2, "b": "x"}), ctx.clone())
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "the task input has no `run` field (the flow input); it has: `a`, `b`"
        );

        let error = c.call(json!([1]), ctx).await.unwrap_err();
        assert!(error.to_string().contains("not an array"), "{error}");
    }

    #[tokio::test]
    async fn map_step_takes_one_element() {
        let flow = crawl();
        let ctx = StepContext::for_test();
        let fetch = flow.find_step("fetch").unwrap();
        assert_eq!(
            fetch.call(json!("https://x"), ctx.clone()).await.unwrap(),
            json!(9)
        );
        let error = fetch.call(json!(["a"]), ctx.clone()).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "cannot decode the map element as `alloc::string::String`: invalid type: sequence, expected a string"
        );
        let total = flow.find_step("total").unwrap();
        assert_eq!(
            total
                .call(json!({"run": "s", "fetch": [1, 2, 3]}), ctx.clone())
                .await
                .unwrap(),
            json!(6)
        );
        let urls = flow.find_step("urls").unwrap();
        assert_eq!(
            urls.call(json!({"run": "s"}), ctx).await.unwrap(),
            json!(["s/a", "s/bb"])
        );
    }

    #[tokio::test]
    async fn root_map_over_the_flow_input() {
        let double = step_fn("double")
            .map_over_input()
            .handler(|n: i64, _: StepContext| async move { Ok::<_, StepError>(n * 2) });
        let sum = step_fn("sum").depends_on(&double).handler(
            |input: Vec<i64>, doubled: Vec<i64>, _: StepContext| async move {
                Ok::<_, StepError>(i64::try_from(input.len())? + doubled.iter().sum::<i64>())
            },
        );
        let flow: Flow<Vec<i64>> = Flow::new("m").step(double).step(sum).build();
        assert_eq!(
            flow.statements().unwrap()[1],
            "SELECT pgflow.add_step('m', 'double', step_type => 'map');"
        );
        let ctx = StepContext::for_test();
        let double = flow.find_step("double").unwrap();
        assert_eq!(
            double.call(json!(21), ctx.clone()).await.unwrap(),
            json!(42)
        );
        let sum = flow.find_step("sum").unwrap();
        assert_eq!(
            sum.call(json!({"run": [1, 2], "double": [2, 4]}), ctx)
                .await
                .unwrap(),
            json!(8)
        );
    }

    #[tokio::test]
    async fn handler_errors_keep_their_source() {
        let parse = step_fn("parse").handler(|text: String, _: StepContext| async move {
            let n: u8 = text.parse()?;
            Ok::<_, StepError>(n)
        });
        let flow: Flow<String> = Flow::new("p").step(parse).build();
        let error = flow
            .find_step("parse")
            .unwrap()
            .call(json!({"run": "300"}), StepContext::for_test())
            .await
            .unwrap_err();
        assert_eq!(error.to_string(), "number too large to fit in target type");
        assert!(error.is_retryable());
        assert!(error.source().is_some());
    }

    #[tokio::test]
    async fn a_skippable_dependency_absent_from_the_input_is_none() {
        use crate::mode;
        let maybe = step_fn("maybe")
            .when_exhausted(mode::Skip)
            .handler(|n: u32, _: StepContext| async move { Ok::<_, StepError>(Some(n)) });
        let sure =
            step_fn("sure").handler(|n: u32, _: StepContext| async move { Ok::<_, StepError>(n) });
        // `maybe` outputs `Option<u32>` and may be skipped: received as `Option<Option<u32>>`,
        // where absent (skipped) and `null` (completed with `None`) differ.
        let after = step_fn("after")
            .depends_on(&maybe)
            .depends_on(&sure)
            .handler(
                |_: u32, maybe: Option<Option<u32>>, sure: u32, _: StepContext| async move {
                    Ok::<_, StepError>(format!("{maybe:?} {sure}"))
                },
            );
        let flow: Flow<u32> = Flow::new("f").step(maybe).step(sure).step(after).build();
        let after = flow.find_step("after").unwrap();
        let ctx = StepContext::for_test();
        let call = |input| after.call(input, ctx.clone());
        assert_eq!(
            call(json!({"run": 1, "sure": 2})).await.unwrap(),
            json!("None 2")
        );
        assert_eq!(
            call(json!({"run": 1, "maybe": null, "sure": 2}))
                .await
                .unwrap(),
            json!("Some(None) 2")
        );
        assert_eq!(
            call(json!({"run": 1, "maybe": 7, "sure": 2}))
                .await
                .unwrap(),
            json!("Some(Some(7)) 2")
        );
        // A present entry of the wrong type is still an error, and a step that is never
        // skipped must be there.
        let error = call(json!({"run": 1, "maybe": "x", "sure": 2}))
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("cannot decode the output of dependency `maybe`"),
            "{error}"
        );
        let error = call(json!({"run": 1, "maybe": 7})).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "the task input has no `sure` field (the output of a dependency); it has: `maybe`, `run`"
        );
        assert!(flow.shape().steps[0].skippable());
    }

    #[test]
    fn build_never_fails_validate_and_try_build_do() {
        let s = step_fn("ok")
            .timeout(0)
            .handler(|n: u8, _: StepContext| async move { Ok::<_, StepError>(n) });
        let flow: Flow<u8> = Flow::new("bad slug").step(s.clone()).build();
        assert!(matches!(
            flow.validate(),
            Err(Error::InvalidFlowSlug { .. })
        ));
        assert!(flow.to_sql().is_err());
        let error = Flow::<u8>::new("good").step(s).try_build().unwrap_err();
        assert_eq!(
            error.to_string(),
            "option `timeout` of step `ok` in flow `good` is 0, but it must be at least 3 seconds"
        );
        let dup_a =
            step_fn("same").handler(|n: u8, _: StepContext| async move { Ok::<_, StepError>(n) });
        let dup_b =
            step_fn("same").handler(|n: u8, _: StepContext| async move { Ok::<_, StepError>(n) });
        let error = Flow::<u8>::new("f")
            .step(dup_a)
            .step(dup_b)
            .try_build()
            .unwrap_err();
        assert_eq!(
            error,
            Error::DuplicateStep {
                flow: "f".into(),
                step: "same".into()
            }
        );
    }
}

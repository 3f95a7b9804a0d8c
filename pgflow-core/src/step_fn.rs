//! Steps without the macro: a closure wrapped by [`step_fn`], with dependencies declared by
//! step values.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::private::{Fields, element, encode, encode_element};
use crate::{
    ErasedHandler, IntoStep, MapOver, Step, StepContext, StepError, StepKind, StepOf, StepOptions,
    StepOutput,
};

/// Starts a step whose handler is a closure.
///
/// The closure receives the flow input, then the output of each dependency in the order of the
/// [`depends_on`](StepFnBuilder::depends_on) calls, then the [`StepContext`]; a map step's
/// closure receives one element and the context. The result is a [`FnStep`], used like a
/// `#[step]` function: added to a flow with `.step(...)`, named as a dependency by reference.
///
/// ```
/// use pgflow_core::{Flow, StepContext, StepError, step_fn};
///
/// // The flow input is a list of words.
/// let words = step_fn("words").handler(|input: String, _ctx: StepContext| async move {
///     Ok::<_, StepError>(input.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
/// });
/// // Once per word, in parallel: a map step over `words`' `Vec<String>`.
/// let lengths = step_fn("lengths")
///     .map_over(&words)
///     .max_attempts(2)
///     .handler(|word: String, _ctx| async move { Ok(word.len()) });
/// // Dependents of a map step receive a `Vec` of its outputs, in element order.
/// let total = step_fn("total")
///     .depends_on(&words)
///     .depends_on(&lengths)
///     .handler(|_input: String, words, lengths: Vec<usize>, _ctx| async move {
///         Ok(format!("{} words, {} letters", words.len(), lengths.iter().sum::<usize>()))
///     });
///
/// let flow: Flow<String> = Flow::new("count").step(words).step(lengths).step(total).build();
/// assert_eq!(
///     flow.statements()?[2],
///     "SELECT pgflow.add_step('count', 'lengths', ARRAY['words'], max_attempts => 2, step_type => 'map');"
/// );
/// # Ok::<(), pgflow_core::Error>(())
/// ```
pub fn step_fn(slug: impl Into<String>) -> StepFnBuilder<Single<()>> {
    StepFnBuilder {
        slug: slug.into(),
        options: StepOptions::new(),
        dependencies: Vec::new(),
        _kind: PhantomData,
    }
}

/// Builds a [`FnStep`]; see [`step_fn`]. `K` tracks the kind of step and its dependencies.
pub struct StepFnBuilder<K> {
    slug: String,
    options: StepOptions,
    dependencies: Vec<String>,
    _kind: PhantomData<fn() -> K>,
}

/// [`StepFnBuilder`] state: a single step with dependencies `Deps` (a type-level list).
#[derive(Debug)]
pub struct Single<Deps>(PhantomData<Deps>);

/// [`StepFnBuilder`] state: a map step over the flow input.
#[derive(Debug)]
pub struct MapInput;

/// [`StepFnBuilder`] state: a map step over the output of step `S`.
#[derive(Debug)]
pub struct MapDependency<S>(PhantomData<S>);

impl<K> StepFnBuilder<K> {
    /// Sets the step's `max_attempts`.
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.options.max_attempts = Some(attempts);
        self
    }

    /// Sets the step's `base_delay`: whole seconds, or a [`Duration`](std::time::Duration)
    /// rounded up to them (see [`Seconds`](crate::Seconds)).
    #[must_use]
    pub fn base_delay(mut self, time: impl crate::Seconds) -> Self {
        self.options.base_delay = Some(time.into_seconds());
        self
    }

    /// Sets the step's `timeout`: whole seconds, or a [`Duration`](std::time::Duration)
    /// rounded up to them (see [`Seconds`](crate::Seconds)).
    #[must_use]
    pub fn timeout(mut self, time: impl crate::Seconds) -> Self {
        self.options.timeout = Some(time.into_seconds());
        self
    }

    /// Sets the step's `start_delay`: whole seconds, or a [`Duration`](std::time::Duration)
    /// rounded up to them (see [`Seconds`](crate::Seconds)).
    #[must_use]
    pub fn start_delay(mut self, time: impl crate::Seconds) -> Self {
        self.options.start_delay = Some(time.into_seconds());
        self
    }

    /// Sets the step's `max_delay`, the cap on each retry's delay: whole seconds, or a
    /// [`Duration`](std::time::Duration) rounded up to them (see [`Seconds`](crate::Seconds)).
    /// Unset, the flow's applies. See
    /// [the retry policy](crate::FlowOptions#retry-policy).
    ///
    /// ```
    /// use pgflow_core::{Flow, step_fn};
    ///
    /// // Retries after 2, 4, 5, 5 seconds, each somewhere in [⌈d/2⌉, d].
    /// let call = step_fn("call_api")
    ///     .max_attempts(5)
    ///     .base_delay(1)
    ///     .max_delay(5)
    ///     .jitter(true)
    ///     .handler(|url: String, _ctx| async move { Ok(url.len()) });
    /// let flow: Flow<String> = Flow::new("api").step(call).build();
    /// assert_eq!(
    ///     flow.statements()?,
    ///     [
    ///         "SELECT pgflow.create_flow('api');",
    ///         "SELECT pgflow.add_step('api', 'call_api', max_attempts => 5, base_delay => 1);",
    ///         "SELECT pgflow.set_retry_policy('api', 'call_api', 5, true);",
    ///     ]
    /// );
    /// # Ok::<(), pgflow_core::Error>(())
    /// ```
    #[must_use]
    pub fn max_delay(mut self, time: impl crate::Seconds) -> Self {
        self.options.max_delay = Some(time.into_seconds());
        self
    }

    /// Sets the step's `jitter`: whether each retry's delay *d* is drawn uniformly from
    /// [⌈*d*/2⌉, *d*] seconds; `false` turns a flow's jitter off for this step. Unset, the
    /// flow's applies. See [`max_delay`](Self::max_delay) for an example.
    #[must_use]
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.options.jitter = Some(jitter);
        self
    }

    fn retype<Next>(self) -> StepFnBuilder<Next> {
        StepFnBuilder {
            slug: self.slug,
            options: self.options,
            dependencies: self.dependencies,
            _kind: PhantomData,
        }
    }

    fn finish<In, O, Deps, F>(
        self,
        kind: StepKind,
        handler: Arc<dyn ErasedHandler>,
    ) -> FnStep<In, O, Deps, F> {
        FnStep {
            inner: Arc::new(FnStepInner {
                slug: self.slug,
                kind,
                options: self.options,
                dependencies: self.dependencies,
                handler,
            }),
            _types: PhantomData,
        }
    }
}

impl<K> fmt::Debug for StepFnBuilder<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepFnBuilder")
            .field("slug", &self.slug)
            .field("options", &self.options)
            .field("dependencies", &self.dependencies)
            .finish()
    }
}

impl<Deps: Append> StepFnBuilder<Single<Deps>> {
    /// Adds a dependency: the handler then receives `dependency`'s output, after the outputs of
    /// the dependencies added before.
    ///
    /// `dependency` is a step value: a [`FnStep`] (by reference, to keep it for `.step(...)`) or
    /// a `#[step]` function.
    ///
    /// ```
    /// use pgflow_core::{Flow, StepContext, step_fn};
    ///
    /// let price = step_fn("price").handler(|amount: f64, _ctx| async move { Ok(amount * 1.2) });
    /// let valid = step_fn("valid").handler(|amount: f64, _ctx| async move { Ok(amount > 0.0) });
    /// let charge = step_fn("charge")
    ///     .depends_on(&price)
    ///     .depends_on(&valid)
    ///     // The flow input, then `price`'s output, then `valid`'s, then the context.
    ///     .handler(|_amount: f64, price: f64, valid: bool, _ctx: StepContext| async move {
    ///         Ok(if valid { price } else { 0.0 })
    ///     });
    ///
    /// let flow: Flow<f64> = Flow::new("pay").step(price).step(valid).step(charge).build();
    /// assert_eq!(flow.find_step("charge").unwrap().dependencies(), ["price", "valid"]);
    /// ```
    pub fn depends_on<T: IntoStep>(
        mut self,
        dependency: T,
    ) -> StepFnBuilder<Single<Deps::With<T::Step>>> {
        self.dependencies
            .push(dependency.into_step().slug().to_owned());
        self.retype()
    }
}

impl StepFnBuilder<Single<()>> {
    /// Makes this a map step over the flow input, which must be a `Vec<T>`: the handler runs
    /// once per element and receives one `T`.
    ///
    /// ```
    /// use pgflow_core::{Flow, StepKind, step_fn};
    ///
    /// let square = step_fn("square")
    ///     .map_over_input()
    ///     .handler(|n: i64, _ctx| async move { Ok(n * n) });
    /// let flow: Flow<Vec<i64>> = Flow::new("squares").step(square).build();
    /// assert_eq!(flow.find_step("square").unwrap().kind(), StepKind::Map);
    /// ```
    pub fn map_over_input(self) -> StepFnBuilder<MapInput> {
        self.retype()
    }

    /// Makes this a map step over `dependency`'s `Vec<T>` output: the handler runs once per
    /// element and receives one `T`. A map step has exactly one dependency.
    ///
    /// ```
    /// use pgflow_core::{Flow, step_fn};
    ///
    /// let urls = step_fn("urls").handler(|site: String, _ctx| async move {
    ///     Ok(vec![format!("{site}/a"), format!("{site}/b")])
    /// });
    /// // `urls` outputs `Vec<String>`: each task of `fetch` takes one `String`.
    /// let fetch = step_fn("fetch")
    ///     .map_over(&urls)
    ///     .handler(|url: String, _ctx| async move { Ok(url.len()) });
    ///
    /// let flow: Flow<String> = Flow::new("crawl").step(urls).step(fetch).build();
    /// assert_eq!(
    ///     flow.statements()?[2],
    ///     "SELECT pgflow.add_step('crawl', 'fetch', ARRAY['urls'], step_type => 'map');"
    /// );
    /// # Ok::<(), pgflow_core::Error>(())
    /// ```
    pub fn map_over<T: IntoStep>(mut self, dependency: T) -> StepFnBuilder<MapDependency<T::Step>> {
        self.dependencies
            .push(dependency.into_step().slug().to_owned());
        self.retype()
    }
}

/// Appends a step type to a type-level list of dependencies.
pub trait Append {
    /// The list with `S` at its end.
    type With<S>;
}

impl Append for () {
    type With<S> = (S, ());
}

impl<Head, Rest: Append> Append for (Head, Rest) {
    type With<S> = (Head, Rest::With<S>);
}

macro_rules! single_handler {
    ($($dep:ident $arg:ident),*) => {
        impl<$($dep: Step),*> StepFnBuilder<Single<single_handler!(@list $($dep)*)>> {
            /// Sets the handler: it receives the flow input, each dependency's output in order,
            /// and the context.
            pub fn handler<I, O, F, Fut>(self, handler: F) -> FnStep<TakesInput<I>, O, single_handler!(@list $($dep)*), F>
            where
                I: DeserializeOwned + 'static,
                O: StepOutput,
                F: Fn(I, $($dep::Output,)* StepContext) -> Fut + Send + Sync + 'static,
                Fut: Future<Output = Result<O, StepError>> + Send + 'static,
            {
                let slugs = self.dependencies.clone();
                let erased = move |input: Value, ctx: StepContext| -> crate::BoxFuture<'static, Result<Value, StepError>> {
                    let decoded = (|| {
                        let mut fields = Fields::new(input)?;
                        let run: I = fields.flow_input()?;
                        let mut _slugs = slugs.iter();
                        $(let $arg: $dep::Output = fields.dependency_by_slug(_slugs.next().map_or("", String::as_str))?;)*
                        Ok::<_, StepError>((run, $($arg,)*))
                    })();
                    match decoded {
                        Ok((run, $($arg,)*)) => {
                            let output = handler(run, $($arg,)* ctx);
                            Box::pin(async move { encode(output.await?) })
                        }
                        Err(error) => Box::pin(std::future::ready(Err(error))),
                    }
                };
                self.finish(StepKind::Single, Arc::new(erased))
            }
        }
    };
    (@list) => { () };
    (@list $head:ident $($rest:ident)*) => { ($head, single_handler!(@list $($rest)*)) };
}

single_handler!();
single_handler!(D1 d1);
single_handler!(D1 d1, D2 d2);
single_handler!(D1 d1, D2 d2, D3 d3);
single_handler!(D1 d1, D2 d2, D3 d3, D4 d4);
single_handler!(D1 d1, D2 d2, D3 d3, D4 d4, D5 d5);
single_handler!(D1 d1, D2 d2, D3 d3, D4 d4, D5 d5, D6 d6);

impl StepFnBuilder<MapInput> {
    /// Sets the handler: it receives one element of the flow input (a `Vec<T>`) and the
    /// context. Dependents receive a `Vec` of its outputs, in element order.
    pub fn handler<T, O, F, Fut>(self, handler: F) -> FnStep<TakesInput<Vec<T>>, Vec<O>, (), F>
    where
        T: DeserializeOwned + 'static,
        Vec<O>: StepOutput,
        F: Fn(T, StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, StepError>> + Send + 'static,
    {
        self.finish(StepKind::Map, map_handler(handler))
    }
}

impl<S: Step> StepFnBuilder<MapDependency<S>> {
    /// Sets the handler: it receives one element of the dependency's `Vec<T>` output and the
    /// context. Dependents receive a `Vec` of its outputs, in element order.
    pub fn handler<T, O, F, Fut>(self, handler: F) -> FnStep<AnyInput, Vec<O>, (S, ()), F>
    where
        S::Output: MapOver<T>,
        T: DeserializeOwned + 'static,
        Vec<O>: StepOutput,
        F: Fn(T, StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, StepError>> + Send + 'static,
    {
        self.finish(StepKind::Map, map_handler(handler))
    }
}

fn map_handler<T, O, F, Fut>(handler: F) -> Arc<dyn ErasedHandler>
where
    T: DeserializeOwned + 'static,
    Vec<O>: StepOutput,
    F: Fn(T, StepContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, StepError>> + Send + 'static,
{
    Arc::new(
        move |input: Value,
              ctx: StepContext|
              -> crate::BoxFuture<'static, Result<Value, StepError>> {
            match element::<T>(input) {
                Ok(item) => {
                    let output = handler(item, ctx);
                    Box::pin(async move { encode_element(output.await?) })
                }
                Err(error) => Box::pin(std::future::ready(Err(error))),
            }
        },
    )
}

/// A step built from a closure with [`step_fn`].
///
/// Its type parameters record, for the compiler: which flow input it takes (`In`), what
/// dependents receive (`O`), its dependencies (`Deps`), and the closure's own type (`F`, which
/// makes each closure step a distinct type). Cheap to clone.
pub struct FnStep<In, O, Deps, F> {
    inner: Arc<FnStepInner>,
    _types: PhantomData<Markers<In, O, Deps, F>>,
}

/// The type parameters of a [`FnStep`], held as a function pointer so that they do not affect
/// `Send`, `Sync` or drop checking.
type Markers<In, O, Deps, F> = fn() -> (In, O, Deps, F);

struct FnStepInner {
    slug: String,
    kind: StepKind,
    options: StepOptions,
    dependencies: Vec<String>,
    handler: Arc<dyn ErasedHandler>,
}

/// [`FnStep`] input marker: the step takes the flow input `I`.
#[derive(Debug)]
pub struct TakesInput<I>(PhantomData<I>);

/// [`FnStep`] input marker: the step does not take the flow input and fits any flow.
#[derive(Debug)]
pub struct AnyInput;

/// Whether a step with input marker `Self` fits a flow whose input is `I`.
pub trait FitsInput<I> {}

impl<I> FitsInput<I> for TakesInput<I> {}

impl<I> FitsInput<I> for AnyInput {}

impl<In, O, Deps, F> Clone for FnStep<In, O, Deps, F> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            _types: PhantomData,
        }
    }
}

impl<In, O, Deps, F> fmt::Debug for FnStep<In, O, Deps, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnStep")
            .field("slug", &self.inner.slug)
            .field("kind", &self.inner.kind)
            .field("options", &self.inner.options)
            .field("dependencies", &self.inner.dependencies)
            .finish_non_exhaustive()
    }
}

impl<In, O, Deps, F> IntoStep for FnStep<In, O, Deps, F>
where
    Self: Step,
{
    type Step = Self;

    fn into_step(self) -> Self {
        self
    }
}

impl<In, O, Deps, F> IntoStep for &FnStep<In, O, Deps, F>
where
    FnStep<In, O, Deps, F>: Step,
{
    type Step = FnStep<In, O, Deps, F>;

    fn into_step(self) -> Self::Step {
        self.clone()
    }
}

impl<In, O, Deps, F> Step for FnStep<In, O, Deps, F>
where
    In: 'static,
    O: StepOutput,
    Deps: crate::Dependencies,
    F: 'static,
{
    type Output = O;
    type Deps = Deps;

    fn slug(&self) -> &str {
        &self.inner.slug
    }

    fn kind(&self) -> StepKind {
        self.inner.kind
    }

    fn options(&self) -> StepOptions {
        self.inner.options
    }

    fn dependencies(&self) -> Vec<String> {
        self.inner.dependencies.clone()
    }
}

impl<I, In, O, Deps, F> StepOf<I> for FnStep<In, O, Deps, F>
where
    In: FitsInput<I> + 'static,
    O: StepOutput,
    Deps: crate::Dependencies,
    F: 'static,
{
    fn handler(&self) -> Arc<dyn ErasedHandler> {
        Arc::clone(&self.inner.handler)
    }
}

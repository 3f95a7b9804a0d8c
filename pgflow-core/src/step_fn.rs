//! Steps without the macro: a closure wrapped by [`step_fn`], with dependencies declared by
//! step values.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::mode::{self, Mode};
use crate::private::{Fields, element, encode, encode_element};
use crate::{
    ErasedHandler, IntoPattern, IntoStep, MapOver, NoPattern, PatternFits, PatternTarget, Received,
    Skippability, Step, StepContext, StepError, StepKind, StepOf, StepOptions, StepOutput,
    StepShape,
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
        shape: StepShape::new(slug),
        _kind: PhantomData,
    }
}

/// Builds a [`FnStep`]; see [`step_fn`]. `K` tracks the kind of step and its dependencies, `C`
/// its condition and skip modes (a [`Condition`]).
pub struct StepFnBuilder<K, C = Unconditional> {
    /// Everything but the kind, set by `finish`.
    shape: StepShape,
    _kind: PhantomData<fn() -> (K, C)>,
}

/// [`StepFnBuilder`] state: the step's condition at the type level. `Required` and `Forbidden`
/// are what its patterns are matched against ([`NoPattern`] when unset), `Unmet` and
/// `Exhausted` its [modes](crate::mode). The compiler derives from them whether the step may
/// be skipped ([`ConditionState`]).
#[derive(Debug)]
pub struct Condition<Required, Forbidden, Unmet, Exhausted>(
    PhantomData<ConditionMarkers<Required, Forbidden, Unmet, Exhausted>>,
);

/// The type parameters of a [`Condition`], held as a function pointer (see [`Markers`]).
type ConditionMarkers<R, F, U, E> = fn() -> (R, F, U, E);

/// The [`Condition`] of a step that sets none: no patterns, the engine's default modes.
pub type Unconditional = Condition<NoPattern, NoPattern, mode::Skip, mode::Fail>;

/// What a [`Condition`] state implies.
pub trait ConditionState: 'static {
    /// Whether the step may be skipped: a pattern with a skipping `when_unmet`, or a skipping
    /// `when_exhausted`.
    type Skip: Skippability;
    /// Whether the step may be skipped with `skip-cascade`.
    type Cascade: Skippability;
}

impl<R, F, U, E> ConditionState for Condition<R, F, U, E>
where
    R: PatternTarget + 'static,
    F: PatternTarget + 'static,
    U: Mode,
    E: Mode,
{
    type Skip = <<<R::Present as Skippability>::Or<F::Present> as Skippability>::And<
        U::Skips,
    > as Skippability>::Or<E::Skips>;
    type Cascade = <<<R::Present as Skippability>::Or<F::Present> as Skippability>::And<
        U::Cascades,
    > as Skippability>::Or<E::Cascades>;
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

impl<K, R, F, U, E> StepFnBuilder<K, Condition<R, F, U, E>> {
    /// Runs the step only if its input contains `pattern` (the engine's `@>`): its
    /// `required_input_pattern`, upstream's `if`. Otherwise the step's
    /// [`when_unmet`](Self::when_unmet) applies, which skips it unless set otherwise; its
    /// dependents then receive its output as an `Option`.
    ///
    /// A root step's input is the flow input; a dependent step's is the object of its
    /// dependencies' outputs, keyed by slug. `pgflow::pattern!` writes a pattern whose field
    /// names the compiler checks, and the handler then checks that it fits the step; a
    /// `serde_json::Value` object is taken unchecked.
    ///
    /// ```
    /// use pgflow_core::{Flow, step_fn};
    /// use serde_json::json;
    ///
    /// let upgrade = step_fn("upgrade")
    ///     .if_input(json!({"plan": "trial"}))
    ///     .handler(|account: serde_json::Value, _ctx| async move { Ok(account["id"].clone()) });
    /// let flow: Flow<serde_json::Value> = Flow::new("accounts").step(upgrade).build();
    /// assert_eq!(
    ///     flow.statements()?[1],
    ///     r#"SELECT pgflow.add_step('accounts', 'upgrade', required_input_pattern => '{"plan":"trial"}');"#
    /// );
    /// # Ok::<(), pgflow_core::Error>(())
    /// ```
    pub fn if_input<P: IntoPattern>(
        mut self,
        pattern: P,
    ) -> StepFnBuilder<K, Condition<P::On, F, U, E>> {
        self.shape.required_input_pattern = Some(pattern.into_value());
        self.retype()
    }

    /// Runs the step only if its input does not contain `pattern`: its
    /// `forbidden_input_pattern`, upstream's `ifNot`. See [`if_input`](Self::if_input).
    ///
    /// ```
    /// use pgflow_core::{Flow, step_fn};
    /// use serde_json::json;
    ///
    /// let welcome = step_fn("welcome")
    ///     .if_not(json!({"returning": true}))
    ///     .handler(|user: serde_json::Value, _ctx| async move { Ok(format!("hi {}", user["name"])) });
    /// let flow: Flow<serde_json::Value> = Flow::new("signup").step(welcome).build();
    /// assert_eq!(
    ///     flow.statements()?[1],
    ///     r#"SELECT pgflow.add_step('signup', 'welcome', forbidden_input_pattern => '{"returning":true}');"#
    /// );
    /// # Ok::<(), pgflow_core::Error>(())
    /// ```
    pub fn if_not<P: IntoPattern>(
        mut self,
        pattern: P,
    ) -> StepFnBuilder<K, Condition<R, P::On, U, E>> {
        self.shape.forbidden_input_pattern = Some(pattern.into_value());
        self.retype()
    }

    /// What the engine does when the step's condition is unmet: [`mode::Skip`] (the default),
    /// [`mode::SkipCascade`] (the step and every step downstream) or [`mode::Fail`] (the run
    /// fails). The mode is a type, so that the compiler knows whether dependents receive the
    /// step's output as an `Option`.
    ///
    /// ```
    /// use pgflow_core::{Flow, SkipMode, mode, step_fn};
    /// use serde_json::json;
    ///
    /// let charge = step_fn("charge")
    ///     .if_input(json!({"approved": true}))
    ///     .when_unmet(mode::Fail)
    ///     .handler(|order: serde_json::Value, _ctx| async move {
    ///         Ok(order["amount"].as_f64().unwrap_or_default())
    ///     });
    /// // Never skipped (an unmet condition fails the run): the next step takes the output
    /// // itself, not an `Option`.
    /// let receipt = step_fn("receipt")
    ///     .depends_on(&charge)
    ///     .handler(|_: serde_json::Value, amount: f64, _ctx| async move {
    ///         Ok(format!("charged {amount}"))
    ///     });
    /// let flow: Flow<serde_json::Value> = Flow::new("pay").step(charge).step(receipt).build();
    /// assert_eq!(flow.shape().steps[0].when_unmet, SkipMode::Fail);
    /// ```
    pub fn when_unmet<M: Mode>(self, _mode: M) -> StepFnBuilder<K, Condition<R, F, M, E>> {
        let mut next = self.retype();
        next.shape.when_unmet = M::MODE;
        next
    }

    /// What the engine does when a task of the step has used up its attempts: [`mode::Fail`]
    /// (the default, as in pgflow 0.8.1: the run fails), [`mode::Skip`] or
    /// [`mode::SkipCascade`]. A step that may be skipped gives its dependents its output as an
    /// `Option`.
    ///
    /// ```
    /// use pgflow_core::{Flow, mode, step_fn};
    ///
    /// let geocode = step_fn("geocode")
    ///     .max_attempts(3)
    ///     .when_exhausted(mode::Skip)
    ///     .handler(|address: String, _ctx| async move { Ok((address.len() as f64, 0.0)) });
    /// let label = step_fn("label")
    ///     .depends_on(&geocode)
    ///     .handler(|address: String, at: Option<(f64, f64)>, _ctx| async move {
    ///         Ok(match at {
    ///             Some((lat, lon)) => format!("{address} at {lat},{lon}"),
    ///             None => address, // geocoding gave up; the run goes on
    ///         })
    ///     });
    /// let flow: Flow<String> = Flow::new("places").step(geocode).step(label).build();
    /// assert_eq!(
    ///     flow.statements()?[1],
    ///     "SELECT pgflow.add_step('places', 'geocode', max_attempts => 3, when_exhausted => 'skip');"
    /// );
    /// # Ok::<(), pgflow_core::Error>(())
    /// ```
    pub fn when_exhausted<M: Mode>(self, _mode: M) -> StepFnBuilder<K, Condition<R, F, U, M>> {
        let mut next = self.retype();
        next.shape.when_exhausted = M::MODE;
        next
    }
}

impl<K, C> StepFnBuilder<K, C> {
    /// Sets the step's `max_attempts`.
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.shape.options.max_attempts = Some(attempts);
        self
    }

    /// Sets the step's `base_delay`: whole seconds, or a [`Duration`](std::time::Duration)
    /// rounded up to them (see [`Seconds`](crate::Seconds)).
    #[must_use]
    pub fn base_delay(mut self, time: impl crate::Seconds) -> Self {
        self.shape.options.base_delay = Some(time.into_seconds());
        self
    }

    /// Sets the step's `timeout`: whole seconds, or a [`Duration`](std::time::Duration)
    /// rounded up to them (see [`Seconds`](crate::Seconds)).
    #[must_use]
    pub fn timeout(mut self, time: impl crate::Seconds) -> Self {
        self.shape.options.timeout = Some(time.into_seconds());
        self
    }

    /// Sets the step's `start_delay`: whole seconds, or a [`Duration`](std::time::Duration)
    /// rounded up to them (see [`Seconds`](crate::Seconds)).
    #[must_use]
    pub fn start_delay(mut self, time: impl crate::Seconds) -> Self {
        self.shape.options.start_delay = Some(time.into_seconds());
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
        self.shape.options.max_delay = Some(time.into_seconds());
        self
    }

    /// Limits the step to `max` tasks started at once across every worker (issue 22,
    /// `docs/limits.md`); tasks over the limit stay queued and start, oldest first, as slots
    /// free. A task holds its slot until it is reported, or for at most its timeout. Values the
    /// engine refuses (0, above [`StepLimits::MAX`](crate::StepLimits::MAX)) make
    /// [`Flow::try_build`](crate::FlowBuilder::try_build) fail with
    /// [`Error::InvalidLimit`](crate::Error::InvalidLimit).
    ///
    /// ```
    /// use pgflow_core::{Flow, step_fn};
    ///
    /// let call = step_fn("call_api")
    ///     .concurrency(3)
    ///     .handler(|url: String, _ctx| async move { Ok(url.len()) });
    /// let flow: Flow<String> = Flow::new("api").step(call).build();
    /// assert_eq!(
    ///     flow.statements()?[2],
    ///     "SELECT pgflow.set_concurrency_limit('api', 'call_api', 3, NULL);"
    /// );
    /// # Ok::<(), pgflow_core::Error>(())
    /// ```
    #[must_use]
    pub fn concurrency(mut self, max: u32) -> Self {
        self.shape.limits.concurrency = Some(crate::ConcurrencyLimit { max, key: None });
        self
    }

    /// Limits the step to `max` tasks started at once per value of the run input's top-level
    /// key `key` (per tenant, per customer); a run input without the key counts as one more
    /// value. Each value gets its own slots, so a value with a long backlog does not hold
    /// back another.
    ///
    /// ```
    /// use pgflow_core::{Flow, step_fn};
    /// use serde_json::Value;
    ///
    /// let sync = step_fn("sync")
    ///     .concurrency_per_key("tenant", 2)
    ///     .handler(|input: Value, _ctx| async move { Ok(input) });
    /// let flow: Flow<Value> = Flow::new("tenants").step(sync).build();
    /// assert_eq!(
    ///     flow.statements()?[2],
    ///     "SELECT pgflow.set_concurrency_limit('tenants', 'sync', 2, 'tenant');"
    /// );
    /// # Ok::<(), pgflow_core::Error>(())
    /// ```
    #[must_use]
    pub fn concurrency_per_key(mut self, key: impl Into<String>, max: u32) -> Self {
        self.shape.limits.concurrency = Some(crate::ConcurrencyLimit {
            max,
            key: Some(key.into()),
        });
        self
    }

    /// Limits the step to `max_starts` task starts per `per` (whole seconds, or a
    /// [`Duration`](std::time::Duration) rounded up to them), across every worker, in windows
    /// of that length aligned on the clock. Tasks over the rate stay queued until the next
    /// window.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgflow_core::{Flow, step_fn};
    ///
    /// let call = step_fn("call_api")
    ///     .rate_limit(100, Duration::from_secs(1))
    ///     .handler(|url: String, _ctx| async move { Ok(url.len()) });
    /// let flow: Flow<String> = Flow::new("api").step(call).build();
    /// assert_eq!(
    ///     flow.statements()?[2],
    ///     "SELECT pgflow.set_rate_limit('api', 'call_api', 100, interval '1 seconds', NULL);"
    /// );
    /// # Ok::<(), pgflow_core::Error>(())
    /// ```
    #[must_use]
    pub fn rate_limit(mut self, max_starts: u32, per: impl crate::Seconds) -> Self {
        self.shape.limits.rate = Some(crate::RateLimit {
            max_starts,
            per_seconds: per.into_seconds(),
            key: None,
        });
        self
    }

    /// Like [`rate_limit`](Self::rate_limit), per value of the run input's top-level key
    /// `key`: each value gets `max_starts` per window.
    #[must_use]
    pub fn rate_limit_per_key(
        mut self,
        key: impl Into<String>,
        max_starts: u32,
        per: impl crate::Seconds,
    ) -> Self {
        self.shape.limits.rate = Some(crate::RateLimit {
            max_starts,
            per_seconds: per.into_seconds(),
            key: Some(key.into()),
        });
        self
    }

    /// Sets the step's `jitter`: whether each retry's delay *d* is drawn uniformly from
    /// [⌈*d*/2⌉, *d*] seconds; `false` turns a flow's jitter off for this step. Unset, the
    /// flow's applies. See [`max_delay`](Self::max_delay) for an example.
    #[must_use]
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.shape.options.jitter = Some(jitter);
        self
    }

    fn retype<NextK, NextC>(self) -> StepFnBuilder<NextK, NextC> {
        StepFnBuilder {
            shape: self.shape,
            _kind: PhantomData,
        }
    }

    fn finish<In, O, Deps, F>(
        mut self,
        kind: StepKind,
        handler: Arc<dyn ErasedHandler>,
    ) -> FnStep<In, O, Deps, F, C> {
        self.shape.kind = kind;
        FnStep {
            inner: Arc::new(FnStepInner {
                shape: self.shape,
                handler,
            }),
            _types: PhantomData,
        }
    }
}

impl<K, C> fmt::Debug for StepFnBuilder<K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepFnBuilder")
            .field("shape", &self.shape)
            .finish()
    }
}

impl<Deps: Append, C> StepFnBuilder<Single<Deps>, C> {
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
    ) -> StepFnBuilder<Single<Deps::With<T::Step>>, C> {
        self.shape
            .dependencies
            .push(dependency.into_step().slug().to_owned());
        self.retype()
    }
}

impl<C> StepFnBuilder<Single<()>, C> {
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
    pub fn map_over_input(self) -> StepFnBuilder<MapInput, C> {
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
    pub fn map_over<T: IntoStep>(
        mut self,
        dependency: T,
    ) -> StepFnBuilder<MapDependency<T::Step>, C> {
        self.shape
            .dependencies
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
        impl<$($dep: Step,)* Req, Forb, Unmet, Exh> StepFnBuilder<Single<single_handler!(@list $($dep)*)>, Condition<Req, Forb, Unmet, Exh>> {
            /// Sets the handler: it receives the flow input, each dependency's output in order
            /// (as an `Option` from a dependency that [may be skipped](Step::Skip)), and the
            /// context.
            ///
            /// It compiles only if the step's condition patterns, if any, fit it: a pattern on
            /// the flow input fits a root step taking that input, a pattern on dependencies a
            /// step that depends on each of them.
            #[allow(clippy::type_complexity, reason = "the step's type records all it is")]
            pub fn handler<I, O, F, Fut, ReqIndex, ForbIndex>(self, handler: F) -> FnStep<TakesInput<I>, O, single_handler!(@list $($dep)*), F, Condition<Req, Forb, Unmet, Exh>>
            where
                I: DeserializeOwned + 'static,
                O: StepOutput,
                F: Fn(I, $(Received<$dep>,)* StepContext) -> Fut + Send + Sync + 'static,
                Fut: Future<Output = Result<O, StepError>> + Send + 'static,
                Req: PatternFits<I, single_handler!(@list $($dep)*), ReqIndex>,
                Forb: PatternFits<I, single_handler!(@list $($dep)*), ForbIndex>,
            {
                let slugs = self.shape.dependencies.clone();
                let erased = move |input: Value, ctx: StepContext| -> crate::BoxFuture<'static, Result<Value, StepError>> {
                    let decoded = (|| {
                        let mut fields = Fields::new(input)?;
                        let run: I = fields.flow_input()?;
                        let mut _slugs = slugs.iter();
                        $(let $arg: Received<$dep> = <$dep::Skip as Skippability>::decode::<$dep::Output>(&mut fields, _slugs.next().map_or("", String::as_str))?;)*
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

impl<Req, Forb, Unmet, Exh> StepFnBuilder<MapInput, Condition<Req, Forb, Unmet, Exh>> {
    /// Sets the handler: it receives one element of the flow input (a `Vec<T>`) and the
    /// context. Dependents receive a `Vec` of its outputs, in element order.
    #[allow(clippy::type_complexity, reason = "the step's type records all it is")]
    pub fn handler<T, O, F, Fut, ReqIndex, ForbIndex>(
        self,
        handler: F,
    ) -> FnStep<TakesInput<Vec<T>>, Vec<O>, (), F, Condition<Req, Forb, Unmet, Exh>>
    where
        T: DeserializeOwned + 'static,
        Vec<O>: StepOutput,
        F: Fn(T, StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, StepError>> + Send + 'static,
        Req: PatternFits<Vec<T>, (), ReqIndex>,
        Forb: PatternFits<Vec<T>, (), ForbIndex>,
    {
        self.finish(StepKind::Map, map_handler(handler))
    }
}

impl<S: Step, Req, Forb, Unmet, Exh>
    StepFnBuilder<MapDependency<S>, Condition<Req, Forb, Unmet, Exh>>
{
    /// Sets the handler: it receives one element of the dependency's `Vec<T>` output and the
    /// context. Dependents receive a `Vec` of its outputs, in element order. A skipped
    /// dependency gives the step no tasks, and an empty `Vec` as output.
    #[allow(clippy::type_complexity, reason = "the step's type records all it is")]
    pub fn handler<T, O, F, Fut, ReqIndex, ForbIndex>(
        self,
        handler: F,
    ) -> FnStep<AnyInput, Vec<O>, (S, ()), F, Condition<Req, Forb, Unmet, Exh>>
    where
        S::Output: MapOver<T>,
        T: DeserializeOwned + 'static,
        Vec<O>: StepOutput,
        F: Fn(T, StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, StepError>> + Send + 'static,
        Req: PatternFits<AnyInput, (S, ()), ReqIndex>,
        Forb: PatternFits<AnyInput, (S, ()), ForbIndex>,
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
/// dependents receive (`O`), its dependencies (`Deps`), the closure's own type (`F`, which
/// makes each closure step a distinct type) and its condition (`C`, a [`Condition`], which
/// tells whether it may be skipped). Cheap to clone.
pub struct FnStep<In, O, Deps, F, C = Unconditional> {
    inner: Arc<FnStepInner>,
    _types: PhantomData<Markers<In, O, Deps, F, C>>,
}

/// The type parameters of a [`FnStep`], held as a function pointer so that they do not affect
/// `Send`, `Sync` or drop checking.
type Markers<In, O, Deps, F, C> = fn() -> (In, O, Deps, F, C);

struct FnStepInner {
    shape: StepShape,
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

impl<In, O, Deps, F, C> Clone for FnStep<In, O, Deps, F, C> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            _types: PhantomData,
        }
    }
}

impl<In, O, Deps, F, C> fmt::Debug for FnStep<In, O, Deps, F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnStep")
            .field("shape", &self.inner.shape)
            .finish_non_exhaustive()
    }
}

impl<In, O, Deps, F, C> IntoStep for FnStep<In, O, Deps, F, C>
where
    Self: Step,
{
    type Step = Self;

    fn into_step(self) -> Self {
        self
    }
}

impl<In, O, Deps, F, C> IntoStep for &FnStep<In, O, Deps, F, C>
where
    FnStep<In, O, Deps, F, C>: Step,
{
    type Step = FnStep<In, O, Deps, F, C>;

    fn into_step(self) -> Self::Step {
        self.clone()
    }
}

impl<In, O, Deps, F, C> Step for FnStep<In, O, Deps, F, C>
where
    In: 'static,
    O: StepOutput,
    Deps: crate::Dependencies,
    F: 'static,
    C: ConditionState,
{
    type Output = O;
    type Deps = Deps;
    type Skip = C::Skip;
    type Cascade = C::Cascade;

    fn slug(&self) -> &str {
        &self.inner.shape.slug
    }

    fn kind(&self) -> StepKind {
        self.inner.shape.kind
    }

    fn options(&self) -> StepOptions {
        self.inner.shape.options
    }

    fn dependencies(&self) -> Vec<String> {
        self.inner.shape.dependencies.clone()
    }

    fn shape(&self) -> StepShape {
        self.inner.shape.clone()
    }
}

impl<I, In, O, Deps, F, C> StepOf<I> for FnStep<In, O, Deps, F, C>
where
    In: FitsInput<I> + 'static,
    O: StepOutput,
    Deps: crate::Dependencies,
    F: 'static,
    C: ConditionState,
{
    fn handler(&self) -> Arc<dyn ErasedHandler> {
        Arc::clone(&self.inner.handler)
    }
}

/// [`FnStep`] marker in place of a closure type: a subflow step running a flow whose input is
/// `CI` and completing with the output of the child's step `S`.
#[derive(Debug)]
pub struct SubflowOf<CI, S>(PhantomData<fn() -> (CI, S)>);

/// The child flow of a subflow step takes `CI`, which is what the step's dependency outputs
/// (`Self`).
#[diagnostic::on_unimplemented(
    message = "the child flow takes `{CI}` as its input, but this subflow step's dependency outputs `{Self}`",
    label = "the child flow's input type differs from the dependency's output type",
    note = "a subflow step starts its child run with its dependency's output as the child's input: the child flow's input type must be exactly that output type"
)]
pub trait ChildInput<CI> {}

impl<T> ChildInput<T> for T {}

/// What a worker would call for a subflow step, which no worker runs: the engine starts a
/// child run instead (see `docs/subflows.md`). Reached only if a hostile or confused caller
/// hands a worker such a task.
fn subflow_handler(child: String) -> Arc<dyn ErasedHandler> {
    Arc::new(
        move |_: Value, _: StepContext| -> crate::BoxFuture<'static, Result<Value, StepError>> {
            let error = StepError::new(format!(
                "this is a subflow step: the engine runs it as a child run of flow `{child}`, never a worker"
            ))
            .no_retry();
            Box::pin(std::future::ready(Err(error)))
        },
    )
}

impl<K, C> StepFnBuilder<K, C> {
    fn subflow_step<In, O, Deps, CI, S>(
        mut self,
        kind: StepKind,
        child: &crate::Flow<CI>,
        output: &S,
    ) -> FnStep<In, O, Deps, SubflowOf<CI, S>, C>
    where
        S: Step,
    {
        self.shape.subflow = Some(crate::SubflowShape {
            flow: child.slug().to_owned(),
            output_step: Some(output.slug().to_owned()),
        });
        self.finish(kind, subflow_handler(child.slug().to_owned()))
    }
}

impl<C> StepFnBuilder<Single<()>, C> {
    /// Makes this a subflow step (issue 22): each run starts a child run of `child` with the
    /// flow input, and the step completes with the output of the child's leaf step `output`
    /// (or fails when the child run fails). The child's input type must be this flow's.
    ///
    /// No worker runs the step; the child flow must be compiled before this one, and served
    /// by a worker like any flow. See `docs/subflows.md`.
    ///
    /// ```
    /// use pgflow_core::{Flow, step_fn};
    ///
    /// let total = step_fn("total").handler(|prices: Vec<f64>, _ctx| async move {
    ///     Ok(prices.iter().sum::<f64>())
    /// });
    /// let pricing: Flow<Vec<f64>> = Flow::new("pricing").step(&total).build();
    ///
    /// // Starts a `pricing` run with this flow's input; outputs `total`'s `f64`.
    /// let price = step_fn("price").subflow(&pricing, &total);
    /// let flow: Flow<Vec<f64>> = Flow::new("checkout").step(price).build();
    /// assert_eq!(
    ///     flow.statements()?[2],
    ///     "SELECT pgflow.set_subflow('checkout', 'price', 'pricing', 'total');"
    /// );
    /// # Ok::<(), pgflow_core::Error>(())
    /// ```
    #[allow(clippy::type_complexity, reason = "the step's type records all it is")]
    pub fn subflow<CI, S>(
        self,
        child: &crate::Flow<CI>,
        output: S,
    ) -> FnStep<TakesInput<CI>, crate::RunOutputOf<S::Step>, (), SubflowOf<CI, S::Step>, C>
    where
        S: IntoStep,
    {
        let output = output.into_step();
        self.subflow_step(StepKind::Single, child, &output)
    }
}

impl<D: Step, C> StepFnBuilder<Single<(D, ())>, C> {
    /// Makes this a subflow step whose child run takes the output of its one dependency as
    /// its input: the child flow's input type must be that output type (checked at compile
    /// time). It completes with the output of the child's leaf step `output`.
    ///
    /// ```
    /// use pgflow_core::{Flow, step_fn};
    ///
    /// let double = step_fn("double").handler(|n: u32, _ctx| async move { Ok(n * 2) });
    /// let child: Flow<u32> = Flow::new("doubling").step(&double).build();
    ///
    /// let parse = step_fn("parse").handler(|text: String, _ctx| async move {
    ///     text.parse::<u32>().map_err(Into::into)
    /// });
    /// let doubled = step_fn("doubled").depends_on(&parse).subflow(&child, &double);
    /// let flow: Flow<String> = Flow::new("parse_and_double").step(parse).step(doubled).build();
    /// assert_eq!(flow.statements()?.len(), 4);
    /// # Ok::<(), pgflow_core::Error>(())
    /// ```
    ///
    /// A child whose input type differs from the dependency's output does not compile:
    ///
    /// ```compile_fail
    /// use pgflow_core::{Flow, step_fn};
    ///
    /// let echo = step_fn("echo").handler(|s: String, _ctx| async move { Ok(s) });
    /// let child: Flow<String> = Flow::new("echoing").step(&echo).build();
    /// let count = step_fn("count").handler(|n: u32, _ctx| async move { Ok(n) });
    /// // `count` outputs `u32`; the child takes `String`.
    /// let run = step_fn("run").depends_on(&count).subflow(&child, &echo);
    /// let flow: Flow<u32> = Flow::new("f").step(count).step(run).build();
    /// ```
    #[allow(clippy::type_complexity, reason = "the step's type records all it is")]
    pub fn subflow<CI, S>(
        self,
        child: &crate::Flow<CI>,
        output: S,
    ) -> FnStep<AnyInput, crate::RunOutputOf<S::Step>, (D, ()), SubflowOf<CI, S::Step>, C>
    where
        D::Output: ChildInput<CI>,
        S: IntoStep,
    {
        let output = output.into_step();
        self.subflow_step(StepKind::Single, child, &output)
    }
}

impl<C> StepFnBuilder<MapInput, C> {
    /// Makes this map step a subflow step: one child run of `child` per element of the flow
    /// input (a `Vec` of the child's input type); dependents receive the `Vec` of the
    /// children's `output` step outputs, in element order.
    #[allow(clippy::type_complexity, reason = "the step's type records all it is")]
    pub fn subflow<CI, S>(
        self,
        child: &crate::Flow<CI>,
        output: S,
    ) -> FnStep<TakesInput<Vec<CI>>, Vec<crate::RunOutputOf<S::Step>>, (), SubflowOf<CI, S::Step>, C>
    where
        S: IntoStep,
    {
        let output = output.into_step();
        self.subflow_step(StepKind::Map, child, &output)
    }
}

impl<D: Step, C> StepFnBuilder<MapDependency<D>, C> {
    /// Makes this map step a subflow step: one child run of `child` per element of its
    /// dependency's `Vec` output (elements of the child's input type); dependents receive the
    /// `Vec` of the children's `output` step outputs, in element order.
    ///
    /// ```
    /// use pgflow_core::{Flow, StepKind, step_fn};
    ///
    /// let square = step_fn("square").handler(|n: u64, _ctx| async move { Ok(n * n) });
    /// let squaring: Flow<u64> = Flow::new("squaring").step(&square).build();
    ///
    /// let numbers = step_fn("numbers").handler(|n: u64, _ctx| async move { Ok((1..=n).collect::<Vec<u64>>()) });
    /// let squares = step_fn("squares").map_over(&numbers).subflow(&squaring, &square);
    /// let sum = step_fn("sum")
    ///     .depends_on(&squares)
    ///     .handler(|_: u64, squares: Vec<u64>, _ctx| async move { Ok(squares.iter().sum::<u64>()) });
    /// let flow: Flow<u64> = Flow::new("sum_of_squares").step(numbers).step(squares).step(sum).build();
    /// assert_eq!(flow.find_step("squares").unwrap().kind(), StepKind::Map);
    /// ```
    #[allow(clippy::type_complexity, reason = "the step's type records all it is")]
    pub fn subflow<CI, S>(
        self,
        child: &crate::Flow<CI>,
        output: S,
    ) -> FnStep<AnyInput, Vec<crate::RunOutputOf<S::Step>>, (D, ()), SubflowOf<CI, S::Step>, C>
    where
        D::Output: MapOver<CI>,
        S: IntoStep,
    {
        let output = output.into_step();
        self.subflow_step(StepKind::Map, child, &output)
    }
}

//! Flow definitions in the database: applying a flow's shape, reading it back, and the
//! differences between the two.

use std::fmt;

use pgflow_core::{FlowOptions, FlowShape, SkipMode, StepKind, StepOptions, StepShape};
use serde_json::Value;
use sqlx::{PgConnection, Postgres, Transaction};

use crate::{Error, Result, shape_json};

/// The defaults of `pgflow.create_flow`, which is what an unset flow option becomes.
const DEFAULT_MAX_ATTEMPTS: u32 = FlowOptions::DEFAULT_MAX_ATTEMPTS;
const DEFAULT_BASE_DELAY: u32 = FlowOptions::DEFAULT_BASE_DELAY;
const DEFAULT_TIMEOUT: u32 = FlowOptions::DEFAULT_TIMEOUT;
/// What an unset flow `jitter` is (the default of `pgflow.flows.opt_jitter`).
const DEFAULT_JITTER: bool = FlowOptions::DEFAULT_JITTER;

/// What [`Client::compile`](crate::Client::compile) did.
///
/// ```no_run
/// # async fn demo(client: pgflow_client::Client, flow: pgflow_core::Flow<serde_json::Value>) -> pgflow_client::Result<()> {
/// use pgflow_client::Compiled;
///
/// match client.compile(&flow).await? {
///     Compiled::Created => println!("flow {} created", flow.slug()),
///     Compiled::Unchanged => {}
///     Compiled::Replaced { deleted_runs } => println!("replaced; {deleted_runs} runs deleted"),
///     _ => {}
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compiled {
    /// The flow was not in the database and has been created.
    Created,
    /// The database already held exactly this flow; nothing was changed.
    Unchanged,
    /// The stored definition differed and was replaced (only with a [`Replace`] mode).
    Replaced {
        /// How many runs of the old definition were deleted.
        deleted_runs: u64,
    },
}

/// How [`Client::compile_replacing`](crate::Client::compile_replacing) treats a stored flow
/// that differs from the one being compiled.
///
/// ```no_run
/// # async fn demo(client: pgflow_client::Client, flow: pgflow_core::Flow<serde_json::Value>) -> pgflow_client::Result<()> {
/// use pgflow_client::{Error, Replace};
///
/// match client.compile_replacing(&flow, Replace::IfNoRuns).await {
///     Ok(compiled) => println!("{compiled:?}"),
///     Err(Error::FlowHasRuns { runs, .. }) => eprintln!("kept: {runs} runs use the old one"),
///     Err(err) => return Err(err),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Replace {
    /// Recreate the definition only if the flow has no runs; otherwise fail.
    IfNoRuns,
    /// Delete every run of the flow (their tasks, states and queued messages), then recreate
    /// the definition. Data loss, on purpose.
    DeletingRuns,
}

/// One difference between a stored flow definition and the one being compiled.
///
/// Displayed, each says in plain words what changed:
///
/// ```
/// use pgflow_client::Difference;
///
/// let difference = Difference::DependenciesChanged {
///     step: "fetch".into(),
///     stored: vec!["urls".into()],
///     compiled: vec!["robots".into(), "urls".into()],
/// };
/// assert_eq!(difference.to_string(), "step `fetch` depends on [robots, urls] instead of [urls]");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Difference {
    /// A step the database does not have.
    StepAdded {
        /// Slug of the new step.
        step: String,
    },
    /// A step the database has and the flow does not.
    StepRemoved {
        /// Slug of the missing step.
        step: String,
    },
    /// A step at another position in the order of definition.
    StepMoved {
        /// Slug of the step.
        step: String,
        /// Its position in the database.
        stored: usize,
        /// Its position in the flow.
        compiled: usize,
    },
    /// A step's kind (single or map) differs.
    KindChanged {
        /// Slug of the step.
        step: String,
        /// Kind in the database.
        stored: StepKind,
        /// Kind in the flow.
        compiled: StepKind,
    },
    /// A step's dependencies differ.
    DependenciesChanged {
        /// Slug of the step.
        step: String,
        /// Dependencies in the database, sorted.
        stored: Vec<String>,
        /// Dependencies in the flow, sorted.
        compiled: Vec<String>,
    },
    /// An option differs; `step` is `None` for a flow-level option. `None` values mean unset
    /// (a step's is inherited from the flow; a flow's `max_delay` is no cap).
    OptionChanged {
        /// The step, or `None` for the flow itself.
        step: Option<String>,
        /// The option's name, as in `add_step` or `set_retry_policy` (`max_delay`).
        option: &'static str,
        /// The stored value.
        stored: Option<u32>,
        /// The compiled value.
        compiled: Option<u32>,
    },
    /// A step's condition differs: the pattern its input must contain
    /// (`required_input_pattern`) or must not contain (`forbidden_input_pattern`). `None`: no
    /// such pattern.
    ///
    /// ```
    /// use pgflow_client::Difference;
    /// use serde_json::json;
    ///
    /// let difference = Difference::ConditionChanged {
    ///     step: "notify".into(),
    ///     condition: "required_input_pattern",
    ///     stored: None,
    ///     compiled: Some(json!({"charge": {"paid": true}})),
    /// };
    /// assert_eq!(
    ///     difference.to_string(),
    ///     r#"step `notify` required_input_pattern is {"charge":{"paid":true}} instead of unset"#
    /// );
    /// ```
    ConditionChanged {
        /// Slug of the step.
        step: String,
        /// `required_input_pattern` or `forbidden_input_pattern`, as in `add_step`.
        condition: &'static str,
        /// The stored pattern.
        stored: Option<Value>,
        /// The compiled pattern.
        compiled: Option<Value>,
    },
    /// A step's `when_unmet` or `when_exhausted` differs.
    ModeChanged {
        /// Slug of the step.
        step: String,
        /// `when_unmet` or `when_exhausted`, as in `add_step`.
        mode: &'static str,
        /// The stored mode.
        stored: SkipMode,
        /// The compiled mode.
        compiled: SkipMode,
    },
    /// A difference in the structure that the database's comparison
    /// (`pgflow._compare_flow_shapes`) found and no other variant describes, in its words:
    /// one this client does not model (a newer engine's, say).
    Structure {
        /// The database's sentence, e.g. `Step at index 1: type differs 'map' vs 'single'`.
        text: String,
    },
    /// An on-or-off option differs (`jitter`, of `set_retry_policy`); `step` is `None` for the
    /// flow's. `None` values mean unset: a step's is inherited from the flow (a flow's compares
    /// as [`FlowOptions::DEFAULT_JITTER`], so it is never `None` here).
    ///
    /// ```
    /// use pgflow_client::Difference;
    ///
    /// let difference = Difference::FlagChanged {
    ///     step: Some("fetch".into()),
    ///     option: "jitter",
    ///     stored: None,
    ///     compiled: Some(true),
    /// };
    /// assert_eq!(difference.to_string(), "step `fetch` option jitter is true instead of unset");
    /// ```
    FlagChanged {
        /// The step, or `None` for the flow itself.
        step: Option<String>,
        /// The option's name, as in `set_retry_policy`.
        option: &'static str,
        /// The stored value.
        stored: Option<bool>,
        /// The compiled value.
        compiled: Option<bool>,
    },
    /// What a subflow step runs differs (issue 22): its child flow, or the child's step it
    /// completes with, each written `flow` or `flow.step`; `None`: not a subflow step.
    ///
    /// ```
    /// use pgflow_client::Difference;
    ///
    /// let difference = Difference::SubflowChanged {
    ///     step: "pay".into(),
    ///     stored: None,
    ///     compiled: Some("charge.receipt".into()),
    /// };
    /// assert_eq!(difference.to_string(), "step `pay` runs charge.receipt instead of its handler");
    /// ```
    SubflowChanged {
        /// Slug of the step.
        step: String,
        /// The stored child, `flow.output_step`.
        stored: Option<String>,
        /// The compiled child.
        compiled: Option<String>,
    },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// "step `s` option o is 2 instead of 1", or "flow option o is ...".
        fn changed<T: fmt::Display>(
            f: &mut fmt::Formatter<'_>,
            step: Option<&String>,
            option: &str,
            stored: Option<&T>,
            compiled: Option<&T>,
        ) -> fmt::Result {
            let value = |v: Option<&T>| v.map_or_else(|| "unset".to_string(), T::to_string);
            match step {
                Some(step) => write!(f, "step `{step}` option {option}")?,
                None => write!(f, "flow option {option}")?,
            }
            write!(f, " is {} instead of {}", value(compiled), value(stored))
        }
        match self {
            Self::StepAdded { step } => write!(f, "step `{step}` is new"),
            Self::StepRemoved { step } => write!(f, "step `{step}` is no longer in the flow"),
            Self::StepMoved {
                step,
                stored,
                compiled,
            } => write!(
                f,
                "step `{step}` moved from position {stored} to position {compiled}"
            ),
            Self::KindChanged {
                step,
                stored,
                compiled,
            } => write!(
                f,
                "step `{step}` changed from a {stored} step to a {compiled} step"
            ),
            Self::DependenciesChanged {
                step,
                stored,
                compiled,
            } => write!(
                f,
                "step `{step}` depends on [{}] instead of [{}]",
                compiled.join(", "),
                stored.join(", ")
            ),
            Self::OptionChanged {
                step,
                option,
                stored,
                compiled,
            } => changed(f, step.as_ref(), option, stored.as_ref(), compiled.as_ref()),
            Self::FlagChanged {
                step,
                option,
                stored,
                compiled,
            } => changed(f, step.as_ref(), option, stored.as_ref(), compiled.as_ref()),
            Self::ConditionChanged {
                step,
                condition,
                stored,
                compiled,
            } => {
                let value =
                    |v: &Option<Value>| v.as_ref().map_or_else(|| "unset".into(), Value::to_string);
                write!(
                    f,
                    "step `{step}` {condition} is {} instead of {}",
                    value(compiled),
                    value(stored)
                )
            }
            Self::ModeChanged {
                step,
                mode,
                stored,
                compiled,
            } => write!(f, "step `{step}` {mode} is {compiled} instead of {stored}"),
            Self::Structure { text } => f.write_str(text),
            Self::SubflowChanged {
                step,
                stored,
                compiled,
            } => {
                let value = |v: &Option<String>| v.clone().unwrap_or_else(|| "its handler".into());
                write!(
                    f,
                    "step `{step}` runs {} instead of {}",
                    value(compiled),
                    value(stored)
                )
            }
        }
    }
}

impl Difference {
    /// Whether it is a difference of structure (steps, their order, kinds, dependencies,
    /// conditions and modes), which the database's comparison decides, rather than of options.
    fn is_structural(&self) -> bool {
        // The database's comparison (0011) does not know subflows: a subflow difference is
        // this client's, reported like an option's.
        !matches!(
            self,
            Self::OptionChanged { .. } | Self::FlagChanged { .. } | Self::SubflowChanged { .. }
        )
    }
}

/// The differences between a stored shape and a compiled one, in a stable order: flow options,
/// then steps in the compiled order, then removed steps.
///
/// Unset flow options compare as the engine's defaults (`timeout` 60 here; no `max_delay`
/// cap, [`FlowOptions::DEFAULT_JITTER`]):
///
/// ```
/// use pgflow_client::{Difference, differences};
/// use pgflow_core::{FlowOptions, FlowShape, StepShape};
///
/// let stored = FlowShape {
///     slug: "crawl".into(),
///     options: FlowOptions::new(),
///     steps: vec![StepShape::new("urls")],
/// };
/// let compiled = FlowShape {
///     options: FlowOptions::new().timeout(120),
///     steps: vec![StepShape::new("urls"), StepShape::new("fetch")],
///     ..stored.clone()
/// };
/// assert_eq!(
///     differences(&stored, &compiled),
///     [
///         Difference::OptionChanged {
///             step: None,
///             option: "timeout",
///             stored: Some(60),
///             compiled: Some(120),
///         },
///         Difference::StepAdded { step: "fetch".into() },
///     ]
/// );
/// ```
pub fn differences(stored: &FlowShape, compiled: &FlowShape) -> Vec<Difference> {
    let mut out = Vec::new();
    let flow_options = |o: &FlowOptions| {
        [
            (
                "max_attempts",
                o.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
            ),
            ("base_delay", o.base_delay.unwrap_or(DEFAULT_BASE_DELAY)),
            ("timeout", o.timeout.unwrap_or(DEFAULT_TIMEOUT)),
        ]
    };
    for ((option, old), (_, new)) in flow_options(&stored.options)
        .into_iter()
        .zip(flow_options(&compiled.options))
    {
        if old != new {
            out.push(Difference::OptionChanged {
                step: None,
                option,
                stored: Some(old),
                compiled: Some(new),
            });
        }
    }
    // The flow's jitter is never unset in the database: unset compares as its default.
    let flow_policy = |o: &FlowOptions| (o.max_delay, Some(o.jitter.unwrap_or(DEFAULT_JITTER)));
    retry_policy_differences(
        None,
        flow_policy(&stored.options),
        flow_policy(&compiled.options),
        &mut out,
    );
    for (position, step) in compiled.steps.iter().enumerate() {
        let Some((stored_position, old)) = stored
            .steps
            .iter()
            .enumerate()
            .find(|(_, s)| s.slug == step.slug)
        else {
            out.push(Difference::StepAdded {
                step: step.slug.clone(),
            });
            continue;
        };
        if stored_position != position {
            out.push(Difference::StepMoved {
                step: step.slug.clone(),
                stored: stored_position,
                compiled: position,
            });
        }
        step_differences(old, step, &mut out);
    }
    for step in &stored.steps {
        if !compiled.steps.iter().any(|s| s.slug == step.slug) {
            out.push(Difference::StepRemoved {
                step: step.slug.clone(),
            });
        }
    }
    out
}

fn step_differences(stored: &StepShape, compiled: &StepShape, out: &mut Vec<Difference>) {
    let child = |shape: &StepShape| {
        shape.subflow.as_ref().map(|s| match &s.output_step {
            Some(output) => format!("{}.{output}", s.flow),
            None => s.flow.clone(),
        })
    };
    if child(stored) != child(compiled) {
        out.push(Difference::SubflowChanged {
            step: compiled.slug.clone(),
            stored: child(stored),
            compiled: child(compiled),
        });
    }
    if stored.kind != compiled.kind {
        out.push(Difference::KindChanged {
            step: compiled.slug.clone(),
            stored: stored.kind,
            compiled: compiled.kind,
        });
    }
    let sorted = |deps: &[String]| {
        let mut deps = deps.to_vec();
        deps.sort();
        deps
    };
    let (old_deps, new_deps) = (sorted(&stored.dependencies), sorted(&compiled.dependencies));
    if old_deps != new_deps {
        out.push(Difference::DependenciesChanged {
            step: compiled.slug.clone(),
            stored: old_deps,
            compiled: new_deps,
        });
    }
    for (condition, old, new) in [
        (
            "required_input_pattern",
            &stored.required_input_pattern,
            &compiled.required_input_pattern,
        ),
        (
            "forbidden_input_pattern",
            &stored.forbidden_input_pattern,
            &compiled.forbidden_input_pattern,
        ),
    ] {
        if old != new {
            out.push(Difference::ConditionChanged {
                step: compiled.slug.clone(),
                condition,
                stored: old.clone(),
                compiled: new.clone(),
            });
        }
    }
    for (mode, old, new) in [
        ("when_unmet", stored.when_unmet, compiled.when_unmet),
        (
            "when_exhausted",
            stored.when_exhausted,
            compiled.when_exhausted,
        ),
    ] {
        if old != new {
            out.push(Difference::ModeChanged {
                step: compiled.slug.clone(),
                mode,
                stored: old,
                compiled: new,
            });
        }
    }
    let options = |o: &StepOptions| {
        [
            ("max_attempts", o.max_attempts),
            ("base_delay", o.base_delay),
            ("timeout", o.timeout),
            ("start_delay", o.start_delay),
        ]
    };
    for ((option, old), (_, new)) in options(&stored.options)
        .into_iter()
        .zip(options(&compiled.options))
    {
        if old != new {
            out.push(Difference::OptionChanged {
                step: Some(compiled.slug.clone()),
                option,
                stored: old,
                compiled: new,
            });
        }
    }
    let policy = |o: &StepOptions| (o.max_delay, o.jitter);
    retry_policy_differences(
        Some(&compiled.slug),
        policy(&stored.options),
        policy(&compiled.options),
        out,
    );
}

/// The differences in `max_delay` and `jitter`, each `(max_delay, jitter)`, of the flow
/// (`step` `None`) or of a step.
fn retry_policy_differences(
    step: Option<&String>,
    (old_cap, old_jitter): (Option<u32>, Option<bool>),
    (new_cap, new_jitter): (Option<u32>, Option<bool>),
    out: &mut Vec<Difference>,
) {
    if old_cap != new_cap {
        out.push(Difference::OptionChanged {
            step: step.cloned(),
            option: "max_delay",
            stored: old_cap,
            compiled: new_cap,
        });
    }
    if old_jitter != new_jitter {
        out.push(Difference::FlagChanged {
            step: step.cloned(),
            option: "jitter",
            stored: old_jitter,
            compiled: new_jitter,
        });
    }
}

/// A row of `pgflow.steps`, with its dependencies, as [`stored_shape`] reads it.
#[derive(sqlx::FromRow)]
struct StepRow {
    step_slug: String,
    step_type: String,
    opt_max_attempts: Option<i32>,
    opt_base_delay: Option<i32>,
    opt_timeout: Option<i32>,
    opt_start_delay: Option<i32>,
    opt_max_delay: Option<i32>,
    opt_jitter: Option<bool>,
    deps: Vec<String>,
    required_input_pattern: Option<Value>,
    forbidden_input_pattern: Option<Value>,
    when_unmet: String,
    when_exhausted: String,
    child_flow_slug: Option<String>,
    output_step: Option<String>,
}

/// Reads a flow's stored shape, or `None` when the database has no such flow.
///
/// The flow's options are all set, as stored, but for its retry policy: `max_delay` is unset
/// when the flow has no cap, and `jitter` when it is off (the default), so that a flow that
/// has none reads as before migration 0007.
pub(crate) async fn stored_shape(conn: &mut PgConnection, slug: &str) -> Result<Option<FlowShape>> {
    let flow: Option<(i32, i32, i32, Option<i32>, bool)> = sqlx::query_as(
        "SELECT opt_max_attempts, opt_base_delay, opt_timeout, opt_max_delay, opt_jitter
           FROM pgflow.flows WHERE flow_slug = $1",
    )
    .bind(slug)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((max_attempts, base_delay, timeout, max_delay, jitter)) = flow else {
        return Ok(None);
    };
    let rows: Vec<StepRow> = sqlx::query_as(
        "SELECT s.step_slug, s.step_type, s.opt_max_attempts, s.opt_base_delay, s.opt_timeout,
                s.opt_start_delay, s.opt_max_delay, s.opt_jitter,
                coalesce(array_agg(d.dep_slug ORDER BY d.dep_slug) FILTER (WHERE d.dep_slug IS NOT NULL), '{}')
                  AS deps,
                s.required_input_pattern, s.forbidden_input_pattern, s.when_unmet, s.when_exhausted,
                sf.child_flow_slug, sf.output_step
           FROM pgflow.steps s
           LEFT JOIN pgflow.deps d ON d.flow_slug = s.flow_slug AND d.step_slug = s.step_slug
           LEFT JOIN pgflow_ext.subflow_steps sf
             ON sf.flow_slug = s.flow_slug AND sf.step_slug = s.step_slug
          WHERE s.flow_slug = $1
          GROUP BY s.flow_slug, s.step_slug, sf.child_flow_slug, sf.output_step
          ORDER BY s.step_index",
    )
    .bind(slug)
    .fetch_all(&mut *conn)
    .await?;
    let to_u32 = |v: i32| u32::try_from(v).unwrap_or(0);
    let mut steps = Vec::with_capacity(rows.len());
    for row in rows {
        // The table's CHECKs admit the three modes alone; another is pgflow_core's error.
        let mode = |text: &str| text.parse::<SkipMode>();
        steps.push(StepShape {
            kind: if row.step_type == "map" {
                StepKind::Map
            } else {
                StepKind::Single
            },
            dependencies: row.deps,
            options: StepOptions {
                max_attempts: row.opt_max_attempts.map(to_u32),
                base_delay: row.opt_base_delay.map(to_u32),
                timeout: row.opt_timeout.map(to_u32),
                start_delay: row.opt_start_delay.map(to_u32),
                max_delay: row.opt_max_delay.map(to_u32),
                jitter: row.opt_jitter,
            },
            required_input_pattern: row.required_input_pattern,
            forbidden_input_pattern: row.forbidden_input_pattern,
            when_unmet: mode(&row.when_unmet)?,
            when_exhausted: mode(&row.when_exhausted)?,
            subflow: row.child_flow_slug.map(|flow| pgflow_core::SubflowShape {
                flow,
                output_step: row.output_step,
            }),
            ..StepShape::new(row.step_slug.clone())
        });
    }
    Ok(Some(FlowShape {
        slug: slug.to_string(),
        options: FlowOptions {
            max_attempts: Some(to_u32(max_attempts)),
            base_delay: Some(to_u32(base_delay)),
            timeout: Some(to_u32(timeout)),
            max_delay: max_delay.map(to_u32),
            jitter: (jitter != DEFAULT_JITTER).then_some(jitter),
        },
        steps,
    }))
}

/// Fails with [`Error::FlowSlugCollision`] when another flow's slug equals `slug` but for case:
/// pgmq names a queue's table after the lowercased name, so the two would share one queue.
/// (`pgflow.create_flow` refuses such a flow too; checking here first gives the typed error,
/// and protects the other flow's queue when this one is replaced.)
async fn refuse_case_twin(conn: &mut PgConnection, slug: &str) -> Result<()> {
    let twin: Option<String> = sqlx::query_scalar(
        "SELECT flow_slug FROM pgflow.flows
          WHERE lower(flow_slug) = lower($1) AND flow_slug <> $1
          ORDER BY flow_slug LIMIT 1",
    )
    .bind(slug)
    .fetch_optional(&mut *conn)
    .await?;
    match twin {
        Some(existing) => Err(Error::FlowSlugCollision {
            flow: slug.to_string(),
            existing,
        }),
        None => Ok(()),
    }
}

/// Creates a flow from its shape with `pgflow._create_flow_from_shape` (migration 0011), the
/// function `pgflow.ensure_flow_compiled` creates flows with: [`shape_json`] bound, nothing
/// spliced. The caller holds `pgflow._lock_flow_definition`.
pub(crate) async fn create(tx: &mut Transaction<'_, Postgres>, shape: &FlowShape) -> Result<()> {
    refuse_case_twin(tx, &shape.slug).await?;
    sqlx::query("SELECT pgflow._create_flow_from_shape($1, $2)")
        .bind(&shape.slug)
        .bind(shape_json(shape))
        .execute(&mut **tx)
        .await?;
    // Subflow steps (migration 0016), which the shape JSON of 0011 does not carry.
    for step in &shape.steps {
        if let Some(subflow) = &step.subflow {
            sqlx::query("SELECT pgflow.set_subflow($1, $2, $3, $4)")
                .bind(&shape.slug)
                .bind(&step.slug)
                .bind(&subflow.flow)
                .bind(&subflow.output_step)
                .execute(&mut **tx)
                .await?;
        }
    }
    Ok(())
}

/// One step's stored limits: step, max_concurrent, concurrency_key, rate_max_starts, rate
/// period in whole seconds, rate_key.
type LimitRow = (
    String,
    Option<i32>,
    Option<String>,
    Option<i32>,
    Option<i32>,
    Option<String>,
);

/// Makes the stored limits of `shape`'s steps (migration 0014) those of `shape`, in place:
/// limits are tuned, not drift, so a changed limit never asks for the flow to be replaced.
/// Only steps whose limits differ are written, so a compile that changes nothing writes
/// nothing; a role that may not read the limits (not the owner) is left alone unless `shape`
/// sets some, which it then may not set either, and is told so by the engine.
pub(crate) async fn sync_limits(
    tx: &mut Transaction<'_, Postgres>,
    shape: &FlowShape,
) -> Result<()> {
    // A schema from before migration 0014 has no limits to read (and none to set).
    let readable: bool = sqlx::query_scalar(
        "SELECT CASE WHEN to_regclass('pgflow_ext.step_limits') IS NULL THEN false
                     ELSE has_table_privilege('pgflow_ext.step_limits', 'SELECT') END",
    )
    .fetch_one(&mut **tx)
    .await?;
    let wanted = shape.steps.iter().any(|step| !step.limits.is_empty());
    if !readable && !wanted {
        return Ok(());
    }
    let stored: Vec<LimitRow> = if readable {
        sqlx::query_as(
            "SELECT step_slug, max_concurrent, concurrency_key, rate_max_starts,
                    extract(epoch FROM rate_period)::integer, rate_key
               FROM pgflow_ext.step_limits WHERE flow_slug = $1",
        )
        .bind(&shape.slug)
        .fetch_all(&mut **tx)
        .await?
    } else {
        Vec::new()
    };
    for step in &shape.steps {
        let row = stored.iter().find(|row| row.0 == step.slug);
        let concurrency = step
            .limits
            .concurrency
            .as_ref()
            .map(|c| (i32::try_from(c.max).unwrap_or(i32::MAX), c.key.clone()));
        let stored_concurrency = row.and_then(|r| r.1.map(|max| (max, r.2.clone())));
        if concurrency != stored_concurrency {
            sqlx::query("SELECT pgflow.set_concurrency_limit($1, $2, $3, $4)")
                .bind(&shape.slug)
                .bind(&step.slug)
                .bind(concurrency.as_ref().map(|c| c.0))
                .bind(concurrency.and_then(|c| c.1))
                .execute(&mut **tx)
                .await?;
        }
        let rate = step.limits.rate.as_ref().map(|r| {
            (
                i32::try_from(r.max_starts).unwrap_or(i32::MAX),
                i32::try_from(r.per_seconds).unwrap_or(i32::MAX),
                r.key.clone(),
            )
        });
        let stored_rate = row.and_then(|r| match (r.3, r.4) {
            (Some(max), Some(per)) => Some((max, per, r.5.clone())),
            _ => None,
        });
        if rate != stored_rate {
            sqlx::query("SELECT pgflow.set_rate_limit($1, $2, $3, make_interval(secs => $4), $5)")
                .bind(&shape.slug)
                .bind(&step.slug)
                .bind(rate.as_ref().map(|r| r.0))
                .bind(rate.as_ref().map(|r| f64::from(r.1)))
                .bind(rate.and_then(|r| r.2))
                .execute(&mut **tx)
                .await?;
        }
    }
    Ok(())
}

/// The differences between the stored definition of `shape`'s flow and `shape`, the verdict
/// on its structure being the database's: `pgflow._compare_flow_shapes` of [`shape_json`] and
/// `pgflow._get_flow_shape`, which a TypeScript worker's `ensure_flow_compiled` reaches too.
///
/// Listed as [`differences`] words them when the database finds a structural difference (and
/// in the database's own words, [`Difference::Structure`], should this client describe none
/// of it); the option differences, which the database does not compare, always.
pub(crate) async fn drift(
    conn: &mut PgConnection,
    stored: &FlowShape,
    shape: &FlowShape,
) -> Result<Vec<Difference>> {
    let verdict: Vec<String> =
        sqlx::query_scalar("SELECT pgflow._compare_flow_shapes($1, pgflow._get_flow_shape($2))")
            .bind(shape_json(shape))
            .bind(&shape.slug)
            .fetch_one(&mut *conn)
            .await?;
    Ok(reconcile(differences(stored, shape), verdict))
}

/// [`drift`]'s list from this client's `typed` differences and the database's `verdict`.
fn reconcile(typed: Vec<Difference>, verdict: Vec<String>) -> Vec<Difference> {
    let structural = !verdict.is_empty();
    if !structural && typed.iter().any(Difference::is_structural) {
        tracing::warn!(
            ?typed,
            "the database finds the flow's structure unchanged where this client does not; \
             the database's verdict holds"
        );
    }
    let mut out: Vec<Difference> = typed
        .into_iter()
        .filter(|d| structural || !d.is_structural())
        .collect();
    if structural && !out.iter().any(Difference::is_structural) {
        out.extend(
            verdict
                .into_iter()
                .map(|text| Difference::Structure { text }),
        );
    }
    out
}

/// Deletes a flow's definition, and its runs when `delete_runs`, with
/// `pgflow._delete_flow_data` (migration 0011) for a flow created again in the same
/// transaction: its queue stays, emptied, with the grants of the worker roles serving it,
/// and so do its schedules. Returns the runs deleted. Fails with [`Error::FlowHasRuns`] when
/// it has runs and `delete_runs` is false.
pub(crate) async fn delete(
    tx: &mut Transaction<'_, Postgres>,
    slug: &str,
    delete_runs: bool,
) -> Result<u64> {
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.runs WHERE flow_slug = $1")
        .bind(slug)
        .fetch_one(&mut **tx)
        .await?;
    if runs > 0 && !delete_runs {
        return Err(Error::FlowHasRuns {
            flow: slug.to_string(),
            runs: u64::try_from(runs).unwrap_or(0),
        });
    }
    let deleted: Option<i32> = sqlx::query_scalar("SELECT pgflow._delete_flow_data($1, true)")
        .bind(slug)
        .fetch_one(&mut **tx)
        .await?;
    Ok(deleted.map_or(0, |n| u64::try_from(n).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(steps: Vec<StepShape>) -> FlowShape {
        FlowShape {
            slug: "f".into(),
            options: FlowOptions::new(),
            steps,
        }
    }

    fn dep(slug: &str, deps: &[&str]) -> StepShape {
        StepShape {
            dependencies: deps.iter().map(|d| d.to_string()).collect(),
            ..StepShape::new(slug)
        }
    }

    #[test]
    fn unset_flow_options_equal_the_engine_defaults() {
        let mut stored = shape(vec![]);
        stored.options = FlowOptions::new().max_attempts(3).base_delay(5).timeout(60);
        assert!(differences(&stored, &shape(vec![])).is_empty());
    }

    #[test]
    fn every_kind_of_change_is_named() {
        let stored = shape(vec![dep("a", &[]), dep("b", &["a"]), dep("c", &["a"])]);
        let mut compiled = shape(vec![dep("b", &[]), dep("a", &[]), dep("d", &["a"])]);
        compiled.options = FlowOptions::new().timeout(10);
        compiled.steps[1].kind = StepKind::Map;
        compiled.steps[1].options = StepOptions::new().max_attempts(7);
        let text: Vec<String> = differences(&stored, &compiled)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            text,
            [
                "flow option timeout is 10 instead of 60",
                "step `b` moved from position 1 to position 0",
                "step `b` depends on [] instead of [a]",
                "step `a` moved from position 0 to position 1",
                "step `a` changed from a single step to a map step",
                "step `a` option max_attempts is 7 instead of unset",
                "step `d` is new",
                "step `c` is no longer in the flow",
            ]
        );
    }

    #[test]
    fn the_databases_verdict_decides_the_structure() {
        let option = Difference::OptionChanged {
            step: None,
            option: "timeout",
            stored: Some(60),
            compiled: Some(10),
        };
        let added = Difference::StepAdded { step: "b".into() };
        // The database finds no structural change: the option alone is drift.
        let option_alone = reconcile(vec![option.clone(), added.clone()], vec![]);
        assert_eq!(option_alone, std::slice::from_ref(&option));
        // It finds one this client describes: in the client's words.
        assert_eq!(
            reconcile(
                vec![option.clone(), added.clone()],
                vec!["Step count differs: 2 vs 1".into()]
            ),
            [option.clone(), added]
        );
        // One this client does not model: in the database's words.
        let text = "Step at index 0: queue differs 'a' vs 'b'";
        let reconciled = reconcile(vec![option.clone()], vec![text.into()]);
        assert_eq!(
            reconciled,
            [option, Difference::Structure { text: text.into() }]
        );
        assert_eq!(reconciled[1].to_string(), text);
    }

    #[test]
    fn a_changed_retry_policy_is_a_difference() {
        // Unset compares as the defaults: no cap, no jitter.
        let mut stored = shape(vec![dep("a", &[])]);
        stored.options = FlowOptions::new().max_attempts(3).base_delay(5).timeout(60);
        let mut compiled = shape(vec![dep("a", &[])]);
        compiled.options = FlowOptions::new().jitter(false);
        assert!(differences(&stored, &compiled).is_empty());

        compiled.options = FlowOptions::new().max_delay(30).jitter(true);
        compiled.steps[0].options = StepOptions::new().max_delay(5).jitter(false);
        let text: Vec<String> = differences(&stored, &compiled)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            text,
            [
                "flow option max_delay is 30 instead of unset",
                "flow option jitter is true instead of false",
                "step `a` option max_delay is 5 instead of unset",
                "step `a` option jitter is false instead of unset",
            ]
        );
        assert_eq!(
            differences(&compiled, &stored)[1],
            Difference::FlagChanged {
                step: None,
                option: "jitter",
                stored: Some(true),
                compiled: Some(false),
            }
        );
        assert!(differences(&compiled, &compiled.clone()).is_empty());
    }
}

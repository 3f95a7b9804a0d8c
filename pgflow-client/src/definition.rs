//! Flow definitions in the database: applying a flow's shape, reading it back, and the
//! differences between the two.

use std::fmt;

use pgflow_core::{FlowOptions, FlowShape, StepKind, StepOptions, StepShape};
use sqlx::{PgConnection, Postgres, Transaction};

use crate::{Error, Result};

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
        }
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
    type StepRow = (
        String,
        String,
        Option<i32>,
        Option<i32>,
        Option<i32>,
        Option<i32>,
        Option<i32>,
        Option<bool>,
        Vec<String>,
    );
    let rows: Vec<StepRow> = sqlx::query_as(
        "SELECT s.step_slug, s.step_type, s.opt_max_attempts, s.opt_base_delay, s.opt_timeout,
                s.opt_start_delay, s.opt_max_delay, s.opt_jitter,
                coalesce(array_agg(d.dep_slug ORDER BY d.dep_slug) FILTER (WHERE d.dep_slug IS NOT NULL), '{}')
           FROM pgflow.steps s
           LEFT JOIN pgflow.deps d ON d.flow_slug = s.flow_slug AND d.step_slug = s.step_slug
          WHERE s.flow_slug = $1
          GROUP BY s.flow_slug, s.step_slug
          ORDER BY s.step_index",
    )
    .bind(slug)
    .fetch_all(&mut *conn)
    .await?;
    let to_u32 = |v: i32| u32::try_from(v).unwrap_or(0);
    let steps = rows
        .into_iter()
        .map(
            |(
                slug,
                kind,
                max_attempts,
                base_delay,
                timeout,
                start_delay,
                max_delay,
                jitter,
                deps,
            )| StepShape {
                kind: if kind == "map" {
                    StepKind::Map
                } else {
                    StepKind::Single
                },
                dependencies: deps,
                options: StepOptions {
                    max_attempts: max_attempts.map(to_u32),
                    base_delay: base_delay.map(to_u32),
                    timeout: timeout.map(to_u32),
                    start_delay: start_delay.map(to_u32),
                    max_delay: max_delay.map(to_u32),
                    jitter,
                },
                ..StepShape::new(slug)
            },
        )
        .collect();
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

/// Applies a shape with `create_flow`/`add_step`, every value bound rather than spliced.
pub(crate) async fn create(tx: &mut Transaction<'_, Postgres>, shape: &FlowShape) -> Result<()> {
    refuse_case_twin(tx, &shape.slug).await?;
    let to_i32 = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    sqlx::query("SELECT pgflow.create_flow($1, $2, $3, $4)")
        .bind(&shape.slug)
        .bind(to_i32(
            shape.options.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
        ))
        .bind(to_i32(
            shape.options.base_delay.unwrap_or(DEFAULT_BASE_DELAY),
        ))
        .bind(to_i32(shape.options.timeout.unwrap_or(DEFAULT_TIMEOUT)))
        .execute(&mut **tx)
        .await?;
    for step in &shape.steps {
        sqlx::query("SELECT pgflow.add_step($1, $2, $3, $4, $5, $6, $7, $8)")
            .bind(&shape.slug)
            .bind(&step.slug)
            .bind(&step.dependencies)
            .bind(step.options.max_attempts.map(to_i32))
            .bind(step.options.base_delay.map(to_i32))
            .bind(step.options.timeout.map(to_i32))
            .bind(step.options.start_delay.map(to_i32))
            .bind(step.kind.as_str())
            .execute(&mut **tx)
            .await?;
    }
    // As `FlowShape::statements` writes it: the flow's policy, then each step's, only those set.
    if let Some((max_delay, jitter)) = shape.options.retry_policy() {
        set_retry_policy(tx, &shape.slug, None, max_delay, jitter).await?;
    }
    for step in &shape.steps {
        if let Some((max_delay, jitter)) = step.options.retry_policy() {
            set_retry_policy(tx, &shape.slug, Some(&step.slug), max_delay, jitter).await?;
        }
    }
    Ok(())
}

/// `pgflow.set_retry_policy` (migration 0007), its values bound.
async fn set_retry_policy(
    tx: &mut Transaction<'_, Postgres>,
    flow: &str,
    step: Option<&str>,
    max_delay: Option<u32>,
    jitter: Option<bool>,
) -> Result<()> {
    sqlx::query("SELECT pgflow.set_retry_policy($1, $2, $3, $4)")
        .bind(flow)
        .bind(step)
        .bind(max_delay.map(|v| i32::try_from(v).unwrap_or(i32::MAX)))
        .bind(jitter)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Deletes a flow's definition, and its runs when `delete_runs`; returns the runs deleted.
/// Fails with [`Error::FlowHasRuns`] when it has runs and `delete_runs` is false.
pub(crate) async fn delete(
    tx: &mut Transaction<'_, Postgres>,
    slug: &str,
    delete_runs: bool,
) -> Result<u64> {
    // Purging this flow's queue would purge its twin's: the same table.
    refuse_case_twin(tx, slug).await?;
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
    for table in [
        "step_tasks",
        "step_states",
        "runs",
        "deps",
        "steps",
        "flows",
    ] {
        sqlx::query(&format!("DELETE FROM pgflow.{table} WHERE flow_slug = $1"))
            .bind(slug)
            .execute(&mut **tx)
            .await?;
    }
    // The queue keeps its name (= the flow slug); its messages belonged to the deleted runs.
    sqlx::query("SELECT pgmq.purge_queue($1) FROM pgmq.list_queues() q WHERE q.queue_name = $1")
        .bind(slug)
        .execute(&mut **tx)
        .await?;
    Ok(u64::try_from(runs).unwrap_or(0))
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

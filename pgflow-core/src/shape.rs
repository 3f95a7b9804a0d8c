//! A flow's shape: slugs, kinds, dependencies and options, without handlers. It is what the
//! engine stores, what compiles to SQL, and what is compared to detect drift.

use std::collections::HashSet;
use std::fmt::{self, Write as _};

use serde::{Deserialize, Serialize};

use crate::options::option_problem;
use crate::slug::check_flow_slug;
use crate::{Error, FlowOptions, Result, SkipMode, StepLimits, StepOptions, check_slug};

/// How a step runs: once per run, or once per element of an array.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepKind {
    /// One task per run (the engine's `step_type` `'single'`).
    #[default]
    Single,
    /// One task per element of the array it maps over: its single dependency's output, or the
    /// flow input for a root map step (the engine's `step_type` `'map'`).
    Map,
}

impl StepKind {
    /// The engine's name for the kind: `"single"` or `"map"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Single => "single",
            Self::Map => "map",
        }
    }
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The shape of a flow: everything the engine stores about it, and nothing it runs.
///
/// Obtained with [`Flow::shape`](crate::Flow::shape); serializable, so it can be stored and
/// compared with what the database holds.
///
/// ```
/// use pgflow_core::{FlowOptions, FlowShape, StepKind, StepOptions, StepShape};
///
/// let shape = FlowShape {
///     slug: "crawl".into(),
///     options: FlowOptions::new().timeout(120),
///     steps: vec![
///         StepShape::new("urls"),
///         StepShape {
///             kind: StepKind::Map,
///             dependencies: vec!["urls".into()],
///             options: StepOptions::new().max_attempts(2),
///             ..StepShape::new("fetch")
///         },
///     ],
/// };
/// assert_eq!(
///     shape.statements()?,
///     [
///         "SELECT pgflow.create_flow('crawl', timeout => 120);",
///         "SELECT pgflow.add_step('crawl', 'urls');",
///         "SELECT pgflow.add_step('crawl', 'fetch', ARRAY['urls'], max_attempts => 2, step_type => 'map');",
///     ]
/// );
/// # Ok::<(), pgflow_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowShape {
    /// The flow slug.
    pub slug: String,
    /// Flow-level options.
    #[serde(default)]
    pub options: FlowOptions,
    /// The steps, in the order of definition (which is the order of `add_step` calls).
    pub steps: Vec<StepShape>,
}

/// The shape of one step of a [`FlowShape`].
///
/// Its condition (pgflow 0.14): the step runs only if its input contains
/// `required_input_pattern` and does not contain `forbidden_input_pattern` (PostgreSQL's jsonb
/// `@>`), its input being the flow input for a root step and, for a dependent step, the object
/// of its dependencies' outputs keyed by slug. Otherwise `when_unmet` applies; `when_exhausted`
/// applies when a task has used up its attempts. Unset, a step has no condition and fails as in
/// pgflow 0.8.1. The serialized form leaves out what is unset or the default, so that a shape
/// without conditions serializes as it did before they existed.
///
/// ```
/// use pgflow_core::{SkipMode, StepShape};
/// use serde_json::json;
///
/// let notify = StepShape {
///     dependencies: vec!["charge".into()],
///     required_input_pattern: Some(json!({"charge": {"status": "paid"}})),
///     when_exhausted: SkipMode::Skip,
///     ..StepShape::new("notify")
/// };
/// assert_eq!(notify.when_unmet, SkipMode::Skip);
/// assert!(notify.skippable());
/// assert!(!StepShape::new("plain").skippable());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepShape {
    /// The step slug.
    pub slug: String,
    /// Single or map.
    #[serde(default)]
    pub kind: StepKind,
    /// Slugs of the steps it depends on, in declaration order.
    #[serde(default)]
    pub dependencies: Vec<String>,
    /// Step-level options.
    #[serde(default)]
    pub options: StepOptions,
    /// The pattern the step's input must contain for it to run (`if` in the DSL,
    /// `required_input_pattern` in SQL). A JSON object when set ([`FlowShape::validate`]
    /// refuses anything else).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_input_pattern: Option<serde_json::Value>,
    /// The pattern the step's input must not contain for it to run (`if_not` in the DSL,
    /// `forbidden_input_pattern` in SQL). A JSON object when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forbidden_input_pattern: Option<serde_json::Value>,
    /// What happens when the condition is unmet; [`StepShape::DEFAULT_WHEN_UNMET`] (skip)
    /// unless set. Without a condition it never applies.
    #[serde(
        default = "default_when_unmet",
        skip_serializing_if = "is_default_when_unmet"
    )]
    pub when_unmet: SkipMode,
    /// What happens when a task has used up its attempts; [`StepShape::DEFAULT_WHEN_EXHAUSTED`]
    /// (fail, as in pgflow 0.8.1) unless set.
    #[serde(
        default = "default_when_exhausted",
        skip_serializing_if = "is_default_when_exhausted"
    )]
    pub when_exhausted: SkipMode,
    /// Set for a subflow step (issue 22): the flow it runs as a child run per task, and
    /// whose output it completes with. `None` for a step run by a worker's handler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subflow: Option<SubflowShape>,
    /// The step's concurrency and rate limits (issue 22, `docs/limits.md`); none by default.
    /// Applied by the flow's SQL and by `Client::compile` in place, never compared as drift.
    #[serde(default, skip_serializing_if = "StepLimits::is_empty")]
    pub limits: StepLimits,
}

/// What a subflow step runs: a child flow, and which of the child run's outputs it completes
/// with (see `docs/subflows.md`).
///
/// ```
/// use pgflow_core::{FlowShape, FlowOptions, StepShape, SubflowShape};
///
/// let shape = FlowShape {
///     slug: "orders".into(),
///     options: FlowOptions::new(),
///     steps: vec![StepShape {
///         subflow: Some(SubflowShape { flow: "charge".into(), output_step: Some("receipt".into()) }),
///         ..StepShape::new("pay")
///     }],
/// };
/// assert_eq!(
///     shape.statements()?[2],
///     "SELECT pgflow.set_subflow('orders', 'pay', 'charge', 'receipt');"
/// );
/// # Ok::<(), pgflow_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubflowShape {
    /// The child flow's slug. The engine requires it to be defined before this step.
    pub flow: String,
    /// The child's leaf step whose output the subflow step completes with; `None`: the child
    /// run's whole output (an object of its leaves' outputs keyed by slug).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_step: Option<String>,
}

const fn default_when_unmet() -> SkipMode {
    StepShape::DEFAULT_WHEN_UNMET
}

const fn default_when_exhausted() -> SkipMode {
    StepShape::DEFAULT_WHEN_EXHAUSTED
}

#[allow(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_default_when_unmet(mode: &SkipMode) -> bool {
    *mode == StepShape::DEFAULT_WHEN_UNMET
}

#[allow(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_default_when_exhausted(mode: &SkipMode) -> bool {
    *mode == StepShape::DEFAULT_WHEN_EXHAUSTED
}

impl StepShape {
    /// The engine's `when_unmet` when a step does not set it (`add_step`'s default, upstream's
    /// too): an unmet condition skips the step.
    pub const DEFAULT_WHEN_UNMET: SkipMode = SkipMode::Skip;

    /// The engine's `when_exhausted` when a step does not set it: a task out of attempts fails
    /// the step and the run, as in pgflow 0.8.1.
    pub const DEFAULT_WHEN_EXHAUSTED: SkipMode = SkipMode::Fail;

    /// A single step without dependencies, options or condition.
    pub fn new(slug: impl Into<String>) -> Self {
        Self {
            slug: slug.into(),
            kind: StepKind::Single,
            dependencies: Vec::new(),
            options: StepOptions::new(),
            required_input_pattern: None,
            forbidden_input_pattern: None,
            when_unmet: Self::DEFAULT_WHEN_UNMET,
            when_exhausted: Self::DEFAULT_WHEN_EXHAUSTED,
            subflow: None,
            limits: StepLimits::new(),
        }
    }

    /// Whether the step has a condition (a required or a forbidden pattern).
    pub fn has_condition(&self) -> bool {
        self.required_input_pattern.is_some() || self.forbidden_input_pattern.is_some()
    }

    /// Whether the engine may skip this step itself: a condition with a skipping
    /// `when_unmet`, or a skipping `when_exhausted`. (A step downstream of a `skip-cascade`
    /// step may be skipped as well, but then it never runs.)
    pub fn skippable(&self) -> bool {
        (self.has_condition() && self.when_unmet.skips()) || self.when_exhausted.skips()
    }

    /// The first problem with the step's subflow, if it has one.
    fn subflow_problem(&self, flow: &str) -> Option<Error> {
        let subflow = self.subflow.as_ref()?;
        let problem = if self.dependencies.len() > 1 {
            format!(
                "has {} dependencies: a subflow step takes its child's input from at most one",
                self.dependencies.len()
            )
        } else if let Err(problem) = check_flow_slug(&subflow.flow) {
            format!(
                "names an invalid child flow slug {:?}: {problem}",
                subflow.flow
            )
        } else if subflow.flow == flow {
            "runs its own flow: a flow cannot run itself as a child".to_owned()
        } else if let Some(Err(problem)) = subflow.output_step.as_deref().map(check_slug) {
            format!("names an invalid output step slug: {problem}")
        } else if !self.limits.is_empty() {
            // Child runs start from a trigger, not a worker's read: the engine refuses a
            // limit it could not apply (migration 0016).
            "has concurrency or rate limits: a subflow step cannot be limited (limit the child flow's steps instead)".to_owned()
        } else {
            return None;
        };
        Some(Error::InvalidSubflow {
            flow: flow.to_owned(),
            step: self.slug.clone(),
            problem,
        })
    }

    /// The step's patterns, by their SQL names.
    fn patterns(&self) -> [(&'static str, Option<&serde_json::Value>); 2] {
        [
            (
                "required_input_pattern",
                self.required_input_pattern.as_ref(),
            ),
            (
                "forbidden_input_pattern",
                self.forbidden_input_pattern.as_ref(),
            ),
        ]
    }

    /// The first problem with the step's patterns: one that is not a JSON object, or, for a
    /// dependent step, that names a key that is not a dependency.
    fn pattern_problem(&self, flow: &str) -> Option<Error> {
        for (pattern, value) in self.patterns() {
            let object = match value {
                None => continue,
                Some(serde_json::Value::Object(object)) => object,
                Some(other) => {
                    return Some(Error::InvalidInputPattern {
                        flow: flow.to_owned(),
                        step: self.slug.clone(),
                        pattern,
                        found: json_kind(other),
                    });
                }
            };
            if self.dependencies.is_empty() {
                continue;
            }
            if let Some(key) = object.keys().find(|key| !self.dependencies.contains(key)) {
                let dependencies: Vec<String> =
                    self.dependencies.iter().map(|d| format!("`{d}`")).collect();
                return Some(Error::PatternKeyNotDependency {
                    flow: flow.to_owned(),
                    step: self.slug.clone(),
                    pattern,
                    key: key.clone(),
                    dependencies: dependencies.join(", "),
                });
            }
        }
        None
    }
}

/// How a JSON value is named in an error.
pub(crate) const fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

impl FlowShape {
    /// Checks everything the engine would reject, before any SQL is sent: slugs, duplicate
    /// steps, unknown or repeated dependencies, and option ranges. Reports the first problem.
    pub fn validate(&self) -> Result<()> {
        let flow = &self.slug;
        check_flow_slug(flow).map_err(|problem| Error::InvalidFlowSlug {
            slug: flow.clone(),
            problem,
        })?;
        for (option, value) in self.options.bounded() {
            if let Some(requirement) = option_problem(option, value) {
                return Err(Error::InvalidFlowOption {
                    flow: flow.clone(),
                    option,
                    value,
                    requirement,
                });
            }
        }
        let mut seen = HashSet::new();
        for step in &self.steps {
            check_slug(&step.slug).map_err(|problem| Error::InvalidStepSlug {
                flow: flow.clone(),
                slug: step.slug.clone(),
                problem,
            })?;
            let mut deps = HashSet::new();
            for dep in &step.dependencies {
                if !seen.contains(dep.as_str()) {
                    return Err(Error::UnknownDependency {
                        flow: flow.clone(),
                        step: step.slug.clone(),
                        dependency: dep.clone(),
                    });
                }
                if !deps.insert(dep.as_str()) {
                    return Err(Error::DuplicateDependency {
                        flow: flow.clone(),
                        step: step.slug.clone(),
                        dependency: dep.clone(),
                    });
                }
            }
            for (option, value) in step.options.bounded() {
                if let Some(requirement) = option_problem(option, value) {
                    return Err(Error::InvalidStepOption {
                        flow: flow.clone(),
                        step: step.slug.clone(),
                        option,
                        value,
                        requirement,
                    });
                }
            }
            if let Some(problem) = step.pattern_problem(flow) {
                return Err(problem);
            }
            if let Some(problem) = step.subflow_problem(flow) {
                return Err(problem);
            }
            if let Some(problem) = step.limits.problem() {
                return Err(Error::InvalidLimit {
                    flow: flow.clone(),
                    step: step.slug.clone(),
                    problem,
                });
            }
            if !seen.insert(step.slug.as_str()) {
                return Err(Error::DuplicateStep {
                    flow: flow.clone(),
                    step: step.slug.clone(),
                });
            }
        }
        Ok(())
    }

    /// The SQL statements that define this flow, one `SELECT pgflow.create_flow(...)` and one
    /// `SELECT pgflow.add_step(...)` per step, exactly as pgflow 0.8.1's TypeScript DSL writes
    /// them. Validates first.
    ///
    /// Then, for the flow and for each step that sets a retry policy (`max_delay` or
    /// `jitter`, which pgflow 0.8.1 does not have), one
    /// `SELECT pgflow.set_retry_policy(flow, step, max_delay, jitter);`, `step` NULL for the
    /// flow's and an unset value NULL (a flow's unset `jitter` is `false`). A flow that sets
    /// neither gets exactly the TypeScript DSL's statements.
    ///
    /// ```
    /// use pgflow_core::{FlowOptions, FlowShape, StepOptions, StepShape};
    ///
    /// let shape = FlowShape {
    ///     slug: "sync".into(),
    ///     options: FlowOptions::new().max_delay(60),
    ///     steps: vec![StepShape {
    ///         options: StepOptions::new().jitter(true),
    ///         ..StepShape::new("push")
    ///     }],
    /// };
    /// assert_eq!(
    ///     shape.statements()?,
    ///     [
    ///         "SELECT pgflow.create_flow('sync');",
    ///         "SELECT pgflow.add_step('sync', 'push');",
    ///         "SELECT pgflow.set_retry_policy('sync', NULL, 60, false);",
    ///         "SELECT pgflow.set_retry_policy('sync', 'push', NULL, true);",
    ///     ]
    /// );
    /// # Ok::<(), pgflow_core::Error>(())
    /// ```
    pub fn statements(&self) -> Result<Vec<String>> {
        self.validate()?;
        let mut out = Vec::with_capacity(self.steps.len() + 1);
        let mut sql = format!("SELECT pgflow.create_flow({}", quote(&self.slug));
        push_options(&mut sql, self.options.named());
        sql.push_str(");");
        out.push(sql);
        for step in &self.steps {
            let mut sql = format!(
                "SELECT pgflow.add_step({}, {}",
                quote(&self.slug),
                quote(&step.slug)
            );
            if !step.dependencies.is_empty() {
                let deps: Vec<String> = step.dependencies.iter().map(|d| quote(d)).collect();
                let _ = write!(sql, ", ARRAY[{}]", deps.join(", "));
            }
            push_options(&mut sql, step.options.named());
            push_condition(&mut sql, step);
            if step.kind == StepKind::Map {
                sql.push_str(", step_type => 'map'");
            }
            sql.push_str(");");
            out.push(sql);
        }
        let policies = std::iter::once((None, self.options.retry_policy())).chain(
            self.steps
                .iter()
                .map(|step| (Some(step.slug.as_str()), step.options.retry_policy())),
        );
        for (step, policy) in policies {
            if let Some((max_delay, jitter)) = policy {
                out.push(format!(
                    "SELECT pgflow.set_retry_policy({}, {}, {}, {});",
                    quote(&self.slug),
                    step.map_or_else(|| "NULL".to_owned(), quote),
                    max_delay.map_or_else(|| "NULL".to_owned(), |v| v.to_string()),
                    jitter.map_or_else(|| "NULL".to_owned(), |v| v.to_string()),
                ));
            }
        }
        for step in &self.steps {
            if let Some(subflow) = &step.subflow {
                let mut sql = format!(
                    "SELECT pgflow.set_subflow({}, {}, {}",
                    quote(&self.slug),
                    quote(&step.slug),
                    quote(&subflow.flow)
                );
                if let Some(output) = &subflow.output_step {
                    let _ = write!(sql, ", {}", quote(output));
                }
                sql.push_str(");");
                out.push(sql);
            }
        }
        for step in &self.steps {
            out.extend(step.limits.statements(&self.slug, &step.slug, quote));
        }
        Ok(out)
    }

    /// The [`statements`](Self::statements) as one SQL text, one statement per line, ending
    /// with a newline: ready for a migration file.
    pub fn to_sql(&self) -> Result<String> {
        let mut sql = self.statements()?.join("\n");
        sql.push('\n');
        Ok(sql)
    }
}

/// A SQL string literal: single quotes doubled.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A step's condition and modes, as named arguments after the options and before
/// `step_type`, in the order and form of `@pgflow/dsl`'s `compileFlow` since conditions
/// (upstream's `pkgs/dsl/src/compile-flow.ts` with `whenExhausted`, pgflow 0.14): each
/// pattern as compact JSON in a string literal (quotes doubled, no `::jsonb` cast), each mode
/// as its name.
///
/// Upstream prints a mode when the flow sets one; a [`StepShape`] holds the mode itself, so a
/// mode is printed when it is not the engine's default. The SQL is the same step either way:
/// it differs from upstream's text only for a flow that spells out a default.
/// `serde_json` writes object keys sorted, where `JSON.stringify` keeps the order written;
/// `jsonb` keeps neither, so the stored pattern is the same.
fn push_condition(sql: &mut String, step: &StepShape) {
    let patterns = [
        ("required_input_pattern", &step.required_input_pattern),
        ("forbidden_input_pattern", &step.forbidden_input_pattern),
    ];
    for (name, pattern) in patterns {
        if let Some(pattern) = pattern {
            let _ = write!(sql, ", {name} => {}", quote(&pattern.to_string()));
        }
    }
    if step.when_unmet != StepShape::DEFAULT_WHEN_UNMET {
        let _ = write!(sql, ", when_unmet => '{}'", step.when_unmet);
    }
    if step.when_exhausted != StepShape::DEFAULT_WHEN_EXHAUSTED {
        let _ = write!(sql, ", when_exhausted => '{}'", step.when_exhausted);
    }
}

fn push_options(sql: &mut String, options: impl Iterator<Item = (&'static str, u32)>) {
    for (name, value) in options {
        let _ = write!(sql, ", {name} => {value}");
    }
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

    #[test]
    fn quotes_by_doubling() {
        assert_eq!(quote("it's"), "'it''s'");
        assert_eq!(quote("''"), "''''''");
    }

    #[test]
    fn root_map_and_start_delay() {
        let flow = shape(vec![
            StepShape {
                kind: StepKind::Map,
                ..StepShape::new("each")
            },
            StepShape {
                dependencies: vec!["each".into()],
                options: StepOptions::new()
                    .max_attempts(1)
                    .base_delay(2)
                    .timeout(3)
                    .start_delay(4),
                ..StepShape::new("after")
            },
        ]);
        assert_eq!(
            flow.to_sql().unwrap(),
            "SELECT pgflow.create_flow('f');\n\
             SELECT pgflow.add_step('f', 'each', step_type => 'map');\n\
             SELECT pgflow.add_step('f', 'after', ARRAY['each'], max_attempts => 1, base_delay => 2, timeout => 3, start_delay => 4);\n"
        );
    }

    #[test]
    fn two_dependencies_keep_their_order() {
        let flow = shape(vec![
            StepShape::new("a"),
            StepShape::new("b"),
            StepShape {
                dependencies: vec!["b".into(), "a".into()],
                ..StepShape::new("c")
            },
        ]);
        assert_eq!(
            flow.statements().unwrap()[3],
            "SELECT pgflow.add_step('f', 'c', ARRAY['b', 'a']);"
        );
    }

    #[test]
    fn validation_names_the_field() {
        let mut bad = shape(vec![]);
        bad.slug = "run".into();
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "invalid flow slug \"run\": `run` is reserved: it is the key under which steps receive the flow input"
        );

        let mut bad = shape(vec![]);
        bad.options.timeout = Some(0);
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "option `timeout` of flow `f` is 0, but it must be at least 3 seconds"
        );

        let bad = shape(vec![StepShape {
            options: StepOptions::new().base_delay(u32::MAX),
            ..StepShape::new("s")
        }]);
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "option `base_delay` of step `s` in flow `f` is 4294967295, but it must be at most 86400 seconds (one day)"
        );

        let bad = shape(vec![StepShape::new("s"), StepShape::new("s")]);
        assert_eq!(
            bad.validate(),
            Err(Error::DuplicateStep {
                flow: "f".into(),
                step: "s".into()
            })
        );

        let bad = shape(vec![StepShape::new("bad-slug")]);
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "invalid step slug \"bad-slug\" in flow `f`: a slug contains only ASCII letters, digits and `_`, not '-'"
        );

        let bad = shape(vec![StepShape {
            dependencies: vec!["later".into()],
            ..StepShape::new("s")
        }]);
        assert!(matches!(
            bad.validate(),
            Err(Error::UnknownDependency { ref dependency, .. }) if dependency == "later"
        ));

        let bad = shape(vec![
            StepShape::new("a"),
            StepShape {
                dependencies: vec!["a".into(), "a".into()],
                ..StepShape::new("s")
            },
        ]);
        assert!(matches!(
            bad.validate(),
            Err(Error::DuplicateDependency { .. })
        ));
        assert!(bad.statements().is_err(), "no SQL for an invalid flow");
    }

    #[test]
    fn the_smallest_values_are_allowed() {
        let flow = FlowShape {
            options: FlowOptions::new()
                .max_attempts(StepOptions::MIN_ATTEMPTS)
                .base_delay(StepOptions::MIN_BASE_DELAY)
                .timeout(StepOptions::MIN_TIMEOUT),
            ..shape(vec![StepShape {
                options: StepOptions::new().start_delay(0),
                ..StepShape::new("s")
            }])
        };
        assert_eq!(
            flow.statements().unwrap(),
            [
                "SELECT pgflow.create_flow('f', max_attempts => 1, base_delay => 1, timeout => 3);",
                "SELECT pgflow.add_step('f', 's', start_delay => 0);",
            ]
        );
    }

    #[test]
    fn no_retry_policy_no_set_retry_policy() {
        let flow = FlowShape {
            options: FlowOptions::new().max_attempts(3).base_delay(5).timeout(60),
            ..shape(vec![StepShape {
                options: StepOptions::new().base_delay(2),
                ..StepShape::new("s")
            }])
        };
        let sql = flow.to_sql().unwrap();
        assert!(!sql.contains("set_retry_policy"), "{sql}");
        assert_eq!(
            sql,
            "SELECT pgflow.create_flow('f', max_attempts => 3, base_delay => 5, timeout => 60);\n\
             SELECT pgflow.add_step('f', 's', base_delay => 2);\n"
        );
    }

    #[test]
    fn retry_policies_follow_the_definition_flow_first() {
        let flow = FlowShape {
            slug: "it's".into(),
            options: FlowOptions::new().base_delay(1).jitter(true),
            steps: vec![
                StepShape {
                    options: StepOptions::new().max_delay(30),
                    ..StepShape::new("capped")
                },
                StepShape::new("plain"),
                StepShape {
                    kind: StepKind::Map,
                    dependencies: vec!["capped".into()],
                    options: StepOptions::new().timeout(10).max_delay(5).jitter(false),
                    ..StepShape::new("steady")
                },
            ],
        };
        // Invalid slug aside (quoting is what this checks), the statements:
        let mut valid = flow.clone();
        valid.slug = "f".into();
        assert_eq!(
            valid.statements().unwrap(),
            [
                "SELECT pgflow.create_flow('f', base_delay => 1);",
                "SELECT pgflow.add_step('f', 'capped');",
                "SELECT pgflow.add_step('f', 'plain');",
                "SELECT pgflow.add_step('f', 'steady', ARRAY['capped'], timeout => 10, step_type => 'map');",
                "SELECT pgflow.set_retry_policy('f', NULL, NULL, true);",
                "SELECT pgflow.set_retry_policy('f', 'capped', 30, NULL);",
                "SELECT pgflow.set_retry_policy('f', 'steady', 5, false);",
            ]
        );
        assert!(flow.statements().is_err());

        // A flow's max_delay alone: its jitter is the default, written out (the column is not
        // nullable); a step's unset jitter is NULL, inherited.
        let capped = FlowShape {
            options: FlowOptions::new().max_delay(60),
            ..shape(vec![])
        };
        assert_eq!(
            capped.statements().unwrap()[1],
            "SELECT pgflow.set_retry_policy('f', NULL, 60, false);"
        );
    }

    #[test]
    fn max_delay_is_bounded_at_either_level() {
        let mut bad = shape(vec![]);
        bad.options.max_delay = Some(0);
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "option `max_delay` of flow `f` is 0, but it must be at least 1 second"
        );
        let bad = shape(vec![StepShape {
            options: StepOptions::new().max_delay(StepOptions::MAX_MAX_DELAY + 1),
            ..StepShape::new("s")
        }]);
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "option `max_delay` of step `s` in flow `f` is 86401, but it must be at most 86400 seconds (one day)"
        );
        // Below base_delay is accepted: every retry then waits max_delay.
        let constant = shape(vec![StepShape {
            options: StepOptions::new().base_delay(60).max_delay(10),
            ..StepShape::new("s")
        }]);
        assert!(constant.validate().is_ok());
    }

    /// Upstream's expected SQL fragments for conditions, restated from `@pgflow/dsl`'s own
    /// tests (`pkgs/dsl/__tests__/runtime/condition-options.test.ts` and
    /// `when-exhausted-options.test.ts`, pgflow 0.14, the version with `whenExhausted`):
    /// patterns as compact JSON in quotes, modes by name, after the options.
    #[test]
    fn conditions_compile_like_upstream() {
        use serde_json::json;
        let root = |step: StepShape| {
            FlowShape {
                slug: "test_flow".into(),
                options: FlowOptions::new(),
                steps: vec![step],
            }
            .statements()
            .unwrap()[1]
                .clone()
        };
        assert_eq!(
            root(StepShape {
                required_input_pattern: Some(json!({"enabled": true})),
                ..StepShape::new("step1")
            }),
            r#"SELECT pgflow.add_step('test_flow', 'step1', required_input_pattern => '{"enabled":true}');"#
        );
        assert_eq!(
            root(StepShape {
                required_input_pattern: Some(json!({"active": true, "type": "premium"})),
                when_unmet: SkipMode::SkipCascade,
                ..StepShape::new("step1")
            }),
            r#"SELECT pgflow.add_step('test_flow', 'step1', required_input_pattern => '{"active":true,"type":"premium"}', when_unmet => 'skip-cascade');"#
        );
        assert_eq!(
            root(StepShape {
                forbidden_input_pattern: Some(json!({"role": "admin"})),
                ..StepShape::new("step1")
            }),
            r#"SELECT pgflow.add_step('test_flow', 'step1', forbidden_input_pattern => '{"role":"admin"}');"#
        );
        assert_eq!(
            root(StepShape {
                when_unmet: SkipMode::Fail,
                ..StepShape::new("step1")
            }),
            "SELECT pgflow.add_step('test_flow', 'step1', when_unmet => 'fail');"
        );
        // Every option: the plain ones, the patterns, the modes, then the map step's type.
        assert_eq!(
            root(StepShape {
                kind: StepKind::Map,
                options: StepOptions::new().max_attempts(3).timeout(60),
                required_input_pattern: Some(json!({"enabled": true})),
                forbidden_input_pattern: Some(json!({"suspended": true})),
                when_unmet: SkipMode::Fail,
                when_exhausted: SkipMode::SkipCascade,
                ..StepShape::new("step1")
            }),
            r#"SELECT pgflow.add_step('test_flow', 'step1', max_attempts => 3, timeout => 60, required_input_pattern => '{"enabled":true}', forbidden_input_pattern => '{"suspended":true}', when_unmet => 'fail', when_exhausted => 'skip-cascade', step_type => 'map');"#
        );
        for (mode, text) in [
            (SkipMode::Skip, "when_exhausted => 'skip'"),
            (SkipMode::SkipCascade, "when_exhausted => 'skip-cascade'"),
        ] {
            let sql = root(StepShape {
                when_exhausted: mode,
                ..StepShape::new("step1")
            });
            assert!(sql.ends_with(&format!(", {text});")), "{sql}");
        }
        // A dependent step's pattern names its dependencies.
        let flow = FlowShape {
            slug: "test_flow".into(),
            options: FlowOptions::new(),
            steps: vec![
                StepShape::new("first"),
                StepShape {
                    dependencies: vec!["first".into()],
                    required_input_pattern: Some(json!({"first": {"success": true}})),
                    ..StepShape::new("second")
                },
            ],
        };
        assert_eq!(
            flow.statements().unwrap()[2],
            r#"SELECT pgflow.add_step('test_flow', 'second', ARRAY['first'], required_input_pattern => '{"first":{"success":true}}');"#
        );
        // A default mode prints nothing, and neither does a step without a condition.
        assert_eq!(
            root(StepShape::new("step1")),
            "SELECT pgflow.add_step('test_flow', 'step1');"
        );
    }

    #[test]
    fn pattern_quotes_are_doubled() {
        let flow = shape(vec![StepShape {
            required_input_pattern: Some(serde_json::json!({"name": "O'Brien", "q": "\"x\""})),
            ..StepShape::new("s")
        }]);
        assert_eq!(
            flow.statements().unwrap()[1],
            r#"SELECT pgflow.add_step('f', 's', required_input_pattern => '{"name":"O''Brien","q":"\"x\""}');"#
        );
    }

    #[test]
    fn patterns_must_be_objects() {
        for (value, found) in [
            (serde_json::json!([1]), "an array"),
            (serde_json::json!("premium"), "a string"),
            (serde_json::Value::Null, "null"),
            (serde_json::json!(1), "a number"),
        ] {
            let bad = shape(vec![StepShape {
                forbidden_input_pattern: Some(value.clone()),
                ..StepShape::new("s")
            }]);
            assert_eq!(
                bad.validate(),
                Err(Error::InvalidInputPattern {
                    flow: "f".into(),
                    step: "s".into(),
                    pattern: "forbidden_input_pattern",
                    found,
                })
            );
            assert!(bad.statements().is_err());
        }
        let bad = shape(vec![StepShape {
            required_input_pattern: Some(serde_json::json!(true)),
            ..StepShape::new("s")
        }]);
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "the `required_input_pattern` of step `s` in flow `f` is a boolean, but a condition pattern must be a JSON object, as `{\"field\": value}`"
        );
        // A dependent step's pattern names its dependencies, nothing else.
        let stray = shape(vec![
            StepShape::new("a"),
            StepShape {
                dependencies: vec!["a".into()],
                required_input_pattern: Some(serde_json::json!({"a": {"ok": true}, "run": {}})),
                ..StepShape::new("s")
            },
        ]);
        assert_eq!(
            stray.validate().unwrap_err().to_string(),
            "the `required_input_pattern` of step `s` in flow `f` names `run`, which is not one of its dependencies (`a`): a dependent step's condition is matched against its dependencies' outputs, keyed by slug"
        );
        // A root step's input is the flow input: any key.
        let root = shape(vec![StepShape {
            forbidden_input_pattern: Some(serde_json::json!({"anything": 1})),
            ..StepShape::new("s")
        }]);
        assert!(root.validate().is_ok());
        // The empty object is a pattern every input contains: accepted, as the engine does.
        let empty = shape(vec![StepShape {
            required_input_pattern: Some(serde_json::json!({})),
            ..StepShape::new("s")
        }]);
        assert!(empty.validate().is_ok());
    }

    #[test]
    fn skip_modes_by_name() {
        for mode in SkipMode::ALL {
            assert_eq!(mode.as_str().parse::<SkipMode>(), Ok(mode));
            assert_eq!(
                serde_json::to_value(mode).unwrap(),
                serde_json::Value::String(mode.as_str().into())
            );
        }
        assert_eq!(
            "skip_cascade".parse::<SkipMode>().unwrap_err().to_string(),
            "unknown skip mode \"skip_cascade\": expected \"fail\", \"skip\" or \"skip-cascade\""
        );
        assert!(serde_json::from_value::<SkipMode>(serde_json::json!("Skip")).is_err());
    }

    #[test]
    fn skippable_steps() {
        let conditional = StepShape {
            required_input_pattern: Some(serde_json::json!({"a": 1})),
            ..StepShape::new("s")
        };
        assert!(conditional.skippable(), "default when_unmet skips");
        let failing = StepShape {
            when_unmet: SkipMode::Fail,
            ..conditional.clone()
        };
        assert!(!failing.skippable());
        // when_unmet alone does nothing without a condition.
        let no_condition = StepShape {
            when_unmet: SkipMode::SkipCascade,
            ..StepShape::new("s")
        };
        assert!(!no_condition.skippable());
        let exhausted = StepShape {
            when_exhausted: SkipMode::Skip,
            ..StepShape::new("s")
        };
        assert!(exhausted.skippable());
    }

    #[test]
    fn conditions_round_trip_through_json_and_old_shapes_read() {
        let step = StepShape {
            required_input_pattern: Some(serde_json::json!({"plan": "premium"})),
            forbidden_input_pattern: Some(serde_json::json!({"banned": true})),
            when_unmet: SkipMode::SkipCascade,
            when_exhausted: SkipMode::Skip,
            ..StepShape::new("s")
        };
        let json = serde_json::to_value(&step).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "slug": "s", "kind": "single", "dependencies": [], "options": {},
                "required_input_pattern": {"plan": "premium"},
                "forbidden_input_pattern": {"banned": true},
                "when_unmet": "skip-cascade",
                "when_exhausted": "skip"
            })
        );
        assert_eq!(serde_json::from_value::<StepShape>(json).unwrap(), step);
        let old: StepShape = serde_json::from_value(serde_json::json!({"slug": "s"})).unwrap();
        assert_eq!(old, StepShape::new("s"));
        assert_eq!(
            (old.when_unmet, old.when_exhausted),
            (SkipMode::Skip, SkipMode::Fail)
        );
    }

    #[test]
    fn shape_round_trips_through_json() {
        let flow = shape(vec![StepShape {
            kind: StepKind::Map,
            ..StepShape::new("m")
        }]);
        let json = serde_json::to_value(&flow).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "slug": "f",
                "options": {},
                "steps": [{"slug": "m", "kind": "map", "dependencies": [], "options": {}}]
            })
        );
        assert_eq!(serde_json::from_value::<FlowShape>(json).unwrap(), flow);
    }

    #[test]
    fn retry_policy_round_trips_through_json_and_is_left_out_when_unset() {
        let flow = FlowShape {
            options: FlowOptions::new().max_delay(30).jitter(false),
            ..shape(vec![StepShape {
                options: StepOptions::new().jitter(true),
                ..StepShape::new("s")
            }])
        };
        let json = serde_json::to_value(&flow).unwrap();
        assert_eq!(
            json["options"],
            serde_json::json!({"max_delay": 30, "jitter": false})
        );
        assert_eq!(
            json["steps"][0]["options"],
            serde_json::json!({"jitter": true})
        );
        assert_eq!(serde_json::from_value::<FlowShape>(json).unwrap(), flow);
        // A shape written before these options existed still reads.
        let old: FlowShape = serde_json::from_value(serde_json::json!({
            "slug": "f", "options": {"timeout": 9}, "steps": [{"slug": "s", "options": {"max_attempts": 2}}]
        }))
        .unwrap();
        assert_eq!((old.options.max_delay, old.options.jitter), (None, None));
    }
}

//! A flow's shape: slugs, kinds, dependencies and options, without handlers. It is what the
//! engine stores, what compiles to SQL, and what is compared to detect drift.

use std::collections::HashSet;
use std::fmt::{self, Write as _};

use serde::{Deserialize, Serialize};

use crate::options::option_problem;
use crate::slug::check_flow_slug;
use crate::{Error, FlowOptions, Result, StepOptions, check_slug};

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
}

impl StepShape {
    /// A single step without dependencies or options.
    pub fn new(slug: impl Into<String>) -> Self {
        Self {
            slug: slug.into(),
            kind: StepKind::Single,
            dependencies: Vec::new(),
            options: StepOptions::new(),
        }
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

//! A flow's shape as upstream pgflow's TypeScript DSL writes it (`extractFlowShape`, 0.14):
//! the JSON that `pgflow.ensure_flow_compiled`, `pgflow._compare_flow_shapes` and
//! `pgflow._create_flow_from_shape` read (migration 0011). The client hands the database this
//! JSON so that its verdict on a flow is the one a TypeScript worker gets for the same flow.

use pgflow_core::{FlowOptions, FlowShape, StepOptions, StepShape};
use serde_json::{Map, Value, json};

/// The JSON shape of `shape`, as pgflow 0.14's `extractFlowShape` builds it for the same
/// flow: `{"steps": [...], "options"?: {...}}`, each step with `slug`, `stepType`,
/// `dependencies` (sorted), `whenUnmet`, `whenExhausted`, `requiredInputPattern` and
/// `forbiddenInputPattern` (`{"defined": false}` or `{"defined": true, "value": ...}`) and,
/// when it sets any, `options`. Options hold only what is set, with upstream's names
/// (`maxAttempts`, `baseDelay`, `timeout`, `startDelay`), plus this engine's retry policy
/// (`maxDelay`, `jitter`), which `pgflow._create_flow_from_shape` applies and upstream's
/// functions ignore. The flow slug is not part of it (upstream's neither).
///
/// ```
/// use pgflow_core::{FlowOptions, FlowShape, StepKind, StepShape};
/// use serde_json::json;
///
/// let shape = FlowShape {
///     slug: "crawl".into(),
///     options: FlowOptions::new().timeout(120),
///     steps: vec![
///         StepShape::new("urls"),
///         StepShape {
///             kind: StepKind::Map,
///             dependencies: vec!["urls".into()],
///             ..StepShape::new("fetch")
///         },
///     ],
/// };
/// let unset = json!({"defined": false});
/// assert_eq!(
///     pgflow_client::shape_json(&shape),
///     json!({
///         "steps": [
///             {"slug": "urls", "stepType": "single", "dependencies": [],
///              "whenUnmet": "skip", "whenExhausted": "fail",
///              "requiredInputPattern": unset, "forbiddenInputPattern": unset},
///             {"slug": "fetch", "stepType": "map", "dependencies": ["urls"],
///              "whenUnmet": "skip", "whenExhausted": "fail",
///              "requiredInputPattern": unset, "forbiddenInputPattern": unset},
///         ],
///         "options": {"timeout": 120},
///     })
/// );
/// ```
pub fn shape_json(shape: &FlowShape) -> Value {
    let mut out = Map::new();
    out.insert(
        "steps".into(),
        Value::Array(shape.steps.iter().map(step_json).collect()),
    );
    let options = flow_options(&shape.options);
    if !options.is_empty() {
        out.insert("options".into(), Value::Object(options));
    }
    Value::Object(out)
}

fn step_json(step: &StepShape) -> Value {
    let mut dependencies = step.dependencies.clone();
    dependencies.sort();
    let mut out = Map::new();
    out.insert("slug".into(), json!(step.slug));
    out.insert("stepType".into(), json!(step.kind.as_str()));
    out.insert("dependencies".into(), json!(dependencies));
    out.insert("whenUnmet".into(), json!(step.when_unmet.as_str()));
    out.insert("whenExhausted".into(), json!(step.when_exhausted.as_str()));
    out.insert(
        "requiredInputPattern".into(),
        pattern(step.required_input_pattern.as_ref()),
    );
    out.insert(
        "forbiddenInputPattern".into(),
        pattern(step.forbidden_input_pattern.as_ref()),
    );
    let options = step_options(&step.options);
    if !options.is_empty() {
        out.insert("options".into(), Value::Object(options));
    }
    Value::Object(out)
}

/// Upstream's wrapper, which tells an unset pattern from a set one in JSON.
fn pattern(value: Option<&Value>) -> Value {
    match value {
        Some(value) => json!({"defined": true, "value": value}),
        None => json!({"defined": false}),
    }
}

fn flow_options(options: &FlowOptions) -> Map<String, Value> {
    let mut out = Map::new();
    set(&mut out, "maxAttempts", options.max_attempts);
    set(&mut out, "baseDelay", options.base_delay);
    set(&mut out, "timeout", options.timeout);
    set(&mut out, "maxDelay", options.max_delay);
    if let Some(jitter) = options.jitter {
        out.insert("jitter".into(), Value::Bool(jitter));
    }
    out
}

fn step_options(options: &StepOptions) -> Map<String, Value> {
    let mut out = Map::new();
    set(&mut out, "maxAttempts", options.max_attempts);
    set(&mut out, "baseDelay", options.base_delay);
    set(&mut out, "timeout", options.timeout);
    set(&mut out, "startDelay", options.start_delay);
    set(&mut out, "maxDelay", options.max_delay);
    if let Some(jitter) = options.jitter {
        out.insert("jitter".into(), Value::Bool(jitter));
    }
    out
}

fn set(out: &mut Map<String, Value>, key: &str, value: Option<u32>) {
    if let Some(value) = value {
        out.insert(key.into(), Value::from(value));
    }
}

#[cfg(test)]
mod tests {
    use pgflow_core::{SkipMode, StepKind};

    use super::*;

    /// The flow of upstream's "complex flow structure with options" case, with a condition on
    /// one step, written out as upstream's test expects it.
    #[test]
    fn matches_upstreams_extraction() {
        let shape = FlowShape {
            slug: "analyze_website".into(),
            options: FlowOptions::new().max_attempts(3).base_delay(5).timeout(10),
            steps: vec![
                StepShape::new("website"),
                StepShape {
                    dependencies: vec!["website".into()],
                    options: StepOptions::new().max_attempts(5).timeout(30),
                    ..StepShape::new("sentiment")
                },
                StepShape {
                    dependencies: vec!["website".into()],
                    required_input_pattern: Some(json!({"website": {"ok": true}})),
                    forbidden_input_pattern: Some(json!({"website": {"spam": true}})),
                    when_unmet: SkipMode::SkipCascade,
                    when_exhausted: SkipMode::Skip,
                    ..StepShape::new("summary")
                },
                StepShape {
                    kind: StepKind::Single,
                    dependencies: vec!["summary".into(), "sentiment".into()],
                    ..StepShape::new("save_to_db")
                },
            ],
        };
        let unset = json!({"defined": false});
        assert_eq!(
            shape_json(&shape),
            json!({
                "steps": [
                    {"slug": "website", "stepType": "single", "dependencies": [],
                     "whenUnmet": "skip", "whenExhausted": "fail",
                     "requiredInputPattern": unset, "forbiddenInputPattern": unset},
                    {"slug": "sentiment", "stepType": "single", "dependencies": ["website"],
                     "whenUnmet": "skip", "whenExhausted": "fail",
                     "requiredInputPattern": unset, "forbiddenInputPattern": unset,
                     "options": {"maxAttempts": 5, "timeout": 30}},
                    {"slug": "summary", "stepType": "single", "dependencies": ["website"],
                     "whenUnmet": "skip-cascade", "whenExhausted": "skip",
                     "requiredInputPattern": {"defined": true, "value": {"website": {"ok": true}}},
                     "forbiddenInputPattern": {"defined": true, "value": {"website": {"spam": true}}}},
                    {"slug": "save_to_db", "stepType": "single",
                     "dependencies": ["sentiment", "summary"],
                     "whenUnmet": "skip", "whenExhausted": "fail",
                     "requiredInputPattern": unset, "forbiddenInputPattern": unset},
                ],
                "options": {"maxAttempts": 3, "baseDelay": 5, "timeout": 10},
            })
        );
    }

    #[test]
    fn no_options_no_options_key_and_the_retry_policy_is_ours() {
        let bare = FlowShape {
            slug: "f".into(),
            options: FlowOptions::new(),
            steps: vec![],
        };
        assert_eq!(shape_json(&bare), json!({"steps": []}));

        let policy = FlowShape {
            options: FlowOptions::new().max_delay(60).jitter(false),
            steps: vec![StepShape {
                options: StepOptions::new().start_delay(0).jitter(true),
                ..StepShape::new("s")
            }],
            ..bare
        };
        let json = shape_json(&policy);
        assert_eq!(json["options"], json!({"maxDelay": 60, "jitter": false}));
        assert_eq!(
            json["steps"][0]["options"],
            json!({"startDelay": 0, "jitter": true})
        );
    }
}

//! Checks what can be checked before types exist: the slug, the form of literal option values,
//! and the rules of map steps. The ranges of option values are pgflow-core's, which this crate
//! cannot read: `expand` has the compiler check literal values against them.

use quote::ToTokens;
use syn::ext::IdentExt;
use syn::{Expr, ExprLit, ExprUnary, Lit, UnOp};

use crate::ast::StepFn;
use crate::attr::{Args, FLAG, PatternArg};
use crate::errors::Errors;
use crate::pattern::Pattern;
use crate::slug;

/// Checks `step` and its arguments; returns the step's slug.
pub(crate) fn validate(step: &StepFn, args: &Args, errors: &mut Errors) -> String {
    let ident = &step.item.sig.ident;
    let slug = match &args.slug {
        Some(lit) => {
            let slug = lit.value();
            if let Some(problem) = slug::check(&slug) {
                errors.at(lit, format_args!("invalid step slug {slug:?}: {problem}"));
            }
            slug
        }
        None => {
            let slug = ident.unraw().to_string();
            if let Some(problem) = slug::check(&slug) {
                errors.at(
                    ident,
                    format_args!(
                        "the function name `{slug}` is not a valid step slug: {problem}; rename the function or set `#[step(slug = \"...\")]`"
                    ),
                );
            }
            slug
        }
    };

    for (name, value) in &args.options {
        if let Some(problem) = literal_problem(&name.to_string(), value) {
            errors.at(value, format_args!("invalid `{name}`: {problem}"));
        }
    }

    let deps = args
        .depends_on
        .as_ref()
        .map(|(_, d)| d.as_slice())
        .unwrap_or_default();
    let names: Vec<String> = deps
        .iter()
        .map(|d| d.to_token_stream().to_string())
        .collect();
    for (i, dep) in deps.iter().enumerate() {
        if names[..i].contains(&names[i]) {
            errors.at(dep, "this dependency is listed twice");
        }
    }

    check_patterns(args, errors);

    if args.map.is_some() {
        let several = args.depends_on.as_ref().filter(|(_, deps)| deps.len() > 1);
        if let Some((span, deps)) = several {
            errors.push(syn::Error::new(
                *span,
                format_args!(
                    "a map step maps over the output of exactly one dependency, but `{ident}` lists {}\n\
                     \n\
                     Map over one step's `Vec` output (`depends_on = [items]`), or over the flow input (no `depends_on`); \
                     to combine several outputs, add a single step that depends on them and returns the `Vec` to map over.",
                    deps.len()
                ),
            ));
        }
        if step.element().is_none() {
            errors.at(
                &step.item.sig.ident,
                "a map step takes one element of the array it maps over: add a parameter for it",
            );
        }
    }
    slug
}

/// A skip mode, as `when_unmet` and `when_exhausted` take it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Mode {
    /// `fail`.
    Fail,
    /// `skip`.
    Skip,
    /// `skip_cascade` (`'skip-cascade'` in SQL).
    SkipCascade,
}

impl Mode {
    /// The variant of `SkipMode` and the type of `mode` named like it.
    pub(crate) fn variant(self) -> &'static str {
        match self {
            Self::Fail => "Fail",
            Self::Skip => "Skip",
            Self::SkipCascade => "SkipCascade",
        }
    }

    /// Whether the step is skipped rather than failed.
    pub(crate) fn skips(self) -> bool {
        self != Self::Fail
    }
}

/// The mode `expr` names: `fail`, `skip` or `skip_cascade`, as identifiers or as the engine's
/// names in a string (`"skip-cascade"`). Anything else is reported.
pub(crate) fn mode(name: &str, expr: &Expr, errors: &mut Errors) -> Option<Mode> {
    let expected = "expected `fail`, `skip` or `skip_cascade`";
    let found = match expr {
        Expr::Path(path) if path.qself.is_none() => {
            path.path.get_ident().map(|i| match i.to_string().as_str() {
                "fail" => Ok(Mode::Fail),
                "skip" => Ok(Mode::Skip),
                "skip_cascade" => Ok(Mode::SkipCascade),
                other => Err(format!("unknown mode `{other}` for `{name}`: {expected}")),
            })
        }
        Expr::Lit(ExprLit {
            lit: Lit::Str(text),
            ..
        }) => Some(match text.value().as_str() {
            "fail" => Ok(Mode::Fail),
            "skip" => Ok(Mode::Skip),
            "skip-cascade" => Ok(Mode::SkipCascade),
            other => Err(format!(
                "unknown mode {other:?} for `{name}`: expected \"fail\", \"skip\" or \"skip-cascade\" (or `fail`, `skip`, `skip_cascade`)"
            )),
        }),
        Expr::Binary(binary) if matches!(binary.op, syn::BinOp::Sub(_)) => Some(Err(format!(
            "`{name}` takes `skip_cascade`, with an underscore (the engine's `'skip-cascade'`)"
        ))),
        _ => None,
    };
    match found.unwrap_or_else(|| Err(format!("`{name}` takes a mode: {expected}"))) {
        Ok(mode) => Some(mode),
        Err(message) => {
            errors.at(expr, message);
            None
        }
    }
}

/// Checks that typed patterns fit the step: a pattern on the flow input goes on a root step,
/// a pattern on dependencies on a step that depends on each step it names.
fn check_patterns(args: &Args, errors: &mut Errors) {
    let deps: Vec<String> = args
        .depends_on
        .iter()
        .flat_map(|(_, deps)| deps)
        .filter_map(|path| path.segments.last().map(|s| s.ident.to_string()))
        .collect();
    for (name, arg) in [("if_input", &args.if_input), ("if_not", &args.if_not)] {
        let Some(PatternArg::Typed(pattern)) = arg else {
            continue;
        };
        match pattern {
            Pattern::Input { ty, .. } if !deps.is_empty() => errors.at(
                ty,
                format_args!(
                    "this step has dependencies, so its condition is matched against their outputs, keyed by slug, not against the flow input: \
                     write `{name} = {{ {}: {{ field: value }} }}`",
                    deps[0]
                ),
            ),
            Pattern::Dependencies { span, .. } if deps.is_empty() => {
                errors.push(syn::Error::new(
                    *span,
                    format_args!(
                        "a root step's condition is matched against the flow input, not against dependencies: write `{name} = Input {{ field: value }}` with the flow input's type"
                    ),
                ));
            }
            Pattern::Dependencies { .. } => {
                for (step, _) in pattern.dependencies() {
                    let named = step.segments.last().map(|s| s.ident.to_string());
                    if !named.is_some_and(|named| deps.contains(&named)) {
                        errors.at(
                            step,
                            format_args!(
                                "`{}` is not in `depends_on`: a dependent step's condition is matched against its dependencies' outputs only",
                                step.to_token_stream().to_string().replace(' ', "")
                            ),
                        );
                    }
                }
            }
            Pattern::Input { .. } => {}
        }
    }
    if let Some(expr) = &args.when_unmet {
        mode("when_unmet", expr, errors);
    }
    if let Some(expr) = &args.when_exhausted {
        mode("when_exhausted", expr, errors);
    }
}

/// What is wrong with a literal option value, if it is a literal.
fn literal_problem(name: &str, value: &Expr) -> Option<String> {
    if name == FLAG {
        return match value {
            Expr::Lit(ExprLit {
                lit: Lit::Bool(_), ..
            }) => None,
            Expr::Lit(_) => Some("expected `true` or `false`".into()),
            _ => None,
        };
    }
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Int(int), ..
        }) => match int.base10_parse::<u64>() {
            Ok(n) if u32::try_from(n).is_err() => {
                Some(format!("{n} is too large: option values are `u32`"))
            }
            Ok(_) => None,
            Err(error) => Some(error.to_string()),
        },
        Expr::Unary(ExprUnary {
            op: UnOp::Neg(_), ..
        }) => Some(format!("`{name}` cannot be negative")),
        Expr::Lit(_) => Some("expected a whole number of seconds or attempts".into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use syn::parse_quote;

    use super::literal_problem;
    use crate::errors::Errors;

    #[test]
    fn checks_literal_options() {
        assert_eq!(literal_problem("timeout", &parse_quote!(30)), None);
        assert_eq!(literal_problem("base_delay", &parse_quote!(0)), None);
        assert_eq!(literal_problem("timeout", &parse_quote!(CONST)), None);
        // In range or not: the bounds are pgflow-core's, checked by the expansion.
        assert_eq!(literal_problem("timeout", &parse_quote!(0)), None);
        assert!(literal_problem("max_attempts", &parse_quote!(-1)).is_some());
        assert!(literal_problem("max_attempts", &parse_quote!(5_000_000_000)).is_some());
        // In `u32`: its range is checked against pgflow-core's bound by the expansion.
        assert_eq!(
            literal_problem("timeout", &parse_quote!(2_147_483_646)),
            None
        );
        assert!(literal_problem("max_attempts", &parse_quote!("3")).is_some());
        assert!(literal_problem("max_delay", &parse_quote!(true)).is_some());
        assert_eq!(literal_problem("max_delay", &parse_quote!(60)), None);
    }

    #[test]
    fn modes_by_name() {
        let mut errors = Errors::default();
        assert_eq!(
            super::mode("when_unmet", &parse_quote!(skip_cascade), &mut errors),
            Some(super::Mode::SkipCascade)
        );
        assert_eq!(
            super::mode("when_unmet", &parse_quote!("skip-cascade"), &mut errors),
            Some(super::Mode::SkipCascade)
        );
        assert_eq!(
            super::mode("when_unmet", &parse_quote!(fail), &mut errors),
            Some(super::Mode::Fail)
        );
        assert!(errors.is_empty());
        for bad in [
            parse_quote!(skip - cascade),
            parse_quote!(Skip),
            parse_quote!("skip_cascade"),
            parse_quote!(1),
        ] {
            let mut errors = Errors::default();
            assert_eq!(super::mode("when_exhausted", &bad, &mut errors), None);
            assert!(!errors.is_empty());
        }
    }

    #[test]
    fn jitter_takes_a_bool() {
        assert_eq!(literal_problem("jitter", &parse_quote!(true)), None);
        assert_eq!(literal_problem("jitter", &parse_quote!(false)), None);
        assert_eq!(literal_problem("jitter", &parse_quote!(SPREAD)), None);
        assert_eq!(
            literal_problem("jitter", &parse_quote!(1)),
            Some("expected `true` or `false`".into())
        );
        assert!(literal_problem("jitter", &parse_quote!("yes")).is_some());
    }
}

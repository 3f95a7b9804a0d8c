//! Checks what can be checked before types exist: the slug, the form of literal option values,
//! and the rules of map steps. The ranges of option values are pgflow-core's, which this crate
//! cannot read: `expand` has the compiler check literal values against them.

use quote::ToTokens;
use syn::ext::IdentExt;
use syn::{Expr, ExprLit, ExprUnary, Lit, UnOp};

use crate::ast::StepFn;
use crate::attr::{Args, FLAG};
use crate::errors::Errors;
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

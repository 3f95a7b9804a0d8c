//! Parses the arguments of `#[step(...)]`.

use proc_macro2::{Span, TokenStream};
use syn::meta::ParseNestedMeta;
use syn::parse::ParseStream;
use syn::punctuated::Punctuated;
use syn::{Expr, Ident, LitStr, Path, Token, bracketed};

use crate::pattern::Pattern;

/// The arguments of one `#[step(...)]`, as written.
#[derive(Default)]
pub(crate) struct Args {
    /// `map`: where it was written.
    pub(crate) map: Option<Span>,
    /// `depends_on = [a, b]`: where the list is, and the step paths.
    pub(crate) depends_on: Option<(Span, Vec<Path>)>,
    /// `slug = "..."`.
    pub(crate) slug: Option<LitStr>,
    /// `max_attempts`, `base_delay`, `timeout`, `start_delay`, `max_delay`, `jitter`, in the
    /// order written.
    pub(crate) options: Vec<(Ident, Expr)>,
    /// `crate = "..."`.
    pub(crate) krate: Option<Path>,
    /// `if_input = ..`: the pattern the input must contain.
    pub(crate) if_input: Option<PatternArg>,
    /// `if_not = ..`: the pattern the input must not contain.
    pub(crate) if_not: Option<PatternArg>,
    /// `when_unmet = ..`, as written (checked by `valid`).
    pub(crate) when_unmet: Option<Expr>,
    /// `when_exhausted = ..`, as written (checked by `valid`).
    pub(crate) when_exhausted: Option<Expr>,
}

/// A condition pattern given to `if_input` or `if_not`.
pub(crate) enum PatternArg {
    /// Written inline, typed: `Input { .. }` or `{ dependency: .. }`.
    Typed(Pattern),
    /// Any other expression: a `serde_json::Value` object, unchecked.
    Raw(Expr),
}

impl PatternArg {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        if input.peek(syn::token::Brace) {
            return input.parse().map(Self::Typed);
        }
        let fork = input.fork();
        if Path::parse_mod_style(&fork).is_ok() && fork.peek(syn::token::Brace) {
            return input.parse().map(Self::Typed);
        }
        input.parse().map(Self::Raw)
    }
}

/// The options a step accepts: those of `add_step` in SQL order, then those of
/// `set_retry_policy`.
pub(crate) const OPTIONS: [&str; 6] = [
    "max_attempts",
    "base_delay",
    "timeout",
    "start_delay",
    "max_delay",
    "jitter",
];

/// The one option whose value is a `bool`; the others are counts or times.
pub(crate) const FLAG: &str = "jitter";

impl Args {
    /// Parses the attribute's arguments.
    pub(crate) fn parse(tokens: TokenStream) -> syn::Result<Self> {
        let mut args = Self::default();
        let parser = syn::meta::parser(|meta| args.parse_one(&meta));
        syn::parse::Parser::parse2(parser, tokens)?;
        Ok(args)
    }

    fn parse_one(&mut self, meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
        let path = &meta.path;
        if path.is_ident("map") {
            if self.map.is_some() {
                return Err(meta.error("`map` is given twice"));
            }
            self.map = Some(syn::spanned::Spanned::span(path));
        } else if path.is_ident("depends_on") {
            if self.depends_on.is_some() {
                return Err(meta.error("`depends_on` is given twice; list every dependency once: `depends_on = [a, b]`"));
            }
            let value = meta.value()?;
            let (span, paths) = if value.peek(syn::token::Bracket) {
                let content;
                let brackets = bracketed!(content in value);
                let paths = Punctuated::<Path, Token![,]>::parse_terminated(&content)?;
                (brackets.span.join(), paths.into_iter().collect())
            } else {
                let path: Path = value.parse()?;
                (syn::spanned::Spanned::span(&path), vec![path])
            };
            self.depends_on = Some((span, paths));
        } else if path.is_ident("slug") {
            if self.slug.is_some() {
                return Err(meta.error("`slug` is given twice"));
            }
            self.slug = Some(meta.value()?.parse()?);
        } else if path.is_ident("crate") {
            let lit: LitStr = meta.value()?.parse()?;
            self.krate = Some(lit.parse()?);
        } else if path.is_ident("if_input") || path.is_ident("if_not") {
            let slot = if path.is_ident("if_input") {
                &mut self.if_input
            } else {
                &mut self.if_not
            };
            if slot.is_some() {
                return Err(meta.error("this condition is given twice; a step has one pattern it must contain (`if_input`) and one it must not (`if_not`)"));
            }
            *slot = Some(PatternArg::parse(meta.value()?)?);
        } else if path.is_ident("when_unmet") || path.is_ident("when_exhausted") {
            let slot = if path.is_ident("when_unmet") {
                &mut self.when_unmet
            } else {
                &mut self.when_exhausted
            };
            if slot.is_some() {
                return Err(meta.error("this mode is given twice"));
            }
            *slot = Some(meta.value()?.parse()?);
        } else if let Some(name) = OPTIONS.iter().find(|name| path.is_ident(name)) {
            if self.options.iter().any(|(given, _)| given == name) {
                return Err(meta.error(format_args!("`{name}` is given twice")));
            }
            let ident = Ident::new(name, syn::spanned::Spanned::span(path));
            self.options.push((ident, meta.value()?.parse()?));
        } else {
            return Err(meta.error(
                "unknown `#[step]` argument; expected `map`, `depends_on = [..]`, `slug = \"..\"`, \
                 `max_attempts`, `base_delay`, `timeout`, `start_delay`, `max_delay`, `jitter`, \
                 `if_input`, `if_not`, `when_unmet`, `when_exhausted` or `crate = \"..\"`",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use quote::quote;

    use super::*;

    #[test]
    fn parses_every_argument() {
        let args = Args::parse(quote!(
            map,
            depends_on = [a, b::c],
            slug = "x",
            timeout = 30,
            max_attempts = N,
            max_delay = 60,
            jitter = true,
            crate = "pg"
        ))
        .unwrap();
        assert!(args.map.is_some());
        let (_, deps) = args.depends_on.unwrap();
        assert_eq!(deps.len(), 2);
        assert_eq!(args.slug.unwrap().value(), "x");
        let names: Vec<String> = args.options.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(names, ["timeout", "max_attempts", "max_delay", "jitter"]);
        assert!(args.krate.unwrap().is_ident("pg"));
    }

    #[test]
    fn parses_conditions() {
        let args = Args::parse(quote!(
            depends_on = [charge],
            if_input = { charge: { status: "paid" } },
            if_not = serde_json::json!({"charge": {"flagged": true}}),
            when_unmet = skip_cascade,
            when_exhausted = "skip"
        ))
        .unwrap();
        assert!(matches!(args.if_input, Some(PatternArg::Typed(_))));
        assert!(matches!(args.if_not, Some(PatternArg::Raw(_))));
        assert!(args.when_unmet.is_some() && args.when_exhausted.is_some());
        let args = Args::parse(quote!(if_input = Order { plan: "premium" })).unwrap();
        assert!(matches!(args.if_input, Some(PatternArg::Typed(_))));
        assert!(Args::parse(quote!(if_input = { a: 1 }, if_input = { a: 2 })).is_err());
        assert!(Args::parse(quote!(when_unmet = skip, when_unmet = fail)).is_err());
    }

    #[test]
    fn single_dependency_without_brackets() {
        let args = Args::parse(quote!(depends_on = a)).unwrap();
        assert_eq!(args.depends_on.unwrap().1.len(), 1);
    }

    #[test]
    fn rejects_unknown_and_repeated() {
        assert!(Args::parse(quote!(retries = 3)).is_err());
        assert!(Args::parse(quote!(timeout = 3, timeout = 4)).is_err());
        assert!(Args::parse(quote!(jitter = true, jitter = false)).is_err());
        assert!(Args::parse(quote!(map, map)).is_err());
    }
}

//! Condition patterns, as `pattern!(..)` and `#[step(if_input = .., if_not = ..)]` write them:
//! parsed here, and expanded into the JSON object plus code that type-checks only if every
//! field named exists (closures that are never called).
//!
//! ```text
//! pattern  := Type '{' fields '}'        on the flow input, of type `Type`
//!           | '{' entries '}'            on the outputs of dependencies, keyed by slug
//! fields   := (ident ':' value),*        a field of the type (raw identifiers lose their `r#`)
//! entries  := (path ':' value),*         a dependency, by the path that names the step
//! value    := '{' fields '}'             a nested object: its fields are checked in turn
//!           | expr                       a leaf, written as JSON by serde
//! ```

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::spanned::Spanned;
use syn::{Expr, Ident, Path, Token, braced};

/// A pattern, as written.
pub(crate) enum Pattern {
    /// `Type { fields }`: on the flow input.
    Input {
        /// The input type.
        ty: Path,
        /// Its fields.
        fields: Fields,
    },
    /// `{ step: value, .. }`: on the outputs of dependencies.
    Dependencies {
        /// Where the braces are.
        span: Span,
        /// Each dependency and what its output must contain.
        entries: Vec<(Path, Value)>,
    },
}

/// The fields of an object, in the order written.
pub(crate) struct Fields(Vec<(Ident, Value)>);

/// What a field or a dependency must contain.
pub(crate) enum Value {
    /// A nested object, whose fields are checked.
    Object(Fields),
    /// A leaf value.
    Leaf(Box<Expr>),
}

impl Parse for Pattern {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        if input.peek(syn::token::Brace) {
            let content;
            let braces = braced!(content in input);
            let mut entries = Vec::new();
            while !content.is_empty() {
                let path = Path::parse_mod_style(&content)?;
                content.parse::<Token![:]>()?;
                entries.push((path, content.parse()?));
                if content.is_empty() {
                    break;
                }
                content.parse::<Token![,]>()?;
            }
            return Ok(Self::Dependencies {
                span: braces.span.join(),
                entries,
            });
        }
        let ty = Path::parse_mod_style(input).map_err(|error| {
            syn::Error::new(
                error.span(),
                "expected a pattern: `Input { field: value, .. }` on the flow input, or \
                 `{ dependency: { field: value, .. }, .. }` on dependencies' outputs",
            )
        })?;
        if !input.peek(syn::token::Brace) {
            return Err(input.error(format_args!(
                "expected `{{` after `{}`: a pattern on the flow input is written `{} {{ field: value, .. }}`",
                ty.to_token_stream(),
                ty.to_token_stream()
            )));
        }
        let content;
        braced!(content in input);
        Ok(Self::Input {
            ty,
            fields: content.parse()?,
        })
    }
}

impl Parse for Fields {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut fields = Vec::new();
        while !input.is_empty() {
            let name = Ident::parse_any(input)?;
            input.parse::<Token![:]>()?;
            fields.push((name, input.parse()?));
            if input.is_empty() {
                break;
            }
            input.parse::<Token![,]>()?;
        }
        Ok(Self(fields))
    }
}

impl Parse for Value {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        if input.peek(syn::token::Brace) {
            let content;
            braced!(content in input);
            Ok(Self::Object(content.parse()?))
        } else {
            Ok(Self::Leaf(Box::new(input.parse()?)))
        }
    }
}

impl Pattern {
    /// The expression that builds the pattern (a `Pattern<OnInput<..>>` or
    /// `Pattern<OnDependencies<..>>`), with its field checks.
    pub(crate) fn expand(&self, private: &TokenStream) -> TokenStream {
        match self {
            Self::Input { ty, fields } => {
                let on = Ident::new("__pgflow_on", Span::mixed_site());
                let checks = fields.checks(&quote!(#on));
                let param = if checks.is_empty() {
                    quote!(_)
                } else {
                    quote!(#on)
                };
                let object = fields.entries(private);
                quote! {
                    #private::on_input(|#param: &#ty| { #(#checks)* }, #object)
                }
            }
            Self::Dependencies { entries, .. } => {
                let out = Ident::new("__pgflow_out", Span::mixed_site());
                let list = entries.iter().rev().fold(
                    quote!(#private::no_dependencies()),
                    |rest, (step, value)| {
                        let (checks, json) = match value {
                            Value::Object(fields) => {
                                (fields.checks(&quote!(#out)), fields.object(private))
                            }
                            Value::Leaf(expr) => (Vec::new(), leaf(expr, private)),
                        };
                        let param = if checks.is_empty() {
                            quote!(_)
                        } else {
                            quote!(#out)
                        };
                        quote_spanned! {step.span()=>
                            #private::dependency(&#step, |#param| { #(#checks)* }, #json, #rest)
                        }
                    },
                );
                quote!(#private::on_dependencies(#list))
            }
        }
    }

    /// The dependencies a pattern on dependencies names.
    pub(crate) fn dependencies(&self) -> &[(Path, Value)] {
        match self {
            Self::Dependencies { entries, .. } => entries,
            Self::Input { .. } => &[],
        }
    }
}

impl Fields {
    /// `let _ = &<base>.field;` for every field, nested ones through their parents: each
    /// compiles only if the field exists, and an error points at its name.
    fn checks(&self, base: &TokenStream) -> Vec<TokenStream> {
        let mut checks = Vec::new();
        for (name, value) in &self.0 {
            let access = quote!(#base.#name);
            match value {
                Value::Object(fields) if !fields.0.is_empty() => {
                    checks.extend(fields.checks(&access));
                }
                _ => checks.push(quote!(let _ = &#access;)),
            }
        }
        checks
    }

    /// `[("name", json), ..]`.
    fn entries(&self, private: &TokenStream) -> TokenStream {
        let entries = self.0.iter().map(|(name, value)| {
            let key = name.unraw().to_string();
            let json = match value {
                Value::Object(fields) => fields.object(private),
                Value::Leaf(expr) => leaf(expr, private),
            };
            quote!((#key, #json))
        });
        quote!([#(#entries),*])
    }

    /// The JSON object of these fields.
    fn object(&self, private: &TokenStream) -> TokenStream {
        let entries = self.entries(private);
        quote!(#private::object(#entries))
    }
}

/// A leaf value as JSON, spanned at the value so that a type that cannot be serialized is
/// reported there.
fn leaf(expr: &Expr, private: &TokenStream) -> TokenStream {
    quote_spanned!(expr.span()=> #private::leaf(&(#expr)))
}

#[cfg(test)]
mod tests {
    use quote::quote;

    use super::*;

    fn parse(tokens: TokenStream) -> syn::Result<Pattern> {
        syn::parse2(tokens)
    }

    #[test]
    fn parses_both_forms() {
        let Pattern::Input { ty, fields } =
            parse(quote!(crate::Order { plan: "premium", customer: { tier: GOLD }, r#type: 1, }))
                .unwrap()
        else {
            panic!("not an input pattern")
        };
        assert_eq!(ty.to_token_stream().to_string(), "crate :: Order");
        let names: Vec<String> = fields.0.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(names, ["plan", "customer", "r#type"]);
        assert!(matches!(fields.0[1].1, Value::Object(_)));

        let pattern = parse(quote!({ charge: { status: "paid" }, steps::flag: true })).unwrap();
        let deps: Vec<String> = pattern
            .dependencies()
            .iter()
            .map(|(p, _)| p.to_token_stream().to_string())
            .collect();
        assert_eq!(deps, ["charge", "steps :: flag"]);
        assert!(parse(quote!({})).is_ok());
    }

    #[test]
    fn expands_checks_and_keys() {
        let private = quote!(p);
        let pattern = parse(quote!(Order { r#type: "a", customer: { tier: "gold" } })).unwrap();
        let code = pattern.expand(&private).to_string();
        assert!(code.contains("\"type\""), "{code}");
        assert!(code.contains("let _ = & __pgflow_on . r#type ;"), "{code}");
        assert!(
            code.contains("let _ = & __pgflow_on . customer . tier ;"),
            "{code}"
        );
    }

    #[test]
    fn rejects_what_is_not_a_pattern() {
        assert!(parse(quote!(Order)).is_err());
        assert!(parse(quote!(Order { plan })).is_err());
        assert!(parse(quote!({ charge })).is_err());
        assert!(parse(quote!(Order { a: 1 b: 2 })).is_err());
        assert!(parse(quote!("text")).is_err());
    }
}

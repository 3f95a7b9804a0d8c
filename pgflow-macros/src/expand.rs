//! Writes the code for `#[step]`: a unit struct named like the function, the function itself
//! as the struct's `call`, and the `Step`/`StepOf` impls whose handler decodes the task input.

use proc_macro2::{Group, Literal, Span, TokenStream, TokenTree};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Attribute, Expr, ExprLit, Ident, ItemFn, Lit, Path};

use crate::ast::{Role, StepFn};
use crate::attr::{Args, FLAG, PatternArg};
use crate::errors::Errors;
use crate::pattern::Pattern;
use crate::valid::{self, Mode};

/// The whole expansion of `#[step(args)] item`.
pub(crate) fn step(args: TokenStream, item: &TokenStream) -> TokenStream {
    let item: ItemFn = match syn::parse2(item.clone()) {
        Ok(item) => item,
        Err(error) => {
            let error = syn::Error::new(error.span(), "`#[step]` goes on an `async fn`");
            let error = error.to_compile_error();
            return quote!(#error #item);
        }
    };
    let mut errors = Errors::default();
    let (args, args_ok) = match Args::parse(args) {
        Ok(args) => (args, true),
        Err(error) => {
            errors.push(error);
            (Args::default(), false)
        }
    };
    let private = match &args.krate {
        Some(krate) => quote!(#krate::__private),
        None => quote!(::pgflow::__private),
    };
    // With unreadable arguments, the parameters cannot be classified: report only that.
    let mut read_errors = Errors::default();
    let Some(step) = StepFn::read(item.clone(), &args, &mut read_errors) else {
        if args_ok {
            errors = read_errors;
        }
        let errors = errors.into_compile_errors();
        return quote!(#errors #item);
    };
    if !args_ok {
        let fallback = fallback(&step, &args, &step.item.sig.ident.to_string(), &private);
        let errors = errors.into_compile_errors();
        return quote!(#errors #fallback);
    }
    errors = read_errors;
    let slug = valid::validate(&step, &args, &mut errors);
    if errors.is_empty() {
        expand(&step, &args, &slug, &private)
    } else {
        let fallback = fallback(&step, &args, &slug, &private);
        let errors = errors.into_compile_errors();
        quote!(#errors #fallback)
    }
}

/// The expansion of a valid step.
fn expand(step: &StepFn, args: &Args, slug: &str, private: &TokenStream) -> TokenStream {
    let name = &step.item.sig.ident;
    let cfgs = cfg_attrs(&step.item.attrs);
    let common = common(step, slug);
    let deps: Vec<&Path> = dependencies(args);
    let deps_list = deps
        .iter()
        .rev()
        .fold(quote!(()), |rest, dep| quote!((#dep, #rest)));
    let is_map = args.map.is_some();
    let kind = if is_map { quote!(Map) } else { quote!(Single) };
    let options = args
        .options
        .iter()
        .map(|(name, value)| quote!(.#name(#value)));
    let option_checks = option_checks(args, &cfgs, private);

    let arg = |i: usize| format_ident!("__pgflow_arg{}", i);
    let needs_fields = step
        .params
        .iter()
        .any(|p| matches!(p.role, Role::Input | Role::Dependency(_)));
    let fields = needs_fields
        .then(|| quote!(let mut __pgflow_fields = #private::Fields::new(__pgflow_input)?;));
    let decode = step.params.iter().enumerate().map(|(i, param)| {
        let a = arg(i);
        let ty = &param.ty;
        match param.role {
            Role::Context => quote!(),
            Role::Input => {
                quote_spanned!(ty.span()=> let #a: #ty = __pgflow_fields.flow_input()?;)
            }
            Role::Dependency(d) => {
                let dep = deps[d];
                // The step value is bound first, so that a type mismatch is reported at the
                // parameter's type alone.
                let value = format_ident!("__pgflow_dep{}", i, span = ty.span());
                let check = quote_spanned!(ty.span()=>
                    let #a: #ty = __pgflow_fields.dependency::<_, #ty>(&#value)?;
                );
                quote! {
                    let #value = #dep();
                    #check
                }
            }
            Role::Element => {
                quote_spanned!(ty.span()=> let #a: #ty = #private::element(__pgflow_input)?;)
            }
        }
    });
    let call_args = step.params.iter().enumerate().map(|(i, param)| {
        let value = match param.role {
            Role::Context => quote!(__pgflow_ctx),
            _ => {
                let a = arg(i);
                quote!(#a)
            }
        };
        if param.by_ref { quote!(&#value) } else { value }
    });
    let output = &step.output;
    let return_span = step.item.sig.output.span();
    let map_err = quote_spanned!(return_span=> .map_err(#private::step_error));
    // Spanned (every token) at the output type, so that an output that is not serializable
    // fails the same check at the same place as `type Output`, and is reported once.
    let encode = respan(
        if is_map {
            quote! {
                #private::encode_single_item(
                    #private::CheckedOutput::checked(::std::vec![__pgflow_output])
                )
            }
        } else {
            quote!(#private::encode(#private::CheckedOutput::checked(__pgflow_output)))
        },
        output.span(),
    );
    let map_check = match (is_map, deps.first(), step.element()) {
        (true, Some(dep), Some(element)) => {
            let ty = &element.ty;
            quote_spanned!(ty.span()=>
                #private::assert_map_over::<<#dep as #private::Step>::Output, #ty>();
            )
        }
        _ => quote!(),
    };
    let condition = Condition::of(step, args, private);
    let step_of = step_of_header(
        step,
        is_map && deps.is_empty(),
        condition.input.as_ref(),
        private,
    );
    let step_output = step_output(step, is_map, private);
    let skip_types = &condition.types;
    let shape_fn = &condition.shape;

    quote! {
        #common

        #option_checks

        #(#cfgs)*
        impl #private::Step for #name {
            #step_output
            type Deps = #deps_list;
            #skip_types

            fn slug(&self) -> &str {
                #slug
            }

            fn kind(&self) -> #private::StepKind {
                #private::StepKind::#kind
            }

            fn options(&self) -> #private::StepOptions {
                #private::StepOptions::new() #(#options)*
            }

            fn dependencies(&self) -> ::std::vec::Vec<::std::string::String> {
                ::std::vec![#(::std::string::ToString::to_string(#private::Step::slug(&#deps()))),*]
            }

            #shape_fn
        }

        #(#cfgs)*
        #step_of {
            fn handler(&self) -> #private::Arc<dyn #private::ErasedHandler> {
                #[allow(unused_variables, unused_mut)]
                async fn __pgflow_handler(
                    __pgflow_input: #private::Value,
                    __pgflow_ctx: #private::StepContext,
                ) -> ::core::result::Result<#private::Value, #private::StepError> {
                    #fields
                    #(#decode)*
                    let __pgflow_output = #name::call(#(#call_args),*).await #map_err?;
                    #encode
                }
                #map_check
                #private::erase(__pgflow_handler)
            }
        }
    }
}

/// Checks the literal option values against pgflow-core's bounds (`StepOptions::problem`), at
/// compile time: a constant per value, whose evaluation panics with the rule the value breaks.
/// The error is reported at the literal, and names the constant, which is why each is named
/// after its option (inside an unnamed constant, so that the names stay local).
fn option_checks(args: &Args, cfgs: &[&Attribute], private: &TokenStream) -> TokenStream {
    let checks: Vec<TokenStream> = args
        .options
        .iter()
        .filter(|(name, _)| name != FLAG)
        .filter_map(|(name, value)| {
            let Expr::Lit(ExprLit {
                lit: Lit::Int(int), ..
            }) = value
            else {
                return None;
            };
            // Unsuffixed: a wrong suffix is the setter's type error, reported once, there.
            let mut int_value = Literal::u32_unsuffixed(int.base10_parse().ok()?);
            int_value.set_span(int.span());
            let option = name.to_string();
            Some(quote_spanned! {int.span()=>
                #[allow(non_upper_case_globals, dead_code)]
                const #name: () = if let ::core::option::Option::Some(rule) =
                    #private::StepOptions::problem(#option, #int_value)
                {
                    ::core::panic!("{}", rule)
                };
            })
        })
        .collect();
    if checks.is_empty() {
        return TokenStream::new();
    }
    quote! {
        #(#cfgs)*
        const _: () = { #(#checks)* };
    }
}

/// What the expansion emits when the step is invalid: the struct, its `call` and lenient
/// impls, so that the errors above are the only ones the user sees, besides those of the
/// literal option values: their bounds are pgflow-core's, which only the compiler can ask.
fn fallback(step: &StepFn, args: &Args, slug: &str, private: &TokenStream) -> TokenStream {
    let name = &step.item.sig.ident;
    let cfgs = cfg_attrs(&step.item.attrs);
    let common = common(step, slug);
    let output = step_output(step, args.map.is_some(), private);
    let option_checks = option_checks(args, &cfgs, private);
    quote! {
        #common
        #option_checks

        #(#cfgs)*
        impl #private::Step for #name {
            #output
            type Deps = ();
            type Skip = #private::NotSkippable;
            type Cascade = #private::NotSkippable;

            fn slug(&self) -> &str {
                #slug
            }

            fn kind(&self) -> #private::StepKind {
                #private::StepKind::Single
            }

            fn options(&self) -> #private::StepOptions {
                #private::StepOptions::new()
            }

            fn dependencies(&self) -> ::std::vec::Vec<::std::string::String> {
                ::std::vec::Vec::new()
            }
        }

        #(#cfgs)*
        impl<__PgflowInput> #private::StepOf<__PgflowInput> for #name {
            fn handler(&self) -> #private::Arc<dyn #private::ErasedHandler> {
                async fn __pgflow_handler(
                    _: #private::Value,
                    _: #private::StepContext,
                ) -> ::core::result::Result<#private::Value, #private::StepError> {
                    ::core::result::Result::Err(#private::StepError::new("invalid #[step]"))
                }
                #private::erase(__pgflow_handler)
            }
        }
    }
}

/// The step's struct (in the type namespace), the function of the same name that returns it
/// (in the value namespace), and the original function as the struct's `call`: emitted for
/// valid and invalid steps alike.
///
/// A unit struct would be shorter, but its name would then capture every `let` pattern and
/// closure parameter of the same name in scope (`let charge = ...` would try to match the unit
/// struct); a function's name is shadowed by them like any other.
fn common(step: &StepFn, slug: &str) -> TokenStream {
    let item = &step.item;
    let name = &item.sig.ident;
    let vis = &item.vis;
    let cfgs = cfg_attrs(&item.attrs);
    let docs: Vec<&Attribute> = item
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .collect();
    let others = item
        .attrs
        .iter()
        .filter(|a| !a.path().is_ident("doc") && !a.path().is_ident("cfg"));
    let mut sig = item.sig.clone();
    sig.ident = Ident::new("call", sig.ident.span());
    let block = &item.block;
    let slug_doc = format!("The step's slug: `{slug}`.");

    quote! {
        #(#docs)*
        #(#cfgs)*
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy)]
        #vis struct #name {}

        #(#docs)*
        #(#cfgs)*
        #[allow(dead_code)]
        #vis fn #name() -> #name {
            #name {}
        }

        #(#cfgs)*
        impl #name {
            #[doc = #slug_doc]
            #[allow(dead_code)]
            #vis const SLUG: &'static str = #slug;

            /// Calls the step's function directly, without the engine (for tests).
            #(#others)*
            #[allow(dead_code)]
            #vis #sig #block
        }
    }
}

/// The step's `type Output = ...;`: what one call returns, or a `Vec` of it for a map step,
/// named through `CheckedOutput` and spanned at the function's output type, so that an output
/// that is not serializable yields one error there.
fn step_output(step: &StepFn, is_map: bool, private: &TokenStream) -> TokenStream {
    let output = &step.output;
    let ty = if is_map {
        quote!(::std::vec::Vec<#output>)
    } else {
        quote!(#output)
    };
    respan(
        quote!(type Output = <#ty as #private::CheckedOutput>::Type;),
        output.span(),
    )
}

/// `tokens`, every one of them spanned at `span` (quote_spanned! leaves interpolated tokens
/// as they were).
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut token| {
            if let TokenTree::Group(group) = &token {
                let mut inner = Group::new(group.delimiter(), respan(group.stream(), span));
                inner.set_span(span);
                token = TokenTree::Group(inner);
            } else {
                token.set_span(span);
            }
            token
        })
        .collect()
}

/// The `impl StepOf<...> for ...` header: for the flow input the step takes, the `Vec` a
/// root map step maps over, the type its condition is on, or any input.
fn step_of_header(
    step: &StepFn,
    root_map: bool,
    condition_input: Option<&Path>,
    private: &TokenStream,
) -> TokenStream {
    let name = &step.item.sig.ident;
    if let (true, Some(element)) = (root_map, step.element()) {
        let ty = &element.ty;
        return quote!(impl #private::StepOf<::std::vec::Vec<#ty>> for #name);
    }
    match (step.input(), condition_input) {
        (Some(input), _) => {
            let ty = &input.ty;
            quote!(impl #private::StepOf<#ty> for #name)
        }
        (None, Some(ty)) => quote!(impl #private::StepOf<#ty> for #name),
        (None, None) => quote!(impl<__PgflowInput> #private::StepOf<__PgflowInput> for #name),
    }
}

/// What a step's condition and modes add to its `Step` impl.
struct Condition {
    /// `type Skip = ..; type Cascade = ..;`.
    types: TokenStream,
    /// `fn shape(..)` when the step sets a condition or a mode, else nothing (the trait's).
    shape: TokenStream,
    /// The type a typed pattern on the flow input names, for a root step that takes no input.
    input: Option<Path>,
}

impl Condition {
    fn of(step: &StepFn, args: &Args, private: &TokenStream) -> Self {
        // Validated already: an invalid mode never reaches here.
        let mut ignored = Errors::default();
        let unmet = args
            .when_unmet
            .as_ref()
            .and_then(|expr| valid::mode("when_unmet", expr, &mut ignored));
        let exhausted = args
            .when_exhausted
            .as_ref()
            .and_then(|expr| valid::mode("when_exhausted", expr, &mut ignored));
        let has_condition = args.if_input.is_some() || args.if_not.is_some();
        let effective_unmet = unmet.unwrap_or(Mode::Skip);
        let effective_exhausted = exhausted.unwrap_or(Mode::Fail);
        let skips = (has_condition && effective_unmet.skips()) || effective_exhausted.skips();
        let cascades = (has_condition && effective_unmet == Mode::SkipCascade)
            || effective_exhausted == Mode::SkipCascade;
        let marker = |yes: bool| {
            if yes {
                quote!(#private::Skippable)
            } else {
                quote!(#private::NotSkippable)
            }
        };
        let (skip, cascade) = (marker(skips), marker(cascades));
        let types = quote! {
            type Skip = #skip;
            type Cascade = #cascade;
        };

        // The flow input a typed pattern on it must name: the step's input parameter, the
        // `Vec` a root map step maps over, or the first such pattern's type.
        let mut input_ty: Option<TokenStream> = match (args.map.is_some(), step.element()) {
            (true, Some(element)) if args.depends_on.is_none() => {
                let ty = &element.ty;
                Some(quote!(::std::vec::Vec<#ty>))
            }
            _ => step.input().map(|input| {
                let ty = &input.ty;
                quote!(#ty)
            }),
        };
        let mut input = None;
        let mut statements = Vec::new();
        for (field, arg) in [
            (quote!(required_input_pattern), &args.if_input),
            (quote!(forbidden_input_pattern), &args.if_not),
        ] {
            let Some(arg) = arg else { continue };
            let value = match arg {
                PatternArg::Typed(pattern) => {
                    if let Pattern::Input { ty, .. } = pattern {
                        match &input_ty {
                            Some(input_ty) => statements.push(quote_spanned! {ty.span()=>
                                #private::assert_input_is::<#input_ty, #ty>();
                            }),
                            None => {
                                input_ty = Some(quote!(#ty));
                                input = Some(ty.clone());
                            }
                        }
                    }
                    let built = pattern.expand(private);
                    quote!(#private::Pattern::to_value(&#built))
                }
                PatternArg::Raw(expr) => {
                    quote_spanned!(expr.span()=> #private::untyped_pattern(#expr))
                }
            };
            statements.push(quote!(shape.#field = ::core::option::Option::Some(#value);));
        }
        for (field, mode) in [
            (quote!(when_unmet), unmet),
            (quote!(when_exhausted), exhausted),
        ] {
            if let Some(mode) = mode {
                let variant = Ident::new(mode.variant(), Span::call_site());
                statements.push(quote!(shape.#field = #private::SkipMode::#variant;));
            }
        }
        let shape = if statements.is_empty() {
            TokenStream::new()
        } else {
            quote! {
                fn shape(&self) -> #private::StepShape {
                    let mut shape = #private::base_shape(self);
                    #(#statements)*
                    shape
                }
            }
        };
        Self {
            types,
            shape,
            input,
        }
    }
}

fn dependencies(args: &Args) -> Vec<&Path> {
    args.depends_on.iter().flat_map(|(_, deps)| deps).collect()
}

fn cfg_attrs(attrs: &[Attribute]) -> Vec<&Attribute> {
    attrs.iter().filter(|a| a.path().is_ident("cfg")).collect()
}

//! Reads the function under `#[step]` into a model: its output type and the role of each
//! parameter (flow input, dependency output, map element, or context).

use syn::{FnArg, GenericArgument, Ident, ItemFn, Pat, PathArguments, ReturnType, Type, TypePath};

use crate::attr::Args;
use crate::errors::Errors;

/// The function under `#[step]`.
pub(crate) struct StepFn {
    /// The function as written.
    pub(crate) item: ItemFn,
    /// `T` in its `Result<T, E>` return type: what one call outputs.
    pub(crate) output: Type,
    /// Its parameters, in order.
    pub(crate) params: Vec<Param>,
}

/// One parameter of the function.
pub(crate) struct Param {
    /// The pattern, as written (usually a name).
    pub(crate) pat: Pat,
    /// The type without a leading `&`.
    pub(crate) ty: Type,
    /// Whether the type was `&T`.
    pub(crate) by_ref: bool,
    /// What the parameter receives.
    pub(crate) role: Role,
}

/// What a parameter receives.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The flow input (`run`).
    Input,
    /// The output of the dependency at this index of `depends_on`.
    Dependency(usize),
    /// One element of what a map step maps over.
    Element,
    /// The `StepContext`.
    Context,
}

impl StepFn {
    /// Reads `item`. Returns `None` when the signature cannot be a step at all (not `async`,
    /// generic, a method...), in which case the function should be emitted unchanged.
    pub(crate) fn read(item: ItemFn, args: &Args, errors: &mut Errors) -> Option<Self> {
        let sig = &item.sig;
        let mut fatal = false;
        if sig.asyncness.is_none() {
            errors.at(
                sig.fn_token,
                "`#[step]` goes on an `async fn`: write `async fn` here",
            );
            fatal = true;
        }
        if let Some(token) = &sig.constness {
            errors.at(token, "a step function cannot be `const`");
            fatal = true;
        }
        if let Some(token) = &sig.unsafety {
            errors.at(token, "a step function cannot be `unsafe`");
            fatal = true;
        }
        if let Some(abi) = &sig.abi {
            errors.at(abi, "a step function cannot have an `extern` ABI");
            fatal = true;
        }
        if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
            errors.at(
                &sig.generics,
                "a step function cannot be generic: its parameter and output types are stored as JSON and must be concrete",
            );
            fatal = true;
        }
        if let Some(variadic) = &sig.variadic {
            errors.at(variadic, "a step function cannot be variadic");
            fatal = true;
        }
        let output = match &sig.output {
            ReturnType::Type(_, ty) => result_ok_type(ty).or_else(|| {
                errors.at(
                    ty,
                    "a step returns `Result<Output, StepError>` (any error type that converts into `StepError` works)",
                );
                None
            }),
            ReturnType::Default => {
                errors.at(
                    &sig.ident,
                    "a step returns `Result<Output, StepError>`: add a return type",
                );
                None
            }
        };

        let mut params = Vec::new();
        for input in &sig.inputs {
            match input {
                FnArg::Receiver(receiver) => {
                    errors.at(receiver, "`#[step]` goes on a free function, not a method");
                    fatal = true;
                }
                FnArg::Typed(typed) => {
                    let (ty, by_ref) = match &*typed.ty {
                        Type::Reference(reference) => {
                            if let Some(mutability) = reference.mutability {
                                errors.at(
                                    mutability,
                                    "a step parameter is taken by value or by shared reference, not `&mut`",
                                );
                            }
                            ((*reference.elem).clone(), true)
                        }
                        other => (other.clone(), false),
                    };
                    params.push(Param {
                        pat: (*typed.pat).clone(),
                        ty,
                        by_ref,
                        role: Role::Input,
                    });
                }
            }
        }
        let output = output?;
        if fatal {
            return None;
        }
        classify(&mut params, args, &item.sig.ident, errors);
        Some(Self {
            item,
            output,
            params,
        })
    }

    /// The parameter that receives the flow input, if any.
    pub(crate) fn input(&self) -> Option<&Param> {
        self.params.iter().find(|p| p.role == Role::Input)
    }

    /// The parameter that receives a map element, if any.
    pub(crate) fn element(&self) -> Option<&Param> {
        self.params.iter().find(|p| p.role == Role::Element)
    }
}

impl Param {
    /// The parameter's name, if its pattern is a plain name.
    pub(crate) fn name(&self) -> Option<&Ident> {
        match &self.pat {
            Pat::Ident(pat) => Some(&pat.ident),
            _ => None,
        }
    }
}

/// Sets each parameter's role.
fn classify(params: &mut [Param], args: &Args, step: &Ident, errors: &mut Errors) {
    let deps: Vec<&Ident> = args
        .depends_on
        .iter()
        .flat_map(|(_, paths)| paths)
        .filter_map(|path| path.segments.last().map(|s| &s.ident))
        .collect();
    let mut context_seen = false;
    let mut data_seen: Option<String> = None;
    for param in params.iter_mut() {
        if is_context(&param.ty) {
            if context_seen {
                errors.at(
                    &param.pat,
                    "the context is already a parameter of this step",
                );
            }
            context_seen = true;
            param.role = Role::Context;
            continue;
        }
        let name = param.name().map(ToString::to_string);
        if args.map.is_some() {
            param.role = Role::Element;
            if let Some(first) = &data_seen {
                errors.at(
                    &param.pat,
                    format_args!(
                        "a map step takes one element (here `{first}`) and optionally `&StepContext`, nothing else"
                    ),
                );
            }
            data_seen.get_or_insert_with(|| name.unwrap_or_else(|| "_".into()));
            continue;
        }
        if let Some(index) = param
            .name()
            .and_then(|name| deps.iter().position(|dep| *dep == name))
        {
            param.role = Role::Dependency(index);
            continue;
        }
        param.role = Role::Input;
        let this = name.unwrap_or_else(|| "_".into());
        if let Some(first) = &data_seen {
            errors.at(
                &param.pat,
                format_args!(
                    "step `{step}` takes more than one parameter that is neither a dependency nor the context (`{first}` and `{this}`)\n\
                     \n\
                     A step takes at most one flow input, the outputs of its dependencies (parameters named like a step listed in \
                     `depends_on`), and optionally `&StepContext`. If `{this}` is the output of a step, add it: \
                     `#[step(depends_on = [{this}])]`."
                ),
            );
        }
        data_seen.get_or_insert(this);
    }
}

/// Whether `ty` names `StepContext` (by any path).
fn is_context(ty: &Type) -> bool {
    match ty {
        Type::Path(TypePath { qself: None, path }) => path
            .segments
            .last()
            .is_some_and(|s| s.ident == "StepContext" && s.arguments.is_empty()),
        Type::Paren(inner) => is_context(&inner.elem),
        Type::Group(inner) => is_context(&inner.elem),
        _ => false,
    }
}

/// `T` in `Result<T, E>` or `Result<T>` (any path ending in `Result`).
fn result_ok_type(ty: &Type) -> Option<Type> {
    let Type::Path(TypePath { qself: None, path }) = ty else {
        return None;
    };
    let last = path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.first()? {
        GenericArgument::Type(ok) => Some(ok.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use quote::quote;

    use super::*;

    fn read(
        args: proc_macro2::TokenStream,
        item: proc_macro2::TokenStream,
    ) -> (Option<StepFn>, bool) {
        let args = Args::parse(args).unwrap();
        let mut errors = Errors::default();
        let step = StepFn::read(syn::parse2(item).unwrap(), &args, &mut errors);
        (step, errors.is_empty())
    }

    fn roles(step: &StepFn) -> Vec<Role> {
        step.params.iter().map(|p| p.role).collect()
    }

    #[test]
    fn classifies_by_name_and_type() {
        let (step, ok) = read(
            quote!(depends_on = [a, crate::b]),
            quote!(
                async fn s(
                    b: u8,
                    ctx: &pgflow::StepContext,
                    input: &In,
                    a: Vec<u8>,
                ) -> Result<u8, E> {
                    todo!()
                }
            ),
        );
        let step = step.unwrap();
        assert!(ok);
        assert!(
            roles(&step)
                == [
                    Role::Dependency(1),
                    Role::Context,
                    Role::Input,
                    Role::Dependency(0)
                ]
        );
        assert!(step.params[2].by_ref);
    }

    #[test]
    fn map_takes_one_element() {
        let (step, ok) = read(
            quote!(map),
            quote!(
                async fn s(x: u8, ctx: StepContext) -> Result<u8, E> {
                    todo!()
                }
            ),
        );
        assert!(ok);
        assert!(roles(&step.unwrap()) == [Role::Element, Role::Context]);
        let (_, ok) = read(
            quote!(map),
            quote!(
                async fn s(x: u8, y: u8) -> Result<u8, E> {
                    todo!()
                }
            ),
        );
        assert!(!ok);
    }

    #[test]
    fn rejects_what_cannot_be_a_step() {
        assert!(
            read(
                quote!(),
                quote!(
                    fn s() -> Result<u8, E> {
                        todo!()
                    }
                )
            )
            .0
            .is_none()
        );
        assert!(
            read(
                quote!(),
                quote!(
                    async fn s<T>() -> Result<T, E> {
                        todo!()
                    }
                )
            )
            .0
            .is_none()
        );
        assert!(
            read(
                quote!(),
                quote!(
                    async fn s() -> u8 {
                        todo!()
                    }
                )
            )
            .0
            .is_none()
        );
        let (step, ok) = read(
            quote!(),
            quote!(
                async fn s(a: u8, b: u8) -> Result<u8, E> {
                    todo!()
                }
            ),
        );
        assert!(step.is_some() && !ok);
    }
}

//! The `#[step]` attribute of pgflow. Use it through the `pgflow` crate, as `pgflow::step`;
//! its reference is the documentation of [`step`], which `pgflow` re-exports.
//!
//! The expansion is split in the usual stages: `attr` parses the attribute's arguments,
//! `ast` reads the function into a model of its parameters, `valid` checks what can be
//! checked without types (slugs, option literals, map rules), and `expand` writes the code.
//! Every problem found is reported at the offending tokens, all at once; the function is still
//! emitted so that the rest of the crate, and the IDE, keep working.

#![deny(missing_docs)]

use proc_macro::TokenStream;

mod ast;
mod attr;
mod errors;
mod expand;
mod pattern;
mod slug;
mod valid;

// The reference is a file of its own so that the `pgflow` crate can run its examples, which
// cannot run here: this crate cannot depend on the crate that re-exports it. Links in it are
// absolute URLs for the same reason, and because rustdoc resolves them from this crate even on
// the re-export's page.
#[doc = include_str!("step.md")]
#[proc_macro_attribute]
pub fn step(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::step(args.into(), &item.into()).into()
}

// Its reference is a file of its own for the reason `step`'s is.
#[doc = include_str!("pattern.md")]
#[proc_macro]
pub fn pattern(input: TokenStream) -> TokenStream {
    match syn::parse::<pattern::Pattern>(input) {
        Ok(pattern) => pattern.expand(&quote::quote!(::pgflow::__private)).into(),
        Err(error) => error.to_compile_error().into(),
    }
}

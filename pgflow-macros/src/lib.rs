//! The `#[step]` attribute of pgflow. Use it through the `pgflow` crate, which documents it.
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
mod slug;
mod valid;

/// Turns an `async fn` into a pgflow step: a unit struct named like the function. See the
/// `pgflow` crate for the full documentation.
#[proc_macro_attribute]
pub fn step(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::step(args.into(), &item.into()).into()
}

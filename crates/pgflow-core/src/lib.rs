//! The I/O-free heart of pgflow: the typed flow builder, flow shapes, SQL compilation and the
//! engine's schema as embedded text.

pub mod schema;

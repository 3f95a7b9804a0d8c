//! Talks to PostgreSQL for pgflow: installs pgmq and the engine schema, applies flows, starts and
//! follows runs, and runs workers inside your Tokio application.
//!
//! | feature | what it adds |
//! |---|---|
//! | `throwaway` | [`throwaway`]: a throwaway PostgreSQL server and fresh test databases |

mod error;
mod install;
#[cfg(feature = "throwaway")]
pub mod throwaway;

pub use error::{Error, Result};
pub use install::{InstallReport, install, install_pgmq};

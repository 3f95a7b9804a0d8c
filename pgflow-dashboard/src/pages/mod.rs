//! The pages, one module each, and the frame they share.

pub(crate) mod flows;
pub(crate) mod layout;
pub(crate) mod run;
pub(crate) mod runs;
pub(crate) mod schedules;
pub(crate) mod stuck;
pub(crate) mod workers;

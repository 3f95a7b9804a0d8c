//! Talks to PostgreSQL for pgflow: installs pgmq and the engine schema, applies flows, starts and
//! follows runs, and runs workers inside your Tokio application.

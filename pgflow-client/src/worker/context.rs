//! What a handler reaches through its [`StepContext`] when a worker runs it:
//! [`StepContextExt`], and the context extension behind it.

use std::any::Any;
use std::sync::Arc;

use pgflow_core::StepContext;
use sqlx::PgPool;

/// The extension every task's context carries, for [`StepContextExt`] to find the pool in.
pub(crate) fn extension(pool: PgPool) -> Arc<dyn Any + Send + Sync> {
    Arc::new(WorkerPool(pool))
}

/// The worker's pool, as a task's [`StepContext`] carries it for [`StepContextExt`].
struct WorkerPool(PgPool);

mod sealed {
    pub trait Sealed {}
    impl Sealed for pgflow_core::StepContext {}
}

/// What a handler reaches through its [`StepContext`] when a [`Worker`] runs it: the worker's
/// pool. (The application state given to [`WorkerBuilder::state`] is [`StepContext::state`].)
///
/// ```no_run
/// use pgflow_client::StepContextExt;
/// use pgflow_core::{StepContext, StepError};
///
/// async fn audit(ctx: &StepContext) -> Result<(), StepError> {
///     sqlx::query("INSERT INTO audit (run_id, step) VALUES ($1, $2)")
///         .bind(ctx.run_id())
///         .bind(ctx.step_slug())
///         .execute(ctx.pool())
///         .await?;
///     Ok(())
/// }
/// ```
///
/// [`Worker`]: super::Worker
/// [`WorkerBuilder::state`]: super::WorkerBuilder::state
pub trait StepContextExt: sealed::Sealed {
    /// The worker's pool, for the handler's own queries.
    ///
    /// # Panics
    ///
    /// If the context was not built by a [`Worker`] (for example [`StepContext::for_test`]); use
    /// [`try_pool`](Self::try_pool) where that can happen. In a handler run by a worker the
    /// panic would fail the attempt with this message.
    ///
    /// [`Worker`]: super::Worker
    fn pool(&self) -> &PgPool;

    /// The worker's pool, or `None` if the context was not built by a [`Worker`].
    ///
    /// [`Worker`]: super::Worker
    fn try_pool(&self) -> Option<&PgPool>;
}

impl StepContextExt for StepContext {
    fn pool(&self) -> &PgPool {
        match self.try_pool() {
            Some(pool) => pool,
            None => panic!(
                "StepContextExt::pool: this StepContext was not built by a pgflow worker, so it \
                 carries no pool (use try_pool in code that also runs outside a worker)"
            ),
        }
    }

    fn try_pool(&self) -> Option<&PgPool> {
        self.extension::<WorkerPool>().map(|pool| &pool.0)
    }
}

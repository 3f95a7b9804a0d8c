//! A handler's place under the worker's concurrency limit, and which read filled it.
//!
//! The poller tells from these how many of the places the last read filled are still taken:
//! those are the handlers worth waiting a moment for before the next read (their batch tends to
//! finish together), while a place held since an earlier read belongs to a slow handler, and
//! the next read goes ahead without it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::OwnedSemaphorePermit;

/// One permit of the worker's semaphore, counted in the places taken by its read.
#[derive(Debug)]
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    read: Arc<AtomicUsize>,
}

impl Slot {
    /// `permit`, counted in `read` until dropped.
    pub(crate) fn new(permit: OwnedSemaphorePermit, read: &Arc<AtomicUsize>) -> Self {
        read.fetch_add(1, Ordering::AcqRel);
        Self {
            _permit: permit,
            read: Arc::clone(read),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.read.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::Semaphore;

    use super::*;

    #[test]
    fn a_read_counts_the_places_it_filled_until_they_free() {
        let semaphore = Arc::new(Semaphore::new(3));
        let read = Arc::new(AtomicUsize::new(0));
        let first = Slot::new(Arc::clone(&semaphore).try_acquire_owned().unwrap(), &read);
        let second = Slot::new(Arc::clone(&semaphore).try_acquire_owned().unwrap(), &read);
        assert_eq!(read.load(Ordering::Acquire), 2);
        assert_eq!(semaphore.available_permits(), 1);
        drop(first);
        assert_eq!(read.load(Ordering::Acquire), 1);
        assert_eq!(semaphore.available_permits(), 2);
        drop(second);
        assert_eq!(read.load(Ordering::Acquire), 0);
        assert_eq!(semaphore.available_permits(), 3);
    }
}

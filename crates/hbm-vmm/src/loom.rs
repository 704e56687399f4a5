//! Crate-private shim in tokio's style: `loom`'s sync types under `cfg(loom)`, `std`'s otherwise,
//! so that the same code of [`crate::Hmm`] is model-checked.

#[cfg(loom)]
pub(crate) use loom::sync::{Arc, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::sync::{Arc, MutexGuard};

#[cfg(loom)]
use loom::sync::Mutex as Inner;
#[cfg(not(loom))]
use std::sync::Mutex as Inner;

/// A mutex whose `lock` never fails: a panic while holding it does not poison the data for
/// others (every critical section leaves the data consistent before anything can panic).
#[derive(Debug)]
pub(crate) struct Mutex<T>(Inner<T>);

impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        Mutex(Inner::new(value))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

//! The crate-private synchronisation shim, in tokio's style: under `cfg(loom)` the shared-state
//! types come from `loom` so that the same code is model-checked; otherwise from `std`.

#[cfg(loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};

#[cfg(not(loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};

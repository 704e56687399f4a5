//! The serving engine.

pub mod request;
pub mod sampling;
pub mod scheduler;

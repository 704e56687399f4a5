//! `moe-runtime`: the inference engine for Mixture-of-Experts models.
//!
//! It owns model configs (Hugging Face `config.json`), checkpoint I/O (safetensors, only the tensors a
//! device needs), synthetic weights for real architectures, and the `Compute` trait with its CPU
//! reference backend.
//!
//! Architecture invariants:
//! - it never decides *when* to scale (that is the `scaler`'s job);
//! - it never owns physical memory: weights and KV live in `hbm-vmm` chunks and are borrowed as views.
#![deny(unsafe_code)]

pub mod checkpoint;
pub mod compute;
pub mod config;
#[allow(unsafe_code)]
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod deployment;
pub mod engine;
pub mod model;
pub mod presets;
pub mod schema;
pub mod synth;
pub mod worker;

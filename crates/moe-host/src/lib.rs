//! `moe-host`: the host runner of the MoE engine, and the CPU reference every other backend is
//! checked against.
//!
//! It owns:
//! - [`compute`]: the host-slice [`compute::Compute`] trait (embed, RMS norm, rope, paged
//!   attention, router top-k, SwiGLU experts, combine, LM head) and [`compute::cpu::CpuCompute`],
//!   the reference, batch- and layout-invariant by a single fixed-order dot product;
//! - [`model`]: [`model::Model`], the forward pass cut into the seams the multi-device engine
//!   composes, over weights resident in `hbm-vmm` chunks ([`model::weights::DeviceWeights`]), its
//!   KV over a paged region ([`model::kv`]) and a one-device runner ([`model::runner`]);
//! - [`deployment`]: the [`deployment::WeightStore`] over `Hmm`, the immutable
//!   [`deployment::Deployment`] (views of weights and KV) and the [`deployment::DeploymentSlot`]
//!   the engine swaps between iterations;
//! - [`worker`]: one thread per device running an iteration together (expert-parallel exchange,
//!   combine in ascending expert id) and [`worker::DeploymentRunner`], the engine's `Runner` on the
//!   host; `worker::install` holds the live-scaling mechanics (KV budgets, switched-in instances,
//!   KV pre-copy).
//!
//! Model formats, layouts and the neutral shapes come from `moe-model`; requests, scheduling and
//! the `Runner` seam from `moe-engine`.
//!
//! Architecture invariants:
//! - it never decides *when* to scale or *which* placement to use (that is the scaler's job);
//! - it never owns physical memory: weights and KV live in `hbm-vmm` chunks and are borrowed as
//!   views;
//! - the CPU `Bf16Gemm` mode rounds activations at exactly the points where the CUDA `Bf16` mode
//!   feeds a GEMM (see [`compute`]), so each GPU precision has a reference with the same arithmetic
//!   contract;
//! - no unsafe code (`#![forbid(unsafe_code)]`), and no dependency on a GPU backend.
//!
//! # Example
//!
//! ```
//! use moe_engine::{FinishReason, Request};
//! use moe_host::worker::{DeploymentRunner, HostEngineConfig};
//! use moe_model::presets::Preset;
//! use moe_model::weights::MemTensors;
//!
//! let cfg = Preset::TinyQwen3.config();
//! let src = MemTensors::seeded(&cfg, 1);
//! let host = HostEngineConfig::default(); // one host device
//! let (engine, _store) = DeploymentRunner::host_engine(&cfg, &src, &host).unwrap();
//! let handle = engine.submit(Request::greedy(vec![1, 2, 3], 8)).unwrap();
//! let run = engine.start(); // iterations on a thread; submit keeps working meanwhile
//! let done = handle.wait();
//! assert_eq!((done.tokens.len(), done.finish), (8, FinishReason::Length));
//! run.stop();
//! ```
#![forbid(unsafe_code)]

pub mod compute;
pub mod deployment;
pub mod model;
pub mod worker;

//! `moe-model`: what a Mixture-of-Experts model *is*, independent of where and how it runs.
//!
//! It owns:
//! - [`config`]: Hugging Face `config.json` parsed into the architecture-neutral
//!   [`config::ModelConfig`] (Qwen3-MoE, Mixtral, DeepSeek-V2);
//! - [`schema`]: every tensor a config's real checkpoint has, with its name, shape, owner (global,
//!   layer, routed expert) and role;
//! - [`checkpoint`]: safetensors checkpoints, read tensor by tensor (only the tensors a device
//!   needs) and written shard by shard;
//! - [`presets`] and [`synth`]: the real models' configs and tiny ones of the same architectures,
//!   and seeded synthetic weights written as a Hugging Face model directory;
//! - [`weights`]: the compute-free weight layout (which chunk holds each tensor, at which offset:
//!   [`weights::ChunkLayout`], [`weights::WeightLayout`]) and where tensors are read from
//!   ([`weights::TensorSource`], [`weights::MemTensors`]);
//! - [`spec`]: the neutral shapes a backend reads (attention dimensions, the router's top-k rule,
//!   the paged KV geometry, the rope style).
//!
//! Architecture invariants:
//! - no compute and no devices: it never runs a kernel, never allocates or maps device memory and
//!   depends on no engine, runner or memory crate. Backends (`moe-host`, `moe-cuda`) and the
//!   scaler depend on it, never the reverse;
//! - reading a checkpoint reads only the tensors asked for, with positioned reads (no mmap, no
//!   whole-file reads);
//! - synthetic weights are a pure function of (seed, tensor name, index): chunking, order and
//!   thread count never change a value;
//! - no unsafe code (`#![forbid(unsafe_code)]`).
//!
//! # Example
//!
//! ```
//! use moe_model::presets::Preset;
//! use moe_model::schema::{ModelSchema, TensorOwner, TensorRole};
//! use moe_model::weights::WeightLayout;
//!
//! let cfg = Preset::TinyMixtral.config();
//! let schema = ModelSchema::new(&cfg);
//! let gate = schema.find(TensorOwner::Expert { layer: 1, expert: 3 }, TensorRole::Gate).unwrap();
//! assert_eq!(gate.shape, vec![cfg.moe.expert_intermediate_size, cfg.hidden_size]); // [out, in]
//! // One chunk per routed expert: [gate | up | down].
//! let layout = WeightLayout::new(&cfg);
//! assert_eq!(layout.expert_floats(), 3 * gate.numel());
//! ```
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod config;
pub mod presets;
pub mod schema;
pub mod spec;
pub mod synth;
pub mod weights;

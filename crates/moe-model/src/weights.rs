//! Compute-free weight layouts and tensor sources: where each tensor of a model sits inside its
//! chunk, and where tensors are read from.
//!
//! A device holds three kinds of chunk (every backend uses the same packing):
//! - one **global** chunk: embedding, final norm, LM head (absent when tied);
//! - one **layer** chunk per decoder layer: everything an attention rank replicates for that layer
//!   (both layer norms, attention, and the router, shared experts or dense MLP);
//! - one **expert** chunk per routed expert per MoE layer: `[gate | up | down]`, so the engine can
//!   remap whole experts between devices and into contiguous per-device ranges zero-copy.
//!
//! Tensors are packed in schema order at 64-byte-aligned offsets; a chunk's size is rounded up to
//! the device's allocation granularity. The typed views over chunk memory and the loader that
//! fills chunks live with the backends (`moe-host`'s `model::weights`, `moe-cuda`).
//!
//! ```
//! use moe_model::presets::Preset;
//! use moe_model::weights::{MemTensors, TensorSource, WeightLayout};
//! let cfg = Preset::TinyMixtral.config();
//! let layout = WeightLayout::new(&cfg);
//! // The embedding is the global chunk's first tensor, at offset 0.
//! let embed = &layout.global().tensors()[0];
//! assert_eq!(embed.offset, 0);
//! // A seeded in-memory source serves every tensor of the schema.
//! let src = MemTensors::seeded(&cfg, 1);
//! let mut out = vec![0f32; embed.len];
//! src.read_f32_into(&embed.name, &mut out).unwrap();
//! ```

use std::collections::BTreeMap;

use crate::config::ModelConfig;
use crate::schema::{self, TensorOwner, TensorRole, TensorSpec};

/// Alignment of tensors inside a chunk, in `f32` elements (64 bytes).
const ALIGN_FLOATS: usize = 16;

/// Where tensors are read from: a checkpoint, or memory in tests.
pub trait TensorSource {
    /// Reads tensor `name` as `f32` into `out`, whose length is the tensor's element count.
    fn read_f32_into(
        &self,
        name: &str,
        out: &mut [f32],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;

    /// Checks that the source's tensor matches `spec` (shape, readable dtype) before it is read.
    /// The default accepts everything; sources that know shapes should check them.
    fn check(&self, spec: &TensorSpec) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let _ = spec;
        Ok(())
    }

    /// Reads tensor `name` as little-endian bf16 into `out` (two bytes per element), rounding to
    /// nearest even from wider values: what a device in bf16 stores. The default goes through
    /// [`TensorSource::read_f32_into`]; a source that stores bf16 can copy its bytes instead.
    fn read_bf16_into(
        &self,
        name: &str,
        out: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if !out.len().is_multiple_of(2) {
            return Err(format!("{name}: a bf16 buffer of odd length {}", out.len()).into());
        }
        let mut f = vec![0f32; out.len() / 2];
        self.read_f32_into(name, &mut f)?;
        crate::checkpoint::encode_into(crate::config::DType::BF16, &f, out);
        Ok(())
    }
}

impl TensorSource for crate::checkpoint::Checkpoint {
    fn read_f32_into(
        &self,
        name: &str,
        out: &mut [f32],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        crate::checkpoint::Checkpoint::read_f32_into(self, name, out).map_err(Into::into)
    }

    fn check(&self, spec: &TensorSpec) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.check_spec(spec).map(|_| ()).map_err(Into::into)
    }

    /// Copies the stored bytes when the checkpoint holds bf16 (no conversion at all).
    fn read_bf16_into(
        &self,
        name: &str,
        out: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.read_into(name, crate::config::DType::BF16, out)
            .map_err(Into::into)
    }
}

/// One tensor's place in a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSlot {
    /// The Hugging Face name.
    pub name: String,
    /// Who owns it.
    pub owner: TensorOwner,
    /// What it is.
    pub role: TensorRole,
    /// Its shape (`[out, in]` for linear weights).
    pub shape: Vec<usize>,
    /// Offset in `f32` elements from the start of the chunk.
    pub offset: usize,
    /// Element count.
    pub len: usize,
}

impl TensorSlot {
    /// The schema entry this slot holds.
    pub fn spec(&self) -> TensorSpec {
        TensorSpec {
            name: self.name.clone(),
            shape: self.shape.clone(),
            owner: self.owner,
            role: self.role,
        }
    }
}

/// The tensors of one chunk and their offsets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChunkLayout {
    tensors: Vec<TensorSlot>,
    floats: usize,
}

impl ChunkLayout {
    fn pack(specs: impl IntoIterator<Item = TensorSpec>) -> Self {
        let mut floats = 0;
        let tensors = specs
            .into_iter()
            .map(|t| {
                let len = t.numel();
                let slot = TensorSlot {
                    offset: floats,
                    len,
                    name: t.name,
                    owner: t.owner,
                    role: t.role,
                    shape: t.shape,
                };
                floats = (floats + len).div_ceil(ALIGN_FLOATS) * ALIGN_FLOATS;
                slot
            })
            .collect();
        Self { tensors, floats }
    }

    /// The tensors, in packing order.
    pub fn tensors(&self) -> &[TensorSlot] {
        &self.tensors
    }

    /// `f32` elements the tensors span (including alignment padding).
    pub fn floats(&self) -> usize {
        self.floats
    }

    /// Bytes of a chunk holding this layout on a device with allocation `granularity`.
    pub fn chunk_bytes(&self, granularity: usize) -> usize {
        (self.floats * 4).max(1).div_ceil(granularity) * granularity
    }

    /// The slot of the tensor with `role`, if the chunk holds one.
    pub fn slot(&self, role: TensorRole) -> Option<&TensorSlot> {
        self.tensors.iter().find(|t| t.role == role)
    }
}

/// The chunk layouts of a whole model (every device uses the same ones).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightLayout {
    cfg: ModelConfig,
    global: ChunkLayout,
    layers: Vec<ChunkLayout>,
}

impl WeightLayout {
    /// The layouts for `cfg`, from its schema.
    pub fn new(cfg: &ModelConfig) -> Self {
        let global = ChunkLayout::pack(schema::global_tensors(cfg));
        let layers = (0..cfg.num_layers)
            .map(|l| {
                ChunkLayout::pack(
                    schema::layer_tensors(cfg, l)
                        .into_iter()
                        .filter(|t| !matches!(t.owner, TensorOwner::Expert { .. })),
                )
            })
            .collect();
        Self {
            cfg: cfg.clone(),
            global,
            layers,
        }
    }

    /// The model config.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The global chunk's layout.
    pub fn global(&self) -> &ChunkLayout {
        &self.global
    }

    /// Layer `l`'s chunk layout.
    pub fn layer(&self, l: usize) -> Option<&ChunkLayout> {
        self.layers.get(l)
    }

    /// `f32` elements of one routed expert: `[gate | up | down]`, each `hidden * inter`.
    pub fn expert_floats(&self) -> usize {
        3 * self.cfg.hidden_size * self.cfg.moe.expert_intermediate_size
    }

    /// Bytes of one routed expert's chunk with allocation `granularity`.
    pub fn expert_chunk_bytes(&self, granularity: usize) -> usize {
        (self.expert_floats() * 4).div_ceil(granularity) * granularity
    }

    /// Every layer's chunk layout, in layer order.
    pub fn layers(&self) -> &[ChunkLayout] {
        &self.layers
    }
}

/// Why [`MemTensors`] could not serve a tensor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MemTensorError {
    /// No tensor of that name.
    #[error("no tensor named `{0}`")]
    Missing(String),
    /// The caller's buffer does not match the tensor's element count.
    #[error("tensor `{name}` has {have} elements, the caller asked for {want}")]
    Length {
        /// The tensor.
        name: String,
        /// Elements stored.
        have: usize,
        /// Elements asked for.
        want: usize,
    },
}

/// Named `f32` tensors in memory: a [`TensorSource`] for tests, examples and benchmarks.
#[derive(Debug, Clone, Default)]
pub struct MemTensors {
    tensors: BTreeMap<String, Vec<f32>>,
}

impl MemTensors {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every tensor of `cfg`'s schema with seeded random values: norms are ones, everything else
    /// uniform with variance `1 / fan_in` (so activations keep their scale through each matmul).
    pub fn seeded(cfg: &ModelConfig, seed: u64) -> Self {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut me = Self::new();
        for t in schema::ModelSchema::new(cfg).tensors() {
            let data = if t.role.is_norm() {
                vec![1.0; t.numel()]
            } else {
                let a = (3.0 / t.fan_in() as f32).sqrt();
                (0..t.numel()).map(|_| rng.random_range(-a..a)).collect()
            };
            me.insert(&t.name, data);
        }
        me
    }

    /// Adds or replaces a tensor.
    pub fn insert(&mut self, name: &str, data: Vec<f32>) {
        self.tensors.insert(name.to_string(), data);
    }

    /// A tensor's data.
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.tensors.get(name).map(Vec::as_slice)
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
}

impl TensorSource for MemTensors {
    fn read_f32_into(
        &self,
        name: &str,
        out: &mut [f32],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| MemTensorError::Missing(name.to_string()))?;
        if t.len() != out.len() {
            return Err(Box::new(MemTensorError::Length {
                name: name.to_string(),
                have: t.len(),
                want: out.len(),
            }));
        }
        out.copy_from_slice(t);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::Preset;

    #[test]
    fn chunk_layouts_are_aligned_disjoint_and_complete() {
        for p in [Preset::TinyQwen3, Preset::TinyDeepseek, Preset::TinyMixtral] {
            let cfg = p.config();
            let layout = WeightLayout::new(&cfg);
            let schema = schema::ModelSchema::new(&cfg);
            let mut placed = 0;
            for c in std::iter::once(layout.global()).chain(layout.layers.iter()) {
                let mut end = 0;
                for t in c.tensors() {
                    assert_eq!(t.offset % ALIGN_FLOATS, 0, "{p}: {} aligned", t.name);
                    assert!(t.offset >= end, "{p}: {} overlaps its predecessor", t.name);
                    assert_eq!(schema.get(&t.name).map(TensorSpec::numel), Some(t.len));
                    end = t.offset + t.len;
                }
                assert!(end <= c.floats());
                placed += c.tensors().len();
            }
            let experts: usize = cfg.num_moe_layers() * cfg.moe.num_experts * 3;
            assert_eq!(
                placed + experts,
                schema.tensors().len(),
                "{p}: every tensor has a home"
            );
            // Chunk sizes round up to the granularity and hold the data.
            let g = 4096;
            assert_eq!(layout.global().chunk_bytes(g) % g, 0);
            assert!(layout.global().chunk_bytes(g) >= layout.global().floats() * 4);
            assert_eq!(layout.expert_chunk_bytes(g) % g, 0);
            assert!(layout.expert_chunk_bytes(g) >= layout.expert_floats() * 4);
        }
    }
}

//! Weights resident in `hbm-vmm` chunks: where each tensor sits inside its chunk, typed views over
//! chunk memory, and the per-device loader.
//!
//! A device holds three kinds of chunk, all `f32` on the host backend:
//! - one **global** chunk: embedding, final norm, LM head (absent when tied);
//! - one **layer** chunk per decoder layer: everything an attention rank replicates for that layer
//!   (both layer norms, attention, and the router, shared experts or dense MLP);
//! - one **expert** chunk per routed expert per MoE layer: `[gate | up | down]`, so the engine can
//!   remap whole experts between devices and into contiguous per-device ranges zero-copy.
//!
//! Tensors are packed in schema order at 64-byte-aligned offsets; a chunk's size is rounded up to
//! the device's allocation granularity.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use hbm_vmm::host::HostBackend;
use hbm_vmm::{DeviceId, HostRead, Mapping, PhysChunk, Vmm};

use super::ModelError;
use crate::compute::FfnWeights;
use crate::config::{AttentionConfig, ModelConfig};
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

/// A source whose values are rounded to bf16: the weights a device in bf16 holds, as f32 for
/// the CPU reference.
#[derive(Debug, Clone)]
pub struct RoundedToBf16<S>(pub S);

impl<S: TensorSource> TensorSource for RoundedToBf16<S> {
    fn read_f32_into(
        &self,
        name: &str,
        out: &mut [f32],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.0.read_f32_into(name, out)?;
        for v in out.iter_mut() {
            *v = crate::compute::round_bf16(*v);
        }
        Ok(())
    }

    fn check(&self, spec: &TensorSpec) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.0.check(spec)
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

    fn slot(&self, role: TensorRole) -> Option<&TensorSlot> {
        self.tensors.iter().find(|t| t.role == role)
    }

    fn get<'a>(&self, data: &'a [f32], role: TensorRole) -> Result<&'a [f32], ModelError> {
        let s = self.slot(role).ok_or(ModelError::Layout { role })?;
        data.get(s.offset..s.offset + s.len)
            .ok_or(ModelError::ChunkTooSmall {
                needed: s.offset + s.len,
                got: data.len(),
            })
    }

    fn opt<'a>(&self, data: &'a [f32], role: TensorRole) -> Result<Option<&'a [f32]>, ModelError> {
        match self.slot(role) {
            Some(_) => self.get(data, role).map(Some),
            None => Ok(None),
        }
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

    /// The typed view of the global chunk's data.
    pub fn global_view<'a>(&self, data: &'a [f32]) -> Result<GlobalWeights<'a>, ModelError> {
        let g = &self.global;
        let embed = g.get(data, TensorRole::Embedding)?;
        let lm_head = match g.opt(data, TensorRole::LmHead)? {
            Some(w) => w,
            None => embed,
        };
        Ok(GlobalWeights {
            embed,
            norm: g.get(data, TensorRole::FinalNorm)?,
            lm_head,
        })
    }

    /// The typed view of layer `l`'s chunk data.
    pub fn layer_view<'a>(
        &self,
        l: usize,
        data: &'a [f32],
    ) -> Result<LayerWeights<'a>, ModelError> {
        let c = self
            .layers
            .get(l)
            .ok_or(ModelError::NoSuchLayer { layer: l })?;
        let attn = match &self.cfg.attention {
            AttentionConfig::Gqa(_) => AttnWeights::Gqa {
                q: c.get(data, TensorRole::QProj)?,
                k: c.get(data, TensorRole::KProj)?,
                v: c.get(data, TensorRole::VProj)?,
                o: c.get(data, TensorRole::OProj)?,
                q_norm: c.opt(data, TensorRole::QNorm)?,
                k_norm: c.opt(data, TensorRole::KNorm)?,
            },
            AttentionConfig::Mla(m) => AttnWeights::Mla {
                q: match m.q_lora_rank {
                    None => MlaQuery::Proj(c.get(data, TensorRole::QProj)?),
                    Some(_) => MlaQuery::Lora {
                        a: c.get(data, TensorRole::QAProj)?,
                        norm: c.get(data, TensorRole::QANorm)?,
                        b: c.get(data, TensorRole::QBProj)?,
                    },
                },
                kv_a: c.get(data, TensorRole::KvAProjWithMqa)?,
                kv_a_norm: c.get(data, TensorRole::KvANorm)?,
                kv_b: c.get(data, TensorRole::KvBProj)?,
                o: c.get(data, TensorRole::OProj)?,
            },
        };
        let hidden = self.cfg.hidden_size;
        let ffn = |inter: usize| -> Result<FfnWeights<'a>, ModelError> {
            Ok(FfnWeights {
                gate: c.get(data, TensorRole::Gate)?,
                up: c.get(data, TensorRole::Up)?,
                down: c.get(data, TensorRole::Down)?,
                hidden,
                inter,
            })
        };
        let mlp = if self.cfg.is_moe_layer(l) {
            let shared = if self.cfg.moe.n_shared_experts > 0 {
                Some(ffn(
                    self.cfg.moe.n_shared_experts * self.cfg.moe.expert_intermediate_size
                )?)
            } else {
                None
            };
            MlpWeights::Moe {
                router: c.get(data, TensorRole::RouterGate)?,
                shared,
            }
        } else {
            MlpWeights::Dense(ffn(self.cfg.intermediate_size)?)
        };
        Ok(LayerWeights {
            input_norm: c.get(data, TensorRole::InputNorm)?,
            post_norm: c.get(data, TensorRole::PostAttentionNorm)?,
            attn,
            mlp,
        })
    }

    /// The typed view of one routed expert's chunk data (any mapping of the chunk will do).
    pub fn expert_view<'a>(&self, data: &'a [f32]) -> Result<FfnWeights<'a>, ModelError> {
        let (hidden, inter) = (self.cfg.hidden_size, self.cfg.moe.expert_intermediate_size);
        let n = hidden * inter;
        if data.len() < 3 * n {
            return Err(ModelError::ChunkTooSmall {
                needed: 3 * n,
                got: data.len(),
            });
        }
        Ok(FfnWeights {
            gate: &data[..n],
            up: &data[n..2 * n],
            down: &data[2 * n..3 * n],
            hidden,
            inter,
        })
    }

    fn check_expert(&self, layer: usize, expert: u32) -> Result<(), ModelError> {
        if !self.cfg.is_moe_layer(layer) || expert as usize >= self.cfg.moe.num_experts {
            return Err(ModelError::NoSuchExpert { layer, expert });
        }
        Ok(())
    }
}

/// Embedding, final norm and LM head.
#[derive(Debug, Clone, Copy)]
pub struct GlobalWeights<'a> {
    /// `[vocab, hidden]`.
    pub embed: &'a [f32],
    /// `[hidden]`.
    pub norm: &'a [f32],
    /// `[vocab, hidden]` (the embedding when tied).
    pub lm_head: &'a [f32],
}

/// The query path of MLA.
#[derive(Debug, Clone, Copy)]
pub enum MlaQuery<'a> {
    /// `q_proj` `[heads*q_head_dim, hidden]`.
    Proj(&'a [f32]),
    /// `q_a_proj` `[q_lora_rank, hidden]`, `q_a_layernorm`, `q_b_proj` `[heads*q_head_dim, q_lora_rank]`.
    Lora {
        /// `q_a_proj`.
        a: &'a [f32],
        /// `q_a_layernorm`.
        norm: &'a [f32],
        /// `q_b_proj`.
        b: &'a [f32],
    },
}

/// A layer's attention weights.
#[derive(Debug, Clone, Copy)]
pub enum AttnWeights<'a> {
    /// Grouped-query attention.
    Gqa {
        /// `q_proj`.
        q: &'a [f32],
        /// `k_proj`.
        k: &'a [f32],
        /// `v_proj`.
        v: &'a [f32],
        /// `o_proj`.
        o: &'a [f32],
        /// Qwen3's per-head `q_norm`.
        q_norm: Option<&'a [f32]>,
        /// Qwen3's per-head `k_norm`.
        k_norm: Option<&'a [f32]>,
    },
    /// Multi-head latent attention.
    Mla {
        /// The query path.
        q: MlaQuery<'a>,
        /// `kv_a_proj_with_mqa`.
        kv_a: &'a [f32],
        /// `kv_a_layernorm`.
        kv_a_norm: &'a [f32],
        /// `kv_b_proj`.
        kv_b: &'a [f32],
        /// `o_proj`.
        o: &'a [f32],
    },
}

/// A layer's feed-forward part that every attention rank holds.
#[derive(Debug, Clone, Copy)]
pub enum MlpWeights<'a> {
    /// A dense SwiGLU MLP.
    Dense(FfnWeights<'a>),
    /// A MoE block: the router and, for DeepSeek, the shared experts (routed experts live in their
    /// own chunks).
    Moe {
        /// Router `[experts, hidden]`.
        router: &'a [f32],
        /// Shared experts as one SwiGLU.
        shared: Option<FfnWeights<'a>>,
    },
}

/// Everything of one layer that an attention rank replicates.
#[derive(Debug, Clone, Copy)]
pub struct LayerWeights<'a> {
    /// `input_layernorm`.
    pub input_norm: &'a [f32],
    /// `post_attention_layernorm`.
    pub post_norm: &'a [f32],
    /// Attention.
    pub attn: AttnWeights<'a>,
    /// Router and shared experts, or the dense MLP.
    pub mlp: MlpWeights<'a>,
}

/// A chunk with a host mapping of its whole size.
struct Resident {
    chunk: PhysChunk<HostBackend>,
    map: Mapping<HostBackend>,
}

impl fmt::Debug for Resident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resident")
            .field("chunk", &self.chunk.id())
            .field("size", &self.chunk.size())
            .finish()
    }
}

impl Resident {
    fn map(vmm: &Vmm<HostBackend>, chunk: PhysChunk<HostBackend>) -> Result<Self, ModelError> {
        let res = vmm.reserve(chunk.device(), chunk.size())?;
        let map = res.map(0, &chunk, 0, chunk.size())?;
        Ok(Self { chunk, map })
    }

    fn create(vmm: &Vmm<HostBackend>, dev: DeviceId, bytes: usize) -> Result<Self, ModelError> {
        Self::map(vmm, vmm.create_chunk(dev, bytes, true)?)
    }

    /// Reads `tensors` (each with its offset in `f32` elements) from `src` straight into this
    /// chunk's memory, checking each one's shape first.
    fn fill(
        &self,
        src: &dyn TensorSource,
        tensors: impl IntoIterator<Item = (TensorSpec, usize)>,
    ) -> Result<(), ModelError> {
        let mut w = self.map.as_mut_slice();
        let data = w.as_f32_mut();
        let have = data.len();
        for (spec, offset) in tensors {
            let len = spec.numel();
            let dst = data
                .get_mut(offset..offset + len)
                .ok_or(ModelError::ChunkTooSmall {
                    needed: offset + len,
                    got: have,
                })?;
            src.check(&spec)
                .and_then(|()| src.read_f32_into(&spec.name, dst))
                .map_err(|source| ModelError::Tensor {
                    name: spec.name.clone(),
                    source,
                })?;
        }
        Ok(())
    }
}

/// One device's weights: the global chunk, every layer's replicated chunk, and the routed experts
/// it was asked to hold, each in its own chunk (host backend; the CPU compute reads them in place).
#[derive(Debug)]
pub struct DeviceWeights {
    vmm: Vmm<HostBackend>,
    device: DeviceId,
    layout: Arc<WeightLayout>,
    global: Resident,
    layers: Vec<Resident>,
    experts: BTreeMap<(usize, u32), Resident>,
}

impl DeviceWeights {
    /// Loads, for device `dev`, the global and per-layer replicated tensors plus the routed experts
    /// listed in `experts` (`(layer, expert)` pairs), reading only those tensors from `src`.
    pub fn load(
        vmm: &Vmm<HostBackend>,
        dev: DeviceId,
        layout: &Arc<WeightLayout>,
        src: &dyn TensorSource,
        experts: impl IntoIterator<Item = (usize, u32)>,
    ) -> Result<Self, ModelError> {
        let gran = vmm.granularity(dev)?;
        let place = |c: &ChunkLayout| -> Result<Resident, ModelError> {
            let r = Resident::create(vmm, dev, c.chunk_bytes(gran))?;
            r.fill(src, c.tensors().iter().map(|t| (t.spec(), t.offset)))?;
            Ok(r)
        };
        let global = place(layout.global())?;
        let layers = layout
            .layers
            .iter()
            .map(place)
            .collect::<Result<Vec<_>, _>>()?;
        let mut me = Self {
            vmm: vmm.clone(),
            device: dev,
            layout: Arc::clone(layout),
            global,
            layers,
            experts: BTreeMap::new(),
        };
        for (layer, expert) in experts {
            me.load_expert(src, layer, expert)?;
        }
        Ok(me)
    }

    /// Loads one more routed expert from `src` into a new chunk on this device.
    pub fn load_expert(
        &mut self,
        src: &dyn TensorSource,
        layer: usize,
        expert: u32,
    ) -> Result<(), ModelError> {
        self.layout.check_expert(layer, expert)?;
        if self.experts.contains_key(&(layer, expert)) {
            return Ok(());
        }
        let cfg = &self.layout.cfg;
        let n = cfg.hidden_size * cfg.moe.expert_intermediate_size;
        let gran = self.vmm.granularity(self.device)?;
        let r = Resident::create(&self.vmm, self.device, self.layout.expert_chunk_bytes(gran))?;
        let specs = schema::expert_tensors(cfg, layer, expert as usize);
        let mut placed = Vec::with_capacity(3);
        for (i, role) in [TensorRole::Gate, TensorRole::Up, TensorRole::Down]
            .into_iter()
            .enumerate()
        {
            let spec = specs
                .iter()
                .find(|t| t.role == role)
                .ok_or(ModelError::Layout { role })?;
            placed.push((spec.clone(), i * n));
        }
        r.fill(src, placed)?;
        self.experts.insert((layer, expert), r);
        Ok(())
    }

    /// Takes an expert chunk that already holds the expert's bytes (for example one copied from a
    /// peer) and maps it for this device's compute.
    pub fn adopt_expert(
        &mut self,
        layer: usize,
        expert: u32,
        chunk: PhysChunk<HostBackend>,
    ) -> Result<(), ModelError> {
        self.layout.check_expert(layer, expert)?;
        if chunk.device() != self.device {
            return Err(ModelError::WrongDevice {
                expected: self.device,
                found: chunk.device(),
            });
        }
        let need = self.layout.expert_floats() * 4;
        if chunk.size() < need {
            return Err(ModelError::ChunkTooSmall {
                needed: need / 4,
                got: chunk.size() / 4,
            });
        }
        let r = Resident::map(&self.vmm, chunk)?;
        self.experts.insert((layer, expert), r);
        Ok(())
    }

    /// Drops this device's hold on an expert, returning its chunk (still alive while others hold it).
    pub fn remove_expert(&mut self, layer: usize, expert: u32) -> Option<PhysChunk<HostBackend>> {
        self.experts.remove(&(layer, expert)).map(|r| r.chunk)
    }

    /// The device.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// The layouts.
    pub fn layout(&self) -> &Arc<WeightLayout> {
        &self.layout
    }

    /// The global chunk's memory (use [`WeightLayout::global_view`] on `as_f32()`).
    pub fn global_bytes(&self) -> HostRead<'_> {
        self.global.map.as_slice()
    }

    /// Layer `l`'s chunk memory (use [`WeightLayout::layer_view`] on `as_f32()`).
    pub fn layer_bytes(&self, l: usize) -> Result<HostRead<'_>, ModelError> {
        self.layers
            .get(l)
            .map(|r| r.map.as_slice())
            .ok_or(ModelError::NoSuchLayer { layer: l })
    }

    /// An expert chunk's memory (use [`WeightLayout::expert_view`] on `as_f32()`).
    pub fn expert_bytes(&self, layer: usize, expert: u32) -> Result<HostRead<'_>, ModelError> {
        self.experts
            .get(&(layer, expert))
            .map(|r| r.map.as_slice())
            .ok_or(ModelError::ExpertNotHere {
                layer,
                expert,
                device: self.device,
            })
    }

    /// Whether this device holds an expert.
    pub fn has_expert(&self, layer: usize, expert: u32) -> bool {
        self.experts.contains_key(&(layer, expert))
    }

    /// The chunk of an expert held here.
    pub fn expert_chunk(&self, layer: usize, expert: u32) -> Option<&PhysChunk<HostBackend>> {
        self.experts.get(&(layer, expert)).map(|r| &r.chunk)
    }

    /// Every expert chunk held here, by `(layer, expert)` ascending.
    pub fn expert_chunks(&self) -> impl Iterator<Item = ((usize, u32), &PhysChunk<HostBackend>)> {
        self.experts.iter().map(|(&k, r)| (k, &r.chunk))
    }

    /// The global chunk.
    pub fn global_chunk(&self) -> &PhysChunk<HostBackend> {
        &self.global.chunk
    }

    /// Layer `l`'s replicated chunk.
    pub fn layer_chunk(&self, l: usize) -> Option<&PhysChunk<HostBackend>> {
        self.layers.get(l).map(|r| &r.chunk)
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

    #[test]
    fn views_slice_the_right_tensors() {
        let cfg = Preset::TinyDeepseek.config();
        let layout = WeightLayout::new(&cfg);
        // Fill each tensor of layer 1 with its index so views can be checked by value.
        let c = layout.layer(1).unwrap();
        let mut data = vec![-1.0f32; c.floats()];
        for (i, t) in c.tensors().iter().enumerate() {
            data[t.offset..t.offset + t.len].fill(i as f32);
        }
        let v = layout.layer_view(1, &data).unwrap();
        let idx = |role| c.tensors().iter().position(|t| t.role == role).unwrap() as f32;
        assert!(v
            .input_norm
            .iter()
            .all(|&x| x == idx(TensorRole::InputNorm)));
        let MlpWeights::Moe {
            router,
            shared: Some(shared),
        } = v.mlp
        else {
            panic!("MoE layer")
        };
        assert!(router.iter().all(|&x| x == idx(TensorRole::RouterGate)));
        assert!(shared.down.iter().all(|&x| x == idx(TensorRole::Down)));
        assert_eq!(shared.inter, 2 * cfg.moe.expert_intermediate_size);
        let AttnWeights::Mla { kv_b, .. } = v.attn else {
            panic!("MLA")
        };
        assert!(kv_b.iter().all(|&x| x == idx(TensorRole::KvBProj)));
        assert!(matches!(
            layout.layer_view(1, &data[..10]),
            Err(ModelError::ChunkTooSmall { .. })
        ));
        assert!(matches!(
            layout.layer_view(9, &data),
            Err(ModelError::NoSuchLayer { layer: 9 })
        ));
        // Layer 0 is dense.
        let c0 = layout.layer(0).unwrap();
        let zeros = vec![0.0; c0.floats()];
        let v0 = layout.layer_view(0, &zeros).unwrap();
        assert!(matches!(v0.mlp, MlpWeights::Dense(f) if f.inter == cfg.intermediate_size));
        // Expert chunks are [gate | up | down].
        let n = cfg.hidden_size * cfg.moe.expert_intermediate_size;
        let e: Vec<f32> = (0..3 * n).map(|i| (i / n) as f32).collect();
        let f = layout.expert_view(&e).unwrap();
        assert!(f.gate.iter().all(|&x| x == 0.0) && f.up.iter().all(|&x| x == 1.0));
        assert!(f.down.iter().all(|&x| x == 2.0));
        assert!(layout.expert_view(&e[1..]).is_err());
    }

    #[test]
    fn device_weights_are_shared_by_worker_threads() {
        use hbm_vmm::host::HostConfig;
        let cfg = Preset::TinyMixtral.config();
        let layout = Arc::new(WeightLayout::new(&cfg));
        let src = MemTensors::seeded(&cfg, 3);
        let host = HostConfig::devices(1, 64 << 20).with_granularity(hbm_vmm::host::page_size());
        let vmm = Vmm::new(HostBackend::new(host.unwrap()));
        let w = DeviceWeights::load(&vmm, DeviceId(0), &layout, &src, [(0, 1), (1, 5)]).unwrap();
        let want: Vec<f32> = ["w1", "w3", "w2"]
            .iter()
            .flat_map(|n| {
                let name = format!("model.layers.1.block_sparse_moe.experts.5.{n}.weight");
                src.get(&name).unwrap().to_vec()
            })
            .collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let bytes = w.expert_bytes(1, 5).unwrap();
                        let f = w.layout().expert_view(bytes.as_f32()).unwrap();
                        [f.gate, f.up, f.down].concat()
                    })
                })
                .collect();
            for h in handles {
                assert_eq!(h.join().unwrap(), want);
            }
        });
    }
}

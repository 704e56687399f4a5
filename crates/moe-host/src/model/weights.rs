//! Weights resident in `hbm-vmm` chunks: typed views over chunk memory, and the per-device loader.
//!
//! Where each tensor sits inside its chunk ([`ChunkLayout`], [`WeightLayout`]) and where tensors
//! are read from ([`TensorSource`], [`MemTensors`]) are compute-free and live in
//! [`moe_model::weights`]; they are re-exported here. A device holds three kinds of chunk, all
//! `f32` on the host backend:
//! - one **global** chunk: embedding, final norm, LM head (absent when tied);
//! - one **layer** chunk per decoder layer: everything an attention rank replicates for that layer
//!   (both layer norms, attention, and the router, shared experts or dense MLP);
//! - one **expert** chunk per routed expert per MoE layer: `[gate | up | down]`, so the engine can
//!   remap whole experts between devices and into contiguous per-device ranges zero-copy.
//!
//! The typed views ([`WeightViews`]) slice a chunk's `f32` data by that layout.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use hbm_vmm::host::HostBackend;
use hbm_vmm::{DeviceId, HostRead, Mapping, PhysChunk, Vmm};

use super::ModelError;
use crate::compute::FfnWeights;
use moe_model::config::AttentionConfig;
use moe_model::schema::{self, TensorRole, TensorSpec};
pub use moe_model::weights::{
    ChunkLayout, MemTensorError, MemTensors, TensorSlot, TensorSource, WeightLayout,
};

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

/// Slices of one chunk's data by role (the host model's reading of a [`ChunkLayout`]).
trait ChunkSlices {
    fn get<'a>(&self, data: &'a [f32], role: TensorRole) -> Result<&'a [f32], ModelError>;
    fn opt<'a>(&self, data: &'a [f32], role: TensorRole) -> Result<Option<&'a [f32]>, ModelError>;
}

impl ChunkSlices for ChunkLayout {
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

/// The typed views of chunk data that the CPU model reads, by a [`WeightLayout`].
pub trait WeightViews {
    /// The typed view of the global chunk's data.
    fn global_view<'a>(&self, data: &'a [f32]) -> Result<GlobalWeights<'a>, ModelError>;
    /// The typed view of layer `l`'s chunk data.
    fn layer_view<'a>(&self, l: usize, data: &'a [f32]) -> Result<LayerWeights<'a>, ModelError>;
    /// The typed view of one routed expert's chunk data (any mapping of the chunk will do).
    fn expert_view<'a>(&self, data: &'a [f32]) -> Result<FfnWeights<'a>, ModelError>;
}

impl WeightViews for WeightLayout {
    /// The typed view of the global chunk's data.
    fn global_view<'a>(&self, data: &'a [f32]) -> Result<GlobalWeights<'a>, ModelError> {
        let g = self.global();
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
    fn layer_view<'a>(&self, l: usize, data: &'a [f32]) -> Result<LayerWeights<'a>, ModelError> {
        let c = self.layer(l).ok_or(ModelError::NoSuchLayer { layer: l })?;
        let attn = match &self.config().attention {
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
        let hidden = self.config().hidden_size;
        let ffn = |inter: usize| -> Result<FfnWeights<'a>, ModelError> {
            Ok(FfnWeights {
                gate: c.get(data, TensorRole::Gate)?,
                up: c.get(data, TensorRole::Up)?,
                down: c.get(data, TensorRole::Down)?,
                hidden,
                inter,
            })
        };
        let mlp = if self.config().is_moe_layer(l) {
            let shared = if self.config().moe.n_shared_experts > 0 {
                Some(ffn(
                    self.config().moe.n_shared_experts * self.config().moe.expert_intermediate_size
                )?)
            } else {
                None
            };
            MlpWeights::Moe {
                router: c.get(data, TensorRole::RouterGate)?,
                shared,
            }
        } else {
            MlpWeights::Dense(ffn(self.config().intermediate_size)?)
        };
        Ok(LayerWeights {
            input_norm: c.get(data, TensorRole::InputNorm)?,
            post_norm: c.get(data, TensorRole::PostAttentionNorm)?,
            attn,
            mlp,
        })
    }

    /// The typed view of one routed expert's chunk data (any mapping of the chunk will do).
    fn expert_view<'a>(&self, data: &'a [f32]) -> Result<FfnWeights<'a>, ModelError> {
        let (hidden, inter) = (
            self.config().hidden_size,
            self.config().moe.expert_intermediate_size,
        );
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
}

/// Checks that `layout`'s model has routed expert `expert` in `layer`.
fn check_expert(layout: &WeightLayout, layer: usize, expert: u32) -> Result<(), ModelError> {
    if !layout.config().is_moe_layer(layer) || expert as usize >= layout.config().moe.num_experts {
        return Err(ModelError::NoSuchExpert { layer, expert });
    }
    Ok(())
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
            .layers()
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
        check_expert(&self.layout, layer, expert)?;
        if self.experts.contains_key(&(layer, expert)) {
            return Ok(());
        }
        let cfg = self.layout.config();
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
        check_expert(&self.layout, layer, expert)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use moe_model::presets::Preset;

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

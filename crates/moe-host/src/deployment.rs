//! Deployments: which devices serve, one attention data-parallel rank per device, where every
//! expert lives, and the views of weights and KV that the device workers compute on.
//!
//! Two types split the memory from its use, as the design asks:
//!
//! - [`WeightStore`] owns the model's weight chunks in an [`Hmm`] registry under [`WeightKey`]s:
//!   per device one global chunk, one replicated chunk per layer, and one chunk per routed expert
//!   it holds. It loads them from a checkpoint (only the tensors a device needs) and copies them
//!   device to device ([`WeightStore::copy`], the host stand-in for a peer-to-peer copy) or adopts
//!   chunks that arrived some other way ([`WeightStore::adopt`]).
//! - [`Deployment`] is an immutable set of *views*: per device its [`BlockPool`] (the rank's KV
//!   cache), mappings of its global and layer chunks, and per MoE layer a [`PagedRegion`] whose
//!   slots map that device's expert chunks in placement order (a contiguous expert range). It takes
//!   a reference on every chunk it maps and gives it back when dropped.
//!
//! [`Deployment::build`] with a `previous` deployment reuses, for every device that stays, the
//! same KV pool (running sequences keep their blocks), the same replicated views, and the same
//! expert ranges where the slots did not change; kept experts are remapped from their existing
//! chunks (zero-copy). The engine swaps deployments only between iterations ([`DeploymentSlot`]);
//! the old one is retired through the [`Hmm`] epoch and dropped once no iteration can still see
//! it.
//!
//! Architecture invariant: nothing here decides *when* to scale or *which* placement to use; the
//! caller (the scaler, or `elasticmoe generate`) passes a [`Placement`]. Physical memory is only
//! created by the [`WeightStore`] (weights) and [`BlockPool`]s (KV), both through `hbm-vmm`.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use moe_host::deployment::{Deployment, DeploymentConfig, PlacementKind, WeightStore};
//! use moe_host::model::{weights::MemTensors, Model};
//! use moe_host::compute::cpu::CpuCompute;
//! use moe_model::presets::Preset;
//!
//! let cfg = Preset::TinyMixtral.config();
//! let model = Arc::new(Model::new(&cfg, CpuCompute::new()).unwrap());
//! let config = DeploymentConfig::default();
//! let store = Arc::new(WeightStore::host(Arc::clone(&model), 3, &config).unwrap());
//! let two = PlacementKind::Balanced.placement(&cfg, 2).unwrap();
//! store.load_placement(&MemTensors::seeded(&cfg, 1), &two).unwrap();
//! let d2 = Deployment::build(&store, &two, &config, None).unwrap();
//! assert_eq!(d2.devices().len(), 2);
//!
//! // Scale up to three devices beside the running deployment: device 2 gets its weights copied
//! // from devices 0 and 1; devices 0 and 1 keep their KV pools and replicated views.
//! let three = PlacementKind::Balanced.placement(&cfg, 3).unwrap();
//! let copied = store.prepare(&three).unwrap();
//! assert!(copied.bytes > 0);
//! let d3 = Deployment::build(&store, &three, &config, Some(&d2)).unwrap();
//! assert!(Arc::ptr_eq(d2.rank(0).unwrap().pool(), d3.rank(0).unwrap().pool()));
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use expert_placement::{ExpertId, ExpertLoad, Placement, PlacementError, PlacementShape};
use hbm_vmm::host::{HostBackend, HostConfig};
use hbm_vmm::{DeviceId, Hmm, HostRead, Mapping, PagedRegion, PhysChunk, Vmm, VmmError};
use kv_pool::{BlockPool, KvDtype, KvError, KvLayout, PoolConfig, Watermarks};
use p2p_xfer::{Location, Need, Planner, Transport};

use crate::compute::{KvGeometry, KvKind};
use crate::model::weights::{DeviceWeights, TensorSource};
use crate::model::{Model, ModelError};
use moe_engine::RankId;
use moe_model::config::ModelConfig;

/// The registry key of a weight chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WeightKey {
    /// Embedding, final norm and LM head of a device.
    Global {
        /// The device holding it.
        device: DeviceId,
    },
    /// Everything an attention rank replicates for one decoder layer.
    Layer {
        /// The device holding it.
        device: DeviceId,
        /// The decoder layer.
        layer: usize,
    },
    /// One routed expert of one decoder layer.
    Expert {
        /// The device holding it.
        device: DeviceId,
        /// The decoder layer (not the MoE-layer index).
        layer: usize,
        /// The expert.
        expert: u32,
    },
}

impl WeightKey {
    /// The device the chunk is on.
    pub fn device(&self) -> DeviceId {
        match *self {
            Self::Global { device } | Self::Layer { device, .. } | Self::Expert { device, .. } => {
                device
            }
        }
    }

    /// The same tensor group on another device.
    pub fn on(&self, device: DeviceId) -> Self {
        match *self {
            Self::Global { .. } => Self::Global { device },
            Self::Layer { layer, .. } => Self::Layer { device, layer },
            Self::Expert { layer, expert, .. } => Self::Expert {
                device,
                layer,
                expert,
            },
        }
    }
}

impl fmt::Display for WeightKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Global { device } => write!(f, "global weights on {device}"),
            Self::Layer { device, layer } => write!(f, "layer {layer} weights on {device}"),
            Self::Expert {
                device,
                layer,
                expert,
            } => {
                write!(f, "expert {expert} of layer {layer} on {device}")
            }
        }
    }
}

/// Why a deployment could not be built or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeploymentError {
    /// Loading or viewing weights failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Device memory could not be created or mapped.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// A KV pool could not be built or used.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// The placement could not be built.
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// A chunk the deployment needs is not in the store (prepare the device set first).
    #[error("{0} is not in the weight store; copy or load it before building the deployment")]
    MissingChunk(WeightKey),
    /// A chunk is already registered.
    #[error("{0} is already in the weight store")]
    DuplicateChunk(WeightKey),
    /// No device holds a chunk that must be copied.
    #[error("no device holds {0}, so it cannot be copied")]
    NoSource(WeightKey),
    /// A peer-to-peer copy could not be planned, started or completed (`p2p-xfer`); nothing
    /// was registered.
    #[error("copying weights into {device} failed: {message}")]
    Transfer {
        /// The destination device.
        device: DeviceId,
        /// What the transport or its planner said.
        message: String,
    },
    /// More devices than experts: some device would hold no expert.
    #[error(
        "{devices} devices were asked for but the model has only {experts} experts per layer; \
         use at most {experts} devices"
    )]
    TooManyDevices {
        /// Devices asked for.
        devices: usize,
        /// Experts per MoE layer.
        experts: usize,
    },
    /// No devices at all.
    #[error("a deployment needs at least one device")]
    NoDevices,
    /// A device the backend does not have.
    #[error("{device} does not exist (the host backend was set up with {available} devices)")]
    NoSuchDevice {
        /// The device asked for.
        device: DeviceId,
        /// Devices the backend has.
        available: usize,
    },
    /// The placement does not fit the model.
    #[error("the placement does not fit the model: {0}")]
    PlacementMismatch(String),
    /// The model cannot be served by this engine.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// KV migration failed.
    #[error("moving the KV of a sequence failed: {0}")]
    Migration(String),
    /// A device that the running deployment does not serve on.
    #[error("{device} is not part of the running deployment")]
    NotServing {
        /// The device.
        device: DeviceId,
    },
    /// A KV budget of no chunks at all.
    #[error("a KV budget must allow at least 1 chunk per device")]
    ZeroKvBudget,
}

/// How [`PlacementKind::placement`] lays experts out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PlacementKind {
    /// Contiguous blocks of experts per device.
    #[default]
    Balanced,
    /// Expert `e` on device `e mod n`.
    RoundRobin,
    /// Load-aware with replicas of the hottest experts (uniform load until measured; one redundant
    /// slot per extra device, so replicas are exercised).
    LoadAware,
}

impl std::str::FromStr for PlacementKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "balanced" => Ok(Self::Balanced),
            "round-robin" | "round_robin" => Ok(Self::RoundRobin),
            "load-aware" | "load_aware" => Ok(Self::LoadAware),
            other => Err(format!(
                "unknown placement {other:?}; use balanced, round-robin or load-aware"
            )),
        }
    }
}

impl PlacementKind {
    /// A placement of `cfg`'s experts on devices `0..devices`.
    pub fn placement(
        self,
        cfg: &ModelConfig,
        devices: usize,
    ) -> Result<Placement, DeploymentError> {
        let ids: Vec<expert_placement::DeviceId> = (0..devices as u32)
            .map(expert_placement::DeviceId)
            .collect();
        self.placement_on(cfg, &ids)
    }

    /// A placement of `cfg`'s experts on the given devices.
    pub fn placement_on(
        self,
        cfg: &ModelConfig,
        devices: &[expert_placement::DeviceId],
    ) -> Result<Placement, DeploymentError> {
        let experts = cfg.moe.num_experts;
        let layers = cfg.num_moe_layers();
        if layers == 0 || experts == 0 {
            return Err(DeploymentError::Unsupported(
                "the model has no MoE layers to place experts for".into(),
            ));
        }
        if devices.is_empty() {
            return Err(DeploymentError::NoDevices);
        }
        if devices.len() > experts {
            return Err(DeploymentError::TooManyDevices {
                devices: devices.len(),
                experts,
            });
        }
        Ok(match self {
            Self::Balanced => {
                Placement::balanced(&PlacementShape::new(layers, experts, 0), devices)?
            }
            Self::RoundRobin => {
                Placement::round_robin(&PlacementShape::new(layers, experts, 0), devices)?
            }
            Self::LoadAware => {
                let redundant = (devices.len() - 1).min(expert_placement::max_redundant_slots(
                    experts,
                    devices.len(),
                ));
                let shape = PlacementShape::new(layers, experts, redundant);
                Placement::load_aware(
                    &shape,
                    devices,
                    &ExpertLoad::uniform(layers, experts)?,
                    None,
                )?
            }
        })
    }
}

/// Sizes of the per-rank KV pools and the host backend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeploymentConfig {
    /// Tokens per KV block.
    pub block_tokens: usize,
    /// Blocks per KV chunk (the unit a pool grows and shrinks by).
    pub blocks_per_chunk: usize,
    /// KV chunks mapped when a rank's pool is created.
    pub kv_chunks: usize,
    /// The most KV chunks a rank's pool may grow to.
    pub kv_max_chunks: usize,
    /// Admission and pressure thresholds of the pools.
    pub watermarks: Watermarks,
}

impl Default for DeploymentConfig {
    fn default() -> Self {
        Self {
            block_tokens: 16,
            blocks_per_chunk: 16,
            kv_chunks: 8,
            kv_max_chunks: 32,
            watermarks: Watermarks::default(),
        }
    }
}

/// The KV layout of `model` with `block_tokens`-token blocks, checked against the kernels'
/// geometry (same bytes per block).
pub fn kv_layout(
    model: &Model,
    block_tokens: usize,
) -> Result<(KvLayout, KvGeometry), DeploymentError> {
    let geo = model.kv_geometry(block_tokens);
    let layout = match geo.kind {
        KvKind::Gqa { kv_heads, head_dim } => {
            KvLayout::gqa(geo.layers, kv_heads, head_dim, KvDtype::F32, block_tokens)
        }
        KvKind::Mla {
            kv_lora_rank,
            rope_dim,
        } => KvLayout::mla(
            geo.layers,
            kv_lora_rank,
            rope_dim,
            KvDtype::F32,
            block_tokens,
        ),
    }
    .map_err(KvError::from)?;
    if layout.block_bytes() != geo.block_floats() * 4 {
        return Err(DeploymentError::Unsupported(format!(
            "kv-pool blocks hold {} bytes but the kernels expect {}",
            layout.block_bytes(),
            geo.block_floats() * 4
        )));
    }
    Ok((layout, geo))
}

/// What [`WeightStore::prepare`] copied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Chunks copied.
    pub chunks: usize,
    /// Bytes copied.
    pub bytes: usize,
    /// `(from, to)` device pairs with the bytes each carried.
    pub links: BTreeMap<(DeviceId, DeviceId), usize>,
}

/// The model's weight chunks on every device, by [`WeightKey`].
///
/// The store holds one reference on every chunk it registered (its *ownership*); deployments
/// take their own. [`WeightStore::release`] gives up ownership: the chunk is freed when the last
/// deployment that maps it is dropped.
pub struct WeightStore {
    model: Arc<Model>,
    vmm: Vmm<HostBackend>,
    hmm: Hmm<HostBackend, WeightKey>,
    owned: Mutex<BTreeSet<WeightKey>>,
}

impl fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeightStore")
            .field("chunks", &self.owned.lock().map(|o| o.len()).unwrap_or(0))
            .field("hmm", &self.hmm)
            .finish()
    }
}

fn pdev(d: DeviceId) -> expert_placement::DeviceId {
    expert_placement::DeviceId(d.0)
}

fn hdev(d: expert_placement::DeviceId) -> DeviceId {
    DeviceId(d.0)
}

impl WeightStore {
    /// A store over an existing host VMM.
    pub fn new(model: Arc<Model>, vmm: &Vmm<HostBackend>) -> Self {
        Self {
            model,
            vmm: vmm.clone(),
            hmm: Hmm::new(vmm),
            owned: Mutex::new(BTreeSet::new()),
        }
    }

    /// A store over a fresh host backend with `max_devices` devices, each with room for the whole
    /// model plus `config`'s largest KV pool (so any device can hold any expert).
    pub fn host(
        model: Arc<Model>,
        max_devices: usize,
        config: &DeploymentConfig,
    ) -> Result<Self, DeploymentError> {
        if max_devices == 0 {
            return Err(DeploymentError::NoDevices);
        }
        let page = hbm_vmm::host::page_size();
        let layout = model.layout();
        let cfg = model.config();
        let round = |b: usize| b.div_ceil(page) * page;
        let replicated = round(layout.global().floats() * 4)
            + (0..cfg.num_layers)
                .filter_map(|l| layout.layer(l))
                .map(|c| round(c.floats() * 4))
                .sum::<usize>();
        let experts = cfg.num_moe_layers() * cfg.moe.num_experts * layout.expert_chunk_bytes(page);
        let (kv, _) = kv_layout(&model, config.block_tokens)?;
        let kv_bytes = round(kv.block_stride() * config.blocks_per_chunk) * config.kv_max_chunks;
        // Twice the need, so a device can hold an old and a new copy during a transition.
        let capacity = 2 * (replicated + experts + kv_bytes) + 64 * page;
        let host = HostConfig::devices(max_devices, capacity).with_granularity(page)?;
        Ok(Self::new(model, &Vmm::new(HostBackend::new(host))))
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The virtual-memory manager.
    pub fn vmm(&self) -> &Vmm<HostBackend> {
        &self.vmm
    }

    /// The chunk registry (usage and peak per device, epochs).
    pub fn hmm(&self) -> &Hmm<HostBackend, WeightKey> {
        &self.hmm
    }

    fn check_device(&self, device: DeviceId) -> Result<(), DeploymentError> {
        let available = self.vmm.device_count();
        if device.index() >= available {
            return Err(DeploymentError::NoSuchDevice { device, available });
        }
        Ok(())
    }

    fn register(
        &self,
        key: WeightKey,
        chunk: PhysChunk<HostBackend>,
    ) -> Result<(), DeploymentError> {
        let mut owned = lock(&self.owned);
        if owned.contains(&key) || self.hmm.contains(&key) {
            return Err(DeploymentError::DuplicateChunk(key));
        }
        self.hmm.insert(key, chunk)?;
        owned.insert(key);
        Ok(())
    }

    /// Whether the store holds `key` (owned, or still mapped by a deployment).
    pub fn has(&self, key: &WeightKey) -> bool {
        self.hmm.contains(key)
    }

    /// Every key the store owns, ascending.
    pub fn keys(&self) -> Vec<WeightKey> {
        lock(&self.owned).iter().copied().collect()
    }

    /// The keys a device needs for `placement`: its global and layer chunks and its experts.
    pub fn keys_for(&self, device: DeviceId, placement: &Placement) -> Vec<WeightKey> {
        let cfg = self.model.config();
        let mut keys = vec![WeightKey::Global { device }];
        keys.extend((0..cfg.num_layers).map(|layer| WeightKey::Layer { device, layer }));
        for (ml, layer) in cfg.moe_layers().enumerate() {
            for e in placement.slots(ml, pdev(device)) {
                keys.push(WeightKey::Expert {
                    device,
                    layer,
                    expert: e.0,
                });
            }
        }
        keys
    }

    /// Loads, from `src`, `device`'s replicated chunks and the listed experts (`(layer, expert)`),
    /// reading only those tensors. Chunks already in the store are skipped.
    pub fn load(
        &self,
        device: DeviceId,
        src: &dyn TensorSource,
        experts: &[(usize, u32)],
    ) -> Result<(), DeploymentError> {
        self.check_device(device)?;
        let w = DeviceWeights::load(
            &self.vmm,
            device,
            self.model.layout(),
            src,
            experts.iter().copied(),
        )?;
        let cfg = self.model.config();
        let mut chunks = vec![(WeightKey::Global { device }, w.global_chunk().clone())];
        for layer in 0..cfg.num_layers {
            let c = w
                .layer_chunk(layer)
                .ok_or(ModelError::NoSuchLayer { layer })?;
            chunks.push((WeightKey::Layer { device, layer }, c.clone()));
        }
        for ((layer, expert), c) in w.expert_chunks() {
            chunks.push((
                WeightKey::Expert {
                    device,
                    layer,
                    expert,
                },
                c.clone(),
            ));
        }
        drop(w);
        for (key, chunk) in chunks {
            if !self.has(&key) {
                self.register(key, chunk)?;
            }
        }
        Ok(())
    }

    /// Loads every device of `placement` with its replicated chunks and its experts.
    pub fn load_placement(
        &self,
        src: &dyn TensorSource,
        placement: &Placement,
    ) -> Result<(), DeploymentError> {
        let cfg = self.model.config();
        let moe: Vec<usize> = cfg.moe_layers().collect();
        for &d in placement.devices() {
            let experts: Vec<(usize, u32)> = moe
                .iter()
                .enumerate()
                .flat_map(|(ml, &layer)| placement.slots(ml, d).iter().map(move |e| (layer, e.0)))
                .collect();
            self.load(hdev(d), src, &experts)?;
        }
        Ok(())
    }

    /// Copies the chunk of `key` (on `key.device()`) to a new chunk on `to` and registers it as
    /// `key.on(to)`. The host stand-in for a peer-to-peer copy. Returns the bytes copied.
    pub fn copy(&self, key: WeightKey, to: DeviceId) -> Result<usize, DeploymentError> {
        self.copy_from(self, key, to)
    }

    /// Copies the chunk of `key` held by another store `src` (on `key.device()`) into a new chunk
    /// on `to`, registered here as `key.on(to)`. With `to == key.device()` this duplicates the
    /// chunk on its own device: the colocated baseline gives a second instance its own copy of
    /// every weight this way. Returns the bytes copied.
    pub fn copy_from(
        &self,
        src: &WeightStore,
        key: WeightKey,
        to: DeviceId,
    ) -> Result<usize, DeploymentError> {
        self.check_device(to)?;
        let dst_key = key.on(to);
        if self.has(&dst_key) {
            return Err(DeploymentError::DuplicateChunk(dst_key));
        }
        let src_chunk = src
            .hmm
            .get(&key)
            .ok_or(DeploymentError::MissingChunk(key))?;
        let size = src_chunk.size();
        let dst = self.vmm.create_chunk(to, size, true)?;
        let src_map = src
            .vmm
            .reserve(src_chunk.device(), size)?
            .map(0, &src_chunk, 0, size)?;
        let dst_map = self.vmm.reserve(to, size)?.map(0, &dst, 0, size)?;
        dst_map.as_mut_slice().copy_from_slice(&src_map.as_slice());
        drop((src_map, dst_map));
        self.register(dst_key, dst)?;
        Ok(size)
    }

    /// Copies the chunks `keys` (each named on any device; what matters is the layer or expert)
    /// into new chunks on `to` through `transport`, and registers them here as `key.on(to)`.
    /// Every chunk is read from every device of `src` that holds it: `planner` stripes each
    /// chunk over those holders and balances the links (`p2p-xfer`), so the host takes the same
    /// path as the GPUs. `src` may be this store, or another store over the same memory manager
    /// (the colocated baseline's second instance, which may copy from the device itself). All
    /// or nothing: on any failure no chunk is registered and the new chunks are freed. Returns
    /// the bytes copied.
    pub fn copy_through(
        &self,
        src: &WeightStore,
        keys: &[WeightKey],
        to: DeviceId,
        transport: &dyn Transport,
        planner: &Planner,
    ) -> Result<usize, DeploymentError> {
        self.check_device(to)?;
        let transfer = |message: String| DeploymentError::Transfer {
            device: to,
            message,
        };
        let mut needs = Vec::with_capacity(keys.len());
        // Mappings stay alive until every copy has landed.
        let mut maps = Vec::new();
        let mut fresh = Vec::with_capacity(keys.len());
        let mut bytes = 0usize;
        for &key in keys {
            let dst_key = key.on(to);
            if self.has(&dst_key) {
                return Err(DeploymentError::DuplicateChunk(dst_key));
            }
            let mut holders = Vec::new();
            let mut size = 0;
            for s in (0..src.vmm.device_count() as u32).map(DeviceId) {
                // (`key.on(to)` is not in this store, so a holder on `to` is another store's.)
                let Some(chunk) = src.hmm.get(&key.on(s)) else {
                    continue;
                };
                size = chunk.size();
                let map = src.vmm.reserve(s, size)?.map(0, &chunk, 0, size)?;
                holders.push(Location::new(s, map.addr()));
                maps.push(map);
            }
            if holders.is_empty() {
                return Err(DeploymentError::NoSource(key));
            }
            let dst = self.vmm.create_chunk(to, size, true)?;
            let map = self.vmm.reserve(to, size)?.map(0, &dst, 0, size)?;
            needs.push(Need::new(
                Location::new(to, map.addr()),
                size as u64,
                holders,
            ));
            maps.push(map);
            fresh.push((dst_key, dst));
            bytes += size;
        }
        if needs.is_empty() {
            return Ok(0);
        }
        let plan = planner.plan(&needs).map_err(|e| transfer(e.to_string()))?;
        let ticket = transport
            .submit(&plan.batch())
            .map_err(|e| transfer(e.to_string()))?;
        ticket.wait().map_err(|e| transfer(e.to_string()))?;
        drop(maps);
        for (key, chunk) in fresh {
            self.register(key, chunk)?;
        }
        Ok(bytes)
    }

    /// Registers a chunk that already holds `key`'s bytes (copied by a transport outside the
    /// store, such as `p2p-xfer`).
    pub fn adopt(
        &self,
        key: WeightKey,
        chunk: PhysChunk<HostBackend>,
    ) -> Result<(), DeploymentError> {
        if chunk.device() != key.device() {
            return Err(ModelError::WrongDevice {
                expected: key.device(),
                found: chunk.device(),
            }
            .into());
        }
        self.register(key, chunk)
    }

    /// Gives up the store's ownership of `key`. The chunk is freed once no deployment maps it.
    /// Returns whether the store owned it.
    pub fn release(&self, key: &WeightKey) -> Result<bool, DeploymentError> {
        if !lock(&self.owned).remove(key) {
            return Ok(false);
        }
        self.hmm.release(key)?;
        Ok(true)
    }

    /// Releases every owned chunk that no device of `placement` needs. Returns how many.
    pub fn release_unused(&self, placement: &Placement) -> Result<usize, DeploymentError> {
        let keep: BTreeSet<WeightKey> = placement
            .devices()
            .iter()
            .flat_map(|&d| self.keys_for(hdev(d), placement))
            .collect();
        let drop_keys: Vec<WeightKey> = self
            .keys()
            .into_iter()
            .filter(|k| !keep.contains(k))
            .collect();
        for k in &drop_keys {
            self.release(k)?;
        }
        Ok(drop_keys.len())
    }

    /// Makes sure every device of `placement` has the chunks it needs, copying each missing one
    /// from a device that holds it. Sources are striped: of the holders, the one that has sent the
    /// fewest bytes so far in this call goes first (ties to the lowest device id).
    pub fn prepare(&self, placement: &Placement) -> Result<CopyReport, DeploymentError> {
        let mut report = CopyReport::default();
        let mut sent: BTreeMap<DeviceId, usize> = BTreeMap::new();
        for &d in placement.devices() {
            let d = hdev(d);
            for key in self.keys_for(d, placement) {
                if self.has(&key) {
                    continue;
                }
                let holders: Vec<DeviceId> = (0..self.vmm.device_count() as u32)
                    .map(DeviceId)
                    .filter(|&s| s != d && self.has(&key.on(s)))
                    .collect();
                let from = holders
                    .iter()
                    .copied()
                    .min_by_key(|s| (sent.get(s).copied().unwrap_or(0), *s))
                    .ok_or(DeploymentError::NoSource(key))?;
                let bytes = self.copy(key.on(from), d)?;
                *sent.entry(from).or_default() += bytes;
                *report.links.entry((from, d)).or_default() += bytes;
                report.chunks += 1;
                report.bytes += bytes;
            }
        }
        Ok(report)
    }

    fn acquire(&self, key: WeightKey) -> Result<Held, DeploymentError> {
        let chunk = self
            .hmm
            .acquire(&key)
            .map_err(|_| DeploymentError::MissingChunk(key))?;
        Ok(Held {
            key,
            chunk,
            hmm: self.hmm.clone(),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A reference on a registered chunk, given back when dropped.
struct Held {
    key: WeightKey,
    chunk: PhysChunk<HostBackend>,
    hmm: Hmm<HostBackend, WeightKey>,
}

impl Drop for Held {
    fn drop(&mut self) {
        // The reference was taken by `acquire`, so the key is registered; an error here would mean
        // the registry was changed behind the store's back, and there is nothing left to undo.
        let _ = self.hmm.release(&self.key);
    }
}

impl fmt::Debug for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Held({})", self.key)
    }
}

/// A chunk mapped whole at its own address.
struct View {
    map: Mapping<HostBackend>,
    _held: Held,
}

impl View {
    fn new(store: &WeightStore, key: WeightKey) -> Result<Self, DeploymentError> {
        let held = store.acquire(key)?;
        let size = held.chunk.size();
        let map = store
            .vmm
            .reserve(key.device(), size)?
            .map(0, &held.chunk, 0, size)?;
        Ok(Self { map, _held: held })
    }
}

/// A device's replicated weights: global and per-layer chunk views.
pub struct ReplicaView {
    global: View,
    layers: Vec<View>,
}

impl fmt::Debug for ReplicaView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicaView")
            .field("layers", &self.layers.len())
            .finish()
    }
}

impl ReplicaView {
    /// The global chunk's bytes.
    pub fn global(&self) -> HostRead<'_> {
        self.global.map.as_slice()
    }

    /// Layer `l`'s chunk bytes.
    pub fn layer(&self, l: usize) -> Result<HostRead<'_>, ModelError> {
        self.layers
            .get(l)
            .map(|v| v.map.as_slice())
            .ok_or(ModelError::NoSuchLayer { layer: l })
    }
}

/// A device's experts of one MoE layer, stitched into one contiguous range in slot order.
pub struct ExpertRange {
    region: PagedRegion<HostBackend>,
    slots: Vec<u32>,
    _held: Vec<Held>,
}

impl fmt::Debug for ExpertRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExpertRange")
            .field("base", &self.region.base())
            .field("slots", &self.slots)
            .finish()
    }
}

impl ExpertRange {
    fn new(
        store: &WeightStore,
        device: DeviceId,
        layer: usize,
        slots: Vec<u32>,
    ) -> Result<Self, DeploymentError> {
        let gran = store.vmm.granularity(device)?;
        let slot_size = store.model.layout().expert_chunk_bytes(gran);
        let mut region = PagedRegion::new(&store.vmm, device, slot_size, slots.len())?;
        let mut held = Vec::with_capacity(slots.len());
        for (i, &expert) in slots.iter().enumerate() {
            let h = store.acquire(WeightKey::Expert {
                device,
                layer,
                expert,
            })?;
            region.map_slot(i, h.chunk.clone())?;
            held.push(h);
        }
        Ok(Self {
            region,
            slots,
            _held: held,
        })
    }

    /// Expert ids in slot order.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    /// The device virtual address of the range.
    pub fn base(&self) -> u64 {
        self.region.base()
    }

    /// The bytes of `expert`'s slot, if this device holds it.
    pub fn expert(&self, expert: u32) -> Option<Result<HostRead<'_>, VmmError>> {
        let slot = self.slots.iter().position(|&e| e == expert)?;
        Some(self.region.slot_bytes(slot))
    }
}

/// One attention rank: a device, its KV pool and its weight views.
#[derive(Debug)]
pub struct Rank {
    device: DeviceId,
    pool: Arc<BlockPool<HostBackend>>,
    replicas: Arc<ReplicaView>,
    /// Per decoder layer: the expert range (MoE layers only).
    experts: Vec<Option<Arc<ExpertRange>>>,
}

impl Rank {
    /// The device.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// The rank id (the device ordinal).
    pub fn id(&self) -> RankId {
        RankId(self.device.0)
    }

    /// The rank's KV pool.
    pub fn pool(&self) -> &Arc<BlockPool<HostBackend>> {
        &self.pool
    }

    /// The replicated weights.
    pub fn replicas(&self) -> &Arc<ReplicaView> {
        &self.replicas
    }

    /// The expert range of decoder layer `layer` (none for dense layers).
    pub fn experts(&self, layer: usize) -> Option<&Arc<ExpertRange>> {
        self.experts.get(layer).and_then(Option::as_ref)
    }
}

static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// Tokens routed to each expert of each MoE layer, counted where the router runs (each
/// (token, slot) pair once) with relaxed atomic adds, so counting never blocks a step. The
/// executor's plan reads it as the load that load-aware placement balances.
#[derive(Debug)]
pub struct RoutedLoad {
    experts: usize,
    /// Row-major `[moe layer][expert]`.
    tokens: Vec<AtomicU64>,
}

impl RoutedLoad {
    /// Zero counts for `layers` MoE layers of `experts` experts.
    pub fn new(layers: usize, experts: usize) -> Self {
        Self {
            experts,
            tokens: (0..layers * experts).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Counts one routed (token, slot) to `expert` of MoE layer `moe_layer`; out-of-range
    /// indices are ignored (the router only returns experts of the model).
    pub fn add(&self, moe_layer: usize, expert: usize) {
        if expert < self.experts {
            if let Some(c) = self.tokens.get(moe_layer * self.experts + expert) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The tokens routed so far, as `expert-placement`'s load table; `None` before any token
    /// was routed (or for a model without MoE layers), when there is no load to go by.
    pub fn snapshot(&self) -> Option<ExpertLoad> {
        if self.experts == 0 || self.tokens.is_empty() {
            return None;
        }
        let counts: Vec<u64> = self
            .tokens
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        if counts.iter().all(|&c| c == 0) {
            return None;
        }
        ExpertLoad::from_rows(counts.chunks(self.experts).map(<[u64]>::to_vec).collect()).ok()
    }
}

/// An immutable set of devices, ranks and weight views. See the module docs.
#[derive(Debug)]
pub struct Deployment {
    generation: u64,
    /// Tokens routed to each expert of each MoE layer since the first deployment of this
    /// lineage (shared with the deployments built from it), for load-aware placement.
    load: Arc<RoutedLoad>,
    model: Arc<Model>,
    placement: Arc<Placement>,
    ranks: Vec<Rank>,
    /// Decoder layer → MoE-layer index in the placement.
    moe_index: Vec<Option<usize>>,
    geo: KvGeometry,
}

impl Deployment {
    /// Builds the views for `placement`'s devices. Every chunk must be in `store` (see
    /// [`WeightStore::prepare`]). With `previous`, staying devices reuse its KV pools, replicated
    /// views and unchanged expert ranges.
    pub fn build(
        store: &WeightStore,
        placement: &Placement,
        config: &DeploymentConfig,
        previous: Option<&Deployment>,
    ) -> Result<Self, DeploymentError> {
        let model = Arc::clone(store.model());
        let cfg = model.config();
        let moe: Vec<usize> = cfg.moe_layers().collect();
        if placement.layers() != moe.len() || placement.experts_per_layer() != cfg.moe.num_experts {
            return Err(DeploymentError::PlacementMismatch(format!(
                "it has {} layers of {} experts, the model {} MoE layers of {} experts",
                placement.layers(),
                placement.experts_per_layer(),
                moe.len(),
                cfg.moe.num_experts
            )));
        }
        let devices: Vec<DeviceId> = placement.devices().iter().map(|&d| hdev(d)).collect();
        if devices.is_empty() {
            return Err(DeploymentError::NoDevices);
        }
        if devices.len() > cfg.moe.num_experts {
            return Err(DeploymentError::TooManyDevices {
                devices: devices.len(),
                experts: cfg.moe.num_experts,
            });
        }
        let (layout, geo) = kv_layout(&model, config.block_tokens)?;
        if let Some(p) = previous {
            if p.geo != geo {
                return Err(DeploymentError::Unsupported(
                    "the previous deployment uses another KV block size".into(),
                ));
            }
        }
        let mut moe_index = vec![None; cfg.num_layers];
        for (ml, &l) in moe.iter().enumerate() {
            moe_index[l] = Some(ml);
        }
        let mut ranks = Vec::with_capacity(devices.len());
        for &device in &devices {
            store.check_device(device)?;
            let old = previous.and_then(|p| p.rank_on(device));
            let pool = match old {
                Some(r) => Arc::clone(&r.pool),
                None => {
                    let chunk = BlockPool::chunk_bytes_for(
                        &store.vmm,
                        device,
                        &layout,
                        config.blocks_per_chunk,
                    )?;
                    let pc = PoolConfig::new(
                        layout,
                        device,
                        chunk,
                        config.kv_max_chunks.max(config.kv_chunks),
                    )
                    .with_initial_chunks(config.kv_chunks)
                    .with_watermarks(config.watermarks);
                    Arc::new(BlockPool::new(&store.vmm, pc)?)
                }
            };
            let replicas = match old {
                Some(r) => Arc::clone(&r.replicas),
                None => Arc::new(ReplicaView {
                    global: View::new(store, WeightKey::Global { device })?,
                    layers: (0..cfg.num_layers)
                        .map(|layer| View::new(store, WeightKey::Layer { device, layer }))
                        .collect::<Result<_, _>>()?,
                }),
            };
            let mut experts = vec![None; cfg.num_layers];
            for (ml, &layer) in moe.iter().enumerate() {
                let slots: Vec<u32> = placement
                    .slots(ml, pdev(device))
                    .iter()
                    .map(|e| e.0)
                    .collect();
                if slots.is_empty() {
                    continue;
                }
                let reuse = old
                    .and_then(|r| r.experts(layer))
                    .filter(|x| x.slots == slots);
                experts[layer] = Some(match reuse {
                    Some(x) => Arc::clone(x),
                    None => Arc::new(ExpertRange::new(store, device, layer, slots)?),
                });
            }
            ranks.push(Rank {
                device,
                pool,
                replicas,
                experts,
            });
        }
        let load = match previous {
            Some(p) => Arc::clone(&p.load),
            None => Arc::new(RoutedLoad::new(moe.len(), cfg.moe.num_experts)),
        };
        Ok(Self {
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
            load,
            model,
            placement: Arc::new(placement.clone()),
            ranks,
            moe_index,
            geo,
        })
    }

    /// A process-unique number, increasing with every build.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The expert placement.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The devices, ascending (rank `i` runs on `devices()[i]`).
    pub fn devices(&self) -> Vec<DeviceId> {
        self.ranks.iter().map(|r| r.device).collect()
    }

    /// The ranks, in device order.
    pub fn ranks(&self) -> &[Rank] {
        &self.ranks
    }

    /// Rank `i` (in device order).
    pub fn rank(&self, i: usize) -> Option<&Rank> {
        self.ranks.get(i)
    }

    /// The rank on `device`.
    pub fn rank_on(&self, device: DeviceId) -> Option<&Rank> {
        self.ranks.iter().find(|r| r.device == device)
    }

    /// The index of `device` among the ranks.
    pub fn index_of(&self, device: DeviceId) -> Option<usize> {
        self.ranks.iter().position(|r| r.device == device)
    }

    /// The tokens routed to each expert so far (counted by the workers as they route, across
    /// every deployment built from this one's lineage).
    pub fn routed_load(&self) -> &RoutedLoad {
        &self.load
    }

    /// The MoE-layer index (into the placement) of decoder layer `layer`.
    pub fn moe_index(&self, layer: usize) -> Option<usize> {
        self.moe_index.get(layer).copied().flatten()
    }

    /// The KV geometry the kernels use.
    pub fn kv_geometry(&self) -> &KvGeometry {
        &self.geo
    }

    /// The device serving `expert` of decoder layer `layer` for a token with hash `token_hash`
    /// (deterministic; see [`Placement::replica_for`]).
    pub fn replica_for(&self, layer: usize, expert: u32, token_hash: u64) -> Option<DeviceId> {
        let ml = self.moe_index(layer)?;
        self.placement
            .replica_for(ml, ExpertId(expert), token_hash)
            .map(hdev)
    }
}

/// The engine's current deployment, swapped only between iterations.
///
/// Swapping hands the old deployment to the [`Hmm`] epoch mechanism: it is dropped (its views
/// unmapped, its chunk references given back) by [`DeploymentSlot::collect`] once every iteration
/// that could still see it has ended.
pub struct DeploymentSlot {
    current: Arc<Deployment>,
    hmm: Hmm<HostBackend, WeightKey>,
}

impl fmt::Debug for DeploymentSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeploymentSlot")
            .field("generation", &self.current.generation)
            .finish()
    }
}

impl DeploymentSlot {
    /// A slot holding `deployment`; retired deployments go through `store`'s epochs.
    pub fn new(deployment: Arc<Deployment>, store: &WeightStore) -> Self {
        Self {
            current: deployment,
            hmm: store.hmm.clone(),
        }
    }

    /// The current deployment.
    pub fn current(&self) -> &Arc<Deployment> {
        &self.current
    }

    /// Starts an iteration: the returned guard keeps every deployment retired after this point
    /// alive until it is dropped.
    pub fn enter(&self) -> hbm_vmm::EpochGuard {
        self.hmm.enter()
    }

    /// Installs `next` and retires the current one. Returns the retired deployment's generation.
    pub fn swap(&mut self, next: Arc<Deployment>) -> u64 {
        let old = std::mem::replace(&mut self.current, next);
        let generation = old.generation;
        self.hmm.retire(old);
        generation
    }

    /// Drops retired deployments that no iteration can see any more. Returns how many.
    pub fn collect(&self) -> usize {
        self.hmm.collect()
    }

    /// Retired deployments not yet dropped.
    pub fn pending(&self) -> usize {
        self.hmm.pending()
    }
}

/// Copies a sequence's KV blocks from `from` to `to` (host memory copies; on GPUs `p2p-xfer` would
/// carry them). Returns the new sequence in `to`.
pub fn migrate_kv(
    from: &BlockPool<HostBackend>,
    seq: kv_pool::SeqId,
    to: &BlockPool<HostBackend>,
) -> Result<kv_pool::SeqId, DeploymentError> {
    let manifest = from.export(seq)?;
    let imported = to.import(&manifest)?;
    let copy = || -> Result<(), KvError> {
        let bytes: Vec<Vec<u8>> = from.with_host_blocks(|kv| {
            manifest
                .blocks
                .iter()
                .map(|b| kv.block(b.block).map(<[u8]>::to_vec))
                .collect::<Result<_, _>>()
        })??;
        to.with_host_blocks(|kv| {
            for (dst, src) in imported.manifest.blocks.iter().zip(&bytes) {
                kv.block_mut(dst.block)?.copy_from_slice(src);
            }
            Ok::<(), KvError>(())
        })??;
        Ok(())
    };
    if let Err(e) = copy() {
        let _ = to.free(imported.seq);
        return Err(e.into());
    }
    Ok(imported.seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::cpu::CpuCompute;
    use crate::model::weights::MemTensors;
    use moe_model::presets::Preset;

    fn setup(
        preset: Preset,
        max_devices: usize,
    ) -> (Arc<WeightStore>, DeploymentConfig, MemTensors) {
        let cfg = preset.config();
        let model = Arc::new(Model::new(&cfg, CpuCompute::new()).unwrap());
        let config = DeploymentConfig {
            kv_chunks: 2,
            kv_max_chunks: 4,
            ..DeploymentConfig::default()
        };
        let store = Arc::new(WeightStore::host(model, max_devices, &config).unwrap());
        (store, config, MemTensors::seeded(&cfg, 5))
    }

    #[test]
    fn expert_ranges_follow_the_placement_and_map_the_stored_bytes() {
        let (store, config, src) = setup(Preset::TinyQwen3, 2);
        let p = PlacementKind::RoundRobin
            .placement(store.model().config(), 2)
            .unwrap();
        store.load_placement(&src, &p).unwrap();
        let d = Deployment::build(&store, &p, &config, None).unwrap();
        let layer = store.model().config().moe_layers().next().unwrap();
        let r1 = d.rank(1).unwrap();
        let range = r1.experts(layer).unwrap();
        assert_eq!(range.slots(), &[1, 3, 5, 7, 9, 11, 13, 15]);
        // Slot 1 of device 1 is expert 3: its bytes are the chunk the store registered.
        let chunk = store
            .hmm()
            .get(&WeightKey::Expert {
                device: DeviceId(1),
                layer,
                expert: 3,
            })
            .unwrap();
        let direct = store
            .vmm()
            .reserve(DeviceId(1), chunk.size())
            .unwrap()
            .map(0, &chunk, 0, chunk.size())
            .unwrap();
        assert_eq!(&*range.expert(3).unwrap().unwrap(), &*direct.as_slice());
        assert!(range.expert(2).is_none(), "expert 2 lives on device 0");
        assert!(d.replica_for(layer, 2, 77) == Some(DeviceId(0)));
    }

    #[test]
    fn a_deployment_holds_references_and_gives_them_back() {
        let (store, config, src) = setup(Preset::TinyMixtral, 2);
        let p = PlacementKind::Balanced
            .placement(store.model().config(), 2)
            .unwrap();
        store.load_placement(&src, &p).unwrap();
        let key = WeightKey::Expert {
            device: DeviceId(0),
            layer: 0,
            expert: 0,
        };
        assert_eq!(store.hmm().refcount(&key), Some(1));
        let d = Deployment::build(&store, &p, &config, None).unwrap();
        assert_eq!(store.hmm().refcount(&key), Some(2));
        // Released by the store while mapped: alive until the deployment goes.
        assert!(store.release(&key).unwrap());
        assert!(!store.release(&key).unwrap());
        assert!(store.has(&key));
        drop(d);
        assert!(!store.has(&key));
    }

    #[test]
    fn scale_up_copies_only_the_newcomer_and_reuses_staying_views() {
        let (store, config, src) = setup(Preset::TinyDeepseek, 3);
        let cfg = store.model().config().clone();
        let two = PlacementKind::Balanced.placement(&cfg, 2).unwrap();
        store.load_placement(&src, &two).unwrap();
        let d2 = Deployment::build(&store, &two, &config, None).unwrap();
        let used_before = store.vmm().usage(DeviceId(0));
        let three = expert_placement::Placement::rebalanced_for(
            &two,
            &[0, 1, 2].map(expert_placement::DeviceId),
            &ExpertLoad::uniform(cfg.num_moe_layers(), cfg.moe.num_experts).unwrap(),
        )
        .unwrap();
        let report = store.prepare(&three).unwrap();
        assert!(
            report.links.keys().all(|&(_, to)| to == DeviceId(2)),
            "{:?}",
            report.links
        );
        assert!(
            report.links.contains_key(&(DeviceId(0), DeviceId(2)))
                && report.links.contains_key(&(DeviceId(1), DeviceId(2))),
            "striped over both holders"
        );
        assert_eq!(
            store.vmm().usage(DeviceId(0)),
            used_before,
            "nothing new on a staying device"
        );
        let d3 = Deployment::build(&store, &three, &config, Some(&d2)).unwrap();
        for dev in [0, 1] {
            let (a, b) = (d2.rank(dev).unwrap(), d3.rank(dev).unwrap());
            assert!(Arc::ptr_eq(a.pool(), b.pool()));
            assert!(Arc::ptr_eq(a.replicas(), b.replicas()));
        }
        // The newcomer's replicated weights equal device 0's byte for byte.
        let (r0, r2) = (d3.rank(0).unwrap(), d3.rank(2).unwrap());
        assert_eq!(&*r0.replicas().global(), &*r2.replicas().global());
        assert_eq!(
            store.prepare(&three).unwrap(),
            CopyReport::default(),
            "nothing left to copy"
        );
        // After the switch, chunks the new placement does not need can go.
        drop(d2);
        let released = store.release_unused(&three).unwrap();
        assert!(released > 0);
        assert!(store.vmm().usage(DeviceId(0)) < used_before);
    }

    #[test]
    fn bad_device_sets_are_typed_errors() {
        let (store, config, _) = setup(Preset::TinyMixtral, 2);
        let cfg = store.model().config().clone();
        assert!(matches!(
            PlacementKind::Balanced.placement(&cfg, 9),
            Err(DeploymentError::TooManyDevices {
                devices: 9,
                experts: 8
            })
        ));
        assert!(matches!(
            PlacementKind::Balanced.placement(&cfg, 0),
            Err(DeploymentError::NoDevices)
        ));
        let p = PlacementKind::Balanced.placement(&cfg, 2).unwrap();
        let err = Deployment::build(&store, &p, &config, None).unwrap_err();
        assert!(matches!(err, DeploymentError::MissingChunk(_)), "{err}");
        let p3 = PlacementKind::Balanced.placement(&cfg, 3).unwrap();
        let err = Deployment::build(&store, &p3, &config, None).unwrap_err();
        assert!(
            matches!(
                err,
                DeploymentError::NoSuchDevice { .. } | DeploymentError::MissingChunk(_)
            ),
            "{err}"
        );
        assert!("sideways".parse::<PlacementKind>().is_err());
    }

    #[test]
    fn kv_migrates_between_rank_pools() {
        let (store, config, src) = setup(Preset::TinyQwen3, 2);
        let p = PlacementKind::Balanced
            .placement(store.model().config(), 2)
            .unwrap();
        store.load_placement(&src, &p).unwrap();
        let d = Deployment::build(&store, &p, &config, None).unwrap();
        let (a, b) = (d.rank(0).unwrap().pool(), d.rank(1).unwrap().pool());
        let seq = a.create();
        a.grow_to(seq, 20).unwrap();
        let blocks = a.table(seq).unwrap().blocks().to_vec();
        a.with_host_blocks(|kv| {
            for (i, &blk) in blocks.iter().enumerate() {
                kv.block_f32_mut(blk)
                    .unwrap()
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, x)| *x = (i * 1000 + j) as f32);
            }
        })
        .unwrap();
        let moved = migrate_kv(a, seq, b).unwrap();
        let t = b.table(moved).unwrap();
        assert_eq!(t.len(), 20);
        b.with_host_blocks(|kv| {
            for (i, &blk) in t.blocks().iter().enumerate() {
                let v = kv.block_f32(blk).unwrap();
                assert_eq!(v[7], (i * 1000 + 7) as f32);
            }
        })
        .unwrap();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// Whatever the device set and placement, every device's expert ranges hold exactly its
        /// placement slots, in order, each slot reading the bytes of the chunk the store holds
        /// for that expert on that device, and the deployment's references all go back on drop.
        #[test]
        fn expert_ranges_mirror_the_placement(devices in 1usize..=4, kind in 0usize..3, extra in 0u32..2) {
            let (store, config, src) = setup(Preset::TinyMixtral, 4);
            let cfg = store.model().config().clone();
            let kind = [PlacementKind::Balanced, PlacementKind::RoundRobin, PlacementKind::LoadAware][kind];
            // Devices need not start at 0.
            let ids: Vec<expert_placement::DeviceId> =
                (0..devices as u32).map(|d| expert_placement::DeviceId((d + extra) % 4)).collect();
            let p = kind.placement_on(&cfg, &ids).unwrap();
            store.load_placement(&src, &p).unwrap();
            let before: Vec<(WeightKey, Option<usize>)> =
                store.keys().into_iter().map(|k| (k, store.hmm().refcount(&k))).collect();
            let d = Deployment::build(&store, &p, &config, None).unwrap();
            for rank in d.ranks() {
                for (ml, layer) in cfg.moe_layers().enumerate() {
                    let want: Vec<u32> = p.slots(ml, pdev(rank.device())).iter().map(|e| e.0).collect();
                    let range = rank.experts(layer).unwrap();
                    proptest::prop_assert_eq!(range.slots(), want.as_slice());
                    for &e in &want {
                        let key = WeightKey::Expert { device: rank.device(), layer, expert: e };
                        let chunk = store.hmm().get(&key).unwrap();
                        let m = store.vmm().reserve(rank.device(), chunk.size()).unwrap().map(0, &chunk, 0, chunk.size()).unwrap();
                        proptest::prop_assert!(*range.expert(e).unwrap().unwrap() == *m.as_slice());
                    }
                }
            }
            drop(d);
            let after: Vec<(WeightKey, Option<usize>)> =
                store.keys().into_iter().map(|k| (k, store.hmm().refcount(&k))).collect();
            proptest::prop_assert_eq!(before, after);
        }
    }

    #[test]
    fn the_slot_retires_old_deployments_after_their_last_iteration() {
        let (store, config, src) = setup(Preset::TinyMixtral, 2);
        let p = PlacementKind::Balanced
            .placement(store.model().config(), 2)
            .unwrap();
        store.load_placement(&src, &p).unwrap();
        let d1 = Arc::new(Deployment::build(&store, &p, &config, None).unwrap());
        let d2 = Arc::new(Deployment::build(&store, &p, &config, Some(&d1)).unwrap());
        let weak = Arc::downgrade(&d1);
        let mut slot = DeploymentSlot::new(d1, &store);
        let guard = slot.enter();
        assert_eq!(slot.swap(d2), weak.upgrade().unwrap().generation());
        assert_eq!(
            slot.collect(),
            0,
            "an iteration that started before the swap still runs"
        );
        assert!(weak.upgrade().is_some());
        drop(guard);
        assert_eq!(slot.collect(), 1);
        assert!(weak.upgrade().is_none());
        assert_eq!(slot.pending(), 0);
    }
}

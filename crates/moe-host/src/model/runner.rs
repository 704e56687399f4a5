//! The single-device path: one [`DeviceWeights`] holding every expert, a [`VecKvBlocks`] store,
//! and per-sequence block tables. Used by tests, benchmarks and the engine's simplest path.

use std::collections::BTreeMap;

use hbm_vmm::host::HostBackend;
use hbm_vmm::{DeviceId, HostRead, Vmm};

use super::weights::{DeviceWeights, LayerWeights, TensorSource, WeightViews};
use super::{ExpertExec, Logits, Model, ModelError, StepBatch};
use crate::compute::{cpu::CpuCompute, Compute, KvBlocks, KvGeometry, SeqSpan, VecKvBlocks};

/// Runs routed experts held by one device's weights.
#[derive(Debug)]
pub struct LocalExperts<'a, C: Compute> {
    model: &'a Model<C>,
    weights: &'a DeviceWeights,
}

impl<'a, C: Compute> LocalExperts<'a, C> {
    /// Experts of `weights`, computed with `model`'s backend.
    pub fn new(model: &'a Model<C>, weights: &'a DeviceWeights) -> Self {
        Self { model, weights }
    }
}

impl<C: Compute> ExpertExec for LocalExperts<'_, C> {
    fn run(
        &mut self,
        layer: usize,
        expert: u32,
        rows: &[f32],
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        let bytes = self.weights.expert_bytes(layer, expert)?;
        let w = self.model.layout().expert_view(bytes.as_f32())?;
        self.model.compute().swiglu(&w, rows, out)?;
        Ok(())
    }
}

/// Read guards over a device's global and layer chunks, from which typed views are built.
#[derive(Debug)]
pub struct ReplicaGuards<'a> {
    global: HostRead<'a>,
    layers: Vec<HostRead<'a>>,
}

impl<'a> ReplicaGuards<'a> {
    /// Takes read access to `w`'s global and layer chunks.
    pub fn new(w: &'a DeviceWeights) -> Result<Self, ModelError> {
        let n = w.layout().config().num_layers;
        let layers = (0..n)
            .map(|l| w.layer_bytes(l))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            global: w.global_bytes(),
            layers,
        })
    }

    /// The global view.
    pub fn global<'s>(
        &'s self,
        w: &DeviceWeights,
    ) -> Result<super::weights::GlobalWeights<'s>, ModelError> {
        w.layout().global_view(self.global.as_f32())
    }

    /// Every layer's view, in order.
    pub fn layers<'s>(&'s self, w: &DeviceWeights) -> Result<Vec<LayerWeights<'s>>, ModelError> {
        self.layers
            .iter()
            .enumerate()
            .map(|(l, g)| w.layout().layer_view(l, g.as_f32()))
            .collect()
    }
}

/// A sequence known to a [`SingleDevice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeqId(pub u64);

#[derive(Debug, Default)]
struct SeqState {
    blocks: Vec<u32>,
    len: usize,
}

/// A model on one device with its own paged KV store.
#[derive(Debug)]
pub struct SingleDevice<C: Compute = CpuCompute> {
    model: Model<C>,
    weights: DeviceWeights,
    store: VecKvBlocks,
    geo: KvGeometry,
    seqs: BTreeMap<u64, SeqState>,
    next: u64,
}

impl<C: Compute> SingleDevice<C> {
    /// Loads every tensor (all routed experts) of `model` from `src` onto `dev`.
    pub fn load(
        model: Model<C>,
        vmm: &Vmm<HostBackend>,
        dev: DeviceId,
        src: &dyn TensorSource,
        block_tokens: usize,
    ) -> Result<Self, ModelError> {
        let cfg = model.config();
        let all: Vec<(usize, u32)> = cfg
            .moe_layers()
            .flat_map(|l| (0..cfg.moe.num_experts as u32).map(move |e| (l, e)))
            .collect();
        let weights = DeviceWeights::load(vmm, dev, model.layout(), src, all)?;
        Self::new(model, weights, block_tokens)
    }

    /// A runner over already loaded weights (which must hold every routed expert the model routes to).
    pub fn new(
        model: Model<C>,
        weights: DeviceWeights,
        block_tokens: usize,
    ) -> Result<Self, ModelError> {
        if block_tokens == 0 {
            return Err(ModelError::Unsupported("KV blocks of zero tokens".into()));
        }
        let geo = model.kv_geometry(block_tokens);
        Ok(Self {
            store: VecKvBlocks::new(geo.block_floats()),
            model,
            weights,
            geo,
            seqs: BTreeMap::new(),
            next: 0,
        })
    }

    /// The model.
    pub fn model(&self) -> &Model<C> {
        &self.model
    }

    /// The weights.
    pub fn weights(&self) -> &DeviceWeights {
        &self.weights
    }

    /// The KV geometry.
    pub fn kv_geometry(&self) -> &KvGeometry {
        &self.geo
    }

    /// A new, empty sequence.
    pub fn add_sequence(&mut self) -> SeqId {
        let id = self.next;
        self.next += 1;
        self.seqs.insert(id, SeqState::default());
        SeqId(id)
    }

    /// Forgets a sequence and frees its KV blocks.
    pub fn remove_sequence(&mut self, id: SeqId) -> Result<(), ModelError> {
        let s = self
            .seqs
            .remove(&id.0)
            .ok_or(ModelError::NoSuchSequence(id.0))?;
        for b in s.blocks {
            self.store.release(b);
        }
        Ok(())
    }

    /// Tokens in a sequence's cache.
    pub fn seq_len(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id.0).map(|s| s.len)
    }

    /// A sequence's KV block ids, in position order.
    pub fn seq_blocks(&self, id: SeqId) -> Option<&[u32]> {
        self.seqs.get(&id.0).map(|s| s.blocks.as_slice())
    }

    /// The KV store.
    pub fn kv_store(&self) -> &dyn KvBlocks {
        &self.store
    }

    /// Appends `tokens` to each listed sequence in one batch and returns, per input, the logits of
    /// its last new token.
    pub fn step(&mut self, inputs: &[(SeqId, Vec<u32>)]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.step_with(inputs, Logits::Last)
    }

    /// As [`SingleDevice::step`]; with [`Logits::All`] every new token's logits come back, in
    /// input order.
    pub fn step_with(
        &mut self,
        inputs: &[(SeqId, Vec<u32>)],
        which: Logits,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        for (i, (id, toks)) in inputs.iter().enumerate() {
            if !self.seqs.contains_key(&id.0) {
                return Err(ModelError::NoSuchSequence(id.0));
            }
            if toks.is_empty() {
                return Err(ModelError::EmptyInput(id.0));
            }
            if inputs[..i].iter().any(|(other, _)| other == id) {
                return Err(ModelError::DuplicateSequence(id.0));
            }
        }
        for (id, toks) in inputs {
            let s = self
                .seqs
                .get_mut(&id.0)
                .ok_or(ModelError::NoSuchSequence(id.0))?;
            while s.blocks.len() < self.geo.blocks_for(s.len + toks.len()) {
                s.blocks.push(self.store.alloc());
            }
        }
        let tokens: Vec<u32> = inputs.iter().flat_map(|(_, t)| t.iter().copied()).collect();
        let seqs: Vec<SeqSpan<'_>> = inputs
            .iter()
            .map(|(id, t)| {
                let s = &self.seqs[&id.0];
                SeqSpan {
                    blocks: &s.blocks,
                    start: s.len,
                    len: t.len(),
                }
            })
            .collect();
        let guards = ReplicaGuards::new(&self.weights)?;
        let global = guards.global(&self.weights)?;
        let layers = guards.layers(&self.weights)?;
        let mut experts = LocalExperts::new(&self.model, &self.weights);
        let batch = StepBatch {
            geo: &self.geo,
            seqs: &seqs,
            tokens: &tokens,
        };
        let logits = self.model.forward(
            &global,
            &layers,
            &mut self.store,
            batch,
            &mut experts,
            which,
        )?;
        drop(seqs);
        for (id, t) in inputs {
            if let Some(s) = self.seqs.get_mut(&id.0) {
                s.len += t.len();
            }
        }
        Ok(logits
            .chunks_exact(self.model.config().vocab_size)
            .map(<[f32]>::to_vec)
            .collect())
    }

    /// Greedy generation for one new sequence: prefill `prompt`, then `steps` decode steps.
    /// Returns the generated tokens and the logits that chose each of them.
    pub fn generate_greedy(
        &mut self,
        prompt: &[u32],
        steps: usize,
    ) -> Result<(Vec<u32>, Vec<Vec<f32>>), ModelError> {
        let id = self.add_sequence();
        let mut out = Vec::with_capacity(steps);
        let mut all = Vec::with_capacity(steps);
        let mut next = prompt.to_vec();
        for _ in 0..steps {
            let logits = self.step(&[(id, next)])?.remove(0);
            let tok = argmax(&logits);
            out.push(tok);
            all.push(logits);
            next = vec![tok];
        }
        self.remove_sequence(id)?;
        Ok((out, all))
    }
}

/// The index of the largest logit (the lowest among ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::MemTensors;
    use hbm_vmm::host::HostConfig;
    use moe_model::presets::Preset;

    #[test]
    fn a_runner_moves_to_a_worker_thread_and_keeps_its_state() {
        let cfg = Preset::TinyQwen3.config();
        let src = MemTensors::seeded(&cfg, 2);
        let host = HostConfig::devices(1, 64 << 20).with_granularity(hbm_vmm::host::page_size());
        let vmm = Vmm::new(HostBackend::new(host.unwrap()));
        let model = Model::new(&cfg, CpuCompute::new()).unwrap();
        let mut run = SingleDevice::load(model, &vmm, DeviceId(0), &src, 4).unwrap();
        let id = run.add_sequence();
        let here = run.step(&[(id, vec![5, 6, 7])]).unwrap();
        let (run, there) = std::thread::spawn(move || {
            let l = run.step(&[(id, vec![argmax(&here[0])])]).unwrap();
            (run, l)
        })
        .join()
        .unwrap();
        assert_eq!(run.seq_len(id), Some(4));
        assert_eq!(run.seq_blocks(id).map(<[u32]>::len), Some(1));
        assert!(there[0].iter().all(|v| v.is_finite()));
    }

    #[test]
    fn argmax_takes_the_lowest_index_among_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[0.5]), 0);
    }
}

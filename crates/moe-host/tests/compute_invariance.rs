//! Bitwise invariance of a sequence's logits:
//! - across batch mixes (alone vs. batched with others, prefill chunked differently, decode vs.
//!   prefill, different KV block ids);
//! - across expert placements (experts split over 1, 2 or 3 host devices' chunks, attention on
//!   different ranks, replicas) and across slot orders (expert chunks remapped zero-copy into a
//!   `PagedRegion` in a shuffled order).
//!
//! The multi-device driver here composes the model's seams the way the engine does: attention per
//! rank on its own KV store, route on the rank, dispatch tokens of all ranks per expert to a device
//! holding it, combine on the rank.

mod compute_support;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use compute_support::{host_vmm, TINY};
use hbm_vmm::host::HostBackend;
use hbm_vmm::{DeviceId, PagedRegion, Vmm};
use moe_host::compute::cpu::CpuCompute;
use moe_host::compute::{AttnBatch, SeqSpan, VecKvBlocks};
use moe_host::model::runner::{ReplicaGuards, SingleDevice};
use moe_host::model::weights::{DeviceWeights, MemTensors, WeightViews};
use moe_host::model::{dispatch, ExpertExec, Logits, Model, ModelError};
use moe_model::config::ModelConfig;
use moe_model::presets::Preset;
use proptest::prelude::*;

fn model(cfg: &ModelConfig) -> Model {
    Model::new(cfg, CpuCompute::new()).expect("model")
}

/// Token streams of different lengths (within the tiny vocabulary).
fn streams(cfg: &ModelConfig) -> Vec<Vec<u32>> {
    let v = cfg.vocab_size as u32;
    [(11u32, 9usize), (5, 14), (29, 6), (3, 11)]
        .iter()
        .map(|&(seed, n)| {
            (0..n as u32)
                .map(|i| (seed * 31 + i * 17 + i * i) % v)
                .collect()
        })
        .collect()
}

/// Every position's logits of `tokens` run alone in one step.
fn alone(cfg: &ModelConfig, src: &MemTensors, tokens: &[u32]) -> Vec<Vec<f32>> {
    let vmm = host_vmm(1);
    let mut run = SingleDevice::load(model(cfg), &vmm, DeviceId(0), src, 4).expect("load");
    let id = run.add_sequence();
    run.step_with(&[(id, tokens.to_vec())], Logits::All)
        .expect("step")
}

/// Feeds each stream in the given chunk sizes, `rounds[r]` listing which streams take part in
/// round `r`; returns every position's logits per stream.
fn mixed(
    cfg: &ModelConfig,
    src: &MemTensors,
    streams: &[Vec<u32>],
    rounds: &[Vec<(usize, usize)>],
    block_tokens: usize,
) -> Vec<Vec<Vec<f32>>> {
    let vmm = host_vmm(1);
    let mut run =
        SingleDevice::load(model(cfg), &vmm, DeviceId(0), src, block_tokens).expect("load");
    // A throwaway sequence first, so every real sequence's block ids differ from the alone run.
    let junk = run.add_sequence();
    run.step(&[(junk, vec![1, 2, 3, 4, 5])]).expect("junk");
    let ids: Vec<_> = streams.iter().map(|_| run.add_sequence()).collect();
    let mut fed = vec![0usize; streams.len()];
    let mut out = vec![Vec::new(); streams.len()];
    for round in rounds {
        let inputs: Vec<_> = round
            .iter()
            .map(|&(s, n)| {
                let toks = streams[s][fed[s]..fed[s] + n].to_vec();
                fed[s] += n;
                (ids[s], toks)
            })
            .collect();
        let logits = run.step_with(&inputs, Logits::All).expect("step");
        let mut rows = logits.into_iter();
        for &(s, n) in round {
            out[s].extend(rows.by_ref().take(n));
        }
    }
    out
}

fn assert_bitwise(a: &[Vec<f32>], b: &[Vec<f32>], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: positions");
    for (p, (x, y)) in a.iter().zip(b).enumerate() {
        let same = x.len() == y.len() && x.iter().zip(y).all(|(u, v)| u.to_bits() == v.to_bits());
        assert!(same, "{what}: logits differ at position {p}");
    }
}

#[test]
fn logits_are_bitwise_identical_across_batch_mixes() {
    for preset in TINY {
        let cfg = preset.config();
        let src = MemTensors::seeded(&cfg, 5);
        let s = streams(&cfg);
        let base: Vec<_> = s.iter().map(|t| alone(&cfg, &src, t)).collect();
        // Stream lengths 9, 14, 6, 11: prefill chunks, decode steps and partners all vary.
        let rounds = vec![
            vec![(2, 3)],
            vec![(0, 5), (2, 1)],
            vec![(1, 3), (0, 1), (3, 7)],
            vec![(0, 1), (1, 6), (2, 1), (3, 1)],
            vec![(3, 1), (0, 1)],
            vec![(1, 1), (0, 1), (3, 2)],
            vec![(1, 4), (2, 1)],
        ];
        let got = mixed(&cfg, &src, &s, &rounds, 4);
        for (i, (g, b)) in got.iter().zip(&base).enumerate() {
            let fed: usize = rounds
                .iter()
                .flatten()
                .filter(|r| r.0 == i)
                .map(|r| r.1)
                .sum();
            assert_eq!(fed, s[i].len(), "schedule feeds all of stream {i}");
            assert_bitwise(g, b, &format!("{preset} stream {i}"));
        }
        // A different block size changes only where tokens sit, not the numbers.
        let got3 = mixed(&cfg, &src, &s, &rounds, 3);
        for (i, (g, b)) in got3.iter().zip(&base).enumerate() {
            assert_bitwise(g, b, &format!("{preset} stream {i}, 3-token blocks"));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Random chunkings and batch partners never change a bit of any stream's logits.
    #[test]
    fn random_schedules_are_invariant(plan in proptest::collection::vec((0usize..4, 1usize..5), 4..30)) {
        let cfg = Preset::TinyMixtral.config();
        let src = MemTensors::seeded(&cfg, 9);
        let s = streams(&cfg);
        // Turn the random plan into rounds: each entry feeds up to n tokens of a stream; a stream
        // appears at most once per round; leftovers are fed at the end.
        let mut left: Vec<usize> = s.iter().map(Vec::len).collect();
        let mut rounds: Vec<Vec<(usize, usize)>> = vec![Vec::new()];
        for (st, n) in plan {
            let n = n.min(left[st]);
            if n == 0 { continue; }
            if rounds.last().is_some_and(|r| r.iter().any(|e| e.0 == st)) {
                rounds.push(Vec::new());
            }
            if let Some(r) = rounds.last_mut() {
                r.push((st, n));
            }
            left[st] -= n;
        }
        rounds.push(left.iter().enumerate().filter(|(_, &n)| n > 0).map(|(i, &n)| (i, n)).collect());
        rounds.retain(|r| !r.is_empty());
        let got = mixed(&cfg, &src, &s, &rounds, 4);
        static BASE: OnceLock<Vec<Vec<Vec<f32>>>> = OnceLock::new();
        let base = BASE.get_or_init(|| s.iter().map(|t| alone(&cfg, &src, t)).collect());
        for (i, g) in got.iter().enumerate() {
            let b = &base[i];
            prop_assert_eq!(g.len(), b.len());
            for (x, y) in g.iter().zip(b) {
                prop_assert!(x.iter().zip(y).all(|(u, v)| u.to_bits() == v.to_bits()));
            }
        }
    }
}

/// Where routed experts live, and how to read one.
trait ExpertHome {
    fn with_expert(
        &self,
        layer: usize,
        expert: u32,
        f: &mut dyn FnMut(&[f32]) -> Result<(), ModelError>,
    ) -> Result<(), ModelError>;
}

/// Experts spread over several devices' weights; `holders[(l, e)]` lists the devices holding a
/// replica, and the lowest-numbered one runs it.
struct Spread<'a> {
    devices: &'a [DeviceWeights],
    holders: BTreeMap<(usize, u32), Vec<usize>>,
}

impl ExpertHome for Spread<'_> {
    fn with_expert(
        &self,
        layer: usize,
        expert: u32,
        f: &mut dyn FnMut(&[f32]) -> Result<(), ModelError>,
    ) -> Result<(), ModelError> {
        let d = self.holders[&(layer, expert)][0];
        let bytes = self.devices[d].expert_bytes(layer, expert)?;
        f(bytes.as_f32())
    }
}

/// Experts mapped into one `PagedRegion` per layer in a shuffled slot order.
struct Remapped {
    regions: BTreeMap<usize, PagedRegion<HostBackend>>,
    slot_of: BTreeMap<(usize, u32), usize>,
}

impl ExpertHome for Remapped {
    fn with_expert(
        &self,
        layer: usize,
        expert: u32,
        f: &mut dyn FnMut(&[f32]) -> Result<(), ModelError>,
    ) -> Result<(), ModelError> {
        let bytes = self.regions[&layer].slot_bytes(self.slot_of[&(layer, expert)])?;
        f(bytes.as_f32())
    }
}

struct HomeExec<'a> {
    model: &'a Model,
    home: &'a dyn ExpertHome,
}

impl ExpertExec for HomeExec<'_> {
    fn run(
        &mut self,
        layer: usize,
        expert: u32,
        rows: &[f32],
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        let model = self.model;
        self.home.with_expert(layer, expert, &mut |data| {
            let w = model.layout().expert_view(data)?;
            out.copy_from_slice(&model.expert(&w, rows)?);
            Ok(())
        })
    }
}

/// Data-parallel attention over `ranks` (each with its own replica and KV store), expert-parallel
/// MoE through `home`. Each stream is assigned to rank `stream % ranks.len()` and fed whole in one
/// step; returns every position's logits per stream.
#[allow(clippy::needless_range_loop)] // ranks are indexed in lockstep across several vectors
fn multi_rank(
    model: &Model,
    ranks: &[&DeviceWeights],
    home: &dyn ExpertHome,
    streams: &[Vec<u32>],
) -> Vec<Vec<Vec<f32>>> {
    let cfg = model.config();
    let h = cfg.hidden_size;
    let k = cfg.moe.top_k;
    let geo = model.kv_geometry(4);
    let nr = ranks.len();
    let mine = |r: usize| (0..streams.len()).filter(move |s| s % nr == r);
    let mut stores: Vec<VecKvBlocks> = (0..nr)
        .map(|_| VecKvBlocks::new(geo.block_floats()))
        .collect();
    let tables: Vec<Vec<Vec<u32>>> = (0..nr)
        .map(|r| {
            mine(r)
                .map(|s| {
                    (0..geo.blocks_for(streams[s].len()))
                        .map(|_| stores[r].alloc())
                        .collect()
                })
                .collect()
        })
        .collect();
    let guards: Vec<ReplicaGuards<'_>> = ranks
        .iter()
        .map(|w| ReplicaGuards::new(w).unwrap())
        .collect();
    let globals: Vec<_> = guards
        .iter()
        .zip(ranks)
        .map(|(g, w)| g.global(w).unwrap())
        .collect();
    let layers: Vec<_> = guards
        .iter()
        .zip(ranks)
        .map(|(g, w)| g.layers(w).unwrap())
        .collect();
    let spans: Vec<Vec<SeqSpan<'_>>> = (0..nr)
        .map(|r| {
            mine(r)
                .zip(&tables[r])
                .map(|(s, t)| SeqSpan {
                    blocks: t,
                    start: 0,
                    len: streams[s].len(),
                })
                .collect()
        })
        .collect();
    let mut hidden: Vec<Vec<f32>> = (0..nr)
        .map(|r| {
            let toks: Vec<u32> = mine(r).flat_map(|s| streams[s].iter().copied()).collect();
            model.embed(&globals[r], &toks).unwrap()
        })
        .collect();
    let mut exec = HomeExec { model, home };
    for l in 0..cfg.num_layers {
        let mut normed = Vec::new();
        let mut routes = Vec::new();
        for r in 0..nr {
            let batch = AttnBatch {
                geo: &geo,
                layer: l,
                seqs: &spans[r],
            };
            model
                .attention_step(&layers[r][l], batch, &mut stores[r], &mut hidden[r])
                .unwrap();
            if cfg.is_moe_layer(l) {
                let x = model.mlp_input(&layers[r][l], &hidden[r]).unwrap();
                routes.push(model.route(&layers[r][l], &x).unwrap());
                normed.push(x);
            } else {
                model.dense_step(&layers[r][l], &mut hidden[r]).unwrap();
            }
        }
        if !cfg.is_moe_layer(l) {
            continue;
        }
        // Expert parallelism: all ranks' tokens for one expert run together, on its holder.
        let mut per_expert: BTreeMap<u32, Vec<(usize, usize, usize)>> = BTreeMap::new();
        for (r, rr) in routes.iter().enumerate() {
            for (e, group) in dispatch(rr) {
                per_expert
                    .entry(e)
                    .or_default()
                    .extend(group.into_iter().map(|(t, s)| (r, t, s)));
            }
        }
        let mut results: Vec<Vec<f32>> = routes
            .iter()
            .map(|rr| vec![0.0; rr.len() * k * h])
            .collect();
        for (e, items) in per_expert {
            let rows: Vec<f32> = items
                .iter()
                .flat_map(|&(r, t, _)| normed[r][t * h..(t + 1) * h].iter().copied())
                .collect();
            let mut out = vec![0.0; rows.len()];
            exec.run(l, e, &rows, &mut out).unwrap();
            for (&(r, t, s), row) in items.iter().zip(out.chunks_exact(h)) {
                results[r][(t * k + s) * h..(t * k + s + 1) * h].copy_from_slice(row);
            }
        }
        for r in 0..nr {
            let shared = model.shared(&layers[r][l], &normed[r]).unwrap();
            model
                .combine(&routes[r], &results[r], shared.as_deref(), &mut hidden[r])
                .unwrap();
        }
    }
    let mut out = vec![Vec::new(); streams.len()];
    for r in 0..nr {
        let logits = model.logits(&globals[r], &hidden[r]).unwrap();
        let mut rows = logits.chunks_exact(cfg.vocab_size).map(<[f32]>::to_vec);
        for s in mine(r) {
            out[s] = rows.by_ref().take(streams[s].len()).collect();
        }
    }
    out
}

fn all_experts(cfg: &ModelConfig) -> Vec<(usize, u32)> {
    cfg.moe_layers()
        .flat_map(|l| (0..cfg.moe.num_experts as u32).map(move |e| (l, e)))
        .collect()
}

#[test]
fn logits_are_bitwise_identical_across_expert_placements() {
    for preset in TINY {
        let cfg = preset.config();
        let src = MemTensors::seeded(&cfg, 17);
        let m = model(&cfg);
        let s = streams(&cfg);
        let base: Vec<_> = s.iter().map(|t| alone(&cfg, &src, t)).collect();
        let layout = Arc::clone(m.layout());
        let vmm: Vmm<HostBackend> = host_vmm(3);
        // Placements over 1, 2 and 3 devices, one of them with replicas of hot-looking experts.
        type Place = fn(usize, u32) -> Vec<usize>;
        let placements: [(usize, &str, Place); 4] = [
            (1, "one device", |_, _| vec![0]),
            (2, "two devices, striped", |_, e| vec![e as usize % 2]),
            (3, "three devices, scrambled", |l, e| {
                vec![(e as usize * 7 + l) % 3]
            }),
            (3, "three devices with replicas", |l, e| {
                let d = (e as usize + l) % 3;
                if e % 3 == 0 {
                    vec![(d + 1) % 3, d]
                } else {
                    vec![d]
                }
            }),
        ];
        for (n, what, place) in placements {
            let mut holders: BTreeMap<(usize, u32), Vec<usize>> = BTreeMap::new();
            for (l, e) in all_experts(&cfg) {
                let mut p = place(l, e);
                p.sort_unstable();
                holders.insert((l, e), p);
            }
            let devices: Vec<DeviceWeights> = (0..n)
                .map(|d| {
                    let mine = holders
                        .iter()
                        .filter(|(_, h)| h.contains(&d))
                        .map(|(&k, _)| k);
                    DeviceWeights::load(
                        &vmm,
                        DeviceId(d as u32),
                        &layout,
                        &src,
                        mine.collect::<Vec<_>>(),
                    )
                    .expect("load device")
                })
                .collect();
            for (d, w) in devices.iter().enumerate() {
                let held = w.expert_chunks().count();
                let want = holders.values().filter(|h| h.contains(&d)).count();
                assert_eq!(held, want, "{what}: device {d} holds exactly its experts");
            }
            let home = Spread {
                devices: &devices,
                holders,
            };
            let ranks: Vec<&DeviceWeights> = devices.iter().collect();
            let got = multi_rank(&m, &ranks, &home, &s);
            for (i, (g, b)) in got.iter().zip(&base).enumerate() {
                assert_bitwise(g, b, &format!("{preset}, {what}, stream {i}"));
            }
        }
    }
}

#[test]
fn logits_are_bitwise_identical_with_experts_remapped_in_another_slot_order() {
    for preset in TINY {
        let cfg = preset.config();
        let src = MemTensors::seeded(&cfg, 23);
        let m = model(&cfg);
        let s = streams(&cfg);
        let base: Vec<_> = s.iter().map(|t| alone(&cfg, &src, t)).collect();
        let vmm = host_vmm(1);
        let w =
            DeviceWeights::load(&vmm, DeviceId(0), m.layout(), &src, all_experts(&cfg)).unwrap();
        let usage_before = vmm.usage(DeviceId(0));
        let gran = vmm.granularity(DeviceId(0)).unwrap();
        let slot = m.layout().expert_chunk_bytes(gran);
        let n = cfg.moe.num_experts;
        let mut regions = BTreeMap::new();
        let mut slot_of = BTreeMap::new();
        for l in cfg.moe_layers() {
            let mut region = PagedRegion::new(&vmm, DeviceId(0), slot, n).unwrap();
            for e in 0..n as u32 {
                // A shuffled order that differs per layer: slot = (5e + l + 3) mod n.
                let sl = (5 * e as usize + l + 3) % n;
                region
                    .map_slot(sl, w.expert_chunk(l, e).unwrap().clone())
                    .unwrap();
                slot_of.insert((l, e), sl);
            }
            regions.insert(l, region);
        }
        let home = Remapped { regions, slot_of };
        let got = multi_rank(&m, &[&w], &home, &s);
        assert_eq!(
            vmm.usage(DeviceId(0)),
            usage_before,
            "remapping is zero-copy"
        );
        for (i, (g, b)) in got.iter().zip(&base).enumerate() {
            assert_bitwise(g, b, &format!("{preset}, remapped slots, stream {i}"));
        }
    }
}

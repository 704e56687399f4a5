//! The paged, chunk-resident forward pass against a naive dense reference written here from the
//! architectures' published modeling code: one sequence, no paging, plain `f64` loops, weights
//! read from the checkpoint by name, MLA computed unabsorbed, DeepSeek rope computed the way its
//! reference code does (de-interleave, then rotate halves).
//!
//! Agreement is measured per step as `max_i |ours_i - ref_i| <= 1e-5 * max_i |ref_i|` (relative to
//! the logit vector's scale, so that near-zero logits do not make the ratio meaningless).

mod compute_support;

use std::collections::HashMap;

use compute_support::{host_vmm, model_dir, model_dir_as, TINY};
use hbm_vmm::DeviceId;
use moe_host::compute::cpu::CpuCompute;
use moe_host::model::runner::{argmax, SingleDevice};
use moe_host::model::{Logits, Model};
use moe_model::checkpoint::Checkpoint;
use moe_model::config::{Architecture, AttentionConfig, DType, ModelConfig, TopkMethod};
use moe_model::presets::Preset;
use moe_model::schema::ModelSchema;

/// A dense, single-sequence reference model.
struct Reference {
    cfg: ModelConfig,
    w: HashMap<String, Vec<f64>>,
    inv_freq: Vec<f64>,
    rope_mscale: f64,
    /// Per layer, per position: keys and values per head (`heads x dim`).
    keys: Vec<Vec<Vec<Vec<f64>>>>,
    values: Vec<Vec<Vec<Vec<f64>>>>,
}

/// One vector per head.
type Heads = Vec<Vec<f64>>;

fn matvec(w: &[f64], x: &[f64]) -> Vec<f64> {
    let n = x.len();
    w.chunks(n)
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rmsnorm(x: &[f64], g: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(g).map(|(v, g)| g * (v * r)).collect()
}

fn softmax(s: &[f64]) -> Vec<f64> {
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.iter().map(|v| v / z).collect()
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// `rotate_half` rope on a head whose pairs are `(i, i + d/2)`.
fn rope_halves(x: &mut [f64], pos: usize, inv_freq: &[f64], mscale: f64) {
    let h = x.len() / 2;
    for i in 0..h {
        let (c, s) = (
            (pos as f64 * inv_freq[i]).cos() * mscale,
            (pos as f64 * inv_freq[i]).sin() * mscale,
        );
        let (a, b) = (x[i], x[i + h]);
        x[i] = a * c - b * s;
        x[i + h] = b * c + a * s;
    }
}

/// DeepSeek-V2's rope: `view(d/2, 2).transpose` (de-interleave), then `rotate_half`.
fn rope_deepseek(x: &mut Vec<f64>, pos: usize, inv_freq: &[f64], mscale: f64) {
    let evens = x.iter().step_by(2).cloned();
    let odds = x.iter().skip(1).step_by(2).cloned();
    let mut y: Vec<f64> = evens.chain(odds).collect();
    rope_halves(&mut y, pos, inv_freq, mscale);
    *x = y;
}

impl Reference {
    fn load(ck: &Checkpoint, cfg: &ModelConfig) -> Self {
        let mut w = HashMap::new();
        for t in ModelSchema::new(cfg).tensors() {
            let v = ck.read_f32(&t.name).expect("tensor");
            w.insert(t.name.clone(), v.into_iter().map(f64::from).collect());
        }
        let dim = cfg.attention.rope_dim();
        let theta = cfg.rope.theta;
        let plain: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64))
            .collect();
        let (inv_freq, rope_mscale) = match &cfg.rope.yarn {
            None => (plain, 1.0),
            Some(y) => {
                let find_dim = |rot: f64| {
                    (dim as f64
                        * (y.original_max_position_embeddings as f64
                            / (rot * 2.0 * std::f64::consts::PI))
                            .ln())
                        / (2.0 * theta.ln())
                };
                let low = find_dim(y.beta_fast).floor().max(0.0);
                let mut high = find_dim(y.beta_slow).ceil().min(dim as f64 - 1.0);
                if low == high {
                    high += 0.001;
                }
                let inv: Vec<f64> = (0..dim / 2)
                    .map(|i| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let mask = 1.0 - ramp;
                        plain[i] / y.factor * (1.0 - mask) + plain[i] * mask
                    })
                    .collect();
                let gm = |m: f64| {
                    if y.factor <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * y.factor.ln() + 1.0
                    }
                };
                (inv, gm(y.mscale) / gm(y.mscale_all_dim))
            }
        };
        let n = cfg.num_layers;
        Self {
            cfg: cfg.clone(),
            w,
            inv_freq,
            rope_mscale,
            keys: vec![Vec::new(); n],
            values: vec![Vec::new(); n],
        }
    }

    fn t(&self, name: &str) -> &[f64] {
        self.w.get(name).unwrap_or_else(|| panic!("missing {name}"))
    }

    fn lp(&self, l: usize, s: &str) -> &[f64] {
        self.t(&format!("model.layers.{l}.{s}"))
    }

    fn mlp_prefix(&self) -> &'static str {
        if self.cfg.architecture == Architecture::Mixtral {
            "block_sparse_moe"
        } else {
            "mlp"
        }
    }

    fn swiglu(&self, prefix: &str, names: [&str; 3], x: &[f64]) -> Vec<f64> {
        let g = matvec(self.t(&format!("{prefix}.{}.weight", names[0])), x);
        let u = matvec(self.t(&format!("{prefix}.{}.weight", names[1])), x);
        let h: Vec<f64> = g.iter().zip(&u).map(|(g, u)| silu(*g) * u).collect();
        matvec(self.t(&format!("{prefix}.{}.weight", names[2])), &h)
    }

    fn attention(&mut self, l: usize, x: &[f64], pos: usize) -> Vec<f64> {
        let eps = self.cfg.rms_norm_eps;
        let (q_heads, k_heads, v_heads, scale): (Heads, Heads, Heads, f64) =
            match self.cfg.attention.clone() {
                AttentionConfig::Gqa(g) => {
                    let d = g.head_dim;
                    let q = matvec(self.lp(l, "self_attn.q_proj.weight"), x);
                    let k = matvec(self.lp(l, "self_attn.k_proj.weight"), x);
                    let v = matvec(self.lp(l, "self_attn.v_proj.weight"), x);
                    let mut qh: Vec<Vec<f64>> = q.chunks(d).map(<[f64]>::to_vec).collect();
                    let mut kh: Vec<Vec<f64>> = k.chunks(d).map(<[f64]>::to_vec).collect();
                    if g.qk_norm {
                        let qn = self.lp(l, "self_attn.q_norm.weight").to_vec();
                        let kn = self.lp(l, "self_attn.k_norm.weight").to_vec();
                        qh = qh.iter().map(|h| rmsnorm(h, &qn, eps)).collect();
                        kh = kh.iter().map(|h| rmsnorm(h, &kn, eps)).collect();
                    }
                    for h in qh.iter_mut().chain(kh.iter_mut()) {
                        rope_halves(h, pos, &self.inv_freq, self.rope_mscale);
                    }
                    let vh = v.chunks(d).map(<[f64]>::to_vec).collect();
                    (qh, kh, vh, 1.0 / (d as f64).sqrt())
                }
                AttentionConfig::Mla(m) => {
                    let qhd = m.qk_nope_head_dim + m.qk_rope_head_dim;
                    let q = match m.q_lora_rank {
                        None => matvec(self.lp(l, "self_attn.q_proj.weight"), x),
                        Some(_) => {
                            let a = matvec(self.lp(l, "self_attn.q_a_proj.weight"), x);
                            let a = rmsnorm(&a, self.lp(l, "self_attn.q_a_layernorm.weight"), 1e-6);
                            matvec(self.lp(l, "self_attn.q_b_proj.weight"), &a)
                        }
                    };
                    let kv_a = matvec(self.lp(l, "self_attn.kv_a_proj_with_mqa.weight"), x);
                    let r = m.kv_lora_rank;
                    let c = rmsnorm(
                        &kv_a[..r],
                        self.lp(l, "self_attn.kv_a_layernorm.weight"),
                        1e-6,
                    );
                    let mut k_pe = kv_a[r..].to_vec();
                    rope_deepseek(&mut k_pe, pos, &self.inv_freq, self.rope_mscale);
                    let kv = matvec(self.lp(l, "self_attn.kv_b_proj.weight"), &c);
                    let per = m.qk_nope_head_dim + m.v_head_dim;
                    let mut qh = Vec::new();
                    let mut kh = Vec::new();
                    let mut vh = Vec::new();
                    for h in 0..m.num_heads {
                        let qq = &q[h * qhd..(h + 1) * qhd];
                        let mut q_pe = qq[m.qk_nope_head_dim..].to_vec();
                        rope_deepseek(&mut q_pe, pos, &self.inv_freq, self.rope_mscale);
                        let mut full = qq[..m.qk_nope_head_dim].to_vec();
                        full.extend(q_pe);
                        qh.push(full);
                        let head = &kv[h * per..(h + 1) * per];
                        let mut k = head[..m.qk_nope_head_dim].to_vec();
                        k.extend_from_slice(&k_pe);
                        kh.push(k);
                        vh.push(head[m.qk_nope_head_dim..].to_vec());
                    }
                    let mut scale = 1.0 / (qhd as f64).sqrt();
                    if let Some(y) = &self.cfg.rope.yarn {
                        if y.mscale_all_dim != 0.0 && y.factor > 1.0 {
                            let ms = 0.1 * y.mscale_all_dim * y.factor.ln() + 1.0;
                            scale *= ms * ms;
                        }
                    }
                    (qh, kh, vh, scale)
                }
            };
        self.keys[l].push(k_heads);
        self.values[l].push(v_heads);
        let group = q_heads.len() / self.keys[l][0].len();
        let mut out = Vec::new();
        for (h, q) in q_heads.iter().enumerate() {
            let kvh = h / group;
            let s: Vec<f64> = self.keys[l]
                .iter()
                .map(|k| q.iter().zip(&k[kvh]).map(|(a, b)| a * b).sum::<f64>() * scale)
                .collect();
            let p = softmax(&s);
            let mut o = vec![0.0; self.values[l][0][kvh].len()];
            for (pt, v) in p.iter().zip(&self.values[l]) {
                for (oo, vv) in o.iter_mut().zip(&v[kvh]) {
                    *oo += pt * vv;
                }
            }
            out.extend(o);
        }
        matvec(self.lp(l, "self_attn.o_proj.weight"), &out)
    }

    fn moe(&self, l: usize, x: &[f64]) -> Vec<f64> {
        let moe = &self.cfg.moe;
        let mp = self.mlp_prefix();
        let logits = matvec(self.lp(l, &format!("{mp}.gate.weight")), x);
        let scores = softmax(&logits);
        let n = scores.len();
        let mut allowed = vec![true; n];
        if let TopkMethod::GroupLimitedGreedy {
            n_group,
            topk_group,
        } = moe.topk_method
        {
            let per = n / n_group;
            let gs: Vec<f64> = (0..n_group)
                .map(|g| {
                    scores[g * per..(g + 1) * per]
                        .iter()
                        .cloned()
                        .fold(f64::MIN, f64::max)
                })
                .collect();
            let mut order: Vec<usize> = (0..n_group).collect();
            order.sort_by(|a, b| gs[*b].partial_cmp(&gs[*a]).unwrap().then(a.cmp(b)));
            for (e, a) in allowed.iter_mut().enumerate() {
                *a = order[..topk_group].contains(&(e / per));
            }
        }
        let mut order: Vec<usize> = (0..n).filter(|&e| allowed[e]).collect();
        order.sort_by(|a, b| scores[*b].partial_cmp(&scores[*a]).unwrap().then(a.cmp(b)));
        let chosen = &order[..moe.top_k];
        let mut w: Vec<f64> = chosen.iter().map(|&e| scores[e]).collect();
        let normalize = match self.cfg.architecture {
            Architecture::Mixtral => true,
            Architecture::Qwen3Moe => moe.norm_topk_prob,
            Architecture::DeepseekV2 => moe.top_k > 1 && moe.norm_topk_prob,
        };
        if normalize {
            let z: f64 = w.iter().sum();
            w.iter_mut().for_each(|v| *v /= z);
        } else if self.cfg.architecture == Architecture::DeepseekV2 {
            w.iter_mut().for_each(|v| *v *= moe.routed_scaling_factor);
        }
        let names = if self.cfg.architecture == Architecture::Mixtral {
            ["w1", "w3", "w2"]
        } else {
            ["gate_proj", "up_proj", "down_proj"]
        };
        let mut y = vec![0.0; x.len()];
        for (&e, &we) in chosen.iter().zip(&w) {
            let o = self.swiglu(&format!("model.layers.{l}.{mp}.experts.{e}"), names, x);
            y.iter_mut().zip(&o).for_each(|(a, b)| *a += we * b);
        }
        if moe.n_shared_experts > 0 {
            let s = self.swiglu(
                &format!("model.layers.{l}.mlp.shared_experts"),
                ["gate_proj", "up_proj", "down_proj"],
                x,
            );
            y.iter_mut().zip(&s).for_each(|(a, b)| *a += b);
        }
        y
    }

    /// Feeds one token at position `pos` and returns its logits.
    fn step(&mut self, tok: u32, pos: usize) -> Vec<f64> {
        let hdim = self.cfg.hidden_size;
        let eps = self.cfg.rms_norm_eps;
        let emb = self.t("model.embed_tokens.weight");
        let mut x = emb[tok as usize * hdim..(tok as usize + 1) * hdim].to_vec();
        for l in 0..self.cfg.num_layers {
            let h = rmsnorm(&x, self.lp(l, "input_layernorm.weight"), eps);
            let a = self.attention(l, &h, pos);
            x.iter_mut().zip(&a).for_each(|(x, a)| *x += a);
            let h = rmsnorm(&x, self.lp(l, "post_attention_layernorm.weight"), eps);
            let y = if self.cfg.is_moe_layer(l) {
                self.moe(l, &h)
            } else {
                self.swiglu(
                    &format!("model.layers.{l}.mlp"),
                    ["gate_proj", "up_proj", "down_proj"],
                    &h,
                )
            };
            x.iter_mut().zip(&y).for_each(|(x, y)| *x += y);
        }
        let h = rmsnorm(&x, self.t("model.norm.weight"), eps);
        let head = if self.cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        matvec(self.t(head), &h)
    }
}

fn assert_close(ours: &[f32], reference: &[f64], what: &str) {
    assert_eq!(ours.len(), reference.len(), "{what}: vocab");
    let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "{what}: reference logits are all zero");
    let err = ours
        .iter()
        .zip(reference)
        .fold(0.0f64, |m, (a, b)| m.max((f64::from(*a) - b).abs()));
    assert!(
        err <= 1e-5 * scale,
        "{what}: max |ours - ref| = {err:e}, scale {scale:e}, ratio {:e}",
        err / scale
    );
}

/// Prefills a prompt in one paged step (every position compared) and decodes `steps` tokens
/// (chosen greedily by the reference), comparing logits at each step.
fn check_against_reference(preset: Preset, dtype: DType, steps: usize) {
    let (dir, cfg) = model_dir_as(preset, 42, dtype);
    let ck = Checkpoint::open(dir.path()).expect("open checkpoint");
    let mut reference = Reference::load(&ck, &cfg);
    let vmm = host_vmm(1);
    let model = Model::new(&cfg, CpuCompute::new()).expect("model");
    let mut ours = SingleDevice::load(model, &vmm, DeviceId(0), &ck, 4).expect("load");
    let seq = ours.add_sequence();
    let what = format!("{preset} ({dtype})");

    let prompt: Vec<u32> = vec![3, 141, 59, 26, 200, 7];
    let ours_prompt = ours
        .step_with(&[(seq, prompt.clone())], Logits::All)
        .expect("prefill");
    let mut last = Vec::new();
    for (pos, &tok) in prompt.iter().enumerate() {
        last = reference.step(tok, pos);
        assert_close(
            &ours_prompt[pos],
            &last,
            &format!("{what} prompt position {pos}"),
        );
    }
    for step in 0..steps {
        let next = argmax(&last.iter().map(|&v| v as f32).collect::<Vec<_>>());
        let pos = prompt.len() + step;
        last = reference.step(next, pos);
        let got = ours.step(&[(seq, vec![next])]).expect("decode").remove(0);
        assert_close(&got, &last, &format!("{what} decode step {step}"));
    }
}

#[test]
fn tiny_presets_match_the_dense_reference_over_32_decode_steps() {
    for preset in TINY {
        check_against_reference(preset, DType::F32, 32);
    }
}

#[test]
fn half_precision_storage_is_accepted_and_matches_the_reference() {
    // The reference reads the same bf16/f16 checkpoint, so both see identical weight values.
    check_against_reference(Preset::TinyDeepseek, DType::BF16, 8);
    check_against_reference(Preset::TinyQwen3, DType::F16, 8);
}

#[test]
fn synthetic_weights_give_finite_non_degenerate_logits_over_64_tokens() {
    for preset in TINY {
        let (dir, cfg) = model_dir(preset, 1);
        let ck = Checkpoint::open(dir.path()).expect("open checkpoint");
        let vmm = host_vmm(1);
        let model = Model::new(&cfg, CpuCompute::new()).expect("model");
        let mut run = SingleDevice::load(model, &vmm, DeviceId(0), &ck, 16).expect("load");
        let prompt: Vec<u32> = b"Hello, MoE".iter().map(|&b| u32::from(b)).collect();
        let (tokens, logits) = run.generate_greedy(&prompt, 64).expect("generate");
        assert_eq!(tokens.len(), 64);
        for (i, l) in logits.iter().enumerate() {
            assert!(
                l.iter().all(|v| v.is_finite()),
                "{preset} step {i}: non-finite logit"
            );
            let mean = l.iter().map(|&v| f64::from(v)).sum::<f64>() / l.len() as f64;
            let std = (l
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / l.len() as f64)
                .sqrt();
            assert!(
                std > 0.05 && std < 50.0,
                "{preset} step {i}: logit std {std} is degenerate"
            );
            // Not saturated: the chosen token does not take all the probability mass.
            let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f64 = l.iter().map(|&v| f64::from(v - max).exp()).sum();
            assert!(1.0 / z < 0.999, "{preset} step {i}: softmax is one-hot");
        }
        // The model keeps responding to its input: not every step predicts the same distribution.
        assert!(
            logits.windows(2).any(|w| w[0] != w[1]),
            "{preset}: logits never change"
        );
    }
}

//! The CPU reference's activation precision ([`ActPrecision`]): `F32` is the reference arithmetic,
//! unchanged; `Bf16Gemm` rounds activations to bf16 (round-to-nearest-even) exactly where the CUDA
//! runner's bf16 mode feeds them to a GEMM, and nowhere else (the table in `compute`'s module docs).
//!
//! Kernel by kernel: `round_bf16` is RNE and bit-identical to `half`'s conversion; each rounding
//! point is checked with values on bf16 rounding boundaries or against the `F32` kernel on
//! pre-rounded inputs, and the values that stay `f32` (router logits, MLA's rotary query part) are
//! checked to stay unrounded. On whole models: `Bf16Gemm` keeps the bitwise batch invariance, and
//! differs from `F32` by about bf16's precision.

mod compute_support;

use compute_support::{host_vmm, TINY};
use hbm_vmm::DeviceId;
use moe_host::compute::cpu::{dot, CpuCompute};
use moe_host::compute::{
    round_bf16, ActPrecision, AttnBatch, Compute, ComputeError, ExpertOutput, FfnWeights, GqaDims,
    KvBlocks, KvGeometry, KvKind, MlaDims, Rope, RopeSite, RouterSpec, SeqSpan, TokenRoute,
    VecKvBlocks,
};
use moe_host::model::runner::SingleDevice;
use moe_host::model::weights::{MemTensors, RoundedToBf16};
use moe_host::model::Model;
use moe_model::config::ModelConfig;
use proptest::prelude::*;

fn bf16_cpu() -> CpuCompute {
    CpuCompute::with_act_precision(ActPrecision::Bf16Gemm)
}

/// Deterministic values in about `[-scale, scale]` with full 24-bit mantissas (almost none is a
/// bf16 value, so rounding changes almost every one).
fn vals(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn rounded(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| round_bf16(v)).collect()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

// ---------------------------------------------------------------------------------------------
// The rounding itself.

#[test]
fn round_bf16_ties_to_even_at_boundaries() {
    let u = 1.0f32 / 256.0; // 2^-8: half a bf16 ulp at 1.0
    let e = f32::EPSILON; // 2^-23: one f32 ulp at 1.0
    let cases = [
        // Exactly halfway: to the even neighbour.
        (1.0 + u, 1.0),
        (1.0 + 3.0 * u, 1.0 + 4.0 * u),
        (-(1.0 + u), -1.0),
        (3.0 + 2.0 * u, 3.0),
        (3.0 + 6.0 * u, 3.0 + 8.0 * u),
        // One f32 ulp off halfway: to the nearer neighbour.
        (1.0 + u + e, 1.0 + 2.0 * u),
        (1.0 + u - e, 1.0),
        // Representable values stay; signed zero stays.
        (1.0 + 2.0 * u, 1.0 + 2.0 * u),
        (-0.0, -0.0),
        // Past the largest bf16: infinity.
        (f32::MAX, f32::INFINITY),
        (f32::MIN, f32::NEG_INFINITY),
        (f32::INFINITY, f32::INFINITY),
        // The smallest subnormal is below half of the smallest bf16 subnormal: zero.
        (f32::from_bits(1), 0.0),
    ];
    for (x, want) in cases {
        assert_eq!(
            round_bf16(x).to_bits(),
            want.to_bits(),
            "round_bf16({x:e}) = {:e}, want {want:e}",
            round_bf16(x)
        );
    }
    // Every NaN becomes the canonical quiet NaN, as the CUDA kernels' `f2b` does.
    for nan in [
        f32::NAN,
        f32::from_bits(0x7f80_0001),
        f32::from_bits(0xffc1_2345),
    ] {
        assert_eq!(round_bf16(nan).to_bits(), 0x7fc0_0000);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Bit-identical to `half`'s round-to-nearest-even conversion on every non-NaN input, and
    /// idempotent.
    #[test]
    fn round_bf16_matches_half(b in any::<u32>()) {
        let x = f32::from_bits(b);
        prop_assume!(!x.is_nan());
        let r = round_bf16(x);
        prop_assert_eq!(r.to_bits(), half::bf16::from_f32(x).to_f32().to_bits());
        prop_assert_eq!(round_bf16(r).to_bits(), r.to_bits());
        prop_assert_eq!(r.to_bits() & 0xffff, 0);
    }
}

// ---------------------------------------------------------------------------------------------
// Projections (and the LM head, which is a projection).

#[test]
fn one_projection_rounds_its_input_at_bf16_boundaries() {
    let u = 1.0f32 / 256.0;
    let e = f32::EPSILON;
    // Two rows of five values on (or one f32 ulp off) bf16 rounding boundaries.
    let x = [
        1.0 + u,
        1.0 + 3.0 * u,
        1.0 + u + e,
        -(1.0 + u),
        3.0 + 6.0 * u,
        3.0 + 2.0 * u,
        1.0 + u - e,
        -(1.0 + 3.0 * u),
        0.5 + 0.5 * u,
        2.0,
    ];
    let want_rounded = [
        1.0,
        1.0 + 4.0 * u,
        1.0 + 2.0 * u,
        -1.0,
        3.0 + 8.0 * u,
        3.0,
        1.0,
        -(1.0 + 4.0 * u),
        0.5,
        2.0,
    ];
    // W = 2 I (bf16 values): each output is exactly twice its input element.
    let mut w = vec![0.0f32; 25];
    for i in 0..5 {
        w[i * 5 + i] = 2.0;
    }
    let mut out = [0.0f32; 10];
    bf16_cpu().linear(&x, &w, 5, 5, &mut out).unwrap();
    let want: Vec<f32> = want_rounded.iter().map(|v| 2.0 * v).collect();
    assert_eq!(bits(&out), bits(&want), "Bf16Gemm: {out:?}");
    bf16_cpu().lm_head(&x, &w, 5, 5, &mut out).expect("lm_head");
    assert_eq!(bits(&out), bits(&want), "Bf16Gemm LM head: {out:?}");
    CpuCompute::new().linear(&x, &w, 5, 5, &mut out).unwrap();
    let want: Vec<f32> = x.iter().map(|v| 2.0 * v).collect();
    assert_eq!(bits(&out), bits(&want), "F32: {out:?}");
    // Router logits are never rounded.
    bf16_cpu().router_logits(&x, &w, 5, 5, &mut out).unwrap();
    assert_eq!(bits(&out), bits(&want), "Bf16Gemm router logits: {out:?}");
}

#[test]
fn precision_is_reported() {
    assert_eq!(CpuCompute::new().act_precision(), ActPrecision::F32);
    assert_eq!(CpuCompute::default(), CpuCompute::new());
    assert_eq!(bf16_cpu().act_precision(), ActPrecision::Bf16Gemm);
    assert_eq!(CpuCompute::new().name(), "cpu");
    assert_eq!(bf16_cpu().name(), "cpu-bf16-gemm");
    assert_eq!(ActPrecision::Bf16Gemm.to_string(), "bf16-gemm");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// `F32` is the existing reference path (one `dot` per output, bitwise); `Bf16Gemm` is exactly
    /// `F32` on bf16-rounded inputs, within bf16's rounding bound of `F32`, and router logits stay
    /// `F32` in both modes.
    #[test]
    fn projection_modes(rows in 1usize..5, k in 1usize..70, n in 1usize..12, seed in 0u64..10_000) {
        let x = vals(rows * k, seed, 3.0);
        let w = rounded(&vals(n * k, seed + 1, 1.0));
        let (f32c, bf) = (CpuCompute::new(), bf16_cpu());
        let mut y32 = vec![0.0; rows * n];
        f32c.linear(&x, &w, k, n, &mut y32).unwrap();
        for m in 0..rows {
            for o in 0..n {
                let want = dot(&x[m * k..(m + 1) * k], &w[o * k..(o + 1) * k]);
                prop_assert_eq!(y32[m * n + o].to_bits(), want.to_bits());
            }
        }
        let mut yb = vec![0.0; rows * n];
        bf.linear(&x, &w, k, n, &mut yb).unwrap();
        let mut yr = vec![0.0; rows * n];
        f32c.linear(&rounded(&x), &w, k, n, &mut yr).unwrap();
        prop_assert_eq!(bits(&yb), bits(&yr));
        // |bf16 - f32| <= (2^-8 + 4(k+1) 2^-24) * sum |x_i w_i|: half a bf16 ulp per input, plus
        // both sides' f32 summation error.
        for m in 0..rows {
            for o in 0..n {
                let mag: f64 = x[m * k..(m + 1) * k]
                    .iter()
                    .zip(&w[o * k..(o + 1) * k])
                    .map(|(a, b)| f64::from(*a * *b).abs())
                    .sum();
                let bound = (2f64.powi(-8) + 4.0 * (k + 1) as f64 * 2f64.powi(-24)) * mag;
                let d = f64::from(yb[m * n + o] - y32[m * n + o]).abs();
                prop_assert!(d <= bound, "row {} out {}: |diff| {:e} > bound {:e}", m, o, d, bound);
            }
        }
        let mut yl = vec![0.0; rows * n];
        bf.router_logits(&x, &w, k, n, &mut yl).unwrap();
        prop_assert_eq!(bits(&yl), bits(&y32));
    }

    /// SwiGLU rounds its input rows and `silu(gate x) * up x` (the down GEMM's input), nothing
    /// else: bitwise equal to the formula with exactly those two roundings, and `F32` to the
    /// formula with none.
    #[test]
    fn swiglu_modes(rows in 1usize..4, hidden in 1usize..40, inter in 1usize..24,
                    seed in 0u64..10_000) {
        let x = vals(rows * hidden, seed, 2.0);
        let gate = rounded(&vals(inter * hidden, seed + 1, 1.0));
        let up = rounded(&vals(inter * hidden, seed + 2, 1.0));
        let down = rounded(&vals(hidden * inter, seed + 3, 1.0));
        let w = FfnWeights { gate: &gate, up: &up, down: &down, hidden, inter };
        let formula = |round: bool| -> Vec<f32> {
            let r = |v: f32| if round { round_bf16(v) } else { v };
            let mut out = Vec::new();
            for xr in x.chunks_exact(hidden) {
                let xr: Vec<f32> = xr.iter().map(|&v| r(v)).collect();
                let h: Vec<f32> = (0..inter)
                    .map(|i| {
                        let g = dot(&xr, &gate[i * hidden..(i + 1) * hidden]);
                        let u = dot(&xr, &up[i * hidden..(i + 1) * hidden]);
                        r(g / (1.0 + (-g).exp()) * u)
                    })
                    .collect();
                out.extend((0..hidden).map(|j| dot(&h, &down[j * inter..(j + 1) * inter])));
            }
            out
        };
        let mut out = vec![0.0; rows * hidden];
        CpuCompute::new().swiglu(&w, &x, &mut out).unwrap();
        prop_assert_eq!(bits(&out), bits(&formula(false)));
        bf16_cpu().swiglu(&w, &x, &mut out).unwrap();
        prop_assert_eq!(bits(&out), bits(&formula(true)));
    }
}

#[test]
fn swiglu_rounding_is_active() {
    let (hidden, inter) = (16, 24);
    let x = vals(3 * hidden, 5, 2.0);
    let gate = rounded(&vals(inter * hidden, 6, 1.0));
    let up = rounded(&vals(inter * hidden, 7, 1.0));
    let down = rounded(&vals(hidden * inter, 8, 1.0));
    let w = FfnWeights {
        gate: &gate,
        up: &up,
        down: &down,
        hidden,
        inter,
    };
    let (mut a, mut b) = (vec![0.0; 3 * hidden], vec![0.0; 3 * hidden]);
    CpuCompute::new().swiglu(&w, &x, &mut a).unwrap();
    bf16_cpu().swiglu(&w, &x, &mut b).unwrap();
    let differ = a.iter().zip(&b).filter(|(p, q)| p != q).count();
    assert!(
        differ > hidden,
        "only {differ} of {} outputs changed",
        a.len()
    );
    let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = a
        .iter()
        .zip(&b)
        .fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
    assert!(worst < 0.05 * scale, "bf16 drift {worst} vs scale {scale}");
}

// ---------------------------------------------------------------------------------------------
// MLA's absorbed products.

/// MLA attention of every token over its causal context, in `f64`, with the non-rotary query
/// (`round_q`) and the latent attention output (`round_o`) optionally rounded to bf16 before the
/// absorb and expand products.
#[allow(clippy::too_many_arguments)]
fn mla_reference(
    d: &MlaDims,
    lat: &[f32],
    kpe: &[f32],
    q: &[f32],
    kv_b: &[f32],
    n: usize,
    round_q: bool,
    round_o: bool,
) -> Vec<f64> {
    let (r, nope, rope, vh) = (d.kv_lora_rank, d.qk_nope, d.qk_rope, d.v_head);
    let qhd = nope + rope;
    let mut out = Vec::new();
    for t in 0..n {
        for h in 0..d.heads {
            let w = |i: usize| &kv_b[(h * (nope + vh) + i) * r..(h * (nope + vh) + i + 1) * r];
            let qh = &q[(t * d.heads + h) * qhd..(t * d.heads + h + 1) * qhd];
            let q_nope: Vec<f32> = qh[..nope]
                .iter()
                .map(|&v| if round_q { round_bf16(v) } else { v })
                .collect();
            let q_lat: Vec<f64> = (0..r)
                .map(|l| {
                    (0..nope)
                        .map(|j| f64::from(q_nope[j]) * f64::from(w(j)[l]))
                        .sum()
                })
                .collect();
            let s: Vec<f64> = (0..=t)
                .map(|u| {
                    let c = &lat[u * r..(u + 1) * r];
                    let kp = &kpe[u * rope..(u + 1) * rope];
                    let a: f64 = q_lat.iter().zip(c).map(|(x, y)| x * f64::from(*y)).sum();
                    let b: f64 = qh[nope..]
                        .iter()
                        .zip(kp)
                        .map(|(x, y)| f64::from(*x) * f64::from(*y))
                        .sum();
                    (a + b) * f64::from(d.scale)
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
            let z: f64 = e.iter().sum();
            let o_lat: Vec<f64> = (0..r)
                .map(|l| {
                    let v: f64 = (0..=t).map(|u| e[u] / z * f64::from(lat[u * r + l])).sum();
                    if round_o {
                        f64::from(round_bf16(v as f32))
                    } else {
                        v
                    }
                })
                .collect();
            for i in 0..vh {
                out.push(
                    w(nope + i)
                        .iter()
                        .zip(&o_lat)
                        .map(|(a, b)| f64::from(*a) * b)
                        .sum(),
                );
            }
        }
    }
    out
}

#[test]
fn mla_rounds_the_absorb_and_expand_inputs_only() {
    let (heads, nope, rope, vh, r) = (3usize, 8usize, 4usize, 6usize, 12usize);
    let geo = KvGeometry {
        layers: 1,
        block_tokens: 4,
        kind: KvKind::Mla {
            kv_lora_rank: r,
            rope_dim: rope,
        },
    };
    let dims = MlaDims {
        heads,
        qk_nope: nope,
        qk_rope: rope,
        v_head: vh,
        kv_lora_rank: r,
        scale: 0.3,
    };
    let n = 7;
    let lat = vals(n * r, 31, 1.0);
    let kpe = vals(n * rope, 32, 1.0);
    let q = vals(n * heads * (nope + rope), 33, 4.0);
    let kv_b = rounded(&vals(heads * (nope + vh) * r, 34, 1.0));
    let run = |cpu: CpuCompute| -> Vec<f32> {
        let mut store = VecKvBlocks::new(geo.block_floats());
        let table: Vec<u32> = (0..2).map(|_| store.alloc()).collect();
        let s = [SeqSpan {
            blocks: &table,
            start: 0,
            len: n,
        }];
        let batch = AttnBatch {
            geo: &geo,
            layer: 0,
            seqs: &s,
        };
        cpu.kv_append_mla(batch, &mut store, &lat, &kpe).unwrap();
        let mut out = vec![0.0; n * heads * vh];
        cpu.attention_mla(batch, &store, dims, &kv_b, &q, &mut out)
            .unwrap();
        out
    };
    let err = |got: &[f32], want: &[f64]| -> f64 {
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        got.iter()
            .zip(want)
            .fold(0.0f64, |m, (g, w)| m.max((f64::from(*g) - w).abs()))
            / scale
    };
    let bf = run(bf16_cpu());
    let f = run(CpuCompute::new());
    let refs = |rq, ro| mla_reference(&dims, &lat, &kpe, &q, &kv_b, n, rq, ro);
    // Each mode agrees with the reference of its own contract to f32 noise ...
    assert!(
        err(&bf, &refs(true, true)) < 2e-6,
        "{}",
        err(&bf, &refs(true, true))
    );
    assert!(
        err(&f, &refs(false, false)) < 2e-6,
        "{}",
        err(&f, &refs(false, false))
    );
    // ... and not with a contract that rounds at one point fewer: both points are live.
    for (rq, ro) in [(false, true), (true, false), (false, false)] {
        let e = err(&bf, &refs(rq, ro));
        assert!(
            e > 1e-4,
            "Bf16Gemm matches round_q={rq} round_o={ro} to {e:e}"
        );
    }
    // The rotary query part is not rounded: rounding it too moves the reference away.
    let q_pe_rounded: Vec<f32> = q
        .chunks_exact(nope + rope)
        .flat_map(|hd| {
            let mut v = hd.to_vec();
            for x in &mut v[nope..] {
                *x = round_bf16(*x);
            }
            v
        })
        .collect();
    let e = err(
        &bf,
        &mla_reference(&dims, &lat, &kpe, &q_pe_rounded, &kv_b, n, true, true),
    );
    assert!(e > 1e-5, "the rotary query part looks rounded ({e:e})");
}

// ---------------------------------------------------------------------------------------------
// Whole models.

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Teacher-forced greedy decode on two CPU backends, with the prompts and steps of
/// `moe-cuda`'s `tests/gpu_runtime.rs` (6 prompts of 1..23 tokens prefilled as one batch, then 11 batched
/// decodes: 72 positions); both follow `a`'s greedy tokens. Per position: `max |b - a| / max |a|`,
/// and whether the argmax agrees.
fn teacher_forced<B: Compute>(cfg: &ModelConfig, a: CpuCompute, b: B) -> Vec<(f64, bool)> {
    let src = RoundedToBf16(MemTensors::seeded(cfg, 11));
    let vmm = host_vmm(2);
    let mut ra =
        SingleDevice::load(Model::new(cfg, a).unwrap(), &vmm, DeviceId(0), &src, 16).unwrap();
    let mut rb =
        SingleDevice::load(Model::new(cfg, b).unwrap(), &vmm, DeviceId(1), &src, 16).unwrap();
    let vocab = cfg.vocab_size as u32;
    let mut seed = 12345u32;
    let prompts: Vec<Vec<u32>> = [5usize, 12, 1, 23, 8, 3]
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (seed >> 8) % vocab
                })
                .collect()
        })
        .collect();
    let ids_a: Vec<_> = prompts.iter().map(|_| ra.add_sequence()).collect();
    let ids_b: Vec<_> = prompts.iter().map(|_| rb.add_sequence()).collect();
    let mut inputs = prompts.clone();
    let mut out = Vec::new();
    for _ in 0..12 {
        let la = ra
            .step(
                &ids_a
                    .iter()
                    .copied()
                    .zip(inputs.clone())
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        let lb = rb
            .step(
                &ids_b
                    .iter()
                    .copied()
                    .zip(inputs.clone())
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        for (i, (x, y)) in la.iter().zip(&lb).enumerate() {
            let scale = x.iter().fold(0.0f64, |m, v| m.max(f64::from(v.abs())));
            let diff = x
                .iter()
                .zip(y)
                .fold(0.0f64, |m, (p, q)| m.max(f64::from((p - q).abs())));
            out.push((diff / scale.max(1e-6), argmax(x) == argmax(y)));
            inputs[i] = vec![argmax(x) as u32];
        }
    }
    out
}

/// (median, p90, max) of the errors, and the greedy matches.
fn summary(per: &[(f64, bool)]) -> (f64, f64, f64, usize) {
    let mut errs: Vec<f64> = per.iter().map(|p| p.0).collect();
    errs.sort_by(f64::total_cmp);
    let n = errs.len();
    (
        errs[n / 2],
        errs[n * 9 / 10],
        errs[n - 1],
        per.iter().filter(|p| p.1).count(),
    )
}

#[test]
fn bf16_gemm_models_differ_from_f32_by_about_bf16_precision() {
    for preset in TINY {
        let cfg = preset.config();
        let per = teacher_forced(&cfg, CpuCompute::new(), bf16_cpu());
        let (median, p90, max, matched) = summary(&per);
        println!(
            "{preset}: Bf16Gemm vs F32: greedy match {matched}/{}, rel err median {median:.3e}, \
             p90 {p90:.3e}, max {max:.3e}",
            per.len()
        );
        // Rounding is live in every preset (it moves a value by up to 2^-8), and typical positions
        // stay within a few ulps; a flipped router near-tie may move single positions further.
        assert!(
            median > 1e-4,
            "{preset}: median {median:e}: rounding looks inactive"
        );
        assert!(
            median < 2e-2,
            "{preset}: median {median:e}: more than bf16 drift"
        );
        // F32 mode is the reference itself: bitwise.
        let same = teacher_forced(
            &cfg,
            CpuCompute::new(),
            CpuCompute::with_act_precision(ActPrecision::F32),
        );
        assert!(
            same.iter().all(|p| p.0 == 0.0 && p.1),
            "{preset}: F32 drifted"
        );
    }
}

/// The CPU reference with every projection, router and SwiGLU product summed in reverse order
/// (everything else delegated): what a backend with the same rounding contract but another f32
/// summation order (cuBLAS) computes.
#[derive(Debug, Clone, Copy)]
struct ReverseSums(CpuCompute);

fn rev_dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).rev().fold(0.0f32, |s, (x, y)| s + x * y)
}

impl ReverseSums {
    fn gemm_input(&self, x: &[f32]) -> Vec<f32> {
        match self.0.act_precision() {
            ActPrecision::F32 => x.to_vec(),
            _ => rounded(x),
        }
    }
}

fn rev_matmul(x: &[f32], w: &[f32], i: usize, o: usize, out: &mut [f32]) {
    for (m, xr) in x.chunks_exact(i).enumerate() {
        for (n, wr) in w.chunks_exact(i).enumerate() {
            out[m * o + n] = rev_dot(xr, wr);
        }
    }
}

impl Compute for ReverseSums {
    fn name(&self) -> &'static str {
        "cpu-reverse-sums"
    }
    fn embed(&self, t: &[f32], h: usize, tok: &[u32], o: &mut [f32]) -> Result<(), ComputeError> {
        self.0.embed(t, h, tok, o)
    }
    fn rms_norm(&self, x: &[f32], w: &[f32], e: f32, o: &mut [f32]) -> Result<(), ComputeError> {
        self.0.rms_norm(x, w, e, o)
    }
    fn rms_norm_in_place(&self, x: &mut [f32], w: &[f32], e: f32) -> Result<(), ComputeError> {
        self.0.rms_norm_in_place(x, w, e)
    }
    fn linear(
        &self,
        x: &[f32],
        w: &[f32],
        i: usize,
        o: usize,
        out: &mut [f32],
    ) -> Result<(), ComputeError> {
        rev_matmul(&self.gemm_input(x), w, i, o, out);
        Ok(())
    }
    fn router_logits(
        &self,
        x: &[f32],
        w: &[f32],
        i: usize,
        o: usize,
        out: &mut [f32],
    ) -> Result<(), ComputeError> {
        rev_matmul(x, w, i, o, out);
        Ok(())
    }
    fn add(&self, acc: &mut [f32], x: &[f32]) -> Result<(), ComputeError> {
        self.0.add(acc, x)
    }
    fn rope(&self, r: &Rope, s: RopeSite, x: &mut [f32], p: &[usize]) -> Result<(), ComputeError> {
        self.0.rope(r, s, x, p)
    }
    fn kv_append_gqa(
        &self,
        b: AttnBatch<'_>,
        s: &mut dyn KvBlocks,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), ComputeError> {
        self.0.kv_append_gqa(b, s, k, v)
    }
    fn attention_gqa(
        &self,
        b: AttnBatch<'_>,
        s: &dyn KvBlocks,
        d: GqaDims,
        q: &[f32],
        o: &mut [f32],
    ) -> Result<(), ComputeError> {
        self.0.attention_gqa(b, s, d, q, o)
    }
    fn kv_append_mla(
        &self,
        b: AttnBatch<'_>,
        s: &mut dyn KvBlocks,
        l: &[f32],
        k: &[f32],
    ) -> Result<(), ComputeError> {
        self.0.kv_append_mla(b, s, l, k)
    }
    fn attention_mla(
        &self,
        b: AttnBatch<'_>,
        s: &dyn KvBlocks,
        d: MlaDims,
        kv_b: &[f32],
        q: &[f32],
        o: &mut [f32],
    ) -> Result<(), ComputeError> {
        self.0.attention_mla(b, s, d, kv_b, q, o)
    }
    fn route(&self, l: &[f32], s: &RouterSpec) -> Result<Vec<TokenRoute>, ComputeError> {
        self.0.route(l, s)
    }
    fn swiglu(&self, w: &FfnWeights<'_>, x: &[f32], out: &mut [f32]) -> Result<(), ComputeError> {
        let x = self.gemm_input(x);
        for (xr, or) in x.chunks_exact(w.hidden).zip(out.chunks_exact_mut(w.hidden)) {
            let h: Vec<f32> = (0..w.inter)
                .map(|i| {
                    let g = rev_dot(xr, &w.gate[i * w.hidden..(i + 1) * w.hidden]);
                    let u = rev_dot(xr, &w.up[i * w.hidden..(i + 1) * w.hidden]);
                    g / (1.0 + (-g).exp()) * u
                })
                .collect();
            let h = self.gemm_input(&h);
            for (j, o) in or.iter_mut().enumerate() {
                *o = rev_dot(&h, &w.down[j * w.inter..(j + 1) * w.inter]);
            }
        }
        Ok(())
    }
    fn combine(
        &self,
        p: &[ExpertOutput<'_>],
        s: Option<&[f32]>,
        r: &mut [f32],
    ) -> Result<(), ComputeError> {
        self.0.combine(p, s, r)
    }
}

/// With the rounding contract fixed, what is left between two backends is f32 summation order.
/// Measured here on the CPU (the reference against itself with reversed sums): the issue's
/// thresholds hold in both modes on every tiny preset, so the GPU check of each pair tests the
/// kernels, not the conditioning of the models. (In `Bf16Gemm` an order change can move a sum
/// across a bf16 rounding boundary, a one-ulp step that the KV cache carries to later positions,
/// so the tail is larger than in `F32`.)
#[test]
fn both_modes_are_insensitive_to_summation_order_within_the_issue_thresholds() {
    for preset in TINY {
        let cfg = preset.config();
        for act in [ActPrecision::F32, ActPrecision::Bf16Gemm] {
            let cpu = CpuCompute::with_act_precision(act);
            let per = teacher_forced(&cfg, cpu, ReverseSums(cpu));
            let (median, p90, max, matched) = summary(&per);
            println!(
                "{preset} {act}: reversed sums vs in order: greedy match {matched}/{}, rel err \
                 median {median:.3e}, p90 {p90:.3e}, max {max:.3e}",
                per.len()
            );
            assert!(max > 0.0, "{preset} {act}: the reordering changed nothing");
            assert!(
                matched as f64 >= 0.99 * per.len() as f64 && max <= 2e-2,
                "{preset} {act}: summation order alone breaks the thresholds"
            );
        }
    }
}

#[test]
fn bf16_gemm_models_stay_batch_invariant() {
    for preset in TINY {
        let cfg = preset.config();
        let src = RoundedToBf16(MemTensors::seeded(&cfg, 3));
        let vmm = host_vmm(1);
        let v = cfg.vocab_size as u32;
        let a: Vec<u32> = (0..9).map(|i| (i * 7 + 2) % v).collect();
        let b: Vec<u32> = (0..4).map(|i| (i * 13 + 1) % v).collect();
        let alone = {
            let mut run = SingleDevice::load(
                Model::new(&cfg, bf16_cpu()).unwrap(),
                &vmm,
                DeviceId(0),
                &src,
                4,
            )
            .unwrap();
            let s = run.add_sequence();
            run.step(&[(s, a.clone())]).unwrap().remove(0)
        };
        let batched = {
            let mut run = SingleDevice::load(
                Model::new(&cfg, bf16_cpu()).unwrap(),
                &vmm,
                DeviceId(0),
                &src,
                4,
            )
            .unwrap();
            let sb = run.add_sequence();
            let sa = run.add_sequence();
            run.step(&[(sb, b.clone()), (sa, a[..5].to_vec())]).unwrap();
            run.step(&[(sa, a[5..].to_vec()), (sb, vec![3])])
                .unwrap()
                .remove(0)
        };
        assert_eq!(bits(&alone), bits(&batched), "{preset}");
    }
}

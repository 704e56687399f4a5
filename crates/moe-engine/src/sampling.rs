//! Choosing the next token from logits: greedy, or seeded temperature / top-p.
//!
//! Sampling is a pure function of `(logits, params, position)`: the random draw for a request's
//! `n`-th generated token comes from a ChaCha8 stream keyed by the request's seed and `n`. It is
//! therefore independent of batch composition, of which rank runs the sequence, and of preemption and
//! recompute (a recomputed sequence draws the same numbers for the same positions).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::request::TokenId;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplingParams {
    /// The most likely token (the lowest id among ties).
    Greedy,
    /// Nucleus sampling at a temperature, with a seed.
    Random {
        /// Softmax temperature, finite and in `(0, MAX_TEMPERATURE]`.
        temperature: f32,
        /// Keep the smallest set of most likely tokens whose mass reaches `top_p`, in `(0, 1]`.
        top_p: f32,
        /// Seed of this request's random stream.
        seed: u64,
    },
}

/// The largest temperature accepted.
pub const MAX_TEMPERATURE: f32 = 100.0;

/// Why sampling parameters or logits were refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SamplingError {
    /// Temperature out of range.
    #[error(
        "temperature {0} is not in (0, {MAX_TEMPERATURE}]; use greedy decoding for temperature 0"
    )]
    BadTemperature(f32),
    /// top-p out of range.
    #[error("top_p {0} is not in (0, 1]")]
    BadTopP(f32),
    /// The logits had no finite value (the model produced NaN or infinities only).
    #[error("the logits have no finite value; the model output is broken")]
    NoFiniteLogits,
    /// No logits at all.
    #[error("the logits are empty")]
    EmptyLogits,
}

impl SamplingParams {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), SamplingError> {
        match *self {
            Self::Greedy => Ok(()),
            Self::Random {
                temperature, top_p, ..
            } => {
                if !(temperature.is_finite() && temperature > 0.0 && temperature <= MAX_TEMPERATURE)
                {
                    return Err(SamplingError::BadTemperature(temperature));
                }
                if !(top_p.is_finite() && top_p > 0.0 && top_p <= 1.0) {
                    return Err(SamplingError::BadTopP(top_p));
                }
                Ok(())
            }
        }
    }
}

/// A chosen token and its log-probability under the untempered model distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    /// The token.
    pub token: TokenId,
    /// `log_softmax(logits)[token]`.
    pub logprob: f32,
}

/// Picks the token for generated position `position` of a sequence.
///
/// Non-finite logits (NaN, ±inf) count as impossible tokens. Ties in greedy decoding and in the
/// top-p ordering go to the lower id, so the result is fully deterministic.
pub fn sample(
    logits: &[f32],
    params: &SamplingParams,
    position: usize,
) -> Result<Sampled, SamplingError> {
    if logits.is_empty() {
        return Err(SamplingError::EmptyLogits);
    }
    let (argmax, max) = argmax(logits).ok_or(SamplingError::NoFiniteLogits)?;
    let token = match *params {
        SamplingParams::Greedy => argmax,
        SamplingParams::Random {
            temperature,
            top_p,
            seed,
        } => nucleus(logits, max, temperature, top_p, seed, position),
    };
    Ok(Sampled {
        token: token as TokenId,
        logprob: logprob(logits, max, token),
    })
}

/// The `k` most likely tokens and their `log_softmax` values, most likely first (ties to the
/// lower id); non-finite logits are never among them.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(TokenId, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let Some((_, max)) = argmax(logits) else {
        return Vec::new();
    };
    let mut idx: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i].is_finite())
        .collect();
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    if idx.len() > k {
        idx.select_nth_unstable_by(k - 1, by_logit);
        idx.truncate(k);
    }
    idx.sort_by(by_logit);
    idx.into_iter()
        .map(|i| (i as TokenId, logprob(logits, max, i)))
        .collect()
}

/// The first index of the largest finite logit, and that logit.
fn argmax(logits: &[f32]) -> Option<(usize, f32)> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if x.is_finite() && best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best
}

/// `log_softmax(logits)[token]`, summing in f64 in index order (deterministic).
fn logprob(logits: &[f32], max: f32, token: usize) -> f32 {
    let sum: f64 = logits
        .iter()
        .filter(|x| x.is_finite())
        .map(|&x| f64::from(x - max).exp())
        .sum();
    (f64::from(logits[token] - max) - sum.ln()) as f32
}

fn nucleus(
    logits: &[f32],
    max: f32,
    temperature: f32,
    top_p: f32,
    seed: u64,
    position: usize,
) -> usize {
    let t = f64::from(temperature);
    // Unnormalised probabilities of the finite logits, most likely first, lower id first among ties.
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, x)| x.is_finite())
        .map(|(i, &x)| (i, (f64::from(x - max) / t).exp()))
        .collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let target = f64::from(top_p) * total;
    let mut kept = 0.0;
    let mut keep = probs.len();
    for (n, p) in probs.iter().enumerate() {
        kept += p.1;
        if kept >= target {
            keep = n + 1;
            break;
        }
    }
    let probs = &probs[..keep];
    let kept: f64 = probs.iter().map(|p| p.1).sum();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(position as u64);
    let mut u = rng.random::<f64>() * kept;
    for &(i, p) in probs {
        if u < p {
            return i;
        }
        u -= p;
    }
    // Rounding left `u` at the very top of the range: the last kept token.
    probs[probs.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn random(temperature: f32, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams::Random {
            temperature,
            top_p,
            seed,
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let s = sample(&[0.5, 2.0, 2.0, -1.0], &SamplingParams::Greedy, 0).unwrap();
        assert_eq!(s.token, 1);
        let s = sample(&[f32::NAN, 1.0, f32::INFINITY], &SamplingParams::Greedy, 0).unwrap();
        assert_eq!(s.token, 1, "non-finite logits are never chosen");
    }

    #[test]
    fn top_logprobs_are_the_largest_in_order() {
        let logits = [1.0, 3.0, f32::NAN, 3.0, 2.0];
        let top = top_logprobs(&logits, 3);
        assert_eq!(
            top.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![1, 3, 4],
            "ties go to the lower id"
        );
        assert_eq!(
            top[0].1,
            sample(&logits, &SamplingParams::Greedy, 0).unwrap().logprob
        );
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(top_logprobs(&logits, 0).is_empty());
        assert_eq!(top_logprobs(&logits, 10).len(), 4);
    }

    #[test]
    fn logprob_is_log_softmax() {
        let s = sample(&[0.0, 0.0], &SamplingParams::Greedy, 0).unwrap();
        assert!((s.logprob - 0.5f32.ln()).abs() < 1e-6);
        let s = sample(&[1.0, 2.0, 3.0], &SamplingParams::Greedy, 0).unwrap();
        let expected = 3.0 - (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((f64::from(s.logprob) - expected).abs() < 1e-6);
    }

    #[test]
    fn broken_logits_are_errors() {
        assert_eq!(
            sample(&[], &SamplingParams::Greedy, 0),
            Err(SamplingError::EmptyLogits)
        );
        assert_eq!(
            sample(&[f32::NAN, f32::NEG_INFINITY], &random(1.0, 1.0, 3), 0),
            Err(SamplingError::NoFiniteLogits)
        );
    }

    #[test]
    fn bad_parameters_are_refused() {
        for t in [0.0, -1.0, f32::NAN, f32::INFINITY, MAX_TEMPERATURE * 2.0] {
            assert!(
                matches!(
                    random(t, 0.9, 0).validate(),
                    Err(SamplingError::BadTemperature(_))
                ),
                "{t}"
            );
        }
        for p in [0.0, -0.5, 1.5, f32::NAN] {
            assert!(
                matches!(random(1.0, p, 0).validate(), Err(SamplingError::BadTopP(_))),
                "{p}"
            );
        }
        assert_eq!(random(0.7, 1.0, 0).validate(), Ok(()));
        assert_eq!(SamplingParams::Greedy.validate(), Ok(()));
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let logits = [0.1, 3.0, 0.2, 2.9];
        for pos in 0..50 {
            assert_eq!(
                sample(&logits, &random(1.0, 1e-6, 42), pos).unwrap().token,
                1
            );
        }
    }

    #[test]
    fn top_p_excludes_the_tail() {
        // Token 2 holds almost all the mass; with top_p 0.5 nothing else may be drawn.
        let logits = [0.0, 0.0, 10.0, 0.0];
        for pos in 0..200 {
            assert_eq!(sample(&logits, &random(1.0, 0.5, 9), pos).unwrap().token, 2);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Two tokens with probabilities 1/4 and 3/4: the empirical frequency must be close.
        let logits = [0.0, 3f32.ln()];
        let ones = (0..4000)
            .filter(|&pos| sample(&logits, &random(1.0, 1.0, 5), pos).unwrap().token == 1)
            .count();
        let freq = ones as f64 / 4000.0;
        assert!((freq - 0.75).abs() < 0.03, "frequency {freq}");
    }

    #[test]
    fn high_temperature_flattens() {
        let logits = [0.0, 3f32.ln()];
        let ones = (0..4000)
            .filter(|&pos| sample(&logits, &random(100.0, 1.0, 5), pos).unwrap().token == 1)
            .count();
        let freq = ones as f64 / 4000.0;
        assert!((freq - 0.5).abs() < 0.04, "frequency {freq}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn sampling_is_a_pure_function_of_seed_and_position(
            logits in prop::collection::vec(-5.0f32..5.0, 1..40),
            seed in any::<u64>(),
            pos in 0usize..1000,
            t in 0.05f32..5.0,
            p in 0.05f32..=1.0,
        ) {
            let params = random(t, p, seed);
            let a = sample(&logits, &params, pos).unwrap();
            let b = sample(&logits, &params, pos).unwrap();
            prop_assert_eq!(a, b);
            prop_assert!((a.token as usize) < logits.len());
            prop_assert!(a.logprob <= 0.0);
        }

        #[test]
        fn greedy_is_argmax(logits in prop::collection::vec(-5.0f32..5.0, 1..40)) {
            let s = sample(&logits, &SamplingParams::Greedy, 0).unwrap();
            let best = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            prop_assert_eq!(logits[s.token as usize], best);
            prop_assert!(logits[..s.token as usize].iter().all(|&x| x < best));
        }
    }
}

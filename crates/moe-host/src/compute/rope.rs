//! Rotary position embeddings: the plain form and yarn scaling (as DeepSeek-V2 and transformers'
//! `rope_utils` define it).

use super::{ComputeError, RopeStyle};

/// Yarn context-extension parameters (`rope_scaling` with `type: yarn`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct YarnParams {
    /// `factor`: context extension ratio.
    pub factor: f64,
    /// `original_max_position_embeddings`.
    pub original_max_position: f64,
    /// `beta_fast` (default 32).
    pub beta_fast: f64,
    /// `beta_slow` (default 1).
    pub beta_slow: f64,
    /// `mscale` (default 1).
    pub mscale: f64,
    /// `mscale_all_dim` (default 0).
    pub mscale_all_dim: f64,
}

impl YarnParams {
    /// The parameters with the published defaults for everything but `factor` and the original
    /// context length.
    pub fn new(factor: f64, original_max_position: f64) -> Self {
        Self {
            factor,
            original_max_position,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 1.0,
            mscale_all_dim: 0.0,
        }
    }

    /// yarn's magnitude correction `0.1 * m * ln(factor) + 1` (1 when `factor <= 1`).
    pub fn get_mscale(factor: f64, m: f64) -> f64 {
        if factor <= 1.0 {
            1.0
        } else {
            0.1 * m * factor.ln() + 1.0
        }
    }
}

/// A rotary embedding of `dim` elements per head: inverse frequencies and the cos/sin multiplier.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    dim: usize,
    style: RopeStyle,
    inv_freq: Vec<f64>,
    mscale: f64,
}

impl Rope {
    /// Plain rotary embedding: `inv_freq[i] = theta^(-2i/dim)`.
    pub fn new(dim: usize, theta: f64, style: RopeStyle) -> Result<Self, ComputeError> {
        Self::check(dim, theta)?;
        let inv_freq = (0..dim / 2)
            .map(|i| theta.powf(-((2 * i) as f64) / dim as f64))
            .collect();
        Ok(Self {
            dim,
            style,
            inv_freq,
            mscale: 1.0,
        })
    }

    /// Yarn-scaled rotary embedding: frequencies blend interpolation (`/factor`) and extrapolation
    /// along a linear ramp between the correction dims of `beta_fast` and `beta_slow`, and cos/sin
    /// are scaled by `get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)`.
    pub fn yarn(
        dim: usize,
        theta: f64,
        style: RopeStyle,
        y: YarnParams,
    ) -> Result<Self, ComputeError> {
        Self::check(dim, theta)?;
        if !(y.factor.is_finite() && y.factor > 0.0 && y.original_max_position > 0.0) {
            return Err(ComputeError::Dims(
                "yarn needs a positive factor and original context",
            ));
        }
        let d = dim as f64;
        let correction_dim = |rotations: f64| {
            (d * (y.original_max_position / (rotations * 2.0 * std::f64::consts::PI)).ln())
                / (2.0 * theta.ln())
        };
        let low = correction_dim(y.beta_fast).floor().max(0.0);
        let high = correction_dim(y.beta_slow).ceil().min(d - 1.0);
        let high = if low == high { high + 0.001 } else { high };
        let inv_freq = (0..dim / 2)
            .map(|i| {
                let extra = theta.powf(-((2 * i) as f64) / d);
                let inter = extra / y.factor;
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let extrapolate = 1.0 - ramp;
                inter * (1.0 - extrapolate) + extra * extrapolate
            })
            .collect();
        let mscale = YarnParams::get_mscale(y.factor, y.mscale)
            / YarnParams::get_mscale(y.factor, y.mscale_all_dim);
        Ok(Self {
            dim,
            style,
            inv_freq,
            mscale,
        })
    }

    fn check(dim: usize, theta: f64) -> Result<(), ComputeError> {
        if dim == 0 || !dim.is_multiple_of(2) {
            return Err(ComputeError::Dims(
                "rotary dimension must be even and non-zero",
            ));
        }
        if !(theta.is_finite() && theta > 1.0) {
            return Err(ComputeError::Dims(
                "rope theta must be finite and greater than 1",
            ));
        }
        Ok(())
    }

    /// Elements rotated per head.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Which elements pair up.
    pub fn style(&self) -> RopeStyle {
        self.style
    }

    /// The inverse frequencies, one per pair.
    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// The multiplier on cos and sin (1 unless yarn says otherwise).
    pub fn mscale(&self) -> f64 {
        self.mscale
    }

    /// `(cos, sin)` of every pair at `position`, in `f32`.
    pub fn cos_sin(&self, position: usize, cos: &mut [f32], sin: &mut [f32]) {
        for (i, f) in self.inv_freq.iter().enumerate() {
            let angle = position as f64 * f;
            cos[i] = (angle.cos() * self.mscale) as f32;
            sin[i] = (angle.sin() * self.mscale) as f32;
        }
    }

    /// Rotates one head's rotary part in place.
    pub(crate) fn apply(&self, x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = self.dim / 2;
        match self.style {
            RopeStyle::Halves => {
                for i in 0..half {
                    let (a, b) = (x[i], x[i + half]);
                    x[i] = a * cos[i] - b * sin[i];
                    x[i + half] = b * cos[i] + a * sin[i];
                }
            }
            RopeStyle::Interleaved => {
                for i in 0..half {
                    let (a, b) = (x[2 * i], x[2 * i + 1]);
                    x[2 * i] = a * cos[i] - b * sin[i];
                    x[2 * i + 1] = b * cos[i] + a * sin[i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_frequencies_follow_theta() {
        let r = Rope::new(8, 10000.0, RopeStyle::Halves).unwrap();
        assert_eq!(r.inv_freq().len(), 4);
        assert_eq!(r.inv_freq()[0], 1.0);
        assert!((r.inv_freq()[1] - 10000f64.powf(-0.25)).abs() < 1e-15);
        assert_eq!(r.mscale(), 1.0);
    }

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() {
        for style in [RopeStyle::Halves, RopeStyle::Interleaved] {
            let r = Rope::new(8, 10000.0, style).unwrap();
            let x0: Vec<f32> = (0..8).map(|i| i as f32 * 0.3 - 1.0).collect();
            let (mut c, mut s) = (vec![0.0; 4], vec![0.0; 4]);
            r.cos_sin(0, &mut c, &mut s);
            let mut x = x0.clone();
            r.apply(&mut x, &c, &s);
            assert_eq!(x, x0);
            r.cos_sin(17, &mut c, &mut s);
            r.apply(&mut x, &c, &s);
            let n0: f32 = x0.iter().map(|v| v * v).sum();
            let n1: f32 = x.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-4, "{n0} vs {n1}");
            assert_ne!(x, x0);
        }
    }

    #[test]
    fn relative_position_property() {
        // <rope(q, m), rope(k, n)> depends only on m - n.
        let r = Rope::new(16, 10000.0, RopeStyle::Interleaved).unwrap();
        let q: Vec<f32> = (0..16).map(|i| ((i * 7 % 5) as f32) - 2.0).collect();
        let k: Vec<f32> = (0..16).map(|i| ((i * 3 % 4) as f32) - 1.5).collect();
        let dot_at = |m: usize, n: usize| {
            let (mut c, mut s) = (vec![0.0; 8], vec![0.0; 8]);
            let (mut qq, mut kk) = (q.clone(), k.clone());
            r.cos_sin(m, &mut c, &mut s);
            r.apply(&mut qq, &c, &s);
            r.cos_sin(n, &mut c, &mut s);
            r.apply(&mut kk, &c, &s);
            qq.iter().zip(&kk).map(|(a, b)| a * b).sum::<f32>()
        };
        assert!((dot_at(5, 2) - dot_at(13, 10)).abs() < 1e-3);
    }

    #[test]
    fn yarn_blends_between_interpolation_and_extrapolation() {
        // DeepSeek-V2-Lite's rope_scaling on its 64-wide rotary head.
        let y = YarnParams {
            factor: 40.0,
            original_max_position: 4096.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 0.707,
            mscale_all_dim: 0.707,
        };
        let plain = Rope::new(64, 10000.0, RopeStyle::Interleaved).unwrap();
        let yarn = Rope::yarn(64, 10000.0, RopeStyle::Interleaved, y).unwrap();
        // High frequencies (small i) extrapolate: unchanged.
        assert_eq!(yarn.inv_freq()[0], plain.inv_freq()[0]);
        // Low frequencies interpolate: divided by the factor.
        let last = plain.inv_freq().len() - 1;
        assert!((yarn.inv_freq()[last] - plain.inv_freq()[last] / 40.0).abs() < 1e-18);
        // In between, strictly between the two.
        let mid = (1..last)
            .find(|&i| {
                let (p, q) = (plain.inv_freq()[i], yarn.inv_freq()[i]);
                q < p && q > p / 40.0 * (1.0 + 1e-9)
            })
            .expect("a ramp dimension");
        assert!(mid > 0);
        // mscale == mscale_all_dim: no cos/sin scaling.
        assert!((yarn.mscale() - 1.0).abs() < 1e-12);
        let y2 = YarnParams::new(4.0, 2048.0);
        let r2 = Rope::yarn(32, 10000.0, RopeStyle::Halves, y2).unwrap();
        assert!((r2.mscale() - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
    }

    #[test]
    fn bad_dimensions_are_refused() {
        assert!(matches!(
            Rope::new(7, 10000.0, RopeStyle::Halves),
            Err(ComputeError::Dims(_))
        ));
        assert!(matches!(
            Rope::new(0, 10000.0, RopeStyle::Halves),
            Err(ComputeError::Dims(_))
        ));
        assert!(matches!(
            Rope::new(8, f64::NAN, RopeStyle::Halves),
            Err(ComputeError::Dims(_))
        ));
        let bad = YarnParams::new(0.0, 4096.0);
        assert!(matches!(
            Rope::yarn(8, 1e4, RopeStyle::Halves, bad),
            Err(ComputeError::Dims(_))
        ));
    }
}

//! The device spec every command takes (`--devices`): which backend and which ranks.
//!
//! - `host:N`: N host devices (memfd memory, CPU compute), ranks `0..N`.
//! - `cuda:I,J,...`: one rank per listed GPU index, in rank order. An index may repeat:
//!   `cuda:0,0,0,0` is four logical ranks on GPU 0, each with its own KV and its own experts.
//!
//! This module only parses and prints; what a command or a runner can run is theirs to check
//! (today the CUDA runner takes the first n GPUs in order, see [`DeviceSpec::first_gpus`]).
//!
//! ```
//! use scaler_exec::{DeviceKind, DeviceSpec, DeviceSpecError};
//!
//! let spec: DeviceSpec = "cuda:0,0,1".parse().unwrap();
//! assert_eq!(spec.kind(), DeviceKind::Cuda);
//! assert_eq!(spec.ranks(), 3);
//! assert_eq!(spec.gpus(), &[0, 0, 1]);
//! assert_eq!(spec.first_gpus(), None); // GPU 0 twice: logical ranks
//! assert_eq!(spec.to_string(), "cuda:0,0,1");
//!
//! assert_eq!("host:4".parse::<DeviceSpec>().unwrap().first_gpus(), None);
//! assert_eq!("host:0".parse::<DeviceSpec>(), Err(DeviceSpecError::ZeroDevices));
//! ```

use std::fmt;
use std::str::FromStr;

/// The backend a [`DeviceSpec`] names, as written before its `:`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// `host`: host devices (memfd memory, CPU compute).
    Host,
    /// `cuda`: NVIDIA GPUs.
    Cuda,
}

impl DeviceKind {
    /// The name in a spec and in reports: `host` or `cuda`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Host => "host",
            DeviceKind::Cuda => "cuda",
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which backend and which ranks: `host:N` or `cuda:I,J,...` (see the [module docs](self)).
///
/// Always valid: at least one rank and at most [`DeviceSpec::MAX_RANKS`]. Parse it with
/// [`str::parse`]; [`Display`](fmt::Display) writes it back in the same form, so the two
/// round-trip.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DeviceSpec(Ranks);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Ranks {
    Host(u32),
    Cuda(Vec<u32>),
}

/// Why a device spec is not valid. The message says what to write instead; a command adds
/// which argument it came from.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceSpecError {
    /// No `kind:` prefix.
    #[error(
        "no device kind: write host:N (N host devices) or cuda:I,J,... (one rank per listed \
         GPU index)"
    )]
    MissingKind,
    /// A kind other than `host` or `cuda`.
    #[error(
        "unknown device kind {kind:?}: write host:N (N host devices) or cuda:I,J,... (one rank \
         per listed GPU index)"
    )]
    UnknownKind {
        /// What came before the `:`.
        kind: String,
    },
    /// `cuda:` with no GPU index.
    #[error("the GPU list is empty: name at least one GPU index, as in cuda:0")]
    EmptyList,
    /// An entry of a `cuda:` list is not a GPU index.
    #[error("{token:?} is not a GPU index: GPU indices are integers, as in cuda:0,1")]
    BadGpuIndex {
        /// The entry.
        token: String,
    },
    /// `host:` followed by something other than a number.
    #[error("{token:?} is not a device count: N must be a positive integer, as in host:4")]
    BadDeviceCount {
        /// What came after `host:`.
        token: String,
    },
    /// `host:0`.
    #[error("no devices: N must be a positive integer, as in host:4")]
    ZeroDevices,
    /// More ranks than [`DeviceSpec::MAX_RANKS`].
    #[error("{count} ranks: at most {max} are supported")]
    TooMany {
        /// Ranks asked for.
        count: u64,
        /// [`DeviceSpec::MAX_RANKS`].
        max: usize,
    },
}

impl DeviceSpec {
    /// The most ranks one spec may name: far above any machine's device count, logical ranks
    /// included, so that a typo such as `host:40000` is refused here rather than by an
    /// allocation.
    pub const MAX_RANKS: usize = 1024;

    /// `host:devices`.
    pub fn host(devices: usize) -> Result<DeviceSpec, DeviceSpecError> {
        check_count(devices as u64)?;
        Ok(DeviceSpec(Ranks::Host(devices as u32)))
    }

    /// `cuda:` with one rank per entry of `gpus`, in order; entries may repeat.
    pub fn cuda(gpus: impl Into<Vec<u32>>) -> Result<DeviceSpec, DeviceSpecError> {
        let gpus = gpus.into();
        if gpus.is_empty() {
            return Err(DeviceSpecError::EmptyList);
        }
        check_count(gpus.len() as u64)?;
        Ok(DeviceSpec(Ranks::Cuda(gpus)))
    }

    /// The backend.
    pub fn kind(&self) -> DeviceKind {
        match self.0 {
            Ranks::Host(_) => DeviceKind::Host,
            Ranks::Cuda(_) => DeviceKind::Cuda,
        }
    }

    /// How many ranks: host devices, or entries of the GPU list (logical ranks included).
    pub fn ranks(&self) -> usize {
        match &self.0 {
            Ranks::Host(n) => *n as usize,
            Ranks::Cuda(gpus) => gpus.len(),
        }
    }

    /// The GPU index of each rank, in rank order (empty for `host:`).
    pub fn gpus(&self) -> &[u32] {
        match &self.0 {
            Ranks::Host(_) => &[],
            Ranks::Cuda(gpus) => gpus,
        }
    }

    /// `Some(n)` for `cuda:0,1,...,n-1`: one rank on each of the first n GPUs, in order (what
    /// the CUDA runner takes today). `None` for any other GPU list and for `host:`.
    pub fn first_gpus(&self) -> Option<usize> {
        match &self.0 {
            Ranks::Cuda(gpus) if gpus.iter().copied().eq(0..gpus.len() as u32) => Some(gpus.len()),
            _ => None,
        }
    }

    /// Whether some GPU carries more than one rank (logical ranks, as in `cuda:0,0`).
    pub fn shares_a_gpu(&self) -> bool {
        let gpus = self.gpus();
        gpus.iter().enumerate().any(|(i, g)| gpus[..i].contains(g))
    }
}

fn check_count(count: u64) -> Result<(), DeviceSpecError> {
    if count == 0 {
        return Err(DeviceSpecError::ZeroDevices);
    }
    if count > DeviceSpec::MAX_RANKS as u64 {
        return Err(DeviceSpecError::TooMany {
            count,
            max: DeviceSpec::MAX_RANKS,
        });
    }
    Ok(())
}

impl FromStr for DeviceSpec {
    type Err = DeviceSpecError;

    fn from_str(s: &str) -> Result<DeviceSpec, DeviceSpecError> {
        let (kind, rest) = s.split_once(':').ok_or(DeviceSpecError::MissingKind)?;
        match kind.trim() {
            "host" => {
                let token = rest.trim();
                let n: u64 = token.parse().map_err(|_| DeviceSpecError::BadDeviceCount {
                    token: token.to_string(),
                })?;
                check_count(n)?;
                Ok(DeviceSpec(Ranks::Host(n as u32)))
            }
            "cuda" => {
                if rest.trim().is_empty() {
                    return Err(DeviceSpecError::EmptyList);
                }
                let gpus = rest
                    .split(',')
                    .map(|t| {
                        let t = t.trim();
                        t.parse::<u32>().map_err(|_| DeviceSpecError::BadGpuIndex {
                            token: t.to_string(),
                        })
                    })
                    .collect::<Result<Vec<u32>, _>>()?;
                DeviceSpec::cuda(gpus)
            }
            other => Err(DeviceSpecError::UnknownKind {
                kind: other.to_string(),
            }),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Ranks::Host(n) => write!(f, "host:{n}"),
            Ranks::Cuda(gpus) => {
                f.write_str("cuda:")?;
                for (i, g) in gpus.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{g}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &str) -> Result<DeviceSpec, DeviceSpecError> {
        s.parse()
    }

    #[test]
    fn host_specs() {
        let s = parse("host:4").unwrap();
        assert_eq!(s.kind(), DeviceKind::Host);
        assert_eq!(s.ranks(), 4);
        assert!(s.gpus().is_empty());
        assert_eq!(s.first_gpus(), None);
        assert!(!s.shares_a_gpu());
        assert_eq!(s, DeviceSpec::host(4).unwrap());
        assert_eq!(
            parse(" host: 4 ").unwrap(),
            s,
            "spaces around the parts are fine"
        );
        assert_eq!(s.to_string(), "host:4");
    }

    #[test]
    fn cuda_specs_allow_any_order_and_repeated_gpus() {
        let s = parse("cuda:0,1,2").unwrap();
        assert_eq!(s.kind(), DeviceKind::Cuda);
        assert_eq!((s.ranks(), s.gpus()), (3, &[0, 1, 2][..]));
        assert_eq!(s.first_gpus(), Some(3));
        assert!(!s.shares_a_gpu());

        let logical = parse("cuda:0,0,0,0").unwrap();
        assert_eq!(logical.ranks(), 4, "four logical ranks on GPU 0");
        assert_eq!(logical.gpus(), &[0, 0, 0, 0]);
        assert_eq!(logical.first_gpus(), None);
        assert!(logical.shares_a_gpu());
        assert_eq!(logical.to_string(), "cuda:0,0,0,0");

        let picked = parse("cuda:3, 1").unwrap();
        assert_eq!(picked.gpus(), &[3, 1]);
        assert_eq!(picked.first_gpus(), None);
        assert_eq!(picked.to_string(), "cuda:3,1");
        assert_eq!(parse("cuda:0").unwrap().first_gpus(), Some(1));
    }

    #[test]
    fn bad_specs_get_typed_errors_that_say_what_to_write() {
        use DeviceSpecError as E;
        let too_many = E::TooMany {
            count: 1025,
            max: DeviceSpec::MAX_RANKS,
        };
        let cases: [(&str, E); 12] = [
            ("gpu", E::MissingKind),
            ("", E::MissingKind),
            ("tpu:0", E::UnknownKind { kind: "tpu".into() }),
            ("cuda:", E::EmptyList),
            ("cuda: ", E::EmptyList),
            ("cuda:0,x", E::BadGpuIndex { token: "x".into() }),
            ("cuda:0,,1", E::BadGpuIndex { token: "".into() }),
            ("cuda:-1", E::BadGpuIndex { token: "-1".into() }),
            ("host:x", E::BadDeviceCount { token: "x".into() }),
            ("host:-2", E::BadDeviceCount { token: "-2".into() }),
            ("host:0", E::ZeroDevices),
            ("host:1025", too_many.clone()),
        ];
        for (spec, want) in cases {
            assert_eq!(parse(spec), Err(want), "{spec:?}");
        }
        let list = vec!["0"; 1025].join(",");
        assert_eq!(parse(&format!("cuda:{list}")), Err(too_many));
        assert_eq!(parse("host:1024").unwrap().ranks(), DeviceSpec::MAX_RANKS);
        assert_eq!(DeviceSpec::host(0), Err(E::ZeroDevices));
        assert_eq!(DeviceSpec::cuda(Vec::new()), Err(E::EmptyList));

        let msg = |s: &str| parse(s).unwrap_err().to_string();
        assert!(msg("tpu:0").contains("unknown device kind \"tpu\""));
        assert!(msg("tpu:0").contains("host:N"));
        assert!(msg("gpu").contains("cuda:I,J"));
        assert!(msg("cuda:0,x").contains("\"x\" is not a GPU index"));
        assert!(msg("cuda:0,x").contains("integers"));
        assert!(msg("host:x").contains("positive integer"));
        assert!(msg("host:0").contains("positive integer"));
        assert!(msg("cuda:").contains("at least one GPU index"));
        assert!(msg("host:5000").contains("at most 1024"));
    }

    fn spec() -> impl Strategy<Value = DeviceSpec> {
        prop_oneof![
            (1..=DeviceSpec::MAX_RANKS).prop_map(|n| DeviceSpec::host(n).unwrap()),
            prop::collection::vec(prop_oneof![0u32..8, any::<u32>()], 1..64)
                .prop_map(|g| DeviceSpec::cuda(g).unwrap()),
        ]
    }

    proptest! {
        #[test]
        fn display_and_parse_round_trip(s in spec()) {
            let text = s.to_string();
            prop_assert_eq!(parse(&text), Ok(s.clone()));
            prop_assert!(s.ranks() >= 1 && s.ranks() <= DeviceSpec::MAX_RANKS);
        }

        #[test]
        fn any_text_parses_or_is_refused_and_a_parsed_spec_prints_back(
            text in "(host|cuda|tpu| cuda)?:?([0-9]{1,3}|x| |-1)?(,([0-9]{1,3}|x| )?){0,6}"
        ) {
            if let Ok(s) = parse(&text) {
                prop_assert_eq!(parse(&s.to_string()), Ok(s.clone()));
                if let Some(n) = s.first_gpus() {
                    prop_assert_eq!(n, s.ranks());
                    prop_assert!(!s.shares_a_gpu());
                }
            }
        }
    }
}

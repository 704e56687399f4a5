//! Identifiers: experts within a layer, and devices.

use std::fmt;

/// An expert's index within one MoE layer: `0..experts_per_layer`.
///
/// The same id names the same expert's weights in every layer's own table; a placement never mixes
/// layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExpertId(pub u32);

impl ExpertId {
    /// The id as an index into per-expert tables.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ExpertId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A device (one accelerator) in a placement.
///
/// This is an opaque, stable id chosen by the caller, **not** a position: after a scale-down the
/// device set may have gaps (`{0, 1, 3}`), and a device keeps its id across placements. The engine
/// maps it to its own handle (for example `hbm_vmm`'s device id). Placements keep their devices
/// sorted by id, so every iteration order in this crate is deterministic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(pub u32);

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

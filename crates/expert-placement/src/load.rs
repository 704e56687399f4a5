//! Per-layer, per-expert load: how many tokens the router sent to each expert.

use crate::PlacementError;

/// Tokens routed to each expert of each MoE layer over some window, as counted by the engine.
///
/// Only ratios matter: the load-aware constructors and the rebalancer compare `tokens / replicas`
/// between experts. An all-equal table (see [`ExpertLoad::uniform`]) means "no information", and
/// makes the rebalancer keep the old placement's replica choices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertLoad {
    layers: usize,
    experts: usize,
    /// Row-major: `tokens[layer * experts + expert]`.
    tokens: Vec<u64>,
}

impl ExpertLoad {
    /// A table where every expert of every layer has the same load (one token).
    pub fn uniform(layers: usize, experts: usize) -> Result<Self, PlacementError> {
        Self::check_dims(layers, experts)?;
        Ok(Self {
            layers,
            experts,
            tokens: vec![1; layers * experts],
        })
    }

    /// A table from one row per layer, each with one count per expert.
    pub fn from_rows(rows: Vec<Vec<u64>>) -> Result<Self, PlacementError> {
        let layers = rows.len();
        let experts = rows.first().map_or(0, Vec::len);
        Self::check_dims(layers, experts)?;
        let mut tokens = Vec::with_capacity(layers * experts);
        for (layer, row) in rows.into_iter().enumerate() {
            if row.len() != experts {
                return Err(PlacementError::RaggedLoad {
                    layer,
                    found: row.len(),
                    expected: experts,
                });
            }
            tokens.extend(row);
        }
        Ok(Self {
            layers,
            experts,
            tokens,
        })
    }

    fn check_dims(layers: usize, experts: usize) -> Result<(), PlacementError> {
        crate::placement::check_dims(layers, experts)
    }

    /// Adds `tokens` to one expert's count (saturating).
    pub fn add(&mut self, layer: usize, expert: usize, tokens: u64) -> Result<(), PlacementError> {
        if layer >= self.layers || expert >= self.experts {
            return Err(PlacementError::LoadIndexOutOfRange {
                layer,
                expert,
                layers: self.layers,
                experts: self.experts,
            });
        }
        let cell = &mut self.tokens[layer * self.experts + expert];
        *cell = cell.saturating_add(tokens);
        Ok(())
    }

    /// Number of layers.
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// Number of experts per layer.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// One layer's counts, indexed by expert; empty if `layer` is out of range.
    pub fn row(&self, layer: usize) -> &[u64] {
        if layer >= self.layers {
            return &[];
        }
        &self.tokens[layer * self.experts..(layer + 1) * self.experts]
    }

    /// One expert's count; 0 if out of range.
    pub fn get(&self, layer: usize, expert: usize) -> u64 {
        self.row(layer).get(expert).copied().unwrap_or(0)
    }

    pub(crate) fn check_shape(&self, layers: usize, experts: usize) -> Result<(), PlacementError> {
        if self.layers != layers || self.experts != experts {
            return Err(PlacementError::LoadShapeMismatch {
                load_layers: self.layers,
                load_experts: self.experts,
                layers,
                experts,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_updates() {
        let mut load = ExpertLoad::from_rows(vec![vec![1, 2, 3], vec![4, 5, 6]]).unwrap();
        assert_eq!((load.layers(), load.experts()), (2, 3));
        assert_eq!(load.row(1), &[4, 5, 6]);
        load.add(1, 2, 10).unwrap();
        assert_eq!(load.get(1, 2), 16);
        assert_eq!(load.get(5, 0), 0);
        assert!(load.row(2).is_empty());
        assert_eq!(
            load.add(2, 0, 1),
            Err(PlacementError::LoadIndexOutOfRange {
                layer: 2,
                expert: 0,
                layers: 2,
                experts: 3
            })
        );
        load.add(0, 0, u64::MAX).unwrap();
        assert_eq!(load.get(0, 0), u64::MAX, "saturates instead of wrapping");
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        assert_eq!(ExpertLoad::from_rows(vec![]), Err(PlacementError::NoLayers));
        assert_eq!(
            ExpertLoad::from_rows(vec![vec![]]),
            Err(PlacementError::NoExperts)
        );
        assert_eq!(
            ExpertLoad::from_rows(vec![vec![1, 2], vec![3]]),
            Err(PlacementError::RaggedLoad {
                layer: 1,
                found: 1,
                expected: 2
            })
        );
        assert_eq!(ExpertLoad::uniform(0, 4), Err(PlacementError::NoLayers));
        assert!(matches!(
            ExpertLoad::uniform(1 << 40, 1 << 40),
            Err(PlacementError::TooLarge { .. })
        ));
    }
}

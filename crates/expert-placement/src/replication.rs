//! How many copies each expert gets: highest-averages (D'Hondt) apportionment of the redundant
//! slots by load.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// One expert's claim on the next redundant slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Claim {
    tokens: u64,
    copies: u32,
    /// The previous placement had more copies of this expert than it has now: prefer it on ties,
    /// so an all-equal load reproduces the previous replica choice.
    sticky: bool,
    expert: u32,
}

impl Ord for Claim {
    fn cmp(&self, other: &Self) -> Ordering {
        // tokens / copies, compared exactly by cross-multiplication.
        let lhs = u128::from(self.tokens) * u128::from(other.copies);
        let rhs = u128::from(other.tokens) * u128::from(self.copies);
        lhs.cmp(&rhs)
            .then(self.sticky.cmp(&other.sticky))
            .then(other.expert.cmp(&self.expert))
    }
}

impl PartialOrd for Claim {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Copies per expert: one each, then `redundant` more handed out one at a time to the expert with
/// the highest `tokens / copies` (ties: an expert the `previous` placement had more copies of,
/// then the lower id). No expert gets more than `max_copies`.
///
/// The caller guarantees `redundant <= experts * (max_copies - 1)`.
pub(crate) fn apportion(
    tokens: &[u64],
    redundant: usize,
    max_copies: u32,
    previous: Option<&[u32]>,
) -> Vec<u32> {
    let mut copies = vec![1u32; tokens.len()];
    let sticky = |e: usize, c: u32| previous.is_some_and(|p| p[e] > c);
    let mut heap: BinaryHeap<Claim> = tokens
        .iter()
        .enumerate()
        .filter(|_| max_copies > 1)
        .map(|(e, &t)| Claim {
            tokens: t,
            copies: 1,
            sticky: sticky(e, 1),
            expert: e as u32,
        })
        .collect();
    for _ in 0..redundant {
        let Some(top) = heap.pop() else { break };
        let e = top.expert as usize;
        copies[e] += 1;
        if copies[e] < max_copies {
            heap.push(Claim {
                copies: copies[e],
                sticky: sticky(e, copies[e]),
                ..top
            });
        }
    }
    copies
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_experts_get_the_replicas() {
        // 8 tokens on expert 0, 4 on expert 1, 1 on the rest: D'Hondt quotients 8, 4, 4, 2.67, ...
        let copies = apportion(&[8, 4, 1, 1], 3, 4, None);
        assert_eq!(copies, vec![3, 2, 1, 1]);
    }

    #[test]
    fn cap_is_respected() {
        let copies = apportion(&[100, 1, 1], 4, 2, None);
        assert_eq!(copies, vec![2, 2, 2]);
    }

    #[test]
    fn equal_load_reproduces_the_previous_choice() {
        let previous = [1, 2, 1, 2, 1];
        assert_eq!(apportion(&[5; 5], 2, 4, Some(&previous)), previous.to_vec());
        assert_eq!(apportion(&[0; 5], 2, 4, Some(&previous)), previous.to_vec());
        // Without history, ties go to the lower ids.
        assert_eq!(apportion(&[5; 5], 2, 4, None), vec![2, 2, 1, 1, 1]);
    }
}

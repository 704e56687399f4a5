//! Greedy bin packing of expert copies onto devices (the second half of [`Placement::load_aware`]).
//!
//! [`Placement::load_aware`]: crate::Placement::load_aware

use crate::ExpertId;

/// Places `copies[e]` copies of each expert `e` on `n` devices with at most `cap` slots each, no
/// device holding an expert twice, heaviest copy (`tokens / copies`) first onto the least-loaded
/// eligible device.
///
/// Preconditions (checked by the caller): `copies[e] <= n`, `cap <= tokens.len()`, and
/// `sum(copies) <= n * cap`. Rows come back sorted by expert id.
pub(crate) fn pack_layer(
    tokens: &[u64],
    copies: &[u32],
    n: usize,
    cap: usize,
) -> Vec<Vec<ExpertId>> {
    let experts = tokens.len();
    let weight: Vec<f64> = tokens
        .iter()
        .zip(copies)
        .map(|(&t, &c)| t as f64 / f64::from(c))
        .collect();
    let mut items: Vec<usize> = (0..experts)
        .flat_map(|e| std::iter::repeat_n(e, copies[e] as usize))
        .collect();
    items.sort_by(|&a, &b| weight[b].total_cmp(&weight[a]).then(a.cmp(&b)));

    let mut rows: Vec<Vec<usize>> = vec![Vec::with_capacity(cap); n];
    let mut holds = vec![false; n * experts];
    let mut load = vec![0.0f64; n];
    let least = |load: &[f64], rows: &[Vec<usize>], ok: &dyn Fn(usize) -> bool| {
        (0..n).filter(|&d| ok(d)).min_by(|&a, &b| {
            load[a]
                .total_cmp(&load[b])
                .then(rows[a].len().cmp(&rows[b].len()))
                .then(a.cmp(&b))
        })
    };

    for x in items {
        let direct = least(&load, &rows, &|d| {
            rows[d].len() < cap && !holds[d * experts + x]
        });
        let d = match direct {
            Some(d) => d,
            None => {
                // Every device with room already holds x. Make room: move some y from a full
                // device d (without x) to a device e with room, then put x on d.
                //
                // Such a pair always exists: fewer than copies[x] <= n devices hold x, so some
                // device lacks x and (no direct fit) is full; fewer than sum(copies) <= n * cap
                // slots are used, so some device e has room and (no direct fit) holds x. If
                // d's row were a subset of e's, then |e| >= |d| + 1 = cap + 1, impossible. So
                // some y on d is missing from e.
                let e = least(&load, &rows, &|d| rows[d].len() < cap)
                    .expect("a device has room: fewer slots are used than n * cap");
                let (d, y) = (0..n)
                    .filter(|&d| rows[d].len() == cap && !holds[d * experts + x])
                    .flat_map(|d| rows[d].iter().map(move |&y| (d, y)))
                    .filter(|&(_, y)| !holds[e * experts + y])
                    .min_by(|&(d1, y1), &(d2, y2)| {
                        let cost = |d: usize, y: usize| {
                            (load[d] - weight[y] + weight[x]).max(load[e] + weight[y])
                        };
                        cost(d1, y1)
                            .total_cmp(&cost(d2, y2))
                            .then((d1, y1).cmp(&(d2, y2)))
                    })
                    .expect("a full device without x holds some expert the roomy device lacks");
                rows[d].retain(|&z| z != y);
                holds[d * experts + y] = false;
                load[d] -= weight[y];
                rows[e].push(y);
                holds[e * experts + y] = true;
                load[e] += weight[y];
                d
            }
        };
        rows[d].push(x);
        holds[d * experts + x] = true;
        load[d] += weight[x];
    }
    rows.into_iter()
        .map(|mut row| {
            row.sort_unstable();
            row.into_iter().map(|e| ExpertId(e as u32)).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tight_budget_needs_the_repair_path() {
        // Expert 0 is heavy and sits alone on device 0; experts 1..7 fill devices 1 and 2; then
        // both copies of expert 7 arrive and only device 0 has room: the second copy forces a
        // shuffle (some expert moves from a full device to device 0, expert 7 takes its slot).
        let tokens = [100, 10, 10, 10, 10, 10, 10, 2];
        let copies = [1, 1, 1, 1, 1, 1, 1, 2];
        let rows = pack_layer(&tokens, &copies, 3, 3);
        let ids = |v: &[u32]| v.iter().map(|&e| ExpertId(e)).collect::<Vec<_>>();
        assert_eq!(
            rows,
            vec![ids(&[0, 1, 7]), ids(&[3, 5, 7]), ids(&[2, 4, 6])]
        );
    }

    #[test]
    fn heaviest_first_balances() {
        let rows = pack_layer(&[5, 4, 3, 3, 2, 1], &[1; 6], 2, 3);
        let sum = |row: &Vec<ExpertId>| {
            row.iter()
                .map(|e| [5, 4, 3, 3, 2, 1][e.index()])
                .sum::<u32>()
        };
        assert_eq!(rows.iter().map(sum).collect::<Vec<_>>(), vec![9, 9]);
    }
}

//! The ledger against a deliberately simple model: logical blocks with refcounts in a `HashMap`, and
//! a fake memory of `(block, slot) -> tag` into which every appended token writes a fresh tag.

use super::*;
use proptest::prelude::*;

const BT: usize = 4; // tokens per block
const PER_CHUNK: usize = 3; // blocks per chunk

fn seq_id(index: u64) -> SeqId {
    SeqId { pool: 7, index }
}

#[test]
fn grow_allocates_lowest_blocks_and_is_all_or_nothing() {
    let mut l = Ledger::new(7, BT, PER_CHUNK);
    l.add_chunks(1);
    let s = l.create();
    assert_eq!(l.grow_to(s, 5).unwrap(), vec![BlockId(0), BlockId(1)]);
    assert_eq!(l.grow_to(s, 8).unwrap(), vec![]); // fits in block 1
    assert_eq!(l.grow_to(s, 3).unwrap(), vec![]); // never shrinks
    assert_eq!(
        l.grow_to(s, 17),
        Err(KvError::OutOfBlocks { needed: 3, free: 1 })
    );
    assert_eq!(
        l.table(s).unwrap().len(),
        8,
        "a refused grow changes nothing"
    );
    assert_eq!(l.grow_to(s, 9).unwrap(), vec![BlockId(2)]);
    assert_eq!(l.stats().free, 0);
    l.audit().unwrap();
}

#[test]
fn fork_shares_full_blocks_and_copies_the_partial_one() {
    let mut l = Ledger::new(7, BT, PER_CHUNK);
    l.add_chunks(2);
    let p = l.create();
    l.grow_to(p, 6).unwrap(); // blocks 0 (full), 1 (2 tokens)
    let f = l.fork(p, 6).unwrap();
    assert_eq!(
        f.copy,
        Some(BlockCopy {
            src: BlockId(1),
            dst: BlockId(2),
            tokens: 2
        })
    );
    let t = l.table(f.child).unwrap();
    assert_eq!(t.blocks(), &[BlockId(0), BlockId(2)]);
    assert_eq!(l.stats().shared, 1);
    // A prefix that ends on a block boundary needs no copy.
    let g = l.fork(p, 4).unwrap();
    assert_eq!(g.copy, None);
    assert_eq!(l.table(g.child).unwrap().blocks(), &[BlockId(0)]);
    // Appending to the child that ends on a boundary takes a fresh block, never the shared one.
    assert_eq!(l.grow_to(g.child, 5).unwrap(), vec![BlockId(3)]);
    assert_eq!(
        l.fork(p, 7),
        Err(KvError::ForkBeyondEnd {
            seq: p,
            tokens: 7,
            len: 6
        })
    );
    // Freeing the parent keeps the shared block for the children.
    assert_eq!(l.release(p).unwrap(), 1); // only block 1 was private
    assert_eq!(l.table(f.child).unwrap().blocks()[0], BlockId(0));
    l.audit().unwrap();
    l.release(f.child).unwrap();
    l.release(g.child).unwrap();
    assert_eq!(l.stats().used, 0);
    l.audit().unwrap();
}

#[test]
fn unknown_and_foreign_sequences_are_refused() {
    let mut l = Ledger::new(7, BT, PER_CHUNK);
    l.add_chunks(1);
    let s = l.create();
    l.release(s).unwrap();
    assert_eq!(l.release(s), Err(KvError::UnknownSequence(s)));
    let foreign = SeqId { pool: 8, index: 1 };
    l.create();
    assert_eq!(l.table(foreign), Err(KvError::UnknownSequence(foreign)));
    assert_eq!(
        l.grow_to(seq_id(99), 1),
        Err(KvError::UnknownSequence(seq_id(99)))
    );
}

#[test]
fn shrink_only_takes_free_tail_chunks() {
    let mut l = Ledger::new(7, BT, PER_CHUNK);
    l.add_chunks(3);
    let a = l.create();
    l.grow_to(a, 4 * BT).unwrap(); // blocks 0..4: chunks 0 and 1
    assert_eq!(l.free_tail_chunks(), 1);
    assert_eq!(
        l.remove_tail_chunks(2),
        Err(KvError::ShrinkBelowUse {
            requested: 2,
            free_tail: 1
        })
    );
    assert_eq!(l.chunks(), 3, "a refused shrink changes nothing");
    l.remove_tail_chunks(1).unwrap();
    assert_eq!((l.chunks(), l.capacity(), l.free_blocks()), (2, 6, 2));
    l.audit().unwrap();
}

#[test]
fn compaction_moves_tail_blocks_down_and_holds_them_until_commit() {
    let mut l = Ledger::new(7, BT, PER_CHUNK);
    l.add_chunks(3);
    let a = l.create();
    let b = l.create();
    l.grow_to(a, 3 * BT).unwrap(); // 0, 1, 2
    l.grow_to(b, 5 * BT).unwrap(); // 3..8
    l.release(a).unwrap(); // 0, 1, 2 free; b lives in chunks 1 and 2
    let c = l.compact().unwrap();
    assert_eq!(c.target_chunks(), 2);
    assert_eq!(
        c.moves(),
        &[
            Relocation {
                from: BlockId(6),
                to: BlockId(0)
            },
            Relocation {
                from: BlockId(7),
                to: BlockId(1)
            },
        ]
    );
    assert_eq!(l.compact(), Err(KvError::CompactionPending));
    // Until commit, the table is unchanged and the tail cannot be released.
    assert_eq!(l.table(b).unwrap().blocks()[3..], [BlockId(6), BlockId(7)]);
    assert_eq!(l.free_tail_chunks(), 0);
    // Freeing the sequence meanwhile must not free held blocks.
    let b_blocks = l.table(b).unwrap();
    l.audit().unwrap();
    l.commit(c).unwrap();
    let t = l.table(b).unwrap();
    assert_eq!(
        t.blocks(),
        &[BlockId(3), BlockId(4), BlockId(5), BlockId(0), BlockId(1)]
    );
    assert_ne!(t, b_blocks);
    assert_eq!(l.free_tail_chunks(), 1);
    l.audit().unwrap();
}

#[test]
fn a_sequence_freed_during_compaction_frees_both_ends_at_commit() {
    let mut l = Ledger::new(7, BT, 2);
    l.add_chunks(2);
    let a = l.create();
    let b = l.create();
    l.grow_to(a, 2 * BT).unwrap(); // 0, 1
    l.grow_to(b, BT).unwrap(); // 2
    l.release(a).unwrap();
    let c = l.compact().unwrap();
    assert_eq!(
        c.moves(),
        &[Relocation {
            from: BlockId(2),
            to: BlockId(0)
        }]
    );
    l.release(b).unwrap();
    assert_eq!(l.stats().used, 2, "both ends stay held");
    l.audit().unwrap();
    l.commit(c).unwrap();
    assert_eq!(l.stats().used, 0);
    l.audit().unwrap();
}

#[test]
fn abort_and_foreign_compactions() {
    let mut l = Ledger::new(7, BT, 2);
    l.add_chunks(2);
    let a = l.create();
    let b = l.create();
    l.grow_to(a, BT).unwrap();
    l.grow_to(b, BT).unwrap();
    l.grow_to(a, 2 * BT).unwrap(); // a = [0, 2], b = [1]
    l.release(b).unwrap();
    let c = l.compact().unwrap();
    assert_eq!(
        c.moves(),
        &[Relocation {
            from: BlockId(2),
            to: BlockId(1)
        }]
    );
    let forged = Compaction {
        pool: 8,
        id: c.id,
        moves: vec![],
        target_chunks: 0,
    };
    assert_eq!(l.commit(forged), Err(KvError::UnknownCompaction));
    l.abort(c).unwrap();
    assert_eq!(l.table(a).unwrap().blocks(), &[BlockId(0), BlockId(2)]);
    assert_eq!(l.stats().free, 2);
    l.audit().unwrap();
}

#[derive(Debug, Clone)]
enum Op {
    Create,
    Grow { pick: usize, add: usize },
    Release { pick: usize },
    Fork { pick: usize, percent: usize },
    Import { tokens: usize },
    AddChunks(usize),
    Shrink(usize),
    Compact,
    Commit,
    Abort,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Create),
        6 => (any::<usize>(), 0..3 * BT).prop_map(|(pick, add)| Op::Grow { pick, add }),
        2 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        2 => (any::<usize>(), 0..=100usize).prop_map(|(pick, percent)| Op::Fork { pick, percent }),
        1 => (0..4 * BT).prop_map(|tokens| Op::Import { tokens }),
        1 => (1..3usize).prop_map(Op::AddChunks),
        1 => (1..3usize).prop_map(Op::Shrink),
        1 => Just(Op::Compact),
        1 => Just(Op::Commit),
        1 => Just(Op::Abort),
    ]
}

/// The model: per sequence, its logical blocks and the tag of every token.
#[derive(Debug, Default)]
struct Model {
    next_logical: u64,
    next_tag: u64,
    refs: HashMap<u64, u32>,
    seqs: Vec<(SeqId, Vec<u64>, Vec<u64>)>,
    /// Fake device memory: what the engine wrote into each (block, slot).
    memory: HashMap<(u32, usize), u64>,
    pending: Option<Compaction>,
}

impl Model {
    fn new_logical(&mut self) -> u64 {
        self.next_logical += 1;
        self.refs.insert(self.next_logical, 1);
        self.next_logical
    }

    /// Writes fresh tags for tokens `from..to` of sequence `i`, through the ledger's table, as an
    /// engine would.
    fn write(&mut self, l: &Ledger, i: usize, from: usize) {
        let table = l.table(self.seqs[i].0).unwrap();
        for t in from..table.len() {
            self.next_tag += 1;
            let (b, slot) = table.locate(t).unwrap();
            self.memory.insert((b.0, slot), self.next_tag);
            self.seqs[i].2.push(self.next_tag);
        }
    }

    fn check(&self, l: &Ledger) -> Result<(), TestCaseError> {
        l.audit().map_err(TestCaseError::fail)?;
        let stats = l.stats();
        prop_assert_eq!(stats.used + stats.free, stats.capacity);
        prop_assert_eq!(stats.sequences, self.seqs.len());
        let mut log_to_phys: HashMap<u64, u32> = HashMap::new();
        let mut phys_to_log: HashMap<u32, u64> = HashMap::new();
        let mut in_use = BTreeSet::new();
        for (id, logical, tags) in &self.seqs {
            let t = l.table(*id).unwrap();
            prop_assert_eq!(t.len(), tags.len());
            prop_assert_eq!(t.blocks().len(), logical.len());
            for (&lb, &pb) in logical.iter().zip(t.blocks()) {
                prop_assert_eq!(*log_to_phys.entry(lb).or_insert(pb.0), pb.0, "split block");
                prop_assert_eq!(*phys_to_log.entry(pb.0).or_insert(lb), lb, "aliased block");
                in_use.insert(pb.0);
            }
            // Every token reads back what was written for it: nothing else wrote there.
            for (tok, &tag) in tags.iter().enumerate() {
                let (b, slot) = t.locate(tok).unwrap();
                prop_assert_eq!(
                    self.memory.get(&(b.0, slot)),
                    Some(&tag),
                    "token {} of {}",
                    tok,
                    id
                );
            }
        }
        let live: usize = self.refs.values().filter(|&&r| r > 0).count();
        prop_assert_eq!(in_use.len(), live);
        let held = self.pending.as_ref().map_or(0, |c| c.moves().len() * 2);
        let held_in_use = self.pending.as_ref().map_or(0, |c| {
            c.moves()
                .iter()
                .filter(|m| in_use.contains(&m.from.0))
                .count()
        });
        prop_assert_eq!(stats.used, live + held - held_in_use);
        // The free tail, recomputed from the tables and holds.
        let mut busy = in_use.clone();
        if let Some(c) = &self.pending {
            busy.extend(c.moves().iter().flat_map(|m| [m.from.0, m.to.0]));
        }
        let tail = (0..stats.chunks)
            .rev()
            .take_while(|c| {
                (c * PER_CHUNK..(c + 1) * PER_CHUNK).all(|b| !busy.contains(&(b as u32)))
            })
            .count();
        prop_assert_eq!(stats.free_tail_chunks, tail);
        Ok(())
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut l = Ledger::new(7, BT, PER_CHUNK);
    l.add_chunks(2);
    let mut m = Model::default();
    for op in ops {
        let free = l.stats().free;
        let n = m.seqs.len();
        match op {
            Op::Create => {
                let id = l.create();
                m.seqs.push((id, vec![], vec![]));
            }
            Op::Grow { pick, add } if n > 0 => {
                let i = pick % n;
                let old = m.seqs[i].2.len();
                let needed = (old + add).div_ceil(BT) - old.div_ceil(BT);
                match l.grow_to(m.seqs[i].0, old + add) {
                    Ok(new) => {
                        prop_assert!(needed <= free);
                        prop_assert_eq!(new.len(), needed);
                        for _ in 0..needed {
                            let lb = m.new_logical();
                            m.seqs[i].1.push(lb);
                        }
                        m.write(&l, i, old);
                    }
                    Err(e) => {
                        prop_assert!(needed > free);
                        prop_assert_eq!(e, KvError::OutOfBlocks { needed, free });
                    }
                }
            }
            Op::Release { pick } if n > 0 => {
                let (id, logical, _) = m.seqs.remove(pick % n);
                let freed = l.release(id).unwrap();
                let mut expect = 0;
                for lb in logical {
                    let r = m.refs.get_mut(&lb).unwrap();
                    *r -= 1;
                    expect += usize::from(*r == 0);
                }
                // Blocks held by a pending compaction are not freed yet.
                prop_assert!(freed <= expect);
                if m.pending.is_none() {
                    prop_assert_eq!(freed, expect);
                }
                prop_assert_eq!(l.release(id), Err(KvError::UnknownSequence(id)));
            }
            Op::Fork { pick, percent } if n > 0 => {
                let i = pick % n;
                let tokens = m.seqs[i].2.len() * percent / 100;
                let (full, rem) = (tokens / BT, tokens % BT);
                match l.fork(m.seqs[i].0, tokens) {
                    Ok(f) => {
                        prop_assert_eq!(f.copy.is_some(), rem > 0);
                        let mut logical = m.seqs[i].1[..full].to_vec();
                        for lb in &logical {
                            *m.refs.get_mut(lb).unwrap() += 1;
                        }
                        if let Some(c) = f.copy {
                            prop_assert_eq!(c.tokens, rem);
                            prop_assert_eq!(
                                Some(c.src),
                                l.table(m.seqs[i].0).unwrap().blocks().get(full).copied()
                            );
                            for s in 0..rem {
                                let v = m.memory[&(c.src.0, s)];
                                m.memory.insert((c.dst.0, s), v);
                            }
                            logical.push(m.new_logical());
                        }
                        let tags = m.seqs[i].2[..tokens].to_vec();
                        m.seqs.push((f.child, logical, tags));
                    }
                    Err(e) => {
                        prop_assert!(rem > 0 && free == 0);
                        prop_assert_eq!(e, KvError::OutOfBlocks { needed: 1, free: 0 });
                    }
                }
            }
            Op::Import { tokens } => {
                let needed = tokens.div_ceil(BT);
                match l.import(tokens) {
                    Ok(id) => {
                        let logical = (0..needed).map(|_| m.new_logical()).collect();
                        m.seqs.push((id, logical, vec![]));
                        m.write(&l, n, 0);
                    }
                    Err(e) => prop_assert_eq!(e, KvError::OutOfBlocks { needed, free }),
                }
            }
            Op::AddChunks(k) => l.add_chunks(k),
            Op::Shrink(k) => {
                let tail = l.stats().free_tail_chunks;
                let chunks = l.chunks();
                match l.remove_tail_chunks(k) {
                    Ok(()) => {
                        prop_assert!(k <= tail);
                        prop_assert_eq!(l.chunks(), chunks - k);
                        // Whatever the engine wrote there is gone with the memory.
                        m.memory.retain(|(b, _), _| (*b as usize) < l.capacity());
                    }
                    Err(e) => {
                        prop_assert_eq!(
                            e,
                            KvError::ShrinkBelowUse {
                                requested: k,
                                free_tail: tail
                            }
                        )
                    }
                }
            }
            Op::Compact => match l.compact() {
                Ok(c) => {
                    prop_assert!(m.pending.is_none());
                    for mv in c.moves() {
                        prop_assert!(mv.to < mv.from);
                        prop_assert!(mv.to.index() < c.target_chunks() * PER_CHUNK);
                    }
                    m.pending = Some(c);
                }
                Err(e) => {
                    prop_assert!(m.pending.is_some());
                    prop_assert_eq!(e, KvError::CompactionPending);
                }
            },
            Op::Commit => {
                if let Some(c) = m.pending.take() {
                    // The caller's copies, made right before the commit.
                    for mv in c.moves() {
                        for s in 0..BT {
                            if let Some(v) = m.memory.get(&(mv.from.0, s)).copied() {
                                m.memory.insert((mv.to.0, s), v);
                            }
                        }
                    }
                    // (The plan's target may be stale by now: sequences may have grown or the
                    // pool shrunk since. The commit is still exact.)
                    l.commit(c).unwrap();
                }
            }
            Op::Abort => {
                if let Some(c) = m.pending.take() {
                    l.abort(c).unwrap();
                }
            }
            _ => {}
        }
        m.check(&l)?;
    }
    // Tearing everything down frees every block.
    if let Some(c) = m.pending.take() {
        l.abort(c).unwrap();
    }
    for (id, _, _) in m.seqs.drain(..) {
        l.release(id).unwrap();
    }
    prop_assert_eq!(l.stats().used, 0);
    prop_assert_eq!(l.stats().free_tail_chunks, l.chunks());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn ledger_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}

/// Compacting right after a plan, with nothing in between, packs every used block below the
/// target line.
#[test]
fn compaction_with_no_interleaving_packs_the_pool() {
    let mut l = Ledger::new(7, BT, PER_CHUNK);
    l.add_chunks(4);
    let ids: Vec<SeqId> = (0..6).map(|_| l.create()).collect();
    for (i, &s) in ids.iter().enumerate() {
        l.grow_to(s, (i % 3 + 1) * BT).unwrap();
    }
    for &s in ids.iter().step_by(2) {
        l.release(s).unwrap();
    }
    let used = l.stats().used;
    let c = l.compact().unwrap();
    let target = c.target_chunks();
    assert_eq!(target, used.div_ceil(PER_CHUNK));
    l.commit(c).unwrap();
    assert_eq!(l.stats().free_tail_chunks, l.chunks() - target);
    l.remove_tail_chunks(l.chunks() - target).unwrap();
    assert_eq!(l.stats().free, target * PER_CHUNK - used);
    l.audit().unwrap();
}

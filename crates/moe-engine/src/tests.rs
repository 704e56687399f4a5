//! Engine tests on a small deterministic stand-in model (the real model is tested in
//! `moe-host`'s `tests/engine_*.rs`). The stand-in keeps a rolling hash per KV position, so a
//! sequence's logits depend on its whole history and a wrong chunk start, a lost KV entry or a bad
//! recompute changes the output.

use super::*;

const VOCAB: usize = 48;

fn mix(h: u64, token: TokenId) -> u64 {
    let mut x = h ^ u64::from(token).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn logits_of(h: u64) -> Vec<f32> {
    (0..VOCAB)
        .map(|v| ((mix(h, v as TokenId) >> 40) as f32) / (1u64 << 24) as f32 * 8.0)
        .collect()
}

/// What the stand-in model generates for `prompt` alone, greedily.
fn reference(prompt: &[TokenId], n: usize) -> Vec<TokenId> {
    let mut h = 0;
    for &t in prompt {
        h = mix(h, t);
    }
    let mut out = Vec::new();
    for i in 0..n {
        let t = sampling::sample(&logits_of(h), &SamplingParams::Greedy, i)
            .unwrap()
            .token;
        out.push(t);
        h = mix(h, t);
    }
    out
}

#[derive(Debug)]
struct Ledger {
    block_tokens: usize,
    blocks: usize,
    watermark: usize,
    /// `(rank, seq)` -> blocks held.
    held: BTreeMap<(RankId, RequestId), usize>,
}

impl Ledger {
    fn used(&self, rank: RankId) -> usize {
        self.held
            .iter()
            .filter(|((r, _), _)| *r == rank)
            .map(|(_, b)| b)
            .sum()
    }
}

impl KvLedger for Ledger {
    fn can_admit(&self, rank: RankId, tokens: usize) -> bool {
        self.used(rank) + tokens.div_ceil(self.block_tokens) + self.watermark <= self.blocks
    }
    fn grow(&mut self, rank: RankId, seq: RequestId, tokens: usize) -> bool {
        let have = self.held.get(&(rank, seq)).copied().unwrap_or(0);
        let want = tokens.div_ceil(self.block_tokens).max(have);
        if self.used(rank) - have + want > self.blocks {
            return false;
        }
        self.held.insert((rank, seq), want);
        true
    }
    fn release(&mut self, rank: RankId, seq: RequestId) {
        self.held.remove(&(rank, seq));
    }
}

/// The stand-in runner: KV is a rolling hash per position, per sequence.
#[derive(Debug)]
struct HashRunner {
    ranks: Vec<RankId>,
    ledger: Ledger,
    kv: BTreeMap<RequestId, Vec<u64>>,
    max_context: usize,
    fail_next: bool,
    batches: Vec<usize>,
}

impl HashRunner {
    fn new(ranks: u32, blocks: usize) -> Self {
        Self {
            ranks: (0..ranks).map(RankId).collect(),
            ledger: Ledger {
                block_tokens: 4,
                blocks,
                watermark: 1,
                held: BTreeMap::new(),
            },
            kv: BTreeMap::new(),
            max_context: 64,
            fail_next: false,
            batches: Vec::new(),
        }
    }
}

impl Runner for HashRunner {
    fn limits(&self) -> RequestLimits {
        RequestLimits {
            vocab_size: VOCAB,
            max_context: self.max_context,
        }
    }
    fn kv_capacity_tokens(&self) -> usize {
        self.ledger.blocks * self.ledger.block_tokens
    }
    fn ranks(&self) -> Vec<RankId> {
        self.ranks.clone()
    }
    fn ledger(&mut self) -> &mut dyn KvLedger {
        // Forget the KV of sequences whose blocks were released.
        let held: Vec<RequestId> = self.ledger.held.keys().map(|k| k.1).collect();
        self.kv.retain(|s, _| held.contains(s));
        &mut self.ledger
    }
    fn kv_usage(&self) -> Vec<RankKv> {
        self.ranks
            .iter()
            .map(|&rank| RankKv {
                rank,
                used_blocks: self.ledger.used(rank),
                total_blocks: self.ledger.blocks,
            })
            .collect()
    }
    fn run(&mut self, work: &[Work<'_>]) -> Result<Vec<Vec<f32>>, RunError> {
        if std::mem::take(&mut self.fail_next) {
            return Err(RunError("injected failure".into()));
        }
        self.batches.push(work.len());
        let mut out = Vec::new();
        for w in work {
            let blocks = self
                .ledger
                .held
                .get(&(w.chunk.rank, w.chunk.seq))
                .copied()
                .unwrap_or(0);
            if blocks * self.ledger.block_tokens < w.chunk.start + w.chunk.len {
                return Err(RunError(format!("{} has no KV room", w.chunk.seq)));
            }
            let kv = self.kv.entry(w.chunk.seq).or_default();
            if w.chunk.start == 0 {
                kv.clear();
            }
            if kv.len() != w.chunk.start {
                return Err(RunError(format!(
                    "{} chunk starts at {} but KV has {}",
                    w.chunk.seq,
                    w.chunk.start,
                    kv.len()
                )));
            }
            for &t in w.tokens {
                let h = mix(kv.last().copied().unwrap_or(0), t);
                kv.push(h);
            }
            if w.chunk.sample {
                out.push(logits_of(*kv.last().expect("chunks are non-empty")));
            }
        }
        Ok(out)
    }
}

fn engine(ranks: u32, blocks: usize, config: SchedulerConfig) -> Engine<HashRunner> {
    Engine::new(
        HashRunner::new(ranks, blocks),
        EngineConfig {
            scheduler: config,
            ..EngineConfig::default()
        },
    )
}

fn prompt(i: usize, len: usize) -> Vec<TokenId> {
    (0..len)
        .map(|j| ((i * 7 + j * 3) % VOCAB) as TokenId)
        .collect()
}

#[test]
fn greedy_generation_matches_the_model() {
    let e = engine(1, 64, SchedulerConfig::default());
    let h = e.submit(Request::greedy(vec![1, 2, 3], 10)).unwrap();
    e.run_until_idle(100).unwrap();
    let done = h.wait();
    assert_eq!(done.tokens, reference(&[1, 2, 3], 10));
    assert_eq!(done.finish, FinishReason::Length);
    assert_eq!(done.timings.token_times.len(), 10);
    assert_eq!(done.timings.ttft, Some(done.timings.token_times[0]));
    assert!(done.timings.token_times.windows(2).all(|w| w[0] <= w[1]));
}

#[test]
fn outputs_do_not_depend_on_the_batch_or_the_rank_count() {
    let alone = {
        let e = engine(1, 64, SchedulerConfig::default());
        let h = e.submit(Request::greedy(prompt(3, 9), 12)).unwrap();
        e.run_until_idle(1000).unwrap();
        h.wait().tokens
    };
    for ranks in [1, 3] {
        let e = engine(
            ranks,
            64,
            SchedulerConfig {
                max_batch_tokens: 16,
                max_running_per_rank: 8,
            },
        );
        let mut handles = Vec::new();
        for i in 0..50 {
            handles.push(
                e.submit(Request::greedy(prompt(i, 1 + i % 11), 1 + i % 9))
                    .unwrap(),
            );
        }
        let target = e.submit(Request::greedy(prompt(3, 9), 12)).unwrap();
        e.run_until_idle(10_000).unwrap();
        assert_eq!(target.wait().tokens, alone, "{ranks} ranks");
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(
                h.wait().tokens,
                reference(&prompt(i, 1 + i % 11), 1 + i % 9)
            );
        }
        assert!(
            e.with_runner(|r| r.batches.iter().any(|&b| b > 1)),
            "requests were batched"
        );
    }
}

#[test]
fn preemption_and_recompute_give_the_same_tokens() {
    // 10 blocks of 4 tokens per rank: 8 sequences of up to 24 tokens must preempt.
    let e = engine(
        1,
        10,
        SchedulerConfig {
            max_batch_tokens: 32,
            max_running_per_rank: 8,
        },
    );
    let handles: Vec<_> = (0..8)
        .map(|i| e.submit(Request::greedy(prompt(i, 6), 18)).unwrap())
        .collect();
    e.run_until_idle(10_000).unwrap();
    let m = e.metrics();
    assert!(m.preemptions > 0, "the pool was tight enough to preempt");
    let mut preempted = 0;
    for (i, h) in handles.into_iter().enumerate() {
        let done = h.wait();
        assert_eq!(done.tokens, reference(&prompt(i, 6), 18), "sequence {i}");
        preempted += done.timings.preemptions;
    }
    assert_eq!(u64::from(preempted), m.preemptions);
    assert!(
        m.prefill_tokens > 8 * 6,
        "recompute shows in the prefill count"
    );
    assert_eq!(m.kv.iter().map(|r| r.used_blocks).sum::<usize>(), 0);
}

#[test]
fn cancel_frees_kv_blocks() {
    let e = engine(2, 32, SchedulerConfig::default());
    let keep = e.submit(Request::greedy(prompt(1, 5), 40)).unwrap();
    let mut gone = e.submit(Request::greedy(prompt(2, 13), 40)).unwrap();
    for _ in 0..3 {
        e.step().unwrap();
    }
    let used = |e: &Engine<HashRunner>| e.metrics().kv.iter().map(|r| r.used_blocks).sum::<usize>();
    let before = used(&e);
    e.cancel(gone.id());
    e.step().unwrap();
    // 13 + 3 tokens of KV (4 blocks) are gone; the other sequence grew by at most one block.
    assert!(used(&e) <= before - 4 + 1, "{} -> {}", before, used(&e));
    let mut events = Vec::new();
    while let Some(ev) = gone.try_recv() {
        events.push(ev);
    }
    assert!(
        matches!(
            events.last(),
            Some(Event::Finished {
                reason: FinishReason::Cancelled,
                ..
            })
        ),
        "{events:?}"
    );
    e.run_until_idle(1000).unwrap();
    assert_eq!(keep.wait().tokens.len(), 40);
    assert_eq!(used(&e), 0);
}

#[test]
fn dropping_a_handle_cancels_even_before_admission() {
    let e = engine(1, 32, SchedulerConfig::default());
    drop(e.submit(Request::greedy(vec![1, 2], 30)).unwrap());
    let h = e.submit(Request::greedy(vec![3], 2)).unwrap();
    e.run_until_idle(100).unwrap();
    assert_eq!(h.wait().finish, FinishReason::Length);
    let m = e.metrics();
    assert_eq!(m.finished, 2);
    assert!(
        m.generated_tokens < 5,
        "the dropped request did not run to the end"
    );
}

#[test]
fn stop_tokens_and_context_end_generation() {
    let full = reference(&[5, 6], 20);
    let stop = full[4];
    let first = full.iter().position(|&t| t == stop).unwrap();
    let e = engine(1, 64, SchedulerConfig::default());
    let h = e
        .submit(Request::greedy(vec![5, 6], 20).with_stop_tokens(vec![stop]))
        .unwrap();
    let mut runner_ctx = Request::greedy(vec![5; 60], 20);
    runner_ctx.logprobs = true;
    let c = e.submit(runner_ctx).unwrap();
    e.run_until_idle(1000).unwrap();
    let done = h.wait();
    assert_eq!(done.finish, FinishReason::Stop(stop));
    assert_eq!(done.tokens, full[..=first]);
    let done = c.wait();
    assert_eq!(done.finish, FinishReason::ContextFull);
    assert_eq!(
        done.tokens.len(),
        4,
        "60 prompt tokens leave 4 in a 64-token context"
    );
    assert_eq!(done.logprobs.len(), 4);
    assert!(done.logprobs.iter().all(|&l| l <= 0.0));
}

#[test]
fn bad_requests_are_refused_at_submit() {
    let e = engine(1, 8, SchedulerConfig::default());
    assert_eq!(
        e.submit(Request::greedy(vec![], 3)).unwrap_err(),
        RequestError::EmptyPrompt
    );
    assert!(matches!(
        e.submit(Request::greedy(vec![VOCAB as TokenId], 3))
            .unwrap_err(),
        RequestError::TokenOutOfVocabulary { .. }
    ));
    assert_eq!(
        e.submit(Request::greedy(vec![1], 0)).unwrap_err(),
        RequestError::ZeroMaxTokens
    );
    // 8 blocks of 4 tokens hold 32 tokens; 30 + 10 do not fit.
    assert_eq!(
        e.submit(Request::greedy(vec![1; 30], 10)).unwrap_err(),
        RequestError::ExceedsKvCapacity {
            needed_tokens: 40,
            capacity_tokens: 32
        }
    );
    e.close();
    assert_eq!(
        e.submit(Request::greedy(vec![1], 1)).unwrap_err(),
        RequestError::EngineStopped
    );
    assert!(e.is_idle());
}

#[test]
fn seeded_sampling_is_independent_of_the_batch() {
    let params = SamplingParams::Random {
        temperature: 0.8,
        top_p: 0.9,
        seed: 1234,
    };
    let run = |others: usize| {
        let e = engine(
            2,
            64,
            SchedulerConfig {
                max_batch_tokens: 8,
                max_running_per_rank: 4,
            },
        );
        let hs: Vec<_> = (0..others)
            .map(|i| e.submit(Request::greedy(prompt(i, 7), 5)).unwrap())
            .collect();
        let h = e
            .submit(Request::greedy(vec![9, 8, 7], 16).with_sampling(params))
            .unwrap();
        e.run_until_idle(10_000).unwrap();
        drop(hs);
        h.wait().tokens
    };
    let alone = run(0);
    assert_eq!(run(12), alone);
    assert_ne!(
        alone,
        reference(&[9, 8, 7], 16),
        "sampling is not greedy here"
    );
}

#[test]
fn a_runner_error_ends_that_batch_and_serving_goes_on() {
    let e = engine(1, 64, SchedulerConfig::default());
    let a = e.submit(Request::greedy(vec![1, 2], 4)).unwrap();
    e.with_runner(|_| ());
    e.at_boundary(|r: &mut HashRunner, _| r.fail_next = true);
    let err = e.step().unwrap_err();
    assert!(matches!(err, EngineError::Run { failed: 1, .. }), "{err:?}");
    assert!(matches!(a.wait().finish, FinishReason::Error(m) if m.contains("injected")));
    assert_eq!(e.metrics().last_error.as_deref(), Some("injected failure"));
    let b = e.submit(Request::greedy(vec![1, 2], 4)).unwrap();
    e.run_until_idle(100).unwrap();
    assert_eq!(b.wait().tokens, reference(&[1, 2], 4));
}

#[test]
fn boundary_actions_run_between_iterations() {
    let e = engine(
        1,
        64,
        SchedulerConfig {
            max_batch_tokens: 64,
            max_running_per_rank: 1,
        },
    );
    let a = e.submit(Request::greedy(vec![1], 6)).unwrap();
    e.step().unwrap();
    e.at_boundary(|r: &mut HashRunner, s| {
        r.ranks.push(RankId(7));
        s.add_rank(RankId(7));
    });
    let b = e.submit(Request::greedy(vec![2], 6)).unwrap();
    let report = e.step().unwrap();
    assert_eq!(report.boundary_actions, 1);
    assert_eq!(e.metrics().kv.len(), 2);
    assert_eq!(
        e.with_runner(|r| r.ledger.used(RankId(7))),
        1,
        "the new rank took the new sequence"
    );
    e.run_until_idle(100).unwrap();
    assert_eq!(a.wait().tokens, reference(&[1], 6));
    assert_eq!(b.wait().tokens, reference(&[2], 6));
}

#[test]
fn the_run_loop_serves_concurrent_submitters() {
    let e = engine(
        2,
        128,
        SchedulerConfig {
            max_batch_tokens: 24,
            max_running_per_rank: 16,
        },
    );
    let run = e.start();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let e = e.clone();
            std::thread::spawn(move || {
                let hs: Vec<_> = (0..25)
                    .map(|i| {
                        (
                            i,
                            e.submit(Request::greedy(prompt(t * 100 + i, 1 + i % 7), 1 + i % 5))
                                .unwrap(),
                        )
                    })
                    .collect();
                for (i, h) in hs {
                    let done = h.wait();
                    assert_eq!(done.finish, FinishReason::Length);
                    assert_eq!(
                        done.tokens,
                        reference(&prompt(t * 100 + i, 1 + i % 7), 1 + i % 5)
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    run.stop();
    let m = e.metrics();
    assert_eq!(m.finished, 100);
    assert_eq!((m.queue_depth, m.running), (0, 0));
    assert!(m.tokens_per_s > 0.0);
    assert!(m.iterations > 0);
}

#[test]
fn a_stopped_engine_leaves_handles_with_an_error_not_a_hang() {
    let e = engine(1, 64, SchedulerConfig::default());
    let h = e.submit(Request::greedy(vec![1], 3)).unwrap();
    drop(e);
    let done = h.wait();
    assert!(matches!(done.finish, FinishReason::Error(_)));
}

/// How [`TokenRunner`] answers the rows that need only a greedy token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// The argmax, as a device would compute it (first index of the largest finite logit).
    Argmax,
    /// "No finite logit".
    NoFinite,
    /// A token outside the vocabulary.
    OutOfVocab,
    /// Greedy tokens for every row, even those that need logits (a broken runner).
    TokensForAll,
}

/// A runner that samples greedy rows itself, as the CUDA runner does on the device.
#[derive(Debug)]
struct TokenRunner {
    inner: HashRunner,
    answer: Answer,
    needs_seen: Vec<Need>,
}

fn first_argmax(logits: &[f32]) -> Option<TokenId> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if x.is_finite() && best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i as TokenId)
}

impl Runner for TokenRunner {
    fn limits(&self) -> RequestLimits {
        self.inner.limits()
    }
    fn kv_capacity_tokens(&self) -> usize {
        self.inner.kv_capacity_tokens()
    }
    fn ranks(&self) -> Vec<RankId> {
        self.inner.ranks()
    }
    fn ledger(&mut self) -> &mut dyn KvLedger {
        self.inner.ledger()
    }
    fn kv_usage(&self) -> Vec<RankKv> {
        self.inner.kv_usage()
    }
    fn run(&mut self, work: &[Work<'_>]) -> Result<Vec<Vec<f32>>, RunError> {
        self.inner.run(work)
    }
    fn run_sampled(
        &mut self,
        work: &[Work<'_>],
        needs: &[Need],
    ) -> Result<Vec<RowOutput>, RunError> {
        let logits = self.inner.run(work)?;
        assert_eq!(logits.len(), needs.len(), "one need per sampled row");
        self.needs_seen.extend_from_slice(needs);
        Ok(logits
            .into_iter()
            .zip(needs)
            .map(|(l, &need)| match (need, self.answer) {
                (Need::Logits, Answer::TokensForAll) => RowOutput::Greedy(first_argmax(&l)),
                (Need::Logits, _) => RowOutput::Logits(l),
                (Need::GreedyToken, Answer::NoFinite) => RowOutput::Greedy(None),
                (Need::GreedyToken, Answer::OutOfVocab) => {
                    RowOutput::Greedy(Some(VOCAB as TokenId))
                }
                (Need::GreedyToken, _) => RowOutput::Greedy(first_argmax(&l)),
            })
            .collect())
    }
}

fn token_engine(answer: Answer) -> Engine<TokenRunner> {
    Engine::new(
        TokenRunner {
            inner: HashRunner::new(2, 64),
            answer,
            needs_seen: Vec::new(),
        },
        EngineConfig {
            scheduler: SchedulerConfig {
                max_batch_tokens: 16,
                max_running_per_rank: 8,
            },
            ..EngineConfig::default()
        },
    )
}

/// A mix of greedy, greedy-with-logprobs and seeded requests.
fn mixed_requests() -> Vec<Request> {
    (0..24)
        .map(|i| {
            let r = Request::greedy(prompt(i, 1 + i % 7), 2 + i % 5);
            match i % 3 {
                0 => r,
                1 => r.with_logprobs(true),
                _ => r.with_sampling(SamplingParams::Random {
                    temperature: 0.9,
                    top_p: 0.8,
                    seed: i as u64,
                }),
            }
        })
        .collect()
}

#[test]
fn need_follows_the_sampling_settings() {
    let random = SamplingParams::Random {
        temperature: 1.0,
        top_p: 1.0,
        seed: 0,
    };
    assert_eq!(Need::of(&SamplingParams::Greedy, false), Need::GreedyToken);
    assert_eq!(Need::of(&SamplingParams::Greedy, true), Need::Logits);
    assert_eq!(Need::of(&random, false), Need::Logits);
    assert_eq!(Need::of(&random, true), Need::Logits);
}

#[test]
fn runner_side_greedy_tokens_give_the_same_outputs() {
    let host = engine(
        2,
        64,
        SchedulerConfig {
            max_batch_tokens: 16,
            max_running_per_rank: 8,
        },
    );
    let dev = token_engine(Answer::Argmax);
    let hs: Vec<_> = mixed_requests()
        .into_iter()
        .map(|r| host.submit(r).unwrap())
        .collect();
    let ds: Vec<_> = mixed_requests()
        .into_iter()
        .map(|r| dev.submit(r).unwrap())
        .collect();
    host.run_until_idle(10_000).unwrap();
    dev.run_until_idle(10_000).unwrap();
    for (i, (h, d)) in hs.into_iter().zip(ds).enumerate() {
        let (h, d) = (h.wait(), d.wait());
        assert_eq!(h.tokens, d.tokens, "request {i}");
        assert_eq!(h.logprobs, d.logprobs, "request {i}");
        assert_eq!(h.finish, d.finish, "request {i}");
        assert_eq!(
            d.logprobs.len(),
            if i % 3 == 1 { d.tokens.len() } else { 0 }
        );
    }
    let seen = dev.with_runner(|r| r.needs_seen.clone());
    let tokens = seen.iter().filter(|&&n| n == Need::GreedyToken).count();
    // Requests 0, 3, 6, ... are plain greedy: 8 of them, each sampling 2 + i % 5 tokens.
    let expected = (0..24).step_by(3).map(|i| 2 + i % 5).sum::<usize>();
    assert_eq!(tokens, expected);
    assert_eq!(
        seen.len(),
        mixed_requests().iter().map(|r| r.max_tokens).sum::<usize>()
    );
}

#[test]
fn bad_runner_answers_end_only_the_affected_request() {
    for (answer, msg) in [
        (Answer::NoFinite, "no finite value"),
        (Answer::OutOfVocab, "outside the vocabulary"),
    ] {
        let e = token_engine(answer);
        let greedy = e.submit(Request::greedy(vec![1, 2, 3], 4)).unwrap();
        let with_lp = e
            .submit(Request::greedy(vec![1, 2, 3], 4).with_logprobs(true))
            .unwrap();
        e.run_until_idle(100).unwrap();
        let g = greedy.wait();
        assert!(
            matches!(&g.finish, FinishReason::Error(m) if m.contains(msg)),
            "{answer:?}: {:?}",
            g.finish
        );
        assert!(g.tokens.is_empty());
        let w = with_lp.wait();
        assert_eq!(w.finish, FinishReason::Length, "{answer:?}");
        assert_eq!(w.tokens, reference(&[1, 2, 3], 4));
    }
    let e = token_engine(Answer::TokensForAll);
    let lp = e
        .submit(Request::greedy(vec![1, 2, 3], 4).with_logprobs(true))
        .unwrap();
    e.run_until_idle(100).unwrap();
    assert!(
        matches!(&lp.wait().finish, FinishReason::Error(m) if m.contains("needs logits")),
        "a token where logits were needed is refused"
    );
}

#[test]
fn metrics_split_iteration_time_into_runner_and_engine_time_and_count_computed_tokens() {
    let e = engine(1, 64, SchedulerConfig::default());
    let handles: Vec<_> = (0..3)
        .map(|i| e.submit(Request::greedy(prompt(i, 5), 4)).unwrap())
        .collect();
    // A boundary action is engine time, not runner time.
    e.at_boundary(|_, _| std::thread::sleep(Duration::from_millis(30)));
    e.run_until_idle(100).unwrap();
    for h in handles {
        assert_eq!(h.wait().tokens.len(), 4);
    }
    let m = e.metrics();
    // Every prompt token once, then every generated token but the last is fed back.
    assert_eq!(m.computed_tokens, 3 * 5 + 3 * 3);
    assert_eq!(m.preemptions, 0);
    assert!(m.runner_s > 0.0, "{m:?}");
    assert!(m.iteration_s - m.runner_s >= 0.03, "{m:?}");
}

#[test]
fn with_runner_gets_in_while_the_run_loop_stays_busy() {
    let e = engine(2, 1 << 16, SchedulerConfig::default());
    let handles: Vec<_> = (0..3000)
        .map(|i| e.submit(Request::greedy(prompt(i, 4), 40)).unwrap())
        .collect();
    let serving = e.start();
    while e.metrics().iterations < 3 {
        std::thread::yield_now();
    }
    for call in 0..50 {
        let before = e.metrics().iterations;
        let (inside, idle) = e.with_runner(|_| {
            let m = e.metrics();
            (m.iterations, m.running == 0 && m.queue_depth == 0)
        });
        assert!(
            idle || inside - before <= 2,
            "call {call}: with_runner waited {} iterations of a busy loop",
            inside - before
        );
    }
    serving.stop();
    assert!(
        e.metrics().running > 0 || e.metrics().queue_depth > 0,
        "the loop ran out of work before the calls ended; the test did not test a busy loop"
    );
    drop(handles);
}

#[test]
fn the_iteration_observer_sees_every_working_iteration_with_admissions_and_boundaries() {
    let e = engine(2, 1 << 10, SchedulerConfig::default());
    let seen: Arc<Mutex<Vec<IterationRecord>>> = Arc::default();
    let sink = Arc::clone(&seen);
    e.set_iteration_observer(Some(Arc::new(move |r: &IterationRecord| {
        lock(&sink).push(*r);
    })));
    let handles: Vec<_> = (0..5)
        .map(|i| e.submit(Request::greedy(prompt(i, 3), 6)).unwrap())
        .collect();
    let submitted: Vec<Instant> = handles.iter().map(RequestHandle::submitted_at).collect();
    e.at_boundary(|_, _| {});
    let n = e.run_until_idle(100).unwrap();
    // Idle iterations are not reported.
    e.step().unwrap();
    let records = lock(&seen).clone();
    assert_eq!(records.len(), n);
    assert_eq!(records.iter().map(|r| r.admitted).sum::<usize>(), 5);
    assert_eq!(records.iter().map(|r| r.generated).sum::<usize>(), 5 * 6);
    assert_eq!(records.iter().map(|r| r.boundary_actions).sum::<usize>(), 1);
    assert_eq!(records[0].boundary_actions, 1);
    assert!(records.iter().all(|r| r.ranks == 2 && r.started <= r.ended));
    assert!(records.windows(2).all(|w| w[0].ended <= w[1].started));
    for (h, at) in handles.into_iter().zip(submitted) {
        let done = h.wait();
        let admitted = done.timings.admitted.expect("it ran");
        // Admitted at the first iteration (all five fit), before the first token.
        assert!(at + admitted <= records[0].ended);
        assert!(admitted <= done.timings.ttft.unwrap());
    }
    e.set_iteration_observer(None);
    e.submit(Request::greedy(prompt(9, 3), 2)).unwrap();
    e.run_until_idle(100).unwrap();
    assert_eq!(lock(&seen).len(), n, "a removed observer sees nothing");
}

//! The engine over a toy runner that always picks token 7: submit, run on a thread, wait.
//!
//! Run: `cargo run -p moe-engine --example quickstart` (no GPU needed).

use moe_engine::{
    Engine, EngineConfig, FinishReason, KvLedger, RankId, RankKv, Request, RequestId,
    RequestLimits, RunError, Runner, Work,
};

fn main() {
    struct Unbounded;
    impl KvLedger for Unbounded {
        fn can_admit(&self, _: RankId, _: usize) -> bool {
            true
        }
        fn grow(&mut self, _: RankId, _: RequestId, _: usize) -> bool {
            true
        }
        fn release(&mut self, _: RankId, _: RequestId) {}
    }

    struct Sevens(Unbounded);
    impl Runner for Sevens {
        fn limits(&self) -> RequestLimits {
            RequestLimits {
                vocab_size: 16,
                max_context: 64,
            }
        }
        fn kv_capacity_tokens(&self) -> usize {
            64
        }
        fn ranks(&self) -> Vec<RankId> {
            vec![RankId(0)]
        }
        fn ledger(&mut self) -> &mut dyn KvLedger {
            &mut self.0
        }
        fn kv_usage(&self) -> Vec<RankKv> {
            Vec::new()
        }
        fn run(&mut self, work: &[Work<'_>]) -> Result<Vec<Vec<f32>>, RunError> {
            let mut logits = vec![0.0; 16];
            logits[7] = 1.0;
            Ok(work
                .iter()
                .filter(|w| w.chunk.sample)
                .map(|_| logits.clone())
                .collect())
        }
    }

    let engine = Engine::new(Sevens(Unbounded), EngineConfig::default());
    let handle = engine.submit(Request::greedy(vec![1, 2, 3], 4)).unwrap();
    let run = engine.start(); // iterations on a thread; submit keeps working meanwhile
    let done = handle.wait();
    assert_eq!(
        (done.tokens, done.finish),
        (vec![7; 4], FinishReason::Length)
    );
    run.stop();
    println!("moe-engine: ok");
}

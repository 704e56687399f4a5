//! Requests as the engine receives them, their validation, and the events they produce.
//!
//! A [`Request`] is plain data: prompt token ids, a generation limit, stop tokens and
//! [`SamplingParams`]. [`Request::validate`] checks it against [`RequestLimits`] (the model's vocabulary
//! and context) and returns a typed [`RequestError`]; the engine never panics or hangs on bad input.

use std::time::Duration;

use crate::sampling::{SamplingError, SamplingParams};

/// A token id, as the model's embedding table indexes it.
pub type TokenId = u32;

/// The engine-wide identity of a submitted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "req-{}", self.0)
    }
}

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The prompt as token ids (at least one).
    pub prompt: Vec<TokenId>,
    /// The most tokens to generate (at least one, at most the model's context).
    pub max_tokens: usize,
    /// Generation stops after any of these tokens is produced (the stop token is still emitted).
    pub stop_tokens: Vec<TokenId>,
    /// How the next token is chosen.
    pub sampling: SamplingParams,
    /// Whether token events carry the chosen token's log-probability.
    pub logprobs: bool,
    /// How many of the most likely tokens (with their log-probabilities) each token event
    /// carries (0: none).
    pub top_logprobs: usize,
}

impl Request {
    /// A greedy request with no stop tokens and no logprobs.
    pub fn greedy(prompt: Vec<TokenId>, max_tokens: usize) -> Self {
        Self {
            prompt,
            max_tokens,
            stop_tokens: Vec::new(),
            sampling: SamplingParams::Greedy,
            logprobs: false,
            top_logprobs: 0,
        }
    }

    /// Adds stop tokens.
    #[must_use]
    pub fn with_stop_tokens(mut self, stop: Vec<TokenId>) -> Self {
        self.stop_tokens = stop;
        self
    }

    /// Sets the sampling parameters.
    #[must_use]
    pub fn with_sampling(mut self, sampling: SamplingParams) -> Self {
        self.sampling = sampling;
        self
    }

    /// Asks for logprobs on every token event.
    #[must_use]
    pub fn with_logprobs(mut self, logprobs: bool) -> Self {
        self.logprobs = logprobs;
        self
    }

    /// Asks for the `k` most likely tokens, with their log-probabilities, on every token event.
    #[must_use]
    pub fn with_top_logprobs(mut self, k: usize) -> Self {
        self.top_logprobs = k;
        self
    }

    /// Checks the request against the model's limits.
    ///
    /// The prompt must leave room for at least one generated token (`prompt.len() < max_context`);
    /// generation itself stops with [`FinishReason::ContextFull`] when the context fills up.
    pub fn validate(&self, limits: &RequestLimits) -> Result<(), RequestError> {
        if self.prompt.is_empty() {
            return Err(RequestError::EmptyPrompt);
        }
        if self.prompt.len() >= limits.max_context {
            return Err(RequestError::PromptTooLong {
                len: self.prompt.len(),
                max_context: limits.max_context,
            });
        }
        if let Some((index, &token)) = self
            .prompt
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= limits.vocab_size)
        {
            return Err(RequestError::TokenOutOfVocabulary {
                index,
                token,
                vocab_size: limits.vocab_size,
            });
        }
        if let Some(&token) = self
            .stop_tokens
            .iter()
            .find(|&&t| t as usize >= limits.vocab_size)
        {
            return Err(RequestError::StopTokenOutOfVocabulary {
                token,
                vocab_size: limits.vocab_size,
            });
        }
        if self.max_tokens == 0 {
            return Err(RequestError::ZeroMaxTokens);
        }
        if self.max_tokens > limits.max_context {
            return Err(RequestError::MaxTokensTooLarge {
                max_tokens: self.max_tokens,
                max_context: limits.max_context,
            });
        }
        self.sampling.validate().map_err(RequestError::Sampling)?;
        Ok(())
    }
}

/// What a request is checked against: the model's vocabulary and context length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Number of token ids the model knows (ids are `0..vocab_size`).
    pub vocab_size: usize,
    /// The most tokens (prompt plus generated) a sequence may hold.
    pub max_context: usize,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The prompt has no tokens.
    #[error("the prompt is empty: give at least one token")]
    EmptyPrompt,
    /// The prompt leaves no room in the context for a generated token.
    #[error(
        "the prompt has {len} tokens but the model's context holds {max_context}; \
         shorten it to at most {} tokens",
        max_context.saturating_sub(1)
    )]
    PromptTooLong {
        /// Prompt length in tokens.
        len: usize,
        /// The model's context length.
        max_context: usize,
    },
    /// A prompt token is not in the vocabulary.
    #[error("prompt token {index} is id {token}, outside the vocabulary (ids 0..{vocab_size})")]
    TokenOutOfVocabulary {
        /// Position in the prompt.
        index: usize,
        /// The offending id.
        token: TokenId,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
    /// A stop token is not in the vocabulary.
    #[error("stop token {token} is outside the vocabulary (ids 0..{vocab_size})")]
    StopTokenOutOfVocabulary {
        /// The offending id.
        token: TokenId,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
    /// `max_tokens` is zero.
    #[error("max_tokens is 0: ask for at least one token")]
    ZeroMaxTokens,
    /// `max_tokens` exceeds the context.
    #[error(
        "max_tokens is {max_tokens}, more than the model's whole context ({max_context} tokens)"
    )]
    MaxTokensTooLarge {
        /// What was asked.
        max_tokens: usize,
        /// The model's context length.
        max_context: usize,
    },
    /// The sampling parameters are invalid.
    #[error("bad sampling parameters: {0}")]
    Sampling(#[from] SamplingError),
    /// The sequence could never fit in one rank's KV cache, even alone.
    #[error(
        "the request needs up to {needed_tokens} tokens of KV cache but the largest rank holds \
         {capacity_tokens}; lower max_tokens or shorten the prompt"
    )]
    ExceedsKvCapacity {
        /// Prompt plus `max_tokens` (capped at the context).
        needed_tokens: usize,
        /// Tokens the largest rank's KV pool can hold.
        capacity_tokens: usize,
    },
    /// The engine has shut down.
    #[error("the engine has shut down and takes no more requests")]
    EngineStopped,
}

/// Why a sequence stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FinishReason {
    /// `max_tokens` tokens were generated.
    Length,
    /// A stop token was generated (it is the last token event).
    Stop(TokenId),
    /// The sequence filled the model's context.
    ContextFull,
    /// The request was cancelled (by `Engine::cancel` or by dropping its handle).
    Cancelled,
    /// The sequence could not continue: its rank ran out of KV blocks with nothing left to preempt.
    KvExhausted,
    /// The engine failed while running this sequence.
    Error(String),
}

impl FinishReason {
    /// A short lowercase name (`length`, `stop`, ...), as the JSON output writes it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Stop(_) => "stop",
            Self::ContextFull => "context_full",
            Self::Cancelled => "cancelled",
            Self::KvExhausted => "kv_exhausted",
            Self::Error(_) => "error",
        }
    }
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    /// Position among the generated tokens (0 for the first).
    pub index: usize,
    /// The token.
    pub token: TokenId,
    /// Its natural log-probability under the model (before temperature and top-p), if asked.
    pub logprob: Option<f32>,
    /// The most likely tokens at this position and their log-probabilities, most likely first
    /// (ties to the lower id); as many as [`Request::top_logprobs`] asked.
    pub top_logprobs: Vec<(TokenId, f32)>,
    /// Time from submission to this token.
    pub at: Duration,
}

/// Per-request timings, reported with the finish event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestTimings {
    /// Time to first token (none if no token was produced).
    pub ttft: Option<Duration>,
    /// Time from submission until the engine first scheduled the request on a rank (its first
    /// prefill chunk): its time in the queue, how long it waited at the door. None if it never ran.
    pub admitted: Option<Duration>,
    /// Time from submission to each token.
    pub token_times: Vec<Duration>,
    /// Time from submission to the finish event.
    pub total: Duration,
    /// How often this sequence was preempted and recomputed.
    pub preemptions: u32,
}

impl RequestTimings {
    /// Mean time per output token after the first (none with fewer than two tokens).
    pub fn tpot(&self) -> Option<Duration> {
        let n = self.token_times.len();
        if n < 2 {
            return None;
        }
        let span = self.token_times[n - 1].saturating_sub(self.token_times[0]);
        Some(span / (n as u32 - 1))
    }
}

/// What a request's stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A token was generated.
    Token(TokenEvent),
    /// The sequence ended; no more events follow.
    Finished {
        /// Why it ended.
        reason: FinishReason,
        /// Its timings.
        timings: RequestTimings,
    },
}

/// A finished request, gathered from its stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The request.
    pub id: RequestId,
    /// Generated tokens in order.
    pub tokens: Vec<TokenId>,
    /// Their logprobs (empty unless asked).
    pub logprobs: Vec<f32>,
    /// Why generation ended.
    pub finish: FinishReason,
    /// Timings.
    pub timings: RequestTimings,
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RequestLimits = RequestLimits {
        vocab_size: 100,
        max_context: 16,
    };

    #[test]
    fn accepts_a_good_request() {
        assert_eq!(Request::greedy(vec![1, 2, 3], 4).validate(&LIMITS), Ok(()));
        assert_eq!(Request::greedy(vec![99; 15], 16).validate(&LIMITS), Ok(()));
    }

    #[test]
    fn refuses_bad_requests_with_typed_errors() {
        assert_eq!(
            Request::greedy(vec![], 4).validate(&LIMITS),
            Err(RequestError::EmptyPrompt)
        );
        assert_eq!(
            Request::greedy(vec![1; 16], 4).validate(&LIMITS),
            Err(RequestError::PromptTooLong {
                len: 16,
                max_context: 16
            })
        );
        assert_eq!(
            Request::greedy(vec![1, 100, 2], 4).validate(&LIMITS),
            Err(RequestError::TokenOutOfVocabulary {
                index: 1,
                token: 100,
                vocab_size: 100
            })
        );
        assert_eq!(
            Request::greedy(vec![1], 4)
                .with_stop_tokens(vec![7, 1000])
                .validate(&LIMITS),
            Err(RequestError::StopTokenOutOfVocabulary {
                token: 1000,
                vocab_size: 100
            })
        );
        assert_eq!(
            Request::greedy(vec![1], 0).validate(&LIMITS),
            Err(RequestError::ZeroMaxTokens)
        );
        assert_eq!(
            Request::greedy(vec![1], 17).validate(&LIMITS),
            Err(RequestError::MaxTokensTooLarge {
                max_tokens: 17,
                max_context: 16
            })
        );
        let bad = Request::greedy(vec![1], 4).with_sampling(SamplingParams::Random {
            temperature: -1.0,
            top_p: 0.9,
            seed: 1,
        });
        assert!(matches!(
            bad.validate(&LIMITS),
            Err(RequestError::Sampling(_))
        ));
    }

    #[test]
    fn error_messages_say_what_to_do() {
        let msg = RequestError::PromptTooLong {
            len: 20,
            max_context: 16,
        }
        .to_string();
        assert!(msg.contains("20") && msg.contains("at most 15"), "{msg}");
    }

    #[test]
    fn tpot_is_the_mean_gap_after_the_first_token() {
        let t = RequestTimings {
            ttft: Some(Duration::from_millis(10)),
            admitted: Some(Duration::from_millis(1)),
            token_times: vec![
                Duration::from_millis(10),
                Duration::from_millis(20),
                Duration::from_millis(40),
            ],
            total: Duration::from_millis(40),
            preemptions: 0,
        };
        assert_eq!(t.tpot(), Some(Duration::from_millis(15)));
        assert_eq!(RequestTimings::default().tpot(), None);
    }
}

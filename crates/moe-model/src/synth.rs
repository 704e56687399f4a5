//! Synthetic models: seeded random weights for a real architecture, written as a Hugging Face model
//! directory (`config.json`, `generation_config.json`, sharded safetensors with an index, and a
//! byte-level `tokenizer.json` + `tokenizer_config.json`).
//!
//! **Weights.** Every tensor of the [schema](crate::schema) gets values from its own ChaCha20 stream
//! (the seed, and a stream number hashed from the tensor's name), and element `i` uses words
//! `2i, 2i+1` of that stream. So a value depends only on (seed, tensor name, index, init scale): it
//! does not depend on the order or chunking of generation, and with `--layers` the shared layers
//! draw the same numbers (only the depth-scaled output projections change scale). Initialisation,
//! chosen so activations stay O(1) through the network and the logits have unit-scale spread:
//! - norms (`*_layernorm`, `model.norm`, `q_norm`, `k_norm`, `q_a_layernorm`, `kv_a_layernorm`): ones;
//! - the embedding: normal(0, 1);
//! - projections into the residual stream (`o_proj`, `down_proj`/`w2`): normal(0, 1/sqrt(fan_in)),
//!   further divided by sqrt(2 · num_layers) so the residual does not grow with depth;
//! - every other linear weight (q/k/v, MLA projections, gate/up, router, LM head):
//!   normal(0, 1/sqrt(fan_in)).
//!
//! Generation streams tensor by tensor in bounded pieces (a few MB), so full-size presets never
//! hold a whole model in memory; pieces are filled on all cores.
//!
//! **Tokenizer.** 256 byte tokens (ids 0–255 are the bytes 0x00–0xFF, in GPT-2's byte-to-unicode
//! spelling, with no merges) plus five special tokens from id 256 on (bos, eos, `<|im_start|>`,
//! `<|im_end|>`, pad). Every text encodes, one token per UTF-8 byte, and decodes back exactly. The
//! generated `config.json` uses their ids for `bos_token_id` and `eos_token_id` (eos and
//! `<|im_end|>`). The bos, eos and pad tokens are spelled as the architecture's real tokenizer
//! spells them ([`special_tokens`]: `<|bos|>`/`<|eos|>` for Qwen3, `<｜begin▁of▁sentence｜>` for
//! DeepSeek-V2, `<s>`/`</s>` for Mixtral), so that the real chat template works unchanged.
//!
//! **Chat templates.** `tokenizer_config.json` carries the architecture's real chat template
//! ([`chat_template`]), byte for byte as the model's Hugging Face repository ships it: Qwen3
//! (with its `enable_thinking` switch), DeepSeek-V2 and Mixtral-8x7B-Instruct. They live in
//! `src/chat_templates/`, where their sources are noted.
//!
//! ```
//! use moe_model::{presets::Preset, synth::{self, SynthOptions}};
//! let dir = tempfile::tempdir().unwrap();
//! let cfg = Preset::TinyMixtral.config();
//! let report = synth::write_model(&cfg, dir.path(), &SynthOptions::new(7), |_| {}).unwrap();
//! assert!(report.tensors > 0 && dir.path().join("tokenizer.json").exists());
//! let ckpt = moe_model::checkpoint::Checkpoint::open(dir.path()).unwrap();
//! ckpt.validate(&moe_model::schema::ModelSchema::new(&cfg)).unwrap();
//! ```

use crate::checkpoint::{CheckpointError, CheckpointWriter, TensorEntry};
use crate::config::{Architecture, DType, ModelConfig};
use crate::schema::{ModelSchema, TensorRole, TensorSpec};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// Number of byte tokens (ids `0..256`).
pub const BYTE_TOKENS: u32 = 256;
/// Special tokens, with ids `256, 257, …` in this order.
pub const SPECIAL_TOKENS: [&str; 5] = [
    "<|bos|>",
    "<|eos|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|pad|>",
];
/// Id of `<|bos|>`.
pub const BOS_ID: u32 = 256;
/// Id of `<|eos|>`.
pub const EOS_ID: u32 = 257;
/// Id of `<|im_start|>`.
pub const IM_START_ID: u32 = 258;
/// Id of `<|im_end|>`.
pub const IM_END_ID: u32 = 259;
/// Id of `<|pad|>`.
pub const PAD_ID: u32 = 260;
/// Vocabulary the tokenizer needs: `vocab_size` must be at least this.
pub const TOKENIZER_VOCAB: usize = BYTE_TOKENS as usize + SPECIAL_TOKENS.len();

/// Qwen3's chat template (`Qwen/Qwen3-30B-A3B`, shared by the Qwen3 family at release): ChatML
/// with `<think>` handling and the `enable_thinking` switch.
pub const QWEN3_CHAT_TEMPLATE: &str = include_str!("chat_templates/qwen3.jinja");
/// DeepSeek-V2's chat template (`deepseek-ai/DeepSeek-V2-Lite-Chat`).
pub const DEEPSEEK_V2_CHAT_TEMPLATE: &str = include_str!("chat_templates/deepseek_v2.jinja");
/// Mixtral's chat template (`mistralai/Mixtral-8x7B-Instruct-v0.1`).
pub const MIXTRAL_CHAT_TEMPLATE: &str = include_str!("chat_templates/mixtral.jinja");
/// The chat template of the default (Qwen3) tokenizer: [`QWEN3_CHAT_TEMPLATE`].
pub const CHAT_TEMPLATE: &str = QWEN3_CHAT_TEMPLATE;

/// The real chat template of `arch`'s instruct models.
pub fn chat_template(arch: Architecture) -> &'static str {
    match arch {
        Architecture::Qwen3Moe => QWEN3_CHAT_TEMPLATE,
        Architecture::DeepseekV2 => DEEPSEEK_V2_CHAT_TEMPLATE,
        Architecture::Mixtral => MIXTRAL_CHAT_TEMPLATE,
    }
}

/// The five special tokens (ids 256–260: bos, eos, `<|im_start|>`, `<|im_end|>`, pad) as `arch`'s
/// tokenizer spells them. [`SPECIAL_TOKENS`] is the Qwen3 spelling.
pub fn special_tokens(arch: Architecture) -> [&'static str; 5] {
    match arch {
        Architecture::Qwen3Moe => SPECIAL_TOKENS,
        Architecture::DeepseekV2 => [
            "<｜begin▁of▁sentence｜>",
            "<｜end▁of▁sentence｜>",
            "<|im_start|>",
            "<|im_end|>",
            "<｜▁pad▁｜>",
        ],
        Architecture::Mixtral => ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"],
    }
}

/// Elements generated per piece (per thread task).
const PIECE_ELEMS: usize = 1 << 20;

/// What went wrong writing a synthetic model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SynthError {
    /// Writing a file failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Writing the safetensors failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The config cannot carry the byte-level tokenizer.
    #[error("vocab_size {vocab_size} is smaller than the {TOKENIZER_VOCAB} tokens of the byte-level tokenizer")]
    VocabTooSmall {
        /// The config's vocabulary.
        vocab_size: usize,
    },
}

/// How to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthOptions {
    /// Random seed.
    pub seed: u64,
    /// Storage dtype of every tensor.
    pub dtype: DType,
    /// Largest shard (bytes of tensor data); a tensor larger than this gets a shard of its own.
    pub max_shard_bytes: u64,
}

impl SynthOptions {
    /// f32 weights, 2 GiB shards.
    pub fn new(seed: u64) -> SynthOptions {
        SynthOptions {
            seed,
            dtype: DType::F32,
            max_shard_bytes: 2 << 30,
        }
    }
}

/// What [`write_model`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthReport {
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Every file written.
    pub files: Vec<PathBuf>,
}

/// Progress of [`write_model`], reported after each tensor.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// The tensor just written.
    pub tensor: &'a TensorSpec,
    /// Tensors written so far.
    pub tensors_done: usize,
    /// Tensors in total.
    pub tensors_total: usize,
    /// Bytes written so far.
    pub bytes_done: u64,
    /// Bytes in total.
    pub bytes_total: u64,
}

/// How a tensor is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// All ones (norm weights).
    Ones,
    /// Normal with mean 0 and this standard deviation.
    Normal {
        /// Standard deviation.
        std: f32,
    },
}

/// The initialisation of `spec` in a model with config `cfg` (see the module docs).
pub fn init_for(cfg: &ModelConfig, spec: &TensorSpec) -> Init {
    if spec.role.is_norm() {
        return Init::Ones;
    }
    let base = 1.0 / (spec.fan_in() as f64).sqrt();
    let std = match spec.role {
        TensorRole::Embedding => 1.0,
        TensorRole::OProj | TensorRole::Down => base / (2.0 * cfg.num_layers as f64).sqrt(),
        _ => base,
    };
    Init::Normal { std: std as f32 }
}

/// FNV-1a, 64-bit: a stable per-name stream number.
fn stream_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Fills `out` with elements `start..start + out.len()` of tensor `spec`'s synthetic values.
/// The result depends only on (`seed`, `spec.name`, element index, `init`).
pub fn fill(seed: u64, spec: &TensorSpec, init: Init, start: usize, out: &mut [f32]) {
    let std = match init {
        Init::Ones => {
            out.fill(1.0);
            return;
        }
        Init::Normal { std } => f64::from(std),
    };
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    rng.set_stream(stream_of(&spec.name));
    rng.set_word_pos(2 * start as u128);
    for o in out.iter_mut() {
        let w = rng.next_u64();
        // Box–Muller from two 32-bit uniforms: u1 in (0, 1], u2 in [0, 1).
        let u1 = ((w >> 32) as f64 + 1.0) / 4_294_967_296.0;
        let u2 = (w & 0xffff_ffff) as f64 / 4_294_967_296.0;
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        *o = (z * std) as f32;
    }
}

/// Fills `out` (elements `start..`) on up to `threads` threads; identical to [`fill`].
fn fill_parallel(
    seed: u64,
    spec: &TensorSpec,
    init: Init,
    start: usize,
    out: &mut [f32],
    threads: usize,
) {
    let per = out.len().div_ceil(threads.max(1)).max(1 << 14);
    std::thread::scope(|s| {
        for (i, part) in out.chunks_mut(per).enumerate() {
            s.spawn(move || fill(seed, spec, init, start + i * per, part));
        }
    });
}

/// The values of a whole tensor (for tests and small tensors; [`write_model`] streams instead).
pub fn tensor_values(cfg: &ModelConfig, seed: u64, spec: &TensorSpec) -> Vec<f32> {
    let mut v = vec![0f32; spec.numel()];
    fill(seed, spec, init_for(cfg, spec), 0, &mut v);
    v
}

/// `cfg` with `bos_token_id`/`eos_token_id` set to the byte-level tokenizer's ids and `torch_dtype`
/// set to `dtype`: what [`write_model`] writes as `config.json`.
pub fn model_dir_config(cfg: &ModelConfig, dtype: DType) -> ModelConfig {
    let mut c = cfg.clone();
    c.bos_token_id = Some(BOS_ID);
    c.eos_token_ids = vec![EOS_ID, IM_END_ID];
    c.torch_dtype = Some(dtype);
    c
}

/// Writes a complete model directory for `cfg` into `dir` (created if needed). `progress` is
/// called after every tensor.
pub fn write_model(
    cfg: &ModelConfig,
    dir: &Path,
    opts: &SynthOptions,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<SynthReport, SynthError> {
    if cfg.vocab_size < TOKENIZER_VOCAB {
        return Err(SynthError::VocabTooSmall {
            vocab_size: cfg.vocab_size,
        });
    }
    std::fs::create_dir_all(dir).map_err(|source| SynthError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let out_cfg = model_dir_config(cfg, opts.dtype);
    let mut files = Vec::new();
    let mut put = |name: &str, v: &Value| -> Result<(), SynthError> {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(v).unwrap_or_default();
        std::fs::write(&path, text + "\n").map_err(|source| SynthError::Io {
            path: path.clone(),
            source,
        })?;
        files.push(path);
        Ok(())
    };
    put("config.json", &out_cfg.to_hf_json())?;
    put("generation_config.json", &generation_config_json())?;
    put("tokenizer.json", &byte_tokenizer_json_for(cfg.architecture))?;
    put(
        "tokenizer_config.json",
        &tokenizer_config_json_for(cfg.architecture, cfg.max_position_embeddings),
    )?;

    let schema = ModelSchema::new(cfg);
    let entries: Vec<TensorEntry> = schema
        .tensors()
        .iter()
        .map(|t| TensorEntry::new(t.name.clone(), t.shape.clone(), opts.dtype))
        .collect();
    let bytes_total: u64 = entries.iter().map(TensorEntry::bytes).sum();
    let mut writer = CheckpointWriter::create(dir, entries, opts.max_shard_bytes)?;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(16);
    let mut buf = vec![
        0f32;
        PIECE_ELEMS
            .min(
                schema
                    .tensors()
                    .iter()
                    .map(TensorSpec::numel)
                    .max()
                    .unwrap_or(0)
            )
            .max(1)
    ];
    let mut bytes_done = 0u64;
    let total = schema.tensors().len();
    for (i, spec) in schema.tensors().iter().enumerate() {
        let init = init_for(cfg, spec);
        let n = spec.numel();
        let mut start = 0;
        while start < n {
            let len = buf.len().min(n - start);
            fill_parallel(opts.seed, spec, init, start, &mut buf[..len], threads);
            writer.write_f32(&spec.name, &buf[..len])?;
            start += len;
        }
        bytes_done += spec.bytes(opts.dtype) as u64;
        progress(Progress {
            tensor: spec,
            tensors_done: i + 1,
            tensors_total: total,
            bytes_done,
            bytes_total,
        });
    }
    files.extend(writer.finish()?);
    Ok(SynthReport {
        tensors: total,
        bytes: bytes_total,
        files,
    })
}

/// GPT-2's byte-to-unicode map: the printable character that spells byte `b` in a byte-level BPE
/// vocabulary.
pub fn byte_char(b: u8) -> char {
    let printable = |b: u8| {
        (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    if printable(b) {
        char::from(b)
    } else {
        // Non-printable bytes take 256, 257, … in byte order.
        let n = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + n).unwrap_or('\u{FFFD}')
    }
}

/// The byte-level `tokenizer.json` (format of the `tokenizers` library), Qwen3 spelling.
pub fn byte_tokenizer_json() -> Value {
    byte_tokenizer_json_for(Architecture::Qwen3Moe)
}

/// The byte-level `tokenizer.json` with `arch`'s [`special_tokens`].
pub fn byte_tokenizer_json_for(arch: Architecture) -> Value {
    let mut vocab = Map::new();
    for b in 0..=255u8 {
        vocab.insert(byte_char(b).to_string(), u32::from(b).into());
    }
    let added: Vec<Value> = special_tokens(arch)
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({
                "id": BYTE_TOKENS + i as u32, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            })
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false },
        "post_processor": { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false },
        "decoder": { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false },
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []
        }
    })
}

/// `tokenizer_config.json` for the byte-level tokenizer, with [`CHAT_TEMPLATE`] (Qwen3).
pub fn tokenizer_config_json(model_max_length: usize) -> Value {
    tokenizer_config_json_for(Architecture::Qwen3Moe, model_max_length)
}

/// `tokenizer_config.json` for the byte-level tokenizer with `arch`'s [`special_tokens`] and
/// real [`chat_template`].
pub fn tokenizer_config_json_for(arch: Architecture, model_max_length: usize) -> Value {
    let specials = special_tokens(arch);
    let mut decoder = Map::new();
    for (i, t) in specials.iter().enumerate() {
        decoder.insert(
            (BYTE_TOKENS + i as u32).to_string(),
            json!({ "content": t, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true }),
        );
    }
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": specials[0],
        // Qwen3's instruct turns end with <|im_end|>; the others with their eos token.
        "eos_token": if arch == Architecture::Qwen3Moe { specials[3] } else { specials[1] },
        "pad_token": specials[4],
        "unk_token": null,
        "add_bos_token": false,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": model_max_length,
        "chat_template": chat_template(arch),
        "added_tokens_decoder": decoder
    })
}

/// `generation_config.json`: greedy by default, with the tokenizer's special ids.
pub fn generation_config_json() -> Value {
    json!({
        "bos_token_id": BOS_ID,
        "eos_token_id": [EOS_ID, IM_END_ID],
        "pad_token_id": PAD_ID,
        "do_sample": false
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{TensorOwner, TensorRole};

    fn spec(name: &str, n: usize) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            shape: vec![n],
            owner: TensorOwner::Global,
            role: TensorRole::LmHead,
        }
    }

    #[test]
    fn fill_is_seekable_and_chunk_independent() {
        let s = spec("a.weight", 1000);
        let init = Init::Normal { std: 0.5 };
        let mut whole = vec![0f32; 1000];
        fill(3, &s, init, 0, &mut whole);
        let mut pieces = vec![0f32; 1000];
        for (i, p) in pieces.chunks_mut(77).enumerate() {
            fill(3, &s, init, i * 77, p);
        }
        assert_eq!(whole, pieces);
        let mut par = vec![0f32; 1000];
        fill_parallel(3, &s, init, 0, &mut par, 4);
        assert_eq!(whole, par);
        let mut other_seed = vec![0f32; 1000];
        fill(4, &s, init, 0, &mut other_seed);
        assert_ne!(whole, other_seed);
        let mut other_name = vec![0f32; 1000];
        fill(3, &spec("b.weight", 1000), init, 0, &mut other_name);
        assert_ne!(whole, other_name);
    }

    #[test]
    fn fill_has_the_requested_moments() {
        let s = spec("m.weight", 200_000);
        let mut v = vec![0f32; 200_000];
        fill(11, &s, Init::Normal { std: 0.25 }, 0, &mut v);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.005, "mean {mean}");
        assert!((var.sqrt() - 0.25).abs() < 0.005, "std {}", var.sqrt());
        assert!(v.iter().all(|x| x.is_finite()));
        let mut ones = vec![0f32; 5];
        fill(11, &s, Init::Ones, 0, &mut ones);
        assert_eq!(ones, vec![1.0; 5]);
    }

    #[test]
    fn byte_chars_are_distinct_and_printable() {
        let chars: std::collections::HashSet<char> = (0..=255u8).map(byte_char).collect();
        assert_eq!(chars.len(), 256);
        assert_eq!(byte_char(b'a'), 'a');
        assert_eq!(byte_char(b' '), '\u{120}'); // GPT-2's "Ġ"
        assert_eq!(byte_char(b'\n'), '\u{10A}'); // GPT-2's "Ċ"
        assert!(chars.iter().all(|c| !c.is_whitespace() && !c.is_control()));
    }
}

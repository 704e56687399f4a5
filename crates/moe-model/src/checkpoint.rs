//! Safetensors checkpoints: reading single tensors without loading whole files, and writing
//! sharded checkpoints tensor by tensor.
//!
//! **Reading.** [`Checkpoint::open`] takes a model directory. If it has
//! `model.safetensors.index.json`, the index's `weight_map` says which shard holds each tensor;
//! otherwise the directory must have a single `model.safetensors`. Opening reads only each shard's
//! JSON header (positioned reads, no mmap, no whole-file reads). A tensor is then read on demand with
//! positioned reads straight into the caller's buffer ([`Checkpoint::read_f32_into`] converts bf16,
//! f16 or f32 storage to f32; [`Checkpoint::read_into`] converts to a chosen storage dtype, e.g. for a
//! device chunk). A device therefore reads only the tensors it needs. `Checkpoint` is `Sync`: several
//! threads may read different tensors at once.
//!
//! **Writing.** [`CheckpointWriter`] is given the full list of tensors (name, shape, dtype) up front,
//! splits them into shards of at most `max_shard_bytes` (a tensor larger than that gets a shard of
//! its own), writes each shard's header as soon as the shard starts, then streams tensor data in
//! order, in as many pieces as the caller likes. With one shard it writes `model.safetensors`; with
//! several, `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`, as Hugging Face
//! does. Memory use is bounded by the caller's pieces, never by the model size.
//!
//! Errors name the tensor and the file: a missing tensor, a truncated file, a shape that does not
//! match the schema, an unsupported dtype, a bad index or header.
//!
//! ```
//! use moe_model::checkpoint::{Checkpoint, CheckpointWriter, TensorEntry};
//! use moe_model::config::DType;
//! let dir = tempfile::tempdir().unwrap();
//! let entries = vec![TensorEntry::new("w", vec![2, 3], DType::BF16)];
//! let mut w = CheckpointWriter::create(dir.path(), entries, u64::MAX).unwrap();
//! w.write_f32("w", &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
//! w.finish().unwrap();
//! let ckpt = Checkpoint::open(dir.path()).unwrap();
//! let mut out = [0f32; 6];
//! ckpt.read_f32_into("w", &mut out).unwrap();
//! assert_eq!(out, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
//! ```

use crate::config::DType;
use crate::schema::{ModelSchema, TensorSpec};
use half::{bf16, f16};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The shard index name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Largest header this reader accepts (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Elements converted per positioned read.
const READ_CHUNK_ELEMS: usize = 1 << 18;

/// What went wrong reading or writing a checkpoint. Variants about a tensor name the tensor and the
/// file it lives in.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// An OS error on a file.
    #[error("I/O error on {file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The directory has neither `model.safetensors` nor `model.safetensors.index.json`.
    #[error("no checkpoint in {dir}: expected {SINGLE_FILE} or {INDEX_FILE}")]
    NoCheckpoint {
        /// The directory.
        dir: PathBuf,
    },
    /// The shard index is not valid.
    #[error("bad shard index {file}: {reason}")]
    BadIndex {
        /// The index file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A safetensors header is not valid.
    #[error("bad safetensors header in {file}: {reason}")]
    BadHeader {
        /// The shard.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The tensor is not in the checkpoint (or not in the shard the index names).
    #[error("tensor `{tensor}` is missing from {file}")]
    Missing {
        /// The tensor.
        tensor: String,
        /// The index or shard that should have it.
        file: PathBuf,
    },
    /// The shard ends before the tensor's data does.
    #[error("tensor `{tensor}` in {file} is truncated: its data ends at byte {needed} but the file has {actual}")]
    Truncated {
        /// The tensor.
        tensor: String,
        /// The shard.
        file: PathBuf,
        /// Bytes the file must have.
        needed: u64,
        /// Bytes it has.
        actual: u64,
    },
    /// The stored shape is not the expected one.
    #[error("tensor `{tensor}` in {file} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor.
        tensor: String,
        /// The shard.
        file: PathBuf,
        /// What the schema says.
        expected: Vec<usize>,
        /// What the file says.
        found: Vec<usize>,
    },
    /// The stored dtype is not bf16, f16 or f32.
    #[error("tensor `{tensor}` in {file} has dtype {found}; supported: BF16, F16, F32")]
    WrongDtype {
        /// The tensor.
        tensor: String,
        /// The shard.
        file: PathBuf,
        /// The dtype the header names.
        found: String,
    },
    /// The caller's buffer has the wrong length.
    #[error(
        "buffer for tensor `{tensor}` in {file} holds {got} elements, the tensor has {expected}"
    )]
    BufferSize {
        /// The tensor.
        tensor: String,
        /// The shard.
        file: PathBuf,
        /// Elements (or bytes for raw reads) the tensor has.
        expected: usize,
        /// What the buffer holds.
        got: usize,
    },
    /// The writer was used out of order or with the wrong amount of data.
    #[error("checkpoint writer misuse on tensor `{tensor}` ({file}): {reason}")]
    WriteOrder {
        /// The tensor.
        tensor: String,
        /// The shard being written.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl CheckpointError {
    /// The tensor this error is about, if any.
    pub fn tensor(&self) -> Option<&str> {
        match self {
            CheckpointError::Missing { tensor, .. }
            | CheckpointError::Truncated { tensor, .. }
            | CheckpointError::ShapeMismatch { tensor, .. }
            | CheckpointError::WrongDtype { tensor, .. }
            | CheckpointError::BufferSize { tensor, .. }
            | CheckpointError::WriteOrder { tensor, .. } => Some(tensor),
            _ => None,
        }
    }

    /// The file this error is about, if any.
    pub fn file(&self) -> Option<&Path> {
        match self {
            CheckpointError::Io { file, .. }
            | CheckpointError::BadIndex { file, .. }
            | CheckpointError::BadHeader { file, .. }
            | CheckpointError::Missing { file, .. }
            | CheckpointError::Truncated { file, .. }
            | CheckpointError::ShapeMismatch { file, .. }
            | CheckpointError::WrongDtype { file, .. }
            | CheckpointError::BufferSize { file, .. }
            | CheckpointError::WriteOrder { file, .. } => Some(file),
            CheckpointError::NoCheckpoint { dir } => Some(dir),
        }
    }
}

fn io_err(file: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        file: file.to_path_buf(),
        source,
    }
}

/// The safetensors name of a dtype.
pub fn safetensors_dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
    }
}

fn dtype_from_safetensors(s: &str) -> Option<DType> {
    match s {
        "F32" => Some(DType::F32),
        "F16" => Some(DType::F16),
        "BF16" => Some(DType::BF16),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Reading.

/// Where one tensor lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Storage dtype, or the header's dtype string if it is not one we read.
    pub dtype: Result<DType, String>,
    /// Shape.
    pub shape: Vec<usize>,
    /// Index into the checkpoint's shard list.
    shard: usize,
    /// Absolute byte offset of the data in the shard file.
    offset: u64,
    /// Data length in bytes.
    len: u64,
}

impl TensorInfo {
    /// Elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Stored bytes.
    pub fn stored_bytes(&self) -> u64 {
        self.len
    }
}

#[derive(Debug)]
struct Shard {
    path: PathBuf,
    file: File,
    file_len: u64,
}

/// An opened checkpoint: shard headers parsed, data read on demand.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: HashMap<String, TensorInfo>,
    /// The file that should hold a tensor that is listed nowhere (the index, or the single file).
    listing: PathBuf,
}

/// Parses the header of the safetensors file `path`.
fn read_header(
    path: &Path,
    file: &File,
    file_len: u64,
) -> Result<(u64, Map<String, Value>), CheckpointError> {
    let bad = |reason: String| CheckpointError::BadHeader {
        file: path.to_path_buf(),
        reason,
    };
    if file_len < 8 {
        return Err(bad(format!(
            "file is {file_len} bytes, shorter than the 8-byte header length"
        )));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact_at(&mut len_bytes, 0)
        .map_err(io_err(path))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit"
        )));
    }
    if 8 + header_len > file_len {
        return Err(bad(format!(
            "header length {header_len} runs past the end of the {file_len}-byte file"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8).map_err(io_err(path))?;
    let v: Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    match v {
        Value::Object(m) => Ok((8 + header_len, m)),
        other => Err(bad(format!("header is not a JSON object but {}", other))),
    }
}

fn parse_entry(
    path: &Path,
    name: &str,
    v: &Value,
    data_start: u64,
    shard: usize,
) -> Result<TensorInfo, CheckpointError> {
    let bad = |reason: String| CheckpointError::BadHeader {
        file: path.to_path_buf(),
        reason: format!("tensor `{name}`: {reason}"),
    };
    let obj = v
        .as_object()
        .ok_or_else(|| bad("entry is not an object".into()))?;
    let dtype_s = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no `dtype` string".into()))?;
    let shape: Vec<usize> = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no `shape` list".into()))?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("`shape` is not a list of non-negative integers".into()))?;
    let offs = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 2)
        .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
        .ok_or_else(|| bad("`data_offsets` is not [begin, end]".into()))?;
    if offs.1 < offs.0 {
        return Err(bad(format!("data_offsets {offs:?} end before they begin")));
    }
    let dtype = dtype_from_safetensors(dtype_s).ok_or_else(|| dtype_s.to_string());
    if let Ok(d) = dtype {
        let numel = shape
            .iter()
            .try_fold(1u64, |acc, &x| acc.checked_mul(x as u64));
        let need = numel.and_then(|n| n.checked_mul(d.size_bytes() as u64));
        if need != Some(offs.1 - offs.0) {
            return Err(bad(format!(
                "shape {shape:?} of {dtype_s} needs {need:?} bytes but data_offsets {offs:?} span {}",
                offs.1 - offs.0
            )));
        }
    }
    Ok(TensorInfo {
        dtype,
        shape,
        shard,
        offset: data_start + offs.0,
        len: offs.1 - offs.0,
    })
}

impl Checkpoint {
    /// Opens the checkpoint in `dir` (sharded with an index, or a single `model.safetensors`),
    /// reading only headers.
    pub fn open(dir: impl AsRef<Path>) -> Result<Checkpoint, CheckpointError> {
        let dir = dir.as_ref().to_path_buf();
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let mut ckpt = Checkpoint {
            dir: dir.clone(),
            shards: Vec::new(),
            tensors: HashMap::new(),
            listing: index_path.clone(),
        };
        if index_path.exists() {
            let weight_map = read_index(&index_path)?;
            // Shard file name → names the index assigns to it, in a fixed order.
            let mut by_file: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for (name, file) in &weight_map {
                by_file
                    .entry(file.as_str())
                    .or_default()
                    .push(name.as_str());
            }
            for (file_name, names) in by_file {
                if file_name.contains('/') || file_name.contains("..") {
                    return Err(CheckpointError::BadIndex {
                        file: index_path.clone(),
                        reason: format!("shard name {file_name:?} must be a plain file name in the same directory"),
                    });
                }
                let path = dir.join(file_name);
                if !path.is_file() {
                    return Err(CheckpointError::BadIndex {
                        file: index_path.clone(),
                        reason: format!(
                            "it maps tensor `{}` to {}, which does not exist",
                            names[0],
                            path.display()
                        ),
                    });
                }
                let (shard, data_start, header) = ckpt.add_shard(&path)?;
                for name in names {
                    let entry = header.get(name).ok_or_else(|| CheckpointError::Missing {
                        tensor: name.to_string(),
                        file: path.clone(),
                    })?;
                    let info = parse_entry(&path, name, entry, data_start, shard)?;
                    ckpt.tensors.insert(name.to_string(), info);
                }
            }
        } else if single_path.exists() {
            ckpt.listing = single_path.clone();
            let (shard, data_start, header) = ckpt.add_shard(&single_path)?;
            for (name, entry) in &header {
                if name == "__metadata__" {
                    continue;
                }
                let info = parse_entry(&single_path, name, entry, data_start, shard)?;
                ckpt.tensors.insert(name.clone(), info);
            }
        } else {
            return Err(CheckpointError::NoCheckpoint { dir });
        }
        Ok(ckpt)
    }

    /// Opens shard `path`; returns its index, where its data starts, and its header.
    fn add_shard(
        &mut self,
        path: &Path,
    ) -> Result<(usize, u64, Map<String, Value>), CheckpointError> {
        let file = File::open(path).map_err(io_err(path))?;
        let file_len = file.metadata().map_err(io_err(path))?.len();
        let (data_start, header) = read_header(path, &file, file_len)?;
        self.shards.push(Shard {
            path: path.to_path_buf(),
            file,
            file_len,
        });
        Ok((self.shards.len() - 1, data_start, header))
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of shard files.
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Whether the checkpoint has `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Where `name` lives.
    pub fn info(&self, name: &str) -> Result<&TensorInfo, CheckpointError> {
        self.tensors
            .get(name)
            .ok_or_else(|| CheckpointError::Missing {
                tensor: name.to_string(),
                file: self.listing.clone(),
            })
    }

    /// The shard file holding `name`.
    pub fn file_of(&self, name: &str) -> Result<&Path, CheckpointError> {
        Ok(&self.shards[self.info(name)?.shard].path)
    }

    /// Checks `name` against `spec`'s shape (a schema entry), naming tensor and file on mismatch.
    pub fn check_spec(&self, spec: &TensorSpec) -> Result<&TensorInfo, CheckpointError> {
        let info = self.info(&spec.name)?;
        let file = &self.shards[info.shard].path;
        if info.shape != spec.shape {
            return Err(CheckpointError::ShapeMismatch {
                tensor: spec.name.clone(),
                file: file.clone(),
                expected: spec.shape.clone(),
                found: info.shape.clone(),
            });
        }
        self.usable(&spec.name, info)?;
        Ok(info)
    }

    /// Checks every tensor of `schema`: present, right shape, readable dtype, not truncated.
    /// Reports the first problem in schema order.
    pub fn validate(&self, schema: &ModelSchema) -> Result<(), CheckpointError> {
        schema
            .tensors()
            .iter()
            .try_for_each(|t| self.check_spec(t).map(|_| ()))
    }

    /// Dtype known and data inside the file.
    fn usable(&self, name: &str, info: &TensorInfo) -> Result<DType, CheckpointError> {
        let shard = &self.shards[info.shard];
        let dtype = info
            .dtype
            .clone()
            .map_err(|found| CheckpointError::WrongDtype {
                tensor: name.to_string(),
                file: shard.path.clone(),
                found,
            })?;
        let needed = info.offset + info.len;
        if needed > shard.file_len {
            return Err(CheckpointError::Truncated {
                tensor: name.to_string(),
                file: shard.path.clone(),
                needed,
                actual: shard.file_len,
            });
        }
        Ok(dtype)
    }

    /// Reads tensor `name` into `out` as f32 (row-major, `out.len()` must equal its element count).
    /// Only this tensor's bytes are read.
    pub fn read_f32_into(&self, name: &str, out: &mut [f32]) -> Result<(), CheckpointError> {
        let info = self.info(name)?;
        let dtype = self.usable(name, info)?;
        let shard = &self.shards[info.shard];
        if out.len() != info.numel() {
            return Err(CheckpointError::BufferSize {
                tensor: name.into(),
                file: shard.path.clone(),
                expected: info.numel(),
                got: out.len(),
            });
        }
        let es = dtype.size_bytes();
        let mut buf = vec![0u8; READ_CHUNK_ELEMS.min(out.len()) * es];
        for (i, chunk) in out.chunks_mut(READ_CHUNK_ELEMS).enumerate() {
            let bytes = &mut buf[..chunk.len() * es];
            let at = info.offset + (i * READ_CHUNK_ELEMS * es) as u64;
            shard
                .file
                .read_exact_at(bytes, at)
                .map_err(|source| truncation_or_io(name, shard, info, source))?;
            decode_into(dtype, bytes, chunk);
        }
        Ok(())
    }

    /// Reads `spec` (a schema entry) into `out` as f32 after checking its shape.
    pub fn read_spec_f32_into(
        &self,
        spec: &TensorSpec,
        out: &mut [f32],
    ) -> Result<(), CheckpointError> {
        self.check_spec(spec)?;
        self.read_f32_into(&spec.name, out)
    }

    /// Reads tensor `name` into `out` stored as `dtype` (`out.len()` must be its element count times
    /// `dtype.size_bytes()`), converting from the stored dtype (bf16/f16 from f32 round to nearest).
    /// Use it to fill a device chunk's host view in the device's storage dtype.
    pub fn read_into(
        &self,
        name: &str,
        dtype: DType,
        out: &mut [u8],
    ) -> Result<(), CheckpointError> {
        let info = self.info(name)?;
        let stored = self.usable(name, info)?;
        let shard = &self.shards[info.shard];
        let expected = info.numel() * dtype.size_bytes();
        if out.len() != expected {
            return Err(CheckpointError::BufferSize {
                tensor: name.into(),
                file: shard.path.clone(),
                expected,
                got: out.len(),
            });
        }
        if stored == dtype {
            return shard
                .file
                .read_exact_at(out, info.offset)
                .map_err(|source| truncation_or_io(name, shard, info, source));
        }
        let (ses, des) = (stored.size_bytes(), dtype.size_bytes());
        let mut raw = vec![0u8; READ_CHUNK_ELEMS.min(info.numel()) * ses];
        let mut f = vec![0f32; READ_CHUNK_ELEMS.min(info.numel())];
        for (i, dst) in out.chunks_mut(READ_CHUNK_ELEMS * des).enumerate() {
            let n = dst.len() / des;
            let bytes = &mut raw[..n * ses];
            let at = info.offset + (i * READ_CHUNK_ELEMS * ses) as u64;
            shard
                .file
                .read_exact_at(bytes, at)
                .map_err(|source| truncation_or_io(name, shard, info, source))?;
            decode_into(stored, bytes, &mut f[..n]);
            encode_into(dtype, &f[..n], dst);
        }
        Ok(())
    }

    /// Reads tensor `name` as a new f32 vector (convenience for small tensors and tests).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>, CheckpointError> {
        let mut v = vec![0f32; self.info(name)?.numel()];
        self.read_f32_into(name, &mut v)?;
        Ok(v)
    }
}

fn truncation_or_io(
    name: &str,
    shard: &Shard,
    info: &TensorInfo,
    source: std::io::Error,
) -> CheckpointError {
    if source.kind() == std::io::ErrorKind::UnexpectedEof {
        // The file shrank after it was opened.
        let actual = shard.file.metadata().map(|m| m.len()).unwrap_or(0);
        CheckpointError::Truncated {
            tensor: name.into(),
            file: shard.path.clone(),
            needed: info.offset + info.len,
            actual,
        }
    } else {
        CheckpointError::Io {
            file: shard.path.clone(),
            source,
        }
    }
}

fn read_index(path: &Path) -> Result<BTreeMap<String, String>, CheckpointError> {
    let bad = |reason: String| CheckpointError::BadIndex {
        file: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    if map.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    map.iter()
        .map(|(k, f)| {
            f.as_str()
                .map(|f| (k.clone(), f.to_string()))
                .ok_or_else(|| bad(format!("`weight_map` maps `{k}` to {f}, not a file name")))
        })
        .collect()
}

/// Converts stored little-endian `bytes` of `dtype` into `out`.
fn decode_into(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        DType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
    }
}

/// Encodes `vals` as little-endian `dtype` into `out` (round to nearest even).
pub fn encode_into(dtype: DType, vals: &[f32], out: &mut [u8]) {
    match dtype {
        DType::F32 => {
            for (v, o) in vals.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::F16 => {
            for (v, o) in vals.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        DType::BF16 => {
            for (v, o) in vals.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
    }
}

/// Rounds `v` through `dtype` storage and back (what a write then read gives).
pub fn round_through(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::F32 => v,
        DType::F16 => f16::from_f32(v).to_f32(),
        DType::BF16 => bf16::from_f32(v).to_f32(),
    }
}

// ---------------------------------------------------------------------------------------------
// Writing.

/// One tensor to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    /// Name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Storage dtype.
    pub dtype: DType,
}

impl TensorEntry {
    /// A new entry.
    pub fn new(name: impl Into<String>, shape: Vec<usize>, dtype: DType) -> TensorEntry {
        TensorEntry {
            name: name.into(),
            shape,
            dtype,
        }
    }

    /// Stored bytes.
    pub fn bytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size_bytes() as u64
    }
}

#[derive(Debug)]
struct ShardPlan {
    file_name: String,
    tensors: std::ops::Range<usize>,
}

#[derive(Debug)]
struct OpenShard {
    path: PathBuf,
    out: BufWriter<File>,
}

/// Writes a (possibly sharded) safetensors checkpoint tensor by tensor. See the module docs.
#[derive(Debug)]
pub struct CheckpointWriter {
    dir: PathBuf,
    entries: Vec<TensorEntry>,
    shards: Vec<ShardPlan>,
    /// Index of the tensor being written (or next to write).
    cur: usize,
    /// Bytes of `entries[cur]` written so far.
    cur_written: u64,
    open: Option<(usize, OpenShard)>,
    /// Which shards have been created.
    created: Vec<bool>,
    scratch: Vec<u8>,
}

impl CheckpointWriter {
    /// Plans the shards of `entries` (written in this order) with at most `max_shard_bytes` of data
    /// per shard, and creates `dir` if needed. Names must be unique and non-empty.
    pub fn create(
        dir: impl AsRef<Path>,
        entries: Vec<TensorEntry>,
        max_shard_bytes: u64,
    ) -> Result<CheckpointWriter, CheckpointError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut seen = std::collections::HashSet::new();
        for e in &entries {
            if e.name.is_empty() || e.name == "__metadata__" || !seen.insert(e.name.as_str()) {
                return Err(CheckpointError::WriteOrder {
                    tensor: e.name.clone(),
                    file: dir.clone(),
                    reason: "tensor names must be unique, non-empty and not `__metadata__`".into(),
                });
            }
        }
        if entries.is_empty() {
            return Err(CheckpointError::WriteOrder {
                tensor: String::new(),
                file: dir,
                reason: "no tensors to write".into(),
            });
        }
        // Greedy split in order.
        let mut ranges = Vec::new();
        let (mut start, mut bytes) = (0usize, 0u64);
        for (i, e) in entries.iter().enumerate() {
            if i > start && bytes + e.bytes() > max_shard_bytes {
                ranges.push(start..i);
                start = i;
                bytes = 0;
            }
            bytes += e.bytes();
        }
        ranges.push(start..entries.len());
        let n = ranges.len();
        let shards = ranges
            .into_iter()
            .enumerate()
            .map(|(i, tensors)| ShardPlan {
                file_name: if n == 1 {
                    SINGLE_FILE.to_string()
                } else {
                    format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
                },
                tensors,
            })
            .collect();
        let created = vec![false; n];
        Ok(CheckpointWriter {
            dir,
            entries,
            shards,
            cur: 0,
            cur_written: 0,
            open: None,
            created,
            scratch: Vec::new(),
        })
    }

    /// Number of shard files this writer produces.
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    /// The tensors, in write order.
    pub fn entries(&self) -> &[TensorEntry] {
        &self.entries
    }

    fn shard_of(&self, t: usize) -> usize {
        self.shards
            .iter()
            .position(|s| s.tensors.contains(&t))
            .unwrap_or(self.shards.len() - 1)
    }

    /// Opens shard `s` and writes its header.
    fn open_shard(&mut self, s: usize) -> Result<(), CheckpointError> {
        let plan = &self.shards[s];
        let path = self.dir.join(&plan.file_name);
        let mut header = Map::new();
        header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
        let mut off = 0u64;
        for e in &self.entries[plan.tensors.clone()] {
            header.insert(
                e.name.clone(),
                serde_json::json!({
                    "dtype": safetensors_dtype_name(e.dtype),
                    "shape": e.shape,
                    "data_offsets": [off, off + e.bytes()],
                }),
            );
            off += e.bytes();
        }
        let mut text = serde_json::to_vec(&Value::Object(header)).map_err(|e| {
            CheckpointError::WriteOrder {
                tensor: String::new(),
                file: path.clone(),
                reason: format!("header serialisation failed: {e}"),
            }
        })?;
        // Pad with spaces so data starts 8-byte aligned, as the reference implementation does.
        while !text.len().is_multiple_of(8) {
            text.push(b' ');
        }
        let file = File::create(&path).map_err(io_err(&path))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(text.len() as u64).to_le_bytes())
            .map_err(io_err(&path))?;
        out.write_all(&text).map_err(io_err(&path))?;
        self.open = Some((s, OpenShard { path, out }));
        self.created[s] = true;
        Ok(())
    }

    fn close_open_shard(&mut self) -> Result<(), CheckpointError> {
        if let Some((_, mut sh)) = self.open.take() {
            sh.out.flush().map_err(io_err(&sh.path))?;
            let file = sh.out.into_inner().map_err(|e| CheckpointError::Io {
                file: sh.path.clone(),
                source: e.into_error(),
            })?;
            file.sync_all().map_err(io_err(&sh.path))?;
        }
        Ok(())
    }

    fn misuse(&self, tensor: &str, reason: String) -> CheckpointError {
        let file = self
            .open
            .as_ref()
            .map_or_else(|| self.dir.clone(), |(_, s)| s.path.clone());
        CheckpointError::WriteOrder {
            tensor: tensor.to_string(),
            file,
            reason,
        }
    }

    /// Appends `data` (f32 values, converted to the tensor's dtype) to tensor `name`. `name` must be
    /// the tensor currently being written or, once that is complete, the next one in order. A tensor
    /// may be written in any number of pieces.
    pub fn write_f32(&mut self, name: &str, data: &[f32]) -> Result<(), CheckpointError> {
        let dtype = self.begin(name, data.len())?;
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(data.len() * dtype.size_bytes(), 0);
        encode_into(dtype, data, &mut scratch);
        let r = self.append(&scratch);
        self.scratch = scratch;
        r
    }

    /// Appends raw little-endian bytes already in the tensor's dtype.
    pub fn write_bytes(&mut self, name: &str, bytes: &[u8]) -> Result<(), CheckpointError> {
        let t = self.locate(name)?;
        let es = self.entries[t].dtype.size_bytes();
        if !bytes.len().is_multiple_of(es) {
            return Err(self.misuse(
                name,
                format!(
                    "{} bytes is not a whole number of {}-byte elements",
                    bytes.len(),
                    es
                ),
            ));
        }
        self.begin(name, bytes.len() / es)?;
        self.append(bytes)
    }

    /// Finds which tensor `name` is, advancing past a completed one.
    fn locate(&mut self, name: &str) -> Result<usize, CheckpointError> {
        if self.cur < self.entries.len()
            && self.cur_written == self.entries[self.cur].bytes()
            && self.entries[self.cur].name != name
        {
            self.cur += 1;
            self.cur_written = 0;
        }
        match self.entries.get(self.cur) {
            Some(e) if e.name == name => Ok(self.cur),
            Some(e) if self.cur_written > 0 => Err(self.misuse(
                name,
                format!(
                    "tensor `{}` is only {} of {} bytes written",
                    e.name,
                    self.cur_written,
                    e.bytes()
                ),
            )),
            Some(e) => Err(self.misuse(name, format!("expected tensor `{}` next", e.name))),
            None => Err(self.misuse(name, "all tensors are already written".into())),
        }
    }

    fn begin(&mut self, name: &str, elems: usize) -> Result<DType, CheckpointError> {
        let t = self.locate(name)?;
        let e = &self.entries[t];
        let add = (elems * e.dtype.size_bytes()) as u64;
        if self.cur_written + add > e.bytes() {
            return Err(self.misuse(
                name,
                format!(
                    "{} bytes written would exceed its {} bytes",
                    self.cur_written + add,
                    e.bytes()
                ),
            ));
        }
        let dtype = e.dtype;
        let s = self.shard_of(t);
        if self.open.as_ref().map(|(i, _)| *i) != Some(s) {
            self.close_open_shard()?;
            self.open_shard(s)?;
        }
        Ok(dtype)
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), CheckpointError> {
        let (_, sh) = self
            .open
            .as_mut()
            .ok_or_else(|| CheckpointError::WriteOrder {
                tensor: String::new(),
                file: PathBuf::new(),
                reason: "no open shard".into(),
            })?;
        sh.out.write_all(bytes).map_err(io_err(&sh.path))?;
        self.cur_written += bytes.len() as u64;
        Ok(())
    }

    /// Checks every tensor was fully written, closes the shards and writes the index (when there
    /// are several shards). Returns the files written.
    pub fn finish(mut self) -> Result<Vec<PathBuf>, CheckpointError> {
        // Every tensor from `cur` on must be complete: `cur` itself fully written, the rest empty.
        for i in self.cur..self.entries.len() {
            let done = if i == self.cur { self.cur_written } else { 0 };
            let e = &self.entries[i];
            if done != e.bytes() {
                let reason = format!("only {done} of {} bytes written before finish", e.bytes());
                return Err(self.misuse(&e.name.clone(), reason));
            }
        }
        // Shards that hold only empty tensors were never opened; give them their header.
        for s in 0..self.shards.len() {
            if !self.created[s] {
                self.close_open_shard()?;
                self.open_shard(s)?;
            }
        }
        self.close_open_shard()?;
        let mut files: Vec<PathBuf> = self
            .shards
            .iter()
            .map(|s| self.dir.join(&s.file_name))
            .collect();
        if self.shards.len() > 1 {
            let mut weight_map = Map::new();
            for s in &self.shards {
                for e in &self.entries[s.tensors.clone()] {
                    weight_map.insert(e.name.clone(), s.file_name.clone().into());
                }
            }
            let total: u64 = self.entries.iter().map(TensorEntry::bytes).sum();
            let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
            let path = self.dir.join(INDEX_FILE);
            let text =
                serde_json::to_string_pretty(&index).map_err(|e| CheckpointError::BadIndex {
                    file: path.clone(),
                    reason: e.to_string(),
                })?;
            std::fs::write(&path, text).map_err(io_err(&path))?;
            files.push(path);
        } else {
            // A stale index from an earlier sharded write would shadow the single file.
            let stale = self.dir.join(INDEX_FILE);
            if stale.exists() {
                std::fs::remove_file(&stale).map_err(io_err(&stale))?;
            }
        }
        Ok(files)
    }
}

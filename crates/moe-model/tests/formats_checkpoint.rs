//! Safetensors I/O: round trips in every dtype, single and sharded, cross-checked against the
//! reference `safetensors` crate, and every bad-input error naming its tensor and file.

use moe_model::checkpoint::{
    encode_into, round_through, Checkpoint, CheckpointError, CheckpointWriter, TensorEntry,
    INDEX_FILE, SINGLE_FILE,
};
use moe_model::config::DType;
use moe_model::schema::{TensorOwner, TensorRole, TensorSpec};
use proptest::prelude::*;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use std::path::Path;

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Deterministic test values with varied magnitudes and signs.
fn values(n: usize, salt: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 + 0.37) * (salt as f32 + 1.3)).sin() * (1.0 + (i % 7) as f32 * 3.1))
        .collect()
}

fn write_all(
    dir: &Path,
    entries: &[TensorEntry],
    data: &[Vec<f32>],
    max_shard: u64,
) -> Vec<std::path::PathBuf> {
    let mut w = CheckpointWriter::create(dir, entries.to_vec(), max_shard).unwrap();
    for (e, d) in entries.iter().zip(data) {
        w.write_f32(&e.name, d).unwrap();
    }
    w.finish().unwrap()
}

fn spec(name: &str, shape: Vec<usize>) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        shape,
        owner: TensorOwner::Global,
        role: TensorRole::Embedding,
    }
}

#[test]
fn single_file_round_trip_every_dtype() {
    for dtype in DTYPES {
        let dir = tempfile::tempdir().unwrap();
        let entries = vec![
            TensorEntry::new("a.weight", vec![3, 5], dtype),
            TensorEntry::new("b.weight", vec![7], dtype),
            TensorEntry::new("c.weight", vec![2, 2, 2], dtype),
        ];
        let data: Vec<Vec<f32>> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| values(e.shape.iter().product(), i as u32))
            .collect();
        let files = write_all(dir.path(), &entries, &data, u64::MAX);
        assert_eq!(files, vec![dir.path().join(SINGLE_FILE)]);
        assert!(!dir.path().join(INDEX_FILE).exists());
        let ck = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ck.num_shards(), 1);
        assert_eq!(ck.names(), vec!["a.weight", "b.weight", "c.weight"]);
        for (e, d) in entries.iter().zip(&data) {
            let got = ck.read_f32(&e.name).unwrap();
            let want: Vec<f32> = d.iter().map(|&v| round_through(dtype, v)).collect();
            assert_eq!(got, want, "{dtype} {}", e.name);
            assert_eq!(ck.info(&e.name).unwrap().shape, e.shape);
            assert_eq!(ck.info(&e.name).unwrap().dtype, Ok(dtype));
        }
    }
}

#[test]
fn written_files_load_in_the_reference_crate() {
    for dtype in DTYPES {
        let dir = tempfile::tempdir().unwrap();
        let entries = vec![
            TensorEntry::new("x", vec![4, 3], dtype),
            TensorEntry::new("y", vec![5], dtype),
        ];
        let data = vec![values(12, 1), values(5, 2)];
        write_all(dir.path(), &entries, &data, u64::MAX);
        let bytes = std::fs::read(dir.path().join(SINGLE_FILE)).unwrap();
        let st = SafeTensors::deserialize(&bytes).expect("reference crate accepts our file");
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .and_then(|m| m.get("format"))
                .map(String::as_str),
            Some("pt")
        );
        for (e, d) in entries.iter().zip(&data) {
            let t = st.tensor(&e.name).unwrap();
            assert_eq!(t.shape(), &e.shape[..]);
            let want_dtype = match dtype {
                DType::F32 => StDtype::F32,
                DType::F16 => StDtype::F16,
                DType::BF16 => StDtype::BF16,
            };
            assert_eq!(t.dtype(), want_dtype);
            let mut want = vec![0u8; d.len() * dtype.size_bytes()];
            encode_into(dtype, d, &mut want);
            assert_eq!(t.data(), &want[..]);
        }
    }
}

#[test]
fn reads_files_written_by_the_reference_crate() {
    let dir = tempfile::tempdir().unwrap();
    let vals = values(6, 9);
    let mut f32_bytes = vec![0u8; 24];
    encode_into(DType::F32, &vals, &mut f32_bytes);
    let mut bf_bytes = vec![0u8; 12];
    encode_into(DType::BF16, &vals, &mut bf_bytes);
    let tensors = vec![
        (
            "p".to_string(),
            TensorView::new(StDtype::F32, vec![2, 3], &f32_bytes).unwrap(),
        ),
        (
            "q".to_string(),
            TensorView::new(StDtype::BF16, vec![6], &bf_bytes).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(tensors, None, &dir.path().join(SINGLE_FILE)).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.read_f32("p").unwrap(), vals);
    let want: Vec<f32> = vals
        .iter()
        .map(|&v| round_through(DType::BF16, v))
        .collect();
    assert_eq!(ck.read_f32("q").unwrap(), want);
}

#[test]
fn sharded_round_trip_with_index() {
    let dir = tempfile::tempdir().unwrap();
    let entries: Vec<TensorEntry> = (0..7)
        .map(|i| TensorEntry::new(format!("t{i}"), vec![10, i + 1], DType::BF16))
        .collect();
    let data: Vec<Vec<f32>> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| values(e.shape.iter().product(), i as u32))
        .collect();
    // 60 bytes per shard: tensors of 20..140 bytes, so several shards, and the big ones alone.
    let files = write_all(dir.path(), &entries, &data, 60);
    let index_path = dir.path().join(INDEX_FILE);
    assert_eq!(files.last(), Some(&index_path));
    let n = files.len() - 1;
    assert!(n > 3, "expected several shards, got {n}");
    assert!(!dir.path().join(SINGLE_FILE).exists());
    for (i, f) in files[..n].iter().enumerate() {
        assert_eq!(
            f.file_name().unwrap().to_str().unwrap(),
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        );
    }
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let total: u64 = entries.iter().map(TensorEntry::bytes).sum();
    assert_eq!(index["metadata"]["total_size"], total);
    assert_eq!(index["weight_map"].as_object().unwrap().len(), 7);
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.num_shards(), n);
    for (e, d) in entries.iter().zip(&data) {
        let want: Vec<f32> = d.iter().map(|&v| round_through(DType::BF16, v)).collect();
        assert_eq!(ck.read_f32(&e.name).unwrap(), want);
        let shard = index["weight_map"][&e.name].as_str().unwrap();
        assert_eq!(ck.file_of(&e.name).unwrap(), dir.path().join(shard));
    }
}

#[test]
fn chunked_writes_match_whole_writes() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let entries = vec![
        TensorEntry::new("big", vec![100, 7], DType::F16),
        TensorEntry::new("small", vec![3], DType::F16),
    ];
    let data = vec![values(700, 3), values(3, 4)];
    write_all(a.path(), &entries, &data, u64::MAX);
    let mut w = CheckpointWriter::create(b.path(), entries.clone(), u64::MAX).unwrap();
    for piece in data[0].chunks(33) {
        w.write_f32("big", piece).unwrap();
    }
    w.write_f32("small", &data[1][..1]).unwrap();
    w.write_f32("small", &data[1][1..]).unwrap();
    w.finish().unwrap();
    assert_eq!(
        std::fs::read(a.path().join(SINGLE_FILE)).unwrap(),
        std::fs::read(b.path().join(SINGLE_FILE)).unwrap()
    );
}

/// The bf16 fast path of `TensorSource` gives the same bytes as the f32 path rounded, from every
/// stored dtype (for bf16 it copies the file's bytes).
#[test]
fn read_bf16_into_matches_the_rounded_f32_read() {
    use moe_model::weights::TensorSource;
    struct ViaF32<'a>(&'a Checkpoint);
    impl TensorSource for ViaF32<'_> {
        fn read_f32_into(
            &self,
            name: &str,
            out: &mut [f32],
        ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            self.0.read_f32_into(name, out).map_err(Into::into)
        }
    }
    for stored in DTYPES {
        let dir = tempfile::tempdir().unwrap();
        let vals = values(300, 9);
        write_all(
            dir.path(),
            &[TensorEntry::new("w", vec![20, 15], stored)],
            std::slice::from_ref(&vals),
            u64::MAX,
        );
        let ck = Checkpoint::open(dir.path()).unwrap();
        let mut fast = vec![0u8; 600];
        TensorSource::read_bf16_into(&ck, "w", &mut fast).unwrap();
        let mut slow = vec![0u8; 600];
        ViaF32(&ck).read_bf16_into("w", &mut slow).unwrap();
        assert_eq!(fast, slow, "stored {stored}");
        let mut want = vec![0u8; 600];
        encode_into(DType::BF16, &ck.read_f32("w").unwrap(), &mut want);
        assert_eq!(fast, want, "stored {stored}");
        let mut odd = vec![0u8; 599];
        assert!(ViaF32(&ck).read_bf16_into("w", &mut odd).is_err());
        assert!(TensorSource::read_bf16_into(&ck, "w", &mut odd).is_err());
    }
}

#[test]
fn read_into_converts_storage_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    let vals = values(20, 5);
    write_all(
        dir.path(),
        &[TensorEntry::new("w", vec![4, 5], DType::F32)],
        std::slice::from_ref(&vals),
        u64::MAX,
    );
    let ck = Checkpoint::open(dir.path()).unwrap();
    for dtype in DTYPES {
        let mut got = vec![0u8; 20 * dtype.size_bytes()];
        ck.read_into("w", dtype, &mut got).unwrap();
        let mut want = vec![0u8; got.len()];
        encode_into(dtype, &vals, &mut want);
        assert_eq!(got, want, "{dtype}");
    }
    let mut small = vec![0u8; 10];
    let e = ck.read_into("w", DType::BF16, &mut small).unwrap_err();
    assert!(
        matches!(
            e,
            CheckpointError::BufferSize {
                expected: 40,
                got: 10,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn missing_tensor_names_tensor_and_file() {
    // Single file: names the file.
    let dir = tempfile::tempdir().unwrap();
    write_all(
        dir.path(),
        &[TensorEntry::new("a", vec![2], DType::F32)],
        &[vec![1.0, 2.0]],
        u64::MAX,
    );
    let ck = Checkpoint::open(dir.path()).unwrap();
    let e = ck.read_f32("nope").unwrap_err();
    assert!(matches!(e, CheckpointError::Missing { .. }));
    assert_eq!(e.tensor(), Some("nope"));
    assert_eq!(e.file(), Some(dir.path().join(SINGLE_FILE).as_path()));
    assert!(
        e.to_string().contains("nope") && e.to_string().contains(SINGLE_FILE),
        "{e}"
    );
    let e = ck.check_spec(&spec("nope", vec![2])).unwrap_err();
    assert_eq!(e.tensor(), Some("nope"));

    // Sharded: a tensor absent from the index names the index.
    let dir = tempfile::tempdir().unwrap();
    let entries = vec![
        TensorEntry::new("a", vec![4], DType::F32),
        TensorEntry::new("b", vec![4], DType::F32),
    ];
    write_all(dir.path(), &entries, &[values(4, 0), values(4, 1)], 16);
    let ck = Checkpoint::open(dir.path()).unwrap();
    let e = ck.read_f32("c").unwrap_err();
    assert_eq!(e.file(), Some(dir.path().join(INDEX_FILE).as_path()));

    // The index names a shard that lacks the tensor: names the tensor and that shard.
    let index_path = dir.path().join(INDEX_FILE);
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors".into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(e, CheckpointError::Missing { .. }), "{e}");
    assert_eq!(e.tensor(), Some("ghost"));
    assert_eq!(
        e.file(),
        Some(
            dir.path()
                .join("model-00001-of-00002.safetensors")
                .as_path()
        )
    );
}

#[test]
fn truncated_file_names_tensor_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let entries = vec![
        TensorEntry::new("first", vec![8], DType::F32),
        TensorEntry::new("last", vec![8], DType::F32),
    ];
    write_all(
        dir.path(),
        &entries,
        &[values(8, 0), values(8, 1)],
        u64::MAX,
    );
    let path = dir.path().join(SINGLE_FILE);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    // The intact tensor still reads: only what a device needs is touched.
    assert_eq!(ck.read_f32("first").unwrap(), values(8, 0));
    let e = ck.read_f32("last").unwrap_err();
    assert!(matches!(e, CheckpointError::Truncated { .. }), "{e}");
    assert_eq!(e.tensor(), Some("last"));
    assert_eq!(e.file(), Some(path.as_path()));
    assert!(e.to_string().contains("truncated"), "{e}");
    let e = ck.check_spec(&spec("last", vec![8])).unwrap_err();
    assert!(matches!(e, CheckpointError::Truncated { .. }), "{e}");

    // A file cut inside its header.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(12)
        .unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(e, CheckpointError::BadHeader { .. }), "{e}");
    assert_eq!(e.file(), Some(path.as_path()));
}

#[test]
fn shape_mismatch_names_tensor_and_file() {
    let dir = tempfile::tempdir().unwrap();
    write_all(
        dir.path(),
        &[TensorEntry::new("w", vec![2, 3], DType::F32)],
        &[values(6, 0)],
        u64::MAX,
    );
    let ck = Checkpoint::open(dir.path()).unwrap();
    let e = ck.check_spec(&spec("w", vec![3, 2])).unwrap_err();
    match &e {
        CheckpointError::ShapeMismatch {
            tensor,
            expected,
            found,
            file,
        } => {
            assert_eq!(
                (tensor.as_str(), expected.clone(), found.clone()),
                ("w", vec![3, 2], vec![2, 3])
            );
            assert_eq!(file, &dir.path().join(SINGLE_FILE));
        }
        other => panic!("expected ShapeMismatch, got {other}"),
    }
    let mut out = vec![0f32; 6];
    assert!(ck
        .read_spec_f32_into(&spec("w", vec![6]), &mut out)
        .is_err());
    ck.read_spec_f32_into(&spec("w", vec![2, 3]), &mut out)
        .unwrap();
    let mut wrong = vec![0f32; 5];
    let e = ck.read_f32_into("w", &mut wrong).unwrap_err();
    assert!(
        matches!(
            e,
            CheckpointError::BufferSize {
                expected: 6,
                got: 5,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn unsupported_dtype_names_tensor_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let ints = [1u8, 0, 0, 0, 2, 0, 0, 0];
    let tensors = vec![(
        "ids".to_string(),
        TensorView::new(StDtype::I32, vec![2], &ints).unwrap(),
    )];
    safetensors::serialize_to_file(tensors, None, &dir.path().join(SINGLE_FILE)).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let e = ck.read_f32("ids").unwrap_err();
    match &e {
        CheckpointError::WrongDtype {
            tensor,
            found,
            file,
        } => {
            assert_eq!((tensor.as_str(), found.as_str()), ("ids", "I32"));
            assert_eq!(file, &dir.path().join(SINGLE_FILE));
        }
        other => panic!("expected WrongDtype, got {other}"),
    }
}

#[test]
fn bad_index_and_headers_are_reported_with_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(e, CheckpointError::NoCheckpoint { .. }), "{e}");
    assert!(e.to_string().contains(INDEX_FILE), "{e}");

    let index_path = dir.path().join(INDEX_FILE);
    for (text, needle) in [
        ("{", "not JSON"),
        ("{\"metadata\": {}}", "weight_map"),
        ("{\"weight_map\": {}}", "empty"),
        ("{\"weight_map\": {\"a\": 3}}", "not a file name"),
        (
            "{\"weight_map\": {\"a\": \"model-00001-of-00002.safetensors\"}}",
            "does not exist",
        ),
        (
            "{\"weight_map\": {\"a\": \"../elsewhere.safetensors\"}}",
            "plain file name",
        ),
    ] {
        std::fs::write(&index_path, text).unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err();
        assert!(matches!(e, CheckpointError::BadIndex { .. }), "{text}: {e}");
        assert_eq!(e.file(), Some(index_path.as_path()));
        assert!(e.to_string().contains(needle), "{text}: {e}");
    }
    std::fs::remove_file(&index_path).unwrap();

    let single = dir.path().join(SINGLE_FILE);
    let header = |h: &str| {
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(&[0u8; 16]);
        b
    };
    for (bytes, needle) in [
        (vec![1u8, 2, 3], "shorter"),
        (u64::MAX.to_le_bytes().to_vec(), "exceeds"),
        (header("not json"), "not JSON"),
        (header("[1, 2]"), "not a JSON object"),
        (
            header(r#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}"#),
            "tensor `w`",
        ),
        (
            header(r#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}"#),
            "end before",
        ),
        (
            header(r#"{"w": {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}}"#),
            "shape",
        ),
        (
            header(r#"{"w": {"shape": [1], "data_offsets": [0, 4]}}"#),
            "dtype",
        ),
    ] {
        std::fs::write(&single, &bytes).unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err();
        assert!(
            matches!(e, CheckpointError::BadHeader { .. }),
            "{needle}: {e}"
        );
        assert_eq!(e.file(), Some(single.as_path()));
        assert!(e.to_string().contains(needle), "{needle}: {e}");
    }
}

#[test]
fn writer_rejects_misuse() {
    let dir = tempfile::tempdir().unwrap();
    let entries = vec![
        TensorEntry::new("a", vec![2], DType::F32),
        TensorEntry::new("b", vec![2], DType::F32),
    ];
    let mut w = CheckpointWriter::create(dir.path(), entries.clone(), u64::MAX).unwrap();
    let e = w.write_f32("b", &[1.0, 2.0]).unwrap_err();
    assert!(
        matches!(e, CheckpointError::WriteOrder { .. }) && e.tensor() == Some("b"),
        "{e}"
    );
    assert!(e.to_string().contains("expected tensor `a`"), "{e}");
    w.write_f32("a", &[1.0]).unwrap();
    let e = w.write_f32("b", &[1.0]).unwrap_err();
    assert!(e.to_string().contains("only 4 of 8 bytes"), "{e}");
    let e = w.write_f32("a", &[1.0, 2.0]).unwrap_err();
    assert!(e.to_string().contains("exceed"), "{e}");
    let e = w.write_bytes("a", &[1, 2, 3]).unwrap_err();
    assert!(e.to_string().contains("whole number"), "{e}");
    let e = w.finish().unwrap_err();
    assert_eq!(e.tensor(), Some("a"));
    assert!(e.to_string().contains("before finish"), "{e}");

    let dup = vec![
        TensorEntry::new("a", vec![1], DType::F32),
        TensorEntry::new("a", vec![1], DType::F32),
    ];
    assert!(CheckpointWriter::create(dir.path(), dup, u64::MAX).is_err());
    assert!(CheckpointWriter::create(dir.path(), Vec::new(), u64::MAX).is_err());
}

#[test]
fn empty_tensors_and_a_stale_index() {
    let dir = tempfile::tempdir().unwrap();
    // First a sharded write, then a single-file write into the same directory.
    let e2 = vec![
        TensorEntry::new("a", vec![4], DType::F32),
        TensorEntry::new("b", vec![4], DType::F32),
    ];
    write_all(dir.path(), &e2, &[values(4, 0), values(4, 1)], 16);
    assert!(dir.path().join(INDEX_FILE).exists());
    let entries = vec![
        TensorEntry::new("z", vec![0, 3], DType::BF16),
        TensorEntry::new("a", vec![2], DType::F32),
    ];
    let mut w = CheckpointWriter::create(dir.path(), entries, u64::MAX).unwrap();
    w.write_f32("a", &[5.0, 6.0]).unwrap();
    w.finish().unwrap();
    assert!(
        !dir.path().join(INDEX_FILE).exists(),
        "a stale index would shadow the new file"
    );
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.read_f32("z").unwrap(), Vec::<f32>::new());
    assert_eq!(ck.read_f32("a").unwrap(), vec![5.0, 6.0]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any tensor list, any shard limit: everything reads back exactly (up to storage rounding) and
    /// no shard except single-tensor ones exceeds the limit.
    #[test]
    fn any_sharding_round_trips(
        shapes in prop::collection::vec(prop::collection::vec(1usize..6, 1..3), 1..10),
        dtype_ix in prop::collection::vec(0usize..3, 10),
        max_shard in 8u64..400,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let entries: Vec<TensorEntry> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| TensorEntry::new(format!("model.layers.{i}.w.weight"), s.clone(), DTYPES[dtype_ix[i]]))
            .collect();
        let data: Vec<Vec<f32>> = entries.iter().enumerate().map(|(i, e)| values(e.shape.iter().product(), i as u32)).collect();
        let files = write_all(dir.path(), &entries, &data, max_shard);
        let ck = Checkpoint::open(dir.path()).unwrap();
        prop_assert_eq!(ck.names().len(), entries.len());
        for (e, d) in entries.iter().zip(&data) {
            let want: Vec<f32> = d.iter().map(|&v| round_through(e.dtype, v)).collect();
            prop_assert_eq!(ck.read_f32(&e.name).unwrap(), want);
        }
        for f in files.iter().filter(|f| f.extension().is_some_and(|x| x == "safetensors")) {
            let bytes = std::fs::read(f).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let data_bytes: usize = st.tensors().iter().map(|(_, t)| t.data().len()).sum();
            prop_assert!(st.len() == 1 || data_bytes as u64 <= max_shard);
        }
    }
}

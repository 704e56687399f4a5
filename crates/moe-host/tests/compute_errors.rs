//! Bad input to the loader and the forward pass gives typed errors that say what is wrong, never a
//! panic, and a failed step leaves its sequences as they were.

mod compute_support;

use compute_support::{host_vmm, model_dir};
use hbm_vmm::host::{HostBackend, HostConfig};
use hbm_vmm::{DeviceId, Vmm, VmmError};
use moe_host::compute::cpu::CpuCompute;
use moe_host::compute::ComputeError;
use moe_host::model::runner::{SeqId, SingleDevice};
use moe_host::model::weights::{DeviceWeights, MemTensors};
use moe_host::model::{Model, ModelError};
use moe_model::checkpoint::Checkpoint;
use moe_model::presets::Preset;

fn all_experts(cfg: &moe_model::config::ModelConfig) -> Vec<(usize, u32)> {
    cfg.moe_layers()
        .flat_map(|l| (0..cfg.moe.num_experts as u32).map(move |e| (l, e)))
        .collect()
}

#[test]
fn a_missing_tensor_is_named() {
    let cfg = Preset::TinyMixtral.config();
    let full = MemTensors::seeded(&cfg, 1);
    let gone = "model.layers.1.self_attn.k_proj.weight";
    let mut src = MemTensors::new();
    for n in full.names().filter(|n| *n != gone) {
        src.insert(n, full.get(n).unwrap().to_vec());
    }
    let m = Model::new(&cfg, CpuCompute::new()).unwrap();
    let err = DeviceWeights::load(&host_vmm(1), DeviceId(0), m.layout(), &src, []).unwrap_err();
    match &err {
        ModelError::Tensor { name, .. } => assert_eq!(name, gone),
        other => panic!("expected a tensor error, got {other:?}"),
    }
    assert!(err.to_string().contains(gone), "{err}");
}

#[test]
fn a_checkpoint_of_another_architecture_names_the_tensor_and_directory() {
    // A Mixtral checkpoint has no Qwen3 q_norm: loading Qwen3 from it must say which tensor.
    let (dir, _) = model_dir(Preset::TinyMixtral, 3);
    let ck = Checkpoint::open(dir.path()).unwrap();
    let qwen = Preset::TinyQwen3.config();
    let m = Model::new(&qwen, CpuCompute::new()).unwrap();
    let err = DeviceWeights::load(&host_vmm(1), DeviceId(0), m.layout(), &ck, []).unwrap_err();
    let ModelError::Tensor { name, source } = &err else {
        panic!("expected a tensor error, got {err:?}")
    };
    assert!(name.starts_with("model.layers.0."), "{name}");
    assert!(source.to_string().contains(name.as_str()), "{source}");
    let dir_name = dir.path().to_string_lossy().into_owned();
    assert!(source.to_string().contains(&dir_name), "{source}");
}

#[test]
fn a_mis_sized_tensor_is_refused() {
    let cfg = Preset::TinyQwen3.config();
    let mut src = MemTensors::seeded(&cfg, 1);
    src.insert("model.norm.weight", vec![1.0; 3]);
    let m = Model::new(&cfg, CpuCompute::new()).unwrap();
    let err = DeviceWeights::load(&host_vmm(1), DeviceId(0), m.layout(), &src, []).unwrap_err();
    assert!(
        matches!(&err, ModelError::Tensor { name, .. } if name == "model.norm.weight"),
        "{err:?}"
    );
    assert!(err.to_string().contains("3 elements"), "{err}");
}

#[test]
fn a_device_too_small_runs_out_of_memory() {
    let cfg = Preset::TinyDeepseek.config();
    let src = MemTensors::seeded(&cfg, 1);
    let m = Model::new(&cfg, CpuCompute::new()).unwrap();
    let small = HostConfig::devices(1, 64 << 10)
        .with_granularity(hbm_vmm::host::page_size())
        .unwrap();
    let vmm = Vmm::new(HostBackend::new(small));
    let err =
        DeviceWeights::load(&vmm, DeviceId(0), m.layout(), &src, all_experts(&cfg)).unwrap_err();
    assert!(
        matches!(err, ModelError::Vmm(VmmError::OutOfMemory { .. })),
        "{err:?}"
    );
    // Nothing is leaked: the partial load released its chunks.
    assert_eq!(vmm.usage(DeviceId(0)), 0);
}

#[test]
fn experts_that_do_not_exist_or_are_not_here_are_refused() {
    let cfg = Preset::TinyDeepseek.config(); // layer 0 is dense
    let src = MemTensors::seeded(&cfg, 1);
    let m = Model::new(&cfg, CpuCompute::new()).unwrap();
    let vmm = host_vmm(2);
    let dense = DeviceWeights::load(&vmm, DeviceId(0), m.layout(), &src, [(0, 0)]).unwrap_err();
    assert!(
        matches!(
            dense,
            ModelError::NoSuchExpert {
                layer: 0,
                expert: 0
            }
        ),
        "{dense:?}"
    );
    let n = cfg.moe.num_experts as u32;
    let past = DeviceWeights::load(&vmm, DeviceId(0), m.layout(), &src, [(1, n)]).unwrap_err();
    assert!(
        matches!(past, ModelError::NoSuchExpert { layer: 1, .. }),
        "{past:?}"
    );

    let mut w = DeviceWeights::load(&vmm, DeviceId(0), m.layout(), &src, [(1, 0)]).unwrap();
    assert!(w.has_expert(1, 0) && !w.has_expert(1, 1));
    let not_here = w.expert_bytes(1, 1).unwrap_err();
    assert!(
        matches!(
            not_here,
            ModelError::ExpertNotHere {
                layer: 1,
                expert: 1,
                device: DeviceId(0)
            }
        ),
        "{not_here:?}"
    );
    // A chunk from another device cannot be adopted.
    let other = DeviceWeights::load(&vmm, DeviceId(1), m.layout(), &src, [(1, 1)]).unwrap();
    let chunk = other.expert_chunk(1, 1).unwrap().clone();
    let wrong = w.adopt_expert(1, 1, chunk).unwrap_err();
    assert!(matches!(wrong, ModelError::WrongDevice { .. }), "{wrong:?}");
    // A chunk too small for an expert cannot be adopted either.
    let tiny = vmm
        .create_chunk(DeviceId(0), hbm_vmm::host::page_size(), false)
        .unwrap();
    let small = w.adopt_expert(1, 1, tiny).unwrap_err();
    assert!(
        matches!(small, ModelError::ChunkTooSmall { .. }),
        "{small:?}"
    );
}

#[test]
fn a_step_routed_to_a_missing_expert_fails_and_changes_nothing() {
    let cfg = Preset::TinyMixtral.config();
    let src = MemTensors::seeded(&cfg, 1);
    let m = Model::new(&cfg, CpuCompute::new()).unwrap();
    let vmm = host_vmm(1);
    let w = DeviceWeights::load(&vmm, DeviceId(0), m.layout(), &src, [(0, 0)]).unwrap();
    let mut run = SingleDevice::new(m, w, 4).unwrap();
    let id = run.add_sequence();
    let err = run.step(&[(id, vec![1, 2, 3, 4, 5, 6, 7, 8])]).unwrap_err();
    assert!(matches!(err, ModelError::ExpertNotHere { .. }), "{err:?}");
    assert_eq!(run.seq_len(id), Some(0));
}

#[test]
fn runner_input_errors_are_typed() {
    let cfg = Preset::TinyQwen3.config();
    let src = MemTensors::seeded(&cfg, 1);
    let vmm = host_vmm(1);
    let model = || Model::new(&cfg, CpuCompute::new()).unwrap();
    let mut run = SingleDevice::load(model(), &vmm, DeviceId(0), &src, 4).unwrap();
    let a = run.add_sequence();
    assert!(matches!(
        run.step(&[(SeqId(99), vec![1])]),
        Err(ModelError::NoSuchSequence(99))
    ));
    assert!(matches!(
        run.step(&[(a, vec![])]),
        Err(ModelError::EmptyInput(_))
    ));
    assert!(matches!(
        run.step(&[(a, vec![1]), (a, vec![2])]),
        Err(ModelError::DuplicateSequence(_))
    ));
    let v = cfg.vocab_size as u32;
    let err = run.step(&[(a, vec![1, v])]).unwrap_err();
    assert!(
        matches!(err, ModelError::Compute(ComputeError::TokenOutOfRange { token, vocab }) if token == v && vocab == cfg.vocab_size),
        "{err:?}"
    );
    assert_eq!(
        run.seq_len(a),
        Some(0),
        "failed steps leave the sequence untouched"
    );
    // The sequence still works afterwards, and removal frees it.
    run.step(&[(a, vec![1, 2])]).unwrap();
    assert_eq!(run.seq_len(a), Some(2));
    run.remove_sequence(a).unwrap();
    assert!(matches!(
        run.remove_sequence(a),
        Err(ModelError::NoSuchSequence(_))
    ));
    let w = DeviceWeights::load(&vmm, DeviceId(0), model().layout(), &src, []).unwrap();
    assert!(matches!(
        SingleDevice::new(model(), w, 0),
        Err(ModelError::Unsupported(_))
    ));
}

#[test]
fn a_transposed_tensor_in_a_checkpoint_is_refused_by_shape() {
    use moe_model::checkpoint::{CheckpointWriter, TensorEntry};
    use moe_model::config::DType;
    use moe_model::schema::ModelSchema;
    let cfg = Preset::TinyMixtral.config();
    let src = MemTensors::seeded(&cfg, 1);
    let bad = "model.layers.1.block_sparse_moe.experts.2.w2.weight";
    let dir = tempfile::tempdir().unwrap();
    let schema = ModelSchema::new(&cfg);
    let entries = schema
        .tensors()
        .iter()
        .map(|t| {
            let mut shape = t.shape.clone();
            if t.name == bad {
                shape.reverse(); // same element count, wrong shape
            }
            TensorEntry::new(t.name.clone(), shape, DType::F32)
        })
        .collect();
    let mut w = CheckpointWriter::create(dir.path(), entries, 1 << 30).unwrap();
    for t in schema.tensors() {
        w.write_f32(&t.name, src.get(&t.name).unwrap()).unwrap();
    }
    w.finish().unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let m = Model::new(&cfg, CpuCompute::new()).unwrap();
    let vmm = host_vmm(1);
    // Fine while the device does not hold that expert...
    DeviceWeights::load(&vmm, DeviceId(0), m.layout(), &ck, [(1, 1)]).unwrap();
    // ...refused, naming it, when it does.
    let err = DeviceWeights::load(&vmm, DeviceId(0), m.layout(), &ck, [(1, 2)]).unwrap_err();
    let ModelError::Tensor { name, source } = &err else {
        panic!("expected a tensor error, got {err:?}")
    };
    assert_eq!(name, bad);
    assert!(source.to_string().contains(bad), "{source}");
}

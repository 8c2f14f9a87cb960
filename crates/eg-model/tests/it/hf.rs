//! Hugging Face directories: round trips, shards, the hf-hub cache layout, and every kind of
//! bad input as a typed error.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use eg_model::hf::resolve_hf_cache;
use eg_model::safetensors::{Defect, write};
use eg_model::{Error, Llama, LlamaConfig, ModelType};

use crate::common::max_abs_diff;
use crate::model::batch;

fn saved(dir: &Path, cfg: &LlamaConfig) -> Llama {
    let model = Llama::init(cfg, 7, DType::F32, &Device::Cpu).unwrap();
    model.save_hf_dir(dir, None).unwrap();
    model
}

fn logits(model: &Llama) -> Tensor {
    model.forward(&batch(model.config(), 1, 5, 1)).unwrap()
}

#[test]
fn save_and_load_round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LlamaConfig {
        model_type: ModelType::Qwen2,
        ..LlamaConfig::tiny_for_tests()
    };
    let model = saved(dir.path(), &cfg);
    let loaded = Llama::from_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(loaded.config().model_type, ModelType::Qwen2);
    assert_eq!(max_abs_diff(&logits(&model), &logits(&loaded)), 0.0);
    // No temp files left behind.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
}

#[test]
fn saved_safetensors_is_readable_by_the_safetensors_crate() {
    let dir = tempfile::tempdir().unwrap();
    let model = saved(dir.path(), &LlamaConfig::tiny_for_tests());
    // candle's loader is built on the reference `safetensors` crate.
    let read =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let ours = model.params().tensors();
    assert_eq!(read.len(), ours.len());
    for (name, t) in &ours {
        assert_eq!(max_abs_diff(t, &read[name]), 0.0, "{name}");
    }
}

#[test]
fn sharded_index_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let model = Llama::init(&LlamaConfig::tiny_for_tests(), 8, DType::F32, &Device::Cpu).unwrap();
    model.save_hf_dir(dir.path(), Some(20_000)).unwrap();
    assert!(dir.path().join("model.safetensors.index.json").is_file());
    assert!(!dir.path().join("model.safetensors").exists());
    let shards = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            n.to_string_lossy().starts_with("model-")
        })
        .count();
    assert!(shards > 1, "{shards} shards");
    let loaded = Llama::from_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&logits(&model), &logits(&loaded)), 0.0);
}

#[test]
fn loads_with_dtype_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let model = Llama::init(&LlamaConfig::tiny_for_tests(), 9, DType::BF16, &Device::Cpu).unwrap();
    model.save_hf_dir(dir.path(), None).unwrap();
    let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    assert!(text.contains("bfloat16"));
    let f32 = Llama::from_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(f32.dtype(), DType::F32);
    let a = model
        .params()
        .get("lm_head.weight")
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let b = f32
        .params()
        .get("lm_head.weight")
        .unwrap()
        .as_tensor()
        .clone();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // And the bf16 model itself runs (ops convert to f32 internally).
    assert_eq!(logits(&model).dtype(), DType::BF16);
}

#[test]
fn hf_hub_cache_layout_resolves_offline() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--org--tiny");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), format!("{commit}\n")).unwrap();
    saved(&snap, &LlamaConfig::tiny_for_tests());

    let dir = resolve_hf_cache(cache.path(), "org/tiny", None).unwrap();
    assert_eq!(dir, snap);
    assert_eq!(
        resolve_hf_cache(cache.path(), "org/tiny", Some(commit)).unwrap(),
        snap
    );
    Llama::from_hf_dir(&dir, DType::F32, &Device::Cpu).unwrap();

    let err = resolve_hf_cache(cache.path(), "org/other", None).unwrap_err();
    assert!(matches!(err, Error::NotInCache { .. }), "{err}");
    let err = resolve_hf_cache(cache.path(), "org/tiny", Some("v2")).unwrap_err();
    assert!(matches!(err, Error::NotInCache { .. }), "{err}");
}

/// Rewrites `model.safetensors` after `edit` changes the tensor map.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut t: BTreeMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    edit(&mut t);
    write(&path, &t, &BTreeMap::new()).unwrap();
}

fn load_err(dir: &Path) -> Error {
    Llama::from_hf_dir(dir, DType::F32, &Device::Cpu).unwrap_err()
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    saved(dir.path(), &LlamaConfig::tiny_for_tests());
    edit_weights(dir.path(), |t| {
        t.remove("model.layers.1.mlp.up_proj.weight");
    });
    match load_err(dir.path()) {
        Error::MissingTensors { names } => {
            assert_eq!(names, vec!["model.layers.1.mlp.up_proj.weight".to_string()]);
        }
        e => panic!("{e}"),
    }
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    saved(dir.path(), &LlamaConfig::tiny_for_tests());
    edit_weights(dir.path(), |t| {
        let x = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        t.insert("model.layers.0.mystery".to_string(), x);
    });
    match load_err(dir.path()) {
        Error::UnexpectedTensors { names } => assert_eq!(names, vec!["model.layers.0.mystery"]),
        e => panic!("{e}"),
    }
}

#[test]
fn shape_mismatch_names_tensor_expected_and_found() {
    let dir = tempfile::tempdir().unwrap();
    saved(dir.path(), &LlamaConfig::tiny_for_tests());
    edit_weights(dir.path(), |t| {
        let x = Tensor::zeros((8, 32), DType::F32, &Device::Cpu).unwrap();
        t.insert("model.layers.0.self_attn.k_proj.weight".to_string(), x);
    });
    match load_err(dir.path()) {
        Error::ShapeMismatch {
            tensor,
            expected,
            found,
        } => {
            assert_eq!(tensor, "model.layers.0.self_attn.k_proj.weight");
            assert_eq!(expected, vec![16, 32]);
            assert_eq!(found, vec![8, 32]);
        }
        e => panic!("{e}"),
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn unsupported_model_type_lists_supported() {
    let dir = tempfile::tempdir().unwrap();
    saved(dir.path(), &LlamaConfig::tiny_for_tests());
    edit_config(dir.path(), |c| {
        c.insert("model_type".into(), "gpt_neox".into());
    });
    match load_err(dir.path()) {
        Error::UnsupportedModelType { found, supported } => {
            assert_eq!(found, "gpt_neox");
            assert_eq!(supported, &["llama", "mistral", "qwen2"]);
        }
        e => panic!("{e}"),
    }
}

#[test]
fn config_missing_a_field_is_named() {
    let dir = tempfile::tempdir().unwrap();
    saved(dir.path(), &LlamaConfig::tiny_for_tests());
    edit_config(dir.path(), |c| {
        c.remove("num_attention_heads");
    });
    match load_err(dir.path()) {
        Error::ConfigMissingField { field, .. } => assert_eq!(field, "num_attention_heads"),
        e => panic!("{e}"),
    }
}

#[test]
fn config_that_is_not_json_is_a_parse_error() {
    let dir = tempfile::tempdir().unwrap();
    saved(dir.path(), &LlamaConfig::tiny_for_tests());
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    assert!(matches!(load_err(dir.path()), Error::ConfigParse { .. }));
}

#[test]
fn truncated_safetensors_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    saved(dir.path(), &LlamaConfig::tiny_for_tests());
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 100).unwrap();
    match load_err(dir.path()) {
        Error::Safetensors {
            defect: Defect::Truncated { .. },
            path: p,
        } => assert_eq!(p, path),
        e => panic!("{e}"),
    }
    // Cut inside the header.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(50).unwrap();
    match load_err(dir.path()) {
        Error::Safetensors {
            defect: Defect::HeaderPastEnd { .. },
            ..
        } => {}
        e => panic!("{e}"),
    }
}

#[test]
fn corrupt_safetensors_header_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    saved(dir.path(), &LlamaConfig::tiny_for_tests());
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8] = b'#';
    std::fs::write(&path, &bytes).unwrap();
    match load_err(dir.path()) {
        Error::Safetensors {
            defect: Defect::HeaderNotJson { .. },
            ..
        } => {}
        e => panic!("{e}"),
    }
}

#[test]
fn directory_without_weights_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    saved(dir.path(), &LlamaConfig::tiny_for_tests());
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert!(matches!(load_err(dir.path()), Error::NoWeights { .. }));
}

#[test]
fn index_naming_a_tensor_its_shard_lacks_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let model = Llama::init(&LlamaConfig::tiny_for_tests(), 8, DType::F32, &Device::Cpu).unwrap();
    model.save_hf_dir(dir.path(), Some(20_000)).unwrap();
    let path = dir.path().join("model.safetensors.index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let shard = v["weight_map"]["model.norm.weight"].clone();
    v["weight_map"]["model.extra.weight"] = shard;
    std::fs::write(&path, v.to_string()).unwrap();
    match load_err(dir.path()) {
        Error::MissingTensors { names } => assert_eq!(names, vec!["model.extra.weight"]),
        e => panic!("{e}"),
    }
}

#[test]
fn inspect_counts_equal_the_real_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LlamaConfig {
        tie_word_embeddings: true,
        ..LlamaConfig::tiny_for_tests()
    };
    let model = Llama::init(&cfg, 3, DType::BF16, &Device::Cpu).unwrap();
    model.save_hf_dir(dir.path(), Some(10_000)).unwrap();
    let inspection = eg_model::hf::inspect_dir(dir.path(), 64).unwrap();
    let real: usize = model.params().iter().map(|(_, v)| v.elem_count()).sum();
    assert_eq!(inspection.params, real as u64);
    assert_eq!(inspection.tensors.len(), model.params().len());
    assert_eq!(
        inspection.bytes_by_dtype.get("bf16"),
        Some(&(2 * real as u64))
    );
    let a = inspection.analysis.unwrap();
    assert_eq!(a.params, real as u64);
    assert_eq!(a.bytes_by_dtype, inspection.bytes_by_dtype);
    // Serialisable for `eg model inspect --json`.
    assert!(
        serde_json::to_string(&a)
            .unwrap()
            .contains("flops_per_token")
    );
}

//! The local model registry: add, list, show, resolve with checksum verification.

use candle_core::{DType, Device};
use eg_model::registry::Registry;
use eg_model::{Error, Llama, LlamaConfig};

#[test]
fn add_list_show_resolve_and_load_by_name_at_version() {
    let src = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let model = Llama::init(&LlamaConfig::tiny_for_tests(), 1, DType::F32, &Device::Cpu).unwrap();
    model.save_hf_dir(src.path(), None).unwrap();
    let reg = Registry::new(root.path());
    assert!(reg.list().unwrap().is_empty());

    let e = reg.add("tiny", "1", src.path(), "test fixture").unwrap();
    assert_eq!(e.files.len(), 2);
    assert_eq!(e.config.as_ref().unwrap()["model_type"], "llama");
    let (bytes, sha) =
        eg_model::registry::sha256_file(&src.path().join("model.safetensors")).unwrap();
    assert_eq!(e.files["model.safetensors"].bytes, bytes);
    assert_eq!(e.files["model.safetensors"].sha256, sha);
    reg.add("tiny", "2", src.path(), "again").unwrap();
    assert_eq!(reg.list().unwrap().len(), 2);

    // `name` alone is ambiguous with two versions; the error lists them.
    match reg.show("tiny").unwrap_err() {
        Error::RegistryEntryNotFound { available, .. } => assert_eq!(available, vec!["1", "2"]),
        e => panic!("{e}"),
    }
    assert_eq!(reg.show("tiny@2").unwrap().source, "again");
    let dir = reg.resolve("tiny@1").unwrap();
    Llama::from_hf_dir(&dir, DType::F32, &Device::Cpu).unwrap();

    assert!(matches!(
        reg.add("tiny", "1", src.path(), "dup").unwrap_err(),
        Error::RegistryEntryExists { .. }
    ));
    assert!(matches!(
        reg.add("../evil", "1", src.path(), "x").unwrap_err(),
        Error::InvalidRegistryName { field: "name", .. }
    ));
    assert!(matches!(
        reg.show("other@1").unwrap_err(),
        Error::RegistryEntryNotFound { .. }
    ));
}

#[test]
fn a_tampered_file_fails_verification() {
    let src = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let model = Llama::init(&LlamaConfig::tiny_for_tests(), 1, DType::F32, &Device::Cpu).unwrap();
    model.save_hf_dir(src.path(), None).unwrap();
    let reg = Registry::new(root.path());
    reg.add("tiny", "1", src.path(), "fixture").unwrap();
    let f = root.path().join("tiny/1/model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&f, bytes).unwrap();
    assert!(matches!(
        reg.resolve("tiny@1").unwrap_err(),
        Error::ChecksumMismatch { .. }
    ));
}

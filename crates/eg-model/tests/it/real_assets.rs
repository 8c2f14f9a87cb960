//! Tests on the real assets fetched by `cargo xtask fetch-assets` (SmolLM2-135M-Instruct as
//! Q4_1 GGUF, all-MiniLM-L6-v2). They are `#[ignore]`d so the default suite stays offline
//! and fast; `.ci/run` runs them with `cargo test -p eg-model --test tests real_assets --
//! --ignored` after fetching. A missing asset fails the test (never a silent skip).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{bert as ref_bert, llama as ref_llama};
use eg_data::TextTokenizer;
use eg_model::{Bert, BertHead, import_gguf};

use crate::common::max_abs_diff;

fn asset(rel: &str) -> PathBuf {
    let root = std::env::var_os("EG_ASSET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.eg-cache/assets"),
        PathBuf::from,
    );
    let p = root.join(rel);
    assert!(
        p.exists(),
        "{p:?} is missing: run `cargo xtask fetch-assets`"
    );
    p
}

#[test]
#[ignore = "needs the SmolLM2 GGUF asset (cargo xtask fetch-assets); run by .ci/run"]
fn real_assets_smollm2_gguf_matches_candle_transformers_and_knows_paris() {
    let import = import_gguf(
        &asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let model = &import.model;
    let cfg = model.config();
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.num_kv_heads()
        ),
        (576, 30, 9, 3)
    );
    assert_eq!(cfg.vocab_size, 49152);
    // The analysis' counts equal the real (imported) tensors'.
    let real: usize = model.params().iter().map(|(_, v)| v.elem_count()).sum();
    let analysis = model.analyze(2048);
    assert_eq!(analysis.params, real as u64);
    println!(
        "SmolLM2: {} parameters, {:.1} MFLOP/token forward, {:.1} KiB activations/token at 2048",
        analysis.params,
        analysis.forward_flops_per_token as f64 / 1e6,
        analysis.activation_bytes_per_token as f64 / 1024.0
    );

    // The tokenizer built from the GGUF metadata (byte-level BPE, SmolLM's digit-splitting
    // pre-tokenizer, control tokens kept whole).
    let meta = serde_json::Value::Object(import.tokenizer_metadata.clone().into_iter().collect());
    let tokenizer = TextTokenizer::from_gguf_metadata(&meta).unwrap();
    assert_eq!(tokenizer.vocab_size(), 49152);
    let prompt = "The capital of France is";
    let mut ids = tokenizer.encode(prompt).unwrap();
    assert_eq!(tokenizer.decode(&ids).unwrap(), prompt);

    // The same ids looked up by hand in the GGUF vocabulary (`Ġ` is a leading space; each of
    // these words is a single token in this vocabulary).
    let tokens: Vec<&str> = meta["tokenizer.ggml.tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let index: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (*t, i as u32))
        .collect();
    let by_hand: Vec<u32> = ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
        .iter()
        .map(|w| {
            *index
                .get(w)
                .unwrap_or_else(|| panic!("{w} not a single token"))
        })
        .collect();
    assert_eq!(ids, by_hand);
    // Control tokens stay whole; digits are split one by one as SmolLM2's tokenizer does.
    assert_eq!(
        tokenizer.encode("<|im_start|>user").unwrap(),
        vec![index["<|im_start|>"], index["user"]]
    );
    assert_eq!(tokenizer.encode("1603").unwrap().len(), 4);
    // Any text round-trips exactly, e.g. a paragraph of Shakespeare.
    let play = std::fs::read_to_string(asset("shakespeare/hamlet.md")).unwrap();
    let paragraph = play
        .split("\n\n")
        .find(|p| p.len() > 300)
        .expect("a paragraph of Hamlet");
    let encoded = tokenizer.encode(paragraph).unwrap();
    assert!(
        encoded.len() < paragraph.len() / 2,
        "{} tokens",
        encoded.len()
    );
    assert_eq!(tokenizer.decode(&encoded).unwrap(), paragraph);

    // Parity with candle-transformers' (non-quantized) llama on the same dequantized weights.
    let json = cfg.to_json_string().unwrap();
    let rc: ref_llama::LlamaConfig = serde_json::from_str(&json).unwrap();
    let rc = rc.into_config(false);
    let tensors: HashMap<String, Tensor> = model.params().tensors().into_iter().collect();
    let reference = ref_llama::Llama::load(
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        &rc,
    )
    .unwrap();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let ours = model.forward(&x).unwrap();
    let mut cache = ref_llama::Cache::new(false, DType::F32, &rc, &Device::Cpu).unwrap();
    let theirs = reference.forward(&x, 0, &mut cache).unwrap();
    let d = max_abs_diff(&ours.i((.., ids.len() - 1, ..)).unwrap(), &theirs);
    println!("SmolLM2 last-position logits: max |ours - candle-transformers| = {d:e}");
    assert!(d < 1e-4, "max |diff| = {d}");

    // Greedy continuation (no KV cache: the whole sequence is recomputed each step),
    // decoded with the GGUF tokenizer.
    let prompt_len = ids.len();
    for _ in 0..6 {
        let x = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&x).unwrap();
        let last = logits.i((0, ids.len() - 1)).unwrap();
        ids.push(last.argmax(0).unwrap().to_scalar::<u32>().unwrap());
    }
    let text = tokenizer.decode(&ids[prompt_len..]).unwrap();
    println!("{}", tokenizer.decode(&ids).unwrap());
    assert!(text.contains("Paris"), "continuation: {text:?}");
}

#[test]
#[ignore = "needs the all-MiniLM-L6-v2 asset (cargo xtask fetch-assets); run by .ci/run"]
fn real_assets_minilm_embeddings_match_candle_transformers_bert() {
    let dir = asset("minilm");
    let model = Bert::from_hf_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.head(), BertHead::None);
    // `inspect` (headers only) counts what candle's loader finds in the file.
    let inspection = eg_model::hf::inspect_dir(&dir, 128).unwrap();
    let loaded =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let real: usize = loaded.values().map(|t| t.elem_count()).sum();
    assert_eq!(inspection.params, real as u64);
    assert_eq!(inspection.tensors.len(), loaded.len());
    let bytes: usize = loaded
        .values()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum();
    assert_eq!(
        inspection.bytes_by_dtype.values().sum::<u64>(),
        bytes as u64
    );
    assert_eq!(model.config().num_hidden_layers, 6);

    // The reference loads the same files through its own path (candle's mmap loader).
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let rc: ref_bert::Config = serde_json::from_str(&text).unwrap();
    // SAFETY (test): the asset file is not modified while mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .unwrap();
    let reference = ref_bert::BertModel::load(vb, &rc).unwrap();

    let vocab = std::fs::read_to_string(dir.join("vocab.txt")).unwrap();
    let id = |w: &str| vocab.lines().position(|l| l == w).unwrap() as u32;
    let (cls, sep, pad) = (id("[CLS]"), id("[SEP]"), id("[PAD]"));
    let ids = Tensor::new(
        &[
            [cls, id("hello"), id("world"), sep, pad],
            [cls, id("paris"), id("is"), id("nice"), sep],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 0], [1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
    let tt = ids.zeros_like().unwrap();
    let ours = model.forward(&ids, Some(&tt), Some(&mask)).unwrap();
    let theirs = reference.forward(&ids, &tt, Some(&mask)).unwrap();
    // Compare the non-padding positions (padding rows are not meaningful).
    let d0 = max_abs_diff(&ours.i((0, 0..4)).unwrap(), &theirs.i((0, 0..4)).unwrap());
    let d1 = max_abs_diff(&ours.i(1).unwrap(), &theirs.i(1).unwrap());
    println!("MiniLM hidden states: max |diff| = {:e}", d0.max(d1));
    assert!(d0 < 1e-4 && d1 < 1e-4, "{d0} {d1}");
    let e = model.mean_pooled(&ours, Some(&mask), true).unwrap();
    let m = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    let r = (theirs.broadcast_mul(&m).unwrap().sum(1).unwrap())
        .broadcast_div(&m.sum(1).unwrap())
        .unwrap();
    let r = r
        .broadcast_div(&r.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap())
        .unwrap();
    let d = max_abs_diff(&e, &r);
    println!("MiniLM normalised embeddings: max |diff| = {d:e}");
    assert!(d < 1e-4, "{d}");
}

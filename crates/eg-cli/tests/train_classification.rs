//! End-to-end: `eg train` with `train.mode = "classification"` (issue 6) fine-tunes a tiny
//! random BERT written by the test on a labelled JSONL file: accuracy on the held-out
//! records, the label map, the quarantine of bad records, the exported model, resume, and
//! the embedding objective.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

use candle_core::{DType, Device};
use elastic_guardian::data::{BpeOptions, TextTokenizer};
use elastic_guardian::model::{Bert, BertConfig, BertHead};

const A: [&str; 6] = ["cat", "dog", "bird", "fish", "horse", "mouse"];
const B: [&str; 6] = ["red", "blue", "green", "gold", "black", "white"];

fn sentence(words: &[&str; 6], i: usize) -> String {
    (0..3 + i % 4)
        .map(|k| words[(i * 7 + k * 5 + k * k) % 6])
        .collect::<Vec<_>>()
        .join(" ")
}

/// A tiny random BERT and a byte-level BPE tokenizer with BERT's special tokens.
fn write_model(dir: &Path) {
    let mut texts: Vec<String> = (0..40).map(|i| sentence(&A, i)).collect();
    texts.extend((0..40).map(|i| sentence(&B, i)));
    let tok = TextTokenizer::train_bpe(
        texts.into_iter(),
        &BpeOptions {
            vocab_size: 320,
            min_frequency: 1,
            special_tokens: vec!["[PAD]".into(), "[CLS]".into(), "[SEP]".into()],
        },
    )
    .unwrap();
    let cfg = BertConfig {
        vocab_size: tok.vocab_size(),
        max_position_embeddings: 24,
        ..BertConfig::tiny_for_tests()
    };
    let bert = Bert::init(&cfg, BertHead::None, 3, DType::F32, &Device::Cpu).unwrap();
    bert.save_hf_dir(dir, None).unwrap();
    tok.save(&dir.join("tokenizer.json")).unwrap();
}

fn write_data(path: &Path) {
    let mut lines = Vec::new();
    for i in 0..160 {
        let (words, label) = if i % 2 == 0 {
            (&A, "animal")
        } else {
            (&B, "colour")
        };
        lines.push(serde_json::json!({"text": sentence(words, i / 2), "label": label}).to_string());
    }
    lines.push(r#"{"text": "no label"}"#.into());
    lines.push(r#"{"text": "a float label", "label": 0.5}"#.into());
    std::fs::write(path, lines.join("\n")).unwrap();
}

fn write_config(dir: &Path, model: &Path, data: &Path, extra: &str) -> std::path::PathBuf {
    let p = dir.join("run.toml");
    let text = format!(
        r#"[run]
dir = "{run}"
seed = 1

[model]
source = "{model}"

[data]
source = "jsonl"
paths = ["{data}"]
seq_len = 16
eval_fraction = 0.2
max_error_fraction = 0.1

[train]
mode = "classification"
max_steps = 30

[train.optimizer]
lr = 3e-3

[train.batch]
global_tokens = 256
micro_batch = 8

[train.eval]
every = 10
max_batches = 4

[train.checkpoints]
every = 10
{extra}
"#,
        run = dir.join("run").display(),
        model = model.display(),
        data = data.display(),
    );
    std::fs::write(&p, text).unwrap();
    p
}

fn eg_train(cfg: &Path, sets: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_eg"));
    c.arg("train").arg("--no-progress").arg("--config").arg(cfg);
    for s in sets {
        c.arg("--set").arg(s);
    }
    c.env_remove("EG_LOG")
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn eval_metric(stdout: &str, name: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("eval {name}: ")))
        .unwrap_or_else(|| panic!("no eval line in {stdout}"));
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[test]
fn eg_train_classification_learns_labels_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("bert");
    write_model(&model);
    let data = tmp.path().join("data.jsonl");
    write_data(&data);
    let cfg = write_config(tmp.path(), &model, &data, "");
    let out = eg_train(&cfg, &["train.max_steps=20"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let run = tmp.path().join("run");
    // The label map is sorted and saved; bad records are quarantined.
    let labels: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("labels.json")).unwrap()).unwrap();
    assert_eq!(labels["labels"], serde_json::json!(["animal", "colour"]));
    let q = std::fs::read_to_string(run.join("data-quarantine.jsonl")).unwrap();
    assert_eq!(q.lines().count(), 2, "{q}");
    assert!(text(&out.stderr).contains("classification into 2 classes"));

    // Resume from step 20 to 30: the run continues, accuracy is high on held-out records.
    let out = eg_train(&cfg, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("resuming from step 20"),
        "{}",
        text(&out.stderr)
    );
    let stdout2 = text(&out.stdout);
    let acc = eval_metric(&stdout2, "accuracy");
    assert!(acc >= 0.9, "held-out accuracy {acc}\n{stdout}\n{stdout2}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let evals = metrics
        .lines()
        .filter(|l| l.contains("\"event\":\"eval\""))
        .count();
    assert_eq!(evals, 3, "{metrics}");
    assert!(metrics.contains("\"accuracy\""));
    // The exported model is a classification BERT.
    let saved = Bert::from_hf_dir(&run.join("model"), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        saved.head(),
        BertHead::SequenceClassification { num_labels: 2, .. }
    ));
    assert!(run.join("model/tokenizer.json").exists());
}

#[test]
fn eg_train_embedding_objective_runs_on_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("bert");
    write_model(&model);
    let data = tmp.path().join("pairs.jsonl");
    let lines: Vec<String> = (0..64)
        .map(|i| {
            let w = if i % 2 == 0 { &A } else { &B };
            serde_json::json!({"text": sentence(w, i), "positive": sentence(w, i + 3)}).to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let cfg = write_config(
        tmp.path(),
        &model,
        &data,
        "\n[train.classification]\nobjective = \"embedding\"\n",
    );
    let out = eg_train(&cfg, &["train.max_steps=4", "train.eval.every=4"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let acc = eval_metric(&text(&out.stdout), "retrieval_accuracy");
    assert!((0.0..=1.0).contains(&acc));
    assert!(!tmp.path().join("run/labels.json").exists());
}

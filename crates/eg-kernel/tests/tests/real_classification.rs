//! Real asset (issue 6): all-MiniLM-L6-v2 fine-tuned for a few steps to tell Shakespeare's
//! lines from King James verses, with held-out lines from *other* plays and books; accuracy
//! must end well above chance. Needs `cargo xtask fetch-assets`; run by .ci/run
//! (`--ignored real_`). Prints the measured step time and accuracies.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use eg_data::{LabeledDataset, LabeledOptions, Loader, Placement, TextTokenizer, TokenDataset};
use eg_kernel::{
    BertTask, Callback, Classification, EvalSet, Optimizer, Schedule, StepMetrics, Trainer,
    TrainerOptions,
};
use eg_model::{Bert, Pooling};

use crate::tests::common::{adamw, shapes};

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

/// Spoken lines of a play (no speaker names, stage directions or headings), 30+ characters.
fn play_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| l.len() >= 30 && !l.starts_with(['*', '_', '#', '[', '<', '|']))
        .map(str::to_string)
        .collect()
}

/// KJV verses without their reference (`Ge1:1 In the beginning ...`), 30+ characters.
fn verses(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(_, t)| t.trim().to_string()))
        .filter(|t| t.len() >= 30)
        .collect()
}

fn every<T: Clone>(v: &[T], n: usize) -> Vec<T> {
    let step = (v.len() / n).max(1);
    v.iter().step_by(step).take(n).cloned().collect()
}

fn jsonl(path: &Path, shakespeare: &[String], kjv: &[String]) {
    let mut lines = Vec::new();
    for (s, k) in shakespeare.iter().zip(kjv) {
        lines.push(serde_json::json!({"text": s, "label": "shakespeare"}).to_string());
        lines.push(serde_json::json!({"text": k, "label": "kjv"}).to_string());
    }
    std::fs::write(path, lines.join("\n")).unwrap();
}

/// User + system CPU seconds of this process (Linux `/proc/self/stat`, clock ticks of 1/100 s).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

struct Times(Arc<std::sync::Mutex<Vec<f64>>>);

impl Callback for Times {
    fn on_step_end(&mut self, m: &StepMetrics) {
        self.0.lock().unwrap().push(m.step_secs);
    }
}

#[test]
#[ignore = "needs all-MiniLM-L6-v2, Shakespeare and KJV (cargo xtask fetch-assets); run by .ci/run"]
fn real_minilm_learns_shakespeare_vs_kjv_above_chance() {
    let dir = asset("minilm");
    let plays = asset("shakespeare");
    let train_plays = ["hamlet.md", "macbeth.md", "othello.md", "king-lear.md"];
    let eval_plays = ["the-tempest.md", "twelfth-night.md", "coriolanus.md"];
    let lines = |names: &[&str]| -> Vec<String> {
        names
            .iter()
            .flat_map(|n| play_lines(&plays.join(n)))
            .collect()
    };
    let kjv = verses(&asset("kjv-verses.txt"));
    let (old, new) = kjv.split_at(kjv.len() / 2);
    let tmp = tempfile::tempdir().unwrap();
    let (train_file, eval_file) = (
        tmp.path().join("train.jsonl"),
        tmp.path().join("eval.jsonl"),
    );
    jsonl(
        &train_file,
        &every(&lines(&train_plays), 160),
        &every(old, 160),
    );
    jsonl(&eval_file, &every(&lines(&eval_plays), 64), &every(new, 64));

    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let o = LabeledOptions::classification(32)
        .with_bert_specials(&tok)
        .unwrap();
    let train = LabeledDataset::read_jsonl(&[train_file], &tok, &o).unwrap();
    let fixed = LabeledOptions {
        label_map: train.label_map().cloned(),
        ..o
    };
    let eval = LabeledDataset::read_jsonl(&[eval_file], &tok, &fixed).unwrap();
    assert_eq!((train.len(), eval.len()), (320, 128));
    assert_eq!(train.label_map().unwrap().names(), ["kjv", "shakespeare"]);
    let (train, eval) = (Arc::new(train), Arc::new(eval));

    let bert = Bert::from_hf_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let model = BertTask::new(bert.with_classifier(2, Pooling::Mean, 1).unwrap(), 0.1).unwrap();
    let steps = 20;
    let opts = TrainerOptions {
        max_steps: steps,
        micro_batch_rows: 16,
        schedule: Schedule {
            peak: 1e-4,
            warmup: 2,
            total: steps,
            min_ratio: 0.1,
            shape: eg_kernel::Shape::Cosine,
        },
        eval_max_batches: 8,
        ..TrainerOptions::default()
    };
    let opt = Optimizer::new(adamw(), 0.01, &shapes(&model)).unwrap();
    let loader = Loader::new(
        train.clone(),
        train.loader_options(16, 7, true, None),
        Placement::SINGLE,
    )
    .unwrap();
    let mut t = Trainer::new(model, opt, loader, opts)
        .unwrap()
        .with_objective(Box::new(Classification {
            pad_id: tok.token_id("[PAD]").unwrap(),
        }))
        .with_eval(EvalSet {
            opts: eval.loader_options(16, 0, false, Some(1)),
            data: eval,
        });
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    t.add_callback(Box::new(Times(times.clone())));
    let before = t.evaluate().unwrap();
    let (t0, c0) = (Instant::now(), cpu_secs());
    let after = t.fit().unwrap().eval.unwrap();
    let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_secs() - c0);
    let times = times.lock().unwrap();
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let (a0, a1) = (before.extra["accuracy"], after.extra["accuracy"]);
    println!(
        "MiniLM Shakespeare vs KJV: {steps} steps of 16 examples (32 tokens), mean step {mean:.3} s, \
         wall {wall:.1} s and CPU {cpu:.1} s (both with the final eval), held-out accuracy {a0:.3} -> {a1:.3}, loss {:.4} -> {:.4}, {} threads",
        before.loss,
        after.loss,
        eg_kernel::compute_threads()
    );
    assert_eq!(after.tokens, 128);
    assert!(a1 >= 0.8, "held-out accuracy {a0} -> {a1}");
    assert!(after.loss < before.loss);
}

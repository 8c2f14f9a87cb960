//! End-to-end tests of `eg train`'s modes (issue 6): SFT on chat JSONL (prompt tokens masked,
//! best-fit packing), pre-tokenized `tokens` sources from `eg data prepare`, and DPO on
//! preference pairs (rewards rise, exact resume). Each runs the debug `eg` binary on the
//! builtin micro model for a few seconds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use elastic_guardian::data::{self, TokenDataset};

fn eg(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_eg"));
    c.args(args).env_remove("EG_LOG").env("NO_COLOR", "1");
    c
}

fn train(run: &Path, sets: &[String]) -> Output {
    let mut c = eg(&["train", "--no-progress"]);
    let dir = format!("run.dir={}", run.display());
    for s in [
        dir.as_str(),
        "model.source=builtin:micro-llama",
        "train.checkpoints.every=4",
        "train.eval.max_batches=1",
        "train.guards.spike_detection=false",
    ] {
        c.arg("--set").arg(s);
    }
    for s in sets {
        c.arg("--set").arg(s);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "eg train failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn steps(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "step")
        .collect()
}

fn mean(v: &[serde_json::Value], key: &[&str]) -> f64 {
    let get = |x: &serde_json::Value| key.iter().fold(x, |x, k| &x[k]).as_f64().unwrap();
    v.iter().map(get).sum::<f64>() / v.len() as f64
}

fn path_list(p: &Path) -> String {
    format!("[{:?}]", p.display().to_string())
}

/// Chats whose assistant answers follow a pattern the model can learn quickly.
fn write_chats(path: &Path, n: usize) {
    let words = ["red", "green", "blue", "black", "white", "amber"];
    let mut s = String::new();
    for i in 0..n {
        let w = words[i % words.len()];
        let conv = serde_json::json!({"messages": [
            {"role": "user", "content": format!("what colour is thing {i}?")},
            {"role": "assistant", "content": format!("it is {w} {w}.")},
        ]});
        s.push_str(&conv.to_string());
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

/// The prepared shards under `cache` (the one directory with a manifest).
fn prepared_dir(cache: &Path) -> PathBuf {
    std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("manifest.json").exists())
        .unwrap_or_else(|| panic!("no prepared shards in {}", cache.display()))
}

/// `train.mode = "sft"`: chat JSONL, the loss falls, and the prompt (everything up to the
/// assistant's answer) is out of the loss.
#[test]
fn sft_trains_on_chat_jsonl_with_prompt_tokens_masked() {
    let dir = tempfile::tempdir().unwrap();
    let chats = dir.path().join("chats.jsonl");
    write_chats(&chats, 300);
    let run = dir.path().join("run");
    let out = train(
        &run,
        &[
            "train.mode=sft".into(),
            "data.source=jsonl".into(),
            format!("data.paths={}", path_list(&chats)),
            "data.field=messages".into(),
            "data.packing=best-fit".into(),
            "data.seq_len=128".into(),
            "data.eval_fraction=0.05".into(),
            "train.batch.global_tokens=1024".into(),
            "train.max_steps=30".into(),
            "train.optimizer.lr=0.003".into(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("eval perplexity"), "{stdout}");
    let s = steps(&run);
    assert_eq!(s.len(), 30);
    let (first, last) = (mean(&s[..3], &["loss"]), mean(&s[27..], &["loss"]));
    assert!(last < 0.7 * first, "loss {first} -> {last}");

    // What it trained on: every sample has a prompt, and the loader masks exactly it.
    let shards =
        data::TokenShards::open_dir(&prepared_dir(&run.join("cache")), data::ShardAccess::Mapped)
            .unwrap();
    let tok = data::TextTokenizer::from_file(&run.join("tokenizer.json")).unwrap();
    let first_sample = {
        let mut b = vec![0; shards.sample_len(0).unwrap()];
        shards.read_tokens(0, 0, &mut b).unwrap();
        b
    };
    let p = shards.prompt_len(0).unwrap();
    assert!(p > 0 && p < first_sample.len());
    let prompt = tok.decode(&first_sample[..p]).unwrap();
    let answer = tok.decode(&first_sample[p..]).unwrap();
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt:?}");
    assert!(prompt.contains("what colour is thing 0?"), "{prompt:?}");
    assert_eq!(answer, "it is red red.<|im_end|>\n");
    // Longer rows than the run's, so that several chats share a row.
    let opts = data::LoaderOptions {
        seq_len: 512,
        rows_per_step: 8,
        packing: data::Packing::BestFit { window: 64 },
        eos_id: tok.token_id("<|endoftext|>"),
        seed: 1,
        ..data::LoaderOptions::default()
    };
    let shards: std::sync::Arc<dyn TokenDataset> = std::sync::Arc::new(shards);
    let mut loader = data::Loader::new(shards.clone(), opts, data::Placement::SINGLE).unwrap();
    let b = loader.next_batch().unwrap().unwrap();
    let mut segments = 0;
    for (k, w) in b.cu_seqlens.windows(2).enumerate() {
        if b.segment_is_padding[k] {
            continue;
        }
        let (s, e) = (w[0] as usize, w[1] as usize);
        let pos0 = b.position_ids[s];
        assert_eq!(pos0, 0, "segments start at position 0");
        // Find the sample of this segment by its tokens.
        let seg = &b.input_ids[s..e];
        let id = (0..shards.len())
            .find(|&id| {
                let mut t = vec![0; shards.sample_len(id).unwrap()];
                shards.read_tokens(id, 0, &mut t).unwrap();
                seg.starts_with(&t)
            })
            .unwrap();
        let p = shards.prompt_len(id).unwrap();
        assert!(
            b.loss_mask[s..s + p].iter().all(|&m| m == 0),
            "prompt in the loss"
        );
        assert!(
            b.loss_mask[s + p..e].iter().all(|&m| m == 1),
            "answer not in the loss"
        );
        segments += 1;
    }
    assert!(
        segments > 8,
        "best-fit packing puts several chats in a row ({segments} in 8 rows)"
    );
}

/// `data.source = "tokens"`: shards from `eg data prepare`, with and without a tokenizer.
#[test]
fn tokens_source_trains_on_prepared_shards() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("corpus.txt");
    let para = "the quick brown fox jumps over the lazy dog and runs away.\n\n";
    std::fs::write(&text, para.repeat(200)).unwrap();
    let tok = dir.path().join("tok.json");
    let cache = dir.path().join("cache");
    for args in [
        vec![
            "data",
            "train-tokenizer",
            "--vocab",
            "300",
            "--out",
            tok.to_str().unwrap(),
            text.to_str().unwrap(),
        ],
        vec![
            "data",
            "prepare",
            "--tokenizer",
            tok.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
            text.to_str().unwrap(),
        ],
    ] {
        let out = eg(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let shards = prepared_dir(&cache);
    for with_tokenizer in [true, false] {
        let run = dir.path().join(format!("run-{with_tokenizer}"));
        let mut sets = vec![
            "data.source=tokens".to_string(),
            format!("data.paths={}", path_list(&shards)),
            "data.seq_len=32".into(),
            "data.eval_fraction=0".into(),
            "train.batch.global_tokens=256".into(),
            "train.max_steps=12".into(),
            "train.optimizer.lr=0.005".into(),
        ];
        if with_tokenizer {
            sets.push(format!("data.tokenizer={}", tok.display()));
        }
        let out = train(&run, &sets);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("token shards in"), "{err}");
        let s = steps(&run);
        assert_eq!(s.len(), 12);
        let (first, last) = (mean(&s[..2], &["loss"]), mean(&s[10..], &["loss"]));
        assert!(
            last < 0.8 * first,
            "tokenizer {with_tokenizer}: loss {first} -> {last}"
        );
    }
}

/// Preference pairs: prompts as plain text and as chat messages, custom field names.
fn write_pairs(path: &Path, n: usize) {
    let mut s = String::new();
    for i in 0..n {
        let q = format!("question {i}: which is better?");
        let prompt = if i % 2 == 0 {
            serde_json::json!(q)
        } else {
            serde_json::json!([{"role": "user", "content": q}])
        };
        let rec = serde_json::json!({
            "q": prompt,
            "good": format!("yes indeed, number {} is good", i % 7),
            "bad": format!("no way, {} bad bad", i % 5),
        });
        s.push_str(&rec.to_string());
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

fn dpo_sets(dir: &Path, steps: u64) -> Vec<String> {
    let pairs = dir.join("pairs.jsonl");
    if !pairs.exists() {
        write_pairs(&pairs, 40);
        let texts: Vec<String> = std::fs::read_to_string(&pairs)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        let opts = data::BpeOptions {
            vocab_size: 400,
            min_frequency: 1,
            special_tokens: vec![
                "<|endoftext|>".into(),
                "<|im_start|>".into(),
                "<|im_end|>".into(),
            ],
        };
        data::TextTokenizer::train_bpe(texts.iter(), &opts)
            .unwrap()
            .save(&dir.join("tok.json"))
            .unwrap();
    }
    vec![
        "train.mode=dpo".into(),
        "data.source=jsonl".into(),
        format!("data.paths={}", path_list(&pairs)),
        format!("data.tokenizer={}", dir.join("tok.json").display()),
        "data.seq_len=48".into(),
        "data.eval_fraction=0".into(),
        "train.batch.global_tokens=384".into(),
        "train.batch.micro_batch=4".into(),
        format!("train.max_steps={steps}"),
        "train.optimizer.lr=0.003".into(),
        "train.dpo.beta=0.5".into(),
        // A constant rate: the schedule would otherwise depend on max_steps, which the
        // resume test changes between the two halves.
        "train.schedule.kind=constant".into(),
        "train.schedule.warmup_steps=0".into(),
        "train.dpo.prompt_field=q".into(),
        "train.dpo.chosen_field=good".into(),
        "train.dpo.rejected_field=bad".into(),
    ]
}

/// `train.mode = "dpo"`: the implicit reward's accuracy and margin rise, and a run stopped
/// half-way and resumed logs the same losses and ends with the same weights, bitwise.
#[test]
fn dpo_raises_rewards_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full");
    let out = train(&full, &dpo_sets(dir.path(), 16));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("40 preference pairs"), "{err}");
    let s = steps(&full);
    assert_eq!(s.len(), 16);
    assert!((s[0]["loss"].as_f64().unwrap() - 2f64.ln()).abs() < 1e-6);
    let (a0, a1) = (
        mean(&s[..3], &["extra", "reward_accuracy"]),
        mean(&s[13..], &["extra", "reward_accuracy"]),
    );
    let m1 = mean(&s[13..], &["extra", "reward_margin"]);
    assert!(a1 > a0 && a1 > 0.8, "accuracy {a0} -> {a1}");
    assert!(m1 > 0.0, "margin {m1}");

    let part = dir.path().join("part");
    train(&part, &dpo_sets(dir.path(), 8));
    train(&part, &dpo_sets(dir.path(), 16));
    let bits = |r: &Path| -> Vec<u64> {
        steps(r)
            .iter()
            .map(|v| v["loss"].as_f64().unwrap().to_bits())
            .collect()
    };
    assert_eq!(bits(&part), bits(&full));
    let w =
        |r: &Path| std::fs::read(r.join("checkpoints/step-00000016/model.safetensors")).unwrap();
    assert!(w(&part) == w(&full), "final weights differ");
}

/// `train.mode = "dpo"` with `data.eval_fraction`: the last pairs are held out and evaluated
/// every `train.eval.every` steps; `metrics.jsonl` gets eval lines with the mean pair loss
/// and the reward accuracy on them.
#[test]
fn dpo_evaluates_held_out_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut sets = dpo_sets(dir.path(), 8);
    sets.extend([
        "data.eval_fraction=0.2".to_string(),
        "train.eval.every=4".to_string(),
        "train.eval.max_batches=10".to_string(),
    ]);
    let out = train(&run, &sets);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("40 preference pairs"), "{err}");
    assert!(err.contains("8 held out"), "{err}");
    let evals: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "eval")
        .collect();
    let at: Vec<u64> = evals.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(at, [4, 8], "{evals:?}");
    for e in &evals {
        // All 8 held-out pairs (4 per batch), the mean pair loss, the reward accuracy.
        assert_eq!(e["tokens"], 8, "{e}");
        let loss = e["loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{e}");
        let acc = e["extra"]["reward_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{e}");
        assert!(e["extra"]["reward_margin"].is_number(), "{e}");
    }
    assert_eq!(steps(&run).len(), 8);
}

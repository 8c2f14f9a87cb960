//! `eg train` with `train.mode = "classification"`: fine-tune a BERT encoder (e.g.
//! all-MiniLM-L6-v2) for sequence classification or sentence embeddings.
//!
//! The model is a Hugging Face BERT directory (`model.source`); texts are encoded with
//! `data.tokenizer` or the directory's `tokenizer.json` and framed `[CLS] … [SEP]`, at most
//! `data.seq_len` tokens each. Records come from JSONL (`data.paths`): `data.field` is the
//! text (the anchor for embeddings), `train.classification.label_field` the label (an integer
//! class id or a class name; names get ids in sorted order, saved in `<run.dir>/labels.json`
//! and reused on resume), `positive_field` the positive text for embeddings. A global batch
//! holds `train.batch.global_tokens / data.seq_len` examples; `data.eval_fraction` of them
//! (a seeded choice) is held out and evaluated with accuracy (classification) or in-batch
//! retrieval accuracy (embeddings). The fine-tuned model is saved as a Hugging Face directory
//! in `<run.dir>/model` at the end.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};
use elastic_guardian::config::Config;
use elastic_guardian::config::wire::{EncoderObjective, Pooling as WPooling};
use elastic_guardian::data::{
    self, FieldPath, LabelMap, LabeledDataset, LabeledKind, LabeledOptions, Loader, Placement,
    TokenDataset,
};
use elastic_guardian::kernel::{
    self, BertTask, Callback, Classification, Embedding, EvalMetrics, EvalSet, Optimizer,
    OptimizerKind, StepMetrics, TrainModel, Trainer,
};
use elastic_guardian::model::{Bert, Pooling};
use indicatif::{ProgressBar, ProgressStyle};

use super::TrainArgs;
use crate::exit;

/// The metric the objective reports.
fn metric_name(o: EncoderObjective) -> &'static str {
    match o {
        EncoderObjective::Embedding => "retrieval_accuracy",
        _ => "accuracy",
    }
}

struct Progress {
    bar: ProgressBar,
    t0: Instant,
    step0: u64,
    metric: &'static str,
}

impl Callback for Progress {
    fn on_step_end(&mut self, m: &StepMetrics) {
        let secs = self.t0.elapsed().as_secs_f64().max(1e-9);
        let sps = (m.step - self.step0) as f64 / secs;
        self.bar.set_position(m.step);
        let acc = m.extra.get(self.metric).copied().unwrap_or(f64::NAN);
        self.bar.set_message(format!(
            "loss {:.4}  batch {} {:.3}  lr {:.2e}  {:.2} steps/s",
            m.loss, self.metric, acc, m.lr, sps
        ));
    }

    fn on_eval(&mut self, e: &EvalMetrics) {
        let acc = e.extra.get(self.metric).copied().unwrap_or(f64::NAN);
        self.bar.println(format!(
            "step {:>6}  eval loss {:.4}  {} {:.4} ({} examples)",
            e.step, e.loss, self.metric, acc, e.tokens
        ));
    }

    fn on_anomaly(&mut self, a: &kernel::Anomaly) {
        self.bar.println(format!("guard: {a:?}"));
    }
}

/// Runs a classification-mode `eg train`.
pub(super) fn run(
    cfg: &Config,
    args: &TrainArgs,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<ExitCode> {
    let cl = &cfg.train.classification;
    let dir = crate::model_cmd::model_dir(cfg)?.ok_or(exit::Unsupported {
        what: "builtin models with `train.mode = \"classification\"` (the builtin shapes are Llama; point model.source at a BERT directory)",
    })?;
    let bert = Bert::from_hf_dir(&dir, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading the BERT model in {}", dir.display()))?;
    let tok_path = cfg
        .data
        .tokenizer
        .clone()
        .unwrap_or_else(|| dir.join("tokenizer.json"));
    let tokenizer = data::TextTokenizer::from_file(&tok_path)
        .with_context(|| format!("loading the tokenizer {}", tok_path.display()))?;
    let pad_id = tokenizer.token_id("[PAD]").unwrap_or(0);

    // Data: labelled JSONL, a seeded held-out split.
    let files = data::expand_inputs(&cfg.data.paths)?;
    let run_dir = &cfg.run.dir;
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let labels_path = run_dir.join("labels.json");
    let saved_map = if labels_path.exists() {
        Some(LabelMap::load(&labels_path)?)
    } else {
        None
    };
    let seq = cfg.data.seq_len.0 as usize;
    let base = match cl.objective {
        EncoderObjective::Embedding => LabeledOptions::pairs(seq),
        _ => LabeledOptions::classification(seq),
    };
    let lopts = LabeledOptions {
        text_field: FieldPath::parse(&cfg.data.field.join(".")),
        label_field: FieldPath::parse(&cl.label_field),
        positive_field: FieldPath::parse(&cl.positive_field),
        num_labels: cl.num_labels.map(|n| n as usize),
        label_map: saved_map.clone(),
        stream: data::StreamOptions {
            max_error_fraction: cfg.data.max_error_fraction.get(),
            quarantine: Some(run_dir.join("data-quarantine.jsonl")),
            ..data::StreamOptions::default()
        },
        ..base.with_bert_specials(&tokenizer)?
    };
    let all = LabeledDataset::read_jsonl(&files, &tokenizer, &lopts)?;
    if saved_map.is_none()
        && let Some(m) = all.label_map()
    {
        m.save(&labels_path)?;
    }
    let (train, eval) = all.split_holdout(cfg.data.eval_fraction.get(), cfg.run.seed)?;
    let (train, eval) = (Arc::new(train), Arc::new(eval));
    let data_desc = match all.kind() {
        LabeledKind::Classification => format!(
            "{} labelled records in {} file(s) ({} held out; {} bad, see data-quarantine.jsonl); classes {}",
            all.len(),
            files.len(),
            eval.len(),
            all.stats().bad,
            data::labeled::describe_counts(all.label_map(), &all.label_counts()?)
        ),
        LabeledKind::Pairs => format!(
            "{} (anchor, positive) pairs in {} file(s) ({} held out; {} bad)",
            all.len(),
            files.len(),
            eval.len(),
            all.stats().bad
        ),
    };

    // Model.
    let (model, objective_desc): (BertTask, String) = match cl.objective {
        EncoderObjective::Embedding => (
            BertTask::new(bert, 0.0)?,
            format!(
                "embedding fine-tuning (in-batch negatives, scale {})",
                cl.scale
            ),
        ),
        _ => {
            let pooling = match cl.pooling {
                WPooling::Cls => Pooling::Cls,
                _ => Pooling::Mean,
            };
            let m = bert.with_classifier(all.num_labels(), pooling, cfg.run.seed)?;
            (
                BertTask::new(m, cl.dropout.get())?,
                format!(
                    "classification into {} classes ({} pooling, dropout {})",
                    all.num_labels(),
                    pooling.name(),
                    cl.dropout.get()
                ),
            )
        }
    };

    let rows = (cfg.train.batch.global_tokens.0 as usize / seq).max(1);
    let micro = cfg
        .train
        .batch
        .micro_batch
        .map(|m| m.get() as usize)
        .unwrap_or_else(|| rows.min((4096 / train.row_len()).max(1)));
    let loader_opts = train.loader_options(rows, cfg.run.seed, cfg.data.shuffle, None);
    let loader = Loader::new(train.clone(), loader_opts, Placement::SINGLE)?;
    let (kind, peak, wd): (OptimizerKind, f64, f64) =
        OptimizerKind::from_config(&cfg.train.optimizer)?;
    let shapes: Vec<(String, Vec<usize>)> = model
        .named_params()
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    let n_params: usize = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let optimizer = Optimizer::new(kind, wd, &shapes)?;
    let max_steps = cfg.train.max_steps.0;
    let c = &cfg.train.checkpoints;
    let opts = super::trainer_options(cfg, micro, peak)?;
    let mut trainer = Trainer::new(model, optimizer, loader, opts)?;
    trainer = match cl.objective {
        EncoderObjective::Embedding => trainer.with_objective(Box::new(Embedding {
            pad_id,
            scale: cl.scale,
        })),
        _ => trainer.with_objective(Box::new(Classification { pad_id })),
    };
    if !eval.is_empty() {
        trainer = trainer.with_eval(EvalSet {
            opts: eval.loader_options(rows, cfg.run.seed, false, Some(1)),
            data: eval.clone(),
        });
    }

    let resumed = super::resume_and_forward_stop(&mut trainer, cfg, &c.dir, stop)?;

    let start = trainer.state().step;
    if start >= max_steps {
        println!(
            "the run in {} is already complete ({start} of {max_steps} steps); raise train.max_steps to continue",
            run_dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "eg train: BERT {} ({:.2}M parameters), {objective_desc}, on {data_desc}; {max_steps} steps of {rows} examples (micro-batch {micro}, texts up to {seq} tokens), {} threads",
        dir.display(),
        n_params as f64 / 1e6,
        kernel::compute_threads(),
    );
    match resumed {
        Some(s) => eprintln!("resuming from step {s} in {}", c.dir.display()),
        None => eprintln!("run directory: {}", run_dir.display()),
    }
    let bar = if args.no_progress {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(max_steps)
    };
    bar.set_style(ProgressStyle::with_template(
        "{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
    )?);
    bar.set_position(start);
    bar.reset_eta();
    let metric = metric_name(cl.objective);
    trainer.add_callback(Box::new(Progress {
        bar: bar.clone(),
        t0: Instant::now(),
        step0: start,
        metric,
    }));
    let report = trainer.fit()?;
    bar.finish_and_clear();
    if report.stopped {
        eprintln!("stopped by signal at step {}", report.steps);
    }
    if let Some(l) = report.last_loss {
        println!("final training loss: {l:.4} (step {})", report.steps);
    }
    if let Some(e) = &report.eval {
        println!(
            "eval {metric}: {:.4} (loss {:.4} over {} held-out examples)",
            e.extra.get(metric).copied().unwrap_or(f64::NAN),
            e.loss,
            e.tokens
        );
    }
    let s = &report.state;
    if s.nonfinite_skips + s.spikes + s.rollbacks > 0 {
        println!(
            "guards: {} non-finite steps skipped, {} spikes, {} rollbacks, {} batches quarantined",
            s.nonfinite_skips,
            s.spikes,
            s.rollbacks,
            s.quarantine.len()
        );
    }
    if let Some(ck) = &report.checkpoint {
        println!("checkpoint: {}", ck.display());
    }
    if !report.stopped {
        let out = run_dir.join("model");
        trainer.model().bert().save_hf_dir(&out, None)?;
        let bytes =
            std::fs::read(&tok_path).with_context(|| format!("reading {}", tok_path.display()))?;
        kernel::fsio::write_atomic(&out.join("tokenizer.json"), &bytes)?;
        println!("fine-tuned model: {}", out.display());
    }
    println!("metrics: {}", run_dir.join("metrics.jsonl").display());
    Ok(ExitCode::SUCCESS)
}

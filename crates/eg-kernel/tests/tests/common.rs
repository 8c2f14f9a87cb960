//! Tiny fixtures: a 2-layer hidden-32 Llama and generated token data.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor, Var};
use eg_data::{InMemoryDataset, Loader, LoaderOptions, Placement};
use eg_kernel::{
    CheckpointOptions, EvalSet, Optimizer, OptimizerKind, Schedule, TrainModel, Trainer,
    TrainerOptions,
};
use eg_model::{Llama, LlamaConfig};

pub(crate) const SEQ: usize = 16;

pub(crate) fn dataset(seed: u32) -> Arc<InMemoryDataset> {
    // Documents of a repetitive "language" over 60 tokens so the loss falls quickly.
    let docs = (0..200u32).map(|i| {
        let len = 5 + ((i * 7 + seed) % 23) as usize;
        (0..len as u32)
            .map(|j| (i % 5 + j * (1 + i % 3)) % 60 + 1)
            .collect::<Vec<u32>>()
    });
    Arc::new(InMemoryDataset::from_docs(docs))
}

pub(crate) fn loader_opts(rows: usize) -> LoaderOptions {
    LoaderOptions {
        seq_len: SEQ,
        rows_per_step: rows,
        eos_id: Some(0),
        seed: 7,
        ..LoaderOptions::default()
    }
}

pub(crate) fn model() -> Llama {
    Llama::init(&LlamaConfig::tiny_for_tests(), 3, DType::F32, &Device::Cpu).unwrap()
}

pub(crate) fn shapes<M: TrainModel>(m: &M) -> Vec<(String, Vec<usize>)> {
    m.named_params()
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect()
}

pub(crate) fn adamw() -> OptimizerKind {
    OptimizerKind::AdamW {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
    }
}

pub(crate) fn options(max_steps: u64, micro: usize) -> TrainerOptions {
    TrainerOptions {
        max_steps,
        micro_batch_rows: micro,
        schedule: Schedule {
            peak: 3e-3,
            warmup: 2,
            total: max_steps,
            min_ratio: 0.1,
            shape: eg_kernel::Shape::Cosine,
        },
        ..TrainerOptions::default()
    }
}

pub(crate) fn with_checkpoints(mut o: TrainerOptions, dir: &Path, every: u64) -> TrainerOptions {
    o.checkpoints = Some(CheckpointOptions {
        dir: dir.join("checkpoints"),
        every,
        keep_last: 100,
        keep_best: 0,
        background: true,
        write: Default::default(),
    });
    o.snapshot_every = every;
    o.run_dir = Some(dir.to_path_buf());
    o
}

pub(crate) fn trainer<M: TrainModel>(m: M, rows: usize, o: TrainerOptions) -> Trainer<M> {
    let opt = Optimizer::new(adamw(), 0.01, &shapes(&m)).unwrap();
    let loader = Loader::new(dataset(0), loader_opts(rows), Placement::SINGLE).unwrap();
    Trainer::new(m, opt, loader, o).unwrap().with_eval(EvalSet {
        data: dataset(1),
        opts: LoaderOptions {
            shuffle: false,
            epochs: Some(1),
            ..loader_opts(rows)
        },
    })
}

pub(crate) fn weights<M: TrainModel>(m: &M) -> Vec<(String, Vec<f32>)> {
    m.named_params()
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect()
}

/// Step losses of `metrics.jsonl`: (step, loss bits).
pub(crate) fn logged_losses(run: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "step")
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap().to_bits(),
            )
        })
        .collect()
}

/// What to do to the logits of a forward call.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fault {
    Nan,
    Scale(f64),
}

/// A Llama whose forward calls (counted from 0, eval calls included) can be corrupted.
pub(crate) struct Faulty {
    pub(crate) inner: Llama,
    pub(crate) calls: Arc<AtomicU64>,
    pub(crate) faults: Vec<(u64, Fault)>,
    pub(crate) extra: Option<Var>,
}

impl Faulty {
    pub(crate) fn new(faults: Vec<(u64, Fault)>) -> Self {
        Self {
            inner: model(),
            calls: Arc::new(AtomicU64::new(0)),
            faults,
            extra: None,
        }
    }
}

impl TrainModel for Faulty {
    fn named_params(&self) -> Vec<(String, Var)> {
        let mut p = self.inner.named_params();
        if let Some(v) = &self.extra {
            p.push(("unused.weight".to_string(), v.clone()));
        }
        p
    }

    fn logits(&self, ids: &Tensor) -> eg_kernel::Result<Tensor> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let logits = self.inner.forward(ids)?;
        Ok(match self.faults.iter().find(|(c, _)| *c == n) {
            Some((_, Fault::Nan)) => (logits * f64::NAN)?,
            Some((_, Fault::Scale(s))) => (logits * *s)?,
            None => logits,
        })
    }
}

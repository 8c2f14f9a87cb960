//! `eg train`: build the model, data and loop from the configuration, resume from the newest
//! valid checkpoint, train with a progress bar, stop cleanly on SIGTERM/SIGINT.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};
use elastic_guardian::config::{self, Config, ModelSource};
use elastic_guardian::data::{self, Loader, LoaderOptions, Packing, Placement};
use elastic_guardian::kernel::{
    self, Callback, CheckpointOptions, EvalMetrics, EvalSet, Optimizer, OptimizerKind, Schedule,
    StepMetrics, TrainModel, Trainer, TrainerOptions,
};
use elastic_guardian::model::{self, Llama};
use indicatif::{ProgressBar, ProgressStyle};

use crate::exit;

mod modes;

mod encoder;

mod memory;

/// Bytes of generated text for `data.source = "embedded"`.
const EMBEDDED_BYTES: usize = 1_500_000;

/// Arguments of `eg train`.
#[derive(Debug, clap::Args)]
pub(crate) struct TrainArgs {
    /// Configuration files, later ones win.
    #[arg(long = "config", short = 'c', value_name = "FILE")]
    pub(crate) config: Vec<PathBuf>,
    /// Override one key: `key.path=value` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(crate) set: Vec<String>,
    /// Do not draw a progress bar (also off when stderr is not a terminal).
    #[arg(long)]
    pub(crate) no_progress: bool,
}

struct Data {
    train: Arc<dyn data::TokenDataset>,
    eval: Option<Arc<dyn data::TokenDataset>>,
    vocab: usize,
    eos: Option<u32>,
    description: String,
}

/// The configured data: the main source, mixed by weight with every `[[data.mix]]` source
/// (tokenized with the same tokenizer; each holds out its own `data.eval_fraction`).
fn load_data(cfg: &Config) -> anyhow::Result<Data> {
    let main = load_source(cfg)?;
    if cfg.data.mix.is_empty() {
        return Ok(main);
    }
    let mut train = Vec::new();
    let mut eval = Vec::new();
    let mut description = main.description.clone();
    for (i, m) in cfg.data.mix.iter().enumerate() {
        let mut c = cfg.clone();
        c.data.source = m.source;
        c.data.paths = m.paths.clone();
        c.data.field = m.field.clone();
        c.data.mix = Vec::new();
        let d = load_source(&c).with_context(|| format!("data.mix.{i}"))?;
        if d.vocab != main.vocab {
            return Err(data::Error::InvalidOption {
                option: "data.mix",
                reason: format!(
                    "source {i} has a vocabulary of {} tokens, the main source {}: mixed sources \
                     must share the tokenizer",
                    d.vocab, main.vocab
                ),
            }
            .into());
        }
        description.push_str(&format!(
            " + mix {i} (weight {}): {}",
            m.weight, d.description
        ));
        train.push(d.train);
        eval.push(d.eval);
    }
    let eval = match (&main.eval, eval.iter().all(Option::is_some)) {
        (Some(e), true) => Some(crate::augment::mixture(
            cfg,
            e.clone(),
            eval.into_iter().flatten().collect(),
        )?),
        _ => main.eval.clone(),
    };
    Ok(Data {
        train: crate::augment::mixture(cfg, main.train.clone(), train)?,
        eval,
        vocab: main.vocab,
        eos: main.eos,
        description,
    })
}

/// One source: `data.source` with `data.paths` (no mixing).
fn load_source(cfg: &Config) -> anyhow::Result<Data> {
    use config::wire::DataSource;
    match cfg.data.source {
        DataSource::Embedded => {
            let frac = cfg.data.eval_fraction.get();
            let (train, eval) = data::embedded::datasets(cfg.run.seed, EMBEDDED_BYTES, frac);
            let eval: Option<Arc<dyn data::TokenDataset>> = if data::TokenDataset::is_empty(&eval) {
                None
            } else {
                Some(Arc::new(eval))
            };
            Ok(Data {
                description: format!(
                    "embedded corpus ({} KB of generated English-like text, byte tokens)",
                    EMBEDDED_BYTES / 1000
                ),
                train: Arc::new(train) as Arc<dyn data::TokenDataset>,
                eval,
                vocab: data::embedded::ByteTokenizer::VOCAB,
                eos: Some(data::embedded::ByteTokenizer::EOS),
            })
        }
        DataSource::Text | DataSource::Jsonl => load_files(cfg),
        _ => modes::load_tokens(cfg),
    }
}

/// Text or JSONL files: tokenized (cached as token shards) with `data.tokenizer`, the model
/// directory's `tokenizer.json`, or a byte-level BPE trained on the files at start (saved in
/// the run directory); the last `data.eval_fraction` of the samples is held out.
fn load_files(cfg: &Config) -> anyhow::Result<Data> {
    use config::wire::DataSource;
    let files = data::expand_inputs(&cfg.data.paths)?;
    let format = match cfg.data.source {
        DataSource::Jsonl => data::Format::Jsonl(modes::jsonl_field(cfg)),
        _ => data::Format::Text(data::TextSplit::Paragraphs),
    };
    let stream = data::StreamOptions {
        max_error_fraction: cfg.data.max_error_fraction.get(),
        quarantine: Some(cfg.run.dir.join("data-quarantine.jsonl")),
        ..data::StreamOptions::default()
    };
    let tok_path = match &cfg.data.tokenizer {
        Some(p) => Some(p.clone()),
        None => crate::model_cmd::model_dir(cfg)?.map(|d| d.join("tokenizer.json")),
    };
    let tokenizer = match tok_path {
        Some(p) => data::TextTokenizer::from_file(&p)?,
        None => {
            let saved = cfg.run.dir.join("tokenizer.json");
            if saved.exists() {
                data::TextTokenizer::from_file(&saved)?
            } else {
                eprintln!(
                    "training a byte-level BPE tokenizer on {} file(s)",
                    files.len()
                );
                let opts = data::BpeOptions {
                    vocab_size: 4096,
                    ..data::BpeOptions::default()
                };
                let t = data::TextTokenizer::train_bpe_from_files(
                    files.clone(),
                    format.clone(),
                    stream.clone(),
                    &opts,
                )?;
                std::fs::create_dir_all(&cfg.run.dir)?;
                t.save(&saved)?;
                t
            }
        }
    };
    let eos = ["<|endoftext|>", "</s>", "<eos>"]
        .iter()
        .find_map(|t| tokenizer.token_id(t));
    let mut popts = data::PrepareOptions::new(format, cfg.data.cache_dir.clone());
    popts.stream = stream;
    popts.chat_template = modes::chat_template(cfg)?;
    let prepared = data::prepare(&files, &tokenizer, &popts)?;
    let shards: Arc<dyn data::TokenDataset> = Arc::new(prepared.open()?);
    let n = shards.len();
    let (train, eval, held) = hold_out(&shards, cfg.data.eval_fraction.get());
    Ok(Data {
        description: format!(
            "{} file(s), {} samples ({} held out), vocabulary {}",
            files.len(),
            n,
            held,
            tokenizer.vocab_size()
        ),
        train,
        eval,
        vocab: tokenizer.vocab_size(),
        eos,
    })
}

/// The training part and the held-out part (the last `fraction` of the samples, at least
/// one sample left to train on; `None` when nothing is held out) of `shards`, and how many
/// samples are held out.
fn hold_out(
    shards: &Arc<dyn data::TokenDataset>,
    fraction: f64,
) -> (
    Arc<dyn data::TokenDataset>,
    Option<Arc<dyn data::TokenDataset>>,
    u64,
) {
    let n = shards.len();
    let held = (((n as f64) * fraction).round() as u64).min(n.saturating_sub(1));
    let train: Arc<dyn data::TokenDataset> = Arc::new(Subset {
        inner: shards.clone(),
        start: 0,
        len: n - held,
    });
    let eval = (held > 0).then(|| {
        Arc::new(Subset {
            inner: shards.clone(),
            start: n - held,
            len: held,
        }) as Arc<dyn data::TokenDataset>
    });
    (train, eval, held)
}

/// A contiguous range of another dataset's samples.
struct Subset {
    inner: Arc<dyn data::TokenDataset>,
    start: u64,
    len: u64,
}

impl data::TokenDataset for Subset {
    fn len(&self) -> u64 {
        self.len
    }

    fn sample_len(&self, id: u64) -> data::Result<usize> {
        self.inner.sample_len(self.start + id)
    }

    fn prompt_len(&self, id: u64) -> data::Result<usize> {
        self.inner.prompt_len(self.start + id)
    }

    fn read_tokens(&self, id: u64, start: usize, out: &mut [u32]) -> data::Result<()> {
        self.inner.read_tokens(self.start + id, start, out)
    }
}

/// Settings `eg train` does not implement yet are refused with a typed error naming them,
/// never silently ignored.
fn check_supported(cfg: &Config) -> anyhow::Result<()> {
    use config::wire::{Backend, DType as WDType, Parallelism};
    let refuse =
        |what: &'static str| -> anyhow::Result<()> { Err(exit::Unsupported { what }.into()) };
    if cfg.model.dtype != WDType::F32 {
        return refuse(
            "`model.dtype` other than \"f32\" in `eg train` (trainable weights are f32 master copies; `train.precision.compute` sets bf16/f16 compute)",
        );
    }
    // `disk` runs (eg-memory's DiskStore); `ram` is GPU → host RAM, which needs a CUDA
    // build (the library returns eg-memory's typed FeatureDisabled error): exit 11.
    if cfg.memory.offload == config::Offload::Ram
        && elastic_guardian::memory::offload::host_offload_available().is_err()
    {
        return refuse(
            "`memory.offload = \"ram\"` (a GPU model's optimizer state in host RAM needs the `cuda` feature; on a CPU the state is already in RAM: use \"none\", or \"disk\")",
        );
    }
    if cfg.dist.parallelism != Parallelism::Single
        || matches!(cfg.dist.backend, Backend::Mpi | Backend::Nccl)
    {
        return refuse(
            "distributed training (`dist.backend` mpi/nccl, `dist.parallelism` other than single)",
        );
    }
    if !matches!(
        cfg.hardware.device,
        config::Device::Auto | config::Device::Cpu
    ) {
        return refuse("CUDA devices in `eg train` (build with the `cuda` feature; not built yet)");
    }
    if cfg.monitor.prometheus.is_some() || cfg.monitor.tensorboard.is_some() {
        return refuse("metrics sinks (`monitor.prometheus`, `monitor.tensorboard`)");
    }
    Ok(())
}

/// LoRA / QLoRA adapters and the attention kernel from `[model]`.
fn adapt_model(cfg: &Config, mut model: Llama, desc: String) -> anyhow::Result<(Llama, String)> {
    use config::wire::BaseQuant;
    model.set_attention(model::attention::AttentionKind::from_config(
        cfg.model.attention,
    ));
    // "on": every decoder layer from the first step; "auto" starts without it (the plan and
    // the memory controller may switch it on).
    let checkpointing = cfg.memory.activation_checkpointing == config::wire::Toggle::On;
    model.set_activation_checkpointing(checkpointing);
    let desc = if checkpointing {
        format!("{desc}, activation checkpointing")
    } else {
        desc
    };
    let Some(l) = &cfg.model.lora else {
        return Ok((model, desc));
    };
    let lcfg = model::LoraConfig::rank(l.rank.get() as usize)
        .alpha(l.alpha)
        .dropout(l.dropout.get())
        .targets(l.targets.iter().map(String::as_str))
        .rslora(l.rslora);
    let seed = cfg.run.seed;
    let (model, kind) = match cfg.model.quantization {
        BaseQuant::Nf4 => (
            model.with_qlora(&lcfg, model::QuantKind::Nf4 { double_quant: true }, seed)?,
            "QLoRA (NF4)",
        ),
        BaseQuant::Int8 => (
            model.with_qlora(&lcfg, model::QuantKind::Int8 { block: None }, seed)?,
            "QLoRA (INT8)",
        ),
        _ => (model.with_lora(&lcfg, seed)?, "LoRA"),
    };
    Ok((model, format!("{desc} + {kind} rank {}", l.rank)))
}

/// The compute precision (issue #8): eg-memory's selector over the CPU's features and the
/// GEMM speeds `eg hw --probe` cached in `.eg-cache/hardware`, if any. Parameters stay f32
/// master weights whatever it chooses.
fn choose_precision(cfg: &Config) -> elastic_guardian::memory::PrecisionChoice {
    use elastic_guardian::{hardware as hw, memory as mem};
    let report = hw::Detector::new(hw::Root::host())
        .gpu(hw::GpuQuery::Skip)
        .detect();
    let features = report.cpu.features.clone().unwrap_or_default();
    let fingerprint = hw::capacity::machine_fingerprint(&report);
    // A missing or unreadable cache only means no measurement (auto then keeps f32 on a CPU).
    let gemm = hw::capacity::read_cache(Path::new(".eg-cache/hardware"), &fingerprint)
        .ok()
        .flatten()
        .map(|c| mem::GemmSpeeds::from_capacity(&c));
    let facts = mem::PrecisionFacts::cpu(&features, gemm);
    mem::select(
        cfg.train.precision.compute,
        cfg.train.precision.loss_scale,
        &facts,
    )
}

fn load_model(cfg: &Config, vocab: usize) -> anyhow::Result<(Llama, String)> {
    let seq = cfg.data.seq_len.0 as usize;
    match &cfg.model.source {
        ModelSource::Builtin(name) => {
            let lc = model::builtin::config(name, vocab, seq.max(16))?;
            let m = Llama::init(&lc, cfg.run.seed, DType::F32, &Device::Cpu)?;
            Ok((m, format!("builtin:{name}")))
        }
        _ => {
            let dir =
                crate::model_cmd::model_dir(cfg)?.context("model.source names no directory")?;
            let m = Llama::from_hf_dir(&dir, DType::F32, &Device::Cpu)
                .with_context(|| format!("loading {}", dir.display()))?;
            if m.config().vocab_size < vocab {
                anyhow::bail!(
                    "model vocabulary ({}) is smaller than the data's ({vocab})",
                    m.config().vocab_size
                );
            }
            Ok((m, dir.display().to_string()))
        }
    }
}

/// Progress bar and console summary.
struct Progress {
    bar: ProgressBar,
    t0: Instant,
    tokens0: u64,
}

impl Callback for Progress {
    fn on_step_end(&mut self, m: &StepMetrics) {
        let secs = self.t0.elapsed().as_secs_f64().max(1e-9);
        let tps = (m.tokens_seen - self.tokens0) as f64 / secs;
        self.bar.set_position(m.step);
        self.bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  {:.0} tok/s",
            m.loss, m.lr, tps
        ));
    }

    fn on_eval(&mut self, e: &EvalMetrics) {
        self.bar.println(format!(
            "step {:>6}  eval loss {:.4}  perplexity {:.3}",
            e.step, e.loss, e.perplexity
        ));
    }

    fn on_anomaly(&mut self, a: &kernel::Anomaly) {
        self.bar.println(format!("guard: {a:?}"));
    }

    fn on_memory(&mut self, d: &elastic_guardian::memory::Decision) {
        self.bar.println(format!(
            "memory guard: {:?} ({:?} pressure) -> {}",
            d.action, d.level, d.after
        ));
    }
}

/// The loop's options from `[train]` (guards, checkpoints, evaluation, schedule) and
/// `data.prefetch`, with the micro-batch rows and peak learning rate chosen by the caller.
fn trainer_options(cfg: &Config, micro: usize, peak: f64) -> anyhow::Result<TrainerOptions> {
    let max_steps = cfg.train.max_steps.0;
    let g = &cfg.train.guards;
    let c = &cfg.train.checkpoints;
    Ok(TrainerOptions {
        max_steps,
        micro_batch_rows: micro,
        schedule: Schedule::from_config(&cfg.train.schedule, peak, max_steps),
        clip_norm: g.clip_norm,
        coverage_check: g.coverage_check,
        nan_skip_limit: g.nan_skip_limit.max(1),
        spike: g.spike.as_ref().map(|s| (s.window as usize, s.zscore)),
        lr_backoff: g.lr_backoff.get().max(f64::MIN_POSITIVE),
        checkpoints: Some(CheckpointOptions {
            dir: c.dir.clone(),
            every: c.every.0,
            keep_last: c.keep_last as usize,
            keep_best: c.keep_best as usize,
            background: c.background,
            write: kernel::checkpoint::SaveOptions {
                direct_io: c.direct_io,
                ..Default::default()
            },
        }),
        snapshot_every: c.every.0,
        eval_every: cfg.train.eval.every.0,
        eval_max_batches: cfg.train.eval.max_batches as usize,
        early_stopping_patience: cfg.train.eval.early_stopping_patience.map(|p| p.get()),
        run_dir: Some(cfg.run.dir.clone()),
        config_toml: Some(
            cfg.to_toml()
                .context("serialising the resolved configuration")?,
        ),
        prefetch: cfg.data.prefetch,
    })
}
/// Resumes `trainer` from `dir` as `run.resume` asks (`never` refuses a directory with
/// checkpoints, `require` fails without one), then routes the signal flag `stop` to the
/// trainer's stop flag. Returns the step resumed from.
fn resume_and_forward_stop<M: TrainModel>(
    trainer: &mut Trainer<M>,
    cfg: &Config,
    dir: &Path,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Option<u64>> {
    use config::wire::ResumeMode;
    let existing = !kernel::checkpoint::list(dir).is_empty();
    let resumed = match cfg.run.resume {
        ResumeMode::Never if existing => anyhow::bail!(
            "{} already holds checkpoints and run.resume = \"never\"; choose another run.dir",
            dir.display()
        ),
        ResumeMode::Never => None,
        ResumeMode::Require => {
            Some(
                trainer
                    .resume()?
                    .ok_or_else(|| kernel::Error::NoCheckpoint {
                        dir: dir.to_path_buf(),
                    })?,
            )
        }
        _ => trainer.resume()?,
    };
    let flag = trainer.stop_flag();
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        flag.store(true, Ordering::SeqCst);
    });
    Ok(resumed)
}

/// Runs `eg train`.
pub(crate) fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let cfg = config::Sources::new()
        .files(&args.config)
        .process_env()
        .sets(&args.set)
        .load()?;
    let stop = Arc::new(AtomicBool::new(false));
    // A second SIGINT while stopping aborts (exit 130); the first one (or SIGTERM) asks the
    // loop to finish its step and checkpoint.
    signal_hook::flag::register_conditional_shutdown(
        signal_hook::consts::SIGINT,
        130,
        stop.clone(),
    )?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;

    check_supported(&cfg)?;
    if cfg.hardware.tune_process {
        // SAFETY: as for the threads below: no thread reading the environment runs yet, and
        // no tensor operation has started candle's pools.
        let t = unsafe { kernel::tune_process(&kernel::ProcessDefaults::default()) };
        eprintln!("process: {t}");
    } else {
        eprintln!("process: library defaults (hardware.tune_process = false)");
    }
    // Unset, the count is candle's own default (physical cores), pinned in the environment:
    // without `RAYON_NUM_THREADS` candle re-reads /proc/cpuinfo on every matrix product
    // (measured: a quarter of `eg train`'s time with the builtin model).
    let n = match cfg.hardware.threads {
        Some(t) => std::num::NonZeroUsize::try_from(t)?,
        None => std::num::NonZeroUsize::new(candle_core::utils::get_num_threads())
            .unwrap_or(std::num::NonZeroUsize::MIN),
    };
    // SAFETY: nothing has started a thread that reads the environment yet (the signal
    // handlers above run no thread; data, model and trainer come after this).
    unsafe { kernel::set_compute_threads(n)? };
    if cfg.train.mode == config::wire::Mode::Classification {
        return encoder::run(&cfg, &args, stop);
    }
    let pairs = modes::load_pairs(&cfg)?;
    let data = match &pairs {
        Some(p) => p.data(),
        None => load_data(&cfg)?,
    };
    let (model, model_desc) = load_model(&cfg, data.vocab)?;
    let (mut model, model_desc) = adapt_model(&cfg, model, model_desc)?;
    let precision = choose_precision(&cfg);
    model.set_compute_dtype(match precision.precision {
        elastic_guardian::memory::Precision::Bf16 => DType::BF16,
        elastic_guardian::memory::Precision::F16 => DType::F16,
        _ => DType::F32,
    })?;
    let seq = cfg.data.seq_len.0 as usize;
    let rows = (cfg.train.batch.global_tokens.0 as usize / seq).max(1);
    // The planner chooses the micro-batch for the budget; the guard adapts it (issue #8).
    let mem_setup = memory::setup(&cfg, &model, rows, seq)?;
    let micro = mem_setup.micro;
    let packing = match cfg.data.packing {
        config::wire::Packing::BestFit => Packing::BestFit { window: 64 },
        _ => Packing::Concat,
    };
    let lopts = LoaderOptions {
        seq_len: seq,
        rows_per_step: rows,
        packing,
        eos_id: data.eos,
        pad_id: 0,
        seed: cfg.run.seed,
        shuffle: cfg.data.shuffle,
        epochs: None,
    };
    let loader: Box<dyn data::BatchSource> = match &pairs {
        Some(p) => Box::new(p.loader(&cfg, rows)?),
        None => {
            let loader = Loader::new(data.train.clone(), lopts.clone(), Placement::SINGLE)?;
            Box::new(crate::augment::apply(
                loader,
                &cfg,
                data.eos.unwrap_or(lopts.pad_id),
            ))
        }
    };
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
    // `memory.offload = "disk"`: the state lives in files under `memory.offload_dir`
    // (scratch; the checkpoints are the durable copy, a restart recreates them).
    let store = kernel::optim::store_for(&cfg.memory.offload)?;
    let optimizer = Optimizer::with_store(kind, wd, &shapes, store)?;
    let max_steps = cfg.train.max_steps.0;
    let c = &cfg.train.checkpoints;
    let opts = trainer_options(&cfg, micro, peak)?;
    let objective = modes::objective(&cfg, &model)?;
    let mut trainer = Trainer::new(model, optimizer, loader, opts)?.with_objective(objective);
    if precision.loss_scaling {
        let scaler = kernel::LossScaler::new(cfg.train.precision.initial_scale)?;
        trainer = trainer.with_loss_scaler(scaler);
    }
    eprintln!(
        "precision: {} ({}{})",
        precision.precision,
        precision.reason,
        if precision.loss_scaling {
            ", dynamic loss scaling"
        } else {
            ""
        }
    );
    if let Some((guard, stores)) = mem_setup.guard {
        trainer = trainer.with_memory_guard(guard, stores)?;
    }
    if let Some(eval) = data.eval.clone() {
        trainer = trainer.with_eval(EvalSet {
            data: eval,
            opts: LoaderOptions {
                shuffle: false,
                epochs: Some(1),
                ..lopts
            },
        });
    }
    // DPO: the held-out preference pairs (`data.eval_fraction` of them).
    if let Some(source) = pairs.as_ref().and_then(|p| p.eval_source(&cfg, rows)) {
        trainer = trainer.with_eval_batches(source);
    }

    let resumed = resume_and_forward_stop(&mut trainer, &cfg, &c.dir, stop)?;

    let start = trainer.state().step;
    if start >= max_steps {
        println!(
            "the run in {} is already complete ({start} of {max_steps} steps); raise train.max_steps to continue",
            cfg.run.dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "eg train: {model_desc} ({:.2}M parameters) on the {}; {} steps of {} tokens ({rows} rows × {seq}, micro-batch {micro}), {} threads",
        n_params as f64 / 1e6,
        data.description,
        max_steps,
        rows * seq,
        kernel::compute_threads(),
    );
    eprintln!("{}", mem_setup.summary);
    if let (Some(s), Some(_)) = (trainer.memory_strategy(), resumed) {
        eprintln!("memory: continuing with {s}");
    }
    match resumed {
        Some(s) => eprintln!("resuming from step {s} in {}", c.dir.display()),
        None => eprintln!("run directory: {}", cfg.run.dir.display()),
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
    trainer.add_callback(Box::new(Progress {
        bar: bar.clone(),
        t0: Instant::now(),
        tokens0: trainer.state().tokens_seen,
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
            "eval perplexity: {:.3} (loss {:.4} over {} tokens)",
            e.perplexity, e.loss, e.tokens
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
    println!("metrics: {}", metrics_path(&cfg.run.dir).display());
    Ok(ExitCode::SUCCESS)
}

fn metrics_path(run: &Path) -> PathBuf {
    run.join("metrics.jsonl")
}

//! Training modes in `eg train` (issue #6): the objective per `train.mode`, chat data for SFT,
//! preference pairs for DPO, and pre-tokenized `tokens` sources.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use elastic_guardian::config::{self, Config};
use elastic_guardian::data::{self, TokenDataset};
use elastic_guardian::kernel::{CausalLm, Dpo, Objective};
use elastic_guardian::model::Llama;

use super::Data;

/// The objective of `train.mode` for a causal language model: pre-training (rows are causal
/// sequences), SFT (packed rows with document masks; the loader masks prompt tokens out of
/// the loss) or DPO (against a frozen reference: the model's base when it has LoRA adapters,
/// else a copy of its weights now, before any checkpoint is loaded).
pub(super) fn objective(cfg: &Config, model: &Llama) -> anyhow::Result<Box<dyn Objective<Llama>>> {
    use config::wire::Mode;
    Ok(match cfg.train.mode {
        Mode::Sft => Box::new(CausalLm::packed()),
        Mode::Dpo => Box::new(Dpo::new(model, cfg.train.dpo.beta)?),
        Mode::Pretrain => Box::new(CausalLm::pretrain()),
        _ => {
            return Err(crate::exit::Unsupported {
                what: "this `train.mode` with a causal language model",
            }
            .into());
        }
    })
}

/// How JSONL records are read: chat `messages` for SFT, a text field otherwise.
pub(super) fn jsonl_field(cfg: &Config) -> data::JsonField {
    let path = data::FieldPath::parse(&cfg.data.field.join("."));
    if cfg.train.mode == config::wire::Mode::Sft {
        data::JsonField::Messages(path)
    } else {
        data::JsonField::Text(path)
    }
}

/// The tokenizer file `eg train` uses when one is configured or comes with the model.
fn tokenizer_path(cfg: &Config) -> anyhow::Result<Option<PathBuf>> {
    if let Some(p) = &cfg.data.tokenizer {
        return Ok(Some(p.clone()));
    }
    if let Some(d) = crate::model_cmd::model_dir(cfg)? {
        return Ok(Some(d.join("tokenizer.json")));
    }
    let saved = cfg.run.dir.join("tokenizer.json");
    Ok(saved.exists().then_some(saved))
}

/// The chat template named by the `tokenizer_config.json` next to the tokenizer (or in the
/// model directory); ChatML when there is none or it is not recognised.
pub(super) fn chat_template(cfg: &Config) -> anyhow::Result<data::ChatTemplate> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(p) = &cfg.data.tokenizer
        && let Some(d) = p.parent()
    {
        dirs.push(d.to_path_buf());
    }
    if let Some(d) = crate::model_cmd::model_dir(cfg)? {
        dirs.push(d);
    }
    for d in dirs {
        let p = d.join("tokenizer_config.json");
        if let Ok(text) = std::fs::read_to_string(&p) {
            if let Some(t) = data::ChatTemplate::from_tokenizer_config(&text) {
                return Ok(t);
            }
            tracing::warn!(file = %p.display(), "chat template not recognised; using ChatML");
        }
    }
    Ok(data::ChatTemplate::ChatMl)
}

/// `data.source = "tokens"`: shards written by `eg data prepare` (each path a directory of
/// `*.index`/`*.tokens` pairs), memory-mapped; chat data keeps its prompt masks. The
/// vocabulary comes from the tokenizer when there is one, else from the largest token id.
pub(super) fn load_tokens(cfg: &Config) -> anyhow::Result<Data> {
    let mut files = Vec::new();
    for p in &cfg.data.paths {
        let dir = Path::new(p);
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).with_context(|| format!("data.paths: {p}"))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "index")
                && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
            {
                names.push(stem.to_owned());
            }
        }
        names.sort();
        if names.is_empty() {
            anyhow::bail!(data::Error::NoInput {
                pattern: dir.join("*.index").display().to_string(),
            });
        }
        files.extend(names.iter().map(|n| data::ShardFiles::new(dir, n)));
    }
    let shards: Arc<dyn TokenDataset> = Arc::new(data::TokenShards::open(files)?);
    let n = shards.len();
    if n == 0 {
        anyhow::bail!(data::Error::InvalidOption {
            option: "data.paths",
            reason: "the token shards hold no sample".into(),
        });
    }
    let tokenizer = match tokenizer_path(cfg)? {
        Some(p) if p.exists() => Some(data::TextTokenizer::from_file(&p)?),
        _ => None,
    };
    let (vocab, eos) = match &tokenizer {
        Some(t) => (
            t.vocab_size(),
            ["<|endoftext|>", "</s>", "<eos>"]
                .iter()
                .find_map(|s| t.token_id(s)),
        ),
        None => {
            let mut max = 0u32;
            let mut buf = Vec::new();
            for id in 0..n {
                buf.resize(shards.sample_len(id)?, 0);
                shards.read_tokens(id, 0, &mut buf)?;
                max = buf.iter().copied().fold(max, u32::max);
            }
            (max as usize + 1, None)
        }
    };
    let (train, eval, held) = super::hold_out(&shards, cfg.data.eval_fraction.get());
    Ok(Data {
        description: format!(
            "token shards in {} ({n} samples, {held} held out), vocabulary {vocab}",
            cfg.data.paths.join(", ")
        ),
        train,
        eval,
        vocab,
        eos,
    })
}

/// DPO's preference pairs.
pub(super) struct Pairs {
    data: Arc<data::PairDataset>,
    /// The held-out pairs (`data.eval_fraction` of them, the last ones), if any.
    eval: Option<Arc<data::PairDataset>>,
    vocab: usize,
    eos: Option<u32>,
    description: String,
}

/// `train.mode = "dpo"`: the pairs of `data.paths` (JSONL with `[train.dpo]`'s field names),
/// tokenized with the configured or the model's tokenizer; `None` in other modes.
pub(super) fn load_pairs(cfg: &Config) -> anyhow::Result<Option<Pairs>> {
    if cfg.train.mode != config::wire::Mode::Dpo {
        return Ok(None);
    }
    let files = data::expand_inputs(&cfg.data.paths)?;
    let tok_path = tokenizer_path(cfg)?.context(
        "DPO needs a tokenizer: set data.tokenizer (e.g. one made by `eg data train-tokenizer`) or use a model directory with tokenizer.json",
    )?;
    let tokenizer = data::TextTokenizer::from_file(&tok_path)?;
    let eos = ["<|endoftext|>", "</s>", "<eos>"]
        .iter()
        .find_map(|t| tokenizer.token_id(t));
    let d = &cfg.train.dpo;
    let fields = data::PairFields {
        prompt: d.prompt_field.clone(),
        chosen: d.chosen_field.clone(),
        rejected: d.rejected_field.clone(),
    };
    let enc = data::PairEncoding {
        tokenizer: &tokenizer,
        template: Some(chat_template(cfg)?),
        eos,
    };
    let pairs = data::PairDataset::from_jsonl(&files, &fields, enc)?;
    if pairs.is_empty() {
        anyhow::bail!(data::Error::InvalidOption {
            option: "data.paths",
            reason: format!(
                "no valid preference record (fields {:?}, {:?}, {:?}; {} skipped, see the log)",
                fields.prompt,
                fields.chosen,
                fields.rejected,
                pairs.skipped()
            ),
        });
    }
    // The last `data.eval_fraction` of the pairs are held out (at least one pair trains),
    // as the causal mode holds out the last samples.
    let n = pairs.len();
    let held = ((n as f64) * cfg.data.eval_fraction.get()).round() as u64;
    let held = held.min(n.saturating_sub(1));
    let (train, eval) = if held > 0 {
        let (mut train, mut eval) = (data::PairDataset::new(), data::PairDataset::new());
        for id in 0..n {
            let p = pairs.get(id)?.clone();
            if id < n - held {
                train.push(p);
            } else {
                eval.push(p);
            }
        }
        (Arc::new(train), Some(Arc::new(eval)))
    } else {
        (Arc::new(pairs.clone()), None)
    };
    Ok(Some(Pairs {
        description: format!(
            "{n} preference pairs from {} file(s) ({} records skipped, {held} held out), vocabulary {}",
            files.len(),
            pairs.skipped(),
            tokenizer.vocab_size()
        ),
        vocab: tokenizer.vocab_size(),
        eos,
        data: train,
        eval,
    }))
}

impl Pairs {
    /// What the rest of `eg train` needs to know about the data (vocabulary, EOS, the
    /// description). Its `train` is empty: the batches come from [`Pairs::loader`].
    pub(super) fn data(&self) -> Data {
        Data {
            train: Arc::new(data::InMemoryDataset::new()),
            eval: None,
            vocab: self.vocab,
            eos: self.eos,
            description: self.description.clone(),
        }
    }

    /// The pair loader: `rows / 2` pairs (at least one) per step.
    pub(super) fn loader(&self, cfg: &Config, rows: usize) -> anyhow::Result<data::PairLoader> {
        let opts = data::PairLoaderOptions {
            seq_len: cfg.data.seq_len.0 as usize,
            pairs_per_step: (rows / 2).max(1),
            pad_id: 0,
            seed: cfg.run.seed,
            shuffle: cfg.data.shuffle,
            epochs: None,
        };
        Ok(data::PairLoader::new(
            self.data.clone(),
            opts,
            data::Placement::SINGLE,
        )?)
    }

    /// The held-out pairs as the trainer's eval source (a fresh unshuffled one-epoch
    /// loader of `rows / 2` pairs per batch at each evaluation), when some are held out.
    pub(super) fn eval_source(
        &self,
        cfg: &Config,
        rows: usize,
    ) -> Option<elastic_guardian::kernel::EvalSource> {
        let held = self.eval.clone()?;
        let opts = data::PairLoaderOptions {
            seq_len: cfg.data.seq_len.0 as usize,
            pairs_per_step: (rows / 2).max(1),
            pad_id: 0,
            seed: cfg.run.seed,
            shuffle: false,
            epochs: Some(1),
        };
        Some(Box::new(move || {
            let l = data::PairLoader::new(held.clone(), opts.clone(), data::Placement::SINGLE)?;
            Ok(Box::new(l) as Box<dyn data::BatchSource>)
        }))
    }
}

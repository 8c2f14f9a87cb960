//! `eg data train-tokenizer|prepare`: train a BPE tokenizer on a corpus, and tokenize a corpus
//! into cached token shards that `eg train` and the loader reuse.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use elastic_guardian::data::{
    self, BpeOptions, FieldPath, Format, JsonField, PrepareOptions, StreamOptions, TextSplit,
    TextTokenizer,
};

/// `eg data` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum DataCommand {
    /// Train a byte-level BPE tokenizer on files and save it as tokenizer.json.
    TrainTokenizer {
        /// Vocabulary size.
        #[arg(long, default_value_t = 8192)]
        vocab: usize,
        /// Where to write tokenizer.json.
        #[arg(long, short, value_name = "FILE")]
        out: PathBuf,
        #[command(flatten)]
        input: Input,
    },
    /// Tokenize files into token shards cached by (input content, tokenizer, settings).
    Prepare {
        /// The tokenizer.json to use.
        #[arg(long, value_name = "FILE")]
        tokenizer: PathBuf,
        /// Directory holding one sub-directory of shards per cache key.
        #[arg(long, value_name = "DIR", default_value = ".eg-cache/tokens")]
        cache_dir: PathBuf,
        #[command(flatten)]
        input: Input,
    },
}

/// The input corpus.
#[derive(Debug, Args)]
pub(crate) struct Input {
    /// How files are read.
    #[arg(long, value_enum, default_value_t = InputFormat::Paragraphs)]
    format: InputFormat,
    /// JSONL field path holding the text, or the chat messages with --format chat.
    #[arg(long, default_value = "text")]
    field: String,
    /// Fraction of bad records tolerated before stopping.
    #[arg(long, default_value_t = 0.001)]
    max_error_fraction: f64,
    /// Where skipped records are listed (JSON lines).
    #[arg(long, value_name = "FILE")]
    quarantine: Option<PathBuf>,
    /// Files, directories or globs.
    #[arg(required = true, value_name = "FILES")]
    files: Vec<String>,
}

/// How input files are split into documents.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum InputFormat {
    /// Text; blank-line-separated paragraphs are documents.
    Paragraphs,
    /// Text; each non-empty line is a document.
    Lines,
    /// JSON lines with a text field (`--field`).
    Jsonl,
    /// JSON lines with chat messages (`--field`, e.g. `messages`).
    Chat,
}

impl Input {
    fn format(&self) -> Format {
        match self.format {
            InputFormat::Paragraphs => Format::Text(TextSplit::Paragraphs),
            InputFormat::Lines => Format::Text(TextSplit::Lines),
            InputFormat::Jsonl => Format::Jsonl(JsonField::Text(FieldPath::parse(&self.field))),
            InputFormat::Chat => Format::Jsonl(JsonField::Messages(FieldPath::parse(&self.field))),
        }
    }

    fn stream(&self) -> anyhow::Result<StreamOptions> {
        if !(0.0..=1.0).contains(&self.max_error_fraction) {
            anyhow::bail!(
                "--max-error-fraction must be in [0, 1], got {}",
                self.max_error_fraction
            );
        }
        Ok(StreamOptions {
            max_error_fraction: self.max_error_fraction,
            quarantine: self.quarantine.clone(),
            ..StreamOptions::default()
        })
    }
}

pub(crate) fn run(cmd: DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::TrainTokenizer { vocab, out, input } => {
            let files = data::expand_inputs(&input.files)?;
            let opts = BpeOptions {
                vocab_size: vocab,
                ..BpeOptions::default()
            };
            let tok = TextTokenizer::train_bpe_from_files(
                files.clone(),
                input.format(),
                input.stream()?,
                &opts,
            )?;
            tok.save(&out)?;
            println!(
                "trained a BPE tokenizer on {} file(s): {}",
                files.len(),
                out.display()
            );
        }
        DataCommand::Prepare {
            tokenizer,
            cache_dir,
            input,
        } => {
            let files = data::expand_inputs(&input.files)?;
            let tok = TextTokenizer::from_file(&tokenizer)?;
            let mut opts = PrepareOptions::new(input.format(), cache_dir);
            opts.stream = input.stream()?;
            let prepared = data::prepare(&files, &tok, &opts)?;
            let m = &prepared.manifest;
            println!(
                "{} {} samples, {} tokens in {} shard(s): {}",
                if prepared.reused {
                    "reused"
                } else {
                    "prepared"
                },
                m.samples,
                m.tokens,
                m.shards.len(),
                prepared.dir.display()
            );
        }
    }
    Ok(())
}

//! Tokenization with the `tokenizers` crate: loading, BPE training, parallel encoding, and
//! preparation of a corpus into cached token shards.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::shards::{ShardAccess, ShardWriter, TokenShards, TokenWidth, sync_dir};
use crate::stream::{ChatMessage, Document, DocumentStream, Format, StreamOptions, StreamStats};
use crate::{Error, Result};

fn tok_err(context: impl Into<String>) -> impl FnOnce(tokenizers::Error) -> Error {
    let context = context.into();
    move |e| Error::Tokenizer {
        context,
        message: e.to_string(),
    }
}

/// A text tokenizer (a `tokenizers::Tokenizer`) with a content hash for cache keys.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    hash: String,
}

/// Options of [`TextTokenizer::train_bpe`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BpeOptions {
    /// Target vocabulary size, special tokens and the 256 byte symbols included.
    pub vocab_size: usize,
    /// Pairs seen fewer times are not merged.
    pub min_frequency: u64,
    /// Special tokens added to the vocabulary first (e.g. `<|endoftext|>`).
    pub special_tokens: Vec<String>,
}

impl Default for BpeOptions {
    fn default() -> Self {
        Self {
            vocab_size: 8192,
            min_frequency: 2,
            special_tokens: vec!["<|endoftext|>".to_owned()],
        }
    }
}

impl TextTokenizer {
    /// Wrap a `tokenizers::Tokenizer`.
    pub fn new(inner: Tokenizer) -> Result<Self> {
        let json = inner
            .to_string(false)
            .map_err(tok_err("serialising for the hash"))?;
        let hash = hex::encode(Sha256::digest(json.as_bytes()));
        Ok(Self { inner, hash })
    }

    /// Load a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(path).map_err(tok_err(path.display().to_string()))?;
        Self::new(inner)
    }

    /// Train a byte-level BPE tokenizer on `texts` (every byte is in the base alphabet, so
    /// any text encodes and decodes back exactly).
    pub fn train_bpe<I, S>(texts: I, opts: &BpeOptions) -> Result<Self>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        let special: Vec<AddedToken> = opts
            .special_tokens
            .iter()
            .map(|t| AddedToken::from(t.clone(), true))
            .collect();
        let trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(opts.vocab_size)
            .min_frequency(opts.min_frequency)
            .special_tokens(special)
            .initial_alphabet(alphabet)
            .build();
        let mut trainer = TrainerWrapper::BpeTrainer(trainer);
        let mut tok = Tokenizer::new(BPE::default());
        let byte_level = ByteLevel::new(false, true, true);
        tok.with_pre_tokenizer(Some(byte_level));
        tok.with_decoder(Some(byte_level));
        tok.train(&mut trainer, texts)
            .map_err(tok_err("training BPE"))?;
        Self::new(tok)
    }

    /// Train on documents streamed from files (bad records are quarantined as usual).
    pub fn train_bpe_from_files(
        files: Vec<PathBuf>,
        format: Format,
        stream: StreamOptions,
        opts: &BpeOptions,
    ) -> Result<Self> {
        let docs = DocumentStream::new(files, format, stream)?;
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        let texts = docs.map_while(|r| match r {
            Ok(rec) => Some(match rec.doc {
                Document::Text(t) => t,
                Document::Chat(m) => m
                    .into_iter()
                    .map(|m| m.content)
                    .collect::<Vec<_>>()
                    .join("\n"),
            }),
            Err(e) => {
                if let Ok(mut slot) = failure.lock() {
                    *slot = Some(e);
                }
                None
            }
        });
        let tok = Self::train_bpe(texts, opts)?;
        match failure.into_inner().ok().flatten() {
            Some(e) => Err(e),
            None => Ok(tok),
        }
    }

    /// Save as `tokenizer.json`, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(true)
            .map_err(tok_err(path.display().to_string()))?;
        write_atomic(path, json.as_bytes())
    }

    /// The wrapped tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// SHA-256 (hex) of the tokenizer's serialised form.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token, e.g. `<|endoftext|>`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encode one text (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(tok_err("encoding"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encode many texts in parallel on the rayon pool; results keep the input order.
    pub fn encode_batch<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>> {
        texts.par_iter().map(|t| self.encode(t.as_ref())).collect()
    }

    /// Decode ids back to text.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err("decoding"))
    }
}

/// Write a file atomically: temporary name, fsync, rename, fsync the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// Chat templates: how a conversation becomes text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatTemplate {
    /// `<|im_start|>role\ncontent<|im_end|>\n` (Qwen, SmolLM2, ...).
    ChatMl,
    /// `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>` after
    /// `<|begin_of_text|>` (Llama 3).
    Llama3,
}

impl ChatTemplate {
    /// The template a `tokenizer_config.json` asks for, recognised from the markers in its
    /// `chat_template` (a Jinja string this crate does not execute); `None` when absent or
    /// unknown.
    pub fn from_tokenizer_config(json: &str) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_str(json).ok()?;
        let t = v.get("chat_template")?.as_str()?;
        if t.contains("<|start_header_id|>") {
            Some(ChatTemplate::Llama3)
        } else if t.contains("<|im_start|>") {
            Some(ChatTemplate::ChatMl)
        } else {
            None
        }
    }

    /// Render a conversation as `(prompt, completion)`: the completion is the content of the
    /// last assistant message and its end marker (trained on); everything before it is the
    /// prompt (masked from the loss). Without an assistant message, everything is prompt.
    pub fn render(self, messages: &[ChatMessage]) -> (String, String) {
        let last_assistant = messages.iter().rposition(|m| m.role == "assistant");
        let mut prompt = String::new();
        let mut completion = String::new();
        if self == ChatTemplate::Llama3 {
            prompt.push_str("<|begin_of_text|>");
        }
        for (i, m) in messages.iter().enumerate() {
            let (open, close) = match self {
                ChatTemplate::ChatMl => (format!("<|im_start|>{}\n", m.role), "<|im_end|>\n"),
                ChatTemplate::Llama3 => (
                    format!("<|start_header_id|>{}<|end_header_id|>\n\n", m.role),
                    "<|eot_id|>",
                ),
            };
            prompt.push_str(&open);
            if Some(i) == last_assistant {
                completion.push_str(&m.content);
                completion.push_str(close);
                break;
            }
            prompt.push_str(&m.content);
            prompt.push_str(close);
        }
        (prompt, completion)
    }
}

/// Options of [`prepare`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareOptions {
    /// Input format.
    pub format: Format,
    /// Streaming options (line limit, error fraction, quarantine file).
    pub stream: StreamOptions,
    /// Template for chat documents.
    pub chat_template: ChatTemplate,
    /// Documents tokenized together in parallel (bounds memory).
    pub docs_per_chunk: usize,
    /// A new shard is started after this many tokens.
    pub tokens_per_shard: u64,
    /// Directory holding one sub-directory per cache key.
    pub cache_dir: PathBuf,
}

impl PrepareOptions {
    /// Defaults for `format`, caching under `cache_dir`.
    pub fn new(format: Format, cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            format,
            stream: StreamOptions::default(),
            chat_template: ChatTemplate::ChatMl,
            docs_per_chunk: 4096,
            tokens_per_shard: 1 << 28,
            cache_dir: cache_dir.into(),
        }
    }
}

/// What [`prepare`] produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedManifest {
    /// The cache key (hex SHA-256 of inputs' content, tokenizer and settings).
    pub key: String,
    /// Samples written.
    pub samples: u64,
    /// Tokens written.
    pub tokens: u64,
    /// Shard names, in order.
    pub shards: Vec<String>,
    /// The tokenizer's hash.
    pub tokenizer_hash: String,
    /// Counters of the stream (bad records etc.).
    pub stream: StreamStats,
}

/// The result of [`prepare`]: where the shards are and whether the cache was reused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// Directory of the shards.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: PreparedManifest,
    /// True when an earlier run's shards were reused.
    pub reused: bool,
}

impl Prepared {
    /// Open the shards (memory-mapped) for a [`Loader`](crate::Loader).
    pub fn open(&self) -> Result<TokenShards> {
        self.open_with(ShardAccess::Mapped)
    }

    /// Open the shards with the given access.
    pub fn open_with(&self, access: ShardAccess) -> Result<TokenShards> {
        let files = self
            .manifest
            .shards
            .iter()
            .map(|n| crate::ShardFiles::new(&self.dir, n));
        TokenShards::open_with(files, access)
    }
}

/// The cache key of a preparation: content of every input, tokenizer, settings.
pub fn cache_key(
    files: &[PathBuf],
    tokenizer: &TextTokenizer,
    opts: &PrepareOptions,
) -> Result<String> {
    let mut h = Sha256::new();
    h.update(b"eg-data prepare v1\0");
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut fh = Sha256::new();
        let mut file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
        loop {
            let n = file.read(&mut buf).map_err(|e| Error::io(f, e))?;
            if n == 0 {
                break;
            }
            fh.update(&buf[..n]);
        }
        h.update(fh.finalize());
    }
    h.update(tokenizer.hash().as_bytes());
    let settings = serde_json::json!({
        "format": opts.format,
        "chat_template": opts.chat_template,
        "max_line_bytes": opts.stream.max_line_bytes,
        "tokens_per_shard": opts.tokens_per_shard,
    });
    h.update(settings.to_string().as_bytes());
    Ok(hex::encode(h.finalize()))
}

/// Tokenize `files` into token shards under `opts.cache_dir/<key>`, or reuse them when a
/// previous run with the same inputs, tokenizer and settings left them there.
///
/// Streaming: at most `docs_per_chunk` documents are held at once; each chunk is tokenized in
/// parallel and written in input order, so the result is deterministic. The directory is
/// built under a temporary name and renamed into place when complete.
pub fn prepare(
    files: &[PathBuf],
    tokenizer: &TextTokenizer,
    opts: &PrepareOptions,
) -> Result<Prepared> {
    if opts.docs_per_chunk == 0 {
        return Err(Error::InvalidOption {
            option: "docs_per_chunk",
            reason: "must be at least 1".into(),
        });
    }
    let key = cache_key(files, tokenizer, opts)?;
    let dir = opts.cache_dir.join(&key);
    let manifest_path = dir.join("manifest.json");
    if let Ok(bytes) = std::fs::read(&manifest_path) {
        let manifest: PreparedManifest =
            serde_json::from_slice(&bytes).map_err(|source| Error::Metadata {
                path: manifest_path.clone(),
                source,
            })?;
        tracing::info!(dir = %dir.display(), "reusing prepared token shards");
        return Ok(Prepared {
            dir,
            manifest,
            reused: true,
        });
    }
    let tmp = opts
        .cache_dir
        .join(format!("{key}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let width = TokenWidth::for_vocab(tokenizer.vocab_size());
    let mut stream = DocumentStream::new(files.to_vec(), opts.format.clone(), opts.stream.clone())?;
    let mut shards = Vec::new();
    let mut writer: Option<ShardWriter> = None;
    let (mut samples, mut tokens) = (0u64, 0u64);
    let mut chunk: Vec<(String, String)> = Vec::with_capacity(opts.docs_per_chunk);
    loop {
        chunk.clear();
        for rec in stream.by_ref().take(opts.docs_per_chunk) {
            let rec = rec?;
            chunk.push(match rec.doc {
                Document::Text(t) => (String::new(), t),
                Document::Chat(m) => opts.chat_template.render(&m),
            });
        }
        if chunk.is_empty() {
            break;
        }
        let encoded: Vec<(Vec<u32>, usize)> = chunk
            .par_iter()
            .map(|(prompt, body)| {
                let mut ids = if prompt.is_empty() {
                    Vec::new()
                } else {
                    tokenizer.encode(prompt)?
                };
                let prompt_len = ids.len();
                ids.extend(tokenizer.encode(body)?);
                Ok((ids, prompt_len))
            })
            .collect::<Result<_>>()?;
        for (ids, prompt_len) in encoded {
            if writer
                .as_ref()
                .is_some_and(|w| w.tokens() >= opts.tokens_per_shard)
                && let Some(w) = writer.take()
            {
                w.finish()?;
            }
            let w = match &mut writer {
                Some(w) => w,
                None => {
                    let name = format!("shard-{:05}", shards.len());
                    shards.push(name.clone());
                    writer.insert(ShardWriter::create(&tmp, &name, width)?)
                }
            };
            w.push(&ids, prompt_len)?;
            samples += 1;
            tokens += ids.len() as u64;
        }
    }
    if let Some(w) = writer.take() {
        w.finish()?;
    }
    let manifest = PreparedManifest {
        key: key.clone(),
        samples,
        tokens,
        shards,
        tokenizer_hash: tokenizer.hash().to_owned(),
        stream: stream.stats().clone(),
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|source| Error::Metadata {
        path: manifest_path.clone(),
        source,
    })?;
    write_atomic(&tmp.join("manifest.json"), &json)?;
    std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
    sync_dir(&opts.cache_dir)?;
    Ok(Prepared {
        dir,
        manifest,
        reused: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_templates_split_prompt_and_completion() {
        let m = |r: &str, c: &str| ChatMessage {
            role: r.into(),
            content: c.into(),
        };
        let conv = [
            m("system", "be nice"),
            m("user", "hi"),
            m("assistant", "hello"),
        ];
        let (p, c) = ChatTemplate::ChatMl.render(&conv);
        assert_eq!(
            p,
            "<|im_start|>system\nbe nice<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(c, "hello<|im_end|>\n");
        let (p, c) = ChatTemplate::Llama3.render(&conv[1..]);
        assert_eq!(
            p,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert_eq!(c, "hello<|eot_id|>");
    }

    #[test]
    fn template_is_detected_from_tokenizer_config() {
        let chatml =
            r#"{"chat_template": "{% for m in messages %}<|im_start|>{{m.role}}{% endfor %}"}"#;
        assert_eq!(
            ChatTemplate::from_tokenizer_config(chatml),
            Some(ChatTemplate::ChatMl)
        );
        let llama = r#"{"chat_template": "<|start_header_id|>{{ role }}<|end_header_id|>"}"#;
        assert_eq!(
            ChatTemplate::from_tokenizer_config(llama),
            Some(ChatTemplate::Llama3)
        );
        assert_eq!(ChatTemplate::from_tokenizer_config("{}"), None);
    }
}

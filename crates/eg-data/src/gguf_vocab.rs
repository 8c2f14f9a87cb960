//! Building a [`TextTokenizer`] from the `tokenizer.ggml.*` metadata of a GGUF file.
//!
//! llama.cpp stores the vocabulary in the file itself: the tokens in id order, their types,
//! the BPE merges by rank, and a name for the pre-tokenizer (`tokenizer.ggml.pre`) whose
//! splitting rules live in llama.cpp's code rather than in the file. This module rebuilds the
//! equivalent `tokenizers` pipeline. Only byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is
//! supported, with the pre-tokenizers whose rules are known here:
//!
//! | `tokenizer.ggml.pre` | llama.cpp's splitting | `tokenizers` pipeline |
//! |---|---|---|
//! | absent, `default`, `gpt2` | the GPT-2 regex | `ByteLevel` (with its regex) |
//! | `smollm`, `starcoder`, `refact`, `codeshell` | each digit alone, then the GPT-2 regex | `Digits(individual)` then `ByteLevel` |
//!
//! Anything else (SentencePiece `llama`, Llama 3 or Qwen2 pre-tokenizers, ...) is an
//! [`Error::UnsupportedTokenizer`], so a model is never run with a tokenizer that splits text
//! differently from the one it was trained with.

use serde_json::Value;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::tokenize::TextTokenizer;
use crate::{Error, Result};

const MODEL: &str = "tokenizer.ggml.model";
const PRE: &str = "tokenizer.ggml.pre";
const TOKENS: &str = "tokenizer.ggml.tokens";
const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const MERGES: &str = "tokenizer.ggml.merges";
const BOS: &str = "tokenizer.ggml.bos_token_id";
const EOS: &str = "tokenizer.ggml.eos_token_id";

/// llama.cpp's token types (`llama_token_type`).
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// Pre-tokenizer families of llama.cpp that this module reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreKind {
    /// The GPT-2 regex alone.
    Gpt2,
    /// Every digit split off alone, then the GPT-2 regex.
    DigitsThenGpt2,
}

fn pre_kind(pre: Option<&str>) -> Option<PreKind> {
    match pre {
        None | Some("default" | "gpt2") => Some(PreKind::Gpt2),
        Some("smollm" | "starcoder" | "refact" | "codeshell") => Some(PreKind::DigitsThenGpt2),
        Some(_) => None,
    }
}

fn bad(key: &'static str, reason: impl Into<String>) -> Error {
    Error::GgufMetadata {
        key,
        reason: reason.into(),
    }
}

fn get<'a>(meta: &'a Value, key: &'static str) -> Result<&'a Value> {
    meta.get(key).ok_or_else(|| bad(key, "missing"))
}

fn get_str<'a>(meta: &'a Value, key: &'static str) -> Result<&'a str> {
    get(meta, key)?
        .as_str()
        .ok_or_else(|| bad(key, "not a string"))
}

fn get_array<'a>(meta: &'a Value, key: &'static str) -> Result<&'a [Value]> {
    get(meta, key)?
        .as_array()
        .map(Vec::as_slice)
        .ok_or_else(|| bad(key, "not an array"))
}

/// An optional token id that, when present, must name a token of the vocabulary.
fn check_token_id(meta: &Value, key: &'static str, vocab_len: usize) -> Result<()> {
    match meta.get(key) {
        None => Ok(()),
        Some(v) => match v.as_u64() {
            Some(id) if id < vocab_len as u64 => Ok(()),
            Some(id) => Err(bad(
                key,
                format!("id {id} outside the vocabulary of {vocab_len} tokens"),
            )),
            None => Err(bad(key, "not a non-negative integer")),
        },
    }
}

impl TextTokenizer {
    /// Build the tokenizer stored in a GGUF file's metadata: a JSON object holding the
    /// `tokenizer.ggml.*` keys (eg-model's `GgufImport::tokenizer_metadata`, as an object).
    ///
    /// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is rebuilt with the vocabulary at its
    /// GGUF ids, the merges in rank order, and the pre-tokenizer llama.cpp uses for
    /// `tokenizer.ggml.pre` (its splitting rules live in llama.cpp's code, not in the file):
    ///
    /// | `tokenizer.ggml.pre` | llama.cpp's splitting | `tokenizers` pipeline |
    /// |---|---|---|
    /// | absent, `default`, `gpt2` | the GPT-2 regex | `ByteLevel` (with its regex) |
    /// | `smollm`, `starcoder`, `refact`, `codeshell` | each digit alone, then the GPT-2 regex | `Digits(individual)`, `ByteLevel` |
    ///
    /// Control tokens
    /// (token type 3, e.g. `<|im_start|>`) are added as special tokens and user-defined ones
    /// (type 4) as added tokens, so both are matched whole in text and never split. If a
    /// token text occurs twice, the first id keeps it.
    ///
    /// # Errors
    ///
    /// [`Error::UnsupportedTokenizer`] for another model (SentencePiece `llama`, ...) or an
    /// unknown pre-tokenizer; [`Error::GgufMetadata`] naming the key when one is missing or
    /// malformed (including a merge of unknown tokens, or a BOS/EOS id outside the
    /// vocabulary).
    ///
    /// # Example
    ///
    /// ```
    /// # fn main() -> eg_data::Result<()> {
    /// let meta = serde_json::json!({
    ///     "tokenizer.ggml.model": "gpt2",
    ///     "tokenizer.ggml.tokens": ["<|endoftext|>", "a", "b", "Ġ", "ab", "Ġab"],
    ///     "tokenizer.ggml.token_type": [3, 1, 1, 1, 1, 1],
    ///     "tokenizer.ggml.merges": ["a b", "Ġ ab"],
    /// });
    /// let tok = eg_data::TextTokenizer::from_gguf_metadata(&meta)?;
    /// assert_eq!(tok.encode("ab ab<|endoftext|>")?, vec![4, 5, 0]);
    /// assert_eq!(tok.decode(&[4, 5, 0])?, "ab ab<|endoftext|>");
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_gguf_metadata(meta: &Value) -> Result<Self> {
        if !meta.is_object() {
            return Err(bad(MODEL, "metadata is not a JSON object"));
        }
        let model = get_str(meta, MODEL)?;
        let pre = match meta.get(PRE) {
            None => None,
            Some(v) => Some(v.as_str().ok_or_else(|| bad(PRE, "not a string"))?),
        };
        let kind = match (model, pre_kind(pre)) {
            ("gpt2", Some(kind)) => kind,
            _ => {
                return Err(Error::UnsupportedTokenizer {
                    model: model.to_owned(),
                    pre: pre.map(str::to_owned),
                });
            }
        };

        let tokens = get_array(meta, TOKENS)?;
        let mut texts = Vec::with_capacity(tokens.len());
        let mut vocab = Vocab::default();
        for (id, t) in tokens.iter().enumerate() {
            let text = t
                .as_str()
                .ok_or_else(|| bad(TOKENS, format!("entry {id} is not a string")))?;
            let id = u32::try_from(id).map_err(|_| bad(TOKENS, "more than 2^32 tokens"))?;
            vocab.entry(text.to_owned()).or_insert(id);
            texts.push(text);
        }
        if texts.is_empty() {
            return Err(bad(TOKENS, "empty vocabulary"));
        }
        let types = match meta.get(TOKEN_TYPE) {
            None => Vec::new(),
            Some(v) => {
                let types = v
                    .as_array()
                    .ok_or_else(|| bad(TOKEN_TYPE, "not an array"))?;
                if types.len() != texts.len() {
                    return Err(bad(
                        TOKEN_TYPE,
                        format!("{} entries for {} tokens", types.len(), texts.len()),
                    ));
                }
                types
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        t.as_i64()
                            .ok_or_else(|| bad(TOKEN_TYPE, format!("entry {i} is not an integer")))
                    })
                    .collect::<Result<Vec<i64>>>()?
            }
        };
        check_token_id(meta, BOS, texts.len())?;
        check_token_id(meta, EOS, texts.len())?;

        let merges = get_array(meta, MERGES)?
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let m = m
                    .as_str()
                    .ok_or_else(|| bad(MERGES, format!("entry {i} is not a string")))?;
                match m.split_once(' ') {
                    Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                        Ok((a.to_owned(), b.to_owned()))
                    }
                    _ => Err(bad(
                        MERGES,
                        format!("entry {i} ({m:?}) is not two tokens separated by one space"),
                    )),
                }
            })
            .collect::<Result<Merges>>()?;

        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| bad(MERGES, e.to_string()))?;
        let mut tok = Tokenizer::new(bpe);
        // llama.cpp's gpt2-style pre-tokenizers never add a prefix space; offsets are trimmed
        // as in Hugging Face's own byte-level tokenizers.
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tokenizer: PreTokenizerWrapper = match kind {
            PreKind::Gpt2 => byte_level.into(),
            PreKind::DigitsThenGpt2 => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
        };
        tok.with_pre_tokenizer(Some(pre_tokenizer));
        tok.with_decoder(Some(byte_level));

        let added = |wanted: i64, special: bool| -> Vec<AddedToken> {
            texts
                .iter()
                .zip(&types)
                .filter(|&(_, &t)| t == wanted)
                .map(|(text, _)| AddedToken::from(*text, special).normalized(false))
                .collect()
        };
        tok.add_special_tokens(added(TYPE_CONTROL, true))
            .map_err(|e| bad(TOKEN_TYPE, format!("adding control tokens: {e}")))?;
        tok.add_tokens(added(TYPE_USER_DEFINED, false))
            .map_err(|e| bad(TOKEN_TYPE, format!("adding user-defined tokens: {e}")))?;
        Self::new(tok)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may panic

    use serde_json::json;

    use super::*;

    /// A tiny byte-level BPE vocabulary: the byte symbols of "the cat 2024!", a few merges,
    /// a control token and a user-defined token.
    fn tiny() -> Value {
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into()];
        let mut types = vec![3, 3];
        for c in "thecaĠ2041!".chars() {
            tokens.push(c.to_string());
            types.push(1);
        }
        for t in ["th", "the", "Ġc", "Ġca", "Ġcat", "20", "Ġthe"] {
            tokens.push(t.into());
            types.push(1);
        }
        tokens.push("<tool>".into());
        types.push(4);
        json!({
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": ["t h", "th e", "Ġ c", "Ġc a", "Ġca t", "2 0", "Ġ the"],
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 0,
        })
    }

    fn id(meta: &Value, token: &str) -> u32 {
        meta[TOKENS]
            .as_array()
            .unwrap()
            .iter()
            .position(|t| t == token)
            .unwrap() as u32
    }

    #[test]
    fn gguf_gpt2_vocab_round_trips_and_keeps_ids() {
        let meta = tiny();
        let tok = TextTokenizer::from_gguf_metadata(&meta).unwrap();
        assert_eq!(tok.vocab_size(), 21);
        let ids = tok.encode("the cat").unwrap();
        assert_eq!(ids, vec![id(&meta, "the"), id(&meta, "Ġcat")]);
        for text in [
            "the cat the",
            "<|im_start|>the cat!<|endoftext|>",
            " tea  2024 <tool>!",
        ] {
            let ids = tok.encode(text).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), text, "{ids:?}");
        }
    }

    #[test]
    fn gguf_special_tokens_are_not_split() {
        let meta = tiny();
        let tok = TextTokenizer::from_gguf_metadata(&meta).unwrap();
        assert_eq!(
            tok.encode("<|im_start|>the<tool>").unwrap(),
            vec![
                id(&meta, "<|im_start|>"),
                id(&meta, "the"),
                id(&meta, "<tool>")
            ]
        );
        assert_eq!(tok.token_id("<|endoftext|>"), Some(0));
    }

    #[test]
    fn gguf_smollm_pre_tokenizer_splits_digits_but_gpt2_does_not() {
        let mut meta = tiny();
        let tok = TextTokenizer::from_gguf_metadata(&meta).unwrap();
        // "2024": digits one by one, so the "20" merge never applies.
        let two = id(&meta, "2");
        let zero = id(&meta, "0");
        let four = id(&meta, "4");
        assert_eq!(tok.encode("2024").unwrap(), vec![two, zero, two, four]);
        meta[PRE] = json!("gpt2");
        let tok = TextTokenizer::from_gguf_metadata(&meta).unwrap();
        let twenty = id(&meta, "20");
        assert_eq!(tok.encode("2024").unwrap(), vec![twenty, two, four]);
    }

    #[test]
    fn gguf_unsupported_models_are_typed_errors() {
        let mut meta = tiny();
        meta[MODEL] = json!("llama");
        match TextTokenizer::from_gguf_metadata(&meta) {
            Err(Error::UnsupportedTokenizer { model, pre }) => {
                assert_eq!(model, "llama");
                assert_eq!(pre.as_deref(), Some("smollm"));
            }
            other => panic!("{other:?}"),
        }
        let mut meta = tiny();
        meta[PRE] = json!("llama-bpe");
        assert!(matches!(
            TextTokenizer::from_gguf_metadata(&meta),
            Err(Error::UnsupportedTokenizer { .. })
        ));
    }

    #[test]
    fn gguf_bad_metadata_names_the_key() {
        let key_of = |meta: &Value| match TextTokenizer::from_gguf_metadata(meta) {
            Err(Error::GgufMetadata { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        for key in [MODEL, TOKENS, MERGES] {
            let mut meta = tiny();
            meta.as_object_mut().unwrap().remove(key);
            assert_eq!(key_of(&meta), key);
        }
        let mut meta = tiny();
        meta[MERGES] = json!(["t h", "nospace"]);
        assert_eq!(key_of(&meta), MERGES);
        let mut meta = tiny();
        meta[MERGES] = json!(["x y"]);
        assert_eq!(key_of(&meta), MERGES);
        let mut meta = tiny();
        meta[TOKENS][3] = json!(7);
        assert_eq!(key_of(&meta), TOKENS);
        let mut meta = tiny();
        meta[TOKEN_TYPE] = json!([3]);
        assert_eq!(key_of(&meta), TOKEN_TYPE);
        let mut meta = tiny();
        meta[EOS] = json!(1000);
        assert_eq!(key_of(&meta), EOS);
        assert_eq!(key_of(&json!([1, 2])), MODEL);
    }
}

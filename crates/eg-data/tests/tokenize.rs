//! Tokenizer training, round trips, parallel preparation into cached shards, and loading them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use eg_data::order::SplitMix64;
use eg_data::{
    BpeOptions, FieldPath, Format, JsonField, Loader, LoaderOptions, Packing, Placement,
    PrepareOptions, StreamOptions, TextSplit, TextTokenizer, TokenDataset, prepare,
};

const WORDS: &[&str] = &[
    "the",
    "king",
    "said",
    "unto",
    "them",
    "and",
    "thou",
    "shalt",
    "not",
    "love",
    "café",
    "naïve",
    "über",
    "日本",
    "🚀",
    "it's",
    "—",
    "\"quoted\"",
    "x=1;",
    "tabs\there",
    "  spaced",
];

/// Deterministic generated text: `lines` lines of random words.
fn generated_lines(seed: u64, lines: usize) -> Vec<String> {
    let mut r = SplitMix64::new(seed);
    (0..lines)
        .map(|_| {
            let n = 3 + r.below(12) as usize;
            (0..n)
                .map(|_| WORDS[r.below(WORDS.len() as u64) as usize])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

fn write_corpus(dir: &Path, files: usize, lines: usize) -> Vec<PathBuf> {
    (0..files)
        .map(|i| {
            let p = dir.join(format!("part-{i}.txt"));
            std::fs::write(&p, generated_lines(i as u64, lines).join("\n")).unwrap();
            p
        })
        .collect()
}

fn small_bpe() -> BpeOptions {
    BpeOptions {
        vocab_size: 400,
        min_frequency: 2,
        special_tokens: vec!["<|endoftext|>".into()],
    }
}

#[test]
fn trained_bpe_round_trips_text_exactly() {
    let d = tempfile::tempdir().unwrap();
    let files = write_corpus(d.path(), 2, 300);
    let tok = TextTokenizer::train_bpe_from_files(
        files,
        Format::Text(TextSplit::Lines),
        StreamOptions::default(),
        &small_bpe(),
    )
    .unwrap();
    assert!(
        tok.vocab_size() > 256 && tok.vocab_size() <= 400,
        "{}",
        tok.vocab_size()
    );
    assert_eq!(tok.token_id("<|endoftext|>"), Some(0));
    let mut texts = generated_lines(99, 50);
    texts.push("Unseen: Ωmega ß ∑ 𝄞 \r\n\t mixed   whitespace  ".into());
    let ids = tok.encode_batch(&texts).unwrap();
    for (t, i) in texts.iter().zip(&ids) {
        assert_eq!(&tok.decode(i).unwrap(), t);
    }
    // Saved and reloaded: same hash, same ids.
    let path = d.path().join("tokenizer.json");
    tok.save(&path).unwrap();
    let again = TextTokenizer::from_file(&path).unwrap();
    assert_eq!(again.hash(), tok.hash());
    assert_eq!(again.encode_batch(&texts).unwrap(), ids);
}

#[test]
fn prepare_is_cached_and_loads() {
    let d = tempfile::tempdir().unwrap();
    let files = write_corpus(d.path(), 3, 100);
    let texts: Vec<String> = files.iter().flat_map(|f| generated_lines_of(f)).collect();
    let tok = TextTokenizer::train_bpe(texts.iter(), &small_bpe()).unwrap();
    let mut opts = PrepareOptions::new(Format::Text(TextSplit::Lines), d.path().join("cache"));
    opts.docs_per_chunk = 37;
    opts.tokens_per_shard = 2000;
    let first = prepare(&files, &tok, &opts).unwrap();
    assert!(!first.reused);
    assert_eq!(first.manifest.samples, 300);
    assert!(
        first.manifest.shards.len() > 1,
        "several shards: {:?}",
        first.manifest.shards
    );
    let second = prepare(&files, &tok, &opts).unwrap();
    assert!(second.reused);
    assert_eq!(second.manifest, first.manifest);

    // Shards hold exactly the encoded documents, in order.
    let shards = first.open().unwrap();
    assert_eq!(shards.len(), 300);
    let expected = tok.encode_batch(&texts).unwrap();
    for (i, e) in expected.iter().enumerate() {
        let mut out = vec![0; shards.sample_len(i as u64).unwrap()];
        shards.read_tokens(i as u64, 0, &mut out).unwrap();
        assert_eq!(&out, e);
    }
    // Changing an input changes the key.
    std::fs::write(&files[0], "changed").unwrap();
    let third = prepare(&files, &tok, &opts).unwrap();
    assert!(!third.reused);
    assert_ne!(third.manifest.key, first.manifest.key);

    // The loader streams the shards.
    let eos = tok.token_id("<|endoftext|>");
    let o = LoaderOptions {
        seq_len: 64,
        rows_per_step: 4,
        eos_id: eos,
        epochs: Some(1),
        ..Default::default()
    };
    let mut loader = Loader::new(Arc::new(shards), o, Placement::SINGLE).unwrap();
    let mut tokens = 0;
    while let Some(b) = loader.next_batch().unwrap() {
        tokens += b.tokens;
    }
    assert_eq!(tokens as u64, first.manifest.tokens + 300);
}

fn generated_lines_of(f: &Path) -> Vec<String> {
    std::fs::read_to_string(f)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn chat_jsonl_prepares_with_prompt_masks() {
    let d = tempfile::tempdir().unwrap();
    let jsonl = d.path().join("chat.jsonl");
    let mut lines = Vec::new();
    for i in 0..20 {
        lines.push(format!(
            r#"{{"messages": [{{"role": "user", "content": "question {i}?"}}, {{"role": "assistant", "content": "answer {i}."}}]}}"#
        ));
    }
    lines.push("{broken".into());
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let tok = TextTokenizer::train_bpe(generated_lines(1, 200).into_iter(), &small_bpe()).unwrap();
    let mut opts = PrepareOptions::new(
        Format::Jsonl(JsonField::Messages(FieldPath::parse("messages"))),
        d.path().join("c"),
    );
    opts.stream = StreamOptions {
        max_error_fraction: 0.5,
        quarantine: Some(d.path().join("q.jsonl")),
        ..StreamOptions::default()
    };
    let p = prepare(std::slice::from_ref(&jsonl), &tok, &opts).unwrap();
    assert_eq!(p.manifest.samples, 20);
    assert_eq!(p.manifest.stream.bad, 1);
    let shards = p.open().unwrap();
    let (prompt, completion) = eg_data::ChatTemplate::ChatMl.render(&[
        eg_data::ChatMessage {
            role: "user".into(),
            content: "question 0?".into(),
        },
        eg_data::ChatMessage {
            role: "assistant".into(),
            content: "answer 0.".into(),
        },
    ]);
    let plen = tok.encode(&prompt).unwrap().len();
    assert_eq!(shards.prompt_len(0).unwrap(), plen);
    assert_eq!(
        shards.sample_len(0).unwrap(),
        plen + tok.encode(&completion).unwrap().len()
    );
    let o = LoaderOptions {
        seq_len: 256,
        rows_per_step: 2,
        packing: Packing::BestFit { window: 20 },
        epochs: Some(1),
        ..Default::default()
    };
    let mut loader = Loader::new(Arc::new(shards), o, Placement::SINGLE).unwrap();
    let b = loader.next_batch().unwrap().unwrap();
    assert!(b.target_tokens() > 0 && b.target_tokens() < b.tokens);
}

//! Real text: the Shakespeare and King James corpora fetched by `cargo xtask fetch-assets`.
//!
//! Ignored by default (they need the assets and take a while in debug builds); run with
//! `cargo test -p eg-data --test tests real_text -- --ignored`. The asset directory is
//! `EG_ASSET_DIR` or `.eg-cache/assets` at the workspace root; missing assets fail the test.

use std::path::PathBuf;
use std::sync::Arc;

use eg_data::{
    BpeOptions, Format, Loader, LoaderOptions, Placement, PrepareOptions, StreamOptions, TextSplit,
    TextTokenizer, TokenDataset, expand_inputs, prepare,
};

fn assets() -> PathBuf {
    let dir = std::env::var_os("EG_ASSET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.eg-cache/assets")
        });
    assert!(
        dir.join("kjv.txt").is_file(),
        "assets missing in {}: run `cargo xtask fetch-assets`",
        dir.display()
    );
    dir
}

#[test]
#[ignore = "needs `cargo xtask fetch-assets`; run with --ignored"]
fn shakespeare_and_kjv_prepare_stream_and_round_trip() {
    let dir = assets();
    let plays = expand_inputs(&[format!("{}/shakespeare/*.md", dir.display())]).unwrap();
    assert!(plays.len() >= 30, "{} plays", plays.len());
    let kjv = vec![dir.join("kjv.txt")];
    let mut files = plays.clone();
    files.extend(kjv.iter().cloned());

    let tok = TextTokenizer::train_bpe_from_files(
        files.clone(),
        Format::Text(TextSplit::Lines),
        StreamOptions::default(),
        &BpeOptions {
            vocab_size: 8192,
            ..BpeOptions::default()
        },
    )
    .unwrap();
    assert_eq!(tok.vocab_size(), 8192);

    // Exact round trip of every file, as one string each (newlines and all).
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let ids = tok.encode(&text).unwrap();
        assert!(ids.len() < text.len() / 2, "{} compresses", f.display());
        assert_eq!(tok.decode(&ids).unwrap(), text, "{}", f.display());
    }

    let cache = tempfile::tempdir().unwrap();
    for (inputs, split) in [(plays, TextSplit::Paragraphs), (kjv, TextSplit::Lines)] {
        let opts = PrepareOptions::new(Format::Text(split), cache.path());
        let p = prepare(&inputs, &tok, &opts).unwrap();
        assert_eq!(p.manifest.stream.bad, 0);
        assert!(prepare(&inputs, &tok, &opts).unwrap().reused);
        let shards: Arc<dyn TokenDataset> = Arc::new(p.open().unwrap());
        let o = LoaderOptions {
            seq_len: 512,
            rows_per_step: 8,
            eos_id: tok.token_id("<|endoftext|>"),
            epochs: Some(1),
            ..Default::default()
        };
        let mut l = Loader::new(shards, o, Placement::SINGLE).unwrap();
        let mut tokens = 0u64;
        while let Some(b) = l.next_batch().unwrap() {
            tokens += b.tokens as u64;
        }
        assert_eq!(tokens, p.manifest.tokens + p.manifest.samples);
    }
}

//! Labelled rows (issue 6): JSONL with integer or string labels and a stable saved label map,
//! quarantine of bad records, one example per padded row through the ordinary loader,
//! deterministic order, rank sharding, exact resume, pairs, held-out split.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use eg_data::labeled::{classification_rows, pair_rows};
use eg_data::{
    BpeOptions, Cursor, LabelMap, LabeledDataset, LabeledOptions, Loader, Placement, StreamOptions,
    TextTokenizer, TokenDataset,
};

fn tokenizer() -> TextTokenizer {
    let texts = [
        "the cat sat on the mat",
        "a dog ran in the park",
        "[CLS] [SEP]",
    ];
    TextTokenizer::train_bpe(
        texts.iter().map(|s| s.to_string()),
        &BpeOptions {
            vocab_size: 300,
            min_frequency: 1,
            special_tokens: vec!["[PAD]".into(), "[CLS]".into(), "[SEP]".into()],
        },
    )
    .unwrap()
}

fn write(dir: &Path, name: &str, lines: &[&str]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

fn opts(dir: &Path, tok: &TextTokenizer) -> LabeledOptions {
    LabeledOptions {
        stream: StreamOptions {
            quarantine: Some(dir.join("q.jsonl")),
            max_error_fraction: 0.7,
            ..StreamOptions::default()
        },
        ..LabeledOptions::classification(8)
            .with_bert_specials(tok)
            .unwrap()
    }
}

#[test]
fn string_labels_get_a_sorted_stable_map_and_bad_records_are_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let lines = [
        r#"{"text": "the cat sat", "label": "pos"}"#,
        r#"{"text": "a dog ran", "label": "neg"}"#,
        r#"{"text": "the mat", "label": "pos"}"#,
        r#"{"text": "no label here"}"#,
        r#"{"text": "float label", "label": 1.5}"#,
        r#"{"text": "int among strings", "label": 1}"#,
        r#"{"text": "", "label": "neg"}"#,
        r#"{not json"#,
        r#"{"text": "the park", "label": "mid"}"#,
    ];
    let f = write(dir.path(), "a.jsonl", &lines);
    let o = opts(dir.path(), &tok);
    let d = LabeledDataset::read_jsonl(&[f], &tok, &o).unwrap();
    assert_eq!(d.len(), 4);
    assert_eq!(d.num_labels(), 3);
    let map = d.label_map().unwrap();
    assert_eq!(map.names(), ["mid", "neg", "pos"]);
    let labels: Vec<u32> = (0..4).map(|i| d.label(i).unwrap()).collect();
    assert_eq!(labels, [2, 1, 2, 0]);
    assert_eq!(d.stats().bad, 5);
    let q = eg_data::stream::read_quarantine(&dir.path().join("q.jsonl")).unwrap();
    let reasons: Vec<(u64, &str)> = q.iter().map(|e| (e.line, e.reason.name())).collect();
    assert_eq!(
        reasons,
        [
            (4, "missing_field"),
            (5, "wrong_type"),
            (7, "wrong_type"),
            (8, "malformed_json"),
            (6, "wrong_type"),
        ]
    );

    // Reversed rows give the same map; a saved map reloads; an unknown name is quarantined.
    let mut rev = lines.to_vec();
    rev.reverse();
    let g = write(dir.path(), "b.jsonl", &rev);
    let d2 = LabeledDataset::read_jsonl(&[g], &tok, &o).unwrap();
    assert_eq!(d2.label_map(), Some(map));
    map.save(&dir.path().join("labels.json")).unwrap();
    let loaded = LabelMap::load(&dir.path().join("labels.json")).unwrap();
    assert_eq!(&loaded, map);
    let h = write(
        dir.path(),
        "c.jsonl",
        &[
            r#"{"text": "the cat", "label": "neg"}"#,
            r#"{"text": "the dog", "label": "pos"}"#,
            r#"{"text": "a mat", "label": "unseen"}"#,
        ],
    );
    let fixed = LabeledOptions {
        label_map: Some(loaded),
        ..o.clone()
    };
    let d3 = LabeledDataset::read_jsonl(&[h], &tok, &fixed).unwrap();
    assert_eq!(d3.len(), 2);
    assert_eq!((d3.label(0).unwrap(), d3.label(1).unwrap()), (1, 2));
    assert_eq!(d3.stats().bad, 1);
}

#[test]
fn integer_labels_are_ids_and_out_of_range_ones_are_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let f = write(
        dir.path(),
        "a.jsonl",
        &[
            r#"{"text": "the cat", "label": 0}"#,
            r#"{"text": "the dog", "label": 1}"#,
            r#"{"text": "a mat", "label": 7}"#,
            r#"{"text": "a park", "label": "one"}"#,
            r#"{"text": "a park", "label": true}"#,
        ],
    );
    let o = LabeledOptions {
        num_labels: Some(2),
        ..opts(dir.path(), &tok)
    };
    let d = LabeledDataset::read_jsonl(std::slice::from_ref(&f), &tok, &o).unwrap();
    assert_eq!(d.len(), 2);
    assert!(d.label_map().is_none());
    assert_eq!(d.stats().bad, 3);
    // Above the error fraction the read stops with a typed error naming the file.
    let strict = LabeledOptions {
        stream: StreamOptions {
            max_error_fraction: 0.1,
            ..o.stream.clone()
        },
        ..o
    };
    let err = LabeledDataset::read_jsonl(&[f], &tok, &strict).unwrap_err();
    assert!(
        matches!(
            err,
            eg_data::Error::TooManyBadRecords {
                bad: 3,
                total: 5,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn texts_are_framed_and_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let f = write(
        dir.path(),
        "a.jsonl",
        &[
            r#"{"text": "the cat sat on the mat the cat sat on the mat", "label": 0}"#,
            r#"{"text": "dog", "label": 1}"#,
        ],
    );
    let o = opts(dir.path(), &tok);
    let d = LabeledDataset::read_jsonl(&[f], &tok, &o).unwrap();
    let cls = tok.token_id("[CLS]").unwrap();
    let sep = tok.token_id("[SEP]").unwrap();
    let mut s = vec![0u32; d.sample_len(0).unwrap()];
    d.read_tokens(0, 0, &mut s).unwrap();
    // header (label 0), CLS, 6 text tokens, SEP: max_len 8.
    assert_eq!(s.len(), 1 + 8);
    assert_eq!((s[0], s[1], s[8]), (0, cls, sep));
}

fn synthetic(n: u32) -> LabeledDataset {
    LabeledDataset::classification(
        (0..n).map(|i| ((0..1 + i % 5).map(|k| 10 + k + i).collect(), i % 3)),
        6,
        3,
    )
    .unwrap()
}

#[test]
fn loader_gives_one_padded_example_per_row_each_once_per_epoch() {
    let d = Arc::new(synthetic(10));
    let o = d.loader_options(4, 5, true, Some(1));
    let mut l = Loader::new(d.clone(), o, Placement::SINGLE).unwrap();
    let mut seen = Vec::new();
    while let Some(b) = l.next_batch().unwrap() {
        let rows = classification_rows(&b, 0..b.rows, 0).unwrap();
        assert_eq!(rows.labels.len(), b.rows);
        for r in 0..b.rows {
            let len = rows.texts.len;
            let ids = &rows.texts.ids[r * len..(r + 1) * len];
            let mask = &rows.texts.mask[r * len..(r + 1) * len];
            let n = mask.iter().sum::<u32>() as usize;
            assert!(mask[..n].iter().all(|&m| m == 1) && ids[n..].iter().all(|&t| t == 0));
            // Recover the example from its first token: i = ids[0] - 10.
            let i = ids[0] - 10;
            assert_eq!(n as u32, 1 + i % 5);
            assert_eq!(rows.labels[r], i % 3);
            seen.push(i);
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
}

#[test]
fn ranks_split_the_global_batch_and_a_cursor_resumes_exactly() {
    let d = Arc::new(synthetic(13));
    let o = d.loader_options(4, 9, true, None);
    let mut full = Loader::new(d.clone(), o.clone(), Placement::SINGLE).unwrap();
    let mut expected = Vec::new();
    let mut saved: Option<Cursor> = None;
    for step in 0..7 {
        if step == 3 {
            saved = Some(full.cursor());
        }
        let b = full.next_batch().unwrap().unwrap();
        expected.push(classification_rows(&b, 0..b.rows, 0).unwrap());
    }
    let c = Cursor::from_json(&saved.unwrap().to_json().unwrap()).unwrap();
    #[allow(clippy::needless_range_loop)]
    for step in 3..7 {
        let mut labels = Vec::new();
        for rank in 0..2 {
            let p = Placement { rank, world: 2 };
            let mut l = Loader::with_cursor(d.clone(), o.clone(), p, &c).unwrap();
            for _ in 3..step {
                l.next_batch().unwrap();
            }
            let b = l.next_batch().unwrap().unwrap();
            labels.extend(classification_rows(&b, 0..b.rows, 0).unwrap().labels);
        }
        assert_eq!(labels, expected[step].labels);
    }
    let mut one = Loader::with_cursor(d.clone(), o, Placement::SINGLE, &c).unwrap();
    for e in &expected[3..] {
        let b = one.next_batch().unwrap().unwrap();
        assert_eq!(&classification_rows(&b, 0..b.rows, 0).unwrap(), e);
    }
}

#[test]
fn pairs_round_trip_through_the_loader_and_jsonl() {
    let d = Arc::new(
        LabeledDataset::pairs(
            (0..6u32).map(|i| (vec![i + 1; 1 + i as usize % 3], vec![100 + i; 2])),
            4,
        )
        .unwrap(),
    );
    let o = d.loader_options(3, 1, false, Some(1));
    let mut l = Loader::new(d.clone(), o, Placement::SINGLE).unwrap();
    let b = l.next_batch().unwrap().unwrap();
    let p = pair_rows(&b, 1..3, 0).unwrap();
    assert_eq!(p.anchors.rows, 2);
    assert_eq!(p.anchors.len, 3);
    assert_eq!(&p.anchors.ids[..3], &[2, 2, 0]);
    assert_eq!(&p.anchors.mask[..3], &[1, 1, 0]);
    assert_eq!(&p.positives.ids, &[101, 101, 102, 102]);
    // A classification view of a pair batch is still readable, but the reverse is refused.
    let c = Arc::new(synthetic(3));
    let mut lc = Loader::new(
        c.clone(),
        c.loader_options(3, 1, false, Some(1)),
        Placement::SINGLE,
    )
    .unwrap();
    let bc = lc.next_batch().unwrap().unwrap();
    assert!(pair_rows(&bc, 0..3, 0).is_err());

    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let f = write(
        dir.path(),
        "p.jsonl",
        &[
            r#"{"anchor": "the cat", "positive": "a cat sat"}"#,
            r#"{"anchor": "the dog"}"#,
        ],
    );
    let o = LabeledOptions {
        stream: StreamOptions {
            max_error_fraction: 0.5,
            ..StreamOptions::default()
        },
        ..LabeledOptions::pairs(8).with_bert_specials(&tok).unwrap()
    };
    let pd = LabeledDataset::read_jsonl(&[f], &tok, &o).unwrap();
    assert_eq!((pd.len(), pd.stats().bad), (1, 1));
}

#[test]
fn packed_batches_are_refused() {
    let d = Arc::new(synthetic(6));
    let o = eg_data::LoaderOptions {
        packing: eg_data::Packing::Concat,
        ..d.loader_options(2, 1, false, Some(1))
    };
    let mut l = Loader::new(d.clone(), o, Placement::SINGLE).unwrap();
    let b = l.next_batch().unwrap().unwrap();
    assert!(classification_rows(&b, 0..b.rows, 0).is_err());
}

#[test]
fn holdout_split_is_seeded_disjoint_and_complete() {
    let d = synthetic(40);
    let (train, eval) = d.split_holdout(0.25, 3).unwrap();
    assert_eq!((train.len(), eval.len()), (30, 10));
    let key = |ds: &LabeledDataset| -> Vec<Vec<u32>> {
        (0..ds.len())
            .map(|i| {
                let mut v = vec![0; ds.sample_len(i).unwrap()];
                ds.read_tokens(i, 0, &mut v).unwrap();
                v
            })
            .collect()
    };
    let mut all = key(&train);
    all.extend(key(&eval));
    all.sort();
    let mut orig = key(&d);
    orig.sort();
    assert_eq!(all, orig);
    let (_, again) = d.split_holdout(0.25, 3).unwrap();
    assert_eq!(key(&again), key(&eval));
    let (_, other) = d.split_holdout(0.25, 4).unwrap();
    assert_ne!(key(&other), key(&eval));
    assert_eq!(train.label_counts().unwrap().iter().sum::<u64>(), 30);
}

//! Property tests of order, sharding, packing and exact resume.

use std::collections::BTreeMap;
use std::sync::Arc;

use eg_data::order::{epoch_order, shard_range};
use eg_data::{
    Batch, Cursor, InMemoryDataset, Loader, LoaderOptions, Packing, Placement, TokenDataset,
};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

const EOS: u32 = 0;
const PAD: u32 = u32::MAX;

/// Token `j` of document `i` encodes `(i, j)` so every token is unique and traceable.
fn token(doc: usize, j: usize) -> u32 {
    (doc * 10_000 + j + 1) as u32
}

fn dataset(lens: &[usize], prompts: bool) -> Arc<InMemoryDataset> {
    let mut d = InMemoryDataset::new();
    for (i, &len) in lens.iter().enumerate() {
        let toks: Vec<u32> = (0..len).map(|j| token(i, j)).collect();
        d.push(&toks, if prompts { len / 3 } else { 0 });
    }
    Arc::new(d)
}

fn packing_strategy() -> impl Strategy<Value = Packing> {
    prop_oneof![
        Just(Packing::Concat),
        (1usize..12).prop_map(|window| Packing::BestFit { window })
    ]
}

fn opts(
    seq_len: usize,
    rows: usize,
    packing: Packing,
    eos: bool,
    epochs: Option<u64>,
    seed: u64,
) -> LoaderOptions {
    LoaderOptions {
        seq_len,
        rows_per_step: rows,
        packing,
        eos_id: eos.then_some(EOS),
        pad_id: PAD,
        seed,
        shuffle: true,
        epochs,
    }
}

/// One global step as all ranks see it together.
fn global_step(loaders: &mut [Loader]) -> Option<Vec<Batch>> {
    let batches: Vec<Option<Batch>> = loaders
        .iter_mut()
        .map(|l| l.next_batch().unwrap())
        .collect();
    if batches.iter().all(Option::is_none) {
        return None;
    }
    Some(batches.into_iter().map(|b| b.unwrap_or_default()).collect())
}

/// Hash of a global batch: the concatenation of the ranks' rows and segment lengths.
fn global_hash(batches: &[Batch]) -> [u8; 32] {
    let mut h = Sha256::new();
    let stepped: Vec<_> = batches.iter().filter(|b| b.rows > 0).collect();
    h.update(stepped[0].step.to_le_bytes());
    h.update(stepped[0].rng_seed.to_le_bytes());
    // Each array in turn, concatenated over ranks, so the hash does not depend on the split.
    for t in stepped.iter().flat_map(|b| &b.input_ids) {
        h.update(t.to_le_bytes());
    }
    for t in stepped.iter().flat_map(|b| &b.position_ids) {
        h.update(t.to_le_bytes());
    }
    for b in &stepped {
        h.update(&b.loss_mask);
    }
    for b in &stepped {
        for w in b.cu_seqlens.windows(2) {
            h.update((w[1] - w[0]).to_le_bytes());
        }
    }
    h.finalize().into()
}

fn loaders(
    data: &Arc<InMemoryDataset>,
    o: &LoaderOptions,
    world: usize,
    cursor: Option<&Cursor>,
) -> Vec<Loader> {
    (0..world)
        .map(|rank| {
            let p = Placement { rank, world };
            let d: Arc<dyn TokenDataset> = data.clone();
            match cursor {
                Some(c) => Loader::with_cursor(d, o.clone(), p, c).unwrap(),
                None => Loader::new(d, o.clone(), p).unwrap(),
            }
        })
        .collect()
}

/// Check structural invariants of a batch and record its tokens per document.
fn check_batch(b: &Batch, seen: &mut BTreeMap<(usize, usize), u32>) {
    assert_eq!(b.input_ids.len(), b.rows * b.seq_len);
    assert_eq!(*b.cu_seqlens.last().unwrap() as usize, b.input_ids.len());
    for (seg, w) in b.cu_seqlens.windows(2).enumerate() {
        let (s, e) = (w[0] as usize, w[1] as usize);
        assert!(e > s);
        assert_eq!(s / b.seq_len, (e - 1) / b.seq_len, "segment crosses a row");
        if b.segment_is_padding[seg] {
            assert!(b.input_ids[s..e].iter().all(|&t| t == PAD));
            assert!(b.loss_mask[s..e].iter().all(|&m| m == 0));
            continue;
        }
        // One document per segment, consecutive tokens: no cross-document attention.
        let mut doc = None;
        let mut last_j: Option<usize> = None;
        for (k, &t) in b.input_ids[s..e].iter().enumerate() {
            assert_eq!(b.position_ids[s + k] as usize, k);
            if k == 0 {
                assert_eq!(
                    b.loss_mask[s], 0,
                    "first token of a segment is not a target"
                );
            }
            if t == EOS {
                assert_eq!(k, e - s - 1, "EOS ends its segment");
                // An EOS may start a row on its own, so only its count is checked.
                *seen.entry((usize::MAX, usize::MAX)).or_default() += 1;
                continue;
            }
            let (d, j) = ((t as usize - 1) / 10_000, (t as usize - 1) % 10_000);
            assert!(doc.is_none_or(|x| x == d), "segment mixes documents");
            if let Some(l) = last_j {
                assert_eq!(j, l + 1);
            }
            doc = Some(d);
            last_j = Some(j);
            *seen.entry((d, j)).or_default() += 1;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// Sample-level sharding: the ranks' slices of an epoch's order partition it.
    #[test]
    fn sharding_partitions_each_epoch(n in 1u32..300, world in 1usize..=8, seed: u64, epoch in 0u64..5) {
        let order = epoch_order(n, seed, epoch, true);
        let mut all: Vec<u32> = (0..world).flat_map(|r| order[shard_range(order.len(), r, world)].to_vec()).collect();
        prop_assert_eq!(&all, &order);
        all.sort_unstable();
        prop_assert_eq!(all, (0..n).collect::<Vec<_>>());
    }

    /// Token-level: over one epoch, all ranks together emit every token (and one EOS per
    /// sample) exactly once, segments never mix documents, in both packing modes.
    #[test]
    fn packing_preserves_every_token_once(
        lens in prop::collection::vec(0usize..40, 1..60),
        seq_len in 1usize..48,
        rows in 1usize..6,
        world in 1usize..=8,
        packing in packing_strategy(),
        eos: bool,
        seed: u64,
    ) {
        prop_assume!(eos || lens.iter().any(|&l| l > 0));
        let data = dataset(&lens, false);
        let o = opts(seq_len, rows.max(world), packing, eos, Some(1), seed);
        let mut ls = loaders(&data, &o, world, None);
        let mut seen = BTreeMap::new();
        while let Some(bs) = global_step(&mut ls) {
            for b in &bs {
                check_batch(b, &mut seen);
            }
        }
        let mut expected = BTreeMap::new();
        for (d, &len) in lens.iter().enumerate() {
            for j in 0..len {
                expected.insert((d, j), 1u32);
            }
        }
        if eos {
            expected.insert((usize::MAX, usize::MAX), lens.len() as u32);
        }
        prop_assert_eq!(seen, expected);
    }

    /// Exact resume: batches(0..N) == batches(0..k) + restore(cursor_k) + batches(k..N), by
    /// hashes of the global batches, across a change of rank count and a JSON round trip.
    #[test]
    fn resume_is_exact_across_rank_counts(
        lens in prop::collection::vec(1usize..50, 1..40),
        seq_len in 4usize..40,
        packing in packing_strategy(),
        w1 in 1usize..=4,
        w2 in 1usize..=4,
        k in 0usize..12,
        seed: u64,
    ) {
        let n_steps = 14;
        let data = dataset(&lens, true);
        let o = opts(seq_len, 4, packing, true, None, seed);
        let mut whole = loaders(&data, &o, 1, None);
        let expected: Vec<_> = (0..n_steps).map(|_| global_hash(&global_step(&mut whole).unwrap())).collect();

        let mut first = loaders(&data, &o, w1, None);
        let mut got: Vec<_> = (0..k).map(|_| global_hash(&global_step(&mut first).unwrap())).collect();
        let cursor = first[0].cursor();
        for l in &first {
            prop_assert_eq!(&l.cursor(), &cursor, "all ranks hold the same cursor");
        }
        let bytes = cursor.to_json().unwrap();
        let restored = Cursor::from_json(&bytes).unwrap();
        prop_assert_eq!(&restored, &cursor);
        let mut second = loaders(&data, &o, w2, Some(&restored));
        got.extend((k..n_steps).map(|_| global_hash(&global_step(&mut second).unwrap())));
        prop_assert_eq!(got, expected);
    }
}

#[test]
fn prompt_tokens_are_masked() {
    let data = dataset(&[9], true);
    let o = opts(16, 1, Packing::BestFit { window: 4 }, true, Some(1), 1);
    let mut l = loaders(&data, &o, 1, None);
    let b = l[0].next_batch().unwrap().unwrap();
    // 9 tokens, 3 of prompt, then EOS: targets are tokens 3..9 and EOS.
    assert_eq!(&b.loss_mask[..11], &[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0]);
    assert_eq!(b.target_tokens(), 7);
    assert!((b.efficiency() - 10.0 / 16.0).abs() < 1e-9);
}

#[test]
fn different_epochs_have_different_orders_and_stream_continues() {
    let lens: Vec<usize> = vec![3; 20];
    let data = dataset(&lens, false);
    let o = opts(4, 1, Packing::BestFit { window: 1 }, false, Some(2), 5);
    let mut l = loaders(&data, &o, 1, None);
    let mut order = Vec::new();
    while let Some(b) = l[0].next_batch().unwrap() {
        order.push(b.sample_ids[0]);
    }
    assert_eq!(order.len(), 40);
    assert_ne!(order[..20], order[20..]);
    assert_eq!(l[0].cursor().epoch, 1);
}

#[test]
fn mixture_with_augmentation_resumes_exactly_across_rank_counts() {
    use eg_data::Mixture;
    use eg_data::augment::{Augment, SpanCorruption, TokenDropout};
    let a = dataset(&[5, 17, 3, 30, 8, 12], true);
    let b = dataset(&(0..40).map(|i| 1 + i % 9).collect::<Vec<_>>(), false);
    let mix: Arc<dyn TokenDataset> =
        Arc::new(Mixture::new(vec![(a, 2.0), (b, 1.0)], Some(60), 3).unwrap());
    let augs: Vec<Arc<dyn Augment>> = vec![
        Arc::new(TokenDropout {
            probability: 0.1,
            replacement: 7,
        }),
        Arc::new(SpanCorruption {
            rate: 0.15,
            mean_span: 3,
            sentinel: 8,
        }),
    ];
    let o = opts(24, 6, Packing::BestFit { window: 8 }, true, None, 11);
    let make = |world: usize, cursor: Option<&Cursor>| -> Vec<Loader> {
        (0..world)
            .map(|rank| {
                let p = Placement { rank, world };
                let l = match cursor {
                    Some(c) => Loader::with_cursor(mix.clone(), o.clone(), p, c).unwrap(),
                    None => Loader::new(mix.clone(), o.clone(), p).unwrap(),
                };
                l.with_augmentations(augs.clone())
            })
            .collect()
    };
    let mut whole = make(1, None);
    let expected: Vec<_> = (0..25)
        .map(|_| global_hash(&global_step(&mut whole).unwrap()))
        .collect();
    let mut first = make(3, None);
    let mut got: Vec<_> = (0..9)
        .map(|_| global_hash(&global_step(&mut first).unwrap()))
        .collect();
    let c = Cursor::from_json(&first[2].cursor().to_json().unwrap()).unwrap();
    let mut second = make(2, Some(&c));
    got.extend((9..25).map(|_| global_hash(&global_step(&mut second).unwrap())));
    assert_eq!(got, expected);
    // The augmentations did act: without them the stream differs.
    let mut plain = vec![Loader::new(mix.clone(), o.clone(), Placement::SINGLE).unwrap()];
    assert_ne!(global_hash(&global_step(&mut plain).unwrap()), expected[0]);
}

#[test]
fn source_augmentations_apply_only_to_their_source_and_resume_exactly() {
    use eg_data::Mixture;
    use eg_data::augment::{Augment, TokenDropout};
    const MARK: u32 = 999_999;
    let a = dataset(&[5, 17, 3, 30, 8, 12], false);
    // Source 1's tokens are all at or above OFFSET, so a segment's source is visible.
    const OFFSET: u32 = 5_000_000;
    let mut b = InMemoryDataset::new();
    for i in 0..40u32 {
        let toks: Vec<u32> = (0..1 + i % 9).map(|j| OFFSET + i * 100 + j).collect();
        b.push(&toks, 0);
    }
    let data: Arc<dyn TokenDataset> =
        Arc::new(Mixture::new(vec![(a, 1.0), (Arc::new(b), 1.0)], Some(60), 5).unwrap());
    let drop_all: Vec<Arc<dyn Augment>> = vec![Arc::new(TokenDropout {
        probability: 1.0,
        replacement: MARK,
    })];
    let o = opts(16, 4, Packing::Concat, false, None, 2);
    let make = |cursor: Option<&Cursor>| {
        let l = match cursor {
            Some(c) => Loader::with_cursor(data.clone(), o.clone(), Placement::SINGLE, c).unwrap(),
            None => Loader::new(data.clone(), o.clone(), Placement::SINGLE).unwrap(),
        };
        l.with_source_augmentations(1, drop_all.clone())
    };
    let mut l = make(None);
    let mut plain = Loader::new(data.clone(), o.clone(), Placement::SINGLE).unwrap();
    let (mut from_a, mut from_b) = (0, 0);
    for _ in 0..6 {
        let got = l.next_batch().unwrap().unwrap();
        let want = plain.next_batch().unwrap().unwrap();
        // Segment by segment: source 1 is fully replaced (and out of the loss), source 0 as read.
        assert_eq!(got.cu_seqlens, want.cu_seqlens);
        let segs = got.cu_seqlens.windows(2).zip(&got.segment_is_padding);
        for (w, &pad) in segs {
            let (s, e) = (w[0] as usize, w[1] as usize);
            if pad {
                continue;
            }
            if want.input_ids[s] >= OFFSET {
                from_b += 1;
                assert!(got.input_ids[s..e].iter().all(|&t| t == MARK));
                assert!(got.loss_mask[s..e].iter().all(|&m| m == 0));
            } else {
                from_a += 1;
                assert_eq!(got.input_ids[s..e], want.input_ids[s..e]);
                assert_eq!(got.loss_mask[s..e], want.loss_mask[s..e]);
            }
        }
    }
    assert!(
        from_a > 0 && from_b > 0,
        "both sources seen: {from_a} {from_b}"
    );
    // Exact resume with the per-source augmentation.
    let mut whole = make(None);
    let expected: Vec<_> = (0..8)
        .map(|_| global_hash(&[whole.next_batch().unwrap().unwrap()]))
        .collect();
    let mut first = make(None);
    let mut got: Vec<_> = (0..3)
        .map(|_| global_hash(&[first.next_batch().unwrap().unwrap()]))
        .collect();
    let c = Cursor::from_json(&first.cursor().to_json().unwrap()).unwrap();
    let mut second = make(Some(&c));
    got.extend((3..8).map(|_| global_hash(&[second.next_batch().unwrap().unwrap()])));
    assert_eq!(got, expected);
}

//! `[[data.augment]]` and `[[data.mix]]`: augmentations per source and weighted mixing for
//! `eg train`.

use std::sync::Arc;

use elastic_guardian::config::wire::AugmentKind;
use elastic_guardian::config::{self, Config};
use elastic_guardian::data::augment::{RandomTruncation, SpanCorruption, TokenDropout};
use elastic_guardian::data::{self, Augment, Loader, Mixture};

/// The configured augmentations, in order; `fill` replaces tokens whose entry sets no `token`.
pub(crate) fn build(list: &[config::Augmentation], fill: u32) -> Vec<Arc<dyn Augment>> {
    list.iter()
        .map(|a| -> Arc<dyn Augment> {
            let token = a.token.unwrap_or(fill);
            let p = a.probability.get();
            match a.kind {
                AugmentKind::SpanCorruption => Arc::new(SpanCorruption {
                    rate: p,
                    mean_span: a.mean_span,
                    sentinel: token,
                }),
                AugmentKind::RandomTruncation => Arc::new(RandomTruncation {
                    probability: p,
                    pad_id: token,
                }),
                // `AugmentKind` is non-exhaustive: token dropout is the default kind.
                _ => Arc::new(TokenDropout {
                    probability: p,
                    replacement: token,
                }),
            }
        })
        .collect()
}

/// Applies the main source's augmentations (source 0) and each `[[data.mix]]` source's
/// (source `i + 1`) to `loader`.
pub(crate) fn apply(loader: Loader, cfg: &Config, fill: u32) -> Loader {
    let mut loader = loader;
    if !cfg.data.augment.is_empty() {
        loader = loader.with_source_augmentations(0, build(&cfg.data.augment, fill));
    }
    for (i, m) in cfg.data.mix.iter().enumerate() {
        if !m.augment.is_empty() {
            loader = loader.with_source_augmentations(i + 1, build(&m.augment, fill));
        }
    }
    loader
}

/// The main source (weight `data.weight`) mixed with the further sources by weight, in that
/// order, so that source `i + 1` of the mixture is `data.mix[i]`. One epoch holds as many
/// samples as the sources together.
pub(crate) fn mixture(
    cfg: &Config,
    main: Arc<dyn data::TokenDataset>,
    extra: Vec<Arc<dyn data::TokenDataset>>,
) -> data::Result<Arc<dyn data::TokenDataset>> {
    if extra.is_empty() {
        return Ok(main);
    }
    let mut sources = vec![(main, cfg.data.weight)];
    sources.extend(extra.into_iter().zip(cfg.data.mix.iter().map(|m| m.weight)));
    Ok(Arc::new(Mixture::new(sources, None, cfg.run.seed)?))
}

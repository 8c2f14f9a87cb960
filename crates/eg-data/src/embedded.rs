//! A corpus generated in code, so `eg train` runs offline with no files.
//!
//! Sentences come from a small seeded grammar (subject, verb, object, optional adjectives,
//! adverbs and prepositional phrases), grouped into paragraphs (one document each). The text
//! is English-like enough for a tiny model to learn visible structure in a minute: word
//! spelling, agreement of articles, punctuation, capitalisation. The tokenizer is byte-level
//! ([`ByteTokenizer`]): token `b` is byte `b`, and [`ByteTokenizer::EOS`] ends a document.
//!
//! Everything is a function of the seed: the same seed gives the same bytes on every
//! platform (the PRNG is this crate's [`SplitMix64`]).

use crate::InMemoryDataset;
use crate::order::SplitMix64;

const SUBJECTS: &[&str] = &[
    "the farmer",
    "a young girl",
    "the old king",
    "my neighbour",
    "the river",
    "a small dog",
    "the teacher",
    "our captain",
    "the baker",
    "a tired soldier",
    "the wind",
    "her brother",
    "the merchant",
    "a quiet monk",
    "the children",
    "the queen",
];
const VERBS: &[&str] = &[
    "sees",
    "carries",
    "finds",
    "remembers",
    "builds",
    "follows",
    "paints",
    "loves",
    "watches",
    "keeps",
    "sells",
    "forgets",
    "opens",
    "closes",
    "answers",
    "calls",
];
const OBJECTS: &[&str] = &[
    "the bread",
    "a letter",
    "the door",
    "an apple",
    "the boat",
    "a song",
    "the garden",
    "a map",
    "the lantern",
    "an old book",
    "the bridge",
    "a red coat",
    "the horse",
    "the window",
    "a silver coin",
    "the mountain",
];
const ADJECTIVES: &[&str] = &[
    "green", "quiet", "heavy", "bright", "strange", "warm", "broken", "golden", "dark", "tiny",
];
const ADVERBS: &[&str] = &[
    "slowly",
    "quickly",
    "happily",
    "again",
    "every morning",
    "at night",
    "with care",
    "once",
];
const PLACES: &[&str] = &[
    "in the village",
    "near the sea",
    "under the tree",
    "by the fire",
    "on the hill",
    "at the market",
    "behind the house",
    "across the field",
];
const JOINERS: &[&str] = &["and then", "but", "because", "while", "so"];

/// Byte-level tokenizer of the embedded corpus: ids `0..256` are bytes, 256 is EOS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// End of document.
    pub const EOS: u32 = 256;
    /// Vocabulary size (bytes + EOS).
    pub const VOCAB: usize = 257;

    /// Token ids of `text`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    /// Text of `ids` (EOS and invalid UTF-8 shown as `\u{fffd}`).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .map(|&i| u8::try_from(i).unwrap_or(b'?'))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

fn pick<'a>(rng: &mut SplitMix64, words: &[&'a str]) -> &'a str {
    words[rng.below(words.len() as u64) as usize]
}

fn with_adjective(rng: &mut SplitMix64, noun_phrase: &str) -> String {
    if rng.below(3) != 0 {
        return noun_phrase.to_string();
    }
    let adj = pick(rng, ADJECTIVES);
    match noun_phrase.split_once(' ') {
        Some(("a" | "an", rest)) => {
            let article = if adj.starts_with(['a', 'e', 'i', 'o', 'u']) {
                "an"
            } else {
                "a"
            };
            format!("{article} {adj} {rest}")
        }
        Some((det, rest)) => format!("{det} {adj} {rest}"),
        None => format!("{adj} {noun_phrase}"),
    }
}

fn clause(rng: &mut SplitMix64) -> String {
    let subject = pick(rng, SUBJECTS);
    let subject = with_adjective(rng, subject);
    let verb = pick(rng, VERBS);
    let object = pick(rng, OBJECTS);
    let object = with_adjective(rng, object);
    let mut s = format!("{subject} {verb} {object}");
    if rng.below(2) == 0 {
        s.push(' ');
        s.push_str(pick(rng, PLACES));
    }
    if rng.below(3) == 0 {
        s.push(' ');
        s.push_str(pick(rng, ADVERBS));
    }
    s
}

/// One sentence: a clause, sometimes joined to a second one.
pub fn sentence(rng: &mut SplitMix64) -> String {
    let mut s = clause(rng);
    if rng.below(3) == 0 {
        s.push_str(&format!(" {} {}", pick(rng, JOINERS), clause(rng)));
    }
    let mut c = s.chars();
    let first = c.next().map(|f| f.to_ascii_uppercase()).unwrap_or('T');
    let end = if rng.below(8) == 0 { "!" } else { "." };
    format!("{first}{}{end}", c.as_str())
}

/// Paragraphs of 3–8 sentences, about `target_bytes` of text in all.
pub fn documents(seed: u64, target_bytes: usize) -> Vec<String> {
    let mut rng = SplitMix64::new(seed ^ 0x6567_5f65_6d62_6564);
    let mut out = Vec::new();
    let mut total = 0usize;
    while total < target_bytes {
        let n = 3 + rng.below(6) as usize;
        let para: Vec<String> = (0..n).map(|_| sentence(&mut rng)).collect();
        let p = para.join(" ");
        total += p.len() + 1;
        out.push(p);
    }
    out
}

/// The embedded corpus tokenized with [`ByteTokenizer`], split into a training and a
/// held-out set: every document whose index falls on the held-out stride (about
/// `eval_fraction` of them) goes to the second set.
pub fn datasets(
    seed: u64,
    target_bytes: usize,
    eval_fraction: f64,
) -> (InMemoryDataset, InMemoryDataset) {
    let docs = documents(seed, target_bytes);
    let tok = ByteTokenizer;
    let stride = if eval_fraction > 0.0 {
        (1.0 / eval_fraction).round().max(2.0) as usize
    } else {
        usize::MAX
    };
    let mut train = InMemoryDataset::new();
    let mut eval = InMemoryDataset::new();
    for (i, d) in docs.iter().enumerate() {
        let ids = tok.encode(d);
        if stride != usize::MAX && i % stride == stride - 1 {
            eval.push(&ids, 0);
        } else {
            train.push(&ids, 0);
        }
    }
    (train, eval)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TokenDataset;

    #[test]
    fn corpus_is_deterministic_and_sized() {
        let a = documents(1, 20_000);
        let b = documents(1, 20_000);
        let c = documents(2, 20_000);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let bytes: usize = a.iter().map(|d| d.len() + 1).sum();
        assert!((20_000..22_000).contains(&bytes), "{bytes}");
        assert!(a[0].ends_with('.') || a[0].ends_with('!'));
        let (train, eval) = datasets(1, 20_000, 0.1);
        assert_eq!(train.len() + eval.len(), a.len() as u64);
        assert!(eval.len() > 0);
        assert_eq!(
            ByteTokenizer.decode(&ByteTokenizer.encode("héllo")),
            "héllo"
        );
    }
}

//! Deterministic order: a small seeded PRNG, epoch permutations and rank sharding.
//!
//! Everything here is specified bit for bit (SplitMix64, Lemire's bounded integers, a
//! Feistel permutation), so the data order for a `(seed, epoch)` is the same on every platform and
//! every version of every dependency: a checkpoint taken today resumes identically next year.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// SplitMix64 (Steele, Lea, Flood 2014): 64 bits of state, fast, and fully specified.
///
/// Its state is a single `u64` that [`Cursor`](crate::Cursor) stores, so a resumed run
/// continues the same stream of random numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitMix64 {
    state: u64,
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 output function: a strong 64-bit mixer.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SplitMix64 {
    /// A generator whose state is `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The current state (restore with [`SplitMix64::new`]).
    pub fn state(&self) -> u64 {
        self.state
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix64(self.state)
    }

    /// A uniform integer in `0..n` (Lemire's multiply-shift with rejection; `n == 0` gives 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let mut m = u128::from(self.next_u64()) * u128::from(n);
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = u128::from(self.next_u64()) * u128::from(n);
            }
        }
        (m >> 64) as u64
    }

    /// A uniform float in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The seed of the permutation of `epoch` under the run seed `seed`.
pub fn epoch_seed(seed: u64, epoch: u64) -> u64 {
    mix64(seed ^ mix64(epoch.wrapping_add(0x6A09_E667_F3BC_C909)))
}

/// The order of the sample ids `0..n` in one epoch: a pseudo-random permutation computed on
/// demand in O(1) memory, so the loader's memory does not grow with the corpus.
///
/// A 4-round Feistel network over the smallest even number of bits that holds `n - 1`, with
/// round keys drawn from [`epoch_seed`]`(seed, epoch)` and [`mix64`] as round function; values
/// outside `0..n` are walked along their cycle until they fall inside ("cycle walking"), which
/// keeps it a bijection of `0..n` (fewer than 4 steps on average).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochPermutation {
    n: u64,
    shuffle: bool,
    half_bits: u32,
    keys: [u64; 4],
}

impl EpochPermutation {
    /// The order of `epoch` under run seed `seed`; the identity when `shuffle` is false.
    pub fn new(n: u64, seed: u64, epoch: u64, shuffle: bool) -> Self {
        let bits = 64 - n.saturating_sub(1).max(1).leading_zeros();
        let half_bits = bits.div_ceil(2).clamp(1, 31);
        let mut rng = SplitMix64::new(epoch_seed(seed, epoch));
        let keys = [
            rng.next_u64(),
            rng.next_u64(),
            rng.next_u64(),
            rng.next_u64(),
        ];
        Self {
            n,
            shuffle,
            half_bits,
            keys,
        }
    }

    /// Number of ids.
    pub fn len(&self) -> u64 {
        self.n
    }

    /// Whether there is no id.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The sample id at position `i` of the epoch (`i < len()`; other values map to themselves).
    pub fn get(&self, i: u64) -> u64 {
        if !self.shuffle || self.n <= 1 || i >= self.n {
            return i;
        }
        let mut x = i;
        loop {
            x = self.feistel(x);
            if x < self.n {
                return x;
            }
        }
    }

    fn feistel(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (x >> self.half_bits, x & mask);
        for k in self.keys {
            (l, r) = (r, l ^ (mix64(r ^ k) & mask));
        }
        (l << self.half_bits) | r
    }
}

/// The whole order of `epoch` as a vector (see [`EpochPermutation`]).
pub fn epoch_order(n: u32, seed: u64, epoch: u64, shuffle: bool) -> Vec<u32> {
    let p = EpochPermutation::new(u64::from(n), seed, epoch, shuffle);
    (0..u64::from(n)).map(|i| p.get(i) as u32).collect()
}

/// The contiguous, balanced slice of `0..len` that `rank` of `world` owns.
///
/// Slices of ranks `0..world` are disjoint and cover `0..len` in rank order; their sizes
/// differ by at most one (lower ranks get the extra items). `world == 0` is treated as 1.
pub fn shard_range(len: usize, rank: usize, world: usize) -> Range<usize> {
    let world = world.max(1);
    let rank = rank.min(world);
    let base = len / world;
    let extra = len % world;
    let start = rank * base + rank.min(extra);
    let size = if rank < world && rank < extra {
        base + 1
    } else if rank < world {
        base
    } else {
        0
    };
    start..(start + size).min(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // Reference outputs of SplitMix64 seeded with 1234567 (from the original C code).
        let mut r = SplitMix64::new(1_234_567);
        assert_eq!(r.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(r.next_u64(), 3_203_168_211_198_807_973);
        assert_eq!(r.next_u64(), 9_817_491_932_198_370_423);
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut r = SplitMix64::new(7);
        let mut counts = [0u32; 6];
        for _ in 0..60_000 {
            counts[r.below(6) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
        assert_eq!(r.below(0), 0);
    }

    #[test]
    fn epoch_order_is_a_stable_permutation() {
        let a = epoch_order(1000, 42, 3, true);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(1000, 42, 3, true));
        assert_ne!(a, epoch_order(1000, 42, 4, true));
        assert_ne!(a, epoch_order(1000, 43, 3, true));
        assert_eq!(epoch_order(5, 1, 1, false), vec![0, 1, 2, 3, 4]);
        // Looks shuffled: few fixed points, and neighbours do not stay neighbours.
        let v = epoch_order(10_000, 1, 0, true);
        assert!(
            v.iter()
                .enumerate()
                .filter(|&(i, &x)| i as u32 == x)
                .count()
                < 10
        );
        assert!(v.windows(2).filter(|w| w[0].abs_diff(w[1]) == 1).count() < 20);
        for n in [1u32, 2, 3, 5, 17, 64, 1000, 4097] {
            let mut v = epoch_order(n, 9, 2, true);
            v.sort_unstable();
            assert_eq!(v, (0..n).collect::<Vec<_>>(), "n = {n}");
        }
        // Pinned: this order must never change, or resumed runs would diverge.
        assert_eq!(epoch_order(8, 0, 0, true), PINNED);
    }

    const PINNED: [u32; 8] = [5, 6, 4, 7, 3, 0, 1, 2];

    #[test]
    fn shard_ranges_partition() {
        for len in 0..40 {
            for world in 1..9 {
                let mut next = 0;
                for rank in 0..world {
                    let r = shard_range(len, rank, world);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }
}

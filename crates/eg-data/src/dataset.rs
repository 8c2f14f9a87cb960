//! Random-access tokenized datasets: the input of the loader.

use crate::{Error, Result};

/// A tokenized dataset with random access by sample id, the input of [`Loader`](crate::Loader).
///
/// Lengths must be cheap (an index lookup): every rank plans the packing of the *global* batch
/// from lengths alone and then reads the tokens of its own rows only.
pub trait TokenDataset: Send + Sync {
    /// Number of samples; ids are `0..len()`.
    fn len(&self) -> u64;

    /// Whether the dataset has no sample.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of tokens of sample `id`.
    fn sample_len(&self, id: u64) -> Result<usize>;

    /// Number of leading prompt tokens of sample `id` that are not trained on (0 for
    /// pre-training data).
    fn prompt_len(&self, _id: u64) -> Result<usize> {
        Ok(0)
    }

    /// Copy tokens `start..start + out.len()` of sample `id` into `out`.
    fn read_tokens(&self, id: u64, start: usize, out: &mut [u32]) -> Result<()>;

    /// `(sample_len, prompt_len)` of sample `id`; backends override it to look both up at once.
    fn sample_info(&self, id: u64) -> Result<(usize, usize)> {
        Ok((self.sample_len(id)?, self.prompt_len(id)?))
    }

    /// Index of the source sample `id` comes from, for datasets that combine several
    /// ([`Mixture`](crate::Mixture)); 0 for a single source. Per-source augmentations
    /// ([`Loader::with_source_augmentations`](crate::Loader::with_source_augmentations)) are
    /// chosen by it.
    fn source_of(&self, _id: u64) -> Result<usize> {
        Ok(0)
    }
}

/// A dataset held in memory: for tests, small corpora and generated data.
#[derive(Debug, Clone, Default)]
pub struct InMemoryDataset {
    tokens: Vec<u32>,
    offsets: Vec<usize>,
    prompt_lens: Vec<u32>,
}

impl InMemoryDataset {
    /// An empty dataset.
    pub fn new() -> Self {
        Self {
            tokens: Vec::new(),
            offsets: vec![0],
            prompt_lens: Vec::new(),
        }
    }

    /// A dataset of pre-training documents.
    pub fn from_docs<I, D>(docs: I) -> Self
    where
        I: IntoIterator<Item = D>,
        D: AsRef<[u32]>,
    {
        let mut d = Self::new();
        for doc in docs {
            d.push(doc.as_ref(), 0);
        }
        d
    }

    /// Append a sample whose first `prompt_len` tokens are prompt (clamped to its length).
    pub fn push(&mut self, tokens: &[u32], prompt_len: usize) {
        self.tokens.extend_from_slice(tokens);
        self.offsets.push(self.tokens.len());
        self.prompt_lens
            .push(u32::try_from(prompt_len.min(tokens.len())).unwrap_or(u32::MAX));
    }

    /// The tokens of sample `id`.
    pub fn sample(&self, id: u64) -> Result<&[u32]> {
        let i = self.index(id)?;
        Ok(&self.tokens[self.offsets[i]..self.offsets[i + 1]])
    }

    fn index(&self, id: u64) -> Result<usize> {
        let n = self.prompt_lens.len();
        usize::try_from(id)
            .ok()
            .filter(|&i| i < n)
            .ok_or(Error::SampleOutOfRange { id, len: n as u64 })
    }
}

impl TokenDataset for InMemoryDataset {
    fn len(&self) -> u64 {
        self.prompt_lens.len() as u64
    }

    fn sample_len(&self, id: u64) -> Result<usize> {
        let i = self.index(id)?;
        Ok(self.offsets[i + 1] - self.offsets[i])
    }

    fn prompt_len(&self, id: u64) -> Result<usize> {
        Ok(self.prompt_lens[self.index(id)?] as usize)
    }

    fn read_tokens(&self, id: u64, start: usize, out: &mut [u32]) -> Result<()> {
        let s = self.sample(id)?;
        let end = start.saturating_add(out.len());
        let src = s.get(start..end).ok_or(Error::TokenRangeOutOfRange {
            id,
            start,
            end,
            len: s.len(),
        })?;
        out.copy_from_slice(src);
        Ok(())
    }
}

impl<T: TokenDataset + ?Sized> TokenDataset for std::sync::Arc<T> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn sample_len(&self, id: u64) -> Result<usize> {
        (**self).sample_len(id)
    }
    fn prompt_len(&self, id: u64) -> Result<usize> {
        (**self).prompt_len(id)
    }
    fn read_tokens(&self, id: u64, start: usize, out: &mut [u32]) -> Result<()> {
        (**self).read_tokens(id, start, out)
    }
    fn sample_info(&self, id: u64) -> Result<(usize, usize)> {
        (**self).sample_info(id)
    }
}

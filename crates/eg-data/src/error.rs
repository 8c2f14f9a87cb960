//! The error type of this crate.

use std::path::PathBuf;

/// Errors of this crate.
///
/// Every variant that concerns a file names it; variants about data name the line or byte
/// offset. Bad *records* are not errors: they are skipped, counted and quarantined, and only
/// [`Error::TooManyBadRecords`] stops a stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation on a file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A glob pattern or input path matched no file.
    #[error("no input file matches {pattern:?}")]
    NoInput {
        /// The pattern or path as given.
        pattern: String,
    },
    /// Too large a fraction of the records read so far was bad; the stream stopped.
    #[error(
        "{bad} of {total} records were bad ({fraction:.4} > limit {limit}); last bad one in {file} at line {line}; see the quarantine file"
    )]
    TooManyBadRecords {
        /// Bad records so far.
        bad: u64,
        /// Records seen so far (good and bad).
        total: u64,
        /// `bad / total`.
        fraction: f64,
        /// The configured limit.
        limit: f64,
        /// File of the last bad record.
        file: PathBuf,
        /// Line of the last bad record (1-based, 0 for whole-file problems).
        line: u64,
    },
    /// A token shard or its index is inconsistent.
    #[error("corrupt token shard {path}: {reason}")]
    CorruptShard {
        /// The shard file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A token id does not fit the shard's token width.
    #[error("token id {token} does not fit in {bits}-bit shard {path}")]
    TokenOutOfRange {
        /// The shard being written.
        path: PathBuf,
        /// The offending token id.
        token: u32,
        /// Width of the shard's tokens.
        bits: u32,
    },
    /// A sample id outside the dataset was requested.
    #[error("sample {id} out of range (dataset has {len} samples)")]
    SampleOutOfRange {
        /// The requested id.
        id: u64,
        /// Number of samples in the dataset.
        len: u64,
    },
    /// A token range outside a sample was requested.
    #[error("tokens {start}..{end} out of range for sample {id} of {len} tokens")]
    TokenRangeOutOfRange {
        /// Sample id.
        id: u64,
        /// Requested start.
        start: usize,
        /// Requested end.
        end: usize,
        /// Tokens in the sample.
        len: usize,
    },
    /// An option has a value that cannot work.
    #[error("invalid option {option}: {reason}")]
    InvalidOption {
        /// The option's name, e.g. `seq_len`.
        option: &'static str,
        /// What is allowed.
        reason: String,
    },
    /// A saved cursor does not belong to this data pipeline.
    #[error("cursor does not match this loader: {field} was {saved} when saved, is {current} now")]
    CursorMismatch {
        /// The field that differs.
        field: &'static str,
        /// Its saved value.
        saved: String,
        /// Its current value.
        current: String,
    },
    /// A cursor could not be encoded or decoded.
    #[error("cursor (de)serialization failed: {source}")]
    CursorCodec {
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// JSON metadata written by this crate could not be read back.
    #[error("invalid metadata in {path}: {source}")]
    Metadata {
        /// The metadata file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// The tokenizer library reported an error.
    #[error("tokenizer error ({context}): {message}")]
    Tokenizer {
        /// What was being done, e.g. a file name or "training".
        context: String,
        /// The tokenizer library's message (its error type is a boxed trait object).
        message: String,
    },
    /// The tokenizer has no token the pipeline needs.
    #[error("tokenizer has no {what} token ({token:?})")]
    MissingSpecialToken {
        /// Its role, e.g. "end-of-sequence".
        what: &'static str,
        /// The token text looked up.
        token: String,
    },
    /// A tokenizer stored in GGUF metadata is of a kind this crate cannot build (a
    /// SentencePiece `llama` vocabulary, or a byte-level BPE whose pre-tokenizer is unknown).
    #[error(
        "unsupported GGUF tokenizer: tokenizer.ggml.model = {model:?}, tokenizer.ggml.pre = {pre:?} (supported: model \"gpt2\" with pre absent, \"default\", \"gpt2\", \"smollm\", \"starcoder\", \"refact\", \"codeshell\")"
    )]
    UnsupportedTokenizer {
        /// The `tokenizer.ggml.model` value.
        model: String,
        /// The `tokenizer.ggml.pre` value, when present.
        pre: Option<String>,
    },
    /// A GGUF tokenizer metadata key is missing or has the wrong type or content.
    #[error("GGUF tokenizer metadata {key}: {reason}")]
    GgufMetadata {
        /// The metadata key, e.g. `tokenizer.ggml.merges`.
        key: &'static str,
        /// What is wrong (with the index of the bad entry, when it is an array).
        reason: String,
    },
    /// The background prefetch thread stopped.
    #[error("prefetch thread stopped: {reason}")]
    PrefetchStopped {
        /// Why.
        reason: String,
    },
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wrap an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

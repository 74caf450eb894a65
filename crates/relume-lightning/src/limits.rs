//! Bounds on everything the restricted reader allocates or walks.
//!
//! A `.ckpt` file is untrusted input. Every size the file declares is checked against one
//! of these limits *before* memory is reserved, so a hostile file costs at most these
//! amounts of memory and time proportional to its length. Exceeding a limit is
//! [`Error::PickleLimitExceeded`](crate::Error::PickleLimitExceeded), never a panic.

/// Largest `data.pkl` the interpreter runs (Lightning's are kilobytes to a few MiB; the
/// interpreter's working memory is a small multiple of this).
pub const MAX_PICKLE_BYTES: u64 = 256 << 20;
/// Most entries the pickle memo may hold (Lightning checkpoints use a few thousand).
pub const MAX_MEMO_ENTRIES: usize = 1 << 20;
/// Most values on the pickle stack at once.
pub const MAX_STACK_DEPTH: usize = 1 << 20;
/// Most open `MARK`s at once (nesting depth while the pickle is built).
pub const MAX_MARK_DEPTH: usize = 1024;
/// Deepest nesting of containers in the decoded value (also stops reference cycles).
pub const MAX_NESTING_DEPTH: usize = 256;
/// Most values the decoded tree may contain (shared references count every time).
pub const MAX_VALUES: usize = 1 << 24;
/// Longest single string or bytes object.
pub const MAX_STRING_BYTES: usize = 64 << 20;
/// Most string and bytes content in the decoded tree (shared references count every time).
pub const MAX_TOTAL_STRING_BYTES: usize = 1 << 30;
/// Longest `LONG1`/`LONG4` integer encoding, in bytes.
pub const MAX_LONG_BYTES: usize = 256;
/// Most tensor bytes a checkpoint may reference: its storages plus its tensor views, counted
/// as if all were materialised (they are read lazily, but a conversion may copy them).
pub const MAX_TOTAL_TENSOR_BYTES: u64 = 16 << 30;
/// Largest zip entry (the pickle or one storage) the reader accepts, by the size the zip
/// directory declares and, for an entry it inflates, by the bytes inflated.
pub const MAX_ZIP_ENTRY_BYTES: u64 = 8 << 30;
/// Most dimensions a tensor may have.
pub const MAX_TENSOR_DIMS: usize = 64;

/// The limits one read runs under. [`Limits::default`] uses the `MAX_*` constants of this
/// module; tests and fuzzers shrink them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// See [`MAX_PICKLE_BYTES`].
    pub pickle_bytes: u64,
    /// See [`MAX_MEMO_ENTRIES`].
    pub memo_entries: usize,
    /// See [`MAX_STACK_DEPTH`].
    pub stack_depth: usize,
    /// See [`MAX_MARK_DEPTH`].
    pub mark_depth: usize,
    /// See [`MAX_NESTING_DEPTH`].
    pub nesting_depth: usize,
    /// See [`MAX_VALUES`].
    pub values: usize,
    /// See [`MAX_STRING_BYTES`].
    pub string_bytes: usize,
    /// See [`MAX_TOTAL_STRING_BYTES`].
    pub total_string_bytes: usize,
    /// See [`MAX_LONG_BYTES`].
    pub long_bytes: usize,
    /// See [`MAX_TOTAL_TENSOR_BYTES`].
    pub total_tensor_bytes: u64,
    /// See [`MAX_ZIP_ENTRY_BYTES`].
    pub zip_entry_bytes: u64,
    /// See [`MAX_TENSOR_DIMS`].
    pub tensor_dims: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            pickle_bytes: MAX_PICKLE_BYTES,
            memo_entries: MAX_MEMO_ENTRIES,
            stack_depth: MAX_STACK_DEPTH,
            mark_depth: MAX_MARK_DEPTH,
            nesting_depth: MAX_NESTING_DEPTH,
            values: MAX_VALUES,
            string_bytes: MAX_STRING_BYTES,
            total_string_bytes: MAX_TOTAL_STRING_BYTES,
            long_bytes: MAX_LONG_BYTES,
            total_tensor_bytes: MAX_TOTAL_TENSOR_BYTES,
            zip_entry_bytes: MAX_ZIP_ENTRY_BYTES,
            tensor_dims: MAX_TENSOR_DIMS,
        }
    }
}

impl Limits {
    /// Small limits for fuzzing and tests: a few MiB of memory at most.
    pub fn small() -> Self {
        Limits {
            pickle_bytes: 1 << 22,
            memo_entries: 1 << 12,
            stack_depth: 1 << 12,
            mark_depth: 64,
            nesting_depth: 64,
            values: 1 << 16,
            string_bytes: 1 << 16,
            total_string_bytes: 1 << 20,
            long_bytes: 64,
            total_tensor_bytes: 1 << 22,
            zip_entry_bytes: 1 << 22,
            tensor_dims: 16,
        }
    }
}

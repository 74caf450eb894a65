//! Keeping large read-only file maps out of the resident set.
//!
//! Tensors read from a checkpoint (or, in relume-lightning, a `.ckpt`) are slices of read-only,
//! file-backed memory maps. A pass over such a slice (hashing, writing it into
//! another file) faults every page in, and those pages stay in the process's
//! resident set until the map is dropped: converting a file with a 1 GiB storage
//! peaked at 1 GiB of RSS although no byte was copied. The passes here go over a
//! mapped slice in [`RELEASE_PIECE`]-sized pieces and drop each piece's pages from
//! the process afterwards (`madvise(MADV_DONTNEED)`). For a shared read-only file
//! map that changes nothing a reader can observe: the next access faults the same
//! bytes back in from the page cache.

use memmap2::Mmap;

/// Bytes processed between two releases of a mapped slice's pages.
pub(crate) const RELEASE_PIECE: usize = 32 << 20;

/// Drops the whole pages inside `map[start..start + len]` from the resident set.
#[cfg_attr(not(unix), allow(unused_variables))]
pub(crate) fn release(map: &Mmap, start: usize, len: usize) {
    #[cfg(unix)]
    {
        const PAGE: usize = 4096;
        let Some(end) = start.checked_add(len).filter(|&e| e <= map.len()) else {
            return;
        };
        let first = start.div_ceil(PAGE) * PAGE;
        let last = end / PAGE * PAGE;
        if last > first {
            // SAFETY: `map` is a shared, read-only mapping of a file that is never
            // modified in place (committed checkpoints and `.ckpt` inputs are only
            // read). MADV_DONTNEED on such a mapping only drops page-table entries:
            // later reads fault in the same file bytes again, so slices borrowed from
            // the map keep their contents.
            let res = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, last - first)
            };
            if let Err(e) = res {
                // Only memory use is at stake, never the data.
                tracing::debug!("madvise(MADV_DONTNEED) failed: {e}");
            }
        }
    }
}

/// Calls `f` on `map[start..start + len]` in pieces of [`RELEASE_PIECE`] bytes,
/// releasing each piece's pages after `f` has seen it.
pub(crate) fn for_each_piece(map: &Mmap, start: usize, len: usize, mut f: impl FnMut(&[u8])) {
    let mut off = start;
    let end = start + len;
    while off < end {
        let n = RELEASE_PIECE.min(end - off);
        f(&map[off..off + n]);
        release(map, off, n);
        off += n;
    }
}

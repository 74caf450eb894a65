//! [`RemoteStorage`]: the commit protocol's writes on an object store.
//!
//! Files become objects: a file is buffered in memory up to [`PART_BYTES`] and
//! written with one PUT when it is small; a larger one becomes a multipart upload
//! (`object_store::WriteMultipart`, at most [`MAX_PARTS_IN_FLIGHT`] parts in flight),
//! completed by [`StorageFile::sync`] and aborted when the file is dropped unsynced
//! (an error part-way). An upload that a kill interrupts is never completed, so no
//! partial object is ever visible. Directories do not exist on an object store:
//! creating or fsyncing one does nothing, and `rename` is refused (the remote
//! protocol commits with a create-only marker instead; see [`super`]).

use std::io::{self, Write};
use std::path::Path;

use object_store::{ObjectStoreExt, WriteMultipart};

use super::objects::{Created, Objects};
use super::{error_chain, hint_for, runtime, RemoteUrl};
use crate::error::Result;
use crate::storage::{Storage, StorageFile};

/// Files up to this size are one PUT; larger ones are uploaded in parts of this size
/// (override with [`PART_BYTES_ENV`], at least 5 MiB, the S3 minimum).
pub const PART_BYTES: usize = 16 << 20;
/// The environment variable that sets the part size in bytes.
pub const PART_BYTES_ENV: &str = "RELUME_S3_PART_BYTES";

/// The part size: [`PART_BYTES`] or [`PART_BYTES_ENV`] (not below 5 MiB).
fn part_bytes() -> usize {
    super::env_number(PART_BYTES_ENV).map_or(PART_BYTES, |n| (n as usize).max(5 << 20))
}
/// Parts of one file uploading at once.
pub const MAX_PARTS_IN_FLIGHT: usize = 4;

/// Writes through an object store (one bucket). Paths are `s3://bucket/key` URLs.
#[derive(Debug, Clone)]
pub struct RemoteStorage {
    objects: Objects,
}

impl RemoteStorage {
    /// The storage of the bucket `url` names (a registered store, or S3 from the
    /// environment; see [`super::store_for`]).
    ///
    /// # Errors
    /// [`crate::Error::RemoteUnsupported`] for a malformed URL,
    /// [`crate::Error::Remote`] when no client can be built.
    pub fn for_url(url: &str) -> Result<Self> {
        let u = RemoteUrl::parse(url)?;
        Ok(RemoteStorage {
            objects: Objects::for_bucket(&u.bucket)?,
        })
    }

    pub(crate) fn from_objects(objects: Objects) -> Self {
        RemoteStorage { objects }
    }

    fn url(&self, path: &Path) -> io::Result<RemoteUrl> {
        let u = RemoteUrl::from_path(path).map_err(io::Error::other)?;
        if u.bucket != self.objects.bucket {
            return Err(io::Error::other(format!(
                "{} is not in bucket {}",
                u.url(),
                self.objects.bucket
            )));
        }
        Ok(u)
    }
}

fn io_other(e: &object_store::Error) -> io::Error {
    io::Error::other(format!("{}; {}", error_chain(e), hint_for(e)))
}

fn io_from(e: crate::Error) -> io::Error {
    io::Error::other(e.to_string())
}

/// An object being written.
struct RemoteFile {
    objects: Objects,
    url: RemoteUrl,
    buf: Vec<u8>,
    upload: Option<WriteMultipart>,
    done: bool,
    part: usize,
}

impl RemoteFile {
    fn start_upload(&mut self) -> io::Result<()> {
        let loc = self.url.location();
        let up = runtime()
            .block_on(self.objects.store.put_multipart(&loc))
            .map_err(|e| io_other(&e))?;
        self.upload = Some(WriteMultipart::new_with_chunk_size(up, self.part));
        Ok(())
    }

    fn push(&mut self, data: &[u8]) -> io::Result<()> {
        let Some(up) = self.upload.as_mut() else {
            return Ok(());
        };
        {
            // `write` spawns the part uploads onto the runtime.
            let _enter = runtime().enter();
            up.write(data);
        }
        runtime()
            .block_on(up.wait_for_capacity(MAX_PARTS_IN_FLIGHT))
            .map_err(|e| io_other(&e))
    }
}

impl Write for RemoteFile {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.upload.is_some() {
            self.push(data)?;
            return Ok(data.len());
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() > self.part {
            self.start_upload()?;
            let buf = std::mem::take(&mut self.buf);
            self.push(&buf)?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl StorageFile for RemoteFile {
    fn sync(&mut self) -> io::Result<()> {
        if self.done {
            return Ok(());
        }
        match self.upload.take() {
            Some(up) => {
                runtime().block_on(up.finish()).map_err(|e| io_other(&e))?;
            }
            None => {
                let buf = std::mem::take(&mut self.buf);
                self.objects.put(&self.url, buf).map_err(io_from)?;
            }
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for RemoteFile {
    fn drop(&mut self) {
        if let Some(up) = self.upload.take() {
            // Not completed: the upload is abandoned, so no object appears. An abort
            // that fails leaves only invisible parts (bucket lifecycle rules expire
            // them).
            if let Err(e) = runtime().block_on(up.abort()) {
                tracing::warn!(
                    "could not abort the multipart upload of {}: {}",
                    self.url,
                    error_chain(&e)
                );
            }
        }
    }
}

impl Storage for RemoteStorage {
    fn create_dir_all(&self, _path: &Path) -> io::Result<()> {
        Ok(())
    }

    fn create_file(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        Ok(Box::new(RemoteFile {
            objects: self.objects.clone(),
            url: self.url(path)?,
            buf: Vec::new(),
            upload: None,
            done: false,
            part: part_bytes(),
        }))
    }

    fn rename(&self, from: &Path, _to: &Path) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{}: an object store has no atomic rename; remote checkpoints commit with a create-only marker",
                from.display()
            ),
        ))
    }

    fn sync_dir(&self, _path: &Path) -> io::Result<()> {
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let url = self.url(path)?;
        self.objects
            .delete_prefix(&url)
            .map(|_| ())
            .map_err(io_from)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let url = self.url(path)?;
        self.objects.delete(&url).map_err(io_from)
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn put_create(&self, path: &Path, bytes: &[u8]) -> io::Result<bool> {
        let url = self.url(path)?;
        match self
            .objects
            .put_create(&url, bytes.to_vec())
            .map_err(io_from)?
        {
            Created::Created => Ok(true),
            Created::Exists => Ok(false),
        }
    }
}

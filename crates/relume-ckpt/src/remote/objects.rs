//! [`Objects`]: the blocking object operations the remote protocol needs, over any
//! `object_store::ObjectStore`, with errors that name the URL and what to do.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::{error_chain, hint_for, runtime, RemoteUrl};
use crate::error::{Error, Result};

/// One bucket's store.
#[derive(Debug, Clone)]
pub(crate) struct Objects {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) bucket: String,
}

/// The outcome of a create-only put.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Created {
    /// The object was created by this call.
    Created,
    /// It existed already; nothing was written.
    Exists,
}

/// Wraps an object-store error with the operation and URL.
pub(crate) fn remote_err<'a>(
    op: &'static str,
    url: &'a RemoteUrl,
) -> impl FnOnce(object_store::Error) -> Error + 'a {
    move |e| Error::Remote {
        url: url.url(),
        op,
        reason: error_chain(&e),
        hint: hint_for(&e),
    }
}

impl Objects {
    /// The store for `bucket` (see [`super::store_for`]).
    pub(crate) fn for_bucket(bucket: &str) -> Result<Self> {
        Ok(Objects {
            store: super::store_for(bucket)?,
            bucket: bucket.to_string(),
        })
    }

    /// The URL of `location` in this bucket.
    pub(crate) fn url_of(&self, location: &object_store::path::Path) -> RemoteUrl {
        RemoteUrl {
            bucket: self.bucket.clone(),
            key: location.to_string(),
        }
    }

    /// The whole object, or `None` when it does not exist.
    pub(crate) fn get(&self, url: &RemoteUrl) -> Result<Option<Bytes>> {
        let loc = url.location();
        let res = runtime().block_on(async {
            match self.store.get(&loc).await {
                Ok(r) => r.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        res.map_err(remote_err("get", url))
    }

    /// Bytes `range` of the object.
    pub(crate) fn get_range(&self, url: &RemoteUrl, range: Range<u64>) -> Result<Bytes> {
        let loc = url.location();
        runtime()
            .block_on(self.store.get_range(&loc, range))
            .map_err(remote_err("get a range of", url))
    }

    /// Streams the object through `f`, piece by piece; returns its size. `None` when
    /// it does not exist.
    pub(crate) fn stream(&self, url: &RemoteUrl, mut f: impl FnMut(&[u8])) -> Result<Option<u64>> {
        let loc = url.location();
        let res = runtime().block_on(async {
            let r = match self.store.get(&loc).await {
                Ok(r) => r,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            let mut n = 0u64;
            let mut s = r.into_stream();
            while let Some(piece) = s.next().await {
                let piece = piece?;
                n += piece.len() as u64;
                f(&piece);
            }
            Ok(Some(n))
        });
        res.map_err(remote_err("get", url))
    }

    /// Every object under `prefix/` (recursively).
    pub(crate) fn list(&self, prefix: &RemoteUrl) -> Result<Vec<ObjectMeta>> {
        let loc = prefix.location();
        let res = runtime().block_on(async {
            let mut out = Vec::new();
            let mut s = self.store.list(Some(&loc));
            while let Some(m) = s.next().await {
                out.push(m?);
            }
            Ok::<_, object_store::Error>(out)
        });
        let mut out = res.map_err(remote_err("list", prefix))?;
        out.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(out)
    }

    /// Whether the object exists.
    pub(crate) fn exists(&self, url: &RemoteUrl) -> Result<bool> {
        let loc = url.location();
        match runtime().block_on(self.store.head(&loc)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(remote_err("head", url)(e)),
        }
    }

    /// Writes (or replaces) a small object.
    pub(crate) fn put(&self, url: &RemoteUrl, bytes: Vec<u8>) -> Result<()> {
        let loc = url.location();
        runtime()
            .block_on(self.store.put(&loc, PutPayload::from(bytes)))
            .map(|_| ())
            .map_err(remote_err("put", url))
    }

    /// Creates a small object only if it does not exist (S3 `If-None-Match: *`).
    pub(crate) fn put_create(&self, url: &RemoteUrl, bytes: Vec<u8>) -> Result<Created> {
        let loc = url.location();
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match runtime().block_on(self.store.put_opts(&loc, PutPayload::from(bytes), opts)) {
            Ok(_) => Ok(Created::Created),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Created::Exists),
            Err(e) => Err(remote_err("create-only put", url)(e)),
        }
    }

    /// Deletes an object; a missing one is not an error.
    pub(crate) fn delete(&self, url: &RemoteUrl) -> Result<()> {
        let loc = url.location();
        match runtime().block_on(self.store.delete(&loc)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(remote_err("delete", url)(e)),
        }
    }

    /// Deletes every object under `prefix/`; returns how many.
    pub(crate) fn delete_prefix(&self, prefix: &RemoteUrl) -> Result<usize> {
        let objects = self.list(prefix)?;
        for m in &objects {
            self.delete(&self.url_of(&m.location))?;
        }
        Ok(objects.len())
    }
}

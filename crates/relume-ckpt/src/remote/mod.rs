//! Checkpoint directories on S3 and S3-compatible object stores (feature `s3`).
//!
//! An object store has no rename and no directory fsync, so the local commit
//! protocol (temporary directory, fsync, rename) cannot be used. The remote protocol,
//! specified in `docs/FORMAT.md` ("Remote run directories"), commits with a
//! **create-only marker** instead:
//!
//! ```text
//! s3://bucket/prefix/checkpoints/
//!   step=000120-epoch=2/
//!     a-<unix-ms>-<uuid>/           one attempt: every file of the checkpoint
//!       model.safetensors           multipart upload (aborted on error)
//!       state.json
//!       manifest.json               written after the data files
//!     COMMIT                        create-only (`If-None-Match: *`): names the
//!                                   attempt and its manifest's BLAKE3
//!   .clearing                       a clear in progress: nothing is listed
//! ```
//!
//! - The checkpoint exists exactly when its `COMMIT` marker exists. A writer killed
//!   mid-upload leaves an attempt without a marker: invisible to readers, and deleted
//!   by the next writer once it is older than [`RemoteOptions::stale_after`] (so a
//!   live writer's upload is never deleted).
//! - Two writers committing the same name race on the marker: exactly one create
//!   succeeds; the other gets [`Error::RemoteAlreadyExists`] (or succeeds without
//!   writing when it saved the same state, as a local re-commit does).
//! - `latest` is resolved from the markers, never from a mutable object.
//! - Deleting a checkpoint deletes its marker first, then its data.
//! - Readers verify exactly as for local checkpoints (every size, BLAKE3 and
//!   per-tensor CRC32), streaming each object; [`crate::load`] reads the verified
//!   bytes into anonymous memory, with no local file.
//!
//! Credentials and the endpoint come from the standard `AWS_*` environment variables
//! ([`object_store::aws::AmazonS3Builder::from_env`]): `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` (or
//! `AWS_DEFAULT_REGION`), `AWS_ENDPOINT` (or `AWS_ENDPOINT_URL`) for a compatible
//! store, and `AWS_ALLOW_HTTP=true` for an `http://` endpoint. Without
//! `AWS_ACCESS_KEY_ID` (or a web-identity or container credential variable) relume
//! refuses to start rather than wait on the instance metadata service; set
//! `RELUME_S3_INSTANCE_CREDENTIALS=1` to use it.
//!
//! Everything here is blocking: the calls run on a small tokio runtime of relume's
//! own. Call them from ordinary threads, not from inside an async task.

mod dir;
mod objects;
mod storage;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use object_store::ObjectStore;

use crate::error::{Error, Result};

pub(crate) use dir::RemoteDir;
pub use dir::{
    RemoteOptions, ATTEMPT_PREFIX, CLEARING_FILE, COMMIT_FILE, MARKER_FORMAT, STALE_AFTER_ENV,
};
pub(crate) use objects::Objects;
pub use storage::{RemoteStorage, MAX_PARTS_IN_FLIGHT, PART_BYTES, PART_BYTES_ENV};

/// The scheme of remote run directories.
pub const SCHEME: &str = "s3://";

/// A parsed `s3://bucket/key` URL. The key has no leading or trailing `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteUrl {
    /// The bucket.
    pub bucket: String,
    /// The key (prefix) inside the bucket; empty for the bucket's root.
    pub key: String,
}

impl RemoteUrl {
    /// Parses `s3://bucket[/prefix]`.
    ///
    /// # Errors
    /// [`Error::RemoteUnsupported`] for another scheme, an empty bucket, or a key
    /// with an empty, `.` or `..` segment.
    pub fn parse(url: &str) -> Result<Self> {
        let bad = |what: &str| Error::RemoteUnsupported {
            url: url.to_string(),
            what: what.to_string(),
            hint: "write it as s3://bucket/prefix (for example s3://my-bucket/runs/digits)"
                .to_string(),
        };
        let rest = url
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("not an s3:// URL"))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("the bucket name is empty"));
        }
        let key = key.trim_end_matches('/');
        if !key.is_empty()
            && key
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return Err(bad("the prefix has an empty, `.` or `..` segment"));
        }
        Ok(RemoteUrl {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// Parses a path that holds an `s3://` URL (see [`is_remote`]).
    ///
    /// # Errors
    /// As [`RemoteUrl::parse`]; a path that is not valid UTF-8 is not a URL.
    pub fn from_path(path: &Path) -> Result<Self> {
        match path.to_str() {
            Some(s) => Self::parse(s),
            None => Err(Error::RemoteUnsupported {
                url: path.display().to_string(),
                what: "not valid UTF-8".into(),
                hint: "use an ASCII s3://bucket/prefix URL".into(),
            }),
        }
    }

    /// This URL with `segment` (one or more `/`-separated segments) appended.
    pub fn join(&self, segment: &str) -> RemoteUrl {
        let key = if self.key.is_empty() {
            segment.to_string()
        } else {
            format!("{}/{segment}", self.key)
        };
        RemoteUrl {
            bucket: self.bucket.clone(),
            key,
        }
    }

    /// The URL as a string, `s3://bucket/key`.
    pub fn url(&self) -> String {
        if self.key.is_empty() {
            format!("{SCHEME}{}", self.bucket)
        } else {
            format!("{SCHEME}{}/{}", self.bucket, self.key)
        }
    }

    /// The URL as a path, the form the rest of the crate passes around (error
    /// messages then name the URL).
    pub fn path(&self) -> PathBuf {
        PathBuf::from(self.url())
    }

    /// The key as an object-store path.
    pub(crate) fn location(&self) -> object_store::path::Path {
        object_store::path::Path::from(self.key.as_str())
    }

    /// The last segment of the key.
    pub fn file_name(&self) -> &str {
        self.key.rsplit('/').next().unwrap_or("")
    }
}

impl std::fmt::Display for RemoteUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url())
    }
}

/// The runtime every remote call blocks on.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("relume-s3")
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            // Only fails when the OS refuses threads or an event fd; nothing can
            // be uploaded then, and there is no caller to hand an error to here.
            Err(e) => panic!("relume: cannot start the tokio runtime for s3:// I/O: {e}"),
        }
    })
}

type StoreMap = Mutex<BTreeMap<String, Arc<dyn ObjectStore>>>;

fn stores() -> &'static StoreMap {
    static STORES: OnceLock<StoreMap> = OnceLock::new();
    STORES.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// Serves `s3://<bucket>/...` from `store` in this process instead of building an
/// S3 client from the environment: an `object_store::memory::InMemory` in tests, or a
/// store configured in code (another endpoint, custom credentials).
pub fn register_store(bucket: &str, store: Arc<dyn ObjectStore>) {
    stores()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(bucket.to_string(), store);
}

/// The store for `bucket`: a registered one, or an S3 client built from the `AWS_*`
/// environment (cached per bucket).
///
/// # Errors
/// [`Error::Remote`] when no credentials are configured or the client cannot be
/// built (a malformed endpoint, say).
pub fn store_for(bucket: &str) -> Result<Arc<dyn ObjectStore>> {
    let mut map = stores()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(s) = map.get(bucket) {
        return Ok(Arc::clone(s));
    }
    let store = build_from_env(bucket)?;
    map.insert(bucket.to_string(), Arc::clone(&store));
    Ok(store)
}

/// Whether one of the variables that give AWS credentials is set.
fn credentials_configured() -> bool {
    [
        "AWS_ACCESS_KEY_ID",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "RELUME_S3_INSTANCE_CREDENTIALS",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
        || std::env::var("AWS_SKIP_SIGNATURE").is_ok_and(|v| v == "true")
}

fn build_from_env(bucket: &str) -> Result<Arc<dyn ObjectStore>> {
    let url = format!("{SCHEME}{bucket}");
    if !credentials_configured() {
        return Err(Error::Remote {
            url,
            op: "connect to",
            reason: "no AWS credentials are configured".into(),
            hint: "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT for an S3-compatible store), or RELUME_S3_INSTANCE_CREDENTIALS=1 to use the instance's role".into(),
        });
    }
    let retry = object_store::RetryConfig {
        max_retries: 3,
        retry_timeout: Duration::from_secs(20),
        backoff: object_store::BackoffConfig::default(),
    };
    use object_store::aws::AmazonS3ConfigKey as Key;
    use object_store::ClientConfigKey as Client;
    let mut builder = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_retry(retry);
    // Set one by one: `with_client_options` would replace what the environment set
    // (`AWS_ALLOW_HTTP` among it). The environment's own values win.
    if std::env::var_os("AWS_CONNECT_TIMEOUT").is_none() {
        builder = builder.with_config(Key::Client(Client::ConnectTimeout), "5s");
    }
    if std::env::var_os("AWS_TIMEOUT").is_none() {
        builder = builder.with_config(Key::Client(Client::Timeout), "300s");
    }
    builder
        .build()
        .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        .map_err(|e| Error::Remote {
            url,
            op: "configure a client for",
            reason: error_chain(&e),
            hint: "check AWS_ENDPOINT, AWS_REGION and the credential variables".into(),
        })
}

/// The unsigned integer in environment variable `name`; unset is `None`, and so is
/// a value that is not a number, with a warning naming it (the default applies).
pub(crate) fn env_number(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse::<u64>() {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!("ignoring {name}={v:?}: {e}; the default is used");
            None
        }
    }
}

/// `e` and its sources, joined with `: `.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

/// What to do about an object-store error, from what it says.
pub(crate) fn hint_for(e: &object_store::Error) -> String {
    let text = error_chain(e);
    let endpoint = std::env::var("AWS_ENDPOINT")
        .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
        .unwrap_or_else(|_| "the AWS default endpoint".into());
    if text.contains("NoSuchBucket") || text.contains("bucket does not exist") {
        "the bucket does not exist: create it, or fix the bucket name in the URL".into()
    } else if text.contains("InvalidAccessKeyId")
        || text.contains("SignatureDoesNotMatch")
        || text.contains("AccessDenied")
        || text.contains("403")
    {
        "the store refused the credentials: check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN".into()
    } else if text.contains("error sending request")
        || text.contains("onnect")
        || text.contains("dns")
        || text.contains("timed out")
    {
        format!("cannot reach {endpoint}: check AWS_ENDPOINT (and AWS_ALLOW_HTTP=true for an http:// endpoint) and that the server runs")
    } else {
        format!("check the URL, the credentials and AWS_ENDPOINT ({endpoint})")
    }
}

/// Whether the checkpoint at `path` (an `s3://` URL) has its commit marker.
pub(crate) fn is_committed(path: &Path) -> Result<bool> {
    let url = RemoteUrl::from_path(path)?;
    Objects::for_bucket(&url.bucket)?.exists(&url.join(COMMIT_FILE))
}

/// The manifest of the checkpoint at `path` (an `s3://` URL), checked against its
/// marker.
pub(crate) fn read_manifest_url(path: &Path) -> Result<crate::Manifest> {
    dir::RemoteDir::read_manifest_url(path)
}

/// File `rel` of the committed attempt of the checkpoint at `path`.
pub(crate) fn read_file_url(path: &Path, rel: &str) -> Result<Vec<u8>> {
    dir::RemoteDir::read_file_url(path, rel)
}

/// The environment variable naming the bucket of a test S3 server.
pub const TEST_BUCKET_ENV: &str = "RELUME_S3_TEST_BUCKET";

/// For test suites (relume's and yours): the bucket of the S3 server the tests may
/// use, from [`TEST_BUCKET_ENV`] (with the `AWS_*` variables pointing at the
/// server). Unset, it prints a loud SKIPPED line on stderr and returns `None`, except
/// under CI (`CI` set), where a missing server is a failure: it panics.
pub fn test_bucket() -> Option<String> {
    match std::env::var(TEST_BUCKET_ENV) {
        Ok(b) if !b.is_empty() => Some(b),
        _ if std::env::var_os("CI").is_some() => panic!(
            "CI is set but {TEST_BUCKET_ENV} is not: the S3 tests must run against the local S3 server that .ci/run starts (.ci/s3-server.sh)"
        ),
        _ => {
            eprintln!(
                "\n*** SKIPPED the S3 part of this test: {TEST_BUCKET_ENV} is not set; run `eval \"$(.ci/s3-server.sh start)\"` first (CI does) ***\n"
            );
            None
        }
    }
}

/// True when `path` holds an `s3://` URL rather than a local path.
pub fn is_remote(path: &Path) -> bool {
    crate::location::is_remote(path)
}

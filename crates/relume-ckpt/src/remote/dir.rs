//! [`RemoteDir`]: a run's checkpoints on an object store, behind
//! [`crate::CheckpointDir`] (see the protocol in [`super`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::objects::Objects;
use super::storage::RemoteStorage;
use super::RemoteUrl;
use crate::commit::{check_name, write_contents, Checkpoint};
use crate::dir::{CheckpointInfo, CHECKPOINTS_DIR};
use crate::error::{Error, Result};
use crate::fingerprint::fingerprint;
use crate::manifest::{rfc3339, Manifest, MANIFEST_FILE, MAX_MANIFEST_BYTES, STATE_FILE};
use crate::read::{
    assemble, check_bytes, header_disagrees, json_keys_disagree, LoadedCheckpoint, VerifyReport,
};
use crate::storage::Storage;
use crate::tensor_file::{parse_header, MAX_HEADER_BYTES};

/// Name of the create-only commit marker inside a checkpoint's prefix.
pub const COMMIT_FILE: &str = "COMMIT";
/// Name of the object that marks a clear in progress, in the checkpoints prefix.
pub const CLEARING_FILE: &str = ".clearing";
/// Prefix of attempt names (`a-<unix-ms>-<uuid>`).
pub const ATTEMPT_PREFIX: &str = "a-";
/// The `format` of a commit marker.
pub const MARKER_FORMAT: &str = "relume-commit/1";
/// The environment variable that overrides [`RemoteOptions::stale_after`], in seconds.
pub const STALE_AFTER_ENV: &str = "RELUME_S3_STALE_AFTER_SECS";

/// Settings of a remote checkpoints directory.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// An attempt without a commit marker is deleted by a writer that opens the run
    /// only once all its objects are older than this: it belonged to a writer that
    /// died (a live writer's upload in progress is younger). Default one hour, or
    /// [`STALE_AFTER_ENV`] seconds.
    pub stale_after: Duration,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        let secs = super::env_number(STALE_AFTER_ENV).unwrap_or(3600);
        RemoteOptions {
            stale_after: Duration::from_secs(secs),
        }
    }
}

/// The content of a `COMMIT` marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Marker {
    /// [`MARKER_FORMAT`].
    pub format: String,
    /// The checkpoint name.
    pub name: String,
    /// The committed attempt.
    pub attempt: String,
    /// BLAKE3 (hex) of the attempt's `manifest.json` bytes.
    pub manifest_blake3: String,
    /// The state fingerprint (as in the manifest).
    pub fingerprint: String,
    /// `progress.step`, for ordering without reading the manifest.
    pub step: Option<u64>,
    /// The manifest's `commit_seq`.
    pub commit_seq: Option<u64>,
    /// The manifest's `group`.
    #[serde(default)]
    pub group: Vec<String>,
    /// When the marker was written (RFC 3339, writer's clock).
    pub created_at: String,
}

/// A run's checkpoints prefix on an object store.
#[derive(Debug)]
pub(crate) struct RemoteDir {
    dir: RemoteUrl,
    objects: Objects,
    storage: Arc<dyn Storage>,
    writer: bool,
    next_seq: AtomicU64,
    options: RemoteOptions,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl RemoteDir {
    /// Opens the checkpoints of run `run` (an `s3://` URL). A writer finishes an
    /// interrupted clear and deletes stale attempts; a reader changes nothing.
    pub(crate) fn open(
        run: &Path,
        storage: Option<Arc<dyn Storage>>,
        writer: bool,
        options: RemoteOptions,
    ) -> Result<Self> {
        let run_url = RemoteUrl::from_path(run)?;
        let dir = run_url.join(CHECKPOINTS_DIR);
        let objects = Objects::for_bucket(&dir.bucket)?;
        let storage = match storage {
            Some(s) if !s.is_remote() => {
                return Err(Error::RemoteUnsupported {
                    url: run_url.url(),
                    what: "the storage given for writing is a local one".into(),
                    hint: "pass a `relume_ckpt::remote::RemoteStorage` (or a FaultyStorage wrapping one) for an s3:// run, or no storage".into(),
                })
            }
            Some(s) => s,
            None => Arc::new(RemoteStorage::from_objects(objects.clone())),
        };
        let me = RemoteDir {
            dir,
            objects,
            storage,
            writer,
            next_seq: AtomicU64::new(0),
            options,
        };
        // Reaches the store (and the bucket) before anything else is attempted.
        let listing = me.objects.list(&me.dir)?;
        if writer {
            let listing = if me.clearing(&listing) {
                tracing::info!("finishing the clear of {} that was interrupted", me.dir);
                me.finish_clear()?;
                me.objects.list(&me.dir)?
            } else {
                listing
            };
            me.remove_stale(&listing)?;
            let next = me
                .markers()?
                .iter()
                .filter_map(|(_, m)| m.commit_seq)
                .max()
                .map_or(0, |m| m + 1);
            me.next_seq.store(next, Ordering::SeqCst);
        }
        Ok(me)
    }

    /// The checkpoints prefix as a path (`s3://bucket/run/checkpoints`).
    pub(crate) fn path(&self) -> PathBuf {
        self.dir.path()
    }

    pub(crate) fn require_writer(&self) -> Result<()> {
        if self.writer {
            Ok(())
        } else {
            Err(Error::ReadOnly { path: self.path() })
        }
    }

    /// The key of `m` relative to the checkpoints prefix, split in segments.
    fn segments(&self, m: &object_store::ObjectMeta) -> Vec<String> {
        let key = m.location.to_string();
        let rel = key
            .strip_prefix(&format!("{}/", self.dir.key))
            .unwrap_or(&key);
        rel.split('/').map(str::to_string).collect()
    }

    fn clearing(&self, listing: &[object_store::ObjectMeta]) -> bool {
        listing
            .iter()
            .any(|m| self.segments(m) == [CLEARING_FILE.to_string()])
    }

    /// Whether a clear was started and not finished.
    pub(crate) fn clear_pending(&self) -> Result<bool> {
        self.objects.exists(&self.dir.join(CLEARING_FILE))
    }

    /// Every commit marker, sorted by (step, commit_seq, name). Nothing while a
    /// clear is pending. A marker that cannot be parsed is skipped with a warning.
    pub(crate) fn markers(&self) -> Result<Vec<(String, Marker)>> {
        let listing = self.objects.list(&self.dir)?;
        if self.clearing(&listing) {
            tracing::info!("{} is being cleared: no checkpoint is listed", self.dir);
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for m in &listing {
            let seg = self.segments(m);
            if seg.len() != 2 || seg[1] != COMMIT_FILE || check_name(&seg[0]).is_err() {
                continue;
            }
            let url = self.objects.url_of(&m.location);
            match read_marker(&self.objects, &url) {
                Ok(Some(marker)) if marker.name == seg[0] => out.push((seg[0].clone(), marker)),
                Ok(Some(marker)) => tracing::warn!(
                    "skipping {url}: the marker names checkpoint {:?}",
                    marker.name
                ),
                Ok(None) => {}
                Err(e) => tracing::warn!("skipping {url}: {e}"),
            }
        }
        out.sort_by(|(an, a), (bn, b)| (a.step, a.commit_seq, an).cmp(&(b.step, b.commit_seq, bn)));
        Ok(out)
    }

    /// The committed checkpoints, as [`crate::CheckpointDir::list`] (the manifest of
    /// each is read; one that does not match its marker is skipped with a warning).
    pub(crate) fn list(&self) -> Result<Vec<CheckpointInfo>> {
        let mut out = Vec::new();
        for (name, marker) in self.markers()? {
            let ckpt = self.dir.join(&name);
            match read_manifest(&self.objects, &ckpt, &marker) {
                Ok((m, _)) => out.push(CheckpointInfo::from_manifest(name, ckpt.path(), m)),
                Err(e) => tracing::warn!("skipping {ckpt}: {e}"),
            }
        }
        Ok(out)
    }

    /// Attempts no marker names (uploads in progress, or left by a dead writer).
    pub(crate) fn temporaries(&self) -> Result<Vec<PathBuf>> {
        let listing = self.objects.list(&self.dir)?;
        Ok(self
            .orphans(&listing)?
            .into_keys()
            .map(|(name, attempt)| self.dir.join(&name).join(&attempt).path())
            .collect())
    }

    /// Unreferenced attempts and the newest modification time of their objects (ms).
    fn orphans(
        &self,
        listing: &[object_store::ObjectMeta],
    ) -> Result<BTreeMap<(String, String), i64>> {
        let committed: BTreeSet<(String, String)> = self
            .markers()?
            .into_iter()
            .map(|(n, m)| (n, m.attempt))
            .collect();
        let mut out: BTreeMap<(String, String), i64> = BTreeMap::new();
        for m in listing {
            let seg = self.segments(m);
            if seg.len() < 3 || !seg[1].starts_with(ATTEMPT_PREFIX) {
                continue;
            }
            let id = (seg[0].clone(), seg[1].clone());
            if committed.contains(&id) {
                continue;
            }
            let t = m.last_modified.timestamp_millis();
            let e = out.entry(id).or_insert(t);
            *e = (*e).max(t);
        }
        Ok(out)
    }

    /// Deletes the attempts no marker names whose objects are all older than
    /// [`RemoteOptions::stale_after`].
    fn remove_stale(&self, listing: &[object_store::ObjectMeta]) -> Result<()> {
        let now = now_ms() as i64;
        let grace = self.options.stale_after.as_millis() as i64;
        let mut removed = 0;
        for ((name, attempt), newest) in self.orphans(listing)? {
            if now - newest < grace {
                tracing::info!(
                    "leaving {}: an uncommitted attempt only {} s old (a live writer's upload?)",
                    self.dir.join(&name).join(&attempt),
                    (now - newest) / 1000
                );
                continue;
            }
            self.objects
                .delete_prefix(&self.dir.join(&name).join(&attempt))?;
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(
                "removed {removed} stale uncommitted attempts in {}",
                self.dir
            );
        }
        Ok(())
    }

    /// The newest usable checkpoint: the last marker by (step, commit_seq, name)
    /// whose group committed and whose manifest matches the marker. Its files are
    /// verified when it is loaded.
    pub(crate) fn latest(&self) -> Result<Option<PathBuf>> {
        let markers = self.markers()?;
        let names: BTreeSet<&str> = markers.iter().map(|(n, _)| n.as_str()).collect();
        let newest_step = markers.last().map(|(_, m)| m.step);
        for (name, m) in markers.iter().rev() {
            let url = self.dir.join(name);
            if Some(m.step) == newest_step {
                if let Some(missing) = m.group.iter().find(|g| !names.contains(g.as_str())) {
                    tracing::warn!(
                        "{url} is not used as the latest checkpoint: it was saved at the same step as {missing:?}, whose save did not commit"
                    );
                    continue;
                }
            }
            if let Err(e) = read_manifest(&self.objects, &url, m) {
                tracing::warn!("{url} is not used as the latest checkpoint: {e}");
                continue;
            }
            return Ok(Some(url.path()));
        }
        // As locally: never a fresh start beside committed checkpoints; loading the
        // newest reports what is wrong with it.
        Ok(markers.last().map(|(n, _)| self.dir.join(n).path()))
    }

    /// Whether `name` (or an `s3://` checkpoint URL) is committed.
    pub(crate) fn committed(&self, name_or_url: &str) -> Result<Option<RemoteUrl>> {
        let url = if check_name(name_or_url).is_ok() {
            self.dir.join(name_or_url)
        } else {
            RemoteUrl::parse(name_or_url)?
        };
        Ok(self.objects.exists(&url.join(COMMIT_FILE))?.then_some(url))
    }

    /// Writes `ckpt` as an attempt of `name` and commits it with the marker.
    pub(crate) fn save(&self, name: &str, ckpt: &Checkpoint) -> Result<PathBuf> {
        self.require_writer()?;
        check_name(name)?;
        let url = self.dir.join(name);
        let marker_url = url.join(COMMIT_FILE);
        let new_fp = fingerprint(&ckpt.components);
        if let Some(existing) = read_marker(&self.objects, &marker_url)? {
            if existing.fingerprint == new_fp {
                tracing::info!(
                    "checkpoint {url} is already committed with the same fingerprint; not written again"
                );
                return Ok(url.path());
            }
            let markers = self.markers()?;
            let names: BTreeSet<&str> = markers.iter().map(|(n, _)| n.as_str()).collect();
            if existing.group.iter().any(|g| !names.contains(g.as_str())) {
                // As `replace_incomplete` locally: a member of a boundary group that
                // never completed is never resolved as the newest; the replay
                // replaces it. The marker goes first, so a kill leaves no checkpoint
                // of that name and the replay writes it again.
                tracing::warn!(
                    "replacing {url}: its boundary group never completed, and the replayed boundary saves other callback state"
                );
                self.objects.delete(&marker_url)?;
                self.objects.delete_prefix(&url.join(&existing.attempt))?;
            } else {
                // A marker is never replaced: whoever wrote it (a concurrent writer,
                // or an earlier run that was not deterministic) won.
                return Err(Error::RemoteAlreadyExists {
                    url: url.url(),
                    winner: existing.attempt,
                    existing: existing.fingerprint,
                    new: new_fp,
                });
            }
        }
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        let attempt = format!(
            "{ATTEMPT_PREFIX}{:013}-{}",
            now_ms(),
            uuid::Uuid::new_v4().simple()
        );
        let attempt_url = url.join(&attempt);
        let manifest_blake3 = match write_contents(
            self.storage.as_ref(),
            &attempt_url.path(),
            ckpt,
            Some(seq),
            true,
        ) {
            Ok(h) => h,
            Err(e) => {
                self.remove_attempt(&attempt_url);
                return Err(e);
            }
        };
        let secs = now_ms() / 1000;
        let marker = Marker {
            format: MARKER_FORMAT.into(),
            name: name.into(),
            attempt: attempt.clone(),
            manifest_blake3,
            fingerprint: new_fp.clone(),
            step: crate::manifest::progress_step(&ckpt.progress),
            commit_seq: Some(seq),
            group: ckpt.group.clone(),
            created_at: rfc3339(secs),
        };
        let bytes = serde_json::to_vec_pretty(&marker).map_err(|e| Error::JsonValue {
            key: COMMIT_FILE.into(),
            reason: e.to_string(),
        })?;
        let created = self
            .storage
            .put_create(&marker_url.path(), &bytes)
            .map_err(crate::error::io_err("create-only put", &marker_url.path()));
        let created = match created {
            Ok(c) => c,
            Err(e) => {
                // The marker may or may not exist (a timeout after the store took
                // it): only delete the attempt when it is certainly not committed.
                if read_marker(&self.objects, &marker_url)
                    .is_ok_and(|m| m.is_none_or(|m| m.attempt != attempt))
                {
                    self.remove_attempt(&attempt_url);
                }
                return Err(e);
            }
        };
        if !created {
            let winner = read_marker(&self.objects, &marker_url)?;
            match winner {
                // A retried request whose first try created the marker.
                Some(w) if w.attempt == attempt => {}
                Some(w) if w.fingerprint == new_fp => {
                    self.remove_attempt(&attempt_url);
                    tracing::info!(
                        "checkpoint {url} was committed by another writer with the same fingerprint; not written again"
                    );
                }
                Some(w) => {
                    self.remove_attempt(&attempt_url);
                    return Err(Error::RemoteAlreadyExists {
                        url: url.url(),
                        winner: w.attempt,
                        existing: w.fingerprint,
                        new: new_fp,
                    });
                }
                None => {
                    self.remove_attempt(&attempt_url);
                    return Err(Error::Remote {
                        url: marker_url.url(),
                        op: "create-only put",
                        reason: "the store said the marker exists, but it cannot be read".into(),
                        hint: "another writer deleted it meanwhile: two writers are using this run; stop one".into(),
                    });
                }
            }
        }
        Ok(url.path())
    }

    /// Best-effort removal of an attempt that will not be committed; what is left is
    /// deleted as stale by a later writer.
    fn remove_attempt(&self, attempt: &RemoteUrl) {
        if let Err(e) = self.objects.delete_prefix(attempt) {
            tracing::warn!(
                "could not remove the uncommitted attempt {attempt}: {e}; a later writer deletes it once stale"
            );
        }
    }

    /// Deletes committed checkpoint `name`: the marker first, then the data.
    pub(crate) fn delete(&self, name: &str) -> Result<()> {
        self.require_writer()?;
        check_name(name)?;
        let url = self.dir.join(name);
        let marker_url = url.join(COMMIT_FILE);
        let Some(marker) = read_marker(&self.objects, &marker_url)? else {
            return Err(Error::NoSuchCheckpoint {
                name: name.to_string(),
                dir: self.path(),
            });
        };
        if self.latest()? == Some(url.path()) {
            return Err(Error::DeleteLatest { path: url.path() });
        }
        self.objects.delete(&marker_url)?;
        self.objects.delete_prefix(&url.join(&marker.attempt))?;
        Ok(())
    }

    /// Empties the run: `.clearing` first (from then on nothing is listed), then
    /// every marker, then every object, then `.clearing`. Returns the number of
    /// checkpoints removed.
    pub(crate) fn clear(&self) -> Result<usize> {
        self.require_writer()?;
        let n = self.markers()?.len();
        self.objects.put(
            &self.dir.join(CLEARING_FILE),
            b"clear in progress\n".to_vec(),
        )?;
        self.finish_clear()?;
        tracing::info!("cleared {}: removed {n} checkpoints", self.dir);
        Ok(n)
    }

    fn finish_clear(&self) -> Result<()> {
        let listing = self.objects.list(&self.dir)?;
        let clearing = self.dir.join(CLEARING_FILE);
        let (markers, rest): (Vec<_>, Vec<_>) = listing
            .iter()
            .filter(|m| self.segments(m) != [CLEARING_FILE.to_string()])
            .partition(|m| self.segments(m).last().map(String::as_str) == Some(COMMIT_FILE));
        for m in markers.iter().chain(rest.iter()) {
            self.objects.delete(&self.objects.url_of(&m.location))?;
        }
        self.objects.delete(&clearing)
    }

    /// Loads the checkpoint at `path` (`s3://bucket/.../checkpoints/<name>`).
    pub(crate) fn load_url(path: &Path) -> Result<LoadedCheckpoint> {
        let url = RemoteUrl::from_path(path)?;
        let objects = Objects::for_bucket(&url.bucket)?;
        load(&objects, &url)
    }

    /// The manifest of the checkpoint at `path`, checked against its marker.
    pub(crate) fn read_manifest_url(path: &Path) -> Result<Manifest> {
        let url = RemoteUrl::from_path(path)?;
        let objects = Objects::for_bucket(&url.bucket)?;
        let marker = require_marker(&objects, &url)?;
        Ok(read_manifest(&objects, &url, &marker)?.0)
    }

    /// File `rel` of the committed attempt of the checkpoint at `path`.
    pub(crate) fn read_file_url(path: &Path, rel: &str) -> Result<Vec<u8>> {
        let url = RemoteUrl::from_path(path)?;
        let objects = Objects::for_bucket(&url.bucket)?;
        let marker = require_marker(&objects, &url)?;
        let furl = url.join(&marker.attempt).join(rel);
        match objects.get(&furl)? {
            Some(b) => Ok(b.to_vec()),
            None => Err(Error::MissingFile { path: furl.path() }),
        }
    }

    /// Verifies the checkpoint at `path`, reporting every problem.
    pub(crate) fn verify_url(path: &Path) -> VerifyReport {
        let mut report = VerifyReport {
            path: path.to_path_buf(),
            manifest: None,
            problems: Vec::new(),
            bytes_checked: 0,
        };
        let objects =
            RemoteUrl::from_path(path).and_then(|url| Ok((Objects::for_bucket(&url.bucket)?, url)));
        match objects {
            Ok((objects, url)) => verify(&objects, &url, &mut report),
            Err(e) => report.problems.push(e),
        }
        report
    }
}

/// Reads and parses a marker; `None` when it does not exist.
fn read_marker(objects: &Objects, marker_url: &RemoteUrl) -> Result<Option<Marker>> {
    let Some(bytes) = objects.get(marker_url)? else {
        return Ok(None);
    };
    let m: Marker = serde_json::from_slice(&bytes).map_err(|e| Error::Inconsistent {
        path: marker_url.path(),
        reason: format!("not a commit marker: {e}"),
    })?;
    if m.format != MARKER_FORMAT {
        return Err(Error::Inconsistent {
            path: marker_url.path(),
            reason: format!(
                "commit marker format {:?}, this relume reads {MARKER_FORMAT:?}: upgrade relume",
                m.format
            ),
        });
    }
    Ok(Some(m))
}

/// The attempt's manifest, checked against the marker's hash; with its size.
fn read_manifest(objects: &Objects, ckpt: &RemoteUrl, marker: &Marker) -> Result<(Manifest, u64)> {
    let mpath = ckpt.join(&marker.attempt).join(MANIFEST_FILE);
    let Some(bytes) = objects.get(&mpath)? else {
        return Err(Error::MissingManifest { path: ckpt.path() });
    };
    let got = blake3::hash(&bytes).to_hex().to_string();
    if got != marker.manifest_blake3 {
        return Err(Error::ManifestChecksum {
            path: mpath.path(),
            expected: marker.manifest_blake3.clone(),
            got,
        });
    }
    let m = Manifest::parse(&mpath.path(), &bytes)?;
    Ok((m, bytes.len() as u64))
}

/// The marker of checkpoint `url`, or [`Error::MissingManifest`].
fn require_marker(objects: &Objects, url: &RemoteUrl) -> Result<Marker> {
    read_marker(objects, &url.join(COMMIT_FILE))?
        .ok_or_else(|| Error::MissingManifest { path: url.path() })
}

/// Downloads `url` into anonymous memory, hashing it; [`Error::FileSize`] when it is
/// not `expected` bytes long.
fn download(objects: &Objects, url: &RemoteUrl, expected: u64) -> Result<(memmap2::Mmap, String)> {
    // Populated up front: one batch of page faults in the kernel, not one per page
    // while the bytes arrive.
    let mut map = memmap2::MmapOptions::new()
        .len(expected.max(1) as usize)
        .populate()
        .map_anon()
        .map_err(crate::error::io_err("allocate memory for", &url.path()))?;
    let mut off = 0u64;
    let mut hasher = blake3::Hasher::new();
    let got = objects.stream(url, |piece| {
        let end = off + piece.len() as u64;
        if end <= expected {
            map[off as usize..end as usize].copy_from_slice(piece);
            hasher.update(piece);
        }
        off = end;
    })?;
    let Some(got) = got else {
        return Err(Error::MissingFile { path: url.path() });
    };
    if got != expected {
        return Err(Error::FileSize {
            path: url.path(),
            tensor: None,
            expected,
            got,
        });
    }
    let map = map
        .make_read_only()
        .map_err(crate::error::io_err("protect memory of", &url.path()))?;
    Ok((map, hasher.finalize().to_hex().to_string()))
}

fn load(objects: &Objects, url: &RemoteUrl) -> Result<LoadedCheckpoint> {
    let marker = require_marker(objects, url)?;
    let (manifest, _) = read_manifest(objects, url, &marker)?;
    let attempt = url.join(&marker.attempt);
    // Every file at once: each download hashes on its own thread, so hashing hides
    // behind the other files' transfers.
    let downloads = each_file(&manifest, |idx, fe| {
        let furl = attempt.join(&fe.path);
        let (map, hash) = download(objects, &furl, fe.bytes)?;
        check_bytes(&furl.path(), &manifest, idx, &map, &hash)?;
        Ok(map)
    });
    let mut maps = BTreeMap::new();
    for (fe, map) in manifest.files.iter().zip(downloads) {
        maps.insert(fe.path.clone(), Arc::new(map?));
    }
    assemble(&attempt.path(), url.path(), manifest, &maps, None)
}

fn verify(objects: &Objects, url: &RemoteUrl, report: &mut VerifyReport) {
    report.path = url.path();
    let (marker, manifest, mlen) = match require_marker(objects, url)
        .and_then(|marker| read_manifest(objects, url, &marker).map(|(m, n)| (marker, m, n)))
    {
        Ok(v) => v,
        Err(e) => {
            report.problems.push(e);
            return;
        }
    };
    report.bytes_checked = mlen;
    let attempt = url.join(&marker.attempt);
    let checked = each_file(&manifest, |_, fe| {
        verify_file(objects, &manifest, &attempt, fe)
    });
    let mut state: Option<Vec<u8>> = None;
    for c in checked {
        report.bytes_checked += c.bytes;
        report.problems.extend(c.problems);
        if c.state.is_some() {
            state = c.state;
        }
    }
    if let Some(state) = state {
        check_state_keys(
            &attempt.join(STATE_FILE).path(),
            &manifest,
            &state,
            &mut report.problems,
        );
    }
    report.manifest = Some(manifest);
}

/// `state.json` holds exactly the JSON keys the manifest lists, per component.
fn check_state_keys(path: &Path, m: &Manifest, bytes: &[u8], problems: &mut Vec<Error>) {
    let state: serde_json::Map<String, Value> = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => {
            problems.push(Error::Inconsistent {
                path: path.to_path_buf(),
                reason: format!("not a JSON object: {e}"),
            });
            return;
        }
    };
    for (name, c) in &m.components {
        let keys: Vec<&String> = state
            .get(name)
            .and_then(Value::as_object)
            .map(|l| l.keys().collect())
            .unwrap_or_default();
        problems.extend(json_keys_disagree(path, name, c, &keys));
    }
}

/// What verifying one file found.
#[derive(Default)]
struct FileCheck {
    bytes: u64,
    problems: Vec<Error>,
    state: Option<Vec<u8>>,
}

impl FileCheck {
    fn with(mut self, problems: Vec<Error>) -> Self {
        self.problems = problems;
        self
    }
}

/// Runs `f` on every file of `m` on its own thread; results in manifest order.
fn each_file<T: Send>(
    m: &Manifest,
    f: impl Fn(usize, &crate::manifest::FileEntry) -> T + Sync,
) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = m
            .files
            .iter()
            .enumerate()
            .map(|(i, fe)| {
                let f = &f;
                s.spawn(move || f(i, fe))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(v) => v,
                // A panic on a download thread is a bug; propagate it.
                Err(p) => std::panic::resume_unwind(p),
            })
            .collect()
    })
}

/// Streams file `fe` of `attempt`, checking its size and BLAKE3, and for a tensor
/// file the safetensors header (the start of the stream) against the manifest.
fn verify_file(
    objects: &Objects,
    manifest: &Manifest,
    attempt: &RemoteUrl,
    fe: &crate::manifest::FileEntry,
) -> FileCheck {
    let mut out = FileCheck::default();
    let mut problems = Vec::new();
    let furl = attempt.join(&fe.path);
    let fpath = furl.path();
    let component = manifest
        .components
        .iter()
        .find(|(_, c)| c.file.as_deref() == Some(fe.path.as_str()));
    let keep = fe.path == STATE_FILE;
    let mut kept = Vec::new();
    let mut head = Vec::new();
    let mut hasher = blake3::Hasher::new();
    let streamed = objects.stream(&furl, |piece| {
        hasher.update(piece);
        if component.is_some() {
            fill_head(&mut head, piece);
        }
        if keep && (kept.len() + piece.len()) as u64 <= MAX_MANIFEST_BYTES {
            kept.extend_from_slice(piece);
        }
    });
    let got_len = match streamed {
        Ok(Some(n)) => n,
        Ok(None) => {
            problems.push(Error::MissingFile { path: fpath });
            return out.with(problems);
        }
        Err(e) => {
            problems.push(e);
            return out.with(problems);
        }
    };
    out.bytes = got_len;
    if got_len != fe.bytes {
        problems.push(Error::FileSize {
            path: fpath,
            tensor: None,
            expected: fe.bytes,
            got: got_len,
        });
        return out.with(problems);
    }
    let entries = match component {
        Some((name, c)) => match parse_header(&fpath, &head, fe.bytes) {
            Ok(entries) => {
                problems.extend(header_disagrees(&fpath, name, c, &entries));
                entries
            }
            Err(e) => {
                problems.push(e);
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    let got = hasher.finalize().to_hex().to_string();
    if got != fe.blake3 {
        let tensor = component.and_then(|(_, c)| damaged_tensor(objects, &furl, &entries, c));
        problems.push(Error::ChecksumMismatch {
            path: fpath,
            tensor,
            expected: fe.blake3.clone(),
            got,
        });
        return out.with(problems);
    }
    if keep {
        out.state = Some(kept);
    }
    out.with(problems)
}

/// Appends to `head` what `piece` holds of a safetensors header (the 8-byte length,
/// then that many bytes, at most [`MAX_HEADER_BYTES`]).
fn fill_head(head: &mut Vec<u8>, mut piece: &[u8]) {
    loop {
        let want = if head.len() < 8 {
            8
        } else {
            let mut n8 = [0u8; 8];
            n8.copy_from_slice(&head[..8]);
            8 + u64::from_le_bytes(n8).min(MAX_HEADER_BYTES) as usize
        };
        if head.len() >= want || piece.is_empty() {
            return;
        }
        let take = (want - head.len()).min(piece.len());
        head.extend_from_slice(&piece[..take]);
        piece = &piece[take..];
    }
}

/// The first tensor of `url` whose CRC32 differs from the manifest's, range-reading
/// each tensor's bytes (only for a file whose BLAKE3 did not match).
fn damaged_tensor(
    objects: &Objects,
    url: &RemoteUrl,
    entries: &[crate::tensor_file::TensorEntry],
    c: &crate::manifest::ComponentEntry,
) -> Option<String> {
    // Only names the damage: a range that cannot be read names no tensor, and the
    // file's checksum mismatch is reported either way.
    entries.iter().find_map(|e| {
        let bytes = objects.get_range(url, e.start..e.end).ok()?;
        (c.tensor_crc32.get(&e.key) != Some(&crc32fast::hash(&bytes))).then(|| e.key.clone())
    })
}

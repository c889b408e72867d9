//! Unlabeled images in the formats users have, decoded on CPU threads ahead of inference.
//!
//! A [`Source`] is the IDX training set minus the labeled images, a folder of PNG/JPEG files, or
//! WebDataset tar shards. It is cut into label shards ([`Source::shards`]): ranges of examples
//! for IDX and folders, one tar file per shard for WebDataset. Example ids, which soft labels
//! carry and the student's loader looks up, are the training-set position (IDX), the index in
//! the sorted file list (folder), or `tar_index << 32 | sample_index` (WebDataset).
//!
//! [`Source::decode`] runs a pipeline: one reader thread lists or reads the encoded images, a pool
//! of decode threads turns batches of them into pixels of the labeled data's geometry
//! (channels-first u8), and the caller receives the batches in order, up to `prefetch` of them
//! decoded ahead.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use mentor_plan::{DataPlan, PseudoLabelPlan, UnlabeledFormat};

use crate::{DataError, ImageSet};

/// The size every decoded image is converted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl Geometry {
    pub fn pixels(&self) -> usize {
        self.channels * self.height * self.width
    }
}

/// Decoded images: `example_ids.len()` images of [`Geometry::pixels`] bytes each, channels first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub example_ids: Vec<i64>,
    pub pixels: Vec<u8>,
    /// Rows whose image did not decode, with why, under [`DecodeOptions::skip_undecodable`]
    /// (their pixels are zeros).
    pub undecodable: Vec<(usize, String)>,
}

/// Pipeline settings.
#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    pub batch_size: usize,
    /// Decode threads (at least 1).
    pub threads: usize,
    /// Decoded batches waiting for the consumer, at most.
    pub prefetch: usize,
    /// An image file or tar member that does not decode (truncated, not an image) becomes a
    /// row of zeros listed in [`Batch::undecodable`] instead of an error: one bad file among
    /// a million need not fail a labeling shard. Reading errors stay errors.
    pub skip_undecodable: bool,
}

/// Decode threads for `pseudo_labels.decode_threads`: 0 means one per core, leaving one for
/// inference.
pub fn decode_threads(setting: u32) -> usize {
    match setting {
        0 => std::thread::available_parallelism()
            .map(|n| n.get().saturating_sub(1))
            .unwrap_or(1)
            .max(1),
        threads => threads as usize,
    }
}

impl DecodeOptions {
    /// The plan's decode settings for batches of `batch_size`.
    pub fn from_plan(labels: &PseudoLabelPlan, batch_size: usize) -> DecodeOptions {
        DecodeOptions {
            batch_size,
            threads: decode_threads(labels.decode_threads),
            prefetch: labels.prefetch_batches as usize,
            skip_undecodable: false,
        }
    }
}

/// Where unlabeled images come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Training-set positions (ascending) of the unlabeled IDX images; `images` is loaded only
    /// by those who decode.
    Idx {
        positions: Vec<u32>,
        images: Option<Arc<ImageSet>>,
    },
    /// Image files, sorted by path.
    Folder { files: Vec<PathBuf> },
    /// Tar files, sorted by path.
    Webdataset { tars: Vec<PathBuf> },
}

const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// An image file by its extension; hidden files (`._x.jpg`, the resource forks macOS leaves
/// on other file systems) are not, as in WebDataset tars.
fn is_image(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .is_some_and(|name| name.to_string_lossy().starts_with('.'));
    !hidden
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn read_error(path: &Path, error: std::io::Error) -> DataError {
    DataError::Read {
        path: path.to_path_buf(),
        error,
    }
}

/// The files under `dir` that `keep` takes, searched recursively. Hidden folders
/// (`.ipynb_checkpoints`, `.git`: copies and history, not the data set) are not searched; a
/// link back to a folder being searched (a loop) is not followed.
fn walk(dir: &Path, keep: &dyn Fn(&Path) -> bool, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    walk_below(dir, keep, out, &mut Vec::new())
}

/// `ancestors`: the real paths of the folders being searched, `dir`'s parents.
fn walk_below(
    dir: &Path,
    keep: &dyn Fn(&Path) -> bool,
    out: &mut Vec<PathBuf>,
    ancestors: &mut Vec<PathBuf>,
) -> Result<(), DataError> {
    let real = dir.canonicalize().map_err(|e| read_error(dir, e))?;
    if ancestors.contains(&real) {
        return Ok(());
    }
    ancestors.push(real);
    let entries = std::fs::read_dir(dir).map_err(|e| read_error(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| read_error(dir, e))?.path();
        if path.is_dir() {
            let hidden = path
                .file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with('.'));
            if !hidden {
                walk_below(&path, keep, out, ancestors)?;
            }
        } else if keep(&path) {
            out.push(path);
        }
    }
    ancestors.pop();
    Ok(())
}

impl Source {
    /// The unlabeled source of a plan. `split_unlabeled` is the split's unlabeled positions
    /// (used for `idx`).
    pub fn open(data: &DataPlan, split_unlabeled: &[u32]) -> Result<Source, DataError> {
        let path = data.unlabeled.path.clone().unwrap_or_default();
        match data.unlabeled.format {
            UnlabeledFormat::Idx if split_unlabeled.is_empty() => Err(DataError::Invalid(format!(
                "none: data.labeled_per_class x data.classes ({} x {}) takes every training image; lower data.labeled_per_class, or name other images in [data.unlabeled]",
                data.labeled_per_class, data.classes
            ))),
            UnlabeledFormat::Idx => Ok(Source::Idx {
                positions: split_unlabeled.to_vec(),
                images: None,
            }),
            UnlabeledFormat::ImageFolder | UnlabeledFormat::Webdataset if !path.exists() => {
                Err(DataError::Unlabeled {
                    path,
                    reason: "does not exist".into(),
                })
            }
            UnlabeledFormat::ImageFolder if !path.is_dir() => Err(DataError::Unlabeled {
                path,
                reason: "is not a folder (format `image-folder` searches a folder for images)"
                    .into(),
            }),
            UnlabeledFormat::ImageFolder => {
                let mut files = Vec::new();
                walk(&path, &is_image, &mut files)?;
                files.sort();
                if data.unlabeled_limit > 0 {
                    files.truncate(data.unlabeled_limit as usize);
                }
                if files.is_empty() {
                    return Err(DataError::Unlabeled {
                        path,
                        reason: "no .png, .jpg or .jpeg file in this folder".into(),
                    });
                }
                Ok(Source::Folder { files })
            }
            UnlabeledFormat::Webdataset => {
                let mut tars = Vec::new();
                let is_tar = |p: &Path| p.extension().is_some_and(|e| e == "tar");
                if path.is_file() {
                    // Found at labeling time otherwise, after the teacher's training.
                    if !is_tar(&path) {
                        return Err(DataError::Unlabeled {
                            path,
                            reason: "is not a .tar file (WebDataset shards are uncompressed tar files: name a .tar file or a folder of them)".into(),
                        });
                    }
                    tars.push(path.clone());
                } else {
                    walk(&path, &is_tar, &mut tars)?;
                    tars.sort();
                }
                if tars.is_empty() {
                    return Err(DataError::Unlabeled {
                        path,
                        reason: "no .tar file here".into(),
                    });
                }
                Ok(Source::Webdataset { tars })
            }
        }
    }

    /// Gives an IDX source the training images it decodes from.
    pub fn with_images(self, images: Arc<ImageSet>) -> Source {
        match self {
            Source::Idx { positions, .. } => Source::Idx {
                positions,
                images: Some(images),
            },
            other => other,
        }
    }

    pub fn format(&self) -> UnlabeledFormat {
        match self {
            Source::Idx { .. } => UnlabeledFormat::Idx,
            Source::Folder { .. } => UnlabeledFormat::ImageFolder,
            Source::Webdataset { .. } => UnlabeledFormat::Webdataset,
        }
    }

    /// Units the shards are cut from: examples (IDX, folder) or tar files (WebDataset).
    pub fn units(&self) -> u64 {
        match self {
            Source::Idx { positions, .. } => positions.len() as u64,
            Source::Folder { files, .. } => files.len() as u64,
            Source::Webdataset { tars } => tars.len() as u64,
        }
    }

    /// Label shards as `[start, end)` ranges of [`Source::units`].
    pub fn shards(&self, shard_size: u64) -> Vec<(u64, u64)> {
        match self {
            Source::Webdataset { tars } => (0..tars.len() as u64).map(|i| (i, i + 1)).collect(),
            _ => crate::shard_ranges(self.units(), shard_size),
        }
    }

    /// What example ids mean: the listing they are positions in. Coordinator and workers list a
    /// folder or a WebDataset directory apart, and again on resume; a file added, removed or
    /// renamed in between shifts every id after it, so that soft labels would name other
    /// images. Equal fingerprints, equal listings. Paths count relative to `data.unlabeled.path`
    /// (a run may move with its data); tar files count their sizes too. IDX examples count
    /// their positions in the training images, which the split draws from the labels: another
    /// data set of the same size in `data.dir` (other labels) lists other positions.
    pub fn fingerprint(&self, data: &DataPlan) -> String {
        let root = data.unlabeled.path.clone().unwrap_or_default();
        // FNV-1a, 64 bits: stable across builds and machines (std's hasher is not).
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for &byte in bytes {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
            // A separator, so that ("ab", "c") and ("a", "bc") differ.
            hash ^= 0xff;
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        };
        let relative = |path: &Path| -> String {
            let inside = path.strip_prefix(&root).unwrap_or(path);
            match inside.as_os_str().is_empty() {
                true => path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                false => inside.to_string_lossy().into_owned(),
            }
        };
        match self {
            Source::Idx { positions, .. } => {
                let bytes: Vec<u8> = positions.iter().flat_map(|p| p.to_le_bytes()).collect();
                feed(&bytes);
                format!("idx:{}:{hash:016x}", positions.len())
            }
            Source::Folder { files } => {
                for file in files {
                    feed(relative(file).as_bytes());
                }
                format!("image-folder:{}:{hash:016x}", files.len())
            }
            Source::Webdataset { tars } => {
                for tar in tars {
                    feed(relative(tar).as_bytes());
                    let size = std::fs::metadata(tar).map_or(u64::MAX, |m| m.len());
                    feed(&size.to_le_bytes());
                }
                format!("webdataset:{}:{hash:016x}", tars.len())
            }
        }
    }

    /// Whether two fingerprints name the same listing: equal, or one of them made by a version
    /// that gave IDX data its count alone and the other of the same count.
    pub fn same_fingerprint(one: &str, other: &str) -> bool {
        let count_alone = |a: &str| a.starts_with("idx:") && a.matches(':').count() == 1;
        let extends =
            |short: &str, long: &str| count_alone(short) && long.starts_with(&format!("{short}:"));
        one == other || extends(one, other) || extends(other, one)
    }

    /// Examples of the source when known without reading it (not for WebDataset).
    pub fn known_examples(&self) -> Option<u64> {
        match self {
            Source::Webdataset { .. } => None,
            _ => Some(self.units()),
        }
    }

    fn check_range(&self, start: u64, end: u64) -> Result<(), DataError> {
        if start > end || end > self.units() {
            return Err(DataError::Invalid(format!(
                "shard range [{start}, {end}) is outside the {} units of the {} data",
                self.units(),
                self.format().as_str()
            )));
        }
        Ok(())
    }

    /// Decodes the shard `[start, end)` in batches, in order.
    pub fn decode(
        &self,
        start: u64,
        end: u64,
        geometry: Geometry,
        options: DecodeOptions,
    ) -> Result<Batches, DataError> {
        self.check_range(start, end)?;
        let skip_undecodable = options.skip_undecodable;
        let items: ItemIter = match self {
            Source::Idx { positions, images } => {
                let images = idx_images(images)?;
                let positions = positions[start as usize..end as usize].to_vec();
                Box::new(positions.into_iter().map(move |position| {
                    Ok((
                        position as i64,
                        Encoded::Idx(images.clone(), position as usize),
                    ))
                }))
            }
            Source::Folder { files, .. } => {
                let files = files[start as usize..end as usize].to_vec();
                Box::new(
                    files
                        .into_iter()
                        .enumerate()
                        .map(move |(i, path)| Ok(((start + i as u64) as i64, Encoded::File(path)))),
                )
            }
            Source::Webdataset { tars } => {
                let selected: Vec<(usize, PathBuf)> = (start..end)
                    .map(|i| (i as usize, tars[i as usize].clone()))
                    .collect();
                Box::new(selected.into_iter().flat_map(move |(index, path)| {
                    tar_samples(index, path, None, skip_undecodable)
                }))
            }
        };
        Batches::start(items, geometry, options)
    }

    /// Decodes the examples `ids` (any order; returned in ascending id order, each once).
    pub fn decode_ids(
        &self,
        ids: &[i64],
        geometry: Geometry,
        options: DecodeOptions,
    ) -> Result<Batches, DataError> {
        let mut wanted: Vec<i64> = ids.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        let unknown = |id: i64| {
            DataError::Invalid(format!(
                "example id {id} is not in the unlabeled {} data",
                self.format().as_str()
            ))
        };
        let skip_undecodable = options.skip_undecodable;
        let items: ItemIter = match self {
            Source::Idx { images, .. } => {
                let images = idx_images(images)?;
                if let Some(&id) = wanted
                    .iter()
                    .find(|&&id| id < 0 || id as usize >= images.len())
                {
                    return Err(unknown(id));
                }
                Box::new(
                    wanted
                        .into_iter()
                        .map(move |id| Ok((id, Encoded::Idx(images.clone(), id as usize)))),
                )
            }
            Source::Folder { files, .. } => {
                if let Some(&id) = wanted
                    .iter()
                    .find(|&&id| id < 0 || id as usize >= files.len())
                {
                    return Err(unknown(id));
                }
                let files: Vec<PathBuf> = wanted
                    .iter()
                    .map(|&id| files[id as usize].clone())
                    .collect();
                Box::new(
                    wanted
                        .into_iter()
                        .zip(files)
                        .map(|(id, path)| Ok((id, Encoded::File(path)))),
                )
            }
            Source::Webdataset { tars } => {
                let mut by_tar: BTreeMap<usize, HashSet<u32>> = BTreeMap::new();
                for &id in &wanted {
                    let tar = (id >> 32) as usize;
                    if id < 0 || tar >= tars.len() {
                        return Err(unknown(id));
                    }
                    by_tar.entry(tar).or_default().insert(id as u32);
                }
                let selected: Vec<(usize, PathBuf, HashSet<u32>)> = by_tar
                    .into_iter()
                    .map(|(tar, samples)| (tar, tars[tar].clone(), samples))
                    .collect();
                Box::new(
                    selected
                        .into_iter()
                        .flat_map(move |(index, path, samples)| {
                            tar_samples(index, path, Some(samples), skip_undecodable)
                        }),
                )
            }
        };
        Batches::start(items, geometry, options)
    }
}

fn idx_images(images: &Option<Arc<ImageSet>>) -> Result<Arc<ImageSet>, DataError> {
    images
        .clone()
        .ok_or_else(|| DataError::Invalid("the IDX source was opened without its images".into()))
}

/// An image before decoding.
enum Encoded {
    Idx(Arc<ImageSet>, usize),
    File(PathBuf),
    /// Bytes of a tar member, named `tar:member` in errors.
    Bytes {
        name: String,
        bytes: Vec<u8>,
    },
}

type Item = Result<(i64, Encoded), DataError>;
type ItemIter = Box<dyn Iterator<Item = Item> + Send>;

/// Encoded samples of a tar read ahead of the decoders: the reader waits when this many are
/// queued, so a worker holds a few dozen images of a tar at a time, not the whole tar (a
/// WebDataset shard is commonly a gigabyte).
const TAR_READ_AHEAD: usize = 64;

/// The samples of one WebDataset tar, in order (all of them, or the `wanted` sample indices):
/// `key.{jpg,jpeg,png}` with an optional `key.cls` (and other members) next to it. The tar is
/// read sequentially, on a thread of its own, once the pipeline's reader reaches it, and at most
/// [`TAR_READ_AHEAD`] samples ahead of it; a tar that cannot be read ends with an error item.
fn tar_samples(
    tar_index: usize,
    path: PathBuf,
    mut wanted: Option<HashSet<u32>>,
    skip_undecodable: bool,
) -> impl Iterator<Item = Item> {
    type Reader = (
        std::sync::mpsc::IntoIter<Item>,
        Option<std::thread::JoinHandle<()>>,
    );
    let mut started: Option<Reader> = None;
    std::iter::from_fn(move || {
        let (receiver, thread) = started.get_or_insert_with(|| {
            let (sender, receiver) = std::sync::mpsc::sync_channel(TAR_READ_AHEAD);
            let (path, wanted) = (path.clone(), wanted.take());
            let thread = std::thread::spawn(move || {
                // A send fails once the pipeline stopped reading: the reading stops too.
                let mut emit = |item: Item| sender.send(item).is_ok();
                let read = read_tar(
                    tar_index,
                    &path,
                    wanted.as_ref(),
                    skip_undecodable,
                    &mut emit,
                );
                if let Err(error) = read {
                    emit(Err(error));
                }
            });
            (receiver.into_iter(), Some(thread))
        });
        receiver.next().or_else(|| {
            // The channel closed: the tar ended, or its reader died, which is no end.
            let panicked = thread.take().is_some_and(|thread| thread.join().is_err());
            panicked.then(|| {
                Err(DataError::Unlabeled {
                    path: path.clone(),
                    reason: "the thread reading this tar failed before its end".into(),
                })
            })
        })
    })
}

/// Reads a tar's samples and gives each to `emit`, in order, until `emit` answers `false` (no
/// one reads them any more).
///
/// A tar cut short (a download that stopped, a copy that ran out of disk) is an error naming
/// it, or under `skip_undecodable` (labeling) the end of its samples, with a warning: the
/// samples before the cut are labeled (the one it cut too if its image is whole), those after
/// are not. A sample's id is its position in its own tar, so no other sample's id moves; a
/// read of given samples (`wanted`, the student's) that finds them all before the cut is no
/// error.
fn read_tar(
    tar_index: usize,
    path: &Path,
    wanted: Option<&HashSet<u32>>,
    skip_undecodable: bool,
    emit: &mut dyn FnMut(Item) -> bool,
) -> Result<(), DataError> {
    let corrupt = |reason: String| DataError::Unlabeled {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| read_error(path, e))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let mut current_key: Option<String> = None;
    let mut current_image = SampleImages::default();
    // Samples finished so far (the next one's index), and those of them emitted.
    let sample_index = std::cell::Cell::new(0u32);
    let emitted = std::cell::Cell::new(0usize);
    let is_wanted = |index: u32| wanted.is_none_or(|w| w.contains(&index));
    // `Ok(false)`: nobody reads any more.
    let mut finish = |key: Option<String>, images: SampleImages| -> Result<bool, DataError> {
        let Some(key) = key else { return Ok(true) };
        let index = sample_index.get();
        sample_index.set(index + 1);
        if is_wanted(index) {
            let (name, bytes) = images.the_image(&key, path).map_err(corrupt)?;
            emitted.set(emitted.get() + 1);
            let id = ((tar_index as i64) << 32) | index as i64;
            return Ok(emit(Ok((id, Encoded::Bytes { name, bytes }))));
        }
        Ok(true)
    };
    // Reading stops once every wanted sample is out (the student's loader wants a few of a
    // tar's samples), and the images of samples not wanted are not read.
    let all_out = || wanted.is_some_and(|w| emitted.get() == w.len());
    let mut current_wanted = is_wanted(0);
    // Why the tar ended before its end, if it did.
    let mut cut: Option<String> = None;
    let entries = archive
        .entries()
        .map_err(|e| corrupt(format!("not a tar file ({e})")))?;
    for entry in entries {
        let mut entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                cut = Some(format!("unreadable tar entry ({e})"));
                break;
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let member = entry
            .path()
            .map_err(|e| corrupt(format!("bad member name ({e})")))?
            .to_string_lossy()
            .into_owned();
        // WebDataset: the key is the member path up to the first dot of its file name.
        let (directory, file_name) = member.rsplit_once('/').unwrap_or(("", &member));
        // Hidden files (`._000.jpg`, the resource forks macOS's tar adds) are no samples.
        if file_name.starts_with('.') {
            continue;
        }
        let Some((stem, extension)) = file_name.split_once('.') else {
            continue;
        };
        let key = if directory.is_empty() {
            stem.to_string()
        } else {
            format!("{directory}/{stem}")
        };
        if current_key.as_deref() != Some(key.as_str()) {
            if !finish(current_key.take(), std::mem::take(&mut current_image))? || all_out() {
                return Ok(());
            }
            current_key = Some(key);
            current_wanted = is_wanted(sample_index.get());
        }
        if !current_wanted {
            continue;
        }
        // `key.left.png`: the field is `left.png`, an image by its last suffix.
        let suffix = extension.rsplit('.').next().unwrap_or(extension);
        if IMAGE_EXTENSIONS.contains(&suffix.to_ascii_lowercase().as_str()) {
            // A sample's other images (`key.seg.png`, `key.depth.png`) are read only while it
            // has no plain one (`key.jpg`, `key.png`): the plain one is the sample's image.
            let plain = !extension.contains('.');
            if current_image.plain.is_some() && !plain {
                continue;
            }
            // The header's size is only a hint: a damaged one must not allocate the memory away.
            let size = entry.size();
            let mut bytes = Vec::with_capacity(size.min(64 << 20) as usize);
            // A member the file ends inside reads short, without an error.
            match entry.read_to_end(&mut bytes) {
                Ok(read) if read as u64 == size => {}
                Ok(read) => {
                    cut = Some(format!(
                        "member `{member}` is cut short: {read} of its {size} bytes"
                    ));
                    break;
                }
                Err(e) => {
                    cut = Some(format!("member `{member}` is unreadable ({e})"));
                    break;
                }
            }
            current_image.add(member, bytes, plain).map_err(corrupt)?;
        }
    }
    let Some(reason) = cut else {
        finish(current_key.take(), current_image)?;
        return Ok(());
    };
    // The sample the cut fell in counts if its image was read whole (a cut inside its image
    // leaves it none).
    if current_image.plain.is_some() || !current_image.others.is_empty() {
        finish(current_key.take(), current_image)?;
    }
    if skip_undecodable {
        tracing::warn!(
            tar = %path.display(),
            samples = sample_index.get(),
            reason,
            "a tar is cut short: its samples after these are not labeled (a run under way cannot take a repaired tar, the run records each tar's size: repair it for a new run)"
        );
        Ok(())
    } else if all_out() {
        // Every sample asked for (those labeled: before the cut) was read.
        Ok(())
    } else {
        Err(corrupt(reason))
    }
}

/// The image members of one WebDataset sample read so far, by member name: the plain one
/// (`key.jpg`, `key.png`), else the others (`key.left.png`).
#[derive(Default)]
struct SampleImages {
    plain: Option<(String, Vec<u8>)>,
    others: Vec<(String, Vec<u8>)>,
}

impl SampleImages {
    fn add(&mut self, member: String, bytes: Vec<u8>, plain: bool) -> Result<(), String> {
        if plain {
            if let Some((first, _)) = &self.plain {
                return Err(format!(
                    "sample has two images, `{first}` and `{member}`: which one to label is not known; keep one per sample (other fields as `key.NAME.png`)"
                ));
            }
            self.plain = Some((member, bytes));
            self.others.clear();
        } else {
            self.others.push((member, bytes));
        }
        Ok(())
    }

    /// The sample's image, its plain one else its only other one, named `tar:member`.
    fn the_image(mut self, key: &str, tar: &Path) -> Result<(String, Vec<u8>), String> {
        let (member, bytes) = match (self.plain, self.others.len()) {
            (Some(plain), _) => plain,
            (None, 1) => self.others.remove(0),
            (None, 0) => return Err(format!("sample `{key}` has no .jpg, .jpeg or .png member")),
            (None, _) => {
                let members: Vec<&str> = self.others.iter().map(|(m, _)| m.as_str()).collect();
                return Err(format!(
                    "sample `{key}` has several images ({}) and none is its plain `{key}.jpg`, `.jpeg` or `.png`: which one to label is not known",
                    members.join(", ")
                ));
            }
        };
        Ok((format!("{}:{member}", tar.display()), bytes))
    }
}

/// What to do about an image file that does not decode (a folder's listing records names, not
/// sizes).
const REPLACE_IN_PLACE: &str = "replace it in place with a decodable image (a blank one will do): removing it would change the ids of the images after it, which a run under way refuses";

/// What to do about a tar member that does not decode (a WebDataset listing records each
/// tar's size: a repaired tar is another listing).
const REPAIR_FOR_A_NEW_RUN: &str = "a run under way cannot take a repaired tar (the run records each tar's size): repair it for a new run";

/// [`decode_one_unguarded`], a panic of the image decoder (a malformed file can make one
/// panic) turned into an error naming the image.
fn decode_one(encoded: Encoded, geometry: Geometry, out: &mut Vec<u8>) -> Result<(), DataError> {
    let name = match &encoded {
        Encoded::Idx(_, position) => format!("IDX image {position}"),
        Encoded::File(path) => path.display().to_string(),
        Encoded::Bytes { name, .. } => name.clone(),
    };
    let advice = match &encoded {
        Encoded::Bytes { .. } => REPAIR_FOR_A_NEW_RUN,
        _ => REPLACE_IN_PLACE,
    };
    guarded(name, advice, || {
        decode_one_unguarded(encoded, geometry, out)
    })
}

/// `decode`, its panic turned into an error naming the image `name`, with `advice`.
fn guarded(
    name: String,
    advice: &str,
    decode: impl FnOnce() -> Result<(), DataError>,
) -> Result<(), DataError> {
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode));
    decoded.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(DataError::Unlabeled {
            path: PathBuf::from(name),
            reason: format!("the image decoder failed on it ({what}); {advice}"),
        })
    })
}

fn decode_one_unguarded(
    encoded: Encoded,
    geometry: Geometry,
    out: &mut Vec<u8>,
) -> Result<(), DataError> {
    let image = match encoded {
        Encoded::Idx(images, position) => {
            let size = images.image_size();
            let pixels = &images.pixels[position * size..(position + 1) * size];
            if geometry.channels == 1
                && images.rows == geometry.height
                && images.cols == geometry.width
            {
                out.extend_from_slice(pixels);
                return Ok(());
            }
            let gray =
                image::GrayImage::from_raw(images.cols as u32, images.rows as u32, pixels.to_vec())
                    .ok_or_else(|| {
                        DataError::Invalid(format!("IDX image {position} has the wrong size"))
                    })?;
            image::DynamicImage::ImageLuma8(gray)
        }
        Encoded::File(path) => {
            let bytes = std::fs::read(&path).map_err(|e| read_error(&path, e))?;
            let image = image::load_from_memory(&bytes).map_err(|e| DataError::Unlabeled {
                path: path.clone(),
                reason: format!("not a decodable image ({e}); {REPLACE_IN_PLACE}"),
            })?;
            image
        }
        Encoded::Bytes { name, bytes } => {
            let image = image::load_from_memory(&bytes).map_err(|e| DataError::Unlabeled {
                path: PathBuf::from(&name),
                reason: format!("not a decodable image ({e}); {REPAIR_FOR_A_NEW_RUN}"),
            })?;
            image
        }
    };
    let (width, height) = (geometry.width as u32, geometry.height as u32);
    let resize = |image: image::DynamicImage| {
        if image.width() == width && image.height() == height {
            image
        } else {
            image.resize_exact(width, height, image::imageops::FilterType::Triangle)
        }
    };
    if geometry.channels == 1 {
        out.extend_from_slice(resize(image).to_luma8().as_raw());
    } else {
        let rgb = resize(image).to_rgb8();
        let plane = geometry.height * geometry.width;
        let raw = rgb.as_raw();
        for channel in 0..3 {
            out.extend((0..plane).map(|i| raw[i * 3 + channel]));
        }
    }
    Ok(())
}

type Job = (usize, Vec<(i64, Encoded)>);
type Done = (usize, Result<Batch, DataError>);

/// Decoded batches, in order; stops after the first error.
pub struct Batches {
    results: Receiver<Done>,
    /// How many batches the shard has, sent by the reading thread once it read the whole range:
    /// the stream ends there, and nowhere else (a thread that stopped early is an error).
    total: Receiver<usize>,
    pending: BTreeMap<usize, Result<Batch, DataError>>,
    next: usize,
    failed: bool,
    /// One permit back to the reading thread per batch delivered: no more than
    /// `prefetch + threads` batches are read and not yet delivered, however long one of them
    /// takes to decode (the others, decoded meanwhile, wait in `pending`).
    permits: SyncSender<()>,
}

impl std::fmt::Debug for Batches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batches").field("next", &self.next).finish()
    }
}

impl Batches {
    fn start(
        items: ItemIter,
        geometry: Geometry,
        options: DecodeOptions,
    ) -> Result<Batches, DataError> {
        let no_thread = |error: std::io::Error| {
            DataError::Invalid(format!("failed to start a thread: {error}"))
        };
        let threads = options.threads.max(1);
        let prefetch = options.prefetch.max(1);
        let skip_undecodable = options.skip_undecodable;
        let batch_size = options.batch_size.max(1);
        let (job_sender, job_receiver) = std::sync::mpsc::sync_channel::<Job>(prefetch);
        let (done_sender, done_receiver) = std::sync::mpsc::sync_channel::<Done>(prefetch);
        let (total_sender, total_receiver) = std::sync::mpsc::channel::<usize>();
        let job_receiver = Arc::new(Mutex::new(job_receiver));
        let window = prefetch + threads;
        let (permit_sender, permit_receiver) = std::sync::mpsc::sync_channel::<()>(window);
        for _ in 0..window {
            let _ = permit_sender.try_send(());
        }
        std::thread::Builder::new()
            .name("mentor-read".into())
            .spawn({
                let done = done_sender.clone();
                move || {
                    read_items(
                        items,
                        batch_size,
                        job_sender,
                        done,
                        total_sender,
                        permit_receiver,
                    )
                }
            })
            .map_err(no_thread)?;
        for index in 0..threads {
            let jobs = job_receiver.clone();
            let done = done_sender.clone();
            std::thread::Builder::new()
                .name(format!("mentor-decode-{index}"))
                .spawn(move || decode_jobs(jobs, done, geometry, skip_undecodable))
                .map_err(no_thread)?;
        }
        Ok(Batches {
            results: done_receiver,
            total: total_receiver,
            pending: BTreeMap::new(),
            next: 0,
            failed: false,
            permits: permit_sender,
        })
    }
}

fn read_items(
    items: ItemIter,
    batch_size: usize,
    jobs: SyncSender<Job>,
    done: SyncSender<Done>,
    total: std::sync::mpsc::Sender<usize>,
    permits: Receiver<()>,
) {
    let mut batch = Vec::with_capacity(batch_size);
    let mut sequence = 0;
    // A batch is sent once the consumer has room for it (`Batches::permits`); `false` when
    // nobody reads any more.
    let send = |sequence: usize, batch: Vec<(i64, Encoded)>| {
        permits.recv().is_ok() && jobs.send((sequence, batch)).is_ok()
    };
    for item in items {
        match item {
            Ok(item) => batch.push(item),
            Err(error) => {
                // Everything before the error still arrives first: the error takes the next slot.
                if !batch.is_empty() {
                    if !send(sequence, std::mem::take(&mut batch)) {
                        return;
                    }
                    sequence += 1;
                }
                let _ = done.send((sequence, Err(error)));
                return;
            }
        }
        if batch.len() == batch_size {
            if !send(sequence, std::mem::take(&mut batch)) {
                return;
            }
            sequence += 1;
        }
    }
    if !batch.is_empty() {
        if !send(sequence, batch) {
            return;
        }
        sequence += 1;
    }
    let _ = total.send(sequence);
}

fn decode_jobs(
    jobs: Arc<Mutex<Receiver<Job>>>,
    done: SyncSender<Done>,
    geometry: Geometry,
    skip_undecodable: bool,
) {
    loop {
        let job = {
            // A poisoned lock (a decoder that panicked holding it, which `recv` does not) still
            // guards an intact queue: a decoder that stopped here would leave its batches
            // undelivered and the reader waiting on their permits.
            let receiver = jobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            receiver.recv()
        };
        let Ok((sequence, items)) = job else { return };
        let mut batch = Batch {
            example_ids: Vec::with_capacity(items.len()),
            pixels: Vec::with_capacity(items.len() * geometry.pixels()),
            undecodable: Vec::new(),
        };
        let mut result = Ok(());
        for (id, encoded) in items {
            let row = batch.example_ids.len();
            batch.example_ids.push(id);
            let skippable = skip_undecodable && !matches!(encoded, Encoded::Idx(..));
            match decode_one(encoded, geometry, &mut batch.pixels) {
                Ok(()) => {}
                // Not decodable (a read that failed is a `DataError::Read`, and stays one).
                Err(DataError::Unlabeled { path, reason }) if skippable => {
                    batch.pixels.truncate(row * geometry.pixels());
                    batch.pixels.resize((row + 1) * geometry.pixels(), 0);
                    batch
                        .undecodable
                        .push((row, format!("{}: {reason}", path.display())));
                }
                Err(error) => {
                    result = Err(error);
                    break;
                }
            }
        }
        if done.send((sequence, result.map(|()| batch))).is_err() {
            return;
        }
    }
}

impl Iterator for Batches {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            if let Some(result) = self.pending.remove(&self.next) {
                self.next += 1;
                self.failed = result.is_err();
                let _ = self.permits.try_send(());
                return Some(result);
            }
            match self.results.recv() {
                Ok((sequence, result)) => {
                    self.pending.insert(sequence, result);
                }
                // Every thread is gone. The shard ended if the reading thread said so and every
                // batch came; otherwise a batch never arrived (its thread ended without sending
                // it, or an error's slot comes after it).
                Err(_) => {
                    self.failed = true;
                    let first = self.pending.keys().next().copied();
                    if first.is_none() && self.total.try_recv() == Ok(self.next) {
                        return None;
                    }
                    if let Some(Err(error)) = first.and_then(|first| self.pending.remove(&first)) {
                        return Some(Err(error));
                    }
                    return Some(Err(DataError::Invalid(format!(
                        "batch {} of the shard was never decoded (a reading or decoding thread ended early)",
                        self.next
                    ))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;

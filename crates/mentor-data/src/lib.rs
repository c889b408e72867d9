//! Data sets and the split a plan asks for.
//!
//! Reads IDX files (the MNIST / Fashion-MNIST layout, gzip-compressed or not) into plain byte
//! buffers and derives the deterministic labeled / unlabeled / test split from the plan's seed.
//! Coordinator and workers compute the same split independently, so example ids (positions in
//! the training file) agree everywhere. This crate knows nothing of tensors or the network.

mod unlabeled;

pub use unlabeled::{decode_threads, Batch, Batches, DecodeOptions, Geometry, Source};

use std::io::Read;
use std::path::{Path, PathBuf};

use mentor_plan::DataPlan;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Why a data set could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("failed to read `{path}`: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("data file not found: neither `{path}.gz` nor `{path}` exists (install the data set, e.g. `apt-get install dataset-fashion-mnist`)")]
    Missing { path: PathBuf },
    #[error("`{path}` is not a valid IDX file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("unlabeled data (data.unlabeled.path) `{path}`: {reason}")]
    Unlabeled { path: PathBuf, reason: String },
    #[error("unlabeled data: {0}")]
    Invalid(String),
    #[error("the {set} set has images labeled {label}, but data.classes = {classes} (labels 0 to {last} are expected)", last = classes.saturating_sub(1))]
    LabelOutOfRange {
        set: &'static str,
        label: u8,
        classes: u32,
    },
    #[error("the test images are {test}, the training images {train}: they must be the same size")]
    SizeMismatch { test: String, train: String },
    #[error("data.labeled_per_class = {wanted}, but the training set has only {found} images of class {class} (data.classes = {classes}: classes 0 to {last} are expected)", last = classes.saturating_sub(1))]
    NotEnoughLabeled {
        class: u32,
        found: u32,
        wanted: u32,
        classes: u32,
    },
}

/// Images (u8 pixels, row-major) with their labels.
#[derive(Debug, Clone)]
pub struct ImageSet {
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
    pub rows: usize,
    pub cols: usize,
}

impl ImageSet {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image_size(&self) -> usize {
        self.rows * self.cols
    }

    /// Loads `{prefix}-images-idx3-ubyte(.gz)` and `{prefix}-labels-idx1-ubyte(.gz)`.
    pub fn load(dir: &Path, prefix: &str) -> Result<ImageSet, DataError> {
        let (labels, _) = read_idx(&dir.join(format!("{prefix}-labels-idx1-ubyte")), 1)?;
        let (pixels, dims) = read_idx(&dir.join(format!("{prefix}-images-idx3-ubyte")), 3)?;
        check_images(
            &dir.join(format!("{prefix}-images-idx3-ubyte")),
            &dims,
            labels.len(),
        )?;
        Ok(ImageSet {
            pixels,
            labels,
            rows: dims[1],
            cols: dims[2],
        })
    }
}

/// What a run reads of a plan's data: both sets of `data.dir`, the split of the seed and the
/// unlabeled source, checked against each other and the plan.
#[derive(Debug)]
pub struct PlanData {
    pub train: ImageSet,
    pub test: ImageSet,
    pub split: Split,
    pub unlabeled: Source,
}

impl PlanData {
    /// Loads and checks the data of a plan (`data`, `seed`): what a worker does first, and
    /// `mentor plan` does to check a plan.
    pub fn load(data: &DataPlan, seed: u64) -> Result<PlanData, DataError> {
        let train = ImageSet::load(&data.dir, "train")?;
        let test = ImageSet::load(&data.dir, "t10k")?;
        if (test.rows, test.cols) != (train.rows, train.cols) {
            return Err(DataError::SizeMismatch {
                test: format!("{}x{}", test.rows, test.cols),
                train: format!("{}x{}", train.rows, train.cols),
            });
        }
        let split = Split::new(&train.labels, test.len(), data, seed)?;
        check_test_labels(&test.labels[..split.test_len], data)?;
        let unlabeled = Source::open(data, &split.unlabeled)?;
        Ok(PlanData {
            train,
            test,
            split,
            unlabeled,
        })
    }
}

/// Refuses an images file whose header (`dims`: count, rows, columns) does not go with its
/// `labels` count or gives images that are not square (every model takes a side; a 28x32
/// image would fail the first task, not the start).
fn check_images(path: &Path, dims: &[usize], labels: usize) -> Result<(), DataError> {
    let format = |reason: String| DataError::Format {
        path: path.to_path_buf(),
        reason,
    };
    if dims[0] != labels {
        return Err(format(format!("{} images but {labels} labels", dims[0])));
    }
    if dims[1] != dims[2] || dims[1] == 0 {
        return Err(format(format!(
            "its images are {}x{}: square images of at least 1x1 are needed",
            dims[1], dims[2]
        )));
    }
    Ok(())
}

/// Refuses an empty test set (every accuracy would read 0%) and test labels the plan's
/// `data.classes` does not cover (every test image evaluated needs an output of the model);
/// training images of other classes can only be unlabeled.
fn check_test_labels(test_labels: &[u8], data: &DataPlan) -> Result<(), DataError> {
    if test_labels.is_empty() {
        return Err(DataError::Format {
            path: data.dir.join("t10k-labels-idx1-ubyte"),
            reason: "the test set has no image".into(),
        });
    }
    check_labels("test", test_labels, data.classes)
}

/// Checks the four IDX files of `data.dir` against each other and the plan as
/// [`PlanData::load`] does, reading the headers and the labels but not the training images
/// (what a coordinator needs before it waits for workers, whose first task would fail on
/// them). Returns the images' side.
pub fn check_idx_files(data: &DataPlan, train_labels: &[u8]) -> Result<usize, DataError> {
    let side = |prefix: &str, labels: usize| -> Result<usize, DataError> {
        let path = data.dir.join(format!("{prefix}-images-idx3-ubyte"));
        let dims = read_idx_dims(&path, 3)?;
        check_images(&path, &dims, labels)?;
        Ok(dims[1])
    };
    let train = side("train", train_labels.len())?;
    let (test_labels, _) = read_idx(&data.dir.join("t10k-labels-idx1-ubyte"), 1)?;
    let test = side("t10k", test_labels.len())?;
    if test != train {
        return Err(DataError::SizeMismatch {
            test: format!("{test}x{test}"),
            train: format!("{train}x{train}"),
        });
    }
    check_test_labels(&test_labels[..evaluated(test_labels.len(), data)], data)?;
    Ok(train)
}

/// Refuses labels the plan's `data.classes` does not cover (a model with fewer outputs).
fn check_labels(set: &'static str, labels: &[u8], classes: u32) -> Result<(), DataError> {
    match labels.iter().max() {
        Some(&label) if u32::from(label) >= classes => Err(DataError::LabelOutOfRange {
            set,
            label,
            classes,
        }),
        _ => Ok(()),
    }
}

/// Reads the labels of the training set only (cheap: what the coordinator needs).
pub fn load_train_labels(dir: &Path) -> Result<Vec<u8>, DataError> {
    Ok(read_idx(&dir.join("train-labels-idx1-ubyte"), 1)?.0)
}

/// Reads an unsigned-byte IDX file with `rank` dimensions, from `path.gz` or `path`.
pub fn read_idx(path: &Path, rank: usize) -> Result<(Vec<u8>, Vec<usize>), DataError> {
    let (file_path, mut reader) = open_idx(path)?;
    let mut bytes = Vec::new();
    reader
        .read_to_end(&mut bytes)
        .map_err(|error| DataError::Read {
            path: file_path.clone(),
            error,
        })?;
    let dims = parse_header(&file_path, &bytes, rank)?;
    let header_len = 4 + 4 * rank;
    // A damaged header's dimensions may multiply past usize: that is no size to match.
    let expected = dims
        .iter()
        .try_fold(1usize, |size, &dim| size.checked_mul(dim));
    if expected != Some(bytes.len() - header_len) {
        let expected = expected.map_or("more than usize::MAX".to_string(), |n| n.to_string());
        return Err(DataError::Format {
            path: file_path,
            reason: format!(
                "dimensions {dims:?} need {expected} bytes of data, found {}",
                bytes.len() - header_len
            ),
        });
    }
    bytes.drain(..header_len);
    Ok((bytes, dims))
}

/// The dimensions of an IDX file, from its header alone (cheap: the coordinator's view).
pub fn read_idx_dims(path: &Path, rank: usize) -> Result<Vec<usize>, DataError> {
    let (file_path, reader) = open_idx(path)?;
    let mut header = Vec::new();
    reader
        .take(4 + 4 * rank as u64)
        .read_to_end(&mut header)
        .map_err(|error| DataError::Read {
            path: file_path.clone(),
            error,
        })?;
    parse_header(&file_path, &header, rank)
}

/// `path.gz` (decompressed as it is read) or `path`: the file found and its reader.
fn open_idx(path: &Path) -> Result<(PathBuf, Box<dyn Read>), DataError> {
    let gz = PathBuf::from(format!("{}.gz", path.display()));
    let (file_path, gzipped) = if gz.exists() {
        (gz, true)
    } else if path.exists() {
        (path.to_path_buf(), false)
    } else {
        return Err(DataError::Missing {
            path: path.to_path_buf(),
        });
    };
    let file = std::fs::File::open(&file_path).map_err(|error| DataError::Read {
        path: file_path.clone(),
        error,
    })?;
    let reader: Box<dyn Read> = if gzipped {
        Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    Ok((file_path, reader))
}

/// The dimensions an unsigned-byte IDX header of `rank` declares.
fn parse_header(path: &Path, bytes: &[u8], rank: usize) -> Result<Vec<usize>, DataError> {
    let format_error = |reason: String| DataError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let header_len = 4 + 4 * rank;
    if bytes.len() < header_len {
        return Err(format_error(format!(
            "{} bytes, shorter than its header",
            bytes.len()
        )));
    }
    if bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        return Err(format_error(
            "magic number is not an unsigned-byte IDX file".into(),
        ));
    }
    if bytes[3] as usize != rank {
        return Err(format_error(format!(
            "{} dimensions, expected {rank}",
            bytes[3]
        )));
    }
    Ok((0..rank)
        .map(|i| {
            let at = 4 + 4 * i;
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize
        })
        .collect())
}

/// The split of a plan: positions in the training set (labeled, unlabeled) and test set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Training-set positions of the labeled examples.
    pub labeled: Vec<u32>,
    /// Training-set positions of the unlabeled examples, ascending. The position in this list is
    /// what pseudo-label shards cover; the value is the example id.
    pub unlabeled: Vec<u32>,
    /// Number of test images used.
    pub test_len: usize,
}

impl Split {
    /// Draws `labeled_per_class` images of each class with the seed; the rest is unlabeled.
    pub fn new(
        train_labels: &[u8],
        test_len: usize,
        data: &DataPlan,
        seed: u64,
    ) -> Result<Split, DataError> {
        let mut order: Vec<u32> = (0..train_labels.len() as u32).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        order.shuffle(&mut rng);
        let classes = data.classes as usize;
        let mut taken = vec![0u32; classes];
        let mut is_labeled = vec![false; train_labels.len()];
        // Bounded by the images there are: the plan's product alone may ask for terabytes.
        let mut labeled =
            Vec::with_capacity((classes * data.labeled_per_class as usize).min(train_labels.len()));
        for &position in &order {
            let class = train_labels[position as usize] as usize;
            if class < classes && taken[class] < data.labeled_per_class {
                taken[class] += 1;
                is_labeled[position as usize] = true;
                labeled.push(position);
            }
        }
        for (class, &found) in taken.iter().enumerate() {
            if found < data.labeled_per_class {
                return Err(DataError::NotEnoughLabeled {
                    class: class as u32,
                    found,
                    wanted: data.labeled_per_class,
                    classes: data.classes,
                });
            }
        }
        let mut unlabeled: Vec<u32> = (0..train_labels.len() as u32)
            .filter(|&position| !is_labeled[position as usize])
            .collect();
        if data.unlabeled_limit > 0 {
            unlabeled.truncate(data.unlabeled_limit as usize);
        }
        Ok(Split {
            labeled,
            unlabeled,
            test_len: evaluated(test_len, data),
        })
    }
}

/// How many of `available` test images are evaluated: the first `data.test_limit` (0: all).
fn evaluated(available: usize, data: &DataPlan) -> usize {
    if data.test_limit > 0 {
        available.min(data.test_limit as usize)
    } else {
        available
    }
}

/// The ranges `[start, end)` of unlabeled positions covered by each shard.
pub fn shard_ranges(unlabeled: u64, shard_size: u64) -> Vec<(u64, u64)> {
    (0..unlabeled.div_ceil(shard_size))
        .map(|index| {
            let start = index * shard_size;
            (start, (start + shard_size).min(unlabeled))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Split::new(0..300 labeled i % 3, labeled_per_class 2, seed 0).labeled`.
    const GOLDEN_SPLIT_SEED_0: [u32; 6] = [228, 96, 280, 68, 283, 29];

    fn data_plan(labeled_per_class: u32, unlabeled_limit: u64) -> DataPlan {
        DataPlan {
            format: "idx".into(),
            dir: PathBuf::from("."),
            labeled_per_class,
            split_seed: None,
            unlabeled_limit,
            test_limit: 0,
            shard_size: 10,
            classes: 3,
            unlabeled: Default::default(),
        }
    }

    #[test]
    fn split_is_deterministic_balanced_and_disjoint() {
        let labels: Vec<u8> = (0..300).map(|i| (i % 3) as u8).collect();
        let plan = data_plan(5, 0);
        let split = Split::new(&labels, 100, &plan, 7).expect("split");
        assert_eq!(split, Split::new(&labels, 100, &plan, 7).expect("split"));
        assert_ne!(
            split.labeled,
            Split::new(&labels, 100, &plan, 8).expect("split").labeled
        );
        assert_eq!(split.labeled.len(), 15);
        for class in 0..3u8 {
            let count = split
                .labeled
                .iter()
                .filter(|&&p| labels[p as usize] == class)
                .count();
            assert_eq!(count, 5);
        }
        assert_eq!(split.unlabeled.len(), 285);
        assert!(split.unlabeled.iter().all(|p| !split.labeled.contains(p)));
        assert!(split.unlabeled.windows(2).all(|w| w[0] < w[1]));
    }

    /// The labeled subset of a seed is part of a run's identity (ALGORITHMS.md section 4
    /// reports every seed on the same subset): a change of the shuffle or of the generator
    /// behind it (a `rand` upgrade) would change every recorded split, and this fails.
    #[test]
    fn the_split_of_a_seed_does_not_change_between_builds() {
        let labels: Vec<u8> = (0..300).map(|i| (i % 3) as u8).collect();
        let split = Split::new(&labels, 100, &data_plan(2, 0), 0).expect("split");
        assert_eq!(split.labeled, GOLDEN_SPLIT_SEED_0);
    }

    #[test]
    fn a_huge_labeled_per_class_is_refused_not_allocated() {
        let error = Split::new(&[0, 1, 2], 0, &data_plan(u32::MAX, 0), 0).expect_err("too many");
        assert!(
            matches!(error, DataError::NotEnoughLabeled { found: 1, .. }),
            "{error}"
        );
    }

    fn write_idx(path: &Path, dims: &[u32], data: &[u8]) {
        let mut bytes = vec![0, 0, 8, dims.len() as u8];
        for dim in dims {
            bytes.extend(dim.to_be_bytes());
        }
        bytes.extend(data);
        std::fs::write(path, bytes).expect("write");
    }

    /// A data directory of `train` and `test` images of `rows` x `cols`, labels cycling over
    /// 3 classes.
    fn idx_dir(train: u32, test: u32, (rows, cols): (u32, u32)) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (prefix, count) in [("train", train), ("t10k", test)] {
            let labels: Vec<u8> = (0..count).map(|i| (i % 3) as u8).collect();
            write_idx(
                &dir.path().join(format!("{prefix}-labels-idx1-ubyte")),
                &[count],
                &labels,
            );
            write_idx(
                &dir.path().join(format!("{prefix}-images-idx3-ubyte")),
                &[count, rows, cols],
                &vec![7; (count * rows * cols) as usize],
            );
        }
        dir
    }

    /// Non-square images and an empty test set are refused when the plan's data is checked,
    /// by the workers' full load and by the coordinator's header check alike, naming the file.
    #[test]
    fn non_square_images_and_an_empty_test_set_are_refused() {
        let checks = |dir: &tempfile::TempDir| {
            let plan = DataPlan {
                dir: dir.path().to_path_buf(),
                ..data_plan(1, 0)
            };
            let labels = load_train_labels(&plan.dir).expect("labels");
            (
                PlanData::load(&plan, 0).map(|_| ()),
                check_idx_files(&plan, &labels),
            )
        };
        let good = idx_dir(12, 3, (2, 2));
        let (load, headers) = checks(&good);
        load.expect("square images");
        assert_eq!(headers.expect("square images"), 2);

        let wide = idx_dir(12, 3, (2, 3));
        let (load, headers) = checks(&wide);
        for error in [load.expect_err("2x3"), headers.expect_err("2x3")] {
            let message = error.to_string();
            assert!(
                message.contains("train-images-idx3-ubyte") && message.contains("2x3"),
                "{message}"
            );
        }

        let no_test = idx_dir(12, 0, (2, 2));
        let (load, headers) = checks(&no_test);
        for error in [load.expect_err("no test"), headers.expect_err("no test")] {
            assert!(
                error.to_string().contains("the test set has no image"),
                "{error}"
            );
        }
    }

    #[test]
    fn too_few_images_of_a_class_is_an_error() {
        let labels = vec![0u8, 0, 1, 2];
        let error = Split::new(&labels, 1, &data_plan(2, 0), 0).expect_err("must fail");
        assert_eq!(
            error.to_string(),
            "data.labeled_per_class = 2, but the training set has only 1 images of class 1 (data.classes = 3: classes 0 to 2 are expected)"
        );
    }

    #[test]
    fn other_classes_are_unlabeled_and_a_split_with_nothing_unlabeled_is_an_error() {
        // Class 3 of a 3-class plan: never labeled, always unlabeled.
        let labels: Vec<u8> = (0..30).map(|i| (i % 4) as u8).collect();
        let split = Split::new(&labels, 1, &data_plan(2, 0), 0).expect("split");
        assert!(split.labeled.iter().all(|&p| labels[p as usize] < 3));
        assert!((0..30u32)
            .filter(|&p| labels[p as usize] == 3)
            .all(|p| split.unlabeled.contains(&p)));
        assert_eq!(
            check_labels("test", &[0, 2, 3], 3)
                .expect_err("label 3")
                .to_string(),
            "the test set has images labeled 3, but data.classes = 3 (labels 0 to 2 are expected)"
        );
        check_labels("test", &[0, 2, 1], 3).expect("labels below the classes");
        let labels: Vec<u8> = (0..30).map(|i| (i % 3) as u8).collect();
        let plan = data_plan(10, 0);
        let split = Split::new(&labels, 1, &plan, 0).expect("split");
        assert!(split.unlabeled.is_empty());
        let error = Source::open(&plan, &split.unlabeled).expect_err("nothing unlabeled");
        assert!(
            error.to_string().contains(
                "data.labeled_per_class x data.classes (10 x 3) takes every training image"
            ),
            "{error}"
        );
    }

    #[test]
    fn unlabeled_limit_and_shards() {
        let labels: Vec<u8> = (0..300).map(|i| (i % 3) as u8).collect();
        let split = Split::new(&labels, 100, &data_plan(1, 25), 0).expect("split");
        assert_eq!(split.unlabeled.len(), 25);
        assert_eq!(shard_ranges(25, 10), vec![(0, 10), (10, 20), (20, 25)]);
        assert_eq!(shard_ranges(20, 10), vec![(0, 10), (10, 20)]);
    }

    #[test]
    fn idx_round_trip_and_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x-images-idx3-ubyte");
        let mut bytes = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3];
        bytes.extend(0..12u8);
        std::fs::write(&path, &bytes).expect("write");
        let (data, dims) = read_idx(&path, 3).expect("read");
        assert_eq!(dims, vec![2, 2, 3]);
        assert_eq!(data, (0..12u8).collect::<Vec<_>>());
        std::fs::write(&path, &bytes[..20]).expect("write");
        let error = read_idx(&path, 3).expect_err("truncated");
        assert!(
            error.to_string().contains("need 12 bytes of data, found 4"),
            "{error}"
        );
        // Dimensions whose product is past usize (a damaged header): refused, not an overflow.
        let huge = [vec![0, 0, 8, 3], vec![0xff; 12], vec![1, 2, 3]].concat();
        let damaged = dir.path().join("damaged-images-idx3-ubyte");
        std::fs::write(&damaged, &huge).expect("write");
        let error = read_idx(&damaged, 3).expect_err("huge");
        assert!(
            error
                .to_string()
                .contains("need more than usize::MAX bytes"),
            "{error}"
        );
        let missing = read_idx(&dir.path().join("nothing"), 1).expect_err("missing");
        assert!(matches!(missing, DataError::Missing { .. }));
        // The header alone: the dimensions, whatever follows.
        assert_eq!(read_idx_dims(&path, 3).expect("header"), vec![2, 2, 3]);
        std::fs::write(&path, &bytes[..10]).expect("write");
        let error = read_idx_dims(&path, 3).expect_err("short header");
        assert!(
            error.to_string().contains("shorter than its header"),
            "{error}"
        );
    }

    #[test]
    fn fashion_mnist_header_gives_its_image_size() {
        let dir = Path::new("/usr/share/datasets/fashion-mnist");
        let dims = read_idx_dims(&dir.join("train-images-idx3-ubyte"), 3)
            .expect("install dataset-fashion-mnist");
        assert_eq!(dims, vec![60_000, 28, 28]);
    }

    #[test]
    fn fashion_mnist_split_has_59000_unlabeled() {
        let dir = Path::new("/usr/share/datasets/fashion-mnist");
        let labels = load_train_labels(dir).expect("install dataset-fashion-mnist");
        assert_eq!(labels.len(), 60_000);
        let mut plan = data_plan(100, 0);
        plan.classes = 10;
        let split = Split::new(&labels, 10_000, &plan, 0).expect("split");
        assert_eq!(split.labeled.len(), 1000);
        assert_eq!(split.unlabeled.len(), 59_000);
        // The benchmark's 1,000 labels (split seed 0), which README's results were trained on.
        assert_eq!(split.labeled[..5], [37228, 18959, 27660, 36924, 29319]);
    }
}

use super::*;

const GRAY: Geometry = Geometry {
    channels: 1,
    height: 28,
    width: 28,
};

fn options(batch_size: usize, threads: usize) -> DecodeOptions {
    DecodeOptions {
        batch_size,
        threads,
        prefetch: 2,
        skip_undecodable: false,
    }
}

/// A 28x28 grayscale PNG whose pixels are all `value`.
fn png(value: u8) -> Vec<u8> {
    let image = image::GrayImage::from_pixel(28, 28, image::Luma([value]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut bytes, image::ImageFormat::Png)
        .expect("png");
    bytes.into_inner()
}

/// A 40x40 RGB JPEG of one colour.
fn jpeg(rgb: [u8; 3]) -> Vec<u8> {
    let image = image::RgbImage::from_pixel(40, 40, image::Rgb(rgb));
    let mut bytes = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut bytes, image::ImageFormat::Jpeg)
        .expect("jpeg");
    bytes.into_inner()
}

fn data_plan(format: UnlabeledFormat, path: &Path) -> DataPlan {
    DataPlan {
        format: "idx".into(),
        dir: PathBuf::from("."),
        labeled_per_class: 1,
        split_seed: None,
        unlabeled_limit: 0,
        test_limit: 0,
        shard_size: 4,
        classes: 10,
        unlabeled: mentor_plan::UnlabeledPlan {
            format,
            path: Some(path.to_path_buf()),
        },
    }
}

fn collect(batches: Batches) -> Result<Vec<Batch>, DataError> {
    batches.collect()
}

/// Mean of each image of a batch.
fn means(batch: &Batch, geometry: Geometry) -> Vec<f64> {
    batch
        .pixels
        .chunks(geometry.pixels())
        .map(|image| image.iter().map(|&p| p as f64).sum::<f64>() / image.len() as f64)
        .collect()
}

#[test]
fn image_folder_decodes_in_path_order_with_several_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("b")).expect("dir");
    for i in 0..7u8 {
        std::fs::write(dir.path().join(format!("a-{i}.png")), png(i * 10)).expect("write");
    }
    // Nested, upper-case extension, RGB and another size: converted to 28x28 grayscale.
    std::fs::write(dir.path().join("b/c.JPG"), jpeg([200, 200, 200])).expect("write");
    std::fs::write(dir.path().join("notes.txt"), b"not an image").expect("write");
    // A resource fork macOS leaves beside an image: hidden, not an image of the folder.
    std::fs::write(dir.path().join("b/._c.JPG"), b"resource fork").expect("write");
    // A hidden folder's copies are not the data set's images; a link to a folder above is
    // not followed round for ever.
    std::fs::create_dir(dir.path().join(".ipynb_checkpoints")).expect("dir");
    std::fs::write(dir.path().join(".ipynb_checkpoints/a-0.png"), png(0)).expect("write");
    std::os::unix::fs::symlink(dir.path(), dir.path().join("b/up")).expect("link");
    let source =
        Source::open(&data_plan(UnlabeledFormat::ImageFolder, dir.path()), &[]).expect("open");
    assert_eq!(source.units(), 8);
    assert_eq!(source.shards(3), vec![(0, 3), (3, 6), (6, 8)]);
    let batches =
        collect(source.decode(0, 8, GRAY, options(3, 3)).expect("decode")).expect("batches");
    assert_eq!(batches.len(), 3);
    let ids: Vec<i64> = batches.iter().flat_map(|b| b.example_ids.clone()).collect();
    assert_eq!(ids, (0..8).collect::<Vec<i64>>());
    let values: Vec<f64> = batches.iter().flat_map(|b| means(b, GRAY)).collect();
    assert_eq!(&values[..7], &[0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0]);
    assert!((values[7] - 200.0).abs() < 3.0, "{}", values[7]);
    assert!(batches
        .iter()
        .all(|b| b.pixels.len() == b.example_ids.len() * 784));

    // A shard in the middle, and examples by id (the student's loader).
    let middle =
        collect(source.decode(3, 6, GRAY, options(2, 2)).expect("decode")).expect("batches");
    let ids: Vec<i64> = middle.iter().flat_map(|b| b.example_ids.clone()).collect();
    assert_eq!(ids, vec![3, 4, 5]);
    let picked = collect(
        source
            .decode_ids(&[6, 1, 6], GRAY, options(8, 2))
            .expect("ids"),
    )
    .expect("batches");
    assert_eq!(picked[0].example_ids, vec![1, 6]);
    assert_eq!(means(&picked[0], GRAY), vec![10.0, 60.0]);
    let error = source
        .decode_ids(&[8], GRAY, options(8, 1))
        .expect_err("unknown id");
    assert!(error.to_string().contains("example id 8"), "{error}");
}

#[test]
fn rgb_geometry_is_channels_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("x.png"), {
        let image = image::RgbImage::from_pixel(8, 8, image::Rgb([10, 20, 30]));
        let mut bytes = std::io::Cursor::new(Vec::new());
        image
            .write_to(&mut bytes, image::ImageFormat::Png)
            .expect("png");
        bytes.into_inner()
    })
    .expect("write");
    let source =
        Source::open(&data_plan(UnlabeledFormat::ImageFolder, dir.path()), &[]).expect("open");
    let rgb = Geometry {
        channels: 3,
        height: 8,
        width: 8,
    };
    let batches =
        collect(source.decode(0, 1, rgb, options(1, 1)).expect("decode")).expect("batches");
    let pixels = &batches[0].pixels;
    assert_eq!(pixels.len(), 192);
    assert!(pixels[..64].iter().all(|&p| p == 10));
    assert!(pixels[64..128].iter().all(|&p| p == 20));
    assert!(pixels[128..].iter().all(|&p| p == 30));
}

/// Labeling skips what does not decode: the image becomes a row of zeros, listed with why,
/// and the rest of the shard goes on; a file that cannot be read stays an error.
#[test]
fn undecodable_images_are_listed_not_fatal_when_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..4u8 {
        std::fs::write(dir.path().join(format!("{i}.png")), png(i + 1)).expect("write");
    }
    std::fs::write(dir.path().join("2.png"), b"\x89PNG broken").expect("write");
    let source =
        Source::open(&data_plan(UnlabeledFormat::ImageFolder, dir.path()), &[]).expect("open");
    let skipping = DecodeOptions {
        skip_undecodable: true,
        ..options(4, 2)
    };
    let batches = collect(source.decode(0, 4, GRAY, skipping).expect("decode")).expect("batches");
    assert_eq!(batches.len(), 1);
    let batch = &batches[0];
    assert_eq!(batch.example_ids, vec![0, 1, 2, 3]);
    assert_eq!(means(batch, GRAY), vec![1.0, 2.0, 0.0, 4.0]);
    assert_eq!(batch.undecodable.len(), 1);
    let (row, why) = &batch.undecodable[0];
    assert_eq!(*row, 2);
    assert!(
        why.contains("2.png") && why.contains("not a decodable image"),
        "{why}"
    );
    // A file gone between the listing and the decoding is no decoding matter.
    std::fs::remove_file(dir.path().join("3.png")).expect("remove");
    let error =
        collect(source.decode(0, 4, GRAY, skipping).expect("decode")).expect_err("unreadable");
    assert!(error.to_string().contains("3.png"), "{error}");
}

#[test]
fn a_corrupt_image_is_named_after_the_batches_before_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..5u8 {
        std::fs::write(dir.path().join(format!("{i}.png")), png(i)).expect("write");
    }
    std::fs::write(dir.path().join("3.png"), b"\x89PNG broken").expect("write");
    let source =
        Source::open(&data_plan(UnlabeledFormat::ImageFolder, dir.path()), &[]).expect("open");
    let results: Vec<Result<Batch, DataError>> = source
        .decode(0, 5, GRAY, options(2, 3))
        .expect("decode")
        .collect();
    assert_eq!(results.len(), 2, "stops after the error");
    assert_eq!(
        results[0].as_ref().expect("first batch").example_ids,
        vec![0, 1]
    );
    let error = results[1].as_ref().expect_err("second batch holds 3.png");
    assert!(error.to_string().contains("3.png"), "{error}");
    // What to do, and why removing the file is not it.
    assert!(
        error.to_string().contains("not a decodable image")
            && error.to_string().contains("replace it in place")
            && error
                .to_string()
                .contains("removing it would change the ids"),
        "{error}"
    );
}

fn tar_with(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, bytes) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, name, bytes.as_slice())
            .expect("append");
    }
    builder.into_inner().expect("tar")
}

#[test]
fn webdataset_tars_are_one_shard_each_with_key_grouping() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("shard-000.tar"),
        tar_with(&[
            ("s/000.png", png(1)),
            ("s/000.cls", b"3".to_vec()),
            // macOS's tar adds a resource fork per file: hidden, not a sample.
            ("s/._001.jpg", b"not an image".to_vec()),
            ("s/001.cls", b"4".to_vec()),
            ("s/001.jpg", jpeg([90, 90, 90])),
            ("s/002.png", png(2)),
        ]),
    )
    .expect("write");
    std::fs::write(
        dir.path().join("shard-001.tar"),
        tar_with(&[("x.y.png", png(7))]),
    )
    .expect("write");
    let source =
        Source::open(&data_plan(UnlabeledFormat::Webdataset, dir.path()), &[]).expect("open");
    assert_eq!(source.shards(1000), vec![(0, 1), (1, 2)]);
    assert_eq!(source.known_examples(), None);
    let first =
        collect(source.decode(0, 1, GRAY, options(2, 2)).expect("decode")).expect("batches");
    let ids: Vec<i64> = first.iter().flat_map(|b| b.example_ids.clone()).collect();
    assert_eq!(ids, vec![0, 1, 2]);
    let values: Vec<f64> = first.iter().flat_map(|b| means(b, GRAY)).collect();
    assert_eq!(values[0], 1.0);
    assert!((values[1] - 90.0).abs() < 3.0);
    assert_eq!(values[2], 2.0);
    let second =
        collect(source.decode(1, 2, GRAY, options(2, 2)).expect("decode")).expect("batches");
    assert_eq!(second[0].example_ids, vec![1i64 << 32]);
    let picked = collect(
        source
            .decode_ids(&[1 << 32, 2, 0], GRAY, options(8, 2))
            .expect("ids"),
    )
    .expect("batches");
    let ids: Vec<i64> = picked.iter().flat_map(|b| b.example_ids.clone()).collect();
    assert_eq!(ids, vec![0, 2, 1 << 32]);
    let values: Vec<f64> = picked.iter().flat_map(|b| means(b, GRAY)).collect();
    assert_eq!(values, vec![1.0, 2.0, 7.0]);
}

/// A sample with several image fields (`000.jpg` beside `000.seg.png`, as
/// `webdataset.TarWriter` writes masks and depth maps): its plain image is the one labelled,
/// wherever it comes in the sample; one with two plain images, or several others and no plain
/// one, is refused naming them.
#[test]
fn a_webdataset_samples_plain_image_is_the_one_labelled() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("shard-000.tar"),
        tar_with(&[
            ("000.seg.png", png(9)),
            ("000.png", png(1)),
            ("000.depth.png", png(8)),
            ("001.left.png", png(2)),
            ("001.cls", b"1".to_vec()),
        ]),
    )
    .expect("write");
    let source =
        Source::open(&data_plan(UnlabeledFormat::Webdataset, dir.path()), &[]).expect("open");
    let batches =
        collect(source.decode(0, 1, GRAY, options(4, 1)).expect("decode")).expect("batches");
    let values: Vec<f64> = batches.iter().flat_map(|b| means(b, GRAY)).collect();
    assert_eq!(values, vec![1.0, 2.0], "the plain image, then the only one");

    for (members, expected) in [
        (
            vec![("000.png", png(1)), ("000.jpg", jpeg([9, 9, 9]))],
            "sample has two images, `000.png` and `000.jpg`",
        ),
        (
            vec![("000.seg.png", png(1)), ("000.depth.png", png(2))],
            "sample `000` has several images (000.seg.png, 000.depth.png)",
        ),
    ] {
        let case = tempfile::tempdir().expect("tempdir");
        std::fs::write(case.path().join("s.tar"), tar_with(&members)).expect("write");
        let source =
            Source::open(&data_plan(UnlabeledFormat::Webdataset, case.path()), &[]).expect("open");
        let error = collect(source.decode(0, 1, GRAY, options(4, 1)).expect("decode"))
            .expect_err("ambiguous");
        let message = error.to_string();
        assert!(
            message.contains("s.tar") && message.contains(expected),
            "{message}"
        );
    }
}

/// The student's loader wants a few samples of a tar: reading stops once they are out (a tar
/// is commonly a gigabyte), so a tail it never needed, here cut short, costs nothing; the same
/// tail read for labeling is an error, named.
#[test]
fn reading_a_tar_stops_once_the_wanted_samples_are_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let members: Vec<(String, Vec<u8>)> = (0..6u8)
        .map(|i| (format!("{i:03}.png"), png(i + 1)))
        .collect();
    let as_refs = |n: usize| -> Vec<(&str, Vec<u8>)> {
        members[..n]
            .iter()
            .map(|(name, bytes)| (name.as_str(), bytes.clone()))
            .collect()
    };
    let whole = tar_with(&as_refs(6));
    // Up to the middle of sample 4's header (a tar ends in two 512-byte blocks of zeros).
    let four = tar_with(&as_refs(4)).len() - 1024;
    std::fs::write(dir.path().join("s.tar"), &whole[..four + 100]).expect("write");
    let source =
        Source::open(&data_plan(UnlabeledFormat::Webdataset, dir.path()), &[]).expect("open");
    let picked = collect(
        source
            .decode_ids(&[2, 1], GRAY, options(4, 1))
            .expect("ids"),
    )
    .expect("the wanted samples come before the cut");
    let values: Vec<f64> = picked.iter().flat_map(|b| means(b, GRAY)).collect();
    assert_eq!(values, vec![2.0, 3.0]);
    let error = collect(source.decode(0, 1, GRAY, options(4, 1)).expect("decode"))
        .expect_err("labeling reads it all");
    assert!(error.to_string().contains("s.tar"), "{error}");
}

/// A decoder that panics on a malformed image fails that image, named, with what to do: the
/// decoding thread and the shard's other images go on.
#[test]
fn a_decoder_panic_is_an_error_naming_the_image() {
    for (payload, message) in [
        (
            Box::new("index out of bounds") as Box<dyn std::any::Any + Send>,
            "index out of bounds",
        ),
        (
            Box::new(String::from("bad huffman code")),
            "bad huffman code",
        ),
        (Box::new(7u8), "no message"),
    ] {
        let error = guarded("shards/x.tar:7.jpg".into(), REPAIR_FOR_A_NEW_RUN, || {
            std::panic::resume_unwind(payload)
        })
        .expect_err("a panic is an error");
        match error {
            DataError::Unlabeled { path, reason } => {
                assert_eq!(path, PathBuf::from("shards/x.tar:7.jpg"));
                assert!(
                    reason.contains(&format!("the image decoder failed on it ({message})"))
                        && reason.ends_with(REPAIR_FOR_A_NEW_RUN),
                    "{reason}"
                );
            }
            other => panic!("another error: {other}"),
        }
    }
    assert!(guarded("fine.png".into(), REPLACE_IN_PLACE, || Ok(())).is_ok());
}

#[test]
fn broken_webdataset_tars_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tar = tar_with(&[("a.png", png(1)), ("b.cls", b"1".to_vec())]);
    std::fs::write(dir.path().join("no-image.tar"), &tar).expect("write");
    let source =
        Source::open(&data_plan(UnlabeledFormat::Webdataset, dir.path()), &[]).expect("open");
    let error =
        collect(source.decode(0, 1, GRAY, options(4, 1)).expect("decode")).expect_err("no image");
    assert!(error.to_string().contains("no-image.tar"), "{error}");
    assert!(error.to_string().contains("sample `b` has no"), "{error}");

    let truncated = tar_with(&[("a.png", png(1)), ("c.png", png(2))]);
    let cut = dir.path().join("truncated");
    std::fs::create_dir(&cut).expect("dir");
    std::fs::write(cut.join("t.tar"), &truncated[..700]).expect("write");
    let source = Source::open(&data_plan(UnlabeledFormat::Webdataset, &cut), &[]).expect("open");
    let error =
        collect(source.decode(0, 1, GRAY, options(4, 1)).expect("decode")).expect_err("truncated");
    assert!(error.to_string().contains("t.tar"), "{error}");
    // Labeling takes the samples before the cut, and ends the tar there: no image cut short
    // is labeled.
    let skipping = DecodeOptions {
        skip_undecodable: true,
        ..options(4, 1)
    };
    let batches = collect(source.decode(0, 1, GRAY, skipping).expect("decode")).expect("cut short");
    assert!(batches.iter().all(|b| b.undecodable.is_empty()));
    // Cut inside the second sample's header, then inside its image: the first sample is whole.
    let whole = tar_with(&[("a.png", png(1)), ("b.png", png(2)), ("c.png", png(3))]);
    let second_header = 512 + png(1).len().div_ceil(512) * 512;
    for cut_at in [second_header + 100, second_header + 512 + 10] {
        std::fs::write(cut.join("t.tar"), &whole[..cut_at]).expect("write");
        let source =
            Source::open(&data_plan(UnlabeledFormat::Webdataset, &cut), &[]).expect("open");
        let error =
            collect(source.decode(0, 1, GRAY, options(4, 1)).expect("decode")).expect_err("cut");
        assert!(error.to_string().contains("t.tar"), "{error}");
        let batches =
            collect(source.decode(0, 1, GRAY, skipping).expect("decode")).expect("cut short");
        let ids: Vec<i64> = batches.iter().flat_map(|b| b.example_ids.clone()).collect();
        assert_eq!(ids, vec![0], "cut at byte {cut_at}");
        assert!(batches.iter().all(|b| b.undecodable.is_empty()));
        let means = means(&batches[0], GRAY);
        assert!((means[0] - 1.0).abs() < 1e-9, "{means:?}");
        // The student asks for what was labeled, without skipping: it is read.
        let batches = collect(
            source
                .decode_ids(&[0], GRAY, options(4, 1))
                .expect("decode"),
        )
        .expect("the labeled sample, before the cut");
        let ids: Vec<i64> = batches.iter().flat_map(|b| b.example_ids.clone()).collect();
        assert_eq!(ids, vec![0], "cut at byte {cut_at}");
        // A sample after the cut is an error naming the tar.
        let error = collect(
            source
                .decode_ids(&[0, 1], GRAY, options(4, 1))
                .expect("decode"),
        )
        .expect_err("a sample after the cut");
        assert!(error.to_string().contains("t.tar"), "{error}");
    }

    let empty = tempfile::tempdir().expect("tempdir");
    let error = Source::open(&data_plan(UnlabeledFormat::Webdataset, empty.path()), &[])
        .expect_err("no tars");
    assert!(error.to_string().contains("no .tar file"), "{error}");

    // A single file must be a tar; a path that does not exist is named as such, not as a
    // failed read; an image folder must be a folder.
    let zip = dir.path().join("shards.zip");
    std::fs::write(&zip, b"PK").expect("write");
    let error =
        Source::open(&data_plan(UnlabeledFormat::Webdataset, &zip), &[]).expect_err("a zip");
    assert!(
        error.to_string().contains("shards.zip")
            && error.to_string().contains("is not a .tar file"),
        "{error}"
    );
    let error =
        Source::open(&data_plan(UnlabeledFormat::ImageFolder, &zip), &[]).expect_err("a file");
    assert!(error.to_string().contains("is not a folder"), "{error}");
    for format in [UnlabeledFormat::ImageFolder, UnlabeledFormat::Webdataset] {
        let error = Source::open(&data_plan(format, &dir.path().join("nowhere")), &[])
            .expect_err("missing");
        assert!(
            error.to_string().contains("data.unlabeled.path")
                && error.to_string().contains("nowhere`: does not exist"),
            "{error}"
        );
    }
}

#[test]
fn idx_source_copies_training_images_by_position() {
    let images = Arc::new(ImageSet {
        pixels: (0..6u8).flat_map(|i| vec![i; 4]).collect(),
        labels: vec![0; 6],
        rows: 2,
        cols: 2,
    });
    let source = Source::Idx {
        positions: vec![1, 3, 4, 5],
        images: None,
    }
    .with_images(images);
    let geometry = Geometry {
        channels: 1,
        height: 2,
        width: 2,
    };
    let batches = collect(
        source
            .decode(1, 4, geometry, options(2, 2))
            .expect("decode"),
    )
    .expect("batches");
    let ids: Vec<i64> = batches.iter().flat_map(|b| b.example_ids.clone()).collect();
    assert_eq!(ids, vec![3, 4, 5]);
    let pixels: Vec<u8> = batches.iter().flat_map(|b| b.pixels.clone()).collect();
    assert_eq!(pixels, vec![3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5]);
    let error = source
        .decode(2, 9, geometry, options(2, 1))
        .expect_err("range");
    assert!(error.to_string().contains("[2, 9)"), "{error}");
}

/// Batches from `sent` (then every sender gone), with the reading thread's `total` if it sent one.
fn batches_of(sent: Vec<Done>, total: Option<usize>) -> Batches {
    let (sender, receiver) = std::sync::mpsc::sync_channel::<Done>(sent.len().max(1));
    for done in sent {
        sender.send(done).expect("send");
    }
    let (total_sender, total_receiver) = std::sync::mpsc::channel();
    if let Some(total) = total {
        total_sender.send(total).expect("send");
    }
    Batches {
        results: receiver,
        total: total_receiver,
        pending: BTreeMap::new(),
        next: 0,
        failed: false,
        permits: std::sync::mpsc::sync_channel(1).0,
    }
}

#[test]
fn a_stream_that_stops_before_the_reader_said_it_ended_is_an_error() {
    let batch = |id| Batch {
        example_ids: vec![id],
        pixels: vec![0; 28 * 28],
        undecodable: Vec::new(),
    };
    // Two batches, and the reader's word that there were two: a clean end.
    let whole = batches_of(vec![(0, Ok(batch(1))), (1, Ok(batch(2)))], Some(2));
    assert_eq!(collect(whole).expect("whole shard").len(), 2);
    // The threads died after batch 0 (a panic, say) with no word from the reader: not an end.
    let mut cut = batches_of(vec![(0, Ok(batch(1)))], None);
    assert!(matches!(cut.next(), Some(Ok(_))));
    match cut.next() {
        Some(Err(error)) => assert!(
            error
                .to_string()
                .contains("batch 1 of the shard was never decoded"),
            "{error}"
        ),
        other => panic!("a cut stream ended cleanly: {other:?}"),
    }
    assert!(cut.next().is_none());
    // The reader said three, two came: the same.
    let short = batches_of(vec![(0, Ok(batch(1))), (1, Ok(batch(2)))], Some(3));
    assert!(collect(short).is_err());
}

#[test]
fn a_batch_that_never_arrives_is_an_error_not_a_gap() {
    // Batch 1 arrived; batch 0's thread ended without sending it.
    let (sender, receiver) = std::sync::mpsc::sync_channel::<Done>(2);
    let batch = Batch {
        example_ids: vec![7],
        pixels: vec![0; 28 * 28],
        undecodable: Vec::new(),
    };
    sender.send((1, Ok(batch))).expect("send");
    drop(sender);
    let (total, total_receiver) = std::sync::mpsc::channel();
    total.send(2).expect("send");
    let mut batches = Batches {
        results: receiver,
        total: total_receiver,
        pending: BTreeMap::new(),
        next: 0,
        failed: false,
        permits: std::sync::mpsc::sync_channel(1).0,
    };
    match batches.next() {
        Some(Err(error)) => assert!(
            error
                .to_string()
                .contains("batch 0 of the shard was never decoded"),
            "{error}"
        ),
        other => panic!("a gap passed: {other:?}"),
    }
    assert!(batches.next().is_none());
}

#[test]
fn fingerprints_change_with_the_listing_and_not_with_the_place() {
    let fingerprint = |format, dir: &Path| {
        let plan = data_plan(format, dir);
        Source::open(&plan, &[]).expect("open").fingerprint(&plan)
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let images = dir.path().join("images");
    std::fs::create_dir_all(images.join("sub")).expect("mkdir");
    for name in ["a.png", "b.png", "sub/c.png"] {
        std::fs::write(images.join(name), png(1)).expect("write");
    }
    let folder = fingerprint(UnlabeledFormat::ImageFolder, &images);
    assert!(folder.starts_with("image-folder:3:"), "{folder}");
    // The same files in another place: the same ids.
    let moved = dir.path().join("moved");
    std::fs::rename(&images, &moved).expect("move");
    assert_eq!(fingerprint(UnlabeledFormat::ImageFolder, &moved), folder);
    // One renamed (same count), one added: other ids.
    std::fs::rename(moved.join("b.png"), moved.join("bb.png")).expect("rename");
    let renamed = fingerprint(UnlabeledFormat::ImageFolder, &moved);
    assert_ne!(renamed, folder);
    std::fs::write(moved.join("0.png"), png(2)).expect("write");
    let added = fingerprint(UnlabeledFormat::ImageFolder, &moved);
    assert!(added.starts_with("image-folder:4:"), "{added}");

    // WebDataset: a tar rewritten with other samples (another size) is another listing.
    let tars = dir.path().join("tars");
    std::fs::create_dir_all(&tars).expect("mkdir");
    std::fs::write(tars.join("s-0.tar"), tar_with(&[("0.png", png(1))])).expect("write");
    let webdataset = fingerprint(UnlabeledFormat::Webdataset, &tars);
    assert!(webdataset.starts_with("webdataset:1:"), "{webdataset}");
    assert_eq!(fingerprint(UnlabeledFormat::Webdataset, &tars), webdataset);
    std::fs::write(
        tars.join("s-0.tar"),
        tar_with(&[("0.png", png(1)), ("1.png", png(2))]),
    )
    .expect("write");
    assert_ne!(fingerprint(UnlabeledFormat::Webdataset, &tars), webdataset);
}

#[test]
fn idx_fingerprints_name_the_positions_the_labels_drew() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = data_plan(UnlabeledFormat::Idx, dir.path());
    let fingerprint = |positions: &[u32]| {
        Source::open(&plan, positions)
            .expect("open")
            .fingerprint(&plan)
    };
    let drawn = fingerprint(&[0, 2, 3, 7]);
    assert!(drawn.starts_with("idx:4:"), "{drawn}");
    assert_eq!(fingerprint(&[0, 2, 3, 7]), drawn);
    // Another data set of the same size in `data.dir`: its labels draw other positions.
    assert_ne!(fingerprint(&[0, 1, 3, 7]), drawn);
    // A run recorded when the count alone named IDX data is taken for the same listing, and
    // only for the same count.
    assert!(Source::same_fingerprint("idx:4", &drawn));
    assert!(Source::same_fingerprint(&drawn, "idx:4"));
    assert!(!Source::same_fingerprint("idx:5", &drawn));
    assert!(!Source::same_fingerprint("idx:4:0000000000000000", &drawn));
    assert!(!Source::same_fingerprint(
        "image-folder:4",
        "image-folder:4:00ff"
    ));
}

/// A tar's samples come in order from its reader thread, a consumer may stop after the first
/// ones, and a tar damaged halfway gives the samples before the damage, then the error.
#[test]
fn tar_samples_are_read_as_they_are_consumed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let count = TAR_READ_AHEAD * 4;
    let members: Vec<(String, Vec<u8>)> = (0..count)
        .map(|i| (format!("{i:05}.png"), png(i as u8)))
        .collect();
    let members: Vec<(&str, Vec<u8>)> = members
        .iter()
        .map(|(name, bytes)| (name.as_str(), bytes.clone()))
        .collect();
    let bytes = tar_with(&members);
    let path = dir.path().join("big.tar");
    std::fs::write(&path, &bytes).expect("write");
    let first: Vec<i64> = tar_samples(3, path.clone(), None, false)
        .take(3)
        .map(|item| item.expect("sample").0)
        .collect();
    assert_eq!(first, vec![3 << 32, (3 << 32) | 1, (3 << 32) | 2]);
    assert_eq!(tar_samples(3, path.clone(), None, false).count(), count);

    // Cut inside the second half: the first half arrives, then the tar's error.
    std::fs::write(&path, &bytes[..bytes.len() * 3 / 4]).expect("write");
    let items: Vec<Item> = tar_samples(0, path.clone(), None, false).collect();
    let (good, bad): (Vec<_>, Vec<_>) = items.iter().partition(|item| item.is_ok());
    assert!(
        good.len() >= count / 2,
        "{} samples before the damage",
        good.len()
    );
    assert_eq!(bad.len(), 1);
    assert!(items.last().expect("items").is_err());
}

/// One image slow to decode (a huge PNG, a stall on a network file system) holds the batches
/// decoded after it in memory until it comes; no more of the shard is read meanwhile than the
/// pipeline's window (`prefetch + threads` batches), however long the shard.
#[test]
fn a_slow_image_holds_back_no_more_than_the_pipelines_window() {
    let pulled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let big = {
        let image = image::GrayImage::from_fn(3000, 3000, |x, y| {
            image::Luma([((x * 7 + y * 13) % 251) as u8])
        });
        let mut bytes = Vec::new();
        image::DynamicImage::ImageLuma8(image)
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .expect("png");
        bytes
    };
    let tiny = png(3);
    let counter = pulled.clone();
    let items: ItemIter = Box::new((0..2000i64).map(move |id| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let bytes = if id == 0 { big.clone() } else { tiny.clone() };
        Ok((
            id,
            Encoded::Bytes {
                name: format!("{id}.png"),
                bytes,
            },
        ))
    }));
    let mut batches = Batches::start(items, GRAY, options(1, 2)).expect("start");
    let first = batches.next().expect("a batch").expect("decoded");
    assert_eq!(first.example_ids, vec![0]);
    // Window: prefetch + threads batches of one image, plus the one the reader holds.
    let options = options(1, 2);
    let window = options.prefetch.max(1) + options.threads.max(1);
    let read = pulled.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        read <= window + 2,
        "{read} images read while the first one decoded"
    );
    let rest = collect(batches).expect("the rest");
    assert_eq!(rest.len(), 1999);
}

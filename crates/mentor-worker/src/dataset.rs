//! The plan's data set as tensors: training and test images (u8, kept on the task's device),
//! labels, the labeled / unlabeled split shared with the coordinator, and the unlabeled source.

use std::sync::Arc;

use mentor_data::{Geometry, ImageSet, PlanData, Source, Split};
use mentor_plan::Plan;
use tch::{Device, Kind, Tensor};

/// Images and labels of a plan, loaded once per worker.
#[derive(Debug)]
pub struct Dataset {
    pub train_images: Tensor,
    pub train_labels: Tensor,
    pub test_images: Tensor,
    pub test_labels: Tensor,
    pub split: Split,
    /// Training-set positions of the labeled examples.
    pub labeled: Tensor,
    pub image_size: i64,
    pub channels: i64,
    /// Pixel mean and standard deviation of the training images (inputs are normalised).
    pub mean: f64,
    pub std: f64,
    pub device: Device,
    /// Where unlabeled images come from (the training set itself for `idx`).
    pub unlabeled: Source,
}

fn images_tensor(set: &ImageSet, device: Device) -> Tensor {
    Tensor::from_slice(&set.pixels)
        .view([set.len() as i64, 1, set.rows as i64, set.cols as i64])
        .to_device(device)
}

fn labels_tensor(labels: &[u8], device: Device) -> Tensor {
    Tensor::from_slice(labels)
        .to_kind(Kind::Int64)
        .to_device(device)
}

impl Dataset {
    pub fn load(plan: &Plan, device: Device) -> Result<Dataset, mentor_data::DataError> {
        let PlanData {
            train,
            test,
            split,
            unlabeled,
        } = PlanData::load(&plan.data, plan.split_seed())?;
        let train = Arc::new(train);
        let unlabeled = unlabeled.with_images(train.clone());
        let test_len = split.test_len;
        let labeled: Vec<i64> = split.labeled.iter().map(|&p| p as i64).collect();
        let train_images = images_tensor(&train, device);
        let unit = to_unit(&train_images);
        let mean = unit.mean(Kind::Float).double_value(&[]);
        let std = unit.std(true).double_value(&[]).max(1e-6);
        Ok(Dataset {
            mean,
            std,
            channels: 1,
            train_images,
            train_labels: labels_tensor(&train.labels, device),
            test_images: images_tensor(&test, device).narrow(0, 0, test_len as i64),
            test_labels: labels_tensor(&test.labels, device).narrow(0, 0, test_len as i64),
            labeled: Tensor::from_slice(&labeled).to_device(device),
            split,
            image_size: train.rows as i64,
            device,
            unlabeled,
        })
    }

    /// The size decoded unlabeled images are converted to: the labeled images'.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            channels: self.channels as usize,
            height: self.image_size as usize,
            width: self.image_size as usize,
        }
    }

    /// Decoded u8 pixels (`[n, C, H, W]`) as a tensor on the dataset's device.
    pub fn pixels_tensor(&self, pixels: &[u8], count: usize) -> Tensor {
        let geometry = self.geometry();
        Tensor::from_slice(pixels)
            .view([
                count as i64,
                geometry.channels as i64,
                geometry.height as i64,
                geometry.width as i64,
            ])
            .to_device(self.device)
    }

    /// Training images at `positions` as floats in [0, 1].
    pub fn train_batch(&self, positions: &Tensor) -> Tensor {
        to_unit(&self.train_images.index_select(0, positions))
    }

    /// Model input from images in [0, 1]: resized to `resolution` when the model asks for
    /// another size, then normalised with the training set's statistics.
    pub fn model_input(&self, images: &Tensor, resolution: i64) -> Tensor {
        let images = if resolution != self.image_size {
            images.upsample_bilinear2d([resolution, resolution], false, None, None)
        } else {
            images.shallow_clone()
        };
        (images - self.mean) / self.std
    }
}

/// u8 pixels to floats in [0, 1].
pub fn to_unit(pixels: &Tensor) -> Tensor {
    pixels.to_kind(Kind::Float) / 255.0
}

/// Indices on `device`. To a GPU through pinned memory, without waiting: a copy from pageable
/// memory would first wait for every kernel queued there.
pub fn upload(values: &[i64], device: Device) -> Tensor {
    let host = Tensor::from_slice(values);
    if device.is_cuda() {
        // `_pin_memory`: `pin_memory` given a device (tch always passes one) prints a
        // deprecation warning at every call.
        host.internal_pin_memory(device)
            .to_device_(device, Kind::Int64, true, false)
    } else {
        host
    }
}

//! Data augmentation, batched on the device the model runs on.
//!
//! Images are float tensors `[n, c, h, w]` in `[0, 1]`. [`flip_and_shift`] is the standard
//! augmentation of supervised training; [`RandAugment`] is the student's input noise: `ops`
//! operations per image drawn from the list, each at `magnitude / 10` of its range, with a
//! random sign where the operation has one. Every operation keeps shape, dtype and range, and
//! is the identity at magnitude 0 where it has a neutral value.

use mentor_plan::{RandAugmentPlan, RANDAUGMENT_OPS};
use tch::{Device, Kind, Tensor};

fn uniform(n: i64, device: Device) -> Tensor {
    Tensor::rand([n], (Kind::Float, device))
}

/// Per-image random sign (+1 or -1).
fn random_sign(n: i64, device: Device) -> Tensor {
    uniform(n, device).lt(0.5).to_kind(Kind::Float) * 2.0 - 1.0
}

/// Applies per-image affine maps `theta` (`[n, 2, 3]`, normalised coordinates), zero padding.
fn affine(images: &Tensor, theta: &Tensor, nearest: bool) -> Tensor {
    let grid = Tensor::affine_grid_generator(theta, images.size(), false);
    images.grid_sampler(&grid, if nearest { 1 } else { 0 }, 0, false)
}

/// Builds `[n, 2, 3]` from six per-image rows `[a, b, c, d, e, f]`.
fn theta(rows: [Tensor; 6]) -> Tensor {
    Tensor::stack(&rows, 1).view([-1, 2, 3])
}

/// Random horizontal flips and shifts of up to 2 pixels (nearest, zero padding).
pub fn flip_and_shift(images: &Tensor) -> Tensor {
    let size = images.size();
    let (n, height, width) = (size[0], size[2], size[3]);
    let device = images.device();
    let zeros = Tensor::zeros([n], (Kind::Float, device));
    let ones = Tensor::ones([n], (Kind::Float, device));
    let flip = random_sign(n, device);
    let shift = |extent: i64| {
        (Tensor::randint(5, [n], (Kind::Float, device)) - 2.0) * (2.0 / extent as f64)
    };
    let matrix = theta([
        flip,
        zeros.shallow_clone(),
        shift(width),
        zeros,
        ones,
        shift(height),
    ]);
    affine(images, &matrix, true)
}

/// RandAugment with the operations of a plan.
#[derive(Debug, Clone)]
pub struct RandAugment {
    pub ops: u32,
    /// Fraction of each operation's range (plan magnitude / 10).
    pub strength: f64,
    pub op_list: Vec<String>,
    /// Side of the square cut out of every image after the operations (fraction of the side).
    pub cutout: f64,
}

impl RandAugment {
    pub fn from_plan(plan: &RandAugmentPlan) -> RandAugment {
        let op_list = if plan.op_list.is_empty() {
            RANDAUGMENT_OPS.iter().map(|op| op.to_string()).collect()
        } else {
            plan.op_list.clone()
        };
        RandAugment {
            ops: plan.ops,
            strength: plan.magnitude / 10.0,
            op_list,
            cutout: plan.cutout,
        }
    }

    pub fn is_active(&self) -> bool {
        (self.ops > 0 && !self.op_list.is_empty()) || self.cutout > 0.0
    }

    /// Applies `ops` random operations to each image, then the plan's cutout.
    ///
    /// On a CPU each operation runs on the images that drew it. On a GPU every operation runs
    /// on the whole batch and each image keeps the result of the one it drew: gathering the
    /// images of an operation needs their count on the host, a wait for the device per
    /// operation (30 a batch with the full list), where the extra arithmetic costs next to
    /// nothing.
    pub fn apply(&self, images: &Tensor) -> Tensor {
        if !self.is_active() {
            return images.shallow_clone();
        }
        let n = images.size()[0];
        let device = images.device();
        let mut out = images.shallow_clone();
        for _ in 0..self.ops {
            let choice = Tensor::randint(self.op_list.len() as i64, [n], (Kind::Int64, device));
            out = self.apply_chosen(&out, &choice, device.is_cuda());
        }
        let size = out.size();
        let side = (self.cutout * size[2].min(size[3]) as f64).round() as i64;
        if side > 0 {
            out = cutout(&out, side);
        }
        out
    }

    /// Applies to each image the operation of `op_list` at its index in `choice` (`[n]`,
    /// int64), by gathering each operation's images (`masked` false) or by running every
    /// operation on the whole batch and selecting (`masked` true, no wait for the device).
    fn apply_chosen(&self, images: &Tensor, choice: &Tensor, masked: bool) -> Tensor {
        let mut out = images.shallow_clone();
        for (index, op) in self.op_list.iter().enumerate() {
            let drawn = choice.eq(index as i64);
            if masked {
                let changed = apply_op(op, images, self.strength);
                out = changed.where_self(&drawn.view([-1, 1, 1, 1]), &out);
            } else {
                let selected = drawn.nonzero().squeeze_dim(1);
                if selected.size()[0] == 0 {
                    continue;
                }
                let subset = images.index_select(0, &selected);
                let changed = apply_op(op, &subset, self.strength);
                out = out.index_copy(0, &selected, &changed);
            }
        }
        out
    }
}

/// The smallest blend factor: the end of the enhance operations' range at magnitude 10 (PIL
/// factors 0.1 to 1.9). Past it, as magnitudes above 10 would go, a factor reaches 0 (a blank
/// image) and then below (an inverted one): no longer the operation.
const BLEND_FACTOR_MIN: f64 = 0.1;

/// Blends `images` toward `degenerate` by `factor` (1 = unchanged, at least
/// [`BLEND_FACTOR_MIN`]), clamped to [0, 1].
fn blend(images: &Tensor, degenerate: &Tensor, factor: &Tensor) -> Tensor {
    let factor = factor.clamp_min(BLEND_FACTOR_MIN).view([-1, 1, 1, 1]);
    (degenerate + factor * (images - degenerate)).clamp(0.0, 1.0)
}

/// One RandAugment operation at `strength` (0..=3) of its range.
pub fn apply_op(op: &str, images: &Tensor, strength: f64) -> Tensor {
    let size = images.size();
    let (n, height, width) = (size[0], size[2], size[3]);
    let device = images.device();
    let zeros = || Tensor::zeros([n], (Kind::Float, device));
    let ones = || Tensor::ones([n], (Kind::Float, device));
    let signed = |range: f64| random_sign(n, device) * (range * strength);
    match op {
        "auto-contrast" => {
            let low = images.amin([1, 2, 3], true);
            let high = images.amax([1, 2, 3], true);
            let span = &high - &low;
            let stretched = (images - &low) / span.clamp_min(1e-6);
            // Flat images stay as they are.
            stretched.where_self(&span.gt(1e-6), images)
        }
        "equalize" => equalize(images),
        "rotate" => {
            let angle = signed(30f64.to_radians());
            let (cos, sin) = (angle.cos(), angle.sin());
            let matrix = theta([cos.shallow_clone(), -&sin, zeros(), sin, cos, zeros()]);
            affine(images, &matrix, false)
        }
        "posterize" => {
            let drop_bits = (4.0 * strength.min(1.0)).round();
            let step = 2f64.powf(drop_bits);
            ((images * 255.0).round() / step).floor() * step / 255.0
        }
        "solarize" => {
            let threshold = 1.0 - strength.min(1.0);
            let inverted = -images + 1.0;
            inverted.where_self(&images.gt(threshold), images)
        }
        "contrast" => {
            let mean = images.mean_dim(&[1i64, 2, 3][..], true, Kind::Float);
            blend(images, &mean.expand_as(images), &(signed(0.9) + 1.0))
        }
        "brightness" => blend(images, &images.zeros_like(), &(signed(0.9) + 1.0)),
        "color" => {
            if size[1] != 3 {
                return images.shallow_clone();
            }
            // Blend toward the luminance image (saturation), as PIL's ImageEnhance.Color.
            let weights = constant(&[0.299, 0.587, 0.114], device).view([1, 3, 1, 1]);
            let gray = (images * weights)
                .sum_dim_intlist(1, true, Kind::Float)
                .expand_as(images);
            blend(images, &gray, &(signed(0.9) + 1.0))
        }
        "sharpness" => {
            let channels = size[1];
            // PIL's smoothing filter: ones with 5 at the centre, over 13 (made on the device,
            // see `constant`).
            let kernel = Tensor::ones([1, 1, 3, 3], (Kind::Float, device));
            let _ = kernel.narrow(2, 1, 1).narrow(3, 1, 1).fill_(5.0);
            let kernel = kernel / 13.0;
            let kernel = kernel.repeat([channels, 1, 1, 1]);
            let smooth = images.conv2d(&kernel, None::<Tensor>, [1, 1], [1, 1], [1, 1], channels);
            blend(images, &smooth, &(signed(0.9) + 1.0))
        }
        "shear-x" => affine(
            images,
            &theta([ones(), signed(0.3), zeros(), zeros(), ones(), zeros()]),
            false,
        ),
        "shear-y" => affine(
            images,
            &theta([ones(), zeros(), zeros(), signed(0.3), ones(), zeros()]),
            false,
        ),
        "translate-x" => affine(
            images,
            &theta([ones(), zeros(), signed(0.6), zeros(), ones(), zeros()]),
            false,
        ),
        "translate-y" => affine(
            images,
            &theta([ones(), zeros(), zeros(), zeros(), ones(), signed(0.6)]),
            false,
        ),
        "cutout" => {
            let side = ((0.5 * strength.min(1.0)) * height.min(width) as f64).round() as i64;
            cutout(images, side)
        }
        // "identity" and anything the plan validation let through unchanged.
        _ => images.shallow_clone(),
    }
}

/// A small f32 constant on `device`, written there element by element: copying it from the
/// host would wait for every kernel queued on a GPU.
fn constant(values: &[f64], device: Device) -> Tensor {
    let tensor = Tensor::zeros([values.len() as i64], (Kind::Float, device));
    for (index, &value) in values.iter().enumerate() {
        let _ = tensor.get(index as i64).fill_(value);
    }
    tensor
}

/// Fills a `side` x `side` square (clipped at the borders) at a random centre of each image
/// with gray (0.5).
fn cutout(images: &Tensor, side: i64) -> Tensor {
    if side == 0 {
        return images.shallow_clone();
    }
    let size = images.size();
    let (n, height, width) = (size[0], size[2], size[3]);
    let device = images.device();
    let rows = Tensor::arange(height, (Kind::Float, device)).view([1, 1, height, 1]);
    let cols = Tensor::arange(width, (Kind::Float, device)).view([1, 1, 1, width]);
    let center_y = (uniform(n, device) * height as f64).view([n, 1, 1, 1]);
    let center_x = (uniform(n, device) * width as f64).view([n, 1, 1, 1]);
    let half = side as f64 / 2.0;
    let inside = (rows - &center_y)
        .abs()
        .lt(half)
        .logical_and(&(cols - &center_x).abs().lt(half));
    images.masked_fill(&inside.expand_as(images), 0.5)
}

/// Histogram equalisation per image and channel on 256 levels.
fn equalize(images: &Tensor) -> Tensor {
    let size = images.size();
    let levels = (images * 255.0)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Int64);
    let flat = levels.view([size[0] * size[1], -1]);
    let pixels = flat.size()[1];
    let histogram = Tensor::zeros([flat.size()[0], 256], (Kind::Float, images.device()))
        .scatter_add(
            1,
            &flat,
            &Tensor::ones(flat.size(), (Kind::Float, images.device())),
        );
    let cdf = histogram.cumsum(1, Kind::Float);
    let cdf_min = cdf
        .masked_fill(&histogram.eq(0.0), f64::INFINITY)
        .amin([1], true);
    let denominator = (-&cdf_min + pixels as f64).clamp_min(1.0);
    let mapped = (cdf.gather(1, &flat, false) - &cdf_min) / denominator;
    // Single-level images have nothing to equalise.
    let flat_image = (-&cdf_min + pixels as f64).eq(0.0);
    let mapped = (flat.to_kind(Kind::Float) / 255.0).where_self(&flat_image, &mapped);
    mapped
        .clamp(0.0, 1.0)
        .view(size.as_slice())
        .to_kind(images.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images_with(channels: i64) -> Tensor {
        tch::manual_seed(3);
        (Tensor::rand([6, channels, 28, 28], (Kind::Float, Device::Cpu)) * 255.0).round() / 255.0
    }

    fn images() -> Tensor {
        images_with(1)
    }

    #[test]
    fn neutral_ops_at_magnitude_zero_change_nothing() {
        for channels in [1, 3] {
            neutral_ops_at_magnitude_zero_change_nothing_on(&images_with(channels));
        }
    }

    fn neutral_ops_at_magnitude_zero_change_nothing_on(xs: &Tensor) {
        for op in [
            "identity",
            "rotate",
            "posterize",
            "solarize",
            "contrast",
            "brightness",
            "color",
            "sharpness",
            "shear-x",
            "shear-y",
            "translate-x",
            "translate-y",
            "cutout",
        ] {
            let out = apply_op(op, xs, 0.0);
            assert!(
                out.allclose(xs, 1e-5, 1e-5, false),
                "{op} changed the images at magnitude 0"
            );
        }
    }

    /// Magnitudes above 10 (the plan allows 30) make the enhance operations stronger, never
    /// blank or inverted: brightness keeps each image's darkest-to-brightest order of pixels,
    /// and keeps at least a tenth of it.
    #[test]
    fn enhance_ops_past_magnitude_ten_neither_blank_nor_invert() {
        let xs = images();
        for _ in 0..8 {
            let out = apply_op("brightness", &xs, 3.0);
            let kept = (&out / xs.clamp_min(1e-6)).where_self(&xs.gt(0.05), &out.ones_like());
            let least = kept.min().double_value(&[]);
            assert!(least >= 0.1 - 1e-4, "brightness kept {least} of an image");
            let contrast = apply_op("contrast", &xs, 3.0);
            let mean = xs.mean_dim(&[1i64, 2, 3][..], true, Kind::Float);
            let above = xs.gt_tensor(&mean);
            let still_above = contrast.gt_tensor(&mean);
            // No pixel above its image's mean falls to or below it (an inverted image's would).
            let flipped = above
                .logical_and(&still_above.logical_not())
                .sum(Kind::Int64);
            assert_eq!(flipped.int64_value(&[]), 0, "contrast inverted an image");
        }
    }

    #[test]
    fn color_changes_only_colour_images() {
        let gray = images_with(1);
        assert!(apply_op("color", &gray, 1.0).equal(&gray));
        let colour = images_with(3);
        assert!(apply_op("color", &colour, 0.0).allclose(&colour, 1e-5, 1e-5, false));
        assert!(!apply_op("color", &colour, 1.0).allclose(&colour, 1e-3, 1e-3, false));
    }

    #[test]
    fn every_op_keeps_shape_kind_and_range() {
        for xs in [images_with(1), images_with(3)] {
            every_op_keeps_shape_kind_and_range_on(&xs);
        }
    }

    fn every_op_keeps_shape_kind_and_range_on(xs: &Tensor) {
        for op in RANDAUGMENT_OPS {
            for strength in [0.5, 1.0, 3.0] {
                let out = apply_op(op, xs, strength);
                assert_eq!(out.size(), xs.size(), "{op}");
                assert_eq!(out.kind(), Kind::Float, "{op}");
                let low = out.min().double_value(&[]);
                let high = out.max().double_value(&[]);
                assert!(
                    low >= 0.0 && high <= 1.0,
                    "{op} at {strength}: range [{low}, {high}]"
                );
            }
        }
    }

    #[test]
    fn strong_ops_do_change_images() {
        let xs = images();
        for op in [
            "rotate",
            "solarize",
            "contrast",
            "cutout",
            "translate-x",
            "equalize",
            "auto-contrast",
        ] {
            let out = apply_op(op, &xs, 1.0);
            assert!(
                !out.allclose(&xs, 1e-3, 1e-3, false),
                "{op} did nothing at full strength"
            );
        }
    }

    #[test]
    fn randaugment_batch_keeps_shape_and_changes_images() {
        let xs = images();
        let augment = RandAugment::from_plan(&RandAugmentPlan {
            ops: 2,
            magnitude: 9.0,
            op_list: vec!["rotate".into(), "cutout".into()],
            cutout: 0.0,
        });
        let out = augment.apply(&xs);
        assert_eq!(out.size(), xs.size());
        assert!(!out.allclose(&xs, 1e-3, 1e-3, false));
        let flipped = flip_and_shift(&xs);
        assert_eq!(flipped.size(), xs.size());
    }

    #[test]
    fn the_masked_path_applies_the_operation_each_image_drew() {
        // Operations without randomness: both paths must give the same images.
        let xs = images_with(1);
        let augment = RandAugment::from_plan(&RandAugmentPlan {
            ops: 1,
            magnitude: 7.0,
            op_list: vec![
                "identity".into(),
                "auto-contrast".into(),
                "equalize".into(),
                "posterize".into(),
                "solarize".into(),
            ],
            cutout: 0.0,
        });
        // Every operation drawn at least once, one of them twice.
        let choice = Tensor::from_slice(&[3i64, 0, 4, 1, 2, 4]);
        let gathered = augment.apply_chosen(&xs, &choice, false);
        let masked = augment.apply_chosen(&xs, &choice, true);
        assert!(masked.equal(&gathered));
        for (image, op) in [(0, "posterize"), (2, "solarize"), (3, "auto-contrast")] {
            let alone = apply_op(op, &xs.narrow(0, image, 1), augment.strength);
            assert!(masked.narrow(0, image, 1).equal(&alone), "image {image}");
        }
        assert!(masked.get(1).equal(&xs.get(1)));
    }

    #[test]
    fn plan_cutout_grays_a_square_of_every_image_even_without_ops() {
        let xs = Tensor::zeros([5, 1, 28, 28], (Kind::Float, Device::Cpu));
        let augment = RandAugment::from_plan(&RandAugmentPlan {
            ops: 0,
            magnitude: 0.0,
            op_list: Vec::new(),
            cutout: 0.5,
        });
        assert!(augment.is_active());
        let out = augment.apply(&xs);
        for image in 0..5 {
            // A 14x14 square, clipped by the border to no less than 7x7.
            let gray = out.get(image).eq(0.5).sum(Kind::Int64).int64_value(&[]);
            assert!(
                (49..=196).contains(&gray),
                "image {image}: {gray} gray pixels"
            );
            let other = out.get(image).ne(0.5).logical_and(&out.get(image).ne(0.0));
            assert_eq!(other.sum(Kind::Int64).int64_value(&[]), 0);
        }
    }
}

//! The global filter and class balance of Noisy Student (reference `filter_unlabel.py`), computed
//! from per-shard confidence histograms.
//!
//! Examples whose top probability is below `min_confidence` are dropped. With balancing, for each
//! class (by the teacher's top class) `per_class` examples are wanted: the highest confidence
//! threshold, in 0.01 steps and never below `min_confidence`, whose count reaches `per_class` is
//! taken, and each kept example is used `per_class / kept_c` times in expectation (stochastic
//! rounding). Abundant classes keep their most confident examples; rare ones are duplicated.
//!
//! Each labeler counts its shard into a [`Histogram`] (101 confidence bins per class, plus the
//! count that passes `min_confidence`); the coordinator adds them up and derives a [`Rule`] per
//! class, never loading a label. Whoever reads the shards (the student's loader) applies the rule
//! example by example with [`Selection::uses`]: the stochastic rounding hashes the seed with the
//! example id, so the result does not depend on shard order or on who reads.
//! [`filter_and_balance`] is the brute-force version over every example at once, the reference
//! the tests hold the histogram path to.

use serde::{Deserialize, Serialize};

/// Confidence bins of a histogram: bin `s` holds confidences in `[s/100, (s+1)/100)`.
pub const CONFIDENCE_BINS: usize = 101;

/// Settings of the filter.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectionConfig {
    pub classes: usize,
    pub min_confidence: f32,
    pub balance: bool,
    /// Examples wanted per class; 0 means examples / classes.
    pub per_class: u64,
    pub seed: u64,
}

fn threshold_of_step(step: usize) -> f32 {
    step as f32 / 100.0
}

/// The bin of a confidence: the largest `s` with `confidence >= s / 100` (as f32), so that
/// "confidence >= s / 100" and "bin >= s" agree exactly.
pub fn confidence_bin(confidence: f32) -> usize {
    let mut step = ((confidence * 100.0).floor().max(0.0) as usize).min(CONFIDENCE_BINS - 1);
    while step > 0 && confidence < threshold_of_step(step) {
        step -= 1;
    }
    while step + 1 < CONFIDENCE_BINS && confidence >= threshold_of_step(step + 1) {
        step += 1;
    }
    step
}

/// Per-class counts of top-class confidences of some examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub classes: usize,
    /// `classes x CONFIDENCE_BINS`, row-major. Written sparse ([`sparse_bins`]).
    #[serde(with = "sparse_bins")]
    pub bins: Vec<u64>,
    /// Per class, the examples whose confidence is at least `min_confidence`.
    pub passing: Vec<u64>,
    pub min_confidence: f32,
    /// Examples labeled NaN (their image did not decode), which no class counts and no filter
    /// keeps. (Histograms written before they were counted apart hold them in bin 0.)
    #[serde(default, skip_serializing_if = "is_zero")]
    pub undecodable: u64,
}

fn is_zero(count: &u64) -> bool {
    *count == 0
}

impl Histogram {
    pub fn new(classes: usize, min_confidence: f32) -> Histogram {
        Histogram {
            classes,
            bins: vec![0; classes * CONFIDENCE_BINS],
            passing: vec![0; classes],
            min_confidence,
            undecodable: 0,
        }
    }

    /// Counts one example by its top class and that class's probability.
    pub fn add(&mut self, class: u16, confidence: f32) {
        let class = class as usize;
        if confidence.is_nan() {
            self.undecodable += 1;
            return;
        }
        if class >= self.classes {
            return;
        }
        self.bins[class * CONFIDENCE_BINS + confidence_bin(confidence)] += 1;
        if confidence >= self.min_confidence {
            self.passing[class] += 1;
        }
    }

    /// Adds another histogram of the same shape.
    pub fn merge(&mut self, other: &Histogram) -> Result<(), String> {
        if other.classes != self.classes || other.min_confidence != self.min_confidence {
            return Err(format!(
                "histograms disagree: {} classes at min confidence {} vs {} at {}",
                self.classes, self.min_confidence, other.classes, other.min_confidence
            ));
        }
        for (total, count) in self.bins.iter_mut().zip(&other.bins) {
            *total += count;
        }
        for (total, count) in self.passing.iter_mut().zip(&other.passing) {
            *total += count;
        }
        self.undecodable += other.undecodable;
        Ok(())
    }

    /// Examples counted, those labeled NaN included.
    pub fn total(&self) -> u64 {
        self.bins.iter().sum::<u64>() + self.undecodable
    }

    /// Examples of `class` whose confidence is at least `step / 100`.
    fn at_least(&self, class: usize, step: usize) -> u64 {
        self.bins[class * CONFIDENCE_BINS + step..(class + 1) * CONFIDENCE_BINS]
            .iter()
            .sum()
    }
}

/// A histogram's bins as files hold them (the run's state, manifests, selections): the number
/// of bins and the `[bin, count]` pairs of those not zero. A shard of 8,192 examples has at most
/// 8,192 non-zero bins, of 101,000 for 1,000 classes: written dense, a round of ImageNet's
/// shards made the state file that the coordinator rewrites at every task hundreds of MB.
/// Bins written dense (every count, by builds before 2026-12-05) read too.
mod sparse_bins {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// More bins than any plan's classes make (`data.classes` x 101) is a corrupt file, not an
    /// allocation to attempt.
    const MOST_BINS: usize = 1 << 28;

    #[derive(Serialize, Deserialize)]
    struct Sparse {
        len: usize,
        nonzero: Vec<(usize, u64)>,
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Dense(Vec<u64>),
        Sparse(Sparse),
    }

    pub fn serialize<S: Serializer>(bins: &[u64], serializer: S) -> Result<S::Ok, S::Error> {
        Sparse {
            len: bins.len(),
            nonzero: bins
                .iter()
                .enumerate()
                .filter(|(_, &count)| count > 0)
                .map(|(bin, &count)| (bin, count))
                .collect(),
        }
        .serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u64>, D::Error> {
        match Written::deserialize(deserializer)? {
            Written::Dense(bins) => Ok(bins),
            Written::Sparse(Sparse { len, nonzero }) => {
                if len > MOST_BINS {
                    return Err(serde::de::Error::custom(format!(
                        "a histogram of {len} bins"
                    )));
                }
                let mut bins = vec![0; len];
                for (bin, count) in nonzero {
                    let slot = bins.get_mut(bin).ok_or_else(|| {
                        serde::de::Error::custom(format!("histogram bin {bin} of {len}"))
                    })?;
                    *slot = count;
                }
                Ok(bins)
            }
        }
    }
}

/// What the filter keeps of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    /// Examples of the class with at least this confidence are kept.
    pub threshold: f32,
    /// How many times each kept example is used, in expectation.
    pub ratio: f64,
    /// Examples of the class at or above the threshold; with a ratio under 1 the hash uses
    /// about `kept * ratio` of them ([`Selection::kept`]).
    pub kept: u64,
}

/// The filter's decision for a round: one rule per class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    pub seed: u64,
    pub rules: Vec<Rule>,
}

impl Selection {
    /// Computes the rules from the histogram of every example.
    pub fn from_histogram(histogram: &Histogram, config: &SelectionConfig) -> Selection {
        let wanted = if config.per_class > 0 {
            config.per_class
        } else {
            histogram.total() / config.classes.max(1) as u64
        };
        let rules = (0..config.classes)
            .map(|class| {
                let passing = histogram.passing.get(class).copied().unwrap_or(0);
                if !config.balance {
                    return Rule {
                        threshold: config.min_confidence,
                        ratio: 1.0,
                        kept: passing,
                    };
                }
                if passing == 0 || wanted == 0 {
                    return Rule {
                        threshold: config.min_confidence,
                        ratio: 0.0,
                        kept: 0,
                    };
                }
                let mut rule = Rule {
                    threshold: config.min_confidence,
                    ratio: 0.0,
                    kept: passing,
                };
                for step in (1..CONFIDENCE_BINS).rev() {
                    let threshold = threshold_of_step(step);
                    if threshold <= config.min_confidence {
                        break;
                    }
                    let count = histogram.at_least(class, step);
                    if count >= wanted {
                        rule = Rule {
                            threshold,
                            ratio: 0.0,
                            kept: count,
                        };
                        break;
                    }
                }
                rule.ratio = wanted as f64 / rule.kept as f64;
                rule
            })
            .collect();
        Selection {
            seed: config.seed,
            rules,
        }
    }

    /// How many times the student uses the example `example_id` whose top class is `class` with
    /// probability `confidence`.
    pub fn uses(&self, example_id: i64, class: u16, confidence: f32) -> u32 {
        let Some(rule) = self.rules.get(class as usize) else {
            return 0;
        };
        // A confidence that is not a number (a teacher that diverged) never passes.
        if rule.kept == 0 || confidence.is_nan() || confidence < rule.threshold {
            return 0;
        }
        let whole = rule.ratio.floor();
        let extra = u32::from(unit_hash(self.seed, example_id) < rule.ratio - whole);
        whole as u32 + extra
    }

    /// Distinct examples kept: those at or above their class's threshold, or, of a class
    /// subsampled to its share (a ratio under 1: more examples at the threshold than it
    /// wants), that share, which the hash draws in expectation.
    pub fn kept(&self) -> u64 {
        self.rules
            .iter()
            .map(|rule| match rule.ratio < 1.0 {
                true => (rule.kept as f64 * rule.ratio).round() as u64,
                false => rule.kept,
            })
            .sum()
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform number in [0, 1) determined by the seed and the example id.
fn unit_hash(seed: u64, example_id: i64) -> f64 {
    let hash = splitmix64(seed ^ splitmix64(example_id as u64));
    (hash >> 11) as f64 / (1u64 << 53) as f64
}

/// Brute force over every `(example_id, top_class, confidence)` at once: for each example, how
/// many times the student uses it. The histogram path must agree with it exactly.
pub fn filter_and_balance(examples: &[(i64, u16, f32)], config: &SelectionConfig) -> Vec<u32> {
    let passes = |confidence: f32| confidence >= config.min_confidence;
    if !config.balance {
        return examples
            .iter()
            .map(|&(_, _, confidence)| u32::from(passes(confidence)))
            .collect();
    }
    let wanted = if config.per_class > 0 {
        config.per_class
    } else {
        (examples.len() / config.classes.max(1)) as u64
    };
    let mut rules = Vec::with_capacity(config.classes);
    for class in 0..config.classes {
        let members: Vec<f32> = examples
            .iter()
            .filter(|&&(_, c, confidence)| c as usize == class && passes(confidence))
            .map(|&(_, _, confidence)| confidence)
            .collect();
        if members.is_empty() || wanted == 0 {
            rules.push(Rule {
                threshold: config.min_confidence,
                ratio: 0.0,
                kept: 0,
            });
            continue;
        }
        let mut threshold = config.min_confidence;
        let mut step = 100usize;
        while threshold_of_step(step) > config.min_confidence {
            let candidate = threshold_of_step(step);
            if members.iter().filter(|&&c| c >= candidate).count() as u64 >= wanted {
                threshold = candidate;
                break;
            }
            step -= 1;
        }
        let kept = members.iter().filter(|&&c| c >= threshold).count() as u64;
        rules.push(Rule {
            threshold,
            ratio: wanted as f64 / kept as f64,
            kept,
        });
    }
    let selection = Selection {
        seed: config.seed,
        rules,
    };
    examples
        .iter()
        .map(|&(id, class, confidence)| selection.uses(id, class, confidence))
        .collect()
}

#[cfg(test)]
mod tests {
    /// Files hold a histogram's non-zero bins only, and read back the same; a histogram
    /// written dense by an earlier build reads too.
    #[test]
    fn histograms_are_written_sparse_and_read_either_way() {
        let mut histogram = super::Histogram::new(1000, 0.3);
        for (class, confidence) in [(3u16, 0.95f32), (3, 0.951), (999, 0.2), (0, 1.0)] {
            histogram.add(class, confidence);
        }
        let written = serde_json::to_string(&histogram).expect("json");
        let read: super::Histogram = serde_json::from_str(&written).expect("read back");
        assert_eq!(read, histogram);
        let mut dense = serde_json::to_value(&histogram).expect("value");
        dense["bins"] = serde_json::json!(histogram.bins);
        // One count a class remains (`passing`); the bins, 101 a class, are three pairs.
        let dense_size = dense.to_string().len();
        assert!(
            written.len() * 50 < dense_size,
            "{} bytes against {dense_size} dense",
            written.len()
        );
        let read: super::Histogram = serde_json::from_value(dense).expect("dense reads");
        assert_eq!(read, histogram);
        let mut corrupt = serde_json::to_value(&histogram).expect("value");
        corrupt["bins"] = serde_json::json!({"len": 4, "nonzero": [[7, 1]]});
        let error = serde_json::from_value::<super::Histogram>(corrupt).expect_err("corrupt");
        assert!(
            error.to_string().contains("histogram bin 7 of 4"),
            "{error}"
        );
    }

    /// An example labeled NaN (its image did not decode) counts apart: in the total, in no
    /// class, never passing; sums and files keep the count, and files written before read as
    /// none.
    #[test]
    fn examples_labeled_nan_are_counted_apart() {
        let mut histogram = super::Histogram::new(10, 0.3);
        histogram.add(4, f32::NAN);
        histogram.add(4, 0.9);
        assert_eq!((histogram.total(), histogram.undecodable), (2, 1));
        assert_eq!(histogram.bins.iter().sum::<u64>(), 1);
        assert_eq!(histogram.passing[4], 1);
        let mut sum = histogram.clone();
        sum.merge(&histogram).expect("merge");
        assert_eq!((sum.total(), sum.undecodable), (4, 2));
        let written = serde_json::to_value(&histogram).expect("json");
        assert_eq!(written["undecodable"], 1);
        let read: super::Histogram = serde_json::from_value(written.clone()).expect("read");
        assert_eq!(read, histogram);
        let mut earlier = written;
        earlier
            .as_object_mut()
            .expect("object")
            .remove("undecodable");
        let read: super::Histogram = serde_json::from_value(earlier).expect("read");
        assert_eq!(read.undecodable, 0);
    }

    use super::*;
    use rand::{Rng, SeedableRng};

    fn config(balance: bool, per_class: u64) -> SelectionConfig {
        SelectionConfig {
            classes: 3,
            min_confidence: 0.3,
            balance,
            per_class,
            seed: 0,
        }
    }

    fn numbered(examples: &[(u16, f32)]) -> Vec<(i64, u16, f32)> {
        examples
            .iter()
            .enumerate()
            .map(|(i, &(class, confidence))| (i as i64, class, confidence))
            .collect()
    }

    fn through_histograms(
        examples: &[(i64, u16, f32)],
        config: &SelectionConfig,
        shards: usize,
    ) -> Vec<u32> {
        // Count each shard on its own, then merge, as labelers and the coordinator do.
        let mut total = Histogram::new(config.classes, config.min_confidence);
        for shard in examples.chunks(examples.len().div_ceil(shards).max(1)) {
            let mut histogram = Histogram::new(config.classes, config.min_confidence);
            for &(_, class, confidence) in shard {
                histogram.add(class, confidence);
            }
            total.merge(&histogram).expect("same shape");
        }
        let selection = Selection::from_histogram(&total, config);
        examples
            .iter()
            .map(|&(id, class, confidence)| selection.uses(id, class, confidence))
            .collect()
    }

    #[test]
    fn bins_agree_with_threshold_comparisons() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut values: Vec<f32> = (0..=100).map(threshold_of_step).collect();
        // Each threshold's float just below it (0.0 has none above negative zero's bits).
        values.extend(
            (0..=100)
                .filter_map(|s| threshold_of_step(s).to_bits().checked_sub(1))
                .map(f32::from_bits),
        );
        values.extend((0..10_000).map(|_| rng.gen::<f32>()));
        for value in values.into_iter().filter(|v| (0.0..=1.0).contains(v)) {
            let bin = confidence_bin(value);
            for step in 0..CONFIDENCE_BINS {
                assert_eq!(
                    value >= threshold_of_step(step),
                    bin >= step,
                    "{value} {step}"
                );
            }
        }
    }

    #[test]
    fn a_confidence_that_is_not_a_number_is_never_used() {
        let examples = numbered(&[(0, 0.9), (0, f32::NAN), (1, f32::NAN)]);
        assert_eq!(
            through_histograms(&examples, &config(false, 0), 1),
            vec![1, 0, 0]
        );
    }

    #[test]
    fn without_balance_only_confidence_filters() {
        let examples = numbered(&[(0, 0.9), (1, 0.2), (2, 0.3), (0, 0.29)]);
        assert_eq!(
            filter_and_balance(&examples, &config(false, 0)),
            vec![1, 0, 1, 0]
        );
        assert_eq!(
            through_histograms(&examples, &config(false, 0), 2),
            vec![1, 0, 1, 0]
        );
    }

    #[test]
    fn kept_counts_the_distinct_examples_a_subsampled_class_uses() {
        // 100 examples of class 0 in one confidence bin, 10 wanted: the threshold cannot part
        // them, the hash uses about a tenth.
        let examples: Vec<(u16, f32)> = (0..100).map(|_| (0, 0.955)).collect();
        let examples = numbered(&examples);
        let config = config(true, 10);
        let mut histogram = Histogram::new(config.classes, config.min_confidence);
        for &(_, class, confidence) in &examples {
            histogram.add(class, confidence);
        }
        let selection = Selection::from_histogram(&histogram, &config);
        assert_eq!(selection.rules[0].kept, 100);
        assert_eq!(selection.kept(), 10);
        let distinct = examples
            .iter()
            .filter(|&&(id, class, confidence)| selection.uses(id, class, confidence) > 0)
            .count();
        assert!(
            (5..=15).contains(&distinct),
            "{distinct} distinct examples used"
        );
        // A rare class duplicated (a ratio over 1) keeps every example once.
        let rare = numbered(&[(1, 0.9), (1, 0.8)]);
        let mut histogram = Histogram::new(config.classes, config.min_confidence);
        for &(_, class, confidence) in &rare {
            histogram.add(class, confidence);
        }
        assert_eq!(Selection::from_histogram(&histogram, &config).kept(), 2);
    }

    #[test]
    fn abundant_class_keeps_its_most_confident() {
        // Class 0: 10 examples with confidences 0.40 .. 0.95; 4 wanted.
        let examples: Vec<(u16, f32)> = (0..10).map(|i| (0, 0.40 + 0.06 * i as f32)).collect();
        let uses = filter_and_balance(&numbered(&examples), &config(true, 4));
        assert_eq!(uses.iter().sum::<u32>(), 4);
        assert_eq!(&uses[6..], &[1, 1, 1, 1]);
        assert!(uses[..6].iter().all(|&u| u == 0));
    }

    #[test]
    fn rare_class_is_duplicated() {
        let mut examples = vec![(1u16, 0.8f32), (1, 0.9)];
        examples.extend((0..30).map(|_| (0u16, 0.99f32)));
        let uses = filter_and_balance(&numbered(&examples), &config(true, 10));
        assert_eq!(uses[0], 5);
        assert_eq!(uses[1], 5);
        // Class 0 (30 ties at 0.99) is sampled down to about 10 uses.
        let class_zero: u32 = uses[2..].iter().sum();
        assert!((4..=16).contains(&class_zero), "{class_zero}");
        assert!(uses[2..].iter().all(|&u| u <= 1));
    }

    #[test]
    fn low_confidence_never_kept_even_when_balancing() {
        let examples = numbered(&[(2u16, 0.1f32), (2, 0.25), (2, 0.5)]);
        let uses = filter_and_balance(&examples, &config(true, 6));
        assert_eq!(uses, vec![0, 0, 6]);
    }

    #[test]
    fn stochastic_rounding_keeps_the_expected_total() {
        let examples: Vec<(u16, f32)> = (0..7).map(|_| (0u16, 0.9f32)).collect();
        let mut total = 0u64;
        for seed in 0..200 {
            let mut settings = config(true, 10);
            settings.seed = seed;
            let uses = filter_and_balance(&numbered(&examples), &settings);
            assert!(uses.iter().all(|&u| u == 1 || u == 2));
            total += uses.iter().map(|&u| u as u64).sum::<u64>();
        }
        let mean = total as f64 / 200.0;
        assert!((mean - 10.0).abs() < 0.5, "{mean}");
    }

    #[test]
    fn histograms_agree_with_brute_force_on_random_data() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for case in 0..60 {
            let classes = rng.gen_range(1..12usize);
            let len = rng.gen_range(0..3_000usize);
            // Skewed classes and confidences on and around the 0.01 grid.
            let examples: Vec<(i64, u16, f32)> = (0..len)
                .map(|i| {
                    let class = (rng.gen::<f32>().powi(2) * classes as f32) as u16;
                    let confidence = if rng.gen_bool(0.3) {
                        rng.gen_range(0..=100) as f32 / 100.0
                    } else {
                        rng.gen::<f32>().sqrt()
                    };
                    let id = rng.gen_range(0..1_000_000i64) * 1_000 + i as i64;
                    (id, class.min(classes as u16 - 1), confidence)
                })
                .collect();
            let settings = SelectionConfig {
                classes,
                min_confidence: [0.0, 0.3, 0.305, 0.5, 0.9][case % 5],
                balance: case % 7 != 0,
                per_class: [0, 1, 50, 400, 5_000][case % 5],
                seed: case as u64,
            };
            let expected = filter_and_balance(&examples, &settings);
            for shards in [1, 3, 17] {
                assert_eq!(
                    through_histograms(&examples, &settings, shards),
                    expected,
                    "case {case}, {shards} shards"
                );
            }
        }
    }

    #[test]
    fn histograms_of_different_settings_do_not_merge() {
        let mut a = Histogram::new(3, 0.3);
        let b = Histogram::new(3, 0.5);
        assert!(a.merge(&b).is_err());
    }
}

//! The global filter and class balance of Noisy Student (reference `filter_unlabel.py`).
//!
//! Examples whose top probability is below `min_confidence` are dropped. With balancing, for each
//! class (by the teacher's top class) `per_class` examples are wanted: the highest confidence
//! threshold, in 0.01 steps and never below `min_confidence`, whose count reaches `per_class` is
//! taken, and each kept example is used `per_class / kept_c` times in expectation (stochastic
//! rounding). Abundant classes keep their most confident examples; rare ones are duplicated.

use rand::{Rng, SeedableRng};

/// Settings of [`filter_and_balance`].
#[derive(Debug, Clone, PartialEq)]
pub struct SelectionConfig {
    pub classes: usize,
    pub min_confidence: f32,
    pub balance: bool,
    /// Examples wanted per class; 0 means examples / classes.
    pub per_class: u64,
    pub seed: u64,
}

/// Returns, for each `(top_class, confidence)` example, how many times the student uses it.
pub fn filter_and_balance(examples: &[(u16, f32)], config: &SelectionConfig) -> Vec<u32> {
    let mut uses = vec![0u32; examples.len()];
    let passes = |confidence: f32| confidence >= config.min_confidence;
    if !config.balance {
        for (use_count, &(_, confidence)) in uses.iter_mut().zip(examples) {
            *use_count = u32::from(passes(confidence));
        }
        return uses;
    }
    let wanted = if config.per_class > 0 {
        config.per_class
    } else {
        (examples.len() / config.classes.max(1)) as u64
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    for class in 0..config.classes {
        let members: Vec<usize> = (0..examples.len())
            .filter(|&i| examples[i].0 as usize == class && passes(examples[i].1))
            .collect();
        if members.is_empty() || wanted == 0 {
            continue;
        }
        let threshold = balance_threshold(
            members.iter().map(|&i| examples[i].1),
            config.min_confidence,
            wanted,
        );
        let kept: Vec<usize> = members
            .into_iter()
            .filter(|&i| examples[i].1 >= threshold)
            .collect();
        let ratio = wanted as f64 / kept.len() as f64;
        for i in kept {
            let whole = ratio.floor();
            let extra = u32::from(rng.gen::<f64>() < ratio - whole);
            uses[i] = whole as u32 + extra;
        }
    }
    uses
}

/// The highest threshold `1.00, 0.99, ...` (never below `min_confidence`) that keeps at least
/// `wanted` of `confidences`; `min_confidence` when none does.
fn balance_threshold(
    confidences: impl Iterator<Item = f32> + Clone,
    min_confidence: f32,
    wanted: u64,
) -> f32 {
    let mut step = 100i32;
    loop {
        let threshold = step as f32 / 100.0;
        if threshold <= min_confidence {
            return min_confidence;
        }
        let count = confidences.clone().filter(|&c| c >= threshold).count() as u64;
        if count >= wanted {
            return threshold;
        }
        step -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(balance: bool, per_class: u64) -> SelectionConfig {
        SelectionConfig {
            classes: 3,
            min_confidence: 0.3,
            balance,
            per_class,
            seed: 0,
        }
    }

    #[test]
    fn without_balance_only_confidence_filters() {
        let examples = [(0, 0.9), (1, 0.2), (2, 0.3), (0, 0.29)];
        assert_eq!(
            filter_and_balance(&examples, &config(false, 0)),
            vec![1, 0, 1, 0]
        );
    }

    #[test]
    fn abundant_class_keeps_its_most_confident() {
        // Class 0: 10 examples with confidences 0.40 .. 0.95; 4 wanted.
        let examples: Vec<(u16, f32)> = (0..10).map(|i| (0, 0.40 + 0.06 * i as f32)).collect();
        let uses = filter_and_balance(&examples, &config(true, 4));
        assert_eq!(uses.iter().sum::<u32>(), 4);
        assert_eq!(&uses[6..], &[1, 1, 1, 1]);
        assert!(uses[..6].iter().all(|&u| u == 0));
    }

    #[test]
    fn rare_class_is_duplicated() {
        let mut examples = vec![(1u16, 0.8f32), (1, 0.9)];
        examples.extend((0..30).map(|_| (0u16, 0.99f32)));
        let uses = filter_and_balance(&examples, &config(true, 10));
        assert_eq!(uses[0], 5);
        assert_eq!(uses[1], 5);
        // Class 0 (30 ties at 0.99) is sampled down to about 10 uses.
        let class_zero: u32 = uses[2..].iter().sum();
        assert!((5..=15).contains(&class_zero), "{class_zero}");
        assert!(uses[2..].iter().all(|&u| u <= 1));
    }

    #[test]
    fn low_confidence_never_kept_even_when_balancing() {
        let examples = [(2u16, 0.1f32), (2, 0.25), (2, 0.5)];
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
            let uses = filter_and_balance(&examples, &settings);
            assert!(uses.iter().all(|&u| u == 1 || u == 2));
            total += uses.iter().map(|&u| u as u64).sum::<u64>();
        }
        let mean = total as f64 / 200.0;
        assert!((mean - 10.0).abs() < 0.5, "{mean}");
    }
}

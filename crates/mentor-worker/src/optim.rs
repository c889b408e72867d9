//! Optimizers with weight decay on weights only (ALGORITHMS.md section 1): tensors of two or
//! more dimensions (convolution and linear weights) are decayed; biases and normalisation
//! parameters (one dimension) sit in a second parameter group without decay.

use std::collections::HashMap;

use tch::nn::{self, OptimizerConfig};
use tch::Tensor;

/// The optimizer parameter group of biases and normalisation parameters.
const UNDECAYED: usize = 1;

/// Whether weight decay applies to `variable`: weights (two or more dimensions) yes, biases
/// and normalisation parameters no.
fn decays(variable: &Tensor) -> bool {
    variable.dim() >= 2
}

/// Builds `config` over the trainable variables of `vs` at `rate`, with the weight decay of
/// `config` on weights only.
pub fn build_optimizer(
    vs: &nn::VarStore,
    config: impl OptimizerConfig,
    rate: f64,
) -> Result<nn::Optimizer, String> {
    let undecayed = {
        let mut variables = vs
            .variables_
            .lock()
            .map_err(|_| "the model's variable store is poisoned".to_string())?;
        let mut any = false;
        for variable in variables.trainable_variables.iter_mut() {
            if !decays(&variable.tensor) {
                variable.group = UNDECAYED;
                any = true;
            }
        }
        any
    };
    let mut optimizer = config
        .build(vs, rate)
        .map_err(|e| format!("failed to build the optimizer: {e}"))?;
    if undecayed {
        optimizer.set_weight_decay_group(UNDECAYED, 0.0);
    }
    Ok(optimizer)
}

/// SGD with momentum (Nesterov or not) and weight decay on weights only, computing what
/// `torch.optim.SGD` computes (no dampening), with its momentum buffers readable and writable
/// so that a long run can checkpoint them and resume exactly: libtorch's optimizer keeps them
/// out of reach of tch.
#[derive(Debug)]
pub struct Sgd {
    variables: Vec<Tensor>,
    buffers: Vec<Option<Tensor>>,
    /// `-learning_rate`, `weight_decay` and `momentum` as one-element tensors on the
    /// variables' device: `addcmul_` with one of them is a scaled add in one kernel (three
    /// with a scratch copy). On a GPU the step of a small model is bound by its kernel count.
    factors: Factors,
    clearer: GradientClearer,
    learning_rate: f64,
    momentum: f64,
    weight_decay: f64,
    nesterov: bool,
}

impl Sgd {
    /// Over the trainable variables of `vs`; weights (two or more dimensions) get
    /// `weight_decay`, biases and normalisation parameters none.
    pub fn new(
        vs: &nn::VarStore,
        learning_rate: f64,
        momentum: f64,
        weight_decay: f64,
        nesterov: bool,
    ) -> Result<Sgd, String> {
        let variables = vs.trainable_variables();
        let clearer = GradientClearer::new(&variables)?;
        let device = variables.first().map_or(tch::Device::Cpu, Tensor::device);
        let factor = |value: f64| Tensor::from(value as f32).to_device(device);
        Ok(Sgd {
            buffers: variables.iter().map(|_| None).collect(),
            factors: Factors {
                negative_rate: factor(-learning_rate),
                weight_decay: factor(weight_decay),
                momentum: factor(momentum),
            },
            clearer,
            variables,
            learning_rate,
            momentum,
            weight_decay,
            nesterov,
        })
    }

    pub fn set_lr(&mut self, learning_rate: f64) {
        if learning_rate != self.learning_rate {
            let _ = self.factors.negative_rate.fill_(-learning_rate);
        }
        self.learning_rate = learning_rate;
    }

    /// Drops the gradients (the next backward writes them afresh); zeroes them in place if
    /// libtorch cannot.
    pub fn zero_grad(&mut self) {
        self.clearer.clear(&self.variables);
    }

    /// `d = g + wd * p` (weights), `buf = momentum * buf + d` (`d` on the first step), then
    /// `d + momentum * buf` (Nesterov) or `buf` times `-lr` added to `p`. In place and without
    /// allocation (temporaries of every step cost a quarter of a Meta Pseudo Labels step on a
    /// CPU in page faults), five kernels a variable with Nesterov momentum and weight decay.
    pub fn step(&mut self) {
        let factors = &self.factors;
        tch::no_grad(|| {
            for (index, variable) in self.variables.iter_mut().enumerate() {
                let mut direction = variable.grad();
                if !direction.defined() {
                    continue;
                }
                if self.weight_decay != 0.0 && decays(variable) {
                    let _ = direction.addcmul_(variable, &factors.weight_decay);
                }
                if self.momentum != 0.0 {
                    let buffer = match &mut self.buffers[index] {
                        Some(buffer) => {
                            let _ = buffer.g_mul_scalar_(self.momentum).g_add_(&direction);
                            buffer
                        }
                        empty => empty.insert(direction.copy()),
                    };
                    if self.nesterov {
                        let _ = direction.addcmul_(buffer, &factors.momentum);
                    } else {
                        direction.copy_(buffer);
                    }
                }
                let _ = variable.addcmul_(&direction, &factors.negative_rate);
            }
        });
    }

    /// The momentum buffers, by variable index (`None` before the variable's first step).
    pub fn buffers(&self) -> &[Option<Tensor>] {
        &self.buffers
    }

    /// Replaces the momentum buffer of variable `index` (same shape as the variable).
    pub fn set_buffer(&mut self, index: usize, value: &Tensor) -> Result<(), String> {
        let variable = self
            .variables
            .get(index)
            .ok_or_else(|| format!("no variable {index} ({} in all)", self.variables.len()))?;
        if variable.size() != value.size() {
            return Err(format!(
                "momentum buffer {index} has shape {:?}, its variable {:?}",
                value.size(),
                variable.size()
            ));
        }
        self.buffers[index] = Some(value.to_device(variable.device()).copy());
        Ok(())
    }
}

/// Drops the gradients of an optimizer's variables (see [`Sgd::zero_grad`]): libtorch's
/// optimizer over them, used for nothing else, whose `zero_grad` sets them to none, which tch
/// offers no other way to do; the next backward then writes fresh gradients instead of adding
/// into zeroed ones.
#[derive(Debug)]
struct GradientClearer(tch::COptimizer);

impl GradientClearer {
    fn new(variables: &[Tensor]) -> Result<GradientClearer, String> {
        let error = |e: tch::TchError| format!("failed to build the optimizer: {e}");
        let mut clearer = tch::COptimizer::sgd(0.0, 0.0, 0.0, 0.0, false).map_err(error)?;
        for variable in variables {
            clearer.add_parameters(variable, 0).map_err(error)?;
        }
        Ok(GradientClearer(clearer))
    }

    /// Drops the gradients of `variables` (those it was made over); zeroes them in place if
    /// libtorch cannot.
    fn clear(&mut self, variables: &[Tensor]) {
        if self.0.zero_grad().is_err() {
            for variable in variables {
                let mut grad = variable.grad();
                if grad.defined() {
                    let _ = grad.detach_();
                    let _ = grad.zero_();
                }
            }
        }
    }
}

/// The step's scalars as one-element f32 tensors (see [`Sgd`]).
#[derive(Debug)]
struct Factors {
    negative_rate: Tensor,
    weight_decay: Tensor,
    momentum: Tensor,
}

/// Adam with weight decay on weights only (added to the gradient, as `torch.optim.Adam` does),
/// computing what libtorch's Adam computes (betas 0.9 and 0.999, epsilon 1e-8), with its moment
/// estimates and step count readable and writable so that a training can checkpoint them and
/// resume exactly. One step count for all variables (libtorch counts per variable: the two
/// differ only for a variable that got no gradient at some steps, which no model here has).
#[derive(Debug)]
pub struct Adam {
    variables: Vec<Tensor>,
    /// First and second moment estimates, by variable (`None` before its first step).
    moments: Vec<Option<(Tensor, Tensor)>>,
    steps: u64,
    clearer: GradientClearer,
    learning_rate: f64,
    weight_decay: f64,
}

impl Adam {
    const BETAS: (f64, f64) = (0.9, 0.999);
    const EPSILON: f64 = 1e-8;

    pub fn new(vs: &nn::VarStore, learning_rate: f64, weight_decay: f64) -> Result<Adam, String> {
        let variables = vs.trainable_variables();
        let clearer = GradientClearer::new(&variables)?;
        Ok(Adam {
            moments: variables.iter().map(|_| None).collect(),
            variables,
            steps: 0,
            clearer,
            learning_rate,
            weight_decay,
        })
    }

    /// Drops the gradients (see [`Sgd::zero_grad`]).
    pub fn zero_grad(&mut self) {
        self.clearer.clear(&self.variables);
    }

    /// `g + wd * p` (weights) into both moment estimates, then `p -= lr / (1 - beta1^t) * m /
    /// (sqrt(v / (1 - beta2^t)) + eps)`.
    pub fn step(&mut self) {
        let (beta1, beta2) = Self::BETAS;
        self.steps += 1;
        let first_correction = 1.0 - beta1.powi(self.steps as i32);
        let second_correction = (1.0 - beta2.powi(self.steps as i32)).sqrt();
        tch::no_grad(|| {
            for (index, variable) in self.variables.iter_mut().enumerate() {
                let mut gradient = variable.grad();
                if !gradient.defined() {
                    continue;
                }
                if self.weight_decay != 0.0 && decays(variable) {
                    let _ = gradient.g_add_(&(&*variable * self.weight_decay));
                }
                let (first, second) = self.moments[index]
                    .get_or_insert_with(|| (gradient.zeros_like(), gradient.zeros_like()));
                let _ = first.g_mul_scalar_(beta1);
                let _ = first.g_add_(&(&gradient * (1.0 - beta1)));
                let _ = second.g_mul_scalar_(beta2);
                let _ = second.g_add_(&(&gradient * &gradient * (1.0 - beta2)));
                let denominator = second.sqrt() / second_correction + Self::EPSILON;
                let _ = variable
                    .g_add_(&(&*first / denominator * (-self.learning_rate / first_correction)));
            }
        });
    }
}

/// The optimizer of a training task ([`Sgd`] or [`Adam`], as `{role}.train.optimizer` says),
/// with its state as named tensors for the training's resume save.
#[derive(Debug)]
pub enum TrainOptimizer {
    Sgd(Sgd),
    Adam(Adam),
}

impl TrainOptimizer {
    pub fn set_lr(&mut self, learning_rate: f64) {
        match self {
            TrainOptimizer::Sgd(sgd) => sgd.set_lr(learning_rate),
            TrainOptimizer::Adam(adam) => adam.learning_rate = learning_rate,
        }
    }

    pub fn zero_grad(&mut self) {
        match self {
            TrainOptimizer::Sgd(sgd) => sgd.zero_grad(),
            TrainOptimizer::Adam(adam) => adam.zero_grad(),
        }
    }

    pub fn step(&mut self) {
        match self {
            TrainOptimizer::Sgd(sgd) => sgd.step(),
            TrainOptimizer::Adam(adam) => adam.step(),
        }
    }

    /// The state a resumed training needs, as named tensors (not copies): SGD's momentum
    /// buffers (`momentum/<variable>`), Adam's moment estimates (`first/<variable>`,
    /// `second/<variable>`) and step count (`steps`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        match self {
            TrainOptimizer::Sgd(sgd) => sgd
                .buffers()
                .iter()
                .enumerate()
                .filter_map(|(index, buffer)| {
                    Some((
                        format!("momentum/{index}"),
                        buffer.as_ref()?.shallow_clone(),
                    ))
                })
                .collect(),
            TrainOptimizer::Adam(adam) => {
                let mut state = vec![(
                    "steps".to_string(),
                    Tensor::from_slice(&[adam.steps as f64]),
                )];
                for (index, moments) in adam.moments.iter().enumerate() {
                    if let Some((first, second)) = moments {
                        state.push((format!("first/{index}"), first.shallow_clone()));
                        state.push((format!("second/{index}"), second.shallow_clone()));
                    }
                }
                state
            }
        }
    }

    /// Takes back a state [`TrainOptimizer::state`] gave (names without the save's prefix).
    pub fn set_state(&mut self, state: &[(String, &Tensor)]) -> Result<(), String> {
        let indexed =
            |name: &str, prefix: &str| -> Option<usize> { name.strip_prefix(prefix)?.parse().ok() };
        match self {
            TrainOptimizer::Sgd(sgd) => {
                for (name, value) in state {
                    match indexed(name, "momentum/") {
                        Some(index) => sgd.set_buffer(index, value)?,
                        None => return Err(format!("`{name}` is not SGD's (a save of Adam?)")),
                    }
                }
            }
            TrainOptimizer::Adam(adam) => {
                let mut firsts = HashMap::new();
                let mut seconds = HashMap::new();
                if !state.iter().any(|(name, _)| name == "steps") {
                    return Err("Adam's step count is missing".into());
                }
                for (name, value) in state {
                    if name == "steps" {
                        adam.steps = Vec::<f64>::try_from(*value)
                            .ok()
                            .and_then(|steps| steps.first().copied())
                            .ok_or("Adam's step count is not a number")?
                            as u64;
                    } else if let Some(index) = indexed(name, "first/") {
                        firsts.insert(index, *value);
                    } else if let Some(index) = indexed(name, "second/") {
                        seconds.insert(index, *value);
                    } else {
                        return Err(format!("`{name}` is not Adam's (a save of SGD?)"));
                    }
                }
                for (index, first) in firsts {
                    let second = seconds
                        .remove(&index)
                        .ok_or_else(|| format!("Adam's second moment {index} is missing"))?;
                    let variable = adam.variables.get(index).ok_or_else(|| {
                        format!("no variable {index} ({} in all)", adam.variables.len())
                    })?;
                    for moment in [first, second] {
                        if moment.size() != variable.size() {
                            return Err(format!(
                                "Adam's moment {index} has shape {:?}, its variable {:?}",
                                moment.size(),
                                variable.size()
                            ));
                        }
                    }
                    let device = variable.device();
                    adam.moments[index] = Some((
                        first.to_device(device).copy(),
                        second.to_device(device).copy(),
                    ));
                }
                if let Some(index) = seconds.keys().next() {
                    return Err(format!("Adam's first moment {index} is missing"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use mentor_plan::{CnnPlan, ModelPlan};
    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::models::{build, Model, ModelConfig};

    /// The trainable values of `vs`, flattened in order.
    fn values(vs: &nn::VarStore) -> Vec<f32> {
        vs.trainable_variables()
            .iter()
            .flat_map(|t| Vec::<f32>::try_from(t.flatten(0, -1)).expect("values"))
            .collect()
    }

    /// Six batches of four random 8x8 images, drawn after seeding the generator with `seed`.
    fn inputs(seed: i64) -> Vec<Tensor> {
        tch::manual_seed(seed);
        (0..6)
            .map(|_| Tensor::randn([4, 1, 8, 8], (Kind::Float, Device::Cpu)))
            .collect()
    }

    /// The loss the optimizer tests train on.
    fn loss(model: &Model, x: &Tensor) -> Tensor {
        model
            .forward_t(x, true)
            .log_softmax(-1, Kind::Float)
            .mean(Kind::Float)
            .neg()
    }

    /// A cnn with batch norm and a residual block: weights, biases and normalisation
    /// parameters of every kind.
    pub(crate) fn small_cnn() -> ModelConfig {
        ModelConfig {
            model: ModelPlan::Cnn(CnnPlan {
                width: 4,
                residual_blocks: 1,
                hidden: 8,
                width_growth_per_round: 0,
                batch_norm: true,
            }),
            channels: 1,
            classes: 3,
            resolution: 8,
            dropout: 0.0,
            last_survival: 1.0,
            precision: mentor_plan::Precision::Float32,
        }
    }

    #[test]
    fn weight_decay_shrinks_weights_and_leaves_biases_and_norms() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let config = small_cnn();
        let model = build(&vs.root(), &config);
        let sgd = nn::Sgd {
            momentum: 0.0,
            dampening: 0.0,
            wd: 0.5,
            nesterov: false,
        };
        let mut optimizer = build_optimizer(&vs, sgd, 0.1).expect("optimizer");
        // Make the batch-norm weights differ from 1 so that decay would show.
        for (name, mut tensor) in vs.variables() {
            if name.ends_with("bn.weight") {
                let _ = tch::no_grad(|| tensor.fill_(2.0));
            }
        }
        let before: std::collections::HashMap<String, Tensor> = vs
            .variables()
            .into_iter()
            .map(|(name, tensor)| (name, tensor.copy()))
            .collect();
        let x = Tensor::rand([2, 1, 8, 8], (Kind::Float, Device::Cpu));
        optimizer.zero_grad();
        // A zero loss: the step is weight decay alone.
        (model.forward_t(&x, true).sum(Kind::Float) * 0.0).backward();
        optimizer.step();
        let trainable: Vec<_> = vs
            .trainable_variables()
            .iter()
            .map(Tensor::data_ptr)
            .collect();
        let (mut decayed, mut kept) = (0, 0);
        for (name, tensor) in vs.variables() {
            if !trainable.contains(&tensor.data_ptr()) {
                continue; // running statistics
            }
            let old = &before[&name];
            if tensor.dim() >= 2 {
                let expected = old * (1.0 - 0.1 * 0.5);
                assert!(
                    tensor.allclose(&expected, 1e-6, 1e-6, false),
                    "{name} not decayed"
                );
                decayed += 1;
            } else {
                assert!(tensor.equal(old), "{name} was decayed");
                kept += 1;
            }
        }
        assert!(decayed >= 4 && kept >= 4, "{decayed} decayed, {kept} kept");
    }

    /// The Rust SGD takes the steps libtorch's SGD takes (Nesterov momentum, weight decay on
    /// weights only), and a copy given its momentum buffers continues identically.
    #[test]
    fn sgd_matches_libtorch_and_resumes_from_its_buffers() {
        let config = small_cnn();
        let (momentum, wd, rate) = (0.9, 5e-4, 0.05);
        let (libtorch_vs, mut ours_vs, mut resumed_vs) = (
            nn::VarStore::new(Device::Cpu),
            nn::VarStore::new(Device::Cpu),
            nn::VarStore::new(Device::Cpu),
        );
        let (libtorch_model, ours_model, resumed_model) = (
            build(&libtorch_vs.root(), &config),
            build(&ours_vs.root(), &config),
            build(&resumed_vs.root(), &config),
        );
        // The same starting point by copy: the global generator is shared with the tests that
        // run beside this one, so seeding it before each build would not give equal models.
        ours_vs.copy(&libtorch_vs).expect("copy");
        let initial = values(&libtorch_vs);
        let mut libtorch = build_optimizer(
            &libtorch_vs,
            nn::Sgd {
                momentum,
                dampening: 0.0,
                wd,
                nesterov: true,
            },
            rate,
        )
        .expect("optimizer");
        let mut ours = Sgd::new(&ours_vs, rate, momentum, wd, true).expect("optimizer");
        let mut resumed: Option<Sgd> = None;
        let inputs = inputs(4);
        for (step, x) in inputs.iter().enumerate() {
            libtorch.zero_grad();
            loss(&libtorch_model, x).backward();
            libtorch.step();
            ours.zero_grad();
            loss(&ours_model, x).backward();
            ours.step();
            if let Some(sgd) = resumed.as_mut() {
                sgd.zero_grad();
                loss(&resumed_model, x).backward();
                sgd.step();
            } else if step == 2 {
                // A third model resumes from the second's parameters and momentum buffers.
                resumed_vs.copy(&ours_vs).expect("copy");
                let mut sgd = Sgd::new(&resumed_vs, rate, momentum, wd, true).expect("optimizer");
                for (index, buffer) in ours.buffers().iter().enumerate() {
                    sgd.set_buffer(index, buffer.as_ref().expect("buffer"))
                        .expect("set buffer");
                }
                resumed = Some(sgd);
            }
        }
        let (a, b, c) = (values(&libtorch_vs), values(&ours_vs), values(&resumed_vs));
        assert!(
            a.iter().zip(&initial).any(|(x, y)| (x - y).abs() > 1e-3),
            "no training"
        );
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-5 + 1e-4 * x.abs(),
                "libtorch {x} vs ours {y}"
            );
        }
        assert_eq!(b, c, "a resumed optimizer must continue exactly");
    }

    /// The Rust Adam takes the steps libtorch's Adam takes (weight decay on weights only), and
    /// a training optimizer of either kind given the state of another continues identically.
    #[test]
    fn adam_matches_libtorch_and_both_optimizers_resume_from_their_state() {
        let config = small_cnn();
        let inputs = inputs(5);
        // Every model starts from the same variables, by copy.
        let start = nn::VarStore::new(Device::Cpu);
        let _ = build(&start.root(), &config);
        let copy_of_start = || {
            let mut vs = nn::VarStore::new(Device::Cpu);
            let model = build(&vs.root(), &config);
            vs.copy(&start).expect("copy");
            (vs, model)
        };
        let (libtorch_vs, libtorch_model) = copy_of_start();
        let mut libtorch = build_optimizer(
            &libtorch_vs,
            nn::Adam {
                wd: 1e-3,
                ..Default::default()
            },
            0.01,
        )
        .expect("optimizer");
        for x in &inputs {
            libtorch.zero_grad();
            loss(&libtorch_model, x).backward();
            libtorch.step();
        }
        type Build = fn(&nn::VarStore) -> TrainOptimizer;
        let kinds: [(&str, Build); 2] = [
            ("adam", |vs| {
                TrainOptimizer::Adam(Adam::new(vs, 0.01, 1e-3).expect("optimizer"))
            }),
            ("sgd", |vs| {
                TrainOptimizer::Sgd(Sgd::new(vs, 0.05, 0.9, 5e-4, true).expect("optimizer"))
            }),
        ];
        for (kind, new) in kinds {
            let (ours_vs, ours_model) = copy_of_start();
            let (mut resumed_vs, resumed_model) = copy_of_start();
            let mut ours = new(&ours_vs);
            let mut resumed: Option<TrainOptimizer> = None;
            for (step, x) in inputs.iter().enumerate() {
                ours.zero_grad();
                loss(&ours_model, x).backward();
                ours.step();
                if let Some(optimizer) = resumed.as_mut() {
                    optimizer.zero_grad();
                    loss(&resumed_model, x).backward();
                    optimizer.step();
                } else if step == 2 {
                    // A third model resumes from the second's variables and optimizer state.
                    resumed_vs.copy(&ours_vs).expect("copy");
                    let mut optimizer = new(&resumed_vs);
                    let state = ours.state();
                    assert!(!state.is_empty(), "{kind}: no state");
                    let named: Vec<(String, &Tensor)> = state
                        .iter()
                        .map(|(name, value)| (name.clone(), value))
                        .collect();
                    optimizer.set_state(&named).expect("set state");
                    resumed = Some(optimizer);
                }
            }
            let trained = values(&ours_vs);
            assert!(
                trained
                    .iter()
                    .zip(&values(&start))
                    .any(|(x, y)| (x - y).abs() > 1e-3),
                "{kind}: no training"
            );
            if kind == "adam" {
                for (x, y) in values(&libtorch_vs).iter().zip(&trained) {
                    assert!(
                        (x - y).abs() <= 1e-5 + 1e-4 * x.abs(),
                        "libtorch {x} vs ours {y}"
                    );
                }
            }
            assert_eq!(
                trained,
                values(&resumed_vs),
                "{kind}: a resumed optimizer must continue exactly"
            );
        }
        // The state of one kind is refused by the other.
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = build(&vs.root(), &config);
        let momentum = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        let steps = Tensor::from_slice(&[3.0f64]);
        let mut adam = TrainOptimizer::Adam(Adam::new(&vs, 0.01, 0.0).expect("optimizer"));
        let error = adam
            .set_state(&[("momentum/0".to_string(), &momentum)])
            .expect_err("a state without Adam's step count");
        assert!(error.contains("step count is missing"), "{error}");
        let error = adam
            .set_state(&[
                ("steps".to_string(), &steps),
                ("momentum/0".to_string(), &momentum),
            ])
            .expect_err("SGD's state taken by Adam");
        assert!(error.contains("not Adam's"), "{error}");
        let mut sgd = TrainOptimizer::Sgd(Sgd::new(&vs, 0.05, 0.9, 0.0, true).expect("optimizer"));
        let error = sgd
            .set_state(&[("steps".to_string(), &steps)])
            .expect_err("Adam's state taken by SGD");
        assert!(error.contains("not SGD's"), "{error}");
    }
}

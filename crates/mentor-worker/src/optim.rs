//! Optimizers with weight decay on weights only (ALGORITHMS.md section 1): tensors of two or
//! more dimensions (convolution and linear weights) are decayed; biases and normalisation
//! parameters (one dimension) sit in a second parameter group without decay.

use tch::nn::{self, OptimizerConfig};

/// The optimizer parameter group of biases and normalisation parameters.
const UNDECAYED: usize = 1;

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
            if variable.tensor.dim() < 2 {
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

#[cfg(test)]
mod tests {
    use mentor_plan::{CnnPlan, ModelPlan};
    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::models::{build, ModelConfig};

    #[test]
    fn weight_decay_shrinks_weights_and_leaves_biases_and_norms() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let config = ModelConfig {
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
        };
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
}

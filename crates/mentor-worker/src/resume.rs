//! Saves of a Noisy Student training (teacher, student) or a finetune in progress, so that an
//! attempt stopped (a preempted machine, a lost worker, a restarted pod) resumes where the last
//! one saved instead of from step 0.
//!
//! Rank 0 writes `<output>.resume.safetensors` beside the task's output every
//! `{role}.train.checkpoint_every` steps: the model's variables (batch-norm statistics, averaged
//! over the ranks, included), the optimizer's state, the step and an identity of the training.
//! Each step draws its batch and its noise from seeds of its own, so the resumed training is
//! the training that did not stop (on as many ranks). The coordinator removes the save once it
//! takes the task's model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mentor_collective::CollectiveError;
use tch::{nn, Tensor};

use crate::distributed::Group;
use crate::optim::TrainOptimizer;
use crate::tasks::{collective_error, TaskError};

/// The resume save of the training whose output is `output`, shared by the task's attempts:
/// `round-1-teacher.resume.safetensors` for `round-1-teacher.attempt-2.safetensors`.
pub fn resume_path(output: &Path) -> PathBuf {
    let name = output
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or("training.safetensors");
    let stem = name.strip_suffix(".safetensors").unwrap_or(name);
    let stem = match stem.rsplit_once(".attempt-") {
        Some((task, attempt)) if attempt.parse::<u32>().is_ok() => task,
        _ => stem,
    };
    output.with_file_name(format!("{stem}.resume.safetensors"))
}

/// Which training a save belongs to: its length and a fingerprint of what shapes it (the
/// settings of its section but how often it reports and saves, its model, its noise, its seed
/// and round, the digests of the files it starts from and learns from). A save of another
/// training left at the same place (a plan changed between runs in one directory, a student
/// whose pseudo labels were filtered again) is set aside, never resumed.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub steps: u64,
    pub fingerprint: u64,
    /// The fingerprint saves of earlier builds have, which described the training otherwise
    /// (taken as this training's too).
    pub earlier: Option<u64>,
}

impl Identity {
    /// The identity of a training of `steps` steps described by `shaping` (the text of what
    /// shapes it).
    pub fn new(steps: u64, shaping: &str) -> Identity {
        Identity {
            steps,
            fingerprint: fingerprint(shaping),
            earlier: None,
        }
    }

    /// This identity, also recognising the saves of earlier builds that described the training
    /// as `shaping`.
    pub fn or_earlier(self, shaping: &str) -> Identity {
        Identity {
            earlier: Some(fingerprint(shaping)),
            ..self
        }
    }

    fn meta(&self, step: u64) -> Tensor {
        let [high, low] = halves(self.fingerprint);
        Tensor::from_slice(&[step as f64, self.steps as f64, high, low])
    }
}

/// A fingerprint as the two numbers a save's meta holds it in (each exact in an f64).
pub(crate) fn halves(fingerprint: u64) -> [f64; 2] {
    [
        (fingerprint >> 32) as f64,
        (fingerprint & 0xffff_ffff) as f64,
    ]
}

/// The fingerprint a save's meta holds in two numbers (see [`halves`]).
pub(crate) fn from_halves(high: f64, low: f64) -> u64 {
    ((high as u64) << 32) | low as u64
}

/// A save read back: its named tensors, and the numbers of its `meta` tensor.
pub(crate) type Save = (HashMap<String, Tensor>, Vec<f64>);

/// The named tensors of the save at `path` and the numbers of its `meta` tensor (`len` of
/// them: `what`, for the error); `None` when there is no save (or it was removed as it was
/// about to be read: the coordinator took the model of an attempt that finished).
pub(crate) fn read(path: &Path, len: usize, what: &str) -> Result<Option<Save>, String> {
    let error = |reason: String| format!("resume checkpoint `{}`: {reason}", path.display());
    if !path.exists() {
        return Ok(None);
    }
    let saved: HashMap<String, Tensor> = match Tensor::read_safetensors(path) {
        Ok(saved) => saved.into_iter().collect(),
        Err(_) if !path.exists() => return Ok(None),
        Err(e) => return Err(error(crate::libtorch_message(&e.to_string()))),
    };
    let meta = saved
        .get("meta")
        .and_then(|meta| Vec::<f64>::try_from(meta).ok())
        .filter(|meta| meta.len() == len)
        .ok_or_else(|| error(format!("no {what}")))?;
    Ok(Some((saved, meta)))
}

/// FNV-1a of `text`: what identities of trainings compare (stable across builds and machines,
/// unlike the standard library's hasher).
pub(crate) fn fingerprint(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Copies the tensors `saved` holds under `<prefix>/<name>` into the variables of `vs` (every
/// one must be there, in its shape); `error` makes the message of what is wrong.
pub(crate) fn copy_variables(
    vs: &nn::VarStore,
    saved: &HashMap<String, Tensor>,
    prefix: &str,
    error: impl Fn(String) -> String,
) -> Result<(), String> {
    for (name, mut variable) in vs.variables() {
        let key = format!("{prefix}/{name}");
        let value = saved
            .get(&key)
            .ok_or_else(|| error(format!("`{key}` is missing")))?;
        if value.size() != variable.size() {
            return Err(error(format!(
                "`{key}` has shape {:?}, the model {:?}",
                value.size(),
                variable.size()
            )));
        }
        tch::no_grad(|| variable.copy_(value));
    }
    Ok(())
}

/// The named tensors of a save after `step` steps (the variables themselves, not copies: the
/// background saver copies them).
pub fn tensors(
    vs: &nn::VarStore,
    optimizer: &TrainOptimizer,
    identity: &Identity,
    step: u64,
) -> Vec<(String, Tensor)> {
    let mut tensors = vec![("meta".to_string(), identity.meta(step))];
    for (name, value) in vs.variables() {
        tensors.push((format!("model/{name}"), value));
    }
    for (name, value) in optimizer.state() {
        tensors.push((format!("optimizer/{name}"), value));
    }
    tensors
}

/// What [`load`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    /// No save (or one removed as it was about to be read).
    Nothing,
    /// Another training's save: nothing loaded.
    Foreign,
    /// This training's save, loaded: the step it was made after.
    Step(u64),
}

/// Loads the save at `path`, if there is one, into the model and the optimizer.
pub fn load(
    path: &Path,
    vs: &nn::VarStore,
    optimizer: &mut TrainOptimizer,
    identity: &Identity,
) -> Result<Loaded, String> {
    let error = |reason: String| format!("resume checkpoint `{}`: {reason}", path.display());
    let Some((saved, meta)) = read(path, 4, "step, length and fingerprint")? else {
        return Ok(Loaded::Nothing);
    };
    let fingerprint = from_halves(meta[2], meta[3]);
    let known = fingerprint == identity.fingerprint || Some(fingerprint) == identity.earlier;
    if meta[1] != identity.steps as f64 || !known {
        return Ok(Loaded::Foreign);
    }
    copy_variables(vs, &saved, "model", error)?;
    let state: Vec<(String, &Tensor)> = saved
        .iter()
        .filter_map(|(key, value)| Some((key.strip_prefix("optimizer/")?.to_string(), value)))
        .collect();
    optimizer.set_state(&state).map_err(error)?;
    Ok(Loaded::Step(meta[0] as u64))
}

/// `error`, reading a save, with what to do about it.
pub fn damaged(error: String) -> String {
    format!(
        "{error} (if the save is damaged, move it away to start the training over, then start \
         the coordinator again, with --retry-failed once the run has failed)"
    )
}

/// The step every rank of `group` goes on from, given what this rank `found` at `path` (its
/// save loaded, or this rank's error as the task's message). A rank that could not read the
/// save fails with its error, the others with their group's; ranks that found different steps
/// all fail; another training's save is set aside by rank 0 and every rank starts from step
/// 0. Every rank meets the others the same number of times whatever it found, so that none is
/// left waiting in a collective.
pub fn agree_on_resume(
    path: &Path,
    group: &mut Group,
    found: Result<Loaded, String>,
) -> Result<u64, TaskError> {
    let mut failed = [f64::from(u8::from(found.is_err()))];
    group
        .all_reduce_scalars(&mut failed)
        .map_err(collective_error)?;
    let found = found?;
    if failed[0] > 0.0 {
        return Err(TaskError::Group(format!(
            "another rank failed to read the resume save `{}` or what the training resumes \
             from (its log says why)",
            path.display()
        )));
    }
    let step = match found {
        Loaded::Step(step) => step,
        Loaded::Nothing | Loaded::Foreign => 0,
    };
    // One file, seen by all.
    if !ranks_agree_on_step(group, Some(step)).map_err(collective_error)? {
        return Err(TaskError::Own(format!(
            "the ranks do not resume from the same step of `{}` (workers need the run directory on a shared file system)",
            path.display()
        )));
    }
    // After the ranks' last meeting: a rank leaving early would leave the others waiting in
    // the training's first collective.
    if found == Loaded::Foreign && group.rank == 0 {
        match set_aside(path) {
            Ok(aside) => tracing::warn!(
                checkpoint = %path.display(),
                kept_as = %aside.display(),
                "the resume checkpoint belongs to another training (another plan, or other inputs, in this directory); starting from step 0"
            ),
            // This training's first save replaces it.
            Err(error) => tracing::warn!(%error, "starting from step 0"),
        }
    }
    Ok(step)
}

/// Renames the save of another training to a free `<stem>.other-N.safetensors` beside it, and
/// returns that name.
fn set_aside(checkpoint: &Path) -> Result<PathBuf, String> {
    let stem = checkpoint
        .file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| name.strip_suffix(".safetensors"))
        .unwrap_or("resume");
    let aside = (1..)
        .map(|n| checkpoint.with_file_name(format!("{stem}.other-{n}.safetensors")))
        .find(|path| !path.exists())
        .expect("a free name");
    std::fs::rename(checkpoint, &aside).map_err(|e| {
        format!(
            "failed to set aside the resume checkpoint `{}` of another training: {e}",
            checkpoint.display()
        )
    })?;
    Ok(aside)
}

/// Whether every rank of the group holds `step`, rank 0's (`None`: this rank has none, and
/// every rank answers false). Rank 0's step is broadcast (exact in f32 below 2^24 steps) and
/// the ranks that differ are counted.
pub(crate) fn ranks_agree_on_step(
    group: &mut Group,
    step: Option<u64>,
) -> Result<bool, CollectiveError> {
    let own = step.map_or(f64::NAN, |step| step as f32 as f64);
    let mut first = [own];
    group.broadcast_scalars(&mut first, 0)?;
    let mut differing = [if own == first[0] { 0.0 } else { 1.0 }];
    group.all_reduce_scalars(&mut differing)?;
    Ok(differing[0] == 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tasks_attempts_share_its_save() {
        for output in [
            "run/checkpoints/round-1-teacher.attempt-1.safetensors",
            "run/checkpoints/round-1-teacher.attempt-12.safetensors",
            "run/checkpoints/round-1-teacher.safetensors",
        ] {
            assert_eq!(
                resume_path(Path::new(output)),
                Path::new("run/checkpoints/round-1-teacher.resume.safetensors"),
                "{output}"
            );
        }
        assert_eq!(
            resume_path(Path::new("a/model.attempt-x.safetensors")),
            Path::new("a/model.attempt-x.resume.safetensors")
        );
    }

    /// A save made under the description an earlier build gave the training is this
    /// training's when the identity names it; another description's is not.
    #[test]
    fn a_save_of_an_earlier_builds_description_is_recognised() {
        use crate::models::build;
        use crate::optim::{tests::small_cnn, Sgd};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("round-1-teacher.resume.safetensors");
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let _model = build(&vs.root(), &small_cnn());
        let mut optimizer =
            TrainOptimizer::Sgd(Sgd::new(&vs, 0.1, 0.9, 0.0, true).expect("optimizer"));
        let earlier = Identity::new(100, "storage = \"labels\"");
        crate::tasks::write_safetensors_atomically(tensors(&vs, &optimizer, &earlier, 40), &path)
            .expect("save");
        let now = Identity::new(100, "no storage");
        let load = |identity: &Identity, optimizer: &mut TrainOptimizer| {
            load(&path, &vs, optimizer, identity).expect("load")
        };
        assert_eq!(load(&now, &mut optimizer), Loaded::Foreign);
        let both = now.or_earlier("storage = \"labels\"");
        assert_eq!(load(&both, &mut optimizer), Loaded::Step(40));
        let other = Identity::new(100, "no storage").or_earlier("another training");
        assert_eq!(load(&other, &mut optimizer), Loaded::Foreign);
    }
}

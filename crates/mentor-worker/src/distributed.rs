//! Data-parallel training groups on tensors: the one layer the training loop talks to,
//! whatever the transport (single process, TCP ring, NCCL).
//!
//! Like PyTorch DDP: rank 0's parameters are broadcast once, gradients are summed over ranks
//! in buckets of `bucket_bytes` after each backward pass (the loss is normalised by the global
//! batch, so the sum is the global mean gradient), and batch-norm statistics stay local
//! during training. Unlike DDP, which keeps rank 0's, what a group saves or evaluates holds
//! their mean over ranks ([`Group::average_buffers`]), each rank weighing the same: for running
//! means that is the statistic of the global batch when the ranks' slices are of one size, and
//! close to it otherwise (a batch of 10 over 4 ranks: slices of 3, 3, 2 and 2); every rank then
//! holds the model that is saved.
#![allow(unsafe_code)]

use std::time::Duration;

use mentor_collective::nccl::{NcclComm, NcclLibrary, UniqueId};
use mentor_collective::{CollectiveError, HostCollective, RingConfig, SingleProcess, TcpRing};
use tch::{nn, Device, Kind, Tensor};

/// The transport under a group.
pub enum Transport {
    /// Host collectives (single process or TCP ring); device tensors go through host memory.
    Host(Box<dyn HostCollective>),
    /// NCCL on the GPU, on the default stream.
    Nccl(NcclComm),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Host(_) => f.write_str("Transport::Host"),
            Transport::Nccl(comm) => write!(f, "Transport::Nccl({comm:?})"),
        }
    }
}

/// One rank of a training group.
#[derive(Debug)]
pub struct Group {
    pub rank: usize,
    pub world_size: usize,
    pub bucket_bytes: usize,
    device: Device,
    transport: Transport,
    /// NCCL collectives that have not finished after this long abort the group.
    timeout: Duration,
}

/// A rank's place in its group and how to reach the others.
#[derive(Debug)]
pub struct GroupJoin {
    pub rank: usize,
    pub world_size: usize,
    pub setup: GroupSetup,
    /// Collectives that have not finished after this long fail the task
    /// (`workers.collective_timeout_seconds` of the run as the coordinator holds it now).
    pub collective_timeout: Duration,
}

/// How a rank joins its group, as the rendezvous decided.
#[derive(Debug)]
pub enum GroupSetup {
    Single,
    Ring {
        listener: std::net::TcpListener,
        addresses: Vec<String>,
        group: String,
        timeout: Duration,
        setup_timeout: Duration,
    },
    Nccl {
        unique_id: Vec<u8>,
        /// How long `ncclCommInitRank` may wait for the other ranks.
        setup_timeout: Duration,
    },
}

/// `ncclCommInitRank` on a thread of its own, waited for up to `timeout`: it blocks until every
/// rank has called it, and a rank that failed before (its CUDA or NCCL did not load, it died)
/// never does. Past the timeout the task fails and this worker goes on; the abandoned thread
/// stays blocked in NCCL (a blocking communicator's setup cannot be cancelled), and should the
/// group still form, drops its communicator.
fn init_within(
    library: std::sync::Arc<NcclLibrary>,
    id: UniqueId,
    device: Device,
    rank: usize,
    world_size: usize,
    timeout: Duration,
) -> Result<NcclComm, CollectiveError> {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("nccl-init".into())
        .spawn(move || {
            let result = (|| {
                // The communicator is bound to the device current on the calling thread.
                if let Device::Cuda(index) = device {
                    mentor_collective::cuda::set_current_device(index)?;
                }
                NcclComm::init(library, &id, rank, world_size)
            })();
            let _ = sender.send(result);
        })
        .map_err(|error| CollectiveError::Setup(format!("cannot start the NCCL setup: {error}")))?;
    match receiver.recv_timeout(timeout) {
        Ok(result) => result,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(CollectiveError::PeerSetup(format!(
            "ncclCommInitRank did not complete within {:.0}s: a rank of the group never joined it (its log says why)",
            timeout.as_secs_f64()
        ))),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(CollectiveError::Setup(
            "the NCCL setup thread ended without a communicator".into(),
        )),
    }
}

impl Group {
    /// A group of one (no communication).
    pub fn single(bucket_bytes: usize, device: Device) -> Group {
        Group {
            rank: 0,
            world_size: 1,
            bucket_bytes,
            device,
            transport: Transport::Host(Box::new(SingleProcess)),
            timeout: Duration::from_secs(60),
        }
    }

    /// Forms the group (blocking: connects the ring or initialises NCCL).
    pub fn form(
        rank: usize,
        world_size: usize,
        bucket_bytes: usize,
        setup: GroupSetup,
        device: Device,
        timeout: Duration,
    ) -> Result<Group, CollectiveError> {
        let transport = match setup {
            GroupSetup::Single => Transport::Host(Box::new(SingleProcess)),
            GroupSetup::Ring {
                listener,
                addresses,
                group,
                timeout,
                setup_timeout,
            } => Transport::Host(Box::new(TcpRing::connect(RingConfig {
                rank,
                world_size,
                listener,
                addresses,
                group,
                timeout,
                setup_timeout,
            })?)),
            GroupSetup::Nccl {
                unique_id,
                setup_timeout,
            } => {
                if !matches!(device, Device::Cuda(_)) || !tch::Cuda::is_available() {
                    return Err(CollectiveError::Nccl(
                        "cannot form a GPU (NCCL) group: this worker has no CUDA device".into(),
                    ));
                }
                // NCCL binds the communicator to the thread's current device, and its null
                // stream is that device's: this worker's GPU, not GPU 0.
                if let Device::Cuda(index) = device {
                    mentor_collective::cuda::set_current_device(index)?;
                }
                let library = NcclLibrary::load()?;
                let id = UniqueId::from_bytes(&unique_id)?;
                Transport::Nccl(init_within(
                    library,
                    id,
                    device,
                    rank,
                    world_size,
                    setup_timeout,
                )?)
            }
        };
        Ok(Group {
            rank,
            world_size,
            bucket_bytes,
            device,
            transport,
            timeout,
        })
    }

    /// One rank without NCCL: every collective is the identity. (A world-size-1 NCCL group
    /// still runs its collectives, which is how a single GPU checks the NCCL path.)
    fn is_trivial(&self) -> bool {
        self.world_size == 1 && matches!(self.transport, Transport::Host(_))
    }

    /// Sums a contiguous f32 tensor over ranks, in place. With NCCL it is only enqueued on the
    /// default stream: later kernels see the sum, but nothing waits for it (a caller that
    /// needs the watchdog's protection calls a collective that waits).
    pub fn all_reduce_sum(&mut self, tensor: &mut Tensor) -> Result<(), CollectiveError> {
        if self.is_trivial() {
            return Ok(());
        }
        self.check_buffer(tensor)?;
        match &mut self.transport {
            Transport::Host(collective) => {
                let mut values = host_values(tensor)?;
                collective.all_reduce_sum(&mut values)?;
                write_back(tensor, &values);
                Ok(())
            }
            Transport::Nccl(comm) => {
                let count = tensor.numel();
                // SAFETY: the tensor is contiguous f32 on this GPU and outlives the call: the
                // default stream runs the collective before any later use of `tensor`.
                unsafe { comm.all_reduce_sum_f32(tensor.data_ptr(), count, std::ptr::null_mut()) }
            }
        }
    }

    /// Replaces a contiguous f32 tensor by `root`'s, in place.
    pub fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        if self.is_trivial() {
            return Ok(());
        }
        self.check_buffer(tensor)?;
        if root >= self.world_size {
            return Err(CollectiveError::Buffer(format!(
                "broadcast from rank {root} in a group of {}",
                self.world_size
            )));
        }
        match &mut self.transport {
            Transport::Host(collective) => {
                let mut values = host_values(tensor)?;
                collective.broadcast(&mut values, root)?;
                write_back(tensor, &values);
                Ok(())
            }
            Transport::Nccl(comm) => {
                let count = tensor.numel();
                // SAFETY: as for `all_reduce_sum`.
                unsafe { comm.broadcast_f32(tensor.data_ptr(), count, root, std::ptr::null_mut()) }
            }
        }
    }

    /// Refuses what the collectives cannot take, on every transport alike (the host one would
    /// convert anything, NCCL would read past the end of a half-precision tensor or gather
    /// the wrong elements of a strided one): contiguous f32, on the group's device under NCCL.
    fn check_buffer(&self, tensor: &Tensor) -> Result<(), CollectiveError> {
        if tensor.kind() != Kind::Float {
            return Err(CollectiveError::Buffer(format!(
                "a {:?} tensor; collectives take f32",
                tensor.kind()
            )));
        }
        if !tensor.is_contiguous() {
            return Err(CollectiveError::Buffer(
                "a non-contiguous tensor; collectives take contiguous ones".into(),
            ));
        }
        if matches!(self.transport, Transport::Nccl(_)) && tensor.device() != self.device {
            return Err(CollectiveError::Buffer(format!(
                "a tensor on {:?}; this NCCL group runs on {:?}",
                tensor.device(),
                self.device
            )));
        }
        Ok(())
    }

    /// Copies rank 0's values of `variables` to every rank.
    pub fn broadcast_parameters(&mut self, variables: &[Tensor]) -> Result<(), CollectiveError> {
        if self.is_trivial() {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        for bucket in buckets(variables, self.bucket_bytes) {
            let mut flat = flatten(&bucket);
            self.broadcast(&mut flat, 0)?;
            unflatten_into(&flat, &bucket);
        }
        self.wait_for_device("NCCL broadcast of rank 0's parameters")
    }

    /// Replaces `buffers` on every rank by their mean over ranks, bucket by bucket. Every rank
    /// must call it at the same step, with the same tensors (see [`buffers`]).
    pub fn average_buffers(&mut self, buffers: &[Tensor]) -> Result<(), CollectiveError> {
        if self.is_trivial() || buffers.is_empty() {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        let ranks = self.world_size as f64;
        for bucket in buckets(buffers, self.bucket_bytes) {
            let mut flat = flatten(&bucket);
            self.all_reduce_sum(&mut flat)?;
            let _ = flat.g_div_scalar_(ranks);
            unflatten_into(&flat, &bucket);
        }
        self.wait_for_device("NCCL average of batch-norm statistics")
    }

    /// Sums the gradients of `variables` over ranks, bucket by bucket. A variable without a
    /// gradient this step (unused) takes part with zeros and keeps no gradient.
    pub fn all_reduce_gradients(&mut self, variables: &[Tensor]) -> Result<(), CollectiveError> {
        if self.is_trivial() {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        let gradients: Vec<Tensor> = variables
            .iter()
            .map(|variable| {
                let gradient = variable.grad();
                if gradient.defined() {
                    gradient
                } else {
                    variable.zeros_like()
                }
            })
            .collect();
        for bucket in buckets(&gradients, self.bucket_bytes) {
            let mut flat = flatten(&bucket);
            self.all_reduce_sum(&mut flat)?;
            unflatten_into(&flat, &bucket);
        }
        self.wait_for_device("NCCL gradient all-reduce")
    }

    /// With NCCL, waits until the device has run the enqueued collectives (`operation`, for
    /// the error); a watchdog aborts the communicator if that takes longer than the collective
    /// timeout (a dead or silent rank), so no rank ever hangs. Host transports are synchronous
    /// already.
    fn wait_for_device(&mut self, operation: &'static str) -> Result<(), CollectiveError> {
        let (Transport::Nccl(comm), Device::Cuda(index)) = (&self.transport, self.device) else {
            return Ok(());
        };
        let handle = comm.abort_handle();
        // The watchdog wakes the moment the device is done (the sender dropped), not at its
        // next poll: the wait costs no more than the synchronisation itself.
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let timeout = self.timeout;
        let watchdog = std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(timeout)
            {
                handle.abort();
            }
        });
        tch::Cuda::synchronize(index as i64);
        drop(done);
        let _ = watchdog.join();
        if comm.is_aborted() {
            return Err(CollectiveError::GroupTimeout {
                operation,
                seconds: self.timeout.as_secs_f64(),
            });
        }
        comm.mark_finished();
        Ok(())
    }

    /// Sums `values` over ranks, waiting for the others up to `timeout` instead of the
    /// collective timeout: ranks that prepare at different speeds (reading a round's pseudo
    /// labels from a slow disk) meet here before the collectives of training, each saying how
    /// its preparation went (a rank that failed lets the others know at once).
    pub fn meet_within(
        &mut self,
        values: &mut [f64],
        timeout: Duration,
    ) -> Result<(), CollectiveError> {
        if self.is_trivial() {
            return Ok(());
        }
        let usual = self.timeout;
        self.set_timeout(timeout)?;
        let met = self.all_reduce_scalars(values);
        self.set_timeout(usual)?;
        met
    }

    fn set_timeout(&mut self, timeout: Duration) -> Result<(), CollectiveError> {
        if let Transport::Host(host) = &mut self.transport {
            host.set_timeout(timeout)?;
        }
        self.timeout = timeout;
        Ok(())
    }

    /// Sums a few scalars over ranks (losses, counts; in f32, so integers are exact below
    /// 2^24).
    pub fn all_reduce_scalars(&mut self, values: &mut [f64]) -> Result<(), CollectiveError> {
        self.on_scalars(values, |group, tensor| group.all_reduce_sum(tensor))
    }

    /// Replaces a few scalars by `root`'s (in f32).
    pub fn broadcast_scalars(
        &mut self,
        values: &mut [f64],
        root: usize,
    ) -> Result<(), CollectiveError> {
        self.on_scalars(values, |group, tensor| group.broadcast(tensor, root))
    }

    /// Runs a collective on `values` as an f32 tensor where the transport wants it.
    fn on_scalars(
        &mut self,
        values: &mut [f64],
        collective: impl FnOnce(&mut Group, &mut Tensor) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        if self.is_trivial() {
            return Ok(());
        }
        let device = match &self.transport {
            Transport::Nccl(_) => self.device,
            Transport::Host(_) => Device::Cpu,
        };
        let mut tensor = Tensor::from_slice(&values.iter().map(|&v| v as f32).collect::<Vec<_>>())
            .to_device(device);
        collective(self, &mut tensor)?;
        self.wait_for_device("NCCL collective of scalars")?;
        let reduced = Vec::<f32>::try_from(tensor.to_device(Device::Cpu))
            .map_err(|e| CollectiveError::Setup(e.to_string()))?;
        for (value, reduced) in values.iter_mut().zip(reduced) {
            *value = reduced as f64;
        }
        Ok(())
    }
}

/// The floating-point variables of `vs` that are not trained (batch-norm running statistics),
/// in name order, the same on every rank.
pub fn buffers(vs: &nn::VarStore) -> Vec<Tensor> {
    let trained: std::collections::HashSet<usize> = vs
        .trainable_variables()
        .iter()
        .map(|t| t.data_ptr() as usize)
        .collect();
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| {
            t.is_floating_point() && t.numel() > 0 && !trained.contains(&(t.data_ptr() as usize))
        })
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named.into_iter().map(|(_, t)| t).collect()
}

fn host_values(tensor: &Tensor) -> Result<Vec<f32>, CollectiveError> {
    Vec::<f32>::try_from(
        tensor
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .flatten(0, -1),
    )
    .map_err(|e| CollectiveError::Setup(format!("tensor to host: {e}")))
}

fn write_back(tensor: &mut Tensor, values: &[f32]) {
    let host = Tensor::from_slice(values).view(tensor.size().as_slice());
    let _guard = tch::no_grad_guard();
    tensor.copy_(&host.to_device(tensor.device()));
}

/// Groups tensors into consecutive buckets of at most `bucket_bytes` (at least one tensor each).
fn buckets(tensors: &[Tensor], bucket_bytes: usize) -> Vec<Vec<Tensor>> {
    let mut buckets: Vec<Vec<Tensor>> = Vec::new();
    let mut current: Vec<Tensor> = Vec::new();
    let mut current_bytes = 0usize;
    for tensor in tensors {
        let bytes = tensor.numel() * 4;
        if !current.is_empty() && current_bytes + bytes > bucket_bytes {
            buckets.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(tensor.shallow_clone());
        current_bytes += bytes;
    }
    if !current.is_empty() {
        buckets.push(current);
    }
    buckets
}

fn flatten(tensors: &[Tensor]) -> Tensor {
    let parts: Vec<Tensor> = tensors
        .iter()
        .map(|t| t.detach().to_kind(Kind::Float).flatten(0, -1))
        .collect();
    Tensor::cat(&parts, 0).contiguous()
}

fn unflatten_into(flat: &Tensor, tensors: &[Tensor]) {
    let mut offset = 0;
    for tensor in tensors {
        let count = tensor.numel() as i64;
        let mut target = tensor.shallow_clone();
        target.copy_(&flat.narrow(0, offset, count).view(tensor.size().as_slice()));
        offset += count;
    }
}

/// Runs `body` on each rank of a `world_size`-rank TCP ring on loopback, one thread per rank;
/// returns what each rank returned, in rank order.
#[cfg(test)]
pub(crate) fn on_ring<R: Send + 'static>(
    world_size: usize,
    body: impl Fn(&mut Group) -> R + Send + Sync + 'static,
) -> Vec<R> {
    let listeners: Vec<std::net::TcpListener> = (0..world_size)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let addresses: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").to_string())
        .collect();
    let body = std::sync::Arc::new(body);
    let ranks: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let (addresses, body) = (addresses.clone(), body.clone());
            std::thread::spawn(move || {
                let setup = GroupSetup::Ring {
                    listener,
                    addresses,
                    group: "test".into(),
                    timeout: Duration::from_secs(30),
                    setup_timeout: Duration::from_secs(30),
                };
                let mut group = Group::form(
                    rank,
                    world_size,
                    1 << 20,
                    setup,
                    Device::Cpu,
                    Duration::from_secs(30),
                )
                .expect("group");
                body(&mut group)
            })
        })
        .collect();
    ranks.into_iter().map(|r| r.join().expect("rank")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CUDA runtime libtorch mapped is found, and choosing a device works exactly where
    /// libtorch sees one (on a machine without GPU: a clear error, not a crash).
    #[test]
    fn the_thread_takes_its_cuda_device_or_says_why_it_cannot() {
        match mentor_collective::cuda::set_current_device(0) {
            Ok(()) => assert!(
                tch::Cuda::is_available(),
                "a device without libtorch's CUDA"
            ),
            Err(error) => {
                let message = error.to_string();
                assert!(!tch::Cuda::is_available(), "{message}");
                assert!(
                    message.contains("cudaSetDevice(0) failed")
                        || message.contains("libcudart) was not found"),
                    "{message}"
                );
            }
        }
    }

    #[test]
    fn buckets_respect_the_size_and_keep_order() {
        let tensors: Vec<Tensor> = [10i64, 10, 30, 5]
            .iter()
            .map(|&n| Tensor::zeros([n], (Kind::Float, Device::Cpu)))
            .collect();
        let sizes: Vec<Vec<i64>> = buckets(&tensors, 80)
            .iter()
            .map(|b| b.iter().map(|t| t.numel() as i64).collect())
            .collect();
        assert_eq!(sizes, vec![vec![10, 10], vec![30], vec![5]]);
    }

    #[test]
    fn flatten_and_unflatten_round_trip() {
        let a = Tensor::from_slice(&[1f32, 2., 3., 4.]).view([2, 2]);
        let b = Tensor::from_slice(&[5f32]);
        let flat = flatten(&[a.shallow_clone(), b.shallow_clone()]) * 2.0;
        unflatten_into(&flat, &[a.shallow_clone(), b.shallow_clone()]);
        assert_eq!(
            Vec::<f32>::try_from(a.flatten(0, -1)).expect("a"),
            vec![2., 4., 6., 8.]
        );
        assert_eq!(Vec::<f32>::try_from(b).expect("b"), vec![10.]);
    }

    #[test]
    fn an_nccl_group_without_cuda_is_refused_clearly() {
        let error = Group::form(
            0,
            2,
            1 << 20,
            GroupSetup::Nccl {
                unique_id: vec![0; 128],
                setup_timeout: Duration::from_secs(1),
            },
            Device::Cpu,
            Duration::from_secs(1),
        )
        .expect_err("no CUDA");
        assert_eq!(
            error.to_string(),
            "NCCL: cannot form a GPU (NCCL) group: this worker has no CUDA device"
        );
    }

    /// The batch-norm running statistics of one rank that saw its slice of an 8-image batch,
    /// averaged over the group when `average`.
    fn statistics(group: &mut Group, average: bool) -> Vec<Vec<f32>> {
        use tch::nn::ModuleT;
        let images = (Tensor::arange(8 * 3 * 16, (Kind::Float, Device::Cpu)).sin() * 3.0)
            .view([8, 3, 4, 4])
            + Tensor::arange(8, (Kind::Float, Device::Cpu)).view([8, 1, 1, 1]);
        let vs = nn::VarStore::new(Device::Cpu);
        let norm = nn::batch_norm2d(vs.root() / "bn", 3, Default::default());
        let rows = 8 / group.world_size as i64;
        let _ = norm.forward_t(&images.narrow(0, rows * group.rank as i64, rows), true);
        let buffers = buffers(&vs);
        assert_eq!(buffers.len(), 2, "running mean and variance only");
        if average {
            group.average_buffers(&buffers).expect("average");
        }
        buffers
            .iter()
            .map(|t| Vec::<f32>::try_from(t.flatten(0, -1)).expect("values"))
            .collect()
    }

    /// Collectives refuse, on every rank and before any communication, the tensors NCCL could
    /// not read by address: other kinds, strided views, a root outside the group.
    #[test]
    fn collectives_refuse_buffers_nccl_could_not_read() {
        let errors = on_ring(2, |group| {
            let mut half = Tensor::zeros([4], (Kind::Half, Device::Cpu));
            let mut strided = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)).transpose(0, 1);
            let mut fine = Tensor::ones([4], (Kind::Float, Device::Cpu));
            let refused = [
                group.all_reduce_sum(&mut half),
                group.broadcast(&mut strided, 0),
                group.broadcast(&mut fine, 2),
            ]
            .map(|result| result.map_err(|e| e.to_string()).err());
            // The group still works after refusing them.
            group.all_reduce_sum(&mut fine).expect("all-reduce");
            (refused, fine.sum(Kind::Float).double_value(&[]))
        });
        for (refused, total) in errors {
            let [half, strided, root] = refused;
            assert!(half.is_some_and(|e| e.contains("Half tensor")));
            assert!(strided.is_some_and(|e| e.contains("non-contiguous")));
            assert!(root.is_some_and(|e| e.contains("broadcast from rank 2 in a group of 2")));
            assert_eq!(total, 8.0);
        }
    }

    /// Ranks meeting wait for one late by more than the collective timeout, up to their own
    /// limit, and learn what each brought; the collective timeout holds again after it.
    #[test]
    fn a_meeting_waits_past_the_collective_timeout_and_restores_it() {
        let results = on_ring(2, |group| {
            group
                .set_timeout(Duration::from_millis(300))
                .expect("timeout");
            let late = |group: &Group| {
                if group.rank == 1 {
                    std::thread::sleep(Duration::from_millis(1000));
                }
            };
            late(group);
            let mut failed = [group.rank as f64];
            let met = group
                .meet_within(&mut failed, Duration::from_secs(20))
                .map(|()| failed[0])
                .map_err(|e| e.to_string());
            late(group);
            let after = group
                .all_reduce_scalars(&mut [1.0])
                .map_err(|e| e.to_string());
            (met, after)
        });
        for (met, _) in &results {
            assert_eq!(met, &Ok(1.0));
        }
        let after = results[0]
            .1
            .as_ref()
            .expect_err("the usual 300 ms hold again");
        assert!(after.contains("rank 1"), "{after}");
    }

    /// Two ranks that each saw half of a batch, their running statistics averaged, hold the
    /// running mean of one process that saw the whole batch; the trained weights are no buffers.
    #[test]
    fn averaged_batch_norm_statistics_of_two_ranks_are_those_of_the_global_batch() {
        let whole = statistics(&mut Group::single(1 << 20, Device::Cpu), true);
        let local = on_ring(2, |group| statistics(group, false));
        assert_ne!(
            local[0], local[1],
            "the halves should differ before averaging"
        );
        let averaged = on_ring(2, |group| statistics(group, true));
        assert_eq!(averaged[0], averaged[1], "ranks disagree after averaging");
        // Sorted by name: running_mean, then running_var.
        for (one, two) in whole[0].iter().zip(&averaged[0][0]) {
            assert!((one - two).abs() < 1e-6, "running mean {one} against {two}");
        }
        for ((a, b), mean) in local[0][1].iter().zip(&local[1][1]).zip(&averaged[0][1]) {
            assert!(
                ((a + b) / 2.0 - mean).abs() < 1e-6,
                "running variances {a} and {b} averaged to {mean}"
            );
        }
    }
}

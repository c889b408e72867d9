//! Ring all-reduce and broadcast over TCP.
//!
//! Rank r keeps one outgoing connection to rank r+1 and one incoming from rank r-1. All-reduce
//! is a reduce-scatter then an all-gather, W-1 steps each, every step sending one chunk while
//! receiving another (bandwidth-optimal: each rank sends 2(W-1)/W of the data).

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::{chunk_bounds, CollectiveError, HostCollective};

const MAGIC: &[u8; 4] = b"MNTR";

/// How to join a ring.
#[derive(Debug)]
pub struct RingConfig {
    pub rank: usize,
    pub world_size: usize,
    /// This rank's bound listener (its address is `addresses[rank]`).
    pub listener: TcpListener,
    /// `host:port` of every rank's listener, by rank.
    pub addresses: Vec<String>,
    /// Identifies the group, so a stray connection from another group is refused.
    pub group: String,
    /// Every send and receive fails after this long without progress.
    pub timeout: Duration,
    /// Forming the ring fails after this long.
    pub setup_timeout: Duration,
}

/// A formed ring.
#[derive(Debug)]
pub struct TcpRing {
    rank: usize,
    world_size: usize,
    /// Both sockets are non-blocking once the ring is formed: a step of a collective sends and
    /// receives on one thread (see [`transfer`]).
    next: TcpStream,
    previous: TcpStream,
    timeout: Duration,
    scratch: Vec<f32>,
    /// Collectives run so far: each one starts by checking that both neighbours are in the
    /// same one (see [`TcpRing::next_call`]).
    sequence: u64,
    /// Why an earlier collective failed: the byte streams are out of step after it, so the
    /// ring refuses further calls.
    broken: Option<String>,
}

/// Bytes of a collective's header: its 24 bytes padded to a cache line, so that the data after
/// it keeps its alignment in the stream (a 24-byte offset made a 1 MB all-reduce of two ranks
/// about 0.3 ms slower on loopback).
const HEADER: usize = 64;

/// What a collective is, as the ranks compare it before moving data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Call {
    sequence: u64,
    /// 0: all-reduce; 1 + root: a broadcast from `root`.
    kind: u64,
    len: u64,
}

impl Call {
    fn bytes(self) -> [u8; HEADER] {
        let mut bytes = [0u8; HEADER];
        bytes[..8].copy_from_slice(&self.sequence.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.kind.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.len.to_le_bytes());
        bytes
    }

    fn from_bytes(bytes: &[u8; HEADER]) -> Call {
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]));
        Call {
            sequence: word(0),
            kind: word(8),
            len: word(16),
        }
    }

    fn describe(self) -> String {
        let what = match self.kind {
            0 => "an all-reduce".to_string(),
            root => format!("a broadcast from rank {}", root - 1),
        };
        format!(
            "{what} of {} values (collective {})",
            self.len, self.sequence
        )
    }
}

fn handshake(group: &str, rank: usize) -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&(group.len() as u32).to_le_bytes());
    bytes.extend_from_slice(group.as_bytes());
    bytes.extend_from_slice(&(rank as u32).to_le_bytes());
    bytes
}

impl TcpRing {
    /// Connects to the next rank and accepts the previous one.
    pub fn connect(config: RingConfig) -> Result<TcpRing, CollectiveError> {
        let RingConfig {
            rank,
            world_size,
            listener,
            addresses,
            group,
            timeout,
            setup_timeout,
        } = config;
        if world_size < 2 || rank >= world_size || addresses.len() != world_size {
            return Err(CollectiveError::Setup(format!(
                "a ring needs world size >= 2, rank < world size and one address per rank (rank {rank}, world size {world_size}, {} addresses)",
                addresses.len()
            )));
        }
        let deadline = Instant::now() + setup_timeout;
        let next_rank = (rank + 1) % world_size;
        let previous_rank = (rank + world_size - 1) % world_size;

        let mut next = loop {
            // Bounded by the setup deadline: an address that drops packets would otherwise
            // hold a connect for the system's own timeout (minutes).
            match connect_within(&addresses[next_rank], time_left(deadline)) {
                Ok(stream) => break stream,
                Err(error) if Instant::now() < deadline => {
                    let _ = error;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(error) => {
                    return Err(CollectiveError::PeerSetup(format!(
                        "rank {rank} could not connect to rank {next_rank} at {} within {setup_timeout:?}: {error}",
                        addresses[next_rank]
                    )))
                }
            }
        };
        configure(&next, timeout).map_err(|e| peer_error(next_rank, "setup", e, timeout))?;
        next.write_all(&handshake(&group, rank))
            .map_err(|e| peer_error(next_rank, "setup", e, timeout))?;

        listener
            .set_nonblocking(true)
            .map_err(|e| CollectiveError::Setup(e.to_string()))?;
        let expected = handshake(&group, previous_rank);
        let previous = loop {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(|e| CollectiveError::Setup(e.to_string()))?;
                    configure(&stream, timeout).map_err(|e| peer_error(previous_rank, "setup", e, timeout))?;
                    // The previous rank writes its handshake as soon as it connects: a silent
                    // connection (a port scanner) waits no longer than the setup deadline.
                    stream
                        .set_read_timeout(Some(time_left(deadline).min(timeout)))
                        .map_err(|e| peer_error(previous_rank, "setup", e, timeout))?;
                    let mut received = vec![0u8; expected.len()];
                    if stream.read_exact(&mut received).is_ok() && received == expected {
                        configure(&stream, timeout)
                            .map_err(|e| peer_error(previous_rank, "setup", e, timeout))?;
                        break stream;
                    }
                    // Not our previous rank (another group, or a port scanner): drop it.
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock => {
                    return Err(CollectiveError::PeerSetup(format!(
                        "rank {rank} was not joined by rank {previous_rank} within {setup_timeout:?}"
                    )))
                }
                // A connection reset before it was accepted (a port scanner, a peer that gave
                // up): not ours, and no fault of this rank's; wait on for the previous rank.
                Err(error)
                    if matches!(
                        error.kind(),
                        ErrorKind::ConnectionAborted
                            | ErrorKind::ConnectionReset
                            | ErrorKind::Interrupted
                    ) && Instant::now() < deadline => {}
                Err(error) => return Err(CollectiveError::Setup(error.to_string())),
            }
        };
        for stream in [&next, &previous] {
            stream
                .set_nonblocking(true)
                .map_err(|error| CollectiveError::Setup(error.to_string()))?;
        }
        Ok(TcpRing {
            rank,
            world_size,
            next,
            previous,
            timeout,
            scratch: Vec::new(),
            sequence: 0,
            broken: None,
        })
    }

    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world_size
    }

    fn previous_rank(&self) -> usize {
        (self.rank + self.world_size - 1) % self.world_size
    }

    /// The next collective's description. Before a collective moves data, each rank tells the
    /// next one what it is about to run (the header travels in the same write as its first
    /// data, see [`transfer`]) and compares what the previous one sent: ranks whose programs
    /// diverged (another length, another collective, or a skipped one wherever the calls after
    /// it differ) fail naming both calls, instead of mixing the bytes of different tensors into
    /// wrong sums.
    fn next_call(&mut self, kind: u64, len: usize) -> Call {
        let call = Call {
            sequence: self.sequence,
            kind,
            len: len as u64,
        };
        self.sequence += 1;
        call
    }

    /// One step of a collective, on this thread: sends `outgoing` (after `header`, if any) to
    /// the next rank while receiving into `incoming` (after the previous rank's header, compared
    /// with `expect`, if any) from the previous one. See [`transfer`].
    fn step(
        &mut self,
        header: Option<Call>,
        outgoing: &[f32],
        expect: Option<Call>,
        incoming: Incoming<'_>,
        operation: &'static str,
    ) -> Result<(), CollectiveError> {
        let ends = Ends {
            rank: self.rank,
            next_rank: self.next_rank(),
            previous_rank: self.previous_rank(),
            timeout: self.timeout,
            operation,
        };
        transfer(
            &self.next,
            &self.previous,
            header.map(Call::bytes).as_ref(),
            bytemuck::cast_slice(outgoing),
            expect,
            incoming,
            &mut self.scratch,
            &ends,
        )
    }
}

/// Where the values an exchange receives go.
enum Incoming<'a> {
    /// Nothing but the header (if any) is received.
    Nothing,
    /// Added to these values.
    Reduce(&'a mut [f32]),
    /// Copied into these values.
    Copy(&'a mut [f32]),
}

impl Incoming<'_> {
    fn bytes(&self) -> usize {
        match self {
            Incoming::Nothing => 0,
            Incoming::Reduce(values) | Incoming::Copy(values) => std::mem::size_of_val(*values),
        }
    }
}

/// Who a transfer runs between, for its errors.
struct Ends {
    rank: usize,
    next_rank: usize,
    previous_rank: usize,
    timeout: Duration,
    operation: &'static str,
}

/// Values of a received segment reduced at a time, while they are still hot in cache and while
/// the next ones are on the wire.
const SEGMENT: usize = 64 * 1024;

/// Sends `header` and `outgoing` to `next` while receiving `expect`'s header and `incoming`'s
/// bytes from `previous`, on one thread: both sockets are non-blocking, each is written or read
/// as far as it goes, and poll(2) waits for either when neither moves. A step used to send from
/// a thread of its own, spawned for it: on a machine whose cores are busy, waking that thread
/// cost more than a small all-reduce's data. Fails when neither socket moves for the timeout
/// (naming the previous rank while its data is awaited, else the next one), on a header that
/// is not `expect` (naming both collectives), or when a neighbour's connection fails.
#[allow(clippy::too_many_arguments)]
fn transfer(
    next: &TcpStream,
    previous: &TcpStream,
    header: Option<&[u8; HEADER]>,
    outgoing: &[u8],
    expect: Option<Call>,
    mut incoming: Incoming<'_>,
    scratch: &mut Vec<f32>,
    ends: &Ends,
) -> Result<(), CollectiveError> {
    // The header and the data go out in one vectored write: two writes in a row, the first one
    // small, would let the kernel hold the second back (TCP autocorking) until the first is
    // acknowledged, milliseconds on a one-way ring socket whose acknowledgements are delayed.
    let mut parts = [
        std::io::IoSlice::new(header.map_or(&[][..], |h| &h[..])),
        std::io::IoSlice::new(outgoing),
    ];
    let mut parts = &mut parts[..];
    std::io::IoSlice::advance_slices(&mut parts, 0);
    let header_bytes: &[u8] = header.map_or(&[][..], |h| &h[..]);
    let mut sent = 0;
    let mut theirs = [0u8; HEADER];
    let mut header_left = if expect.is_some() { HEADER } else { 0 };
    let total = incoming.bytes();
    let mut received = 0;
    if let Incoming::Reduce(values) = &incoming {
        scratch.resize(SEGMENT.min(values.len()), 0.0);
    }
    let peer = |peer: usize, source: std::io::Error| CollectiveError::Peer {
        peer,
        operation: ends.operation,
        source,
    };
    loop {
        let mut moved = false;
        // Writing first: a diverged neighbour names both collectives only from this header.
        if !parts.is_empty() {
            match (&*next).write_vectored(parts) {
                Ok(0) => return Err(peer(ends.next_rank, ErrorKind::WriteZero.into())),
                Ok(written) => {
                    std::io::IoSlice::advance_slices(&mut parts, written);
                    sent += written;
                    moved = true;
                }
                Err(error) if would_wait(&error) => {}
                Err(error) => return Err(peer(ends.next_rank, error)),
            }
        }
        if header_left > 0 || received < total {
            let read = if header_left > 0 {
                (&*previous).read(&mut theirs[HEADER - header_left..])
            } else {
                match &mut incoming {
                    Incoming::Nothing => Ok(0),
                    Incoming::Copy(values) => {
                        (&*previous).read(&mut bytemuck::cast_slice_mut(values)[received..])
                    }
                    Incoming::Reduce(_) => {
                        // Into the scratch, up to the end of the segment being received.
                        let segment = received / (SEGMENT * 4);
                        let start = segment * SEGMENT * 4;
                        let end = (start + SEGMENT * 4).min(total);
                        (&*previous).read(
                            &mut bytemuck::cast_slice_mut(&mut scratch[..])
                                [received - start..end - start],
                        )
                    }
                }
            };
            match read {
                Ok(0) => {
                    return Err(peer(
                        ends.previous_rank,
                        std::io::Error::new(
                            ErrorKind::UnexpectedEof,
                            "the connection closed in the middle of a collective",
                        ),
                    ))
                }
                Ok(count) if header_left > 0 => {
                    header_left -= count;
                    moved = true;
                    if header_left == 0 {
                        if let Err(error) = compare(expect, &theirs, ends) {
                            finish_header(next, &header_bytes[sent.min(header_bytes.len())..]);
                            return Err(error);
                        }
                    }
                }
                Ok(count) => {
                    if let Incoming::Reduce(values) = &mut incoming {
                        // The values completed by this read (a read may end inside one).
                        let start = received / (SEGMENT * 4) * SEGMENT;
                        let (from, to) = (received / 4, (received + count) / 4);
                        for (value, add) in values[from..to]
                            .iter_mut()
                            .zip(&scratch[from - start..to - start])
                        {
                            *value += add;
                        }
                    }
                    received += count;
                    moved = true;
                }
                Err(error) if would_wait(&error) => {}
                Err(error) => return Err(peer(ends.previous_rank, error)),
            }
        }
        let sending = !parts.is_empty();
        let receiving = header_left > 0 || received < total;
        if !sending && !receiving {
            return Ok(());
        }
        if !moved {
            wait_for(next, sending, previous, receiving, ends)?;
        }
    }
}

/// Whether a non-blocking read or write found nothing to do yet.
fn would_wait(error: &std::io::Error) -> bool {
    matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
}

/// Waits until `next` can be written (if `sending`) or `previous` read (if `receiving`), at
/// most the timeout. While sending, `next` is also watched for its rank closing the connection
/// (it never writes on it: anything readable there is its end of the stream): a rank blocked in
/// a send to a neighbour that gave up and stopped reading fails at once, not at the timeout.
fn wait_for(
    next: &TcpStream,
    sending: bool,
    previous: &TcpStream,
    receiving: bool,
    ends: &Ends,
) -> Result<(), CollectiveError> {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = Vec::with_capacity(2);
    if sending {
        fds.push(PollFd::new(
            next.as_fd(),
            PollFlags::POLLOUT | PollFlags::POLLIN,
        ));
    }
    if receiving {
        fds.push(PollFd::new(previous.as_fd(), PollFlags::POLLIN));
    }
    let deadline = Instant::now() + ends.timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let limit = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        match nix::poll::poll(&mut fds, limit) {
            Ok(0) => break,
            Ok(_) => {
                let gone = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR;
                let next_gone = sending
                    && fds[0]
                        .revents()
                        .is_some_and(|events| events.intersects(gone));
                if next_gone {
                    return Err(CollectiveError::Peer {
                        peer: ends.next_rank,
                        operation: ends.operation,
                        source: std::io::Error::new(
                            ErrorKind::ConnectionAborted,
                            "it closed the connection in the middle of a collective",
                        ),
                    });
                }
                return Ok(());
            }
            // A signal: wait on for what is left of the timeout.
            Err(nix::errno::Errno::EINTR) if !left.is_zero() => {}
            Err(nix::errno::Errno::EINTR) => break,
            Err(errno) => {
                return Err(CollectiveError::Local(format!(
                    "waiting on the ring's sockets failed: {errno}"
                )))
            }
        }
    }
    Err(CollectiveError::Timeout {
        peer: if receiving {
            ends.previous_rank
        } else {
            ends.next_rank
        },
        operation: ends.operation,
        seconds: ends.timeout.as_secs_f64(),
    })
}

/// Writes what is left of this step's header after the previous rank's turned out to differ
/// (the socket was full of the last collective's data when the step started): the next rank
/// names both collectives only from it. At most `GRACE`; the data after it is not sent.
fn finish_header(next: &TcpStream, header: &[u8]) {
    const GRACE: Duration = Duration::from_millis(200);
    let deadline = Instant::now() + GRACE;
    let mut left = header;
    while !left.is_empty() && Instant::now() < deadline {
        match (&*next).write(left) {
            Ok(0) => return,
            Ok(written) => left = &left[written..],
            Err(error) if would_wait(&error) => std::thread::sleep(Duration::from_millis(1)),
            Err(_) => return,
        }
    }
}

/// Compares the previous rank's header with `ours`.
fn compare(ours: Option<Call>, theirs: &[u8; HEADER], ends: &Ends) -> Result<(), CollectiveError> {
    let theirs = Call::from_bytes(theirs);
    match ours {
        Some(ours) if theirs != ours => Err(CollectiveError::OutOfStep(format!(
            "rank {} runs {}, rank {} runs {}: the ranks' programs diverged",
            ends.rank,
            ours.describe(),
            ends.previous_rank,
            theirs.describe()
        ))),
        _ => Ok(()),
    }
}

/// `data[a]` and `data[b]` for two disjoint ranges, the second one mutable.
fn disjoint(data: &mut [f32], a: (usize, usize), b: (usize, usize)) -> (&[f32], &mut [f32]) {
    if a.0 < b.0 {
        let (left, right) = data.split_at_mut(b.0);
        (&left[a.0..a.1], &mut right[..b.1 - b.0])
    } else {
        let (left, right) = data.split_at_mut(a.0);
        (&right[..a.1 - a.0], &mut left[b.0..b.1])
    }
}

/// Time until `deadline`, at least 100 ms (a zero timeout is refused by the socket calls).
fn time_left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100))
}

/// Connects to `address` (`host:port`, every address it resolves to in turn) within `limit`.
fn connect_within(address: &str, limit: Duration) -> std::io::Result<TcpStream> {
    let mut last = None;
    for resolved in address.to_socket_addrs()? {
        match TcpStream::connect_timeout(&resolved, limit) {
            Ok(stream) => return Ok(stream),
            Err(error) => last = Some(error),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(ErrorKind::InvalidInput, "the address resolves to nothing")
    }))
}

fn configure(stream: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))
}

fn peer_error(
    peer: usize,
    operation: &'static str,
    source: std::io::Error,
    timeout: Duration,
) -> CollectiveError {
    match source.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => CollectiveError::Timeout {
            peer,
            operation,
            seconds: timeout.as_secs_f64(),
        },
        _ => CollectiveError::Peer {
            peer,
            operation,
            source,
        },
    }
}

impl HostCollective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        self.guarded(|ring| ring.ring_all_reduce(data))
    }

    fn set_timeout(&mut self, timeout: Duration) -> Result<(), CollectiveError> {
        for stream in [&self.next, &self.previous] {
            configure(stream, timeout).map_err(|e| CollectiveError::Setup(e.to_string()))?;
        }
        self.timeout = timeout;
        Ok(())
    }

    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        self.guarded(|ring| ring.ring_broadcast(data, root))
    }
}

impl TcpRing {
    /// Runs one collective; after a failure the ring is broken: both sockets are shut down, so
    /// that the neighbours fail at once instead of at their timeout, and later calls are
    /// refused (their bytes would be read as another collective's).
    fn guarded(
        &mut self,
        collective: impl FnOnce(&mut TcpRing) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        if let Some(reason) = &self.broken {
            return Err(CollectiveError::OutOfStep(format!(
                "the ring broke in an earlier collective ({reason})"
            )));
        }
        let result = collective(self);
        if let Err(error) = &result {
            self.broken = Some(error.to_string());
            let _ = self.next.shutdown(std::net::Shutdown::Both);
            let _ = self.previous.shutdown(std::net::Shutdown::Both);
        }
        result
    }

    fn ring_all_reduce(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        let mut header = Some(self.next_call(0, data.len()));
        let world = self.world_size;
        let len = data.len();
        // Reduce-scatter: after W-1 steps rank r holds the full sum of chunk r+1. The
        // collective's first step sends its header with the data and checks the previous
        // rank's before reading any of its data.
        for step in 0..world - 1 {
            let send = chunk_bounds(len, world, (self.rank + world - step) % world);
            let receive = chunk_bounds(len, world, (self.rank + world - step - 1) % world);
            let (outgoing, incoming) = disjoint(data, send, receive);
            let header = header.take();
            self.step(
                header,
                outgoing,
                header,
                Incoming::Reduce(incoming),
                "all-reduce",
            )?;
        }
        // All-gather: pass the reduced chunks around the ring.
        for step in 0..world - 1 {
            let send = chunk_bounds(len, world, (self.rank + 1 + world - step) % world);
            let receive = chunk_bounds(len, world, (self.rank + world - step) % world);
            let (outgoing, incoming) = disjoint(data, send, receive);
            self.step(None, outgoing, None, Incoming::Copy(incoming), "all-reduce")?;
        }
        Ok(())
    }

    fn ring_broadcast(&mut self, data: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        if root >= self.world_size {
            return Err(CollectiveError::Local(format!(
                "a broadcast from rank {root} in a ring of {} ranks",
                self.world_size
            )));
        }
        let ours = self.next_call(1 + root as u64, data.len());
        // Every rank sends its header to the next one at once (ranks that disagree on the root
        // would otherwise all wait to receive first); the data goes round from the root to the
        // rank before it.
        let forwards = self.next_rank() != root;
        if self.rank == root {
            let payload: &[f32] = if forwards { data } else { &[] };
            return self.step(
                Some(ours),
                payload,
                Some(ours),
                Incoming::Nothing,
                "broadcast",
            );
        }
        self.step(
            Some(ours),
            &[],
            Some(ours),
            Incoming::Copy(data),
            "broadcast",
        )?;
        if forwards {
            self.step(None, data, None, Incoming::Nothing, "broadcast")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forms a ring of `world` threads on loopback and runs `body` on each rank.
    fn ring<T: Send + 'static>(
        world: usize,
        body: impl Fn(&mut TcpRing) -> T + Send + Sync + Copy + 'static,
    ) -> Vec<T> {
        let listeners: Vec<TcpListener> = (0..world)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let addresses: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().expect("addr").to_string())
            .collect();
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let addresses = addresses.clone();
                std::thread::spawn(move || {
                    let mut ring = TcpRing::connect(RingConfig {
                        rank,
                        world_size: world,
                        listener,
                        addresses,
                        group: "test".into(),
                        timeout: Duration::from_secs(10),
                        setup_timeout: Duration::from_secs(10),
                    })
                    .expect("ring");
                    body(&mut ring)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    }

    #[test]
    fn all_reduce_sums_over_ranks_for_odd_sizes() {
        for world in [2, 3, 4] {
            let results = ring(world, |ring| {
                let rank = ring.rank() as f32;
                let mut data: Vec<f32> = (0..1001).map(|i| i as f32 + rank * 1000.0).collect();
                ring.all_reduce_sum(&mut data).expect("all-reduce");
                let mut tiny = vec![rank + 1.0];
                ring.all_reduce_sum(&mut tiny)
                    .expect("all-reduce of one value");
                (data, tiny[0])
            });
            let world_f = world as f32;
            let rank_sum = (0..world).map(|r| r as f32).sum::<f32>();
            for (data, tiny) in results {
                assert_eq!(tiny, (1..=world).map(|r| r as f32).sum::<f32>());
                for (i, value) in data.iter().enumerate() {
                    assert_eq!(
                        *value,
                        i as f32 * world_f + rank_sum * 1000.0,
                        "world {world}, index {i}"
                    );
                }
            }
        }
    }

    /// Chunks longer than a reduced segment: received bytes are added segment by segment, a
    /// read that ends inside a value completing it on the next read.
    #[test]
    fn all_reduce_of_chunks_longer_than_a_segment_is_exact() {
        let len = 3 * (SEGMENT + 4_465) + 2;
        let results = ring(3, move |ring| {
            let rank = ring.rank() as f32;
            let mut data: Vec<f32> = (0..len).map(|i| i as f32 + rank).collect();
            ring.all_reduce_sum(&mut data).expect("all-reduce");
            data
        });
        for data in results {
            for (i, value) in data.iter().enumerate() {
                assert_eq!(*value, 3.0 * i as f32 + 3.0, "index {i}");
            }
        }
    }

    #[test]
    fn ranks_in_different_collectives_fail_naming_both() {
        // Another length on rank 1.
        let results = ring(2, |ring| {
            let mut data = vec![1.0f32; 10 + 2 * ring.rank()];
            ring.all_reduce_sum(&mut data)
                .map_err(|e| e.to_string())
                .map(|()| data)
        });
        for result in &results {
            let error = result.as_ref().expect_err("diverged lengths must fail");
            assert!(
                error.contains("an all-reduce of 10 values (collective 0)")
                    && error.contains("an all-reduce of 12 values (collective 0)")
                    && error.contains("diverged"),
                "{error}"
            );
        }
        // A broadcast on one rank, an all-reduce on the other.
        let results = ring(2, |ring| {
            let mut data = vec![1.0f32; 4];
            let outcome = if ring.rank() == 0 {
                ring.all_reduce_sum(&mut data)
            } else {
                ring.broadcast(&mut data, 0)
            };
            outcome.map_err(|e| e.to_string())
        });
        // Both fail; the rank that reads the other's header first names both calls (the other
        // one sees its neighbour leave).
        let errors: Vec<&String> = results
            .iter()
            .map(|r| r.as_ref().expect_err("different collectives must fail"))
            .collect();
        assert!(
            errors
                .iter()
                .any(|e| e.contains("a broadcast from rank 0 of 4 values")
                    && e.contains("an all-reduce of 4 values")),
            "{errors:?}"
        );
        // Three ranks, rank 1 alone diverges: rank 0's check-in passes, yet every rank fails
        // soon (the broken ranks shut their sockets), and a broken ring refuses what follows.
        let started = Instant::now();
        let results = ring(3, |ring| {
            let mut data = vec![1.0f32; if ring.rank() == 1 { 9 } else { 8 }];
            let first = ring.all_reduce_sum(&mut data).map_err(|e| e.to_string());
            let second = ring.all_reduce_sum(&mut data).map_err(|e| e.to_string());
            (first, second)
        });
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        for (first, second) in &results {
            assert!(first.is_err(), "{first:?}");
            let error = second.as_ref().expect_err("a broken ring refuses");
            assert!(error.contains("broke in an earlier collective"), "{error}");
        }
    }

    /// A longer timeout set for one collective (ranks that finish loading at different
    /// times) lets a rank late by more than the usual timeout be waited for; the usual one,
    /// set again, holds for what follows.
    #[test]
    fn a_timeout_set_for_a_collective_waits_that_long() {
        let results = ring(2, |ring| {
            // Short first: the longer one set next is what lets the late rank be waited for.
            ring.set_timeout(Duration::from_millis(300))
                .expect("timeout");
            if ring.rank() == 1 {
                std::thread::sleep(Duration::from_millis(1000));
            }
            ring.set_timeout(Duration::from_secs(10)).expect("timeout");
            let mut one = vec![1.0f32];
            let waited = ring.all_reduce_sum(&mut one).map(|()| one[0]);
            ring.set_timeout(Duration::from_millis(300))
                .expect("timeout");
            if ring.rank() == 1 {
                std::thread::sleep(Duration::from_millis(1000));
            }
            let late = ring.all_reduce_sum(&mut one).map_err(|e| e.to_string());
            (waited.map_err(|e| e.to_string()), late)
        });
        for (waited, _) in &results {
            assert_eq!(waited, &Ok(2.0));
        }
        // The one under the short timeout failed on rank 0, which waited for rank 1.
        let error = results[0]
            .1
            .as_ref()
            .expect_err("rank 1 was late under 300 ms");
        assert!(error.contains("rank 1"), "{error}");
    }

    /// Ranks whose programs diverged on an all-reduce larger than the sockets' buffers: each
    /// stops reading at the other's header while its own send is blocked; both fail at once,
    /// not at the collective timeout (10 s here).
    #[test]
    fn diverged_ranks_blocked_in_a_large_send_fail_at_once() {
        let started = Instant::now();
        let results = ring(2, |ring| {
            let mut data = vec![1.0f32; 16 * 1024 * 1024 + ring.rank()];
            ring.all_reduce_sum(&mut data).map_err(|e| e.to_string())
        });
        for result in &results {
            let error = result.as_ref().expect_err("diverged lengths must fail");
            assert!(!error.contains("timed out"), "{error}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn broadcast_copies_the_root() {
        for world in [2, 3, 4] {
            let results = ring(world, move |ring| {
                (0..world)
                    .map(|root| {
                        let mut data = vec![ring.rank() as f32; 17];
                        ring.broadcast(&mut data, root).expect("broadcast");
                        data
                    })
                    .collect::<Vec<_>>()
            });
            for by_root in results {
                for (root, data) in by_root.iter().enumerate() {
                    assert_eq!(data, &vec![root as f32; 17], "world {world}, root {root}");
                }
            }
        }
    }

    /// Ranks that disagree on a broadcast's root fail naming both calls, instead of all waiting
    /// to receive first until the timeout; a root outside the ring is refused.
    #[test]
    fn ranks_broadcasting_from_different_roots_fail_at_once() {
        let started = Instant::now();
        let results = ring(2, |ring| {
            let mut data = vec![1.0f32; 4];
            let root = 1 - ring.rank();
            ring.broadcast(&mut data, root).map_err(|e| e.to_string())
        });
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        for result in &results {
            let error = result.as_ref().expect_err("different roots must fail");
            assert!(
                error.contains("a broadcast from rank 0 of 4 values")
                    && error.contains("a broadcast from rank 1 of 4 values"),
                "{error}"
            );
        }
        let results = ring(2, |ring| {
            let mut data = vec![1.0f32; 4];
            ring.broadcast(&mut data, 2).map_err(|e| e.to_string())
        });
        for result in &results {
            let error = result.as_ref().expect_err("no rank 2");
            assert!(
                error.contains("broadcast from rank 2 in a ring of 2"),
                "{error}"
            );
        }
    }

    /// A rank whose receiving is done but whose send is blocked on a next rank that stopped
    /// reading (it diverged, failed and shut its sockets, its process still alive) fails at
    /// once, not when that process exits or at the timeout (10 s here).
    #[test]
    fn a_blocked_send_fails_when_the_next_rank_gives_up() {
        let results = ring(3, |ring| {
            let rank = ring.rank();
            // Chunks far larger than the sockets' buffers.
            let mut data = vec![1.0f32; 3 * 8 * 1024 * 1024 + usize::from(rank == 1)];
            if rank == 1 {
                // Late: rank 2 sends its whole chunk to rank 0 meanwhile.
                std::thread::sleep(Duration::from_millis(1000));
            }
            let started = Instant::now();
            let outcome = ring.all_reduce_sum(&mut data).map_err(|e| e.to_string());
            let took = started.elapsed();
            if rank == 1 {
                // Failed, sockets shut, but the process (this ring) lives on a while.
                std::thread::sleep(Duration::from_millis(3000));
            }
            (outcome, took)
        });
        let (outcome, took) = &results[0];
        let error = outcome.as_ref().expect_err("rank 0's send cannot finish");
        assert!(
            error.contains("rank 1") && !error.contains("did not answer"),
            "{error}"
        );
        assert!(
            *took < Duration::from_millis(2500),
            "took {took:?}: {error}"
        );
    }

    #[test]
    fn a_dead_peer_fails_the_collective_instead_of_hanging() {
        let listeners: Vec<TcpListener> = (0..2)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let addresses: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().expect("addr").to_string())
            .collect();
        let mut listeners = listeners.into_iter();
        let config = |rank, listener| RingConfig {
            rank,
            world_size: 2,
            listener,
            addresses: addresses.clone(),
            group: "g".into(),
            timeout: Duration::from_millis(500),
            setup_timeout: Duration::from_secs(5),
        };
        let first = config(0, listeners.next().expect("listener"));
        let second = config(1, listeners.next().expect("listener"));
        let silent = std::thread::spawn(move || {
            let ring = TcpRing::connect(second).expect("ring");
            // Joins, then never takes part: keeps the sockets open without answering.
            std::thread::sleep(Duration::from_secs(2));
            drop(ring);
        });
        let mut ring = TcpRing::connect(first).expect("ring");
        let started = Instant::now();
        let mut data = vec![1.0f32; 1 << 20];
        let error = ring.all_reduce_sum(&mut data).expect_err("must fail");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        assert!(error.to_string().contains("rank 1"), "{error}");
        silent.join().expect("thread");
    }

    /// Rank 0 of a two-rank ring whose rank 1 is at `second`, given `listener` (or a fresh
    /// one): the setup must fail, and its error is returned.
    fn failed_setup(
        listener: Option<TcpListener>,
        second: String,
        timeout: Duration,
        setup_timeout: Duration,
    ) -> CollectiveError {
        let listener = listener.unwrap_or_else(|| TcpListener::bind("127.0.0.1:0").expect("bind"));
        let addresses = vec![listener.local_addr().expect("addr").to_string(), second];
        TcpRing::connect(RingConfig {
            rank: 0,
            world_size: 2,
            listener,
            addresses,
            group: "g".into(),
            timeout,
            setup_timeout,
        })
        .expect_err("the setup must fail")
    }

    #[test]
    fn a_missing_rank_fails_the_setup_with_its_number() {
        let unused = TcpListener::bind("127.0.0.1:0").expect("bind");
        let second = unused.local_addr().expect("addr").to_string();
        let error = failed_setup(
            None,
            second,
            Duration::from_secs(1),
            Duration::from_millis(500),
        );
        assert!(
            error.to_string().contains("was not joined by rank 1"),
            "{error}"
        );
        // Another rank's absence: the group's failure, not this rank's.
        assert!(error.is_peer_failure(), "{error:?}");
        // A ring this rank cannot even describe is its own.
        let own = TcpRing::connect(RingConfig {
            rank: 2,
            world_size: 2,
            listener: TcpListener::bind("127.0.0.1:0").expect("bind"),
            addresses: vec!["a".into(), "b".into()],
            group: "g".into(),
            timeout: Duration::from_secs(1),
            setup_timeout: Duration::from_secs(1),
        })
        .expect_err("rank 2 of 2");
        assert!(!own.is_peer_failure(), "{own:?}");
    }

    #[test]
    fn a_silent_connection_holds_the_setup_no_longer_than_its_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let next = TcpListener::bind("127.0.0.1:0").expect("bind");
        // Connects first and never writes a handshake (a port scanner, a stale peer).
        let _silent = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let started = Instant::now();
        // The collective timeout is long: the handshake must be bounded by the setup's.
        let error = failed_setup(
            Some(listener),
            next.local_addr().expect("addr").to_string(),
            Duration::from_secs(30),
            Duration::from_millis(800),
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert!(
            error.to_string().contains("was not joined by rank 1"),
            "{error}"
        );
    }

    #[test]
    fn an_address_that_resolves_to_nothing_is_named() {
        let error = failed_setup(
            None,
            "no-such-host.invalid:1".into(),
            Duration::from_secs(1),
            Duration::from_millis(300),
        );
        assert!(
            error
                .to_string()
                .contains("could not connect to rank 1 at no-such-host.invalid:1"),
            "{error}"
        );
    }
}

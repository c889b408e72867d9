//! `ring-bench`: one rank of a TCP-ring all-reduce benchmark. Start `--world-size` copies with
//! ranks 0..W on loopback (`scripts/bench-allreduce.sh` does); rank 0 prints one JSON line per
//! size with algbw and busbw as nccl-tests define them (busbw = algbw * 2(W-1)/W), from the
//! median of the timed calls.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use mentor_collective::{HostCollective, RingConfig, TcpRing};

fn argument(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let usage = "usage: ring-bench --rank R --world-size W --base-port P [--sizes-mb 1,4,16,64,256] [--iterations N]";
    let rank: usize = argument("--rank").ok_or(usage)?.parse()?;
    let world_size: usize = argument("--world-size").ok_or(usage)?.parse()?;
    let base_port: u16 = argument("--base-port").ok_or(usage)?.parse()?;
    let sizes: Vec<f64> = argument("--sizes-mb")
        .unwrap_or_else(|| "1,4,16,64,256".into())
        .split(',')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let iterations: usize = argument("--iterations")
        .unwrap_or_else(|| "5".into())
        .parse()?;
    let addresses: Vec<String> = (0..world_size)
        .map(|r| format!("127.0.0.1:{}", base_port + r as u16))
        .collect();
    let listener = TcpListener::bind(&addresses[rank])?;
    let mut ring = TcpRing::connect(RingConfig {
        rank,
        world_size,
        listener,
        addresses,
        group: "bench".into(),
        timeout: Duration::from_secs(120),
        setup_timeout: Duration::from_secs(60),
    })?;
    for megabytes in sizes {
        let count = (megabytes * 1024.0 * 1024.0 / 4.0) as usize;
        let mut data = vec![1.0f32; count];
        ring.all_reduce_sum(&mut data)?; // warm-up
        let mut times = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let mut barrier = [0.0f32];
            ring.all_reduce_sum(&mut barrier)?;
            let started = Instant::now();
            ring.all_reduce_sum(&mut data)?;
            times.push(started.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let expected = (world_size as f32).powi(iterations as i32 + 1);
        if (data[0] - expected).abs() > expected * 1e-5 {
            return Err(format!("wrong sum: {} != {expected}", data[0]).into());
        }
        if rank == 0 {
            let bytes = (count * 4) as f64;
            let algbw = bytes / median / 1e9;
            let busbw = algbw * 2.0 * (world_size as f64 - 1.0) / world_size as f64;
            println!(
                "{{\"impl\":\"mentor-ring\",\"world_size\":{world_size},\"bytes\":{},\"seconds\":{median},\"algbw_gbps\":{algbw},\"busbw_gbps\":{busbw}}}",
                count * 4
            );
        }
    }
    Ok(())
}

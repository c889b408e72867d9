//! What the CPU offers bfloat16 arithmetic, read from the flags of `/proc/cpuinfo`.
//!
//! Whether `precision = "bfloat16"` pays on a CPU depends on the kernels oneDNN finds there.
//! The README's Benchmarks measured a Meta Pseudo Labels step 1.73 times faster than float32 on
//! one machine, and slower than float32 on a virtual machine whose CPU exposes AVX-512 BF16 but
//! not AMX, its bfloat16 matrix tiles. The worker warns when a plan asks for bfloat16 on a CPU
//! without AMX; `scripts/bench-mpl.sh` measures both precisions on the machine at hand.

/// The bfloat16 support of a CPU, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuBfloat16 {
    /// AMX tiles with bfloat16 (`amx_bf16`).
    Amx,
    /// AVX-512 BF16 instructions (`avx512_bf16`) without AMX.
    Avx512,
    /// Neither of the two (`avx512_bf16`, `amx_bf16`).
    Converted,
}

impl CpuBfloat16 {
    /// Reads the first `flags` line of a `/proc/cpuinfo` text (`Converted` when there is none).
    pub fn from_cpuinfo(cpuinfo: &str) -> CpuBfloat16 {
        let flags: Vec<&str> = cpuinfo
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == "flags").then(|| value.split_whitespace().collect())
            })
            .unwrap_or_default();
        if flags.contains(&"amx_bf16") {
            CpuBfloat16::Amx
        } else if flags.contains(&"avx512_bf16") {
            CpuBfloat16::Avx512
        } else {
            CpuBfloat16::Converted
        }
    }

    /// This machine's support (`None` where `/proc/cpuinfo` cannot be read).
    pub fn of_this_machine() -> Option<CpuBfloat16> {
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .map(|text| CpuBfloat16::from_cpuinfo(&text))
    }

    /// A warning for a plan that trains in bfloat16 on this CPU (`None` where it pays).
    pub fn warning(self) -> Option<&'static str> {
        match self {
            CpuBfloat16::Amx => None,
            CpuBfloat16::Avx512 => Some(
                "the plan trains in bfloat16 on a CPU without AMX (it has AVX-512 BF16): \
                 float32 may be faster here; scripts/bench-mpl.sh measures both",
            ),
            CpuBfloat16::Converted => Some(
                "the plan trains in bfloat16 on a CPU with neither AMX nor AVX-512 BF16: \
                 float32 is likely faster here; scripts/bench-mpl.sh measures both",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel\t\t: 207\n";

    fn cpuinfo(flags: &str) -> String {
        format!(
            "{HEADER}flags\t\t: {flags}\nbugs\t\t: spectre_v1\n\nprocessor\t: 1\nflags\t\t: fpu\n"
        )
    }

    #[test]
    fn amx_is_read_before_avx512() {
        let text = cpuinfo("fpu avx512f avx512_bf16 amx_bf16 amx_tile");
        assert_eq!(CpuBfloat16::from_cpuinfo(&text), CpuBfloat16::Amx);
        assert_eq!(CpuBfloat16::Amx.warning(), None);
    }

    #[test]
    fn avx512_bf16_without_amx_warns() {
        let text = cpuinfo("fpu avx512f avx512_bf16 avx512_fp16 avx512_vnni");
        let support = CpuBfloat16::from_cpuinfo(&text);
        assert_eq!(support, CpuBfloat16::Avx512);
        assert!(support.warning().is_some_and(|w| w.contains("without AMX")));
    }

    #[test]
    fn a_flag_is_a_whole_word_and_a_missing_line_means_no_support() {
        // `avx512_bf16x` is not `avx512_bf16`; `bugs` is not read as flags.
        let text = cpuinfo("fpu avx512_bf16x amx_bf16_off");
        assert_eq!(CpuBfloat16::from_cpuinfo(&text), CpuBfloat16::Converted);
        assert_eq!(CpuBfloat16::from_cpuinfo(HEADER), CpuBfloat16::Converted);
        assert!(CpuBfloat16::Converted.warning().is_some());
    }
}

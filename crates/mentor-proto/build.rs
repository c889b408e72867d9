//! Compiles `proto/` at the workspace root into Rust with tonic-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not with `env!`: a build script compiled for one checkout may be reused
    // by another checkout sharing the target directory.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let proto_root = std::path::Path::new(&manifest_dir).join("../../proto");
    let file = proto_root.join("mentor/coordinator/v1/coordinator.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    tonic_build::configure().compile_protos(&[file], &[proto_root])?;
    Ok(())
}

//! Compiles `proto/` at the workspace root into Rust with tonic-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let file = proto_root.join("mentor/coordinator/v1/coordinator.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    tonic_build::configure().compile_protos(&[file], &[proto_root])?;
    Ok(())
}

//! Link settings every binary that may use a GPU needs (see DESIGN.md 4.1):
//! keep `libtorch_cuda` although no symbol of it is referenced (as-needed linking drops it and
//! CUDA then looks unavailable), and an rpath to libtorch so no LD_LIBRARY_PATH is needed.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib_dir = std::env::var("DEP_TCH_LIBTORCH_LIB").ok();
    let has_cuda = lib_dir
        .as_ref()
        .map(|dir| std::path::Path::new(dir).join("libtorch_cuda.so").exists())
        .unwrap_or(false);
    if has_cuda {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    if let Some(dir) = lib_dir {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}

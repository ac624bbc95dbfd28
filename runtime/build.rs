//! Binaries must run outside cargo: point their rpath at the directory holding
//! libmlx.so (exported by mlx-sys as `DEP_MLX_LIBDIR` on Linux).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_MLX_LIBDIR");
    if let Ok(dir) = std::env::var("DEP_MLX_LIBDIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}

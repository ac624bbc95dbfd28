//! `cathedralctl` links the runtime library (one mTLS client, certificates, kill switch), and
//! with it libmlx: point the binary's rpath at the directory mlx-sys found it in (exported as
//! `DEP_MLX_LIBDIR` on Linux) so it runs outside cargo.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_MLX_LIBDIR");
    if let Ok(dir) = std::env::var("DEP_MLX_LIBDIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}

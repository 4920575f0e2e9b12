//! Compiles the libjpeg shim and links libjpeg-turbo statically from the system
//! (Debian: libjpeg62-turbo-dev). Nothing is downloaded.

fn main() {
    println!("cargo:rerun-if-changed=csrc/jpeg_shim.c");
    println!("cargo:rerun-if-changed=csrc/jpeg_shim.h");
    println!("cargo:rerun-if-env-changed=LIBJPEG_LIB_DIR");
    println!("cargo:rerun-if-env-changed=LIBJPEG_INCLUDE_DIR");

    let mut build = cc::Build::new();
    build
        .file("csrc/jpeg_shim.c")
        .include("csrc")
        .warnings(true)
        .extra_warnings(true);
    if let Ok(dir) = std::env::var("LIBJPEG_INCLUDE_DIR") {
        build.include(dir);
    }
    build.compile("jpeg_shim");

    let lib_dir = std::env::var("LIBJPEG_LIB_DIR").unwrap_or_else(|_| default_lib_dir());
    if !std::path::Path::new(&lib_dir).join("libjpeg.a").is_file() {
        println!(
            "cargo:warning=libjpeg.a not found in {lib_dir}; install libjpeg62-turbo-dev (Debian) or set LIBJPEG_LIB_DIR"
        );
    }
    println!("cargo:rustc-link-search=native={lib_dir}");
    println!("cargo:rustc-link-lib=static=jpeg");
}

fn default_lib_dir() -> String {
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    format!("/usr/lib/{arch}-{os}-{env}")
}

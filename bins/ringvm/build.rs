//! Builds the built-in guest (tests/guest) for x86_64-unknown-none and
//! hands its ELF to the binary through OUT_DIR.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    release_layout(&manifest);
    let guest = manifest
        .join("../../tests/guest")
        .canonicalize()
        .expect("tests/guest exists");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    // Fuzz targets use the library (the API) only, under a nightly
    // toolchain that need not have the bare-metal target: no guest.
    if env::var_os("CARGO_CFG_FUZZING").is_some() {
        std::fs::write(out.join("ringvm-guest.elf"), b"").expect("writing the empty guest");
        return;
    }
    let target_dir = out.join("guest-target");
    for p in [
        "src",
        "Cargo.toml",
        "build.rs",
        "link.ld",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", guest.join(p).display());
    }
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    ensure_bare_metal_target(&guest);
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest)
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-none",
            "--target-dir",
        ])
        .arg(&target_dir);
    // The outer build's flags and wrappers (clippy, coverage, sanitizers)
    // are for the host binary, not the bare-metal guest.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("running cargo for the built-in guest");
    assert!(
        status.success(),
        "building the built-in guest failed; is the x86_64-unknown-none target installed? \
         (rustup target add x86_64-unknown-none)"
    );
    let elf = target_dir.join("x86_64-unknown-none/release/ringvm-guest");
    std::fs::copy(&elf, out.join("ringvm-guest.elf")).expect("copying the guest ELF");
}

/// A fresh machine's rustup (1.28 and later) does not add the targets
/// that rust-toolchain.toml names to a toolchain that is already
/// installed: add the guest's target here, so that `cargo run` is the
/// only set-up step. Without rustup (a distribution's Rust), the guest
/// build below reports what is missing.
fn ensure_bare_metal_target(guest: &std::path::Path) {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(rustc)
        .current_dir(guest)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    // The guest directory's toolchain file names the same channel.
    let installed = sysroot
        .map(|s| s.join("lib/rustlib/x86_64-unknown-none").is_dir())
        .unwrap_or(false);
    if installed {
        return;
    }
    let added = Command::new("rustup")
        .current_dir(guest)
        .args(["target", "add", "x86_64-unknown-none"])
        .status();
    if !matches!(added, Ok(s) if s.success()) {
        println!("cargo:warning=could not add the x86_64-unknown-none target with rustup");
    }
}

/// Release builds of the binary: the functions of the common paths
/// (startup.order, written by benches/order-symbols.sh) first in .text,
/// so that start-up touches a few of the page cache's large folios rather
/// than most of the file; and packed relative relocations (DT_RELR), so
/// that the static-PIE start-up reads 1 KB of them instead of 100 KB.
/// Both are options of lld, Rust's default linker on this target; a name
/// in the list that is gone from the build is skipped without a warning.
fn release_layout(manifest: &std::path::Path) {
    let order = manifest.join("startup.order");
    println!("cargo:rerun-if-changed={}", order.display());
    let release = env::var("PROFILE").is_ok_and(|p| p == "release");
    let linux = env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    if !release || !linux || env::var_os("CARGO_CFG_FUZZING").is_some() {
        return;
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    if order.exists() {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}

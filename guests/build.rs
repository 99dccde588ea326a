//! Builds the freestanding PVH test guest (`src/boot.S` + `src/testguest.c`,
//! linked with `link.ld`) with the system gcc and ld into
//! `$OUT_DIR/testguest.elf`, which `src/lib.rs` embeds.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const CFLAGS: &[&str] = &[
    "-O2",
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    "-ffreestanding",
    "-fno-builtin",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-mcmodel=small",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-tree-loop-distribute-patterns",
    "-ffixed-r15",
    "-nostdlib",
];

fn run(cmd: &mut Command, what: &str) {
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "godwit-guests: cannot run {what}: `{}` not found. The test guest is \
             built from source with the system C toolchain; install it \
             (Debian/Ubuntu: `apt-get install gcc binutils`).",
            cmd.get_program().to_string_lossy()
        ),
        Err(e) => panic!("godwit-guests: cannot run {what}: {e}"),
    };
    if !out.status.success() {
        panic!(
            "godwit-guests: {what} failed ({}):\n{:?}\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            cmd,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Surface compiler warnings without failing the build.
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        println!("cargo:warning={line}");
    }
}

fn compile(src: &Path, obj: &Path, extra: &[&str]) {
    let mut cmd = Command::new("gcc");
    cmd.args(CFLAGS)
        .args(extra)
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(obj);
    run(&mut cmd, &format!("gcc on {}", src.display()));
}

fn main() {
    let dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));

    let boot = dir.join("src/boot.S");
    let c = dir.join("src/testguest.c");
    let ld_script = dir.join("link.ld");
    for p in [&boot, &c, &ld_script] {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    println!("cargo:rerun-if-changed=build.rs");

    let boot_o = out.join("boot.o");
    let c_o = out.join("testguest.o");
    let elf = out.join("testguest.elf");

    compile(&boot, &boot_o, &[]);
    compile(&c, &c_o, &[]);

    let mut cmd = Command::new("ld");
    cmd.args([
        "-nostdlib",
        "-static",
        "--no-dynamic-linker",
        "-z",
        "max-page-size=4096",
    ])
    .args(["-z", "noexecstack", "--build-id=none", "-T"])
    .arg(&ld_script)
    .arg("-o")
    .arg(&elf)
    .arg(&boot_o)
    .arg(&c_o);
    run(&mut cmd, "ld (linking testguest.elf)");
}

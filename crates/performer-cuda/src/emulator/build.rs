//! Compiling the kernel sources as C++ into a shared library the emulator loads.
//!
//! The library is `emulator/runtime.h`, the common header, every source of
//! [`SOURCES`](crate::kernel_sources::SOURCES) and one generated launch entry per kernel, built
//! by `$CXX` (default `c++`, C++20) once per content: it is cached under
//! `$PERFORMER_CUDA_EMU_CACHE` (default: the temp dir) by a hash of everything that goes into it,
//! and written under a temporary name then renamed, so concurrent processes never load half a
//! file.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};
use crate::kernel_sources::{COMMON_HEADER, SOURCES};

/// The emulator's run time (CUDA built-ins and the thread scheduler).
pub const RUNTIME_HEADER: &str = include_str!("../../emulator/runtime.h");

const FLAGS: &[&str] = &[
    "-std=c++20",
    "-O2",
    "-fPIC",
    "-shared",
    "-Wno-unknown-pragmas",
    "-fno-strict-aliasing",
];

/// The C++ translation unit: run time, sources, and the name -> entry table.
pub(crate) fn translation_unit() -> String {
    let mut s = String::new();
    s += RUNTIME_HEADER;
    s += "\n#line 1 \"common.cuh\"\n";
    s += COMMON_HEADER;
    for src in SOURCES {
        s += &format!("\n#line 1 \"{}\"\n{}\n", src.name, src.source);
    }
    s += "\n#line 1 \"generated entries\"\n";
    s += "typedef int (*EmuEntry)(void**, const unsigned char*, int, dim3, dim3, unsigned long \
          long, char*, size_t);\n";
    s += "struct EmuNamed { const char* name; EmuEntry entry; };\n";
    s += "static const EmuNamed emu_entries[] = {\n";
    for src in SOURCES {
        for f in src.functions {
            s += &format!(
                "  {{\"{f}\", [](void** a, const unsigned char* k, int n, dim3 g, dim3 b, \
                 unsigned long long seed, char* e, size_t el) {{ return emu::launch(\"{f}\", \
                 {f}, a, k, n, g, b, seed, e, el); }}}},\n"
            );
        }
    }
    s += "};\n";
    s += r#"
extern "C" int performer_emu_launch(const char* name, void** args, const unsigned char* kinds,
                                    int nargs, const unsigned* grid, const unsigned* block,
                                    unsigned long long seed, char* err, size_t err_len) {
    for (const auto& e : emu_entries) {
        if (std::strcmp(e.name, name) == 0)
            return e.entry(args, kinds, nargs, dim3{grid[0], grid[1], grid[2]},
                           dim3{block[0], block[1], block[2]}, seed, err, err_len);
    }
    std::snprintf(err, err_len, "no kernel named %s in the emulated sources", name);
    return 1;
}
"#;
    s
}

/// FNV-1a, stable across Rust versions (the cache key must not change with the toolchain).
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.as_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn compiler() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".to_string())
}

fn cache_dir() -> PathBuf {
    std::env::var_os("PERFORMER_CUDA_EMU_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("performer-cuda-emu"))
}

/// The path of the built library, building it if the cache does not have this content.
pub(crate) fn library() -> Result<PathBuf> {
    const OP: &str = "build emulator";
    let tu = translation_unit();
    let cxx = compiler();
    let key = fnv1a(&[&tu, &cxx, &FLAGS.join(" ")]);
    let dir = cache_dir();
    let lib = dir.join(format!("emu-{key:016x}.so"));
    if lib.is_file() {
        return Ok(lib);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::Emulator {
        op: OP,
        detail: format!("cannot create {}: {e}", dir.display()),
    })?;
    let tag = format!("{}-{:?}", std::process::id(), std::thread::current().id());
    let tag: String = tag.chars().filter(char::is_ascii_alphanumeric).collect();
    let cpp = dir.join(format!("emu-{key:016x}-{tag}.cpp"));
    let tmp = dir.join(format!("emu-{key:016x}-{tag}.so.tmp"));
    std::fs::write(&cpp, &tu).map_err(|e| Error::Emulator {
        op: OP,
        detail: format!("cannot write {}: {e}", cpp.display()),
    })?;
    let out = Command::new(&cxx)
        .args(FLAGS)
        .arg(&cpp)
        .arg("-o")
        .arg(&tmp)
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            let _ = std::fs::remove_file(&cpp);
            return Err(Error::CompilerUnavailable {
                op: OP,
                compiler: cxx,
                detail: e.to_string(),
            });
        }
    };
    let _ = std::fs::remove_file(&cpp);
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Emulator {
            op: OP,
            detail: format!(
                "{cxx} failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    rename(&tmp, &lib).map_err(|e| Error::Emulator {
        op: OP,
        detail: format!("cannot move {} to {}: {e}", tmp.display(), lib.display()),
    })?;
    Ok(lib)
}

fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)
}

//! The emulated device's memory: every allocation is its own mapping whose last byte abuts a
//! page with no access, so a kernel that reads or writes past the end of a buffer (the common
//! indexing bug) faults at once instead of corrupting a neighbour. Fresh memory is NaN, so an
//! element no kernel wrote cannot pass as a plausible zero.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::launcher::DevicePtr;

/// Alignment of every allocation's start (what float4 loads need; cudaMalloc gives 256).
const ALIGN: usize = 16;

/// One live allocation.
#[derive(Debug)]
struct Mapping {
    /// The mapping's first byte and its length (whole pages, the guard page included).
    base: usize,
    mapped: usize,
    /// The bytes asked for.
    bytes: usize,
}

/// The allocations of one emulated device and its capacity.
#[derive(Debug)]
pub(crate) struct Memory {
    live: BTreeMap<DevicePtr, Mapping>,
    in_use: usize,
    peak: usize,
    capacity: usize,
}

fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as usize } else { 4096 }
}

impl Memory {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            live: BTreeMap::new(),
            in_use: 0,
            peak: 0,
            capacity,
        }
    }

    pub(crate) fn in_use(&self) -> usize {
        self.in_use
    }

    pub(crate) fn peak(&self) -> usize {
        self.peak
    }

    pub(crate) fn reset_peak(&mut self) {
        self.peak = self.in_use;
    }

    pub(crate) fn alloc(&mut self, bytes: usize) -> Result<DevicePtr> {
        const OP: &str = "alloc";
        let bytes_padded = bytes.max(1).next_multiple_of(ALIGN);
        if self.in_use.saturating_add(bytes) > self.capacity {
            return Err(Error::OutOfMemory {
                op: OP,
                requested: bytes,
                in_use: self.in_use,
                capacity: self.capacity,
            });
        }
        let page = page_size();
        let data_pages = bytes_padded.next_multiple_of(page);
        let mapped = data_pages + page;
        // SAFETY: a fresh anonymous private mapping; nothing else refers to its range.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(Error::OutOfMemory {
                op: OP,
                requested: bytes,
                in_use: self.in_use,
                capacity: self.capacity,
            });
        }
        let base = base as usize;
        // SAFETY: the last page lies inside the mapping just made.
        let guarded = unsafe {
            libc::mprotect(
                (base + data_pages) as *mut libc::c_void,
                page,
                libc::PROT_NONE,
            )
        };
        if guarded != 0 {
            // SAFETY: unmapping the mapping made above, which nothing else refers to.
            unsafe { libc::munmap(base as *mut libc::c_void, mapped) };
            return Err(Error::Emulator {
                op: OP,
                detail: "mprotect of the guard page failed".into(),
            });
        }
        let start = base + data_pages - bytes_padded;
        // SAFETY: [start, start + bytes_padded) lies inside the writable part of the mapping and
        // is 4-byte aligned; NaN poison in every f32 slot and in every bf16 half of one.
        unsafe {
            std::slice::from_raw_parts_mut(start as *mut u32, bytes_padded / 4)
                .fill(crate::launcher::POISON_BITS);
        }
        self.live.insert(
            start as DevicePtr,
            Mapping {
                base,
                mapped,
                bytes,
            },
        );
        self.in_use += bytes;
        self.peak = self.peak.max(self.in_use);
        Ok(start as DevicePtr)
    }

    pub(crate) fn free(&mut self, ptr: DevicePtr) -> Result<()> {
        let Some(m) = self.live.remove(&ptr) else {
            return Err(Error::Emulator {
                op: "free",
                detail: format!("{ptr:#x} is not the start of a live allocation"),
            });
        };
        self.in_use -= m.bytes;
        // SAFETY: the mapping was made by `alloc` and is unmapped once (removed from `live`).
        unsafe { libc::munmap(m.base as *mut libc::c_void, m.mapped) };
        Ok(())
    }

    /// The allocation holding `ptr`: its start and length in bytes.
    pub(crate) fn containing(&self, ptr: DevicePtr) -> Option<(DevicePtr, usize)> {
        let (&start, m) = self.live.range(..=ptr).next_back()?;
        (ptr < start + m.bytes as u64).then_some((start, m.bytes))
    }

    /// Fails unless `[ptr, ptr + bytes)` lies inside one live allocation.
    pub(crate) fn check_range(
        &self,
        op: &'static str,
        what: &str,
        ptr: DevicePtr,
        bytes: usize,
    ) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        match self.containing(ptr) {
            Some((start, len)) if ptr + bytes as u64 <= start + len as u64 => Ok(()),
            Some((start, len)) => Err(Error::Emulator {
                op,
                detail: format!(
                    "{what}: {bytes} bytes at {ptr:#x} run past the end of the {len}-byte \
                     allocation at {start:#x} (by {} bytes)",
                    ptr + bytes as u64 - (start + len as u64)
                ),
            }),
            None => Err(Error::Emulator {
                op,
                detail: format!("{what}: {ptr:#x} is not inside any live allocation"),
            }),
        }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        for (_, m) in std::mem::take(&mut self.live) {
            // SAFETY: each mapping was made by `alloc` and is unmapped once.
            unsafe { libc::munmap(m.base as *mut libc::c_void, m.mapped) };
        }
    }
}

//! One launcher per device for the whole process, created on first use: tensors on
//! `Device::Cuda(n)` share one context and one stream, so their work is ordered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use performer_cuda::{EmulatedLauncher, GpuLauncher, SharedLauncher};

use crate::{Device, Error, Result};

/// The launcher of `device` (created on first use; TF32 off: GEMMs in full f32).
pub fn launcher(device: Device) -> Result<SharedLauncher> {
    static LAUNCHERS: Mutex<Option<HashMap<Device, SharedLauncher>>> = Mutex::new(None);
    let mut map = LAUNCHERS.lock().unwrap_or_else(|e| e.into_inner());
    let map = map.get_or_insert_with(HashMap::new);
    if let Some(l) = map.get(&device) {
        return Ok(l.clone());
    }
    let op = format!("to_device({device})");
    let launcher: SharedLauncher = match device {
        Device::Cpu => {
            return Err(Error::invalid(
                "launcher",
                "device",
                device,
                "the host has no launcher",
            ));
        }
        Device::Cuda(n) => {
            Arc::new(GpuLauncher::new(n, false).map_err(|e| super::map_err(&op, device, e))?)
        }
        Device::Emulated => {
            Arc::new(EmulatedLauncher::new().map_err(|e| super::map_err(&op, device, e))?)
        }
    };
    map.insert(device, launcher.clone());
    Ok(launcher)
}

//! The NCCL back end (feature `nccl`). Without a GPU, joining fails with an error that says
//! what is missing (never a panic); with one (`cargo xtask device-bundle` machines), a world of
//! one GPU reduces and broadcasts host and device buffers.

use performer_dist::{Communicator, NcclCommunicator, SingleProcess};

fn gpu_present() -> bool {
    // SAFETY: only tries to dlopen the libraries by their usual names.
    unsafe {
        cudarc::driver::sys::is_culib_present()
            && cudarc::nccl::sys::is_culib_present()
            && cudarc::driver::CudaContext::device_count().is_ok_and(|n| n > 0)
    }
}

#[test]
fn without_a_gpu_joining_fails_with_a_clear_error() {
    if gpu_present() {
        eprintln!("skipped: a GPU and libnccl are present (the GPU test below runs instead)");
        return;
    }
    let err = NcclCommunicator::over(Box::new(SingleProcess), None)
        .err()
        .expect("no GPU: an error");
    let msg = err.to_string();
    assert!(
        msg.starts_with("nccl initialize: ")
            && (msg.contains("no CUDA driver") || msg.contains("libnccl was not found")),
        "{msg}"
    );
}

#[test]
fn one_gpu_world_reduces_and_broadcasts() {
    if !gpu_present() {
        eprintln!("skipped: no GPU with libnccl here");
        return;
    }
    let comm = NcclCommunicator::over(Box::new(SingleProcess), None).unwrap();
    assert_eq!(
        (comm.rank(), comm.world_size(), comm.backend()),
        (0, 1, "nccl")
    );
    let mut a = vec![1.5f32, -2.0, 3.25];
    comm.all_reduce_mean(&mut [&mut a[..]]).unwrap();
    assert_eq!(a, vec![1.5, -2.0, 3.25]);
    let sum = comm
        .start_all_reduce_sum(vec![4.0; 5])
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(sum, vec![4.0; 5]);
    comm.broadcast(&mut [&mut a[..]], 0).unwrap();
    let stream = comm.stream().clone();
    let mut dev = vec![stream.clone_htod(&[2.0f32, 4.0]).unwrap()];
    comm.all_reduce_mean_device(&mut dev).unwrap();
    assert_eq!(stream.clone_dtoh(&dev[0]).unwrap(), vec![2.0, 4.0]);
}

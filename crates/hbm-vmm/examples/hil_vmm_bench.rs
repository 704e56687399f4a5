//! GPU benchmark: latency of each VMM operation through `hbm-vmm` and through raw
//! `cudarc::driver::sys` calls, in the same run, for 2 MiB, 64 MiB and 1 GiB chunks.
//!
//! Prints a table and writes `hbm-vmm.json` into `$HIL_RESULTS` (default: the current dir).
//! Built by `cargo xtask hil` (feature `cuda`); run `bash target/hil/run.sh hil_vmm_bench`.
//!
//! The wrapper's `map` also grants access to the owner device (one `cuMemSetAccess`), so it is
//! compared with raw `cuMemMap + cuMemSetAccess` ("map+access"). Every number is the median
//! over the repetitions, after one discarded warm-up round; raw and wrapper rounds alternate so
//! that drift hits both alike.

use cudarc::driver::sys;
use hbm_vmm::cuda::CudaBackend;
use hbm_vmm::{DeviceId, Vmm, VmmError};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{c_int, c_void};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Instant;

const D0: DeviceId = DeviceId(0);
const MIB: usize = 1 << 20;
const OPS: [&str; 10] = [
    "create",
    "reserve",
    "map+access",
    "set-access",
    "export",
    "import",
    "release(import)",
    "unmap",
    "release",
    "free",
];

/// Microseconds per op name, one entry per repetition.
type Samples = BTreeMap<&'static str, Vec<f64>>;

fn ok(call: &'static str, r: sys::CUresult) -> Result<(), VmmError> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(VmmError::Driver {
            call,
            code: r as i32,
        })
    }
}

/// Times `f` in microseconds.
fn time<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed().as_secs_f64() * 1e6)
}

fn raw_round(
    backend: &CudaBackend,
    size: usize,
    granularity: usize,
    s: &mut Samples,
    notes: &mut BTreeSet<String>,
) -> Result<(), VmmError> {
    backend.bind(D0)?;
    let ordinal = 0;
    let prop = sys::CUmemAllocationProp {
        type_: sys::CUmemAllocationType_enum::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes:
            sys::CUmemAllocationHandleType_enum::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
        location: sys::CUmemLocation {
            type_: sys::CUmemLocationType_enum::CU_MEM_LOCATION_TYPE_DEVICE,
            id: ordinal,
        },
        win32HandleMetaData: std::ptr::null_mut(),
        allocFlags: sys::CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: 0,
            usage: 0,
            reserved: [0; 4],
        },
    };
    let access = sys::CUmemAccessDesc {
        location: prop.location,
        flags: sys::CUmemAccess_flags_enum::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    };
    let mut handle = 0;
    let mut ptr = 0;
    let mut fd: c_int = -1;
    let mut imported = 0;
    // SAFETY: every pointer passed below points at a live local; the handles and ranges are
    // used in the driver's documented order (create, reserve, map, access, ..., unmap, release,
    // free) and each is released exactly once.
    unsafe {
        let (r, t) = time(|| sys::cuMemCreate(&mut handle, size, &prop, 0));
        ok("cuMemCreate", r)?;
        push(s, "create", t);
        let (r, t) = time(|| sys::cuMemAddressReserve(&mut ptr, size, granularity, 0, 0));
        ok("cuMemAddressReserve", r)?;
        push(s, "reserve", t);
        let (r, t_map) = time(|| sys::cuMemMap(ptr, size, 0, handle, 0));
        ok("cuMemMap", r)?;
        let (r, t_acc) = time(|| sys::cuMemSetAccess(ptr, size, &access, 1));
        ok("cuMemSetAccess", r)?;
        push(s, "map", t_map);
        push(s, "map+access", t_map + t_acc);
        let (r, t) = time(|| sys::cuMemSetAccess(ptr, size, &access, 1));
        ok("cuMemSetAccess", r)?;
        push(s, "set-access", t);
        let (r, t) = time(|| {
            sys::cuMemExportToShareableHandle(
                (&mut fd as *mut c_int).cast::<c_void>(),
                handle,
                sys::CUmemAllocationHandleType_enum::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                0,
            )
        });
        ok("cuMemExportToShareableHandle", r)?;
        push(s, "export", t);
        let (r, t) = time(|| {
            let r = sys::cuMemImportFromShareableHandle(
                &mut imported,
                fd as isize as *mut c_void,
                sys::CUmemAllocationHandleType_enum::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
            );
            drop(OwnedFd::from_raw_fd(fd));
            r
        });
        // Importing in the exporting process is a convenience of this benchmark; if a driver
        // refuses it, report that and keep measuring the other operations.
        if r == sys::CUresult::CUDA_SUCCESS {
            push(s, "import", t);
            let (r, t) = time(|| sys::cuMemRelease(imported));
            ok("cuMemRelease", r)?;
            push(s, "release(import)", t);
        } else {
            notes.insert(format!(
                "raw same-process import failed with code {}",
                r as i32
            ));
        }
        let (r, t) = time(|| sys::cuMemUnmap(ptr, size));
        ok("cuMemUnmap", r)?;
        push(s, "unmap", t);
        let (r, t) = time(|| sys::cuMemRelease(handle));
        ok("cuMemRelease", r)?;
        push(s, "release", t);
        let (r, t) = time(|| sys::cuMemAddressFree(ptr, size));
        ok("cuMemAddressFree", r)?;
        push(s, "free", t);
    }
    Ok(())
}

fn wrapper_round(
    vmm: &Vmm<CudaBackend>,
    size: usize,
    s: &mut Samples,
    notes: &mut BTreeSet<String>,
) -> Result<(), VmmError> {
    let (chunk, t) = time(|| vmm.create_chunk(D0, size, true));
    let chunk = chunk?;
    push(s, "create", t);
    let (res, t) = time(|| vmm.reserve(D0, size));
    let res = res?;
    push(s, "reserve", t);
    let (m, t) = time(|| res.map(0, &chunk, 0, size));
    let m = m?;
    push(s, "map+access", t);
    let (r, t) = time(|| res.set_access(&[]));
    r?;
    push(s, "set-access", t);
    let (fd, t) = time(|| chunk.export());
    let fd = fd?;
    push(s, "export", t);
    let (imported, t) = time(|| vmm.import_chunk(D0, fd, size));
    match imported {
        Ok(imported) => {
            push(s, "import", t);
            let ((), t) = time(|| drop(imported));
            push(s, "release(import)", t);
        }
        Err(e) => {
            notes.insert(format!("wrapper same-process import failed: {e}"));
        }
    }
    let (r, t) = time(|| m.unmap());
    r?;
    push(s, "unmap", t);
    let ((), t) = time(|| drop(chunk));
    push(s, "release", t);
    let ((), t) = time(|| drop(res));
    push(s, "free", t);
    let errors = vmm.take_errors();
    if let Some(e) = errors.into_iter().next() {
        return Err(e);
    }
    Ok(())
}

fn push(s: &mut Samples, op: &'static str, us: f64) {
    s.entry(op).or_default().push(us);
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn device_name(backend: &CudaBackend) -> String {
    let Ok(cu) = backend.cu_device(D0) else {
        return "unknown".into();
    };
    let mut buf = [0 as std::ffi::c_char; 256];
    // SAFETY: `buf` is a writable buffer of the length we pass.
    let r = unsafe { sys::cuDeviceGetName(buf.as_mut_ptr(), buf.len() as c_int, cu) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return "unknown".into();
    }
    // SAFETY: on success the driver wrote a NUL-terminated string into `buf`.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn driver_version() -> i32 {
    let mut v: c_int = 0;
    // SAFETY: `v` is a valid out-pointer.
    let _ = unsafe { sys::cuDriverGetVersion(&mut v) };
    v
}

fn main() {
    let backend = match CudaBackend::for_hil_test(1) {
        Ok(Some(b)) => b,
        Ok(None) => {
            println!("SKIPPED hil_vmm_bench: no GPU");
            return;
        }
        Err(e) => {
            eprintln!("hil_vmm_bench: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = run(backend) {
        eprintln!("hil_vmm_bench failed: {e}");
        std::process::exit(1);
    }
}

fn run(backend: CudaBackend) -> Result<(), Box<dyn std::error::Error>> {
    let card = device_name(&backend);
    let driver = driver_version();
    let vmm = Vmm::new(backend);
    let granularity = vmm.granularity(D0)?;
    println!("hbm-vmm VMM op latency on {card} (driver API {driver}), granularity {granularity} B");
    println!("median µs over the repetitions; ratio = wrapper / raw\n");
    println!(
        "{:>8} {:>16} {:>6} {:>12} {:>12} {:>7}",
        "size", "op", "reps", "raw µs", "wrapper µs", "ratio"
    );

    let mut rows = Vec::new();
    let mut notes = BTreeSet::new();
    for (size, reps) in [(2 * MIB, 50), (64 * MIB, 20), (1024 * MIB, 8)] {
        let mut raw = Samples::new();
        let mut wrapped = Samples::new();
        // Warm-up round for both, discarded.
        raw_round(
            vmm.backend(),
            size,
            granularity,
            &mut Samples::new(),
            &mut notes,
        )?;
        wrapper_round(&vmm, size, &mut Samples::new(), &mut notes)?;
        for _ in 0..reps {
            raw_round(vmm.backend(), size, granularity, &mut raw, &mut notes)?;
            wrapper_round(&vmm, size, &mut wrapped, &mut notes)?;
        }
        let (mut raw_total, mut wrapped_total) = (0.0, 0.0);
        for op in OPS {
            let r = median(raw.get(op).map_or(&[][..], Vec::as_slice));
            let w = median(wrapped.get(op).map_or(&[][..], Vec::as_slice));
            if r.is_finite() && w.is_finite() {
                raw_total += r;
                wrapped_total += w;
            }
            println!(
                "{:>8} {:>16} {:>6} {:>12} {:>12} {:>7}",
                fmt_size(size),
                op,
                reps,
                fmt_us(r),
                fmt_us(w),
                fmt_ratio(w / r)
            );
            rows.push(format!(
                "{{\"size_bytes\":{size},\"op\":\"{op}\",\"reps\":{reps},\"raw_us_median\":{},\"wrapper_us_median\":{},\"ratio\":{}}}",
                json_num(r),
                json_num(w),
                json_num(w / r)
            ));
        }
        let map_only = median(raw.get("map").map_or(&[][..], Vec::as_slice));
        println!(
            "{:>8} {:>16} {:>6} {:>12} {:>12} {:>7}",
            fmt_size(size),
            "(raw map only)",
            reps,
            fmt_us(map_only),
            "-",
            "-"
        );
        println!(
            "{:>8} {:>16} {:>6} {:>12} {:>12} {:>7}",
            fmt_size(size),
            "all ops",
            reps,
            fmt_us(raw_total),
            fmt_us(wrapped_total),
            fmt_ratio(wrapped_total / raw_total)
        );
        rows.push(format!(
            "{{\"size_bytes\":{size},\"op\":\"map(raw only)\",\"reps\":{reps},\"raw_us_median\":{}}}",
            json_num(map_only)
        ));
        rows.push(format!(
            "{{\"size_bytes\":{size},\"op\":\"all ops\",\"reps\":{reps},\"raw_us_median\":{},\"wrapper_us_median\":{},\"ratio\":{}}}",
            json_num(raw_total),
            json_num(wrapped_total),
            json_num(wrapped_total / raw_total)
        ));
    }
    for n in &notes {
        println!("note: {n}");
    }
    let notes_json: Vec<String> = notes
        .iter()
        .map(|n| format!("\"{}\"", n.replace(['"', '\\'], "'")))
        .collect();
    let json = format!(
        "{{\"bench\":\"hbm-vmm\",\"card\":\"{}\",\"driver_api\":{driver},\"granularity\":{granularity},\"notes\":[{}],\"rows\":[\n{}\n]}}\n",
        card.replace(['"', '\\'], "'"),
        notes_json.join(","),
        rows.join(",\n")
    );
    let dir = std::env::var("HIL_RESULTS").unwrap_or_else(|_| ".".into());
    let path = std::path::Path::new(&dir).join("hbm-vmm.json");
    std::fs::write(&path, json)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

fn fmt_size(size: usize) -> String {
    if size >= 1024 * MIB {
        format!("{} GiB", size / (1024 * MIB))
    } else {
        format!("{} MiB", size / MIB)
    }
}

fn fmt_us(us: f64) -> String {
    if us.is_finite() {
        format!("{us:.2}")
    } else {
        "n/a".into()
    }
}

fn fmt_ratio(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.3}")
    } else {
        "n/a".into()
    }
}

/// A JSON number, or `null` for a value that was not measured.
fn json_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.4}")
    } else {
        "null".into()
    }
}

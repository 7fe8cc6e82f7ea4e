//! `hyperclone._native`: the Python package's bindings. Every function calls the library
//! functions the CLI calls (core::grow, nn::check), so outputs are byte-identical to the
//! CLI's for the same options; the Python layer (python/hyperclone/__init__.py) only
//! converts arguments and results. Long work runs with the GIL released.
//!
//! Results cross as JSON text (parsed in Python with key order kept) and tensors as bytes:
//! no conversion layer of our own to keep in step with serde's.

use hyperclone_core::checkpoint::MemoryTensor;
use hyperclone_core::error::one_line_of;
use hyperclone_core::grow::{clone_json, clone_model, grow_in_memory, open_and_plan, plan_json};
use hyperclone_core::grow::{GrownInMemory, GrowthRequest};
use hyperclone_core::write::{NoProgress, WriteEnv};
use hyperclone_core::DType;
use hyperclone_nn::check::{run_verify, StagedCheck};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

create_exception!(
    hyperclone,
    HypercloneError,
    PyException,
    "An error of hyperclone, with the one-line message the CLI prints after `error: `."
);

fn err(e: &(dyn std::error::Error + 'static)) -> PyErr {
    HypercloneError::new_err(one_line_of(e))
}

/// Runs `work` on a worker thread without the GIL while this thread watches for signals:
/// Ctrl-C (KeyboardInterrupt) sets the cancel flag, so a clone stops at the next chunk and
/// removes its partial output, as the CLI does, and the interrupt is raised once it has.
fn cancellable<T: Send>(
    py: Python<'_>,
    work: impl FnOnce(&AtomicBool) -> PyResult<T> + Send,
) -> PyResult<T> {
    let cancel = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let worker = scope.spawn(|| work(&cancel));
        let mut interrupt = None;
        while !worker.is_finished() {
            if interrupt.is_none() {
                if let Err(e) = py.check_signals() {
                    cancel.store(true, Ordering::Relaxed);
                    interrupt = Some(e);
                }
            }
            py.allow_threads(|| std::thread::sleep(Duration::from_millis(20)));
        }
        let result = worker.join().expect("the worker does not panic");
        match interrupt {
            Some(e) => Err(e),
            None => result,
        }
    })
}

/// The growth keywords every function takes, as the CLI's flags take them (factors as
/// text, so "1.5" gets the CLI's explanation).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct Growth {
    factor: Option<String>,
    hidden_size: Option<usize>,
    ffn_factor: Option<String>,
    intermediate_size: Option<usize>,
    depth_factor: Option<String>,
    num_hidden_layers: Option<usize>,
    depth_mode: String,
    keep_tied: bool,
    num_attention_heads: Option<usize>,
    variant: String,
    snr_db: f64,
    seed: u64,
    dtype: String,
    recipe: Option<PathBuf>,
}

impl Growth {
    fn request(self, shard_size: String) -> GrowthRequest {
        GrowthRequest {
            factor: self.factor,
            hidden_size: self.hidden_size,
            ffn_factor: self.ffn_factor,
            intermediate_size: self.intermediate_size,
            depth_factor: self.depth_factor,
            num_hidden_layers: self.num_hidden_layers,
            depth_mode: self.depth_mode,
            keep_tied: self.keep_tied,
            recipe: self.recipe,
            num_attention_heads: self.num_attention_heads,
            variant: self.variant,
            snr_db: self.snr_db,
            seed: self.seed,
            dtype: self.dtype,
            shard_size,
        }
    }
}

/// Clones SRC into DST; returns the JSON of `hyperclone clone --json`.
#[pyfunction]
#[pyo3(signature = (src, dst, growth, shard_size, force, verify, allow_nonfinite))]
#[allow(clippy::too_many_arguments)]
fn clone(
    py: Python<'_>,
    src: PathBuf,
    dst: PathBuf,
    growth: Growth,
    shard_size: String,
    force: bool,
    verify: bool,
    allow_nonfinite: bool,
) -> PyResult<String> {
    let req = growth.request(shard_size);
    cancellable(py, |cancel| {
        let started = Instant::now();
        let staged = StagedCheck::new(&src);
        let check = |dir: &std::path::Path| staged.check(dir);
        let env = WriteEnv {
            check: if verify { Some(&check) } else { None },
            allow_nonfinite,
            ..WriteEnv::quiet(cancel)
        };
        let cloned = clone_model(&src, &dst, &req, force, &env).map_err(|e| err(&e))?;
        let report = staged.into_report();
        Ok(clone_json(
            &cloned,
            &dst,
            started.elapsed().as_secs_f64(),
            report.as_ref(),
        )
        .to_string())
    })
}

/// The plan of growing SRC; returns the JSON of `hyperclone plan --json`.
#[pyfunction]
#[pyo3(signature = (src, growth, shard_size))]
fn plan(py: Python<'_>, src: PathBuf, growth: Growth, shard_size: String) -> PyResult<String> {
    let req = growth.request(shard_size);
    py.allow_threads(|| {
        let (ckpt, plan, _) = open_and_plan(&src, &req, &NoProgress).map_err(|e| err(&e))?;
        Ok(plan_json(&ckpt, &plan).to_string())
    })
}

/// Checks BIG against SMALL; returns the JSON of `hyperclone verify --json`.
#[pyfunction]
#[pyo3(signature = (small, big, tokens, dtype))]
fn verify(
    py: Python<'_>,
    small: PathBuf,
    big: PathBuf,
    tokens: Option<Vec<u32>>,
    dtype: String,
) -> PyResult<String> {
    let working = match dtype.as_str() {
        "f64" => candle_core::DType::F64,
        "f32" => candle_core::DType::F32,
        other => {
            return Err(HypercloneError::new_err(format!(
                "--dtype {other}: verification runs in f64 or f32"
            )))
        }
    };
    py.allow_threads(|| {
        let v = run_verify(&small, &big, tokens.as_deref(), working).map_err(|e| err(&e))?;
        Ok(v.json().to_string())
    })
}

/// Grows a state dict in memory. `tensors`: (name, safetensors dtype, shape, bytes); returns
/// (grown config JSON, [(name, safetensors dtype, shape, bytearray)]).
#[pyfunction]
#[pyo3(signature = (config_json, tensors, growth, allow_nonfinite))]
#[allow(clippy::type_complexity)]
fn grow<'py>(
    py: Python<'py>,
    config_json: String,
    tensors: Vec<(String, String, Vec<usize>, Bound<'py, PyBytes>)>,
    growth: Growth,
    allow_nonfinite: bool,
) -> PyResult<(
    String,
    Vec<(String, String, Vec<usize>, Bound<'py, PyByteArray>)>,
)> {
    let req = growth.request("5GB".into());
    let mut source = Vec::with_capacity(tensors.len());
    for (name, dt, shape, data) in &tensors {
        let dtype = DType::from_safetensors_name(dt).ok_or_else(|| {
            HypercloneError::new_err(format!(
                "tensor `{name}`: dtype {dt} is not a floating-point weight type (F64, F32, BF16, F16)"
            ))
        })?;
        source.push(MemoryTensor {
            name,
            dtype,
            shape: shape.clone(),
            data: data.as_bytes(),
        });
    }
    let grown: GrownInMemory = cancellable(py, |cancel| {
        grow_in_memory(&config_json, &source, &req, allow_nonfinite, cancel).map_err(|e| err(&e))
    })?;
    let config = serde_json::Value::Object(grown.config).to_string();
    let out = grown
        .tensors
        .into_iter()
        .map(|t| {
            let bytes = PyByteArray::new(py, &t.data);
            (
                t.name,
                t.dtype.safetensors_name().to_string(),
                t.shape,
                bytes,
            )
        })
        .collect();
    Ok((config, out))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("HypercloneError", m.py().get_type::<HypercloneError>())?;
    m.add("__version__", hyperclone_core::provenance::TOOL_VERSION)?;
    m.add_function(wrap_pyfunction!(clone, m)?)?;
    m.add_function(wrap_pyfunction!(plan, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(grow, m)?)?;
    Ok(())
}

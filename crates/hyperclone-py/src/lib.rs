//! `hyperclone._native`: the Python package's bindings. Every function calls the library
//! functions the CLI calls (core::grow, nn::check), so outputs are byte-identical to the
//! CLI's for the same options; the Python layer (python/hyperclone/__init__.py) only
//! converts arguments and results. Long work runs with the GIL released.
//!
//! Results cross as JSON text (parsed in Python with key order kept) and tensors as bytes:
//! no conversion layer of our own to keep in step with serde's.

use hyperclone_core::checkpoint::MemoryTensor;
use hyperclone_core::error::one_line;
use hyperclone_core::grow::{clone_json, clone_model, grow_in_memory, open_and_plan, plan_json};
use hyperclone_core::grow::{GrownInMemory, Growth};
use hyperclone_core::growth_spec::GrowthSpec;
use hyperclone_core::write::{NoProgress, WriteEnv};
use hyperclone_core::DType;
use hyperclone_nn::check::{run_verify, StagedCheck};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyInt, PyString};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

create_exception!(
    hyperclone,
    HypercloneError,
    PyException,
    "An error of hyperclone, with the one-line message the CLI prints after `error: `."
);

/// An error as the one line the CLI prints, except that an option that would allow what
/// was refused is its keyword: `force=True` where the CLI says `--force`.
fn err(e: &(dyn std::error::Error + 'static)) -> PyErr {
    let causes = std::iter::successors(Some(e), |e| e.source()).map(|c| match c
        .downcast_ref::<hyperclone_core::Error>(
    ) {
        Some(core) => core.phrased(|option| format!("{option}=True")),
        None => c.to_string(),
    });
    HypercloneError::new_err(one_line(causes))
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

/// The growth keywords (only those given) and `recipe=`, as a core [`Growth`]. The keywords
/// become the mapping a recipe's `options` is and are read by the same code
/// ([`GrowthSpec::from_map`]), so a new growth option needs nothing here, and errors name
/// the keyword.
fn growth_of(keywords: &Bound<'_, PyDict>, recipe: Option<PathBuf>) -> PyResult<Growth> {
    if let Some(path) = recipe {
        if !keywords.is_empty() {
            let given: Vec<String> = keywords.keys().iter().map(|k| k.to_string()).collect();
            return Err(HypercloneError::new_err(format!(
                "recipe= holds the whole growth: do not also give {}",
                given.join(", ")
            )));
        }
        return Ok(Growth::Recipe(path));
    }
    let mut options = Map::new();
    for (k, v) in keywords.iter() {
        let key: String = k.extract()?;
        let value = json_of(&key, &v)?;
        options.insert(key, value);
    }
    GrowthSpec::from_map(&options)
        .map(Growth::Spec)
        .map_err(HypercloneError::new_err)
}

/// A keyword's value as JSON: None, a bool, a whole number (Python's or numpy's), a finite
/// float or text; anything else is refused by name (not as OverflowError or TypeError).
fn json_of(key: &str, v: &Bound<'_, PyAny>) -> PyResult<Value> {
    let refuse = |why: &str| -> PyResult<Value> {
        let shown = v.repr().map(|r| r.to_string()).unwrap_or_default();
        Err(HypercloneError::new_err(format!("{key}={shown}: {why}")))
    };
    if v.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(b) = v.downcast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if let Ok(x) = v.downcast::<PyFloat>() {
        return match serde_json::Number::from_f64(x.value()) {
            Some(n) => Ok(Value::Number(n)),
            None => refuse("must be a finite number"),
        };
    }
    if let Ok(s) = v.downcast::<PyString>() {
        return Ok(Value::String(s.to_str()?.to_string()));
    }
    if let Ok(n) = v.extract::<u64>() {
        return Ok(n.into());
    }
    if let Ok(n) = v.extract::<i64>() {
        return Ok(n.into());
    }
    if v.is_instance_of::<PyInt>() {
        return refuse("out of range");
    }
    refuse("must be a number, a bool or text")
}

/// Clones SRC into DST; returns the JSON of `hyperclone clone --json`.
#[pyfunction]
#[pyo3(signature = (src, dst, growth, recipe, force, verify, allow_nonfinite))]
#[allow(clippy::too_many_arguments)]
fn clone(
    py: Python<'_>,
    src: PathBuf,
    dst: PathBuf,
    growth: &Bound<'_, PyDict>,
    recipe: Option<PathBuf>,
    force: bool,
    verify: bool,
    allow_nonfinite: bool,
) -> PyResult<String> {
    let req = growth_of(growth, recipe)?;
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
#[pyo3(signature = (src, growth, recipe))]
fn plan(
    py: Python<'_>,
    src: PathBuf,
    growth: &Bound<'_, PyDict>,
    recipe: Option<PathBuf>,
) -> PyResult<String> {
    let req = growth_of(growth, recipe)?;
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
                "dtype {other}: verification runs in f64 or f32"
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
#[pyo3(signature = (config_json, tensors, growth, recipe, allow_nonfinite))]
#[allow(clippy::type_complexity)]
fn grow<'py>(
    py: Python<'py>,
    config_json: String,
    tensors: Vec<(String, String, Vec<usize>, Bound<'py, PyBytes>)>,
    growth: &Bound<'py, PyDict>,
    recipe: Option<PathBuf>,
    allow_nonfinite: bool,
) -> PyResult<(
    String,
    Vec<(String, String, Vec<usize>, Bound<'py, PyByteArray>)>,
)> {
    let req = growth_of(growth, recipe)?;
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

//! The ONNX Runtime environment: the shared library is loaded at run time (`ort` with
//! `load-dynamic`) from a path given in configuration, `ORT_DYLIB_PATH`, or the copy that
//! `scripts/setup.sh` extracts into `.tools/onnxruntime/`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;

/// File name of the library inside the `onnxruntime==1.31.1` wheel.
pub const ORT_LIBRARY_NAME: &str = "libonnxruntime.so.1.31.1";

/// Errors of loading the runtime or a model into it.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime library not found: set model.ort_library or ORT_DYLIB_PATH, \
         or run scripts/setup.sh"
    )]
    LibraryNotFound,
    #[error("cannot load ONNX Runtime from {path}")]
    Load {
        path: PathBuf,
        #[source]
        source: ort::Error,
    },
    #[error("ONNX Runtime was already loaded from {loaded}, cannot load {requested}")]
    AlreadyLoaded { loaded: PathBuf, requested: PathBuf },
    #[error("cannot create a session for {path}")]
    Session {
        path: PathBuf,
        #[source]
        source: ort::Error,
    },
}

/// The process-wide environment. ONNX Runtime allows one per process; it lives until exit.
static ENVIRONMENT: OnceLock<(PathBuf, Environment)> = OnceLock::new();

/// Finds the library: the explicit path, else `ORT_DYLIB_PATH`, else `.tools/onnxruntime/` under
/// the current directory or the crate root.
pub fn locate_library(explicit: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        return Ok(PathBuf::from(path));
    }
    let candidates = [
        PathBuf::from(".tools/onnxruntime").join(ORT_LIBRARY_NAME),
        Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/onnxruntime").join(ORT_LIBRARY_NAME),
    ];
    candidates.into_iter().find(|p| p.is_file()).ok_or(RuntimeError::LibraryNotFound)
}

/// Loads the library once and returns the shared environment.
pub fn environment(library: &Path) -> Result<&'static Environment, RuntimeError> {
    if let Some((loaded, env)) = ENVIRONMENT.get() {
        return check_same(loaded, library).map(|()| env);
    }
    let load = |source| RuntimeError::Load { path: library.to_path_buf(), source };
    let env = ort::init_from(library)
        .map_err(|e| load(ort::Error::new(e.to_string())))?
        .with_name("mindstream")
        .build()
        .map_err(load)?;
    let (loaded, env) = ENVIRONMENT.get_or_init(|| (library.to_path_buf(), env));
    check_same(loaded, library).map(|()| env)
}

fn check_same(loaded: &Path, requested: &Path) -> Result<(), RuntimeError> {
    if loaded == requested {
        return Ok(());
    }
    Err(RuntimeError::AlreadyLoaded { loaded: loaded.into(), requested: requested.into() })
}

/// A CPU session over an ONNX file with `intra_threads` threads for each operator.
pub fn cpu_session(
    env: &Environment,
    model: &Path,
    intra_threads: usize,
) -> Result<Session, RuntimeError> {
    let fail = |source: ort::Error| RuntimeError::Session { path: model.to_path_buf(), source };
    Session::builder(env)
        .map_err(fail)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| fail(e.into()))?
        .with_intra_threads(intra_threads)
        .map_err(|e| fail(e.into()))?
        .commit_from_file(model)
        .map_err(fail)
}

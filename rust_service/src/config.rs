use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::error::StartupError;
use crate::http::Limits;
use crate::infer::Batching;
use crate::server::ServerOptions;

/// Weather classifier inference service: the `weather-onnx` model behind the same HTTP
/// contract as the BentoML services (POST /predict, /predict/upload, /predict/raw, GET /livez,
/// /readyz, /metrics).
#[derive(Debug, Clone, Parser)]
#[command(name = "rust_service", version, about)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,

    /// Port to listen on.
    #[arg(long, env = "PORT", default_value_t = 3000)]
    pub port: u16,

    /// BentoML model directory holding model.yaml and model.onnx. A model's parent
    /// directory (the one with the `latest` file) works too. Default: the latest
    /// `weather-onnx` model in the BentoML store at $BENTOML_HOME (default ~/bentoml).
    #[arg(long = "model", env = "MODEL_PATH")]
    pub model: Option<PathBuf>,

    /// Inference worker threads, each owning one ONNX Runtime session. Default: the CPUs
    /// this process may use (affinity and cgroup quota respected).
    #[arg(long, env = "WORKERS")]
    pub workers: Option<NonZeroUsize>,

    /// ONNX Runtime intra-op threads per session.
    #[arg(long, env = "INTRA_THREADS", default_value_t = NonZeroUsize::MIN)]
    pub intra_threads: NonZeroUsize,

    /// Largest accepted request body in bytes; larger bodies get 413.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Largest accepted image in pixels (width x height, read from the header before
    /// decoding); larger images get 400.
    #[arg(long, env = "MAX_PIXELS", default_value_t = 40_000_000)]
    pub max_pixels: u64,

    /// Predict requests held at once per inference worker, counting those whose body is
    /// still arriving, those waiting for a worker and those running. One more waits at its
    /// headers, its body unread, until a place frees (first come, first served).
    #[arg(long, env = "QUEUE_CAPACITY", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub queue_capacity: u32,

    /// Predict requests that may wait at their headers for a place, per inference worker.
    /// One beyond those is answered 503 as soon as its headers arrive; its body is read and
    /// discarded, never parsed.
    #[arg(long, env = "MAX_WAITING_REQUESTS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_waiting_requests: u32,

    /// Seconds from a request's headers to its answer. One still waiting for a place then
    /// is answered 503; so is one that an inference worker, judging by its recent run
    /// times, could not finish by then, and it is never run.
    #[arg(long, env = "REQUEST_TIMEOUT_SECONDS", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub request_timeout_seconds: u64,

    /// Milliseconds before that deadline by which an answer is planned to leave: places and
    /// runs are given only to requests that can be answered by then, so that the answer
    /// still reaches a client within the deadline.
    #[arg(long, env = "ANSWER_HEADROOM_MS", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub answer_headroom_ms: u64,

    /// The Retry-After header of every 503 (overloaded, not ready), in seconds.
    #[arg(long, env = "RETRY_AFTER_SECONDS", default_value_t = 1)]
    pub retry_after_seconds: u32,

    /// Seconds from a connection opening to the end of its first request's headers;
    /// slower gets 408. A later request on a kept-alive connection must start within the
    /// 5 s keep-alive timeout, but actix-http puts no limit on its headers once their first
    /// byte has come.
    #[arg(long, env = "HEADER_TIMEOUT_SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout_seconds: u64,

    /// Seconds from a request's headers to the end of its body; slower gets 408.
    #[arg(long, env = "BODY_TIMEOUT_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub body_timeout_seconds: u64,

    /// Bytes that bodies still arriving may reserve, per inference worker: a request whose
    /// Content-Length would go over gets 503 at its headers, a chunked one that outgrows it
    /// gets 503 then. Keep it at least the largest body.
    #[arg(long, env = "MAX_PENDING_BODY_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_pending_body_bytes: usize,

    /// After refusing a body (413, or 503 at the headers), read and discard up to this many
    /// more bytes of it before answering, so that a client that writes its whole body
    /// before reading gets the answer and the connection stays open. Beyond it, the answer
    /// closes the connection.
    #[arg(long, env = "DISCARD_BODY_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub discard_body_bytes: usize,

    /// On SIGTERM or SIGINT: /readyz answers 503, the port closes, and the requests already
    /// received get this many seconds to finish before the process exits anyway.
    #[arg(long, env = "GRACEFUL_TIMEOUT_SECONDS", default_value_t = 30)]
    pub graceful_timeout_seconds: u64,

    /// Adaptive batching: the most requests a worker runs through the model at once, at
    /// most 256 (each worker keeps an input buffer of this many 224x224 images, 147 KiB
    /// each). 1, the default, turns batching off. On a CPU a batch is rarely faster per
    /// image: measure before raising it.
    #[arg(long, env = "MAX_BATCH_SIZE", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub max_batch_size: u16,

    /// Adaptive batching: how long a worker that has taken a request waits for more to join
    /// its batch, in milliseconds (at most 60000). Requests already queued join without
    /// waiting. Unused when --max-batch-size is 1.
    #[arg(long, env = "BATCH_WAIT_MS", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(..=60_000))]
    pub batch_wait_ms: u64,

    /// Path of the ONNX Runtime shared library (libonnxruntime.so.1.*, e.g. the one in the
    /// onnxruntime wheel's onnxruntime/capi/). Default: `libonnxruntime.so` from the
    /// dynamic loader's search path.
    #[arg(long, env = "ORT_DYLIB_PATH", default_value = "libonnxruntime.so")]
    pub ort_dylib_path: PathBuf,

    /// Log format; the level is set with RUST_LOG (default info).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    pub fn workers(&self) -> usize {
        self.workers
            .or_else(|| std::thread::available_parallelism().ok())
            .map_or(1, NonZeroUsize::get)
    }

    /// The adaptive batching settings (off when `--max-batch-size` is 1).
    pub fn batching(&self) -> Batching {
        Batching {
            max_size: NonZeroUsize::new(usize::from(self.max_batch_size))
                .unwrap_or(NonZeroUsize::MIN),
            wait: Duration::from_millis(self.batch_wait_ms),
        }
    }

    /// Predict requests the service holds at once: the per-worker capacity times the
    /// workers.
    pub fn max_requests(&self) -> usize {
        (self.queue_capacity as usize).saturating_mul(self.workers())
    }

    /// Predict requests that may wait for a place: the per-worker line times the workers.
    pub fn max_waiting(&self) -> usize {
        (self.max_waiting_requests as usize).saturating_mul(self.workers())
    }

    /// Bytes all bodies still arriving may reserve: the per-worker budget times the workers.
    pub fn max_pending_bytes(&self) -> usize {
        self.max_pending_body_bytes.saturating_mul(self.workers())
    }

    /// What reading a predict request may take (http.rs).
    pub fn limits(&self) -> Limits {
        Limits {
            max_body_bytes: self.max_body_bytes,
            discard_body_bytes: self.discard_body_bytes,
            body_timeout: Duration::from_secs(self.body_timeout_seconds),
            request_timeout: Duration::from_secs(self.request_timeout_seconds),
            answer_headroom: Duration::from_millis(self.answer_headroom_ms),
            retry_after_seconds: self.retry_after_seconds,
        }
    }

    /// How the HTTP server treats connections (server.rs).
    pub fn server_options(&self) -> ServerOptions {
        ServerOptions {
            workers: self.workers(),
            header_timeout: Duration::from_secs(self.header_timeout_seconds),
            graceful_timeout: Duration::from_secs(self.graceful_timeout_seconds),
        }
    }

    /// The model directory: `--model`, or the BentoML store's latest `weather-onnx`.
    pub fn model_dir(&self) -> Result<PathBuf, StartupError> {
        resolve_latest(self.model.as_deref())
    }
}

/// The model the service serves when `--model` does not say: `ONNX_MODEL` in
/// weather/registry.py (tests/test_registry.py starts the service on a store and checks).
const MODEL_NAME: &str = "weather-onnx";

/// The BentoML store: $BENTOML_HOME, else ~/bentoml, as BentoML itself picks it.
fn bentoml_home() -> Result<PathBuf, StartupError> {
    if let Some(home) = std::env::var_os("BENTOML_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|home| PathBuf::from(home).join("bentoml"))
        .ok_or(StartupError::NoBentomlHome)
}

/// Finds the model directory in the model store layout of BentoML 1.4, the version the
/// Python side writes the store with. This is the only Rust code that knows that layout:
///
/// ```text
/// <store>/models/<name>/latest        the latest version's name (one line)
/// <store>/models/<name>/<version>/    model.yaml, model.onnx
/// ```
///
/// `path` is a model directory (the one with model.yaml, used as is) or a `models/<name>`
/// directory (resolved through its `latest` file); None means the store's latest
/// `weather-onnx`.
fn resolve_latest(path: Option<&Path>) -> Result<PathBuf, StartupError> {
    let path = match path {
        Some(path) => path.to_path_buf(),
        None => bentoml_home()?.join("models").join(MODEL_NAME),
    };
    if path.join("model.yaml").is_file() {
        return Ok(path);
    }
    let latest = path.join("latest");
    match std::fs::read_to_string(&latest) {
        Ok(version) if !version.trim().is_empty() => Ok(path.join(version.trim())),
        Ok(_) => Err(StartupError::EmptyLatest(latest)),
        Err(source) => Err(StartupError::NoModel { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_of(id: &str) -> String {
        use clap::CommandFactory;
        let command = Config::command();
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_id() == id)
            .unwrap_or_else(|| panic!("no argument {id}"));
        arg.get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect()
    }

    // Checked on the declared defaults, not on a parse, so HOST/PORT/... set in the
    // test's environment cannot change the outcome.
    #[test]
    fn defaults_match_the_contract() {
        assert_eq!(default_of("host"), "0.0.0.0");
        assert_eq!(default_of("port"), "3000");
        assert_eq!(default_of("max_body_bytes"), "16777216");
        assert_eq!(default_of("max_pixels"), "40000000");
        assert_eq!(default_of("intra_threads"), "1");
        assert_eq!(default_of("workers"), "");
        assert_eq!(default_of("max_batch_size"), "1");
        assert_eq!(default_of("batch_wait_ms"), "2");
        // weather/contract.py's policy for load, slow clients and shutdown; the same
        // values are checked against that file by tests/test_registry.py.
        assert_eq!(default_of("queue_capacity"), "64");
        assert_eq!(default_of("max_waiting_requests"), "1024");
        assert_eq!(default_of("request_timeout_seconds"), "2");
        assert_eq!(default_of("answer_headroom_ms"), "50");
        assert_eq!(default_of("retry_after_seconds"), "1");
        assert_eq!(default_of("header_timeout_seconds"), "5");
        assert_eq!(default_of("body_timeout_seconds"), "30");
        assert_eq!(default_of("max_pending_body_bytes"), "67108864");
        assert_eq!(default_of("discard_body_bytes"), "67108864");
        assert_eq!(default_of("graceful_timeout_seconds"), "30");
    }

    #[test]
    fn budgets_scale_with_the_workers() {
        let config = Config::try_parse_from([
            "rust_service",
            "--workers",
            "3",
            "--queue-capacity",
            "10",
            "--max-pending-body-bytes",
            "1000",
            "--body-timeout-seconds",
            "7",
        ])
        .expect("parses");
        assert_eq!(config.max_requests(), 30);
        assert_eq!(config.max_pending_bytes(), 3000);
        assert_eq!(config.limits().body_timeout, Duration::from_secs(7));
        assert_eq!(config.server_options().workers, 3);
        for (flag, bad) in [
            ("--queue-capacity", "0"),
            ("--request-timeout-seconds", "0"),
            ("--header-timeout-seconds", "0"),
            ("--body-timeout-seconds", "0"),
        ] {
            assert!(
                Config::try_parse_from(["rust_service", flag, bad]).is_err(),
                "{flag} {bad}"
            );
        }
    }

    #[test]
    fn batching_flags_are_bounded() {
        let config = Config::try_parse_from([
            "rust_service",
            "--max-batch-size",
            "8",
            "--batch-wait-ms",
            "5",
        ])
        .expect("parses");
        assert_eq!(config.batching().max_size.get(), 8);
        assert_eq!(config.batching().wait, Duration::from_millis(5));
        for (flag, bad) in [
            ("--max-batch-size", "0"),
            ("--max-batch-size", "257"),
            ("--max-batch-size", "-1"),
            ("--batch-wait-ms", "60001"),
            ("--batch-wait-ms", "-1"),
        ] {
            assert!(
                Config::try_parse_from(["rust_service", flag, bad]).is_err(),
                "{flag} {bad}"
            );
        }
    }

    #[test]
    fn every_flag_has_an_env_var() {
        use clap::CommandFactory;
        for arg in Config::command().get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            assert!(
                arg.get_env().is_some(),
                "--{id} has no environment variable"
            );
        }
    }

    #[test]
    fn resolves_latest_file() {
        let root = std::env::temp_dir().join(format!("rust_service_cfg_{}", std::process::id()));
        let version_dir = root.join("v1");
        std::fs::create_dir_all(&version_dir).expect("mkdir");
        std::fs::write(version_dir.join("model.yaml"), "metadata: {}\n").expect("write");
        std::fs::write(root.join("latest"), "v1\n").expect("write");
        assert_eq!(resolve_latest(Some(&root)).expect("resolves"), version_dir);
        assert_eq!(
            resolve_latest(Some(&version_dir)).expect("resolves"),
            version_dir
        );
        assert!(resolve_latest(Some(&root.join("missing"))).is_err());
        std::fs::remove_dir_all(&root).expect("cleanup");
    }
}

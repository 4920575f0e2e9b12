//! The benchmark's ceiling for the Rust service: one request's whole CPU work done
//! in-process on this thread, without HTTP: JSON parse, base64 decode, image decode,
//! resize + crop, ONNX Runtime, response JSON. SECONDS is split into WINDOWS (default 5)
//! and the best window counts, as in benchmark/ceiling.py: on a shared machine a window
//! something else slowed down says nothing about the pipeline. It prints one JSON line,
//! `{"runtime": "rust", "seconds": S, "rps": R, "mean_ms": M, "window_rps": [...]}`.
//! With BATCH > 1, BATCH requests go through the model at once, as the service does with
//! MAX_BATCH_SIZE; the line then also holds `"batch": BATCH`, and N counts requests.
//!
//! cargo build --release --example ceiling
//! ORT_DYLIB_PATH=... target/release/examples/ceiling PAYLOAD_JSON SECONDS [BATCH] [WINDOWS]
//!
//! The model is found as the service finds it (MODEL_PATH, else the store at $BENTOML_HOME).

use std::error::Error;
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use clap::Parser;
use rust_service::body::parse_predict_request;
use rust_service::config::Config;
use rust_service::http::Prediction;
use rust_service::infer::{self, Predictor};
use rust_service::model::ModelSpec;

fn main() {
    if let Err(err) = run() {
        eprintln!("ceiling: {err}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let usage = "usage: ceiling PAYLOAD_JSON SECONDS [BATCH] [WINDOWS]";
    let mut args = std::env::args().skip(1);
    let payload_path = args.next().ok_or(usage)?;
    let seconds: f64 = args
        .next()
        .ok_or(usage)?
        .parse()
        .map_err(|e| format!("SECONDS: {e}"))?;
    let batch: NonZeroUsize = args
        .next()
        .map_or(Ok(NonZeroUsize::MIN), |s| s.parse())
        .map_err(|e| format!("BATCH: {e}"))?;
    let windows: NonZeroUsize = args
        .next()
        .map_or(Ok(NonZeroUsize::new(5).unwrap_or(NonZeroUsize::MIN)), |s| {
            s.parse()
        })
        .map_err(|e| format!("WINDOWS: {e}"))?;
    let payload = std::fs::read(&payload_path).map_err(|e| format!("{payload_path}: {e}"))?;

    // The service's own defaults and environment variables, with no command-line flags.
    let config = Config::parse_from(["ceiling"]);
    infer::init_runtime(&config.ort_dylib_path)?;
    let spec = ModelSpec::load(&config.model_dir()?)?;
    let mut predictor = Predictor::new(&spec, &spec.read_onnx()?, 1, config.max_pixels)?;
    predictor.reserve_batch(batch)?;

    // One batch of requests (one request when BATCH is 1); returns the response bytes.
    let mut requests = || -> Result<usize, Box<dyn Error>> {
        for slot in 0..batch.get() {
            let image = parse_predict_request(&payload)?;
            predictor.prepare(&image, slot)?;
        }
        let mut response_bytes = 0;
        let probabilities = predictor.run(batch.get())?;
        for row in probabilities.chunks_exact(spec.labels.len()) {
            let prediction = Prediction::new(&spec.labels, row)?;
            response_bytes += serde_json::to_vec(&prediction)?.len();
        }
        Ok(response_bytes)
    };
    for _ in 0..5 {
        requests()?; // warm-up
    }
    let budget = Duration::from_secs_f64(seconds / windows.get() as f64);
    let mut window_rps = Vec::with_capacity(windows.get());
    for _ in 0..windows.get() {
        let (started, mut count) = (Instant::now(), 0u64);
        while started.elapsed() < budget {
            requests()?;
            count += batch.get() as u64;
        }
        window_rps.push(count as f64 / started.elapsed().as_secs_f64());
    }
    let best = window_rps.iter().copied().fold(0.0, f64::max);
    let round2 = |value: f64| (value * 100.0).round() / 100.0;
    let mut line = serde_json::json!({
        "runtime": "rust",
        "seconds": seconds,
        "rps": round2(best),
        "mean_ms": (1e6 / best).round() / 1000.0,
        "window_rps": window_rps.into_iter().map(round2).collect::<Vec<_>>(),
    });
    if batch.get() > 1 {
        line["batch"] = batch.get().into();
    }
    println!("{line}");
    Ok(())
}

//! The benchmark's ceiling for the Rust service: one request's whole CPU work done
//! in-process on this thread, without HTTP: JSON parse, base64 decode, image decode,
//! resize + crop, ONNX Runtime, response JSON. It prints one JSON line,
//! `{"runtime": "rust", "requests": N, "seconds": S, "rps": R, "mean_ms": M}`.
//!
//! cargo build --release --example ceiling
//! ORT_DYLIB_PATH=... target/release/examples/ceiling PAYLOAD_JSON SECONDS
//!
//! The model is found as the service finds it (MODEL_PATH, else the store at $BENTOML_HOME).

use std::error::Error;
use std::time::{Duration, Instant};

use clap::Parser;
use rust_service::config::Config;
use rust_service::http::{parse_predict_request, Prediction};
use rust_service::infer::{self, Predictor};
use rust_service::model::ModelSpec;

fn main() {
    if let Err(err) = run() {
        eprintln!("ceiling: {err}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let usage = "usage: ceiling PAYLOAD_JSON SECONDS";
    let mut args = std::env::args().skip(1);
    let payload_path = args.next().ok_or(usage)?;
    let seconds: f64 = args
        .next()
        .ok_or(usage)?
        .parse()
        .map_err(|e| format!("SECONDS: {e}"))?;
    let payload = std::fs::read(&payload_path).map_err(|e| format!("{payload_path}: {e}"))?;

    // The service's own defaults and environment variables, with no command-line flags.
    let config = Config::parse_from(["ceiling"]);
    infer::init_runtime(&config.ort_dylib_path)?;
    let spec = ModelSpec::load(&config.model_dir()?)?;
    let mut predictor = Predictor::new(&spec, &spec.read_onnx()?, 1, config.max_pixels)?;

    let mut request = || -> Result<usize, Box<dyn Error>> {
        let image = parse_predict_request(&payload)?;
        let probabilities = predictor.predict(&image)?;
        let prediction = Prediction::new(&spec.labels, &probabilities)?;
        Ok(serde_json::to_vec(&prediction)?.len())
    };
    for _ in 0..5 {
        request()?; // warm-up
    }
    let budget = Duration::from_secs_f64(seconds);
    let (started, mut count) = (Instant::now(), 0u64);
    while started.elapsed() < budget {
        request()?;
        count += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "runtime": "rust",
            "requests": count,
            "seconds": (elapsed * 1000.0).round() / 1000.0,
            "rps": (count as f64 / elapsed * 100.0).round() / 100.0,
            "mean_ms": (elapsed * 1e6 / count as f64).round() / 1000.0,
        })
    );
    Ok(())
}

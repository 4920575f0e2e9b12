//! In-process cost of one request's CPU work on this thread, without HTTP: decode,
//! resize + crop, and the whole predict (decode + resize + crop + ONNX Runtime).
//!
//! cargo run --release --example inprocess_bench -- IMAGE [MODEL_DIR] [SECONDS]
//! (ORT_DYLIB_PATH must point at libonnxruntime.so.1.*; MODEL_DIR defaults to the store's
//! latest weather-onnx.)

use std::error::Error;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use rust_service::config::Config;
use rust_service::image::{self, RgbImage, Scratch, INPUT_LEN};
use rust_service::infer::{self, Predictor};
use rust_service::model::ModelSpec;

fn time_it(name: &str, budget: Duration, mut f: impl FnMut()) {
    f();
    let mut samples = Vec::new();
    let started = Instant::now();
    while started.elapsed() < budget {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    samples.sort_by(f64::total_cmp);
    let total: f64 = samples.iter().sum();
    println!(
        "{name:28} n={:5}  median {:7.3} ms  p10 {:7.3} ms  mean {:7.3} ms  -> {:6.1} per second",
        samples.len(),
        samples[samples.len() / 2],
        samples[samples.len() / 10],
        total / samples.len() as f64,
        samples.len() as f64 / (total / 1e3)
    );
}

fn main() {
    if let Err(err) = run() {
        eprintln!("inprocess_bench: {err}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let image_path = args
        .next()
        .ok_or("usage: inprocess_bench IMAGE [MODEL_DIR] [SECONDS]")?;
    let model_dir = match args.next().filter(|s| !s.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        // As the service finds it: MODEL_PATH, else the store at $BENTOML_HOME.
        None => Config::parse_from(["inprocess_bench"]).model_dir()?,
    };
    let seconds: f64 = args.next().map_or(Ok(5.0), |s| s.parse())?;
    let budget = Duration::from_secs_f64(seconds);

    let bytes = std::fs::read(&image_path).map_err(|e| format!("{image_path}: {e}"))?;
    let dylib = std::env::var("ORT_DYLIB_PATH").unwrap_or_else(|_| "libonnxruntime.so".into());
    infer::init_runtime(dylib.as_ref())?;
    let spec = ModelSpec::load(&model_dir)?;
    let mut predictor = Predictor::new(&spec, &spec.read_onnx()?, 1, 40_000_000)?;

    let mut decoded = RgbImage::default();
    image::decode_rgb(&bytes, 40_000_000, &mut decoded)?;
    println!(
        "{image_path}: {}x{}, {} bytes",
        decoded.width,
        decoded.height,
        bytes.len()
    );
    time_it("decode", budget, || {
        image::decode_rgb(&bytes, 40_000_000, &mut decoded).expect("decodes");
    });
    let mut scratch = Scratch::default();
    let mut input = vec![0u8; INPUT_LEN];
    time_it("resize + crop", budget, || {
        image::resize_and_crop(&decoded, &mut scratch, &mut input);
    });
    time_it("predict (all of the above + ORT)", budget, || {
        predictor.predict(&bytes).expect("predicts");
    });
    Ok(())
}

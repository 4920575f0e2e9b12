use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpServer};
use clap::Parser;

use rust_service::config::{Config, LogFormat};
use rust_service::error::StartupError;
use rust_service::{http, infer, metrics, model};

/// The `service_name` label of the metrics.
const SERVICE_NAME: &str = "weather-rust-service";

fn main() {
    let started = Instant::now();
    let config = Config::parse();
    init_logging(config.log_format);
    if let Err(err) = run(&config, started) {
        tracing::error!("{err}");
        std::process::exit(1);
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn run(config: &Config, started: Instant) -> Result<(), StartupError> {
    let spec = model::ModelSpec::load(&config.model_dir()?)?;
    infer::init_runtime(&config.ort_dylib_path)?;
    let runtime_loaded_ms = started.elapsed().as_millis() as u64;

    let workers = config.workers();
    let batching = config.batching();
    let (inferencer, pool) = infer::start(
        &spec,
        &infer::WorkerOptions {
            workers,
            intra_threads: config.intra_threads.get(),
            queue_capacity: config.queue_capacity,
            max_pixels: config.max_pixels,
            batching,
        },
    )?;
    // Warm-up is done (every worker ran the model, at each batch size it will use) before
    // the port opens.
    let ready = Arc::new(AtomicBool::new(false));
    let state = web::Data::new(http::AppState {
        inferencer,
        labels: spec.labels.clone().into(),
        metrics: Arc::new(metrics::Metrics::new(
            SERVICE_NAME,
            &spec.version,
            &http::PREDICT_ROUTES,
        )),
        ready: Arc::clone(&ready),
        max_body_bytes: config.max_body_bytes,
    });

    let server_state = state.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(server_state.clone())
            .wrap(from_fn(http::track))
            .configure(http::configure)
    })
    .workers(workers)
    .shutdown_timeout(30)
    .bind((config.host, config.port))
    .map_err(|source| StartupError::Listen {
        host: config.host,
        port: config.port,
        source,
    })?;

    ready.store(true, Ordering::Release);
    tracing::info!(
        model = %spec.dir.display(),
        model_name = %spec.name,
        model_version = %spec.version,
        labels = spec.labels.len(),
        workers,
        intra_threads = config.intra_threads.get(),
        max_batch_size = batching.max_size.get(),
        batch_wait_ms = batching.wait.as_millis() as u64,
        address = %format!("{}:{}", config.host, config.port),
        runtime_loaded_ms,
        startup_ms = started.elapsed().as_millis() as u64,
        "ready"
    );

    // actix-web stops gracefully on SIGTERM/SIGINT: it stops accepting, lets in-flight
    // requests finish (up to the shutdown timeout), then `run` returns.
    actix_web::rt::System::new()
        .block_on(async move { server.run().await })
        .map_err(StartupError::Server)?;
    ready.store(false, Ordering::Release);
    tracing::info!("shutting down: finishing queued jobs");
    drop(state);
    pool.join();
    tracing::info!("stopped");
    Ok(())
}

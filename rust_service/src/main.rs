use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::web;
use clap::Parser;

use rust_service::admission::Admission;
use rust_service::config::{Config, LogFormat};
use rust_service::error::StartupError;
use rust_service::{http, infer, memory, metrics, model, server};

/// The `service_name` label of the metrics.
const SERVICE_NAME: &str = "weather-rust-service";

/// How often memory.rs looks whether the service is idle after serving.
const TRIM_EVERY: Duration = Duration::from_secs(5);

fn main() {
    let started = Instant::now();
    memory::return_large_buffers();
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
    let limits = config.limits();
    let (inferencer, pool) = infer::start(
        &spec,
        &infer::WorkerOptions {
            workers,
            intra_threads: config.intra_threads.get(),
            // Room for every request admission lets in, so that the queue is never full.
            queue_capacity: config.max_requests(),
            request_timeout: limits.request_timeout,
            answer_within: limits.answer_within(),
            max_pixels: config.max_pixels,
            batching,
        },
    )?;
    // Warm-up is done (every worker ran the model, at each batch size it will use) before
    // the port opens.
    let ready = Arc::new(AtomicBool::new(false));
    let admission = Admission::new(
        config.max_requests(),
        config.max_waiting(),
        config.max_pending_bytes(),
    );
    memory::trim_when_idle(Arc::clone(&admission), TRIM_EVERY);
    let state = web::Data::new(http::AppState {
        inferencer,
        labels: spec.labels.clone().into(),
        metrics: Arc::new(metrics::Metrics::new(
            SERVICE_NAME,
            &spec.version,
            &http::PREDICT_ROUTES,
        )),
        ready: Arc::clone(&ready),
        admission,
        limits,
    });

    if config.max_pending_bytes() < config.max_body_bytes {
        // Such a body could never be reserved: it would get 503 however idle the service.
        tracing::warn!(
            max_pending_bytes = config.max_pending_bytes(),
            max_body_bytes = config.max_body_bytes,
            "bodies still arriving may hold less than one largest body"
        );
    }
    let options = config.server_options();
    let stop = async move {
        server::signalled().await;
        server::exit_after(options.graceful_timeout);
    };
    let address = SocketAddr::new(config.host, config.port);
    let (server, _) = server::bind(state.clone(), &options, address, stop).map_err(|source| {
        StartupError::Listen {
            host: config.host,
            port: config.port,
            source,
        }
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
        max_requests = config.max_requests(),
        max_pending_body_bytes = config.max_pending_bytes(),
        address = %address,
        runtime_loaded_ms,
        startup_ms = started.elapsed().as_millis() as u64,
        "ready"
    );

    // Returns once the server has stopped (server.rs): on SIGTERM/SIGINT it stops
    // accepting and lets the requests received finish, within the graceful timeout.
    actix_web::rt::System::new()
        .block_on(server)
        .map_err(StartupError::Server)?;
    ready.store(false, Ordering::Release);
    tracing::info!("shutting down: finishing queued jobs");
    drop(state);
    pool.join();
    tracing::info!("stopped");
    Ok(())
}

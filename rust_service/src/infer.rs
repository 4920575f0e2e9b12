//! Inference off the async runtime: worker threads that each own one ONNX Runtime session
//! (`Session::run` takes `&mut self`) and do the whole CPU-bound part of a request
//! (decode, resize, crop, run), fed by one bounded queue with a oneshot reply per job.
//! A full queue is answered at once with 503 instead of piling up latency.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;
use ort::value::{TensorElementType, TensorRef, ValueType};
use tokio::sync::oneshot;

use crate::error::{AppError, StartupError};
use crate::image::{self, ImageError, RgbImage, Scratch, CROP_SIZE, INPUT_LEN};
use crate::model::ModelSpec;

/// Decoded buffers larger than this are not kept between requests.
const KEEP_BUFFER_BYTES: usize = 64 * 1024 * 1024;

pub struct WorkerOptions {
    pub workers: usize,
    pub intra_threads: usize,
    pub queue_capacity: usize,
    pub max_pixels: u64,
}

struct Job {
    image: Vec<u8>,
    reply: oneshot::Sender<Result<Vec<f32>, AppError>>,
}

/// The handle request handlers use; cheap to clone.
#[derive(Clone)]
pub struct Inferencer {
    jobs: Sender<Job>,
}

impl Inferencer {
    /// Runs one encoded image (JPEG/PNG bytes) through preprocessing and the model and
    /// returns the probabilities in label order.
    pub async fn predict(&self, image: Vec<u8>) -> Result<Vec<f32>, AppError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .try_send(Job { image, reply })
            .map_err(|err| match err {
                TrySendError::Full(_) => AppError::Overloaded,
                TrySendError::Disconnected(_) => AppError::NotReady,
            })?;
        answer
            .await
            .map_err(|_| AppError::Inference("the worker stopped before answering".into()))?
    }
}

pub struct WorkerPool {
    handles: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    /// Waits for the workers to finish the queued jobs; call after dropping every
    /// `Inferencer`.
    pub fn join(self) {
        for handle in self.handles {
            let _ = handle.join();
        }
    }
}

/// Starts the workers and returns once every one has built its session and run a
/// warm-up inference, or with the first error.
pub fn start(
    spec: &ModelSpec,
    options: &WorkerOptions,
) -> Result<(Inferencer, WorkerPool), StartupError> {
    let model_bytes: Arc<[u8]> = spec.read_onnx()?.into();
    let (jobs, queue) = crossbeam_channel::bounded::<Job>(options.queue_capacity.max(1));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), StartupError>>();
    let mut handles = Vec::with_capacity(options.workers);
    for index in 0..options.workers {
        let queue = queue.clone();
        let ready = ready_tx.clone();
        let model_bytes = Arc::clone(&model_bytes);
        let spec = spec.clone();
        let intra_threads = options.intra_threads;
        let max_pixels = options.max_pixels;
        let handle = std::thread::Builder::new()
            .name(format!("infer-{index}"))
            .spawn(move || {
                let worker = match Predictor::new(&spec, &model_bytes, intra_threads, max_pixels) {
                    Ok(worker) => worker,
                    Err(err) => {
                        let _ = ready.send(Err(err));
                        return;
                    }
                };
                drop(model_bytes);
                let _ = ready.send(Ok(()));
                drop(ready);
                worker.serve(&queue);
            })
            .map_err(StartupError::SpawnWorker)?;
        handles.push(handle);
    }
    drop(ready_tx);
    drop(queue);
    for _ in 0..options.workers {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return Err(err),
            Err(_) => return Err(StartupError::WorkerExited),
        }
    }
    Ok((Inferencer { jobs }, WorkerPool { handles }))
}

/// One session plus the buffers of one request in flight: what a worker thread owns.
/// Usable on its own for in-process measurements (see examples/).
pub struct Predictor {
    session: Session,
    input_name: String,
    probabilities_name: String,
    num_labels: usize,
    max_pixels: u64,
    decoded: RgbImage,
    scratch: Scratch,
    input: Vec<u8>,
}

impl Predictor {
    /// Builds the session from the ONNX bytes, checks it against the contract and runs
    /// one warm-up inference.
    pub fn new(
        spec: &ModelSpec,
        model_bytes: &[u8],
        intra_threads: usize,
        max_pixels: u64,
    ) -> Result<Self, StartupError> {
        let started = Instant::now();
        let session = session_builder(intra_threads)
            .map_err(StartupError::SessionOptions)?
            .commit_from_memory(model_bytes)
            .map_err(|source| StartupError::Session {
                path: spec.onnx_path.clone(),
                source,
            })?;
        check_session(&session, spec)?;
        let session_ms = started.elapsed().as_secs_f64() * 1e3;
        let mut worker = Self {
            session,
            input_name: spec.input_name.clone(),
            probabilities_name: spec.probabilities_name.clone(),
            num_labels: spec.labels.len(),
            max_pixels,
            decoded: RgbImage::default(),
            scratch: Scratch::default(),
            input: vec![0; INPUT_LEN],
        };
        // Warm-up: the first run allocates ONNX Runtime's buffers; do it before traffic.
        let probabilities = worker.run().map_err(StartupError::WarmUp)?;
        let total: f32 = probabilities.iter().sum();
        if (total - 1.0).abs() > 1e-3 {
            return Err(StartupError::NotADistribution {
                output: spec.probabilities_name.clone(),
                total,
            });
        }
        tracing::debug!(
            session_ms,
            warmup_ms = started.elapsed().as_secs_f64() * 1e3 - session_ms,
            "session ready"
        );
        Ok(worker)
    }

    fn serve(mut self, queue: &Receiver<Job>) {
        while let Ok(job) = queue.recv() {
            if job.reply.is_closed() {
                continue; // the client went away while the job waited
            }
            let started = Instant::now();
            let result = catch_unwind(AssertUnwindSafe(|| self.predict(&job.image)))
                .unwrap_or_else(|_| {
                    // A decoder bug on hostile input must not take the worker down.
                    self.decoded = RgbImage::default();
                    Err(ImageError::Corrupt("the image could not be decoded".into()).into())
                });
            if self.decoded.pixels.capacity() > KEEP_BUFFER_BYTES {
                self.decoded = RgbImage::default();
            }
            tracing::debug!(
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                ok = result.is_ok(),
                "job done"
            );
            let _ = job.reply.send(result);
        }
    }

    /// Encoded JPEG/PNG bytes → probabilities in label order.
    pub fn predict(&mut self, encoded: &[u8]) -> Result<Vec<f32>, AppError> {
        image::decode_rgb(encoded, self.max_pixels, &mut self.decoded)?;
        image::resize_and_crop(&self.decoded, &mut self.scratch, &mut self.input);
        self.run()
            .map_err(|err| AppError::Inference(err.to_string()))
    }

    /// Runs the model on the current input buffer.
    fn run(&mut self) -> Result<Vec<f32>, ort::Error> {
        let tensor =
            TensorRef::from_array_view(([1usize, CROP_SIZE, CROP_SIZE, 3], self.input.as_slice()))?;
        let outputs = self
            .session
            .run(ort::inputs![self.input_name.as_str() => tensor])?;
        let (_, probabilities) =
            outputs[self.probabilities_name.as_str()].try_extract_tensor::<f32>()?;
        if probabilities.len() != self.num_labels {
            return Err(ort::Error::new(format!(
                "`{}` has {} values, expected {}",
                self.probabilities_name,
                probabilities.len(),
                self.num_labels
            )));
        }
        Ok(probabilities.to_vec())
    }
}

/// The session options every worker uses: one inter-op thread, `intra_threads` intra-op
/// threads, spinning only when there is more than one.
fn session_builder(intra_threads: usize) -> Result<SessionBuilder, ort::Error> {
    Ok(Session::builder()?
        .with_optimization_level(GraphOptimizationLevel::Level3)?
        .with_intra_threads(intra_threads)?
        .with_inter_threads(1)?
        .with_intra_op_spinning(intra_threads > 1)?)
}

/// The graph must agree with the metadata's contract: a uint8 [N, 224, 224, 3] input and a
/// float32 [N, labels] probabilities output.
fn check_session(session: &Session, spec: &ModelSpec) -> Result<(), StartupError> {
    let missing = |kind, name: &str| StartupError::MissingTensor {
        kind,
        name: name.to_owned(),
    };
    let input = session
        .inputs()
        .iter()
        .find(|i| i.name() == spec.input_name)
        .ok_or_else(|| missing("input", &spec.input_name))?;
    let crop = CROP_SIZE as i64;
    match input.dtype() {
        ValueType::Tensor {
            ty: TensorElementType::Uint8,
            shape,
            ..
        } if shape.len() == 4 && matches!(shape[0], -1 | 1) && shape[1..] == [crop, crop, 3] => {}
        other => {
            return Err(StartupError::TensorMismatch {
                kind: "input",
                name: spec.input_name.clone(),
                found: format!("{other:?}"),
                expected: format!("uint8 [batch, {crop}, {crop}, 3]"),
            })
        }
    }
    let output = session
        .outputs()
        .iter()
        .find(|o| o.name() == spec.probabilities_name)
        .ok_or_else(|| missing("output", &spec.probabilities_name))?;
    let labels = spec.labels.len() as i64;
    let output_ok = matches!(output.dtype(), ValueType::Tensor { ty: TensorElementType::Float32, shape, .. }
        if shape.len() == 2 && matches!(shape[0], -1 | 1) && (shape[1] == labels || shape[1] == -1));
    if !output_ok {
        return Err(StartupError::TensorMismatch {
            kind: "output",
            name: spec.probabilities_name.clone(),
            found: format!("{:?}", output.dtype()),
            expected: format!("float32 [batch, {labels}]"),
        });
    }
    Ok(())
}

/// Loads ONNX Runtime from `dylib` (see `Config::ort_dylib_path`) and makes it the
/// process's runtime; sessions can be built afterwards.
pub fn init_runtime(dylib: &Path) -> Result<(), StartupError> {
    ort::init_from(dylib)
        .map_err(|source| StartupError::Runtime {
            path: dylib.to_path_buf(),
            source,
        })?
        .commit();
    Ok(())
}

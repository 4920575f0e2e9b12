//! Inference off the async runtime: worker threads that each own one ONNX Runtime session
//! (`Session::run` takes `&mut self`) and do the whole CPU-bound part of a request
//! (decode, resize, crop, run), fed by one bounded queue with a oneshot reply per job.
//! Admission (admission.rs) keeps the queue from filling; a full one is still answered at
//! once with 503 instead of piling up latency. A worker never starts a job whose client is
//! gone, nor one it could not finish by its deadline (the request timeout from the
//! request's headers), judging by how long its own recent runs took: that one is answered
//! 503, so the requests that are run are answered within the timeout, give or take how far
//! a run strays from the recent mean.
//!
//! Adaptive batching (off unless `Batching::max_size` > 1): a worker that takes a job waits
//! a little for more ([`gather`]) and runs their images through the model at once. Each
//! image is still decoded and cropped on its own, so a bad one is answered 400 alone and
//! never joins the batch; a failed run fails only the requests of its batch.

use std::num::NonZeroUsize;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    /// Jobs queued at most, in all.
    pub queue_capacity: usize,
    /// How long after its headers a request must be answered (see [`Inferencer::predict`]).
    pub request_timeout: Duration,
    /// From a request's headers to when its answer is planned to leave: the request timeout
    /// less `ANSWER_HEADROOM_MS` ([`crate::http::Limits::answer_within`]).
    pub answer_within: Duration,
    pub max_pixels: u64,
    pub batching: Batching,
}

/// How a worker groups jobs into one run of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// The most jobs in one run; 1 turns batching off.
    pub max_size: NonZeroUsize,
    /// How long a worker holding a job waits for more.
    pub wait: Duration,
}

impl Batching {
    /// One job per run, no waiting.
    pub const OFF: Self = Self {
        max_size: NonZeroUsize::MIN,
        wait: Duration::ZERO,
    };
}

type Reply = oneshot::Sender<Result<Vec<f32>, AppError>>;

struct Job {
    image: Vec<u8>,
    reply: Reply,
    /// When it must be answered: a worker that could not finish it by then answers 503
    /// instead of starting it.
    answer_by: Instant,
}

/// The handle request handlers use; cheap to clone.
#[derive(Clone)]
pub struct Inferencer {
    jobs: Sender<Job>,
    answer_within: Duration,
    expected_run: Arc<ExpectedRun>,
    /// The workers that take jobs from `jobs`, at least 1.
    workers: u32,
}

/// What a run is expected to take: the exponentially weighted mean of the recent runs,
/// kept by the workers and read by admission (a request is not given a place it could not
/// be answered from in time). With several workers, the last one to run writes it.
#[derive(Debug)]
pub struct ExpectedRun(AtomicU64);

impl ExpectedRun {
    pub fn new(initial: Duration) -> Self {
        Self(AtomicU64::new(duration_micros(initial)))
    }

    pub fn get(&self) -> Duration {
        Duration::from_micros(self.0.load(Ordering::Relaxed))
    }

    fn update_to(&self, expected: Duration) {
        self.0.store(duration_micros(expected), Ordering::Relaxed);
    }
}

fn duration_micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

impl Inferencer {
    /// Runs one encoded image (JPEG/PNG bytes) through preprocessing and the model and
    /// returns the probabilities in label order.
    ///
    /// `headers_at` is when the request's headers were in: a job that the worker taking it
    /// expects not to finish by `answer_within` of them is answered
    /// [`AppError::NotStarted`] and never run. Dropping the future (the client went away)
    /// before a worker takes the job means it is never run either.
    pub async fn predict(&self, image: Vec<u8>, headers_at: Instant) -> Result<Vec<f32>, AppError> {
        let (reply, answer) = oneshot::channel();
        let answer_by = headers_at + self.answer_within;
        self.jobs
            .try_send(Job {
                image,
                reply,
                answer_by,
            })
            .map_err(|err| match err {
                TrySendError::Full(_) => AppError::Overloaded,
                TrySendError::Disconnected(_) => AppError::NotReady,
            })?;
        answer
            .await
            .map_err(|_| AppError::Inference("the worker stopped before answering".into()))?
    }

    /// What a run is expected to take now (the workers' recent mean).
    pub fn expected_run(&self) -> Duration {
        self.expected_run.get()
    }

    /// How long the workers would take, by the recent mean run, to answer `requests`.
    pub fn queue_time(&self, requests: usize) -> Duration {
        self.expected_run() * u32::try_from(requests).unwrap_or(u32::MAX) / self.workers
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
/// warm-up inference (at each batch size it will use), or with the first error.
pub fn start(
    spec: &ModelSpec,
    options: &WorkerOptions,
) -> Result<(Inferencer, WorkerPool), StartupError> {
    let model_bytes: Arc<[u8]> = spec.read_onnx()?.into();
    let (jobs, queue) = crossbeam_channel::bounded::<Job>(options.queue_capacity.max(1));
    let request_timeout = options.request_timeout;
    let expected_run = Arc::new(ExpectedRun::new(Duration::ZERO));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), StartupError>>();
    let mut handles = Vec::with_capacity(options.workers);
    for index in 0..options.workers {
        let queue = queue.clone();
        let ready = ready_tx.clone();
        let model_bytes = Arc::clone(&model_bytes);
        let spec = spec.clone();
        let intra_threads = options.intra_threads;
        let max_pixels = options.max_pixels;
        let batching = options.batching;
        let expected_run = Arc::clone(&expected_run);
        let handle = std::thread::Builder::new()
            .name(format!("infer-{index}"))
            .spawn(move || {
                let predictor = Predictor::new(&spec, &model_bytes, intra_threads, max_pixels)
                    .and_then(|mut predictor| {
                        predictor.reserve_batch(batching.max_size)?;
                        Ok(predictor)
                    });
                let mut predictor = match predictor {
                    Ok(predictor) => predictor,
                    Err(err) => {
                        let _ = ready.send(Err(err));
                        return;
                    }
                };
                drop(model_bytes);
                let _ = ready.send(Ok(()));
                drop(ready);
                expected_run.update_to(predictor.warm_up_run());
                serve(
                    &mut predictor,
                    &queue,
                    batching,
                    request_timeout,
                    &expected_run,
                );
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
    Ok((
        Inferencer {
            jobs,
            answer_within: options.answer_within,
            expected_run,
            workers: u32::try_from(options.workers.max(1)).unwrap_or(u32::MAX),
        },
        WorkerPool { handles },
    ))
}

/// Takes the next jobs from `queue` into `batch` (empty on entry): waits as long as it
/// takes for the first, then until the batch holds `max_size` jobs or `wait` has passed
/// since the first was taken. Jobs already queued at the deadline still join, up to
/// `max_size`. With `max_size` 1 this is one blocking `recv`: no clock, no waiting.
///
/// Returns false, with `batch` empty, once the queue is closed and drained.
fn gather<T>(queue: &Receiver<T>, batching: Batching, batch: &mut Vec<T>) -> bool {
    debug_assert!(batch.is_empty());
    let Ok(first) = queue.recv() else {
        return false;
    };
    batch.push(first);
    let max_size = batching.max_size.get();
    if max_size > 1 {
        let deadline = Instant::now() + batching.wait;
        while batch.len() < max_size {
            match queue.recv_deadline(deadline) {
                Ok(job) => batch.push(job),
                Err(_) => break, // the deadline passed, or the queue closed
            }
        }
    }
    true
}

/// What a worker runs its batches on: [`Predictor`], or a stand-in in tests.
trait BatchModel {
    /// Values per image in the output of [`BatchModel::run`].
    fn labels(&self) -> usize;
    /// Decodes, resizes and crops one encoded image into input slot `slot` (0-based).
    fn prepare(&mut self, encoded: &[u8], slot: usize) -> Result<(), ImageError>;
    /// Runs the images in slots `0..size`.
    fn run(&mut self, size: usize) -> Result<(), String>;
    /// The last run's output: one row of `labels()` probabilities per image.
    fn probabilities(&self) -> &[f32];
    /// Drops buffers that a panic may have left in any state.
    fn reset_buffers(&mut self);
}

/// How much of a worker's expected run time its latest run makes up.
const RUN_TIME_WEIGHT: f64 = 0.25;

/// A worker's expected run time once a run took `latest`: the exponentially weighted mean
/// of its runs.
fn expected_after(expected: Duration, latest: Duration) -> Duration {
    expected.mul_f64(1.0 - RUN_TIME_WEIGHT) + latest.mul_f64(RUN_TIME_WEIGHT)
}

/// A worker's loop, until the queue is closed and drained: gather a batch, prepare each
/// image (answering the bad ones at once), run the rest together, answer them. A job is
/// started when its image is prepared; one whose client is gone, or that this worker would
/// not finish by its `answer_by`, is not. What the worker expects a run to take is the
/// mean of the recent runs (from taking the jobs to having their probabilities), starting
/// at the warm-up run's time; the worker keeps its own and publishes it to `expected`.
fn serve<M: BatchModel>(
    model: &mut M,
    queue: &Receiver<Job>,
    batching: Batching,
    request_timeout: Duration,
    expected: &ExpectedRun,
) {
    // Both reused from batch to batch; no allocation per request once they have grown.
    let mut jobs = Vec::new();
    let mut prepared: Vec<Reply> = Vec::new(); // in input slot order
    let mut expected_run = expected.get();
    while gather(queue, batching, &mut jobs) {
        let started = Instant::now();
        let gathered = jobs.len();
        for job in jobs.drain(..) {
            if job.reply.is_closed() {
                continue; // the client went away while the job waited
            }
            if Instant::now() + expected_run > job.answer_by {
                // Running it would answer it late, and every job behind it later still.
                let _ = job.reply.send(Err(AppError::NotStarted {
                    within: request_timeout,
                }));
                continue;
            }
            let slot = prepared.len();
            match catch_unwind(AssertUnwindSafe(|| model.prepare(&job.image, slot))) {
                Ok(Ok(())) => prepared.push(job.reply),
                Ok(Err(err)) => {
                    let _ = job.reply.send(Err(err.into()));
                }
                Err(_) => {
                    // A decoder bug on hostile input must not take the worker down.
                    model.reset_buffers();
                    let err = ImageError::Corrupt("the image could not be decoded".into());
                    let _ = job.reply.send(Err(err.into()));
                }
            }
        }
        let size = prepared.len();
        if size == 0 {
            tracing::debug!(jobs = gathered, "no image to run");
            continue;
        }
        match catch_unwind(AssertUnwindSafe(|| model.run(size))) {
            Ok(Ok(())) => {
                // Only runs that gave probabilities count: a failed one says nothing about
                // how long the next will take.
                expected_run = expected_after(expected_run, started.elapsed());
                expected.update_to(expected_run);
                let probabilities = model.probabilities().chunks_exact(model.labels());
                // Were the output short, the replies left in the drain would be dropped:
                // those requests would get a 500, never hang.
                for (reply, row) in prepared.drain(..).zip(probabilities) {
                    let _ = reply.send(Ok(row.to_vec()));
                }
            }
            failed => {
                let message = match failed {
                    Ok(Err(message)) => message,
                    _ => "the model panicked".to_string(),
                };
                tracing::error!(batch = size, error = %message, "inference failed");
                for reply in prepared.drain(..) {
                    let _ = reply.send(Err(AppError::Inference(message.clone())));
                }
            }
        }
        tracing::debug!(
            jobs = gathered,
            batch = size,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            expected_ms = expected_run.as_secs_f64() * 1e3,
            "batch done"
        );
    }
}

/// One session plus the buffers of the requests in flight: what a worker thread owns.
/// Usable on its own for in-process measurements (see examples/).
pub struct Predictor {
    session: Session,
    input_name: String,
    probabilities_name: String,
    num_labels: usize,
    max_pixels: u64,
    /// Whether the model takes batches of more than one image.
    dynamic_batch: bool,
    decoded: RgbImage,
    scratch: Scratch,
    /// Input slots of `INPUT_LEN` bytes, one per image of a batch.
    input: Vec<u8>,
    /// The last run's probabilities, one row per image.
    output: Vec<f32>,
    /// How long the last warm-up run took.
    warm_up: Duration,
}

impl Predictor {
    /// Builds the session from the ONNX bytes, checks it against the contract and runs
    /// one warm-up inference. Room for one image; see [`Predictor::reserve_batch`].
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
        let dynamic_batch = check_session(&session, spec)?;
        let session_ms = started.elapsed().as_secs_f64() * 1e3;
        let mut worker = Self {
            session,
            input_name: spec.input_name.clone(),
            probabilities_name: spec.probabilities_name.clone(),
            num_labels: spec.labels.len(),
            max_pixels,
            dynamic_batch,
            decoded: RgbImage::default(),
            scratch: Scratch::default(),
            input: vec![0; INPUT_LEN],
            output: Vec::with_capacity(spec.labels.len()),
            warm_up: Duration::ZERO,
        };
        // Warm-up: the first run allocates ONNX Runtime's buffers; do it before traffic.
        let warm_up_started = Instant::now();
        let total: f32 = worker.run(1).map_err(StartupError::WarmUp)?.iter().sum();
        worker.warm_up = warm_up_started.elapsed();
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

    /// Makes room for batches of up to `size` images and runs one, so that neither this
    /// struct's buffers nor ONNX Runtime's for that shape are allocated while serving.
    /// Refuses a model whose batch dimension is fixed at 1.
    pub fn reserve_batch(&mut self, size: NonZeroUsize) -> Result<(), StartupError> {
        let size = size.get();
        if size == 1 {
            return Ok(());
        }
        if !self.dynamic_batch {
            return Err(StartupError::TensorMismatch {
                kind: "input",
                name: self.input_name.clone(),
                found: "a fixed batch of 1".into(),
                expected: format!("a dynamic batch dimension (--max-batch-size is {size})"),
            });
        }
        self.input.resize(size * INPUT_LEN, 0);
        self.output.reserve(size * self.num_labels);
        let started = Instant::now();
        self.run(size).map_err(StartupError::WarmUp)?;
        self.warm_up = started.elapsed();
        Ok(())
    }

    /// How long the last warm-up run took: of one image, or of the largest batch once
    /// [`Predictor::reserve_batch`] has run one. A worker expects its first runs to take
    /// about as long.
    pub fn warm_up_run(&self) -> Duration {
        self.warm_up
    }

    /// Encoded JPEG/PNG bytes → probabilities in label order.
    pub fn predict(&mut self, encoded: &[u8]) -> Result<Vec<f32>, AppError> {
        self.prepare(encoded, 0)?;
        self.run(1)
            .map(<[f32]>::to_vec)
            .map_err(|err| AppError::Inference(err.to_string()))
    }

    /// Decodes, resizes and crops one encoded JPEG/PNG into input slot `slot`, growing
    /// the input if the slot is beyond those reserved.
    pub fn prepare(&mut self, encoded: &[u8], slot: usize) -> Result<(), ImageError> {
        let decoded = image::decode_rgb(encoded, self.max_pixels, &mut self.decoded);
        if decoded.is_ok() {
            let end = (slot + 1) * INPUT_LEN;
            if self.input.len() < end {
                self.input.resize(end, 0);
            }
            let out = &mut self.input[end - INPUT_LEN..end];
            image::resize_and_crop(&self.decoded, &mut self.scratch, out);
        }
        if self.decoded.pixels.capacity() > KEEP_BUFFER_BYTES {
            self.decoded = RgbImage::default();
        }
        decoded
    }

    /// Runs the model on input slots `0..size`: `size` rows of probabilities in label
    /// order.
    pub fn run(&mut self, size: usize) -> Result<&[f32], ort::Error> {
        let input = self
            .input
            .get(..size * INPUT_LEN)
            .filter(|_| size > 0)
            .ok_or_else(|| ort::Error::new(format!("no room for a batch of {size}")))?;
        let tensor = TensorRef::from_array_view(([size, CROP_SIZE, CROP_SIZE, 3], input))?;
        let outputs = self
            .session
            .run(ort::inputs![self.input_name.as_str() => tensor])?;
        let (_, probabilities) =
            outputs[self.probabilities_name.as_str()].try_extract_tensor::<f32>()?;
        if probabilities.len() != size * self.num_labels {
            return Err(ort::Error::new(format!(
                "`{}` has {} values for {size} images, expected {} each",
                self.probabilities_name,
                probabilities.len(),
                self.num_labels
            )));
        }
        self.output.clear();
        self.output.extend_from_slice(probabilities);
        Ok(&self.output)
    }
}

impl BatchModel for Predictor {
    fn labels(&self) -> usize {
        self.num_labels
    }

    fn prepare(&mut self, encoded: &[u8], slot: usize) -> Result<(), ImageError> {
        Predictor::prepare(self, encoded, slot)
    }

    fn run(&mut self, size: usize) -> Result<(), String> {
        Predictor::run(self, size)
            .map(drop)
            .map_err(|err| err.to_string())
    }

    fn probabilities(&self) -> &[f32] {
        &self.output
    }

    fn reset_buffers(&mut self) {
        self.decoded = RgbImage::default();
        self.scratch = Scratch::default();
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
/// float32 [N, labels] probabilities output. Returns whether N is dynamic (batches of more
/// than one image) rather than fixed at 1.
fn check_session(session: &Session, spec: &ModelSpec) -> Result<bool, StartupError> {
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
    let dynamic_batch = match input.dtype() {
        ValueType::Tensor {
            ty: TensorElementType::Uint8,
            shape,
            ..
        } if shape.len() == 4 && matches!(shape[0], -1 | 1) && shape[1..] == [crop, crop, 3] => {
            shape[0] == -1
        }
        other => {
            return Err(StartupError::TensorMismatch {
                kind: "input",
                name: spec.input_name.clone(),
                found: format!("{other:?}"),
                expected: format!("uint8 [batch, {crop}, {crop}, 3]"),
            })
        }
    };
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
    Ok(dynamic_batch)
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

/// A model without ONNX Runtime, for tests of the batching here and of the routes.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Encoded bytes on which [`FakeModel::prepare`] panics, as a decoder bug would.
    pub const PANICS_DECODER: &[u8] = b"\xFF\xD8\xFF panic";

    #[derive(Debug, Clone, Copy)]
    pub enum Failure {
        Error,
        Panic,
    }

    /// The real decoding, resizing and cropping; as its three "probabilities", the crop's
    /// shares of red, green and blue, so each image gets its own answer.
    #[derive(Default)]
    pub struct FakeModel {
        decoded: RgbImage,
        scratch: Scratch,
        input: Vec<u8>,
        output: Vec<f32>,
        fail_runs_of: Option<(usize, Failure)>,
        gate: Option<Gate>,
        /// How long each run takes, slept through; also what its warm-up took, for the
        /// worker's first estimate.
        pub run_time: Duration,
        /// How many images it was asked to prepare.
        pub prepared: usize,
        /// The size of each run.
        pub runs: Vec<usize>,
    }

    /// Holds a worker at each image it starts, so that tests can keep it busy: the model
    /// says `started` and waits for one message on `proceed` (or for it to close).
    pub struct Gate {
        pub started: crossbeam_channel::Sender<()>,
        pub proceed: crossbeam_channel::Receiver<()>,
    }

    /// The test's side of a [`Gate`].
    pub struct GateControl {
        /// One message per image started.
        pub started: crossbeam_channel::Receiver<()>,
        /// One message lets one image through; dropping it lets all through.
        pub proceed: crossbeam_channel::Sender<()>,
    }

    impl FakeModel {
        /// One whose runs of `size` images fail.
        pub fn failing(size: usize, failure: Failure) -> Self {
            Self {
                fail_runs_of: Some((size, failure)),
                ..Self::default()
            }
        }

        /// One whose every run takes `run_time`.
        pub fn taking(run_time: Duration) -> Self {
            Self {
                run_time,
                ..Self::default()
            }
        }

        /// One that waits at every image it starts until the test lets it proceed.
        pub fn gated() -> (Self, GateControl) {
            let (started_tx, started) = crossbeam_channel::unbounded();
            let (proceed, proceed_rx) = crossbeam_channel::unbounded();
            let model = Self {
                gate: Some(Gate {
                    started: started_tx,
                    proceed: proceed_rx,
                }),
                ..Self::default()
            };
            (model, GateControl { started, proceed })
        }
    }

    impl BatchModel for FakeModel {
        fn labels(&self) -> usize {
            3
        }

        fn prepare(&mut self, encoded: &[u8], slot: usize) -> Result<(), ImageError> {
            self.prepared += 1;
            if let Some(gate) = &self.gate {
                let _ = gate.started.send(());
                let _ = gate.proceed.recv();
            }
            assert!(encoded != PANICS_DECODER, "decoder bug");
            image::decode_rgb(encoded, 40_000_000, &mut self.decoded)?;
            let end = (slot + 1) * INPUT_LEN;
            if self.input.len() < end {
                self.input.resize(end, 0);
            }
            image::resize_and_crop(
                &self.decoded,
                &mut self.scratch,
                &mut self.input[end - INPUT_LEN..end],
            );
            Ok(())
        }

        fn run(&mut self, size: usize) -> Result<(), String> {
            self.runs.push(size);
            std::thread::sleep(self.run_time);
            match self.fail_runs_of {
                Some((n, Failure::Error)) if n == size => return Err("no luck".into()),
                Some((n, Failure::Panic)) if n == size => panic!("the model panicked"),
                _ => {}
            }
            self.output.clear();
            for slot in self.input[..size * INPUT_LEN].chunks_exact(INPUT_LEN) {
                let mut sums = [0f64; 3];
                for pixel in slot.chunks_exact(3) {
                    for (sum, &value) in sums.iter_mut().zip(pixel) {
                        *sum += f64::from(value) + 1.0; // + 1: never all zero
                    }
                }
                let total: f64 = sums.iter().sum();
                self.output.extend(sums.map(|sum| (sum / total) as f32));
            }
            Ok(())
        }

        fn probabilities(&self) -> &[f32] {
            &self.output
        }

        fn reset_buffers(&mut self) {
            self.decoded = RgbImage::default();
        }
    }

    impl Inferencer {
        /// An inferencer whose one worker serves a [`FakeModel`].
        pub(crate) fn fake(batching: Batching) -> Self {
            Self::fake_with(FakeModel::default(), batching, Duration::from_secs(60))
        }

        /// An inferencer whose one worker serves `model`, answering jobs at most
        /// `request_timeout` after their headers, and expecting its first runs to take the
        /// model's `run_time`.
        pub(crate) fn fake_with(
            mut model: FakeModel,
            batching: Batching,
            request_timeout: Duration,
        ) -> Self {
            let (jobs, queue) = crossbeam_channel::bounded(64);
            let expected_run = Arc::new(ExpectedRun::new(model.run_time));
            let worker_expected = Arc::clone(&expected_run);
            std::thread::spawn(move || {
                serve(
                    &mut model,
                    &queue,
                    batching,
                    request_timeout,
                    &worker_expected,
                )
            });
            Self {
                jobs,
                answer_within: request_timeout,
                expected_run,
                workers: 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{Failure, FakeModel, PANICS_DECODER};
    use super::*;

    const RGB_420: &[u8] = include_bytes!("../tests/fixtures/rgb_420.jpg");
    const GRAY: &[u8] = include_bytes!("../tests/fixtures/gray.jpg");
    const CMYK: &[u8] = include_bytes!("../tests/fixtures/cmyk.jpg");

    fn batching(max_size: usize, wait: Duration) -> Batching {
        Batching {
            max_size: NonZeroUsize::new(max_size).expect("max_size > 0"),
            wait,
        }
    }

    fn gather_now<T>(queue: &Receiver<T>, batching: Batching) -> (Vec<T>, Duration) {
        let started = Instant::now();
        let mut batch = Vec::new();
        assert!(gather(queue, batching, &mut batch), "queue closed");
        (batch, started.elapsed())
    }

    #[test]
    fn gather_stops_at_the_batch_size() {
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..5 {
            tx.send(i).expect("send");
        }
        let (batch, elapsed) = gather_now(&rx, batching(3, Duration::from_secs(10)));
        assert_eq!(batch, [0, 1, 2]);
        assert!(elapsed < Duration::from_secs(5), "waited {elapsed:?}");
        assert_eq!(rx.len(), 2, "the rest stays queued for the next batch");
    }

    #[test]
    fn gather_stops_at_the_deadline() {
        let (tx, rx) = crossbeam_channel::unbounded();
        tx.send(0).expect("send");
        let wait = Duration::from_millis(50);
        let (batch, elapsed) = gather_now(&rx, batching(8, wait));
        assert_eq!(batch, [0]);
        assert!(elapsed >= wait, "returned after {elapsed:?}");
        assert!(elapsed < Duration::from_secs(5), "waited {elapsed:?}");
        drop(tx);
    }

    #[test]
    fn gather_takes_jobs_that_arrive_while_it_waits() {
        let (tx, rx) = crossbeam_channel::unbounded();
        tx.send(0).expect("send");
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(1).expect("send");
            tx // kept alive, so only the size can end the batch
        });
        let (batch, elapsed) = gather_now(&rx, batching(2, Duration::from_secs(30)));
        assert_eq!(batch, [0, 1]);
        assert!(elapsed < Duration::from_secs(10), "waited {elapsed:?}");
        drop(late.join());
    }

    #[test]
    fn gather_never_waits_when_the_size_is_1() {
        let (tx, rx) = crossbeam_channel::unbounded();
        tx.send(0).expect("send");
        tx.send(1).expect("send");
        let (batch, elapsed) = gather_now(&rx, batching(1, Duration::from_secs(30)));
        assert_eq!(batch, [0]);
        assert!(elapsed < Duration::from_secs(10), "waited {elapsed:?}");
        let (batch, _) = gather_now(&rx, Batching::OFF);
        assert_eq!(batch, [1]);
    }

    #[test]
    fn gather_with_no_wait_takes_only_what_is_queued() {
        let (tx, rx) = crossbeam_channel::unbounded();
        tx.send(0).expect("send");
        tx.send(1).expect("send");
        let (batch, _) = gather_now(&rx, batching(8, Duration::ZERO));
        assert_eq!(batch, [0, 1]);
    }

    #[test]
    fn gather_reports_a_closed_queue() {
        let (tx, rx) = crossbeam_channel::unbounded::<u8>();
        drop(tx);
        let mut batch = Vec::new();
        assert!(!gather(
            &rx,
            batching(8, Duration::from_secs(30)),
            &mut batch
        ));
        assert!(batch.is_empty());
    }

    type Answer = oneshot::Receiver<Result<Vec<f32>, AppError>>;

    /// The request timeout of these tests: longer than any of them takes.
    const WAIT: Duration = Duration::from_secs(600);

    /// Queues `images`, closes the queue and lets `serve` work through it on this thread.
    fn serve_all(model: &mut FakeModel, batching: Batching, images: &[&[u8]]) -> Vec<Answer> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let answers = images
            .iter()
            .map(|image| {
                let (reply, answer) = oneshot::channel();
                tx.send(Job {
                    image: image.to_vec(),
                    reply,
                    answer_by: Instant::now() + WAIT,
                })
                .expect("send");
                answer
            })
            .collect();
        drop(tx);
        serve(
            model,
            &rx,
            batching,
            WAIT,
            &ExpectedRun::new(Duration::ZERO),
        );
        answers
    }

    fn answer(answer: &mut Answer) -> Result<Vec<f32>, AppError> {
        answer.try_recv().expect("answered")
    }

    /// Each image's answer on its own, without batching.
    fn alone(image: &[u8]) -> Vec<f32> {
        let mut answers = serve_all(&mut FakeModel::default(), Batching::OFF, &[image]);
        answer(&mut answers[0]).expect("a good image")
    }

    #[test]
    fn a_batch_answers_each_request_with_its_own_row() {
        let mut model = FakeModel::default();
        let images = [RGB_420, GRAY, CMYK, RGB_420];
        let mut answers = serve_all(&mut model, batching(8, Duration::ZERO), &images);
        assert_eq!(model.runs, [4], "one run for the four");
        for (image, answer_rx) in images.iter().zip(&mut answers) {
            assert_eq!(answer(answer_rx).expect("a good image"), alone(image));
        }
        assert_ne!(alone(RGB_420), alone(GRAY), "the fake tells images apart");
    }

    #[test]
    fn a_bad_image_fails_alone() {
        let mut model = FakeModel::default();
        let images: [&[u8]; 5] = [RGB_420, b"not an image", GRAY, PANICS_DECODER, CMYK];
        let mut answers = serve_all(&mut model, batching(8, Duration::ZERO), &images);
        assert_eq!(model.runs, [3], "the good three ran together");
        assert_eq!(answer(&mut answers[0]).expect("good"), alone(RGB_420));
        assert!(matches!(
            answer(&mut answers[1]),
            Err(AppError::Image(ImageError::NotAnImage))
        ));
        assert_eq!(answer(&mut answers[2]).expect("good"), alone(GRAY));
        assert!(matches!(
            answer(&mut answers[3]),
            Err(AppError::Image(ImageError::Corrupt(_)))
        ));
        assert_eq!(answer(&mut answers[4]).expect("good"), alone(CMYK));
    }

    #[test]
    fn a_failed_run_fails_only_its_batch() {
        for failure in [Failure::Error, Failure::Panic] {
            let mut model = FakeModel::failing(2, failure);
            let images = [RGB_420, GRAY, CMYK];
            let mut answers = serve_all(&mut model, batching(2, Duration::ZERO), &images);
            assert_eq!(model.runs, [2, 1], "{failure:?}");
            for answer_rx in &mut answers[..2] {
                let err = answer(answer_rx).expect_err("the failed batch");
                assert_eq!(err.status(), 500, "{failure:?}: {err}");
            }
            assert_eq!(answer(&mut answers[2]).expect("next batch"), alone(CMYK));
        }
    }

    #[test]
    fn abandoned_jobs_are_skipped() {
        let mut model = FakeModel::default();
        let (tx, rx) = crossbeam_channel::unbounded();
        let (reply, answer_rx) = oneshot::channel();
        drop(answer_rx); // the client went away
        tx.send(Job {
            image: RGB_420.to_vec(),
            reply,
            answer_by: Instant::now() + WAIT,
        })
        .expect("send");
        drop(tx);
        serve(
            &mut model,
            &rx,
            batching(8, Duration::ZERO),
            WAIT,
            &ExpectedRun::new(Duration::ZERO),
        );
        assert_eq!(model.prepared, 0);
        assert!(model.runs.is_empty());
    }

    /// Queues one job of [`RGB_420`] per deadline, closes the queue and lets `serve` work
    /// through it on this thread, expecting runs to take `expected_run` at first.
    fn serve_by(
        model: &mut FakeModel,
        timeout: Duration,
        expected_run: Duration,
        deadlines: &[Instant],
    ) -> Vec<Answer> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let answers = deadlines
            .iter()
            .map(|&answer_by| {
                let (reply, answer_rx) = oneshot::channel();
                tx.send(Job {
                    image: RGB_420.to_vec(),
                    reply,
                    answer_by,
                })
                .expect("send");
                answer_rx
            })
            .collect();
        drop(tx);
        serve(
            model,
            &rx,
            batching(8, Duration::ZERO),
            timeout,
            &ExpectedRun::new(expected_run),
        );
        answers
    }

    fn assert_not_started(answer_rx: &mut Answer, timeout: Duration) {
        match answer(answer_rx) {
            Err(err @ AppError::NotStarted { within }) => {
                assert_eq!(within, timeout);
                assert_eq!(err.status(), 503);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn jobs_past_their_deadline_are_answered_503_and_not_run() {
        let mut model = FakeModel::default();
        let timeout = Duration::from_millis(50);
        let deadlines = [
            Instant::now() - Duration::from_millis(1),
            Instant::now() + WAIT,
        ];
        let mut answers = serve_by(&mut model, timeout, Duration::ZERO, &deadlines);
        assert_eq!(model.prepared, 1, "only the one still in time");
        assert_eq!(model.runs, [1]);
        assert_not_started(&mut answers[0], timeout);
        assert_eq!(answer(&mut answers[1]).expect("in time"), alone(RGB_420));
    }

    #[test]
    fn jobs_the_worker_could_not_finish_in_time_are_answered_503_and_not_run() {
        // Its runs take 300 ms, as its warm-up did: a job due in 100 ms would be late.
        let run_time = Duration::from_millis(300);
        let mut model = FakeModel::taking(run_time);
        let timeout = Duration::from_secs(2);
        let deadlines = [
            Instant::now() + Duration::from_millis(100),
            Instant::now() + WAIT,
        ];
        let mut answers = serve_by(&mut model, timeout, run_time, &deadlines);
        assert_eq!(model.prepared, 1, "only the one it can finish in time");
        assert_eq!(model.runs, [1]);
        assert_not_started(&mut answers[0], timeout);
        assert_eq!(answer(&mut answers[1]).expect("in time"), alone(RGB_420));
    }

    #[test]
    fn the_expected_run_is_a_weighted_mean_of_the_recent_runs() {
        let ms = Duration::from_millis;
        let about = |a: Duration, b: Duration| a.abs_diff(b) < Duration::from_micros(1);
        assert!(about(expected_after(ms(100), ms(100)), ms(100)));
        assert!(
            about(expected_after(ms(100), ms(500)), ms(200)),
            "a quarter of the latest"
        );
        let mut expected = ms(1000); // a slow warm-up
        for _ in 0..20 {
            expected = expected_after(expected, ms(10));
        }
        assert!(
            expected < ms(15),
            "forgotten after a few runs: {expected:?}"
        );
    }

    #[test]
    fn the_deadline_counts_from_the_headers_not_from_the_queue() {
        // A request whose headers arrived long ago is late even if queued just now.
        let inferencer = Inferencer::fake_with(
            FakeModel::default(),
            Batching::OFF,
            Duration::from_millis(100),
        );
        let runtime = actix_web::rt::System::new();
        let late = runtime.block_on(
            inferencer.predict(RGB_420.to_vec(), Instant::now() - Duration::from_secs(1)),
        );
        assert!(matches!(late, Err(AppError::NotStarted { .. })), "{late:?}");
        let in_time = runtime.block_on(inferencer.predict(RGB_420.to_vec(), Instant::now()));
        assert_eq!(in_time.expect("in time"), alone(RGB_420));
    }
}
